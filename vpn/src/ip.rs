//! Just enough of IPv4/IPv6 to route: version, source, destination; and prefixes.
//!
//! IPv6 addresses inside the VPN are mapped from IPv4 ones (`fd6d:7074::a.b.c.d`, see
//! `v6_of`), so one IPv4 registry routes both families.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// `fd6d:7074::/96`: a ULA prefix ("mpt") whose last 32 bits are a peer's IPv4 address.
pub const V6_MAP_PREFIX: [u8; 12] = [0xfd, 0x6d, 0x70, 0x74, 0, 0, 0, 0, 0, 0, 0, 0];

pub fn v6_of(v4: Ipv4Addr) -> Ipv6Addr {
    let mut b = [0u8; 16];
    b[..12].copy_from_slice(&V6_MAP_PREFIX);
    b[12..].copy_from_slice(&v4.octets());
    Ipv6Addr::from(b)
}

/// The IPv4 address a mapped IPv6 address stands for.
pub fn v4_of(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let b = v6.octets();
    (b[..12] == V6_MAP_PREFIX).then(|| Ipv4Addr::new(b[12], b[13], b[14], b[15]))
}

/// Source and destination of an IP packet, checked.
pub fn addresses(packet: &[u8]) -> Option<(IpAddr, IpAddr)> {
    match packet.first()? >> 4 {
        4 if packet.len() >= 20 => {
            let ihl = (packet[0] & 0x0f) as usize * 4;
            if ihl < 20 || packet.len() < ihl {
                return None;
            }
            let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
            let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
            Some((src.into(), dst.into()))
        }
        6 if packet.len() >= 40 => {
            let mut s = [0u8; 16];
            let mut d = [0u8; 16];
            s.copy_from_slice(&packet[8..24]);
            d.copy_from_slice(&packet[24..40]);
            Some((Ipv6Addr::from(s).into(), Ipv6Addr::from(d).into()))
        }
        _ => None,
    }
}

/// An IPv4 prefix such as `192.168.50.0/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Prefix {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Prefix {
    pub fn new(addr: Ipv4Addr, len: u8) -> Option<Self> {
        (len <= 32).then(|| Self { addr: Ipv4Addr::from(u32::from(addr) & Self::mask(len)), len })
    }

    pub(crate) fn mask(len: u8) -> u32 {
        if len == 0 {
            0
        } else {
            u32::MAX << (32 - len as u32)
        }
    }

    pub fn contains(&self, a: Ipv4Addr) -> bool {
        u32::from(a) & Self::mask(self.len) == u32::from(self.addr)
    }

    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(Self::mask(self.len))
    }

    /// The n-th address in the prefix (n = 0 is the network address).
    pub fn nth(&self, n: u32) -> Option<Ipv4Addr> {
        let size = if self.len == 0 { u64::from(u32::MAX) + 1 } else { 1u64 << (32 - self.len as u32) };
        (u64::from(n) < size).then(|| Ipv4Addr::from(u32::from(self.addr) + n))
    }

    /// Every address of `other` is in this prefix.
    pub fn covers(&self, other: &Prefix) -> bool {
        self.len <= other.len && self.contains(other.addr)
    }

    /// Some address is in both.
    pub fn overlaps(&self, other: &Prefix) -> bool {
        self.covers(other) || other.covers(self)
    }

    /// The prefix's last address (its broadcast address on a LAN).
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !Self::mask(self.len))
    }

    /// A host address: inside, and neither the network nor the broadcast address.
    pub fn is_host(&self, a: Ipv4Addr) -> bool {
        self.contains(a) && a != self.addr && a != self.broadcast()
    }

    pub fn size(&self) -> u64 {
        1u64 << (32 - self.len as u32)
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Why text is not a prefix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    #[error("`{0}` is not addr/len")]
    NoLength(String),
    #[error("`{0}` is not an IPv4 address")]
    Address(String),
    #[error("`{0}` is not a prefix length")]
    Length(String),
    #[error("prefix length {0} > 32")]
    TooLong(u8),
}

impl std::str::FromStr for Prefix {
    type Err = PrefixError;
    fn from_str(s: &str) -> Result<Self, PrefixError> {
        let (a, l) = s.split_once('/').ok_or_else(|| PrefixError::NoLength(s.into()))?;
        let addr: Ipv4Addr = a.parse().map_err(|_| PrefixError::Address(a.into()))?;
        let len: u8 = l.parse().map_err(|_| PrefixError::Length(l.into()))?;
        Prefix::new(addr, len).ok_or(PrefixError::TooLong(len))
    }
}

impl TryFrom<String> for Prefix {
    type Error = PrefixError;
    fn try_from(s: String) -> Result<Self, PrefixError> {
        s.parse()
    }
}

impl From<Prefix> for String {
    fn from(p: Prefix) -> String {
        p.to_string()
    }
}

/// The IPv4 address an inner address stands for: itself, or the one a mapped IPv6
/// address carries (`v6_of`).
pub fn v4_in(a: IpAddr) -> Option<Ipv4Addr> {
    match a {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(a) => v4_of(a),
    }
}

/// Whether a packet from a peer whose VPN address is `addr` and whose accepted routes are
/// `routes` may carry the inner source `src`: inside the VPN `network` only its own address
/// (or its IPv6 mapping); outside it, an address inside one of its routes. Routes vouch
/// only for what is beyond the peer: an exit node's default route never makes it the hub
/// or another peer. The one source check of the hub and the mesh.
pub fn source_of_peer(src: IpAddr, network: Prefix, addr: Ipv4Addr, routes: &[Prefix]) -> bool {
    match src {
        IpAddr::V4(s) if network.contains(s) => s == addr,
        IpAddr::V4(s) => routes.iter().any(|r| r.contains(s)),
        IpAddr::V6(s) => v4_of(s) == Some(addr),
    }
}

/// Whether a packet for `dst` is for a peer whose VPN address is `addr` and whose accepted
/// routes are `routes`: its own address (or its IPv6 mapping), or inside one of those
/// routes. What a peer takes from a direct session: no more than the hub would route to it.
pub fn destination_of_peer(dst: IpAddr, addr: Ipv4Addr, routes: &[Prefix]) -> bool {
    match dst {
        IpAddr::V4(d) => d == addr || routes.iter().any(|r| r.contains(d)),
        IpAddr::V6(d) => v4_of(d) == Some(addr),
    }
}

/// Where IPv4 destinations go: exact host addresses first, then the longest prefix that
/// covers the destination. A lookup costs one hash probe per distinct prefix length, not a
/// scan of every peer. The one table of the hub and the peer.
#[derive(Debug, Clone)]
pub struct RouteTable<T> {
    hosts: std::collections::HashMap<Ipv4Addr, T>,
    prefixes: std::collections::HashMap<(u8, u32), T>,
    /// The prefix lengths present, longest first.
    lengths: Vec<u8>,
}

impl<T> Default for RouteTable<T> {
    fn default() -> Self {
        Self { hosts: Default::default(), prefixes: Default::default(), lengths: Vec::new() }
    }
}

impl<T: Copy> RouteTable<T> {
    /// `addr` is `to`'s own (found before any prefix).
    pub fn insert_host(&mut self, addr: Ipv4Addr, to: T) {
        self.hosts.insert(addr, to);
    }

    /// `p` leads to `to` (the last insert of one prefix wins).
    pub fn insert_prefix(&mut self, p: Prefix, to: T) {
        self.prefixes.insert((p.len, u32::from(p.addr)), to);
        if let Err(i) = self.lengths.binary_search_by(|l| p.len.cmp(l)) {
            self.lengths.insert(i, p.len);
        }
    }

    /// Whether `addr` is someone's own address.
    pub fn has_host(&self, addr: Ipv4Addr) -> bool {
        self.hosts.contains_key(&addr)
    }

    /// What `addr` itself (not a route covering it) goes to.
    pub fn host(&self, addr: Ipv4Addr) -> Option<&T> {
        self.hosts.get(&addr)
    }

    /// Where `dst` goes: its host, else (unless `dst` is inside `own_network`, whose
    /// addresses a route never reaches: an exit node's /0) the longest covering prefix.
    pub fn lookup(&self, dst: Ipv4Addr, own_network: Option<Prefix>) -> Option<T> {
        if let Some(&to) = self.hosts.get(&dst) {
            return Some(to);
        }
        if own_network.is_some_and(|n| n.contains(dst)) {
            return None;
        }
        self.lengths.iter().find_map(|&len| {
            let key = u32::from(dst) & Prefix::mask(len);
            self.prefixes.get(&(len, key)).copied()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        let p: Prefix = "10.99.0.7/24".parse().unwrap();
        assert_eq!(p.to_string(), "10.99.0.0/24");
        assert!(p.contains("10.99.0.200".parse().unwrap()));
        assert!(!p.contains("10.99.1.1".parse().unwrap()));
        assert_eq!(p.nth(1), Some("10.99.0.1".parse().unwrap()));
        assert_eq!(p.nth(256), None);
        assert_eq!(p.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert!("10.0.0.0/33".parse::<Prefix>().is_err());
        assert!("nope/8".parse::<Prefix>().is_err());
        let all: Prefix = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(1, 2, 3, 4)));
    }

    #[test]
    fn packet_addresses() {
        let mut v4 = [0u8; 20];
        v4[0] = 0x45;
        v4[12..16].copy_from_slice(&[10, 99, 0, 2]);
        v4[16..20].copy_from_slice(&[10, 99, 0, 3]);
        assert_eq!(addresses(&v4), Some((Ipv4Addr::new(10, 99, 0, 2).into(), Ipv4Addr::new(10, 99, 0, 3).into())));
        assert_eq!(addresses(&v4[..19]), None);
        v4[0] = 0x44; // IHL too small
        assert_eq!(addresses(&v4), None);
        let mut v6 = [0u8; 40];
        v6[0] = 0x60;
        v6[8..24].copy_from_slice(&v6_of(Ipv4Addr::new(10, 99, 0, 2)).octets());
        let (s, _) = addresses(&v6).unwrap();
        let IpAddr::V6(s) = s else { panic!() };
        assert_eq!(v4_of(s), Some(Ipv4Addr::new(10, 99, 0, 2)));
        assert_eq!(addresses(&[]), None);
        assert_eq!(addresses(&[0x70; 60]), None);
    }

    #[test]
    fn route_table_longest_prefix_and_hosts() {
        let mut t = RouteTable::default();
        let p = |s: &str| s.parse::<Prefix>().unwrap();
        t.insert_prefix(p("0.0.0.0/0"), 1);
        t.insert_prefix(p("10.82.0.0/16"), 2);
        t.insert_prefix(p("10.82.1.0/25"), 3);
        t.insert_host(Ipv4Addr::new(10, 99, 0, 5), 4);
        let net = Some(p("10.99.0.0/24"));
        assert_eq!(t.lookup(Ipv4Addr::new(10, 82, 1, 2), net), Some(3));
        assert_eq!(t.lookup(Ipv4Addr::new(10, 82, 1, 200), net), Some(2));
        assert_eq!(t.lookup(Ipv4Addr::new(8, 8, 8, 8), net), Some(1));
        assert_eq!(t.lookup(Ipv4Addr::new(10, 99, 0, 5), net), Some(4));
        // the VPN's own addresses are never reached through a route
        assert_eq!(t.lookup(Ipv4Addr::new(10, 99, 0, 6), net), None);
        assert_eq!(t.lookup(Ipv4Addr::new(10, 99, 0, 6), None), Some(1));
    }
}
