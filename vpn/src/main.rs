//! `mpvpn`: the VPN over the multipath tunnel. See `--help`.

#![warn(clippy::too_many_lines)]

use clap::Parser;
use common::driver::files::load_config;
use common::driver::{control, exit_with_error, genkey, run_daemon};
use std::path::PathBuf;
use vpn::cli::{Cli, Command, HubAction};
use vpn::config::{HubConfig, PeerConfig};
use vpn::driver::{run_hub, run_peer, HubPaths, VpnStatus};

/// `mpvpn hub add-peer`: hub.yaml gains the peer (`onboard::replace_config`); its
/// peer.yaml goes to stdout.
fn add_peer(
    name: &str,
    config: &std::path::Path,
    address: Option<std::net::Ipv4Addr>,
    routes: &[vpn::ip::Prefix],
) -> Result<(), String> {
    let file = config.display().to_string();
    let text = std::fs::read_to_string(config).map_err(|e| format!("{file}: {e}"))?;
    // a new peer's key: the OS's randomness, in the CLI (never in a core)
    #[allow(clippy::disallowed_methods)]
    let key = common::crypto::Psk::generate(&mut common::entropy::OsEntropy::new()).to_base64();
    let peer = vpn::onboard::NewPeer { name, key: &key, address, routes };
    let new = vpn::onboard::add_peer(&file, &text, &peer).map_err(|e| e.to_string())?;
    vpn::onboard::replace_config(config, &new).map_err(|e| format!("writing {file}: {e}"))?;
    eprintln!("added peer {name} to {file}; `mpvpn reload` makes a running hub take it. Its peer.yaml:");
    common::driver::print_stdout(&vpn::onboard::peer_yaml(&peer)).map_err(|e| e.to_string())
}

/// `mpvpn reload`: finds the hub through its control socket and sends it SIGHUP.
fn reload(instance: Option<String>, control: Option<PathBuf>) -> Result<(), String> {
    let path = control::which_instance("mpvpn", instance.as_deref(), control.as_deref()).map_err(|several| {
        let names: Vec<&str> = several.iter().map(|(i, _)| i.as_str()).collect();
        format!("several mpvpn instances run ({}); name one: `mpvpn reload NAME`", names.join(", "))
    })?;
    // the pid to signal is the kernel's word for who answers on the socket, never the
    // report's: whoever answers there could claim any process
    let (status, pid): (VpnStatus, u32) = control::fetch_with_pid(&path).map_err(|e| e.to_string())?;
    if status.role != vpn::driver::Role::Hub {
        return Err(format!("{} is a {}, not a hub: only a hub reloads", path.display(), status.role));
    }
    if status.pid != pid {
        return Err(format!(
            "{} is answered by pid {pid}, which claims to be pid {}: not signalling anything",
            path.display(),
            status.pid
        ));
    }
    common::driver::send_sighup(pid).map_err(|e| format!("signalling pid {pid}: {e}"))?;
    println!("asked the hub (pid {pid}) to re-read its config; its log says what changed");
    Ok(())
}

fn fail<T>(e: impl std::fmt::Display) -> T {
    exit_with_error("mpvpn", &e.to_string())
}

/// `--control`, else the config's `control_socket`, else the instance's default (named
/// after the config file).
fn control_path(flag: Option<PathBuf>, config_file: &std::path::Path, config: &Option<PathBuf>) -> PathBuf {
    flag.or_else(|| config.clone()).unwrap_or_else(|| control::config_control_path("mpvpn", config_file))
}

fn main() {
    match Cli::parse().command {
        Command::Genkey { file } => genkey(file.as_deref()).unwrap_or_else(fail),
        Command::Reload { instance, control } => reload(instance, control).unwrap_or_else(fail),
        Command::Status(req) => control::run_status("mpvpn", &req, VpnStatus::to_table).unwrap_or_else(fail),
        Command::Hub { action: Some(HubAction::AddPeer { name, config, address, routes }), .. } => {
            add_peer(&name, &config, address, &routes).unwrap_or_else(fail)
        }
        Command::Hub { action: None, config, control, state_file } => {
            let config = config.expect("clap requires --config without a subcommand");
            let cfg = load_config(&config, HubConfig::parse).unwrap_or_else(fail);
            let state = state_file.unwrap_or_else(|| cfg.state_path(&config));
            let control = control_path(control, &config, &cfg.control_socket);
            let exposed = cfg.inline_key_warning(&config);
            run_daemon("mpvpn-hub", &cfg.log_level.clone(), |log| {
                if let Some(w) = exposed {
                    slog::warn!(log, "{}", w);
                }
                run_hub(cfg, HubPaths { config, control, state }, log)
            })
        }
        Command::Peer { config, control } => {
            let cfg = load_config(&config, PeerConfig::parse).unwrap_or_else(fail);
            let control = control_path(control, &config, &cfg.control_socket);
            run_daemon("mpvpn-peer", &cfg.log_level.clone(), |log| run_peer(cfg, control, log))
        }
    }
}
