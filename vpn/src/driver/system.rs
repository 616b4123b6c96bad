//! The host's side: the TUN device, its addresses and routes (over netlink), and which
//! addresses carry the tunnel.

use super::netlink::{RouteChange, Rtnl};
use super::peer::PeerTunnel;
use super::*;

/// One change of the host's network configuration, over netlink; an error names it.
fn netlink(
    what: impl FnOnce() -> String,
    change: impl FnOnce(&mut Rtnl) -> std::io::Result<()>,
) -> Result<(), VpnError> {
    Rtnl::open().and_then(|mut nl| change(&mut nl)).map_err(|source| VpnError::Netlink { what: what(), source })
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
    let v6 = ip::v6_of(addr);
    netlink(
        || format!("configuring TUN {name}: {addr}/{prefix_len}, {v6}/96, mtu {mtu}, up"),
        |nl| {
            let index = Rtnl::link_index(name)?;
            // no IPv6 link-local address: its router solicitations would only be dropped
            nl.disable_link_local(index)?;
            nl.flush_addresses(index)?;
            nl.add_address(index, addr.into(), prefix_len)?;
            nl.add_address(index, v6.into(), 96)?;
            nl.set_mtu_up(index, mtu)
        },
    )
}

/// Adds, replaces or deletes the route to `prefix` through TUN `name`.
pub(super) fn change_route(change: RouteChange, prefix: &Prefix, name: &str) -> Result<(), VpnError> {
    netlink(
        || format!("{change:?} route {prefix} dev {name}").to_lowercase(),
        |nl| nl.change_route(change, prefix, Rtnl::link_index(name)?),
    )
}

/// Addresses a route from another peer must not cover: the way out of this host (its
/// default gateways) and the tunnel's own remote ends (an embedded client's paths; a
/// separate mpclient's come from `RemotesQuery`), or the tunnel would be carried into
/// itself.
pub(super) fn protected_addresses<'a>(tunnels: impl Iterator<Item = &'a PeerTunnel>, log: &Logger) -> Vec<Ipv4Addr> {
    let mut out = Rtnl::open().and_then(|mut nl| nl.default_gateways_v4()).unwrap_or_else(|e| {
        warn!(log, "cannot read the default routes: routes covering the gateway are not detected"; "error" => %e);
        Vec::new()
    });
    for t in tunnels {
        if let PeerTunnel::Embedded(mp) = t {
            out.extend(mp.remotes().filter_map(|a| ipv4_of(a.ip())));
        }
    }
    out
}

fn ipv4_of(a: std::net::IpAddr) -> Option<Ipv4Addr> {
    match a {
        std::net::IpAddr::V4(v4) => Some(v4),
        std::net::IpAddr::V6(_) => None,
    }
}

/// The largest status report taken from mpclient.
const MAX_REPORT_BYTES: usize = 1 << 20;

/// A question to the local mpclient's control socket (it writes its status report and
/// closes): where its paths go. Read as the event loop finds it readable, never waited on.
pub(super) struct RemotesQuery {
    stream: mio::net::UnixStream,
    body: Vec<u8>,
}

impl RemotesQuery {
    /// Connects to `path` and registers with `token`.
    pub(super) fn start(path: &std::path::Path, registry: &Registry, token: Token) -> std::io::Result<Self> {
        let mut stream = mio::net::UnixStream::connect(path)?;
        registry.register(&mut stream, token, Interest::READABLE)?;
        Ok(Self { stream, body: Vec::new() })
    }

    /// Stops listening (done, or given up).
    pub(super) fn close(&mut self, registry: &Registry) {
        let _ = registry.deregister(&mut self.stream);
    }

    /// Reads what arrived: `None` until mpclient closed the stream, then its paths' remote
    /// IPv4 addresses (or why there are none).
    pub(super) fn read(&mut self) -> Option<Result<Vec<Ipv4Addr>, String>> {
        use std::io::Read;
        let mut chunk = [0u8; 4096];
        let done = loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => break Ok(()),
                Ok(n) if self.body.len() + n > MAX_REPORT_BYTES => break Err("status report too large".to_string()),
                Ok(n) => self.body.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => break Err(e.to_string()),
            }
        };
        Some(done.and_then(|()| {
            let report: common::stats::StatusReport = serde_json::from_slice(&self.body).map_err(|e| e.to_string())?;
            Ok(report
                .remotes
                .iter()
                .filter_map(|r| r.parse::<SocketAddr>().ok())
                .filter_map(|a| ipv4_of(a.ip()))
                .collect())
        }))
    }
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
