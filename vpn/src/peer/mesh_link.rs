//! The peer's side of the mesh: host candidates told to the hub, the rendezvous port's
//! answers, and the mesh sockets' datagrams (direct, or copies for the hub's relay).

use super::*;
use common::wire::AEAD_TAG_LEN;

impl Peer {
    /// Where our mesh sockets are reachable on this host (the driver looks when the core
    /// asks, `PeerEvent::ScanCandidates`): told to the hub now and with every registration.
    pub fn set_host_candidates(&mut self, c: Vec<SocketAddr>) {
        if c != self.rendezvous.host_candidates {
            self.rendezvous.host_candidates = c;
            for l in 0..self.links.len() {
                self.send_candidates(l);
            }
        }
    }

    /// What the hub's rendezvous port saw each mesh socket come from.
    pub fn reflexive(&self) -> &[Option<SocketAddr>] {
        &self.rendezvous.reflexive
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

    /// The next "where am I" due (one per mesh socket every `RENDEZVOUS_INTERVAL`), sealed
    /// into `out` under the active hub's registration (its rendezvous port is asked): the
    /// mesh socket to send it from and its length.
    pub(super) fn poll_rendezvous(&mut self, out: &mut [u8]) -> Option<(usize, usize)> {
        let State::Up(s) = &mut self.links[self.active].state else { return None };
        let socket = self.rendezvous.next_question()?;
        let q = wire::emit_where_am_i(socket as u8);
        let body = out.get_mut(SEALED_HEADER_LEN..SEALED_HEADER_LEN + q.len() + AEAD_TAG_LEN)?;
        body[..q.len()].copy_from_slice(&q);
        Some((socket, s.channel.seal(out, q.len())))
    }

    /// The next datagram of a direct session, in `out`: its length; the mesh sockets and
    /// addresses to send it to are in `mesh_dests`. Copies for the hubs' relay are
    /// sealed into their links' queues (`poll_transmit`): through every hub that
    /// introduced the pair (`relay: always`), else through one: the hub the other peer's
    /// relayed datagrams last came through, else the first (the active first).
    pub(super) fn poll_mesh_transmit(&mut self, now: Instant, out: &mut [u8]) -> Option<usize> {
        let mesh = self.mesh.as_mut()?;
        let every_hub = mesh.relays_through_every_hub();
        let n = self.links.len();
        loop {
            let len = mesh.poll_transmit(now, out, &mut self.mesh_all_dests)?;
            self.mesh_dests.clear();
            for &d in &self.mesh_all_dests {
                let MeshAddr::Relay(key) = d else {
                    self.mesh_dests.push(d);
                    continue;
                };
                // each hub relays to its registration of that peer
                let first = self.relay_from.get(&key).copied().filter(|&l| !every_hub && l < n);
                let order = first.into_iter().chain((0..n).map(|k| (self.active + k) % n));
                for l in order {
                    let link = &mut self.links[l];
                    if let Some(to) = link.relays_to(key) {
                        link.relay_out.push(&[&[sealed_kind::RELAY], &to.to_be_bytes(), &out[..len]]);
                        if !every_hub {
                            break;
                        }
                    }
                }
            }
            if !self.mesh_dests.is_empty() {
                return Some(len);
            }
        }
    }
}

impl Peer {
    /// A new registration, at `addr`: pairs are keyed by addresses and survive it (with
    /// this hub or another of the cluster), and its hub is asked to introduce them again
    /// (for its relay), unless our address changed: then the others' lists show us anew.
    pub(super) fn keep_pairs(&mut self, now: Instant, addr: Ipv4Addr) {
        let Some(m) = self.mesh.as_mut() else { return };
        if self.addr == addr {
            m.registered_again(now);
        } else {
            m.reset();
        }
    }

    /// Hub link `l` introduced us to a peer (its id there): the mesh's pair, and this hub
    /// relays it from now on. Another hub's introduction of a pair the active hub
    /// introduced must carry its key (the cluster's hubs agree on pair keys); one that
    /// does not is not taken. (A pair only other hubs introduced follows their key: its
    /// peer may have restarted.)
    pub(super) fn on_intro(&mut self, now: Instant, l: usize, mut intro: wire::IntroRepr) {
        let (Some(mesh), Some(&key)) = (self.mesh.as_mut(), self.links[l].keys.get(&intro.peer_id)) else {
            match self.mesh.as_mut() {
                // not (yet) in this hub's list: the mesh asks again
                Some(mesh) => mesh.drops.unknown += 1,
                None => self.drops.malformed += 1,
            }
            return;
        };
        let their_id = intro.peer_id;
        intro.peer_id = key;
        let active_introduced = self.links[self.active].introduced.contains_key(&key);
        if l != self.active && active_introduced && mesh.pair_key_is(key, &intro.key) == Some(false) {
            mesh.drops.unknown += 1;
            return;
        }
        mesh.on_intro(now, &intro);
        self.links[l].introduced.insert(key, their_id);
    }

    /// Asks every hub to introduce the pairs we have whose peers it lists (with a mesh
    /// socket) but it has not introduced: a hub that came up after the pair, or whose
    /// other peer registered with it later.
    pub(super) fn ask_missing_intros(&mut self) {
        let Some(mesh) = self.mesh.as_ref() else { return };
        for link in &mut self.links {
            let State::Up(s) = &mut link.state else { continue };
            for key in mesh.pair_ids() {
                let listed = link.list.iter().find(|p| mesh_key(p) == key).filter(|p| !p.candidates.is_empty());
                let (Some(p), false) = (listed, link.introduced.contains_key(&key)) else { continue };
                if s.link.send(&wire::emit_intro_request(p.id)).is_err() {
                    self.drops.queue_full += 1;
                }
            }
        }
    }

    pub(super) fn send_candidates(&mut self, l: usize) {
        let (State::Up(s), Some(_)) = (&mut self.links[l].state, &self.mesh) else { return };
        if s.link.send(&wire::emit_candidates(&self.rendezvous.host_candidates)).is_err() {
            self.drops.queue_full += 1;
        }
    }

    pub(super) fn on_rendezvous_answer(&mut self, d: &[u8]) {
        let State::Up(s) = &mut self.links[self.active].state else { return };
        let Ok(h) = SealedHeader::parse(d) else { return };
        let Ok(m) = s.channel.open(h, d, &mut self.buf) else {
            self.drops.unauthenticated += 1;
            return;
        };
        let n = m.len();
        match wire::parse_you_are(&self.buf[SEALED_HEADER_LEN..SEALED_HEADER_LEN + n]) {
            Ok((socket, addr)) => {
                if let Some(r) = self.rendezvous.reflexive.get_mut(usize::from(socket)) {
                    *r = Some(addr);
                }
            }
            Err(_) => self.drops.malformed += 1,
        }
    }

    /// The mesh's own timers: the rendezvous questions, the scan for host candidates, and
    /// the warning when the rendezvous port stays silent.
    pub(super) fn rendezvous_timers(&mut self, now: Instant) {
        if self.mesh.is_none() {
            return;
        }
        let up = self.is_up();
        let r = &mut self.rendezvous;
        if now >= r.next_scan {
            r.next_scan = now + CANDIDATE_SCAN_INTERVAL;
            self.events.push_back(PeerEvent::ScanCandidates);
        }
        if up && now >= r.next_question {
            r.next_question = now + RENDEZVOUS_INTERVAL;
            r.questions_due = r.reflexive.len();
        }
        if r.reflexive.iter().any(Option::is_some) {
            r.silent_since = None;
        } else if r.silent_since.is_some_and(|t| now >= t + RENDEZVOUS_SILENT_AFTER) {
            r.silent_since = None;
            self.events.push_back(PeerEvent::RendezvousSilent);
        }
    }
}

/// The peer's side of the rendezvous port: where our mesh sockets are (host candidates,
/// and what the hub saw), and when we next ask or look.
pub(super) struct Rendezvous {
    pub(super) host_candidates: Vec<SocketAddr>,
    /// What the rendezvous port last saw each mesh socket come from.
    reflexive: Vec<Option<SocketAddr>>,
    next_question: Instant,
    /// Mesh sockets still to ask from this round.
    questions_due: usize,
    next_scan: Instant,
    /// When this registration came up, until the rendezvous port answered (or we said
    /// it did not).
    silent_since: Option<Instant>,
}

impl Rendezvous {
    pub(super) fn new(now: Instant, sockets: usize) -> Self {
        Self {
            host_candidates: Vec::new(),
            reflexive: vec![None; sockets],
            next_question: now,
            questions_due: 0,
            next_scan: now,
            silent_since: None,
        }
    }

    /// A new registration: ask at once, and expect an answer within
    /// `RENDEZVOUS_SILENT_AFTER`. What the last hub saw does not speak for this one (it
    /// may be another, behind another NAT mapping).
    pub(super) fn registered(&mut self, now: Instant) {
        self.reflexive.iter_mut().for_each(|r| *r = None);
        self.next_question = now + RENDEZVOUS_INTERVAL;
        self.questions_due = self.reflexive.len();
        self.silent_since = Some(now);
    }

    /// The mesh socket to ask from next, if a question is due.
    fn next_question(&mut self) -> Option<usize> {
        let left = self.questions_due.checked_sub(1)?;
        self.questions_due = left;
        Some(self.reflexive.len() - 1 - left)
    }

    /// When a timer of the rendezvous is next due (`up`: registered).
    pub(super) fn poll_timeout(&self, up: bool) -> Option<Instant> {
        let question = up.then_some(self.next_question);
        let silent = self.silent_since.map(|t| t + RENDEZVOUS_SILENT_AFTER);
        [Some(self.next_scan), question, silent].into_iter().flatten().min()
    }
}
