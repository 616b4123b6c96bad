//! Forwarding between the hubs of a cluster: a peer registered with one hub reaches a
//! peer registered with another, through both.
//!
//! Every `TABLE_INTERVAL` each hub tells every other hub its table: its peers' names,
//! addresses and accepted routes. A packet from a peer for an address no local peer has
//! goes to the hub whose table has it; that hub gives it to its peer. (The hub's own
//! address is every hub's: what its TUN sends is not forwarded, the answer could not
//! come back.)
//!
//! Invariants:
//! - A forwarded packet is delivered only to a peer of the receiving hub, never forwarded
//!   again: no loops. Its source must be in the sending hub's table: a hub speaks only for
//!   its own peers. A table entry is believed only for a name hub.yaml configures, at the
//!   address the cluster gave that name (or its fixed one), with routes hub.yaml allows it.
//! - Nothing is ever answered: a hub sends only to the addresses the cluster's signed
//!   records advertise (no reflection, no amplification).
//! - A sealing key is one hub's for one boot (HKDF of the cluster key and a random boot
//!   id); a nonce is its counter: never reused. A receiver takes a sender's new boot only
//!   when it opens, is newer (wall clock) than the boot it has, and is within
//!   `MAX_CLOCK_SKEW` of its own clock; within a boot, a replay window. Whoever holds the
//!   cluster key is a hub: the key is the cluster's trust, as for its etcd records.

use super::*;
use crate::wire::{emit_peer_list_in, ForwardHeader, ListAssembly, PeerListChunk, BOOT_LEN, INNER_IP};
use common::replay::{ReplayVerdict, ReplayWindow};
use common::wire::AEAD_TAG_LEN;
use ring::{aead, hkdf};

/// How often a hub sends its table to the others.
pub const TABLE_INTERVAL: Duration = Duration::from_secs(1);
/// A table not refreshed this long is forgotten (its hub stopped, or cannot be heard).
pub const TABLE_TTL: Duration = Duration::from_millis(3500);
/// A table not refreshed this long (its hub may have died) loses to a fresh one listing
/// the same peer (a peer registers with several hubs): packets for it go to the other.
pub const TABLE_QUIET_AFTER: Duration = Duration::from_millis(1500);
/// A sender's new boot must carry a wall clock this close to ours.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(30);
/// Table chunks fit one datagram on any path between hubs.
const TABLE_CHUNK_BYTES: usize = 1100;
/// Forwarded packets waiting for `poll_output`, at most (beyond: dropped, counted).
const FORWARD_QUEUE_MAX: usize = 1024;

/// The sealing key of `hub`'s `boot`.
fn boot_key(salt: &hkdf::Salt, hub: &str, boot: &[u8; BOOT_LEN]) -> aead::LessSafeKey {
    let prk = salt.extract(boot);
    let info: [&[u8]; 2] = [b"mpvpn v1 hub forward", hub.as_bytes()];
    let okm = prk.expand(&info, &aead::AES_256_GCM).expect("hkdf length");
    aead::LessSafeKey::new(aead::UnboundKey::from(okm))
}

/// A `Forward` datagram as hub `hub` of the cluster with `key` would seal `message` (the
/// fuzz harness speaks as another hub with it).
#[cfg(any(test, feature = "sim"))]
pub fn seal_forward_as(
    hub: &str,
    key: &[u8; 32],
    boot: [u8; BOOT_LEN],
    seq: u64,
    wall_ms: u64,
    message: &[u8],
) -> Vec<u8> {
    let mut d = vec![0u8; ForwardHeader::len_for(hub) + message.len() + AEAD_TAG_LEN];
    let h = ForwardHeader { hub, boot, seq, wall_ms }.emit(&mut d);
    d[h..h + message.len()].copy_from_slice(message);
    let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, key);
    seal(&boot_key(&salt, hub, &boot), seq, &mut d, h, message.len());
    d
}

/// Seals the `n` bytes after the `h`-byte header in `out` (the header is the associated
/// data) and appends the tag; returns the datagram's length.
fn seal(key: &aead::LessSafeKey, seq: u64, out: &mut [u8], h: usize, n: usize) -> usize {
    let (head, rest) = out.split_at_mut(h);
    let tag = key
        .seal_in_place_separate_tag(nonce(seq), aead::Aad::from(&*head), &mut rest[..n])
        .expect("in-place seal of a bounded buffer");
    rest[n..n + AEAD_TAG_LEN].copy_from_slice(tag.as_ref());
    h + n + AEAD_TAG_LEN
}

fn nonce(seq: u64) -> aead::Nonce {
    let mut n = [0u8; aead::NONCE_LEN];
    n[4..].copy_from_slice(&seq.to_be_bytes());
    aead::Nonce::assume_unique_for_key(n)
}

/// What this hub knows of another.
struct RemoteHub {
    name: String,
    /// Where its forwarding socket is (its signed record says).
    addr: SocketAddr,
    /// Its peers, as its last complete table said, and when that came.
    table: Vec<PeerEntry>,
    table_at: Option<Instant>,
    /// Its table was not refreshed for `TABLE_QUIET_AFTER`.
    quiet: bool,
    /// The addresses its table covers, its peers that are ours too included: what it may
    /// forward from.
    sources: RouteTable<()>,
    /// A table being received.
    assembly: ListAssembly,
    rx: Option<RxBoot>,
    /// Bytes of IP packets forwarded to it, and delivered from it to our peers.
    tx_bytes: u64,
    rx_bytes: u64,
}

/// What this hub forwards to and from another (status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardStatus {
    pub hub: String,
    /// Peers its last table named.
    pub peers: usize,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

/// A sending hub's current boot, as a receiver follows it.
struct RxBoot {
    boot: [u8; BOOT_LEN],
    /// The wall clock its first datagram here carried: an older boot is never taken again.
    started_ms: u64,
    key: aead::LessSafeKey,
    window: ReplayWindow,
}

/// This hub's side of forwarding.
pub(super) struct Forwarding {
    name: String,
    salt: hkdf::Salt,
    boot: [u8; BOOT_LEN],
    seal: aead::LessSafeKey,
    next_seq: u64,
    hubs: Vec<RemoteHub>,
    /// Which hub (index in `hubs`) an address or route belongs to.
    routes: RouteTable<usize>,
    /// The id our peer list gives each peer of another hub (from our ids, never reused
    /// for another name while this hub runs).
    ids: HashMap<String, u32>,
    next_table: Option<Instant>,
    table_version: u32,
    /// The wall clock at an instant (`now` → wall ms for the datagrams' timestamps), and
    /// the latest instant the hub was called at.
    wall: (Instant, u64),
    latest: Instant,
    /// Messages to seal and send: to which hub (index), and the message.
    queue: VecDeque<usize>,
    messages: PacketQueue,
}

impl Forwarding {
    pub(super) fn new(name: &str, key: &[u8; 32], entropy: &mut dyn Entropy, now: Instant, wall_ms: u64) -> Self {
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, key);
        let mut boot = [0u8; BOOT_LEN];
        entropy.fill(&mut boot);
        let seal = boot_key(&salt, name, &boot);
        Self {
            name: name.to_string(),
            salt,
            boot,
            seal,
            next_seq: 0,
            hubs: Vec::new(),
            routes: RouteTable::default(),
            ids: HashMap::new(),
            next_table: None,
            table_version: 0,
            wall: (now, wall_ms),
            latest: now,
            queue: VecDeque::new(),
            messages: PacketQueue::default(),
        }
    }

    fn wall_ms(&self) -> u64 {
        self.wall.1 + self.latest.saturating_duration_since(self.wall.0).as_millis() as u64
    }

    /// The clocks, as a call into the hub gave them.
    pub(super) fn set_clock(&mut self, now: Instant, wall_ms: Option<u64>) {
        self.latest = self.latest.max(now);
        if let Some(w) = wall_ms {
            self.wall = (now, w);
        }
    }

    fn enqueue(&mut self, hub: usize, parts: &[&[u8]]) -> bool {
        if self.queue.len() >= FORWARD_QUEUE_MAX {
            return false;
        }
        self.messages.push(parts);
        self.queue.push_back(hub);
        true
    }

    /// The next datagram to another hub, sealed into `out`.
    pub(super) fn poll_transmit(&mut self, out: &mut [u8]) -> Option<(SocketAddr, usize)> {
        let hub = self.queue.pop_front()?;
        let header = ForwardHeader { hub: &self.name, boot: self.boot, seq: self.next_seq, wall_ms: self.wall_ms() };
        let h = header.emit(out);
        let room = out.len().saturating_sub(h + AEAD_TAG_LEN);
        let n = self.messages.pop_into(&mut out[h..h + room])?;
        let len = seal(&self.seal, self.next_seq, out, h, n);
        self.next_seq += 1;
        // a hub gone from the set since: its messages are dropped here
        self.hubs.get(hub).map(|r| (r.addr, len))
    }

    /// Where each address goes. A peer several hubs list goes to one whose table is fresh
    /// (inserted last, it wins).
    fn rebuild_routes(&mut self) {
        let mut t = RouteTable::default();
        let order = self
            .hubs
            .iter()
            .enumerate()
            .filter(|(_, h)| h.quiet)
            .chain(self.hubs.iter().enumerate().filter(|(_, h)| !h.quiet));
        for (i, h) in order {
            for p in &h.table {
                t.insert_host(p.addr, i);
                for r in &p.routes {
                    t.insert_prefix(*r, i);
                }
            }
        }
        self.routes = t;
    }
}

impl Hub {
    /// This hub is `name` in a cluster whose hubs share `key`: it forwards to the others
    /// (`set_cluster_hubs`) and takes what they forward (`handle_forward_datagram`).
    pub fn join_cluster(&mut self, now: Instant, wall_ms: u64, name: &str, key: &[u8; 32]) {
        self.forward = Some(Forwarding::new(name, key, &mut *self.entropy, now, wall_ms));
        // every hub of the cluster gives a pair the same key (`pair_key`)
        let secret = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), b"mpvpn cluster pair secret");
        self.pair_secret = hmac::Key::new(hmac::HMAC_SHA256, secret.as_ref());
    }

    /// The other hubs now (from the cluster's signed records), by name, and where each
    /// takes forwarded datagrams. A hub no longer listed is forgotten, its table with it.
    pub fn set_cluster_hubs(&mut self, now: Instant, wall_ms: u64, hubs: &[(String, SocketAddr)]) {
        let Some(f) = self.forward.as_mut() else { return };
        f.set_clock(now, Some(wall_ms));
        let mut old: Vec<RemoteHub> = std::mem::take(&mut f.hubs);
        for (name, addr) in hubs.iter().filter(|(n, _)| *n != f.name) {
            let h = match old.iter().position(|h| h.name == *name) {
                Some(i) => RemoteHub { addr: *addr, ..old.swap_remove(i) },
                None => {
                    // a new hub hears our table at once
                    f.next_table = Some(now);
                    RemoteHub {
                        name: name.clone(),
                        addr: *addr,
                        table: Vec::new(),
                        table_at: None,
                        quiet: false,
                        sources: RouteTable::default(),
                        assembly: ListAssembly::default(),
                        rx: None,
                        tx_bytes: 0,
                        rx_bytes: 0,
                    }
                }
            };
            f.hubs.push(h);
        }
        // indexes changed: what waits to go is dropped rather than sent to another hub
        f.queue.clear();
        f.messages.clear();
        if f.next_table.is_none() && !f.hubs.is_empty() {
            f.next_table = Some(now);
        }
        f.rebuild_routes();
        // what is left of `old` is gone from the cluster: our peers forget its peers
        if old.iter().any(|h| !h.table.is_empty()) {
            self.push_peer_list(now);
        }
    }

    /// A packet for `dst`, which no peer of this hub has: to the hub whose peer has it.
    /// False if no hub's table has it.
    pub(super) fn forward_ip(&mut self, dst: Ipv4Addr, packet: &[u8]) -> bool {
        let Some(f) = self.forward.as_mut() else { return false };
        let Some(hub) = f.routes.lookup(dst, Some(self.cfg.network)) else { return false };
        if f.enqueue(hub, &[&[INNER_IP], packet]) {
            f.hubs[hub].tx_bytes += packet.len() as u64;
        } else {
            self.drops.queue_full += 1;
        }
        true
    }

    /// Sends this hub's table to every other hub when due; forgets tables gone stale.
    pub(super) fn forward_tick(&mut self, now: Instant) {
        let Some(f) = self.forward.as_mut() else { return };
        f.set_clock(now, None);
        let (mut stale, mut quiet) = (false, false);
        for h in &mut f.hubs {
            let age = h.table_at.map(|t| now.saturating_duration_since(t));
            if age.is_some_and(|a| a >= TABLE_TTL) {
                h.table.clear();
                h.sources = RouteTable::default();
                h.table_at = None;
                stale = true;
            } else if age.is_some_and(|a| a >= TABLE_QUIET_AFTER) && !h.quiet {
                h.quiet = true;
                quiet = true;
            }
        }
        if stale || quiet {
            f.rebuild_routes();
        }
        if stale {
            self.push_peer_list(now);
        }
        let due = self.forward.as_ref().is_some_and(|f| f.next_table.is_some_and(|t| now >= t) && !f.hubs.is_empty());
        if !due {
            return;
        }
        // what the others need to route and to check sources: no candidates, no ids
        let table: Vec<PeerEntry> =
            self.entries().into_iter().map(|e| PeerEntry { id: 0, candidates: Vec::new(), ..e }).collect();
        let Some(f) = self.forward.as_mut() else { return };
        f.next_table = Some(now + TABLE_INTERVAL);
        f.table_version = f.table_version.wrapping_add(1);
        let chunks = emit_peer_list_in(f.table_version, &table, TABLE_CHUNK_BYTES);
        for hub in 0..f.hubs.len() {
            for c in &chunks {
                if !f.enqueue(hub, &[c]) {
                    self.drops.queue_full += 1;
                }
            }
        }
    }

    pub(super) fn forward_timeout(&self) -> Option<Instant> {
        let f = self.forward.as_ref()?;
        let quiet = f.hubs.iter().filter(|h| !h.quiet).filter_map(|h| h.table_at).min().map(|t| t + TABLE_QUIET_AFTER);
        let expiry = f.hubs.iter().filter_map(|h| h.table_at).min().map(|t| t + TABLE_TTL);
        let expiry = [quiet, expiry].into_iter().flatten().min();
        [f.next_table.filter(|_| !f.hubs.is_empty()), expiry].into_iter().flatten().min()
    }

    pub(super) fn poll_forward(&mut self, out: &mut [u8]) -> Option<(SocketAddr, usize)> {
        let f = self.forward.as_mut()?;
        while !f.queue.is_empty() {
            if let Some(d) = f.poll_transmit(out) {
                return Some(d);
            }
        }
        None
    }

    /// A datagram from another hub (`Forward`): opened in place, then a packet for one of
    /// our peers, or a chunk of that hub's table. Anything else is dropped and counted.
    pub fn handle_forward_datagram(&mut self, now: Instant, wall_ms: u64, d: &mut [u8]) {
        let Some(f) = self.forward.as_mut() else {
            self.drops.forward_refused += 1;
            return;
        };
        f.set_clock(now, Some(wall_ms));
        let Ok((h, at)) = ForwardHeader::parse(d) else {
            self.drops.malformed += 1;
            return;
        };
        let Some(hub) = f.hubs.iter().position(|r| r.name == h.hub) else {
            self.drops.forward_refused += 1; // not a hub of the cluster now
            return;
        };
        let (boot, seq, sent_ms) = (h.boot, h.seq, h.wall_ms);
        let r = &mut f.hubs[hub];
        let current = r.rx.as_ref().filter(|b| b.boot == boot);
        match current {
            Some(b) if b.window.check(seq) != ReplayVerdict::Fresh => {
                self.drops.replayed += 1;
                return;
            }
            Some(_) => {}
            None => {
                let skew = sent_ms.abs_diff(wall_ms);
                let newer = r.rx.as_ref().is_none_or(|b| sent_ms > b.started_ms);
                if skew > MAX_CLOCK_SKEW.as_millis() as u64 || !newer {
                    self.drops.replayed += 1;
                    return;
                }
            }
        }
        let new_key = current.is_none().then(|| boot_key(&f.salt, &r.name, &boot));
        let Some(key) = new_key.as_ref().or(r.rx.as_ref().map(|b| &b.key)) else { return };
        let (head, rest) = d.split_at_mut(at);
        let Ok(m) = key.open_in_place(nonce(seq), aead::Aad::from(&*head), rest) else {
            self.drops.bad_mac += 1;
            return;
        };
        let len = m.len();
        if let Some(key) = new_key {
            r.rx = Some(RxBoot { boot, started_ms: sent_ms, key, window: ReplayWindow::new() });
        }
        if let Some(b) = &mut r.rx {
            b.window.mark(seq);
        }
        let m = &d[at..at + len];
        match wire::parse_inner(m) {
            Ok(InnerMessage::Ip { packet, src, dst }) => self.deliver_forwarded(hub, packet, src, dst),
            Ok(InnerMessage::PeerList(c)) => self.take_table_chunk(now, hub, c),
            _ => self.drops.malformed += 1,
        }
    }

    /// A packet another hub forwarded: only from its peers, only to ours.
    fn deliver_forwarded(&mut self, hub: usize, packet: &[u8], src: IpAddr, dst: IpAddr) {
        // its own table must cover the source (another hub may list that peer too)
        let from_its_peer = match src {
            IpAddr::V4(s) => {
                self.forward.as_ref().and_then(|f| f.hubs.get(hub)).is_some_and(|h| h.sources.lookup(s, None).is_some())
            }
            IpAddr::V6(_) => false,
        };
        if !from_its_peer {
            self.drops.spoofed_source += 1;
            return;
        }
        match ip::v4_in(dst).and_then(|d| self.peer_for(d)) {
            Some(to) => {
                if let Some(r) = self.forward.as_mut().and_then(|f| f.hubs.get_mut(hub)) {
                    r.rx_bytes += packet.len() as u64;
                }
                self.send_ip(to, packet)
            }
            None => self.drops.no_route += 1,
        }
    }

    /// One chunk of another hub's table; a complete table replaces what it said before.
    fn take_table_chunk(&mut self, now: Instant, hub: usize, c: PeerListChunk) {
        let Some(f) = self.forward.as_mut() else { return };
        let entries = match f.hubs[hub].assembly.take(c) {
            Ok(Some((_, entries))) => entries,
            Ok(None) => return,
            Err(_) => {
                self.drops.malformed += 1;
                return;
            }
        };
        let believed: Vec<PeerEntry> = entries.into_iter().filter_map(|e| self.believable(e)).collect();
        // it forwards from all of its peers, those registered with us too
        let mut sources = RouteTable::default();
        for p in &believed {
            sources.insert_host(p.addr, ());
            p.routes.iter().for_each(|r| sources.insert_prefix(*r, ()));
        }
        // ... and we forward to it only those that are not ours
        let ours: HashSet<&str> = self.peers.values().map(|p| p.name.as_str()).collect();
        let believed: Vec<PeerEntry> = believed.into_iter().filter(|e| !ours.contains(e.name.as_str())).collect();
        let Some(f) = self.forward.as_mut() else { return };
        f.hubs[hub].sources = sources;
        for e in &believed {
            if !f.ids.contains_key(&e.name) {
                f.ids.insert(e.name.clone(), self.next_id);
                self.next_id = self.next_id.wrapping_add(1).max(1);
            }
        }
        let r = &mut f.hubs[hub];
        r.table_at = Some(now);
        let was_quiet = std::mem::replace(&mut r.quiet, false);
        if r.table != believed {
            r.table = believed;
            f.rebuild_routes();
            // our peers hear of the other hub's: they take packets from them
            self.push_peer_list(now);
        } else if was_quiet {
            f.rebuild_routes();
        }
    }

    /// The peers of the other hubs, as our peer list names them (ids ours; no candidates:
    /// a direct session needs a hub both peers registered with).
    pub(super) fn forwarded_entries(&self) -> Vec<PeerEntry> {
        let Some(f) = self.forward.as_ref() else { return Vec::new() };
        // a peer registered here too is listed once, as ours
        let mut seen: HashSet<&str> = self.peers.values().map(|p| p.name.as_str()).collect();
        let entries = f.hubs.iter().flat_map(|h| &h.table).filter(|e| seen.insert(e.name.as_str()));
        entries.filter_map(|e| Some(PeerEntry { id: *f.ids.get(&e.name)?, ..e.clone() })).collect()
    }

    /// What of another hub's entry this hub believes: a
    /// configured name, at the address the cluster gave it (or its fixed one), with the
    /// routes hub.yaml allows it.
    fn believable(&self, e: PeerEntry) -> Option<PeerEntry> {
        let spec = self.spec(&e.name)?;
        let given = spec.fixed_addr.or_else(|| self.assigned.get(&e.name).copied())?;
        if given != e.addr {
            return None;
        }
        let routes = e.routes.into_iter().filter(|r| spec.allowed_routes.iter().any(|a| a.covers(r))).collect();
        Some(PeerEntry { routes, ..e })
    }

    /// `name`'s address, when another hub's table has it.
    pub(super) fn forwarded_address_of(&self, name: &str) -> Option<Ipv4Addr> {
        let f = self.forward.as_ref()?;
        f.hubs.iter().flat_map(|h| &h.table).find(|p| p.name.eq_ignore_ascii_case(name)).map(|p| p.addr)
    }

    /// What this hub forwards to and from each other hub (status).
    pub fn forwarding(&self) -> Vec<ForwardStatus> {
        let Some(f) = self.forward.as_ref() else { return Vec::new() };
        let status = |h: &RemoteHub| ForwardStatus {
            hub: h.name.clone(),
            peers: h.table.len(),
            tx_bytes: h.tx_bytes,
            rx_bytes: h.rx_bytes,
        };
        f.hubs.iter().map(status).collect()
    }
}
