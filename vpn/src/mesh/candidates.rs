//! Host candidates and direct paths: where a peer's mesh sockets may be reached, and
//! which (socket × candidate) pairs a pair's client tries.

use super::*;

/// The host candidates of mesh sockets bound to `locals`, on a host whose interfaces
/// have `interfaces` (name, address): a socket bound to one address is reachable there;
/// one bound to the wildcard on every address of its family but loopback, link-local and
/// the VPN's own (on `tun`).
pub fn host_candidates(locals: &[SocketAddr], interfaces: &[(String, IpAddr)], tun: &str) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for local in locals {
        if !local.ip().is_unspecified() {
            out.push(*local);
            continue;
        }
        for (name, ip) in interfaces {
            let candidate = SocketAddr::new(*ip, local.port());
            if name != tun
                && is_host_candidate(candidate, None)
                && ip.is_ipv4() == local.is_ipv4()
                && !out.contains(&candidate)
            {
                out.push(candidate);
            }
        }
    }
    out
}

/// Whether `a` can be a host candidate, on this peer (it lists its addresses) and at the
/// hub (it takes a peer's list): a port, and an address another host can reach: not
/// unspecified, loopback, link-local, multicast or broadcast, and not one of the VPN's
/// own (`vpn_network`; the peer leaves out its TUN device's addresses instead).
pub fn is_host_candidate(a: SocketAddr, vpn_network: Option<Prefix>) -> bool {
    let reachable = match unmapped(a.ip()) {
        IpAddr::V4(v4) => {
            !(v4.is_unspecified()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast()
                || vpn_network.is_some_and(|n| n.contains(v4)))
        }
        IpAddr::V6(v6) => {
            !(v6.is_unspecified() || v6.is_loopback() || v6.is_multicast() || (v6.segments()[0] & 0xffc0) == 0xfe80)
        }
    };
    a.port() != 0 && reachable
}

/// `::ffff:a.b.c.d` as the IPv4 address it is (checks see what a dual-stack socket would
/// really send to).
pub fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether the hub lists host candidate `a` of a peer whose mesh sockets the rendezvous
/// port saw at `reflexive`: a private (RFC 1918, shared RFC 6598) or unique local address,
/// or one of the peer's own public addresses. Anything else would let one peer make every
/// other punch where it says (any host on the Internet, any port).
pub fn listable_host_candidate(a: SocketAddr, reflexive: &[IpAddr]) -> bool {
    let ip = unmapped(a.ip());
    let private = match ip {
        IpAddr::V4(v4) => v4.is_private() || (v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xfe00) == 0xfc00,
    };
    private || reflexive.iter().any(|r| unmapped(*r) == ip)
}

/// Every (mesh socket × candidate) of the same address family, at most
/// `MAX_DIRECT_PATHS`.
pub fn direct_paths(sockets: &[SocketAddr], candidates: &[SocketAddr]) -> Vec<(usize, SocketAddr)> {
    sockets
        .iter()
        .enumerate()
        .flat_map(|(i, s)| candidates.iter().filter(|c| c.is_ipv4() == s.is_ipv4()).map(move |&c| (i, c)))
        .take(MAX_DIRECT_PATHS)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Before, a peer could announce any address as a host candidate (169.254.169.254,
    /// a public host, `::ffff:127.0.0.1` for a dual-stack socket's own loopback) and the
    /// hub listed it: every other peer punched there.
    #[test]
    fn the_hub_lists_only_private_or_own_host_candidates() {
        let a = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let seen: Vec<IpAddr> = vec!["198.51.100.7".parse().unwrap()];
        assert!(!is_host_candidate(a("[::ffff:127.0.0.1]:22"), None), "mapped loopback");
        assert!(!is_host_candidate(a("169.254.169.254:80"), None));
        for ok in ["10.1.2.3:5100", "172.16.0.9:5100", "192.168.1.2:5100", "100.64.1.1:5100", "[fd00::5]:5100"] {
            assert!(listable_host_candidate(a(ok), &seen), "{ok}");
        }
        assert!(listable_host_candidate(a("198.51.100.7:5100"), &seen), "its own public address");
        assert!(listable_host_candidate(a("[::ffff:192.168.1.2]:5100"), &seen));
        for bad in ["203.0.113.5:53", "8.8.8.8:5100", "[2001:db8::1]:5100", "[::ffff:203.0.113.5]:5100"] {
            assert!(!listable_host_candidate(a(bad), &seen), "{bad}");
        }
    }

    #[test]
    fn host_candidates_are_this_hosts_reachable_addresses() {
        let ifs: Vec<(String, IpAddr)> = [
            ("lo", "127.0.0.1"),
            ("eth0", "192.0.2.10"),
            ("eth0", "fe80::1"),
            ("eth0", "2001:db8::10"),
            ("wlan0", "169.254.3.3"),
            ("wlan0", "10.1.1.5"),
            ("mpvpn0", "10.99.0.2"),
        ]
        .iter()
        .map(|(n, a)| (n.to_string(), a.parse().unwrap()))
        .collect();
        let any4: Vec<SocketAddr> = vec!["0.0.0.0:5100".parse().unwrap()];
        let want: Vec<SocketAddr> = vec!["192.0.2.10:5100".parse().unwrap(), "10.1.1.5:5100".parse().unwrap()];
        assert_eq!(host_candidates(&any4, &ifs, "mpvpn0"), want);
        let any6: Vec<SocketAddr> = vec!["[::]:5101".parse().unwrap()];
        assert_eq!(host_candidates(&any6, &ifs, "mpvpn0"), vec!["[2001:db8::10]:5101".parse::<SocketAddr>().unwrap()]);
        // a socket bound to one address is reachable there only
        let bound: Vec<SocketAddr> = vec!["10.1.1.5:5100".parse().unwrap()];
        assert_eq!(host_candidates(&bound, &ifs, "mpvpn0"), bound);
    }

    #[test]
    fn direct_paths_pair_sockets_and_candidates_of_one_family() {
        let sockets: Vec<SocketAddr> = vec!["0.0.0.0:5100".parse().unwrap(), "[::]:5101".parse().unwrap()];
        let c: Vec<SocketAddr> = vec![
            "198.51.100.2:5100".parse().unwrap(),
            "[2001:db8::2]:5100".parse().unwrap(),
            "10.0.0.2:5100".parse().unwrap(),
        ];
        assert_eq!(direct_paths(&sockets, &c), vec![(0, c[0]), (0, c[2]), (1, c[1])]);
        let many: Vec<SocketAddr> = (0..40).map(|i| SocketAddr::from(([10, 0, 0, i], 1))).collect();
        assert_eq!(direct_paths(&sockets, &many).len(), MAX_DIRECT_PATHS);
    }
}
