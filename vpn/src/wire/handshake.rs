//! The registration exchange in clear: Register (MAC under the peer's key), Welcome and
//! Refusal (MAC under it, bound to the Register's ephemeral key).

use super::*;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterRepr {
    pub name: String,
    pub timestamp_ms: u64,
    pub nonce: u64,
    /// The address the peer had before (0.0.0.0 = any): peers keep theirs across hub restarts.
    pub want_addr: Ipv4Addr,
    /// The TUN MTU the peer is configured for; 0 = whatever the hub announces.
    pub mtu: u16,
    /// The peer's ephemeral X25519 key for this registration.
    pub public: [u8; PUBLIC_KEY_LEN],
    pub routes: Vec<Prefix>,
    /// Drawn once per peer process (0: a peer that does not tell it): every hub of a
    /// cluster gives a pair of the same two processes the same key.
    pub instance: u64,
}

impl RegisterRepr {
    pub fn emit(&self, key: &PeerKey) -> Vec<u8> {
        use field::register as f;
        let mut out = vec![MSG_REGISTER, self.name.len() as u8];
        out.extend_from_slice(self.name.as_bytes());
        let mut fixed = [0u8; f::ROUTES];
        put_u64(&mut fixed, f::TIMESTAMP, self.timestamp_ms);
        put_u64(&mut fixed, f::NONCE, self.nonce);
        fixed[f::WANT_ADDR].copy_from_slice(&self.want_addr.octets());
        put_u16(&mut fixed, f::MTU, self.mtu);
        fixed[f::PUBLIC].copy_from_slice(&self.public);
        out.extend_from_slice(&fixed);
        put_routes(&mut out, &self.routes);
        if self.instance != 0 {
            out.extend_from_slice(&self.instance.to_be_bytes());
        }
        let tag = key.tag(&[&out]);
        out.extend_from_slice(tag.as_ref());
        out
    }

    /// Parses without checking the MAC (the key depends on the name); returns the repr
    /// and the MAC-covered length.
    pub fn parse(b: &[u8]) -> Result<(Self, usize), VpnWireError> {
        use field::register as f;
        match b.first() {
            None => return Err(VpnWireError::Truncated),
            Some(&MSG_REGISTER) => {}
            Some(_) => return Err(VpnWireError::Unknown),
        }
        let (name, name_end) = name_at(b, f::NAME_LEN)?;
        let fixed = region(b, name_end, f::ROUTES)?;
        let (routes, routes_end) = routes_at(b, name_end + f::ROUTES)?;
        // the instance is optional (peers before it end with the routes)
        let (instance, body) = match b.len() - routes_end {
            MAC_LEN => (0, routes_end),
            n if n == MAC_LEN + 8 => (u64_at(b, routes_end..routes_end + 8), routes_end + 8),
            _ => return Err(VpnWireError::Truncated),
        };
        let repr = Self {
            name: name.to_string(),
            timestamp_ms: u64_at(fixed, f::TIMESTAMP),
            nonce: u64_at(fixed, f::NONCE),
            want_addr: ipv4_at(fixed, f::WANT_ADDR),
            mtu: u16_at(fixed, f::MTU),
            public: public_at(fixed, f::PUBLIC),
            routes,
            instance,
        };
        Ok((repr, body))
    }

    pub fn verify(b: &[u8], body: usize, key: &PeerKey) -> Result<(), VpnWireError> {
        key.verify(&[&b[..body]], &b[body..])
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WelcomeRepr {
    pub peer_id: u32,
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
    pub hub_addr: Ipv4Addr,
    pub mtu: u16,
    pub nonce: u64,
    /// The hub's ephemeral X25519 key for this registration.
    pub public: [u8; PUBLIC_KEY_LEN],
    /// Announced routes the hub did not take, and why (at most MAX_REFUSED_IN_WELCOME).
    pub refused: Vec<(Prefix, RouteRefusalReason)>,
    /// The domain whose names (`<peer>.<domain>`) the hub answers on its address.
    pub dns_domain: Option<String>,
}

impl WelcomeRepr {
    /// `register_public`: the public key of the Register this answers (the MAC covers it).
    pub fn emit(&self, key: &PeerKey, register_public: &[u8; PUBLIC_KEY_LEN]) -> Vec<u8> {
        use field::welcome as f;
        let refused = &self.refused[..self.refused.len().min(MAX_REFUSED_IN_WELCOME)];
        let mut b = vec![0u8; f::REFUSED];
        b[field::TYPE] = MSG_WELCOME;
        put_u32(&mut b, f::PEER_ID, self.peer_id);
        b[f::ADDR].copy_from_slice(&self.addr.octets());
        b[f::PREFIX_LEN] = self.prefix_len;
        b[f::HUB_ADDR].copy_from_slice(&self.hub_addr.octets());
        put_u16(&mut b, f::MTU, self.mtu);
        put_u64(&mut b, f::NONCE, self.nonce);
        b[f::PUBLIC].copy_from_slice(&self.public);
        b[f::N_REFUSED] = refused.len() as u8;
        for (route, reason) in refused {
            let mut e = [0u8; f::REFUSED_LEN];
            e[f::REFUSED_ADDR].copy_from_slice(&route.addr.octets());
            e[f::REFUSED_PREFIX_LEN] = route.len;
            e[f::REFUSED_REASON] = *reason as u8;
            b.extend_from_slice(&e);
        }
        let dns = self.dns_domain.as_deref().unwrap_or("").as_bytes();
        let dns = &dns[..dns.len().min(MAX_DNS_DOMAIN_LEN)];
        b.push(dns.len() as u8);
        b.extend_from_slice(dns);
        let tag = key.tag(&[&b, register_public]);
        b.extend_from_slice(tag.as_ref());
        b
    }

    /// Parses a Welcome that must answer the Register with `register_public`.
    pub fn parse(b: &[u8], key: &PeerKey, register_public: &[u8; PUBLIC_KEY_LEN]) -> Result<Self, VpnWireError> {
        use field::welcome as f;
        match b.first() {
            None => return Err(VpnWireError::Truncated),
            Some(&MSG_WELCOME) => {}
            Some(_) => return Err(VpnWireError::Unknown),
        }
        let head = region(b, 0, f::REFUSED)?;
        let n = head[f::N_REFUSED] as usize;
        if n > MAX_REFUSED_IN_WELCOME {
            return Err(VpnWireError::BadField);
        }
        let refused_end = f::REFUSED + n * f::REFUSED_LEN;
        let dns_len = *b.get(refused_end).ok_or(VpnWireError::Truncated)? as usize;
        if dns_len > MAX_DNS_DOMAIN_LEN {
            return Err(VpnWireError::BadField);
        }
        let body = refused_end + 1 + dns_len;
        if b.len() != body + MAC_LEN {
            return Err(VpnWireError::Truncated);
        }
        key.verify(&[&b[..body], register_public], &b[body..])?;
        let dns = std::str::from_utf8(&b[refused_end + 1..body]).map_err(|_| VpnWireError::BadField)?;
        let refused = b[f::REFUSED..refused_end]
            .chunks_exact(f::REFUSED_LEN)
            .map(|e| {
                let route = Prefix::new(ipv4_at(e, f::REFUSED_ADDR), e[f::REFUSED_PREFIX_LEN]);
                let reason = match e[f::REFUSED_REASON] {
                    1 => Some(RouteRefusalReason::NotAllowed),
                    2 => Some(RouteRefusalReason::OverlapsNetwork),
                    _ => None,
                };
                route.zip(reason).ok_or(VpnWireError::BadField)
            })
            .collect::<Result<_, _>>()?;
        let w = Self {
            peer_id: u32_at(head, f::PEER_ID),
            addr: ipv4_at(head, f::ADDR),
            prefix_len: head[f::PREFIX_LEN],
            hub_addr: ipv4_at(head, f::HUB_ADDR),
            mtu: u16_at(head, f::MTU),
            nonce: u64_at(head, f::NONCE),
            public: public_at(head, f::PUBLIC),
            refused,
            dns_domain: (!dns.is_empty()).then(|| dns.to_string()),
        };
        if w.prefix_len > 32 {
            return Err(VpnWireError::BadField);
        }
        Ok(w)
    }
}

/// Why the hub refused an authenticated Register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RefusalReason {
    MtuMismatch = 1,
    PoolExhausted = 2,
    /// The hubs' shared store (etcd) does not answer: a new name gets no address now.
    StoreUnavailable = 3,
    /// This peer process is registered with this hub through another of its tunnels
    /// (two `hubs:` entries reach one hub): one registration per process and hub.
    RegisteredElsewhere = 4,
}

impl std::fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::MtuMismatch => "MTU mismatch",
            Self::PoolExhausted => "address pool exhausted",
            Self::StoreUnavailable => "cluster store unavailable (a new name gets no address until etcd answers)",
            Self::RegisteredElsewhere => "registered with this hub through another of this peer's tunnels already",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefusalRepr {
    pub reason: RefusalReason,
    pub hub_mtu: u16,
    pub nonce: u64,
}

impl RefusalRepr {
    pub fn emit(&self, key: &PeerKey) -> [u8; REFUSAL_LEN] {
        use field::refusal as f;
        let mut b = [0u8; REFUSAL_LEN];
        b[field::TYPE] = MSG_REFUSAL;
        b[f::REASON] = self.reason as u8;
        put_u16(&mut b, f::HUB_MTU, self.hub_mtu);
        put_u64(&mut b, f::NONCE, self.nonce);
        let tag = key.tag(&[&b[..f::MAC.start]]);
        b[f::MAC].copy_from_slice(tag.as_ref());
        b
    }

    pub fn parse(b: &[u8], key: &PeerKey) -> Result<Self, VpnWireError> {
        use field::refusal as f;
        let b = checked(b, MSG_REFUSAL, REFUSAL_LEN)?;
        key.verify(&[&b[..f::MAC.start]], &b[f::MAC])?;
        let reason = match b[f::REASON] {
            1 => RefusalReason::MtuMismatch,
            2 => RefusalReason::PoolExhausted,
            3 => RefusalReason::StoreUnavailable,
            4 => RefusalReason::RegisteredElsewhere,
            _ => return Err(VpnWireError::BadField),
        };
        Ok(Self { reason, hub_mtu: u16_at(b, f::HUB_MTU), nonce: u64_at(b, f::NONCE) })
    }
}

/// The hub does not know registration `peer_id` (it restarted, or let it go): register
/// again. Believed only with the token that registration was told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResetRepr {
    pub peer_id: u32,
    pub token: [u8; RESET_TOKEN_LEN],
}

impl ResetRepr {
    pub fn emit(&self) -> [u8; RESET_LEN] {
        use field::reset as f;
        let mut b = [0u8; RESET_LEN];
        b[field::TYPE] = MSG_RESET;
        put_u32(&mut b, f::PEER_ID, self.peer_id);
        b[f::TOKEN].copy_from_slice(&self.token);
        b
    }

    pub fn parse(b: &[u8]) -> Result<Self, VpnWireError> {
        use field::reset as f;
        let b = checked(b, MSG_RESET, RESET_LEN)?;
        let mut token = [0u8; RESET_TOKEN_LEN];
        token.copy_from_slice(&b[f::TOKEN]);
        Ok(Self { peer_id: u32_at(b, f::PEER_ID), token })
    }
}

/// Why the hub did not take an announced route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
#[repr(u8)]
pub enum RouteRefusalReason {
    /// hub.yaml does not allow this peer that subnet (`routes:` under its entry).
    NotAllowed = 1,
    /// It overlaps the VPN network itself.
    OverlapsNetwork = 2,
}
