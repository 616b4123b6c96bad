//! `mpvpn hub`: the hub core on a TUN device, the tunnel (a UDP socket towards mpserver, or
//! the embedded server), the DNS responder and the rendezvous port.

use super::cluster::{key_prefix, ClusterEvent, ClusterLink, ClusterSpec, HubRecord};
use super::hub_forward::{take_tunnel_datagram, TunnelForwarding};
use super::status::{ClusterHubStatus, ClusterStatus};
use super::*;
use crate::config::ClusterConfig;
use crate::hub::{AddressAuthority, ForwardStatus, HubOutput};
use std::collections::BTreeMap;

/// How the hub exchanges datagrams with the tunnel.
pub(super) enum HubTunnel {
    /// A separate mpserver forwards each session from its own socket to `listen`.
    Udp(BatchSocket),
    /// The multipath server runs in this process; a session is a slot.
    Embedded(Box<mpserver::TunnelServer>),
}

/// In embedded mode a session slot stands in for the tunnel address the hub binds a
/// peer to: 127.254.x.y, port 1 + the high bits.
pub(super) fn slot_addr(slot: usize) -> SocketAddr {
    SocketAddr::from(([127, 254, (slot >> 8) as u8, slot as u8], 1 + (slot >> 16) as u16))
}

pub(super) fn addr_slot(a: SocketAddr) -> Option<usize> {
    match a {
        SocketAddr::V4(v4) if v4.ip().octets()[..2] == [127, 254] && v4.port() > 0 => {
            let o = v4.ip().octets();
            Some(((v4.port() as usize - 1) << 16) | (o[2] as usize) << 8 | o[3] as usize)
        }
        _ => None,
    }
}

impl HubTunnel {
    /// Room each tunnel datagram needs around it in a batch slot.
    fn room(&self) -> Room {
        match self {
            Self::Udp(_) => NO_ROOM,
            Self::Embedded(_) => SEALING_ROOM,
        }
    }

    /// Sends a batch of the core's tunnel datagrams: over UDP, each run to one session
    /// goes with one `sendmmsg` (GSO where it can); the embedded server seals in the
    /// batch slots. Returns how many datagrams could not be sent over UDP.
    fn send(&mut self, now: Instant, tx: &mut RecvBatch) -> usize {
        match self {
            Self::Udp(s) => s.send_to_sources(tx),
            Self::Embedded(t) => {
                t.send_batch(now, tx, |b, i| b.source(i).and_then(addr_slot));
                0
            }
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        match self {
            Self::Udp(_) => None,
            Self::Embedded(t) => Some(t.poll_timeout()),
        }
    }

    fn handle_timeout(&mut self, now: Instant) {
        if let Self::Embedded(t) = self {
            t.handle_timeout(now, |_| true);
        }
    }
}

/// Where sessions of an embedded server "go": the hub in this process.
pub(super) const EMBEDDED_TARGET: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));

pub(super) fn open_hub_tunnel(c: &HubConfig, registry: &Registry, log: &Logger) -> Result<HubTunnel, VpnError> {
    match &c.embedded_server {
        None => {
            // validated by HubConfig::parse
            let listen: SocketAddr = c.listen.parse().expect("validated listen address");
            let what = || format!("listen {listen}");
            let mut sock = driver::udp_socket(listen, None, None).context(what)?;
            registry.register(&mut sock, UDP, Interest::READABLE).context(what)?;
            info!(log, "taking datagrams from mpserver"; "listen" => %listen);
            Ok(HubTunnel::Udp(sock))
        }
        Some(path) => {
            let sc = load_config(path, ServerConfig::parse_embedded)?;
            let mut rt = mpserver::ServerRuntime::from_config(&path.display().to_string(), &sc)?;
            rt.core.default_target = Some(EMBEDDED_TARGET);
            rt.core.targets.clear();
            let key = driver::require_key("mpvpn", sc.key_file.as_deref())?;
            if let Some(w) = key.warning {
                warn!(log, "{}", w);
            }
            info!(log, "multipath server embedded"; "listen" => %rt.listen);
            let t = mpserver::TunnelServer::open(rt.listen, rt.core, key.key, registry, EMBEDDED, log.clone())?;
            Ok(HubTunnel::Embedded(Box::new(t)))
        }
    }
}

/// `mpvpn hub` as the event loop runs it.
pub(super) struct HubDriver {
    core: Hub,
    tunnel: HubTunnel,
    dns: Option<DnsServer>,
    rendezvous: Option<mio::net::UdpSocket>,
    dev: tun::Device,
    bufs: IoBuffers,
    tun_name: String,
    hub_addr: Ipv4Addr,
    /// hub.yaml, and the config read from it last (for reloads).
    config_path: PathBuf,
    state_path: PathBuf,
    /// What the state file holds (written again when the addresses change).
    kept: state::HubState,
    config: HubConfig,
    /// hub.yaml's `cluster:`, running.
    cluster: Option<Cluster>,
    /// `cluster.forward_listen`: packets between the hubs' peers.
    forward: Option<mio::net::UdpSocket>,
    /// `cluster.tunnel_key_file`: the same over the multipath tunnel.
    tunnel_forward: Option<TunnelForwarding>,
    /// Where a forwarded datagram from the tunnel is opened.
    forward_scratch: Vec<u8>,
    log: Logger,
}

/// The hub's cluster as the loop knows it: the cluster thread, and what it said last.
pub(super) struct Cluster {
    link: ClusterLink,
    name: String,
    etcd_members: Vec<String>,
    digest: String,
    etcd_up: bool,
    master: Option<String>,
    is_master: bool,
    /// Every hub seen since start, and whether its record is in etcd now.
    hubs: BTreeMap<String, (HubRecord, bool)>,
    unverified: u64,
    /// Forwarding goes over the multipath tunnel (`cluster.tunnel_key_file`).
    over_tunnel: bool,
}

/// Of hub.yaml's `network` and `peers` (names, keys, fixed addresses, routes): hubs of
/// one network must agree on them, and compare this.
fn config_digest(c: &HubConfig) -> String {
    use ring::digest::{Context, SHA256};
    let mut ctx = Context::new(&SHA256);
    ctx.update(c.network.to_string().as_bytes());
    let mut peers: Vec<_> = c.peers.iter().collect();
    peers.sort_by(|a, b| a.name.cmp(&b.name));
    for p in peers {
        let key = resolve_key(&p.key, &p.key_file).ok().flatten().map(|k| k.key).unwrap_or_default();
        let routes: Vec<String> = p.routes.iter().map(|r| r.to_string()).collect();
        let line = format!("\n{} {:?} {}", p.name, p.address, routes.join(","));
        ctx.update(line.as_bytes());
        ctx.update(&key);
    }
    ctx.finish().as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

impl Cluster {
    fn start(cc: &ClusterConfig, c: &HubConfig, registry: &Registry, log: &Logger) -> Result<Self, VpnError> {
        let key = driver::require_key("mpvpn hub (cluster.key_file)", Some(&cc.key_file))?;
        if let Some(w) = key.warning {
            warn!(log, "{}", w);
        }
        let credentials = match (&cc.etcd_user, &cc.etcd_password_file) {
            (Some(user), Some(file)) => {
                let what = || format!("cluster.etcd_password_file {}", file.display());
                let password = std::fs::read_to_string(file).context(what)?;
                Some((user.clone(), password.trim_end().to_string()))
            }
            _ => None,
        };
        let mut reserved: std::collections::HashSet<Ipv4Addr> = c.peers.iter().filter_map(|p| p.address).collect();
        reserved.insert(c.hub_addr());
        let digest = config_digest(c);
        let etcd: Vec<String> = cc.etcd.iter().map(|e| e.trim_end_matches('/').to_string()).collect();
        let tls = match cc.etcd.first().is_some_and(|e| e.starts_with("https://")) {
            true => Some(super::etcd_tls(cc).map_err(|(field, why)| VpnError::Cluster(format!("{field}: {why}")))?),
            false => None,
        };
        let spec = ClusterSpec {
            name: cc.name.clone(),
            etcd: super::etcd::EtcdAccess { endpoints: etcd.clone(), credentials, tls },
            key: key.key.bytes(),
            advertise_tunnel: cc.advertise.tunnel.clone(),
            advertise_rendezvous: cc.advertise.rendezvous,
            advertise_forward: cc.forward_advertised(),
            on_master: cc.on_master.clone(),
            lease_ttl: Duration::from_secs(cc.lease_ttl_secs),
            prefix: key_prefix(c.network),
            digest: digest.clone(),
            network: c.network,
            reserved,
        };
        let waker = mio::Waker::new(registry, CLUSTER).context(|| "cluster waker".into())?;
        let link = ClusterLink::start(spec, waker, log.new(slog::o!("cluster" => cc.name.clone())))
            .context(|| "cluster thread".into())?;
        info!(log, "joining the cluster"; "name" => &cc.name, "etcd" => etcd.join(","), "digest" => &digest);
        Ok(Self {
            link,
            name: cc.name.clone(),
            etcd_members: etcd,
            digest,
            etcd_up: false,
            master: None,
            is_master: false,
            hubs: BTreeMap::new(),
            unverified: 0,
            over_tunnel: cc.tunnel_key_file.is_some(),
        })
    }

    /// Takes what the cluster thread said into the core and the view.
    fn drain(&mut self, core: &mut Hub, now: Instant, wall: u64, log: &Logger) {
        while let Some(ev) = self.link.try_recv() {
            match ev {
                ClusterEvent::Store(up) => {
                    self.etcd_up = up;
                    core.set_store_available(up);
                }
                ClusterEvent::Assignments(all) => core.learn_assignments(all),
                ClusterEvent::AssignFailed { .. } => {} // the cluster thread logged it; the peer asks again
                ClusterEvent::Master { master, me } => {
                    info!(log, "cluster master"; "master" => master.as_deref().unwrap_or("none"), "this_hub" => me);
                    self.master = master;
                    self.is_master = me;
                }
                ClusterEvent::Hubs { hubs, unverified } => {
                    self.unverified = unverified;
                    for (_, up) in self.hubs.values_mut() {
                        *up = false;
                    }
                    for h in hubs {
                        if h.digest != self.digest
                            && self.hubs.get(&h.name).is_none_or(|(old, _)| old.digest != h.digest)
                        {
                            error!(log, "a hub runs with another network/peers than this one (make hub.yaml the same on every hub)";
                                "hub" => &h.name, "its_digest" => &h.digest, "ours" => &self.digest);
                        }
                        self.hubs.insert(h.name.clone(), (h, true));
                    }
                    let over_tunnel = self.over_tunnel;
                    let to = |h: &HubRecord| match over_tunnel {
                        true => TunnelForwarding::destination(&h.tunnel),
                        false => h.forward,
                    };
                    let forward: Vec<(String, SocketAddr)> = self
                        .hubs
                        .values()
                        .filter(|(_, up)| *up)
                        .filter_map(|(h, _)| Some((h.name.clone(), to(h)?)))
                        .collect();
                    core.set_cluster_hubs(now, wall, &forward);
                    let others = self
                        .hubs
                        .values()
                        .filter(|(h, up)| *up && h.name != self.name)
                        .map(|(h, _)| crate::wire::ListedHub {
                            name: h.name.clone(),
                            tunnel: h.tunnel.clone(),
                            rendezvous: h.rendezvous,
                        })
                        .collect();
                    core.set_listed_hubs(crate::wire::ClusterHubsRepr { this: self.name.clone(), others });
                }
            }
        }
    }

    /// The other hubs up now that advertise their multipath server, with its addresses.
    fn other_tunnels(&self) -> Vec<(String, Vec<SocketAddr>)> {
        let others = self.hubs.values().filter(|(h, up)| *up && h.name != self.name && !h.tunnel.is_empty());
        others.map(|(h, _)| (h.name.clone(), h.tunnel.clone())).collect()
    }

    /// The cluster as this hub sees it, and what it forwards to and from each other hub.
    fn status(&self, forwarding: &[ForwardStatus]) -> ClusterStatus {
        let fwd = |name: &str| forwarding.iter().find(|f| f.hub == name);
        let hubs = self
            .hubs
            .values()
            .map(|(h, up)| ClusterHubStatus {
                name: h.name.clone(),
                state: match (up, h.digest == self.digest) {
                    (false, _) => "gone",
                    (true, true) => "up",
                    (true, false) => "config-differs",
                }
                .into(),
                tunnel: h.tunnel.iter().map(|t| t.to_string()).collect(),
                rendezvous: h.rendezvous.map(|r| r.to_string()),
                // what this hub forwards to it over (`forward` in hub.yaml's status)
                forward: match self.over_tunnel {
                    true => (!h.tunnel.is_empty()).then(|| "multipath tunnel".to_string()),
                    false => h.forward.map(|f| f.to_string()),
                },
                forwards_for: fwd(&h.name).map_or(0, |f| f.peers),
                forwarded_tx_bytes: fwd(&h.name).map_or(0, |f| f.tx_bytes),
                forwarded_rx_bytes: fwd(&h.name).map_or(0, |f| f.rx_bytes),
            })
            .collect();
        ClusterStatus {
            name: self.name.clone(),
            master: self.master.clone(),
            is_master: self.is_master,
            etcd: if self.etcd_up { "up" } else { "unreachable" }.into(),
            etcd_members: self.etcd_members.clone(),
            hubs,
            unverified_records: self.unverified,
        }
    }
}

/// The hub's DNS responder: `<peer>.<domain>` on its VPN address (see `crate::dns`).
pub(super) struct DnsServer {
    sock: mio::net::UdpSocket,
    domain: String,
    buf: Vec<u8>,
}

impl DnsServer {
    fn open(addr: SocketAddr, domain: &str, registry: &Registry, log: &Logger) -> Result<Self, VpnError> {
        let what = || format!("DNS on {addr} (dns: in hub.yaml; binding port 53 needs root or CAP_NET_BIND_SERVICE)");
        let mut sock = mio::net::UdpSocket::bind(addr).context(what)?;
        registry.register(&mut sock, DNS, Interest::READABLE).context(what)?;
        info!(log, "answering names"; "domain" => domain, "on" => %addr);
        Ok(Self { sock, domain: domain.to_string(), buf: vec![0; 1500] })
    }

    /// Answers what arrived, at most `READ_BUDGET` queries; true if more may wait.
    fn serve(&mut self, lookup: impl Fn(&str) -> Option<Ipv4Addr>) -> bool {
        for _ in 0..READ_BUDGET {
            let (n, from) = match self.sock.recv_from(&mut self.buf) {
                Ok(r) => r,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(_) => continue,
            };
            // what is not a query to answer gets nothing; a failed send is not retried
            if let Some(a) = crate::dns::answer(&self.buf[..n], &self.domain, &lookup) {
                let _ = self.sock.send_to(&a, from);
            }
        }
        true
    }
}

/// Answers what arrived on the rendezvous port, at most `READ_BUDGET` questions; true if
/// more may wait.
pub(super) fn serve_rendezvous(now: Instant, sock: &mio::net::UdpSocket, core: &mut Hub, bufs: &mut IoBuffers) -> bool {
    let (buf, answer) = (&mut bufs.tun_in, &mut bufs.out);
    for _ in 0..READ_BUDGET {
        let (n, from) = match sock.recv_from(buf) {
            Ok(r) => r,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(_) => continue,
        };
        if let Some(len) = core.handle_rendezvous(now, from, &buf[..n], answer) {
            let _ = sock.send_to(&answer[..len], from);
        }
    }
    true
}

/// Takes what the other hubs forwarded, at most `READ_BUDGET` datagrams; true if more
/// may wait. Nothing is ever answered.
fn read_forwarded(now: Instant, wall: u64, sock: &mio::net::UdpSocket, core: &mut Hub, bufs: &mut IoBuffers) -> bool {
    let buf = &mut bufs.tun_in;
    for _ in 0..READ_BUDGET {
        match sock.recv_from(buf) {
            Ok((n, _)) => core.handle_forward_datagram(now, wall, &mut buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(_) => continue,
        }
    }
    true
}

/// How the hubs forward to each other: the socket of `cluster.forward_listen` (taking
/// what they forward; sending to those without a tunnel), and the multipath clients of
/// `cluster.tunnel_key_file`. With neither, the hub does not forward.
type Forwarding = (Option<mio::net::UdpSocket>, Option<TunnelForwarding>);

fn start_forwarding(c: &HubConfig, core: &mut Hub, registry: &Registry, log: &Logger) -> Result<Forwarding, VpnError> {
    let Some(cc) = c.cluster.as_ref().filter(|cc| cc.forward_listen.is_some() || cc.tunnel_key_file.is_some()) else {
        return Ok((None, None));
    };
    let key = driver::require_key("mpvpn hub (cluster.key_file)", Some(&cc.key_file))?;
    let (now, wall) = clock();
    core.join_cluster(now, wall, &cc.name, &key.key.bytes());
    let tunnel = match &cc.tunnel_key_file {
        Some(file) => {
            // a wrong path or key is said now, not at the first other hub
            driver::require_key("mpvpn hub (cluster.tunnel_key_file)", Some(file))?;
            info!(log, "forwarding to the other hubs over the multipath tunnel"; "tunnel_key_file" => %file.display());
            Some(TunnelForwarding::new(file.clone()))
        }
        None => None,
    };
    let sock = cc.forward_listen.map(|addr| open_forward(addr, registry, log)).transpose()?;
    Ok((sock, tunnel))
}

fn open_forward(addr: SocketAddr, registry: &Registry, log: &Logger) -> Result<mio::net::UdpSocket, VpnError> {
    let sock = bind_udp(addr, FORWARD, "cluster.forward_listen", registry)?;
    info!(log, "taking packets the other hubs forward"; "listen" => %addr);
    Ok(sock)
}

/// A UDP socket on `addr` for hub.yaml's `field`, registered readable as `token`.
fn bind_udp(addr: SocketAddr, token: Token, field: &str, registry: &Registry) -> Result<mio::net::UdpSocket, VpnError> {
    let what = || format!("{field} {addr} (in hub.yaml)");
    let mut sock = mio::net::UdpSocket::bind(addr).context(what)?;
    registry.register(&mut sock, token, Interest::READABLE).context(what)?;
    Ok(sock)
}

/// The state file at `path`, read and written back at once: one the hub cannot keep stops
/// it now, not at the first address it gives out.
fn keep_state(path: &std::path::Path, log: &Logger) -> Result<state::HubState, VpnError> {
    let kept = state::load(path, || {
        let mut secret = [0u8; 32];
        os_entropy().fill(&mut secret);
        secret
    })?;
    state::save(path, &kept)?;
    info!(log, "addresses given out before"; "state_file" => %path.display(), "names" => kept.addresses.len());
    Ok(kept)
}

fn open_rendezvous(addr: SocketAddr, registry: &Registry, log: &Logger) -> Result<mio::net::UdpSocket, VpnError> {
    let sock = bind_udp(addr, RENDEZVOUS, "rendezvous", registry)?;
    info!(log, "mesh rendezvous"; "listen" => %addr);
    Ok(sock)
}

/// The hub core's view of hub.yaml's `peers`, keys read.
pub(super) fn peer_specs(c: &HubConfig, log: &Logger) -> Result<Vec<PeerSpec>, VpnError> {
    let mut peers = Vec::new();
    for p in &c.peers {
        // validated by HubConfig::parse, which read every key
        let key = resolve_key(&p.key, &p.key_file)?.ok_or_else(|| VpnError::NoPeerKey(p.name.clone()))?;
        if let Some(w) = key.warning {
            warn!(log, "{}", w; "peer" => &p.name);
        }
        peers.push(PeerSpec {
            name: p.name.clone(),
            key: PeerKey::new(&key.key),
            fixed_addr: p.address,
            allowed_routes: p.routes.clone(),
        });
    }
    Ok(peers)
}

/// The files a hub uses besides its sockets.
pub struct HubPaths {
    /// hub.yaml (re-read on SIGHUP).
    pub config: PathBuf,
    pub control: PathBuf,
    /// The addresses given out, by name (`state_file`).
    pub state: PathBuf,
}

/// Runs the hub (configured by `c`, read from `paths.config`) until SIGTERM/SIGINT or a
/// fatal error; SIGHUP re-reads the config's peers.
/// What the hub core takes from hub.yaml, its peers and the state file.
fn hub_core_config(c: &HubConfig, peers: Vec<PeerSpec>, kept: &state::HubState) -> HubCoreConfig {
    HubCoreConfig {
        network: c.network,
        hub_addr: c.hub_addr(),
        mtu: c.mtu.unwrap_or(TUN_MTU),
        tunnel_payload: TUNNEL_PAYLOAD,
        peers,
        peer_timeout: Duration::from_secs(c.peer_timeout_secs),
        dns_domain: c.dns.as_ref().map(|d| d.domain.clone()),
        assigned: kept.addresses.clone(),
        reset_secret: kept.reset_secret,
        relay_bytes_per_pair: c.relay_mbit_per_pair * 1_000_000 / 8,
        addresses: if c.cluster.is_some() { AddressAuthority::Cluster } else { AddressAuthority::Local },
    }
}

pub fn run_hub(c: HubConfig, paths: HubPaths, log: &Logger) -> Result<(), VpnError> {
    let HubPaths { config: config_path, control: control_path, state: state_path } = paths;
    let peers = peer_specs(&c, log)?;
    let kept = keep_state(&state_path, log)?;
    let (hub_addr, mtu) = (c.hub_addr(), c.mtu.unwrap_or(TUN_MTU));
    let mut core = Hub::new(hub_core_config(&c, peers, &kept), os_entropy());
    let mut el = EventLoop::new(log.clone())?;
    el.serve_control(&control_path)?;
    el.serve_metrics(c.metrics_listen)?;
    el.log_stats_every(Some(STATS_INTERVAL));
    let dev = open_tun(&c.tun)?;
    configure_tun(&c.tun, hub_addr, c.network.len, mtu)?;
    el.registry().register(&mut SourceFd(&dev.as_raw_fd()), TUN, Interest::READABLE).context(|| "TUN".into())?;
    let tunnel = open_hub_tunnel(&c, el.registry(), log)?;
    let dns = match &c.dns {
        Some(d) => Some(DnsServer::open(SocketAddr::new(hub_addr.into(), 53), &d.domain, el.registry(), log)?),
        None => None,
    };
    let rendezvous = match c.rendezvous {
        Some(addr) => Some(open_rendezvous(addr, el.registry(), log)?),
        None => None,
    };
    info!(log, "mpvpn hub up"; "tun" => &c.tun, "address" => %hub_addr, "network" => %c.network, "mtu" => mtu,
        "peers_configured" => c.peers.len(), "control" => %control_path.display());
    let cluster = c.cluster.as_ref().map(|cc| Cluster::start(cc, &c, el.registry(), log)).transpose()?;
    let (forward, tunnel_forward) = start_forwarding(&c, &mut core, el.registry(), log)?;
    let tun_name = c.tun.clone();
    let mut d = HubDriver {
        core,
        tunnel,
        dns,
        rendezvous,
        dev,
        bufs: IoBuffers::new(),
        tun_name,
        hub_addr,
        config_path,
        state_path,
        kept,
        config: c,
        cluster,
        forward,
        tunnel_forward,
        forward_scratch: vec![0; common::wire::MAX_DATAGRAM],
        log: log.clone(),
    };
    el.run(&mut d)
}

impl Service for HubDriver {
    type Status = VpnStatus;
    type Error = VpnError;

    fn handle_ready(&mut self, registry: &Registry, token: Token) -> Result<bool, VpnError> {
        let Self { core, tunnel, dev, bufs, log, dns, rendezvous, cluster, forward, tunnel_forward, .. } = self;
        let scratch = &mut self.forward_scratch;
        // one clock reading per wake-up, not per datagram
        let (now, wall) = clock();
        if let Some(pending) = tunnel_forward.as_mut().and_then(|t| {
            t.handle_ready(registry, token, &mut bufs.rx, |from, d| {
                take_tunnel_datagram(core, scratch, now, wall, from, d)
            })
        }) {
            self.flush(now);
            return Ok(pending);
        }
        let pending = match (token, &mut *tunnel) {
            (CLUSTER, _) => {
                if let Some(c) = cluster.as_mut() {
                    c.drain(core, now, wall, log);
                    if let Some(t) = tunnel_forward.as_mut() {
                        t.sync(&c.other_tunnels(), registry, log);
                    }
                }
                false
            }
            (DNS, _) => dns.as_mut().is_some_and(|d| d.serve(|name| core.address_of(name))),
            (RENDEZVOUS, _) => rendezvous.as_mut().is_some_and(|sock| serve_rendezvous(now, sock, core, bufs)),
            (FORWARD, _) => forward.as_ref().is_some_and(|sock| read_forwarded(now, wall, sock, core, bufs)),
            (TUN, _) => read_tun(dev, &mut bufs.tun_in, log, |p| core.handle_tun_packet(p)),
            (UDP, HubTunnel::Udp(sock)) => {
                read_udp(sock, &mut bufs.rx, log, |from, d| take_tunnel_datagram(core, scratch, now, wall, from, d))
            }
            (EMBEDDED, HubTunnel::Embedded(t)) => t.read_listen(|inbound| {
                if let mpserver::Inbound::Forward(slot, d) = inbound {
                    take_tunnel_datagram(core, scratch, now, wall, slot_addr(slot), d);
                }
                true
            }),
            _ => false,
        };
        self.flush(now);
        Ok(pending)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        // an idle hub wakes only when its core or the embedded server asks
        let forwarding = self.tunnel_forward.as_ref().and_then(TunnelForwarding::poll_timeout);
        [self.core.poll_timeout(), self.tunnel.poll_timeout(), forwarding].into_iter().flatten().min()
    }

    fn handle_timeout(&mut self, registry: &Registry, now: Instant) -> Result<(), VpnError> {
        self.tunnel.handle_timeout(now);
        if let Some(t) = self.tunnel_forward.as_mut() {
            t.handle_timeout(registry, now);
        }
        self.core.handle_timeout(now);
        self.flush(now);
        Ok(())
    }

    fn status(&self, now: Instant) -> VpnStatus {
        let mut st = hub_status(&self.core, now, &self.tun_name, self.hub_addr);
        let forwarding = self.core.forwarding();
        st.cluster = Some(self.cluster.as_ref().map_or_else(ClusterStatus::standalone, |c| c.status(&forwarding)));
        st
    }

    fn stats_line(&self, now: Instant) -> String {
        self.status(now).summary_line()
    }

    fn metrics(&self, now: Instant, m: &mut Metrics) {
        vpn_metrics(&self.status(now), m);
    }

    /// Re-reads hub.yaml: its peers take effect at once (see `Hub::reconfigure`); other
    /// changed settings are named as needing a restart and keep their running values.
    fn reload(&mut self, _: &Registry, now: Instant) -> Reload {
        let c = match load_config(&self.config_path, HubConfig::parse) {
            Ok(c) => c,
            Err(e) => return Reload::Refused(e.to_string()),
        };
        let peers = match peer_specs(&c, &self.log) {
            Ok(p) => p,
            Err(e) => return Reload::Refused(e.to_string()),
        };
        let restart = self.config.changes_needing_restart(&c);
        if !restart.is_empty() {
            warn!(self.log, "changed settings take effect after a restart; running with the old ones"; "fields" => restart.join(", "));
        }
        let changes = self.core.reconfigure(now, peers);
        self.core.handle_timeout(now);
        self.flush(now);
        self.config.peers = c.peers;
        Reload::Done(changes.to_string())
    }
}

impl HubDriver {
    /// Does what the core has for us (`Hub::poll_output`, in its order) until it has
    /// nothing more: tunnel datagrams go a batch at a time, TUN packets at once from the
    /// batch slot the core wrote them in, events are logged.
    fn flush(&mut self, now: Instant) {
        let Self { core, tunnel, dev, bufs, log, state_path, kept, cluster, forward, tunnel_forward, .. } = self;
        let (headroom, tailroom) = tunnel.room();
        let mut idle = false;
        while !idle {
            bufs.tx.clear();
            while !idle
                && !bufs.tx.is_full()
                && bufs.tx.push_with(headroom, |slot| {
                    let len = slot.len() - tailroom;
                    let buf = &mut slot[..len];
                    loop {
                        match core.poll_output(buf) {
                            HubOutput::Tunnel { to, len } => return Some((to, len)),
                            HubOutput::Forward { to, len } => {
                                let d = &buf[..len];
                                let tunneled = tunnel_forward.as_mut().is_some_and(|t| t.push(now, to, d));
                                if let (false, Some(sock)) = (tunneled, forward.as_ref()) {
                                    let _ = sock.send_to(d, to);
                                }
                            }
                            // a full TUN queue drops, as the kernel would
                            HubOutput::Tun(n) => {
                                let _ = dev.send(&buf[..n]);
                            }
                            HubOutput::Event(HubEvent::AddressesChanged) => {
                                kept.addresses.clone_from(core.assignments());
                                if let Err(e) = state::save(state_path, kept) {
                                    error!(log, "cannot keep the addresses given out: a restart may renumber peers"; "error" => %e);
                                }
                            }
                            HubOutput::Event(HubEvent::AddressWanted { name, want }) => {
                                if let Some(c) = cluster.as_ref() {
                                    c.link.ask(name, want);
                                }
                            }
                            HubOutput::Event(ev) => log_event(log, ev),
                            HubOutput::Timeout(_) => {
                                idle = true;
                                return None;
                            }
                        }
                    }
                })
            {}
            let failed = tunnel.send(now, &mut bufs.tx);
            if failed > 0 {
                trace!(log, "sends to mpserver failed"; "datagrams" => failed);
            }
            if let Some(t) = tunnel_forward.as_mut() {
                t.flush(now);
            }
        }
    }
}

fn log_event(log: &Logger, ev: HubEvent) {
    match ev {
        HubEvent::AddressesChanged | HubEvent::AddressWanted { .. } => {}
        HubEvent::PeerUp { name, addr, tunnel } => {
            info!(log, "peer up"; "name" => name, "address" => %addr, "tunnel" => %tunnel)
        }
        HubEvent::PeerMoved { name, tunnel } => info!(log, "peer moved"; "name" => name, "tunnel" => %tunnel),
        HubEvent::PeerGone { name, addr, why } => {
            warn!(log, "peer gone"; "name" => name, "address" => %addr, "why" => why)
        }
        // a peer with two ways to this hub asks every few seconds: not worth a warning each time
        HubEvent::Refused { name, reason: reason @ crate::wire::RefusalReason::RegisteredElsewhere } => {
            slog::debug!(log, "peer refused"; "name" => name, "reason" => %reason)
        }
        HubEvent::Refused { name, reason } => warn!(log, "peer refused"; "name" => name, "reason" => %reason),
        HubEvent::RoutesRefused { name, routes } => {
            let routes: Vec<String> = routes.iter().map(|(r, why)| format!("{r} ({why:?})")).collect();
            warn!(log, "announced routes refused (not in hub.yaml's routes for this peer)"; "name" => name, "routes" => routes.join(", "))
        }
    }
}
