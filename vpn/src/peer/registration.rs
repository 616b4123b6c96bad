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

    pub(super) fn send_register(&mut self, wall_ms: u64) {
        let State::Registering { attempt, .. } = &self.state else { return };
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
        self.transmit.push_back(reg.emit(&self.cfg.key));
    }

    pub(super) fn on_welcome(&mut self, now: Instant, d: &[u8]) {
        let State::Registering { attempt, .. } = &mut self.state else {
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
            self.state = State::Registering { attempt: Attempt::new(&mut *self.entropy), next_try: now, lost: false };
            return;
        };
        self.keep_pairs(now, w.addr);
        self.addr = w.addr;
        self.network = Prefix::new(w.addr, w.prefix_len);
        self.hub_addr = w.hub_addr;
        self.mtu = w.mtu;
        self.last_ack = Some(now);
        for &(route, reason) in &w.refused {
            self.events.push_back(PeerEvent::RouteRefused { route, reason });
        }
        self.refused_routes = w.refused;
        self.state =
            State::Up(Box::new(Session::new(channel, KcpLink::new(w.peer_id, now, self.cfg.tunnel_payload), now)));
        self.id = w.peer_id;
        self.list_version = 0;
        if self.cfg.peer_list_deltas {
            self.send_peers_want(0);
        }
        self.send_candidates();
        self.rendezvous.registered(now);
        // the first sealed datagram is what makes the hub use this registration: now
        self.send_heartbeat(now);
        let dns_domain = w.dns_domain.filter(|d| self.takes_dns_domain(d));
        self.events.push_back(PeerEvent::Configured {
            addr: w.addr,
            prefix_len: w.prefix_len,
            hub_addr: w.hub_addr,
            mtu: w.mtu,
            dns_domain,
        });
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

    pub(super) fn on_refusal(&mut self, d: &[u8]) {
        let Ok(r) = RefusalRepr::parse(d, &self.cfg.key) else {
            self.drops.malformed += 1;
            return;
        };
        // only an answer to our own pending Register counts
        match (&self.state, r.reason) {
            (State::Registering { attempt, .. }, _) if attempt.nonce == r.nonce => {}
            _ => return,
        }
        match (&self.state, r.reason) {
            (_, RefusalReason::MtuMismatch) => self.events.push_back(PeerEvent::Fatal(HubRefusal::MtuMismatch {
                hub: r.hub_mtu,
                ours: self.cfg.mtu.unwrap_or(0),
            })),
            (_, reason) => self.events.push_back(PeerEvent::Refused(reason)),
        }
    }

    /// The hub is gone (or broke our link): register again. Direct sessions go on
    /// meanwhile; the next registration's list replaces them.
    pub(super) fn lose_hub(&mut self, now: Instant) {
        self.register_again(now);
        self.events.push_back(PeerEvent::HubLost);
    }

    /// Our registration is over: a new one, at once, asking for the address we had.
    fn register_again(&mut self, now: Instant) {
        self.relay_out.clear();
        self.state = State::Registering { attempt: Attempt::new(&mut *self.entropy), next_try: now, lost: true };
    }

    /// A `Reset`: the hub no longer knows our registration (it restarted). Believed only
    /// for our registration and with the token the hub told it: register again at once,
    /// rather than after the heartbeat retries.
    pub(super) fn on_reset(&mut self, now: Instant, d: &[u8]) {
        let Ok(r) = wire::ResetRepr::parse(d) else {
            self.drops.malformed += 1;
            return;
        };
        let State::Up(s) = &self.state else { return };
        let known = s.reset_token.is_some_and(|t| bool::from(subtle::ConstantTimeEq::ct_eq(&t[..], &r.token[..])));
        if r.peer_id != self.id || !known {
            self.drops.unauthenticated += 1;
            return;
        }
        self.register_again(now);
        self.events.push_back(PeerEvent::HubReset);
    }
}
