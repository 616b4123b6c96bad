//! mpbridge: a UDP relay for bridge boxes.
//!
//! Each client source address is a flow with its own socket towards the target, so the
//! target can tell the clients apart; a flow idle for `idle_timeout` is closed. The
//! relay looks at no payload: it works for the tunnel and for anything else over UDP.
//!
//! For labs only, it can impair traffic (loss, delay, jitter in both directions) because
//! this kernel has no netem. Delayed datagrams are copied into a queue; that allocation
//! per datagram exists only in lab mode.

pub mod cli;
pub mod driver;

/// `mpbridge -c bridge.yaml`: the same settings as the flags (lab impairment stays a
/// command-line-only matter).
#[derive(Debug, Clone, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    /// Where clients send to (`ip:port`).
    pub listen: SocketAddr,
    /// Where to relay to (`host:port`).
    pub to: String,
    #[serde(default = "default_idle_timeout_secs")]
    pub idle_timeout_secs: u64,
    #[serde(default = "default_max_flows")]
    pub max_flows: usize,
    /// `ip:port` to serve Prometheus metrics on (`GET /metrics`); none by default.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    #[serde(default = "default_log_level")]
    pub log_level: String,
}

fn default_idle_timeout_secs() -> u64 {
    DEFAULT_IDLE_TIMEOUT.as_secs()
}

fn default_max_flows() -> usize {
    DEFAULT_MAX_FLOWS
}

fn default_log_level() -> String {
    common::config::DEFAULT_LOG_LEVEL.into()
}

impl BridgeConfig {
    pub fn parse(file: &str, text: &str) -> Result<Self, common::config::ConfigError> {
        use common::config::ConfigError;
        let c: Self = common::config::from_yaml(file, text)?;
        let field = |f: &str, m: &str| {
            Err(ConfigError { line: common::config::line_of(text, f), ..ConfigError::field(file, f, m.to_string()) })
        };
        if c.idle_timeout_secs == 0 {
            return field("idle_timeout_secs", "must be > 0");
        }
        if c.max_flows == 0 {
            return field("max_flows", "must be > 0");
        }
        if !common::config::validate_log_level(&c.log_level) {
            return field("log_level", "is not one of error, warn, info, debug, trace");
        }
        Ok(c)
    }
}

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
pub const DEFAULT_MAX_FLOWS: usize = 4096;
/// Datagrams held by the lab delay line at most; beyond that they are dropped.
pub const LAB_QUEUE_MAX: usize = 65_536;

pub type FlowSlot = usize;

/// One client flow: its address, when it last sent or was answered, and whether the
/// destination ever answered it.
#[derive(Debug, Clone, Copy)]
struct Flow {
    client: SocketAddr,
    last: Instant,
    replied: bool,
}

/// What `FlowTable::flow_for` found or made room for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowEntry {
    /// The client's flow exists.
    Existing(FlowSlot),
    /// A new flow; with `evicted`, a flow the destination never answered gave up its slot
    /// (close its socket first).
    New { slot: FlowSlot, evicted: Option<SocketAddr> },
}

/// The flow table: client address -> slot, with idle expiry. When full, a new flow takes
/// the slot of the oldest flow the destination never answered, so a flood of spoofed
/// sources (which no real server answers) can neither evict answered flows nor lock out
/// new real clients.
#[derive(Debug)]
pub struct FlowTable {
    flows: Vec<Option<Flow>>,
    by_client: HashMap<SocketAddr, FlowSlot>,
    free: Vec<FlowSlot>,
    idle_timeout: Duration,
    max_flows: usize,
}

impl FlowTable {
    pub fn new(idle_timeout: Duration, max_flows: usize) -> Self {
        Self { flows: Vec::new(), by_client: HashMap::new(), free: Vec::new(), idle_timeout, max_flows }
    }

    /// The flow of `client`, created if new. `None` when the table is full of answered
    /// flows.
    pub fn flow_for(&mut self, now: Instant, client: SocketAddr) -> Option<FlowEntry> {
        if let Some(&slot) = self.by_client.get(&client) {
            self.touch(slot, now);
            return Some(FlowEntry::Existing(slot));
        }
        let mut evicted = None;
        if self.by_client.len() >= self.max_flows {
            let (_, victim) = self
                .flows
                .iter()
                .enumerate()
                .filter_map(|(i, f)| f.filter(|f| !f.replied).map(|f| (f.last, i)))
                .min()?;
            evicted = self.remove(victim);
        }
        let flow = Some(Flow { client, last: now, replied: false });
        let slot = match self.free.pop() {
            Some(s) => {
                self.flows[s] = flow;
                s
            }
            None => {
                self.flows.push(flow);
                self.flows.len() - 1
            }
        };
        self.by_client.insert(client, slot);
        Some(FlowEntry::New { slot, evicted })
    }

    pub fn touch(&mut self, slot: FlowSlot, now: Instant) {
        if let Some(Some(f)) = self.flows.get_mut(slot) {
            f.last = now;
        }
    }

    /// The destination answered the flow: it is a real one, kept until idle.
    pub fn answered(&mut self, slot: FlowSlot, now: Instant) {
        if let Some(Some(f)) = self.flows.get_mut(slot) {
            f.last = now;
            f.replied = true;
        }
    }

    /// Forgets a flow (its socket could not be opened, or it made room); returns its client.
    pub fn remove(&mut self, slot: FlowSlot) -> Option<SocketAddr> {
        let f = self.flows.get_mut(slot)?.take()?;
        self.by_client.remove(&f.client);
        self.free.push(slot);
        Some(f.client)
    }

    pub fn client(&self, slot: FlowSlot) -> Option<SocketAddr> {
        self.flows.get(slot).copied().flatten().map(|f| f.client)
    }

    pub fn len(&self) -> usize {
        self.by_client.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_client.is_empty()
    }

    /// Removes idle flows; returns their slots.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<FlowSlot>) {
        for slot in 0..self.flows.len() {
            let idle = self.flows[slot].is_some_and(|f| now.saturating_duration_since(f.last) >= self.idle_timeout);
            if idle {
                self.remove(slot);
                out.push(slot);
            }
        }
    }
}

/// Lab impairment applied to each datagram in each direction.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Impairment {
    /// Probability of dropping a datagram, 0..1.
    pub loss: f64,
    pub delay: Duration,
    /// Extra delay uniform in [0, jitter); reorders.
    pub jitter: Duration,
}

impl Impairment {
    pub fn is_active(&self) -> bool {
        self.loss > 0.0 || !self.delay.is_zero() || !self.jitter.is_zero()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hop {
    /// From a client, to the target, through the flow's socket.
    ToTarget(FlowSlot),
    /// From the target, back to the flow's client.
    ToClient(FlowSlot),
}

pub enum Verdict {
    Send,
    Drop,
    /// Queued in the delay line.
    Delayed,
}

/// The lab line's own small random source (xorshift64*): loss and jitter need no more,
/// and labs want a seed.
#[derive(Debug, Clone)]
struct LabRng(u64);

impl LabRng {
    fn new(seed: u64) -> Self {
        // xorshift never leaves 0
        Self(seed | 1)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }
}

/// Due time, a tie-breaking order, where to, the bytes.
type Delayed = (Instant, u64, Hop, Vec<u8>);

/// Loss and a delay line driven by `now`.
pub struct LabLine {
    imp: Impairment,
    rng: LabRng,
    queue: BinaryHeap<Reverse<Delayed>>,
    order: u64,
    pub dropped: u64,
}

impl LabLine {
    pub fn new(imp: Impairment, seed: u64) -> Self {
        Self { imp, rng: LabRng::new(seed), queue: BinaryHeap::new(), order: 0, dropped: 0 }
    }

    pub fn admit(&mut self, now: Instant, hop: Hop, datagram: &[u8]) -> Verdict {
        if self.rng.chance(self.imp.loss) || self.queue.len() >= LAB_QUEUE_MAX {
            self.dropped += 1;
            return Verdict::Drop;
        }
        if self.imp.delay.is_zero() && self.imp.jitter.is_zero() {
            return Verdict::Send;
        }
        let at = now + self.imp.delay + self.imp.jitter.mul_f64(self.rng.unit());
        self.order += 1;
        self.queue.push(Reverse((at, self.order, hop, datagram.to_vec())));
        Verdict::Delayed
    }

    pub fn next_due(&self) -> Option<Instant> {
        self.queue.peek().map(|Reverse((t, ..))| *t)
    }

    /// The next datagram due at `now`, if any.
    pub fn pop_due(&mut self, now: Instant) -> Option<(Hop, Vec<u8>)> {
        if self.next_due()? > now {
            return None;
        }
        self.queue.pop().map(|Reverse((_, _, hop, d))| (hop, d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_are_per_client_and_expire() {
        let t0 = Instant::now();
        let mut t = FlowTable::new(Duration::from_secs(10), 2);
        let a: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:1".parse().unwrap();
        let c: SocketAddr = "10.0.0.3:1".parse().unwrap();
        assert_eq!(t.flow_for(t0, a), Some(FlowEntry::New { slot: 0, evicted: None }));
        assert_eq!(t.flow_for(t0, a), Some(FlowEntry::Existing(0)));
        assert_eq!(t.flow_for(t0, b), Some(FlowEntry::New { slot: 1, evicted: None }));
        t.answered(0, t0);
        t.answered(1, t0);
        assert_eq!(t.flow_for(t0, c), None, "table full of answered flows");
        t.touch(0, t0 + Duration::from_secs(5));
        let mut out = Vec::new();
        t.expire(t0 + Duration::from_secs(11), &mut out);
        assert_eq!(out, vec![1]);
        assert_eq!(t.flow_for(t0, c), Some(FlowEntry::New { slot: 1, evicted: None }), "slot reused");
        assert_eq!(t.client(1), Some(c));
    }

    /// A flood of sources nobody answers takes only slots of flows nobody answered: an
    /// answered flow is never evicted, and a new client always finds room.
    #[test]
    fn unanswered_flows_make_room_answered_ones_stay() {
        let t0 = Instant::now();
        let mut t = FlowTable::new(Duration::from_secs(120), 4);
        let real: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let Some(FlowEntry::New { slot, .. }) = t.flow_for(t0, real) else { panic!() };
        t.answered(slot, t0);
        for port in 2..1000u16 {
            let spoofed = SocketAddr::from(([10, 0, 9, 9], port));
            let now = t0 + Duration::from_millis(u64::from(port));
            assert!(matches!(t.flow_for(now, spoofed), Some(FlowEntry::New { .. })), "room for {spoofed}");
            assert_eq!(t.len(), (port as usize).min(4));
        }
        assert_eq!(t.flow_for(t0, real), Some(FlowEntry::Existing(slot)), "the answered flow survived");
        let newcomer: SocketAddr = "10.0.0.2:1".parse().unwrap();
        let Some(FlowEntry::New { evicted: Some(oldest), .. }) = t.flow_for(t0 + Duration::from_secs(2), newcomer)
        else {
            panic!("a new client finds room")
        };
        assert_eq!(oldest, SocketAddr::from(([10, 0, 9, 9], 997)), "the oldest unanswered flow made room");
    }

    #[test]
    fn lab_line_loss_and_delay() {
        let t0 = Instant::now();
        let mut l =
            LabLine::new(Impairment { loss: 0.25, delay: Duration::from_millis(10), jitter: Duration::ZERO }, 1);
        let mut delayed = 0;
        for _ in 0..4000 {
            if let Verdict::Delayed = l.admit(t0, Hop::ToTarget(0), b"x") {
                delayed += 1;
            }
        }
        assert!((2800..3200).contains(&delayed), "{delayed}");
        assert!(l.pop_due(t0 + Duration::from_millis(9)).is_none());
        assert!(l.pop_due(t0 + Duration::from_millis(10)).is_some());
    }
}
