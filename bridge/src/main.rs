//! `mpbridge`: a UDP relay for bridge boxes. See `--help`.

use bridge::cli::Cli;
use bridge::driver::{run, BridgeRuntime};
use bridge::{BridgeConfig, Impairment};
use clap::Parser;
use common::driver::files::load_config;
use common::driver::{exit_with_error, resolve, run_daemon};
use std::time::Duration;

fn main() {
    let cli = Cli::parse();
    let fail = |m: String| -> ! { exit_with_error("mpbridge", &m) };
    if !(0.0..=100.0).contains(&cli.lab_loss) {
        fail(format!("--lab-loss: {} is not a percentage (0-100)", cli.lab_loss));
    }
    let c = match &cli.config {
        Some(path) => load_config(path, BridgeConfig::parse).unwrap_or_else(|e| fail(e.to_string())),
        None => BridgeConfig {
            listen: cli.listen.expect("clap requires --listen without --config"),
            to: cli.to.clone().expect("clap requires --to without --config"),
            idle_timeout_secs: cli.idle_timeout,
            max_flows: cli.max_flows,
            metrics_listen: cli.metrics_listen,
            log_level: cli.log_level.clone(),
        },
    };
    if c.idle_timeout_secs == 0 || c.max_flows == 0 {
        fail("--idle-timeout and --max-flows must be > 0".into());
    }
    let to = resolve(&c.to).unwrap_or_else(|e| fail(format!("to: {e}")));
    let rt = BridgeRuntime {
        listen: c.listen,
        to,
        idle_timeout: Duration::from_secs(c.idle_timeout_secs),
        max_flows: c.max_flows,
        metrics: c.metrics_listen,
        lab: Impairment {
            loss: cli.lab_loss / 100.0,
            delay: Duration::from_millis(cli.lab_delay),
            jitter: Duration::from_millis(cli.lab_jitter),
        },
    };
    run_daemon("mpbridge", &c.log_level, |log| run(rt, log));
}
