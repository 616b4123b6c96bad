//! What arrives for the mesh: handshakes and datagrams of the pairs' sessions, sorted to
//! our client or our server of the pair they belong to, and the messages of the links.

use super::*;

/// Every live session of every pair, both sides, by id. Ids travel in clear and a pair's
/// client picks its own, so an id belongs to the pair that took it first: another pair's
/// session under a taken id is refused (it gets no datagrams, it moves nobody else's),
/// and a pair lets go only of its own.
#[derive(Default)]
pub(super) struct SessionMap(HashMap<SessionId, (u32, Side)>);

impl SessionMap {
    pub(super) fn get(&self, s: &SessionId) -> Option<(u32, Side)> {
        self.0.get(s).copied()
    }

    /// Takes `s` for pair `id`; false (nothing changes) if another pair holds it.
    pub(super) fn bind(&mut self, s: SessionId, id: u32, side: Side) -> bool {
        match self.0.get(&s) {
            Some(&(holder, _)) if holder != id => false,
            _ => {
                self.0.insert(s, (id, side));
                true
            }
        }
    }

    /// Lets go of `s` if pair `id` holds it.
    pub(super) fn unbind(&mut self, s: &SessionId, id: u32) {
        if self.0.get(s).is_some_and(|&(holder, _)| holder == id) {
            self.0.remove(s);
        }
    }

    /// Lets go of every session of pair `id`.
    pub(super) fn unbind_pair(&mut self, id: u32) {
        self.0.retain(|_, (p, _)| *p != id);
    }

    pub(super) fn clear(&mut self) {
        self.0.clear();
    }
}

impl Mesh {
    /// One datagram of the mesh (from a mesh socket, or relayed by the hub), opened in
    /// place in `d`.
    pub fn handle_datagram(&mut self, now: Instant, from: MeshAddr, d: &mut [u8]) {
        match message_type(d) {
            Ok(TYPE_HANDSHAKE_INIT) => self.on_init(now, from, d),
            Ok(TYPE_HANDSHAKE_RESP) => match HandshakeRespRepr::parse(d) {
                Ok(r) => self.on_client_datagram(now, r.session, from, d),
                Err(_) => self.drops.malformed += 1,
            },
            Ok(TYPE_TRANSPORT) => {
                let Ok(t) = TransportPacket::new_checked(&d[..]) else {
                    self.drops.malformed += 1;
                    return;
                };
                match self.sessions.get(&t.session_id()) {
                    Some((_, Side::Client)) => self.on_client_datagram(now, t.session_id(), from, d),
                    Some((id, Side::Server)) => self.on_server_datagram(now, id, from, d),
                    None => self.drops.unknown += 1,
                }
            }
            _ => self.drops.malformed += 1,
        }
    }
}

impl Mesh {
    /// An init of their client: its target field is the sender's name, which picks the
    /// pair (and so the key its MAC must verify under).
    pub(super) fn on_init(&mut self, now: Instant, from: MeshAddr, d: &mut [u8]) {
        let Ok((init, _)) = HandshakeInitRepr::parse(d) else {
            self.drops.malformed += 1;
            return;
        };
        let Some((&id, _)) = self.pairs.iter().find(|(_, p)| p.name == init.target) else {
            self.drops.unknown += 1;
            return;
        };
        self.on_server_datagram(now, id, from, d);
    }

    pub(super) fn on_server_datagram(&mut self, now: Instant, id: u32, from: MeshAddr, d: &mut [u8]) {
        let Some(p) = self.pairs.get_mut(&id) else { return };
        let addr = match from {
            MeshAddr::Relay(r) if r == id => relay_addr(r),
            MeshAddr::Relay(_) => {
                self.drops.unauthenticated += 1;
                return;
            }
            MeshAddr::Direct { addr, .. } => addr,
        };
        let mut out = [0u8; HANDSHAKE_RESP_LEN];
        let authentic = match p.server.handle_datagram(now, addr, d, &mut out) {
            ServerRecv::Reply { len } => {
                self.replies.push_back((from, out[..len].to_vec()));
                true
            }
            ServerRecv::Forward { payload, .. } => {
                Self::link_input(&mut self.drops, now, p, &d[payload]);
                Self::take_recovered(&mut self.drops, &mut self.inner_buf, now, p, Side::Server);
                self.take_messages(now, id);
                true
            }
            // parity or a receipt (a coded or adaptive pair): what parity rebuilt goes on
            ServerRecv::Consumed => {
                Self::take_recovered(&mut self.drops, &mut self.inner_buf, now, p, Side::Server);
                self.take_messages(now, id);
                true
            }
            ServerRecv::Dropped(why) => {
                self.drops.count_core(why);
                false
            }
        };
        let Some(p) = self.pairs.get_mut(&id) else { return };
        // which socket answers an address: learned only from what opened (junk from a
        // forged source must not push the real entry out)
        if let (true, MeshAddr::Direct { addr, socket }) = (authentic, from) {
            p.note_server_socket(addr, socket);
        }
        while let Some(ev) = p.server.poll_event() {
            match ev {
                ServerEvent::SessionOpened { id: s, slot, .. } => {
                    if self.sessions.bind(s, id, Side::Server) {
                        p.server_slot = Some(slot);
                    } else {
                        self.drops.refused += 1; // another pair's session id
                    }
                }
                ServerEvent::SessionClosed { id: s, slot } => {
                    self.sessions.unbind(&s, id);
                    if p.server_slot == Some(slot) {
                        p.server_slot = None;
                    }
                }
                _ => {}
            }
        }
    }

    pub(super) fn on_client_datagram(&mut self, now: Instant, session: SessionId, from: MeshAddr, d: &mut [u8]) {
        let Some((id, _)) = self.sessions.get(&session) else {
            self.drops.unknown += 1;
            return;
        };
        let Some(p) = self.pairs.get_mut(&id) else { return };
        let path = match from {
            MeshAddr::Relay(r) if r != id => None,
            _ => p.path_of(from),
        };
        let Some(path) = path else {
            self.drops.unauthenticated += 1;
            return;
        };
        match p.client.handle_path_datagram(now, path, d) {
            // their data, sent back on our client's session (see `server_direct`)
            ClientRecv::Deliver { payload, .. } => {
                Self::link_input(&mut self.drops, now, p, &d[payload]);
                Self::take_recovered(&mut self.drops, &mut self.inner_buf, now, p, Side::Client);
                Self::drain_client_events(&mut self.sessions, now, id, p);
                self.take_messages(now, id);
                return;
            }
            ClientRecv::Consumed => Self::take_recovered(&mut self.drops, &mut self.inner_buf, now, p, Side::Client),
            ClientRecv::Dropped(why) => self.drops.count_core(why),
        }
        Self::drain_client_events(&mut self.sessions, now, id, p);
        self.take_messages(now, id);
    }

    /// What parity rebuilt in the pair's `side` (a coded or adaptive session) goes to the
    /// link as if it had arrived, at once.
    fn take_recovered(drops: &mut MeshDrops, buf: &mut [u8], now: Instant, p: &mut Pair, side: Side) {
        loop {
            let n = match side {
                Side::Server => p.server.poll_recovered(buf).map(|(_, n)| n),
                Side::Client => p.client.poll_recovered(now, buf).map(|(_, n)| n),
            };
            let Some(n) = n else { return };
            Self::link_input(drops, now, p, &buf[..n]);
        }
    }

    /// A datagram of their client's data: a KCP segment for the pair's link.
    pub(super) fn link_input(drops: &mut MeshDrops, now: Instant, p: &mut Pair, datagram: &[u8]) {
        match datagram.split_first() {
            // the empty datagram that opens a session or keeps it
            None => {}
            Some((&crate::wire::sealed_kind::KCP, seg)) => {
                if p.link.input(now, seg).is_err() {
                    drops.malformed += 1;
                }
            }
            _ => drops.malformed += 1,
        }
    }

    /// Follows our client's events: its session ids, whether it is established, which
    /// paths are up; the loss of the last direct path starts a punch.
    pub(super) fn drain_client_events(sessions: &mut SessionMap, now: Instant, id: u32, p: &mut Pair) {
        let now_up = p.direct_up();
        let mut reopen = false;
        while let Some(ev) = p.client.poll_event() {
            match ev {
                ClientEvent::SessionStarted { id: s, .. } => {
                    if let Some(old) = p.client_session.replace(s) {
                        // started over (their side restarted or lost us): the direct
                        // paths must prove themselves again, so they get a punch window
                        sessions.unbind(&old, id);
                        p.start_punch(now);
                    }
                    // our own random id: taken by another pair only by chance (then
                    // this one's datagrams are dropped until it starts over)
                    sessions.bind(s, id, Side::Client);
                    p.established = false;
                    p.up = PathMask::EMPTY;
                }
                ClientEvent::Established { .. } => {
                    p.established = true;
                    p.in_use = true;
                }
                // the session took the id of its plain handshake (a pair's client asks for
                // no redundancy, so this is for completeness)
                ClientEvent::RedundancyUnsupported { id: s, .. } => {
                    if let Some(old) = p.client_session.replace(s) {
                        sessions.unbind(&old, id);
                    }
                    sessions.bind(s, id, Side::Client);
                }
                ClientEvent::PathUp { path, .. } => p.up.insert(path),
                ClientEvent::PathDown { path, .. } => p.up.0 &= !(1u32 << path),
                ClientEvent::ServerLost { old, .. } => {
                    sessions.unbind(&old, id);
                    p.established = false;
                }
                ClientEvent::SessionClosed { id: s, .. } | ClientEvent::SessionEvicted { id: s, .. } => {
                    sessions.unbind(&s, id);
                    p.client_session = None;
                    p.established = false;
                    reopen = true;
                }
                ClientEvent::Refused { .. } => {}
            }
        }
        if reopen {
            p.open_session(now);
            p.start_punch(now);
        }
        if now_up && !p.direct_up() {
            // every direct path went down (an expired NAT mapping, a new address): punch
            // again now rather than in a minute
            p.start_punch(now);
        }
        p.refresh_paused(now);
    }

    /// Takes the complete messages of pair `id`'s link.
    pub(super) fn take_messages(&mut self, now: Instant, id: u32) {
        if let Some(p) = self.pairs.get_mut(&id) {
            Self::take_messages_of(p, now, &mut self.inner_buf, &mut self.to_tun, &mut self.drops, self.own.as_ref());
        }
    }

    /// Takes pair `p`'s complete messages (through `inner_buf`): IP packets from its
    /// peer's addresses to ours (`own`; none before the first peer list) go to `to_tun`.
    pub(super) fn take_messages_of(
        p: &mut Pair,
        now: Instant,
        inner_buf: &mut [u8],
        to_tun: &mut PacketQueue,
        drops: &mut MeshDrops,
        own: Option<&OwnAddresses>,
    ) {
        while let Some(n) = p.link.recv(now, inner_buf) {
            match (wire::parse_inner(&inner_buf[..n]), own) {
                (Ok(InnerMessage::Ip { src, .. }), Some(own)) if !p.source_allowed(src, own.network) => {
                    drops.spoofed_source += 1
                }
                (Ok(InnerMessage::Ip { packet, dst, .. }), Some(own)) if own.takes(dst) => {
                    p.rx_bytes += packet.len() as u64;
                    p.last_rx = Some(now);
                    to_tun.push(&[packet]);
                }
                (Ok(InnerMessage::Ip { .. }), _) => drops.no_route += 1,
                // a pair carries IP packets only
                (Ok(_) | Err(_), _) => drops.malformed += 1,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Before, one map took any pair's session under any id: peer C opening its session
    /// with us under the id of B's (ids travel in clear) took B's datagrams to C's pair,
    /// and C closing it removed B's entry. Now an id belongs to the pair that took it.
    #[test]
    fn a_pair_cannot_take_or_drop_another_pairs_session_id() {
        let (b, c) = (1u32, 2u32);
        let s = SessionId(0x5e55);
        let mut map = SessionMap::default();
        assert!(map.bind(s, b, Side::Server));
        assert!(!map.bind(s, c, Side::Server), "C took B's id");
        assert_eq!(map.get(&s), Some((b, Side::Server)));
        map.unbind(&s, c);
        assert_eq!(map.get(&s), Some((b, Side::Server)), "C closing its session dropped B's");
        assert!(map.bind(s, b, Side::Server), "B's own id again");
        map.unbind(&s, b);
        assert_eq!(map.get(&s), None);
    }
}
