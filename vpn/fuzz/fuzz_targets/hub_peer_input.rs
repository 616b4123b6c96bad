//! Arbitrary bytes into the hub's per-peer input path: after a genuine registration,
//! every datagram from that peer's tunnel address (KCP segments, heartbeats, anything).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vpn::sim::raw::fuzz_peer_input(data);
});
