//! Tunnel wire formats: checked views and `parse`/`emit` pairs.
//!
//! Every datagram starts with a one-byte message type that also carries the protocol
//! version (`0x1_` = version 1). All integers are big-endian.
//!
//! ```text
//! HandshakeInit (client -> server, sent on every path; >= 75 bytes)
//!   0     type = 0x11
//!   1     cipher id
//!   2..10 session id
//!  10..42 client ephemeral X25519 public key
//!  42     target name length n (<= MAX_TARGET_NAME_LEN)
//!  43..   target name (UTF-8, n bytes; empty = the server's default target)
//!  then   HMAC-SHA256 over everything before it, keyed from the PSK (32 bytes)
//!
//! HandshakeResp (server -> client; 74 bytes, never longer than an init: no amplification)
//!   0     type = 0x12
//!   1     status (HandshakeStatus)
//!   2..10 session id
//!  10..42 server ephemeral X25519 public key (zero unless status is Ok)
//!  42..74 HMAC-SHA256 over the whole init followed by bytes 0..42 of this response
//!
//! Transport (both directions)
//!   0     type = 0x13
//!   1..9  session id
//!   9..17 sequence number (per session and direction; the AEAD nonce and dedup key)
//!  17..   AEAD ciphertext of an inner message, then the 16-byte tag
//! ```
//!
//! Invariant: the transport header (bytes 0..17) is the AAD, and it is identical in every
//! copy of a datagram, so one sealed buffer can go out on every path unchanged.
//!
//! Inner messages (the plaintext of a transport datagram) start with a kind byte:
//! `Data` (the application's datagram follows), `Probe` and `ProbeReply` (per-path health).

use crate::SessionId;

pub const TYPE_HANDSHAKE_INIT: u8 = 0x11;
pub const TYPE_HANDSHAKE_RESP: u8 = 0x12;
pub const TYPE_TRANSPORT: u8 = 0x13;

pub const X25519_PUBLIC_LEN: usize = 32;
pub const HANDSHAKE_MAC_LEN: usize = 32;
pub const MAX_TARGET_NAME_LEN: usize = 64;
const INIT_FIXED_LEN: usize = 43;
pub const HANDSHAKE_INIT_MIN_LEN: usize = INIT_FIXED_LEN + HANDSHAKE_MAC_LEN;
pub const HANDSHAKE_INIT_MAX_LEN: usize = HANDSHAKE_INIT_MIN_LEN + MAX_TARGET_NAME_LEN;
/// Bytes of a response covered by its MAC (everything but the MAC).
pub const HANDSHAKE_RESP_BODY_LEN: usize = 42;
pub const HANDSHAKE_RESP_LEN: usize = HANDSHAKE_RESP_BODY_LEN + HANDSHAKE_MAC_LEN;
// A response never outweighs the init it answers: no amplification.
const _: () = assert!(HANDSHAKE_RESP_LEN < HANDSHAKE_INIT_MIN_LEN);

/// Transport header: type, session id, sequence number. This is the AEAD's AAD.
pub const TRANSPORT_HEADER_LEN: usize = 17;
pub const AEAD_TAG_LEN: usize = 16;
/// The inner kind byte that precedes every inner message.
pub const INNER_KIND_LEN: usize = 1;
/// Bytes the tunnel adds to one application datagram (UDP/IP headers not included).
pub const TUNNEL_OVERHEAD: usize = TRANSPORT_HEADER_LEN + INNER_KIND_LEN + AEAD_TAG_LEN;
/// Where the application payload starts inside a transport datagram buffer.
pub const DATA_PAYLOAD_OFFSET: usize = TRANSPORT_HEADER_LEN + INNER_KIND_LEN;
/// The largest UDP payload over IPv4.
pub const MAX_UDP_PAYLOAD: usize = 65_507;
/// The largest application datagram the tunnel carries.
pub const MAX_APP_PAYLOAD: usize = MAX_UDP_PAYLOAD - TUNNEL_OVERHEAD;
/// A buffer this large holds any datagram.
pub const MAX_DATAGRAM: usize = 65_536;

pub const INNER_DATA: u8 = 0x00;
pub const INNER_PROBE: u8 = 0x01;
pub const INNER_PROBE_REPLY: u8 = 0x02;
/// Probes are padded to the size of a reply, so answering one never sends more bytes
/// than were received (no amplification, even on an unvalidated path).
pub const PROBE_LEN: usize = PROBE_REPLY_LEN;
const PROBE_BODY_LEN: usize = 1 + 1 + 1 + 4 + 4 + 8;
pub const PROBE_REPLY_LEN: usize = 1 + 1 + 4 + 4 + 8 + 4 + 8 + 1;
/// ProbeReply flag: the server has validated this path (the client echoed its challenge).
pub const PROBE_REPLY_FLAG_VALIDATED: u8 = 0x01;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("datagram too short")]
    Truncated,
    #[error("unknown message type")]
    UnknownType,
    #[error("field out of range")]
    BadField,
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn be_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

/// The message type of a datagram, without validating the rest.
pub fn message_type(datagram: &[u8]) -> Result<u8, WireError> {
    match datagram.first() {
        None => Err(WireError::Truncated),
        Some(&t @ (TYPE_HANDSHAKE_INIT | TYPE_HANDSHAKE_RESP | TYPE_TRANSPORT)) => Ok(t),
        Some(_) => Err(WireError::UnknownType),
    }
}

/// A checked view of a transport datagram.
#[derive(Debug)]
pub struct TransportPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> TransportPacket<T> {
    /// Checks type and length (room for a header, an inner kind byte and a tag).
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let b = buffer.as_ref();
        if b.len() < TRANSPORT_HEADER_LEN + INNER_KIND_LEN + AEAD_TAG_LEN {
            return Err(WireError::Truncated);
        }
        if b[0] != TYPE_TRANSPORT {
            return Err(WireError::UnknownType);
        }
        Ok(Self { buffer })
    }

    pub fn session_id(&self) -> SessionId {
        SessionId(be_u64(&self.buffer.as_ref()[1..9]))
    }

    pub fn seq(&self) -> u64 {
        be_u64(&self.buffer.as_ref()[9..17])
    }
}

/// Writes a transport header into `buf[..TRANSPORT_HEADER_LEN]`.
pub fn emit_transport_header(buf: &mut [u8], session: SessionId, seq: u64) {
    buf[0] = TYPE_TRANSPORT;
    buf[1..9].copy_from_slice(&session.0.to_be_bytes());
    buf[9..17].copy_from_slice(&seq.to_be_bytes());
}

/// The parsed fixed part of a handshake init (the MAC is checked by `crypto`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeInitRepr<'a> {
    pub cipher: u8,
    pub session: SessionId,
    pub public: [u8; X25519_PUBLIC_LEN],
    pub target: &'a str,
}

impl<'a> HandshakeInitRepr<'a> {
    /// Parses an init; returns the repr and the length of the MAC-covered body.
    pub fn parse(b: &'a [u8]) -> Result<(Self, usize), WireError> {
        if b.len() < HANDSHAKE_INIT_MIN_LEN {
            return Err(WireError::Truncated);
        }
        if b[0] != TYPE_HANDSHAKE_INIT {
            return Err(WireError::UnknownType);
        }
        let n = b[42] as usize;
        if n > MAX_TARGET_NAME_LEN {
            return Err(WireError::BadField);
        }
        let body_len = INIT_FIXED_LEN + n;
        if b.len() != body_len + HANDSHAKE_MAC_LEN {
            return Err(WireError::Truncated);
        }
        let target = std::str::from_utf8(&b[INIT_FIXED_LEN..body_len]).map_err(|_| WireError::BadField)?;
        let mut public = [0u8; X25519_PUBLIC_LEN];
        public.copy_from_slice(&b[10..42]);
        Ok((Self { cipher: b[1], session: SessionId(be_u64(&b[2..10])), public, target }, body_len))
    }

    /// Length of the body (without MAC).
    pub fn body_len(&self) -> usize {
        INIT_FIXED_LEN + self.target.len()
    }

    /// Writes the body (everything but the MAC); returns its length.
    pub fn emit_body(&self, b: &mut [u8]) -> Result<usize, WireError> {
        if self.target.len() > MAX_TARGET_NAME_LEN {
            return Err(WireError::BadField);
        }
        let len = self.body_len();
        if b.len() < len + HANDSHAKE_MAC_LEN {
            return Err(WireError::Truncated);
        }
        b[0] = TYPE_HANDSHAKE_INIT;
        b[1] = self.cipher;
        b[2..10].copy_from_slice(&self.session.0.to_be_bytes());
        b[10..42].copy_from_slice(&self.public);
        b[42] = self.target.len() as u8;
        b[INIT_FIXED_LEN..len].copy_from_slice(self.target.as_bytes());
        Ok(len)
    }
}

/// The server's verdict in a handshake response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
pub enum HandshakeStatus {
    Ok = 0,
    UnknownTarget = 1,
    ServerFull = 2,
    CipherRefused = 3,
}

impl HandshakeStatus {
    pub fn from_u8(v: u8) -> Result<Self, WireError> {
        Ok(match v {
            0 => Self::Ok,
            1 => Self::UnknownTarget,
            2 => Self::ServerFull,
            3 => Self::CipherRefused,
            _ => return Err(WireError::BadField),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeRespRepr {
    pub status: HandshakeStatus,
    pub session: SessionId,
    pub public: [u8; X25519_PUBLIC_LEN],
}

impl HandshakeRespRepr {
    pub fn parse(b: &[u8]) -> Result<Self, WireError> {
        if b.len() != HANDSHAKE_RESP_LEN {
            return Err(WireError::Truncated);
        }
        if b[0] != TYPE_HANDSHAKE_RESP {
            return Err(WireError::UnknownType);
        }
        let mut public = [0u8; X25519_PUBLIC_LEN];
        public.copy_from_slice(&b[10..42]);
        Ok(Self { status: HandshakeStatus::from_u8(b[1])?, session: SessionId(be_u64(&b[2..10])), public })
    }

    /// Writes the MAC-covered body (`HANDSHAKE_RESP_BODY_LEN` bytes).
    pub fn emit_body(&self, b: &mut [u8; HANDSHAKE_RESP_BODY_LEN]) {
        b[0] = TYPE_HANDSHAKE_RESP;
        b[1] = self.status as u8;
        b[2..10].copy_from_slice(&self.session.0.to_be_bytes());
        b[10..42].copy_from_slice(&self.public);
    }
}

/// Per-path probe from client to server; carries what the server needs to validate the
/// path (the echoed challenge) and the client's view of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeRepr {
    /// The client's index of the path this probe was sent on.
    pub path_id: u8,
    /// `PROBE_FLAG_PATH_DOWN`: the client hears nothing back on this path.
    pub flags: u8,
    pub probe_seq: u32,
    /// Client clock (µs, wrapping), echoed back for RTT.
    pub tx_time_us: u32,
    /// The last challenge the server sent on this path (0 before any).
    pub echo_challenge: u64,
}

pub const PROBE_FLAG_PATH_DOWN: u8 = 0x01;

/// The server's answer to a probe, sent back on the path the probe came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeReplyRepr {
    pub path_id: u8,
    pub probe_seq: u32,
    pub tx_time_us: u32,
    /// The path's current validation challenge; the client echoes it in its next probe.
    pub challenge: u64,
    /// The highest probe sequence number the server received on this path ...
    pub rx_highest: u32,
    /// ... and which of the 64 probes up to it arrived (bit k = `rx_highest - k`).
    pub rx_bitmap: u64,
    /// `PROBE_REPLY_FLAG_VALIDATED`.
    pub flags: u8,
}

/// An inner message: the plaintext of a transport datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InnerRepr<'a> {
    Data(&'a [u8]),
    Probe(ProbeRepr),
    ProbeReply(ProbeReplyRepr),
}

impl<'a> InnerRepr<'a> {
    pub fn parse(b: &'a [u8]) -> Result<Self, WireError> {
        let (&kind, body) = b.split_first().ok_or(WireError::Truncated)?;
        match kind {
            INNER_DATA => Ok(Self::Data(body)),
            INNER_PROBE => {
                if b.len() != PROBE_LEN {
                    return Err(WireError::Truncated);
                }
                Ok(Self::Probe(ProbeRepr {
                    path_id: body[0],
                    flags: body[1],
                    probe_seq: be_u32(&body[2..6]),
                    tx_time_us: be_u32(&body[6..10]),
                    echo_challenge: be_u64(&body[10..18]),
                }))
            }
            INNER_PROBE_REPLY => {
                if b.len() != PROBE_REPLY_LEN {
                    return Err(WireError::Truncated);
                }
                Ok(Self::ProbeReply(ProbeReplyRepr {
                    path_id: body[0],
                    probe_seq: be_u32(&body[1..5]),
                    tx_time_us: be_u32(&body[5..9]),
                    challenge: be_u64(&body[9..17]),
                    rx_highest: be_u32(&body[17..21]),
                    rx_bitmap: be_u64(&body[21..29]),
                    flags: body[29],
                }))
            }
            _ => Err(WireError::UnknownType),
        }
    }

    pub fn buffer_len(&self) -> usize {
        match self {
            Self::Data(d) => 1 + d.len(),
            Self::Probe(_) => PROBE_LEN,
            Self::ProbeReply(_) => PROBE_REPLY_LEN,
        }
    }

    /// Writes the message into `b`; returns its length.
    pub fn emit(&self, b: &mut [u8]) -> Result<usize, WireError> {
        let len = self.buffer_len();
        if b.len() < len {
            return Err(WireError::Truncated);
        }
        match self {
            Self::Data(d) => {
                b[0] = INNER_DATA;
                b[1..len].copy_from_slice(d);
            }
            Self::Probe(p) => {
                b[0] = INNER_PROBE;
                b[1] = p.path_id;
                b[2] = p.flags;
                b[3..7].copy_from_slice(&p.probe_seq.to_be_bytes());
                b[7..11].copy_from_slice(&p.tx_time_us.to_be_bytes());
                b[11..19].copy_from_slice(&p.echo_challenge.to_be_bytes());
                b[PROBE_BODY_LEN..PROBE_LEN].fill(0);
            }
            Self::ProbeReply(r) => {
                b[0] = INNER_PROBE_REPLY;
                b[1] = r.path_id;
                b[2..6].copy_from_slice(&r.probe_seq.to_be_bytes());
                b[6..10].copy_from_slice(&r.tx_time_us.to_be_bytes());
                b[10..18].copy_from_slice(&r.challenge.to_be_bytes());
                b[18..22].copy_from_slice(&r.rx_highest.to_be_bytes());
                b[22..30].copy_from_slice(&r.rx_bitmap.to_be_bytes());
                b[30] = r.flags;
            }
        }
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SID: SessionId = SessionId(0x0102_0304_0506_0708);

    #[test]
    fn transport_header_golden() {
        let mut b = [0u8; 40];
        emit_transport_header(&mut b, SID, 0x1122_3344_5566_7788);
        assert_eq!(&b[..17], &[0x13, 1, 2, 3, 4, 5, 6, 7, 8, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]);
        let p = TransportPacket::new_checked(&b[..]).unwrap();
        assert_eq!(p.session_id(), SID);
        assert_eq!(p.seq(), 0x1122_3344_5566_7788);
        assert_eq!(TransportPacket::new_checked(&b[..33]).unwrap_err(), WireError::Truncated);
        b[0] = 0x12;
        assert_eq!(TransportPacket::new_checked(&b[..]).unwrap_err(), WireError::UnknownType);
    }

    #[test]
    fn handshake_init_golden() {
        let repr = HandshakeInitRepr { cipher: 1, session: SID, public: [0xaa; 32], target: "ssh" };
        let mut b = [0u8; HANDSHAKE_INIT_MAX_LEN];
        let n = repr.emit_body(&mut b).unwrap();
        assert_eq!(n, 46);
        let mut expected = vec![0x11, 1, 1, 2, 3, 4, 5, 6, 7, 8];
        expected.extend_from_slice(&[0xaa; 32]);
        expected.extend_from_slice(&[3, b's', b's', b'h']);
        assert_eq!(&b[..n], &expected[..]);
        let (parsed, body) = HandshakeInitRepr::parse(&b[..n + HANDSHAKE_MAC_LEN]).unwrap();
        assert_eq!(parsed, repr);
        assert_eq!(body, n);
        // wrong total length, oversized name, bad utf-8, short
        assert!(HandshakeInitRepr::parse(&b[..n + HANDSHAKE_MAC_LEN + 1]).is_err());
        let mut bad = b;
        bad[42] = 65;
        assert_eq!(HandshakeInitRepr::parse(&bad[..]).unwrap_err(), WireError::BadField);
        let mut bad = b;
        bad[43] = 0xff;
        assert_eq!(HandshakeInitRepr::parse(&bad[..n + 32]).unwrap_err(), WireError::BadField);
        assert_eq!(HandshakeInitRepr::parse(&b[..10]).unwrap_err(), WireError::Truncated);
    }

    #[test]
    fn handshake_resp_golden() {
        let repr = HandshakeRespRepr { status: HandshakeStatus::UnknownTarget, session: SID, public: [0x55; 32] };
        let mut body = [0u8; HANDSHAKE_RESP_BODY_LEN];
        repr.emit_body(&mut body);
        let mut expected = vec![0x12, 1, 1, 2, 3, 4, 5, 6, 7, 8];
        expected.extend_from_slice(&[0x55; 32]);
        assert_eq!(&body[..], &expected[..]);
        let mut full = [0u8; HANDSHAKE_RESP_LEN];
        full[..42].copy_from_slice(&body);
        assert_eq!(HandshakeRespRepr::parse(&full).unwrap(), repr);
        full[1] = 9;
        assert_eq!(HandshakeRespRepr::parse(&full).unwrap_err(), WireError::BadField);
    }

    #[test]
    fn inner_golden() {
        let mut b = [0xffu8; 64];
        let probe = InnerRepr::Probe(ProbeRepr {
            path_id: 2,
            flags: PROBE_FLAG_PATH_DOWN,
            probe_seq: 0x0a0b0c0d,
            tx_time_us: 0x01020304,
            echo_challenge: 0xfeed_0000_0000_beef,
        });
        let n = probe.emit(&mut b).unwrap();
        assert_eq!(
            &b[..n],
            &[
                1, 2, 1, 0x0a, 0x0b, 0x0c, 0x0d, 1, 2, 3, 4, 0xfe, 0xed, 0, 0, 0, 0, 0xbe, 0xef, 0, 0, 0, 0, 0, 0, 0,
                0, 0, 0, 0, 0
            ]
        );
        assert_eq!(PROBE_LEN, PROBE_REPLY_LEN);
        assert_eq!(InnerRepr::parse(&b[..n]).unwrap(), probe);
        assert!(InnerRepr::parse(&b[..n - 1]).is_err());

        let reply = InnerRepr::ProbeReply(ProbeReplyRepr {
            path_id: 1,
            probe_seq: 7,
            tx_time_us: 9,
            challenge: 0x0102030405060708,
            rx_highest: 7,
            rx_bitmap: 0b1011,
            flags: PROBE_REPLY_FLAG_VALIDATED,
        });
        let n = reply.emit(&mut b).unwrap();
        assert_eq!(
            &b[..n],
            &[2, 1, 0, 0, 0, 7, 0, 0, 0, 9, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0b1011, 1]
        );
        assert_eq!(InnerRepr::parse(&b[..n]).unwrap(), reply);

        let data = InnerRepr::Data(b"hi");
        let n = data.emit(&mut b).unwrap();
        assert_eq!(&b[..n], &[0, b'h', b'i']);
        assert_eq!(InnerRepr::parse(&b[..n]).unwrap(), data);
        assert_eq!(InnerRepr::parse(&[9]).unwrap_err(), WireError::UnknownType);
        assert_eq!(InnerRepr::parse(&[]).unwrap_err(), WireError::Truncated);
    }
}
