//! The mesh: peers exchange traffic directly; the hub introduces them, helps them punch
//! holes through their NATs, and relays only as a last resort.
//!
//! A pair of peers the hub introduced (`IntroRepr`: a key only the two of them and the
//! hub hold, bound to both registrations) runs two multipath tunnel sessions, one each
//! way, with the tunnel's own cores: our `Client` sends to their `Server`, their `Client`
//! to our `Server`. The pair key is the PSK of the usual PSK + ephemeral X25519
//! handshake; the tunnel key every host shares never authenticates peer-to-peer traffic.
//! Sealed once, a datagram goes out on every live path; the receiver keeps the first copy
//! by sequence number. A client's path 0 is the relay (the datagram sealed to the hub,
//! which passes it on to the other peer); paths 1.. are (our mesh socket × one of their
//! candidates). KCP between the two peers runs on top, exactly as between peer and hub.
//!
//! Both sides initiate (each runs a client), so the roles are fixed by construction, each
//! side measures every path (RTT, loss both ways), and both send probes at once: the
//! simultaneous probes are the hole punch.
//!
//! Invariants:
//! - Our client sends only to the relay and to candidates the hub announced for that
//!   peer (its paths are built from the peer list). Our server answers, and sends data
//!   when our client has no direct path, only on addresses their client proved with
//!   authenticated datagrams (the tunnel server's own rule; this is what gets data back
//!   through a symmetric NAT, whose mappings no candidate names).
//! - A direct path that is not up gets datagrams only inside a punch window
//!   (`PUNCH_WINDOW` after an introduction, a candidate change or the loss of every
//!   direct path; again `PUNCH_RETRY` after a window that found none), at most one per
//!   `PUNCH_INTERVAL`. Up paths are probed every 200 ms, which also holds NAT mappings.
//! - Only what opens under one of the pair's sessions is taken, and an IP packet from the
//!   pair only if its source is that peer's address or inside its routes.
//! - `relay: fallback`: data skips the relay while a direct path is up, and takes it again
//!   as soon as the last one is down (1 s without answers); the relay path's probes never
//!   stop, so it is always ready. `relay: always`: the relay carries a copy of everything.

use crate::ip::{self, Prefix};
use crate::kcplink::{KcpLink, LinkError};
use crate::queue::PacketQueue;
use crate::wire::{field, IntroRepr, PeerEntry, INNER_IP, RELAY_HEADER_LEN, SEALED_OVERHEAD};
use common::client::{Client, ClientCoreConfig, ClientEvent, ClientRecv, ClientSend};
use common::crypto::{Cipher, Psk};
use common::entropy::Entropy;
use common::server::{Server, ServerCoreConfig, ServerEvent, ServerRecv};
use common::stats::PathState;
use common::wire::{
    message_type, HandshakeInitRepr, HandshakeRespRepr, TransportPacket, DATA_PAYLOAD_OFFSET, HANDSHAKE_RESP_LEN,
    TUNNEL_OVERHEAD, TYPE_HANDSHAKE_INIT, TYPE_HANDSHAKE_RESP, TYPE_TRANSPORT,
};
use common::{PathMask, SessionId, MAX_PATHS};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

/// A punch lasts this long ...
pub const PUNCH_WINDOW: Duration = Duration::from_secs(10);
/// ... sending to each direct path that is not up at most this often ...
pub const PUNCH_INTERVAL: Duration = Duration::from_millis(200);
/// ... and, when it found no direct path, is tried again after this.
pub const PUNCH_RETRY: Duration = Duration::from_secs(60);
/// An introduction asked for and not received is asked for again after this.
pub const INTRO_RETRY: Duration = Duration::from_secs(2);
/// Each pair client's path to the relay.
pub const RELAY_PATH: usize = 0;
/// Direct paths one pair has at most (mesh sockets × candidates).
pub const MAX_DIRECT_PATHS: usize = MAX_PATHS - 1;
/// What one datagram of a pair session carries: sealed, plus the relay's header and the
/// hub's sealing, it still fits one datagram of the tunnel to the hub.
pub const PAIR_PAYLOAD: usize = crate::TUNNEL_PAYLOAD - SEALED_OVERHEAD - RELAY_HEADER_LEN - TUNNEL_OVERHEAD;
/// A pair session never closes for being idle: the pair lives as long as both peers
/// are registered (probes keep its paths measured and NAT mappings open).
const PAIR_IDLE_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);
/// A pair's client counts a flow that never got data back as gone after 30 s idle (the
/// server side only answers probes): an empty datagram this often keeps it.
pub const PAIR_KEEPALIVE: Duration = Duration::from_secs(20);
/// The "application" of a pair's client: it has one.
const PAIR_APP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 1);

/// Whether the hub's relay carries a copy while a direct path is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RelayMode {
    /// Only while no direct path is up.
    #[default]
    Fallback,
    /// Always: one more redundant path, first copy wins.
    Always,
}

/// When a peer asks the hub to introduce it to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConnectMode {
    /// At the first packet for that peer.
    #[default]
    OnDemand,
    /// To every listed peer that has a mesh socket, at once.
    Always,
}

pub struct MeshConfig {
    pub name: String,
    /// The local address of each mesh socket (its index is the socket's).
    pub sockets: Vec<SocketAddr>,
    pub relay: RelayMode,
    pub connect: ConnectMode,
}

/// Where a datagram of the mesh comes from or goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshAddr {
    /// Through the hub, from or to this peer.
    Relay(u32),
    /// Mesh socket `socket`, from or to `addr`.
    Direct { socket: usize, addr: SocketAddr },
}

/// How another peer is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Via {
    Direct,
    Relay,
}

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Direct => "direct",
            Self::Relay => "relay",
        })
    }
}

/// What the driver logs: a pair's way changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeshEvent {
    /// The hub introduced us to `peer`; we punch.
    Introduced { peer: String },
    /// `peer` is reached directly (first at `remote`).
    Direct { peer: String, remote: SocketAddr },
    /// `peer` is reached through the hub's relay only.
    Relay { peer: String },
}

/// One direct path of a pair, as `mpvpn status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeshPathStatus {
    pub local: String,
    pub remote: String,
    pub state: PathState,
    pub rtt_ms: Option<f64>,
    pub loss_up: Option<f64>,
    pub loss_down: Option<f64>,
}

/// Dropped and counted.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MeshDrops {
    /// Not a mesh datagram, or one that does not parse.
    pub malformed: u64,
    /// For no pair we have (a session we do not know, an init naming nobody).
    pub unknown: u64,
    /// From a place that is none of the pair's paths, or did not open.
    pub unauthenticated: u64,
    /// Later copies of a datagram that already arrived on another path (the relay and a
    /// direct path both carry some), or too old for the replay window: normal.
    #[serde(default)]
    pub duplicate: u64,
    /// An IP packet whose source is not the sending peer's.
    pub spoofed_source: u64,
    pub queue_full: u64,
}

impl MeshDrops {
    /// A datagram one of the pair's cores dropped.
    fn count(&mut self, why: common::stats::DropReason) {
        use common::stats::DropReason;
        match why {
            DropReason::Duplicate | DropReason::TooOld => self.duplicate += 1,
            _ => self.unauthenticated += 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// Our client's session (answers come back on it).
    Client,
    /// Their client's session with our server (their data arrives on it).
    Server,
}

struct Pair {
    name: String,
    addr: Ipv4Addr,
    routes: Vec<Prefix>,
    candidates: Vec<SocketAddr>,
    psk: Psk,
    client: Client,
    server: Server,
    /// Client path `i >= 1` goes from mesh socket `direct[i - 1].0` to `direct[i - 1].1`.
    direct: Vec<(usize, SocketAddr)>,
    client_session: Option<SessionId>,
    established: bool,
    /// The link carries the pair's packets since our client first got through: from
    /// then on they stay on it (also while the client starts over), so they never
    /// overtake each other on two ways.
    in_use: bool,
    /// Client paths an authenticated answer came back on lately.
    up: PathMask,
    /// Their client's session with our server (the latest), and whether it has a live
    /// direct path: then our data can go back on it when our own client has none (their
    /// NAT maps a new port for us that no candidate names: a symmetric NAT).
    server_slot: Option<common::server::SessionSlot>,
    server_direct: bool,
    /// Which mesh socket each address their client reached our server from came in on
    /// (the latest `MAX_PATHS`): answers go back out of it.
    server_sockets: VecDeque<(SocketAddr, usize)>,
    /// Per client path: the earliest the punch may send there again.
    next_punch: Vec<Instant>,
    /// The client paths paused now (`refresh_paused`).
    paused: PathMask,
    punch_until: Option<Instant>,
    retry_at: Option<Instant>,
    link: KcpLink,
    /// When our client last sent data (`PAIR_KEEPALIVE`).
    last_data: Instant,
    /// When the last IP packet from the pair arrived.
    last_rx: Option<Instant>,
    /// The way last told (`MeshEvent`); `None`: not yet.
    reported: Option<Via>,
    tx_bytes: u64,
    rx_bytes: u64,
}

impl Pair {
    fn direct_up(&self) -> bool {
        self.up.0 & !1 != 0
    }

    fn via(&self) -> Via {
        if self.established && (self.direct_up() || self.server_direct) {
            Via::Direct
        } else {
            Via::Relay
        }
    }

    /// Our server's live direct paths back to their client (not the relay's).
    fn server_direct_paths(&self, now: Instant) -> PathMask {
        let Some(slot) = self.server_slot else { return PathMask::EMPTY };
        let mut out = PathMask::EMPTY;
        for i in self.server.live_paths(now, slot).iter() {
            if self.server.path_addr(slot, i).is_some_and(|a| !is_relay_addr(a)) {
                out.insert(i);
            }
        }
        out
    }

    /// A client's session starts with the first datagram of its application: an empty
    /// one (their server takes it and passes nothing on).
    fn open_session(&mut self, now: Instant) {
        let mut buf = [0u8; DATA_PAYLOAD_OFFSET + common::wire::AEAD_TAG_LEN];
        let _ = self.client.handle_app_datagram(now, PAIR_APP, &mut buf, 0);
    }

    fn start_punch(&mut self, now: Instant) {
        if self.direct.is_empty() {
            return;
        }
        self.punch_until = Some(now + PUNCH_WINDOW);
        self.retry_at = None;
        self.next_punch.iter_mut().for_each(|t| *t = now);
    }

    /// Pauses, in our client, the direct paths that are not up and not due a punch now
    /// (outside a punch window, or within `PUNCH_INTERVAL` of the last): they get no
    /// datagram, and their trackers count only the probes that went out.
    fn refresh_paused(&mut self, now: Instant) {
        let punching = self.punch_until.is_some_and(|t| now < t);
        let mut paused = PathMask::EMPTY;
        for i in 1..=self.direct.len() {
            let due = punching && self.next_punch.get(i).is_some_and(|&t| now >= t);
            if !self.up.contains(i) && !due {
                paused.insert(i);
            }
        }
        self.paused = paused;
        self.client.set_paused_paths(paused);
    }

    /// Our client sent on `paths`: the ones being punched wait `PUNCH_INTERVAL`.
    fn punched(&mut self, now: Instant, paths: PathMask) {
        for i in paths.iter().filter(|&i| i != RELAY_PATH && !self.up.contains(i)) {
            if let Some(t) = self.next_punch.get_mut(i) {
                *t = now + PUNCH_INTERVAL;
            }
        }
        self.refresh_paused(now);
    }

    /// Which of `paths` data may go on.
    fn data_paths(&self, relay: RelayMode, paths: PathMask) -> PathMask {
        let mut out = PathMask::EMPTY;
        for i in paths.iter() {
            let take =
                if i == RELAY_PATH { relay == RelayMode::Always || !self.direct_up() } else { self.up.contains(i) };
            if take {
                out.insert(i);
            }
        }
        if out.is_empty() {
            out.insert(RELAY_PATH);
        }
        out
    }

    fn path_of(&self, from: MeshAddr) -> Option<usize> {
        match from {
            MeshAddr::Relay(_) => Some(RELAY_PATH),
            MeshAddr::Direct { socket, addr } => {
                self.direct.iter().position(|&(s, a)| s == socket && a == addr).map(|i| i + 1)
            }
        }
    }

    fn source_allowed(&self, src: IpAddr) -> bool {
        match src {
            IpAddr::V4(a) => a == self.addr || self.routes.iter().any(|r| r.contains(a)),
            IpAddr::V6(a) => ip::v4_of(a) == Some(self.addr),
        }
    }
}

/// The mesh of one peer. See the module docs.
pub struct Mesh {
    cfg: MeshConfig,
    /// By the other peer's id.
    pairs: BTreeMap<u32, Pair>,
    /// Every live session of every pair, both sides.
    sessions: HashMap<SessionId, (u32, Side)>,
    /// The other peers of the latest list, by id.
    listed: BTreeMap<u32, PeerEntry>,
    /// Introductions asked for, and when.
    asked: HashMap<u32, Instant>,
    intro_requests: VecDeque<u32>,
    /// Answers of our servers (handshake responses, probe replies), to whom.
    replies: VecDeque<(MeshAddr, Vec<u8>)>,
    to_tun: PacketQueue,
    /// Where the pair links' messages are taken.
    inner_buf: Vec<u8>,
    entropy: Box<dyn Entropy>,
    /// The wall clock at `epoch` (pair sessions' inits carry it).
    epoch: Instant,
    wall_at_epoch_ms: u64,
    /// Where `poll_transmit` starts: pairs take turns.
    next_pair: u32,
    pub drops: MeshDrops,
}

/// The address a pair's server knows the relay path by: in 100::/64, which is never
/// anybody's.
fn relay_addr(peer_id: u32) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, (peer_id >> 16) as u16, peer_id as u16)), 0)
}

fn is_relay_addr(a: SocketAddr) -> bool {
    matches!(a.ip(), IpAddr::V6(v6) if v6.segments()[..6] == [0x100, 0, 0, 0, 0, 0])
}

/// The KCP conversation of a pair: from its key, so both sides agree and a new
/// introduction never meets an old link.
fn pair_conv(key: &[u8; 32]) -> u32 {
    u32::from_be_bytes([key[0], key[1], key[2], key[3]])
}

impl Mesh {
    pub fn new(cfg: MeshConfig, now: Instant, wall_ms: u64, entropy: Box<dyn Entropy>) -> Self {
        Self {
            cfg,
            pairs: BTreeMap::new(),
            sessions: HashMap::new(),
            listed: BTreeMap::new(),
            asked: HashMap::new(),
            intro_requests: VecDeque::new(),
            replies: VecDeque::new(),
            to_tun: PacketQueue::default(),
            inner_buf: vec![0; 65536],
            entropy,
            epoch: now,
            wall_at_epoch_ms: wall_ms,
            next_pair: 0,
            drops: MeshDrops::default(),
        }
    }

    pub fn socket_count(&self) -> usize {
        self.cfg.sockets.len()
    }

    fn wall_ms(&self, now: Instant) -> u64 {
        self.wall_at_epoch_ms + now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Our registration changed (a new one, or the hub was lost): the pairs were bound
    /// to the old one.
    pub fn reset(&mut self) {
        self.pairs.clear();
        self.sessions.clear();
        self.listed.clear();
        self.asked.clear();
        self.intro_requests.clear();
        self.replies.clear();
    }

    /// The hub's latest peer list (`own` is our id). Pairs whose peer left or registered
    /// again go; a pair whose candidates changed rebuilds its paths and punches again.
    pub fn set_peer_list(&mut self, now: Instant, own: u32, list: &[PeerEntry]) {
        self.listed = list.iter().filter(|p| p.id != own).map(|p| (p.id, p.clone())).collect();
        let gone: Vec<u32> = self.pairs.keys().copied().filter(|id| !self.listed.contains_key(id)).collect();
        for id in gone {
            self.remove_pair(id);
        }
        let changed: Vec<u32> = self
            .pairs
            .iter()
            .filter(|(id, p)| {
                let e = &self.listed[id];
                e.candidates != p.candidates || e.routes != p.routes || e.addr != p.addr
            })
            .map(|(id, _)| *id)
            .collect();
        for id in changed {
            let e = &self.listed[&id];
            let wall = self.wall_ms(now);
            let Some(p) = self.pairs.get_mut(&id) else { continue };
            p.addr = e.addr;
            p.routes = e.routes.clone();
            if p.candidates != e.candidates {
                // new paths: a new client (a handshake on the relay, a punch on the rest);
                // the link above keeps its state
                p.candidates = e.candidates.clone();
                if let Some(old) = p.client_session.take() {
                    self.sessions.remove(&old);
                }
                p.direct = direct_paths(&self.cfg.sockets, &p.candidates);
                p.next_punch = vec![now; p.direct.len() + 1];
                p.client = pair_client(&p.psk, &self.cfg.name, &p.direct, now, wall, self.entropy.fork());
                p.established = false;
                p.up = PathMask::EMPTY;
                p.start_punch(now);
                p.open_session(now);
                Self::drain_client_events(&mut self.sessions, now, id, p);
            }
        }
        if self.cfg.connect == ConnectMode::Always {
            let ids: Vec<u32> = self.listed.values().filter(|e| !e.candidates.is_empty()).map(|e| e.id).collect();
            for id in ids {
                self.want(now, id);
            }
        }
    }

    /// We have traffic for peer `id`: ask the hub to introduce us, unless a pair exists or
    /// we asked within `INTRO_RETRY`.
    pub fn want(&mut self, now: Instant, id: u32) {
        if self.pairs.contains_key(&id) || self.listed.get(&id).is_none_or(|e| e.candidates.is_empty()) {
            return;
        }
        if self.asked.get(&id).is_some_and(|&t| now < t + INTRO_RETRY) {
            return;
        }
        self.asked.insert(id, now);
        self.intro_requests.push_back(id);
    }

    /// The next introduction to ask the hub for.
    pub fn poll_intro_request(&mut self) -> Option<u32> {
        self.intro_requests.pop_front()
    }

    /// The hub introduced us to a listed peer: a fresh pair (both sides get the
    /// introduction at once, so both start over together), and a punch.
    pub fn on_intro(&mut self, now: Instant, intro: &IntroRepr) {
        let Some(e) = self.listed.get(&intro.peer_id).cloned() else {
            self.drops.unknown += 1; // not (yet) in our list: it will ask again
            return;
        };
        self.remove_pair(intro.peer_id);
        self.asked.remove(&intro.peer_id);
        let psk = Psk::from_bytes(intro.key);
        let direct = direct_paths(&self.cfg.sockets, &e.candidates);
        let wall = self.wall_ms(now);
        let client = pair_client(&psk, &self.cfg.name, &direct, now, wall, self.entropy.fork());
        let server = Server::new(
            psk.clone(),
            ServerCoreConfig {
                default_target: None,
                targets: [(e.name.clone(), PAIR_APP)].into_iter().collect(),
                ciphers: vec![Cipher::Aes256Gcm, Cipher::ChaCha20Poly1305],
                // their client may start over while its old session lingers
                max_sessions: 4,
                max_paths_per_session: MAX_PATHS,
                session_timeout: Duration::from_secs(30),
            },
            now,
            wall,
            self.entropy.fork(),
        );
        let mut pair = Pair {
            name: e.name.clone(),
            addr: e.addr,
            routes: e.routes.clone(),
            candidates: e.candidates.clone(),
            psk,
            client,
            server,
            next_punch: vec![now; direct.len() + 1],
            paused: PathMask::EMPTY,
            direct,
            client_session: None,
            established: false,
            in_use: false,
            up: PathMask::EMPTY,
            server_slot: None,
            server_direct: false,
            server_sockets: VecDeque::new(),
            punch_until: None,
            retry_at: None,
            link: KcpLink::new(pair_conv(&intro.key), now, PAIR_PAYLOAD + SEALED_OVERHEAD),
            last_data: now,
            last_rx: None,
            reported: None,
            tx_bytes: 0,
            rx_bytes: 0,
        };
        pair.start_punch(now);
        pair.open_session(now);
        Self::drain_client_events(&mut self.sessions, now, intro.peer_id, &mut pair);
        self.pairs.insert(intro.peer_id, pair);
    }

    fn remove_pair(&mut self, id: u32) {
        if self.pairs.remove(&id).is_some() {
            self.sessions.retain(|_, (p, _)| *p != id);
        }
    }

    /// Whether IP packets for peer `id` go over its pair (its session came up, on the
    /// relay at least); otherwise they go through the hub as before.
    pub fn is_ready(&self, id: u32) -> bool {
        self.pairs.get(&id).is_some_and(|p| p.in_use && !p.link.is_broken())
    }

    /// How peer `id` is reached: directly while one of the pair's direct paths is up.
    pub fn via(&self, id: u32) -> Via {
        self.pairs.get(&id).map_or(Via::Relay, Pair::via)
    }

    /// The next change worth a log line: an introduction, a pair going direct or back
    /// to the relay.
    pub fn poll_event(&mut self) -> Option<MeshEvent> {
        for p in self.pairs.values_mut() {
            let via = p.via();
            if p.reported == Some(via) {
                continue;
            }
            let first = p.reported.is_none();
            p.reported = Some(via);
            let peer = p.name.clone();
            return Some(match via {
                Via::Direct => {
                    let remote = p.up.iter().find_map(|i| p.direct.get(i.checked_sub(1)?)).map(|&(_, a)| a);
                    MeshEvent::Direct { peer, remote: remote.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))) }
                }
                Via::Relay if first => MeshEvent::Introduced { peer },
                Via::Relay => MeshEvent::Relay { peer },
            });
        }
        None
    }

    /// Sends an IP packet to peer `id` over its pair (`is_ready`).
    pub fn send_ip(&mut self, id: u32, packet: &[u8]) -> Result<(), LinkError> {
        let p = self.pairs.get_mut(&id).ok_or(LinkError::Broken)?;
        p.link.send_ip(packet)?;
        p.tx_bytes += packet.len() as u64;
        Ok(())
    }

    /// One datagram of the mesh (from a mesh socket, or relayed by the hub), opened in
    /// place in `d`.
    pub fn handle_datagram(&mut self, now: Instant, from: MeshAddr, d: &mut [u8]) {
        match message_type(d) {
            Ok(TYPE_HANDSHAKE_INIT) => self.on_init(now, from, d),
            Ok(TYPE_HANDSHAKE_RESP) => match HandshakeRespRepr::parse(d) {
                Ok(r) => self.on_client_datagram(now, r.session, from, d),
                Err(_) => self.drops.malformed += 1,
            },
            Ok(TYPE_TRANSPORT) => {
                let Ok(t) = TransportPacket::new_checked(&d[..]) else {
                    self.drops.malformed += 1;
                    return;
                };
                match self.sessions.get(&t.session_id()) {
                    Some(&(_, Side::Client)) => self.on_client_datagram(now, t.session_id(), from, d),
                    Some(&(id, Side::Server)) => self.on_server_datagram(now, id, from, d),
                    None => self.drops.unknown += 1,
                }
            }
            _ => self.drops.malformed += 1,
        }
    }

    /// An init of their client: its target field is the sender's name, which picks the
    /// pair (and so the key its MAC must verify under).
    fn on_init(&mut self, now: Instant, from: MeshAddr, d: &mut [u8]) {
        let Ok((init, _)) = HandshakeInitRepr::parse(d) else {
            self.drops.malformed += 1;
            return;
        };
        let Some((&id, _)) = self.pairs.iter().find(|(_, p)| p.name == init.target) else {
            self.drops.unknown += 1;
            return;
        };
        self.on_server_datagram(now, id, from, d);
    }

    fn on_server_datagram(&mut self, now: Instant, id: u32, from: MeshAddr, d: &mut [u8]) {
        let Some(p) = self.pairs.get_mut(&id) else { return };
        let addr = match from {
            MeshAddr::Relay(r) if r == id => relay_addr(r),
            MeshAddr::Relay(_) => {
                self.drops.unauthenticated += 1;
                return;
            }
            MeshAddr::Direct { addr, socket } => {
                if !p.server_sockets.iter().any(|&(a, s)| (a, s) == (addr, socket)) {
                    p.server_sockets.retain(|&(a, _)| a != addr);
                    if p.server_sockets.len() >= MAX_PATHS {
                        p.server_sockets.pop_front();
                    }
                    p.server_sockets.push_back((addr, socket));
                }
                addr
            }
        };
        let mut out = [0u8; HANDSHAKE_RESP_LEN];
        match p.server.handle_datagram(now, addr, d, &mut out) {
            ServerRecv::Reply { len } => self.replies.push_back((from, out[..len].to_vec())),
            ServerRecv::Forward { payload, .. } => {
                Self::link_input(&mut self.drops, now, p, &d[payload]);
                self.take_messages(now, id);
            }
            ServerRecv::Dropped(why) => self.drops.count(why),
        }
        let Some(p) = self.pairs.get_mut(&id) else { return };
        while let Some(ev) = p.server.poll_event() {
            match ev {
                ServerEvent::SessionOpened { id: s, slot, .. } => {
                    self.sessions.insert(s, (id, Side::Server));
                    p.server_slot = Some(slot);
                }
                ServerEvent::SessionClosed { id: s, slot } => {
                    self.sessions.remove(&s);
                    if p.server_slot == Some(slot) {
                        p.server_slot = None;
                    }
                }
                _ => {}
            }
        }
    }

    fn on_client_datagram(&mut self, now: Instant, session: SessionId, from: MeshAddr, d: &mut [u8]) {
        let Some(&(id, _)) = self.sessions.get(&session) else {
            self.drops.unknown += 1;
            return;
        };
        let Some(p) = self.pairs.get_mut(&id) else { return };
        let path = match from {
            MeshAddr::Relay(r) if r != id => None,
            _ => p.path_of(from),
        };
        let Some(path) = path else {
            self.drops.unauthenticated += 1;
            return;
        };
        match p.client.handle_path_datagram(now, path, d) {
            // their data, sent back on our client's session (see `server_direct`)
            ClientRecv::Deliver { payload, .. } => {
                Self::link_input(&mut self.drops, now, p, &d[payload]);
                Self::drain_client_events(&mut self.sessions, now, id, p);
                self.take_messages(now, id);
                return;
            }
            ClientRecv::Consumed => {}
            ClientRecv::Dropped(why) => self.drops.count(why),
        }
        Self::drain_client_events(&mut self.sessions, now, id, p);
    }

    /// A datagram of their client's data: a KCP segment for the pair's link.
    fn link_input(drops: &mut MeshDrops, now: Instant, p: &mut Pair, datagram: &[u8]) {
        match datagram.split_first() {
            // the empty datagram that opens a session or keeps it
            None => {}
            Some((&crate::wire::sealed_kind::KCP, seg)) => {
                if p.link.input(now, seg).is_err() {
                    drops.malformed += 1;
                }
            }
            _ => drops.malformed += 1,
        }
    }

    /// Follows our client's events: its session ids, whether it is established, which
    /// paths are up; the loss of the last direct path starts a punch.
    fn drain_client_events(sessions: &mut HashMap<SessionId, (u32, Side)>, now: Instant, id: u32, p: &mut Pair) {
        let now_up = p.direct_up();
        let mut reopen = false;
        while let Some(ev) = p.client.poll_event() {
            match ev {
                ClientEvent::SessionStarted { id: s, .. } => {
                    if let Some(old) = p.client_session.replace(s) {
                        // started over (their side restarted or lost us): the direct
                        // paths must prove themselves again, so they get a punch window
                        sessions.remove(&old);
                        p.start_punch(now);
                    }
                    sessions.insert(s, (id, Side::Client));
                    p.established = false;
                    p.up = PathMask::EMPTY;
                }
                ClientEvent::Established { .. } => {
                    p.established = true;
                    p.in_use = true;
                }
                ClientEvent::PathUp { path, .. } => p.up.insert(path),
                ClientEvent::PathDown { path, .. } => p.up.0 &= !(1u32 << path),
                ClientEvent::ServerLost { old, .. } => {
                    sessions.remove(&old);
                    p.established = false;
                }
                ClientEvent::SessionClosed { id: s, .. } | ClientEvent::SessionEvicted { id: s, .. } => {
                    sessions.remove(&s);
                    p.client_session = None;
                    p.established = false;
                    reopen = true;
                }
                ClientEvent::Refused { .. } => {}
            }
        }
        if reopen {
            p.open_session(now);
            p.start_punch(now);
        }
        if now_up && !p.direct_up() {
            // every direct path went down (an expired NAT mapping, a new address): punch
            // again now rather than in a minute
            p.start_punch(now);
        }
        p.refresh_paused(now);
    }

    /// Takes the complete messages of pair `id`'s link.
    fn take_messages(&mut self, now: Instant, id: u32) {
        if let Some(p) = self.pairs.get_mut(&id) {
            Self::take_messages_of(p, now, &mut self.inner_buf, &mut self.to_tun, &mut self.drops);
        }
    }

    /// Takes pair `p`'s complete messages (through `inner_buf`): IP packets from its
    /// peer's addresses go to `to_tun`.
    fn take_messages_of(
        p: &mut Pair,
        now: Instant,
        inner_buf: &mut [u8],
        to_tun: &mut PacketQueue,
        drops: &mut MeshDrops,
    ) {
        while let Some(n) = p.link.recv(now, inner_buf) {
            let m = &inner_buf[..n];
            if m.first() != Some(&INNER_IP) {
                drops.malformed += 1;
                continue;
            }
            let packet = &m[field::inner::BODY..];
            match ip::addresses(packet) {
                Some((src, _)) if p.source_allowed(src) => {
                    p.rx_bytes += packet.len() as u64;
                    p.last_rx = Some(now);
                    to_tun.push(&[packet]);
                }
                Some(_) => drops.spoofed_source += 1,
                None => drops.malformed += 1,
            }
        }
    }

    /// The next datagram of the mesh, built in `out` (at least 64 KiB); `to` gets every
    /// place to send `out[..len]` to. Returns the length.
    pub fn poll_transmit(&mut self, now: Instant, out: &mut [u8], to: &mut Vec<MeshAddr>) -> Option<usize> {
        to.clear();
        if let Some((dest, d)) = self.replies.pop_front() {
            out[..d.len()].copy_from_slice(&d);
            to.push(dest);
            return Some(d.len());
        }
        // pairs take turns, a datagram each: from the one after the last served, then
        // from the start
        let start = self.next_pair;
        let (sessions, drops, relay) = (&mut self.sessions, &mut self.drops, self.cfg.relay);
        for (&id, p) in self.pairs.range_mut(start..) {
            if let Some(len) = Self::poll_pair(sessions, drops, relay, now, id, p, out, to) {
                self.next_pair = id.wrapping_add(1);
                return Some(len);
            }
        }
        for (&id, p) in self.pairs.range_mut(..start) {
            if let Some(len) = Self::poll_pair(sessions, drops, relay, now, id, p, out, to) {
                self.next_pair = id.wrapping_add(1);
                return Some(len);
            }
        }
        None
    }

    /// The next datagram of one pair: our client's own (inits, probes) or a segment of
    /// the link.
    #[allow(clippy::too_many_arguments)]
    fn poll_pair(
        sessions: &mut HashMap<SessionId, (u32, Side)>,
        drops: &mut MeshDrops,
        relay: RelayMode,
        now: Instant,
        id: u32,
        p: &mut Pair,
        out: &mut [u8],
        to: &mut Vec<MeshAddr>,
    ) -> Option<usize> {
        p.refresh_paused(now);
        if let Some(t) = p.client.poll_transmit(now, out) {
            p.punched(now, t.paths);
            Self::drain_client_events(sessions, now, id, p);
            Self::fill_dests(p, id, t.paths, to);
            return Some(t.len);
        }
        if !p.established {
            return None;
        }
        let n = match p.link.poll_transmit(&mut out[DATA_PAYLOAD_OFFSET..DATA_PAYLOAD_OFFSET + PAIR_PAYLOAD]) {
            Some(n) => n,
            // nothing to send for a while: an empty datagram keeps the session
            None if now >= p.last_data + PAIR_KEEPALIVE => 0,
            None => return None,
        };
        p.last_data = now;
        // our client has no direct path, but their client reaches our server directly:
        // back on that path (where their NAT let them out), sealed in their session
        if relay == RelayMode::Fallback && !p.direct_up() {
            let back = p.server_direct_paths(now);
            if let (false, Some(slot)) = (back.is_empty(), p.server_slot) {
                if let Some((len, paths)) = p.server.encapsulate(now, slot, out, n) {
                    for i in paths.iter().filter(|&i| back.contains(i)) {
                        let Some(addr) = p.server.path_addr(slot, i) else { continue };
                        if let Some(&(_, socket)) = p.server_sockets.iter().find(|(a, _)| *a == addr) {
                            to.push(MeshAddr::Direct { socket, addr });
                        }
                    }
                    if !to.is_empty() {
                        return Some(len);
                    }
                }
            }
        }
        match p.client.handle_app_datagram(now, PAIR_APP, out, n) {
            ClientSend::Sealed { len, paths } => {
                let paths = p.data_paths(relay, paths);
                Self::fill_dests(p, id, paths, to);
                Some(len)
            }
            ClientSend::Queued => None,
            ClientSend::Dropped(_) => {
                drops.queue_full += 1;
                None
            }
        }
    }

    fn fill_dests(p: &Pair, id: u32, paths: PathMask, to: &mut Vec<MeshAddr>) {
        for i in paths.iter() {
            if i == RELAY_PATH {
                to.push(MeshAddr::Relay(id));
            } else if let Some(&(socket, addr)) = p.direct.get(i - 1) {
                to.push(MeshAddr::Direct { socket, addr });
            }
        }
    }

    /// Next IP packet from another peer for the TUN, into `out`.
    pub fn poll_tun(&mut self, out: &mut [u8]) -> Option<usize> {
        self.to_tun.pop_into(out)
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pairs
            .values()
            .flat_map(|p| {
                [
                    p.client.poll_timeout(),
                    Some(p.server.poll_timeout()),
                    Some(p.link.poll_timeout()),
                    p.punch_until,
                    p.retry_at,
                    p.established.then_some(p.last_data + PAIR_KEEPALIVE),
                ]
            })
            .flatten()
            .min()
    }

    /// Runs the pairs' timers; `wall_ms` is the wall clock now (new sessions' inits
    /// carry it).
    pub fn handle_timeout(&mut self, now: Instant, wall_ms: u64) {
        self.epoch = now;
        self.wall_at_epoch_ms = wall_ms;
        let mut broken = Vec::new();
        for (&id, p) in self.pairs.iter_mut() {
            p.refresh_paused(now);
            p.client.handle_timeout(now);
            p.server.handle_timeout(now);
            while let Some(ev) = p.server.poll_event() {
                if let ServerEvent::SessionClosed { id: s, slot } = ev {
                    self.sessions.remove(&s);
                    if p.server_slot == Some(slot) {
                        p.server_slot = None;
                    }
                }
            }
            p.server_direct = !p.server_direct_paths(now).is_empty();
            Self::drain_client_events(&mut self.sessions, now, id, p);
            p.link.handle_timeout(now);
            // also what finds a message stuck without its last fragment
            Self::take_messages_of(p, now, &mut self.inner_buf, &mut self.to_tun, &mut self.drops);
            if p.link.is_broken() {
                broken.push(id);
                continue;
            }
            if p.punch_until.is_some_and(|t| now >= t) {
                p.punch_until = None;
                if !p.direct_up() {
                    p.retry_at = Some(now + PUNCH_RETRY);
                }
            }
            if p.retry_at.is_some_and(|t| now >= t) {
                p.start_punch(now);
            }
        }
        // a link that broke starts over with a new introduction (the next packet asks)
        for id in broken {
            self.remove_pair(id);
        }
    }

    /// The direct paths of the pair with peer `id`, for status.
    pub fn paths(&self, now: Instant, id: u32) -> Vec<MeshPathStatus> {
        let Some(p) = self.pairs.get(&id) else { return Vec::new() };
        let report = p.client.status(now, "");
        let Some(s) = report.sessions.first() else { return Vec::new() };
        p.direct
            .iter()
            .zip(s.paths.iter().skip(1))
            .enumerate()
            .map(|(k, (&(socket, remote), st))| MeshPathStatus {
                local: self.cfg.sockets.get(socket).map_or_else(String::new, |a| a.to_string()),
                remote: remote.to_string(),
                // a path left alone between punches is not being probed: it is down
                state: if p.paused.contains(k + 1) && st.state == PathState::Probing {
                    PathState::Down
                } else {
                    st.state
                },
                rtt_ms: st.rtt_ms,
                loss_up: st.loss_up,
                loss_down: st.loss_down,
            })
            .collect()
    }

    /// Bytes of IP packets sent to and received from peer `id` over its pair, and when
    /// the last one arrived.
    pub fn traffic(&self, id: u32) -> (u64, u64, Option<Instant>) {
        self.pairs.get(&id).map_or((0, 0, None), |p| (p.tx_bytes, p.rx_bytes, p.last_rx))
    }
}

/// The host candidates of mesh sockets bound to `locals`, on a host whose interfaces
/// have `interfaces` (name, address): a socket bound to one address is reachable there;
/// one bound to the wildcard on every address of its family but loopback, link-local and
/// the VPN's own (on `tun`).
pub fn host_candidates(locals: &[SocketAddr], interfaces: &[(String, IpAddr)], tun: &str) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for local in locals {
        if !local.ip().is_unspecified() {
            out.push(*local);
            continue;
        }
        for (name, ip) in interfaces {
            let link_local = match ip {
                IpAddr::V4(a) => a.is_link_local(),
                IpAddr::V6(a) => (a.segments()[0] & 0xffc0) == 0xfe80,
            };
            let candidate = SocketAddr::new(*ip, local.port());
            if name != tun
                && !ip.is_loopback()
                && !link_local
                && ip.is_ipv4() == local.is_ipv4()
                && !out.contains(&candidate)
            {
                out.push(candidate);
            }
        }
    }
    out
}

/// Every (mesh socket × candidate) of the same address family, at most
/// `MAX_DIRECT_PATHS`.
pub fn direct_paths(sockets: &[SocketAddr], candidates: &[SocketAddr]) -> Vec<(usize, SocketAddr)> {
    sockets
        .iter()
        .enumerate()
        .flat_map(|(i, s)| candidates.iter().filter(|c| c.is_ipv4() == s.is_ipv4()).map(move |&c| (i, c)))
        .take(MAX_DIRECT_PATHS)
        .collect()
}

fn pair_client(
    psk: &Psk,
    our_name: &str,
    direct: &[(usize, SocketAddr)],
    now: Instant,
    wall_ms: u64,
    entropy: Box<dyn Entropy>,
) -> Client {
    let mut path_names = vec!["relay".to_string()];
    path_names.extend(direct.iter().map(|(s, a)| format!("{s}:{a}")));
    Client::new(
        psk.clone(),
        ClientCoreConfig {
            cipher: Cipher::Aes256Gcm,
            // their server finds the pair by our name
            target: our_name.to_string(),
            path_names,
            session_idle_timeout: PAIR_IDLE_TIMEOUT,
            max_sessions: 1,
        },
        now,
        wall_ms,
        entropy,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pair's datagram, relayed, still fits one datagram of the tunnel to the hub; and
    /// a full-sized packet takes two KCP segments.
    #[test]
    fn pair_datagrams_fit_the_relay() {
        assert_eq!(PAIR_PAYLOAD + TUNNEL_OVERHEAD + RELAY_HEADER_LEN + SEALED_OVERHEAD, crate::TUNNEL_PAYLOAD);
        let link = KcpLink::new(1, Instant::now(), PAIR_PAYLOAD + SEALED_OVERHEAD);
        assert_eq!(link.mss(), 1345);
        assert_eq!((1 + crate::TUN_MTU as usize).div_ceil(link.mss()), 2);
    }

    /// A pair that hears nothing at all (relay and direct paths dead) never asks to be
    /// woken in the past: the driver would spin.
    #[test]
    fn a_silent_pair_never_spins() {
        let now0 = Instant::now();
        let cfg = MeshConfig {
            name: "a".into(),
            sockets: vec!["0.0.0.0:5100".parse().unwrap()],
            relay: RelayMode::Fallback,
            connect: ConnectMode::Always,
        };
        let mut mesh = Mesh::new(cfg, now0, 1_800_000_000_000, Box::new(common::sim::SimEntropy::new(1)));
        let b = PeerEntry {
            id: 2,
            name: "b".into(),
            addr: Ipv4Addr::new(10, 99, 0, 3),
            routes: vec![],
            candidates: vec!["198.51.100.2:5100".parse().unwrap()],
        };
        mesh.set_peer_list(now0, 1, &[b]);
        assert_eq!(mesh.poll_intro_request(), Some(2));
        mesh.on_intro(now0, &IntroRepr { peer_id: 2, key: [5; 32] });
        let (mut out, mut to) = (vec![0u8; 65536], Vec::new());
        let mut now = now0;
        let mut wakeups = 0;
        while now < now0 + Duration::from_secs(90) {
            mesh.handle_timeout(now, 1_800_000_000_000 + (now - now0).as_millis() as u64);
            while mesh.poll_transmit(now, &mut out, &mut to).is_some() {}
            let next = mesh.poll_timeout().expect("a pair has timers");
            assert!(next > now, "asked to be woken at {:?}, now {:?}", next - now0, now - now0);
            now = next;
            wakeups += 1;
        }
        // probes on the relay path, its retries, KCP's timer: a few per second, not a spin
        assert!(wakeups < 90 * 100, "{wakeups} wake-ups in 90 s");
    }

    #[test]
    fn host_candidates_are_this_hosts_reachable_addresses() {
        let ifs: Vec<(String, IpAddr)> = [
            ("lo", "127.0.0.1"),
            ("eth0", "192.0.2.10"),
            ("eth0", "fe80::1"),
            ("eth0", "2001:db8::10"),
            ("wlan0", "169.254.3.3"),
            ("wlan0", "10.1.1.5"),
            ("mpvpn0", "10.99.0.2"),
        ]
        .iter()
        .map(|(n, a)| (n.to_string(), a.parse().unwrap()))
        .collect();
        let any4: Vec<SocketAddr> = vec!["0.0.0.0:5100".parse().unwrap()];
        let want: Vec<SocketAddr> = vec!["192.0.2.10:5100".parse().unwrap(), "10.1.1.5:5100".parse().unwrap()];
        assert_eq!(host_candidates(&any4, &ifs, "mpvpn0"), want);
        let any6: Vec<SocketAddr> = vec!["[::]:5101".parse().unwrap()];
        assert_eq!(host_candidates(&any6, &ifs, "mpvpn0"), vec!["[2001:db8::10]:5101".parse::<SocketAddr>().unwrap()]);
        // a socket bound to one address is reachable there only
        let bound: Vec<SocketAddr> = vec!["10.1.1.5:5100".parse().unwrap()];
        assert_eq!(host_candidates(&bound, &ifs, "mpvpn0"), bound);
    }

    #[test]
    fn direct_paths_pair_sockets_and_candidates_of_one_family() {
        let sockets: Vec<SocketAddr> = vec!["0.0.0.0:5100".parse().unwrap(), "[::]:5101".parse().unwrap()];
        let c: Vec<SocketAddr> = vec![
            "198.51.100.2:5100".parse().unwrap(),
            "[2001:db8::2]:5100".parse().unwrap(),
            "10.0.0.2:5100".parse().unwrap(),
        ];
        assert_eq!(direct_paths(&sockets, &c), vec![(0, c[0]), (0, c[2]), (1, c[1])]);
        let many: Vec<SocketAddr> = (0..40).map(|i| SocketAddr::from(([10, 0, 0, i], 1))).collect();
        assert_eq!(direct_paths(&sockets, &many).len(), MAX_DIRECT_PATHS);
    }
}
