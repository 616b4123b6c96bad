//! The host's side: the TUN device, its addresses and routes (iproute2), and which
//! addresses carry the tunnel.

use super::peer::PeerTunnel;
use super::*;

pub(super) fn ip_cmd(args: &[&str]) -> Result<(), VpnError> {
    let out =
        Command::new("ip").args(args).output().map_err(|source| VpnError::IpSpawn { args: args.join(" "), source })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(VpnError::IpFailed { args: args.join(" "), stderr: String::from_utf8_lossy(&out.stderr).trim().into() })
    }
}

pub(super) fn open_tun(name: &str) -> Result<tun::Device, VpnError> {
    let mut cfg = tun::configure();
    cfg.tun_name(name);
    let dev = tun::create(&cfg).map_err(|source| VpnError::TunCreate { name: name.into(), source })?;
    dev.set_nonblock().map_err(|source| VpnError::Tun { name: name.into(), source: source.into() })?;
    Ok(dev)
}

/// Address (and its IPv6 mapping), MTU, up.
pub(super) fn configure_tun(name: &str, addr: Ipv4Addr, prefix_len: u8, mtu: u16) -> Result<(), VpnError> {
    // no IPv6 link-local address: its router solicitations would only be dropped
    ip_cmd(&["link", "set", "dev", name, "addrgenmode", "none"])?;
    ip_cmd(&["addr", "flush", "dev", name])?;
    ip_cmd(&["addr", "add", &format!("{addr}/{prefix_len}"), "dev", name])?;
    ip_cmd(&["-6", "addr", "add", &format!("{}/96", ip::v6_of(addr)), "dev", name, "nodad"])?;
    ip_cmd(&["link", "set", "dev", name, "mtu", &mtu.to_string(), "up"])
}

/// Addresses a route from another peer must not cover: the way out of this host (its
/// default gateways) and the tunnel's own remote ends (an embedded client's paths), or
/// the tunnel would be carried into itself.
pub(super) fn protected_addresses(tunnel: &PeerTunnel, log: &Logger) -> Vec<Ipv4Addr> {
    let mut out: Vec<Ipv4Addr> = Command::new("ip")
        .args(["-4", "route", "show", "default"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "via").nth(1)?.parse().ok())
        .collect();
    let remotes: Vec<SocketAddr> = match tunnel {
        PeerTunnel::Embedded(mp) => mp.remotes().collect(),
        // a separate mpclient says where its paths go
        PeerTunnel::Udp { control, .. } => match common::driver::control::fetch::<common::stats::StatusReport>(
            &control.clone().unwrap_or_else(only_mpclient),
        ) {
            Ok(report) => report.remotes.iter().filter_map(|r| r.parse().ok()).collect(),
            Err(e) => {
                warn!(log, "cannot ask the local mpclient where its paths go: routes covering its bridges are not detected (set tunnel_control)";
                    "error" => %e);
                Vec::new()
            }
        },
    };
    out.extend(remotes.iter().filter_map(|a| match a.ip() {
        std::net::IpAddr::V4(v4) => Some(v4),
        std::net::IpAddr::V6(_) => None,
    }));
    out
}

/// The control socket of the only mpclient running on this host (its default one when
/// none or several run).
pub(super) fn only_mpclient() -> PathBuf {
    use common::driver::control;
    match control::running_instances("mpclient").as_slice() {
        [(_, only)] => only.clone(),
        _ => control::default_control_path("mpclient"),
    }
}
