//! `mpclient`: the client end of the multipath tunnel. See `--help`.

use clap::Parser;
use common::config::{parse_bridges, ClientConfig, ConfigError, DEFAULT_CLIENT_LISTEN, DEFAULT_LOG_LEVEL};
use common::driver::files::load_config;
use common::driver::{exit_with_error, DaemonArgs, DaemonCommand};
use mpclient::ClientRuntime;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Sends every datagram from local applications over all paths (relays or local uplinks)
/// to an mpserver, sealed once and duplicated; the first copy of each reply wins.
///
/// Drop-in for mptunnel: `mpclient bridges.conf` with lines of `host port`.
/// Or: `mpclient -c client.yaml` for everything else (see conf/client.yaml).
/// SIGTERM or SIGINT stops it cleanly (final stats line, control socket removed).
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
    #[command(flatten)]
    daemon: DaemonArgs,
}

/// The runtime, key file and log level from a YAML config or a bridges file.
fn load(cli: &Cli) -> Result<(ClientRuntime, Option<PathBuf>, String), ConfigError> {
    if let Some(path) = &cli.config {
        let c = load_config(path, ClientConfig::parse)?;
        let rt = ClientRuntime::from_config(&path.display().to_string(), &c)?;
        return Ok((rt, c.key_file, c.log_level));
    }
    let path = cli.bridges_file.as_ref().expect("clap requires a bridges file or a config");
    let bridges = load_config(path, parse_bridges)?;
    let listen = DEFAULT_CLIENT_LISTEN.parse().expect("constant");
    let rt = ClientRuntime::from_bridges(&path.display().to_string(), &bridges, listen)?;
    Ok((rt, None, DEFAULT_LOG_LEVEL.into()))
}

fn main() {
    let cli = Cli::parse();
    if let Some(command) = cli.command {
        command.run("mpclient");
    }
    let (mut rt, key_file, level) = load(&cli).unwrap_or_else(|e| exit_with_error("mpclient", &e.to_string()));
    rt.listen = cli.listen.unwrap_or(rt.listen);
    rt.control = cli.daemon.control.clone().unwrap_or(rt.control);
    cli.daemon.run("mpclient", key_file, level, |log, key| mpclient::run(rt, key, log));
}
