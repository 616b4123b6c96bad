//! The peer list: its entries, its version, and pushing it to every peer's link.
//!
//! A peer that said it takes deltas (`INNER_PEERS_WANT`) and took the version pushed last
//! gets only what changed since (`INNER_PEERS_DELTA`): one peer joining costs O(N) bytes
//! over all links, not O(N²). Any other peer (new, behind, or older) gets the list whole.

use super::*;

impl Hub {
    pub(super) fn entries(&self) -> Vec<PeerEntry> {
        self.peers
            .values()
            .map(|p| PeerEntry {
                id: p.id,
                name: p.name.clone(),
                addr: p.addr,
                routes: p.routes.clone(),
                candidates: if p.mesh { p.candidates() } else { Vec::new() },
            })
            .collect()
    }

    /// The list changed: every peer is due the new version.
    pub(super) fn push_peer_list(&mut self, now: Instant) {
        self.list.changed(now);
    }

    /// Sends the current version to every peer whose link has not taken it: a delta from
    /// the version pushed last to those that have it and take deltas, else the list
    /// whole, or nothing (a link without room is tried again in the next round).
    pub(super) fn flush_peer_list(&mut self, now: Instant) {
        let Some(version) = self.list.take_due(now) else { return };
        let current: BTreeMap<u32, PeerEntry> =
            self.entries().into_iter().chain(self.forwarded_entries()).map(|e| (e.id, e)).collect();
        let (from, before) = &self.pushed;
        let delta = PeerListDelta {
            from: *from,
            to: version,
            upserts: current.values().filter(|e| before.get(&e.id) != Some(*e)).cloned().collect(),
            removed: before.keys().filter(|id| !current.contains_key(id)).copied().collect(),
        }
        .emit();
        let mut whole: Option<Vec<Vec<u8>>> = None;
        let mut incomplete = false;
        for p in self.peers.values_mut().filter(|p| p.list_version != version) {
            let sent = match &delta {
                Some(d) if p.deltas && !self.whole_lists && p.list_version == *from => p.link.send(d).is_ok(),
                _ => {
                    let chunks = whole.get_or_insert_with(|| {
                        wire::emit_peer_list(version, &current.values().cloned().collect::<Vec<_>>())
                    });
                    p.link.has_room_for(chunks) && chunks.iter().all(|c| p.link.send(c).is_ok())
                }
            };
            self.ready.push(p.id);
            if sent {
                p.list_version = version;
            } else {
                incomplete = true;
            }
        }
        if incomplete {
            self.list.retry(now);
        }
        self.pushed = (version, current);
    }

    /// Every list whole to every peer (`true`), as before deltas, or deltas to those that
    /// take them: the bench compares the two in one run.
    #[cfg(any(test, feature = "sim"))]
    pub fn send_whole_lists(&mut self, whole: bool) {
        self.whole_lists = whole;
    }

    /// Peer `id` takes deltas from now on; `have` not 0: its list went stale at version
    /// `have` (it could not apply a delta): it gets the list whole.
    pub(super) fn on_peers_want(&mut self, now: Instant, id: u32, have: u32) {
        let Some(p) = self.peers.get_mut(&id) else { return };
        p.deltas = true;
        if have != 0 {
            p.list_version = 0;
            self.list.resend(now);
        }
    }
}

/// When the peer list goes out: at most every `PEER_LIST_PUSH_INTERVAL` (a burst of
/// changes makes one push), and again for links that had no room for it.
pub(super) struct ListPush {
    /// Bumped on every change; 0 is never a version (a peer's "none yet").
    pub(super) version: u32,
    /// Some peer's link has not taken `version`: when it next goes out.
    due: Option<Instant>,
    pushed_at: Option<Instant>,
}

impl Default for ListPush {
    fn default() -> Self {
        Self { version: 1, due: None, pushed_at: None }
    }
}

impl ListPush {
    fn changed(&mut self, now: Instant) {
        self.version = self.version.wrapping_add(1).max(1);
        let earliest = self.pushed_at.map_or(now, |t| now.max(t + PEER_LIST_PUSH_INTERVAL));
        self.due = Some(self.due.map_or(earliest, |d| d.min(earliest)));
    }

    /// The version to push now, if one is due.
    fn take_due(&mut self, now: Instant) -> Option<u32> {
        if self.due.is_none_or(|d| now < d) {
            return None;
        }
        self.due = None;
        self.pushed_at = Some(now);
        Some(self.version)
    }

    /// Some peer needs the current version again (nothing changed).
    fn resend(&mut self, now: Instant) {
        self.due = Some(self.due.map_or(now, |d| d.min(now)));
    }

    /// Some link had no room: the next round.
    fn retry(&mut self, now: Instant) {
        self.due = Some(now + PEER_LIST_PUSH_INTERVAL);
    }

    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        self.due
    }
}
