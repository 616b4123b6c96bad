//! The command line of this program (clap), in the library so that man pages and shell
//! completions are generated from the same definitions.

use clap::Parser;
use common::config::{FecShape, RedundancyName};
use common::driver::{DaemonArgs, DaemonCommand};
use std::net::SocketAddr;
use std::path::PathBuf;

/// Sends datagrams from local applications over several paths (relays or local uplinks)
/// to an mpserver, sealed once: by default (`--redundancy adaptive`) one copy on the best
/// path while the paths are clean and Reed–Solomon groups striped over them when they
/// lose, the loss of duplication at a fraction of its bytes; `--redundancy duplicate`
/// sends every datagram on every path as mptunnel does. The first copy of each reply
/// wins.
///
/// Drop-in for mptunnel: `mpclient bridges.conf` with lines of `host port`.
/// Or: `mpclient -c client.yaml` for everything else (see conf/client.yaml).
/// SIGTERM or SIGINT stops it cleanly (final stats line, control socket removed).
#[derive(Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<DaemonCommand>,
    /// mptunnel bridges file: one `host port` per line, `#` comments.
    #[arg(conflicts_with = "config", required_unless_present = "config")]
    pub bridges_file: Option<PathBuf>,
    /// YAML config (listen, key_file, cipher, target, paths with bind/interface ...).
    #[arg(short, long)]
    pub config: Option<PathBuf>,
    /// Local address applications send to [default: 127.0.0.1:3000, or the config's].
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,
    /// How datagrams are spread over the paths, both ways: `adaptive` (the cheapest scheme
    /// that meets the config's target_loss on each path's measured loss), `duplicate` (a
    /// copy on every live path) or `fec` (fixed Reed–Solomon groups, see --fec)
    /// [default: adaptive, or the config's].
    #[arg(long, value_name = "MODE")]
    pub redundancy: Option<RedundancyName>,
    /// With `--redundancy fec`: datagrams and parity shards per group [default: 10:4].
    #[arg(long, value_name = "DATA:PARITY", value_parser = parse_fec)]
    pub fec: Option<FecShape>,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

fn parse_fec(s: &str) -> Result<FecShape, String> {
    let (d, p) = s.split_once(':').ok_or_else(|| format!("`{s}` is not DATA:PARITY"))?;
    let num = |v: &str| v.parse::<u8>().map_err(|_| format!("`{v}` is not a count"));
    Ok(FecShape { data: num(d)?, parity: num(p)? })
}
