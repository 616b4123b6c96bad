//! `mpvpn peer`: the peer core on a TUN device, the tunnel (a UDP socket towards mpclient,
//! or the embedded client) and the mesh sockets.

use super::status::PeerHubStatus;
use super::system::only_mpclient;
use super::*;
use crate::config::HubEndpoint;
use crate::peer::{PeerOutput, HEARTBEAT_RETRIES};

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
/// With several hubs: how long a hub may leave the peer's registration unanswered before
/// the peer tries the next (a hub it was registered with is left when it is lost).
pub const HUB_SWITCH_AFTER: Duration = Duration::from_secs(5);

/// The "application" address of the peer's one session in an embedded client.
pub(super) const EMBEDDED_APP: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1));

impl PeerTunnel {
    /// Room each tunnel datagram needs around it in a batch slot.
    fn room(&self) -> Room {
        match self {
            Self::Udp { .. } => NO_ROOM,
            Self::Embedded(_) => SEALING_ROOM,
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
        match &self.reach {
            Reach::Configured(e) => e.describe(),
            Reach::Discovered { hub, client, .. } => {
                let at: Vec<&str> = client.paths.iter().map(|p| p.remote.as_str()).collect();
                format!("{hub} (discovered, at {})", at.join(", "))
            }
        }
    }
}

/// An embedded multipath client, configured by `cc` (read from `file`).
fn open_embedded(cc: &ClientConfig, file: &str, registry: &Registry, log: &Logger) -> Result<PeerTunnel, VpnError> {
    let rt = mpclient::ClientRuntime::from_config(file, cc)?;
    let key = driver::require_key("mpvpn", cc.key_file.as_deref())?;
    if let Some(w) = key.warning {
        warn!(log, "{}", w);
    }
    info!(log, "multipath client embedded"; "paths" => rt.paths.len());
    let mp = mpclient::Multipath::open(&rt, key.key, registry, EMBEDDED.0, log.clone())?;
    Ok(PeerTunnel::Embedded(Box::new(mp)))
}

fn open_reach(r: &Reach, registry: &Registry, log: &Logger) -> Result<PeerTunnel, VpnError> {
    match r {
        Reach::Configured(e) => open_peer_tunnel(e, registry, log),
        Reach::Discovered { hub, client, .. } => {
            open_embedded(client, &format!("(discovered hub {hub})"), registry, log)
        }
    }
}

pub(super) fn open_peer_tunnel(c: &HubEndpoint, registry: &Registry, log: &Logger) -> Result<PeerTunnel, VpnError> {
    match &c.embedded_client {
        None => {
            let tunnel = driver::resolve(c.tunnel.as_deref().unwrap_or(crate::config::DEFAULT_TUNNEL))?;
            let what = || format!("tunnel socket to {tunnel}");
            let mut sock = driver::udp_socket(driver::any_addr_for(tunnel), None, Some(tunnel)).context(what)?;
            registry.register(&mut sock, UDP, Interest::READABLE).context(what)?;
            info!(log, "talking to mpclient"; "tunnel" => %tunnel, "its control socket" => ?c.tunnel_control);
            Ok(PeerTunnel::Udp { sock, control: c.tunnel_control.clone() })
        }
        Some(path) => {
            let cc = load_config(path, ClientConfig::parse)?;
            open_embedded(&cc, &path.display().to_string(), registry, log)
        }
    }
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

/// `mpvpn peer` as the event loop runs it.
pub(super) struct PeerDriver {
    core: Peer,
    tunnel: PeerTunnel,
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
    /// The hubs (peer.yaml's `hubs:`, else the one it names, then any discovered), the
    /// one in use, since when, and whether it has answered since.
    hubs: Vec<HubSlot>,
    /// The embedded client discovered hubs are reached with (`discover`, one hub in
    /// peer.yaml with `embedded_client`).
    discover_with: Option<ClientConfig>,
    current: usize,
    hub_since: Instant,
    registered_here: bool,
    /// How the TUN device is configured now (address, prefix length, MTU).
    tun_config: Option<(Ipv4Addr, u8, u16)>,
    log: Logger,
}

/// What the peer core takes from peer.yaml, its key and its mesh sockets.
fn core_config(c: &PeerConfig, key: &[u8], mesh: Option<&MeshSockets>) -> PeerCoreConfig {
    PeerCoreConfig {
        peer_list_deltas: true,
        other_hubs: c.endpoints().len() > 1,
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
    let core = Peer::new(core_config(&c, &key.key, mesh.as_ref()), now, wall, os_entropy());
    el.serve_control(&control_path)?;
    el.serve_metrics(c.metrics_listen)?;
    el.log_stats_every(Some(STATS_INTERVAL));
    let dev = open_tun(&c.tun)?;
    el.registry().register(&mut SourceFd(&dev.as_raw_fd()), TUN, Interest::READABLE).context(|| "TUN".into())?;
    let endpoints = c.endpoints();
    let tunnel = open_peer_tunnel(&endpoints[0], el.registry(), log)?;
    let discover_with = match (&endpoints[..], c.discover) {
        ([one], true) => one.embedded_client.as_ref().map(|p| load_config(p, ClientConfig::parse)).transpose()?,
        _ => None,
    };
    let hubs = endpoints.into_iter().map(|e| HubSlot { reach: Reach::Configured(e), name: None }).collect();
    info!(log, "mpvpn peer starting"; "name" => &c.name, "tun" => &c.tun, "routes" => c.routes.len(),
        "control" => %control_path.display());
    let mut d = PeerDriver {
        core,
        tunnel,
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
        current: 0,
        hub_since: now,
        registered_here: false,
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
        let Self { core, tunnel, dev, bufs, log, mesh, .. } = self;
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
        let pending = match (token, &mut *tunnel) {
            (TUN, _) => read_tun(dev, &mut bufs.tun_in, log, |p| core.handle_tun_packet(now, p)),
            (UDP, PeerTunnel::Udp { sock, .. }) => {
                read_udp(sock, &mut bufs.rx, log, |_, d| core.handle_datagram(now, d))
            }
            (t, PeerTunnel::Embedded(mp)) if mp.owns(t) => {
                mp.handle_ready(registry, t, &mut bufs.rx, |_, d| core.handle_datagram(now, d))
            }
            _ => false,
        };
        self.flush(now)?;
        Ok(pending)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        // an idle peer wakes only when its core or the embedded client asks
        let query = self.remotes_query.as_ref().map(|(_, deadline)| *deadline);
        let switch = self.next_hub_at();
        [self.core.poll_timeout(), self.tunnel.poll_timeout(), query, switch].into_iter().flatten().min()
    }

    fn handle_timeout(&mut self, registry: &Registry, now: Instant) -> Result<(), VpnError> {
        if self.remotes_query.as_ref().is_some_and(|(_, deadline)| now >= *deadline) {
            self.remotes_answered(Err("no answer within the deadline".into()));
        }
        if self.next_hub_at().is_some_and(|t| now >= t) {
            warn!(self.log, "the hub does not answer the registration: trying the next hub";
                "hub" => self.hubs[self.current].describe(), "waited" => ?HUB_SWITCH_AFTER);
            self.switch_hub(now);
        }
        self.tunnel.handle_timeout(registry, now);
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
    /// nothing more: tunnel datagrams go a batch at a time, the rest at once from the
    /// batch slot the core wrote it in (nothing is allocated).
    fn flush(&mut self, now: Instant) -> Result<(), VpnError> {
        loop {
            let Self { core, tunnel, dev, bufs, mesh, log, .. } = self;
            let (headroom, tailroom) = tunnel.room();
            let mut next = None;
            bufs.tx.clear();
            while next.is_none()
                && !bufs.tx.is_full()
                && bufs.tx.push_with(headroom, |slot| {
                    let len = slot.len() - tailroom;
                    let buf = &mut slot[..len];
                    loop {
                        match core.poll_output(now, buf) {
                            // the embedded client takes the address as the session's
                            // application; mpclient's socket is connected
                            PeerOutput::Tunnel(n) => return Some((EMBEDDED_APP, n)),
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
                                next = Some(Some(ev));
                                return None;
                            }
                            PeerOutput::Timeout(_) => {
                                next = Some(None);
                                return None;
                            }
                        }
                    }
                })
            {}
            let failed = tunnel.send(now, &mut bufs.tx);
            if failed > 0 {
                trace!(log, "sends to mpclient failed"; "datagrams" => failed);
            }
            match next {
                Some(Some(ev)) => self.handle_event(ev)?,
                Some(None) => return Ok(()),
                None => {}
            }
        }
    }

    /// Applies the core's configuration and logs its events.
    fn handle_event(&mut self, ev: PeerEvent) -> Result<(), VpnError> {
        let Self { core, tun_name: tun, resolver, log, mesh, .. } = self;
        match ev {
            PeerEvent::Configured { addr, prefix_len, hub_addr, mtu, dns_domain } => {
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
            PeerEvent::HubLost => {
                let retries: Vec<String> = HEARTBEAT_RETRIES.iter().map(|d| format!("{d:?}")).collect();
                error!(log, "hub lost: no heartbeat answers; not taking packets, registering again";
                    "retried after" => retries.join(", "),
                    "hub" => self.hubs[self.current].describe());
                if self.hubs.len() > 1 {
                    self.switch_hub(clock().0);
                }
            }
            PeerEvent::DnsDomainRefused { domain, pinned } => {
                warn!(log, "the hub names a DNS domain this peer does not route lookups for; names in the VPN are not resolved through it";
                    "domain" => ?domain, "pinned in peer.yaml" => ?pinned)
            }
            PeerEvent::HubReset => {
                warn!(log, "the hub no longer knows this registration (it restarted): registering again");
                // with several hubs, the next is tried if this one does not answer again
                self.registered_here = false;
                self.hub_since = clock().0;
            }
            PeerEvent::Refused(reason) => warn!(log, "hub refused for now; retrying"; "reason" => %reason),
            PeerEvent::RouteRefused { route, reason } => {
                warn!(log, "the hub refused an announced route (hub.yaml allows this peer other subnets)"; "route" => %route, "reason" => ?reason)
            }
            PeerEvent::ClusterHubs(h) => self.learn_hubs(h),
            PeerEvent::Fatal(refusal) => return Err(refusal.into()),
        }
        Ok(())
    }
}

impl PeerDriver {
    /// With several hubs, while the one in use has not answered: when to try the next.
    fn next_hub_at(&self) -> Option<Instant> {
        (self.hubs.len() > 1 && !self.registered_here).then_some(self.hub_since + HUB_SWITCH_AFTER)
    }

    /// The hub in use is one of a cluster: its name, and (`discover`) the other hubs as
    /// further places to register when it is lost.
    fn learn_hubs(&mut self, h: crate::wire::ClusterHubsRepr) {
        self.hubs[self.current].name = Some(h.this.clone());
        let Some(base) = &self.discover_with else { return };
        let mut learned = Vec::new();
        for o in h.others.into_iter().filter(|o| !o.tunnel.is_empty()) {
            if self.hubs.iter().any(|s| s.name.as_deref() == Some(o.name.as_str())) {
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
            self.hubs.push(HubSlot { reach, name: Some(o.name) });
        }
        if !learned.is_empty() {
            info!(self.log, "learned the cluster's other hubs: registering with one of them if this one is lost";
                "this hub" => &h.this, "others" => learned.join(", "));
            self.core.set_other_hubs(true);
        }
    }

    /// Registers with the next hub from now on (the core keeps registering; its address,
    /// which the cluster keeps per name, comes back with the Welcome).
    fn switch_hub(&mut self, now: Instant) {
        self.current = (self.current + 1) % self.hubs.len();
        self.hub_since = now;
        self.registered_here = false;
        self.point_rendezvous();
        let e = &self.hubs[self.current];
        match open_reach(&e.reach, &self.registry, &self.log) {
            Ok(t) => {
                info!(self.log, "registering with the next hub"; "hub" => e.describe());
                self.tunnel = t;
            }
            // tried again when this one times out too
            Err(err) => error!(self.log, "cannot open the next hub's tunnel"; "hub" => e.describe(), "error" => %err),
        }
    }

    /// The mesh asks the rendezvous port of the hub in use (its own, else
    /// `mesh.rendezvous`): that is the hub that sees our mesh sockets' NAT mappings.
    fn point_rendezvous(&mut self) {
        let Some(m) = self.mesh.as_mut() else { return };
        let slot = &self.hubs[self.current];
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
        let state = |i: usize| match (i == self.current, self.core.is_up()) {
            (true, true) => "up",
            (true, false) => "registering",
            (false, _) => "standby",
        };
        self.hubs
            .iter()
            .enumerate()
            .map(|(i, e)| PeerHubStatus {
                name: e.name.as_ref().map_or_else(|| e.describe(), |n| format!("{n}: {}", e.describe())),
                state: state(i).into(),
                rtt_ms: (i == self.current).then(|| self.core.rtt_ms()).flatten(),
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
        self.registered_here = true;
        let Self { tunnel, tun_name: tun, installed, protected, resolver, log, registry, remotes_query, .. } = self;
        // a new registration under the same address (the same hub, or another of the
        // cluster) leaves the device alone: reconfiguring it would drop what is in flight
        if self.tun_config != Some((addr, prefix_len, mtu)) {
            configure_tun(tun, addr, prefix_len, mtu)?;
            self.tun_config = Some((addr, prefix_len, mtu));
        }
        *protected = protected_addresses(tunnel, log);
        if let PeerTunnel::Udp { control, .. } = tunnel {
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
