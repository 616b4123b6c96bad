//! The sealed channel of one registration: what binds every VPN datagram to a peer's key.
//!
//! A Register carries the peer's ephemeral X25519 key, the Welcome the hub's, both under
//! the MAC of the peer's own key. Both sides derive the channel keys from the X25519
//! secret with HKDF (salt: derived from the peer key; info: both public keys, the
//! Register's nonce and the peer id). So only the holder of the peer key *and* of the
//! ephemeral secret has them: a replayed Register, also after a hub restart, gives the
//! hub a registration nobody can use, and a transport address another peer once had
//! carries nothing that opens.
//!
//! Invariants: a sequence number is sealed at most once per key (a counter per side,
//! nonce = direction || seq); the receiver checks the replay window before opening and
//! marks it only after the AEAD opened, so forged datagrams never move it.

use crate::wire::{PeerKey, SealedHeader, PUBLIC_KEY_LEN, SEALED_HEADER_LEN};
use common::crypto::{self, Cipher, SessionKeys};
use common::replay::{ReplayVerdict, ReplayWindow};
use common::wire::AEAD_TAG_LEN;
use ring::agreement::EphemeralPrivateKey;

/// The AEAD of every channel (AES-NI makes it the cheaper one where it matters: the hub).
pub const CHANNEL_CIPHER: Cipher = Cipher::Aes256Gcm;

/// Why a sealed datagram was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenFailure {
    Malformed,
    /// A sequence number seen before, or too old to tell.
    Replayed,
    /// Not sealed under this channel's key.
    BadMac,
}

/// What a Register and its Welcome agreed on, for the key derivation.
pub struct Agreement<'a> {
    pub key: &'a PeerKey,
    pub nonce: u64,
    pub peer_id: u32,
    pub peer_public: &'a [u8; PUBLIC_KEY_LEN],
    pub hub_public: &'a [u8; PUBLIC_KEY_LEN],
}

pub struct Channel {
    keys: SessionKeys,
    peer_id: u32,
    next_seq: u64,
    replay: ReplayWindow,
}

impl Channel {
    /// The channel of the registration `a`, from our ephemeral secret: the peer's side
    /// (`is_peer`) or the hub's.
    pub fn establish(
        a: &Agreement,
        private: EphemeralPrivateKey,
        is_peer: bool,
    ) -> Result<Self, crypto::HandshakeError> {
        let salt = a.key.channel_salt();
        let (nonce, id) = (a.nonce.to_be_bytes(), a.peer_id.to_be_bytes());
        let info: [&[u8]; 5] = [b"mpvpn v1 channel keys", &nonce, &id, a.peer_public, a.hub_public];
        let theirs = if is_peer { a.hub_public } else { a.peer_public };
        let keys = crypto::agree_channel_keys(private, theirs, salt.as_ref(), &info, CHANNEL_CIPHER, is_peer)?;
        Ok(Self { keys, peer_id: a.peer_id, next_seq: 0, replay: ReplayWindow::new() })
    }

    pub fn peer_id(&self) -> u32 {
        self.peer_id
    }

    /// Seals the message at `out[SEALED_HEADER_LEN..][..len]` in place, header before it
    /// and tag after it; returns the datagram's length. `out` needs `AEAD_TAG_LEN` bytes
    /// of room after the message.
    pub fn seal(&mut self, out: &mut [u8], len: usize) -> usize {
        let seq = self.next_seq;
        self.next_seq += 1;
        SealedHeader { peer_id: self.peer_id, seq }.emit(out);
        self.keys.seal_after(SEALED_HEADER_LEN, seq, out, len)
    }

    /// Seals a short message (a heartbeat or its ack) into a datagram of its own.
    pub fn seal_message(&mut self, msg: &[u8]) -> Vec<u8> {
        let mut d = vec![0u8; SEALED_HEADER_LEN + msg.len() + AEAD_TAG_LEN];
        d[SEALED_HEADER_LEN..][..msg.len()].copy_from_slice(msg);
        let n = self.seal(&mut d, msg.len());
        d.truncate(n);
        d
    }

    /// Opens the sealed datagram `d`, whose header the caller parsed as `h` (to find this
    /// channel), through `scratch`; returns the message.
    pub fn open<'s>(&mut self, h: SealedHeader, d: &[u8], scratch: &'s mut [u8]) -> Result<&'s [u8], OpenFailure> {
        if h.peer_id != self.peer_id || d.len() > scratch.len() {
            return Err(OpenFailure::Malformed);
        }
        if self.replay.check(h.seq) != ReplayVerdict::Fresh {
            return Err(OpenFailure::Replayed);
        }
        let buf = &mut scratch[..d.len()];
        buf.copy_from_slice(d);
        let n = self.keys.open_after(SEALED_HEADER_LEN, h.seq, buf).map_err(|_| OpenFailure::BadMac)?;
        self.replay.mark(h.seq);
        Ok(&scratch[SEALED_HEADER_LEN..SEALED_HEADER_LEN + n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::entropy::Entropy;
    use common::sim::SimEntropy;

    /// Parses the header, as the hub and the peer do, then opens.
    fn open<'s>(c: &mut Channel, d: &[u8], scratch: &'s mut [u8]) -> Result<&'s [u8], OpenFailure> {
        let h = SealedHeader::parse(d).map_err(|_| OpenFailure::Malformed)?;
        c.open(h, d, scratch)
    }

    fn pair(key: &PeerKey, e: &mut SimEntropy) -> (Channel, Channel) {
        let (p, h) = (e.x25519_key(), e.x25519_key());
        let (pp, hp) = (crypto::x25519_public(&p), crypto::x25519_public(&h));
        let a = Agreement { key, nonce: 7, peer_id: 3, peer_public: &pp, hub_public: &hp };
        (Channel::establish(&a, p, true).unwrap(), Channel::establish(&a, h, false).unwrap())
    }

    #[test]
    fn both_ends_agree_and_nothing_else_opens() {
        let key = PeerKey::new(&[5; 32]);
        let mut e = SimEntropy::new(1);
        let (mut peer, mut hub) = pair(&key, &mut e);
        let mut scratch = [0u8; 256];
        let d = peer.seal_message(b"\x01hello");
        assert_eq!(d.len(), SEALED_HEADER_LEN + 6 + AEAD_TAG_LEN);
        assert_eq!(&d[..5], &[crate::wire::MSG_SEALED, 0, 0, 0, 3]);
        assert_eq!(open(&mut hub, &d, &mut scratch), Ok(&b"\x01hello"[..]));
        // a replay, a datagram sealed the other way, a flipped bit
        assert_eq!(open(&mut hub, &d, &mut scratch), Err(OpenFailure::Replayed));
        let back = hub.seal_message(b"\x02ack");
        let own = peer.seal_message(b"\x01y");
        assert_eq!(open(&mut peer, &own, &mut scratch), Err(OpenFailure::BadMac));
        assert_eq!(open(&mut peer, &back, &mut scratch), Ok(&b"\x02ack"[..]));
        let mut forged = peer.seal_message(b"\x01x");
        let last = forged.len() - 1;
        forged[last] ^= 1;
        assert_eq!(open(&mut hub, &forged, &mut scratch), Err(OpenFailure::BadMac));
        // the forged datagram did not move the window: its sequence number still opens
        let mut again = forged.clone();
        again[last] ^= 1;
        assert_eq!(open(&mut hub, &again, &mut scratch), Ok(&b"\x01x"[..]));
        // another registration of the same peer (same key, fresh ephemerals) opens nothing
        let (mut other_peer, _) = pair(&key, &mut e);
        let d = (0..5).map(|_| other_peer.seal_message(b"\x01hello")).last().unwrap();
        assert_eq!(open(&mut hub, &d, &mut scratch), Err(OpenFailure::BadMac));
        assert_eq!(open(&mut hub, &d[..SEALED_HEADER_LEN], &mut scratch), Err(OpenFailure::Malformed));
    }
}
