//! Counters and the status report shown by `status` commands (table or JSON).

use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// Why a datagram was dropped. Every drop is counted under exactly one reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Could not be parsed (short, unknown type, bad field).
    Malformed,
    /// A transport datagram for a session we do not know.
    UnknownSession,
    /// A handshake whose MAC did not verify (wrong key or forged).
    BadMac,
    /// The AEAD refused the datagram (forged or corrupted).
    AuthFailed,
    /// A copy already received on another path (normal with N paths).
    Duplicate,
    /// Older than the replay window.
    TooOld,
    /// The queue of datagrams waiting for a handshake was full.
    QueueFull,
    /// No live or validated path to send on (server).
    NoPath,
    /// A new path would exceed the session's path cap, and none is silent enough to
    /// replace (server): nowhere we may answer its probe.
    NoPathSlot,
    /// A handshake refused by the server, or one we cannot serve.
    Refused,
    /// An authentic init seen before (a replay within the freshness window).
    ReplayedInit,
    /// An init beyond its source's rate (checked before the MAC).
    RateLimited,
    /// An unexpected message for the current state (e.g. a stray response).
    Unexpected,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropCounters {
    pub malformed: u64,
    pub unknown_session: u64,
    pub bad_mac: u64,
    pub auth_failed: u64,
    pub duplicate: u64,
    pub too_old: u64,
    pub queue_full: u64,
    #[serde(default)]
    pub no_path: u64,
    #[serde(default)]
    pub no_path_slot: u64,
    pub refused: u64,
    #[serde(default)]
    pub replayed_init: u64,
    #[serde(default)]
    pub rate_limited: u64,
    pub unexpected: u64,
}

impl DropCounters {
    pub fn count(&mut self, reason: DropReason) {
        let c = match reason {
            DropReason::Malformed => &mut self.malformed,
            DropReason::UnknownSession => &mut self.unknown_session,
            DropReason::BadMac => &mut self.bad_mac,
            DropReason::AuthFailed => &mut self.auth_failed,
            DropReason::Duplicate => &mut self.duplicate,
            DropReason::TooOld => &mut self.too_old,
            DropReason::QueueFull => &mut self.queue_full,
            DropReason::NoPath => &mut self.no_path,
            DropReason::NoPathSlot => &mut self.no_path_slot,
            DropReason::Refused => &mut self.refused,
            DropReason::ReplayedInit => &mut self.replayed_init,
            DropReason::RateLimited => &mut self.rate_limited,
            DropReason::Unexpected => &mut self.unexpected,
        };
        *c += 1;
    }

    pub fn add(&mut self, o: &DropCounters) {
        self.malformed += o.malformed;
        self.unknown_session += o.unknown_session;
        self.bad_mac += o.bad_mac;
        self.auth_failed += o.auth_failed;
        self.duplicate += o.duplicate;
        self.too_old += o.too_old;
        self.queue_full += o.queue_full;
        self.no_path += o.no_path;
        self.no_path_slot += o.no_path_slot;
        self.refused += o.refused;
        self.replayed_init += o.replayed_init;
        self.rate_limited += o.rate_limited;
        self.unexpected += o.unexpected;
    }

    /// Drops that are not duplicates (those are the expected cost of redundancy).
    pub fn bad_total(&self) -> u64 {
        self.malformed
            + self.unknown_session
            + self.bad_mac
            + self.auth_failed
            + self.too_old
            + self.queue_full
            + self.no_path
            + self.no_path_slot
            + self.refused
            + self.replayed_init
            + self.rate_limited
            + self.unexpected
    }

    /// Every counter with its reason's name (as in the JSON), zeros included.
    pub fn by_reason(&self) -> impl Iterator<Item = (&'static str, u64)> {
        [
            ("duplicate", self.duplicate),
            ("malformed", self.malformed),
            ("unknown_session", self.unknown_session),
            ("bad_mac", self.bad_mac),
            ("auth_failed", self.auth_failed),
            ("too_old", self.too_old),
            ("queue_full", self.queue_full),
            ("no_path", self.no_path),
            ("no_path_slot", self.no_path_slot),
            ("refused", self.refused),
            ("replayed_init", self.replayed_init),
            ("rate_limited", self.rate_limited),
            ("unexpected", self.unexpected),
        ]
        .into_iter()
    }

    fn compact(&self) -> String {
        let short = |k: &'static str| -> &'static str {
            match k {
                "duplicate" => "dup",
                "auth_failed" => "auth",
                "too_old" => "old",
                "queue_full" => "queue",
                other => other,
            }
        };
        let parts: Vec<String> = self
            .by_reason()
            .filter(|(_, v)| *v > 0)
            .map(|(k, v)| format!("{}={v}", short(k).replace('_', "-")))
            .collect();
        if parts.is_empty() {
            "-".into()
        } else {
            parts.join(" ")
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
}

impl Traffic {
    pub fn add(&mut self, bytes: usize) {
        self.packets += 1;
        self.bytes += bytes as u64;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PathState {
    /// No answer yet.
    Probing,
    Up,
    /// No answer for `PATH_DOWN_AFTER`; still probed, carries no data.
    Down,
    /// Server side: learned, but the client has not yet proved it receives there.
    Unvalidated,
}

impl PathState {
    pub const ALL: [PathState; 4] = [Self::Probing, Self::Up, Self::Down, Self::Unvalidated];

    /// As in the JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::Probing => "probing",
            Self::Up => "up",
            Self::Down => "down",
            Self::Unvalidated => "unvalidated",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PathStatus {
    pub name: String,
    pub state: PathState,
    pub rtt_ms: Option<f64>,
    pub jitter_ms: Option<f64>,
    /// Loss towards the server (client to server), 0..1, over the last 64 probes.
    pub loss_up: Option<f64>,
    /// Loss towards the client.
    pub loss_down: Option<f64>,
    pub tx: Traffic,
    pub rx: Traffic,
}

/// Where a session is in its life, as `status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SessionState {
    /// Client: the handshake is under way.
    Handshaking,
    /// Server: answered a handshake, no data from the client yet.
    HalfOpen,
    Established,
    /// Client: the server refused; retried after a back-off.
    Refused,
}

impl SessionState {
    pub const ALL: [SessionState; 4] = [Self::Handshaking, Self::HalfOpen, Self::Established, Self::Refused];

    /// As `status` shows it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Handshaking => "handshaking",
            Self::HalfOpen => "half-open",
            Self::Established => "established",
            Self::Refused => "refused",
        }
    }
}

impl std::fmt::Display for SessionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionStatus {
    pub id: String,
    /// The local application (client) or the target (server).
    pub peer: String,
    pub state: SessionState,
    pub cipher: String,
    pub age_s: u64,
    pub idle_s: u64,
    pub tx: Traffic,
    pub rx: Traffic,
    pub drops: DropCounters,
    /// How the session spreads its datagrams (absent in reports from before modes).
    #[serde(default)]
    pub redundancy: Option<RedundancyStatus>,
    pub paths: Vec<PathStatus>,
}

/// A session's redundancy: the sending direction's scheme and cost, and what the
/// receiving direction rebuilt and lost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RedundancyStatus {
    /// `duplicate`, `fec` or `adaptive`.
    pub mode: String,
    /// What goes out now: `duplicate`, `single`, `rs 10+4`.
    pub scheme: String,
    /// Bytes sent (every copy, every parity shard, headers and tags) per payload byte.
    pub wire_per_payload: Option<f64>,
    /// The residual loss the scheme predicts from the paths' measured loss.
    pub predicted_loss: f64,
    pub parity_sent: u64,
    /// Datagrams from the other end rebuilt from parity.
    pub recovered: u64,
    /// Datagrams from the other end that arrived on no path and were not rebuilt
    /// (counted once older than the replay window).
    pub lost: u64,
    /// `lost` over everything the other end sent that has left the window.
    pub residual_loss: Option<f64>,
}

impl RedundancyStatus {
    /// From a session's sender and receiver, the sequence numbers its replay window
    /// missed, and the datagrams it delivered.
    pub fn of(
        sender: &crate::redundancy::RedundancySender,
        receiver: &crate::redundancy::RedundancyReceiver,
        missed: u64,
        delivered: u64,
    ) -> Self {
        let st = sender.stats;
        let rx = receiver.stats();
        // missed numbers are plain datagrams (data, probes) and coded shards; the decoder
        // tells which shards went missing and how much data stayed lost among them
        let lost = missed.saturating_sub(rx.fec.missing_shards) + rx.fec.lost_data;
        Self {
            mode: sender.config().mode_name().into(),
            scheme: sender.scheme().to_string(),
            wire_per_payload: (st.payload_bytes > 0).then(|| st.wire_bytes as f64 / st.payload_bytes as f64),
            predicted_loss: sender.predicted_residual(),
            parity_sent: st.parity_shards,
            recovered: rx.fec.recovered,
            lost,
            residual_loss: (delivered + lost > 0).then(|| lost as f64 / (delivered + lost) as f64),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub role: String,
    pub listen: String,
    pub uptime_s: u64,
    /// Drops not attributable to a session (unknown session, bad MAC, malformed ...).
    pub drops: DropCounters,
    /// Client: sessions closed to make room for new flows in a full table.
    #[serde(default)]
    pub evicted_sessions: u64,
    /// The most sessions this daemon keeps (`max_sessions`).
    #[serde(default)]
    pub max_sessions: usize,
    /// Client: the remote end of each path (bridges, or the server), by path.
    #[serde(default)]
    pub remotes: Vec<String>,
    pub sessions: Vec<SessionStatus>,
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.2}"))
}

fn opt_pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{:.1}%", x * 100.0))
}

impl StatusReport {
    /// A human-readable table: one block per session, one row per path.
    pub fn to_table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} on {}  up {}s  sessions {}/{}  evicted {}  drops (no session): {}",
            self.role,
            self.listen,
            self.uptime_s,
            self.sessions.len(),
            self.max_sessions,
            self.evicted_sessions,
            self.drops.compact()
        );
        for sess in &self.sessions {
            let _ = writeln!(
                s,
                "\nsession {}  {}  {}  {}  age {}s idle {}s  tx {} pkts/{} B  rx {} pkts/{} B  drops: {}",
                sess.id,
                sess.peer,
                sess.state,
                sess.cipher,
                sess.age_s,
                sess.idle_s,
                sess.tx.packets,
                sess.tx.bytes,
                sess.rx.packets,
                sess.rx.bytes,
                sess.drops.compact()
            );
            if let Some(r) = &sess.redundancy {
                let _ = writeln!(
                    s,
                    "  redundancy {} now {}  wire/payload {}  parity sent {}  recovered {}  lost {}",
                    r.mode,
                    r.scheme,
                    r.wire_per_payload.map_or("-".into(), |x| format!("{x:.2}")),
                    r.parity_sent,
                    r.recovered,
                    r.lost
                );
            }
            let _ = writeln!(
                s,
                "  {:<24} {:<11} {:>8} {:>8} {:>8} {:>8} {:>10} {:>12} {:>10} {:>12}",
                "PATH", "STATE", "RTT ms", "JIT ms", "LOSS UP", "LOSS DN", "TX PKTS", "TX BYTES", "RX PKTS", "RX BYTES"
            );
            for p in &sess.paths {
                let state =
                    serde_json::to_value(p.state).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
                let _ = writeln!(
                    s,
                    "  {:<24} {:<11} {:>8} {:>8} {:>8} {:>8} {:>10} {:>12} {:>10} {:>12}",
                    p.name,
                    state,
                    opt_ms(p.rtt_ms),
                    opt_ms(p.jitter_ms),
                    opt_pct(p.loss_up),
                    opt_pct(p.loss_down),
                    p.tx.packets,
                    p.tx.bytes,
                    p.rx.packets,
                    p.rx.bytes
                );
            }
        }
        s
    }

    /// One line for the periodic info log.
    pub fn summary_line(&self) -> String {
        let mut tx = Traffic::default();
        let mut rx = Traffic::default();
        let mut drops = self.drops.clone();
        let (mut up, mut total) = (0, 0);
        for sess in &self.sessions {
            tx.packets += sess.tx.packets;
            tx.bytes += sess.tx.bytes;
            rx.packets += sess.rx.packets;
            rx.bytes += sess.rx.bytes;
            drops.add(&sess.drops);
            total += sess.paths.len();
            up += sess.paths.iter().filter(|p| p.state == PathState::Up).count();
        }
        format!(
            "sessions={} evicted={} paths_up={}/{} tx={}p/{}B rx={}p/{}B dup={} bad_drops={}",
            self.sessions.len(),
            self.evicted_sessions,
            up,
            total,
            tx.packets,
            tx.bytes,
            rx.packets,
            rx.bytes,
            drops.duplicate,
            drops.bad_total()
        )
    }
}
