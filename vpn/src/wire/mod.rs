//! VPN messages between `mpvpn peer` and `mpvpn hub` (carried by the tunnel).
//!
//! ```text
//! Register  0x21 | name_len u8 | name | timestamp_ms u64 | nonce u64 | want_addr u32
//!                | mtu u16 (0 = take the hub's) | public [32] | n_routes u8
//!                | (addr u32, len u8)* | mac[32]
//! Welcome   0x22 | peer_id u32 | addr u32 | prefix_len u8 | hub_addr u32 | mtu u16 | nonce u64
//!                | public [32] | n_refused u8 | (addr u32, prefix_len u8, reason u8)*
//!                | dns_len u8 | dns domain | mac[32]
//!           (the announced routes the hub refused, at most MAX_REFUSED_IN_WELCOME; the DNS
//!           domain the hub answers for on its address, empty for none)
//! Refusal   0x23 | reason u8 | hub_mtu u16 | nonce u64 | mac[32]
//! Reset     0x24 | peer_id u32 | token [16]
//!           (the hub's answer to a sealed datagram of a registration it does not know,
//!           e.g. after a restart; the token was told to that registration, sealed, when it
//!           began, and derives from a secret the hub keeps: only the hub that made the
//!           registration can name it, and the answer is shorter than any sealed datagram)
//! Sealed    0x27 | peer_id u32 | seq u64 | AEAD(kind u8 | body) | tag[16]
//! ```
//! Register, Welcome and Refusal are the handshake: HMAC-SHA256 with the peer's own key
//! over everything before the MAC; Welcome and Refusal carry the Register's nonce, and
//! the Welcome's MAC also covers the Register's public key, so they answer exactly that
//! Register. The two X25519 public keys give the registration its own channel keys
//! (`channel`); everything after the Welcome, both ways, is `Sealed` under them.
//!
//! Sealed kinds: `0x01` heartbeat (seq u32 | rtt_us u32), `0x02` heartbeat ack
//! (seq u32 | peers_version u32), `0x03` one KCP segment (conv = peer id), and for the
//! mesh (`crate::mesh`): `0x04` a datagram of a direct session relayed by the hub
//! (peer id u32 | datagram: to whom from a peer, from whom from the hub), `0x05` "where
//! am I" (socket u8 | zero padding, on the hub's rendezvous port) and `0x06` its answer
//! (socket u8 | address), never longer than the question.
//!
//! Messages inside the KCP stream (reliable, ordered) start with a kind byte:
//! `0x01` an IP packet, `0x02` one chunk of the peer list
//! (version u32 | chunk u16 | chunks u16 | count u16 | entries: id u32, name_len u8, name,
//! addr u32, route list, candidate list). A list is cut into chunks of at most
//! `PEER_LIST_CHUNK_BYTES`, so however many peers there are, every message fits KCP's
//! window and the receive buffer. Mesh: `0x03` a peer's host candidates (peer to hub;
//! sending it says the peer has a mesh socket), `0x04` "introduce me to" (peer id u32),
//! `0x05` an introduction (peer id u32 | pair key [32]), sent by the hub to both peers;
//! `0x06` the registration's reset token ([16], hub to peer, once it is confirmed).
//!
//! An address (a candidate) is `family u8 (4 or 6) | ip [4 or 16] | port u16`; a
//! candidate list is `count u8 | address*`.

use crate::ip::Prefix;
use common::wire::be::{put_u16, put_u32, put_u64, u16_at, u32_at, u64_at};
use ring::hmac;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

mod forward;
mod handshake;
mod hubs;
mod inner;
mod mesh;
mod peer_list;
mod sealed;

pub use forward::*;
pub use handshake::*;
pub use hubs::*;
pub use inner::*;
pub use mesh::*;
pub use peer_list::*;
pub use sealed::*;

pub const MSG_REGISTER: u8 = 0x21;
pub const MSG_WELCOME: u8 = 0x22;
pub const MSG_REFUSAL: u8 = 0x23;
pub const MSG_RESET: u8 = 0x24;
pub const MSG_SEALED: u8 = 0x27;

/// What a `Sealed` message holds: its first plaintext byte.
pub mod sealed_kind {
    pub const HEARTBEAT: u8 = 0x01;
    pub const HEARTBEAT_ACK: u8 = 0x02;
    pub const KCP: u8 = 0x03;
    pub const RELAY: u8 = 0x04;
    pub const WHERE_AM_I: u8 = 0x05;
    pub const YOU_ARE: u8 = 0x06;
}

pub const INNER_IP: u8 = 0x01;
pub const INNER_PEERS: u8 = 0x02;
pub const INNER_CANDIDATES: u8 = 0x03;
pub const INNER_INTRO_REQUEST: u8 = 0x04;
pub const INNER_INTRO: u8 = 0x05;
pub const INNER_RESET_TOKEN: u8 = 0x06;
/// Hub → peer: what changed in the peer list since a version the peer has.
pub const INNER_PEERS_DELTA: u8 = 0x07;
/// Peer → hub: "I take deltas; I have this version of the list (0: none, send it whole)".
pub const INNER_PEERS_WANT: u8 = 0x08;

/// Byte ranges of every field, as the layout above shows them. Variable-length parts
/// (names, route lists) are located by `Fields` offsets relative to where they end.
pub mod field {
    pub use common::wire::field::{Field, TYPE};

    pub mod register {
        use super::Field;
        pub const NAME_LEN: usize = 1;
        pub const NAME: usize = 2;
        /// After the name, relative to its end.
        pub const TIMESTAMP: Field = 0..8;
        pub const NONCE: Field = 8..16;
        pub const WANT_ADDR: Field = 16..20;
        pub const MTU: Field = 20..22;
        pub const PUBLIC: Field = 22..54;
        /// The route list (`route`), then the MAC.
        pub const ROUTES: usize = 54;
    }

    /// A route list: a count, then `route::LEN`-byte entries.
    pub mod route {
        use super::Field;
        pub const COUNT: usize = 0;
        pub const FIRST: usize = 1;
        /// One entry, relative to its start.
        pub const ADDR: Field = 0..4;
        pub const PREFIX_LEN: usize = 4;
        pub const LEN: usize = 5;
    }

    pub mod welcome {
        use super::Field;
        pub const PEER_ID: Field = 1..5;
        pub const ADDR: Field = 5..9;
        pub const PREFIX_LEN: usize = 9;
        pub const HUB_ADDR: Field = 10..14;
        pub const MTU: Field = 14..16;
        pub const NONCE: Field = 16..24;
        pub const PUBLIC: Field = 24..56;
        /// How many refused routes follow, then the MAC.
        pub const N_REFUSED: usize = 56;
        pub const REFUSED: usize = 57;
        /// One refused route, relative to its start.
        pub const REFUSED_ADDR: Field = 0..4;
        pub const REFUSED_PREFIX_LEN: usize = 4;
        pub const REFUSED_REASON: usize = 5;
        pub const REFUSED_LEN: usize = 6;
    }

    pub mod refusal {
        use super::Field;
        pub const REASON: usize = 1;
        pub const HUB_MTU: Field = 2..4;
        pub const NONCE: Field = 4..12;
        pub const MAC: Field = 12..44;
    }

    pub mod reset {
        use super::Field;
        pub const PEER_ID: Field = 1..5;
        pub const TOKEN: Field = 5..21;
    }

    pub mod sealed {
        use super::Field;
        pub const PEER_ID: Field = 1..5;
        pub const SEQ: Field = 5..13;
        /// The AEAD-sealed message (kind byte, body), then the tag.
        pub const BODY: usize = 13;
    }

    /// Sealed messages, relative to the kind byte.
    pub mod heartbeat {
        use super::Field;
        pub const SEQ: Field = 1..5;
        pub const RTT: Field = 5..9;
    }

    pub mod heartbeat_ack {
        use super::Field;
        pub const SEQ: Field = 1..5;
        pub const PEERS_VERSION: Field = 5..9;
    }

    /// Messages inside the KCP stream: the body follows the kind byte.
    pub mod inner {
        pub const BODY: usize = 1;
    }

    /// `sealed_kind::KCP`: the segment follows the kind byte.
    pub mod kcp {
        pub const SEGMENT: usize = 1;
    }

    /// `sealed_kind::RELAY`: the other peer's id, then the datagram.
    pub mod relay {
        use super::Field;
        pub const PEER_ID: Field = 1..5;
        pub const DATAGRAM: usize = 5;
    }

    /// `sealed_kind::WHERE_AM_I` and `YOU_ARE`: which mesh socket asks, then padding or
    /// the address the hub saw.
    pub mod rendezvous {
        pub const SOCKET: usize = 1;
        pub const ADDR: usize = 2;
    }

    /// `Forward` (between hubs): the name at `NAME`, then these, relative to its end.
    pub mod forward {
        use super::Field;
        pub const NAME_LEN: usize = 1;
        pub const NAME: usize = 2;
        pub const BOOT: Field = 0..16;
        pub const SEQ: Field = 16..24;
        pub const WALL_MS: Field = 24..32;
        pub const AFTER_NAME: usize = 32;
    }

    /// `INNER_INTRO_REQUEST` and `INNER_INTRO`.
    pub mod intro {
        use super::Field;
        pub const PEER_ID: Field = 1..5;
        pub const KEY: Field = 5..37;
    }

    /// One chunk of the peer list: which version, which chunk of how many, its entries.
    pub mod peer_delta {
        use super::Field;
        pub const FROM: Field = 1..5;
        pub const TO: Field = 5..9;
        pub const UPSERTS: Field = 9..11;
        pub const REMOVED: Field = 11..13;
        /// Then the upserted entries (as in a peer list), then the removed ids (4 bytes each).
        pub const ENTRIES: usize = 13;
    }

    pub mod peers_want {
        use super::Field;
        pub const HAVE: Field = 1..5;
        pub const LEN: usize = 5;
    }

    pub mod peer_list {
        use super::Field;
        pub const VERSION: Field = 1..5;
        pub const CHUNK: Field = 5..7;
        pub const CHUNKS: Field = 7..9;
        pub const COUNT: Field = 9..11;
        pub const ENTRIES: usize = 11;
        /// One entry, relative to its start: id, name length, name ...
        pub const ID: Field = 0..4;
        pub const NAME_LEN: usize = 4;
        pub const NAME: usize = 5;
        /// ... then, relative to the end of the name, the address and a route list.
        pub const ADDR: Field = 0..4;
        pub const ROUTES: usize = 4;
    }
}

pub const MAC_LEN: usize = 32;
pub const PUBLIC_KEY_LEN: usize = 32;
pub const PAIR_KEY_LEN: usize = 32;
/// Candidates one peer-list entry (or one candidates message) carries at most.
pub const MAX_CANDIDATES: usize = 8;
/// The longest encoded address.
pub const ADDR_MAX_LEN: usize = 1 + 16 + 2;
/// "Where am I" is padded to this length: its answer (socket and an address) is never
/// longer, so the rendezvous port amplifies nothing.
pub const WHERE_AM_I_LEN: usize = field::rendezvous::ADDR + ADDR_MAX_LEN + 8;
pub const INTRO_REQUEST_LEN: usize = field::intro::PEER_ID.end;
pub const INTRO_LEN: usize = field::intro::KEY.end;
/// What relaying adds inside the sealed message: the kind and the other peer's id.
pub const RELAY_HEADER_LEN: usize = field::relay::DATAGRAM;
pub const MAX_NAME_LEN: usize = 32;
pub const MAX_ROUTES: usize = 32;
/// A Welcome without refused routes or DNS domain.
pub const WELCOME_LEN: usize = field::welcome::REFUSED + 1 + MAC_LEN;
/// The longest DNS domain a Welcome carries.
pub const MAX_DNS_DOMAIN_LEN: usize = 253;
/// Refused routes a Welcome lists at most (a Welcome stays smaller than the Register it
/// answers, so the tunnel can carry it before the path is validated).
pub const MAX_REFUSED_IN_WELCOME: usize = 16;
pub const REFUSAL_LEN: usize = field::refusal::MAC.end;
pub const RESET_LEN: usize = field::reset::TOKEN.end;
pub const RESET_TOKEN_LEN: usize = 16;
pub const HEARTBEAT_LEN: usize = field::heartbeat::RTT.end;
pub const HEARTBEAT_ACK_LEN: usize = field::heartbeat_ack::PEERS_VERSION.end;
/// The clear header of a `Sealed` datagram (its AEAD's associated data).
pub const SEALED_HEADER_LEN: usize = field::sealed::BODY;
/// What sealing adds to a message: the clear header and the AEAD tag.
pub const SEALED_OVERHEAD: usize = SEALED_HEADER_LEN + common::wire::AEAD_TAG_LEN;
const _: () = assert!(field::refusal::MAC.end - field::refusal::MAC.start == MAC_LEN);
const _: () = assert!(field::rendezvous::ADDR + ADDR_MAX_LEN <= WHERE_AM_I_LEN, "answers are never longer");
const _: () = assert!(field::intro::KEY.end - field::intro::KEY.start == PAIR_KEY_LEN);
const _: () = assert!(field::register::PUBLIC.end - field::register::PUBLIC.start == PUBLIC_KEY_LEN);
const _: () = assert!(field::welcome::PUBLIC.end - field::welcome::PUBLIC.start == PUBLIC_KEY_LEN);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VpnWireError {
    #[error("truncated")]
    Truncated,
    #[error("unknown message")]
    Unknown,
    #[error("bad field")]
    BadField,
    #[error("bad MAC")]
    BadMac,
}

/// A peer's key, as used for its MACs.
pub struct PeerKey(hmac::Key);

impl PeerKey {
    pub fn new(bytes: &[u8]) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, bytes))
    }

    /// Whether `other` is the same key (compared through a value derived from both).
    pub fn same_key(&self, other: &PeerKey) -> bool {
        self.channel_salt().as_ref() == other.channel_salt().as_ref()
    }

    /// The HKDF salt of this peer's channel keys: derived from the key, never the key.
    pub fn channel_salt(&self) -> hmac::Tag {
        self.tag(&[b"mpvpn v1 channel salt"])
    }

    fn tag(&self, parts: &[&[u8]]) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.0);
        for p in parts {
            ctx.update(p);
        }
        ctx.sign()
    }

    fn verify(&self, parts: &[&[u8]], mac: &[u8]) -> Result<(), VpnWireError> {
        let tag = self.tag(parts);
        let want = &tag.as_ref()[..mac.len()];
        // constant time over the (possibly truncated) length
        let diff = want.iter().zip(mac).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if mac.len() >= 16 && diff == 0 {
            Ok(())
        } else {
            Err(VpnWireError::BadMac)
        }
    }
}

/// The fixed-size message `b` of type `msg` and length `len`, or why not: the checked
/// view every fixed-size parse starts from.
fn checked(b: &[u8], msg: u8, len: usize) -> Result<&[u8], VpnWireError> {
    match b.first() {
        None => Err(VpnWireError::Truncated),
        Some(&t) if t != msg => Err(VpnWireError::Unknown),
        Some(_) if b.len() != len => Err(VpnWireError::Truncated),
        Some(_) => Ok(b),
    }
}

/// `len` bytes of `b` from `at`, or `Truncated`: for fields after a variable-length part.
fn region(b: &[u8], at: usize, len: usize) -> Result<&[u8], VpnWireError> {
    at.checked_add(len).and_then(|end| b.get(at..end)).ok_or(VpnWireError::Truncated)
}

fn ipv4_at(b: &[u8], f: field::Field) -> Ipv4Addr {
    Ipv4Addr::from(u32_at(b, f))
}

fn public_at(b: &[u8], f: field::Field) -> [u8; PUBLIC_KEY_LEN] {
    let mut k = [0u8; PUBLIC_KEY_LEN];
    k.copy_from_slice(&b[f]);
    k
}

/// A length-prefixed name at `at`; returns it and where it ends.
fn name_at(b: &[u8], len_at: usize) -> Result<(&str, usize), VpnWireError> {
    let n = *b.get(len_at).ok_or(VpnWireError::Truncated)? as usize;
    if n == 0 || n > MAX_NAME_LEN {
        return Err(VpnWireError::BadField);
    }
    let name = std::str::from_utf8(region(b, len_at + 1, n)?).map_err(|_| VpnWireError::BadField)?;
    Ok((name, len_at + 1 + n))
}

/// A route list at `at`; returns the routes and where the list ends.
fn routes_at(b: &[u8], at: usize) -> Result<(Vec<Prefix>, usize), VpnWireError> {
    use field::route;
    let n = *b.get(at + route::COUNT).ok_or(VpnWireError::Truncated)? as usize;
    if n > MAX_ROUTES {
        return Err(VpnWireError::BadField);
    }
    let list = region(b, at + route::FIRST, n * route::LEN)?;
    let routes = list
        .chunks_exact(route::LEN)
        .map(|e| Prefix::new(ipv4_at(e, route::ADDR), e[route::PREFIX_LEN]).ok_or(VpnWireError::BadField))
        .collect::<Result<_, _>>()?;
    Ok((routes, at + route::FIRST + n * route::LEN))
}

fn put_routes(out: &mut Vec<u8>, routes: &[Prefix]) {
    out.push(routes.len() as u8);
    for r in routes {
        let mut e = [0u8; field::route::LEN];
        e[field::route::ADDR].copy_from_slice(&r.addr.octets());
        e[field::route::PREFIX_LEN] = r.len;
        out.extend_from_slice(&e);
    }
}

/// Appends `a` as `family | ip | port`.
pub fn put_addr(out: &mut Vec<u8>, a: SocketAddr) {
    match a.ip() {
        IpAddr::V4(v4) => {
            out.push(4);
            out.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            out.push(6);
            out.extend_from_slice(&v6.octets());
        }
    }
    out.extend_from_slice(&a.port().to_be_bytes());
}

/// The address at `at`, and where it ends.
pub fn addr_at(b: &[u8], at: usize) -> Result<(SocketAddr, usize), VpnWireError> {
    let (ip, end): (IpAddr, usize) = match b.get(at) {
        None => return Err(VpnWireError::Truncated),
        Some(4) => {
            let o: [u8; 4] = region(b, at + 1, 4)?.try_into().map_err(|_| VpnWireError::Truncated)?;
            (Ipv4Addr::from(o).into(), at + 5)
        }
        Some(6) => {
            let o: [u8; 16] = region(b, at + 1, 16)?.try_into().map_err(|_| VpnWireError::Truncated)?;
            (Ipv6Addr::from(o).into(), at + 17)
        }
        Some(_) => return Err(VpnWireError::BadField),
    };
    let port = u16::from_be_bytes(region(b, end, 2)?.try_into().map_err(|_| VpnWireError::Truncated)?);
    Ok((SocketAddr::new(ip, port), end + 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> PeerKey {
        PeerKey::new(&[9; 32])
    }

    #[test]
    fn register_round_trip_and_golden_prefix() {
        let r = RegisterRepr {
            name: "ab".into(),
            timestamp_ms: 0x0102,
            nonce: 7,
            want_addr: Ipv4Addr::new(10, 99, 0, 5),
            mtu: 1383,
            public: [0xee; 32],
            routes: vec!["192.168.50.0/24".parse().unwrap()],
            instance: 0,
        };
        let b = r.emit(&key());
        assert_eq!(
            &b[..26],
            &[0x21, 2, b'a', b'b', 0, 0, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 0, 0, 0, 7, 10, 99, 0, 5, 0x05, 0x67]
        );
        assert_eq!(&b[26..58], &[0xee; 32]);
        assert_eq!(&b[58..b.len() - MAC_LEN], &[1, 192, 168, 50, 0, 24]);
        let (p, body) = RegisterRepr::parse(&b).unwrap();
        assert_eq!(p, r);
        assert!(RegisterRepr::verify(&b, body, &key()).is_ok());
        assert_eq!(RegisterRepr::verify(&b, body, &PeerKey::new(&[1; 32])), Err(VpnWireError::BadMac));
        let mut t = b.clone();
        t[3] ^= 1;
        let (_, body) = RegisterRepr::parse(&t).unwrap();
        assert!(RegisterRepr::verify(&t, body, &key()).is_err());
        assert!(RegisterRepr::parse(&b[..b.len() - 1]).is_err());
        // with the instance: 8 bytes between the routes and the MAC, under it
        let with = RegisterRepr { instance: 0x0102_0304_0506_0708, ..r.clone() };
        let b = with.emit(&key());
        assert_eq!(&b[64..b.len() - MAC_LEN], &[1, 2, 3, 4, 5, 6, 7, 8]);
        let (p, body) = RegisterRepr::parse(&b).unwrap();
        assert_eq!(p, with);
        assert!(RegisterRepr::verify(&b, body, &key()).is_ok());
        for cut in 1..8 {
            assert!(RegisterRepr::parse(&b[..b.len() - cut]).is_err(), "cut {cut}");
        }
    }

    #[test]
    fn welcome_refusal_heartbeat_golden() {
        let w = WelcomeRepr {
            peer_id: 3,
            addr: Ipv4Addr::new(10, 99, 0, 3),
            prefix_len: 24,
            hub_addr: Ipv4Addr::new(10, 99, 0, 1),
            mtu: 1383,
            nonce: 9,
            public: [0xdd; 32],
            refused: vec![],
            dns_domain: None,
        };
        let reg_public = [0xee; 32];
        let b = w.emit(&key(), &reg_public);
        assert_eq!(b.len(), WELCOME_LEN);
        assert_eq!(&b[..24], &[0x22, 0, 0, 0, 3, 10, 99, 0, 3, 24, 10, 99, 0, 1, 0x05, 0x67, 0, 0, 0, 0, 0, 0, 0, 9]);
        assert_eq!(&b[24..56], &[0xdd; 32]);
        assert_eq!(b[56], 0);
        assert_eq!(WelcomeRepr::parse(&b, &key(), &reg_public).unwrap(), w);
        assert!(WelcomeRepr::parse(&b, &PeerKey::new(&[0; 32]), &reg_public).is_err());
        // it answers exactly the Register with that public key
        assert_eq!(WelcomeRepr::parse(&b, &key(), &[0xef; 32]), Err(VpnWireError::BadMac));
        let with_refused = WelcomeRepr {
            refused: vec![
                ("10.0.0.0/8".parse().unwrap(), RouteRefusalReason::OverlapsNetwork),
                ("192.168.50.0/24".parse().unwrap(), RouteRefusalReason::NotAllowed),
            ],
            ..w.clone()
        };
        let b = with_refused.emit(&key(), &reg_public);
        assert_eq!(&b[56..69], &[2, 10, 0, 0, 0, 8, 2, 192, 168, 50, 0, 24, 1]);
        assert_eq!(WelcomeRepr::parse(&b, &key(), &reg_public).unwrap(), with_refused);
        assert!(WelcomeRepr::parse(&b[..b.len() - 1], &key(), &reg_public).is_err());
        let named = WelcomeRepr { dns_domain: Some("mpvpn".into()), ..w.clone() };
        let b = named.emit(&key(), &reg_public);
        assert_eq!(&b[56..63], &[0, 5, b'm', b'p', b'v', b'p', b'n']);
        assert_eq!(WelcomeRepr::parse(&b, &key(), &reg_public).unwrap(), named);

        let f = RefusalRepr { reason: RefusalReason::MtuMismatch, hub_mtu: 1383, nonce: 1 };
        let b = f.emit(&key());
        assert_eq!(&b[..12], &[0x23, 1, 0x05, 0x67, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(RefusalRepr::parse(&b, &key()).unwrap(), f);
        // the MAC itself: HMAC-SHA256 under the peer key over the body
        // (checked against Python's hmac module)
        assert_eq!(&b[12..20], &[0xc0, 0x36, 0xfe, 0xae, 0xb7, 0x8b, 0x7d, 0x58]);

        let h = HeartbeatRepr { seq: 2, rtt_us: 4 };
        assert_eq!(h.emit(), [0x01, 0, 0, 0, 2, 0, 0, 0, 4]);
        assert_eq!(HeartbeatRepr::parse(&h.emit()).unwrap(), h);
        assert!(HeartbeatRepr::parse(&h.emit()[..8]).is_err());
        let a = HeartbeatAckRepr { seq: 2, peers_version: 3 };
        assert_eq!(a.emit(), [0x02, 0, 0, 0, 2, 0, 0, 0, 3]);
        assert_eq!(HeartbeatAckRepr::parse(&a.emit()).unwrap(), a);
        assert_eq!(HeartbeatAckRepr::parse(&h.emit()), Err(VpnWireError::Unknown));

        let s = SealedHeader { peer_id: 0x0102_0304, seq: 5 };
        let mut d = [0u8; SEALED_OVERHEAD + 1];
        s.emit(&mut d);
        assert_eq!(&d[..SEALED_HEADER_LEN], &[0x27, 1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0, 5]);
        assert_eq!(SealedHeader::parse(&d).unwrap(), s);
        assert_eq!(SealedHeader::parse(&d[..SEALED_OVERHEAD]), Err(VpnWireError::Truncated));
    }

    #[test]
    fn peer_list_delta_round_trip_and_hostile_counts() {
        let entry = PeerEntry {
            id: 9,
            name: "c".into(),
            addr: Ipv4Addr::new(10, 99, 0, 9),
            routes: vec![],
            candidates: vec![],
        };
        let d = PeerListDelta { from: 4, to: 6, upserts: vec![entry], removed: vec![2, 3] };
        let b = d.emit().unwrap();
        #[rustfmt::skip]
        let golden = [
            0x07, 0, 0, 0, 4, 0, 0, 0, 6, 0, 1, 0, 2,    // kind, from, to, 1 upsert, 2 removed
            0, 0, 0, 9, 1, b'c', 10, 99, 0, 9, 0, 0,     // the entry, as in a list
            0, 0, 0, 2, 0, 0, 0, 3,                      // the removed ids
        ];
        assert_eq!(b, golden);
        assert_eq!(PeerListDelta::parse(&b).unwrap(), d);
        assert!(matches!(parse_inner(&b), Ok(InnerMessage::PeerListDelta(x)) if x == d));
        for cut in 0..b.len() {
            assert!(PeerListDelta::parse(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut extra = b.clone();
        extra.push(0);
        assert!(PeerListDelta::parse(&extra).is_err());
        // counts far beyond the bytes: an error, and no reservation to match
        let mut hostile = b[..13].to_vec();
        hostile[9..13].copy_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        assert!(PeerListDelta::parse(&hostile).is_err());
        // too many changes for one message: sent whole instead
        let many: Vec<PeerEntry> = (0..2000)
            .map(|i| PeerEntry {
                id: i,
                name: format!("peer-{i}"),
                addr: Ipv4Addr::new(10, 99, 0, 1),
                routes: vec![],
                candidates: vec![],
            })
            .collect();
        assert_eq!(PeerListDelta { from: 1, to: 2, upserts: many, removed: vec![] }.emit(), None);
        assert_eq!(parse_peers_want(&emit_peers_want(7)), Ok(7));
        assert_eq!(emit_peers_want(7), [0x08, 0, 0, 0, 7]);
        assert!(parse_peers_want(&[0x08, 0, 0, 0]).is_err());
    }

    #[test]
    fn peer_list_round_trip() {
        let peers = vec![
            PeerEntry {
                id: 2,
                name: "a".into(),
                addr: Ipv4Addr::new(10, 99, 0, 2),
                routes: vec![],
                candidates: vec![],
            },
            PeerEntry {
                id: 3,
                name: "b".into(),
                addr: Ipv4Addr::new(10, 99, 0, 3),
                routes: vec!["192.168.50.0/24".parse().unwrap()],
                candidates: vec!["192.0.2.7:5100".parse().unwrap(), "[2001:db8::1]:5100".parse().unwrap()],
            },
        ];
        let b = emit_peer_list(5, &peers);
        #[rustfmt::skip]
        let golden = [
            0x02, 0, 0, 0, 5, 0, 0, 0, 1, 0, 2,          // kind, version, chunk 0 of 1, count
            0, 0, 0, 2, 1, b'a', 10, 99, 0, 2, 0, 0,     // id, name, address, no routes, no candidates
            0, 0, 0, 3, 1, b'b', 10, 99, 0, 3, 1, 192, 168, 50, 0, 24,
            2, 4, 192, 0, 2, 7, 0x13, 0xec,              // two candidates: IPv4 ...
            6, 0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0x13, 0xec, // ... and IPv6
        ];
        assert_eq!(b, [golden.to_vec()]);
        let want = PeerListChunk { version: 5, chunk: 0, chunks: 1, entries: peers };
        assert_eq!(parse_peer_list(&b[0]).unwrap(), want);
        assert!(parse_peer_list(&b[0][..b[0].len() - 1]).is_err());
        let mut extra = b[0].clone();
        extra.push(0);
        assert!(parse_peer_list(&extra).is_err());
        let mut beyond = b[0].clone();
        beyond[6] = 1; // chunk 1 of 1
        assert_eq!(parse_peer_list(&beyond), Err(VpnWireError::BadField));
        assert_eq!(emit_peer_list(1, &[]).len(), 1, "an empty list is still a message");
    }

    #[test]
    fn mesh_messages_round_trip() {
        let c: Vec<SocketAddr> = vec!["10.0.0.2:5100".parse().unwrap(), "[fd00::2]:5101".parse().unwrap()];
        assert_eq!(parse_candidates(&emit_candidates(&c)).unwrap(), c);
        let too_many: Vec<SocketAddr> = (0..20).map(|i| SocketAddr::from(([10, 0, 0, i], 1))).collect();
        assert_eq!(parse_candidates(&emit_candidates(&too_many)).unwrap().len(), MAX_CANDIDATES);
        let mut bad = emit_candidates(&c);
        bad[2] = 5; // no such family
        assert_eq!(parse_candidates(&bad), Err(VpnWireError::BadField));
        assert!(parse_candidates(&emit_candidates(&c)[..5]).is_err());
        assert_eq!(parse_intro_request(&emit_intro_request(7)).unwrap(), 7);
        let i = IntroRepr { peer_id: 9, key: [3; 32] };
        assert_eq!(IntroRepr::parse(&i.emit()).unwrap(), i);
        assert!(IntroRepr::parse(&i.emit()[..30]).is_err());
        assert_eq!(parse_where_am_i(&emit_where_am_i(2)).unwrap(), 2);
        for a in &c {
            let answer = emit_you_are(1, *a);
            assert!(answer.len() <= WHERE_AM_I_LEN, "no amplification");
            assert_eq!(parse_you_are(&answer).unwrap(), (1, *a));
        }
    }

    /// Before, the list was one message: with 1000 peers of 32 routes (≈ 200 KB) it took
    /// more fragments than KCP sends (its send failed: nobody got the list), and from
    /// 64 KB it no longer fitted the receive buffer. Now every chunk fits both.
    #[test]
    fn large_peer_lists_are_chunked() {
        let routes: Vec<Prefix> =
            (0..MAX_ROUTES as u32).map(|i| Prefix::new(Ipv4Addr::from(i << 8), 24).unwrap()).collect();
        let peers: Vec<PeerEntry> = (0..1000u32)
            .map(|i| PeerEntry {
                id: i,
                name: format!("{i:0>32}"),
                addr: Ipv4Addr::from(i),
                routes: routes.clone(),
                candidates: vec![],
            })
            .collect();
        let chunks = emit_peer_list(9, &peers);
        assert!(chunks.len() > 10);
        assert!(chunks.iter().all(|c| c.len() <= PEER_LIST_CHUNK_BYTES));
        let mut back = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let p = parse_peer_list(c).unwrap();
            assert_eq!((p.version, p.chunk as usize, p.chunks as usize), (9, i, chunks.len()));
            back.extend(p.entries);
        }
        assert_eq!(back, peers);
    }
}
