//! The hub state machine: peer registry, address pool, routing, heartbeats, peer-list push.
//!
//! Invariants:
//! - Nothing from an unknown or unauthenticated source gets an answer or changes state:
//!   a Register must carry a valid MAC from the named peer's key and a timestamp newer than
//!   any seen for that name (and within `MAX_CLOCK_SKEW` of ours).
//! - A Register only makes a *pending* registration with its own channel keys
//!   (`channel`); it replaces the peer's working one when the first datagram sealed under
//!   the new keys arrives, which only the real peer can send. So a replayed Register
//!   (also after a hub restart) disturbs nobody and yields nothing. Every Register with
//!   the same nonce gets the same Welcome: resent or queued copies converge on one id.
//! - Every other datagram is sealed under a registration's channel and found by its peer
//!   id, never by tunnel address; liveness and the address the hub answers to are
//!   learned only from datagrams that opened.
//! - A packet from a peer is routed only if its inner source is the peer's address (or
//!   its IPv6 mapping) or inside a route it announced; otherwise it is dropped and counted.
//! - Every change of the peer list bumps its version; every peer gets the current
//!   version over its KCP link (reliable and ordered), at most every
//!   `PEER_LIST_PUSH_INTERVAL` (a burst of registrations makes one push, not one each),
//!   and a peer whose link had no room for it gets it in a later round.
//! - The mesh (`crate::mesh`): a peer's candidates are its host addresses (which it
//!   tells over its link) and what the rendezvous port saw its mesh sockets come from,
//!   asked under its channel; the answer is never longer than the question and only a
//!   registered peer gets one. A pair key is derived from a secret (this hub's, or the
//!   cluster's) and both peers' names and process instances, and goes to each of the two
//!   sealed under its own channel. Relayed datagrams go only between the two peers of a
//!   pair this hub introduced; their bytes are counted.

mod broker;
mod discovery;
mod forward;
#[cfg(any(test, feature = "sim"))]
pub use forward::seal_forward_as;
pub use forward::ForwardStatus;
mod output;
mod peer_list;
mod registry;
mod routing;
mod status;

pub use output::HubOutput;
use peer_list::ListPush;
use registry::Pending;
pub use registry::{route_verdict, PeerConfigChanges};
pub use status::{PeerState, PeerStatus};

use crate::channel::{Agreement, Channel, OpenFailure};
use crate::ip::{self, Prefix, RouteTable};
use crate::kcplink::{KcpLink, LinkError};
use crate::mesh::{MeshPathStatus, Via};
use crate::queue::PacketQueue;
use crate::wire::{
    self, field, sealed_kind, HeartbeatAckRepr, HeartbeatRepr, InnerMessage, IntroRepr, PeerEntry, PeerKey,
    PeerListDelta, RefusalReason, RefusalRepr, RegisterRepr, RouteRefusalReason, SealedHeader, WelcomeRepr,
    MAX_CANDIDATES, MSG_REGISTER, MSG_SEALED, SEALED_HEADER_LEN, SEALED_OVERHEAD,
};
use common::crypto::x25519_public;
use common::entropy::Entropy;
use ring::hmac;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

/// (replays after a hub restart).
pub const MAX_CLOCK_SKEW_MS: u64 = 10 * 60 * 1000;
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(15);
/// A peer whose last heartbeat is older than this shows as `silent`: it missed a few
/// (`peer::HEARTBEAT_INTERVAL`) and is retrying (`peer::HEARTBEAT_RETRIES`).
pub const PEER_SILENT_AFTER: Duration = Duration::from_secs(3);
/// The peer list goes out at most this often.
pub const PEER_LIST_PUSH_INTERVAL: Duration = Duration::from_millis(100);
/// A pair is introduced at most this often (both of its peers may ask at once).
pub const INTRO_INTERVAL: Duration = Duration::from_secs(1);
/// A registration of a peer process heard from this recently keeps another of the same
/// process through another tunnel out (`RefusalReason::RegisteredElsewhere`): two
/// heartbeat intervals.
pub const DUPLICATE_HEARD_WITHIN: Duration = Duration::from_secs(2);
/// Bytes the relay carries for one pair (both ways) per second by default (hub.yaml
/// `relay_mbit_per_pair`); beyond it datagrams are dropped and counted.
pub const DEFAULT_RELAY_BYTES_PER_PAIR: u64 = 256 * 1_000_000 / 8;
/// Relayed datagrams waiting for one peer at most (beyond it they are dropped and counted).
pub const RELAY_QUEUE_MAX: usize = 8192;
/// A peer's own changes (candidates, reflexive addresses) that reach the peer list at once
/// (`broker::ChangeBudget`) ...
pub const CANDIDATE_CHANGE_BURST: u32 = 3;
/// ... and then one per this.
pub const CANDIDATE_CHANGE_INTERVAL: Duration = Duration::from_secs(2);
/// `Reset` answers to sealed datagrams of unknown registrations, at most, per second.
pub const RESETS_PER_SECOND: u32 = 100;
/// Mesh sockets per peer whose reflexive address the hub keeps.
pub const MAX_MESH_SOCKETS: usize = 4;

/// A peer the hub knows from its config.
pub struct PeerSpec {
    pub name: String,
    pub key: PeerKey,
    pub fixed_addr: Option<Ipv4Addr>,
    /// The subnets this peer may announce (hub.yaml `routes:`); an announcement inside
    /// one of them is taken, any other refused. 0.0.0.0/0 (an exit node) only if listed.
    pub allowed_routes: Vec<Prefix>,
}

pub struct HubCoreConfig {
    pub network: Prefix,
    pub hub_addr: Ipv4Addr,
    pub mtu: u16,
    /// Payload bytes one tunnel datagram carries (decides the KCP segment size).
    pub tunnel_payload: usize,
    pub peers: Vec<PeerSpec>,
    pub peer_timeout: Duration,
    /// The DNS domain the hub answers `<peer>.<domain>` for (told to peers in the Welcome).
    pub dns_domain: Option<String>,
    /// Addresses given out before (the state file): each name gets its own back, and no
    /// other name gets it. Entries for names not configured, or not host addresses of the
    /// network, are ignored.
    pub assigned: BTreeMap<String, Ipv4Addr>,
    /// The secret registrations' reset tokens derive from (the state file keeps it): a
    /// restarted hub can tell a peer, verifiably, that it no longer knows its registration.
    pub reset_secret: [u8; 32],
    /// What the relay carries for one introduced pair per second, at most.
    pub relay_bytes_per_pair: u64,
    /// Who gives a new name its address.
    pub addresses: AddressAuthority,
}

/// Who gives a name that has none its VPN address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AddressAuthority {
    /// This hub, alone (its driver keeps the assignments in the state file).
    #[default]
    Local,
    /// The cluster's store, which every hub shares: the hub asks it
    /// (`HubEvent::AddressWanted`), learns its answers (`Hub::learn_assignments`) and never
    /// picks an address itself; while the store is unavailable a new name is refused.
    Cluster,
}

/// How often the hub asks the cluster's store for one name's address, at most.
pub const ADDRESS_ASK_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubEvent {
    /// The name → address assignments changed (`Hub::assignments`): keep them.
    AddressesChanged,
    PeerUp {
        name: String,
        addr: Ipv4Addr,
        tunnel: SocketAddr,
    },
    PeerMoved {
        name: String,
        tunnel: SocketAddr,
    },
    PeerGone {
        name: String,
        addr: Ipv4Addr,
        why: &'static str,
    },
    Refused {
        name: String,
        reason: RefusalReason,
    },
    /// Announced routes this peer may not have (refused, told, never pushed).
    RoutesRefused {
        name: String,
        routes: Vec<(Prefix, RouteRefusalReason)>,
    },
    /// A configured name registered and has no address: ask the cluster's store for one
    /// (`AddressAuthority::Cluster`; `want` is what the peer asked for).
    AddressWanted {
        name: String,
        want: Ipv4Addr,
    },
}

crate::drops::drop_reasons! {
    /// Why the hub dropped a datagram or packet.
    HubDropReason;
    /// The hub's drops, by reason.
    HubDrops {
        Malformed => malformed,
        UnknownPeer => unknown_peer,
        BadMac => bad_mac,
        Replayed => replayed,
        /// Registrations never confirmed by a sealed datagram before they expired or a
        /// newer Register replaced them (replayed Registers, or a peer that went away at
        /// once).
        Unconfirmed => unconfirmed,
        SpoofedSource => spoofed_source,
        NoRoute => no_route,
        QueueFull => queue_full,
        /// Announced routes refused by policy.
        RouteRefused => route_refused,
        /// Relayed datagrams for a peer that is not registered (or to oneself), outside a
        /// pair the hub introduced, or beyond the transmit queue.
        RelayRefused => relay_refused,
        /// Relayed datagrams beyond their pair's budget per second.
        RelayOverBudget => relay_over_budget,
        /// Datagrams between hubs from a hub not in the cluster now, or to a hub without
        /// `cluster:`.
        ForwardRefused => forward_refused,
    }
}

/// Where a peer's datagrams go before any arrived (tunnel addresses are learned from
/// authenticated datagrams only).
const UNBOUND: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);

struct HubPeer {
    id: u32,
    name: String,
    /// The Register nonce of this registration (its late copies are not new ones).
    nonce: u64,
    /// The peer process's (0: not told).
    instance: u64,
    addr: Ipv4Addr,
    announced: Vec<Prefix>,
    routes: Vec<Prefix>,
    tunnel: SocketAddr,
    channel: Channel,
    last_seen: Instant,
    last_heartbeat: Instant,
    rtt_us: u32,
    link: KcpLink,
    /// The peer-list version this peer's link has taken (0: none yet).
    list_version: u32,
    /// It said it takes the list's changes (`INNER_PEERS_DELTA`) instead of whole lists.
    deltas: bool,
    tx_bytes: u64,
    rx_bytes: u64,
    /// It told its host candidates: it has a mesh socket.
    mesh: bool,
    host_candidates: Vec<SocketAddr>,
    /// Where the rendezvous port saw each of its mesh sockets come from.
    reflexive: BTreeMap<u8, SocketAddr>,
    relayed_bytes: u64,
    /// Datagrams of direct sessions relayed to this peer, as the messages to seal (in
    /// `poll_transmit`, into the caller's buffer).
    relay_out: PacketQueue,
    /// How often its own changes (candidates, reflexive addresses) reach the peer list.
    changes: broker::ChangeBudget,
}

pub struct Hub {
    cfg: HubCoreConfig,
    keys: HashMap<String, usize>,
    peers: BTreeMap<u32, HubPeer>,
    /// At most one per configured peer, by the id its Welcome gave.
    pending: BTreeMap<u32, Pending>,
    entropy: Box<dyn Entropy>,
    /// Addresses handed out, by peer name: a returning peer gets its address back, also
    /// after a restart (`HubEvent::AddressesChanged` asks the driver to keep them).
    assigned: BTreeMap<String, Ipv4Addr>,
    last_register_ts: HashMap<String, u64>,
    next_id: u32,
    /// The peer list's version and when it next goes out.
    list: ListPush,
    /// The list as last pushed, by id, and its version: deltas are against it.
    pushed: (u32, BTreeMap<u32, PeerEntry>),
    /// Every list goes out whole (the bench's "before deltas").
    whole_lists: bool,
    /// Peers' addresses and routes, for every packet routed (rebuilt on every list change).
    route_table: RouteTable<u32>,
    transmit: VecDeque<(SocketAddr, Vec<u8>)>,
    /// Peers whose link or relay queue may have a datagram to send: `poll_transmit` asks
    /// only these, not every peer per datagram (O(N²) per peer-list push at 2000 peers).
    ready: ReadyPeers,
    to_tun: PacketQueue,
    events: VecDeque<HubEvent>,
    pub drops: HubDrops,
    /// Where sealed datagrams are opened.
    buf: Vec<u8>,
    /// Where messages of the KCP stream are taken.
    inner_buf: Vec<u8>,
    /// Pair keys derive from it; a new one each run (pairs are bound to registrations).
    pair_secret: hmac::Key,
    /// Each introduced pair (lower id, higher id): when, and what the relay carried for it.
    introduced: HashMap<(u32, u32), broker::IntroducedPair>,
    /// Reset tokens derive from it (`HubCoreConfig::reset_secret`).
    reset_key: hmac::Key,
    /// When the current second of `Reset`s began, and how many went in it.
    resets: Option<(Instant, u32)>,
    /// Cluster: whether its store answers (new names are refused while it does not).
    store_available: bool,
    /// Cluster: names asked of the store, and when.
    asked: HashMap<String, Instant>,
    /// Cluster: forwarding to and from the other hubs (`join_cluster`).
    forward: Option<forward::Forwarding>,
    /// Cluster: what the peers are told about its hubs (`set_listed_hubs`).
    listed_hubs: Option<wire::ClusterHubsRepr>,
}

impl Hub {
    /// `entropy` makes the registrations' ephemeral keys and the first peer id.
    pub fn new(mut cfg: HubCoreConfig, mut entropy: Box<dyn Entropy>) -> Self {
        let keys: HashMap<String, usize> = cfg.peers.iter().enumerate().map(|(i, p)| (p.name.clone(), i)).collect();
        let saved = std::mem::take(&mut cfg.assigned);
        let assigned = registry::usable_assignments(&cfg, &keys, saved);
        // ids are not secret; random ones keep a restarted hub's from meeting old ones
        let first_peer_id = (entropy.next_u64() as u32) >> 1;
        let mut secret = [0u8; 32];
        entropy.fill(&mut secret);
        let reset_key = hmac::Key::new(hmac::HMAC_SHA256, &cfg.reset_secret);
        Self {
            cfg,
            keys,
            peers: BTreeMap::new(),
            pending: BTreeMap::new(),
            entropy,
            assigned,
            last_register_ts: HashMap::new(),
            next_id: first_peer_id.max(1),
            list: ListPush::default(),
            pushed: (0, BTreeMap::new()),
            whole_lists: false,
            route_table: RouteTable::default(),
            transmit: VecDeque::new(),
            ready: ReadyPeers::default(),
            to_tun: PacketQueue::default(),
            events: VecDeque::new(),
            drops: HubDrops::default(),
            buf: vec![0; common::wire::MAX_DATAGRAM],
            inner_buf: vec![0; common::wire::MAX_DATAGRAM],
            pair_secret: hmac::Key::new(hmac::HMAC_SHA256, &secret),
            introduced: HashMap::new(),
            reset_key,
            resets: None,
            store_available: false,
            asked: HashMap::new(),
            forward: None,
            listed_hubs: None,
        }
    }

    /// One datagram from the tunnel (from mpserver's upstream socket of some session).
    pub fn handle_datagram(&mut self, now: Instant, wall_ms: u64, from: SocketAddr, d: &[u8]) {
        match d.first() {
            Some(&MSG_REGISTER) => self.on_register(now, wall_ms, from, d),
            Some(&MSG_SEALED) => self.on_sealed(now, from, d),
            _ => self.drops.malformed += 1,
        }
        self.flush_peer_list(now);
    }

    /// A sealed datagram: opened under the channel its peer id names, then dispatched.
    fn on_sealed(&mut self, now: Instant, from: SocketAddr, d: &[u8]) {
        let Ok(h) = SealedHeader::parse(d) else {
            self.drops.malformed += 1;
            return;
        };
        let mut buf = std::mem::take(&mut self.buf);
        let channel = match (self.peers.get_mut(&h.peer_id), self.pending.get_mut(&h.peer_id)) {
            (Some(p), _) => Some(&mut p.channel),
            (None, Some(p)) => Some(&mut p.channel),
            (None, None) => None,
        };
        let opened = match channel.map(|c| c.open(h, d, &mut buf)) {
            None => Err(None),
            Some(Ok(m)) => Ok(m.len()),
            Some(Err(e)) => Err(Some(e)),
        };
        match opened {
            Ok(n) => {
                if self.pending.contains_key(&h.peer_id) {
                    self.confirm(now, h.peer_id, from);
                }
                self.on_message(now, h.peer_id, from, &buf[SEALED_HEADER_LEN..SEALED_HEADER_LEN + n]);
            }
            Err(None) => {
                self.drops.unknown_peer += 1;
                self.answer_unknown(now, from, h.peer_id, d.len());
            }
            Err(Some(OpenFailure::Replayed)) => self.drops.replayed += 1,
            Err(Some(OpenFailure::BadMac)) => self.drops.bad_mac += 1,
            Err(Some(OpenFailure::Malformed)) => self.drops.malformed += 1,
        }
        self.buf = buf;
    }

    /// An opened message from peer `id`, which arrived from `from`.
    fn on_message(&mut self, now: Instant, id: u32, from: SocketAddr, m: &[u8]) {
        let Some(p) = self.peers.get_mut(&id) else { return };
        p.last_seen = now;
        if p.tunnel != from {
            let first = p.tunnel == UNBOUND;
            p.tunnel = from;
            // what waited for an address to go to
            self.ready.push(id);
            if !first {
                // the peer's tunnel session changed (mpclient or mpserver restarted)
                self.events.push_back(HubEvent::PeerMoved { name: p.name.clone(), tunnel: from });
            }
            // an address is one peer's: whoever had it before has moved on
            for q in self.peers.values_mut().filter(|q| q.id != id && q.tunnel == from) {
                q.tunnel = UNBOUND;
            }
        }
        match m.first() {
            Some(&sealed_kind::HEARTBEAT) => self.on_heartbeat(now, id, m),
            Some(&sealed_kind::KCP) => self.on_kcp(now, id, &m[field::kcp::SEGMENT..]),
            Some(&sealed_kind::RELAY) => self.relay(now, id, m),
            _ => self.drops.malformed += 1,
        }
    }

    fn on_heartbeat(&mut self, now: Instant, id: u32, m: &[u8]) {
        let Ok(hb) = HeartbeatRepr::parse(m) else {
            self.drops.malformed += 1;
            return;
        };
        let Some(p) = self.peers.get_mut(&id) else { return };
        p.last_heartbeat = now;
        p.rtt_us = hb.rtt_us;
        let ack = HeartbeatAckRepr { seq: hb.seq, peers_version: self.list.version }.emit();
        let d = p.channel.seal_message(&ack);
        self.transmit.push_back((p.tunnel, d));
    }

    fn on_kcp(&mut self, now: Instant, id: u32, segment: &[u8]) {
        let Some(p) = self.peers.get_mut(&id) else { return };
        // its ACK, and whatever the messages below make the hub send it
        self.ready.push(id);
        match p.link.input(now, segment) {
            Ok(()) => {}
            Err(LinkError::Broken) => {
                self.remove_peer(now, id, "its KCP link broke");
                return;
            }
            Err(_) => {
                self.drops.malformed += 1;
                return;
            }
        }
        // the message buffer is in use by the caller: inner messages go through their own
        let mut inner = std::mem::take(&mut self.inner_buf);
        while let Some(n) = self.peers.get_mut(&id).and_then(|p| p.link.recv(now, &mut inner)) {
            match wire::parse_inner(&inner[..n]) {
                Ok(InnerMessage::Ip { packet, src, dst }) => {
                    if let Some(p) = self.peers.get_mut(&id) {
                        p.rx_bytes += packet.len() as u64;
                    }
                    self.route_from_peer(id, packet, src, dst);
                }
                Ok(InnerMessage::Candidates(c)) => self.set_host_candidates(now, id, c),
                Ok(InnerMessage::IntroRequest(to)) => self.introduce(now, id, to),
                Ok(InnerMessage::PeersWant(have)) => self.on_peers_want(now, id, have),
                // what only a hub sends, or what does not parse
                Ok(
                    InnerMessage::PeerList(_)
                    | InnerMessage::PeerListDelta(_)
                    | InnerMessage::Intro(_)
                    | InnerMessage::ResetToken(_)
                    | InnerMessage::ClusterHubs(_),
                )
                | Err(_) => self.drops.malformed += 1,
            }
        }
        self.inner_buf = inner;
        if self.peers.get(&id).is_some_and(|p| p.link.is_broken()) {
            self.remove_peer(now, id, "its KCP link broke");
        }
    }

    /// Next datagram for the tunnel, into `out` (at least a tunnel payload): where to and
    /// its length.
    fn poll_transmit(&mut self, out: &mut [u8]) -> Option<(SocketAddr, usize)> {
        if let Some((to, d)) = self.transmit.pop_front() {
            let n = d.len().min(out.len());
            out[..n].copy_from_slice(&d[..n]);
            return Some((to, n));
        }
        let room = out.len().checked_sub(SEALED_OVERHEAD)?;
        while let Some(id) = self.ready.front() {
            // a peer nothing authenticated arrived from yet has no address to send to: it
            // is asked again when something from it arrives
            let Some(p) = self.peers.get_mut(&id).filter(|p| p.tunnel != UNBOUND) else {
                self.ready.pop_front();
                continue;
            };
            let body = &mut out[SEALED_HEADER_LEN..SEALED_HEADER_LEN + room];
            if let Some(n) = p.relay_out.pop_into(body).or_else(|| p.link.poll_transmit(body)) {
                return Some((p.tunnel, p.channel.seal(out, n)));
            }
            self.ready.pop_front();
        }
        None
    }

    /// Next IP packet for the hub's TUN, into `out`; returns its length.
    fn poll_tun(&mut self, out: &mut [u8]) -> Option<usize> {
        self.to_tun.pop_into(out)
    }

    fn poll_event(&mut self) -> Option<HubEvent> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let kcp = self.peers.values().map(|p| p.link.poll_timeout()).min();
        let expiry = self.peers.values().map(|p| p.last_seen + self.cfg.peer_timeout).min();
        let unconfirmed = self.pending.values().map(|p| p.since + self.cfg.peer_timeout).min();
        let list = self.list.poll_timeout();
        let changes = self.peers.values().filter_map(|p| p.changes.poll_timeout()).min();
        [kcp, expiry, unconfirmed, list, changes, self.forward_timeout()].into_iter().flatten().min()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let mut gone = Vec::new();
        for p in self.peers.values_mut() {
            p.link.handle_timeout(now);
            if p.link.has_output() {
                self.ready.push(p.id);
            }
            if p.link.is_broken() {
                gone.push((p.id, "its KCP link broke"));
            } else if now.saturating_duration_since(p.last_seen) >= self.cfg.peer_timeout {
                gone.push((p.id, "nothing authenticated from it within the peer timeout"));
            }
        }
        for (id, why) in gone {
            self.remove_peer(now, id, why);
        }
        let timeout = self.cfg.peer_timeout;
        self.drop_unconfirmed(|p| now.saturating_duration_since(p.since) >= timeout);
        if self.peers.values_mut().fold(false, |due, p| p.changes.due(now) | due) {
            self.push_peer_list(now);
        }
        self.flush_peer_list(now);
        self.forward_tick(now);
    }
}

/// Peer ids in the order they became ready to send, each at most once.
#[derive(Default)]
struct ReadyPeers {
    order: VecDeque<u32>,
    queued: HashSet<u32>,
}

impl ReadyPeers {
    fn push(&mut self, id: u32) {
        if self.queued.insert(id) {
            self.order.push_back(id);
        }
    }

    fn front(&self) -> Option<u32> {
        self.order.front().copied()
    }

    fn pop_front(&mut self) {
        if let Some(id) = self.order.pop_front() {
            self.queued.remove(&id);
        }
    }
}
