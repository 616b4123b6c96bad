//! Tunnel wire formats: checked views and `parse`/`emit` pairs.
//!
//! Every datagram starts with a one-byte message type that also carries the protocol
//! version (`0x1_` = version 1). All integers are big-endian.
//!
//! ```text
//! HandshakeInit (client -> server, sent on every path; >= 83 bytes)
//!   0     type = 0x11
//!   1     cipher id
//!   2..10 session id
//!  10..42 client ephemeral X25519 public key
//!  42..50 the client's wall clock, ms since the Unix epoch (freshness: a captured init
//!         is refused once it is older than the server's window)
//!  50     target name length n (<= MAX_TARGET_NAME_LEN)
//!  51..   target name (UTF-8, n bytes; empty = the server's default target)
//!  then   optionally the redundancy the client asks for (8 bytes; absent = duplicate,
//!         what every client before it did): mode u8 | data u8 | parity u8 |
//!         group deadline ms u8 | target residual loss u32 (parts per billion)
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
//! `Data` (the application's datagram follows), `Probe` and `ProbeReply` (per-path health),
//! and for coded redundancy `FecData` (the datagram, then its group u32 and index u8 as a
//! trailer, so the payload sits where `Data`'s does) and `FecParity` (a `ParityHeader`,
//! then the shard). Each is sealed on its own: parity has its own nonce and passes the
//! same replay window as data.

use crate::fec::{DataTag, ParityHeader, DATA_TAG_LEN, PARITY_HEADER_LEN};
use crate::SessionId;

/// Byte ranges of every field, as the layout above shows them; code names fields, never
/// offsets.
pub mod field {
    pub type Field = core::ops::Range<usize>;

    /// Every message: its type byte.
    pub const TYPE: usize = 0;

    pub mod init {
        use super::Field;
        pub const CIPHER: usize = 1;
        pub const SESSION: Field = 2..10;
        pub const PUBLIC: Field = 10..42;
        pub const TIMESTAMP: Field = 42..50;
        pub const TARGET_LEN: usize = 50;
        /// The target name starts here; the MAC follows it.
        pub const TARGET: usize = 51;
    }

    pub mod resp {
        use super::Field;
        pub const STATUS: usize = 1;
        pub const SESSION: Field = 2..10;
        pub const PUBLIC: Field = 10..42;
        pub const MAC: Field = 42..74;
    }

    pub mod transport {
        use super::Field;
        pub const SESSION: Field = 1..9;
        pub const SEQ: Field = 9..17;
    }

    /// Inner messages, kind byte at 0.
    pub mod probe {
        use super::Field;
        pub const PATH_ID: usize = 1;
        pub const FLAGS: usize = 2;
        pub const SEQ: Field = 3..7;
        pub const TX_TIME: Field = 7..11;
        pub const ECHO_CHALLENGE: Field = 11..19;
        /// The loss the client measures from the server on this path, in parts per
        /// million plus one (0: not known; clients before it sent zero padding here).
        pub const DOWN_LOSS: Field = 19..23;
        /// The client's smoothed round trip on this path in µs plus one (0: not known;
        /// clients before it sent zero padding here).
        pub const RTT: Field = 23..27;
        /// Zero padding up to the reply's size.
        pub const PADDING: usize = 27;
    }

    /// The redundancy extension of an init, after the target name.
    pub mod redundancy {
        pub const MODE: usize = 0;
        pub const DATA: usize = 1;
        pub const PARITY: usize = 2;
        pub const DEADLINE_MS: usize = 3;
        pub const TARGET_LOSS: core::ops::Range<usize> = 4..8;
    }

    pub mod probe_reply {
        use super::Field;
        pub const PATH_ID: usize = 1;
        pub const SEQ: Field = 2..6;
        pub const TX_TIME: Field = 6..10;
        pub const CHALLENGE: Field = 10..18;
        pub const RX_HIGHEST: Field = 18..22;
        pub const RX_BITMAP: Field = 22..30;
        pub const FLAGS: usize = 30;
    }
}

/// Big-endian integers at a field's bytes: the one way both wire formats (tunnel and
/// VPN) read and write them. The caller has checked the length (`new_checked`).
pub mod be {
    use super::field::Field;

    pub fn u16_at(b: &[u8], f: Field) -> u16 {
        u16::from_be_bytes(b[f].try_into().expect("a 2-byte field"))
    }

    pub fn u32_at(b: &[u8], f: Field) -> u32 {
        u32::from_be_bytes(b[f].try_into().expect("a 4-byte field"))
    }

    pub fn u64_at(b: &[u8], f: Field) -> u64 {
        u64::from_be_bytes(b[f].try_into().expect("an 8-byte field"))
    }

    pub fn put_u16(b: &mut [u8], f: Field, v: u16) {
        b[f].copy_from_slice(&v.to_be_bytes());
    }

    pub fn put_u32(b: &mut [u8], f: Field, v: u32) {
        b[f].copy_from_slice(&v.to_be_bytes());
    }

    pub fn put_u64(b: &mut [u8], f: Field, v: u64) {
        b[f].copy_from_slice(&v.to_be_bytes());
    }
}

use be::{put_u32, put_u64, u32_at, u64_at};

pub const TYPE_HANDSHAKE_INIT: u8 = 0x11;
pub const TYPE_HANDSHAKE_RESP: u8 = 0x12;
pub const TYPE_TRANSPORT: u8 = 0x13;

pub const X25519_PUBLIC_LEN: usize = 32;
pub const HANDSHAKE_MAC_LEN: usize = 32;
pub const MAX_TARGET_NAME_LEN: usize = 64;
const INIT_FIXED_LEN: usize = field::init::TARGET;
/// The redundancy extension of an init.
pub const REDUNDANCY_EXT_LEN: usize = field::redundancy::TARGET_LOSS.end;
pub const HANDSHAKE_INIT_MIN_LEN: usize = INIT_FIXED_LEN + HANDSHAKE_MAC_LEN;
pub const HANDSHAKE_INIT_MAX_LEN: usize = HANDSHAKE_INIT_MIN_LEN + MAX_TARGET_NAME_LEN + REDUNDANCY_EXT_LEN;
/// Bytes of a response covered by its MAC (everything but the MAC).
pub const HANDSHAKE_RESP_BODY_LEN: usize = field::resp::MAC.start;
pub const HANDSHAKE_RESP_LEN: usize = HANDSHAKE_RESP_BODY_LEN + HANDSHAKE_MAC_LEN;
// A response never outweighs the init it answers: no amplification.
const _: () = assert!(HANDSHAKE_RESP_LEN < HANDSHAKE_INIT_MIN_LEN);
const _: () = assert!(HANDSHAKE_RESP_LEN == field::resp::MAC.end);
const _: () = assert!(
    field::init::PUBLIC.end - field::init::PUBLIC.start == X25519_PUBLIC_LEN
        && field::resp::PUBLIC.end - field::resp::PUBLIC.start == X25519_PUBLIC_LEN
);

/// Transport header: type, session id, sequence number. This is the AEAD's AAD.
pub const TRANSPORT_HEADER_LEN: usize = field::transport::SEQ.end;
pub const AEAD_TAG_LEN: usize = 16;
/// The inner kind byte that precedes every inner message.
pub const INNER_KIND_LEN: usize = 1;
/// Room a caller leaves after an application datagram it hands a core to seal in place:
/// a coding group's tag and the AEAD tag.
pub const DATA_TAIL_ROOM: usize = DATA_TAG_LEN + AEAD_TAG_LEN;
/// Bytes the tunnel adds to a plain copy of an application datagram (what every copy
/// was before redundancy modes).
pub const PLAIN_TUNNEL_OVERHEAD: usize = TRANSPORT_HEADER_LEN + INNER_KIND_LEN + AEAD_TAG_LEN;
/// Bytes the tunnel adds to one application datagram at most (UDP/IP headers not
/// included): the parity shard of a group, whose plaintext outgrows its longest datagram
/// by a parity header, a length prefix and one byte of padding. An application whose
/// datagrams leave this much room under the path MTU is never fragmented, in any mode.
pub const TUNNEL_OVERHEAD: usize =
    TRANSPORT_HEADER_LEN + INNER_KIND_LEN + PARITY_HEADER_LEN + crate::fec::SHARD_PADDING + AEAD_TAG_LEN;
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
pub const INNER_FEC_DATA: u8 = 0x03;
pub const INNER_FEC_PARITY: u8 = 0x04;
pub const INNER_RECEIPT: u8 = 0x05;
/// One path's entry in a receipt: the client's path id u8 | the highest sequence number
/// received on it u64 | datagrams received on it u32 (wrapping).
pub const RECEIPT_ENTRY_LEN: usize = 13;
/// Probes are padded to the size of a reply, so answering one never sends more bytes
/// than were received (no amplification, even on an unvalidated path).
pub const PROBE_LEN: usize = PROBE_REPLY_LEN;
pub const PROBE_REPLY_LEN: usize = field::probe_reply::FLAGS + 1;
const _: () = assert!(field::probe::PADDING <= PROBE_LEN, "a probe's fields fit the reply's size");
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
        if b[field::TYPE] != TYPE_TRANSPORT {
            return Err(WireError::UnknownType);
        }
        Ok(Self { buffer })
    }

    pub fn session_id(&self) -> SessionId {
        SessionId(u64_at(self.buffer.as_ref(), field::transport::SESSION))
    }

    pub fn seq(&self) -> u64 {
        u64_at(self.buffer.as_ref(), field::transport::SEQ)
    }
}

/// Writes a transport header into `buf[..TRANSPORT_HEADER_LEN]`.
pub fn emit_transport_header(buf: &mut [u8], session: SessionId, seq: u64) {
    buf[field::TYPE] = TYPE_TRANSPORT;
    put_u64(buf, field::transport::SESSION, session.0);
    put_u64(buf, field::transport::SEQ, seq);
}

/// The redundancy a client asks for in its init, as it is on the wire (the server checks
/// that it knows the mode: `redundancy::RedundancyConfig::from_request`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedundancyRequest {
    pub mode: u8,
    pub data: u8,
    pub parity: u8,
    pub deadline_ms: u8,
    /// Target residual loss, parts per billion.
    pub target_loss_ppb: u32,
}

impl RedundancyRequest {
    fn parse(b: &[u8; REDUNDANCY_EXT_LEN]) -> Self {
        use field::redundancy as f;
        Self {
            mode: b[f::MODE],
            data: b[f::DATA],
            parity: b[f::PARITY],
            deadline_ms: b[f::DEADLINE_MS],
            target_loss_ppb: u32_at(b, f::TARGET_LOSS),
        }
    }

    fn emit(&self, b: &mut [u8]) {
        use field::redundancy as f;
        b[f::MODE] = self.mode;
        b[f::DATA] = self.data;
        b[f::PARITY] = self.parity;
        b[f::DEADLINE_MS] = self.deadline_ms;
        put_u32(b, f::TARGET_LOSS, self.target_loss_ppb);
    }
}

/// The parsed fixed part of a handshake init (the MAC is checked by `crypto`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeInitRepr<'a> {
    pub cipher: u8,
    pub session: SessionId,
    pub public: [u8; X25519_PUBLIC_LEN],
    /// The client's wall clock when it made the init (ms since the Unix epoch).
    pub timestamp_ms: u64,
    pub target: &'a str,
    /// `None`: plain duplication (and an init any server before the extension reads).
    pub redundancy: Option<RedundancyRequest>,
}

impl<'a> HandshakeInitRepr<'a> {
    /// Parses an init; returns the repr and the length of the MAC-covered body.
    pub fn parse(b: &'a [u8]) -> Result<(Self, usize), WireError> {
        if b.len() < HANDSHAKE_INIT_MIN_LEN {
            return Err(WireError::Truncated);
        }
        if b[field::TYPE] != TYPE_HANDSHAKE_INIT {
            return Err(WireError::UnknownType);
        }
        let n = b[field::init::TARGET_LEN] as usize;
        if n > MAX_TARGET_NAME_LEN {
            return Err(WireError::BadField);
        }
        let name_end = INIT_FIXED_LEN + n;
        // the length says whether the extension is there: a name's length is explicit
        let body_len = b.len().checked_sub(HANDSHAKE_MAC_LEN).ok_or(WireError::Truncated)?;
        let redundancy = match body_len.checked_sub(name_end) {
            Some(0) => None,
            Some(REDUNDANCY_EXT_LEN) => {
                Some(RedundancyRequest::parse(b[name_end..body_len].try_into().expect("length checked")))
            }
            _ => return Err(WireError::Truncated),
        };
        let target = std::str::from_utf8(&b[INIT_FIXED_LEN..name_end]).map_err(|_| WireError::BadField)?;
        let mut public = [0u8; X25519_PUBLIC_LEN];
        public.copy_from_slice(&b[field::init::PUBLIC]);
        let session = SessionId(u64_at(b, field::init::SESSION));
        let timestamp_ms = u64_at(b, field::init::TIMESTAMP);
        Ok((Self { cipher: b[field::init::CIPHER], session, public, timestamp_ms, target, redundancy }, body_len))
    }

    /// Length of the body (without MAC).
    pub fn body_len(&self) -> usize {
        INIT_FIXED_LEN + self.target.len() + self.redundancy.map_or(0, |_| REDUNDANCY_EXT_LEN)
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
        b[field::TYPE] = TYPE_HANDSHAKE_INIT;
        b[field::init::CIPHER] = self.cipher;
        put_u64(b, field::init::SESSION, self.session.0);
        b[field::init::PUBLIC].copy_from_slice(&self.public);
        put_u64(b, field::init::TIMESTAMP, self.timestamp_ms);
        b[field::init::TARGET_LEN] = self.target.len() as u8;
        let name_end = INIT_FIXED_LEN + self.target.len();
        b[INIT_FIXED_LEN..name_end].copy_from_slice(self.target.as_bytes());
        if let Some(r) = &self.redundancy {
            r.emit(&mut b[name_end..len]);
        }
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
    /// The server could not reach the session's target (its upstream socket failed).
    TargetUnavailable = 4,
    /// The init's timestamp is outside the server's freshness window: a replay, or the
    /// two clocks disagree by more than `INIT_FRESHNESS`.
    StaleInit = 5,
    /// The server does not know or does not allow the redundancy the client asked for.
    RedundancyRefused = 6,
}

impl HandshakeStatus {
    pub fn from_u8(v: u8) -> Result<Self, WireError> {
        Ok(match v {
            0 => Self::Ok,
            1 => Self::UnknownTarget,
            2 => Self::ServerFull,
            3 => Self::CipherRefused,
            4 => Self::TargetUnavailable,
            5 => Self::StaleInit,
            6 => Self::RedundancyRefused,
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
        if b[field::TYPE] != TYPE_HANDSHAKE_RESP {
            return Err(WireError::UnknownType);
        }
        let mut public = [0u8; X25519_PUBLIC_LEN];
        public.copy_from_slice(&b[field::resp::PUBLIC]);
        let status = HandshakeStatus::from_u8(b[field::resp::STATUS])?;
        Ok(Self { status, session: SessionId(u64_at(b, field::resp::SESSION)), public })
    }

    /// Writes the MAC-covered body (`HANDSHAKE_RESP_BODY_LEN` bytes).
    pub fn emit_body(&self, b: &mut [u8; HANDSHAKE_RESP_BODY_LEN]) {
        b[field::TYPE] = TYPE_HANDSHAKE_RESP;
        b[field::resp::STATUS] = self.status as u8;
        put_u64(b, field::resp::SESSION, self.session.0);
        b[field::resp::PUBLIC].copy_from_slice(&self.public);
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
    /// The loss the client measures from the server on this path, in parts per million
    /// (`None`: not known yet, or a client that does not say).
    pub down_loss_ppm: Option<u32>,
    /// The client's smoothed round trip on this path, µs (`None`: not known yet, or a
    /// client that does not say).
    pub rtt_us: Option<u32>,
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
    /// A datagram of a coding group (its tag is a trailer on the wire).
    FecData(&'a [u8], DataTag),
    /// A parity shard of a coding group.
    FecParity(ParityHeader, &'a [u8]),
    /// What arrived on each path (coded and adaptive sessions): entry count u8, then entries.
    Receipt(ReceiptView<'a>),
}

/// A checked receipt: whole entries, at most `MAX_PATHS` of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiptView<'a>(&'a [u8]);

/// One entry of a receipt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiptEntry {
    /// The client's index of the path.
    pub path_id: u8,
    pub highest: u64,
    pub received: u32,
}

impl<'a> ReceiptView<'a> {
    fn parse(body: &'a [u8]) -> Result<Self, WireError> {
        let (&n, entries) = body.split_first().ok_or(WireError::Truncated)?;
        if usize::from(n) > crate::MAX_PATHS {
            return Err(WireError::BadField);
        }
        if entries.len() != usize::from(n) * RECEIPT_ENTRY_LEN {
            return Err(WireError::Truncated);
        }
        Ok(Self(entries))
    }

    pub fn entries(&self) -> impl Iterator<Item = ReceiptEntry> + 'a {
        self.0.chunks_exact(RECEIPT_ENTRY_LEN).map(|e| ReceiptEntry {
            path_id: e[0],
            highest: u64_at(e, 1..9),
            received: u32_at(e, 9..13),
        })
    }
}

/// Writes a receipt of `entries` as an inner message into `b`; returns its length, or
/// `None` if `b` is short or there are more entries than paths.
pub fn emit_receipt(b: &mut [u8], entries: impl ExactSizeIterator<Item = ReceiptEntry>) -> Option<usize> {
    let n = entries.len();
    let len = INNER_KIND_LEN + 1 + n * RECEIPT_ENTRY_LEN;
    if n > crate::MAX_PATHS || b.len() < len {
        return None;
    }
    b[0] = INNER_RECEIPT;
    b[1] = n as u8;
    for (e, chunk) in entries.zip(b[2..len].chunks_exact_mut(RECEIPT_ENTRY_LEN)) {
        chunk[0] = e.path_id;
        put_u64(chunk, 1..9, e.highest);
        put_u32(chunk, 9..13, e.received);
    }
    Some(len)
}

impl<'a> InnerRepr<'a> {
    pub fn parse(b: &'a [u8]) -> Result<Self, WireError> {
        use field::{probe, probe_reply};
        let (&kind, body) = b.split_first().ok_or(WireError::Truncated)?;
        match kind {
            INNER_DATA => Ok(Self::Data(body)),
            INNER_FEC_DATA => {
                let at = body.len().checked_sub(DATA_TAG_LEN).ok_or(WireError::Truncated)?;
                let tag = DataTag::parse(&body[at..]).map_err(|_| WireError::BadField)?;
                Ok(Self::FecData(&body[..at], tag))
            }
            INNER_RECEIPT => Ok(Self::Receipt(ReceiptView::parse(body)?)),
            INNER_FEC_PARITY => {
                let header = ParityHeader::parse(body).map_err(|_| WireError::BadField)?;
                let shard = &body[PARITY_HEADER_LEN..];
                if shard.len() != usize::from(header.shard_len) {
                    return Err(WireError::Truncated);
                }
                Ok(Self::FecParity(header, shard))
            }
            INNER_PROBE => {
                if b.len() != PROBE_LEN {
                    return Err(WireError::Truncated);
                }
                Ok(Self::Probe(ProbeRepr {
                    path_id: b[probe::PATH_ID],
                    flags: b[probe::FLAGS],
                    probe_seq: u32_at(b, probe::SEQ),
                    tx_time_us: u32_at(b, probe::TX_TIME),
                    echo_challenge: u64_at(b, probe::ECHO_CHALLENGE),
                    down_loss_ppm: u32_at(b, probe::DOWN_LOSS).checked_sub(1),
                    rtt_us: u32_at(b, probe::RTT).checked_sub(1),
                }))
            }
            INNER_PROBE_REPLY => {
                if b.len() != PROBE_REPLY_LEN {
                    return Err(WireError::Truncated);
                }
                Ok(Self::ProbeReply(ProbeReplyRepr {
                    path_id: b[probe_reply::PATH_ID],
                    probe_seq: u32_at(b, probe_reply::SEQ),
                    tx_time_us: u32_at(b, probe_reply::TX_TIME),
                    challenge: u64_at(b, probe_reply::CHALLENGE),
                    rx_highest: u32_at(b, probe_reply::RX_HIGHEST),
                    rx_bitmap: u64_at(b, probe_reply::RX_BITMAP),
                    flags: b[probe_reply::FLAGS],
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
            Self::FecData(d, _) => 1 + d.len() + DATA_TAG_LEN,
            Self::FecParity(_, shard) => 1 + PARITY_HEADER_LEN + shard.len(),
            Self::Receipt(r) => 2 + r.0.len(),
        }
    }

    /// Writes the message into `b`; returns its length.
    pub fn emit(&self, b: &mut [u8]) -> Result<usize, WireError> {
        use field::{probe, probe_reply};
        let len = self.buffer_len();
        if b.len() < len {
            return Err(WireError::Truncated);
        }
        match self {
            Self::Data(d) => {
                b[0] = INNER_DATA;
                b[INNER_KIND_LEN..len].copy_from_slice(d);
            }
            Self::Probe(p) => {
                b[0] = INNER_PROBE;
                b[probe::PATH_ID] = p.path_id;
                b[probe::FLAGS] = p.flags;
                put_u32(b, probe::SEQ, p.probe_seq);
                put_u32(b, probe::TX_TIME, p.tx_time_us);
                put_u64(b, probe::ECHO_CHALLENGE, p.echo_challenge);
                put_u32(b, probe::DOWN_LOSS, p.down_loss_ppm.map_or(0, |l| l.saturating_add(1)));
                put_u32(b, probe::RTT, p.rtt_us.map_or(0, |r| r.saturating_add(1)));
                b[probe::PADDING..PROBE_LEN].fill(0);
            }
            Self::ProbeReply(r) => {
                b[0] = INNER_PROBE_REPLY;
                b[probe_reply::PATH_ID] = r.path_id;
                put_u32(b, probe_reply::SEQ, r.probe_seq);
                put_u32(b, probe_reply::TX_TIME, r.tx_time_us);
                put_u64(b, probe_reply::CHALLENGE, r.challenge);
                put_u32(b, probe_reply::RX_HIGHEST, r.rx_highest);
                put_u64(b, probe_reply::RX_BITMAP, r.rx_bitmap);
                b[probe_reply::FLAGS] = r.flags;
            }
            Self::FecData(d, tag) => {
                b[0] = INNER_FEC_DATA;
                b[INNER_KIND_LEN..INNER_KIND_LEN + d.len()].copy_from_slice(d);
                let trailer: &mut [u8; DATA_TAG_LEN] =
                    (&mut b[len - DATA_TAG_LEN..len]).try_into().expect("a tag's room");
                tag.emit(trailer);
            }
            Self::FecParity(h, shard) => {
                b[0] = INNER_FEC_PARITY;
                let header: &mut [u8; PARITY_HEADER_LEN] =
                    (&mut b[INNER_KIND_LEN..INNER_KIND_LEN + PARITY_HEADER_LEN]).try_into().expect("a header's room");
                h.emit(header);
                b[INNER_KIND_LEN + PARITY_HEADER_LEN..len].copy_from_slice(shard);
            }
            Self::Receipt(r) => {
                b[0] = INNER_RECEIPT;
                b[1] = (r.0.len() / RECEIPT_ENTRY_LEN) as u8;
                b[2..len].copy_from_slice(r.0);
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
        let repr = HandshakeInitRepr {
            cipher: 1,
            session: SID,
            public: [0xaa; 32],
            timestamp_ms: 0x0000_0193_0a0b_0c0d,
            target: "ssh",
            redundancy: None,
        };
        let mut b = [0u8; HANDSHAKE_INIT_MAX_LEN];
        let n = repr.emit_body(&mut b).unwrap();
        assert_eq!(n, 54);
        let mut expected = vec![0x11, 1, 1, 2, 3, 4, 5, 6, 7, 8];
        expected.extend_from_slice(&[0xaa; 32]);
        expected.extend_from_slice(&[0, 0, 0x01, 0x93, 0x0a, 0x0b, 0x0c, 0x0d]);
        expected.extend_from_slice(&[3, b's', b's', b'h']);
        assert_eq!(&b[..n], &expected[..]);
        let (parsed, body) = HandshakeInitRepr::parse(&b[..n + HANDSHAKE_MAC_LEN]).unwrap();
        assert_eq!(parsed, repr);
        assert_eq!(body, n);
        // wrong total length, oversized name, bad utf-8, short
        assert!(HandshakeInitRepr::parse(&b[..n + HANDSHAKE_MAC_LEN + 1]).is_err());
        let mut bad = b;
        bad[field::init::TARGET_LEN] = 65;
        assert_eq!(HandshakeInitRepr::parse(&bad[..]).unwrap_err(), WireError::BadField);
        let mut bad = b;
        bad[field::init::TARGET] = 0xff;
        assert_eq!(HandshakeInitRepr::parse(&bad[..n + 32]).unwrap_err(), WireError::BadField);
        assert_eq!(HandshakeInitRepr::parse(&b[..10]).unwrap_err(), WireError::Truncated);

        // with the redundancy extension: 8 bytes after the name
        let with = HandshakeInitRepr {
            redundancy: Some(RedundancyRequest {
                mode: 2,
                data: 10,
                parity: 4,
                deadline_ms: 5,
                target_loss_ppb: 100_000,
            }),
            ..repr
        };
        let mut b = [0u8; HANDSHAKE_INIT_MAX_LEN];
        let n = with.emit_body(&mut b).unwrap();
        assert_eq!(n, 62);
        assert_eq!(&b[54..62], &[2, 10, 4, 5, 0, 0x01, 0x86, 0xa0]);
        let (parsed, body) = HandshakeInitRepr::parse(&b[..n + HANDSHAKE_MAC_LEN]).unwrap();
        assert_eq!((parsed, body), (with, n));
        // any other length after the name is refused
        for extra in [1, 7, 9] {
            assert_eq!(
                HandshakeInitRepr::parse(&b[..54 + extra + HANDSHAKE_MAC_LEN]).unwrap_err(),
                WireError::Truncated
            );
        }
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
            down_loss_ppm: Some(0x0102),
            rtt_us: Some(0x0304),
        });
        let n = probe.emit(&mut b).unwrap();
        assert_eq!(
            &b[..n],
            &[
                1, 2, 1, 0x0a, 0x0b, 0x0c, 0x0d, 1, 2, 3, 4, 0xfe, 0xed, 0, 0, 0, 0, 0xbe, 0xef, 0, 0, 1, 3, 0, 0, 3,
                5, 0, 0, 0, 0
            ]
        );
        // a client from before the fields sent zero padding there: not known
        let mut old = b;
        old[field::probe::DOWN_LOSS].fill(0);
        old[field::probe::RTT].fill(0);
        let InnerRepr::Probe(p) = InnerRepr::parse(&old[..n]).unwrap() else { panic!("a probe") };
        assert_eq!((p.down_loss_ppm, p.rtt_us), (None, None));
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

        let tag = DataTag { group: 0x01020304, index: 9 };
        let data = InnerRepr::FecData(b"hi", tag);
        let n = data.emit(&mut b).unwrap();
        assert_eq!(&b[..n], &[3, b'h', b'i', 1, 2, 3, 4, 9]);
        assert_eq!(InnerRepr::parse(&b[..n]).unwrap(), data);
        assert_eq!(InnerRepr::parse(&[3, 1, 2, 3]).unwrap_err(), WireError::Truncated);
        assert_eq!(InnerRepr::parse(&[3, 0, 0, 0, 0, 16]).unwrap_err(), WireError::BadField);
        let h = ParityHeader { group: 7, index: 1, data_count: 3, parity_count: 2, shard_len: 4 };
        let parity = InnerRepr::FecParity(h, &[5, 6, 7, 8]);
        let n = parity.emit(&mut b).unwrap();
        assert_eq!(&b[..n], &[4, 0, 0, 0, 7, 1, 3, 2, 0, 4, 5, 6, 7, 8]);
        assert_eq!(InnerRepr::parse(&b[..n]).unwrap(), parity);
        assert_eq!(
            InnerRepr::parse(&b[..n - 1]).unwrap_err(),
            WireError::Truncated,
            "shard shorter than its header says"
        );

        let entries = [
            ReceiptEntry { path_id: 2, highest: 0x0102, received: 7 },
            ReceiptEntry { path_id: 0, highest: 9, received: 0xffff_ffff },
        ];
        let n = emit_receipt(&mut b, entries.iter().copied()).unwrap();
        assert_eq!(&b[..15], &[5, 2, 2, 0, 0, 0, 0, 0, 0, 1, 2, 0, 0, 0, 7]);
        let InnerRepr::Receipt(r) = InnerRepr::parse(&b[..n]).unwrap() else { panic!("a receipt") };
        assert_eq!(r.entries().collect::<Vec<_>>(), entries);
        assert_eq!(InnerRepr::parse(&b[..n - 1]).unwrap_err(), WireError::Truncated);
        assert_eq!(InnerRepr::parse(&[5, 33]).unwrap_err(), WireError::BadField);
        assert_eq!(InnerRepr::parse(&[]).unwrap_err(), WireError::Truncated);
    }
}
