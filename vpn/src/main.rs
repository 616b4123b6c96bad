//! `mpvpn`: the VPN over the multipath tunnel. See `--help`.

use clap::{Parser, Subcommand};
use common::driver::{control, exit_with_error, genkey};
use std::path::PathBuf;
use vpn::config::{HubConfig, PeerConfig};
use vpn::driver::{run_hub, run_peer, VpnStatus};

/// One flat private network over lossy links: peers send IP packets from a TUN device
/// through KCP and the multipath tunnel (mpclient -> bridges -> mpserver) to the hub,
/// which keeps the peer registry and routes between peers and its own TUN.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the hub (beside mpserver, whose target is the hub's `listen`).
    Hub {
        #[arg(short, long)]
        config: PathBuf,
        /// Control socket for `mpvpn status` [default: /run/mptunnel/mpvpn.sock].
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
    },
    /// Run a peer (beside mpclient, whose listen address is the peer's `tunnel`).
    Peer {
        #[arg(short, long)]
        config: PathBuf,
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
    },
    /// Show the hub's or peer's view: peers, addresses, state, heartbeats, RTT, bytes.
    Status {
        #[arg(long)]
        json: bool,
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
    },
    /// Print a new peer key, or write it to FILE (mode 600).
    Genkey { file: Option<PathBuf> },
}

fn fail<T>(message: String) -> T {
    exit_with_error("mpvpn", &message)
}

/// Runs a daemon with logging at `level` under `prog`; a fatal error is logged, then the
/// process exits non-zero.
fn daemon(level: &str, prog: &'static str, run: impl FnOnce(slog::Logger) -> Result<(), String>) {
    let (log, guard) = common::log::init(level);
    let log = log.new(slog::o!("prog" => prog));
    if let Err(e) = run(log.clone()) {
        slog::crit!(log, "{}", e);
        drop(guard);
        fail::<()>(e);
    }
}

fn main() {
    let default_control = || control::default_control_path("mpvpn");
    match Cli::parse().command {
        Command::Genkey { file } => genkey(file.as_deref()).unwrap_or_else(fail::<()>),
        Command::Status { json, control: c } => {
            let report: VpnStatus = control::fetch(&c.unwrap_or_else(default_control)).unwrap_or_else(fail);
            if json {
                println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
            } else {
                print!("{}", report.to_table());
            }
        }
        Command::Hub { config, control: c } => {
            let cfg = HubConfig::load(&config).unwrap_or_else(|e| fail(e.to_string()));
            let level = cfg.log_level.clone();
            daemon(&level, "mpvpn-hub", |log| run_hub(cfg, c.unwrap_or_else(default_control), log));
        }
        Command::Peer { config, control: c } => {
            let cfg = PeerConfig::load(&config).unwrap_or_else(|e| fail(e.to_string()));
            let level = cfg.log_level.clone();
            daemon(&level, "mpvpn-peer", |log| run_peer(cfg, c.unwrap_or_else(default_control), log));
        }
    }
}
