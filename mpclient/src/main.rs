//! `mpclient`: the client end of the multipath tunnel. See `--help`.

use clap::Parser;
use common::config::{
    parse_bridges, ClientConfig, ConfigError, RedundancySettings, DEFAULT_CLIENT_LISTEN, DEFAULT_LOG_LEVEL,
};
use common::driver::exit_with_error;
use common::driver::files::load_config;
use mpclient::cli::Cli;
use mpclient::ClientRuntime;
use std::path::PathBuf;

/// The runtime, key file, log level and redundancy settings from a YAML config or a
/// bridges file.
fn load(cli: &Cli) -> Result<(ClientRuntime, Option<PathBuf>, String, RedundancySettings), ConfigError> {
    if let Some(path) = &cli.config {
        let c = load_config(path, ClientConfig::parse)?;
        let rt = ClientRuntime::from_config(&path.display().to_string(), &c)?;
        return Ok((rt, c.key_file.clone(), c.log_level.clone(), c.redundancy_settings()));
    }
    let path = cli.bridges_file.as_ref().expect("clap requires a bridges file or a config");
    let bridges = load_config(path, parse_bridges)?;
    let listen = DEFAULT_CLIENT_LISTEN.parse().expect("constant");
    let rt = ClientRuntime::from_bridges(&path.display().to_string(), &bridges, listen)?;
    Ok((rt, None, DEFAULT_LOG_LEVEL.into(), RedundancySettings::default()))
}

fn main() {
    let cli = Cli::parse();
    if let Some(command) = cli.command {
        command.run("mpclient");
    }
    let (mut rt, key_file, level, mut redundancy) =
        load(&cli).unwrap_or_else(|e| exit_with_error("mpclient", &e.to_string()));
    rt.listen = cli.listen.unwrap_or(rt.listen);
    if cli.redundancy.is_some() || cli.fec.is_some() {
        redundancy.name = cli.redundancy.unwrap_or(redundancy.name);
        redundancy.fec = cli.fec.or(redundancy.fec);
        rt.redundancy = redundancy.to_config().unwrap_or_else(|(field, e)| {
            let flag = if field.starts_with("fec") { "--fec" } else { "--redundancy" };
            exit_with_error("mpclient", &format!("{flag}: {field}: {e}"))
        });
    }
    rt.control = cli.daemon.control.clone().unwrap_or(rt.control);
    cli.daemon.run("mpclient", key_file, level, |log, key| mpclient::run(rt, key, log));
}
