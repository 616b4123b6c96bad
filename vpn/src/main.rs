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
    /// Run the hub (beside mpserver, whose target is the hub's `listen`); or, with
    /// `add-peer`, add a peer to its hub.yaml.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Hub {
        #[command(subcommand)]
        action: Option<HubAction>,
        #[arg(short, long, required = true)]
        config: Option<PathBuf>,
        /// Control socket for `mpvpn status` [default: the config's control_socket, else
        /// /run/mptunnel/mpvpn-<config file name>.sock].
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
    },
    /// Run a peer (beside mpclient, whose listen address is the peer's `tunnel`).
    Peer {
        #[arg(short, long)]
        config: PathBuf,
        /// Control socket for `mpvpn status` [default: the config's control_socket, else
        /// /run/mptunnel/mpvpn-<config file name>.sock].
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
    },
    /// Show the hub's or peer's view: peers, addresses, state, heartbeats, RTT, bytes; of
    /// the instance NAME (started with `-c .../NAME.yaml`), else the only one running,
    /// else the list of them.
    Status {
        /// The instance: its config file's name without `.yaml`.
        #[arg(value_name = "NAME")]
        instance: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Redraw every second (plain output, appended, when not on a terminal).
        #[arg(long)]
        watch: bool,
        /// The daemon's control socket [default: /run/mptunnel/mpvpn-NAME.sock].
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
    },
    /// Print a new peer key, or write it to FILE (mode 600).
    Genkey { file: Option<PathBuf> },
    /// Make the running hub re-read hub.yaml (as SIGHUP does): added peers may join,
    /// removed ones are dropped; a config with an error is refused and the running one
    /// stays (see the hub's log).
    Reload {
        /// The hub's instance: its config file's name without `.yaml`.
        #[arg(value_name = "NAME")]
        instance: Option<String>,
        /// The hub's control socket [default: /run/mptunnel/mpvpn-NAME.sock].
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum HubAction {
    /// Make a key for a new peer, add the peer to hub.yaml (its comments and order kept)
    /// and print the peer.yaml to copy to that host. `mpvpn reload` lets a running hub
    /// take it.
    AddPeer {
        /// The peer's name (letters, digits, `-`, `_`, `.`).
        name: String,
        /// The hub's hub.yaml.
        #[arg(short, long)]
        config: PathBuf,
        /// A fixed VPN address for it [default: one from the pool when it registers].
        #[arg(long, value_name = "ADDR")]
        address: Option<std::net::Ipv4Addr>,
        /// Subnets behind it that it may announce, comma-separated.
        #[arg(long, value_name = "PREFIX,...", value_delimiter = ',')]
        routes: Vec<vpn::ip::Prefix>,
    },
}

/// `mpvpn hub add-peer`: hub.yaml gains the peer (written to a temporary file beside it,
/// same permissions, then renamed over it); its peer.yaml goes to stdout.
fn add_peer(
    name: &str,
    config: &std::path::Path,
    address: Option<std::net::Ipv4Addr>,
    routes: &[vpn::ip::Prefix],
) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let file = config.display().to_string();
    let text = std::fs::read_to_string(config).map_err(|e| format!("{file}: {e}"))?;
    let key = common::crypto::Psk::generate(&mut common::entropy::OsEntropy::new()).to_base64();
    let peer = vpn::onboard::NewPeer { name, key: &key, address, routes };
    let new = vpn::onboard::add_peer(&file, &text, &peer).map_err(|e| e.to_string())?;
    let mode = std::fs::metadata(config).map_err(|e| format!("{file}: {e}"))?.permissions().mode();
    let tmp = config.with_extension("yaml.new");
    let write = || -> std::io::Result<()> {
        std::fs::write(&tmp, &new)?;
        // the file holds keys: never more open than it was, and never readable by others
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode & 0o7770))?;
        std::fs::rename(&tmp, config)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("writing {file}: {e}")
    })?;
    eprintln!("added peer {name} to {file}; `mpvpn reload` makes a running hub take it. Its peer.yaml:");
    common::driver::print_stdout(&vpn::onboard::peer_yaml(&peer)).map_err(|e| e.to_string())
}

/// `mpvpn reload`: finds the hub through its control socket and sends it SIGHUP.
fn reload(instance: Option<String>, control: Option<PathBuf>) -> Result<(), String> {
    let path = control::which_instance("mpvpn", instance.as_deref(), control.as_deref()).map_err(|several| {
        let names: Vec<&str> = several.iter().map(|(i, _)| i.as_str()).collect();
        format!("several mpvpn instances run ({}); name one: `mpvpn reload NAME`", names.join(", "))
    })?;
    let status: VpnStatus = control::fetch(&path).map_err(|e| e.to_string())?;
    if status.role != "hub" {
        return Err(format!("{} is a {}, not a hub: only a hub reloads", path.display(), status.role));
    }
    common::driver::send_sighup(status.pid).map_err(|e| format!("signalling pid {}: {e}", status.pid))?;
    println!("asked the hub (pid {}) to re-read its config; its log says what changed", status.pid);
    Ok(())
}

fn fail<T>(e: impl std::fmt::Display) -> T {
    exit_with_error("mpvpn", &e.to_string())
}

/// `--control`, else the config's `control_socket`, else the instance's default (named
/// after the config file).
fn control_path(flag: Option<PathBuf>, config_file: &std::path::Path, config: &Option<PathBuf>) -> PathBuf {
    flag.or_else(|| config.clone())
        .unwrap_or_else(|| control::instance_control_path("mpvpn", control::instance_of(config_file).as_deref()))
}

fn main() {
    match Cli::parse().command {
        Command::Genkey { file } => genkey(file.as_deref()).unwrap_or_else(fail),
        Command::Reload { instance, control } => reload(instance, control).unwrap_or_else(fail),
        Command::Status { instance, json, watch, control } => {
            let req = control::StatusRequest { instance, control, json, watch };
            control::run_status("mpvpn", &req, VpnStatus::to_table).unwrap_or_else(fail)
        }
        Command::Hub { action: Some(HubAction::AddPeer { name, config, address, routes }), .. } => {
            add_peer(&name, &config, address, &routes).unwrap_or_else(fail)
        }
        Command::Hub { action: None, config, control } => {
            let config = config.expect("clap requires --config without a subcommand");
            let cfg = load_config(&config, HubConfig::parse).unwrap_or_else(fail);
            let control = control_path(control, &config, &cfg.control_socket);
            let exposed = cfg.inline_key_warning(&config);
            run_daemon("mpvpn-hub", &cfg.log_level.clone(), |log| {
                if let Some(w) = exposed {
                    slog::warn!(log, "{}", w);
                }
                run_hub(cfg, config, control, log)
            })
        }
        Command::Peer { config, control } => {
            let cfg = load_config(&config, PeerConfig::parse).unwrap_or_else(fail);
            let control = control_path(control, &config, &cfg.control_socket);
            run_daemon("mpvpn-peer", &cfg.log_level.clone(), |log| run_peer(cfg, control, log))
        }
    }
}
