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
//!   registered peer gets one. A pair key is derived from a secret of this hub and both
//!   registrations, and goes to each of the two sealed under its own channel. Relayed
//!   datagrams go only from one registered peer to another; their bytes are counted.

use crate::channel::{Agreement, Channel, OpenFailure};
use crate::ip::{self, Prefix};
use crate::kcplink::{KcpLink, LinkError};
use crate::mesh::{MeshPathStatus, Via};
use crate::queue::PacketQueue;
use crate::wire::{
    self, field, sealed_kind, HeartbeatAckRepr, HeartbeatRepr, IntroRepr, PeerEntry, PeerKey, RefusalReason,
    RefusalRepr, RegisterRepr, RouteRefusalReason, SealedHeader, WelcomeRepr, INNER_CANDIDATES, INNER_INTRO_REQUEST,
    INNER_IP, MAX_CANDIDATES, MSG_REGISTER, MSG_SEALED, SEALED_HEADER_LEN, SEALED_OVERHEAD,
};
use common::crypto::x25519_public;
use common::entropy::Entropy;
use ring::hmac;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

/// A Register whose timestamp is further than this from the hub's clock is refused
/// (replays after a hub restart).
pub const MAX_CLOCK_SKEW_MS: u64 = 10 * 60 * 1000;
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(15);
/// A peer whose last heartbeat is older than this shows as `silent` (heartbeats go every
/// second; a peer retries at 1, 3 and 7 s before it gives up on the hub).
pub const PEER_SILENT_AFTER: Duration = Duration::from_secs(3);
/// The peer list goes out at most this often.
pub const PEER_LIST_PUSH_INTERVAL: Duration = Duration::from_millis(100);
/// A pair is introduced at most this often (both of its peers may ask at once).
pub const INTRO_INTERVAL: Duration = Duration::from_secs(1);
/// Relayed datagrams waiting for one peer at most (beyond it they are dropped and counted).
pub const RELAY_QUEUE_MAX: usize = 8192;
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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubEvent {
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
}

/// Why a datagram or packet was dropped; counted.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HubDrops {
    pub malformed: u64,
    pub unknown_peer: u64,
    pub bad_mac: u64,
    pub replayed: u64,
    /// Registrations never confirmed by a sealed datagram before they expired or a newer
    /// Register replaced them (replayed Registers, or a peer that went away at once).
    #[serde(default)]
    pub unconfirmed: u64,
    pub spoofed_source: u64,
    pub no_route: u64,
    pub queue_full: u64,
    /// Announced routes refused by policy.
    #[serde(default)]
    pub route_refused: u64,
    /// Relayed datagrams for a peer that is not registered (or to oneself), or beyond the
    /// transmit queue.
    #[serde(default)]
    pub relay_refused: u64,
}

/// What `Hub::reconfigure` changed, by peer name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerConfigChanges {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Another key, fixed address or route allowance.
    pub changed: Vec<String>,
}

impl std::fmt::Display for PeerConfigChanges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |v: &[String]| if v.is_empty() { "-".to_string() } else { v.join(",") };
        write!(f, "peers added {}, removed {}, changed {}", list(&self.added), list(&self.removed), list(&self.changed))
    }
}

/// Whether a peer allowed `allowed` may announce `route` in a VPN on `network`.
pub fn route_verdict(allowed: &[Prefix], network: Prefix, route: &Prefix) -> Result<(), RouteRefusalReason> {
    // an exit node's default route necessarily spans the VPN; any other may not touch it
    if route.len > 0 && route.overlaps(&network) {
        return Err(RouteRefusalReason::OverlapsNetwork);
    }
    if allowed.iter().any(|a| a.covers(route)) {
        Ok(())
    } else {
        Err(RouteRefusalReason::NotAllowed)
    }
}

/// A listed peer's state in `mpvpn status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeerState {
    /// The hub's view: heartbeats arrive.
    Up,
    /// The hub's view: no heartbeat for `PEER_SILENT_AFTER`; removed after the timeout.
    Silent,
    /// A peer's view of another: traffic goes through the hub.
    ViaHub,
    /// A peer's view of another: traffic goes over a direct path of the mesh.
    Direct,
    /// A peer's view of itself in the list.
    #[serde(rename = "self")]
    Own,
}

impl std::fmt::Display for PeerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Up => "up",
            Self::Silent => "silent",
            Self::ViaHub => "via-hub",
            Self::Direct => "direct",
            Self::Own => "self",
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerStatus {
    pub id: u32,
    pub name: String,
    pub addr: Ipv4Addr,
    pub state: PeerState,
    pub tunnel: String,
    pub routes: Vec<Prefix>,
    /// Seconds since the last heartbeat (the hub's view only).
    pub last_heartbeat_s: Option<f64>,
    /// Seconds since the last packet from that peer.
    pub last_rx_s: Option<f64>,
    pub rtt_ms: Option<f64>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    /// A peer's view of another: how it is reached (the mesh; without it, `relay`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<Via>,
    /// A peer's view of another: the direct paths of the pair (none without the mesh).
    #[serde(default)]
    pub paths: Vec<MeshPathStatus>,
    /// Where its mesh sockets may be reached, as the hub lists them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<SocketAddr>,
    /// The hub's view: bytes from this peer it passed on to other peers (IP packets it
    /// routed and datagrams of direct sessions it relayed).
    #[serde(default)]
    pub relayed_bytes: u64,
}

/// Where a peer's datagrams go before any arrived (tunnel addresses are learned from
/// authenticated datagrams only).
const UNBOUND: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);

/// A registration the hub answered but the peer has not yet used.
struct Pending {
    name: String,
    nonce: u64,
    addr: Ipv4Addr,
    /// What the Register announced, and what of it hub.yaml allows.
    announced: Vec<Prefix>,
    routes: Vec<Prefix>,
    /// The Welcome, resent as it was to every Register with the same nonce.
    welcome: Vec<u8>,
    channel: Channel,
    since: Instant,
}

struct HubPeer {
    id: u32,
    name: String,
    /// The Register nonce of this registration (its late copies are not new ones).
    nonce: u64,
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
}

impl HubPeer {
    /// Its candidates as the list carries them: server-reflexive first (what works
    /// across NATs), then host addresses.
    fn candidates(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = self.reflexive.values().copied().collect();
        for c in &self.host_candidates {
            if !out.contains(c) {
                out.push(*c);
            }
        }
        out.truncate(MAX_CANDIDATES);
        out
    }
}

pub struct Hub {
    cfg: HubCoreConfig,
    keys: HashMap<String, usize>,
    peers: BTreeMap<u32, HubPeer>,
    /// At most one per configured peer, by the id its Welcome gave.
    pending: BTreeMap<u32, Pending>,
    entropy: Box<dyn Entropy>,
    /// Addresses handed out, by peer name: a returning peer gets its address back.
    assigned: HashMap<String, Ipv4Addr>,
    last_register_ts: HashMap<String, u64>,
    next_id: u32,
    peers_version: u32,
    /// Some peer's link has not taken `peers_version` yet.
    list_pending: bool,
    list_pushed_at: Option<Instant>,
    transmit: VecDeque<(SocketAddr, Vec<u8>)>,
    to_tun: PacketQueue,
    events: VecDeque<HubEvent>,
    pub drops: HubDrops,
    /// Where sealed datagrams are opened.
    buf: Vec<u8>,
    /// Where messages of the KCP stream are taken.
    inner_buf: Vec<u8>,
    /// Pair keys derive from it; a new one each run (pairs are bound to registrations).
    pair_secret: hmac::Key,
    /// When each pair (lower id, higher id) was last introduced.
    introduced: HashMap<(u32, u32), Instant>,
}

impl Hub {
    /// `entropy` makes the registrations' ephemeral keys and the first peer id.
    pub fn new(cfg: HubCoreConfig, mut entropy: Box<dyn Entropy>) -> Self {
        let keys = cfg.peers.iter().enumerate().map(|(i, p)| (p.name.clone(), i)).collect();
        // ids are not secret; random ones keep a restarted hub's from meeting old ones
        let first_peer_id = (entropy.next_u64() as u32) >> 1;
        let mut secret = [0u8; 32];
        entropy.fill(&mut secret);
        Self {
            cfg,
            keys,
            peers: BTreeMap::new(),
            pending: BTreeMap::new(),
            entropy,
            assigned: HashMap::new(),
            last_register_ts: HashMap::new(),
            next_id: first_peer_id.max(1),
            peers_version: 1,
            list_pending: false,
            list_pushed_at: None,
            transmit: VecDeque::new(),
            to_tun: PacketQueue::default(),
            events: VecDeque::new(),
            drops: HubDrops::default(),
            buf: vec![0; 65536],
            inner_buf: vec![0; 65536],
            pair_secret: hmac::Key::new(hmac::HMAC_SHA256, &secret),
            introduced: HashMap::new(),
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

    fn spec(&self, name: &str) -> Option<&PeerSpec> {
        self.keys.get(name).map(|&i| &self.cfg.peers[i])
    }

    fn address_for(&self, name: &str, want: Ipv4Addr) -> Option<Ipv4Addr> {
        let taken = |a: Ipv4Addr| {
            a == self.cfg.hub_addr
                || self.peers.values().any(|p| p.addr == a && p.name != name)
                || self.pending.values().any(|p| p.addr == a && p.name != name)
                || self.cfg.peers.iter().any(|s| s.fixed_addr == Some(a) && s.name != name)
                || self.assigned.iter().any(|(n, &x)| x == a && n != name)
        };
        let usable = |a: Ipv4Addr| {
            let net = self.cfg.network;
            net.contains(a) && a != net.addr && Some(a) != net.nth((net.size() - 1) as u32) && !taken(a)
        };
        if let Some(a) = self.spec(name).and_then(|s| s.fixed_addr) {
            return Some(a);
        }
        if let Some(&a) = self.assigned.get(name) {
            return Some(a);
        }
        if usable(want) {
            return Some(want);
        }
        (1..self.cfg.network.size().min(1 << 20) as u32).filter_map(|n| self.cfg.network.nth(n)).find(|&a| usable(a))
    }

    fn on_register(&mut self, now: Instant, wall_ms: u64, from: SocketAddr, d: &[u8]) {
        let Ok((reg, body)) = RegisterRepr::parse(d) else {
            self.drops.malformed += 1;
            return;
        };
        let Some(spec) = self.spec(&reg.name) else {
            self.drops.unknown_peer += 1;
            return;
        };
        if RegisterRepr::verify(d, body, &spec.key).is_err() {
            self.drops.bad_mac += 1;
            return;
        }
        // a copy of the Register already answered: the same answer, nothing new
        if let Some(p) = self.pending.values().find(|p| p.name == reg.name && p.nonce == reg.nonce) {
            self.transmit.push_back((from, p.welcome.clone()));
            return;
        }
        if self.peers.values().any(|p| p.name == reg.name && p.nonce == reg.nonce) {
            return; // a late copy; that registration is already in use
        }
        let last = self.last_register_ts.get(&reg.name).copied().unwrap_or(0);
        if reg.timestamp_ms <= last || reg.timestamp_ms.abs_diff(wall_ms) > MAX_CLOCK_SKEW_MS {
            self.drops.replayed += 1;
            return;
        }
        self.last_register_ts.insert(reg.name.clone(), reg.timestamp_ms);
        let ki = self.keys[&reg.name];
        let net = self.cfg.network;
        let refusal = (reg.mtu != 0 && reg.mtu != self.cfg.mtu).then_some(RefusalReason::MtuMismatch);
        // a peer asking for the address it had gets it back from a registration nobody has
        // used yet (a replayed Register after a hub restart must not take it)
        self.drop_unconfirmed(|p| p.name != reg.name && p.addr == reg.want_addr);
        let addr = if refusal.is_none() { self.address_for(&reg.name, reg.want_addr) } else { None };
        let Some(addr) = addr else {
            let reason = refusal.unwrap_or(RefusalReason::PoolExhausted);
            let r = RefusalRepr { reason, hub_mtu: self.cfg.mtu, nonce: reg.nonce }.emit(&self.cfg.peers[ki].key);
            self.transmit.push_back((from, r.to_vec()));
            self.events.push_back(HubEvent::Refused { name: reg.name, reason });
            return;
        };
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        // announcements are policy: only what hub.yaml allows this peer is taken; the
        // Welcome tells the peer which were refused and why
        let mut routes = Vec::new();
        let mut refused = Vec::new();
        for r in &reg.routes {
            match route_verdict(&self.cfg.peers[ki].allowed_routes, net, r) {
                Ok(()) => routes.push(*r),
                Err(reason) => refused.push((*r, reason)),
            }
        }
        let private = self.entropy.x25519_key();
        let public = x25519_public(&private);
        let key = &self.cfg.peers[ki].key;
        let agreement = Agreement { key, nonce: reg.nonce, peer_id: id, peer_public: &reg.public, hub_public: &public };
        let Ok(channel) = Channel::establish(&agreement, private, false) else {
            self.drops.malformed += 1; // a public key X25519 refuses
            return;
        };
        let welcome = WelcomeRepr {
            peer_id: id,
            addr,
            prefix_len: self.cfg.network.len,
            hub_addr: self.cfg.hub_addr,
            mtu: self.cfg.mtu,
            nonce: reg.nonce,
            public,
            refused: refused.clone(),
            dns_domain: self.cfg.dns_domain.clone(),
        }
        .emit(key, &reg.public);
        self.transmit.push_back((from, welcome.clone()));
        if !refused.is_empty() {
            self.drops.route_refused += refused.len() as u64;
            self.events.push_back(HubEvent::RoutesRefused { name: reg.name.clone(), routes: refused });
        }
        // one pending registration per peer: a newer Register replaces an older one
        self.drop_unconfirmed(|p| p.name == reg.name);
        self.pending.insert(
            id,
            Pending {
                name: reg.name,
                nonce: reg.nonce,
                addr,
                announced: reg.routes,
                routes,
                welcome,
                channel,
                since: now,
            },
        );
    }

    /// Drops the pending registrations `gone` picks, counted as never confirmed.
    fn drop_unconfirmed(&mut self, gone: impl Fn(&Pending) -> bool) {
        let before = self.pending.len();
        self.pending.retain(|_, p| !gone(p));
        self.drops.unconfirmed += (before - self.pending.len()) as u64;
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
            Err(None) => self.drops.unknown_peer += 1,
            Err(Some(OpenFailure::Replayed)) => self.drops.replayed += 1,
            Err(Some(OpenFailure::BadMac)) => self.drops.bad_mac += 1,
            Err(Some(OpenFailure::Malformed)) => self.drops.malformed += 1,
        }
        self.buf = buf;
    }

    /// The first datagram under a pending registration's keys: it becomes the peer's
    /// registration (replacing the one it had: the peer restarted or lost us).
    fn confirm(&mut self, now: Instant, id: u32, from: SocketAddr) {
        let Some(p) = self.pending.remove(&id) else { return };
        if let Some(old) = self.peers.values().find(|q| q.name == p.name).map(|q| q.id) {
            self.peers.remove(&old);
            self.introduced.retain(|&(a, b), _| a != old && b != old);
        }
        self.assigned.insert(p.name.clone(), p.addr);
        self.peers.insert(
            id,
            HubPeer {
                id,
                name: p.name.clone(),
                nonce: p.nonce,
                addr: p.addr,
                announced: p.announced,
                routes: p.routes,
                tunnel: UNBOUND,
                channel: p.channel,
                last_seen: now,
                last_heartbeat: now,
                rtt_us: 0,
                link: KcpLink::new(id, now, self.cfg.tunnel_payload),
                list_version: 0,
                tx_bytes: 0,
                rx_bytes: 0,
                mesh: false,
                host_candidates: Vec::new(),
                reflexive: BTreeMap::new(),
                relayed_bytes: 0,
                relay_out: PacketQueue::default(),
            },
        );
        self.events.push_back(HubEvent::PeerUp { name: p.name, addr: p.addr, tunnel: from });
        self.push_peer_list();
    }

    /// An opened message from peer `id`, which arrived from `from`.
    fn on_message(&mut self, now: Instant, id: u32, from: SocketAddr, m: &[u8]) {
        let Some(p) = self.peers.get_mut(&id) else { return };
        p.last_seen = now;
        if p.tunnel != from {
            let first = p.tunnel == UNBOUND;
            p.tunnel = from;
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
            Some(&sealed_kind::RELAY) => self.relay(id, m),
            _ => self.drops.malformed += 1,
        }
    }

    /// A datagram of a direct session from peer `from` for another registered peer:
    /// passed on sealed under that peer's channel, with who sent it.
    fn relay(&mut self, from: u32, m: &[u8]) {
        if m.len() <= field::relay::DATAGRAM {
            self.drops.malformed += 1;
            return;
        }
        let to = common::wire::be::u32_at(m, field::relay::PEER_ID);
        let datagram = &m[field::relay::DATAGRAM..];
        match self.peers.get_mut(&to) {
            Some(q) if to != from && q.tunnel != UNBOUND && q.relay_out.len() < RELAY_QUEUE_MAX => {
                q.relay_out.push(&[&[sealed_kind::RELAY], &from.to_be_bytes(), datagram]);
                if let Some(p) = self.peers.get_mut(&from) {
                    p.relayed_bytes += datagram.len() as u64;
                }
            }
            _ => self.drops.relay_refused += 1,
        }
    }

    /// A "where am I" on the rendezvous port from `from`: if it opens under a registered
    /// peer's channel, `from` is that mesh socket's reflexive candidate (a change is
    /// pushed to everyone) and `out` gets the answer, sealed. Returns its length.
    pub fn handle_rendezvous(&mut self, from: SocketAddr, d: &[u8], out: &mut Vec<u8>) -> Option<usize> {
        let h = SealedHeader::parse(d).ok()?;
        let p = self.peers.get_mut(&h.peer_id)?;
        let n = p.channel.open(h, d, &mut self.buf).ok()?.len();
        let socket = wire::parse_where_am_i(&self.buf[SEALED_HEADER_LEN..SEALED_HEADER_LEN + n]).ok()?;
        if usize::from(socket) >= MAX_MESH_SOCKETS {
            return None;
        }
        let moved = p.reflexive.insert(socket, from) != Some(from);
        let answer = p.channel.seal_message(&wire::emit_you_are(socket, from));
        if moved && p.mesh {
            self.push_peer_list();
        }
        // never more than the question: the rendezvous port amplifies nothing
        if answer.len() > d.len() {
            return None;
        }
        out.clear();
        out.extend_from_slice(&answer);
        Some(answer.len())
    }

    /// The key of the pair of registrations `a` and `b` (in either order): HMAC-SHA256
    /// under this hub's secret over both ids and names, lower id first.
    fn pair_key(&self, a: u32, b: u32) -> Option<[u8; wire::PAIR_KEY_LEN]> {
        let (lo, hi) = (self.peers.get(&a.min(b))?, self.peers.get(&a.max(b))?);
        let mut ctx = hmac::Context::with_key(&self.pair_secret);
        let parts: [&[u8]; 6] = [
            b"mpvpn v1 pair key",
            &lo.id.to_be_bytes(),
            &hi.id.to_be_bytes(),
            lo.name.as_bytes(),
            &[0],
            hi.name.as_bytes(),
        ];
        for part in parts {
            ctx.update(part);
        }
        let mut key = [0u8; wire::PAIR_KEY_LEN];
        key.copy_from_slice(&ctx.sign().as_ref()[..wire::PAIR_KEY_LEN]);
        Some(key)
    }

    /// Peer `id` asks to be introduced to `to`: both get the pair's key, each sealed
    /// under its own channel (over its link), at most every `INTRO_INTERVAL` per pair.
    fn introduce(&mut self, now: Instant, id: u32, to: u32) {
        let pair = (id.min(to), id.max(to));
        let ok = id != to && [id, to].iter().all(|i| self.peers.get(i).is_some_and(|p| p.mesh));
        if !ok || self.introduced.get(&pair).is_some_and(|&t| now < t + INTRO_INTERVAL) {
            return;
        }
        self.introduced.insert(pair, now);
        let Some(key) = self.pair_key(id, to) else { return };
        for (a, b) in [(id, to), (to, id)] {
            let intro = IntroRepr { peer_id: b, key }.emit();
            if let Some(p) = self.peers.get_mut(&a) {
                if p.link.send(&intro).is_err() {
                    self.drops.queue_full += 1;
                }
            }
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
        let ack = HeartbeatAckRepr { seq: hb.seq, peers_version: self.peers_version }.emit();
        let d = p.channel.seal_message(&ack);
        self.transmit.push_back((p.tunnel, d));
    }

    fn on_kcp(&mut self, now: Instant, id: u32, segment: &[u8]) {
        let Some(p) = self.peers.get_mut(&id) else { return };
        match p.link.input(now, segment) {
            Ok(()) => {}
            Err(LinkError::Broken) => {
                self.remove_peer(id, "its KCP link broke");
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
            match inner[..n].first() {
                Some(&INNER_IP) => {
                    if let Some(p) = self.peers.get_mut(&id) {
                        p.rx_bytes += (n - field::inner::BODY) as u64;
                    }
                    self.route_from_peer(id, &inner[field::inner::BODY..n]);
                }
                Some(&INNER_CANDIDATES) => match wire::parse_candidates(&inner[..n]) {
                    Ok(c) => self.set_host_candidates(id, c),
                    Err(_) => self.drops.malformed += 1,
                },
                Some(&INNER_INTRO_REQUEST) => match wire::parse_intro_request(&inner[..n]) {
                    Ok(to) => self.introduce(now, id, to),
                    Err(_) => self.drops.malformed += 1,
                },
                _ => self.drops.malformed += 1,
            }
        }
        self.inner_buf = inner;
        if self.peers.get(&id).is_some_and(|p| p.link.is_broken()) {
            self.remove_peer(id, "its KCP link broke");
        }
    }

    /// Peer `id` has a mesh socket, reachable at these host addresses (only addresses a
    /// host can have are kept).
    fn set_host_candidates(&mut self, id: u32, mut c: Vec<SocketAddr>) {
        c.retain(|a| {
            a.port() != 0
                && match a.ip() {
                    IpAddr::V4(v4) => {
                        !(v4.is_loopback()
                            || v4.is_unspecified()
                            || v4.is_multicast()
                            || v4.is_broadcast()
                            || self.cfg.network.contains(v4))
                    }
                    IpAddr::V6(v6) => !(v6.is_loopback() || v6.is_unspecified() || v6.is_multicast()),
                }
        });
        let Some(p) = self.peers.get_mut(&id) else { return };
        if !p.mesh || p.host_candidates != c {
            p.mesh = true;
            p.host_candidates = c;
            self.push_peer_list();
        }
    }

    /// hub.yaml's peers were read again. Newly listed peers may register; a peer no
    /// longer listed, or whose key or fixed address changed, is dropped (its routes are
    /// withdrawn; a changed one registers again by itself); a peer whose allowance
    /// changed keeps what it announced that is now allowed. Nobody else is disturbed.
    pub fn reconfigure(&mut self, peers: Vec<PeerSpec>) -> PeerConfigChanges {
        let mut changes = PeerConfigChanges::default();
        let old = std::mem::take(&mut self.cfg.peers);
        let spec_of = |name: &str| peers.iter().find(|s| s.name == name);
        for s in &peers {
            match old.iter().find(|o| o.name == s.name) {
                None => changes.added.push(s.name.clone()),
                Some(o) if !o.key.same_key(&s.key) || o.fixed_addr != s.fixed_addr => {
                    changes.changed.push(s.name.clone())
                }
                Some(o) if o.allowed_routes != s.allowed_routes => changes.changed.push(s.name.clone()),
                Some(_) => {}
            }
        }
        changes.removed = old.iter().filter(|o| spec_of(&o.name).is_none()).map(|o| o.name.clone()).collect();
        // who must register again: gone from the config, another key, another fixed address
        let must_leave = |name: &str, addr: Ipv4Addr| match spec_of(name) {
            None => true,
            Some(s) => {
                let o = old.iter().find(|o| o.name == name);
                o.is_none_or(|o| !o.key.same_key(&s.key)) || s.fixed_addr.is_some_and(|f| f != addr)
            }
        };
        let leaving: Vec<u32> = self.peers.values().filter(|p| must_leave(&p.name, p.addr)).map(|p| p.id).collect();
        self.pending.retain(|_, p| !must_leave(&p.name, p.addr));
        let net = self.cfg.network;
        let mut list_changed = false;
        for p in self.peers.values_mut() {
            let Some(s) = spec_of(&p.name) else { continue };
            let routes: Vec<Prefix> =
                p.announced.iter().copied().filter(|r| route_verdict(&s.allowed_routes, net, r).is_ok()).collect();
            if routes != p.routes {
                p.routes = routes;
                list_changed = true;
            }
        }
        self.assigned.retain(|name, _| spec_of(name).is_some());
        self.keys = peers.iter().enumerate().map(|(i, p)| (p.name.clone(), i)).collect();
        self.cfg.peers = peers;
        for id in leaving {
            self.remove_peer(id, "hub.yaml changed: no longer listed, or another key or address");
        }
        if list_changed {
            self.push_peer_list();
        }
        changes
    }

    /// The VPN address of the registered peer `name` (or of the hub, as `hub` when no
    /// peer has that name): what `<name>.<domain>` resolves to.
    pub fn address_of(&self, name: &str) -> Option<Ipv4Addr> {
        let peer = self.peers.values().find(|p| p.name.eq_ignore_ascii_case(name)).map(|p| p.addr);
        peer.or_else(|| name.eq_ignore_ascii_case("hub").then_some(self.cfg.hub_addr))
    }

    /// The peer whose address or announced route covers `dst` (longest prefix wins).
    fn peer_for(&self, dst: Ipv4Addr) -> Option<u32> {
        if let Some(p) = self.peers.values().find(|p| p.addr == dst) {
            return Some(p.id);
        }
        // the VPN's own addresses are never reached through a route (an exit node's /0)
        if self.cfg.network.contains(dst) {
            return None;
        }
        self.peers
            .values()
            .flat_map(|p| p.routes.iter().filter(|r| r.contains(dst)).map(move |r| (r.len, p.id)))
            .max()
            .map(|(_, id)| id)
    }

    fn v4_dst(dst: IpAddr) -> Option<Ipv4Addr> {
        match dst {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(a) => ip::v4_of(a),
        }
    }

    fn route_from_peer(&mut self, from_id: u32, packet: &[u8]) {
        let Some((src, dst)) = ip::addresses(packet) else {
            self.drops.malformed += 1;
            return;
        };
        let p = &self.peers[&from_id];
        let src_ok = match src {
            IpAddr::V4(s) => s == p.addr || p.routes.iter().any(|r| r.contains(s)),
            IpAddr::V6(s) => ip::v4_of(s) == Some(p.addr),
        };
        if !src_ok {
            self.drops.spoofed_source += 1;
            return;
        }
        let target = Self::v4_dst(dst);
        match target.and_then(|d| self.peer_for(d)) {
            Some(to) if to == from_id => self.drops.no_route += 1,
            Some(to) => {
                if let Some(p) = self.peers.get_mut(&from_id) {
                    p.relayed_bytes += packet.len() as u64;
                }
                self.send_ip(to, packet)
            }
            None => {
                if target.is_some_and(|d| self.cfg.network.contains(d) && d != self.cfg.hub_addr) {
                    self.drops.no_route += 1; // a VPN address nobody has
                } else {
                    self.to_tun.push(&[packet]); // the hub itself, or beyond it
                }
            }
        }
    }

    fn send_ip(&mut self, to: u32, packet: &[u8]) {
        let Some(p) = self.peers.get_mut(&to) else { return };
        match p.link.send_ip(packet) {
            Ok(()) => p.tx_bytes += packet.len() as u64,
            Err(_) => self.drops.queue_full += 1,
        }
    }

    /// An IP packet the hub host sent into its TUN device.
    pub fn handle_tun_packet(&mut self, packet: &[u8]) {
        let dst = ip::addresses(packet).and_then(|(_, d)| Self::v4_dst(d));
        match dst.and_then(|d| self.peer_for(d)) {
            Some(to) => self.send_ip(to, packet),
            None => self.drops.no_route += 1,
        }
    }

    fn entries(&self) -> Vec<PeerEntry> {
        self.peers
            .values()
            .map(|p| PeerEntry {
                id: p.id,
                name: p.name.clone(),
                addr: p.addr,
                routes: p.routes.clone(),
                candidates: if p.mesh { p.candidates() } else { Vec::new() },
            })
            .collect()
    }

    /// The list changed: every peer is due the new version.
    fn push_peer_list(&mut self) {
        self.peers_version = self.peers_version.wrapping_add(1).max(1);
        self.list_pending = true;
    }

    /// Sends the current list to every peer whose link has not taken it, whole or not at
    /// all: a link without room for every chunk is tried again in the next round.
    fn flush_peer_list(&mut self, now: Instant) {
        if !self.list_pending || self.list_pushed_at.is_some_and(|t| now < t + PEER_LIST_PUSH_INTERVAL) {
            return;
        }
        self.list_pushed_at = Some(now);
        let version = self.peers_version;
        let chunks = wire::emit_peer_list(version, &self.entries());
        let mut incomplete = false;
        for p in self.peers.values_mut().filter(|p| p.list_version != version) {
            if p.link.has_room_for(&chunks) && chunks.iter().all(|c| p.link.send(c).is_ok()) {
                p.list_version = version;
            } else {
                incomplete = true;
            }
        }
        self.list_pending = incomplete;
    }

    fn remove_peer(&mut self, id: u32, why: &'static str) {
        self.introduced.retain(|&(a, b), _| a != id && b != id);
        if let Some(p) = self.peers.remove(&id) {
            self.events.push_back(HubEvent::PeerGone { name: p.name, addr: p.addr, why });
            self.push_peer_list();
        }
    }

    /// Next datagram for the tunnel, into `out` (at least a tunnel payload): where to and
    /// its length.
    pub fn poll_transmit(&mut self, out: &mut [u8]) -> Option<(SocketAddr, usize)> {
        if let Some((to, d)) = self.transmit.pop_front() {
            let n = d.len().min(out.len());
            out[..n].copy_from_slice(&d[..n]);
            return Some((to, n));
        }
        let room = out.len().checked_sub(SEALED_OVERHEAD)?;
        for p in self.peers.values_mut() {
            // a peer nothing authenticated arrived from yet has no address to send to
            if p.tunnel == UNBOUND {
                continue;
            }
            let body = &mut out[SEALED_HEADER_LEN..SEALED_HEADER_LEN + room];
            if let Some(n) = p.relay_out.pop_into(body).or_else(|| p.link.poll_transmit(body)) {
                return Some((p.tunnel, p.channel.seal(out, n)));
            }
        }
        None
    }

    /// Next IP packet for the hub's TUN, into `out`; returns its length.
    pub fn poll_tun(&mut self, out: &mut [u8]) -> Option<usize> {
        self.to_tun.pop_into(out)
    }

    pub fn poll_event(&mut self) -> Option<HubEvent> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let kcp = self.peers.values().map(|p| p.link.poll_timeout()).min();
        let expiry = self.peers.values().map(|p| p.last_seen + self.cfg.peer_timeout).min();
        let unconfirmed = self.pending.values().map(|p| p.since + self.cfg.peer_timeout).min();
        let list =
            self.list_pending.then(|| self.list_pushed_at.map_or(Instant::now(), |t| t + PEER_LIST_PUSH_INTERVAL));
        [kcp, expiry, unconfirmed, list].into_iter().flatten().min()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let mut gone = Vec::new();
        for p in self.peers.values_mut() {
            p.link.handle_timeout(now);
            if p.link.is_broken() {
                gone.push((p.id, "its KCP link broke"));
            } else if now.saturating_duration_since(p.last_seen) >= self.cfg.peer_timeout {
                gone.push((p.id, "nothing authenticated from it within the peer timeout"));
            }
        }
        for (id, why) in gone {
            self.remove_peer(id, why);
        }
        let timeout = self.cfg.peer_timeout;
        self.drop_unconfirmed(|p| now.saturating_duration_since(p.since) >= timeout);
        self.flush_peer_list(now);
    }

    pub fn status(&self, now: Instant) -> Vec<PeerStatus> {
        self.peers
            .values()
            .map(|p| PeerStatus {
                id: p.id,
                name: p.name.clone(),
                addr: p.addr,
                state: if now.saturating_duration_since(p.last_heartbeat) < PEER_SILENT_AFTER {
                    PeerState::Up
                } else {
                    PeerState::Silent
                },
                tunnel: p.tunnel.to_string(),
                routes: p.routes.clone(),
                last_heartbeat_s: Some(now.saturating_duration_since(p.last_heartbeat).as_secs_f64()),
                last_rx_s: Some(now.saturating_duration_since(p.last_seen).as_secs_f64()),
                rtt_ms: (p.rtt_us > 0).then(|| f64::from(p.rtt_us) / 1000.0),
                tx_bytes: p.tx_bytes,
                rx_bytes: p.rx_bytes,
                via: None,
                paths: Vec::new(),
                candidates: if p.mesh { p.candidates() } else { Vec::new() },
                relayed_bytes: p.relayed_bytes,
            })
            .collect()
    }
}

/// A hub on 10.99.0.0/24 that knows peers `a` (key 7s) and `b` (key 8s).
fn test_hub() -> Hub {
    use common::entropy::OsEntropy;
    let spec = |n: &str| PeerSpec {
        name: n.into(),
        key: test_key(n),
        fixed_addr: None,
        allowed_routes: vec!["192.168.0.0/16".parse().expect("literal")],
    };
    Hub::new(
        HubCoreConfig {
            network: "10.99.0.0/24".parse().expect("literal"),
            hub_addr: Ipv4Addr::new(10, 99, 0, 1),
            mtu: crate::TUN_MTU,
            tunnel_payload: crate::TUNNEL_PAYLOAD,
            peers: vec![spec("a"), spec("b")],
            peer_timeout: DEFAULT_PEER_TIMEOUT,
            dns_domain: None,
        },
        Box::new(OsEntropy::new()),
    )
}

fn test_key(name: &str) -> PeerKey {
    PeerKey::new(&[if name == "a" { 7u8 } else { 8u8 }; 32])
}

/// Registers `name` from `from` (Register `nonce`, at `wall`) and confirms it with a
/// heartbeat: its channel.
fn register(hub: &mut Hub, name: &str, from: SocketAddr, nonce: u64, t0: Instant, wall: u64) -> Channel {
    let mut entropy = common::entropy::OsEntropy::new();
    let private = entropy.x25519_key();
    let public = x25519_public(&private);
    let reg = RegisterRepr {
        name: name.into(),
        timestamp_ms: wall,
        nonce,
        want_addr: Ipv4Addr::UNSPECIFIED,
        mtu: 0,
        public,
        routes: vec!["192.168.50.0/24".parse().expect("literal")],
    };
    let key = test_key(name);
    hub.handle_datagram(t0, wall, from, &reg.emit(&key));
    let mut out = vec![0u8; 65536];
    let (_, n) = hub.poll_transmit(&mut out).expect("a Welcome");
    let w = WelcomeRepr::parse(&out[..n], &key, &public).expect("a valid Welcome");
    let agreement = Agreement { key: &key, nonce, peer_id: w.peer_id, peer_public: &public, hub_public: &w.public };
    let mut channel = Channel::establish(&agreement, private, true).expect("channel");
    hub.handle_datagram(t0, wall, from, &channel.seal_message(&HeartbeatRepr { seq: 1, rtt_us: 0 }.emit()));
    while hub.poll_transmit(&mut out).is_some() {}
    channel
}

/// `test_hub` with `name` genuinely registered from 127.0.0.1:40000: the hub, that peer's
/// channel, its tunnel address, the clocks used.
fn hub_with_one_peer(name: &str) -> (Hub, Channel, SocketAddr, Instant, u64) {
    let (t0, wall) = (Instant::now(), 1_800_000_000_000u64);
    let mut hub = test_hub();
    let from = SocketAddr::from(([127, 0, 0, 1], 40000));
    let channel = register(&mut hub, name, from, 1, t0, wall);
    assert_eq!(hub.status(t0).len(), 1);
    (hub, channel, from, t0, wall)
}

/// The fuzzing harness (cargo fuzz target `hub_peer_input`, and a bounded run in the unit
/// tests): a hub with one genuinely registered peer, then `data` cut into datagrams that
/// all come from that peer's tunnel address: half of them sealed under the peer's channel
/// (most as KCP segments, so they reach KCP; some as they are: relay requests and the
/// like), the others raw, some of those to the rendezvous port (raw and sealed). Any panic is a bug; afterwards the hub
/// must still answer a valid heartbeat.
pub fn fuzz_peer_input(data: &[u8]) {
    let (mut hub, mut channel, from, t0, wall) = hub_with_one_peer("a");
    let mut seq = 1;
    let mut heartbeat = |channel: &mut Channel| {
        seq += 1;
        channel.seal_message(&HeartbeatRepr { seq, rtt_us: 0 }.emit())
    };
    let mut out = vec![0u8; 65536];
    let mut answer = Vec::new();
    let mut now = t0;
    let mut rest = data;
    let mut n = 0u32;
    while let Some((&len, tail)) = rest.split_first() {
        let take = (len as usize).min(tail.len());
        let (chunk, tail) = tail.split_at(take);
        rest = tail;
        n += 1;
        if n.is_multiple_of(2) {
            // sealed: a KCP segment, or as it comes (a relay request, a candidate list ...)
            let mut m = Vec::with_capacity(chunk.len() + 1);
            if len % 4 != 1 {
                m.push(sealed_kind::KCP);
            }
            m.extend_from_slice(chunk);
            hub.handle_datagram(now, wall, from, &channel.seal_message(&m));
        } else if len % 8 == 3 {
            // the rendezvous port: raw, and sealed under the peer's channel
            let _ = hub.handle_rendezvous(from, chunk, &mut answer);
            let _ = hub.handle_rendezvous(from, &channel.seal_message(chunk), &mut answer);
        } else {
            hub.handle_datagram(now, wall, from, chunk);
        }
        now += Duration::from_millis(u64::from(len % 16));
        hub.handle_timeout(now);
        while hub.poll_transmit(&mut out).is_some() {}
        while hub.poll_tun(&mut out).is_some() {}
        while hub.poll_event().is_some() {}
    }
    // still serving: a valid heartbeat from the peer (if it survived) gets an ack
    if !hub.peers.is_empty() {
        hub.handle_datagram(now, wall, from, &heartbeat(&mut channel));
        assert!(hub.poll_transmit(&mut out).is_some(), "hub stopped answering its peer");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The relay passes datagrams only between two registered peers, and the rendezvous
    /// port answers only a registered peer, never with more than it was sent.
    /// A pair's key is one for both of its peers, another for every other pair, and
    /// another once either registers again; introductions go to both, and only between
    /// peers with a mesh socket.
    #[test]
    fn pair_keys_are_per_pair_and_per_registration() {
        let (t0, wall) = (Instant::now(), 1_800_000_000_000u64);
        let mut hub = test_hub();
        let (fa, fb) = (SocketAddr::from(([127, 0, 0, 1], 40000)), SocketAddr::from(([127, 0, 0, 1], 40001)));
        register(&mut hub, "a", fa, 1, t0, wall);
        register(&mut hub, "b", fb, 1, t0, wall);
        let id = |hub: &Hub, n: &str| hub.status(t0).iter().find(|p| p.name == n).map(|p| p.id).expect("registered");
        let (a, b) = (id(&hub, "a"), id(&hub, "b"));
        let k = hub.pair_key(a, b).expect("both registered");
        assert_eq!(hub.pair_key(b, a), Some(k));
        assert_ne!(hub.pair_key(a, a), Some(k));
        // no mesh socket told yet: no introduction
        let mut out = vec![0u8; 65536];
        hub.introduce(t0, a, b);
        assert!(hub.poll_transmit(&mut out).is_none());
        for p in [a, b] {
            hub.set_host_candidates(p, vec!["198.51.100.9:5100".parse().expect("literal")]);
        }
        hub.introduce(t0, a, b);
        let mut to = Vec::new();
        while let Some((addr, _)) = hub.poll_transmit(&mut out) {
            to.push(addr);
        }
        assert!(to.contains(&fa) && to.contains(&fb), "both introduced: {to:?}");
        // a registers again: a new id, a new key
        register(&mut hub, "a", fa, 2, t0, wall + 1);
        let a2 = id(&hub, "a");
        assert_ne!(a2, a);
        assert!(hub.pair_key(a, b).is_none(), "the old registration is gone");
        assert_ne!(hub.pair_key(a2, b), Some(k));
    }

    #[test]
    fn relay_and_rendezvous_serve_only_registered_peers() {
        let (mut hub, mut channel, from, t0, wall) = hub_with_one_peer("a");
        let own = hub.status(t0)[0].id;
        let mut out = vec![0u8; 65536];
        let relay_to = |to: u32| {
            let mut m = vec![sealed_kind::RELAY];
            m.extend_from_slice(&to.to_be_bytes());
            m.extend_from_slice(&[0x13; 60]);
            m
        };
        for to in [own + 1000, own] {
            hub.handle_datagram(t0, wall, from, &channel.seal_message(&relay_to(to)));
            assert!(hub.poll_transmit(&mut out).is_none(), "relayed to {to}");
        }
        assert_eq!(hub.drops.relay_refused, 2);
        assert_eq!(hub.status(t0)[0].relayed_bytes, 0);

        let mut answer = Vec::new();
        let mesh_socket = SocketAddr::from(([192, 0, 2, 1], 5100));
        let q = channel.seal_message(&wire::emit_where_am_i(0));
        let n = hub.handle_rendezvous(mesh_socket, &q, &mut answer).expect("an answer");
        assert!(n <= q.len());
        // garbage, a replay and a question sealed under nobody's channel get nothing
        assert!(hub.handle_rendezvous(mesh_socket, &[0x27; 60], &mut answer).is_none());
        assert!(hub.handle_rendezvous(mesh_socket, &q, &mut answer).is_none());
        let (_, mut other, ..) = hub_with_one_peer("b");
        let foreign = other.seal_message(&wire::emit_where_am_i(0));
        assert!(hub.handle_rendezvous(mesh_socket, &foreign, &mut answer).is_none());
        // a peer that told no host candidates has no mesh: it lists no candidates
        assert!(hub.entries()[0].candidates.is_empty());
        let mut c = vec![INNER_CANDIDATES, 2];
        wire::put_addr(&mut c, "127.0.0.1:5100".parse().expect("literal"));
        wire::put_addr(&mut c, "198.51.100.9:5100".parse().expect("literal"));
        c[1] = 2;
        hub.set_host_candidates(own, wire::parse_candidates(&c).expect("parses"));
        // the reflexive one first; loopback is no candidate
        let want: Vec<SocketAddr> = vec![mesh_socket, "198.51.100.9:5100".parse().expect("literal")];
        assert_eq!(hub.entries()[0].candidates, want);
    }
}
