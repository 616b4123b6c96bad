//! The mesh's messages: host candidates, introductions and their requests, the
//! rendezvous question and answer.

use super::*;

pub(super) fn put_candidates(out: &mut Vec<u8>, c: &[SocketAddr]) {
    let c = &c[..c.len().min(MAX_CANDIDATES)];
    out.push(c.len() as u8);
    for a in c {
        put_addr(out, *a);
    }
}

pub(super) fn candidates_at(b: &[u8], at: usize) -> Result<(Vec<SocketAddr>, usize), VpnWireError> {
    let n = *b.get(at).ok_or(VpnWireError::Truncated)? as usize;
    if n > MAX_CANDIDATES {
        return Err(VpnWireError::BadField);
    }
    let mut out = Vec::with_capacity(n);
    let mut at = at + 1;
    for _ in 0..n {
        let (a, end) = addr_at(b, at)?;
        out.push(a);
        at = end;
    }
    Ok((out, at))
}

/// `INNER_CANDIDATES`: a peer's host candidates, for the hub.
pub fn emit_candidates(c: &[SocketAddr]) -> Vec<u8> {
    let mut out = vec![INNER_CANDIDATES];
    put_candidates(&mut out, c);
    out
}

pub fn parse_candidates(b: &[u8]) -> Result<Vec<SocketAddr>, VpnWireError> {
    match b.first() {
        Some(&INNER_CANDIDATES) => {}
        Some(_) => return Err(VpnWireError::Unknown),
        None => return Err(VpnWireError::Truncated),
    }
    let (c, end) = candidates_at(b, 1)?;
    if end != b.len() {
        return Err(VpnWireError::BadField);
    }
    Ok(c)
}

/// `INNER_INTRO_REQUEST`: introduce me to the peer `peer_id`.
pub fn emit_intro_request(peer_id: u32) -> [u8; INTRO_REQUEST_LEN] {
    let mut b = [0u8; INTRO_REQUEST_LEN];
    b[field::TYPE] = INNER_INTRO_REQUEST;
    put_u32(&mut b, field::intro::PEER_ID, peer_id);
    b
}

pub fn parse_intro_request(b: &[u8]) -> Result<u32, VpnWireError> {
    let b = checked(b, INNER_INTRO_REQUEST, INTRO_REQUEST_LEN)?;
    Ok(u32_at(b, field::intro::PEER_ID))
}

/// `INNER_INTRO`: the hub introduces the peer `peer_id`, with the pair's key.
#[derive(Clone, PartialEq, Eq)]
pub struct IntroRepr {
    pub peer_id: u32,
    pub key: [u8; PAIR_KEY_LEN],
}

impl std::fmt::Debug for IntroRepr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntroRepr").field("peer_id", &self.peer_id).finish_non_exhaustive()
    }
}

impl IntroRepr {
    pub fn emit(&self) -> [u8; INTRO_LEN] {
        let mut b = [0u8; INTRO_LEN];
        b[field::TYPE] = INNER_INTRO;
        put_u32(&mut b, field::intro::PEER_ID, self.peer_id);
        b[field::intro::KEY].copy_from_slice(&self.key);
        b
    }

    pub fn parse(b: &[u8]) -> Result<Self, VpnWireError> {
        let b = checked(b, INNER_INTRO, INTRO_LEN)?;
        let mut key = [0u8; PAIR_KEY_LEN];
        key.copy_from_slice(&b[field::intro::KEY]);
        Ok(Self { peer_id: u32_at(b, field::intro::PEER_ID), key })
    }
}

/// `sealed_kind::WHERE_AM_I` from mesh socket `socket`, padded to `WHERE_AM_I_LEN`.
pub fn emit_where_am_i(socket: u8) -> [u8; WHERE_AM_I_LEN] {
    let mut b = [0u8; WHERE_AM_I_LEN];
    b[field::TYPE] = sealed_kind::WHERE_AM_I;
    b[field::rendezvous::SOCKET] = socket;
    b
}

/// The asking socket of a "where am I".
pub fn parse_where_am_i(b: &[u8]) -> Result<u8, VpnWireError> {
    let b = checked(b, sealed_kind::WHERE_AM_I, WHERE_AM_I_LEN)?;
    Ok(b[field::rendezvous::SOCKET])
}

/// `sealed_kind::YOU_ARE`: mesh socket `socket` is seen from `addr`.
pub fn emit_you_are(socket: u8, addr: SocketAddr) -> Vec<u8> {
    let mut b = vec![sealed_kind::YOU_ARE, socket];
    put_addr(&mut b, addr);
    b
}

pub fn parse_you_are(b: &[u8]) -> Result<(u8, SocketAddr), VpnWireError> {
    match b.first() {
        Some(&sealed_kind::YOU_ARE) => {}
        Some(_) => return Err(VpnWireError::Unknown),
        None => return Err(VpnWireError::Truncated),
    }
    let socket = *b.get(field::rendezvous::SOCKET).ok_or(VpnWireError::Truncated)?;
    let (addr, end) = addr_at(b, field::rendezvous::ADDR)?;
    if end != b.len() {
        return Err(VpnWireError::BadField);
    }
    Ok((socket, addr))
}
