//! The mesh broker: relayed datagrams between peers, the rendezvous port, pair keys and
//! introductions, host candidates.

use super::*;

impl HubPeer {
    /// Its candidates as the list carries them: server-reflexive first (what works
    /// across NATs), then host addresses.
    pub(super) fn candidates(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = self.reflexive.values().copied().collect();
        let seen: Vec<IpAddr> = out.iter().map(SocketAddr::ip).collect();
        for c in &self.host_candidates {
            if !out.contains(c) && crate::mesh::listable_host_candidate(*c, &seen) {
                out.push(*c);
            }
        }
        out.truncate(MAX_CANDIDATES);
        out
    }
}

/// A pair the hub introduced: when, and the relay's budget for it.
pub(super) struct IntroducedPair {
    pub(super) at: Instant,
    /// The second the relay is counting, and the bytes it carried for the pair in it.
    window: Instant,
    bytes: u64,
}

impl IntroducedPair {
    fn new(now: Instant) -> Self {
        Self { at: now, window: now, bytes: 0 }
    }

    /// Whether `len` more bytes fit this second's budget (counted if so).
    fn spend(&mut self, now: Instant, len: usize, budget: u64) -> bool {
        if now >= self.window + Duration::from_secs(1) {
            (self.window, self.bytes) = (now, 0);
        }
        let fits = self.bytes + len as u64 <= budget;
        if fits {
            self.bytes += len as u64;
        }
        fits
    }
}

impl Hub {
    /// A datagram of a direct session from peer `from` for the other peer of a pair the
    /// hub introduced: passed on sealed under that peer's channel, with who sent it, within
    /// the pair's budget per second (the relay is no way around an introduction, nor
    /// around KCP's flow control).
    pub(super) fn relay(&mut self, now: Instant, from: u32, m: &[u8]) {
        if m.len() <= field::relay::DATAGRAM {
            self.drops.malformed += 1;
            return;
        }
        let to = common::wire::be::u32_at(m, field::relay::PEER_ID);
        let datagram = &m[field::relay::DATAGRAM..];
        let budget = self.cfg.relay_bytes_per_pair;
        match self.introduced.get_mut(&(from.min(to), from.max(to))).map(|p| p.spend(now, datagram.len(), budget)) {
            Some(true) => {}
            Some(false) => {
                self.drops.relay_over_budget += 1;
                return;
            }
            None => {
                self.drops.relay_refused += 1;
                return;
            }
        }
        match self.peers.get_mut(&to) {
            Some(q) if to != from && q.tunnel != UNBOUND && q.relay_out.len() < RELAY_QUEUE_MAX => {
                q.relay_out.push(&[&[sealed_kind::RELAY], &from.to_be_bytes(), datagram]);
                self.ready.push(to);
                if let Some(p) = self.peers.get_mut(&from) {
                    p.relayed_bytes += datagram.len() as u64;
                }
            }
            _ => self.drops.relay_refused += 1,
        }
    }

    /// A "where am I" on the rendezvous port from `from`: if it opens under a registered
    /// peer's channel, `from` is that mesh socket's reflexive candidate (a change is
    /// pushed to everyone) and `out` gets the answer, sealed. Returns its length.
    pub fn handle_rendezvous(&mut self, now: Instant, from: SocketAddr, d: &[u8], out: &mut [u8]) -> Option<usize> {
        let h = SealedHeader::parse(d).ok()?;
        let p = self.peers.get_mut(&h.peer_id)?;
        let n = p.channel.open(h, d, &mut self.buf).ok()?.len();
        let socket = wire::parse_where_am_i(&self.buf[SEALED_HEADER_LEN..SEALED_HEADER_LEN + n]).ok()?;
        if usize::from(socket) >= MAX_MESH_SOCKETS {
            return None;
        }
        let moved = p.reflexive.insert(socket, from) != Some(from);
        let answer = wire::emit_you_are(socket, from);
        if moved && p.mesh && p.changes.take(now) {
            self.push_peer_list(now);
        }
        // never more than the question: the rendezvous port amplifies nothing
        if SEALED_OVERHEAD + answer.len() > d.len() {
            return None;
        }
        let body = out.get_mut(SEALED_HEADER_LEN..SEALED_OVERHEAD + answer.len())?;
        body[..answer.len()].copy_from_slice(&answer);
        let p = self.peers.get_mut(&h.peer_id)?;
        Some(p.channel.seal(out, answer.len()))
    }

    /// The key of the pair of registrations `a` and `b`. Peers that tell their process's
    /// instance get a key of their two processes (names and instances): the same from
    /// every hub of a cluster (whose pair secret comes from the cluster key) and across
    /// their new registrations, so a pair is introduced again without being disturbed.
    /// Peers that do not get one per pair of registrations (ids and names), as before.
    pub(super) fn pair_key(&self, a: u32, b: u32) -> Option<[u8; wire::PAIR_KEY_LEN]> {
        let (x, y) = (self.peers.get(&a)?, self.peers.get(&b)?);
        let processes = x.instance != 0 && y.instance != 0 && a != b;
        let lower_first = if processes { x.name < y.name } else { a < b };
        let (lo, hi) = if lower_first { (x, y) } else { (y, x) };
        let (lo_id, hi_id) = (lo.id.to_be_bytes(), hi.id.to_be_bytes());
        let (lo_instance, hi_instance) = (lo.instance.to_be_bytes(), hi.instance.to_be_bytes());
        let (lo_name, hi_name) = (lo.name.as_bytes(), hi.name.as_bytes());
        let parts: [&[u8]; 6] = if processes {
            [b"mpvpn v2 pair key", lo_name, &[0], hi_name, &lo_instance, &hi_instance]
        } else {
            [b"mpvpn v1 pair key", &lo_id, &hi_id, lo_name, &[0], hi_name]
        };
        let mut ctx = hmac::Context::with_key(&self.pair_secret);
        for part in parts {
            ctx.update(part);
        }
        let mut key = [0u8; wire::PAIR_KEY_LEN];
        key.copy_from_slice(&ctx.sign().as_ref()[..wire::PAIR_KEY_LEN]);
        Some(key)
    }

    /// Peer `id` asks to be introduced to `to`: both get the pair's key, each sealed
    /// under its own channel (over its link), at most every `INTRO_INTERVAL` per pair.
    pub(super) fn introduce(&mut self, now: Instant, id: u32, to: u32) {
        let pair = (id.min(to), id.max(to));
        let ok = id != to && [id, to].iter().all(|i| self.peers.get(i).is_some_and(|p| p.mesh));
        if !ok || self.introduced.get(&pair).is_some_and(|p| now < p.at + INTRO_INTERVAL) {
            return;
        }
        // these two registrations were introduced before: only the one asking lost the
        // key; the other keeps its pair undisturbed
        let again = self.introduced.contains_key(&pair);
        // the relay's budget of the pair goes on
        self.introduced.entry(pair).and_modify(|p| p.at = now).or_insert_with(|| IntroducedPair::new(now));
        let Some(key) = self.pair_key(id, to) else { return };
        let told: &[(u32, u32)] = if again { &[(id, to)] } else { &[(id, to), (to, id)] };
        for &(a, b) in told {
            let intro = IntroRepr { peer_id: b, key }.emit();
            if let Some(p) = self.peers.get_mut(&a) {
                self.ready.push(a);
                if p.link.send(&intro).is_err() {
                    self.drops.queue_full += 1;
                }
            }
        }
    }

    /// Peer `id` has a mesh socket, reachable at these host addresses (only addresses a
    /// host can have are kept).
    pub(super) fn set_host_candidates(&mut self, now: Instant, id: u32, mut c: Vec<SocketAddr>) {
        c.retain(|&a| crate::mesh::is_host_candidate(a, Some(self.cfg.network)));
        let Some(p) = self.peers.get_mut(&id) else { return };
        if !p.mesh || p.host_candidates != c {
            p.mesh = true;
            p.host_candidates = c;
            if p.changes.take(now) {
                self.push_peer_list(now);
            }
        }
    }
}

/// A peer's own changes that reach the peer list (which goes to every peer): a burst of
/// `CANDIDATE_CHANGE_BURST`, then one per `CANDIDATE_CHANGE_INTERVAL`; what changes in
/// between is kept and goes out with the next. One peer flapping its candidates cannot
/// make the hub push the whole list to everyone every push interval.
pub(super) struct ChangeBudget {
    tokens: u32,
    last_refill: Instant,
    /// A change is kept that has not gone out.
    waiting: bool,
}

impl ChangeBudget {
    pub(super) fn new(now: Instant) -> Self {
        Self { tokens: CANDIDATE_CHANGE_BURST, last_refill: now, waiting: false }
    }

    fn refill(&mut self, now: Instant) {
        let periods = (now.saturating_duration_since(self.last_refill).as_millis()
            / CANDIDATE_CHANGE_INTERVAL.as_millis()) as u32;
        if periods > 0 {
            self.tokens = (self.tokens + periods).min(CANDIDATE_CHANGE_BURST);
            self.last_refill += CANDIDATE_CHANGE_INTERVAL * periods;
        }
    }

    /// A change: true if it may go out now (else it waits for `due`).
    pub(super) fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.waiting = self.tokens == 0;
        if self.waiting {
            return false;
        }
        self.tokens -= 1;
        true
    }

    /// A kept change may go out now.
    pub(super) fn due(&mut self, now: Instant) -> bool {
        self.waiting && now >= self.last_refill + CANDIDATE_CHANGE_INTERVAL && self.take(now)
    }

    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        self.waiting.then(|| self.last_refill + CANDIDATE_CHANGE_INTERVAL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::raw::{hub_with_one_peer, register, register_instance, test_hub};

    /// The relay passes datagrams only between two registered peers, and the rendezvous
    /// port answers only a registered peer, never with more than it was sent.
    /// A pair's key is one for both of its peers, another for every other pair, and
    /// another once either registers again; introductions go to both, and only between
    /// peers with a mesh socket.
    #[test]
    pub(super) fn pair_keys_are_per_pair_and_per_registration() {
        let (t0, wall) = (common::sim::epoch(), common::sim::SIM_WALL_START_MS);
        let mut hub = test_hub();
        let (fa, fb) = (SocketAddr::from(([127, 0, 0, 1], 40000)), SocketAddr::from(([127, 0, 0, 1], 40001)));
        register(&mut hub, "a", fa, 1, t0, wall);
        register(&mut hub, "b", fb, 1, t0, wall);
        let id = |hub: &Hub, n: &str| hub.status(t0).iter().find(|p| p.name == n).map(|p| p.id).expect("registered");
        let (a, b) = (id(&hub, "a"), id(&hub, "b"));
        let k = hub.pair_key(a, b).expect("both registered");
        assert_eq!(hub.pair_key(b, a), Some(k));
        assert_ne!(hub.pair_key(a, a), Some(k));
        // no mesh socket told yet: no introduction
        let mut out = vec![0u8; common::wire::MAX_DATAGRAM];
        hub.introduce(t0, a, b);
        assert!(hub.poll_transmit(&mut out).is_none());
        for p in [a, b] {
            hub.set_host_candidates(t0, p, vec!["198.51.100.9:5100".parse().expect("literal")]);
        }
        hub.introduce(t0, a, b);
        let mut to = Vec::new();
        while let Some((addr, _)) = hub.poll_transmit(&mut out) {
            to.push(addr);
        }
        assert!(to.contains(&fa) && to.contains(&fb), "both introduced: {to:?}");
        // a registers again: a new id, a new key
        register(&mut hub, "a", fa, 2, t0, wall + 1);
        let a2 = id(&hub, "a");
        assert_ne!(a2, a);
        assert!(hub.pair_key(a, b).is_none(), "the old registration is gone");
        assert_ne!(hub.pair_key(a2, b), Some(k));
    }

    /// Peers that tell their instance: one key per pair of processes, the same from every
    /// hub of a cluster and across new registrations; a restarted process gets another.
    #[test]
    fn pair_keys_of_processes_are_the_same_on_every_hub_of_a_cluster() {
        let (t0, wall) = (common::sim::epoch(), common::sim::SIM_WALL_START_MS);
        let (fa, fb) = (SocketAddr::from(([127, 0, 0, 1], 40000)), SocketAddr::from(([127, 0, 0, 1], 40001)));
        let cluster_key = [5u8; 32];
        let mut hubs: Vec<Hub> = (0..3)
            .map(|seed| {
                let mut cfg = crate::sim::hub_config(&["a", "b"]);
                cfg.peers.iter_mut().for_each(|p| p.allowed_routes = vec!["192.168.0.0/16".parse().unwrap()]);
                Hub::new(cfg, Box::new(common::sim::SimEntropy::new(seed)))
            })
            .collect();
        for (i, h) in hubs.iter_mut().enumerate().take(2) {
            h.join_cluster(t0, wall, &format!("h{i}"), &cluster_key);
        }
        let id = |hub: &Hub, n: &str| hub.status(t0).iter().find(|p| p.name == n).map(|p| p.id).expect("registered");
        let mut keys = Vec::new();
        for h in hubs.iter_mut() {
            register_instance(h, "a", fa, 1, 11, t0, wall);
            register_instance(h, "b", fb, 1, 22, t0, wall);
            let (a, b) = (id(h, "a"), id(h, "b"));
            keys.push(h.pair_key(a, b).expect("both registered"));
            assert_eq!(h.pair_key(b, a), h.pair_key(a, b));
        }
        assert_eq!(keys[0], keys[1], "two hubs of one cluster");
        assert_ne!(keys[0], keys[2], "a hub outside the cluster has its own secret");
        // a new registration of the same process: the same key
        register_instance(&mut hubs[0], "a", fa, 2, 11, t0, wall + 1);
        assert_eq!(hubs[0].pair_key(id(&hubs[0], "a"), id(&hubs[0], "b")), Some(keys[0]));
        // a restarted process: another
        register_instance(&mut hubs[0], "a", fa, 3, 12, t0, wall + 2);
        assert_ne!(hubs[0].pair_key(id(&hubs[0], "a"), id(&hubs[0], "b")), Some(keys[0]));
    }

    #[test]
    pub(super) fn relay_and_rendezvous_serve_only_registered_peers() {
        let (mut hub, mut channel, from, t0, wall) = hub_with_one_peer("a");
        let own = hub.status(t0)[0].id;
        let mut out = vec![0u8; common::wire::MAX_DATAGRAM];
        let relay_to = |to: u32| {
            let mut m = vec![sealed_kind::RELAY];
            m.extend_from_slice(&to.to_be_bytes());
            m.extend_from_slice(&[0x13; 60]);
            m
        };
        for to in [own + 1000, own] {
            hub.handle_datagram(t0, wall, from, &channel.seal_message(&relay_to(to)));
            assert!(hub.poll_transmit(&mut out).is_none(), "relayed to {to}");
        }
        assert_eq!(hub.drops.relay_refused, 2);
        assert_eq!(hub.status(t0)[0].relayed_bytes, 0);

        let mut answer = vec![0u8; common::wire::MAX_DATAGRAM];
        let mesh_socket = SocketAddr::from(([192, 0, 2, 1], 5100));
        let q = channel.seal_message(&wire::emit_where_am_i(0));
        let n = hub.handle_rendezvous(t0, mesh_socket, &q, &mut answer).expect("an answer");
        assert!(n <= q.len());
        // garbage, a replay and a question sealed under nobody's channel get nothing
        assert!(hub.handle_rendezvous(t0, mesh_socket, &[0x27; 60], &mut answer).is_none());
        assert!(hub.handle_rendezvous(t0, mesh_socket, &q, &mut answer).is_none());
        let (_, mut other, ..) = hub_with_one_peer("b");
        let foreign = other.seal_message(&wire::emit_where_am_i(0));
        assert!(hub.handle_rendezvous(t0, mesh_socket, &foreign, &mut answer).is_none());
        // a peer that told no host candidates has no mesh: it lists no candidates
        assert!(hub.entries()[0].candidates.is_empty());
        let mut c = vec![wire::INNER_CANDIDATES, 3];
        wire::put_addr(&mut c, "127.0.0.1:5100".parse().expect("literal"));
        wire::put_addr(&mut c, "198.51.100.9:5100".parse().expect("literal"));
        wire::put_addr(&mut c, "192.168.5.9:5100".parse().expect("literal"));
        hub.set_host_candidates(t0, own, wire::parse_candidates(&c).expect("parses"));
        // the reflexive one first; loopback is no candidate, nor a public address that is
        // not the peer's own
        let want: Vec<SocketAddr> = vec![mesh_socket, "192.168.5.9:5100".parse().expect("literal")];
        assert_eq!(hub.entries()[0].candidates, want);
    }
}

#[cfg(test)]
mod change_budget_tests {
    use super::*;
    use crate::sim::raw::hub_with_one_peer;

    /// Before, a peer alternating two candidate sets made the hub push the whole peer
    /// list to everyone at every push interval (10 a second). Now a burst, then one per
    /// `CANDIDATE_CHANGE_INTERVAL`, and the last set still goes out.
    #[test]
    fn a_flapping_peer_moves_the_peer_list_only_within_its_budget() {
        let (mut hub, _channel, _from, t0, _wall) = hub_with_one_peer("a");
        let id = hub.status(t0)[0].id;
        let sets: [Vec<SocketAddr>; 2] =
            [vec!["192.168.1.2:5100".parse().expect("literal")], vec!["192.168.1.3:5100".parse().expect("literal")]];
        let before = hub.list.version;
        let mut now = t0;
        for i in 0..100 {
            hub.set_host_candidates(now, id, sets[i % 2].clone());
            now += Duration::from_millis(100);
            hub.handle_timeout(now);
        }
        now += CANDIDATE_CHANGE_INTERVAL;
        hub.handle_timeout(now);
        let pushes = hub.list.version - before;
        let most = CANDIDATE_CHANGE_BURST + (10 * 1000 / CANDIDATE_CHANGE_INTERVAL.as_millis() as u32) + 1;
        assert!(pushes <= most, "{pushes} list versions in 10 s");
        assert_eq!(hub.peers[&id].host_candidates, sets[1], "the last set is the one listed");
    }
}

#[cfg(test)]
mod relay_tests {
    use super::*;
    use crate::sim::raw::{next_datagram, register, test_hub};

    /// Before, the hub relayed between any two registered peers, introduced or not, as
    /// fast as they sent. Now only within a pair it introduced, within its budget.
    #[test]
    fn the_relay_carries_only_introduced_pairs_within_their_budget() {
        let (t0, wall) = (common::sim::epoch(), common::sim::SIM_WALL_START_MS);
        let mut hub = test_hub();
        hub.cfg.relay_bytes_per_pair = 1000;
        let (fa, fb) = (SocketAddr::from(([127, 0, 0, 1], 40000)), SocketAddr::from(([127, 0, 0, 1], 40001)));
        let mut ca = register(&mut hub, "a", fa, 1, t0, wall);
        register(&mut hub, "b", fb, 2, t0, wall);
        let id = |hub: &Hub, n: &str| hub.status(t0).iter().find(|p| p.name == n).map(|p| p.id).expect("registered");
        let (a, b) = (id(&hub, "a"), id(&hub, "b"));
        let mut out = vec![0u8; common::wire::MAX_DATAGRAM];
        let relay_to_b = |c: &mut Channel| {
            let mut m = vec![sealed_kind::RELAY];
            m.extend_from_slice(&b.to_be_bytes());
            m.extend_from_slice(&[0x13; 100]);
            c.seal_message(&m)
        };
        hub.handle_datagram(t0, wall, fa, &relay_to_b(&mut ca));
        assert!(next_datagram(&mut hub, &mut out).is_none(), "relayed before an introduction");
        assert_eq!(hub.drops.relay_refused, 1);
        for p in [a, b] {
            hub.set_host_candidates(t0, p, vec!["192.168.7.1:5100".parse().expect("literal")]);
        }
        hub.introduce(t0, a, b);
        while next_datagram(&mut hub, &mut out).is_some() {}
        let mut relayed = 0;
        for _ in 0..20 {
            hub.handle_datagram(t0, wall, fa, &relay_to_b(&mut ca));
            while let Some((to, _)) = next_datagram(&mut hub, &mut out) {
                relayed += usize::from(to == fb);
            }
        }
        assert_eq!(relayed, 10, "1000 bytes a second, 100 each");
        assert_eq!(hub.drops.relay_over_budget, 10);
        // the next second has its own budget
        hub.handle_datagram(t0 + Duration::from_secs(1), wall, fa, &relay_to_b(&mut ca));
        assert!(next_datagram(&mut hub, &mut out).is_some());
    }
}
