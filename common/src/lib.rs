//! Sans-IO core of the multipath redundant UDP tunnel.
//!
//! Nothing here touches a socket or a clock: state machines take `now` and bytes in and
//! give datagrams, deadlines and events out (`handle_*` in, `poll_*` out). The binaries
//! (`mpclient`, `mpserver`, `mpbridge`) only move bytes and time; the helpers they share
//! (sockets, the control socket, key handling) are in `driver`, behind the `driver` feature.

pub mod client;
pub mod config;
pub mod crypto;
#[cfg(feature = "driver")]
pub mod driver;
pub mod log;
pub mod path;
pub mod replay;
pub mod server;
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
