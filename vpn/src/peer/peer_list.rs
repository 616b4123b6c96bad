//! The hub's peer list as this peer follows it: assembled from chunks, routes to install,
//! which peer an address belongs to, and the peers' status.

use super::*;

impl Peer {
    /// One chunk of hub link `l`'s peer list; the list is taken when its last chunk
    /// arrives (KCP keeps them in order; a chunk 0 starts a list afresh).
    pub(super) fn on_peer_list_chunk(&mut self, now: Instant, l: usize, c: PeerListChunk) {
        match self.links[l].list_assembly.take(c) {
            Ok(Some((version, list))) => {
                self.take_list(now, l, list);
                self.links[l].list_version = version;
            }
            Ok(None) => {}
            Err(_) => self.drops.malformed += 1,
        }
    }

    /// What changed in hub link `l`'s list: applied if it starts from the version we have
    /// (KCP keeps the hub's messages in order, so it does); otherwise our list is stale:
    /// ask for it whole.
    pub(super) fn on_peer_list_delta(&mut self, now: Instant, l: usize, d: PeerListDelta) {
        let have = self.links[l].list_version;
        if !self.cfg.peer_list_deltas || d.from != have {
            self.drops.stale_list += 1;
            self.send_peers_want(l, if have == 0 { u32::MAX } else { have });
            return;
        }
        let mut list = if d.from == 0 { Vec::new() } else { std::mem::take(&mut self.links[l].list) };
        let replaced: BTreeSet<u32> = d.upserts.iter().map(|p| p.id).chain(d.removed.iter().copied()).collect();
        list.retain(|p| !replaced.contains(&p.id));
        list.extend(d.upserts);
        list.sort_by_key(|p| p.id);
        self.take_list(now, l, list);
        self.links[l].list_version = d.to;
    }

    /// Forgets which version of the list we hold, as a peer that missed a change would:
    /// the next delta finds the list stale (tests of the recovery).
    #[cfg(any(test, feature = "sim"))]
    pub fn forget_peer_list_version(&mut self) {
        let link = &mut self.links[self.active];
        link.list_version = link.list_version.wrapping_add(1000);
    }

    /// Tells hub link `l`'s hub we take deltas (`have` 0), or that our list went stale at
    /// `have`.
    pub(super) fn send_peers_want(&mut self, l: usize, have: u32) {
        let State::Up(s) = &mut self.links[l].state else { return };
        if s.link.send(&wire::emit_peers_want(have)).is_err() {
            self.drops.queue_full += 1;
        }
    }

    /// Hub link `l` sent a new list: which of its ids is which peer, and (the active
    /// link's) what routes, names and pairs follow.
    fn take_list(&mut self, now: Instant, l: usize, list: Vec<PeerEntry>) {
        let link = &mut self.links[l];
        link.keys = list.iter().map(|p| (p.id, mesh_key(p))).collect();
        link.ids = list.iter().map(|p| (mesh_key(p), p.id)).collect();
        // a peer that registered anew with this hub must be introduced anew by it
        let ids = &link.ids;
        link.introduced.retain(|key, id| ids.get(key) == Some(id));
        link.list = list;
        if l == self.active {
            self.apply_list(now);
        }
    }

    /// The active hub's list is ours: the mesh's peers, routes to install, who an address
    /// belongs to.
    pub(super) fn apply_list(&mut self, now: Instant) {
        let list = self.links[self.active].list.clone();
        if let (Some(m), Some(network)) = (self.mesh.as_mut(), self.network) {
            let keyed: Vec<PeerEntry> = list.iter().map(|p| PeerEntry { id: mesh_key(p), ..p.clone() }).collect();
            m.set_peer_list(now, u32::from(self.addr), network, &keyed);
        }
        let wanted: BTreeSet<Prefix> =
            list.iter().filter(|p| p.addr != self.addr).flat_map(|p| p.routes.iter().copied()).collect();
        let add: Vec<Prefix> = wanted.difference(&self.installed_routes).copied().collect();
        let remove: Vec<Prefix> = self.installed_routes.difference(&wanted).copied().collect();
        if !add.is_empty() || !remove.is_empty() {
            self.events.push_back(PeerEvent::Routes { add, remove });
        }
        self.installed_routes = wanted;
        // counters follow the peer (by address: ids are one hub's) across list changes
        self.peer_traffic = list
            .iter()
            .map(|p| {
                self.peers.iter().position(|q| q.addr == p.addr).map_or_else(Default::default, |i| self.peer_traffic[i])
            })
            .collect();
        // who an address belongs to: its own, else the longest route (the higher index
        // wins a prefix two peers announce)
        let mut table = RouteTable::default();
        for (i, p) in list.iter().enumerate() {
            table.insert_host(p.addr, i);
            for r in &p.routes {
                table.insert_prefix(*r, i);
            }
        }
        self.route_table = table;
        self.peers = list;
        self.events.push_back(PeerEvent::PeerList);
    }

    /// Whether a packet the hub sent may carry `src`: the hub's own address, another
    /// listed peer's, one inside another peer's routes, or one from beyond the hub (the
    /// hub host's side) — never an address of this peer, of its own routes, or a VPN
    /// address nobody has.
    pub(super) fn source_allowed_from_hub(&self, src: IpAddr) -> bool {
        let v4 = match src {
            IpAddr::V4(a) => a,
            IpAddr::V6(a) => match ip::v4_of(a) {
                Some(a) => a,
                None => return true, // not a VPN address: from beyond the hub
            },
        };
        if v4 == self.addr || self.cfg.routes.iter().any(|r| r.contains(v4)) {
            return false;
        }
        match self.network {
            Some(net) if net.contains(v4) => v4 == self.hub_addr || self.route_table.has_host(v4),
            _ => true,
        }
    }

    /// The listed peer an inner address belongs to: its own address, else the longest
    /// announced route that covers it.
    pub(super) fn peer_index(&self, a: IpAddr) -> Option<usize> {
        self.route_table.lookup(ip::v4_in(a)?, None)
    }
}

impl Peer {
    /// The other peers as this one sees them: address, routes, and the traffic with each.
    pub fn peer_status(&self, now: Instant) -> Vec<PeerStatus> {
        self.peers
            .iter()
            .zip(&self.peer_traffic)
            .map(|(p, t)| {
                let own = p.addr == self.addr;
                let key = mesh_key(p);
                let (mesh_tx, mesh_rx, mesh_last_rx) = self.mesh.as_ref().map_or((0, 0, None), |m| m.traffic(key));
                let via = self.mesh.as_ref().map_or(Via::Relay, |m| m.via(key));
                let last_rx = t.last_rx.max(mesh_last_rx);
                let paths = self.mesh.as_ref().map_or_else(Vec::new, |m| m.paths(now, key));
                PeerStatus {
                    id: p.id,
                    name: p.name.clone(),
                    addr: p.addr,
                    state: match (own, via) {
                        (true, _) => PeerState::Own,
                        (false, Via::Direct) => PeerState::Direct,
                        (false, Via::Relay) => PeerState::Relay,
                    },
                    tunnel: String::new(),
                    routes: p.routes.clone(),
                    last_heartbeat_s: None,
                    last_rx_s: last_rx.map(|r| now.saturating_duration_since(r).as_secs_f64()),
                    rtt_ms: paths
                        .iter()
                        .filter(|x| x.state == common::stats::PathState::Up)
                        .filter_map(|x| x.rtt_ms)
                        .reduce(f64::min),
                    tx_bytes: t.tx_bytes + mesh_tx,
                    rx_bytes: t.rx_bytes + mesh_rx,
                    via: (!own).then_some(via),
                    paths,
                    candidates: p.candidates.clone(),
                    relayed_bytes: 0,
                }
            })
            .collect()
    }
}

/// Why a route `r` from another peer must not be installed on this host, if it must not:
/// it covers special addresses, or one of `protected` (what carries the tunnel).
pub fn route_hazard(r: &Prefix, protected: &[Ipv4Addr]) -> Option<String> {
    let special = [("loopback", "127.0.0.0/8"), ("link-local", "169.254.0.0/16"), ("multicast", "224.0.0.0/4")];
    for (what, range) in special {
        if r.overlaps(&range.parse().expect("literal")) {
            return Some(format!("it covers {what} addresses"));
        }
    }
    protected.iter().find(|a| r.contains(**a)).map(|a| format!("it covers {a}, which carries the tunnel"))
}
