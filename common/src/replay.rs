//! The replay and dedup window (RFC 6479 bitmap).
//!
//! One window per session and direction. Copies of a datagram sent over several paths
//! share a sequence number, so the first copy to arrive passes and the rest are
//! duplicates. Invariant: callers `check` before decrypting and `mark` only after the
//! AEAD opened the datagram, so forged packets never move the window.

const BLOCK_BITS: u64 = 64;
/// Number of 64-bit blocks in the ring (a power of two).
pub const REPLAY_BLOCKS: usize = 256;
/// How far behind the highest sequence number a datagram may arrive and still count:
/// 16 320 sequence numbers, enough for ~160 kpps with 100 ms of skew between paths.
pub const REPLAY_WINDOW: u64 = (REPLAY_BLOCKS as u64 - 1) * BLOCK_BITS;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayVerdict {
    /// Never seen and inside the window.
    Fresh,
    /// Seen before: a copy from another path, or a replay.
    Duplicate,
    /// Too far behind the window to tell; dropped.
    TooOld,
}

#[derive(Clone)]
pub struct ReplayWindow {
    /// Highest sequence number marked so far (valid once `any` is set).
    top: u64,
    any: bool,
    bitmap: Box<[u64; REPLAY_BLOCKS]>,
    /// Sequence numbers that left the window without arriving (the sender numbers from
    /// zero, so every gap is one): datagrams lost on every path.
    missed: u64,
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for ReplayWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReplayWindow(top={}, any={})", self.top, self.any)
    }
}

impl ReplayWindow {
    pub fn new() -> Self {
        Self { top: 0, any: false, bitmap: Box::new([0; REPLAY_BLOCKS]), missed: 0 }
    }

    fn slot(seq: u64) -> (usize, u64) {
        (((seq / BLOCK_BITS) as usize) & (REPLAY_BLOCKS - 1), 1u64 << (seq % BLOCK_BITS))
    }

    /// Would `seq` be accepted? Does not change the window.
    pub fn check(&self, seq: u64) -> ReplayVerdict {
        if !self.any || seq > self.top {
            return ReplayVerdict::Fresh;
        }
        if self.top - seq >= REPLAY_WINDOW {
            return ReplayVerdict::TooOld;
        }
        let (i, bit) = Self::slot(seq);
        if self.bitmap[i] & bit != 0 {
            ReplayVerdict::Duplicate
        } else {
            ReplayVerdict::Fresh
        }
    }

    /// Records `seq` as received. Call only after `check` said `Fresh` and the datagram
    /// authenticated.
    pub fn mark(&mut self, seq: u64) {
        if !self.any {
            self.any = true;
            self.top = seq;
        } else if seq > self.top {
            let cur = self.top / BLOCK_BITS;
            let new = seq / BLOCK_BITS;
            let clear = (new - cur).min(REPLAY_BLOCKS as u64);
            for k in 1..=clear {
                let i = ((cur + k) as usize) & (REPLAY_BLOCKS - 1);
                // the block leaving held numbers `REPLAY_BLOCKS` blocks back, if any
                if cur + k >= REPLAY_BLOCKS as u64 {
                    self.missed += u64::from(self.bitmap[i].count_zeros());
                }
                self.bitmap[i] = 0;
            }
            // a jump past the whole window: the blocks skipped were all missed
            self.missed += (new - cur).saturating_sub(REPLAY_BLOCKS as u64) * BLOCK_BITS;
            self.top = seq;
        }
        let (i, bit) = Self::slot(seq);
        self.bitmap[i] |= bit;
    }

    /// Sequence numbers that fell out of the window without arriving.
    pub fn missed(&self) -> u64 {
        self.missed
    }

    /// Highest sequence number seen, if any.
    pub fn top(&self) -> Option<u64> {
        self.any.then_some(self.top)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    /// The obvious model: remember everything, accept what is new and within the window.
    struct Model {
        seen: HashSet<u64>,
        top: Option<u64>,
    }

    impl Model {
        fn accept(&mut self, seq: u64) -> bool {
            if let Some(top) = self.top {
                if seq <= top && top - seq >= REPLAY_WINDOW {
                    return false;
                }
            }
            if !self.seen.insert(seq) {
                return false;
            }
            self.top = Some(self.top.map_or(seq, |t| t.max(seq)));
            true
        }
    }

    fn run(w: &mut ReplayWindow, seq: u64) -> bool {
        if w.check(seq) == ReplayVerdict::Fresh {
            w.mark(seq);
            true
        } else {
            false
        }
    }

    #[test]
    fn basics() {
        let mut w = ReplayWindow::new();
        assert!(run(&mut w, 0));
        assert!(!run(&mut w, 0));
        assert!(run(&mut w, 5));
        assert!(run(&mut w, 3));
        assert_eq!(w.check(3), ReplayVerdict::Duplicate);
        assert!(run(&mut w, 100_000));
        assert_eq!(w.check(5), ReplayVerdict::TooOld);
        assert_eq!(w.check(100_000 - REPLAY_WINDOW), ReplayVerdict::TooOld);
        assert_eq!(w.check(100_000 - REPLAY_WINDOW + 1), ReplayVerdict::Fresh);
        assert!(run(&mut w, u64::MAX));
        assert!(!run(&mut w, u64::MAX));
    }

    #[test]
    fn numbers_that_never_came_are_counted_once_they_leave_the_window() {
        let mut w = ReplayWindow::new();
        for seq in (0..3 * REPLAY_WINDOW).filter(|s| s % 10 != 3) {
            w.mark(seq);
        }
        // what left the window: every tenth number, less the last block's worth
        let left = 3 * REPLAY_WINDOW - REPLAY_WINDOW - BLOCK_BITS;
        let missed = w.missed();
        assert!(missed.abs_diff(left / 10) <= BLOCK_BITS / 10 + 1, "{missed} of {left}");
        let before = w.missed();
        w.mark(10 * REPLAY_WINDOW);
        assert!(w.missed() - before >= 6 * REPLAY_WINDOW, "a jump counts what it skipped");
    }

    #[test]
    fn check_does_not_mark() {
        let mut w = ReplayWindow::new();
        w.mark(10);
        assert_eq!(w.check(11), ReplayVerdict::Fresh);
        assert_eq!(w.check(11), ReplayVerdict::Fresh);
        assert_eq!(w.top(), Some(10));
    }

    /// Sequences as several paths would deliver them: each path in order with its own
    /// delay, losses, and occasional jumps far ahead of the window.
    fn multipath_sequence() -> impl Strategy<Value = Vec<u64>> {
        prop::collection::vec((0u64..3, 0u64..200, prop::bool::weighted(0.02)), 1..600).prop_map(|steps| {
            let mut base = 0u64;
            let mut out = Vec::new();
            for (path, lag, jump) in steps {
                if jump {
                    base += REPLAY_WINDOW + 1000;
                }
                base += 1;
                out.push(base.saturating_sub(lag * path));
                out.push(base);
            }
            out
        })
    }

    proptest! {
        #[test]
        fn matches_model_random(seqs in prop::collection::vec(0u64..40_000, 1..2000)) {
            let mut w = ReplayWindow::new();
            let mut m = Model { seen: HashSet::new(), top: None };
            for s in seqs {
                prop_assert_eq!(run(&mut w, s), m.accept(s), "seq {}", s);
            }
        }

        #[test]
        fn matches_model_multipath(seqs in multipath_sequence()) {
            let mut w = ReplayWindow::new();
            let mut m = Model { seen: HashSet::new(), top: None };
            for s in seqs {
                prop_assert_eq!(run(&mut w, s), m.accept(s), "seq {}", s);
            }
        }
    }
}
