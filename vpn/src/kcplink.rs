//! One KCP conversation (peer <-> hub), sans-IO.
//!
//! Fast mode as the design asks: nodelay, 10 ms interval, fast resend after 2 duplicate
//! ACKs, no congestion window; windows of `KCP_WINDOW` segments and a bounded send queue.
//! Every IP packet is one KCP message that fits one segment (the TUN MTU is derived so).
//! `send` and `input` only queue; the flush runs when the caller next polls for datagrams,
//! so the ACKs and small segments of one driver batch share datagrams instead of each
//! going alone through every path.
//! The kcp crate can panic on hostile segments (its own asserts; overflow checks are off
//! in every profile); every kcp call runs under `catch_unwind`, and a link that panicked
//! is reported broken so the caller can drop it: one bad peer cannot take the hub down.

use crate::queue::PacketQueue;
use crate::wire::{sealed_kind, INNER_IP, SEALED_OVERHEAD};
use kcp::Kcp;
use std::cell::RefCell;
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::time::{Duration, Instant};

pub const KCP_INTERVAL: Duration = Duration::from_millis(10);
/// Floor of KCP's retransmission timeout (fast mode's default is 30 ms). Below it the
/// timeout is the smoothed RTT plus the larger of `KCP_INTERVAL` and 4 RTT deviations,
/// so long or jittery paths still get theirs; on short paths a segment the redundant
/// paths all lost is resent after about RTT + 10 ms instead of 30.
pub const KCP_MIN_RTO: Duration = Duration::from_millis(10);
/// An idle link's timer (nothing to send, nothing unacknowledged) runs this often.
pub const KCP_IDLE_UPDATE_INTERVAL: Duration = Duration::from_secs(1);
pub const KCP_WINDOW: u16 = 1024;
/// KCP segment header.
pub const KCP_HEADER_LEN: usize = 24;
/// Messages waiting to be sent or acknowledged before new ones are refused.
pub const KCP_MAX_WAIT_SEGMENTS: usize = 2 * KCP_WINDOW as usize;
/// Resends before the link counts as dead (the heartbeat logic decides what to do).
const KCP_DEAD_LINK_RESENDS: u32 = 60;
/// What one link may hold at most, in bytes: every segment it can queue to send or wait
/// for an ACK on, and every segment its receive window and queue can hold.
pub const KCP_MEMORY_BUDGET_BYTES: usize = 8 << 20;
/// A message whose first fragments arrived but which is still incomplete after this long
/// (its sender's window cannot fit it, or the sender is hostile) breaks the link: the
/// caller drops it and the peer registers again, instead of a stall that lasts forever.
pub const KCP_STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest KCP datagram (header + data): one tunnel datagram minus the sealing and
/// the kind byte.
pub fn kcp_mtu(tunnel_payload: usize) -> usize {
    tunnel_payload - SEALED_OVERHEAD - 1
}

/// Segments a link holds at most: the send queue and window (`KCP_MAX_WAIT_SEGMENTS`),
/// the receive window and the receive queue KCP fills up to the window.
const KCP_MAX_HELD_SEGMENTS: usize = KCP_MAX_WAIT_SEGMENTS + 2 * KCP_WINDOW as usize;
// one tunnel datagram at most per segment (`kcp_mtu` of a 1500-byte payload bounds it)
const _: () = assert!(KCP_MAX_HELD_SEGMENTS * 1500 <= KCP_MEMORY_BUDGET_BYTES);

/// Collects KCP's output datagrams, each prefixed with the sealed kind `KCP`.
#[derive(Clone, Default)]
struct OutQueue(Rc<RefCell<PacketQueue>>);

impl Write for OutQueue {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.borrow_mut().push(&[&[sealed_kind::KCP], buf]);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("send queue full")]
    Full,
    #[error("malformed segment")]
    Malformed,
    #[error("KCP state broken by hostile input")]
    Broken,
}

pub struct KcpLink {
    kcp: Kcp<OutQueue>,
    out: OutQueue,
    epoch: Instant,
    next_update: Instant,
    conv: u32,
    broken: bool,
    /// Sent or received since the last flush: `poll_transmit` flushes first.
    unflushed: bool,
    /// Reused to frame IP packets as `INNER_IP` messages (no allocation per packet).
    scratch: Vec<u8>,
    /// Since when the next message has been waiting for fragments (`KCP_STALL_TIMEOUT`).
    incomplete_since: Option<Instant>,
}

impl KcpLink {
    pub fn new(conv: u32, now: Instant, tunnel_payload: usize) -> Self {
        let out = OutQueue::default();
        let mut kcp = Kcp::new(conv, out.clone());
        kcp.set_nodelay(true, KCP_INTERVAL.as_millis() as i32, 2, true);
        kcp.set_rx_minrto(KCP_MIN_RTO.as_millis() as u32);
        kcp.set_wndsize(KCP_WINDOW, KCP_WINDOW);
        kcp.set_mtu(kcp_mtu(tunnel_payload)).expect("mtu above the KCP minimum");
        kcp.set_maximum_resend_times(KCP_DEAD_LINK_RESENDS);
        // flush() refuses to run before the first update()
        let _ = kcp.update(0);
        Self {
            kcp,
            out,
            epoch: now,
            next_update: now,
            conv,
            broken: false,
            unflushed: false,
            scratch: Vec::new(),
            incomplete_since: None,
        }
    }

    fn ms(&self, now: Instant) -> u32 {
        now.saturating_duration_since(self.epoch).as_millis() as u32
    }

    pub fn conv(&self) -> u32 {
        self.conv
    }

    /// Largest message that goes in one segment.
    pub fn mss(&self) -> usize {
        self.kcp.mss()
    }

    pub fn is_broken(&self) -> bool {
        self.broken || self.kcp.is_dead_link()
    }

    /// Queues one message; it goes out at the next `poll_transmit`, not at the next
    /// interval, so throughput is not capped by the interval.
    pub fn send(&mut self, msg: &[u8]) -> Result<(), LinkError> {
        if self.broken {
            return Err(LinkError::Broken);
        }
        if self.kcp.wait_snd() >= KCP_MAX_WAIT_SEGMENTS {
            return Err(LinkError::Full);
        }
        self.unflushed = true;
        let kcp = &mut self.kcp;
        guarded(&mut self.broken, || kcp.send(msg).map(|_| ()).map_err(|_| LinkError::Malformed))
    }

    /// Whether `send` would take every one of `msgs` now.
    pub fn has_room_for(&self, msgs: &[Vec<u8>]) -> bool {
        let mss = self.kcp.mss().max(1);
        let segments: usize = msgs.iter().map(|m| m.len().div_ceil(mss).max(1)).sum();
        !self.broken && self.kcp.wait_snd() + segments <= KCP_MAX_WAIT_SEGMENTS
    }

    /// Sends one IP packet as an `INNER_IP` message.
    pub fn send_ip(&mut self, packet: &[u8]) -> Result<(), LinkError> {
        let mut msg = std::mem::take(&mut self.scratch);
        msg.clear();
        msg.push(INNER_IP);
        msg.extend_from_slice(packet);
        let r = self.send(&msg);
        self.scratch = msg;
        r
    }

    /// One KCP segment from the other side (without our kind byte). Its ACK goes
    /// out at the next `poll_transmit` (the end of the caller's batch), not at the next
    /// interval: the tunnel below already adds a hop.
    pub fn input(&mut self, now: Instant, segment: &[u8]) -> Result<(), LinkError> {
        if self.broken {
            return Err(LinkError::Broken);
        }
        // kcp::get_conv panics below a header's length; check conv ourselves
        if segment.len() < KCP_HEADER_LEN || kcp::get_conv(segment) != self.conv {
            return Err(LinkError::Malformed);
        }
        let ms = self.ms(now);
        self.unflushed = true;
        let kcp = &mut self.kcp;
        guarded(&mut self.broken, || {
            kcp.input(segment).map_err(|_| LinkError::Malformed)?;
            // keeps KCP's clock current for RTT samples and the timestamps of new segments
            kcp.update(ms).map_err(|_| LinkError::Malformed)
        })
    }

    /// The next complete message, into `buf`. A message larger than `buf` can never be
    /// taken: it breaks the link rather than blocking every message behind it.
    pub fn recv(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
        if self.broken {
            return None;
        }
        match self.kcp.peeksize() {
            Ok(n) if n > buf.len() => {
                self.broken = true;
                return None;
            }
            Err(kcp::Error::ExpectingFragment) => {
                let since = *self.incomplete_since.get_or_insert(now);
                if now.saturating_duration_since(since) >= KCP_STALL_TIMEOUT {
                    self.broken = true;
                }
                return None;
            }
            _ => self.incomplete_since = None,
        }
        let kcp = &mut self.kcp;
        let n = guarded(&mut self.broken, || Ok(kcp.recv(buf).ok())).ok().flatten();
        // taking a message may reopen a full receive window: KCP tells the sender at its
        // next flush, which must not wait for an idle link's timer
        self.unflushed |= n.is_some();
        n
    }

    /// Next datagram for the tunnel, into `out`; returns its length. Flushes what `send`
    /// and `input` queued first, so one flush serves a whole batch.
    pub fn poll_transmit(&mut self, out: &mut [u8]) -> Option<usize> {
        if self.unflushed && !self.broken {
            self.unflushed = false;
            let kcp = &mut self.kcp;
            // a failed flush leaves nothing to send; a panic marks the link broken
            let _ = guarded(&mut self.broken, || kcp.flush().map_err(|_| LinkError::Malformed));
        }
        self.out.0.borrow_mut().pop_into(out)
    }

    /// Whether `poll_transmit` has a segment to give (or a flush to make).
    pub fn has_output(&self) -> bool {
        !self.broken && (self.unflushed || !self.out.0.borrow().is_empty())
    }

    /// When `handle_timeout` has work: KCP's next interval while anything waits to be
    /// sent or acknowledged; an idle link only once a second (a pair or a peer that says
    /// nothing must not wake its process every 10 ms).
    pub fn poll_timeout(&self) -> Instant {
        if self.kcp.wait_snd() == 0 && !self.unflushed {
            self.next_update + KCP_IDLE_UPDATE_INTERVAL
        } else {
            self.next_update
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if now < self.next_update || self.broken {
            return;
        }
        let ms = self.ms(now);
        let kcp = &mut self.kcp;
        if let Ok(delay) = guarded(&mut self.broken, || {
            let _ = kcp.update(ms);
            Ok(kcp.check(ms))
        }) {
            // check() gives a delay in ms; at least 1 ms so we never spin
            self.next_update = now + Duration::from_millis(u64::from(delay.max(1)));
        }
    }
}

/// Runs kcp calls that hostile input may make panic; a panic marks the link `broken`.
fn guarded<T>(broken: &mut bool, f: impl FnOnce() -> Result<T, LinkError>) -> Result<T, LinkError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| {
        *broken = true;
        Err(LinkError::Broken)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::field;

    fn pump(a: &mut KcpLink, b: &mut KcpLink, now: Instant) {
        let mut d = [0u8; 2048];
        while let Some(n) = a.poll_transmit(&mut d) {
            let _ = b.input(now, &d[field::kcp::SEGMENT..n]);
        }
        while let Some(n) = b.poll_transmit(&mut d) {
            let _ = a.input(now, &d[field::kcp::SEGMENT..n]);
        }
    }

    /// Golden framing of a message carrying KCP: the kind byte, then the segment
    /// (conv little-endian first, as KCP writes it), whose data is `INNER_IP` + the packet.
    #[test]
    fn kcp_datagram_golden() {
        let t0 = common::sim::epoch();
        let mut a = KcpLink::new(0x0102_0304, t0, 1438);
        a.send_ip(&[0x45, 0xaa]).unwrap();
        let mut d = [0u8; 2048];
        let n = a.poll_transmit(&mut d).unwrap();
        assert_eq!(&d[..5], &[sealed_kind::KCP, 4, 3, 2, 1]);
        assert_eq!(n, field::kcp::SEGMENT + KCP_HEADER_LEN + 3);
        assert_eq!(&d[n - 3..n], &[INNER_IP, 0x45, 0xaa]);
    }

    #[test]
    fn messages_arrive_whole_and_in_order() {
        let t0 = common::sim::epoch();
        let mut a = KcpLink::new(7, t0, 1438);
        let mut b = KcpLink::new(7, t0, 1438);
        assert_eq!(a.mss(), 1384);
        for i in 0..100u32 {
            let mut m = vec![0u8; 1384];
            m[..4].copy_from_slice(&i.to_be_bytes());
            a.send(&m).unwrap();
        }
        let mut now = t0;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 4096];
        for _ in 0..50 {
            pump(&mut a, &mut b, now);
            while let Some(n) = b.recv(now, &mut buf) {
                assert_eq!(n, 1384);
                got.push(u32::from_be_bytes(buf[..4].try_into().unwrap()));
            }
            now += Duration::from_millis(10);
            a.handle_timeout(now);
            b.handle_timeout(now);
        }
        assert_eq!(got, (0..100).collect::<Vec<_>>());
    }

    /// Hostile segments are refused or absorbed, never a panic inside kcp: the link is
    /// never marked broken, so every input really reaches kcp. (Before, the first caught
    /// panic marked the link broken, every later input returned at once and the test
    /// could no longer fail.)
    #[test]
    fn hostile_segments_never_panic() {
        let t0 = common::sim::epoch();
        let mut l = KcpLink::new(7, t0, 1438);
        let mut rng = common::sim::SimRng::new(3);
        let mut buf = vec![0u8; common::wire::MAX_DATAGRAM];
        let mut now = t0;
        for len in [0usize, 3, 23, 24, 25, 40, 200, 1500] {
            for _ in 0..300 {
                let mut seg: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
                if len >= 4 && rng.chance(0.7) {
                    seg[..4].copy_from_slice(&7u32.to_le_bytes());
                }
                let r = l.input(now, &seg);
                assert!(!matches!(r, Err(LinkError::Broken)), "a {len}-byte segment broke the link: {seg:02x?}");
                while l.recv(now, &mut buf).is_some() {}
                now += Duration::from_millis(20);
                l.handle_timeout(now);
                assert!(!l.is_broken(), "a timer after a {len}-byte segment broke the link");
            }
        }
    }

    /// Before, a message larger than the receiver's buffer stayed at the head of KCP's
    /// queue forever and everything behind it waited: now it breaks the link (the peer
    /// registers again).
    #[test]
    fn a_message_larger_than_the_receive_buffer_breaks_the_link() {
        let t0 = common::sim::epoch();
        let (mut a, mut b) = (KcpLink::new(7, t0, 1438), KcpLink::new(7, t0, 1438));
        a.send(&vec![1u8; 70_000]).unwrap();
        a.send_ip(&[0x45; 40]).unwrap();
        let mut buf = vec![0u8; common::wire::MAX_DATAGRAM];
        let mut now = t0;
        for _ in 0..20 {
            pump(&mut a, &mut b, now);
            assert_eq!(b.recv(now, &mut buf), None);
            now += Duration::from_millis(10);
            a.handle_timeout(now);
            b.handle_timeout(now);
        }
        assert!(b.is_broken());
    }

    /// A message whose last fragment never arrives (a hostile or broken sender) breaks
    /// the link after `KCP_STALL_TIMEOUT` instead of blocking it forever.
    #[test]
    fn a_message_stuck_without_its_last_fragment_breaks_the_link() {
        let t0 = common::sim::epoch();
        let (mut a, mut b) = (KcpLink::new(7, t0, 1438), KcpLink::new(7, t0, 1438));
        a.send(&vec![2u8; 5000]).unwrap(); // four fragments
        let mut buf = vec![0u8; common::wire::MAX_DATAGRAM];
        let mut d = [0u8; 2048];
        let mut now = t0;
        while now < t0 + KCP_STALL_TIMEOUT + Duration::from_secs(1) {
            while let Some(n) = a.poll_transmit(&mut d) {
                let seg = &d[field::kcp::SEGMENT..n];
                // KCP header: conv u32, cmd u8, frg u8 (little-endian layout)
                let last_fragment = seg.len() > KCP_HEADER_LEN && seg[5] == 0;
                if !last_fragment {
                    let _ = b.input(now, seg);
                }
            }
            while let Some(n) = b.poll_transmit(&mut d) {
                let _ = a.input(now, &d[field::kcp::SEGMENT..n]);
            }
            assert_eq!(b.recv(now, &mut buf), None);
            now += Duration::from_millis(50);
            a.handle_timeout(now);
            b.handle_timeout(now);
        }
        assert!(b.is_broken());
    }

    /// A bounded run of the fuzz harness on seeded random input (the real fuzzer is
    /// `cargo fuzz run hub_peer_input` in vpn/fuzz).
    #[test]
    fn hub_survives_random_peer_input() {
        let mut rng = common::sim::SimRng::new(11);
        for _ in 0..200 {
            let len = (rng.next_u64() % 4096) as usize;
            let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            crate::sim::raw::fuzz_peer_input(&data);
        }
    }
}
