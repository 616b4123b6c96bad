//! The simulated internet's NATs: what source a peer's datagram has once out, and what a
//! NAT lets in (only what its host sent to first).

use super::SimPeer;
use std::net::{Ipv4Addr, SocketAddr};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Nat {
    /// A public address: the mesh socket is reachable as it is bound.
    None,
    /// Linux `masquerade`: one mapping for every destination.
    EndpointIndependent,
    /// `masquerade random`: a new mapping per destination.
    Symmetric,
}

/// Where NATs map from unless told otherwise.
pub const NAT_PORT_BASE: u16 = 40000;

impl Nat {
    /// Host number `i`'s mesh socket behind this NAT: public 198.51.100.(i+1), or private
    /// 192.168.(i+1).2, port 5100 (host numbers repeat after `MAX_HOSTS`).
    pub fn local(self, i: usize) -> SocketAddr {
        let n = host_octet(i);
        match self {
            Nat::None => SocketAddr::from(([198, 51, 100, n], 5100)),
            _ => SocketAddr::from(([192, 168, n, 2], 5100)),
        }
    }

    /// Host number `i`'s public address behind this NAT.
    pub fn public_ip(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(203, 0, 113, host_octet(i))
    }
}

/// Distinct addresses the NAT model gives hosts.
pub const MAX_HOSTS: usize = 250;

fn host_octet(i: usize) -> u8 {
    (i % MAX_HOSTS) as u8 + 1
}

impl SimPeer {
    /// The source this host's datagram to `to` has once out of its NAT (making the
    /// mapping if there is none).
    pub(super) fn nat_source(&mut self, to: SocketAddr) -> SocketAddr {
        let next_port = self.port_base + self.mappings.len() as u16;
        match self.nat {
            Nat::None => self.local,
            Nat::EndpointIndependent => {
                let ext = SocketAddr::from((self.public_ip, self.port_base));
                *self.mappings.entry(to).or_insert(ext)
            }
            Nat::Symmetric => *self.mappings.entry(to).or_insert(SocketAddr::from((self.public_ip, next_port))),
        }
    }

    /// Whether a datagram from `from` to `to` reaches this host.
    pub(super) fn admits(&self, from: SocketAddr, to: SocketAddr) -> bool {
        match self.nat {
            Nat::None => self.local == to,
            // a mapping to `to` exists, and it was made by sending to `from`
            _ => self.mappings.get(&from) == Some(&to),
        }
    }
}
