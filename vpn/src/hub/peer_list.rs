//! The peer list: its entries, its version, and pushing it to every peer's link.

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

    /// Sends the current list to every peer whose link has not taken it, whole or not at
    /// all: a link without room for every chunk is tried again in the next round.
    pub(super) fn flush_peer_list(&mut self, now: Instant) {
        let Some(version) = self.list.take_due(now) else { return };
        let chunks = wire::emit_peer_list(version, &self.entries());
        let mut incomplete = false;
        for p in self.peers.values_mut().filter(|p| p.list_version != version) {
            if p.link.has_room_for(&chunks) && chunks.iter().all(|c| p.link.send(c).is_ok()) {
                p.list_version = version;
            } else {
                incomplete = true;
            }
        }
        if incomplete {
            self.list.retry(now);
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

    /// Some link had no room: the next round.
    fn retry(&mut self, now: Instant) {
        self.due = Some(now + PEER_LIST_PUSH_INTERVAL);
    }

    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        self.due
    }
}
