//! Registration: the Register/Welcome exchange, refusals, and starting over when the hub
//! is lost.

use super::*;

/// One registration attempt: its nonce and ephemeral key stay the same in every resend.
pub(super) struct Attempt {
    nonce: u64,
    private: Option<EphemeralPrivateKey>,
    public: [u8; PUBLIC_KEY_LEN],
}

impl Attempt {
    pub(super) fn new(entropy: &mut dyn Entropy) -> Self {
        let private = entropy.x25519_key();
        Self { nonce: entropy.next_u64(), public: x25519_public(&private), private: Some(private) }
    }
}

impl Session {
    /// A registration the hub welcomed: its first heartbeat due now.
    fn new(channel: Channel, link: KcpLink, now: Instant) -> Self {
        Self {
            channel,
            link,
            hb_seq: 0,
            next_heartbeat: now,
            first_miss: None,
            retries_sent: 0,
            pending_hb: None,
            last_hb_at: None,
            unanswered_since: None,
            reset_token: None,
        }
    }
}

impl Peer {
    /// Our announced routes the hub did not take, and why.
    pub fn refused_routes(&self) -> &[(Prefix, RouteRefusalReason)] {
        &self.refused_routes
    }

    /// Strictly increasing wall-clock milliseconds (Register anti-replay).
    pub(super) fn timestamp(&mut self, wall_ms: u64) -> u64 {
        self.last_ts = wall_ms.max(self.last_ts + 1);
        self.last_ts
    }

    pub(super) fn send_register(&mut self, l: usize, wall_ms: u64) {
        let State::Registering { attempt, .. } = &self.links[l].state else { return };
        let (nonce, public) = (attempt.nonce, attempt.public);
        let reg = RegisterRepr {
            name: self.cfg.name.clone(),
            timestamp_ms: self.timestamp(wall_ms),
            nonce,
            want_addr: self.addr,
            mtu: self.cfg.mtu.unwrap_or(0),
            public,
            routes: self.cfg.routes.clone(),
            instance: self.instance,
        };
        self.links[l].transmit.push_back(reg.emit(&self.cfg.key));
    }

    pub(super) fn on_welcome(&mut self, now: Instant, l: usize, d: &[u8]) {
        let link = &mut self.links[l];
        let State::Registering { attempt, .. } = &mut link.state else {
            return; // a late copy
        };
        let Ok(w) = WelcomeRepr::parse(d, &self.cfg.key, &attempt.public) else {
            self.drops.malformed += 1;
            return;
        };
        if w.nonce != attempt.nonce {
            return; // answers an older Register
        }
        if let Some(mtu) = self.cfg.mtu {
            if mtu != w.mtu {
                self.events.push_back(PeerEvent::Fatal(HubRefusal::WelcomeMtu { hub: w.mtu, ours: mtu }));
                return;
            }
        }
        let agreement = Agreement {
            key: &self.cfg.key,
            nonce: attempt.nonce,
            peer_id: w.peer_id,
            peer_public: &attempt.public,
            hub_public: &w.public,
        };
        let Some(Ok(channel)) = attempt.private.take().map(|k| Channel::establish(&agreement, k, true)) else {
            // a public key X25519 refuses: a new attempt, the hub gets a new Register
            self.drops.malformed += 1;
            link.state = State::Registering { attempt: Attempt::new(&mut *self.entropy), next_try: now, lost: false };
            return;
        };
        link.state =
            State::Up(Box::new(Session::new(channel, KcpLink::new(w.peer_id, now, self.cfg.tunnel_payload), now)));
        link.id = w.peer_id;
        link.last_ack = Some(now);
        link.same_hub = false;
        link.list_version = 0;
        link.list.clear();
        link.keys.clear();
        link.ids.clear();
        link.introduced.clear();
        link.welcome = Some(Welcomed {
            addr: w.addr,
            prefix_len: w.prefix_len,
            hub_addr: w.hub_addr,
            mtu: w.mtu,
            dns_domain: w.dns_domain,
            refused: w.refused,
        });
        if self.cfg.peer_list_deltas {
            self.send_peers_want(l, 0);
        }
        self.send_candidates(l);
        // the first sealed datagram is what makes the hub use this registration: now
        self.send_heartbeat(now, l);
        self.next_intro_check = now;
        // the first hub in order that is up is the active one
        if l <= self.active || !self.is_up() {
            let fresh = l == self.active;
            self.activate(now, l, fresh);
        }
    }

    /// Hub link `l`'s registration configures us from now on (`fresh`: it is a new
    /// registration, whose hub must introduce our pairs again).
    fn activate(&mut self, now: Instant, l: usize, fresh: bool) {
        let Some(w) = self.links[l].welcome.clone() else { return };
        self.active = l;
        if fresh || self.addr != w.addr {
            self.keep_pairs(now, w.addr);
        }
        self.addr = w.addr;
        self.network = Prefix::new(w.addr, w.prefix_len);
        self.hub_addr = w.hub_addr;
        self.mtu = w.mtu;
        for &(route, reason) in &w.refused {
            self.events.push_back(PeerEvent::RouteRefused { route, reason });
        }
        self.refused_routes = w.refused;
        self.rendezvous.registered(now);
        let dns_domain = w.dns_domain.filter(|d| self.takes_dns_domain(d));
        self.events.push_back(PeerEvent::Configured {
            link: l,
            addr: w.addr,
            prefix_len: w.prefix_len,
            hub_addr: w.hub_addr,
            mtu: w.mtu,
            dns_domain,
        });
        // the list this hub sent while it stood by is ours now
        if self.links[l].list_version != 0 {
            self.apply_list(now);
        }
    }

    /// Whether this peer routes lookups in `domain` (the hub's) to the hub: a private
    /// domain, and the one peer.yaml pins if it pins one (else said, `DnsDomainRefused`).
    fn takes_dns_domain(&mut self, domain: &str) -> bool {
        let pinned = self.cfg.dns_domain.as_ref();
        let ok = crate::dns::acceptable_vpn_domain(domain) && pinned.is_none_or(|p| p.eq_ignore_ascii_case(domain));
        if !ok {
            self.events.push_back(PeerEvent::DnsDomainRefused { domain: domain.into(), pinned: pinned.cloned() });
        }
        ok
    }

    pub(super) fn on_refusal(&mut self, now: Instant, l: usize, d: &[u8]) {
        let Ok(r) = RefusalRepr::parse(d, &self.cfg.key) else {
            self.drops.malformed += 1;
            return;
        };
        // only an answer to our own pending Register counts
        let link = &mut self.links[l];
        let State::Registering { attempt, next_try, .. } = &mut link.state else { return };
        if attempt.nonce != r.nonce {
            return;
        }
        match r.reason {
            RefusalReason::RegisteredElsewhere => {
                *next_try = now + SAME_HUB_RETRY;
                if !std::mem::replace(&mut link.same_hub, true) {
                    self.events.push_back(PeerEvent::SameHub { link: l });
                }
            }
            RefusalReason::MtuMismatch => self.events.push_back(PeerEvent::Fatal(HubRefusal::MtuMismatch {
                hub: r.hub_mtu,
                ours: self.cfg.mtu.unwrap_or(0),
            })),
            reason => self.events.push_back(PeerEvent::Refused(reason)),
        }
    }

    /// Hub link `l` is gone (or broke our link): it registers again. Direct sessions go on
    /// meanwhile.
    pub(super) fn lose_hub(&mut self, now: Instant, l: usize) {
        self.register_again(now, l);
        let remaining = self.links.iter().filter(|k| k.is_up()).count();
        self.events.push_back(PeerEvent::HubLost { link: l, remaining });
    }

    /// Hub link `l`'s registration is over: a new one, at once, asking for the address we
    /// had. If it was the active one, another that is up takes over.
    fn register_again(&mut self, now: Instant, l: usize) {
        let link = &mut self.links[l];
        link.relay_out.clear();
        link.introduced.clear();
        link.state = State::Registering { attempt: Attempt::new(&mut *self.entropy), next_try: now, lost: true };
        if l == self.active {
            if let Some(next) = (0..self.links.len()).find(|&i| self.links[i].is_up()) {
                self.activate(now, next, false);
            }
        }
    }

    /// A `Reset`: the hub no longer knows our registration (it restarted). Believed only
    /// for our registration and with the token the hub told it: register again at once,
    /// rather than after the heartbeat retries.
    pub(super) fn on_reset(&mut self, now: Instant, l: usize, d: &[u8]) {
        let Ok(r) = wire::ResetRepr::parse(d) else {
            self.drops.malformed += 1;
            return;
        };
        let link = &self.links[l];
        let State::Up(s) = &link.state else { return };
        let known = s.reset_token.is_some_and(|t| bool::from(subtle::ConstantTimeEq::ct_eq(&t[..], &r.token[..])));
        if r.peer_id != link.id || !known {
            self.drops.unauthenticated += 1;
            return;
        }
        self.register_again(now, l);
        self.events.push_back(PeerEvent::HubReset { link: l });
    }
}
