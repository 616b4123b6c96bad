//! `mpclient`: the client end of the multipath tunnel. See `--help`.

use clap::Parser;
use common::config::{parse_bridges, ClientConfig};
use common::driver::{exit_with_error, require_key, DaemonCommand};
use std::net::SocketAddr;
use std::path::PathBuf;

/// Sends every datagram from local applications over all paths (relays or local uplinks)
/// to an mpserver, sealed once and duplicated; the first copy of each reply wins.
///
/// Drop-in for mptunnel: `mpclient bridges.conf` with lines of `host port`.
/// Or: `mpclient -c client.yaml` for everything else (see conf/client.yaml).
#[derive(Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<DaemonCommand>,
    /// mptunnel bridges file: one `host port` per line, `#` comments.
    #[arg(conflicts_with = "config", required_unless_present = "config")]
    bridges_file: Option<PathBuf>,
    /// YAML config (listen, key_file, cipher, target, paths with bind/interface ...).
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// Local address applications send to [default: 127.0.0.1:3000, or the config's].
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<SocketAddr>,
    /// The shared key (make one with `mpclient genkey FILE`).
    #[arg(long, env = "MPT_KEY_FILE", value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// Control socket for `mpclient status` [default: /run/mptunnel/mpclient.sock].
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// error, warn, info, debug or trace [default: info, or the config's].
    #[arg(long)]
    log_level: Option<String>,
}

fn fail<T>(message: String) -> T {
    exit_with_error("mpclient", &message)
}

fn main() {
    let cli = Cli::parse();
    if let Some(command) = cli.command {
        command.run("mpclient");
    }
    let (mut rt, key_file, level) = if let Some(path) = &cli.config {
        let file = path.display().to_string();
        let c = ClientConfig::load(path).unwrap_or_else(|e| fail(e.to_string()));
        let rt = mpclient::ClientRuntime::from_config(&file, &c).unwrap_or_else(fail);
        (rt, cli.key_file.clone().or(c.key_file.clone()), c.log_level.clone())
    } else {
        let path = cli.bridges_file.as_ref().expect("clap requires a bridges file or a config");
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| fail(format!("{file}: {e}")));
        let bridges = parse_bridges(&file, &text).unwrap_or_else(|e| fail(e.to_string()));
        let listen = common::config::DEFAULT_CLIENT_LISTEN.parse().expect("constant");
        (
            mpclient::ClientRuntime::from_bridges(&file, &bridges, listen).unwrap_or_else(fail),
            cli.key_file.clone(),
            "info".into(),
        )
    };
    rt.listen = cli.listen.unwrap_or(rt.listen);
    rt.control = cli.control.unwrap_or(rt.control);
    let level = cli.log_level.unwrap_or(level);
    if !common::config::validate_log_level(&level) {
        fail::<()>(format!("--log-level: `{level}` is not one of error, warn, info, debug, trace"));
    }
    let (psk, warning) = require_key("mpclient", key_file.as_deref()).unwrap_or_else(fail);
    let (log, _guard) = mpclient::logger(&level);
    if let Some(w) = warning {
        slog::warn!(log, "{}", w);
    }
    if let Err(e) = mpclient::run(rt, psk, log.clone()) {
        slog::crit!(log, "{}", e);
        drop(_guard);
        fail::<()>(e);
    }
}
