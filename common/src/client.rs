//! The client state machine: sessions per local application, shared paths.
//!
//! Every local application (distinct source address) gets its own session with its own
//! random id, handshake, keys and sequence space. All sessions share the client's paths
//! (one socket per path in the driver). A datagram from the application is sealed once
//! and the same bytes go out on the paths its session's redundancy picks (every live
//! path when duplicating; see `redundancy`); replies from any path pass the replay
//! window once and are handed back, and datagrams rebuilt from parity follow
//! (`poll_recovered`).
//!
//! Invariants:
//! - A session that hears nothing authenticated from the server for `SERVER_SILENT_AFTER`
//!   while it keeps probing starts over with a new id and handshake (the server restarted
//!   or forgot it). Datagrams accepted meanwhile wait in a bounded queue.
//! - Nothing is sent before the handshake but the init; nothing unauthenticated changes
//!   any state (the replay window is marked only after the AEAD opened a datagram).

use crate::crypto::{Cipher, ClientHandshake, HandshakeError, Psk, SessionKeys};
use crate::entropy::Entropy;
use crate::fec::DataTag;
use crate::path::ProbeTracker;
use crate::redundancy::{
    stall_patience, PathEstimate, RecvLog, RedundancyConfig, RedundancyReceiver, RedundancySender, SenderOutput,
    SentLog, RECEIPT_INTERVAL,
};
use crate::replay::{ReplayVerdict, ReplayWindow};
use crate::stats::{
    DropCounters, DropReason, PathState, PathStatus, RedundancyStatus, SessionStatus, StatusReport, Traffic,
};
use crate::wire::{
    self, emit_transport_header, HandshakeStatus, InnerRepr, ReceiptEntry, TransportPacket, AEAD_TAG_LEN,
    DATA_PAYLOAD_OFFSET, DATA_TAIL_ROOM, INNER_DATA, INNER_FEC_DATA, MAX_APP_PAYLOAD, TRANSPORT_HEADER_LEN,
    TYPE_HANDSHAKE_INIT, TYPE_HANDSHAKE_RESP, TYPE_TRANSPORT,
};
use crate::{PathMask, SessionId, MAX_PATHS};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::ops::Range;
use std::time::{Duration, Instant};

/// First handshake retry delay; doubles up to `HANDSHAKE_RETRY_MAX`. Inits are small
/// and answered from a cache, so an early retry is cheap.
pub const HANDSHAKE_RETRY_MIN: Duration = Duration::from_millis(150);
pub const HANDSHAKE_RETRY_MAX: Duration = Duration::from_millis(1000);
/// An init asking for a redundancy mode unanswered this many times: a plain init (no
/// extension, a new session id) goes out beside it from then on, since a server from
/// before redundancy modes drops an init it cannot parse without a word. Whichever is
/// answered first makes the session.
pub const PLAIN_INIT_AFTER_RETRIES: u32 = 2;
/// After a signed refusal (unknown target, server full) wait this long before asking again.
pub const REFUSED_BACKOFF: Duration = Duration::from_secs(5);
/// No authenticated answer on any path for this long: the server lost us; handshake again.
pub const SERVER_SILENT_AFTER: Duration = Duration::from_millis(1000);
/// Datagrams kept per session while a handshake is in flight (a lost handshake costs
/// one retry, ~150 ms: at 10k datagrams/s that is 1500 datagrams) ...
pub const PENDING_MAX_DATAGRAMS: usize = 4096;
/// ... and bytes.
pub const PENDING_MAX_BYTES: usize = 4 << 20;
pub const DEFAULT_SESSION_IDLE_TIMEOUT: Duration = Duration::from_secs(180);
pub const DEFAULT_MAX_SESSIONS: usize = 256;
/// A flow that never got a reply gives its session up after this long idle (as conntrack
/// does for unreplied UDP): one-shot flows (a DNS query from a fresh port each time) must
/// not hold the table for the whole idle timeout.
pub const UNREPLIED_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the client core needs to know (the driver's config is richer).
#[derive(Debug, Clone)]
pub struct ClientCoreConfig {
    pub cipher: Cipher,
    /// Named target to ask the server for ("" = its default).
    pub target: String,
    /// One name per path, for status output; the number of paths.
    pub path_names: Vec<String>,
    /// A session with no application traffic either way for this long is closed.
    pub session_idle_timeout: Duration,
    pub max_sessions: usize,
    /// How each session spreads its datagrams over the paths, both ways.
    pub redundancy: RedundancyConfig,
}

/// Something the driver may want to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    SessionStarted {
        app: SocketAddr,
        id: SessionId,
    },
    Established {
        app: SocketAddr,
        id: SessionId,
        cipher: Cipher,
    },
    Refused {
        app: SocketAddr,
        status: HandshakeStatus,
    },
    ServerLost {
        app: SocketAddr,
        old: SessionId,
    },
    PathUp {
        app: SocketAddr,
        path: usize,
    },
    PathDown {
        app: SocketAddr,
        path: usize,
    },
    SessionClosed {
        app: SocketAddr,
        id: SessionId,
    },
    /// The table was full: the longest-idle session made room for a new flow.
    SessionEvicted {
        app: SocketAddr,
        id: SessionId,
    },
    /// Only the plain init was answered (a server from before redundancy modes): the
    /// session duplicates.
    RedundancyUnsupported {
        app: SocketAddr,
        id: SessionId,
    },
}

/// Result of handing the core one datagram from the local application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientSend {
    /// `buf[..len]` is sealed; send those same bytes on every path in `paths` (after
    /// the batch, `poll_transmit` may have parity to send).
    Sealed {
        len: usize,
        paths: PathMask,
    },
    /// Kept until the session's handshake completes.
    Queued,
    Dropped(DropReason),
}

/// Result of handing the core one datagram that arrived on a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientRecv {
    /// Send `buf[payload]` to the local application at `app`.
    Deliver {
        app: SocketAddr,
        payload: Range<usize>,
    },
    /// A control message; nothing to deliver.
    Consumed,
    Dropped(DropReason),
}

/// A datagram to send: `buf[..len]` on every path in `paths`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    pub len: usize,
    pub paths: PathMask,
}

// One per session, and nearly always `Established`: boxing the keys would only add a
// pointer chase on the hot path.
#[allow(clippy::large_enum_variant)]
enum SessionState {
    Handshaking {
        hs: Box<ClientHandshake>,
        /// The plain init's handshake, once `PLAIN_INIT_AFTER_RETRIES` went unanswered.
        plain: Option<Box<ClientHandshake>>,
        next_retry: Instant,
        retry: Duration,
        retries: u32,
        due: bool,
        plain_due: bool,
    },
    Established {
        keys: SessionKeys,
        since: Instant,
    },
    Refused {
        until: Instant,
    },
}

#[derive(Default)]
struct PathCounters {
    tx: Traffic,
    rx: Traffic,
    /// Coded and adaptive sessions: data sent on the path and data received on it, for receipts.
    sent_log: SentLog,
    recv_log: RecvLog,
}

struct ClientSession {
    app: SocketAddr,
    id: SessionId,
    state: SessionState,
    send_seq: u64,
    replay: ReplayWindow,
    probes: Vec<ProbeTracker>,
    counters: Vec<PathCounters>,
    pending: VecDeque<Vec<u8>>,
    pending_bytes: usize,
    created: Instant,
    last_app_activity: Instant,
    last_server_rx: Instant,
    tx: Traffic,
    rx: Traffic,
    drops: DropCounters,
    sender: RedundancySender,
    receiver: RedundancyReceiver,
    /// Coded or adaptive: when the next receipt goes out (set when data arrives), and whether it
    /// is due.
    receipt_at: Option<Instant>,
    receipt_due: bool,
    /// Already in the client's ready queue.
    queued: bool,
    /// Already in the client's queue of sessions with rebuilt datagrams.
    recovered_queued: bool,
}

/// The client core. See the module docs.
pub struct Client {
    psk: Psk,
    entropy: Box<dyn Entropy>,
    cfg: ClientCoreConfig,
    epoch: Instant,
    sessions: Vec<Option<ClientSession>>,
    by_app: HashMap<SocketAddr, usize>,
    by_id: HashMap<SessionId, usize>,
    ready: VecDeque<usize>,
    /// Sessions with datagrams rebuilt from parity, for `poll_recovered`.
    recovered: VecDeque<usize>,
    events: VecDeque<ClientEvent>,
    /// Drops that belong to no session.
    drops: DropCounters,
    /// Sessions closed to make room for a new flow.
    evicted_sessions: u64,
    /// The wall clock at `epoch` (ms since the Unix epoch): inits carry it.
    wall_at_epoch_ms: u64,
    /// Paths left alone for now (`set_paused_paths`).
    paused: PathMask,
    /// Paths probed but given data only when no other path is live (`set_standby_paths`).
    standby: PathMask,
}

impl Client {
    /// A client core drawing session ids and handshake keys from `entropy`; `wall_ms` is
    /// the wall clock at `now` (ms since the Unix epoch), which inits carry for freshness.
    pub fn new(psk: Psk, cfg: ClientCoreConfig, now: Instant, wall_ms: u64, entropy: Box<dyn Entropy>) -> Self {
        assert!(!cfg.path_names.is_empty() && cfg.path_names.len() <= MAX_PATHS, "validated by config");
        Self {
            psk,
            entropy,
            cfg,
            epoch: now,
            sessions: Vec::new(),
            by_app: HashMap::new(),
            by_id: HashMap::new(),
            ready: VecDeque::new(),
            recovered: VecDeque::new(),
            events: VecDeque::new(),
            drops: DropCounters::default(),
            evicted_sessions: 0,
            wall_at_epoch_ms: wall_ms,
            paused: PathMask::EMPTY,
            standby: PathMask::EMPTY,
        }
    }

    /// Paths to leave alone until further notice: no handshake copies, probes or data go
    /// there, and their probes are not due (the mesh's direct paths between hole-punch
    /// windows: their trackers count only probes that went out).
    pub fn set_paused_paths(&mut self, paused: PathMask) {
        self.paused = paused;
    }

    /// Paths kept probed (so they are ready) that data goes on only while no other path
    /// is live (the mesh's relay with `relay: fallback`): the redundancy plans among the
    /// others.
    pub fn set_standby_paths(&mut self, standby: PathMask) {
        self.standby = standby;
    }

    /// The paths that are not paused.
    fn active_paths(&self) -> PathMask {
        PathMask(PathMask::first_n(self.path_count()).0 & !self.paused.0)
    }

    pub fn path_count(&self) -> usize {
        self.cfg.path_names.len()
    }

    fn now_us(&self, now: Instant) -> u32 {
        now.saturating_duration_since(self.epoch).as_micros() as u32
    }

    fn new_session_id(&mut self) -> SessionId {
        SessionId(self.entropy.next_u64())
    }

    /// A handshake for session `id`; `redundancy`: whether its init asks for the
    /// configured redundancy (the plain init does not).
    fn client_handshake(&mut self, id: SessionId, now: Instant, redundancy: bool) -> Box<ClientHandshake> {
        let key = self.entropy.x25519_key();
        let wall_ms = self.wall_at_epoch_ms + now.saturating_duration_since(self.epoch).as_millis() as u64;
        let request = if redundancy { self.cfg.redundancy.to_request() } else { None };
        Box::new(ClientHandshake::new(&self.psk, key, id, self.cfg.cipher, &self.cfg.target, wall_ms, request))
    }

    fn handshake(&mut self, id: SessionId, now: Instant) -> SessionState {
        SessionState::Handshaking {
            hs: self.client_handshake(id, now, true),
            plain: None,
            next_retry: now + HANDSHAKE_RETRY_MIN,
            retry: HANDSHAKE_RETRY_MIN,
            retries: 0,
            due: true,
            plain_due: false,
        }
    }

    fn mark_ready(&mut self, slot: usize) {
        if let Some(s) = self.sessions[slot].as_mut() {
            if !s.queued {
                s.queued = true;
                self.ready.push_back(slot);
            }
        }
    }

    /// Forgets the session in `slot`; returns its application and id.
    fn close_session(&mut self, slot: usize) -> Option<(SocketAddr, SessionId)> {
        let s = self.sessions[slot].take()?;
        self.by_app.remove(&s.app);
        self.by_id.remove(&s.id);
        if let Some(plain) = s.plain_id() {
            self.by_id.remove(&plain);
        }
        Some((s.app, s.id))
    }

    /// Sends a plain init beside the one asking for redundancy, for a new session id.
    fn start_plain_handshake(&mut self, now: Instant, slot: usize) {
        let id = self.new_session_id();
        let hs = self.client_handshake(id, now, false);
        let Some(s) = self.sessions[slot].as_mut() else { return };
        if let SessionState::Handshaking { plain, plain_due, .. } = &mut s.state {
            *plain = Some(hs);
            *plain_due = true;
            self.by_id.insert(id, slot);
        }
    }

    /// A session for a new application flow; when the table is full, the longest-idle
    /// session makes room (a new flow is never refused for an old one).
    fn open_session(&mut self, now: Instant, app: SocketAddr) -> usize {
        if self.by_app.len() >= self.cfg.max_sessions {
            let oldest = self.sessions.iter().enumerate().filter_map(|(i, s)| Some((s.as_ref()?.last_app_activity, i)));
            if let Some((app, id)) = oldest.min().and_then(|(_, slot)| self.close_session(slot)) {
                self.evicted_sessions += 1;
                self.events.push_back(ClientEvent::SessionEvicted { app, id });
            }
        }
        let id = self.new_session_id();
        let n = self.path_count();
        let session = ClientSession {
            app,
            id,
            state: self.handshake(id, now),
            send_seq: 0,
            replay: ReplayWindow::new(),
            probes: (0..n).map(|i| ProbeTracker::new(i as u8, now)).collect(),
            counters: (0..n).map(|_| PathCounters::default()).collect(),
            pending: VecDeque::new(),
            pending_bytes: 0,
            created: now,
            last_app_activity: now,
            last_server_rx: now,
            tx: Traffic::default(),
            rx: Traffic::default(),
            drops: DropCounters::default(),
            sender: RedundancySender::new(self.cfg.redundancy),
            receiver: RedundancyReceiver::default(),
            receipt_at: None,
            receipt_due: false,
            queued: false,
            recovered_queued: false,
        };
        let slot = match self.sessions.iter().position(Option::is_none) {
            Some(i) => {
                self.sessions[i] = Some(session);
                i
            }
            None => {
                self.sessions.push(Some(session));
                self.sessions.len() - 1
            }
        };
        self.by_app.insert(app, slot);
        self.by_id.insert(id, slot);
        self.events.push_back(ClientEvent::SessionStarted { app, id });
        self.mark_ready(slot);
        slot
    }

    /// A datagram from the local application at `from`. Its payload must already be at
    /// `buf[DATA_PAYLOAD_OFFSET..DATA_PAYLOAD_OFFSET + payload_len]`, and `buf` must have
    /// `AEAD_TAG_LEN` bytes of room after it; with `DATA_TAIL_ROOM` it may also join a
    /// coding group.
    pub fn handle_app_datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        buf: &mut [u8],
        payload_len: usize,
    ) -> ClientSend {
        if payload_len > MAX_APP_PAYLOAD || buf.len() < DATA_PAYLOAD_OFFSET + payload_len + AEAD_TAG_LEN {
            self.drops.count(DropReason::Malformed);
            return ClientSend::Dropped(DropReason::Malformed);
        }
        let slot = match self.by_app.get(&from) {
            Some(&s) => s,
            None => self.open_session(now, from),
        };
        let (paused, standby) = (self.paused, self.standby);
        let s = self.sessions[slot].as_mut().expect("indexed session exists");
        s.last_app_activity = now;
        if !matches!(s.state, SessionState::Established { .. }) {
            if s.pending.len() >= PENDING_MAX_DATAGRAMS || s.pending_bytes + payload_len > PENDING_MAX_BYTES {
                s.drops.count(DropReason::QueueFull);
                return ClientSend::Dropped(DropReason::QueueFull);
            }
            s.pending.push_back(buf[DATA_PAYLOAD_OFFSET..DATA_PAYLOAD_OFFSET + payload_len].to_vec());
            s.pending_bytes += payload_len;
            return ClientSend::Queued;
        }
        let (len, paths) = s.send_data(now, paused, standby, buf, payload_len);
        if s.sender.has_output() {
            self.mark_ready(slot);
        }
        ClientSend::Sealed { len, paths }
    }

    fn drop_global(&mut self, reason: DropReason) -> ClientRecv {
        self.drops.count(reason);
        ClientRecv::Dropped(reason)
    }

    /// A datagram that arrived on path `path` (already filtered by the driver to come
    /// from that path's remote address). Opened in place in `buf`.
    pub fn handle_path_datagram(&mut self, now: Instant, path: usize, buf: &mut [u8]) -> ClientRecv {
        if path >= self.path_count() {
            return self.drop_global(DropReason::Unexpected);
        }
        match wire::message_type(buf) {
            Ok(TYPE_TRANSPORT) => self.recv_transport(now, path, buf),
            Ok(TYPE_HANDSHAKE_RESP) => self.recv_response(now, buf),
            Ok(TYPE_HANDSHAKE_INIT) => self.drop_global(DropReason::Unexpected),
            _ => self.drop_global(DropReason::Malformed),
        }
    }

    fn recv_response(&mut self, now: Instant, buf: &[u8]) -> ClientRecv {
        let Ok(repr) = wire::HandshakeRespRepr::parse(buf) else {
            return self.drop_global(DropReason::Malformed);
        };
        let Some(&slot) = self.by_id.get(&repr.session) else {
            return self.drop_global(DropReason::UnknownSession);
        };
        let psk = self.psk.clone();
        let s = self.sessions[slot].as_mut().expect("indexed session exists");
        let SessionState::Handshaking { hs, plain, .. } = &mut s.state else {
            // the copy of the response that came over a slower path
            s.drops.count(DropReason::Duplicate);
            return ClientRecv::Dropped(DropReason::Duplicate);
        };
        let answers_plain = plain.as_ref().is_some_and(|p| p.session() == repr.session);
        let finished =
            if answers_plain { plain.as_mut().map(|p| p.finish(&psk, buf)) } else { Some(hs.finish(&psk, buf)) };
        let plain_id = plain.as_ref().map(|p| p.session());
        match finished.expect("one of the two handshakes") {
            Ok(keys) => {
                let cipher = keys.cipher();
                // the other handshake's id is forgotten: its answer, if any, is stale
                let loser = if answers_plain { s.id } else { plain_id.unwrap_or(s.id) };
                if loser != repr.session {
                    self.by_id.remove(&loser);
                }
                if answers_plain {
                    s.id = repr.session;
                    s.sender = RedundancySender::new(RedundancyConfig::default());
                    self.events.push_back(ClientEvent::RedundancyUnsupported { app: s.app, id: s.id });
                }
                s.state = SessionState::Established { keys, since: now };
                s.last_server_rx = now;
                for p in &mut s.probes {
                    p.probe_now(now);
                }
                let (app, id) = (s.app, s.id);
                self.events.push_back(ClientEvent::Established { app, id, cipher });
                self.mark_ready(slot);
                ClientRecv::Consumed
            }
            Err(HandshakeError::Refused(status)) => {
                s.state = SessionState::Refused { until: now + REFUSED_BACKOFF };
                let dropped = s.pending.len();
                s.pending.clear();
                s.pending_bytes = 0;
                for _ in 0..dropped {
                    s.drops.count(DropReason::Refused);
                }
                let app = s.app;
                self.events.push_back(ClientEvent::Refused { app, status });
                ClientRecv::Consumed
            }
            Err(HandshakeError::BadMac) => {
                s.drops.count(DropReason::BadMac);
                ClientRecv::Dropped(DropReason::BadMac)
            }
            Err(_) => {
                s.drops.count(DropReason::Malformed);
                ClientRecv::Dropped(DropReason::Malformed)
            }
        }
    }

    fn recv_transport(&mut self, now: Instant, path: usize, buf: &mut [u8]) -> ClientRecv {
        let Ok(pkt) = TransportPacket::new_checked(&buf[..]) else {
            return self.drop_global(DropReason::Malformed);
        };
        let (id, seq) = (pkt.session_id(), pkt.seq());
        let Some(&slot) = self.by_id.get(&id) else {
            return self.drop_global(DropReason::UnknownSession);
        };
        let now_us = self.now_us(now);
        let s = self.sessions[slot].as_mut().expect("indexed session exists");
        let SessionState::Established { keys, .. } = &s.state else {
            s.drops.count(DropReason::Unexpected);
            return ClientRecv::Dropped(DropReason::Unexpected);
        };
        match s.replay.check(seq) {
            ReplayVerdict::Fresh => {}
            ReplayVerdict::Duplicate => {
                // in a coded or adaptive session every authentic copy counts for its path's receipts
                if s.uses_receipts() {
                    if let Ok(plain_len) = keys.open(seq, buf) {
                        if crate::server::is_data_plane(&buf[TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + plain_len]) {
                            s.counters[path].recv_log.on_datagram(seq);
                        }
                    }
                }
                s.drops.count(DropReason::Duplicate);
                return ClientRecv::Dropped(DropReason::Duplicate);
            }
            ReplayVerdict::TooOld => {
                s.drops.count(DropReason::TooOld);
                return ClientRecv::Dropped(DropReason::TooOld);
            }
        }
        let datagram_len = buf.len();
        let Ok(plain_len) = keys.open(seq, buf) else {
            s.drops.count(DropReason::AuthFailed);
            return ClientRecv::Dropped(DropReason::AuthFailed);
        };
        s.replay.mark(seq);
        s.last_server_rx = now;
        s.counters[path].rx.add(datagram_len);
        if s.probes[path].on_authenticated_rx(now) {
            self.events.push_back(ClientEvent::PathUp { app: s.app, path });
        }
        let plain = &buf[TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + plain_len];
        let inner = InnerRepr::parse(plain);
        if s.uses_receipts() {
            // receipts go out while anything arrives, so a path whose data stopped shows
            if crate::server::is_data_plane(plain) {
                s.counters[path].recv_log.on_datagram(seq);
            }
            s.receipt_at.get_or_insert(now + RECEIPT_INTERVAL);
        }
        match inner {
            Ok(InnerRepr::Receipt(r)) => {
                for e in r.entries() {
                    let i = usize::from(e.path_id);
                    let (Some(c), Some(probe)) = (s.counters.get_mut(i), s.probes.get_mut(i)) else { continue };
                    let count = c.sent_log.on_receipt(now, e.highest, e.received, probe.srtt());
                    if let Some((sent, lost)) = count.counted {
                        probe.on_data_receipt(sent, sent - lost);
                    }
                    if count.newly_stalled {
                        s.sender.review_soon();
                    }
                }
                ClientRecv::Consumed
            }
            Ok(InnerRepr::Data(d)) => {
                s.rx.add(d.len());
                s.last_app_activity = now;
                ClientRecv::Deliver { app: s.app, payload: DATA_PAYLOAD_OFFSET..DATA_PAYLOAD_OFFSET + d.len() }
            }
            Ok(InnerRepr::FecData(d, tag)) => {
                let deliver = s.receiver.handle_data(tag, d);
                let app = s.app;
                if deliver {
                    s.rx.add(d.len());
                    s.last_app_activity = now;
                }
                self.note_recovered(slot);
                if deliver {
                    ClientRecv::Deliver { app, payload: DATA_PAYLOAD_OFFSET..DATA_PAYLOAD_OFFSET + d.len() }
                } else {
                    ClientRecv::Consumed
                }
            }
            Ok(InnerRepr::FecParity(h, shard)) => {
                s.receiver.handle_parity(h, shard);
                self.note_recovered(slot);
                ClientRecv::Consumed
            }
            Ok(InnerRepr::ProbeReply(r)) => {
                let Some(tracker) = s.probes.get_mut(r.path_id as usize).filter(|_| r.path_id as usize == path) else {
                    s.drops.count(DropReason::Unexpected);
                    return ClientRecv::Dropped(DropReason::Unexpected);
                };
                let (came_up, new_challenge) = tracker.on_reply(now, now_us, &r);
                if new_challenge {
                    tracker.probe_now(now);
                }
                let app = s.app;
                if came_up {
                    self.events.push_back(ClientEvent::PathUp { app, path });
                }
                if new_challenge {
                    self.mark_ready(slot);
                }
                ClientRecv::Consumed
            }
            Ok(InnerRepr::Probe(_)) => {
                s.drops.count(DropReason::Unexpected);
                ClientRecv::Dropped(DropReason::Unexpected)
            }
            Err(_) => {
                s.drops.count(DropReason::Malformed);
                ClientRecv::Dropped(DropReason::Malformed)
            }
        }
    }

    /// Next control or queued datagram to send, built in `buf` (at least `MAX_DATAGRAM`).
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        let now_us = self.now_us(now);
        let (all, standby) = (self.active_paths(), self.standby);
        while let Some(&slot) = self.ready.front() {
            let Some(s) = self.sessions[slot].as_mut() else {
                self.ready.pop_front();
                continue;
            };
            if let Some(t) = s.poll_transmit(now, now_us, all, standby, buf) {
                return Some(t);
            }
            s.queued = false;
            self.ready.pop_front();
        }
        None
    }

    /// Queues `slot` for `poll_recovered` if parity rebuilt datagrams of it.
    fn note_recovered(&mut self, slot: usize) {
        if let Some(s) = self.sessions[slot].as_mut() {
            if !s.recovered_queued && s.receiver.has_recovered() {
                s.recovered_queued = true;
                self.recovered.push_back(slot);
            }
        }
    }

    /// The next datagram rebuilt from parity, copied to `buf`: its application and
    /// length. Drain it after every datagram handed in: rebuilt datagrams are due at
    /// once, as the one that arrived.
    pub fn poll_recovered(&mut self, now: Instant, buf: &mut [u8]) -> Option<(SocketAddr, usize)> {
        while let Some(&slot) = self.recovered.front() {
            if let Some(s) = self.sessions[slot].as_mut() {
                if let Some(n) = s.receiver.poll_recovered(buf) {
                    s.rx.add(n);
                    s.last_app_activity = now;
                    return Some((s.app, n));
                }
                s.recovered_queued = false;
            }
            self.recovered.pop_front();
        }
        None
    }

    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// The earliest instant at which `handle_timeout` has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let active = self.active_paths();
        self.sessions
            .iter()
            .flatten()
            .map(|s| s.next_deadline(s.idle_timeout(self.cfg.session_idle_timeout), active))
            .min()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let active = self.active_paths();
        for slot in 0..self.sessions.len() {
            let Some(s) = self.sessions[slot].as_mut() else {
                continue;
            };
            let app = s.app;
            if now.saturating_duration_since(s.last_app_activity) >= s.idle_timeout(self.cfg.session_idle_timeout) {
                if let Some((app, id)) = self.close_session(slot) {
                    self.events.push_back(ClientEvent::SessionClosed { app, id });
                }
                continue;
            }
            let mut wants_tx = false;
            let mut restart = false;
            let mut start_plain = false;
            match &mut s.state {
                SessionState::Handshaking { next_retry, retry, retries, due, plain, plain_due, .. } => {
                    if now >= *next_retry {
                        *due = true;
                        *plain_due = plain.is_some();
                        *retry = (*retry * 2).min(HANDSHAKE_RETRY_MAX);
                        *next_retry = now + *retry;
                        *retries += 1;
                        start_plain = *retries == PLAIN_INIT_AFTER_RETRIES
                            && plain.is_none()
                            && self.cfg.redundancy.to_request().is_some();
                        wants_tx = true;
                    }
                }
                SessionState::Refused { until } => restart = now >= *until,
                SessionState::Established { since, .. } => {
                    let heard = s.last_server_rx.max(*since);
                    if now.saturating_duration_since(heard) >= SERVER_SILENT_AFTER {
                        self.events.push_back(ClientEvent::ServerLost { app, old: s.id });
                        restart = true;
                    } else {
                        for (i, p) in s.probes.iter_mut().enumerate() {
                            if p.check_down(now) {
                                self.events.push_back(ClientEvent::PathDown { app, path: i });
                            }
                            wants_tx |= active.contains(i) && p.next_probe_at() <= now;
                        }
                        s.sender.handle_timeout(now);
                        wants_tx |= s.sender.has_output();
                        if s.receipt_at.is_some_and(|t| now >= t) {
                            s.receipt_at = None;
                            s.receipt_due = true;
                            wants_tx = true;
                        }
                    }
                }
            }
            if restart {
                self.restart_session(now, slot);
                wants_tx = true;
            }
            if start_plain {
                self.start_plain_handshake(now, slot);
            }
            if wants_tx {
                self.mark_ready(slot);
            }
        }
    }

    /// A new id, handshake and sequence space for the same application flow.
    fn restart_session(&mut self, now: Instant, slot: usize) {
        let id = self.new_session_id();
        let state = self.handshake(id, now);
        let s = self.sessions[slot].as_mut().expect("indexed session exists");
        self.by_id.remove(&s.id);
        if let Some(plain) = s.plain_id() {
            self.by_id.remove(&plain);
        }
        self.by_id.insert(id, slot);
        s.id = id;
        s.state = state;
        s.send_seq = 0;
        s.replay = ReplayWindow::new();
        s.sender = RedundancySender::new(self.cfg.redundancy);
        s.receiver = RedundancyReceiver::default();
        s.counters.iter_mut().for_each(|c| (c.sent_log, c.recv_log) = Default::default());
        s.receipt_at = None;
        s.receipt_due = false;
        s.probes = (0..s.probes.len()).map(|i| ProbeTracker::new(i as u8, now)).collect();
        s.last_server_rx = now;
        self.events.push_back(ClientEvent::SessionStarted { app: s.app, id });
    }

    /// Snapshot for `status`.
    pub fn status(&self, now: Instant, listen: &str) -> StatusReport {
        let sessions = self
            .sessions
            .iter()
            .flatten()
            .map(|s| SessionStatus {
                id: s.id.to_string(),
                peer: s.app.to_string(),
                state: match &s.state {
                    SessionState::Handshaking { .. } => crate::stats::SessionState::Handshaking,
                    SessionState::Established { .. } => crate::stats::SessionState::Established,
                    SessionState::Refused { .. } => crate::stats::SessionState::Refused,
                },
                cipher: self.cfg.cipher.name().into(),
                age_s: now.saturating_duration_since(s.created).as_secs(),
                idle_s: now.saturating_duration_since(s.last_app_activity).as_secs(),
                tx: s.tx,
                rx: s.rx,
                drops: s.drops.clone(),
                redundancy: Some(RedundancyStatus::of(&s.sender, &s.receiver, s.replay.missed(), s.rx.packets)),
                paths: s
                    .probes
                    .iter()
                    .zip(&s.counters)
                    .zip(&self.cfg.path_names)
                    .map(|((p, c), name)| PathStatus {
                        name: name.clone(),
                        state: p.state(),
                        rtt_ms: p.rtt_ms(),
                        jitter_ms: p.jitter_ms(),
                        loss_up: p.loss_up(),
                        loss_down: p.loss_down(),
                        tx: c.tx,
                        rx: c.rx,
                    })
                    .collect(),
            })
            .collect();
        StatusReport {
            role: "mpclient".into(),
            listen: listen.into(),
            uptime_s: now.saturating_duration_since(self.epoch).as_secs(),
            drops: self.drops.clone(),
            evicted_sessions: self.evicted_sessions,
            max_sessions: self.cfg.max_sessions,
            remotes: Vec::new(),
            sessions,
        }
    }
}

/// Paths that carry data: all but those found down or paused (a path still being
/// probed gets copies too: losing redundancy while a path proves itself costs more than
/// a copy). If every path is down, all that are not paused: better a copy into a dead
/// path than none.
fn data_paths(probes: &[ProbeTracker], paused: PathMask) -> PathMask {
    let mut live = PathMask::EMPTY;
    for (i, p) in probes.iter().enumerate() {
        if p.state() != PathState::Down && !paused.contains(i) {
            live.insert(i);
        }
    }
    if live.is_empty() {
        PathMask(PathMask::first_n(probes.len()).0 & !paused.0)
    } else {
        live
    }
}

/// Seals the data message whose payload is at `buf[DATA_PAYLOAD_OFFSET..]`.
fn seal_data(keys: &SessionKeys, id: SessionId, seq: &mut u64, buf: &mut [u8], payload_len: usize) -> usize {
    let n = *seq;
    *seq += 1;
    emit_transport_header(buf, id, n);
    buf[TRANSPORT_HEADER_LEN] = INNER_DATA;
    keys.seal(n, buf, 1 + payload_len)
}

/// Seals the coding group's datagram whose payload is at `buf[DATA_PAYLOAD_OFFSET..]`,
/// its tag after it (the caller checked the room).
fn seal_fec_data(
    keys: &SessionKeys,
    id: SessionId,
    seq: &mut u64,
    buf: &mut [u8],
    payload_len: usize,
    tag: DataTag,
) -> usize {
    let n = *seq;
    *seq += 1;
    emit_transport_header(buf, id, n);
    buf[TRANSPORT_HEADER_LEN] = INNER_FEC_DATA;
    let at = DATA_PAYLOAD_OFFSET + payload_len;
    tag.emit((&mut buf[at..at + crate::fec::DATA_TAG_LEN]).try_into().expect("room checked"));
    keys.seal(n, buf, 1 + payload_len + crate::fec::DATA_TAG_LEN)
}

/// Seals a control message (probe) built from `inner`.
fn seal_inner(keys: &SessionKeys, id: SessionId, seq: &mut u64, buf: &mut [u8], inner: &InnerRepr) -> usize {
    let n = *seq;
    *seq += 1;
    emit_transport_header(buf, id, n);
    let plain = inner.emit(&mut buf[TRANSPORT_HEADER_LEN..]).expect("buffer holds any control message");
    keys.seal(n, buf, plain)
}

impl ClientSession {
    /// Parity to seal or a copy to repeat, from the redundancy sender.
    fn poll_sender(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        let SessionState::Established { keys, .. } = &self.state else { return None };
        let n = self.send_seq;
        let (len, paths) = match self.sender.poll_output(buf)? {
            SenderOutput::Parity { plain_len, paths } => {
                self.send_seq += 1;
                emit_transport_header(buf, self.id, n);
                (keys.seal(n, buf, plain_len), paths)
            }
            SenderOutput::Repeat { len, paths } => (len, paths),
        };
        let seq = TransportPacket::new_checked(&buf[..len]).map_or(n, |p| p.seq());
        count_sent(&mut self.sender, &mut self.counters, now, seq, len, paths);
        Some(Transmit { len, paths })
    }

    /// The id of the plain handshake beside the one asking for redundancy, if any.
    fn plain_id(&self) -> Option<SessionId> {
        match &self.state {
            SessionState::Handshaking { plain: Some(p), .. } => Some(p.session()),
            _ => None,
        }
    }

    /// Seals an application datagram for this established session and says where it
    /// goes, as its redundancy plans it.
    fn send_data(
        &mut self,
        now: Instant,
        paused: PathMask,
        standby: PathMask,
        buf: &mut [u8],
        payload_len: usize,
    ) -> (usize, PathMask) {
        let SessionState::Established { keys, .. } = &self.state else { unreachable!("checked by the caller") };
        let live = match data_paths(&self.probes, PathMask(paused.0 | standby.0)) {
            // only standby paths (or none) are live: they take the data
            l if l.iter().all(|i| self.probes[i].state() == PathState::Down) => data_paths(&self.probes, paused),
            l => l,
        };
        if self.sender.wants_review(now) {
            let (probes, counters) = (&self.probes, &self.counters);
            self.sender.review(
                now,
                live.iter().map(|i| {
                    let p = &probes[i];
                    let rtt = p.srtt();
                    PathEstimate {
                        index: i,
                        loss: p.loss_up_estimate(),
                        rtt,
                        overdue: p.reply_overdue(now),
                        stalled: counters[i].sent_log.stalled(now, stall_patience(rtt)),
                    }
                }),
            );
            let sole = self.sender.sole_path();
            for (i, p) in self.probes.iter_mut().enumerate() {
                p.set_sole_copy(now, sole == Some(i));
            }
        }
        let tag_room = buf.len() >= DATA_PAYLOAD_OFFSET + payload_len + DATA_TAIL_ROOM;
        let plan = self.sender.plan(now, &buf[DATA_PAYLOAD_OFFSET..DATA_PAYLOAD_OFFSET + payload_len], tag_room, live);
        // a plan made before a path was paused must not use it
        let mut paths = PathMask(plan.paths.0 & live.0);
        if paths.is_empty() {
            paths = live;
        }
        let seq = self.send_seq;
        let len = match plan.tag {
            Some(tag) => seal_fec_data(keys, self.id, &mut self.send_seq, buf, payload_len, tag),
            None => seal_data(keys, self.id, &mut self.send_seq, buf, payload_len),
        };
        self.tx.add(payload_len);
        count_sent(&mut self.sender, &mut self.counters, now, seq, len, paths);
        if plan.copies > 1 {
            self.sender.repeat(&buf[..len], paths, plan.copies - 1);
        }
        (len, paths)
    }

    fn uses_receipts(&self) -> bool {
        self.sender.uses_receipts()
    }
}

/// Counts datagram `seq` of `len` bytes sent on `paths` (and logs it for receipts, in a coded
/// or adaptive session).
fn count_sent(
    sender: &mut RedundancySender,
    counters: &mut [PathCounters],
    now: Instant,
    seq: u64,
    len: usize,
    paths: PathMask,
) {
    let receipts = sender.uses_receipts();
    sender.count_wire(len, paths.len());
    for p in paths.iter() {
        let c = &mut counters[p];
        c.tx.add(len);
        if receipts {
            c.sent_log.record(now, seq);
        }
    }
}

/// The receipt of what arrived on each path, sealed into `buf`, for every path that
/// works (a receipt is small, and one lost with a dying path would make the others look
/// dead too).
fn seal_receipt(
    keys: &SessionKeys,
    id: SessionId,
    seq: &mut u64,
    probes: &[ProbeTracker],
    counters: &mut [PathCounters],
    all: PathMask,
    buf: &mut [u8],
) -> Option<Transmit> {
    let mut paths = PathMask::EMPTY;
    for (i, p) in probes.iter().enumerate() {
        if all.contains(i) && p.state() == PathState::Up {
            paths.insert(i);
        }
    }
    if paths.is_empty() {
        return None;
    }
    let count = counters.iter().filter(|c| c.recv_log.received > 0).count();
    let entries = counters.iter().enumerate().filter(|(_, c)| c.recv_log.received > 0).map(|(i, c)| ReceiptEntry {
        path_id: i as u8,
        highest: c.recv_log.highest,
        received: c.recv_log.received,
    });
    let plain = wire::emit_receipt(&mut buf[TRANSPORT_HEADER_LEN..], crate::ExactLen(entries, count))?;
    let n = *seq;
    *seq += 1;
    emit_transport_header(buf, id, n);
    let len = keys.seal(n, buf, plain);
    for p in paths.iter() {
        counters[p].tx.add(len);
    }
    Some(Transmit { len, paths })
}

impl ClientSession {
    fn poll_transmit(
        &mut self,
        now: Instant,
        now_us: u32,
        all: PathMask,
        standby: PathMask,
        buf: &mut [u8],
    ) -> Option<Transmit> {
        // datagrams held during the handshake go first, then parity and repeated copies
        if self.pending.is_empty() {
            if let Some(t) = self.poll_sender(now, buf) {
                return Some(t);
            }
        }
        match &mut self.state {
            SessionState::Handshaking { hs, due, plain, plain_due, .. } => {
                let init = if std::mem::take(due) {
                    hs.init()
                } else if std::mem::take(plain_due) {
                    plain.as_ref()?.init()
                } else {
                    return None;
                };
                buf[..init.len()].copy_from_slice(init);
                for p in all.iter() {
                    self.counters[p].tx.add(init.len());
                }
                Some(Transmit { len: init.len(), paths: all })
            }
            SessionState::Refused { .. } => None,
            SessionState::Established { keys, .. } => {
                if let Some(d) = self.pending.pop_front() {
                    self.pending_bytes -= d.len();
                    let paths = data_paths(&self.probes, PathMask(!all.0));
                    buf[DATA_PAYLOAD_OFFSET..DATA_PAYLOAD_OFFSET + d.len()].copy_from_slice(&d);
                    let len = seal_data(keys, self.id, &mut self.send_seq, buf, d.len());
                    self.tx.add(d.len());
                    for p in paths.iter() {
                        self.counters[p].tx.add(len);
                    }
                    return Some(Transmit { len, paths });
                }
                if std::mem::take(&mut self.receipt_due) {
                    let (probes, counters) = (&self.probes, &mut self.counters);
                    // standby paths carry receipts only when no other path is up
                    let others = PathMask(all.0 & !standby.0);
                    let up = |i: usize| probes[i].state() == PathState::Up;
                    let to = if others.iter().any(up) { others } else { all };
                    if let Some(t) = seal_receipt(keys, self.id, &mut self.send_seq, probes, counters, to, buf) {
                        return Some(t);
                    }
                }
                let (i, p) =
                    self.probes.iter_mut().enumerate().find(|(i, p)| all.contains(*i) && p.next_probe_at() <= now)?;
                let probe = InnerRepr::Probe(p.make_probe(now, now_us));
                let len = seal_inner(keys, self.id, &mut self.send_seq, buf, &probe);
                self.counters[i].tx.add(len);
                Some(Transmit { len, paths: PathMask::single(i) })
            }
        }
    }

    /// How long this session may stay idle: `configured`, or at most
    /// `UNREPLIED_IDLE_TIMEOUT` while its application never got a reply.
    fn idle_timeout(&self, configured: Duration) -> Duration {
        if self.rx.packets == 0 {
            configured.min(UNREPLIED_IDLE_TIMEOUT)
        } else {
            configured
        }
    }

    fn next_deadline(&self, idle_timeout: Duration, active: PathMask) -> Instant {
        let idle = self.last_app_activity + idle_timeout;
        let state = match &self.state {
            SessionState::Handshaking { next_retry, .. } => *next_retry,
            SessionState::Refused { until } => *until,
            SessionState::Established { since, .. } => {
                let silent = self.last_server_rx.max(*since) + SERVER_SILENT_AFTER;
                let probe = self
                    .probes
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| active.contains(*i))
                    .map(|(_, p)| p.next_probe_at())
                    .min()
                    .unwrap_or(silent);
                let group = self.sender.poll_timeout().unwrap_or(silent);
                let receipt = self.receipt_at.unwrap_or(silent);
                silent.min(probe).min(group).min(receipt)
            }
        };
        idle.min(state)
    }
}
