//! The command line of this program (clap), in the library so that man pages and shell
//! completions are generated from the same definitions.

use clap::Parser;
use common::driver::{DaemonArgs, DaemonCommand};
use std::path::PathBuf;

/// Accepts multipath tunnel sessions from many mpclients on one UDP port, removes the
/// duplicate copies, and forwards each session to its target from its own socket.
///
/// Drop-in for mptunnel: `mpserver <listen-port> <target-host> <target-port>`.
/// Or: `mpserver -c server.yaml` for named targets, limits and ciphers (see conf/server.yaml).
/// SIGTERM or SIGINT stops it cleanly (final stats line, control socket removed).
#[derive(Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<DaemonCommand>,
    /// UDP port to listen on (all addresses; each client is answered from the one it
    /// sent to).
    #[arg(conflicts_with = "config", required_unless_present = "config", requires = "target_host")]
    pub listen_port: Option<u16>,
    /// Where sessions are forwarded to.
    #[arg(requires = "target_port")]
    pub target_host: Option<String>,
    pub target_port: Option<u16>,
    /// YAML config (listen, key_file, target, targets allow-list, limits ...).
    #[arg(short, long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}
