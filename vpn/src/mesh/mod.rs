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
//! A pair is the two peers', not the hub's: it is keyed by the other peer's VPN address
//! (which the cluster keeps per name), so it outlives new registrations and moves to
//! other hubs on either side; only the relay path goes through whichever hub we are
//! registered with now.
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
use crate::wire::{self, InnerMessage, IntroRepr, PeerEntry, RELAY_HEADER_LEN, SEALED_OVERHEAD};
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

mod candidates;
mod pair;
mod punch;
mod sessions;
mod transmit;

pub use candidates::{direct_paths, host_candidates, is_host_candidate, listable_host_candidate, unmapped};
use pair::{pair_client, pair_conv, pair_server, relay_addr, Pair, Side};

/// A punch lasts this long ...
pub const PUNCH_WINDOW: Duration = Duration::from_secs(10);
/// ... sending to each direct path that is not up at most this often ...
pub const PUNCH_INTERVAL: Duration = Duration::from_millis(200);
/// ... and, when it found no direct path, is tried again after this.
pub const PUNCH_RETRY: Duration = Duration::from_secs(60);
/// Punch windows a pair starts per `PUNCH_RETRY`, at most.
pub const PUNCH_WINDOWS_PER_RETRY: usize = 3;
/// A pair whose peer is missing from our list lives on this long: while either peer moves
/// to another hub, a list may lack the other for a few seconds. A peer taken out of the
/// network keeps its direct sessions no longer than this.
pub const PAIR_UNLISTED_GRACE: Duration = Duration::from_secs(10);
/// A pair's introduction by the hub of a new registration is asked for again this often
/// until it comes (the other peer may not be registered there yet).
pub const REINTRO_RETRY: Duration = Duration::from_millis(100);
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
/// A pair's client counts a session that never got data back as gone once idle for
/// `common::client::UNREPLIED_IDLE_TIMEOUT` (the server side only answers probes): an
/// empty datagram this often keeps it.
pub const PAIR_KEEPALIVE: Duration = Duration::from_secs(20);
const _: () = assert!(PAIR_KEEPALIVE.as_secs() < common::client::UNREPLIED_IDLE_TIMEOUT.as_secs());
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
    /// How pair sessions spread datagrams over their paths with `RelayMode::Fallback`
    /// (with `Always` every datagram goes on every live path: the relay carries a copy).
    pub redundancy: common::redundancy::RedundancyConfig,
}

impl MeshConfig {
    /// What a pair's client core uses.
    fn pair_redundancy(&self) -> common::redundancy::RedundancyConfig {
        match self.relay {
            RelayMode::Fallback => self.redundancy,
            RelayMode::Always => common::redundancy::RedundancyConfig::default(),
        }
    }
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

crate::drops::drop_reasons! {
    /// Why the mesh dropped a datagram or packet.
    MeshDropReason;
    /// The mesh's drops, by reason.
    MeshDrops {
        /// Not a mesh datagram, or one that does not parse.
        Malformed => malformed,
        /// For no pair we have (a session we do not know, an init naming nobody).
        Unknown => unknown,
        /// From a place that is none of the pair's paths, or did not open.
        Unauthenticated => unauthenticated,
        /// Later copies of a datagram that already arrived on another path (the relay and
        /// a direct path both carry some), or too old for the replay window: normal.
        Duplicate => duplicate,
        /// An IP packet whose source is not the sending peer's.
        SpoofedSource => spoofed_source,
        QueueFull => queue_full,
        /// A pair's session had no live path to send on, or no room for a new one.
        NoPath => no_path,
        /// Handshakes beyond their source's rate.
        RateLimited => rate_limited,
        /// A handshake a pair's server refused, or a message unexpected in its state.
        Refused => refused,
        /// An IP packet from a pair for an address that is not ours nor in our accepted
        /// routes (a pair gets no more of us than the hub would route).
        NoRoute => no_route,
    }
}

impl MeshDrops {
    /// A datagram one of the pair's cores dropped, under the mesh's reason for it.
    fn count_core(&mut self, why: common::stats::DropReason) {
        use common::stats::DropReason as Core;
        self.count(match why {
            Core::Malformed => MeshDropReason::Malformed,
            Core::UnknownSession => MeshDropReason::Unknown,
            Core::BadMac | Core::AuthFailed | Core::ReplayedInit => MeshDropReason::Unauthenticated,
            Core::Duplicate | Core::TooOld => MeshDropReason::Duplicate,
            Core::QueueFull => MeshDropReason::QueueFull,
            Core::NoPath | Core::NoPathSlot => MeshDropReason::NoPath,
            Core::RateLimited => MeshDropReason::RateLimited,
            Core::Refused | Core::Unexpected => MeshDropReason::Refused,
        });
    }
}

/// Our side of a pair's policy: our address and the routes the hub accepted for us (a
/// pair may send us packets for these only), in the VPN network (inside it, a pair may
/// send only from its peer's own address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OwnAddresses {
    pub network: Prefix,
    pub addr: Ipv4Addr,
    pub routes: Vec<Prefix>,
}

impl OwnAddresses {
    fn takes(&self, dst: IpAddr) -> bool {
        ip::destination_of_peer(dst, self.addr, &self.routes)
    }
}

/// The mesh of one peer. See the module docs.
pub struct Mesh {
    cfg: MeshConfig,
    /// By the other peer's id.
    pairs: BTreeMap<u32, Pair>,
    /// Every live session of every pair, both sides.
    sessions: sessions::SessionMap,
    /// The other peers of the latest list, by id.
    listed: BTreeMap<u32, PeerEntry>,
    /// What pairs may send us: our own entry of the latest list, in the VPN network.
    own: Option<OwnAddresses>,
    /// Introductions asked for, and when.
    asked: HashMap<u32, Instant>,
    /// Pairs we have, to be introduced again by the hub of a new registration (which
    /// relays only for pairs it introduced), and when to ask next.
    reintroduce: BTreeMap<u32, Instant>,
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

impl Mesh {
    pub fn new(cfg: MeshConfig, now: Instant, wall_ms: u64, entropy: Box<dyn Entropy>) -> Self {
        Self {
            cfg,
            pairs: BTreeMap::new(),
            sessions: sessions::SessionMap::default(),
            listed: BTreeMap::new(),
            own: None,
            asked: HashMap::new(),
            reintroduce: BTreeMap::new(),
            intro_requests: VecDeque::new(),
            replies: VecDeque::new(),
            to_tun: PacketQueue::default(),
            inner_buf: vec![0; common::wire::MAX_DATAGRAM],
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

    /// Our registration changed (a new one, or the hub was lost): the pairs were bound
    /// to the old one.
    pub fn reset(&mut self) {
        self.pairs.clear();
        self.sessions.clear();
        self.listed.clear();
        self.own = None;
        self.asked.clear();
        self.reintroduce.clear();
        self.intro_requests.clear();
        self.replies.clear();
    }

    /// The hub's latest peer list (`own` is our key) in the VPN `network`, each entry's id
    /// being its peer's key (`peer::mesh_key`: its address, the same on every hub). Pairs
    /// whose peer left go `PAIR_UNLISTED_GRACE` later; a pair whose candidates changed
    /// rebuilds its paths and punches again.
    pub fn set_peer_list(&mut self, now: Instant, own: u32, network: Prefix, list: &[PeerEntry]) {
        // a list that lacks us (a new registration's first) keeps what we had
        if let Some(p) = list.iter().find(|p| p.id == own) {
            self.own = Some(OwnAddresses { network, addr: p.addr, routes: p.routes.clone() });
        }
        self.listed = list.iter().filter(|p| p.id != own).map(|p| (p.id, p.clone())).collect();
        for (id, p) in self.pairs.iter_mut() {
            if self.listed.contains_key(id) {
                p.unlisted_since = None;
            } else {
                p.unlisted_since.get_or_insert(now);
            }
        }
        let changed: Vec<u32> = self
            .pairs
            .iter()
            .filter(|(id, p)| {
                self.listed
                    .get(id)
                    .is_some_and(|e| e.candidates != p.candidates || e.routes != p.routes || e.addr != p.addr)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in changed {
            let e = &self.listed[&id];
            let wall = self.wall_ms(now);
            let Some(p) = self.pairs.get_mut(&id) else { continue };
            p.addr = e.addr;
            p.routes = e.routes.clone();
            // a new registration lists no candidates until the peer tells them: the paths
            // we have stay until it does
            if p.candidates != e.candidates && !e.candidates.is_empty() {
                // new paths: a new client (a handshake on the relay, a punch on the rest);
                // the link above keeps its state
                p.candidates = e.candidates.clone();
                if let Some(old) = p.client_session.take() {
                    self.sessions.unbind(&old, id);
                }
                p.direct = direct_paths(&self.cfg.sockets, &p.candidates);
                p.next_punch = vec![now; p.direct.len() + 1];
                p.client = pair_client(&p.psk, &self.cfg, &p.direct, now, wall, self.entropy.fork());
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
        self.reintroduce.remove(&intro.peer_id);
        // the pair we have, introduced again (by another hub, or at another's asking)
        if self.pairs.get(&intro.peer_id).is_some_and(|p| p.psk.bytes() == intro.key) {
            return;
        }
        self.remove_pair(intro.peer_id);
        self.asked.remove(&intro.peer_id);
        let psk = Psk::from_bytes(intro.key);
        let direct = direct_paths(&self.cfg.sockets, &e.candidates);
        let wall = self.wall_ms(now);
        let client = pair_client(&psk, &self.cfg, &direct, now, wall, self.entropy.fork());
        let server = pair_server(&psk, &e.name, now, wall, self.entropy.fork());
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
            punch_starts: VecDeque::new(),
            link: KcpLink::new(pair_conv(&intro.key), now, PAIR_PAYLOAD + SEALED_OVERHEAD),
            last_data: now,
            last_rx: None,
            reported: None,
            unlisted_since: None,
            relay_standby: self.cfg.relay == RelayMode::Fallback,
            tx_bytes: 0,
            rx_bytes: 0,
        };
        pair.start_punch(now);
        pair.open_session(now);
        Self::drain_client_events(&mut self.sessions, now, intro.peer_id, &mut pair);
        self.pairs.insert(intro.peer_id, pair);
    }

    /// We registered again (with the same hub or another): the hub is asked to introduce
    /// every pair we have again, until it does (`REINTRO_RETRY`). Its key is the same for
    /// the same two processes, so the pairs go on undisturbed; what the new hub's
    /// introduction brings is its relay.
    pub fn registered_again(&mut self, now: Instant) {
        self.reintroduce = self.pairs.keys().map(|&id| (id, now)).collect();
    }

    /// The pair with peer `id`, if we have one: whether its key is `key` (another hub of
    /// the cluster introduces a pair we have with the same key; one that does not is no
    /// hub of ours to relay through).
    pub fn pair_key_is(&self, id: u32, key: &[u8; crate::wire::PAIR_KEY_LEN]) -> Option<bool> {
        self.pairs.get(&id).map(|p| p.psk.bytes() == *key)
    }

    /// The peers we have a pair with (the other hubs are asked to introduce them too).
    pub fn pair_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.pairs.keys().copied()
    }

    /// Whether every relay copy goes through every hub that can carry it (`RelayMode::Always`)
    /// rather than through one.
    pub fn relays_through_every_hub(&self) -> bool {
        self.cfg.relay == RelayMode::Always
    }

    /// Whether IP packets for peer `id` go over its pair (its session came up, on the
    /// relay at least); otherwise they go through the hub as before.
    pub fn is_ready(&self, id: u32) -> bool {
        self.pairs.get(&id).is_some_and(|p| p.in_use && !p.link.is_broken())
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

    /// Whether what we send peer `id` goes (also) through the hub's relay.
    pub fn uses_relay(&self, id: u32) -> bool {
        self.cfg.relay == RelayMode::Always || self.via(id) == Via::Relay
    }

    /// How peer `id` is reached: directly while one of the pair's direct paths is up.
    pub fn via(&self, id: u32) -> Via {
        self.pairs.get(&id).map_or(Via::Relay, Pair::via)
    }

    /// Sends an IP packet to peer `id` over its pair (`is_ready`).
    pub fn send_ip(&mut self, id: u32, packet: &[u8]) -> Result<(), LinkError> {
        let p = self.pairs.get_mut(&id).ok_or(LinkError::Broken)?;
        p.link.send_ip(packet)?;
        p.tx_bytes += packet.len() as u64;
        Ok(())
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
                    p.unlisted_since.map(|t| t + PAIR_UNLISTED_GRACE),
                ]
            })
            .flatten()
            .chain(self.reintroduce.values().copied())
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
                    self.sessions.unbind(&s, id);
                    if p.server_slot == Some(slot) {
                        p.server_slot = None;
                    }
                }
            }
            p.server_direct = !p.server_direct_paths(now).is_empty();
            Self::drain_client_events(&mut self.sessions, now, id, p);
            p.link.handle_timeout(now);
            // also what finds a message stuck without its last fragment
            Self::take_messages_of(p, now, &mut self.inner_buf, &mut self.to_tun, &mut self.drops, self.own.as_ref());
            if p.link.is_broken() || p.unlisted_since.is_some_and(|t| now >= t + PAIR_UNLISTED_GRACE) {
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
        let due: Vec<u32> = self.reintroduce.iter().filter(|(_, &t)| now >= t).map(|(&id, _)| id).collect();
        for id in due {
            if self.pairs.contains_key(&id) {
                self.intro_requests.push_back(id);
                self.reintroduce.insert(id, now + REINTRO_RETRY);
            } else {
                self.reintroduce.remove(&id);
            }
        }
        // a link that broke starts over with a new introduction (the next packet asks); a
        // peer gone from the list for good takes its pair with it
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

impl Mesh {
    pub(super) fn wall_ms(&self, now: Instant) -> u64 {
        self.wall_at_epoch_ms + now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    pub(super) fn remove_pair(&mut self, id: u32) {
        if self.pairs.remove(&id).is_some() {
            self.sessions.unbind_pair(id);
        }
    }
}
