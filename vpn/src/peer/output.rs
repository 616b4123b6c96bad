//! The one way out of the peer core: `poll_output` hands the driver the next thing to do,
//! in the order the core fixes (see `PeerOutput`).

use super::*;

/// What the peer core has for its driver next. The order is the core's: the rendezvous
/// questions and the mesh's direct datagrams first (a mesh datagram's copy for the hub's
/// relay joins the tunnel's queue as it is built), then the tunnel's datagrams, then the
/// TUN's packets, then events; `Timeout` once there is nothing more.
#[derive(Debug)]
pub enum PeerOutput<'a> {
    /// A "where am I" for the active hub's rendezvous port (`Peer::active_link`) in
    /// `buf[..len]`, to send from mesh socket `socket`.
    Rendezvous {
        socket: usize,
        len: usize,
    },
    /// A direct datagram in `buf[..len]`, to send to each of `to` (all `MeshAddr::Direct`).
    Mesh {
        len: usize,
        to: &'a [MeshAddr],
    },
    /// A datagram for hub link `link`'s tunnel in `buf[..len]`.
    Tunnel {
        link: usize,
        len: usize,
    },
    /// An IP packet for the TUN device in `buf[..len]`.
    Tun(usize),
    Event(PeerEvent),
    /// Nothing more now: call `handle_timeout` at this time (or when input arrives).
    Timeout(Option<Instant>),
}

impl Peer {
    /// The next output, built in `buf` (a tunnel datagram needs at least a tunnel payload,
    /// a mesh datagram a pair session's); nothing is allocated.
    pub fn poll_output(&mut self, now: Instant, buf: &mut [u8]) -> PeerOutput<'_> {
        if let Some((socket, len)) = self.poll_rendezvous(buf) {
            return PeerOutput::Rendezvous { socket, len };
        }
        if let Some(len) = self.poll_mesh_transmit(now, buf) {
            return PeerOutput::Mesh { len, to: &self.mesh_dests };
        }
        if let Some((link, len)) = self.poll_transmit(buf) {
            return PeerOutput::Tunnel { link, len };
        }
        if let Some(len) = self.poll_tun(buf) {
            return PeerOutput::Tun(len);
        }
        match self.poll_event() {
            Some(ev) => PeerOutput::Event(ev),
            None => PeerOutput::Timeout(self.poll_timeout()),
        }
    }

    /// Next datagram for a hub link's tunnel, into `out` (at least a tunnel payload): its
    /// link and length. It takes from the link it took from last while that has more, so
    /// the driver sends them in batches.
    fn poll_transmit(&mut self, out: &mut [u8]) -> Option<(usize, usize)> {
        self.send_intro_requests();
        let n = self.links.len();
        for l in (0..n).map(|k| (self.next_link + k) % n) {
            if let Some(len) = self.links[l].poll_transmit(out) {
                self.next_link = l;
                return Some((l, len));
            }
        }
        None
    }

    /// The mesh's introduction requests go to every hub that lists the peer.
    fn send_intro_requests(&mut self) {
        while let Some(key) = self.mesh.as_mut().and_then(Mesh::poll_intro_request) {
            for link in &mut self.links {
                let (State::Up(s), Some(&id)) = (&mut link.state, link.ids.get(&key)) else { continue };
                if s.link.send(&wire::emit_intro_request(id)).is_err() {
                    self.drops.queue_full += 1;
                }
            }
        }
    }

    /// Next IP packet for the TUN, into `out`; returns its length.
    fn poll_tun(&mut self, out: &mut [u8]) -> Option<usize> {
        if let Some(n) = self.to_tun.pop_into(out) {
            return Some(n);
        }
        let n = self.mesh.as_mut()?.poll_tun(out)?;
        self.rx_bytes += n as u64;
        Some(n)
    }

    fn poll_event(&mut self) -> Option<PeerEvent> {
        self.events.pop_front().or_else(|| self.mesh.as_mut()?.poll_event().map(PeerEvent::Mesh))
    }
}

impl HubLink {
    /// Its next datagram into `out`: what is ready (Register, heartbeats), else a relay
    /// copy or a KCP segment, sealed.
    fn poll_transmit(&mut self, out: &mut [u8]) -> Option<usize> {
        if let Some(d) = self.transmit.pop_front() {
            let n = d.len().min(out.len());
            out[..n].copy_from_slice(&d[..n]);
            return Some(n);
        }
        let room = out.len().checked_sub(SEALED_OVERHEAD)?;
        let State::Up(s) = &mut self.state else { return None };
        let body = &mut out[SEALED_HEADER_LEN..SEALED_HEADER_LEN + room];
        let n = self.relay_out.pop_into(body).or_else(|| s.link.poll_transmit(body))?;
        Some(s.channel.seal(out, n))
    }
}
