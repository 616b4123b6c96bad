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

/// A peer list (or a hub's table) arriving in chunks, in order: chunk 0 starts it
/// afresh, and it is whole at its last chunk.
#[derive(Debug, Default)]
pub struct ListAssembly(Option<(u32, u16, Vec<PeerEntry>)>);

impl ListAssembly {
    /// Takes chunk `c`: the list and its version once `c` is the last chunk; an error
    /// for a chunk out of order (what was assembled is dropped).
    pub fn take(&mut self, c: PeerListChunk) -> Result<Option<(u32, Vec<PeerEntry>)>, VpnWireError> {
        if c.chunk == 0 {
            self.0 = Some((c.version, 0, Vec::new()));
        }
        match &mut self.0 {
            Some((version, next, entries)) if *version == c.version && *next == c.chunk => {
                entries.extend(c.entries);
                *next += 1;
            }
            _ => {
                self.0 = None;
                return Err(VpnWireError::BadField);
            }
        }
        if c.chunk + 1 < c.chunks {
            return Ok(None);
        }
        Ok(self.0.take().map(|(version, _, entries)| (version, entries)))
    }
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
    emit_peer_list_in(version, peers, PEER_LIST_CHUNK_BYTES)
}

/// `emit_peer_list` in chunks of at most `max_bytes` (one entry each at least).
pub fn emit_peer_list_in(version: u32, peers: &[PeerEntry], max_bytes: usize) -> Vec<Vec<u8>> {
    use field::peer_list as f;
    let mut bodies: Vec<(u16, Vec<u8>)> = vec![(0, Vec::new())];
    let mut entry = Vec::new();
    for p in peers {
        entry.clear();
        put_peer_entry(&mut entry, p);
        let last = bodies.last_mut().expect("one chunk at least");
        if f::ENTRIES + last.1.len() + entry.len() > max_bytes && last.0 > 0 {
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

/// What changed in the peer list from version `from` to `to`: entries added or changed
/// (whole), and the ids of those gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerListDelta {
    pub from: u32,
    pub to: u32,
    pub upserts: Vec<PeerEntry>,
    pub removed: Vec<u32>,
}

impl PeerListDelta {
    /// The message; `None` when it would not fit one peer-list chunk (send the list whole).
    pub fn emit(&self) -> Option<Vec<u8>> {
        use field::peer_delta as f;
        let mut out = vec![0u8; f::ENTRIES];
        out[field::TYPE] = INNER_PEERS_DELTA;
        put_u32(&mut out, f::FROM, self.from);
        put_u32(&mut out, f::TO, self.to);
        put_u16(&mut out, f::UPSERTS, u16::try_from(self.upserts.len()).ok()?);
        put_u16(&mut out, f::REMOVED, u16::try_from(self.removed.len()).ok()?);
        for p in &self.upserts {
            put_peer_entry(&mut out, p);
            if out.len() > PEER_LIST_CHUNK_BYTES {
                return None;
            }
        }
        for id in &self.removed {
            out.extend_from_slice(&id.to_be_bytes());
        }
        (out.len() <= PEER_LIST_CHUNK_BYTES).then_some(out)
    }

    pub fn parse(b: &[u8]) -> Result<Self, VpnWireError> {
        use field::peer_delta as f;
        let head = head_of(b, INNER_PEERS_DELTA, f::ENTRIES)?;
        let (upserts, removed) = (u16_at(head, f::UPSERTS) as usize, u16_at(head, f::REMOVED) as usize);
        let (entries, mut at) = entries_at(b, f::ENTRIES, upserts)?;
        let ids = region(b, at, removed.checked_mul(4).ok_or(VpnWireError::BadField)?)?;
        at += ids.len();
        if at != b.len() {
            return Err(VpnWireError::BadField);
        }
        Ok(Self {
            from: u32_at(head, f::FROM),
            to: u32_at(head, f::TO),
            upserts: entries,
            removed: ids.chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]])).collect(),
        })
    }
}

/// `n` peer entries from `b[at..]`, and where they end.
fn entries_at(b: &[u8], mut at: usize, n: usize) -> Result<(Vec<PeerEntry>, usize), VpnWireError> {
    use field::peer_list as f;
    // no more entries than bytes to hold them (each takes 11 at least): a hostile count
    // cannot make us reserve much
    let mut entries = Vec::with_capacity(n.min(b.len() / 11));
    for _ in 0..n {
        let id = u32_at(region(b, at, f::NAME_LEN)?, f::ID);
        let (name, name_end) = name_at(b, at + f::NAME_LEN)?;
        let addr = ipv4_at(region(b, name_end, f::ROUTES)?, f::ADDR);
        let (routes, routes_end) = routes_at(b, name_end + f::ROUTES)?;
        let (candidates, end) = candidates_at(b, routes_end)?;
        entries.push(PeerEntry { id, name: name.to_string(), addr, routes, candidates });
        at = end;
    }
    Ok((entries, at))
}

/// The message a peer sends to take deltas from now on, having list version `have`.
pub fn emit_peers_want(have: u32) -> [u8; field::peers_want::LEN] {
    let mut b = [0u8; field::peers_want::LEN];
    b[field::TYPE] = INNER_PEERS_WANT;
    b[field::peers_want::HAVE].copy_from_slice(&have.to_be_bytes());
    b
}

pub fn parse_peers_want(b: &[u8]) -> Result<u32, VpnWireError> {
    let b = checked(b, INNER_PEERS_WANT, field::peers_want::LEN)?;
    Ok(u32_at(b, field::peers_want::HAVE))
}

/// `b`'s first `len` bytes if it is at least that long and of message type `kind`.
fn head_of(b: &[u8], kind: u8, len: usize) -> Result<&[u8], VpnWireError> {
    match b.first() {
        None => Err(VpnWireError::Truncated),
        Some(&t) if t == kind => region(b, 0, len),
        Some(_) => Err(VpnWireError::Unknown),
    }
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
    let (entries, at) = entries_at(b, f::ENTRIES, u16_at(head, f::COUNT) as usize)?;
    if at != b.len() {
        return Err(VpnWireError::BadField);
    }
    Ok(PeerListChunk { version, chunk, chunks, entries })
}
