//! mpvpn: the VPN over the multipath tunnel (TUN + KCP, a hub with a peer registry).
//!
//! `hub` and `peer` are sans-IO state machines (time and bytes in; datagrams, TUN packets
//! and events out); `driver` runs them on a TUN device and a UDP socket towards the local
//! mpclient/mpserver.

pub mod config;
pub mod driver;
pub mod hub;
pub mod ip;
pub mod kcplink;
pub mod peer;
pub mod queue;
pub mod wire;

/// TUN MTU: one inner packet must fit one tunnel datagram inside a 1500-byte outer MTU.
/// 1500 - 20 (IPv4) - 8 (UDP) = 1472 bytes of UDP payload between tunnel hosts, minus the
/// tunnel's own overhead, is what one tunnel datagram carries ...
pub const TUNNEL_PAYLOAD: usize = 1500 - 20 - 8 - common::wire::TUNNEL_OVERHEAD;
/// ... minus our message type byte, the KCP header and the inner kind byte.
pub const VPN_OVERHEAD: usize = 1 + kcplink::KCP_HEADER_LEN + 1;
pub const TUN_MTU: u16 = (TUNNEL_PAYLOAD - VPN_OVERHEAD) as u16;

#[cfg(test)]
mod tests {
    #[test]
    fn mtu_is_derived() {
        assert_eq!(super::TUNNEL_PAYLOAD, 1438);
        assert_eq!(super::TUN_MTU, 1412);
    }
}
