//! `mpserver`: the server end of the multipath tunnel. See `--help`.

use clap::Parser;
use common::config::ServerConfig;
use common::driver::{exit_with_error, require_key, DaemonCommand};
use std::path::PathBuf;

/// Accepts multipath tunnel sessions from many mpclients on one UDP port, removes the
/// duplicate copies, and forwards each session to its target from its own socket.
///
/// Drop-in for mptunnel: `mpserver <listen-port> <target-host> <target-port>`.
/// Or: `mpserver -c server.yaml` for named targets, limits and ciphers (see conf/server.yaml).
#[derive(Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<DaemonCommand>,
    /// UDP port to listen on (all addresses; each client is answered from the one it
    /// sent to).
    #[arg(conflicts_with = "config", required_unless_present = "config", requires = "target_host")]
    listen_port: Option<u16>,
    /// Where sessions are forwarded to.
    #[arg(requires = "target_port")]
    target_host: Option<String>,
    target_port: Option<u16>,
    /// YAML config (listen, key_file, target, targets allow-list, limits ...).
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// The shared key (make one with `mpserver genkey FILE`).
    #[arg(long, env = "MPT_KEY_FILE", value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// Control socket for `mpserver status` [default: /run/mptunnel/mpserver.sock].
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// error, warn, info, debug or trace [default: info, or the config's].
    #[arg(long)]
    log_level: Option<String>,
}

fn fail<T>(message: String) -> T {
    exit_with_error("mpserver", &message)
}

fn main() {
    let cli = Cli::parse();
    if let Some(command) = cli.command {
        command.run("mpserver");
    }
    let (mut rt, key_file, level) = if let Some(path) = &cli.config {
        let c = ServerConfig::load(path).unwrap_or_else(|e| fail(e.to_string()));
        let rt = mpserver::ServerRuntime::from_config(&path.display().to_string(), &c).unwrap_or_else(fail);
        (rt, cli.key_file.clone().or(c.key_file.clone()), c.log_level.clone())
    } else {
        let (Some(port), Some(host), Some(tport)) = (cli.listen_port, &cli.target_host, cli.target_port) else {
            exit_with_error(
                "mpserver",
                "usage: mpserver <listen-port> <target-host> <target-port>, or mpserver -c server.yaml",
            )
        };
        (
            mpserver::ServerRuntime::from_args(port, host, tport).unwrap_or_else(fail),
            cli.key_file.clone(),
            "info".into(),
        )
    };
    rt.control = cli.control.unwrap_or(rt.control);
    let level = cli.log_level.unwrap_or(level);
    if !common::config::validate_log_level(&level) {
        fail::<()>(format!("--log-level: `{level}` is not one of error, warn, info, debug, trace"));
    }
    let (psk, warning) = require_key("mpserver", key_file.as_deref()).unwrap_or_else(fail);
    let (log, guard) = mpserver::logger(&level);
    if let Some(w) = warning {
        slog::warn!(log, "{}", w);
    }
    if let Err(e) = mpserver::run(rt, psk, log.clone()) {
        slog::crit!(log, "{}", e);
        drop(guard);
        fail::<()>(e);
    }
}
