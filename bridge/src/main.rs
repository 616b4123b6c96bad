//! `mpbridge`: a UDP relay for bridge boxes. See `--help`.

use bridge::driver::{run, BridgeRuntime};
use bridge::{BridgeConfig, Impairment};
use clap::Parser;
use common::driver::files::load_config;
use common::driver::{exit_with_error, resolve, run_daemon};
use std::net::SocketAddr;
use std::time::Duration;

/// Relays UDP between many clients and one destination (usually an mpserver), with a
/// separate socket and an idle timeout per client flow. socat works as a bridge too;
/// this one serves many flows in one process and can impair traffic for labs.
/// SIGTERM or SIGINT stops it cleanly (with a final stats line).
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// YAML config (listen, to, idle_timeout_secs, max_flows, metrics_listen, log_level)
    /// instead of the flags.
    #[arg(short, long, conflicts_with_all = ["listen", "to", "idle_timeout", "max_flows", "metrics_listen"])]
    config: Option<std::path::PathBuf>,
    /// Address clients send to; on a wildcard (0.0.0.0 or [::]) each client is answered
    /// from the address it sent to.
    #[arg(long, value_name = "ADDR:PORT", required_unless_present = "config")]
    listen: Option<SocketAddr>,
    /// Where to relay to.
    #[arg(long, value_name = "HOST:PORT", required_unless_present = "config")]
    to: Option<String>,
    /// Serve Prometheus metrics on this address (`GET /metrics`).
    #[arg(long, value_name = "ADDR:PORT")]
    metrics_listen: Option<SocketAddr>,
    /// Close a flow after this many seconds without traffic.
    #[arg(long, default_value_t = bridge::DEFAULT_IDLE_TIMEOUT.as_secs(), value_name = "SECS")]
    idle_timeout: u64,
    /// Most client flows at once.
    #[arg(long, default_value_t = bridge::DEFAULT_MAX_FLOWS)]
    max_flows: usize,
    /// LAB ONLY: drop this percentage of datagrams, each direction.
    #[arg(long, default_value_t = 0.0, value_name = "PCT")]
    lab_loss: f64,
    /// LAB ONLY: delay every datagram by this many milliseconds, each direction.
    #[arg(long, default_value_t = 0, value_name = "MS")]
    lab_delay: u64,
    /// LAB ONLY: add a random extra delay of up to this many milliseconds (reorders).
    #[arg(long, default_value_t = 0, value_name = "MS")]
    lab_jitter: u64,
    /// error, warn, info, debug or trace.
    #[arg(long, default_value = "info")]
    log_level: String,
}

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
