//! The registry: who may register, the Register/Welcome exchange, pending registrations
//! and their confirmation, addresses by name, reconfiguration and removal.

use super::*;

/// What `Hub::reconfigure` changed, by peer name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerConfigChanges {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Another key, fixed address or route allowance.
    pub changed: Vec<String>,
}

impl std::fmt::Display for PeerConfigChanges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |v: &[String]| if v.is_empty() { "-".to_string() } else { v.join(",") };
        write!(f, "peers added {}, removed {}, changed {}", list(&self.added), list(&self.removed), list(&self.changed))
    }
}

/// Whether a peer allowed `allowed` may announce `route` in a VPN on `network`.
pub fn route_verdict(allowed: &[Prefix], network: Prefix, route: &Prefix) -> Result<(), RouteRefusalReason> {
    // an exit node's default route necessarily spans the VPN; any other may not touch it
    if route.len > 0 && route.overlaps(&network) {
        return Err(RouteRefusalReason::OverlapsNetwork);
    }
    if allowed.iter().any(|a| a.covers(route)) {
        Ok(())
    } else {
        Err(RouteRefusalReason::NotAllowed)
    }
}

/// A registration the hub answered but the peer has not yet used.
pub(super) struct Pending {
    pub(super) name: String,
    pub(super) nonce: u64,
    /// The peer process's (`RegisterRepr::instance`).
    pub(super) instance: u64,
    pub(super) addr: Ipv4Addr,
    /// What the Register announced, and what of it hub.yaml allows.
    pub(super) announced: Vec<Prefix>,
    pub(super) routes: Vec<Prefix>,
    /// The Welcome, resent as it was to every Register with the same nonce.
    pub(super) welcome: Vec<u8>,
    pub(super) channel: Channel,
    pub(super) since: Instant,
    /// The tunnel its Register came through.
    pub(super) from: SocketAddr,
}

/// The assignments of a state file a hub may keep: configured names only, host addresses
/// of the network other than the hub's and the fixed ones, each address once.
pub(super) fn usable_assignments(
    cfg: &HubCoreConfig,
    keys: &HashMap<String, usize>,
    saved: BTreeMap<String, Ipv4Addr>,
) -> BTreeMap<String, Ipv4Addr> {
    let mut kept = BTreeMap::new();
    let mut taken: std::collections::HashSet<Ipv4Addr> = cfg.peers.iter().filter_map(|p| p.fixed_addr).collect();
    taken.insert(cfg.hub_addr);
    for (name, a) in saved {
        if keys.contains_key(&name) && cfg.network.is_host(a) && taken.insert(a) {
            kept.insert(name, a);
        }
    }
    kept
}

impl Hub {
    /// Every name → address assignment (what the state file keeps).
    pub fn assignments(&self) -> &BTreeMap<String, Ipv4Addr> {
        &self.assigned
    }

    pub(super) fn spec(&self, name: &str) -> Option<&PeerSpec> {
        self.keys.get(name).map(|&i| &self.cfg.peers[i])
    }

    /// `name`'s address: its fixed one, the one it had, else (this hub alone) `want` if
    /// free, else the first free one. One pass over what is taken: O(peers).
    pub(super) fn address_for(&self, name: &str, want: Ipv4Addr) -> Option<Ipv4Addr> {
        if let Some(a) = self.spec(name).and_then(|s| s.fixed_addr) {
            return Some(a);
        }
        if let Some(&a) = self.assigned.get(name) {
            return Some(a);
        }
        if self.cfg.addresses == AddressAuthority::Cluster {
            return None; // only the cluster's store gives out addresses
        }
        let mut taken: std::collections::HashSet<Ipv4Addr> = std::collections::HashSet::new();
        taken.insert(self.cfg.hub_addr);
        taken.extend(self.peers.values().filter(|p| p.name != name).map(|p| p.addr));
        taken.extend(self.pending.values().filter(|p| p.name != name).map(|p| p.addr));
        taken.extend(self.cfg.peers.iter().filter(|s| s.name != name).filter_map(|s| s.fixed_addr));
        taken.extend(self.assigned.iter().filter(|(n, _)| n.as_str() != name).map(|(_, &a)| a));
        let net = self.cfg.network;
        let usable = |a: Ipv4Addr| net.is_host(a) && !taken.contains(&a);
        if usable(want) {
            return Some(want);
        }
        (1..net.size().min(1 << 20) as u32).filter_map(|n| net.nth(n)).find(|&a| usable(a))
    }

    /// A Register that is authentic, new and fresh, with its peer's index in the config;
    /// `None` if it is none of these (counted), or a copy of one already answered (answered
    /// again, the same way).
    fn take_register(&mut self, wall_ms: u64, from: SocketAddr, d: &[u8]) -> Option<(RegisterRepr, usize)> {
        let Ok((reg, body)) = RegisterRepr::parse(d) else {
            self.drops.malformed += 1;
            return None;
        };
        let Some(spec) = self.spec(&reg.name) else {
            self.drops.unknown_peer += 1;
            return None;
        };
        if RegisterRepr::verify(d, body, &spec.key).is_err() {
            self.drops.bad_mac += 1;
            return None;
        }
        // a copy of the Register already answered: the same answer, nothing new
        if let Some(p) = self.pending.values().find(|p| p.name == reg.name && p.nonce == reg.nonce) {
            self.transmit.push_back((from, p.welcome.clone()));
            return None;
        }
        if self.peers.values().any(|p| p.name == reg.name && p.nonce == reg.nonce) {
            return None; // a late copy; that registration is already in use
        }
        let last = self.last_register_ts.get(&reg.name).copied().unwrap_or(0);
        if reg.timestamp_ms <= last || reg.timestamp_ms.abs_diff(wall_ms) > MAX_CLOCK_SKEW_MS {
            self.drops.replayed += 1;
            return None;
        }
        self.last_register_ts.insert(reg.name.clone(), reg.timestamp_ms);
        let ki = self.keys[&reg.name];
        Some((reg, ki))
    }

    pub(super) fn on_register(&mut self, now: Instant, wall_ms: u64, from: SocketAddr, d: &[u8]) {
        let Some((reg, ki)) = self.take_register(wall_ms, from, d) else { return };
        let net = self.cfg.network;
        let refusal = (reg.mtu != 0 && reg.mtu != self.cfg.mtu)
            .then_some(RefusalReason::MtuMismatch)
            .or_else(|| self.registered_elsewhere(now, from, &reg).then_some(RefusalReason::RegisteredElsewhere));
        let addr = if refusal.is_none() { self.address_for(&reg.name, reg.want_addr) } else { None };
        let Some(addr) = addr else {
            let Some(reason) = refusal.or_else(|| self.no_address(now, &reg)) else { return };
            let r = RefusalRepr { reason, hub_mtu: self.cfg.mtu, nonce: reg.nonce }.emit(&self.cfg.peers[ki].key);
            self.transmit.push_back((from, r.to_vec()));
            self.events.push_back(HubEvent::Refused { name: reg.name, reason });
            return;
        };
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        // announcements are policy: only what hub.yaml allows this peer is taken; the
        // Welcome tells the peer which were refused and why
        let (routes, refused) = split_routes(&self.cfg.peers[ki].allowed_routes, net, &reg.routes);
        let private = self.entropy.x25519_key();
        let public = x25519_public(&private);
        let key = &self.cfg.peers[ki].key;
        let agreement = Agreement { key, nonce: reg.nonce, peer_id: id, peer_public: &reg.public, hub_public: &public };
        let Ok(channel) = Channel::establish(&agreement, private, false) else {
            self.drops.malformed += 1; // a public key X25519 refuses
            return;
        };
        let welcome = WelcomeRepr {
            peer_id: id,
            addr,
            prefix_len: self.cfg.network.len,
            hub_addr: self.cfg.hub_addr,
            mtu: self.cfg.mtu,
            nonce: reg.nonce,
            public,
            refused: refused.clone(),
            dns_domain: self.cfg.dns_domain.clone(),
        }
        .emit(key, &reg.public);
        self.transmit.push_back((from, welcome.clone()));
        if !refused.is_empty() {
            self.drops.route_refused += refused.len() as u64;
            self.events.push_back(HubEvent::RoutesRefused { name: reg.name.clone(), routes: refused });
        }
        // one pending registration per peer: a newer Register replaces an older one
        self.drop_unconfirmed(|p| p.name == reg.name);
        self.pending.insert(
            id,
            Pending {
                name: reg.name,
                nonce: reg.nonce,
                instance: reg.instance,
                addr,
                announced: reg.routes,
                routes,
                welcome,
                channel,
                since: now,
                from,
            },
        );
    }

    /// Whether `reg`'s process (its instance) is registered here through another tunnel
    /// that was heard from lately: a second way to this hub (two `hubs:` entries reaching
    /// it) would make the two registrations replace each other forever. One that went
    /// quiet (`DUPLICATE_HEARD_WITHIN`) gives way: its path may have died.
    fn registered_elsewhere(&self, now: Instant, from: SocketAddr, reg: &RegisterRepr) -> bool {
        let same = |name: &str, instance: u64| reg.instance != 0 && name == reg.name && instance == reg.instance;
        // ... or is being welcomed through another (both Registers came at once)
        let pending = self
            .pending
            .values()
            .any(|p| same(&p.name, p.instance) && p.from != from && now < p.since + DUPLICATE_HEARD_WITHIN);
        pending
            || self.peers.values().any(|p| {
                same(&p.name, p.instance)
                    && p.tunnel != from
                    && p.tunnel != UNBOUND
                    && now < p.last_seen + DUPLICATE_HEARD_WITHIN
            })
    }

    /// Why `reg`'s name gets no address; `None`: the cluster's store was asked, and the
    /// peer's next Register (`REGISTER_RETRY`, a newer timestamp) may find its answer.
    fn no_address(&mut self, now: Instant, reg: &RegisterRepr) -> Option<RefusalReason> {
        if self.cfg.addresses == AddressAuthority::Local {
            return Some(RefusalReason::PoolExhausted);
        }
        if !self.store_available {
            return Some(RefusalReason::StoreUnavailable);
        }
        if self.asked.get(&reg.name).is_none_or(|&at| now >= at + ADDRESS_ASK_INTERVAL) {
            self.asked.insert(reg.name.clone(), now);
            self.events.push_back(HubEvent::AddressWanted { name: reg.name.clone(), want: reg.want_addr });
        }
        None
    }

    /// Cluster: the store's assignments, all of them (as it holds them now). They replace
    /// what the hub knew, except for registered peers, which keep the address they have.
    pub fn learn_assignments(&mut self, all: BTreeMap<String, Ipv4Addr>) {
        let keys = &self.keys;
        let mut learned = usable_assignments(&self.cfg, keys, all);
        for p in self.peers.values() {
            learned.entry(p.name.clone()).or_insert(p.addr);
        }
        self.asked.retain(|name, _| !learned.contains_key(name));
        if learned != self.assigned {
            self.assigned = learned;
            self.events.push_back(HubEvent::AddressesChanged);
        }
    }

    /// Cluster: whether the store answers now.
    pub fn set_store_available(&mut self, available: bool) {
        self.store_available = available;
        if !available {
            self.asked.clear();
        }
    }

    /// Registration `id`'s reset token: HMAC-SHA256 under the hub's reset secret, which
    /// outlives the process, so a restarted hub names the registrations of the last one.
    pub(super) fn reset_token(&self, id: u32) -> [u8; wire::RESET_TOKEN_LEN] {
        let mut ctx = hmac::Context::with_key(&self.reset_key);
        ctx.update(b"mpvpn v1 reset token");
        ctx.update(&id.to_be_bytes());
        let tag = ctx.sign();
        let mut token = [0u8; wire::RESET_TOKEN_LEN];
        token.copy_from_slice(&tag.as_ref()[..wire::RESET_TOKEN_LEN]);
        token
    }

    /// A sealed datagram (`len` bytes) of registration `id`, which we do not know: tell it
    /// so (`Reset`, shorter than any sealed datagram), within `RESETS_PER_SECOND`.
    pub(super) fn answer_unknown(&mut self, now: Instant, from: SocketAddr, id: u32, len: usize) {
        let (start, sent) = match self.resets {
            Some((start, sent)) if now < start + Duration::from_secs(1) => (start, sent),
            _ => (now, 0),
        };
        if sent >= RESETS_PER_SECOND || len < wire::RESET_LEN {
            return;
        }
        self.resets = Some((start, sent + 1));
        let reset = wire::ResetRepr { peer_id: id, token: self.reset_token(id) };
        self.transmit.push_back((from, reset.emit().to_vec()));
    }

    /// Drops the pending registrations `gone` picks, counted as never confirmed.
    pub(super) fn drop_unconfirmed(&mut self, gone: impl Fn(&Pending) -> bool) {
        let before = self.pending.len();
        self.pending.retain(|_, p| !gone(p));
        self.drops.unconfirmed += (before - self.pending.len()) as u64;
    }

    /// The first datagram under a pending registration's keys: it becomes the peer's
    /// registration (replacing the one it had: the peer restarted or lost us).
    pub(super) fn confirm(&mut self, now: Instant, id: u32, from: SocketAddr) {
        let Some(p) = self.pending.remove(&id) else { return };
        if let Some(old) = self.peers.values().find(|q| q.name == p.name).map(|q| q.id) {
            self.peers.remove(&old);
            self.introduced.retain(|&(a, b), _| a != old && b != old);
        }
        if self.assigned.insert(p.name.clone(), p.addr) != Some(p.addr) {
            self.events.push_back(HubEvent::AddressesChanged);
        }
        self.peers.insert(
            id,
            HubPeer {
                id,
                name: p.name.clone(),
                nonce: p.nonce,
                instance: p.instance,
                addr: p.addr,
                announced: p.announced,
                routes: p.routes,
                tunnel: UNBOUND,
                channel: p.channel,
                last_seen: now,
                last_heartbeat: now,
                rtt_us: 0,
                link: KcpLink::new(id, now, self.cfg.tunnel_payload),
                list_version: 0,
                deltas: false,
                tx_bytes: 0,
                rx_bytes: 0,
                mesh: false,
                host_candidates: Vec::new(),
                reflexive: BTreeMap::new(),
                relayed_bytes: 0,
                relay_out: PacketQueue::default(),
                changes: broker::ChangeBudget::new(now),
            },
        );
        // its reset token: what a restarted hub answers its datagrams with
        let token = self.reset_token(id);
        if let Some(peer) = self.peers.get_mut(&id) {
            self.ready.push(id);
            if peer.link.send(&wire::emit_reset_token(&token)).is_err() {
                self.drops.queue_full += 1;
            }
        }
        self.tell_listed_hubs(id);
        self.events.push_back(HubEvent::PeerUp { name: p.name, addr: p.addr, tunnel: from });
        self.rebuild_routes();
        self.push_peer_list(now);
    }

    /// hub.yaml's peers were read again. Newly listed peers may register; a peer no
    /// longer listed, or whose key or fixed address changed, is dropped (its routes are
    /// withdrawn; a changed one registers again by itself); a peer whose allowance
    /// changed keeps what it announced that is now allowed. Nobody else is disturbed.
    pub fn reconfigure(&mut self, now: Instant, peers: Vec<PeerSpec>) -> PeerConfigChanges {
        let mut changes = PeerConfigChanges::default();
        let old = std::mem::take(&mut self.cfg.peers);
        let spec_of = |name: &str| peers.iter().find(|s| s.name == name);
        for s in &peers {
            match old.iter().find(|o| o.name == s.name) {
                None => changes.added.push(s.name.clone()),
                Some(o) if !o.key.same_key(&s.key) || o.fixed_addr != s.fixed_addr => {
                    changes.changed.push(s.name.clone())
                }
                Some(o) if o.allowed_routes != s.allowed_routes => changes.changed.push(s.name.clone()),
                Some(_) => {}
            }
        }
        changes.removed = old.iter().filter(|o| spec_of(&o.name).is_none()).map(|o| o.name.clone()).collect();
        // who must register again: gone from the config, another key, another fixed address
        let must_leave = |name: &str, addr: Ipv4Addr| match spec_of(name) {
            None => true,
            Some(s) => {
                let o = old.iter().find(|o| o.name == name);
                o.is_none_or(|o| !o.key.same_key(&s.key)) || s.fixed_addr.is_some_and(|f| f != addr)
            }
        };
        let leaving: Vec<u32> = self.peers.values().filter(|p| must_leave(&p.name, p.addr)).map(|p| p.id).collect();
        self.pending.retain(|_, p| !must_leave(&p.name, p.addr));
        let net = self.cfg.network;
        let mut list_changed = false;
        for p in self.peers.values_mut() {
            let Some(s) = spec_of(&p.name) else { continue };
            let routes: Vec<Prefix> =
                p.announced.iter().copied().filter(|r| route_verdict(&s.allowed_routes, net, r).is_ok()).collect();
            if routes != p.routes {
                p.routes = routes;
                list_changed = true;
            }
        }
        let before = self.assigned.len();
        self.assigned.retain(|name, _| spec_of(name).is_some());
        if self.assigned.len() != before {
            self.events.push_back(HubEvent::AddressesChanged);
        }
        self.keys = peers.iter().enumerate().map(|(i, p)| (p.name.clone(), i)).collect();
        self.cfg.peers = peers;
        for id in leaving {
            self.remove_peer(now, id, "hub.yaml changed: no longer listed, or another key or address");
        }
        if list_changed {
            self.rebuild_routes();
            self.push_peer_list(now);
        }
        changes
    }

    pub(super) fn remove_peer(&mut self, now: Instant, id: u32, why: &'static str) {
        self.introduced.retain(|&(a, b), _| a != id && b != id);
        if let Some(p) = self.peers.remove(&id) {
            self.events.push_back(HubEvent::PeerGone { name: p.name, addr: p.addr, why });
            self.rebuild_routes();
            self.push_peer_list(now);
        }
    }
}

/// `announced` split by `route_verdict`: the routes taken, and the refused with why.
fn split_routes(
    allowed: &[Prefix],
    network: Prefix,
    announced: &[Prefix],
) -> (Vec<Prefix>, Vec<(Prefix, RouteRefusalReason)>) {
    let mut routes = Vec::new();
    let mut refused = Vec::new();
    for r in announced {
        match route_verdict(allowed, network, r) {
            Ok(()) => routes.push(*r),
            Err(reason) => refused.push((*r, reason)),
        }
    }
    (routes, refused)
}
