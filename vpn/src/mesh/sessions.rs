//! What arrives for the mesh: handshakes and datagrams of the pairs' sessions, sorted to
//! our client or our server of the pair they belong to, and the messages of the links.

use super::*;

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
                    Some(&(_, Side::Client)) => self.on_client_datagram(now, t.session_id(), from, d),
                    Some(&(id, Side::Server)) => self.on_server_datagram(now, id, from, d),
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
            MeshAddr::Direct { addr, socket } => {
                if !p.server_sockets.iter().any(|&(a, s)| (a, s) == (addr, socket)) {
                    p.server_sockets.retain(|&(a, _)| a != addr);
                    if p.server_sockets.len() >= MAX_PATHS {
                        p.server_sockets.pop_front();
                    }
                    p.server_sockets.push_back((addr, socket));
                }
                addr
            }
        };
        let mut out = [0u8; HANDSHAKE_RESP_LEN];
        match p.server.handle_datagram(now, addr, d, &mut out) {
            ServerRecv::Reply { len } => self.replies.push_back((from, out[..len].to_vec())),
            ServerRecv::Forward { payload, .. } => {
                Self::link_input(&mut self.drops, now, p, &d[payload]);
                self.take_messages(now, id);
            }
            ServerRecv::Dropped(why) => self.drops.count_core(why),
        }
        let Some(p) = self.pairs.get_mut(&id) else { return };
        while let Some(ev) = p.server.poll_event() {
            match ev {
                ServerEvent::SessionOpened { id: s, slot, .. } => {
                    self.sessions.insert(s, (id, Side::Server));
                    p.server_slot = Some(slot);
                }
                ServerEvent::SessionClosed { id: s, slot } => {
                    self.sessions.remove(&s);
                    if p.server_slot == Some(slot) {
                        p.server_slot = None;
                    }
                }
                _ => {}
            }
        }
    }

    pub(super) fn on_client_datagram(&mut self, now: Instant, session: SessionId, from: MeshAddr, d: &mut [u8]) {
        let Some(&(id, _)) = self.sessions.get(&session) else {
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
                Self::drain_client_events(&mut self.sessions, now, id, p);
                self.take_messages(now, id);
                return;
            }
            ClientRecv::Consumed => {}
            ClientRecv::Dropped(why) => self.drops.count_core(why),
        }
        Self::drain_client_events(&mut self.sessions, now, id, p);
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
    pub(super) fn drain_client_events(
        sessions: &mut HashMap<SessionId, (u32, Side)>,
        now: Instant,
        id: u32,
        p: &mut Pair,
    ) {
        let now_up = p.direct_up();
        let mut reopen = false;
        while let Some(ev) = p.client.poll_event() {
            match ev {
                ClientEvent::SessionStarted { id: s, .. } => {
                    if let Some(old) = p.client_session.replace(s) {
                        // started over (their side restarted or lost us): the direct
                        // paths must prove themselves again, so they get a punch window
                        sessions.remove(&old);
                        p.start_punch(now);
                    }
                    sessions.insert(s, (id, Side::Client));
                    p.established = false;
                    p.up = PathMask::EMPTY;
                }
                ClientEvent::Established { .. } => {
                    p.established = true;
                    p.in_use = true;
                }
                ClientEvent::PathUp { path, .. } => p.up.insert(path),
                ClientEvent::PathDown { path, .. } => p.up.0 &= !(1u32 << path),
                ClientEvent::ServerLost { old, .. } => {
                    sessions.remove(&old);
                    p.established = false;
                }
                ClientEvent::SessionClosed { id: s, .. } | ClientEvent::SessionEvicted { id: s, .. } => {
                    sessions.remove(&s);
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
