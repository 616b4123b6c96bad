//! The mpvpn driver: a TUN device and a UDP socket around the hub or peer core, run by
//! the shared event loop (`common::driver::event_loop`).
//!
//! The TUN fd is registered readable only (it is always writable; the kernel drops when
//! its queue is full). Addresses, MTU and routes are set with iproute2 (`ip`), which also
//! covers IPv6. The loop only moves bytes and time.

use crate::config::{resolve_key, HubConfig, PeerConfig};
use crate::hub::{Hub, HubCoreConfig, HubDrops, HubEvent, PeerSpec, PeerState, PeerStatus};
use crate::ip::{self, Prefix};
use crate::peer::{Peer, PeerCoreConfig, PeerDrops, PeerEvent};
use crate::resolver::SystemResolver;
use crate::wire::PeerKey;
use crate::{VpnError, TUNNEL_PAYLOAD, TUN_MTU};
use common::config::{ClientConfig, ServerConfig};
use common::driver::batch::{BatchSocket, RecvBatch};
use common::driver::event_loop::{read_batches, EventLoop, Reload, Room, Service, NO_ROOM, READ_BUDGET};
use common::driver::files::load_config;
use common::driver::metrics::{with_label, Labels, Metrics};
use common::driver::{self, wall_ms, IoContext};
use common::entropy::OsEntropy;
use common::wire::{AEAD_TAG_LEN, DATA_PAYLOAD_OFFSET};
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use serde::{Deserialize, Serialize};
use slog::{error, info, trace, warn, Logger};
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const TUN: Token = Token(0);
const UDP: Token = Token(1);
/// The embedded server's listening socket, or the first of the embedded client's paths.
const EMBEDDED: Token = Token(2);
/// The hub's DNS socket (`dns:` in hub.yaml), on its VPN address.
const DNS: Token = Token(common::driver::event_loop::RESERVED_TOKENS - 1);
/// The hub's rendezvous socket (`rendezvous:` in hub.yaml).
const RENDEZVOUS: Token = Token(common::driver::event_loop::RESERVED_TOKENS - 2);
/// A peer's mesh socket `i` has token `MESH_BASE - i`.
const MESH_BASE: usize = common::driver::event_loop::RESERVED_TOKENS - 3;
/// A registered peer whose rendezvous questions got no answer this long says so.
const RENDEZVOUS_SILENT_AFTER: Duration = Duration::from_secs(5);
/// How often a peer looks at its interfaces for new host candidates.
const CANDIDATE_SCAN_INTERVAL: Duration = Duration::from_secs(5);
/// The hub's and the peer's stats line.
const STATS_INTERVAL: Duration = Duration::from_secs(30);
/// The cores run their timers at least this often.
const TICK: Duration = Duration::from_secs(1);

/// What `mpvpn status` shows, on a hub or a peer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VpnStatus {
    pub role: String,
    /// The daemon's process id (`mpvpn reload` signals it).
    #[serde(default)]
    pub pid: u32,
    pub name: String,
    pub tun: String,
    pub addr: Option<Ipv4Addr>,
    pub state: String,
    /// Peer: heartbeat round trip to the hub.
    pub hub_rtt_ms: Option<f64>,
    /// Peer: seconds since the hub last answered.
    pub last_heartbeat_s: Option<f64>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub peers: Vec<PeerStatus>,
    pub drops: serde_json::Value,
    /// Peer: announced routes the hub refused, with why.
    #[serde(default)]
    pub refused_routes: Vec<String>,
    /// Peer: routes from other peers it did not install, with why.
    #[serde(default)]
    pub skipped_routes: Vec<String>,
    /// Peer: its mesh sockets, and where the hub's rendezvous port sees each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mesh_sockets: Vec<MeshSocketStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MeshSocketStatus {
    pub local: String,
    /// Its server-reflexive address; `None`: the rendezvous port has not answered.
    pub reflexive: Option<String>,
}

impl VpnStatus {
    /// One line for the stats log: state, peers, bytes, drops.
    pub fn summary_line(&self) -> String {
        format!(
            "state={} peers={} tx_bytes={} rx_bytes={} drops={}",
            self.state,
            self.peers.len(),
            self.tx_bytes,
            self.rx_bytes,
            self.drops
        )
    }

    pub fn to_table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "mpvpn {} {}  tun {}  address {}  state {}{}  tx {} B  rx {} B  drops {}",
            self.role,
            self.name,
            self.tun,
            self.addr.map_or("-".into(), |a| a.to_string()),
            self.state,
            self.hub_rtt_ms.map_or(String::new(), |r| format!("  hub rtt {r:.2} ms")),
            self.tx_bytes,
            self.rx_bytes,
            self.drops
        );
        for m in &self.mesh_sockets {
            let seen = m.reflexive.as_deref().unwrap_or("- (no answer from the hub's rendezvous port)");
            let _ = writeln!(s, "  mesh socket {}  seen by the hub as {seen}", m.local);
        }
        let hub = self.role == "hub";
        let _ = writeln!(
            s,
            "  {:<16} {:<10} {:<15} {:<9} {:<6} {:>9} {:>9} {:>9} {:>12} {:>12} {:>12}  ROUTES",
            "NAME",
            "ID",
            "ADDRESS",
            "STATE",
            "VIA",
            "LAST HB s",
            "LAST RX s",
            "RTT ms",
            "TX BYTES",
            "RX BYTES",
            if hub { "RELAYED" } else { "" }
        );
        for r in &self.refused_routes {
            let _ = writeln!(s, "  route refused by the hub: {r}");
        }
        for r in &self.skipped_routes {
            let _ = writeln!(s, "  route not installed: {r}");
        }
        for p in &self.peers {
            let routes: Vec<String> = p.routes.iter().map(|r| r.to_string()).collect();
            let _ = writeln!(
                s,
                "  {:<16} {:<10} {:<15} {:<9} {:<6} {:>9} {:>9} {:>9} {:>12} {:>12} {:>12}  {}",
                p.name,
                p.id,
                p.addr,
                p.state,
                p.via.map_or("-".into(), |v| v.to_string()),
                p.last_heartbeat_s.map_or("-".into(), |s| format!("{s:.1}")),
                p.last_rx_s.map_or("-".into(), |s| format!("{s:.1}")),
                p.rtt_ms.map_or("-".into(), |r| format!("{r:.2}")),
                p.tx_bytes,
                p.rx_bytes,
                if hub { p.relayed_bytes.to_string() } else { String::new() },
                routes.join(",")
            );
            for x in &p.paths {
                let pct = |l: Option<f64>| l.map_or("-".into(), |l| format!("{:.0}%", l * 100.0));
                let _ = writeln!(
                    s,
                    "      path {} -> {}  {}  rtt {}  loss up {} down {}",
                    x.local,
                    x.remote,
                    x.state.name(),
                    x.rtt_ms.map_or("-".into(), |r| format!("{r:.2} ms")),
                    pct(x.loss_up),
                    pct(x.loss_down)
                );
            }
        }
        s
    }
}

fn ip_cmd(args: &[&str]) -> Result<(), VpnError> {
    let out =
        Command::new("ip").args(args).output().map_err(|source| VpnError::IpSpawn { args: args.join(" "), source })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(VpnError::IpFailed { args: args.join(" "), stderr: String::from_utf8_lossy(&out.stderr).trim().into() })
    }
}

fn open_tun(name: &str) -> Result<tun::Device, VpnError> {
    let mut cfg = tun::configure();
    cfg.tun_name(name);
    let dev = tun::create(&cfg).map_err(|source| VpnError::TunCreate { name: name.into(), source })?;
    dev.set_nonblock().map_err(|source| VpnError::Tun { name: name.into(), source: source.into() })?;
    Ok(dev)
}

/// Address (and its IPv6 mapping), MTU, up.
fn configure_tun(name: &str, addr: Ipv4Addr, prefix_len: u8, mtu: u16) -> Result<(), VpnError> {
    // no IPv6 link-local address: its router solicitations would only be dropped
    ip_cmd(&["link", "set", "dev", name, "addrgenmode", "none"])?;
    ip_cmd(&["addr", "flush", "dev", name])?;
    ip_cmd(&["addr", "add", &format!("{addr}/{prefix_len}"), "dev", name])?;
    ip_cmd(&["-6", "addr", "add", &format!("{}/96", ip::v6_of(addr)), "dev", name, "nodad"])?;
    ip_cmd(&["link", "set", "dev", name, "mtu", &mtu.to_string(), "up"])
}

/// Reads TUN packets until empty or the budget is spent; true if data may remain.
fn read_tun(dev: &tun::Device, buf: &mut [u8], log: &Logger, mut each: impl FnMut(&[u8])) -> bool {
    for _ in 0..READ_BUDGET {
        match dev.recv(buf) {
            Ok(n) => each(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                warn!(log, "TUN read failed"; "error" => %e);
                return false;
            }
        }
    }
    true
}

/// Writes the packets `poll` (a core's `poll_tun`) fills into `out` to the TUN device; a
/// full TUN queue drops them, as the kernel would.
fn write_tun(dev: &tun::Device, out: &mut [u8], mut poll: impl FnMut(&mut [u8]) -> Option<usize>) {
    while let Some(n) = poll(out) {
        let _ = dev.send(&out[..n]);
    }
}

/// Reads datagrams from the local mpclient/mpserver (`recvmmsg`, into `rx`) until empty
/// or the budget is spent; true if data may remain.
fn read_udp(sock: &BatchSocket, rx: &mut RecvBatch, log: &Logger, mut each: impl FnMut(SocketAddr, &[u8])) -> bool {
    read_batches(sock.as_raw_fd(), rx, NO_ROOM, log, "tunnel", |rx, _| {
        for i in 0..rx.len() {
            if let Some(from) = rx.source(i) {
                each(from, rx.datagram(i));
            }
        }
    })
}

/// The driver's reused buffers: nothing is allocated per packet.
struct IoBuffers {
    /// One packet read from the TUN device.
    tun_in: Vec<u8>,
    /// Datagrams read from the tunnel socket.
    rx: RecvBatch,
    /// Datagrams for the tunnel, filled by the core.
    tx: RecvBatch,
    /// One packet for the TUN device, filled by the core.
    out: Vec<u8>,
}

impl IoBuffers {
    fn new() -> Self {
        Self { tun_in: vec![0; 65536], rx: RecvBatch::new(), tx: RecvBatch::new(), out: vec![0; 65536] }
    }
}

/// An embedded client or server seals each datagram in its slot: its header goes before,
/// the AEAD tag after.
const SEALING_ROOM: Room = (DATA_PAYLOAD_OFFSET, AEAD_TAG_LEN);

/// Refills `tx` from `poll` (a core's `poll_transmit`), leaving `room` around each
/// datagram; false when the core had nothing.
fn fill_batch(
    tx: &mut RecvBatch,
    (headroom, tailroom): Room,
    mut poll: impl FnMut(&mut [u8]) -> Option<(SocketAddr, usize)>,
) -> bool {
    tx.clear();
    while !tx.is_full()
        && tx.push_with(headroom, |buf| {
            let len = buf.len() - tailroom;
            poll(&mut buf[..len])
        })
    {}
    !tx.is_empty()
}

/// How the hub exchanges datagrams with the tunnel.
enum HubTunnel {
    /// A separate mpserver forwards each session from its own socket to `listen`.
    Udp(BatchSocket),
    /// The multipath server runs in this process; a session is a slot.
    Embedded(Box<mpserver::TunnelServer>),
}

/// In embedded mode a session slot stands in for the tunnel address the hub binds a
/// peer to: 127.254.x.y, port 1 + the high bits.
fn slot_addr(slot: usize) -> SocketAddr {
    SocketAddr::from(([127, 254, (slot >> 8) as u8, slot as u8], 1 + (slot >> 16) as u16))
}

fn addr_slot(a: SocketAddr) -> Option<usize> {
    match a {
        SocketAddr::V4(v4) if v4.ip().octets()[..2] == [127, 254] && v4.port() > 0 => {
            let o = v4.ip().octets();
            Some(((v4.port() as usize - 1) << 16) | (o[2] as usize) << 8 | o[3] as usize)
        }
        _ => None,
    }
}

impl HubTunnel {
    /// Sends what the core has for the tunnel, a batch (`tx`) at a time: over UDP, each run
    /// to one session goes with one `sendmmsg` (GSO where it can); the embedded server
    /// seals in the batch slots. Returns how many datagrams could not be sent over UDP.
    fn transmit(&mut self, core: &mut Hub, tx: &mut RecvBatch) -> usize {
        let room = match self {
            Self::Udp(_) => NO_ROOM,
            Self::Embedded(_) => SEALING_ROOM,
        };
        let mut failed = 0;
        while fill_batch(tx, room, |buf| core.poll_transmit(buf)) {
            match self {
                Self::Udp(s) => failed += s.send_to_sources(tx),
                Self::Embedded(t) => t.send_batch(Instant::now(), tx, |b, i| b.source(i).and_then(addr_slot)),
            }
        }
        failed
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
const EMBEDDED_TARGET: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));

fn open_hub_tunnel(c: &HubConfig, registry: &Registry, log: &Logger) -> Result<HubTunnel, VpnError> {
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
struct HubDriver {
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
    config: HubConfig,
    log: Logger,
}

/// The hub's DNS responder: `<peer>.<domain>` on its VPN address (see `crate::dns`).
struct DnsServer {
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
fn serve_rendezvous(sock: &mio::net::UdpSocket, core: &mut Hub, buf: &mut [u8]) -> bool {
    let mut answer = Vec::new();
    for _ in 0..READ_BUDGET {
        let (n, from) = match sock.recv_from(buf) {
            Ok(r) => r,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(_) => continue,
        };
        if let Some(len) = core.handle_rendezvous(from, &buf[..n], &mut answer) {
            let _ = sock.send_to(&answer[..len], from);
        }
    }
    true
}

/// The hub core's view of hub.yaml's `peers`, keys read.
fn peer_specs(c: &HubConfig, log: &Logger) -> Result<Vec<PeerSpec>, VpnError> {
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

/// Runs the hub (configured by `c`, read from `config_path`) until SIGTERM/SIGINT or a
/// fatal error; SIGHUP re-reads `config_path`'s peers.
pub fn run_hub(c: HubConfig, config_path: PathBuf, control_path: PathBuf, log: &Logger) -> Result<(), VpnError> {
    let peers = peer_specs(&c, log)?;
    let hub_addr = c.hub_addr();
    let mtu = c.mtu.unwrap_or(TUN_MTU);
    let core = Hub::new(
        HubCoreConfig {
            network: c.network,
            hub_addr,
            mtu,
            tunnel_payload: TUNNEL_PAYLOAD,
            peers,
            peer_timeout: Duration::from_secs(c.peer_timeout_secs),
            dns_domain: c.dns.as_ref().map(|d| d.domain.clone()),
        },
        Box::new(OsEntropy::new()),
    );
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
        Some(addr) => {
            let what = || format!("rendezvous {addr} (rendezvous: in hub.yaml)");
            let mut sock = mio::net::UdpSocket::bind(addr).context(what)?;
            el.registry().register(&mut sock, RENDEZVOUS, Interest::READABLE).context(what)?;
            info!(log, "mesh rendezvous"; "listen" => %addr);
            Some(sock)
        }
        None => None,
    };
    info!(log, "mpvpn hub up"; "tun" => &c.tun, "address" => %hub_addr, "network" => %c.network, "mtu" => mtu,
        "peers_configured" => c.peers.len(), "control" => %control_path.display());
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
        config: c,
        log: log.clone(),
    };
    el.run(&mut d)
}

impl Service for HubDriver {
    type Status = VpnStatus;
    type Error = VpnError;

    fn handle_ready(&mut self, _: &Registry, token: Token) -> Result<bool, VpnError> {
        let Self { core, tunnel, dev, bufs, log, dns, rendezvous, .. } = self;
        // one clock reading per wake-up, not per datagram
        let (now, wall) = (Instant::now(), wall_ms());
        let pending = match (token, &mut *tunnel) {
            (DNS, _) => dns.as_mut().is_some_and(|d| d.serve(|name| core.address_of(name))),
            (RENDEZVOUS, _) => rendezvous.as_mut().is_some_and(|sock| serve_rendezvous(sock, core, &mut bufs.out)),
            (TUN, _) => read_tun(dev, &mut bufs.tun_in, log, |p| core.handle_tun_packet(p)),
            (UDP, HubTunnel::Udp(sock)) => {
                read_udp(sock, &mut bufs.rx, log, |from, d| core.handle_datagram(now, wall, from, d))
            }
            (EMBEDDED, HubTunnel::Embedded(t)) => t.read_listen(|inbound| {
                if let mpserver::Inbound::Forward(slot, d) = inbound {
                    core.handle_datagram(now, wall, slot_addr(slot), d);
                }
                true
            }),
            _ => false,
        };
        self.flush();
        Ok(pending)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        [self.core.poll_timeout(), self.tunnel.poll_timeout(), Some(Instant::now() + TICK)].into_iter().flatten().min()
    }

    fn handle_timeout(&mut self, _: &Registry, now: Instant) -> Result<(), VpnError> {
        self.tunnel.handle_timeout(now);
        self.core.handle_timeout(now);
        self.flush();
        Ok(())
    }

    fn status(&self, now: Instant) -> VpnStatus {
        hub_status(&self.core, now, &self.tun_name, self.hub_addr)
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
        let old = &self.config;
        let restart: Vec<&str> = [
            ("listen", old.listen != c.listen),
            ("rendezvous", old.rendezvous != c.rendezvous),
            ("tun", old.tun != c.tun),
            ("network", old.network != c.network),
            ("address", old.address != c.address),
            ("mtu", old.mtu != c.mtu),
            ("peer_timeout_secs", old.peer_timeout_secs != c.peer_timeout_secs),
            ("control_socket", old.control_socket != c.control_socket),
            ("log_level", old.log_level != c.log_level),
            ("embedded_server", old.embedded_server != c.embedded_server),
        ]
        .into_iter()
        .filter_map(|(field, changed)| changed.then_some(field))
        .collect();
        if !restart.is_empty() {
            warn!(self.log, "changed settings take effect after a restart; running with the old ones"; "fields" => restart.join(", "));
        }
        let changes = self.core.reconfigure(peers);
        self.core.handle_timeout(now);
        self.flush();
        self.config.peers = c.peers;
        Reload::Done(changes.to_string())
    }
}

/// The metrics of a hub or peer, from its status: its own state and traffic, every
/// listed peer's state, bytes, heartbeat age and RTT, and drops by reason.
fn vpn_metrics(st: &VpnStatus, m: &mut Metrics) {
    use common::driver::metrics::Unit;
    let own = || -> Labels { vec![("role".into(), st.role.clone()), ("name".into(), st.name.clone())] };
    let up = f64::from(u8::from(st.state == "up"));
    m.gauge("vpn_up", "1 while the hub runs, or while a peer is registered", None, [(own(), up)]);
    m.counter(
        "vpn_tun",
        "Bytes of IP packets through the TUN device",
        Some(Unit::Bytes),
        [(with_label(own(), "direction", "tx"), st.tx_bytes), (with_label(own(), "direction", "rx"), st.rx_bytes)],
    );
    m.gauge(
        "vpn_hub_rtt",
        "A peer's heartbeat round trip to the hub",
        Some(Unit::Seconds),
        st.hub_rtt_ms.map(|v| (own(), v / 1000.0)),
    );
    let peer =
        |p: &PeerStatus| -> Labels { vec![("peer".into(), p.name.clone()), ("address".into(), p.addr.to_string())] };
    let mut state = Vec::new();
    for p in &st.peers {
        for s in [PeerState::Up, PeerState::Silent, PeerState::ViaHub, PeerState::Direct, PeerState::Own] {
            state.push((with_label(peer(p), "state", s.to_string()), f64::from(u8::from(p.state == s))));
        }
    }
    m.gauge("vpn_peer_state", "1 for the state each listed peer is in", None, state);
    let bytes = st.peers.iter().flat_map(|p| {
        [("tx", p.tx_bytes), ("rx", p.rx_bytes)].map(|(dir, n)| (with_label(peer(p), "direction", dir), n))
    });
    m.counter("vpn_peer", "Bytes of IP packets to (tx) and from (rx) each peer", Some(Unit::Bytes), bytes);
    let hb = st.peers.iter().filter_map(|p| p.last_heartbeat_s.map(|s| (peer(p), s)));
    m.gauge(
        "vpn_peer_last_heartbeat_age",
        "Seconds since a peer's last heartbeat (the hub's view)",
        Some(Unit::Seconds),
        hb,
    );
    let rtt = st.peers.iter().filter_map(|p| p.rtt_ms.map(|v| (peer(p), v / 1000.0)));
    m.gauge(
        "vpn_peer_rtt",
        "Round trip to a peer: its heartbeats (the hub's view) or its best direct path (a peer's view)",
        Some(Unit::Seconds),
        rtt,
    );
    if st.role == "hub" {
        let relayed = st.peers.iter().map(|p| (peer(p), p.relayed_bytes));
        m.counter(
            "vpn_peer_relayed",
            "Bytes from a peer the hub passed on to other peers (routed packets, relayed datagrams)",
            Some(Unit::Bytes),
            relayed,
        );
    }
    let mut drops = Vec::new();
    for (why, n) in st.drops.as_object().into_iter().flatten() {
        match (n.as_u64(), n.as_object()) {
            (Some(n), _) => drops.push((with_label(own(), "reason", why.clone()), n)),
            // the mesh's own, as mesh_<reason>
            (None, Some(inner)) => drops.extend(
                inner
                    .iter()
                    .filter_map(|(w, n)| Some((with_label(own(), "reason", format!("{why}_{w}")), n.as_u64()?))),
            ),
            _ => {}
        }
    }
    m.counter("vpn_drops", "Datagrams and packets dropped, by reason", None, drops);
}

fn hub_status(core: &Hub, now: Instant, tun: &str, addr: Ipv4Addr) -> VpnStatus {
    // the hub's own traffic is what it carries for its peers: their tx is its rx
    let peers = core.status(now);
    VpnStatus {
        role: "hub".into(),
        pid: std::process::id(),
        name: String::new(),
        tun: tun.into(),
        addr: Some(addr),
        state: "up".into(),
        hub_rtt_ms: None,
        last_heartbeat_s: None,
        tx_bytes: peers.iter().map(|p| p.rx_bytes).sum(),
        rx_bytes: peers.iter().map(|p| p.tx_bytes).sum(),
        peers,
        drops: serde_json::to_value::<&HubDrops>(&core.drops).unwrap_or_default(),
        refused_routes: Vec::new(),
        skipped_routes: Vec::new(),
        mesh_sockets: Vec::new(),
    }
}

impl HubDriver {
    /// Sends what the core queued (through `bufs`) and logs its events.
    fn flush(&mut self) {
        let Self { core, tunnel, dev, bufs, log, .. } = self;
        let failed = tunnel.transmit(core, &mut bufs.tx);
        if failed > 0 {
            trace!(log, "sends to mpserver failed"; "datagrams" => failed);
        }
        write_tun(dev, &mut bufs.out, |out| core.poll_tun(out));
        while let Some(ev) = core.poll_event() {
            match ev {
                HubEvent::PeerUp { name, addr, tunnel } => {
                    info!(log, "peer up"; "name" => name, "address" => %addr, "tunnel" => %tunnel)
                }
                HubEvent::PeerMoved { name, tunnel } => info!(log, "peer moved"; "name" => name, "tunnel" => %tunnel),
                HubEvent::PeerGone { name, addr, why } => {
                    warn!(log, "peer gone"; "name" => name, "address" => %addr, "why" => why)
                }
                HubEvent::Refused { name, reason } => warn!(log, "peer refused"; "name" => name, "reason" => ?reason),
                HubEvent::RoutesRefused { name, routes } => {
                    let routes: Vec<String> = routes.iter().map(|(r, why)| format!("{r} ({why:?})")).collect();
                    warn!(log, "announced routes refused (not in hub.yaml's routes for this peer)"; "name" => name, "routes" => routes.join(", "))
                }
            }
        }
    }
}

/// Addresses a route from another peer must not cover: the way out of this host (its
/// default gateways) and the tunnel's own remote ends (an embedded client's paths), or
/// the tunnel would be carried into itself.
fn protected_addresses(tunnel: &PeerTunnel, log: &Logger) -> Vec<Ipv4Addr> {
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
fn only_mpclient() -> PathBuf {
    use common::driver::control;
    match control::running_instances("mpclient").as_slice() {
        [(_, only)] => only.clone(),
        _ => control::default_control_path("mpclient"),
    }
}

/// Why `r` must not be installed, if it must not.
fn route_hazard(r: &Prefix, protected: &[Ipv4Addr]) -> Option<String> {
    let special = [("loopback", "127.0.0.0/8"), ("link-local", "169.254.0.0/16"), ("multicast", "224.0.0.0/4")];
    for (what, range) in special {
        if r.overlaps(&range.parse().expect("literal")) {
            return Some(format!("it covers {what} addresses"));
        }
    }
    protected.iter().find(|a| r.contains(**a)).map(|a| format!("it covers {a}, which carries the tunnel"))
}

/// How a peer exchanges datagrams with the tunnel.
enum PeerTunnel {
    /// A separate mpclient at `tunnel`, with its control socket (`tunnel_control`; else
    /// the only mpclient running).
    Udp { sock: BatchSocket, control: Option<PathBuf> },
    /// The multipath client runs in this process.
    Embedded(Box<mpclient::Multipath>),
}

/// The "application" address of the peer's one session in an embedded client.
const EMBEDDED_APP: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1));

impl PeerTunnel {
    /// Sends what the core has for the tunnel, a batch (`tx`) at a time: to mpclient with
    /// one `sendmmsg` (GSO where it can), or sealed in the batch slots by the embedded
    /// client. Returns how many datagrams could not be sent to mpclient.
    fn transmit(&mut self, core: &mut Peer, tx: &mut RecvBatch) -> usize {
        let room = match self {
            Self::Udp { .. } => NO_ROOM,
            Self::Embedded(_) => SEALING_ROOM,
        };
        let mut failed = 0;
        // the embedded client takes the address as the session's application; mpclient's
        // socket is connected
        while fill_batch(tx, room, |buf| core.poll_transmit(buf).map(|n| (EMBEDDED_APP, n))) {
            match self {
                Self::Udp { sock: s, .. } => {
                    let all = common::driver::batch::all_of(tx);
                    failed += all.len() - s.send_batch(tx, all, None, None);
                }
                Self::Embedded(mp) => mp.send_batch(Instant::now(), tx),
            }
        }
        failed
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

fn open_peer_tunnel(c: &PeerConfig, registry: &Registry, log: &Logger) -> Result<PeerTunnel, VpnError> {
    match &c.embedded_client {
        None => {
            let tunnel = driver::resolve(&c.tunnel)?;
            let what = || format!("tunnel socket to {tunnel}");
            let mut sock = driver::udp_socket(driver::any_addr_for(tunnel), None, Some(tunnel)).context(what)?;
            registry.register(&mut sock, UDP, Interest::READABLE).context(what)?;
            info!(log, "talking to mpclient"; "tunnel" => %tunnel, "its control socket" => ?c.tunnel_control);
            Ok(PeerTunnel::Udp { sock, control: c.tunnel_control.clone() })
        }
        Some(path) => {
            let cc = load_config(path, ClientConfig::parse)?;
            let rt = mpclient::ClientRuntime::from_config(&path.display().to_string(), &cc)?;
            let key = driver::require_key("mpvpn", cc.key_file.as_deref())?;
            if let Some(w) = key.warning {
                warn!(log, "{}", w);
            }
            info!(log, "multipath client embedded"; "paths" => rt.paths.len());
            let mp = mpclient::Multipath::open(&rt, key.key, registry, EMBEDDED.0, log.clone())?;
            Ok(PeerTunnel::Embedded(Box::new(mp)))
        }
    }
}

/// A peer's mesh sockets (`mesh:` in peer.yaml).
struct MeshSockets {
    socks: Vec<BatchSocket>,
    /// Their local addresses, as bound.
    locals: Vec<SocketAddr>,
    /// The hub's rendezvous port.
    rendezvous: SocketAddr,
    /// Where direct datagrams are read and built.
    buf: Vec<u8>,
    next_scan: Instant,
    /// When this registration came up, until the rendezvous port answered (or we said
    /// it did not).
    awaiting_rendezvous: Option<Instant>,
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
        Ok(Self {
            socks,
            locals,
            rendezvous,
            buf: vec![0; 65536],
            next_scan: Instant::now(),
            awaiting_rendezvous: None,
        })
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

    /// Sends what the mesh has: direct datagrams, and the questions for the rendezvous
    /// port (copies for the relay go into the tunnel's queue).
    fn transmit(&mut self, core: &mut Peer, now: Instant) {
        for (i, d) in core.poll_rendezvous(now) {
            let _ = self.socks[i].send_to(&d, self.rendezvous);
        }
        while let Some((len, dests)) = core.poll_mesh_transmit(now, &mut self.buf) {
            for d in dests {
                if let crate::mesh::MeshAddr::Direct { socket, addr } = *d {
                    // a full socket buffer or an unreachable address loses one copy
                    let _ = self.socks[socket].send_to(&self.buf[..len], addr);
                }
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
struct PeerDriver {
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
    /// Where names in the VPN's domain resolve, once the hub named one.
    resolver: Option<SystemResolver>,
    log: Logger,
}

/// Runs the peer until SIGTERM/SIGINT or a fatal error.
pub fn run_peer(c: PeerConfig, control_path: PathBuf, log: &Logger) -> Result<(), VpnError> {
    let key = resolve_key(&c.key, &c.key_file)?.ok_or_else(|| VpnError::NoPeerKey(c.name.clone()))?;
    if let Some(w) = &key.warning {
        warn!(log, "{}", w);
    }
    let mut el = EventLoop::new(log.clone())?;
    let mesh = match &c.mesh {
        Some(m) => Some(MeshSockets::open(m, el.registry(), log)?),
        None => None,
    };
    let core = Peer::new(
        PeerCoreConfig {
            name: c.name.clone(),
            key: PeerKey::new(&key.key),
            mtu: c.mtu,
            routes: c.routes.clone(),
            tunnel_payload: TUNNEL_PAYLOAD,
            mesh: c.mesh.as_ref().zip(mesh.as_ref()).map(|(m, s)| crate::mesh::MeshConfig {
                name: c.name.clone(),
                sockets: s.locals.clone(),
                relay: m.relay,
                connect: m.connect,
            }),
        },
        Instant::now(),
        Box::new(OsEntropy::new()),
    );
    el.serve_control(&control_path)?;
    el.serve_metrics(c.metrics_listen)?;
    el.log_stats_every(Some(STATS_INTERVAL));
    let dev = open_tun(&c.tun)?;
    el.registry().register(&mut SourceFd(&dev.as_raw_fd()), TUN, Interest::READABLE).context(|| "TUN".into())?;
    let tunnel = open_peer_tunnel(&c, el.registry(), log)?;
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
        resolver: None,
        log: log.clone(),
    };
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
        let now = Instant::now();
        if let Some((m, i)) = mesh.as_mut().and_then(|m| m.socket_of(token).map(|i| (m, i))) {
            let pending = m.read(i, core, &mut bufs.rx, log);
            self.flush()?;
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
        self.flush()?;
        Ok(pending)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        [Some(self.core.poll_timeout()), self.tunnel.poll_timeout(), Some(Instant::now() + TICK)]
            .into_iter()
            .flatten()
            .min()
    }

    fn handle_timeout(&mut self, registry: &Registry, now: Instant) -> Result<(), VpnError> {
        self.tunnel.handle_timeout(registry, now);
        if let Some(m) = self.mesh.as_mut() {
            if now >= m.next_scan {
                m.next_scan = now + CANDIDATE_SCAN_INTERVAL;
                self.core.set_host_candidates(m.host_candidates(&self.tun_name));
            }
            if self.core.reflexive().iter().any(Option::is_some) {
                m.awaiting_rendezvous = None;
            } else if m.awaiting_rendezvous.is_some_and(|t| now >= t + RENDEZVOUS_SILENT_AFTER) {
                m.awaiting_rendezvous = None;
                warn!(self.log, "mesh: the hub's rendezvous port does not answer (rendezvous: in hub.yaml, or a firewall); only host candidates are announced";
                    "rendezvous" => %m.rendezvous);
            }
        }
        self.core.handle_timeout(now, wall_ms());
        self.flush()
    }

    fn status(&self, now: Instant) -> VpnStatus {
        let mut st = peer_status(&self.core, now, &self.name, &self.tun_name, &self.skipped);
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

fn peer_status(core: &Peer, now: Instant, name: &str, tun: &str, skipped: &[(Prefix, String)]) -> VpnStatus {
    VpnStatus {
        role: "peer".into(),
        pid: std::process::id(),
        name: name.into(),
        tun: tun.into(),
        addr: core.is_up().then(|| core.addr()),
        state: core.state_name().into(),
        hub_rtt_ms: core.rtt_ms(),
        last_heartbeat_s: core.last_ack().map(|t| now.saturating_duration_since(t).as_secs_f64()),
        tx_bytes: core.tx_bytes,
        rx_bytes: core.rx_bytes,
        peers: core.peer_status(now),
        drops: serde_json::to_value::<PeerDrops>(core.drop_counts()).unwrap_or_default(),
        refused_routes: core.refused_routes().iter().map(|(r, why)| format!("{r}: {why:?}")).collect(),
        skipped_routes: skipped.iter().map(|(r, why)| format!("{r}: {why}")).collect(),
        mesh_sockets: Vec::new(),
    }
}

impl PeerDriver {
    /// Sends what the core queued (through `bufs`), applies its configuration and logs
    /// its events.
    fn flush(&mut self) -> Result<(), VpnError> {
        let Self { core, tunnel, dev, bufs, tun_name: tun, installed, skipped, resolver, log, mesh, .. } = self;
        // first: the mesh's copies for the relay join the tunnel's queue
        if let Some(m) = mesh.as_mut() {
            m.transmit(core, Instant::now());
        }
        let failed = tunnel.transmit(core, &mut bufs.tx);
        if failed > 0 {
            trace!(log, "sends to mpclient failed"; "datagrams" => failed);
        }
        write_tun(dev, &mut bufs.out, |out| core.poll_tun(out));
        while let Some(ev) = core.poll_event() {
            match ev {
                PeerEvent::Configured { addr, prefix_len, hub_addr, mtu, dns_domain } => {
                    configure_tun(tun, addr, prefix_len, mtu)?;
                    if let Some(m) = mesh.as_mut() {
                        m.awaiting_rendezvous = Some(Instant::now());
                    }
                    if let (Some(domain), None) = (dns_domain, &resolver) {
                        *resolver = Some(SystemResolver::point(tun, hub_addr, &domain, log));
                    }
                    // routes were lost with the addresses; put them back
                    for r in installed.iter() {
                        ip_cmd(&["route", "replace", &r.to_string(), "dev", tun])?;
                    }
                    info!(log, "registered"; "address" => %addr, "prefix_len" => prefix_len, "hub" => %hub_addr, "mtu" => mtu);
                }
                PeerEvent::Routes { add, remove } => {
                    for r in &remove {
                        skipped.retain(|(x, _)| x != r);
                        if !installed.contains(r) {
                            continue;
                        }
                        if let Err(e) = ip_cmd(&["route", "del", &r.to_string(), "dev", tun]) {
                            warn!(log, "removing route"; "error" => %e);
                        }
                        installed.retain(|x| x != r);
                    }
                    let protected = protected_addresses(tunnel, log);
                    for r in add {
                        // `add`, never `replace`: a route this peer did not install stays
                        let why = route_hazard(&r, &protected).map_or_else(
                            || ip_cmd(&["route", "add", &r.to_string(), "dev", tun]).err().map(|e| e.to_string()),
                            Some,
                        );
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
                PeerEvent::HubLost => {
                    error!(log, "hub lost: no heartbeat answers after retries at 1, 3 and 7 s; not taking packets, registering again")
                }
                PeerEvent::Refused(reason) => warn!(log, "hub refused for now; retrying"; "reason" => ?reason),
                PeerEvent::RouteRefused { route, reason } => {
                    warn!(log, "the hub refused an announced route (hub.yaml allows this peer other subnets)"; "route" => %route, "reason" => ?reason)
                }
                PeerEvent::Fatal(refusal) => return Err(refusal.into()),
            }
        }
        Ok(())
    }
}
