//! mpvpn: the VPN over the multipath tunnel (TUN + KCP, a hub with a peer registry).
//!
//! Not built yet: this crate is the placeholder for issue #3, which adds the sans-IO
//! hub/peer state machines here and the TUN + mio driver with the `mpvpn` CLI.
