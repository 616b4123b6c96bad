//! What a hub of a cluster tells its peers about the cluster: which hub it is, and how
//! the other hubs' multipath servers are reached (`INNER_HUBS`), so that a peer can move
//! to one of them when this hub is lost. Sent to each peer once its registration is
//! confirmed, and to every peer when the cluster's hubs change.

use super::*;
use crate::wire::ClusterHubsRepr;

impl Hub {
    /// The cluster as the peers should know it (from its signed records); sent to every
    /// peer if it changed.
    pub fn set_listed_hubs(&mut self, hubs: ClusterHubsRepr) {
        if self.listed_hubs.as_ref() == Some(&hubs) {
            return;
        }
        let m = hubs.emit();
        self.listed_hubs = Some(hubs);
        let ids: Vec<u32> = self.peers.keys().copied().collect();
        for id in ids {
            self.send_on_link(id, &m);
        }
    }

    /// Tells peer `id` about the cluster, if this hub is in one.
    pub(super) fn tell_listed_hubs(&mut self, id: u32) {
        if let Some(m) = self.listed_hubs.as_ref().map(ClusterHubsRepr::emit) {
            self.send_on_link(id, &m);
        }
    }

    fn send_on_link(&mut self, id: u32, m: &[u8]) {
        let Some(p) = self.peers.get_mut(&id) else { return };
        self.ready.push(id);
        if p.link.send(m).is_err() {
            self.drops.queue_full += 1;
        }
    }
}
