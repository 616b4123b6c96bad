//! The peer's side of the mesh: host candidates told to the hub, the rendezvous port's
//! answers, and the mesh sockets' datagrams (direct, or copies for the hub's relay).

use super::*;

impl Peer {
    /// Where our mesh sockets are reachable on this host: told to the hub now and with
    /// every registration.
    pub fn set_host_candidates(&mut self, c: Vec<SocketAddr>) {
        if c != self.host_candidates {
            self.host_candidates = c;
            self.send_candidates();
        }
    }

    /// What the hub's rendezvous port saw each mesh socket come from.
    pub fn reflexive(&self) -> &[Option<SocketAddr>] {
        &self.reflexive
    }

    /// One datagram on mesh socket `socket` from `from` (opened in place): the hub's
    /// rendezvous answer, or a direct session's.
    pub fn handle_mesh_datagram(&mut self, now: Instant, socket: usize, from: SocketAddr, d: &mut [u8]) {
        if d.first() == Some(&MSG_SEALED) {
            self.on_rendezvous_answer(d);
            return;
        }
        match self.mesh.as_mut() {
            Some(m) => m.handle_datagram(now, MeshAddr::Direct { socket, addr: from }, d),
            None => self.drops.malformed += 1,
        }
    }

    /// The "where am I" questions due, one per mesh socket every `RENDEZVOUS_INTERVAL`:
    /// (socket, datagram for the hub's rendezvous port).
    pub fn poll_rendezvous(&mut self, now: Instant) -> Vec<(usize, Vec<u8>)> {
        let State::Up(s) = &mut self.state else { return Vec::new() };
        if self.mesh.is_none() || now < self.next_rendezvous {
            return Vec::new();
        }
        self.next_rendezvous = now + RENDEZVOUS_INTERVAL;
        (0..self.reflexive.len()).map(|i| (i, s.channel.seal_message(&wire::emit_where_am_i(i as u8)))).collect()
    }

    /// The next datagram of a direct session, in `out` (at least 64 KiB): its length and
    /// the mesh sockets and addresses to send it to. Copies for the hub's relay are
    /// sealed into the tunnel's queue (`poll_transmit`).
    pub fn poll_mesh_transmit(&mut self, now: Instant, out: &mut [u8]) -> Option<(usize, &[MeshAddr])> {
        let mesh = self.mesh.as_mut()?;
        let up = matches!(self.state, State::Up(_));
        loop {
            let len = mesh.poll_transmit(now, out, &mut self.mesh_all_dests)?;
            self.mesh_dests.clear();
            for &d in &self.mesh_all_dests {
                match d {
                    // without the hub, nothing to relay through
                    MeshAddr::Relay(to) if up => {
                        self.relay_out.push(&[&[sealed_kind::RELAY], &to.to_be_bytes(), &out[..len]])
                    }
                    MeshAddr::Relay(_) => {}
                    direct => self.mesh_dests.push(direct),
                }
            }
            if !self.mesh_dests.is_empty() {
                return Some((len, &self.mesh_dests));
            }
        }
    }
}

impl Peer {
    pub(super) fn send_candidates(&mut self) {
        let (State::Up(s), Some(_)) = (&mut self.state, &self.mesh) else { return };
        if s.link.send(&wire::emit_candidates(&self.host_candidates)).is_err() {
            self.drops.queue_full += 1;
        }
    }

    pub(super) fn on_rendezvous_answer(&mut self, d: &[u8]) {
        let State::Up(s) = &mut self.state else { return };
        let Ok(h) = SealedHeader::parse(d) else { return };
        let Ok(m) = s.channel.open(h, d, &mut self.buf) else {
            self.drops.unauthenticated += 1;
            return;
        };
        let n = m.len();
        match wire::parse_you_are(&self.buf[SEALED_HEADER_LEN..SEALED_HEADER_LEN + n]) {
            Ok((socket, addr)) => {
                if let Some(r) = self.reflexive.get_mut(usize::from(socket)) {
                    *r = Some(addr);
                }
            }
            Err(_) => self.drops.malformed += 1,
        }
    }
}
