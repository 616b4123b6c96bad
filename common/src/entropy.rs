//! The random source the cores are given, never one they open themselves.
//!
//! Session ids, path challenges and handshake ephemeral keys come from an `Entropy` the
//! caller injects: the drivers pass `OsEntropy` (the system's secure random source); the
//! simulator passes a seeded one, so a seed replays a run exactly (quinn-proto seeds its
//! endpoint's rng the same way).

use ring::agreement::{self, EphemeralPrivateKey};
use ring::rand::{SecureRandom, SystemRandom};

/// Randomness for a core.
pub trait Entropy: Send {
    /// Fills `dest` with unpredictable bytes.
    fn fill(&mut self, dest: &mut [u8]);

    /// A fresh X25519 private key for one handshake.
    fn x25519_key(&mut self) -> EphemeralPrivateKey;

    /// An independent source for another core (one per direct session of the mesh):
    /// the system's again, or, seeded from this one, the simulator's.
    fn fork(&mut self) -> Box<dyn Entropy>;

    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill(&mut b);
        u64::from_ne_bytes(b)
    }
}

/// The operating system's secure random source (getrandom), through ring.
pub struct OsEntropy(SystemRandom);

impl OsEntropy {
    pub fn new() -> Self {
        Self(SystemRandom::new())
    }
}

impl Default for OsEntropy {
    fn default() -> Self {
        Self::new()
    }
}

impl Entropy for OsEntropy {
    fn fill(&mut self, dest: &mut [u8]) {
        // getrandom only fails on a kernel without it; nothing secure can go on then
        self.0.fill(dest).expect("the system's random source");
    }

    fn x25519_key(&mut self) -> EphemeralPrivateKey {
        EphemeralPrivateKey::generate(&agreement::X25519, &self.0).expect("the system's random source")
    }

    fn fork(&mut self) -> Box<dyn Entropy> {
        Box::new(OsEntropy::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_entropy_differs_between_calls() {
        let mut e = OsEntropy::new();
        assert_ne!(e.next_u64(), e.next_u64());
        let (a, b) = (e.x25519_key(), e.x25519_key());
        assert_ne!(a.compute_public_key().unwrap().as_ref(), b.compute_public_key().unwrap().as_ref());
    }
}
