//! The hubs forward to each other over the multipath tunnel (`cluster.tunnel_key_file`):
//! one embedded multipath client per other hub, whose paths are that hub's
//! `advertise.tunnel` addresses, into its multipath server. A forwarded packet is sealed
//! twice: by the forward layer (the cluster key: only a hub speaks as a hub) inside the
//! tunnel's own (the tunnel key). What another hub's client brings to our multipath server
//! is a `Forward` datagram among the peers' (`take_tunnel_datagram`).

use super::*;
use std::collections::BTreeMap;
use std::path::Path;

/// Tokens each forwarding client may take: its paths and its address watcher.
const CLIENT_TOKENS: usize = common::MAX_PATHS + 2;
/// Forwarding clients' tokens start here: above the embedded server's, far below the
/// reserved ones. Each client opened takes the next range (never one reused).
const CLIENT_TOKEN_BASE: usize = 1 << 20;
/// A client's one session: its "application" address.
const FORWARD_APP: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(Ipv4Addr::LOCALHOST, 2));

/// The multipath client to one other hub.
struct ForwardClient {
    hub: String,
    /// The addresses it was opened with (a hub that advertises others gets a new client).
    tunnel: Vec<SocketAddr>,
    base: usize,
    mp: Box<mpclient::Multipath>,
    /// What waits for `mp.send_batch`.
    tx: Box<RecvBatch>,
}

/// This hub's forwarding clients, by the address the core forwards to (the hub's first
/// tunnel address, `destination`).
pub(super) struct TunnelForwarding {
    key_file: PathBuf,
    clients: BTreeMap<SocketAddr, ForwardClient>,
    next_base: usize,
}

impl TunnelForwarding {
    pub(super) fn new(key_file: PathBuf) -> Self {
        Self { key_file, clients: BTreeMap::new(), next_base: CLIENT_TOKEN_BASE }
    }

    /// Where the core forwards to for a hub whose multipath server is at `tunnel`.
    pub(super) fn destination(tunnel: &[SocketAddr]) -> Option<SocketAddr> {
        tunnel.first().copied()
    }

    /// The other hubs now, with their tunnel addresses: a client for each (opened anew
    /// when its addresses changed), none for a hub gone.
    pub(super) fn sync(&mut self, hubs: &[(String, Vec<SocketAddr>)], registry: &Registry, log: &Logger) {
        let wanted: BTreeMap<SocketAddr, &(String, Vec<SocketAddr>)> =
            hubs.iter().filter_map(|h| Some((Self::destination(&h.1)?, h))).collect();
        self.clients.retain(|to, c| wanted.get(to).is_some_and(|(hub, tunnel)| *hub == c.hub && *tunnel == c.tunnel));
        for (to, (hub, tunnel)) in wanted {
            if self.clients.contains_key(&to) {
                continue;
            }
            let base = self.next_base;
            self.next_base += CLIENT_TOKENS;
            match open_client(&self.key_file, hub, tunnel, registry, base, log) {
                Ok(mp) => {
                    info!(log, "forwarding to a hub over the multipath tunnel"; "hub" => hub, "paths" => ?tunnel);
                    let c = ForwardClient { hub: hub.clone(), tunnel: tunnel.clone(), base, mp, tx: Box::default() };
                    self.clients.insert(to, c);
                }
                // tried again with the next change of the cluster's hubs
                Err(e) => error!(log, "cannot open the multipath tunnel to a hub"; "hub" => hub, "error" => %e),
            }
        }
    }

    /// Queues a forwarded datagram for the hub at `to`; false if none is reached that way.
    pub(super) fn push(&mut self, now: Instant, to: SocketAddr, d: &[u8]) -> bool {
        let Some(c) = self.clients.get_mut(&to) else { return false };
        if c.tx.is_full() {
            c.mp.send_batch(now, &mut c.tx);
            c.tx.clear();
        }
        c.tx.push_with(SEALING_ROOM.0, |slot| {
            let n = d.len().min(slot.len().saturating_sub(SEALING_ROOM.1));
            slot[..n].copy_from_slice(&d[..n]);
            Some((FORWARD_APP, n))
        });
        true
    }

    /// Sends what was queued.
    pub(super) fn flush(&mut self, now: Instant) {
        for c in self.clients.values_mut().filter(|c| !c.tx.is_empty()) {
            c.mp.send_batch(now, &mut c.tx);
            c.tx.clear();
        }
    }

    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        self.clients.values().filter_map(|c| c.mp.poll_timeout()).min()
    }

    pub(super) fn handle_timeout(&mut self, registry: &Registry, now: Instant) {
        for c in self.clients.values_mut() {
            c.mp.handle_timeout(registry, now);
        }
    }

    /// Readiness of `token`, if it is a client's: what it received goes to `each` (the
    /// other hub sends nothing down this session but the tunnel's own); true if more may
    /// be waiting.
    pub(super) fn handle_ready(
        &mut self,
        registry: &Registry,
        token: Token,
        rx: &mut RecvBatch,
        each: impl FnMut(SocketAddr, &[u8]),
    ) -> Option<bool> {
        let c = self.clients.values_mut().find(|c| (c.base..c.base + CLIENT_TOKENS).contains(&token.0))?;
        Some(c.mp.handle_ready(registry, token, rx, each))
    }
}

/// A multipath client to hub `hub`'s server at `tunnel` with the tunnel key in
/// `key_file`, the rest as a client's defaults.
fn open_client(
    key_file: &Path,
    hub: &str,
    tunnel: &[SocketAddr],
    registry: &Registry,
    base: usize,
    log: &Logger,
) -> Result<Box<mpclient::Multipath>, VpnError> {
    let paths: String = tunnel.iter().map(|a| format!("  - remote: \"{a}\"\n")).collect();
    let label = format!("(forwarding to hub {hub})");
    let yaml = format!("key_file: {:?}\npaths:\n{paths}", key_file.display().to_string());
    let cc = ClientConfig::parse(&label, &yaml)?;
    let rt = mpclient::ClientRuntime::from_config(&label, &cc)?;
    let key = driver::require_key("mpvpn hub (cluster.tunnel_key_file)", Some(key_file))?;
    Ok(Box::new(mpclient::Multipath::open(&rt, key.key, registry, base, log.clone())?))
}

/// A datagram from our tunnel (a session of the multipath server): another hub's
/// forwarded packet (opened in `scratch`), else a peer's.
pub(super) fn take_tunnel_datagram(
    core: &mut Hub,
    scratch: &mut [u8],
    now: Instant,
    wall: u64,
    from: SocketAddr,
    d: &[u8],
) {
    if d.first() == Some(&crate::wire::MSG_FORWARD) && d.len() <= scratch.len() {
        scratch[..d.len()].copy_from_slice(d);
        core.handle_forward_datagram(now, wall, &mut scratch[..d.len()]);
    } else {
        core.handle_datagram(now, wall, from, d);
    }
}
