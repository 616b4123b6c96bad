//! Keys, the handshake and the AEAD.
//!
//! Handshake: PSK-authenticated ephemeral X25519. The init and response each carry an
//! HMAC-SHA256 keyed from the PSK (the response's MAC also covers the whole init, so it
//! answers exactly that init). Session keys come from HKDF-SHA256 with the PSK as salt,
//! the X25519 shared secret as input key material and a hash of the transcript as info:
//! forward secrecy, and a replayed init yields keys nobody but the server holds.
//!
//! AEAD nonce = 4-byte direction || 8-byte sequence number; the AAD is the transport
//! header. Both are identical in every copy of a datagram (seal once, send N copies).

use crate::entropy::Entropy;
use crate::wire::{
    self, HandshakeInitRepr, HandshakeRespRepr, HandshakeStatus, RedundancyRequest, AEAD_TAG_LEN,
    HANDSHAKE_INIT_MAX_LEN, HANDSHAKE_MAC_LEN, HANDSHAKE_RESP_BODY_LEN, HANDSHAKE_RESP_LEN, TRANSPORT_HEADER_LEN,
};
use crate::SessionId;
use base64::Engine as _;
use ring::{aead, agreement, digest, hkdf, hmac};

pub const PSK_LEN: usize = 32;

/// The pre-shared key both ends hold.
#[derive(Clone)]
pub struct Psk([u8; PSK_LEN]);

impl std::fmt::Debug for Psk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Psk(..)")
    }
}

impl Psk {
    pub fn generate(entropy: &mut dyn Entropy) -> Self {
        let mut k = [0u8; PSK_LEN];
        entropy.fill(&mut k);
        Self(k)
    }

    pub fn from_bytes(k: [u8; PSK_LEN]) -> Self {
        Self(k)
    }

    /// The raw key (for protocols that key their own MACs with it, like the VPN's).
    pub fn bytes(&self) -> [u8; PSK_LEN] {
        self.0
    }

    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }

    pub fn from_base64(s: &str) -> Option<Self> {
        let v = base64::engine::general_purpose::STANDARD.decode(s.trim()).ok()?;
        let k: [u8; PSK_LEN] = v.try_into().ok()?;
        Some(Self(k))
    }

    fn mac_key(&self) -> hmac::Key {
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"mpt v1 handshake mac");
        let prk = salt.extract(&self.0);
        let okm = prk.expand(&[b"mac"], hmac::HMAC_SHA256).expect("hkdf length");
        hmac::Key::from(okm)
    }
}

/// The AEAD algorithm of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Cipher {
    #[serde(rename = "aes-256-gcm")]
    Aes256Gcm,
    #[serde(rename = "chacha20-poly1305")]
    ChaCha20Poly1305,
}

impl Cipher {
    pub fn id(self) -> u8 {
        match self {
            Self::Aes256Gcm => 1,
            Self::ChaCha20Poly1305 => 2,
        }
    }

    pub fn from_id(id: u8) -> Option<Self> {
        match id {
            1 => Some(Self::Aes256Gcm),
            2 => Some(Self::ChaCha20Poly1305),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Aes256Gcm => "aes-256-gcm",
            Self::ChaCha20Poly1305 => "chacha20-poly1305",
        }
    }

    fn algorithm(self) -> &'static aead::Algorithm {
        match self {
            Self::Aes256Gcm => &aead::AES_256_GCM,
            Self::ChaCha20Poly1305 => &aead::CHACHA20_POLY1305,
        }
    }
}

/// Which way a datagram travels; part of the nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ClientToServer = 0,
    ServerToClient = 1,
}

fn nonce(dir: Direction, seq: u64) -> aead::Nonce {
    let mut n = [0u8; aead::NONCE_LEN];
    n[..4].copy_from_slice(&(dir as u32).to_be_bytes());
    n[4..].copy_from_slice(&seq.to_be_bytes());
    aead::Nonce::assume_unique_for_key(n)
}

/// The two directional keys of an established session.
pub struct SessionKeys {
    cipher: Cipher,
    seal: aead::LessSafeKey,
    open: aead::LessSafeKey,
    seal_dir: Direction,
    open_dir: Direction,
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SessionKeys({})", self.cipher.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("authentication failed")]
pub struct OpenError;

impl SessionKeys {
    pub fn cipher(&self) -> Cipher {
        self.cipher
    }

    /// Seals `buf[TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + plain_len]` in place, with
    /// the header already written at `buf[..TRANSPORT_HEADER_LEN]` as AAD, and appends the
    /// tag. Returns the datagram length. `buf` must have room for the tag.
    pub fn seal(&self, seq: u64, buf: &mut [u8], plain_len: usize) -> usize {
        self.seal_after(TRANSPORT_HEADER_LEN, seq, buf, plain_len)
    }

    /// Opens a transport datagram in place; returns the plaintext length, which starts at
    /// `buf[TRANSPORT_HEADER_LEN]`.
    pub fn open(&self, seq: u64, buf: &mut [u8]) -> Result<usize, OpenError> {
        self.open_after(TRANSPORT_HEADER_LEN, seq, buf)
    }

    /// `seal` for a message whose header (the AAD) is `header_len` bytes long.
    pub fn seal_after(&self, header_len: usize, seq: u64, buf: &mut [u8], plain_len: usize) -> usize {
        let (header, rest) = buf.split_at_mut(header_len);
        let tag = self
            .seal
            .seal_in_place_separate_tag(nonce(self.seal_dir, seq), aead::Aad::from(&*header), &mut rest[..plain_len])
            .expect("in-place seal of a bounded buffer");
        rest[plain_len..plain_len + AEAD_TAG_LEN].copy_from_slice(tag.as_ref());
        header_len + plain_len + AEAD_TAG_LEN
    }

    /// `open` for a message whose header (the AAD) is `header_len` bytes long.
    pub fn open_after(&self, header_len: usize, seq: u64, buf: &mut [u8]) -> Result<usize, OpenError> {
        if buf.len() < header_len + AEAD_TAG_LEN {
            return Err(OpenError);
        }
        let (header, rest) = buf.split_at_mut(header_len);
        let plain = self
            .open
            .open_in_place(nonce(self.open_dir, seq), aead::Aad::from(&*header), rest)
            .map_err(|_| OpenError)?;
        Ok(plain.len())
    }
}

struct OkmLen(usize);

impl hkdf::KeyType for OkmLen {
    fn len(&self) -> usize {
        self.0
    }
}

fn derive_keys(psk: &Psk, shared: &[u8], transcript: &[u8], cipher: Cipher, is_client: bool) -> SessionKeys {
    let th = digest::digest(&digest::SHA256, transcript);
    expand_keys(&psk.0, shared, &[b"mpt v1 session keys".as_slice(), th.as_ref()], cipher, is_client)
}

/// Two directional AEAD keys from HKDF-SHA256 (`salt`, the shared secret, `info`).
fn expand_keys(salt: &[u8], shared: &[u8], info: &[&[u8]], cipher: Cipher, is_client: bool) -> SessionKeys {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(shared);
    let mut okm = [0u8; 64];
    prk.expand(info, OkmLen(64)).expect("hkdf length").fill(&mut okm).expect("hkdf fill");
    let alg = cipher.algorithm();
    let c2s = aead::LessSafeKey::new(aead::UnboundKey::new(alg, &okm[..32]).expect("key length"));
    let s2c = aead::LessSafeKey::new(aead::UnboundKey::new(alg, &okm[32..]).expect("key length"));
    if is_client {
        SessionKeys {
            cipher,
            seal: c2s,
            open: s2c,
            seal_dir: Direction::ClientToServer,
            open_dir: Direction::ServerToClient,
        }
    } else {
        SessionKeys {
            cipher,
            seal: s2c,
            open: c2s,
            seal_dir: Direction::ServerToClient,
            open_dir: Direction::ClientToServer,
        }
    }
}

/// Keys for a channel other than the tunnel's own (the VPN's per-registration keys):
/// X25519 of `private` with `peer_public`, then HKDF-SHA256 with `salt` (the long-term
/// key both sides hold) and `info` (what binds the keys to this exchange). The
/// `initiator` seals as `ClientToServer`.
pub fn agree_channel_keys(
    private: agreement::EphemeralPrivateKey,
    peer_public: &[u8; 32],
    salt: &[u8],
    info: &[&[u8]],
    cipher: Cipher,
    initiator: bool,
) -> Result<SessionKeys, HandshakeError> {
    let peer = agreement::UnparsedPublicKey::new(&agreement::X25519, peer_public);
    agreement::agree_ephemeral(private, &peer, |shared| expand_keys(salt, shared, info, cipher, initiator))
        .map_err(|_| HandshakeError::Agreement)
}

/// The public half of an ephemeral key, as 32 bytes.
pub fn x25519_public(private: &agreement::EphemeralPrivateKey) -> [u8; 32] {
    let mut pk = [0u8; 32];
    pk.copy_from_slice(private.compute_public_key().expect("x25519 public key").as_ref());
    pk
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("malformed handshake: {0}")]
    Malformed(#[from] wire::WireError),
    #[error("handshake MAC check failed (wrong key?)")]
    BadMac,
    #[error("response is for another session")]
    WrongSession,
    #[error("unknown cipher")]
    UnknownCipher,
    #[error("server refused: {0:?}")]
    Refused(HandshakeStatus),
    #[error("key agreement failed")]
    Agreement,
}

/// The client's half of a handshake in progress.
pub struct ClientHandshake {
    session: SessionId,
    cipher: Cipher,
    private: Option<agreement::EphemeralPrivateKey>,
    init: [u8; HANDSHAKE_INIT_MAX_LEN],
    init_len: usize,
}

impl ClientHandshake {
    /// Starts a handshake for `session` with the fresh key `private`; the init datagram
    /// is `self.init()`.
    pub fn new(
        psk: &Psk,
        private: agreement::EphemeralPrivateKey,
        session: SessionId,
        cipher: Cipher,
        target: &str,
        timestamp_ms: u64,
        redundancy: Option<RedundancyRequest>,
    ) -> Self {
        let pk = x25519_public(&private);
        let repr = HandshakeInitRepr { cipher: cipher.id(), session, public: pk, timestamp_ms, target, redundancy };
        let mut init = [0u8; HANDSHAKE_INIT_MAX_LEN];
        let body = repr.emit_body(&mut init).expect("target name length is validated by config");
        let tag = hmac::sign(&psk.mac_key(), &init[..body]);
        init[body..body + HANDSHAKE_MAC_LEN].copy_from_slice(tag.as_ref());
        Self { session, cipher, private: Some(private), init, init_len: body + HANDSHAKE_MAC_LEN }
    }

    pub fn init(&self) -> &[u8] {
        &self.init[..self.init_len]
    }

    pub fn session(&self) -> SessionId {
        self.session
    }

    /// Checks a response. On `BadMac`/`Malformed`/`WrongSession` the handshake stays usable
    /// (the datagram was not from our server); other errors end it.
    pub fn finish(&mut self, psk: &Psk, resp: &[u8]) -> Result<SessionKeys, HandshakeError> {
        let repr = HandshakeRespRepr::parse(resp)?;
        if repr.session != self.session {
            return Err(HandshakeError::WrongSession);
        }
        // The response MAC covers the whole init too: it answers exactly this init.
        let mut transcript = [0u8; HANDSHAKE_INIT_MAX_LEN + HANDSHAKE_RESP_BODY_LEN];
        let tlen = self.init_len + HANDSHAKE_RESP_BODY_LEN;
        transcript[..self.init_len].copy_from_slice(self.init());
        transcript[self.init_len..tlen].copy_from_slice(&resp[..HANDSHAKE_RESP_BODY_LEN]);
        hmac::verify(&psk.mac_key(), &transcript[..tlen], &resp[HANDSHAKE_RESP_BODY_LEN..])
            .map_err(|_| HandshakeError::BadMac)?;
        if repr.status != HandshakeStatus::Ok {
            return Err(HandshakeError::Refused(repr.status));
        }
        let private = self.private.take().ok_or(HandshakeError::Agreement)?;
        let peer = agreement::UnparsedPublicKey::new(&agreement::X25519, repr.public);
        let cipher = self.cipher;
        agreement::agree_ephemeral(private, &peer, |shared| derive_keys(psk, shared, &transcript[..tlen], cipher, true))
            .map_err(|_| HandshakeError::Agreement)
    }
}

/// What the server learned from a valid init.
pub struct AcceptedInit<'a> {
    pub session: SessionId,
    pub cipher: Option<Cipher>,
    /// The client's wall clock when it made the init (ms since the Unix epoch).
    pub timestamp_ms: u64,
    pub target: &'a str,
    /// The redundancy the client asks for (`None`: duplication).
    pub redundancy: Option<RedundancyRequest>,
}

/// Checks an init's MAC and parses it. Nothing is answered unless this succeeds.
pub fn verify_init<'a>(psk: &Psk, init: &'a [u8]) -> Result<AcceptedInit<'a>, HandshakeError> {
    let (repr, body_len) = HandshakeInitRepr::parse(init)?;
    hmac::verify(&psk.mac_key(), &init[..body_len], &init[body_len..]).map_err(|_| HandshakeError::BadMac)?;
    Ok(AcceptedInit {
        session: repr.session,
        cipher: Cipher::from_id(repr.cipher),
        timestamp_ms: repr.timestamp_ms,
        target: repr.target,
        redundancy: repr.redundancy,
    })
}

/// Builds the server's response to a verified init. With `HandshakeStatus::Ok` it also
/// returns the session keys; otherwise the response is a signed refusal.
pub fn respond(
    psk: &Psk,
    entropy: &mut dyn Entropy,
    init: &[u8],
    status: HandshakeStatus,
    out: &mut [u8; HANDSHAKE_RESP_LEN],
) -> Result<Option<SessionKeys>, HandshakeError> {
    let (repr, _) = HandshakeInitRepr::parse(init)?;
    let mut body = [0u8; HANDSHAKE_RESP_BODY_LEN];
    let mut keys = None;
    let mut public = [0u8; 32];
    let mut private = None;
    if status == HandshakeStatus::Ok {
        let cipher = Cipher::from_id(repr.cipher).ok_or(HandshakeError::UnknownCipher)?;
        let p = entropy.x25519_key();
        public.copy_from_slice(p.compute_public_key().map_err(|_| HandshakeError::Agreement)?.as_ref());
        private = Some((p, cipher));
    }
    HandshakeRespRepr { status, session: repr.session, public }.emit_body(&mut body);
    let mut ctx = hmac::Context::with_key(&psk.mac_key());
    ctx.update(init);
    ctx.update(&body);
    out[..HANDSHAKE_RESP_BODY_LEN].copy_from_slice(&body);
    out[HANDSHAKE_RESP_BODY_LEN..].copy_from_slice(ctx.sign().as_ref());
    if let Some((p, cipher)) = private {
        let peer = agreement::UnparsedPublicKey::new(&agreement::X25519, repr.public);
        let mut transcript = Vec::with_capacity(init.len() + HANDSHAKE_RESP_BODY_LEN);
        transcript.extend_from_slice(init);
        transcript.extend_from_slice(&body);
        keys = Some(
            agreement::agree_ephemeral(p, &peer, |shared| derive_keys(psk, shared, &transcript, cipher, false))
                .map_err(|_| HandshakeError::Agreement)?,
        );
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entropy::OsEntropy;
    use crate::wire::emit_transport_header;

    fn client_handshake(psk: &Psk, e: &mut OsEntropy, id: u64, cipher: Cipher, target: &str) -> ClientHandshake {
        ClientHandshake::new(psk, e.x25519_key(), SessionId(id), cipher, target, 1_800_000_000_000, None)
    }

    fn pair(cipher: Cipher) -> (SessionKeys, SessionKeys) {
        let psk = Psk::generate(&mut OsEntropy::new());
        let mut rng = OsEntropy::new();
        let mut hs = client_handshake(&psk, &mut rng, 42, cipher, "");
        let init = hs.init().to_vec();
        let acc = verify_init(&psk, &init).unwrap();
        assert_eq!(acc.session, SessionId(42));
        let mut resp = [0u8; HANDSHAKE_RESP_LEN];
        let server = respond(&psk, &mut rng, &init, HandshakeStatus::Ok, &mut resp).unwrap().unwrap();
        let client = hs.finish(&psk, &resp).unwrap();
        (client, server)
    }

    fn seal_data(keys: &SessionKeys, seq: u64, msg: &[u8], buf: &mut [u8]) -> usize {
        emit_transport_header(buf, SessionId(42), seq);
        buf[TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + msg.len()].copy_from_slice(msg);
        keys.seal(seq, buf, msg.len())
    }

    #[test]
    fn round_trip_both_ciphers_and_directions() {
        for cipher in [Cipher::Aes256Gcm, Cipher::ChaCha20Poly1305] {
            let (c, s) = pair(cipher);
            let mut buf = [0u8; 128];
            let n = seal_data(&c, 7, b"hello", &mut buf);
            assert_eq!(n, TRANSPORT_HEADER_LEN + 5 + AEAD_TAG_LEN);
            assert_eq!(s.open(7, &mut buf[..n]).unwrap(), 5);
            assert_eq!(&buf[TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + 5], b"hello");
            let n = seal_data(&s, 7, b"back", &mut buf);
            assert_eq!(c.open(7, &mut buf[..n]).unwrap(), 4);
            // a datagram sealed by one side cannot be opened by itself (direction differs)
            let n = seal_data(&c, 8, b"x", &mut buf);
            assert!(c.open(8, &mut buf[..n]).is_err());
        }
    }

    #[test]
    fn tampering_fails() {
        let (c, s) = pair(Cipher::Aes256Gcm);
        let mut buf = [0u8; 128];
        let n = seal_data(&c, 1, b"payload", &mut buf);
        for i in 0..n {
            let mut t = buf;
            t[i] ^= 0x40;
            assert!(s.open(1, &mut t[..n]).is_err(), "flip at byte {i} not detected");
        }
        let mut t = buf;
        assert!(s.open(2, &mut t[..n]).is_err(), "wrong sequence number accepted");
        assert!(s.open(1, &mut t[..10]).is_err());
    }

    #[test]
    fn wrong_psk_and_tampered_handshake() {
        let psk = Psk::generate(&mut OsEntropy::new());
        let other = Psk::generate(&mut OsEntropy::new());
        let mut rng = OsEntropy::new();
        let mut hs = client_handshake(&psk, &mut rng, 1, Cipher::Aes256Gcm, "ssh");
        let init = hs.init().to_vec();
        assert_eq!(verify_init(&other, &init).err(), Some(HandshakeError::BadMac));
        let mut t = init.clone();
        t[5] ^= 1;
        assert_eq!(verify_init(&psk, &t).err(), Some(HandshakeError::BadMac));
        assert_eq!(verify_init(&psk, &init).unwrap().target, "ssh");

        let mut resp = [0u8; HANDSHAKE_RESP_LEN];
        respond(&other, &mut rng, &init, HandshakeStatus::Ok, &mut resp).unwrap();
        assert_eq!(hs.finish(&psk, &resp).err(), Some(HandshakeError::BadMac));
        // a response to a different init (same session id) is rejected too
        let hs2 = client_handshake(&psk, &mut rng, 1, Cipher::Aes256Gcm, "ssh");
        respond(&psk, &mut rng, hs2.init(), HandshakeStatus::Ok, &mut resp).unwrap();
        assert_eq!(hs.finish(&psk, &resp).err(), Some(HandshakeError::BadMac));
        // a signed refusal is reported
        respond(&psk, &mut rng, &init, HandshakeStatus::UnknownTarget, &mut resp).unwrap();
        assert_eq!(hs.finish(&psk, &resp).err(), Some(HandshakeError::Refused(HandshakeStatus::UnknownTarget)));
        // the real answer still works after the rejected ones
        respond(&psk, &mut rng, &init, HandshakeStatus::Ok, &mut resp).unwrap();
        assert!(hs.finish(&psk, &resp).is_ok());
    }

    #[test]
    fn replayed_init_gives_different_keys() {
        // The server answers a replayed init with a fresh ephemeral key, so the keys it
        // derives differ from the original session's: a replay reaches nothing.
        let psk = Psk::generate(&mut OsEntropy::new());
        let mut rng = OsEntropy::new();
        let mut hs = client_handshake(&psk, &mut rng, 5, Cipher::Aes256Gcm, "");
        let init = hs.init().to_vec();
        let mut resp = [0u8; HANDSHAKE_RESP_LEN];
        let s1 = respond(&psk, &mut rng, &init, HandshakeStatus::Ok, &mut resp).unwrap().unwrap();
        let c = hs.finish(&psk, &resp).unwrap();
        let mut resp2 = [0u8; HANDSHAKE_RESP_LEN];
        let s2 = respond(&psk, &mut rng, &init, HandshakeStatus::Ok, &mut resp2).unwrap().unwrap();
        let mut buf = [0u8; 64];
        emit_transport_header(&mut buf, SessionId(5), 0);
        buf[17] = 9;
        let n = c.seal(0, &mut buf, 1);
        let mut copy = buf;
        assert!(s1.open(0, &mut buf[..n]).is_ok());
        assert!(s2.open(0, &mut copy[..n]).is_err());
    }
}
