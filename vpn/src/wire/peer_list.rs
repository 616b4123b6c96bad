//! The peer list: entries, and the list cut into `INNER_PEERS` chunks.

use super::*;

/// One entry of the peer list the hub pushes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeerEntry {
    pub id: u32,
    pub name: String,
    pub addr: Ipv4Addr,
    pub routes: Vec<Prefix>,
    /// Where its mesh sockets may be reached (host and server-reflexive); empty: the peer
    /// has no mesh socket (or none known yet).
    #[serde(default)]
    pub candidates: Vec<SocketAddr>,
}

/// The most one peer-list message holds (KCP carries it in a dozen segments).
pub const PEER_LIST_CHUNK_BYTES: usize = 16 * 1024;
/// The most chunks one list may have (a receiver refuses more).
pub const MAX_PEER_LIST_CHUNKS: u16 = 1024;

/// One chunk of the peer list the hub pushes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerListChunk {
    pub version: u32,
    pub chunk: u16,
    pub chunks: u16,
    pub entries: Vec<PeerEntry>,
}

pub(super) fn put_peer_entry(out: &mut Vec<u8>, p: &PeerEntry) {
    out.extend_from_slice(&p.id.to_be_bytes());
    out.push(p.name.len() as u8);
    out.extend_from_slice(p.name.as_bytes());
    out.extend_from_slice(&p.addr.octets());
    put_routes(out, &p.routes);
    put_candidates(out, &p.candidates);
}

/// The peer list `version` as `INNER_PEERS` messages of at most `PEER_LIST_CHUNK_BYTES`
/// (an empty list is one chunk without entries).
pub fn emit_peer_list(version: u32, peers: &[PeerEntry]) -> Vec<Vec<u8>> {
    use field::peer_list as f;
    let mut bodies: Vec<(u16, Vec<u8>)> = vec![(0, Vec::new())];
    let mut entry = Vec::new();
    for p in peers {
        entry.clear();
        put_peer_entry(&mut entry, p);
        let last = bodies.last_mut().expect("one chunk at least");
        if f::ENTRIES + last.1.len() + entry.len() > PEER_LIST_CHUNK_BYTES && last.0 > 0 {
            bodies.push((0, Vec::new()));
        }
        let last = bodies.last_mut().expect("one chunk at least");
        last.0 += 1;
        last.1.extend_from_slice(&entry);
    }
    let chunks = bodies.len() as u16;
    bodies
        .into_iter()
        .enumerate()
        .map(|(i, (count, body))| {
            let mut out = vec![0u8; f::ENTRIES];
            out[field::TYPE] = INNER_PEERS;
            put_u32(&mut out, f::VERSION, version);
            put_u16(&mut out, f::CHUNK, i as u16);
            put_u16(&mut out, f::CHUNKS, chunks);
            put_u16(&mut out, f::COUNT, count);
            out.extend_from_slice(&body);
            out
        })
        .collect()
}

pub fn parse_peer_list(b: &[u8]) -> Result<PeerListChunk, VpnWireError> {
    use field::peer_list as f;
    match b.first() {
        None => return Err(VpnWireError::Truncated),
        Some(&INNER_PEERS) => {}
        Some(_) => return Err(VpnWireError::Unknown),
    }
    let head = region(b, 0, f::ENTRIES)?;
    let (version, chunk, chunks) = (u32_at(head, f::VERSION), u16_at(head, f::CHUNK), u16_at(head, f::CHUNKS));
    if chunk >= chunks || chunks > MAX_PEER_LIST_CHUNKS {
        return Err(VpnWireError::BadField);
    }
    let n = u16_at(head, f::COUNT) as usize;
    let mut entries = Vec::with_capacity(n.min(1024));
    let mut at = f::ENTRIES;
    for _ in 0..n {
        let id = u32_at(region(b, at, f::NAME_LEN)?, f::ID);
        let (name, name_end) = name_at(b, at + f::NAME_LEN)?;
        let addr = ipv4_at(region(b, name_end, f::ROUTES)?, f::ADDR);
        let (routes, routes_end) = routes_at(b, name_end + f::ROUTES)?;
        let (candidates, end) = candidates_at(b, routes_end)?;
        entries.push(PeerEntry { id, name: name.to_string(), addr, routes, candidates });
        at = end;
    }
    if at != b.len() {
        return Err(VpnWireError::BadField);
    }
    Ok(PeerListChunk { version, chunk, chunks, entries })
}
