//! mpbridge: a UDP relay for bridge boxes.
//!
//! Each client source address is a flow with its own socket towards the target, so the
//! target can tell the clients apart; a flow idle for `idle_timeout` is closed. The
//! relay looks at no payload: it works for the tunnel and for anything else over UDP.
//!
//! For labs only, it can impair traffic (loss, delay, jitter in both directions) because
//! this kernel has no netem. Delayed datagrams are copied into a queue; that allocation
//! per datagram exists only in lab mode.

pub mod driver;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
pub const DEFAULT_MAX_FLOWS: usize = 4096;
/// Datagrams held by the lab delay line at most; beyond that they are dropped.
pub const LAB_QUEUE_MAX: usize = 65_536;

pub type FlowSlot = usize;

/// The flow table: client address -> slot, with idle expiry.
#[derive(Debug)]
pub struct FlowTable {
    flows: Vec<Option<(SocketAddr, Instant)>>,
    by_client: HashMap<SocketAddr, FlowSlot>,
    free: Vec<FlowSlot>,
    idle_timeout: Duration,
    max_flows: usize,
}

impl FlowTable {
    pub fn new(idle_timeout: Duration, max_flows: usize) -> Self {
        Self { flows: Vec::new(), by_client: HashMap::new(), free: Vec::new(), idle_timeout, max_flows }
    }

    /// The flow of `client`, created if new (`true`). `None` when the table is full.
    pub fn flow_for(&mut self, now: Instant, client: SocketAddr) -> Option<(FlowSlot, bool)> {
        if let Some(&slot) = self.by_client.get(&client) {
            self.touch(slot, now);
            return Some((slot, false));
        }
        if self.by_client.len() >= self.max_flows {
            return None;
        }
        let slot = match self.free.pop() {
            Some(s) => {
                self.flows[s] = Some((client, now));
                s
            }
            None => {
                self.flows.push(Some((client, now)));
                self.flows.len() - 1
            }
        };
        self.by_client.insert(client, slot);
        Some((slot, true))
    }

    pub fn touch(&mut self, slot: FlowSlot, now: Instant) {
        if let Some(Some((_, t))) = self.flows.get_mut(slot) {
            *t = now;
        }
    }

    pub fn client(&self, slot: FlowSlot) -> Option<SocketAddr> {
        self.flows.get(slot).copied().flatten().map(|(c, _)| c)
    }

    pub fn len(&self) -> usize {
        self.by_client.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_client.is_empty()
    }

    /// Removes idle flows; returns their slots.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<FlowSlot>) {
        for (slot, f) in self.flows.iter_mut().enumerate() {
            if let Some((client, last)) = *f {
                if now.saturating_duration_since(last) >= self.idle_timeout {
                    *f = None;
                    self.by_client.remove(&client);
                    self.free.push(slot);
                    out.push(slot);
                }
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
        assert_eq!(t.flow_for(t0, a), Some((0, true)));
        assert_eq!(t.flow_for(t0, a), Some((0, false)));
        assert_eq!(t.flow_for(t0, b), Some((1, true)));
        assert_eq!(t.flow_for(t0, c), None, "table full");
        t.touch(0, t0 + Duration::from_secs(5));
        let mut out = Vec::new();
        t.expire(t0 + Duration::from_secs(11), &mut out);
        assert_eq!(out, vec![1]);
        assert_eq!(t.flow_for(t0, c), Some((1, true)), "slot reused");
        assert_eq!(t.client(1), Some(c));
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
