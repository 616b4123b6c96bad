//! The command line of this program (clap), in the library so that man pages and shell
//! completions are generated from the same definitions.

use clap::Parser;
use std::net::SocketAddr;

/// Relays UDP between many clients and one destination (usually an mpserver), with a
/// separate socket and an idle timeout per client flow. socat works as a bridge too;
/// this one serves many flows in one process and can impair traffic for labs.
/// SIGTERM or SIGINT stops it cleanly (with a final stats line).
#[derive(Parser)]
#[command(name = "mpbridge", version)]
pub struct Cli {
    /// YAML config (listen, to, idle_timeout_secs, max_flows, metrics_listen, log_level)
    /// instead of the flags.
    #[arg(short, long, conflicts_with_all = ["listen", "to", "idle_timeout", "max_flows", "metrics_listen"])]
    pub config: Option<std::path::PathBuf>,
    /// Address clients send to; on a wildcard (0.0.0.0 or [::]) each client is answered
    /// from the address it sent to.
    #[arg(long, value_name = "ADDR:PORT", required_unless_present = "config")]
    pub listen: Option<SocketAddr>,
    /// Where to relay to.
    #[arg(long, value_name = "HOST:PORT", required_unless_present = "config")]
    pub to: Option<String>,
    /// Serve Prometheus metrics on this address (`GET /metrics`).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_listen: Option<SocketAddr>,
    /// Close a flow after this many seconds without traffic.
    #[arg(long, default_value_t = crate::DEFAULT_IDLE_TIMEOUT.as_secs(), value_name = "SECS")]
    pub idle_timeout: u64,
    /// Most client flows at once.
    #[arg(long, default_value_t = crate::DEFAULT_MAX_FLOWS)]
    pub max_flows: usize,
    /// LAB ONLY: drop this percentage of datagrams, each direction.
    #[arg(long, default_value_t = 0.0, value_name = "PCT")]
    pub lab_loss: f64,
    /// LAB ONLY: delay every datagram by this many milliseconds, each direction.
    #[arg(long, default_value_t = 0, value_name = "MS")]
    pub lab_delay: u64,
    /// LAB ONLY: add a random extra delay of up to this many milliseconds (reorders).
    #[arg(long, default_value_t = 0, value_name = "MS")]
    pub lab_jitter: u64,
    /// error, warn, info, debug or trace.
    #[arg(long, default_value = "info")]
    pub log_level: String,
}
