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
    pub(super) fn push_peer_list(&mut self) {
        self.peers_version = self.peers_version.wrapping_add(1).max(1);
        self.list_pending = true;
    }

    /// Sends the current list to every peer whose link has not taken it, whole or not at
    /// all: a link without room for every chunk is tried again in the next round.
    pub(super) fn flush_peer_list(&mut self, now: Instant) {
        if !self.list_pending || self.list_pushed_at.is_some_and(|t| now < t + PEER_LIST_PUSH_INTERVAL) {
            return;
        }
        self.list_pushed_at = Some(now);
        let version = self.peers_version;
        let chunks = wire::emit_peer_list(version, &self.entries());
        let mut incomplete = false;
        for p in self.peers.values_mut().filter(|p| p.list_version != version) {
            if p.link.has_room_for(&chunks) && chunks.iter().all(|c| p.link.send(c).is_ok()) {
                p.list_version = version;
            } else {
                incomplete = true;
            }
        }
        self.list_pending = incomplete;
    }
}
