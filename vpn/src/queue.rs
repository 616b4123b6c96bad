//! A FIFO of packets kept in one reused byte ring: once the ring has grown to its working
//! size, queuing a packet and taking it out allocate nothing (one `Vec` per packet did).
//! A ring a burst grew past `RETAINED_BYTES` gives the excess back once it is empty: a
//! hub keeps one per peer link, and one whole peer list each would otherwise stay
//! O(peers) bytes per peer for good.

use std::collections::VecDeque;

/// What an empty ring keeps of its capacity (a few full datagrams).
pub const RETAINED_BYTES: usize = 8 << 10;

#[derive(Debug, Default)]
pub struct PacketQueue {
    bytes: VecDeque<u8>,
    lens: VecDeque<usize>,
}

impl PacketQueue {
    /// Queues one packet made of `parts`, in order.
    pub fn push(&mut self, parts: &[&[u8]]) {
        let mut n = 0;
        for p in parts {
            self.bytes.extend(p.iter());
            n += p.len();
        }
        self.lens.push_back(n);
    }

    /// Takes the oldest packet into `out`; returns its length (cut to `out.len()`).
    pub fn pop_into(&mut self, out: &mut [u8]) -> Option<usize> {
        let n = self.lens.pop_front()?;
        let m = n.min(out.len());
        let (a, b) = self.bytes.as_slices();
        let from_a = m.min(a.len());
        out[..from_a].copy_from_slice(&a[..from_a]);
        out[from_a..m].copy_from_slice(&b[..m - from_a]);
        self.bytes.drain(..n);
        if self.lens.is_empty() && self.bytes.capacity() > RETAINED_BYTES {
            self.bytes.shrink_to(RETAINED_BYTES);
            self.lens.shrink_to(RETAINED_BYTES / 64);
        }
        Some(m)
    }

    pub fn is_empty(&self) -> bool {
        self.lens.is_empty()
    }

    /// Packets queued.
    pub fn len(&self) -> usize {
        self.lens.len()
    }

    pub fn clear(&mut self) {
        self.bytes.clear();
        self.lens.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_come_out_whole_and_in_order_across_the_ring_edge() {
        let mut q = PacketQueue::default();
        let mut out = [0u8; 64];
        for round in 0..50u8 {
            q.push(&[&[round], &[round; 20]]);
            q.push(&[&[round; 7]]);
            assert_eq!(q.pop_into(&mut out), Some(21));
            assert_eq!(out[..21], [round; 21]);
            assert_eq!(q.pop_into(&mut out), Some(7));
            assert_eq!(out[..7], [round; 7]);
        }
        assert!(q.is_empty());
        assert_eq!(q.pop_into(&mut out), None);
        q.push(&[&[1; 10]]);
        assert_eq!(q.pop_into(&mut out[..4]), Some(4), "cut to the buffer");
        assert!(q.is_empty());
    }

    #[test]
    fn a_ring_a_burst_grew_gives_the_excess_back_once_empty() {
        let mut q = PacketQueue::default();
        let mut out = [0u8; 1400];
        for _ in 0..100 {
            q.push(&[&[7; 1400]]);
        }
        assert!(q.bytes.capacity() >= 140_000);
        while q.pop_into(&mut out).is_some() {}
        assert!(q.bytes.capacity() <= RETAINED_BYTES, "{}", q.bytes.capacity());
        // a working size below the limit stays: no allocation per packet
        q.push(&[&[1; 1000]]);
        let cap = q.bytes.capacity();
        for _ in 0..100 {
            q.push(&[&[1; 1000]]);
            q.pop_into(&mut out);
        }
        assert_eq!(q.bytes.capacity(), cap);
    }
}
