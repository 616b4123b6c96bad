//! `mpserver`: the server end of the multipath tunnel. See `--help`.

use clap::Parser;
use common::config::{ServerConfig, DEFAULT_LOG_LEVEL};
use common::driver::files::load_config;
use common::driver::{exit_with_error, DriverError};
use mpserver::cli::Cli;
use mpserver::ServerRuntime;
use std::path::PathBuf;

/// The runtime, key file and log level from a YAML config or mptunnel's arguments.
fn load(cli: &Cli) -> Result<(ServerRuntime, Option<PathBuf>, String), DriverError> {
    if let Some(path) = &cli.config {
        let c = load_config(path, ServerConfig::parse)?;
        let rt = ServerRuntime::from_config(&path.display().to_string(), &c)?;
        return Ok((rt, c.key_file, c.log_level));
    }
    let (Some(port), Some(host), Some(target_port)) = (cli.listen_port, &cli.target_host, cli.target_port) else {
        exit_with_error(
            "mpserver",
            "usage: mpserver <listen-port> <target-host> <target-port>, or mpserver -c server.yaml",
        )
    };
    Ok((ServerRuntime::from_args(port, host, target_port)?, None, DEFAULT_LOG_LEVEL.into()))
}

fn main() {
    let cli = Cli::parse();
    if let Some(command) = cli.command {
        command.run("mpserver");
    }
    let (mut rt, key_file, level) = load(&cli).unwrap_or_else(|e| exit_with_error("mpserver", &e.to_string()));
    rt.control = cli.daemon.control.clone().unwrap_or(rt.control);
    cli.daemon.run("mpserver", key_file, level, |log, key| mpserver::run(rt, key, log));
}
