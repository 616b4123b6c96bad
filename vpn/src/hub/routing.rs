//! Routing: IP packets from peers and from the hub's TUN to the peer whose address or
//! route covers the destination; names to addresses.

use super::*;

impl Hub {
    /// The VPN address of the registered peer `name`, here or (in a cluster) with a hub
    /// this one forwards to (or of the hub, as `hub` when no peer has that name): what
    /// `<name>.<domain>` resolves to.
    pub fn address_of(&self, name: &str) -> Option<Ipv4Addr> {
        let peer = self.peers.values().find(|p| p.name.eq_ignore_ascii_case(name)).map(|p| p.addr);
        peer.or_else(|| self.forwarded_address_of(name))
            .or_else(|| name.eq_ignore_ascii_case("hub").then_some(self.cfg.hub_addr))
    }

    /// The peer whose address or announced route covers `dst` (longest prefix wins).
    /// The VPN's own addresses are never reached through a route (an exit node's /0).
    pub(super) fn peer_for(&self, dst: Ipv4Addr) -> Option<u32> {
        self.route_table.lookup(dst, Some(self.cfg.network))
    }

    /// The peers changed (registered, gone, other routes; not their candidates): the table
    /// again. Two peers
    /// announcing one prefix: the higher id has it.
    pub(super) fn rebuild_routes(&mut self) {
        let mut t = RouteTable::default();
        for p in self.peers.values() {
            t.insert_host(p.addr, p.id);
            for r in &p.routes {
                t.insert_prefix(*r, p.id);
            }
        }
        self.route_table = t;
    }

    pub(super) fn route_from_peer(&mut self, from_id: u32, packet: &[u8], src: IpAddr, dst: IpAddr) {
        let p = &self.peers[&from_id];
        if !ip::source_of_peer(src, self.cfg.network, p.addr, &p.routes) {
            self.drops.spoofed_source += 1;
            return;
        }
        let target = ip::v4_in(dst);
        match target.and_then(|d| self.peer_for(d)) {
            Some(to) if to == from_id => self.drops.no_route += 1,
            Some(to) => {
                if let Some(p) = self.peers.get_mut(&from_id) {
                    p.relayed_bytes += packet.len() as u64;
                }
                self.send_ip(to, packet)
            }
            None => {
                // a peer of another hub of the cluster
                if target.is_some_and(|d| d != self.cfg.hub_addr && self.forward_ip(d, packet)) {
                    return;
                }
                if target.is_some_and(|d| self.cfg.network.contains(d) && d != self.cfg.hub_addr) {
                    self.drops.no_route += 1; // a VPN address nobody has
                } else {
                    self.to_tun.push(&[packet]); // the hub itself, or beyond it
                }
            }
        }
    }

    pub(super) fn send_ip(&mut self, to: u32, packet: &[u8]) {
        let Some(p) = self.peers.get_mut(&to) else { return };
        self.ready.push(to);
        match p.link.send_ip(packet) {
            Ok(()) => p.tx_bytes += packet.len() as u64,
            Err(_) => self.drops.queue_full += 1,
        }
    }

    /// An IP packet the hub host sent into its TUN device.
    pub fn handle_tun_packet(&mut self, packet: &[u8]) {
        let dst = ip::addresses(packet).and_then(|(_, d)| ip::v4_in(d));
        match dst.and_then(|d| self.peer_for(d)) {
            Some(to) => self.send_ip(to, packet),
            None => self.drops.no_route += 1,
        }
    }
}
