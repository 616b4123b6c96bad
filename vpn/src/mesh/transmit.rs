//! What the mesh sends: our servers' answers, then the pairs' datagrams, pairs taking
//! turns.

use super::*;

impl Mesh {
    /// The next datagram of the mesh, built in `out` (at least 64 KiB); `to` gets every
    /// place to send `out[..len]` to. Returns the length.
    pub fn poll_transmit(&mut self, now: Instant, out: &mut [u8], to: &mut Vec<MeshAddr>) -> Option<usize> {
        to.clear();
        if let Some((dest, d)) = self.replies.pop_front() {
            out[..d.len()].copy_from_slice(&d);
            to.push(dest);
            return Some(d.len());
        }
        // pairs take turns, a datagram each: from the one after the last served, then
        // from the start
        let start = self.next_pair;
        let mut ctx = PairContext { sessions: &mut self.sessions, drops: &mut self.drops, relay: self.cfg.relay };
        for (&id, p) in self.pairs.range_mut(start..) {
            if let Some(len) = ctx.poll_pair(now, id, p, out, to) {
                self.next_pair = id.wrapping_add(1);
                return Some(len);
            }
        }
        for (&id, p) in self.pairs.range_mut(..start) {
            if let Some(len) = ctx.poll_pair(now, id, p, out, to) {
                self.next_pair = id.wrapping_add(1);
                return Some(len);
            }
        }
        None
    }
}

/// What a pair's transmit needs of the mesh besides the pair: the session map its
/// events update, the drop counters, the relay mode.
struct PairContext<'a> {
    sessions: &'a mut sessions::SessionMap,
    drops: &'a mut MeshDrops,
    relay: RelayMode,
}

impl PairContext<'_> {
    /// The next datagram of one pair: our client's own (inits, probes) or a segment of
    /// the link.
    fn poll_pair(
        &mut self,
        now: Instant,
        id: u32,
        p: &mut Pair,
        out: &mut [u8],
        to: &mut Vec<MeshAddr>,
    ) -> Option<usize> {
        p.refresh_paused(now);
        if let Some(len) = self.poll_server(now, id, p, out, to) {
            return Some(len);
        }
        if let Some(t) = p.client.poll_transmit(now, out) {
            p.punched(now, t.paths);
            Mesh::drain_client_events(self.sessions, now, id, p);
            Self::fill_dests(p, id, t.paths, to);
            return Some(t.len);
        }
        if !p.established {
            return None;
        }
        let n = match p.link.poll_transmit(&mut out[DATA_PAYLOAD_OFFSET..DATA_PAYLOAD_OFFSET + PAIR_PAYLOAD]) {
            Some(n) => n,
            // nothing to send for a while: an empty datagram keeps the session
            None if now >= p.last_data + PAIR_KEEPALIVE => 0,
            None => return None,
        };
        p.last_data = now;
        // our client has no direct path, but their client reaches our server directly:
        // back on that path (where their NAT let them out), sealed in their session
        if self.relay == RelayMode::Fallback && !p.direct_up() {
            let back = p.server_direct_paths(now);
            if let (false, Some(slot)) = (back.is_empty(), p.server_slot) {
                if let Some((len, paths)) = p.server.encapsulate(now, slot, out, n) {
                    // the session's redundancy may have planned other paths (the relay):
                    // the direct ones back take it
                    let planned = PathMask(paths.0 & back.0);
                    let on = if planned.is_empty() { back } else { planned };
                    to.extend(on.iter().filter_map(|i| p.server_dest(id, slot, i)));
                    // sealed in their session: it goes back there or nowhere (KCP resends)
                    return (!to.is_empty()).then_some(len);
                }
            }
        }
        match p.client.handle_app_datagram(now, PAIR_APP, out, n) {
            ClientSend::Sealed { len, paths } => {
                let paths = p.data_paths(self.relay, paths);
                Self::fill_dests(p, id, paths, to);
                Some(len)
            }
            ClientSend::Queued => None,
            ClientSend::Dropped(_) => {
                self.drops.queue_full += 1;
                None
            }
        }
    }

    /// Our server's receipts (and parity) of a coded or adaptive session: on the paths
    /// it names, the relay only while no direct way works (`relay: fallback`: the hub
    /// carries nothing of a direct pair).
    fn poll_server(
        &self,
        now: Instant,
        id: u32,
        p: &mut Pair,
        out: &mut [u8],
        to: &mut Vec<MeshAddr>,
    ) -> Option<usize> {
        let skip_relay = self.relay == RelayMode::Fallback && (p.direct_up() || p.server_direct);
        while let Some((slot, len, paths)) = p.server.poll_transmit(now, out) {
            let dests = paths.iter().filter_map(|i| p.server_dest(id, slot, i));
            to.extend(dests.filter(|d| !(skip_relay && matches!(d, MeshAddr::Relay(_)))));
            if !to.is_empty() {
                return Some(len);
            }
        }
        None
    }

    fn fill_dests(p: &Pair, id: u32, paths: PathMask, to: &mut Vec<MeshAddr>) {
        for i in paths.iter() {
            if i == RELAY_PATH {
                to.push(MeshAddr::Relay(id));
            } else if let Some(&(socket, addr)) = p.direct.get(i - 1) {
                to.push(MeshAddr::Direct { socket, addr });
            }
        }
    }
}
