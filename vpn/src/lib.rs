//! mpvpn: the VPN over the multipath tunnel (TUN + KCP, a hub with a peer registry).
//!
//! `hub` and `peer` are sans-IO state machines (time and bytes in; datagrams, TUN packets
//! and events out); `driver` runs them on a TUN device and a UDP socket towards the local
//! mpclient/mpserver. `sim` (the test-only `sim` feature) runs the cores together on a
//! fake clock.

#![warn(clippy::too_many_lines)]

pub mod channel;
pub mod cli;
pub mod config;
pub mod dns;
pub mod driver;
mod drops;
pub mod hub;
pub mod ip;
pub mod kcplink;
pub mod mesh;
pub mod onboard;
pub mod peer;
pub mod queue;
pub mod resolver;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
pub mod wire;

use common::config::ConfigError;
use common::driver::DriverError;

/// What stops `mpvpn hub` or `mpvpn peer`.
#[derive(Debug, thiserror::Error)]
pub enum VpnError {
    #[error(transparent)]
    Driver(#[from] DriverError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Key(#[from] config::PeerKeyError),
    #[error("peer {0}: no key")]
    NoPeerKey(String),
    #[error("creating TUN device {name}: {source} (needs root or CAP_NET_ADMIN)")]
    TunCreate { name: String, source: tun::Error },
    #[error("TUN {name}: {source}")]
    Tun { name: String, source: tun::Error },
    #[error("{what}: {source}")]
    Netlink { what: String, source: std::io::Error },
    /// The hub's state file cannot be read or written.
    #[error("{0}")]
    StateFile(String),
    /// `cluster:` names files that cannot be used (changed since hub.yaml was checked).
    #[error("{0}")]
    Cluster(String),
    /// The hub refused this peer for good (e.g. an MTU mismatch).
    #[error(transparent)]
    Hub(#[from] peer::HubRefusal),
}

/// TUN MTU: one inner packet must fit one tunnel datagram inside a 1500-byte outer MTU.
/// 1500 - 20 (IPv4) - 8 (UDP) = 1472 bytes of UDP payload between tunnel hosts, minus the
/// tunnel's own overhead, is what one tunnel datagram carries ...
pub const TUNNEL_PAYLOAD: usize = 1500 - 20 - 8 - common::wire::TUNNEL_OVERHEAD;
/// ... minus the sealing of the peer's channel (header and tag), the sealed kind byte,
/// the KCP header and the inner kind byte.
pub const VPN_OVERHEAD: usize = wire::SEALED_OVERHEAD + 1 + kcplink::KCP_HEADER_LEN + 1;
pub const TUN_MTU: u16 = (TUNNEL_PAYLOAD - VPN_OVERHEAD) as u16;
/// The largest MTU a hub may set: the default before redundancy modes, for networks with
/// older peers (a packet above `TUN_MTU` then takes two KCP segments).
pub const PLAIN_TUN_MTU: u16 = TUN_MTU + (common::wire::TUNNEL_OVERHEAD - common::wire::PLAIN_TUNNEL_OVERHEAD) as u16;

#[cfg(test)]
mod tests {
    #[test]
    fn mtu_is_derived() {
        // the tunnel's overhead covers a coding group's parity shard (redundancy modes):
        // 12 bytes more than a plain copy's, so the MTU is 1371 (1383 before them; a hub
        // or peer that must talk to older ones sets `mtu: 1383`)
        assert_eq!(super::TUNNEL_PAYLOAD, 1426);
        assert_eq!(super::TUN_MTU, 1371);
        assert_eq!(super::PLAIN_TUN_MTU, 1383);
    }
}
