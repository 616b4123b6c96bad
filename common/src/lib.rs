//! Sans-IO core of the multipath redundant UDP tunnel.
//!
//! Nothing in the core touches a socket, a file, a clock or the system's random source:
//! state machines take `now`, bytes and an injected `Entropy` in and give datagrams,
//! deadlines and events out (`handle_*` in, `poll_*` out). Built without features, the
//! crate depends on none of mio, libc, socket2, slog-term or slog-async and forbids
//! `unsafe`, so the compiler keeps it pure.
//!
//! The one driver skeleton every daemon shares (the mio event loop, batched sockets, the
//! control socket, signals, logging setup, key and config files) is `driver`, behind the
//! `driver` feature. The seeded simulator is `sim`, behind the test-only `sim` feature.

#![cfg_attr(not(feature = "driver"), forbid(unsafe_code))]
#![cfg_attr(feature = "driver", deny(unsafe_code))]

pub mod client;
pub mod config;
pub mod crypto;
#[cfg(feature = "driver")]
#[allow(unsafe_code)]
pub mod driver;
pub mod entropy;
pub mod fec;
pub mod path;
pub mod redundancy;
pub mod replay;
pub mod server;
#[cfg(feature = "sim")]
pub mod sim;
pub mod stats;
pub mod wire;

/// A session's random 64-bit id; new for every handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A set of path slots (bit i = slot i): where one sealed datagram is to be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PathMask(pub u32);

/// The most paths one client or one session may have.
pub const MAX_PATHS: usize = 32;

impl PathMask {
    pub const EMPTY: PathMask = PathMask(0);

    pub fn single(i: usize) -> Self {
        Self(1 << i)
    }

    pub fn first_n(n: usize) -> Self {
        if n >= 32 {
            Self(u32::MAX)
        } else {
            Self((1u32 << n) - 1)
        }
    }

    pub fn insert(&mut self, i: usize) {
        self.0 |= 1 << i;
    }

    pub fn contains(self, i: usize) -> bool {
        i < 32 && self.0 & (1 << i) != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn len(self) -> usize {
        self.0.count_ones() as usize
    }

    pub fn iter(self) -> impl Iterator<Item = usize> {
        (0..32).filter(move |&i| self.0 & (1 << i) != 0)
    }
}

/// An iterator whose length is known (what `emit_receipt` takes) from a filtered one.
pub(crate) struct ExactLen<I>(pub(crate) I, pub(crate) usize);

impl<I: Iterator> Iterator for ExactLen<I> {
    type Item = I::Item;
    fn next(&mut self) -> Option<I::Item> {
        self.0.next()
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.1, Some(self.1))
    }
}

impl<I: Iterator> ExactSizeIterator for ExactLen<I> {}
