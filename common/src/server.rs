//! The server state machine: many client sessions on one port.
//!
//! Invariants:
//! - Nothing unauthenticated is answered or stored: an init must carry a valid PSK MAC;
//!   a transport datagram must pass the replay window and the AEAD.
//! - A source address becomes a path of a session only after an authenticated datagram
//!   from it. Until the client proves it receives there (by echoing the path's random
//!   challenge in a probe) the server sends it no more bytes than it received from it.
//!   Probe replies are the same size as probes, handshake responses smaller than inits.
//! - Each session has at most `max_paths_per_session` paths; silent ones expire.
//! - A session id is bound to one init: copies of that init (one per path) get the same
//!   cached response; any other init for a live id is dropped.

use crate::crypto::{self, Cipher, Psk, SessionKeys};
use crate::entropy::Entropy;
use crate::path::{LossEstimate, ProbeReceipts, PROBE_INTERVAL};
use crate::redundancy::{
    stall_patience, PathEstimate, RecvLog, RedundancyConfig, RedundancyReceiver, RedundancySender, SenderOutput,
    SentLog, RECEIPT_INTERVAL,
};
use crate::replay::{ReplayVerdict, ReplayWindow};
use crate::stats::{
    DropCounters, DropReason, PathState, PathStatus, RedundancyStatus, SessionState, SessionStatus, StatusReport,
    Traffic,
};
use crate::wire::{
    self, emit_transport_header, HandshakeStatus, InnerRepr, ProbeReplyRepr, ReceiptEntry, TransportPacket,
    AEAD_TAG_LEN, DATA_PAYLOAD_OFFSET, DATA_TAIL_ROOM, HANDSHAKE_INIT_MAX_LEN, HANDSHAKE_RESP_LEN, INNER_DATA,
    INNER_FEC_DATA, MAX_APP_PAYLOAD, PROBE_FLAG_PATH_DOWN, PROBE_LEN, PROBE_REPLY_FLAG_VALIDATED, PROBE_REPLY_LEN,
    TRANSPORT_HEADER_LEN, TYPE_HANDSHAKE_INIT, TYPE_HANDSHAKE_RESP, TYPE_TRANSPORT,
};
use crate::{PathMask, SessionId, MAX_PATHS};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::time::{Duration, Instant};

/// A path with no authenticated datagram for this long carries no data (probes come
/// every 200 ms, so this is several lost in a row).
pub const PATH_SILENT_AFTER: Duration = Duration::from_millis(1000);
/// A path with no authenticated datagram for this long (the client probes each path
/// every `PROBE_INTERVAL`) gets no single copy of data: it may have just died.
pub const PATH_OVERDUE_AFTER: Duration = Duration::from_millis(PROBE_INTERVAL.as_millis() as u64 * 3 / 2 + 50);
/// A path silent this long is forgotten.
pub const PATH_EXPIRE_AFTER: Duration = Duration::from_secs(30);
/// A session that completed its handshake but never sent a transport datagram.
pub const HALF_OPEN_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_MAX_SESSIONS: usize = 1024;
pub const DEFAULT_MAX_PATHS_PER_SESSION: usize = 8;
/// How often expiry is checked.
const SWEEP_INTERVAL: Duration = Duration::from_millis(100);
/// An init is taken only if its timestamp is within this of the server's wall clock: a
/// captured init is worthless after that, also across server restarts.
pub const INIT_FRESHNESS: Duration = Duration::from_secs(120);
/// Sessions opened within twice the freshness window are remembered, so a replay of
/// their init (after the session closed, or the server restarted) opens nothing.
const RECENT_INITS_KEPT: Duration = Duration::from_secs(2 * 120);
/// Inits one source (an IPv4 address, an IPv6 /64) may make the server verify, per second
/// and at once: a flood from one place costs at most this many MACs (about 1 µs each).
/// Generous, since every client behind one bridge shares its address, and one client
/// opening a session per DNS query sends an init per path for each.
pub const INIT_RATE_PER_SOURCE: f64 = 2000.0;
pub const INIT_BURST_PER_SOURCE: f64 = 4000.0;
/// Sources tracked at most. An untracked source is let through: filling the table must
/// not lock everybody out.
const INIT_SOURCES_TRACKED: usize = 4096;
/// How often sources whose buckets filled up again are forgotten.
const SOURCE_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Token buckets on handshake inits, one per source.
#[derive(Default)]
struct InitLimiter {
    buckets: HashMap<IpAddr, (f64, Instant)>,
}

impl InitLimiter {
    /// The bucket a source draws from: its IPv4 address, or its IPv6 /64.
    fn source(a: IpAddr) -> IpAddr {
        match a {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
            },
            v4 => v4,
        }
    }

    fn allow(&mut self, now: Instant, from: IpAddr) -> bool {
        let key = Self::source(from);
        match self.buckets.get_mut(&key) {
            Some((tokens, last)) => {
                let refill = now.saturating_duration_since(*last).as_secs_f64() * INIT_RATE_PER_SOURCE;
                *tokens = (*tokens + refill).min(INIT_BURST_PER_SOURCE);
                *last = now;
                let allowed = *tokens >= 1.0;
                if allowed {
                    *tokens -= 1.0;
                }
                allowed
            }
            None => {
                if self.buckets.len() < INIT_SOURCES_TRACKED {
                    self.buckets.insert(key, (INIT_BURST_PER_SOURCE - 1.0, now));
                }
                true
            }
        }
    }

    /// Forgets sources whose bucket has filled up again.
    fn sweep(&mut self, now: Instant) {
        self.buckets.retain(|_, (tokens, last)| {
            *tokens + now.saturating_duration_since(*last).as_secs_f64() * INIT_RATE_PER_SOURCE < INIT_BURST_PER_SOURCE
        });
    }
}

#[derive(Debug, Clone)]
pub struct ServerCoreConfig {
    /// Where sessions that name no target go; `None` = clients must name one.
    pub default_target: Option<SocketAddr>,
    /// Named targets clients may ask for (the allow-list).
    pub targets: HashMap<String, SocketAddr>,
    pub ciphers: Vec<Cipher>,
    pub max_sessions: usize,
    pub max_paths_per_session: usize,
    /// A session with no authenticated datagram for this long is closed.
    pub session_timeout: Duration,
}

/// Index of a session in the server's table; stable for the session's life. Drivers use
/// it to index their own per-session resources (the upstream socket).
pub type SessionSlot = usize;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEvent {
    SessionOpened { slot: SessionSlot, id: SessionId, target: SocketAddr, cipher: Cipher },
    SessionClosed { slot: SessionSlot, id: SessionId },
    PathAdded { slot: SessionSlot, addr: SocketAddr },
    PathValidated { slot: SessionSlot, addr: SocketAddr },
    PathRemoved { slot: SessionSlot, addr: SocketAddr },
    Refused { from: SocketAddr, status: HandshakeStatus },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerRecv {
    /// Send `buf[payload]` to the session's target (from its own upstream socket).
    Forward {
        slot: SessionSlot,
        payload: Range<usize>,
    },
    /// Send `out[..len]` back to the datagram's source.
    Reply {
        len: usize,
    },
    /// Taken in (parity, a receipt); datagrams parity rebuilt wait in `poll_recovered`.
    Consumed,
    Dropped(DropReason),
}

struct ServerPath {
    addr: SocketAddr,
    /// Our address the client's last fresh datagram on this path went to, when the
    /// socket is bound to a wildcard: answers go out from it, or a client that sent to
    /// one of several server addresses would drop them.
    local: Option<IpAddr>,
    client_path_id: Option<u8>,
    challenge: u64,
    validated: bool,
    client_says_down: bool,
    last_rx: Instant,
    rx: Traffic,
    tx: Traffic,
    /// Authenticated bytes received from this address for this session, duplicate copies
    /// included once they open (forged datagrams never count): the anti-amplification
    /// budget before validation.
    heard_bytes: u64,
    receipts: ProbeReceipts,
    /// The loss towards the client on this path, as the client reports it in its probes.
    reported_loss: Option<f64>,
    /// The path's round trip as the client's probes say (for `SentLog` evidence).
    reported_rtt: Option<Duration>,
    /// Coded and adaptive sessions: data sent here and the client's receipts for it, and data
    /// received here for ours.
    sent_log: SentLog,
    receipt_loss: LossEstimate,
    recv_log: RecvLog,
}

/// Receipts of data outweigh the client's probe-based report once they cover this many
/// datagrams.
const RECEIPT_SAMPLES_TRUSTED: f64 = 256.0;

impl ServerPath {
    /// The loss towards the client, for redundancy.
    fn loss_estimate(&self) -> Option<f64> {
        if self.receipt_loss.samples() >= RECEIPT_SAMPLES_TRUSTED {
            self.receipt_loss.get()
        } else {
            self.reported_loss
        }
    }
}

impl ServerPath {
    /// Bytes we may still send before validation (anti-amplification).
    fn budget(&self) -> u64 {
        self.heard_bytes.saturating_sub(self.tx.bytes)
    }
}

struct ServerSession {
    id: SessionId,
    keys: SessionKeys,
    target: SocketAddr,
    init: [u8; HANDSHAKE_INIT_MAX_LEN],
    init_len: usize,
    response: [u8; HANDSHAKE_RESP_LEN],
    send_seq: u64,
    replay: ReplayWindow,
    paths: Vec<ServerPath>,
    created: Instant,
    last_rx: Option<Instant>,
    tx: Traffic,
    rx: Traffic,
    drops: DropCounters,
    sender: RedundancySender,
    receiver: RedundancyReceiver,
    /// Coded or adaptive: when the next receipt goes out (set when data arrives), and whether it
    /// is due.
    receipt_at: Option<Instant>,
    receipt_due: bool,
    /// Already in the server's queue of sessions with parity or a receipt to send.
    parity_queued: bool,
    /// Already in the server's queue of sessions with rebuilt datagrams.
    recovered_queued: bool,
}

/// Probe replies are sealed into the buffer a handshake response uses.
const _: () = assert!(
    TRANSPORT_HEADER_LEN + PROBE_REPLY_LEN + AEAD_TAG_LEN <= HANDSHAKE_RESP_LEN,
    "a sealed probe reply fits a handshake response's buffer"
);
// ... and is never larger than the probe it answers: no amplification.
const _: () = assert!(PROBE_REPLY_LEN <= PROBE_LEN);

pub struct Server {
    psk: Psk,
    entropy: Box<dyn Entropy>,
    cfg: ServerCoreConfig,
    epoch: Instant,
    sessions: Vec<Option<ServerSession>>,
    free: Vec<SessionSlot>,
    by_id: HashMap<SessionId, SessionSlot>,
    events: VecDeque<ServerEvent>,
    drops: DropCounters,
    next_sweep: Instant,
    /// The wall clock at `epoch` (ms since the Unix epoch).
    wall_at_epoch_ms: u64,
    /// Session ids opened within `RECENT_INITS_KEPT`, oldest first.
    recent_inits: VecDeque<(Instant, SessionId)>,
    recent_ids: HashSet<SessionId>,
    init_limiter: InitLimiter,
    next_source_sweep: Instant,
    /// Sessions no authenticated transport datagram has arrived for yet (opened by an
    /// init alone, which anyone who captured one can replay): at most half the table, and
    /// the oldest gives way to a new init rather than anyone being refused.
    half_open: usize,
    /// Deadlines of open coding groups and receipts (an entry of a closed session, or
    /// one whose work is done, finds nothing to do when it comes up).
    group_deadlines: BinaryHeap<Reverse<(Instant, SessionSlot)>>,
    /// Sessions with parity or a receipt to send, for `poll_transmit`.
    parity_ready: VecDeque<SessionSlot>,
    /// Sessions with datagrams rebuilt from parity, for `poll_recovered`.
    recovered: VecDeque<SessionSlot>,
}

impl Server {
    /// A server core drawing handshake keys and path challenges from `entropy`.
    /// `wall_ms` is the wall clock at `now` (ms since the Unix epoch), for init freshness.
    pub fn new(psk: Psk, cfg: ServerCoreConfig, now: Instant, wall_ms: u64, entropy: Box<dyn Entropy>) -> Self {
        assert!(cfg.max_paths_per_session >= 1 && cfg.max_paths_per_session <= MAX_PATHS, "validated by config");
        Self {
            psk,
            entropy,
            cfg,
            epoch: now,
            sessions: Vec::new(),
            free: Vec::new(),
            by_id: HashMap::new(),
            events: VecDeque::new(),
            drops: DropCounters::default(),
            next_sweep: now + SWEEP_INTERVAL,
            wall_at_epoch_ms: wall_ms,
            recent_inits: VecDeque::new(),
            recent_ids: HashSet::new(),
            init_limiter: InitLimiter::default(),
            next_source_sweep: now + SOURCE_SWEEP_INTERVAL,
            half_open: 0,
            group_deadlines: BinaryHeap::new(),
            parity_ready: VecDeque::new(),
            recovered: VecDeque::new(),
        }
    }

    pub fn session_count(&self) -> usize {
        self.by_id.len()
    }

    fn drop_global(&mut self, reason: DropReason) -> ServerRecv {
        self.drops.count(reason);
        ServerRecv::Dropped(reason)
    }

    /// One datagram from `from` on the listening socket, in `buf` (opened in place).
    /// A reply, if any, is written to `out`.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        buf: &mut [u8],
        out: &mut [u8; HANDSHAKE_RESP_LEN],
    ) -> ServerRecv {
        self.handle_datagram_to(now, from, None, buf, out)
    }

    /// `handle_datagram` for a socket bound to a wildcard address: `local` is the address
    /// the datagram was sent to (IP_PKTINFO). A path remembers it from its fresh,
    /// authenticated datagrams, for `path_local`.
    pub fn handle_datagram_to(
        &mut self,
        now: Instant,
        from: SocketAddr,
        local: Option<IpAddr>,
        buf: &mut [u8],
        out: &mut [u8; HANDSHAKE_RESP_LEN],
    ) -> ServerRecv {
        match wire::message_type(buf) {
            Ok(TYPE_TRANSPORT) => self.recv_transport(now, from, local, buf, out),
            Ok(TYPE_HANDSHAKE_INIT) => self.recv_init(now, from, buf, out),
            Ok(TYPE_HANDSHAKE_RESP) => self.drop_global(DropReason::Unexpected),
            _ => self.drop_global(DropReason::Malformed),
        }
    }

    fn recv_init(
        &mut self,
        now: Instant,
        from: SocketAddr,
        buf: &[u8],
        out: &mut [u8; HANDSHAKE_RESP_LEN],
    ) -> ServerRecv {
        // before any MAC: a flood from one source costs a hash lookup
        if !self.init_limiter.allow(now, from.ip()) {
            return self.drop_global(DropReason::RateLimited);
        }
        let accepted = match crypto::verify_init(&self.psk, buf) {
            Ok(a) => a,
            Err(crypto::HandshakeError::BadMac) => return self.drop_global(DropReason::BadMac),
            Err(_) => return self.drop_global(DropReason::Malformed),
        };
        if let Some(&slot) = self.by_id.get(&accepted.session) {
            let s = self.sessions[slot].as_mut().expect("indexed session exists");
            if &s.init[..s.init_len] == buf {
                // the same init over another path: the same answer, no new state
                out.copy_from_slice(&s.response);
                return ServerRecv::Reply { len: HANDSHAKE_RESP_LEN };
            }
            return self.drop_global(DropReason::Unexpected);
        }
        let wall_ms = self.wall_at_epoch_ms + now.saturating_duration_since(self.epoch).as_millis() as u64;
        let fresh = accepted.timestamp_ms.abs_diff(wall_ms) <= INIT_FRESHNESS.as_millis() as u64;
        if fresh && self.recent_ids.contains(&accepted.session) {
            // a session opened by this very init already came and went
            return self.drop_global(DropReason::ReplayedInit);
        }
        let target = if accepted.target.is_empty() {
            self.cfg.default_target
        } else {
            self.cfg.targets.get(accepted.target).copied()
        };
        // a fresh init for a real target: the oldest half-open session gives way if the
        // table, or its half-open part, is full (replayed inits never keep anyone out)
        let redundancy = RedundancyConfig::from_request(accepted.redundancy.as_ref());
        let servable = fresh
            && target.is_some()
            && accepted.cipher.is_some_and(|c| self.cfg.ciphers.contains(&c))
            && redundancy.is_ok();
        if servable && (self.by_id.len() >= self.cfg.max_sessions || self.half_open >= self.max_half_open()) {
            self.evict_oldest_half_open();
        }
        let status = match (target, accepted.cipher) {
            // signed, so a client with a wrong clock learns why; no state is kept
            _ if !fresh => HandshakeStatus::StaleInit,
            (None, _) => HandshakeStatus::UnknownTarget,
            (_, c) if c.is_none_or(|c| !self.cfg.ciphers.contains(&c)) => HandshakeStatus::CipherRefused,
            _ if redundancy.is_err() => HandshakeStatus::RedundancyRefused,
            _ if self.by_id.len() >= self.cfg.max_sessions => HandshakeStatus::ServerFull,
            _ => HandshakeStatus::Ok,
        };
        let id = accepted.session;
        let keys = match crypto::respond(&self.psk, &mut *self.entropy, buf, status, out) {
            Ok(k) => k,
            Err(_) => return self.drop_global(DropReason::Malformed),
        };
        let (Some(keys), Some(target), Ok(redundancy)) = (keys, target, redundancy) else {
            self.drops.count(DropReason::Refused);
            self.events.push_back(ServerEvent::Refused { from, status });
            return ServerRecv::Reply { len: HANDSHAKE_RESP_LEN };
        };
        let mut init = [0u8; HANDSHAKE_INIT_MAX_LEN];
        init[..buf.len()].copy_from_slice(buf);
        let cipher = keys.cipher();
        let session = ServerSession {
            id,
            keys,
            target,
            init,
            init_len: buf.len(),
            response: *out,
            send_seq: 0,
            replay: ReplayWindow::new(),
            paths: Vec::new(),
            created: now,
            last_rx: None,
            tx: Traffic::default(),
            rx: Traffic::default(),
            drops: DropCounters::default(),
            sender: RedundancySender::new(redundancy),
            receiver: RedundancyReceiver::default(),
            receipt_at: None,
            receipt_due: false,
            parity_queued: false,
            recovered_queued: false,
        };
        let slot = match self.free.pop() {
            Some(i) => {
                self.sessions[i] = Some(session);
                i
            }
            None => {
                self.sessions.push(Some(session));
                self.sessions.len() - 1
            }
        };
        self.by_id.insert(id, slot);
        self.half_open += 1;
        self.recent_ids.insert(id);
        self.recent_inits.push_back((now, id));
        self.events.push_back(ServerEvent::SessionOpened { slot, id, target, cipher });
        ServerRecv::Reply { len: HANDSHAKE_RESP_LEN }
    }

    fn recv_transport(
        &mut self,
        now: Instant,
        from: SocketAddr,
        local: Option<IpAddr>,
        buf: &mut [u8],
        out: &mut [u8; HANDSHAKE_RESP_LEN],
    ) -> ServerRecv {
        let Ok(pkt) = TransportPacket::new_checked(&buf[..]) else {
            return self.drop_global(DropReason::Malformed);
        };
        let (id, seq) = (pkt.session_id(), pkt.seq());
        let Some(&slot) = self.by_id.get(&id) else {
            return self.drop_global(DropReason::UnknownSession);
        };
        let max_paths = self.cfg.max_paths_per_session;
        let s = self.sessions[slot].as_mut().expect("indexed session exists");
        let datagram_len = buf.len();
        let known_path = s.paths.iter().position(|p| p.addr == from);
        match s.replay.check(seq) {
            ReplayVerdict::Fresh => {}
            ReplayVerdict::Duplicate => {
                // a copy on a path not validated yet earns it reply budget once it
                // authenticates (the copy that won came on another path); in a coded or
                // adaptive session every authentic copy counts for its path's receipts
                let receipts = s.sender.uses_receipts();
                if let Some(p) = known_path.map(|i| &mut s.paths[i]).filter(|p| !p.validated || receipts) {
                    if let Ok(plain_len) = s.keys.open(seq, buf) {
                        if !p.validated {
                            p.heard_bytes += datagram_len as u64;
                        }
                        if receipts && is_data_plane(&buf[TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + plain_len]) {
                            p.recv_log.on_datagram(seq);
                        }
                    }
                }
                s.drops.count(DropReason::Duplicate);
                return ServerRecv::Dropped(DropReason::Duplicate);
            }
            ReplayVerdict::TooOld => {
                s.drops.count(DropReason::TooOld);
                return ServerRecv::Dropped(DropReason::TooOld);
            }
        }
        let Ok(plain_len) = s.keys.open(seq, buf) else {
            s.drops.count(DropReason::AuthFailed);
            return ServerRecv::Dropped(DropReason::AuthFailed);
        };
        s.replay.mark(seq);
        if s.last_rx.replace(now).is_none() {
            self.half_open -= 1; // the initiator holds the session's keys: it is real
        }
        let path = match known_path {
            Some(i) => Some(i),
            None => s.learn_path(now, from, &mut *self.entropy, max_paths, slot, &mut self.events),
        };
        if let Some(i) = path {
            let p = &mut s.paths[i];
            // only bytes that authenticated earn an unvalidated address a reply budget
            p.heard_bytes += datagram_len as u64;
            p.last_rx = now;
            p.local = local;
            p.rx.add(datagram_len);
        }
        let plain = &buf[TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + plain_len];
        let inner = InnerRepr::parse(plain);
        if s.sender.uses_receipts() {
            if let Some(p) = path.map(|i| &mut s.paths[i]).filter(|_| is_data_plane(plain)) {
                p.recv_log.on_datagram(seq);
            }
            // receipts go out while anything arrives, so a path whose data stopped shows
            if s.receipt_at.is_none() {
                let at = now + RECEIPT_INTERVAL;
                s.receipt_at = Some(at);
                self.group_deadlines.push(Reverse((at, slot)));
            }
        }
        match inner {
            Ok(InnerRepr::Receipt(r)) => {
                for e in r.entries() {
                    let Some(p) = s.paths.iter_mut().find(|p| p.client_path_id == Some(e.path_id)) else { continue };
                    let count = p.sent_log.on_receipt(now, e.highest, e.received, p.reported_rtt);
                    if let Some((sent, lost)) = count.counted {
                        p.receipt_loss.add(lost as f64, sent as f64);
                    }
                    if count.newly_stalled {
                        s.sender.review_soon();
                    }
                }
                ServerRecv::Consumed
            }
            Ok(InnerRepr::Data(d)) => {
                s.rx.add(d.len());
                ServerRecv::Forward { slot, payload: DATA_PAYLOAD_OFFSET..DATA_PAYLOAD_OFFSET + d.len() }
            }
            Ok(InnerRepr::FecData(d, tag)) => {
                let deliver = s.receiver.handle_data(tag, d);
                let len = d.len();
                if deliver {
                    s.rx.add(len);
                }
                self.note_recovered(slot);
                if deliver {
                    ServerRecv::Forward { slot, payload: DATA_PAYLOAD_OFFSET..DATA_PAYLOAD_OFFSET + len }
                } else {
                    // parity rebuilt it before it came
                    self.count(slot, DropReason::Duplicate)
                }
            }
            Ok(InnerRepr::FecParity(h, shard)) => {
                s.receiver.handle_parity(h, shard);
                self.note_recovered(slot);
                ServerRecv::Consumed
            }
            Ok(InnerRepr::Probe(probe)) => {
                let Some(i) = path else {
                    // no room for another path: nowhere we may answer
                    s.drops.count(DropReason::NoPathSlot);
                    return ServerRecv::Dropped(DropReason::NoPathSlot);
                };
                let p = &mut s.paths[i];
                p.client_path_id = Some(probe.path_id);
                p.reported_loss = probe.down_loss_ppm.map(|ppm| f64::from(ppm.min(1_000_000)) / 1e6);
                p.reported_rtt = probe.rtt_us.map(|us| Duration::from_micros(u64::from(us)));
                p.client_says_down = probe.flags & PROBE_FLAG_PATH_DOWN != 0;
                p.receipts.on_probe(probe.probe_seq);
                if !p.validated && probe.echo_challenge == p.challenge {
                    p.validated = true;
                    self.events.push_back(ServerEvent::PathValidated { slot, addr: from });
                }
                let reply = InnerRepr::ProbeReply(ProbeReplyRepr {
                    path_id: probe.path_id,
                    probe_seq: probe.probe_seq,
                    tx_time_us: probe.tx_time_us,
                    challenge: p.challenge,
                    rx_highest: p.receipts.highest(),
                    rx_bitmap: p.receipts.bitmap(),
                    flags: if p.validated { PROBE_REPLY_FLAG_VALIDATED } else { 0 },
                });
                let n = s.send_seq;
                s.send_seq += 1;
                emit_transport_header(out, s.id, n);
                // a sealed probe reply fits the handshake-response-sized buffer (asserted
                // at compile time below)
                let plain = reply.emit(&mut out[TRANSPORT_HEADER_LEN..]).expect("reply fits");
                let len = s.keys.seal(n, out, plain);
                s.paths[i].tx.add(len);
                ServerRecv::Reply { len }
            }
            Ok(InnerRepr::ProbeReply(_)) => {
                s.drops.count(DropReason::Unexpected);
                ServerRecv::Dropped(DropReason::Unexpected)
            }
            Err(_) => {
                s.drops.count(DropReason::Malformed);
                ServerRecv::Dropped(DropReason::Malformed)
            }
        }
    }

    /// Seals a datagram from the session's target (payload at
    /// `buf[DATA_PAYLOAD_OFFSET..DATA_PAYLOAD_OFFSET + payload_len]`, with `AEAD_TAG_LEN`
    /// bytes of room after it; with `DATA_TAIL_ROOM` it may also join a coding group).
    /// Returns the datagram length and the paths to send `buf[..len]` on; look their
    /// addresses up with `path_addr`/`path_local` before the next `handle_datagram` or
    /// `handle_timeout`, which may learn or drop paths (sealing more does not). Parity
    /// it makes ready goes out through `poll_transmit`.
    pub fn encapsulate(
        &mut self,
        now: Instant,
        slot: SessionSlot,
        buf: &mut [u8],
        payload_len: usize,
    ) -> Option<(usize, PathMask)> {
        let s = self.sessions.get_mut(slot).and_then(Option::as_mut)?;
        if payload_len > MAX_APP_PAYLOAD || buf.len() < DATA_PAYLOAD_OFFSET + payload_len + AEAD_TAG_LEN {
            s.drops.count(DropReason::Malformed);
            return None;
        }
        // what a plain copy weighs: an unvalidated path gets nothing else
        let len = crate::wire::PLAIN_TUNNEL_OVERHEAD + payload_len;
        // Validated, fresh paths the client has not reported dead; plus unvalidated ones
        // (a relay that restarted, a new NAT mapping) within their anti-amplification
        // budget; failing both, any validated path.
        let mut paths = PathMask::EMPTY;
        let mut validated = PathMask::EMPTY;
        let mut live = PathMask::EMPTY;
        for (i, p) in s.paths.iter().enumerate() {
            if p.validated {
                validated.insert(i);
                if !p.client_says_down && now.saturating_duration_since(p.last_rx) < PATH_SILENT_AFTER {
                    paths.insert(i);
                    live.insert(i);
                }
            } else if p.budget() >= len as u64 {
                paths.insert(i);
            }
        }
        if paths.is_empty() {
            paths = validated;
        }
        if paths.is_empty() {
            s.drops.count(DropReason::NoPath);
            return None;
        }
        let had_group = s.sender.poll_timeout().is_some();
        let (len, paths) = s.seal_data(now, live, paths, buf, payload_len);
        if let (false, Some(deadline)) = (had_group, s.sender.poll_timeout()) {
            self.group_deadlines.push(Reverse((deadline, slot)));
        }
        if s.sender.has_output() && !s.parity_queued {
            s.parity_queued = true;
            self.parity_ready.push_back(slot);
        }
        Some((len, paths))
    }

    /// The next parity shard, repeated copy or receipt to send: its session, `buf[..len]`,
    /// and the paths (look their addresses up as after `encapsulate`). Drain it after each
    /// batch of `encapsulate` and after `handle_timeout`.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<(SessionSlot, usize, PathMask)> {
        while let Some(&slot) = self.parity_ready.front() {
            if let Some(s) = self.sessions.get_mut(slot).and_then(Option::as_mut) {
                let n = s.send_seq;
                if let Some(out) = s.sender.poll_output(buf) {
                    let (len, paths) = match out {
                        SenderOutput::Parity { plain_len, paths } => {
                            s.send_seq += 1;
                            emit_transport_header(buf, s.id, n);
                            (s.keys.seal(n, buf, plain_len), paths)
                        }
                        SenderOutput::Repeat { len, paths } => (len, paths),
                    };
                    let seq = TransportPacket::new_checked(&buf[..len]).map_or(n, |p| p.seq());
                    s.count_sent(now, seq, len, paths);
                    return Some((slot, len, paths));
                }
                if std::mem::take(&mut s.receipt_due) {
                    if let Some((len, paths)) = s.seal_receipt(now, buf) {
                        return Some((slot, len, paths));
                    }
                }
                s.parity_queued = false;
            }
            self.parity_ready.pop_front();
        }
        None
    }

    /// Queues `slot` for `poll_recovered` if parity rebuilt datagrams of it.
    fn note_recovered(&mut self, slot: SessionSlot) {
        if let Some(s) = self.sessions.get_mut(slot).and_then(Option::as_mut) {
            if !s.recovered_queued && s.receiver.has_recovered() {
                s.recovered_queued = true;
                self.recovered.push_back(slot);
            }
        }
    }

    /// The next datagram rebuilt from parity, copied to `buf`: its session and length,
    /// to forward to the session's target as a `Forward` would. Drain it after every
    /// datagram handed in.
    pub fn poll_recovered(&mut self, buf: &mut [u8]) -> Option<(SessionSlot, usize)> {
        while let Some(&slot) = self.recovered.front() {
            if let Some(s) = self.sessions.get_mut(slot).and_then(Option::as_mut) {
                if let Some(n) = s.receiver.poll_recovered(buf) {
                    s.rx.add(n);
                    return Some((slot, n));
                }
                s.recovered_queued = false;
            }
            self.recovered.pop_front();
        }
        None
    }

    fn count(&mut self, slot: SessionSlot, reason: DropReason) -> ServerRecv {
        if let Some(s) = self.sessions.get_mut(slot).and_then(Option::as_mut) {
            s.drops.count(reason);
        }
        ServerRecv::Dropped(reason)
    }

    /// The paths of `slot` that carry data now: validated, heard from within
    /// `PATH_SILENT_AFTER`, and not reported down by the client.
    pub fn live_paths(&self, now: Instant, slot: SessionSlot) -> PathMask {
        let mut live = PathMask::EMPTY;
        let Some(s) = self.sessions.get(slot).and_then(Option::as_ref) else { return live };
        for (i, p) in s.paths.iter().enumerate() {
            if p.validated && !p.client_says_down && now.saturating_duration_since(p.last_rx) < PATH_SILENT_AFTER {
                live.insert(i);
            }
        }
        live
    }

    pub fn path_addr(&self, slot: SessionSlot, path: usize) -> Option<SocketAddr> {
        self.sessions.get(slot)?.as_ref()?.paths.get(path).map(|p| p.addr)
    }

    /// The local address to send this path's datagrams from (see `handle_datagram_to`);
    /// `None`: the kernel's choice.
    pub fn path_local(&self, slot: SessionSlot, path: usize) -> Option<IpAddr> {
        self.sessions.get(slot)?.as_ref()?.paths.get(path)?.local
    }

    pub fn session_target(&self, slot: SessionSlot) -> Option<SocketAddr> {
        self.sessions.get(slot)?.as_ref().map(|s| s.target)
    }

    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Instant {
        match self.group_deadlines.peek() {
            Some(Reverse((t, _))) => self.next_sweep.min(*t),
            None => self.next_sweep,
        }
    }

    /// Closes coding groups at their deadline (their parity is then ready for
    /// `poll_transmit`); expires silent paths and sessions.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&Reverse((t, slot))) = self.group_deadlines.peek() {
            if t > now {
                break;
            }
            self.group_deadlines.pop();
            if let Some(s) = self.sessions.get_mut(slot).and_then(Option::as_mut) {
                s.sender.handle_timeout(now);
                if s.receipt_at.is_some_and(|at| now >= at) {
                    s.receipt_at = None;
                    s.receipt_due = true;
                }
                if (s.sender.has_output() || s.receipt_due) && !s.parity_queued {
                    s.parity_queued = true;
                    self.parity_ready.push_back(slot);
                }
            }
        }
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now + SWEEP_INTERVAL;
        if now >= self.next_source_sweep {
            self.init_limiter.sweep(now);
            self.next_source_sweep = now + SOURCE_SWEEP_INTERVAL;
        }
        while let Some(&(at, id)) = self.recent_inits.front() {
            if now.saturating_duration_since(at) < RECENT_INITS_KEPT {
                break;
            }
            self.recent_inits.pop_front();
            self.recent_ids.remove(&id);
        }
        for slot in 0..self.sessions.len() {
            let Some(s) = self.sessions[slot].as_mut() else {
                continue;
            };
            let expired = match s.last_rx {
                Some(t) => now.saturating_duration_since(t) >= self.cfg.session_timeout,
                None => now.saturating_duration_since(s.created) >= HALF_OPEN_TIMEOUT,
            };
            if expired {
                self.close(slot);
                continue;
            }
            s.paths.retain(|p| {
                let keep = now.saturating_duration_since(p.last_rx) < PATH_EXPIRE_AFTER;
                if !keep {
                    self.events.push_back(ServerEvent::PathRemoved { slot, addr: p.addr });
                }
                keep
            });
        }
    }

    /// The front end could not serve the session it was just told about (its upstream
    /// socket failed): the session is closed and `out` gets a signed refusal of the init
    /// that opened it, to send instead of the response. False if there is no such session.
    pub fn refuse_opened(
        &mut self,
        slot: SessionSlot,
        status: HandshakeStatus,
        out: &mut [u8; HANDSHAKE_RESP_LEN],
    ) -> bool {
        let Some(s) = self.close(slot) else { return false };
        self.drops.count(DropReason::Refused);
        crypto::respond(&self.psk, &mut *self.entropy, &s.init[..s.init_len], status, out).is_ok()
    }

    /// Closes session `slot`: its id and slot are free, `SessionClosed` says so.
    fn close(&mut self, slot: SessionSlot) -> Option<ServerSession> {
        let s = self.sessions.get_mut(slot).and_then(Option::take)?;
        if s.last_rx.is_none() {
            self.half_open -= 1;
        }
        self.by_id.remove(&s.id);
        self.free.push(slot);
        self.events.push_back(ServerEvent::SessionClosed { slot, id: s.id });
        Some(s)
    }

    /// Half-open sessions at most: half the table, so replayed inits never hold it all.
    fn max_half_open(&self) -> usize {
        (self.cfg.max_sessions / 2).max(1)
    }

    /// Closes the half-open session opened first, if there is one.
    fn evict_oldest_half_open(&mut self) {
        let oldest = (0..self.sessions.len())
            .filter_map(|slot| self.sessions[slot].as_ref().filter(|s| s.last_rx.is_none()).map(|s| (s.created, slot)))
            .min();
        if let Some((_, slot)) = oldest {
            self.close(slot);
        }
    }

    pub fn status(&self, now: Instant, listen: &str) -> StatusReport {
        let sessions = self
            .sessions
            .iter()
            .flatten()
            .map(|s| SessionStatus {
                id: s.id.to_string(),
                peer: s.target.to_string(),
                state: if s.last_rx.is_some() { SessionState::Established } else { SessionState::HalfOpen },
                cipher: s.keys.cipher().name().into(),
                age_s: now.saturating_duration_since(s.created).as_secs(),
                idle_s: now.saturating_duration_since(s.last_rx.unwrap_or(s.created)).as_secs(),
                tx: s.tx,
                rx: s.rx,
                drops: s.drops.clone(),
                redundancy: Some(RedundancyStatus::of(&s.sender, &s.receiver, s.replay.missed(), s.rx.packets)),
                paths: s
                    .paths
                    .iter()
                    .map(|p| PathStatus {
                        name: match p.client_path_id {
                            Some(id) => format!("{} (#{id})", p.addr),
                            None => p.addr.to_string(),
                        },
                        state: if !p.validated {
                            PathState::Unvalidated
                        } else if p.client_says_down || now.saturating_duration_since(p.last_rx) >= PATH_SILENT_AFTER {
                            PathState::Down
                        } else {
                            PathState::Up
                        },
                        rtt_ms: None,
                        jitter_ms: None,
                        loss_up: None,
                        loss_down: None,
                        tx: p.tx,
                        rx: p.rx,
                    })
                    .collect(),
            })
            .collect();
        StatusReport {
            role: "mpserver".into(),
            listen: listen.into(),
            uptime_s: now.saturating_duration_since(self.epoch).as_secs(),
            drops: self.drops.clone(),
            evicted_sessions: 0,
            max_sessions: self.cfg.max_sessions,
            remotes: Vec::new(),
            sessions,
        }
    }
}

/// Whether an opened inner message is data (plain or coded): what receipts count.
pub(crate) fn is_data_plane(plain: &[u8]) -> bool {
    matches!(plain.first(), Some(&(INNER_DATA | INNER_FEC_DATA | crate::wire::INNER_FEC_PARITY)))
}

impl ServerSession {
    /// Seals a datagram from the target as the session's redundancy plans it over the
    /// `live` paths; `fallback` is where plain copies go when it plans none.
    fn seal_data(
        &mut self,
        now: Instant,
        live: PathMask,
        fallback: PathMask,
        buf: &mut [u8],
        payload_len: usize,
    ) -> (usize, PathMask) {
        if self.sender.wants_review(now) {
            let paths = &self.paths;
            self.sender.review(
                now,
                live.iter().map(|i| PathEstimate {
                    index: i,
                    loss: paths[i].loss_estimate(),
                    rtt: None,
                    overdue: now.saturating_duration_since(paths[i].last_rx) >= PATH_OVERDUE_AFTER,
                    stalled: paths[i].sent_log.stalled(now, stall_patience(None)),
                }),
            );
        }
        let tag_room = buf.len() >= DATA_PAYLOAD_OFFSET + payload_len + DATA_TAIL_ROOM;
        let plan =
            self.sender.plan(now, &buf[DATA_PAYLOAD_OFFSET..DATA_PAYLOAD_OFFSET + payload_len], tag_room, fallback);
        let mut paths = PathMask(plan.paths.0 & fallback.0);
        if paths.is_empty() {
            paths = fallback;
        }
        let n = self.send_seq;
        self.send_seq += 1;
        emit_transport_header(buf, self.id, n);
        let plain = match plan.tag {
            Some(tag) => {
                buf[TRANSPORT_HEADER_LEN] = INNER_FEC_DATA;
                let at = DATA_PAYLOAD_OFFSET + payload_len;
                tag.emit((&mut buf[at..at + crate::fec::DATA_TAG_LEN]).try_into().expect("room checked"));
                1 + payload_len + crate::fec::DATA_TAG_LEN
            }
            None => {
                buf[TRANSPORT_HEADER_LEN] = INNER_DATA;
                1 + payload_len
            }
        };
        let len = self.keys.seal(n, buf, plain);
        self.tx.add(payload_len);
        self.count_sent(now, n, len, paths);
        if plan.copies > 1 {
            self.sender.repeat(&buf[..len], paths, plan.copies - 1);
        }
        (len, paths)
    }

    /// Counts datagram `seq` of `len` bytes sent on `paths` (and logs it for receipts, in
    /// a coded or adaptive session).
    fn count_sent(&mut self, now: Instant, seq: u64, len: usize, paths: PathMask) {
        let receipts = self.sender.uses_receipts();
        self.sender.count_wire(len, paths.len());
        for i in paths.iter() {
            if let Some(p) = self.paths.get_mut(i) {
                p.tx.add(len);
                if receipts {
                    p.sent_log.record(now, seq);
                }
            }
        }
    }

    /// The receipt of what arrived on each path, sealed into `buf`, for every validated
    /// live path (a receipt is small, and one lost with a dying path would make the
    /// others look dead too).
    fn seal_receipt(&mut self, now: Instant, buf: &mut [u8]) -> Option<(usize, PathMask)> {
        let mut paths = PathMask::EMPTY;
        for (i, p) in self.paths.iter().enumerate() {
            if p.validated && now.saturating_duration_since(p.last_rx) < PATH_SILENT_AFTER {
                paths.insert(i);
            }
        }
        if paths.is_empty() {
            return None;
        }
        let with_id = |p: &&ServerPath| p.recv_log.received > 0 && p.client_path_id.is_some();
        let count = self.paths.iter().filter(with_id).count();
        let entries = self.paths.iter().filter(with_id).map(|p| ReceiptEntry {
            path_id: p.client_path_id.unwrap_or_default(),
            highest: p.recv_log.highest,
            received: p.recv_log.received,
        });
        let plain = crate::wire::emit_receipt(&mut buf[TRANSPORT_HEADER_LEN..], crate::ExactLen(entries, count))?;
        let n = self.send_seq;
        self.send_seq += 1;
        emit_transport_header(buf, self.id, n);
        let len = self.keys.seal(n, buf, plain);
        for i in paths.iter() {
            self.paths[i].tx.add(len);
        }
        Some((len, paths))
    }

    /// Adds `from` as a path after an authenticated datagram from it, evicting a silent
    /// path if the session is at its cap. Returns the new path's index, if added.
    fn learn_path(
        &mut self,
        now: Instant,
        from: SocketAddr,
        entropy: &mut dyn Entropy,
        max_paths: usize,
        slot: SessionSlot,
        events: &mut VecDeque<ServerEvent>,
    ) -> Option<usize> {
        if self.paths.len() >= max_paths {
            let (i, oldest) = self.paths.iter().enumerate().min_by_key(|(_, p)| p.last_rx)?;
            if now.saturating_duration_since(oldest.last_rx) < PATH_SILENT_AFTER {
                return None;
            }
            events.push_back(ServerEvent::PathRemoved { slot, addr: oldest.addr });
            self.paths.swap_remove(i);
        }
        // never 0: a client that has no challenge yet echoes 0
        let challenge = entropy.next_u64().max(1);
        self.paths.push(ServerPath {
            addr: from,
            local: None,
            client_path_id: None,
            challenge,
            validated: false,
            client_says_down: false,
            last_rx: now,
            rx: Traffic::default(),
            tx: Traffic::default(),
            heard_bytes: 0,
            receipts: ProbeReceipts::default(),
            reported_loss: None,
            reported_rtt: None,
            sent_log: SentLog::default(),
            receipt_loss: LossEstimate::default(),
            recv_log: RecvLog::default(),
        });
        events.push_back(ServerEvent::PathAdded { slot, addr: from });
        Some(self.paths.len() - 1)
    }
}
