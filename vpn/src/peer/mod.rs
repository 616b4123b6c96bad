//! The peer state machine: register, heartbeat, carry TUN packets over KCP, follow the
//! hub's peer list.
//!
//! A peer registers with every hub it knows at once (`HubLink`s: peer.yaml's `hubs:`, and
//! those a cluster's hub tells of): each link has its own registration, heartbeats, KCP
//! link and peer list. One of them is *active* (the first in order that is up): its
//! Welcome configures us, its list drives routes, names and the mesh, and TUN packets go
//! through it. Packets and relayed
//! datagrams are taken from every link; the mesh's relay copies go through every hub that
//! introduced the pair (`relay: always`) or through the first such (the active first).
//! When the active link is lost another that is up takes over at once.
//!
//! Heartbeats go every `HEARTBEAT_INTERVAL`. When one goes unanswered the peer retries
//! `HEARTBEAT_RETRIES` after it; if none is answered by `HUB_LOST_AFTER` the hub is lost
//! and that link registers again every `REREGISTER_INTERVAL`, asking for the address we
//! had. With every link lost the peer stops taking packets from its TUN (they are dropped
//! and counted) except those for a peer it has a direct session with (`mesh`: those go
//! on). Direct sessions outlive a new registration (with this hub or another of the
//! cluster) as long as our address stays.
//!
//! Each registration has its own ephemeral key and nonce; every resend of its Register
//! carries both, so however many copies reach the hub they get one Welcome. Once welcomed,
//! everything goes sealed under the registration's channel (the first heartbeat at once:
//! it is what makes the hub switch to it), and only what opens under it is taken.

mod heartbeat;
mod mesh_link;
mod output;
mod peer_list;
mod registration;

use mesh_link::Rendezvous;
pub use output::PeerOutput;
pub use peer_list::route_hazard;
use registration::Attempt;

use crate::channel::{Agreement, Channel};
use crate::hub::{PeerState, PeerStatus};
use crate::ip::{self, Prefix, RouteTable};
use crate::kcplink::{KcpLink, LinkError};
use crate::mesh::{Mesh, MeshAddr, MeshConfig, Via};
use crate::queue::PacketQueue;
use crate::wire::{
    self, field, sealed_kind, HeartbeatAckRepr, HeartbeatRepr, InnerMessage, PeerEntry, PeerKey, PeerListChunk,
    PeerListDelta, RefusalReason, RefusalRepr, RegisterRepr, RouteRefusalReason, SealedHeader, WelcomeRepr,
    MSG_REFUSAL, MSG_RESET, MSG_SEALED, MSG_WELCOME, PUBLIC_KEY_LEN, SEALED_HEADER_LEN, SEALED_OVERHEAD,
};
use common::crypto::x25519_public;
use common::entropy::Entropy;
use ring::agreement::EphemeralPrivateKey;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// Retries after the first unanswered heartbeat.
pub const HEARTBEAT_RETRIES: [Duration; 3] = [Duration::from_secs(1), Duration::from_secs(3), Duration::from_secs(7)];
/// No answer to the last retry within this time after the first miss: the hub is lost.
pub const HUB_LOST_AFTER: Duration = Duration::from_secs(8);
/// The same for a peer with other hubs (`hubs:`, or learned from the cluster): its
/// traffic moves to another sooner.
pub const STANDBY_HUB_LOST_AFTER: Duration = Duration::from_secs(3);
/// A peer with other hubs that carried traffic through a hub within `QUICK_BUSY_FOR`
/// heartbeats its hubs this often ...
pub const QUICK_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);
/// ... and declares the hub lost when nothing came from it for this long (and at least
/// four round trips) after a heartbeat: its pairs' relay and its traffic move to the next
/// hub within about a second.
pub const QUICK_HUB_LOST_AFTER: Duration = Duration::from_millis(500);
pub const QUICK_BUSY_FOR: Duration = Duration::from_secs(2);
pub const REGISTER_RETRY: Duration = Duration::from_millis(500);
pub const REREGISTER_INTERVAL: Duration = Duration::from_secs(2);
/// Each mesh socket asks the hub's rendezvous port where it is this often: a NAT
/// mapping that changed is in the hub's list within about this.
pub const RENDEZVOUS_INTERVAL: Duration = Duration::from_secs(1);
/// A registered peer whose rendezvous questions got no answer this long says so.
pub const RENDEZVOUS_SILENT_AFTER: Duration = Duration::from_secs(5);
/// How often a peer with a mesh looks at its interfaces for new host candidates.
pub const CANDIDATE_SCAN_INTERVAL: Duration = Duration::from_secs(5);
/// How often each hub is asked to introduce the pairs it lists both peers of but has not
/// introduced (it relays only for those): a hub that came up after the pair did.
pub const INTRO_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// A hub link whose hub says this process is registered with it through another link
/// (two `hubs:` entries reach one hub) asks again this often.
pub const SAME_HUB_RETRY: Duration = Duration::from_secs(5);
/// Hubs a peer registers with at once, at most (peer.yaml's and discovered ones).
pub const MAX_HUB_LINKS: usize = crate::config::MAX_HUBS;

/// How the mesh knows another peer: by its VPN address, which the cluster keeps per name,
/// not by the id one hub gave its registration. So a pair outlives either peer's move to
/// another hub (or a new registration with the same one).
pub(crate) fn mesh_key(p: &PeerEntry) -> u32 {
    u32::from(p.addr)
}

pub struct PeerCoreConfig {
    pub name: String,
    pub key: PeerKey,
    /// The TUN MTU this peer is configured for; `None` = take the hub's.
    pub mtu: Option<u16>,
    pub routes: Vec<Prefix>,
    /// Payload bytes one tunnel datagram carries.
    pub tunnel_payload: usize,
    /// Direct sessions with other peers (`mesh:` in peer.yaml).
    pub mesh: Option<MeshConfig>,
    /// The only DNS domain this peer takes from the hub (`dns_domain:` in peer.yaml).
    pub dns_domain: Option<String>,
    /// Ask the hub for the list's changes rather than whole lists (peers before deltas
    /// did not; the bench compares both).
    pub peer_list_deltas: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerEvent {
    /// Registered (or another hub's registration became the active one, `link`):
    /// configure the TUN device.
    Configured {
        link: usize,
        addr: Ipv4Addr,
        prefix_len: u8,
        hub_addr: Ipv4Addr,
        mtu: u16,
        /// The hub answers `<peer>.<domain>` on `hub_addr`.
        dns_domain: Option<String>,
    },
    /// Routes announced by other peers to install / remove.
    Routes { add: Vec<Prefix>, remove: Vec<Prefix> },
    /// Hub `link` does not answer: it registers again. `remaining` hubs are still up
    /// (none: the peer has lost every hub).
    HubLost { link: usize, remaining: usize },
    /// The hub named a DNS domain this peer will not route lookups for (not a private
    /// domain, or not the one peer.yaml pins): names are not resolved through the hub.
    DnsDomainRefused { domain: String, pinned: Option<String> },
    /// The hub said, under this registration's reset token, that it no longer knows it
    /// (it restarted): registering again at once.
    HubReset { link: usize },
    /// Hub `link` is one of a cluster: its name, and how the other hubs are reached.
    ClusterHubs { link: usize, hubs: wire::ClusterHubsRepr },
    /// A new peer list is in (`peers()`).
    PeerList,
    /// The way to another peer changed (the mesh).
    Mesh(crate::mesh::MeshEvent),
    /// The hub refused us for good (config mismatch): stop with this error.
    Fatal(HubRefusal),
    /// The hub refused us for now (e.g. pool exhausted); we keep trying.
    Refused(RefusalReason),
    /// Hub link `link` reaches a hub this process is registered with through another
    /// link already: it stands aside (`LinkState::SameHub`), asking every `SAME_HUB_RETRY`.
    SameHub { link: usize },
    /// Time to look at this host's interfaces for host candidates
    /// (`Peer::set_host_candidates`).
    ScanCandidates,
    /// The hub's rendezvous port has not answered since we registered
    /// (`RENDEZVOUS_SILENT_AFTER`): only host candidates are announced.
    RendezvousSilent,
    /// The hub did not take one of our announced routes.
    RouteRefused { route: Prefix, reason: RouteRefusalReason },
}

/// Why the hub will never take this peer as configured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubRefusal {
    #[error("hub announces MTU {hub} but this peer is set to {ours}")]
    WelcomeMtu { hub: u16, ours: u16 },
    #[error("hub refused: its TUN MTU is {hub}, this peer is set to {ours} (remove `mtu` or set it to {hub})")]
    MtuMismatch { hub: u16, ours: u16 },
}

crate::drops::drop_reasons! {
    /// Why the peer dropped a datagram or packet (its mesh counts its own:
    /// `mesh::MeshDropReason`).
    PeerDropReason;
    /// The peer's drops, by reason.
    PeerDrops {
        HubLost => hub_lost,
        QueueFull => queue_full,
        Malformed => malformed,
        NotRegistered => not_registered,
        /// Packets whose inner source cannot have come from where they came from.
        SpoofedSource => spoofed_source,
        /// Sealed datagrams that did not open under our channel (forged, replayed, or for
        /// a registration we no longer have).
        Unauthenticated => unauthenticated,
        /// Peer-list deltas from a version we do not have (the list is asked for whole).
        StaleList => stale_list,
    }
}

/// A peer's link to the hub, as status shows it (a hub shows itself `Up`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkState {
    Registering,
    Up,
    /// Heartbeats go unanswered; retrying (`HEARTBEAT_RETRIES`).
    Retrying,
    /// No answer to the last retry: not taking packets, registering again.
    #[serde(rename = "hub lost")]
    HubLost,
    /// The hub is registered with through another link already.
    #[serde(rename = "same hub")]
    SameHub,
}

impl std::fmt::Display for LinkState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Registering => "registering",
            Self::Up => "up",
            Self::Retrying => "retrying",
            Self::HubLost => "hub lost",
            Self::SameHub => "same hub as another entry",
        })
    }
}

/// A peer's drops and its mesh's, as status shows them.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct PeerDropCounts {
    #[serde(flatten)]
    pub own: PeerDrops,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<crate::mesh::MeshDrops>,
}

impl PeerDropCounts {
    /// Every reason's name (the mesh's as `mesh_<reason>`) and count.
    pub fn iter(&self) -> impl Iterator<Item = (String, u64)> + '_ {
        let mesh = self.mesh.iter().flat_map(|m| m.iter().map(|(why, n)| (format!("mesh_{why}"), n)));
        self.own.iter().map(|(why, n)| (why.to_string(), n)).chain(mesh)
    }
}

enum State {
    Registering { attempt: Attempt, next_try: Instant, lost: bool },
    Up(Box<Session>),
}

/// What this peer exchanged with one other peer (through the hub, today).
#[derive(Debug, Clone, Copy, Default)]
struct PeerTraffic {
    tx_bytes: u64,
    rx_bytes: u64,
    last_rx: Option<Instant>,
}

struct Session {
    /// The registration's keys (its peer id is the KCP conversation's).
    channel: Channel,
    link: KcpLink,
    hb_seq: u32,
    next_heartbeat: Instant,
    /// When the first still-unanswered heartbeat went out.
    first_miss: Option<(Instant, u32)>,
    retries_sent: usize,
    pending_hb: Option<(u32, Instant)>,
    /// When the last heartbeat went.
    last_hb_at: Option<Instant>,
    /// The first heartbeat sent since anything last came from the hub.
    unanswered_since: Option<Instant>,
    /// What a `Reset` for this registration must carry (told by the hub once confirmed).
    reset_token: Option<[u8; wire::RESET_TOKEN_LEN]>,
}

/// What a hub's Welcome told us.
#[derive(Debug, Clone)]
struct Welcomed {
    addr: Ipv4Addr,
    prefix_len: u8,
    hub_addr: Ipv4Addr,
    mtu: u16,
    dns_domain: Option<String>,
    refused: Vec<(Prefix, RouteRefusalReason)>,
}

/// One hub this peer registers with: its registration, heartbeats, KCP link and the peer
/// list it sends.
struct HubLink {
    state: State,
    /// This registration's id (the hub's list names us by it).
    id: u32,
    welcome: Option<Welcomed>,
    /// The hub's peer list as this link follows it: a list being received, the version
    /// we hold (0: none yet), the entries.
    list_assembly: wire::ListAssembly,
    list_version: u32,
    list: Vec<PeerEntry>,
    /// The mesh key (`mesh_key`) of each listed peer by the id this hub gave it, and back.
    keys: HashMap<u32, u32>,
    ids: HashMap<u32, u32>,
    /// Pairs this hub introduced under this registration (mesh key → the other peer's id
    /// here): it relays only for those.
    introduced: HashMap<u32, u32>,
    rtt_us: u32,
    last_ack: Option<Instant>,
    /// Its hub said we are registered with it through another link.
    same_hub: bool,
    /// Datagrams ready to go (Register, heartbeats).
    transmit: VecDeque<Vec<u8>>,
    /// Copies of mesh datagrams for this hub's relay, as the messages to seal (in
    /// `poll_transmit`, into the caller's buffer).
    relay_out: PacketQueue,
}

impl HubLink {
    fn new(now: Instant, entropy: &mut dyn Entropy) -> Self {
        Self {
            state: State::Registering { attempt: Attempt::new(entropy), next_try: now, lost: false },
            id: 0,
            welcome: None,
            list_assembly: wire::ListAssembly::default(),
            list_version: 0,
            list: Vec::new(),
            keys: HashMap::new(),
            ids: HashMap::new(),
            introduced: HashMap::new(),
            rtt_us: 0,
            last_ack: None,
            same_hub: false,
            transmit: VecDeque::new(),
            relay_out: PacketQueue::default(),
        }
    }

    fn is_up(&self) -> bool {
        matches!(self.state, State::Up(_))
    }

    fn state(&self) -> LinkState {
        match &self.state {
            State::Up(s) if s.first_miss.is_some() => LinkState::Retrying,
            State::Up(_) => LinkState::Up,
            State::Registering { .. } if self.same_hub => LinkState::SameHub,
            State::Registering { lost: true, .. } => LinkState::HubLost,
            State::Registering { .. } => LinkState::Registering,
        }
    }

    /// Whether this hub relays our datagrams to mesh peer `key` (it introduced the pair
    /// to this registration of ours and that registration of its): the other peer's id here.
    fn relays_to(&self, key: u32) -> Option<u32> {
        if !self.is_up() {
            return None;
        }
        self.introduced.get(&key).copied().filter(|id| self.ids.get(&key) == Some(id))
    }
}

pub struct Peer {
    cfg: PeerCoreConfig,
    /// The hubs we register with; `active`'s registration configures us.
    links: Vec<HubLink>,
    active: usize,
    /// Where `poll_transmit` looks first (the link it took the last datagram from).
    next_link: usize,
    addr: Ipv4Addr,
    /// The VPN network (from the Welcome).
    network: Option<Prefix>,
    hub_addr: Ipv4Addr,
    mtu: u16,
    /// The active hub's peer list, as applied.
    peers: Vec<PeerEntry>,
    /// Which listed peer (index in `peers`) an address belongs to.
    route_table: RouteTable<usize>,
    /// Traffic with each listed peer, index for index with `peers`.
    peer_traffic: Vec<PeerTraffic>,
    /// Our announced routes the hub refused this registration.
    refused_routes: Vec<(Prefix, RouteRefusalReason)>,
    installed_routes: BTreeSet<Prefix>,
    last_ts: u64,
    to_tun: PacketQueue,
    events: VecDeque<PeerEvent>,
    pub drops: PeerDrops,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    /// Where sealed datagrams are opened.
    buf: Vec<u8>,
    /// Where messages of the KCP stream are taken.
    inner_buf: Vec<u8>,
    entropy: Box<dyn Entropy>,
    /// Drawn at start, told in every Register: every hub gives our pairs the same keys.
    instance: u64,
    mesh: Option<Mesh>,
    /// Our mesh sockets' candidates and the rendezvous port's timers.
    rendezvous: Rendezvous,
    /// Where the mesh datagram `poll_mesh_transmit` returned goes (directly).
    mesh_dests: Vec<MeshAddr>,
    mesh_all_dests: Vec<MeshAddr>,
    /// The hub link each mesh peer's relayed datagrams last came in on: with `relay:
    /// fallback` ours go back the same way (the other peer chose a hub that works for it).
    relay_from: HashMap<u32, usize>,
    /// When the hubs are next asked to introduce pairs they have not (`INTRO_CHECK_INTERVAL`).
    next_intro_check: Instant,
    /// Traffic went through a hub lately: until then, with other hubs, the hubs are
    /// watched closely (`QUICK_HEARTBEAT_INTERVAL`).
    busy_until: Option<Instant>,
}

impl Peer {
    /// `entropy` makes each registration's nonce and ephemeral key.
    /// `now` and `wall_ms` are the two clocks at the start. It registers with one hub
    /// (link 0); `add_link` adds others.
    pub fn new(mut cfg: PeerCoreConfig, now: Instant, wall_ms: u64, mut entropy: Box<dyn Entropy>) -> Self {
        let mesh = cfg.mesh.take().map(|m| Mesh::new(m, now, wall_ms, entropy.fork()));
        let sockets = mesh.as_ref().map_or(0, |m| m.socket_count());
        let instance = entropy.next_u64() | 1; // never 0, "not told"
        Self {
            cfg,
            links: vec![HubLink::new(now, &mut *entropy)],
            active: 0,
            next_link: 0,
            addr: Ipv4Addr::UNSPECIFIED,
            network: None,
            hub_addr: Ipv4Addr::UNSPECIFIED,
            mtu: 0,
            peers: Vec::new(),
            route_table: RouteTable::default(),
            peer_traffic: Vec::new(),
            refused_routes: Vec::new(),
            installed_routes: BTreeSet::new(),
            last_ts: 0,
            to_tun: PacketQueue::default(),
            events: VecDeque::new(),
            drops: PeerDrops::default(),
            tx_bytes: 0,
            rx_bytes: 0,
            buf: vec![0; common::wire::MAX_DATAGRAM],
            inner_buf: vec![0; common::wire::MAX_DATAGRAM],
            entropy,
            instance,
            mesh,
            rendezvous: Rendezvous::new(now, sockets),
            mesh_dests: Vec::new(),
            mesh_all_dests: Vec::new(),
            relay_from: HashMap::new(),
            next_intro_check: now,
            busy_until: None,
        }
    }

    /// Registers with one more hub from now on: its link's index (what `handle_datagram`
    /// takes and `PeerOutput::Tunnel` names), or `None` at `MAX_HUB_LINKS`.
    pub fn add_link(&mut self, now: Instant) -> Option<usize> {
        if self.links.len() >= MAX_HUB_LINKS {
            return None;
        }
        self.links.push(HubLink::new(now, &mut *self.entropy));
        Some(self.links.len() - 1)
    }

    /// What was dropped and counted, the mesh's drops included.
    pub fn drop_counts(&self) -> PeerDropCounts {
        PeerDropCounts { own: self.drops.clone(), mesh: self.mesh.as_ref().map(|m| m.drops.clone()) }
    }

    /// Whether the active hub's registration is up (TUN packets go through it).
    pub fn is_up(&self) -> bool {
        self.links[self.active].is_up()
    }

    /// The hub link whose registration configures us.
    pub fn active_link(&self) -> usize {
        self.active
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn peers(&self) -> &[PeerEntry] {
        &self.peers
    }

    /// The active hub's round trip.
    pub fn rtt_ms(&self) -> Option<f64> {
        self.link_rtt_ms(self.active)
    }

    /// Hub link `link`'s round trip, once measured.
    pub fn link_rtt_ms(&self, link: usize) -> Option<f64> {
        let rtt = self.links.get(link)?.rtt_us;
        (rtt > 0).then(|| f64::from(rtt) / 1000.0)
    }

    /// When the active hub last answered a heartbeat.
    pub fn last_ack(&self) -> Option<Instant> {
        self.links[self.active].last_ack
    }

    /// One datagram from hub link `link`'s tunnel (its mpclient, or embedded client).
    pub fn handle_datagram(&mut self, now: Instant, link: usize, d: &[u8]) {
        if link >= self.links.len() {
            self.drops.malformed += 1;
            return;
        }
        match d.first() {
            Some(&MSG_WELCOME) => self.on_welcome(now, link, d),
            Some(&MSG_REFUSAL) => self.on_refusal(now, link, d),
            Some(&MSG_RESET) => self.on_reset(now, link, d),
            Some(&MSG_SEALED) => self.on_sealed(now, link, d),
            _ => self.drops.malformed += 1,
        }
    }

    /// A sealed datagram: taken only if it opens under that link's registration's channel.
    fn on_sealed(&mut self, now: Instant, l: usize, d: &[u8]) {
        let State::Up(s) = &mut self.links[l].state else {
            self.drops.not_registered += 1;
            return;
        };
        // another registration's id is refused by the channel
        let Ok(h) = SealedHeader::parse(d) else {
            self.drops.unauthenticated += 1;
            return;
        };
        let n = match s.channel.open(h, d, &mut self.buf) {
            Ok(m) => m.len(),
            Err(_) => {
                self.drops.unauthenticated += 1;
                return;
            }
        };
        s.unanswered_since = None;
        let mut buf = std::mem::take(&mut self.buf);
        let m = &mut buf[SEALED_HEADER_LEN..SEALED_HEADER_LEN + n];
        match m.first() {
            Some(&sealed_kind::HEARTBEAT_ACK) => self.on_ack(now, l, m),
            Some(&sealed_kind::KCP) => self.on_kcp(now, l, &m[field::kcp::SEGMENT..]),
            Some(&sealed_kind::RELAY) if m.len() > field::relay::DATAGRAM => {
                let from = common::wire::be::u32_at(m, field::relay::PEER_ID);
                match (self.mesh.as_mut(), self.links[l].keys.get(&from)) {
                    (Some(mesh), Some(&key)) => {
                        self.relay_from.insert(key, l);
                        mesh.handle_datagram(now, MeshAddr::Relay(key), &mut m[field::relay::DATAGRAM..])
                    }
                    (Some(mesh), None) => mesh.drops.unknown += 1,
                    (None, _) => self.drops.malformed += 1,
                }
            }
            _ => self.drops.malformed += 1,
        }
        self.buf = buf;
    }

    fn on_kcp(&mut self, now: Instant, l: usize, segment: &[u8]) {
        let State::Up(s) = &mut self.links[l].state else { return };
        match s.link.input(now, segment) {
            Ok(()) => {}
            Err(LinkError::Broken) => {
                self.lose_hub(now, l);
                return;
            }
            Err(_) => {
                self.drops.malformed += 1;
                return;
            }
        }
        loop {
            let State::Up(s) = &mut self.links[l].state else { return };
            let Some(n) = s.link.recv(now, &mut self.inner_buf) else {
                if s.link.is_broken() {
                    self.lose_hub(now, l); // a message that can never be taken: start over
                }
                break;
            };
            match wire::parse_inner(&self.inner_buf[..n]) {
                Ok(InnerMessage::Ip { packet, src, .. }) => {
                    if !self.source_allowed_from_hub(src) {
                        self.drops.spoofed_source += 1;
                        continue;
                    }
                    self.rx_bytes += packet.len() as u64;
                    if let Some(i) = self.peer_index(src) {
                        let t = &mut self.peer_traffic[i];
                        t.rx_bytes += packet.len() as u64;
                        t.last_rx = Some(now);
                    }
                    self.to_tun.push(&[packet]);
                }
                Ok(InnerMessage::PeerList(chunk)) => self.on_peer_list_chunk(now, l, chunk),
                Ok(InnerMessage::PeerListDelta(delta)) => self.on_peer_list_delta(now, l, delta),
                Ok(InnerMessage::ResetToken(token)) => {
                    if let State::Up(s) = &mut self.links[l].state {
                        s.reset_token = Some(token);
                    }
                }
                Ok(InnerMessage::Intro(intro)) => self.on_intro(now, l, intro),
                Ok(InnerMessage::ClusterHubs(hubs)) => self.events.push_back(PeerEvent::ClusterHubs { link: l, hubs }),
                // what only a peer sends, or what does not parse
                Ok(InnerMessage::Candidates(_) | InnerMessage::IntroRequest(_) | InnerMessage::PeersWant(_))
                | Err(_) => self.drops.malformed += 1,
            }
        }
    }

    /// An IP packet read from the TUN device.
    pub fn handle_tun_packet(&mut self, now: Instant, packet: &[u8]) {
        if !self.is_up() && self.mesh.is_none() {
            self.drops.hub_lost += 1;
            return;
        }
        let Some((_, dst)) = ip::addresses(packet) else {
            self.drops.malformed += 1;
            return;
        };
        let index = self.peer_index(dst);
        // a pair whose peer the list lacks for now (`PAIR_UNLISTED_GRACE`) still carries
        // what goes to its address
        let key = index.map(|i| mesh_key(&self.peers[i])).or_else(|| ip::v4_in(dst).map(u32::from));
        if let (Some(mesh), Some(id)) = (self.mesh.as_mut(), key) {
            if mesh.is_ready(id) {
                if mesh.uses_relay(id) {
                    self.busy_until = Some(now + QUICK_BUSY_FOR);
                }
                match mesh.send_ip(id, packet) {
                    Ok(()) => self.tx_bytes += packet.len() as u64,
                    Err(_) => self.drops.queue_full += 1,
                }
                return;
            }
            // through the hub until the pair is up
            mesh.want(now, id);
        }
        let State::Up(s) = &mut self.links[self.active].state else {
            self.drops.hub_lost += 1;
            return;
        };
        self.busy_until = Some(now + QUICK_BUSY_FOR);
        match s.link.send_ip(packet) {
            Ok(()) => {
                self.tx_bytes += packet.len() as u64;
                if let Some(i) = index {
                    self.peer_traffic[i].tx_bytes += packet.len() as u64;
                }
            }
            Err(_) => self.drops.queue_full += 1,
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        // the pairs run on while the hubs are lost
        let mesh = self.mesh.as_ref().and_then(Mesh::poll_timeout);
        let links = (0..self.links.len()).filter_map(|l| self.link_timeout(l)).min();
        let rendezvous = self.mesh.as_ref().and_then(|_| self.rendezvous.poll_timeout(self.is_up()));
        let intro_check =
            (self.mesh.is_some() && self.links.iter().any(HubLink::is_up)).then_some(self.next_intro_check);
        [links, mesh, rendezvous, intro_check, self.busy_until].into_iter().flatten().min()
    }

    /// When hub link `l` next needs `handle_timeout`.
    fn link_timeout(&self, l: usize) -> Option<Instant> {
        let own = match &self.links[l].state {
            State::Registering { next_try, .. } => *next_try,
            State::Up(s) => {
                let hb = match s.first_miss {
                    None => s.next_heartbeat,
                    Some((t, _)) => {
                        let lost = t + self.hub_lost_after();
                        HEARTBEAT_RETRIES.get(s.retries_sent).map_or(lost, |d| lost.min(t + *d))
                    }
                };
                hb.min(s.link.poll_timeout())
            }
        };
        let quick = self.quick_deadlines(l).map(|(hb, lost)| lost.map_or(hb, |t| t.min(hb)));
        [Some(own), quick].into_iter().flatten().min()
    }

    pub fn handle_timeout(&mut self, now: Instant, wall_ms: u64) {
        if let Some(m) = self.mesh.as_mut() {
            m.handle_timeout(now, wall_ms);
        }
        self.rendezvous_timers(now);
        if self.busy_until.is_some_and(|t| now >= t) {
            self.busy_until = None;
        }
        for l in 0..self.links.len() {
            self.link_handle_timeout(now, wall_ms, l);
        }
        if now >= self.next_intro_check {
            self.next_intro_check = now + INTRO_CHECK_INTERVAL;
            self.ask_missing_intros();
        }
    }

    /// Hub link `l`'s timers: registration retries, heartbeats and their retries, KCP.
    fn link_handle_timeout(&mut self, now: Instant, wall_ms: u64, l: usize) {
        if self.watch_closely(now, l) {
            return; // lost
        }
        let lost_after = self.hub_lost_after();
        match &mut self.links[l].state {
            State::Registering { next_try, lost, .. } => {
                if now >= *next_try {
                    *next_try = now + if *lost { REREGISTER_INTERVAL } else { REGISTER_RETRY };
                    self.send_register(l, wall_ms);
                }
            }
            State::Up(s) => {
                s.link.handle_timeout(now);
                if s.link.is_broken() {
                    self.lose_hub(now, l);
                    return;
                }
                let due = match s.first_miss {
                    None => {
                        if let Some((seq, sent)) = s.pending_hb {
                            // the last heartbeat was not answered within the interval
                            if now >= sent + HEARTBEAT_INTERVAL {
                                s.first_miss = Some((sent, seq));
                            }
                        }
                        now >= s.next_heartbeat
                    }
                    Some((t, _)) if now >= t + lost_after => {
                        self.lose_hub(now, l);
                        return;
                    }
                    Some((t, _)) => match HEARTBEAT_RETRIES.get(s.retries_sent) {
                        Some(d) if now >= t + *d => {
                            s.retries_sent += 1;
                            true
                        }
                        _ => false,
                    },
                };
                if due {
                    self.send_heartbeat(now, l);
                }
            }
        }
    }

    /// What a modified (hostile) peer could do: `packet` straight into its direct session
    /// with the peer named `to`, whatever its addresses. False if there is no such session.
    #[cfg(any(test, feature = "sim"))]
    pub fn send_direct_unchecked(&mut self, to: &str, packet: &[u8]) -> bool {
        let Some(id) = self.peers.iter().find(|p| p.name == to).map(mesh_key) else { return false };
        self.mesh.as_mut().is_some_and(|m| m.is_ready(id) && m.send_ip(id, packet).is_ok())
    }

    /// The peer's link to its hubs: the active one's, or `HubLost` with every hub lost.
    pub fn link_state(&self) -> LinkState {
        self.links[self.active].state()
    }

    /// Each hub link's state, by index.
    pub fn link_states(&self) -> Vec<LinkState> {
        self.links.iter().map(HubLink::state).collect()
    }
}
