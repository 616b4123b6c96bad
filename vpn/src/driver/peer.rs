//! `mpvpn peer`: the peer core on a TUN device, the tunnel (a UDP socket towards mpclient,
//! or the embedded client) and the mesh sockets.

use super::status::PeerHubStatus;
use super::system::only_mpclient;
use super::*;
use crate::config::HubEndpoint;
use crate::peer::{LinkState, PeerOutput, HEARTBEAT_RETRIES, MAX_HUB_LINKS};

/// How a peer exchanges datagrams with the tunnel.
pub(super) enum PeerTunnel {
    /// A separate mpclient at `tunnel`, with its control socket (`tunnel_control`; else
    /// the only mpclient running).
    Udp { sock: BatchSocket, control: Option<PathBuf> },
    /// The multipath client runs in this process.
    Embedded(Box<mpclient::Multipath>),
}

/// How long a peer waits for its separate mpclient's status report before it applies
/// routes without knowing where the bridges are.
const MPCLIENT_QUERY_DEADLINE: Duration = Duration::from_secs(2);
/// How often a hub's tunnel that could not be opened (a name that did not resolve) is
/// tried again.
const TUNNEL_REOPEN_INTERVAL: Duration = Duration::from_secs(5);
/// Tokens each hub link's tunnel may take: an embedded client's paths and its address
/// watcher, or the socket to mpclient. Link `l`'s start at `link_token_base(l)`.
const LINK_TOKENS: usize = common::MAX_PATHS + 2;

fn link_token_base(l: usize) -> usize {
    UDP.0 + l * LINK_TOKENS
}

/// The "application" address of the peer's one session in an embedded client.
pub(super) const EMBEDDED_APP: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1));

impl PeerTunnel {
    /// Whether readiness of `token` is this tunnel's (opened at `base`).
    fn owns(&self, base: usize, token: Token) -> bool {
        match self {
            Self::Udp { .. } => token.0 == base,
            Self::Embedded(mp) => mp.owns(token),
        }
    }

    /// Sends a batch of the core's tunnel datagrams: to mpclient with one `sendmmsg` (GSO
    /// where it can), or sealed in the batch slots by the embedded client. Returns how
    /// many datagrams could not be sent to mpclient.
    fn send(&mut self, now: Instant, tx: &mut RecvBatch) -> usize {
        match self {
            Self::Udp { sock: s, .. } => {
                let all = common::driver::batch::all_of(tx);
                all.len() - s.send_batch(tx, all, None, None)
            }
            Self::Embedded(mp) => {
                mp.send_batch(now, tx);
                0
            }
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        match self {
            Self::Udp { .. } => None,
            Self::Embedded(mp) => mp.poll_timeout(),
        }
    }

    fn handle_timeout(&mut self, registry: &Registry, now: Instant) {
        if let Self::Embedded(mp) = self {
            mp.handle_timeout(registry, now);
        }
    }
}

/// One hub a peer may register with: from peer.yaml, or learned from a hub of the
/// cluster (`discover`): the peer's own embedded client with the paths replaced by that
/// hub's advertised multipath server addresses.
pub(super) enum Reach {
    Configured(HubEndpoint),
    Discovered { hub: String, client: Box<ClientConfig>, rendezvous: Option<SocketAddr> },
}

/// A hub slot: how it is reached, and its name once a hub told it.
pub(super) struct HubSlot {
    reach: Reach,
    name: Option<String>,
}

impl HubSlot {
    /// Its own rendezvous port (peer.yaml's, or the one it advertises), if it has one.
    fn rendezvous(&self) -> Result<Option<SocketAddr>, VpnError> {
        match &self.reach {
            Reach::Configured(e) => e.rendezvous.as_deref().map(driver::resolve).transpose().map_err(Into::into),
            Reach::Discovered { rendezvous, .. } => Ok(*rendezvous),
        }
    }

    fn describe(&self) -> String {
        self.reach.describe()
    }
}

impl Reach {
    fn describe(&self) -> String {
        match self {
            Reach::Configured(e) => e.describe(),
            Reach::Discovered { hub, client, .. } => {
                let at: Vec<&str> = client.paths.iter().map(|p| p.remote.as_str()).collect();
                format!("{hub} (discovered, at {})", at.join(", "))
            }
        }
    }
}

/// An embedded multipath client, configured by `cc` (read from `file`), its tokens from
/// `base`.
fn open_embedded(
    cc: &ClientConfig,
    file: &str,
    registry: &Registry,
    base: usize,
    log: &Logger,
) -> Result<PeerTunnel, VpnError> {
    let rt = mpclient::ClientRuntime::from_config(file, cc)?;
    let key = driver::require_key("mpvpn", cc.key_file.as_deref())?;
    if let Some(w) = key.warning {
        warn!(log, "{}", w);
    }
    info!(log, "multipath client embedded"; "paths" => rt.paths.len());
    let mp = mpclient::Multipath::open(&rt, key.key, registry, base, log.clone())?;
    Ok(PeerTunnel::Embedded(Box::new(mp)))
}

/// The tunnel of hub link `l`, reached as `r`.
fn open_reach(r: &Reach, l: usize, registry: &Registry, log: &Logger) -> Result<PeerTunnel, VpnError> {
    let base = link_token_base(l);
    match r {
        Reach::Configured(e) => open_peer_tunnel(e, registry, base, log),
        Reach::Discovered { hub, client, .. } => {
            open_embedded(client, &format!("(discovered hub {hub})"), registry, base, log)
        }
    }
}

fn open_peer_tunnel(c: &HubEndpoint, registry: &Registry, base: usize, log: &Logger) -> Result<PeerTunnel, VpnError> {
    match &c.embedded_client {
        None => {
            let tunnel = driver::resolve(c.tunnel.as_deref().unwrap_or(crate::config::DEFAULT_TUNNEL))?;
            let what = || format!("tunnel socket to {tunnel}");
            let mut sock = driver::udp_socket(driver::any_addr_for(tunnel), None, Some(tunnel)).context(what)?;
            registry.register(&mut sock, Token(base), Interest::READABLE).context(what)?;
            info!(log, "talking to mpclient"; "tunnel" => %tunnel, "its control socket" => ?c.tunnel_control);
            Ok(PeerTunnel::Udp { sock, control: c.tunnel_control.clone() })
        }
        Some(path) => {
            let cc = load_config(path, ClientConfig::parse)?;
            open_embedded(&cc, &path.display().to_string(), registry, base, log)
        }
    }
}

/// Hub link `l`'s tunnel, or `None` (logged; `PeerDriver::reopen_tunnels` tries again).
fn open_tunnel(reach: &Reach, l: usize, registry: &Registry, log: &Logger) -> Option<PeerTunnel> {
    open_reach(reach, l, registry, log)
        .map_err(|e| {
            error!(log, "cannot open a hub's tunnel; trying again"; "hub" => reach.describe(), "error" => %e,
                "in" => ?TUNNEL_REOPEN_INTERVAL)
        })
        .ok()
}

/// A peer's mesh sockets (`mesh:` in peer.yaml).
pub(super) struct MeshSockets {
    socks: Vec<BatchSocket>,
    /// Their local addresses, as bound.
    locals: Vec<SocketAddr>,
    /// The rendezvous port of the hub in use, and `mesh.rendezvous` (for hubs without
    /// their own).
    rendezvous: SocketAddr,
    default_rendezvous: SocketAddr,
}

impl MeshSockets {
    fn open(m: &crate::config::PeerMeshConfig, registry: &Registry, log: &Logger) -> Result<Self, VpnError> {
        let rendezvous = driver::resolve(&m.rendezvous)?;
        let mut socks = Vec::new();
        let mut locals = Vec::new();
        for (i, addr) in m.listen.to_vec().into_iter().enumerate() {
            let what = || format!("mesh socket {addr} (mesh.listen in peer.yaml)");
            // large socket buffers, as the tunnel's: a burst of a fast transfer must not
            // overflow them
            let mut sock = driver::udp_socket(addr, None, None).context(what)?;
            registry.register(&mut sock, Token(MESH_BASE - i), Interest::READABLE).context(what)?;
            locals.push(sock.local_addr().context(what)?);
            socks.push(sock);
        }
        info!(log, "mesh sockets open"; "listen" => ?locals, "rendezvous" => %rendezvous, "relay" => ?m.relay,
            "connect" => ?m.connect);
        Ok(Self { socks, locals, rendezvous, default_rendezvous: rendezvous })
    }

    fn socket_of(&self, token: Token) -> Option<usize> {
        MESH_BASE.checked_sub(token.0).filter(|&i| i < self.socks.len())
    }

    /// Reads mesh socket `i` (`recvmmsg`, into `rx`) until empty or the budget is spent;
    /// true if data may remain.
    fn read(&mut self, i: usize, core: &mut Peer, rx: &mut RecvBatch, log: &Logger) -> bool {
        read_batches(self.socks[i].as_raw_fd(), rx, NO_ROOM, log, "mesh", |rx, now| {
            for k in 0..rx.len() {
                if let Some(from) = rx.source(k) {
                    core.handle_mesh_datagram(now, i, from, rx.datagram_mut(k));
                }
            }
        })
    }

    /// A "where am I" to the hub's rendezvous port, from mesh socket `socket`.
    fn send_rendezvous(&self, socket: usize, d: &[u8]) {
        let _ = self.socks[socket].send_to(d, self.rendezvous);
    }

    /// A direct datagram to each of `to`; a full socket buffer or an unreachable address
    /// loses one copy.
    fn send_direct(&self, d: &[u8], to: &[crate::mesh::MeshAddr]) {
        for t in to {
            if let crate::mesh::MeshAddr::Direct { socket, addr } = *t {
                let _ = self.socks[socket].send_to(d, addr);
            }
        }
    }

    /// This host's addresses the mesh sockets may be reached on (`mesh::host_candidates`).
    fn host_candidates(&self, tun: &str) -> Vec<SocketAddr> {
        let ifs: Vec<(String, std::net::IpAddr)> =
            if_addrs::get_if_addrs().unwrap_or_default().into_iter().map(|i| (i.name.clone(), i.ip())).collect();
        crate::mesh::host_candidates(&self.locals, &ifs, tun)
    }
}

/// A datagram for another link ended the last batch: it starts this one (and that link's
/// is the batch's).
fn push_carried(carry: &[u8], carried: &mut Option<(usize, usize)>, tx: &mut RecvBatch) -> Option<usize> {
    let (link, len) = carried.take()?;
    tx.push_with(SEALING_ROOM.0, |slot| {
        slot[..len].copy_from_slice(&carry[..len]);
        Some((EMBEDDED_APP, len))
    });
    Some(link)
}

/// Sends a batch of hub link `l`'s tunnel datagrams.
fn send_batch(tunnels: &mut [Option<PeerTunnel>], l: usize, now: Instant, tx: &mut RecvBatch, log: &Logger) {
    match tunnels.get_mut(l).and_then(Option::as_mut) {
        Some(t) => {
            let failed = t.send(now, tx);
            if failed > 0 {
                trace!(log, "sends to mpclient failed"; "datagrams" => failed);
            }
        }
        // a hub whose tunnel is not open: its datagrams are lost, as on a dead path
        None => trace!(log, "no tunnel for the hub link"; "datagrams" => tx.len()),
    }
}

/// Why `PeerDriver::flush` ended a batch.
enum FlushStop {
    Event(PeerEvent),
    /// The core has nothing more now.
    Idle,
    /// The next tunnel datagram is for another hub link (kept in `carry`).
    OtherLink,
}

/// `mpvpn peer` as the event loop runs it.
pub(super) struct PeerDriver {
    core: Peer,
    /// Each hub link's tunnel, by link (`None`: it could not be opened; tried again
    /// every `TUNNEL_REOPEN_INTERVAL`).
    tunnels: Vec<Option<PeerTunnel>>,
    next_reopen: Option<Instant>,
    /// A tunnel datagram for another link than the batch's, kept for the next batch.
    carry: Vec<u8>,
    carried: Option<(usize, usize)>,
    mesh: Option<MeshSockets>,
    dev: tun::Device,
    bufs: IoBuffers,
    name: String,
    tun_name: String,
    /// Routes from other peers this peer put on its TUN device.
    installed: Vec<Prefix>,
    /// Routes from other peers it refused to install, and why.
    skipped: Vec<(Prefix, String)>,
    /// What carries the tunnel (no route from another peer may cover it): found once per
    /// registration.
    protected: Vec<Ipv4Addr>,
    /// A separate mpclient's answer about where its paths go, while awaited (until its
    /// deadline); routes from other peers wait for it, as they must not cover a bridge.
    remotes_query: Option<(RemotesQuery, Instant)>,
    deferred_routes: Vec<(Vec<Prefix>, Vec<Prefix>)>,
    registry: Registry,
    /// Where names in the VPN's domain resolve, once the hub named one.
    resolver: Option<SystemResolver>,
    /// The hubs (peer.yaml's `hubs:`, else the one it names, then any discovered), by
    /// link, and the active one (whose rendezvous port the mesh asks).
    hubs: Vec<HubSlot>,
    /// The embedded client discovered hubs are reached with (`discover`, one hub in
    /// peer.yaml with `embedded_client`).
    discover_with: Option<ClientConfig>,
    active: usize,
    /// How the TUN device is configured now (address, prefix length, MTU).
    tun_config: Option<(Ipv4Addr, u8, u16)>,
    log: Logger,
}

/// What the peer core takes from peer.yaml, its key and its mesh sockets.
fn core_config(c: &PeerConfig, key: &[u8], mesh: Option<&MeshSockets>) -> PeerCoreConfig {
    PeerCoreConfig {
        peer_list_deltas: true,
        name: c.name.clone(),
        key: PeerKey::new(key),
        mtu: c.mtu,
        routes: c.routes.clone(),
        tunnel_payload: TUNNEL_PAYLOAD,
        mesh: c.mesh.as_ref().zip(mesh).map(|(m, s)| crate::mesh::MeshConfig {
            name: c.name.clone(),
            sockets: s.locals.clone(),
            relay: m.relay,
            connect: m.connect,
            // checked with peer.yaml
            redundancy: m.redundancy().unwrap_or_default(),
        }),
        dns_domain: c.dns_domain.clone(),
    }
}

/// Runs the peer until SIGTERM/SIGINT or a fatal error.
pub fn run_peer(c: PeerConfig, control_path: PathBuf, log: &Logger) -> Result<(), VpnError> {
    let key = resolve_key(&c.key, &c.key_file)?.ok_or_else(|| VpnError::NoPeerKey(c.name.clone()))?;
    if let Some(w) = &key.warning {
        warn!(log, "{}", w);
    }
    let mut el = EventLoop::new(log.clone())?;
    let (now, wall) = clock();
    let mesh = match &c.mesh {
        Some(m) => Some(MeshSockets::open(m, el.registry(), log)?),
        None => None,
    };
    let mut core = Peer::new(core_config(&c, &key.key, mesh.as_ref()), now, wall, os_entropy());
    el.serve_control(&control_path)?;
    el.serve_metrics(c.metrics_listen)?;
    el.log_stats_every(Some(STATS_INTERVAL));
    let dev = open_tun(&c.tun)?;
    el.registry().register(&mut SourceFd(&dev.as_raw_fd()), TUN, Interest::READABLE).context(|| "TUN".into())?;
    let endpoints = c.endpoints();
    // every configured hub's tunnel must open: a mistake in peer.yaml stops us here
    let tunnels = endpoints
        .iter()
        .enumerate()
        .map(|(l, e)| Ok(Some(open_peer_tunnel(e, el.registry(), link_token_base(l), log)?)))
        .collect::<Result<Vec<_>, VpnError>>()?;
    (1..tunnels.len()).for_each(|_| _ = core.add_link(now));
    let discover_with = match (&endpoints[..], c.discover) {
        ([one], true) => one.embedded_client.as_ref().map(|p| load_config(p, ClientConfig::parse)).transpose()?,
        _ => None,
    };
    let hubs = endpoints.into_iter().map(|e| HubSlot { reach: Reach::Configured(e), name: None }).collect();
    info!(log, "mpvpn peer starting"; "name" => &c.name, "tun" => &c.tun, "routes" => c.routes.len(),
        "control" => %control_path.display());
    let mut d = PeerDriver {
        core,
        tunnels,
        next_reopen: None,
        carry: vec![0; common::wire::MAX_DATAGRAM],
        carried: None,
        mesh,
        dev,
        bufs: IoBuffers::new(),
        name: c.name,
        tun_name: c.tun,
        installed: Vec::new(),
        skipped: Vec::new(),
        protected: Vec::new(),
        remotes_query: None,
        deferred_routes: Vec::new(),
        registry: el.registry().try_clone().context(|| "event loop registry".into())?,
        resolver: None,
        hubs,
        discover_with,
        active: 0,
        tun_config: None,
        log: log.clone(),
    };
    d.point_rendezvous();
    let result = el.run(&mut d);
    // the host's resolver is taken back whatever ended the peer
    if let Some(r) = d.resolver.as_mut() {
        r.remove(&d.log);
    }
    result
}

impl Service for PeerDriver {
    type Status = VpnStatus;
    type Error = VpnError;

    fn handle_ready(&mut self, registry: &Registry, token: Token) -> Result<bool, VpnError> {
        let Self { core, tunnels, dev, bufs, log, mesh, .. } = self;
        let (now, _) = clock();
        if token == MPCLIENT_QUERY {
            self.read_remotes();
            return Ok(false);
        }
        if let Some((m, i)) = mesh.as_mut().and_then(|m| m.socket_of(token).map(|i| (m, i))) {
            let pending = m.read(i, core, &mut bufs.rx, log);
            self.flush(now)?;
            return Ok(pending);
        }
        let link = tunnels.iter_mut().enumerate().find_map(|(l, t)| {
            let t = t.as_mut().filter(|t| t.owns(link_token_base(l), token))?;
            Some((l, t))
        });
        let pending = match (token, link) {
            (TUN, _) => read_tun(dev, &mut bufs.tun_in, log, |p| core.handle_tun_packet(now, p)),
            (_, Some((l, PeerTunnel::Udp { sock, .. }))) => {
                read_udp(sock, &mut bufs.rx, log, |_, d| core.handle_datagram(now, l, d))
            }
            (t, Some((l, PeerTunnel::Embedded(mp)))) => {
                mp.handle_ready(registry, t, &mut bufs.rx, |_, d| core.handle_datagram(now, l, d))
            }
            _ => false,
        };
        self.flush(now)?;
        Ok(pending)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        // an idle peer wakes only when its core or the embedded client asks
        let query = self.remotes_query.as_ref().map(|(_, deadline)| *deadline);
        let tunnels = self.tunnels.iter().flatten().filter_map(PeerTunnel::poll_timeout).min();
        [self.core.poll_timeout(), tunnels, query, self.next_reopen].into_iter().flatten().min()
    }

    fn handle_timeout(&mut self, registry: &Registry, now: Instant) -> Result<(), VpnError> {
        if self.remotes_query.as_ref().is_some_and(|(_, deadline)| now >= *deadline) {
            self.remotes_answered(Err("no answer within the deadline".into()));
        }
        if self.next_reopen.is_some_and(|t| now >= t) {
            self.reopen_tunnels(now);
        }
        for t in self.tunnels.iter_mut().flatten() {
            t.handle_timeout(registry, now);
        }
        self.core.handle_timeout(now, wall_clock_ms());
        self.flush(now)
    }

    fn status(&self, now: Instant) -> VpnStatus {
        let mut st = peer_status(&self.core, now, &self.name, &self.tun_name, &self.skipped);
        st.hubs = self.hub_status();
        if let Some(m) = &self.mesh {
            st.mesh_sockets = m
                .locals
                .iter()
                .zip(self.core.reflexive())
                .map(|(l, r)| MeshSocketStatus { local: l.to_string(), reflexive: r.map(|r| r.to_string()) })
                .collect();
        }
        st
    }

    fn stats_line(&self, now: Instant) -> String {
        self.status(now).summary_line()
    }

    fn metrics(&self, now: Instant, m: &mut Metrics) {
        vpn_metrics(&self.status(now), m);
    }
}

impl PeerDriver {
    /// Does what the core has for us (`Peer::poll_output`, in its order) until it has
    /// nothing more: tunnel datagrams go a batch at a time (one link's), the rest at once
    /// from the batch slot the core wrote it in (nothing is allocated).
    fn flush(&mut self, now: Instant) -> Result<(), VpnError> {
        loop {
            let Self { core, tunnels, dev, bufs, mesh, log, carry, carried, .. } = self;
            let (headroom, tailroom) = SEALING_ROOM;
            let mut stop = None;
            bufs.tx.clear();
            let mut batch_link = push_carried(carry, carried, &mut bufs.tx);
            while stop.is_none()
                && !bufs.tx.is_full()
                && bufs.tx.push_with(headroom, |slot| {
                    let len = slot.len() - tailroom;
                    let buf = &mut slot[..len];
                    loop {
                        match core.poll_output(now, buf) {
                            // the embedded client takes the address as the session's
                            // application; mpclient's socket is connected
                            PeerOutput::Tunnel { link, len } if batch_link.is_none_or(|b| b == link) => {
                                batch_link = Some(link);
                                return Some((EMBEDDED_APP, len));
                            }
                            PeerOutput::Tunnel { link, len } => {
                                carry[..len].copy_from_slice(&buf[..len]);
                                *carried = Some((link, len));
                                stop = Some(FlushStop::OtherLink);
                                return None;
                            }
                            PeerOutput::Rendezvous { socket, len } => {
                                if let Some(m) = mesh.as_ref() {
                                    m.send_rendezvous(socket, &buf[..len]);
                                }
                            }
                            PeerOutput::Mesh { len, to } => {
                                if let Some(m) = mesh.as_ref() {
                                    m.send_direct(&buf[..len], to);
                                }
                            }
                            // a full TUN queue drops, as the kernel would
                            PeerOutput::Tun(n) => {
                                let _ = dev.send(&buf[..n]);
                            }
                            PeerOutput::Event(ev) => {
                                stop = Some(FlushStop::Event(ev));
                                return None;
                            }
                            PeerOutput::Timeout(_) => {
                                stop = Some(FlushStop::Idle);
                                return None;
                            }
                        }
                    }
                })
            {}
            if let Some(l) = batch_link {
                send_batch(tunnels, l, now, &mut bufs.tx, log);
            }
            match stop {
                Some(FlushStop::Event(ev)) => self.handle_event(ev)?,
                Some(FlushStop::Idle) => return Ok(()),
                Some(FlushStop::OtherLink) | None => {}
            }
        }
    }

    /// Applies the core's configuration and logs its events.
    fn handle_event(&mut self, ev: PeerEvent) -> Result<(), VpnError> {
        let Self { core, tun_name: tun, resolver, log, mesh, .. } = self;
        match ev {
            PeerEvent::Configured { link, addr, prefix_len, hub_addr, mtu, dns_domain } => {
                if link != self.active {
                    info!(log, "traffic goes through another hub now"; "hub" => self.hubs[link].describe());
                    self.active = link;
                    self.point_rendezvous();
                }
                self.on_configured(addr, prefix_len, hub_addr, mtu, dns_domain)?
            }
            PeerEvent::Routes { add, remove } => self.apply_routes(add, remove),
            PeerEvent::PeerList => {
                if let Some(r) = resolver.as_mut() {
                    r.update(core.peers(), log);
                }
            }
            PeerEvent::Mesh(e) => match e {
                crate::mesh::MeshEvent::Introduced { peer } => {
                    info!(log, "mesh: introduced by the hub, punching"; "peer" => peer)
                }
                crate::mesh::MeshEvent::Direct { peer, remote } => {
                    info!(log, "mesh: direct"; "peer" => peer, "remote" => %remote)
                }
                crate::mesh::MeshEvent::Relay { peer } => {
                    warn!(log, "mesh: no direct path answers; through the hub's relay"; "peer" => peer)
                }
            },
            PeerEvent::ScanCandidates => {
                if let Some(m) = mesh.as_ref() {
                    core.set_host_candidates(m.host_candidates(tun));
                }
            }
            PeerEvent::RendezvousSilent => {
                let at = mesh.as_ref().map(|m| m.rendezvous);
                warn!(log, "mesh: the hub's rendezvous port does not answer (rendezvous: in hub.yaml, or a firewall); only host candidates are announced";
                "rendezvous" => ?at);
            }
            PeerEvent::HubLost { link, remaining } => self.log_hub_lost(link, remaining),
            PeerEvent::DnsDomainRefused { domain, pinned } => {
                warn!(log, "the hub names a DNS domain this peer does not route lookups for; names in the VPN are not resolved through it";
                    "domain" => ?domain, "pinned in peer.yaml" => ?pinned)
            }
            PeerEvent::HubReset { link } => {
                warn!(log, "the hub no longer knows this registration (it restarted): registering again";
                    "hub" => self.hubs[link].describe());
            }
            PeerEvent::Refused(reason) => warn!(log, "hub refused for now; retrying"; "reason" => %reason),
            PeerEvent::SameHub { link } => {
                warn!(log, "this hub entry reaches a hub this peer is registered with through another entry: it stands aside while that one works (list each hub once in hubs:)";
                    "hub" => self.hubs[link].describe())
            }
            PeerEvent::RouteRefused { route, reason } => {
                warn!(log, "the hub refused an announced route (hub.yaml allows this peer other subnets)"; "route" => %route, "reason" => ?reason)
            }
            PeerEvent::ClusterHubs { link, hubs } => self.learn_hubs(link, hubs),
            PeerEvent::Fatal(refusal) => return Err(refusal.into()),
        }
        Ok(())
    }
}

impl PeerDriver {
    fn log_hub_lost(&self, link: usize, remaining: usize) {
        let hub = self.hubs[link].describe();
        if remaining > 0 {
            warn!(self.log, "a hub does not answer: going on with the others, registering with it again";
                "hub" => hub, "hubs up" => remaining);
            return;
        }
        let retries: Vec<String> = HEARTBEAT_RETRIES.iter().map(|d| format!("{d:?}")).collect();
        error!(self.log, "hub lost: no heartbeat answers; not taking packets, registering again";
            "retried after" => retries.join(", "), "hub" => hub);
    }

    /// Hub link `link`'s hub is one of a cluster: its name, and (`discover`) the other
    /// hubs, which this peer registers with too.
    fn learn_hubs(&mut self, link: usize, h: crate::wire::ClusterHubsRepr) {
        self.hubs[link].name = Some(h.this.clone());
        let Some(base) = self.discover_with.clone() else { return };
        let mut learned = Vec::new();
        for o in h.others.into_iter().filter(|o| !o.tunnel.is_empty()) {
            if self.hubs.iter().any(|s| s.name.as_deref() == Some(o.name.as_str())) {
                continue;
            }
            if self.hubs.len() >= MAX_HUB_LINKS {
                warn!(self.log, "more hubs in the cluster than a peer registers with"; "at most" => MAX_HUB_LINKS,
                    "not registering with" => &o.name);
                continue;
            }
            let mut client = base.clone();
            client.paths = o
                .tunnel
                .iter()
                .map(|a| common::config::PathConfig { remote: a.to_string(), bind: None, interface: None, name: None })
                .collect();
            learned.push(o.name.clone());
            let reach = Reach::Discovered { hub: o.name.clone(), client: Box::new(client), rendezvous: o.rendezvous };
            self.tunnels.push(open_tunnel(&reach, self.hubs.len(), &self.registry, &self.log));
            self.hubs.push(HubSlot { reach, name: Some(o.name) });
            self.core.add_link(clock().0);
        }
        self.schedule_reopen(clock().0);
        if !learned.is_empty() {
            info!(self.log, "learned the cluster's other hubs: registering with them too";
                "this hub" => &h.this, "others" => learned.join(", "));
        }
    }

    /// Tries again to open the hubs' tunnels that could not be.
    fn reopen_tunnels(&mut self, now: Instant) {
        self.next_reopen = None;
        for (l, (t, slot)) in self.tunnels.iter_mut().zip(&self.hubs).enumerate() {
            if t.is_none() {
                *t = open_tunnel(&slot.reach, l, &self.registry, &self.log);
            }
        }
        self.schedule_reopen(now);
    }

    /// While a hub's tunnel is not open: when to try again.
    fn schedule_reopen(&mut self, now: Instant) {
        if self.tunnels.iter().any(Option::is_none) {
            self.next_reopen.get_or_insert(now + TUNNEL_REOPEN_INTERVAL);
        }
    }

    /// The mesh asks the rendezvous port of the active hub (its own, else
    /// `mesh.rendezvous`): that is the hub that sees our mesh sockets' NAT mappings.
    fn point_rendezvous(&mut self) {
        let Some(m) = self.mesh.as_mut() else { return };
        let slot = &self.hubs[self.active];
        m.rendezvous = match slot.rendezvous() {
            Ok(r) => r.unwrap_or(m.default_rendezvous),
            Err(e) => {
                warn!(self.log, "cannot resolve this hub's rendezvous port: asking mesh.rendezvous";
                    "hub" => slot.describe(), "error" => %e);
                m.default_rendezvous
            }
        };
    }

    /// Each hub of `hubs:` and what this peer does with it (status).
    fn hub_status(&self) -> Vec<PeerHubStatus> {
        if self.hubs.len() < 2 {
            return Vec::new();
        }
        let states = self.core.link_states();
        let state = |i: usize| match states.get(i) {
            Some(LinkState::Up) if i == self.core.active_link() => "active".to_string(),
            Some(s) => s.to_string(),
            None => "registering".into(),
        };
        self.hubs
            .iter()
            .enumerate()
            .map(|(i, e)| PeerHubStatus {
                name: e.name.as_ref().map_or_else(|| e.describe(), |n| format!("{n}: {}", e.describe())),
                state: state(i),
                rtt_ms: self.core.link_rtt_ms(i),
            })
            .collect()
    }

    /// Registered: the TUN gets its address, names their resolver, and the routes from
    /// other peers (lost with the address) come back.
    fn on_configured(
        &mut self,
        addr: Ipv4Addr,
        prefix_len: u8,
        hub_addr: Ipv4Addr,
        mtu: u16,
        dns_domain: Option<String>,
    ) -> Result<(), VpnError> {
        let Self {
            tunnels, active, tun_name: tun, installed, protected, resolver, log, registry, remotes_query, ..
        } = self;
        // a new registration under the same address (the same hub, or another of the
        // cluster) leaves the device alone: reconfiguring it would drop what is in flight
        if self.tun_config != Some((addr, prefix_len, mtu)) {
            configure_tun(tun, addr, prefix_len, mtu)?;
            self.tun_config = Some((addr, prefix_len, mtu));
        }
        *protected = protected_addresses(tunnels.iter().flatten(), log);
        if let Some(PeerTunnel::Udp { control, .. }) = &tunnels[*active] {
            let path = control.clone().unwrap_or_else(only_mpclient);
            match RemotesQuery::start(&path, registry, MPCLIENT_QUERY) {
                Ok(q) => *remotes_query = Some((q, clock().0 + MPCLIENT_QUERY_DEADLINE)),
                Err(e) => {
                    warn!(log, "cannot ask the local mpclient where its paths go: routes covering its bridges are not detected (set tunnel_control)";
                    "control" => %path.display(), "error" => %e)
                }
            }
        }
        if let (Some(domain), None) = (dns_domain, &resolver) {
            *resolver = Some(SystemResolver::point(tun, hub_addr, &domain, log));
        }
        for r in installed.iter() {
            change_route(RouteChange::Replace, r, tun)?;
        }
        info!(log, "registered"; "address" => %addr, "prefix_len" => prefix_len, "hub" => %hub_addr, "mtu" => mtu);
        Ok(())
    }

    /// Other peers' routes changed: what we installed goes, what is new is installed
    /// unless it would capture what carries the tunnel (`route_hazard`).
    fn apply_routes(&mut self, add: Vec<Prefix>, remove: Vec<Prefix>) {
        if self.remotes_query.is_some() {
            self.deferred_routes.push((add, remove));
            return;
        }
        let Self { tun_name: tun, installed, skipped, protected, log, .. } = self;
        for r in &remove {
            skipped.retain(|(x, _)| x != r);
            if !installed.contains(r) {
                continue;
            }
            if let Err(e) = change_route(RouteChange::Delete, r, tun) {
                warn!(log, "removing route"; "error" => %e);
            }
            installed.retain(|x| x != r);
        }
        for r in add {
            // `add`, never `replace`: a route this peer did not install stays
            let why = route_hazard(&r, protected)
                .map_or_else(|| change_route(RouteChange::Add, &r, tun).err().map(|e| e.to_string()), Some);
            match why {
                None => installed.push(r),
                Some(why) => {
                    warn!(log, "not installing a route from another peer"; "route" => %r, "why" => &why);
                    skipped.push((r, why));
                }
            }
        }
        info!(log, "routes from other peers"; "installed" => ?installed.iter().map(|r| r.to_string()).collect::<Vec<_>>());
    }

    /// mpclient's status report may have arrived.
    fn read_remotes(&mut self) {
        let Some((q, _)) = self.remotes_query.as_mut() else { return };
        if let Some(answer) = q.read() {
            self.remotes_answered(answer);
        }
    }

    /// The question to mpclient is over: its remotes are protected too, and the routes
    /// that waited are applied.
    fn remotes_answered(&mut self, answer: Result<Vec<Ipv4Addr>, String>) {
        if let Some((mut q, _)) = self.remotes_query.take() {
            q.close(&self.registry);
        }
        match answer {
            Ok(remotes) => self.protected.extend(remotes),
            Err(e) => {
                warn!(self.log, "cannot ask the local mpclient where its paths go: routes covering its bridges are not detected (set tunnel_control)";
                "error" => e)
            }
        }
        for (add, remove) in std::mem::take(&mut self.deferred_routes) {
            self.apply_routes(add, remove);
        }
    }
}
