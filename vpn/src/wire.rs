//! VPN messages between `mpvpn peer` and `mpvpn hub` (carried by the tunnel).
//!
//! ```text
//! Register  0x21 | name_len u8 | name | timestamp_ms u64 | nonce u64 | want_addr u32
//!                | mtu u16 (0 = take the hub's) | n_routes u8 | (addr u32, len u8)* | mac[32]
//! Welcome   0x22 | peer_id u32 | addr u32 | prefix_len u8 | hub_addr u32 | mtu u16 | nonce u64 | mac[32]
//! Refusal   0x23 | reason u8 | hub_mtu u16 | nonce u64 | mac[32]
//! Heartbeat 0x24 | peer_id u32 | seq u32 | timestamp_ms u64 | rtt_us u32 | mac[16]
//! HbAck     0x25 | peer_id u32 | seq u32 | peers_version u32
//! Kcp       0x26 | one KCP segment (conv = peer id)
//! ```
//! MACs are HMAC-SHA256 with the peer's own key over everything before them (truncated to
//! 16 bytes in heartbeats); Welcome and Refusal also cover the Register's nonce, so they
//! answer exactly that Register. Timestamps only ever grow per peer: replays are refused.
//!
//! Messages inside the KCP stream (reliable, ordered) start with a kind byte:
//! `0x01` an IP packet, `0x02` the peer list.

use crate::ip::Prefix;
use ring::hmac;
use std::net::Ipv4Addr;

pub const MSG_REGISTER: u8 = 0x21;
pub const MSG_WELCOME: u8 = 0x22;
pub const MSG_REFUSAL: u8 = 0x23;
pub const MSG_HEARTBEAT: u8 = 0x24;
pub const MSG_HEARTBEAT_ACK: u8 = 0x25;
pub const MSG_KCP: u8 = 0x26;

pub const MAC_LEN: usize = 32;
pub const HEARTBEAT_MAC_LEN: usize = 16;
pub const MAX_NAME_LEN: usize = 32;
pub const MAX_ROUTES: usize = 32;
const HEARTBEAT_BODY_LEN: usize = 1 + 4 + 4 + 8 + 4;
pub const HEARTBEAT_LEN: usize = HEARTBEAT_BODY_LEN + HEARTBEAT_MAC_LEN;
pub const HEARTBEAT_ACK_LEN: usize = 1 + 4 + 4 + 4;
pub const WELCOME_LEN: usize = 1 + 4 + 4 + 1 + 4 + 2 + 8 + MAC_LEN;
pub const REFUSAL_LEN: usize = 1 + 1 + 2 + 8 + MAC_LEN;

pub const INNER_IP: u8 = 0x01;
pub const INNER_PEERS: u8 = 0x02;

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

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], VpnWireError> {
        let end = self.pos.checked_add(n).ok_or(VpnWireError::Truncated)?;
        let s = self.b.get(self.pos..end).ok_or(VpnWireError::Truncated)?;
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, VpnWireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, VpnWireError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32, VpnWireError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, VpnWireError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn ipv4(&mut self) -> Result<Ipv4Addr, VpnWireError> {
        Ok(Ipv4Addr::from(self.u32()?))
    }
    fn name(&mut self) -> Result<&'a str, VpnWireError> {
        let n = self.u8()? as usize;
        if n == 0 || n > MAX_NAME_LEN {
            return Err(VpnWireError::BadField);
        }
        std::str::from_utf8(self.take(n)?).map_err(|_| VpnWireError::BadField)
    }
    fn routes(&mut self) -> Result<Vec<Prefix>, VpnWireError> {
        let n = self.u8()? as usize;
        if n > MAX_ROUTES {
            return Err(VpnWireError::BadField);
        }
        (0..n).map(|_| Prefix::new(self.ipv4()?, self.u8()?).ok_or(VpnWireError::BadField)).collect()
    }
    fn rest(&self) -> &'a [u8] {
        &self.b[self.pos..]
    }
}

fn put_routes(out: &mut Vec<u8>, routes: &[Prefix]) {
    out.push(routes.len() as u8);
    for r in routes {
        out.extend_from_slice(&r.addr.octets());
        out.push(r.len);
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterRepr {
    pub name: String,
    pub timestamp_ms: u64,
    pub nonce: u64,
    /// The address the peer had before (0.0.0.0 = any): peers keep theirs across hub restarts.
    pub want_addr: Ipv4Addr,
    /// The TUN MTU the peer is configured for; 0 = whatever the hub announces.
    pub mtu: u16,
    pub routes: Vec<Prefix>,
}

impl RegisterRepr {
    pub fn emit(&self, key: &PeerKey) -> Vec<u8> {
        let mut out = vec![MSG_REGISTER, self.name.len() as u8];
        out.extend_from_slice(self.name.as_bytes());
        out.extend_from_slice(&self.timestamp_ms.to_be_bytes());
        out.extend_from_slice(&self.nonce.to_be_bytes());
        out.extend_from_slice(&self.want_addr.octets());
        out.extend_from_slice(&self.mtu.to_be_bytes());
        put_routes(&mut out, &self.routes);
        let tag = key.tag(&[&out]);
        out.extend_from_slice(tag.as_ref());
        out
    }

    /// Parses without checking the MAC (the key depends on the name); returns the repr
    /// and the MAC-covered length.
    pub fn parse(b: &[u8]) -> Result<(Self, usize), VpnWireError> {
        let mut r = Reader { b, pos: 0 };
        if r.u8()? != MSG_REGISTER {
            return Err(VpnWireError::Unknown);
        }
        let name = r.name()?.to_string();
        let repr = Self {
            name,
            timestamp_ms: r.u64()?,
            nonce: r.u64()?,
            want_addr: r.ipv4()?,
            mtu: r.u16()?,
            routes: r.routes()?,
        };
        let body = r.pos;
        if r.rest().len() != MAC_LEN {
            return Err(VpnWireError::Truncated);
        }
        Ok((repr, body))
    }

    pub fn verify(b: &[u8], body: usize, key: &PeerKey) -> Result<(), VpnWireError> {
        key.verify(&[&b[..body]], &b[body..])
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WelcomeRepr {
    pub peer_id: u32,
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
    pub hub_addr: Ipv4Addr,
    pub mtu: u16,
    pub nonce: u64,
}

impl WelcomeRepr {
    pub fn emit(&self, key: &PeerKey) -> [u8; WELCOME_LEN] {
        let mut b = [0u8; WELCOME_LEN];
        b[0] = MSG_WELCOME;
        b[1..5].copy_from_slice(&self.peer_id.to_be_bytes());
        b[5..9].copy_from_slice(&self.addr.octets());
        b[9] = self.prefix_len;
        b[10..14].copy_from_slice(&self.hub_addr.octets());
        b[14..16].copy_from_slice(&self.mtu.to_be_bytes());
        b[16..24].copy_from_slice(&self.nonce.to_be_bytes());
        let tag = key.tag(&[&b[..24]]);
        b[24..].copy_from_slice(tag.as_ref());
        b
    }

    pub fn parse(b: &[u8], key: &PeerKey) -> Result<Self, VpnWireError> {
        if b.len() != WELCOME_LEN {
            return Err(VpnWireError::Truncated);
        }
        if b[0] != MSG_WELCOME {
            return Err(VpnWireError::Unknown);
        }
        key.verify(&[&b[..24]], &b[24..])?;
        let mut r = Reader { b, pos: 1 };
        let w = Self {
            peer_id: r.u32()?,
            addr: r.ipv4()?,
            prefix_len: r.u8()?,
            hub_addr: r.ipv4()?,
            mtu: r.u16()?,
            nonce: r.u64()?,
        };
        if w.prefix_len > 32 {
            return Err(VpnWireError::BadField);
        }
        Ok(w)
    }
}

/// Why the hub refused an authenticated Register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RefusalReason {
    MtuMismatch = 1,
    PoolExhausted = 2,
    RouteNotAllowed = 3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefusalRepr {
    pub reason: RefusalReason,
    pub hub_mtu: u16,
    pub nonce: u64,
}

impl RefusalRepr {
    pub fn emit(&self, key: &PeerKey) -> [u8; REFUSAL_LEN] {
        let mut b = [0u8; REFUSAL_LEN];
        b[0] = MSG_REFUSAL;
        b[1] = self.reason as u8;
        b[2..4].copy_from_slice(&self.hub_mtu.to_be_bytes());
        b[4..12].copy_from_slice(&self.nonce.to_be_bytes());
        let tag = key.tag(&[&b[..12]]);
        b[12..].copy_from_slice(tag.as_ref());
        b
    }

    pub fn parse(b: &[u8], key: &PeerKey) -> Result<Self, VpnWireError> {
        if b.len() != REFUSAL_LEN || b[0] != MSG_REFUSAL {
            return Err(VpnWireError::Truncated);
        }
        key.verify(&[&b[..12]], &b[12..])?;
        let reason = match b[1] {
            1 => RefusalReason::MtuMismatch,
            2 => RefusalReason::PoolExhausted,
            3 => RefusalReason::RouteNotAllowed,
            _ => return Err(VpnWireError::BadField),
        };
        let mut r = Reader { b, pos: 2 };
        Ok(Self { reason, hub_mtu: r.u16()?, nonce: r.u64()? })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatRepr {
    pub peer_id: u32,
    pub seq: u32,
    pub timestamp_ms: u64,
    /// The peer's last measured heartbeat round trip (for the hub's status).
    pub rtt_us: u32,
}

impl HeartbeatRepr {
    pub fn emit(&self, key: &PeerKey) -> [u8; HEARTBEAT_LEN] {
        let mut b = [0u8; HEARTBEAT_LEN];
        b[0] = MSG_HEARTBEAT;
        b[1..5].copy_from_slice(&self.peer_id.to_be_bytes());
        b[5..9].copy_from_slice(&self.seq.to_be_bytes());
        b[9..17].copy_from_slice(&self.timestamp_ms.to_be_bytes());
        b[17..21].copy_from_slice(&self.rtt_us.to_be_bytes());
        let tag = key.tag(&[&b[..HEARTBEAT_BODY_LEN]]);
        b[HEARTBEAT_BODY_LEN..].copy_from_slice(&tag.as_ref()[..HEARTBEAT_MAC_LEN]);
        b
    }

    /// Parses; the MAC is checked with `verify` once the peer is known.
    pub fn parse(b: &[u8]) -> Result<Self, VpnWireError> {
        if b.len() != HEARTBEAT_LEN || b[0] != MSG_HEARTBEAT {
            return Err(VpnWireError::Truncated);
        }
        let mut r = Reader { b, pos: 1 };
        Ok(Self { peer_id: r.u32()?, seq: r.u32()?, timestamp_ms: r.u64()?, rtt_us: r.u32()? })
    }

    pub fn verify(b: &[u8], key: &PeerKey) -> Result<(), VpnWireError> {
        key.verify(&[&b[..HEARTBEAT_BODY_LEN]], &b[HEARTBEAT_BODY_LEN..])
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatAckRepr {
    pub peer_id: u32,
    pub seq: u32,
    pub peers_version: u32,
}

impl HeartbeatAckRepr {
    pub fn emit(&self) -> [u8; HEARTBEAT_ACK_LEN] {
        let mut b = [0u8; HEARTBEAT_ACK_LEN];
        b[0] = MSG_HEARTBEAT_ACK;
        b[1..5].copy_from_slice(&self.peer_id.to_be_bytes());
        b[5..9].copy_from_slice(&self.seq.to_be_bytes());
        b[9..13].copy_from_slice(&self.peers_version.to_be_bytes());
        b
    }

    pub fn parse(b: &[u8]) -> Result<Self, VpnWireError> {
        if b.len() != HEARTBEAT_ACK_LEN || b[0] != MSG_HEARTBEAT_ACK {
            return Err(VpnWireError::Truncated);
        }
        let mut r = Reader { b, pos: 1 };
        Ok(Self { peer_id: r.u32()?, seq: r.u32()?, peers_version: r.u32()? })
    }
}

/// One entry of the peer list the hub pushes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeerEntry {
    pub id: u32,
    pub name: String,
    pub addr: Ipv4Addr,
    pub routes: Vec<Prefix>,
}

/// `INNER_PEERS` message body: version, then entries.
pub fn emit_peer_list(version: u32, peers: &[PeerEntry]) -> Vec<u8> {
    let mut out = vec![INNER_PEERS];
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&(peers.len() as u16).to_be_bytes());
    for p in peers {
        out.extend_from_slice(&p.id.to_be_bytes());
        out.push(p.name.len() as u8);
        out.extend_from_slice(p.name.as_bytes());
        out.extend_from_slice(&p.addr.octets());
        put_routes(&mut out, &p.routes);
    }
    out
}

pub fn parse_peer_list(b: &[u8]) -> Result<(u32, Vec<PeerEntry>), VpnWireError> {
    let mut r = Reader { b, pos: 0 };
    if r.u8()? != INNER_PEERS {
        return Err(VpnWireError::Unknown);
    }
    let version = r.u32()?;
    let n = r.u16()? as usize;
    let mut peers = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        peers.push(PeerEntry { id: r.u32()?, name: r.name()?.to_string(), addr: r.ipv4()?, routes: r.routes()? });
    }
    if !r.rest().is_empty() {
        return Err(VpnWireError::BadField);
    }
    Ok((version, peers))
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
            mtu: 1412,
            routes: vec!["192.168.50.0/24".parse().unwrap()],
        };
        let b = r.emit(&key());
        assert_eq!(
            &b[..b.len() - MAC_LEN],
            &[
                0x21, 2, b'a', b'b', 0, 0, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 0, 0, 0, 7, 10, 99, 0, 5, 0x05, 0x84, 1, 192,
                168, 50, 0, 24
            ]
        );
        let (p, body) = RegisterRepr::parse(&b).unwrap();
        assert_eq!(p, r);
        assert!(RegisterRepr::verify(&b, body, &key()).is_ok());
        assert_eq!(RegisterRepr::verify(&b, body, &PeerKey::new(&[1; 32])), Err(VpnWireError::BadMac));
        let mut t = b.clone();
        t[3] ^= 1;
        let (_, body) = RegisterRepr::parse(&t).unwrap();
        assert!(RegisterRepr::verify(&t, body, &key()).is_err());
        assert!(RegisterRepr::parse(&b[..b.len() - 1]).is_err());
    }

    #[test]
    fn welcome_refusal_heartbeat_golden() {
        let w = WelcomeRepr {
            peer_id: 3,
            addr: Ipv4Addr::new(10, 99, 0, 3),
            prefix_len: 24,
            hub_addr: Ipv4Addr::new(10, 99, 0, 1),
            mtu: 1412,
            nonce: 9,
        };
        let b = w.emit(&key());
        assert_eq!(&b[..24], &[0x22, 0, 0, 0, 3, 10, 99, 0, 3, 24, 10, 99, 0, 1, 0x05, 0x84, 0, 0, 0, 0, 0, 0, 0, 9]);
        assert_eq!(WelcomeRepr::parse(&b, &key()).unwrap(), w);
        assert!(WelcomeRepr::parse(&b, &PeerKey::new(&[0; 32])).is_err());

        let f = RefusalRepr { reason: RefusalReason::MtuMismatch, hub_mtu: 1412, nonce: 1 };
        let b = f.emit(&key());
        assert_eq!(&b[..12], &[0x23, 1, 0x05, 0x84, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(RefusalRepr::parse(&b, &key()).unwrap(), f);

        let h = HeartbeatRepr { peer_id: 1, seq: 2, timestamp_ms: 3, rtt_us: 4 };
        let b = h.emit(&key());
        assert_eq!(&b[..21], &[0x24, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 4]);
        assert_eq!(HeartbeatRepr::parse(&b).unwrap(), h);
        assert!(HeartbeatRepr::verify(&b, &key()).is_ok());
        let mut t = b;
        t[30] ^= 1;
        assert!(HeartbeatRepr::verify(&t, &key()).is_err());

        let a = HeartbeatAckRepr { peer_id: 1, seq: 2, peers_version: 3 };
        assert_eq!(a.emit(), [0x25, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3]);
        assert_eq!(HeartbeatAckRepr::parse(&a.emit()).unwrap(), a);
    }

    #[test]
    fn peer_list_round_trip() {
        let peers = vec![
            PeerEntry { id: 2, name: "a".into(), addr: Ipv4Addr::new(10, 99, 0, 2), routes: vec![] },
            PeerEntry {
                id: 3,
                name: "b".into(),
                addr: Ipv4Addr::new(10, 99, 0, 3),
                routes: vec!["192.168.50.0/24".parse().unwrap()],
            },
        ];
        let b = emit_peer_list(5, &peers);
        assert_eq!(&b[..7], &[0x02, 0, 0, 0, 5, 0, 2]);
        assert_eq!(parse_peer_list(&b).unwrap(), (5, peers));
        assert!(parse_peer_list(&b[..b.len() - 1]).is_err());
        let mut extra = b.clone();
        extra.push(0);
        assert!(parse_peer_list(&extra).is_err());
    }
}
