//! `mpvpn`: the VPN over the multipath tunnel. See `--help`.

use clap::{Parser, Subcommand};
use common::driver::files::load_config;
use common::driver::{control, exit_with_error, genkey, run_daemon};
use std::path::PathBuf;
use vpn::config::{HubConfig, PeerConfig};
use vpn::driver::{run_hub, run_peer, VpnStatus};

/// One flat private network over lossy links: peers send IP packets from a TUN device
/// through KCP and the multipath tunnel (mpclient -> bridges -> mpserver) to the hub,
/// which keeps the peer registry and routes between peers and its own TUN.
/// SIGTERM or SIGINT stops a hub or peer cleanly (final stats line, control socket removed).
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
        /// Control socket for `mpvpn status` [default: the config's control_socket, else
        /// /run/mptunnel/mpvpn.sock].
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
    },
    /// Run a peer (beside mpclient, whose listen address is the peer's `tunnel`).
    Peer {
        #[arg(short, long)]
        config: PathBuf,
        /// Control socket for `mpvpn status` [default: the config's control_socket, else
        /// /run/mptunnel/mpvpn.sock].
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
    },
    /// Show the hub's or peer's view: peers, addresses, state, heartbeats, RTT, bytes.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The daemon's control socket [default: /run/mptunnel/mpvpn.sock].
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
    },
    /// Print a new peer key, or write it to FILE (mode 600).
    Genkey { file: Option<PathBuf> },
}

fn fail<T>(e: impl std::fmt::Display) -> T {
    exit_with_error("mpvpn", &e.to_string())
}

/// `--control`, else the config's `control_socket`, else the default.
fn control_path(flag: Option<PathBuf>, config: &Option<PathBuf>) -> PathBuf {
    flag.or_else(|| config.clone()).unwrap_or_else(|| control::default_control_path("mpvpn"))
}

fn main() {
    match Cli::parse().command {
        Command::Genkey { file } => genkey(file.as_deref()).unwrap_or_else(fail),
        Command::Status { json, control } => {
            control::print_status(&control_path(control, &None), json, VpnStatus::to_table).unwrap_or_else(fail)
        }
        Command::Hub { config, control } => {
            let cfg = load_config(&config, HubConfig::parse).unwrap_or_else(fail);
            let control = control_path(control, &cfg.control_socket);
            let exposed = cfg.inline_key_warning(&config);
            run_daemon("mpvpn-hub", &cfg.log_level.clone(), |log| {
                if let Some(w) = exposed {
                    slog::warn!(log, "{}", w);
                }
                run_hub(cfg, control, log)
            })
        }
        Command::Peer { config, control } => {
            let cfg = load_config(&config, PeerConfig::parse).unwrap_or_else(fail);
            let control = control_path(control, &cfg.control_socket);
            run_daemon("mpvpn-peer", &cfg.log_level.clone(), |log| run_peer(cfg, control, log))
        }
    }
}
