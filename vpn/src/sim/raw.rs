//! A hub driven by hand-made peers: registered genuinely, then sending what a test or
//! the fuzzer makes (no `Peer` core in the way).

use crate::channel::{Agreement, Channel};
use crate::hub::{Hub, HubOutput};
use crate::wire::{sealed_kind, HeartbeatRepr, PeerKey, RegisterRepr, WelcomeRepr};
use common::crypto::x25519_public;
use common::entropy::Entropy;
use common::sim::SimEntropy;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

/// The next tunnel datagram the hub sends, the rest of its output skipped.
pub fn next_datagram(hub: &mut Hub, out: &mut [u8]) -> Option<(SocketAddr, usize)> {
    loop {
        match hub.poll_output(out) {
            HubOutput::Tunnel { to, len } => return Some((to, len)),
            HubOutput::Timeout(_) => return None,
            _ => {}
        }
    }
}

/// `super::hub_config` for peers `a` and `b`, each allowed to announce 192.168.0.0/16.
pub fn test_hub() -> Hub {
    let mut cfg = super::hub_config(&["a", "b"]);
    for p in &mut cfg.peers {
        p.allowed_routes = vec!["192.168.0.0/16".parse().expect("literal")];
    }
    Hub::new(cfg, Box::new(SimEntropy::new(7)))
}

pub fn test_key(name: &str) -> PeerKey {
    PeerKey::new(&super::key_of(name))
}

/// Registers `name` from `from` (Register `nonce`, at `wall`) and confirms it with a
/// heartbeat: its channel.
pub fn register(hub: &mut Hub, name: &str, from: SocketAddr, nonce: u64, t0: Instant, wall: u64) -> Channel {
    register_instance(hub, name, from, nonce, 0, t0, wall)
}

/// `register` by a peer process that tells its `instance`.
pub fn register_instance(
    hub: &mut Hub,
    name: &str,
    from: SocketAddr,
    nonce: u64,
    instance: u64,
    t0: Instant,
    wall: u64,
) -> Channel {
    // seeded by who registers: a run replays exactly
    let mut entropy = SimEntropy::new(nonce ^ name.bytes().fold(0u64, |h, b| h.wrapping_mul(31) + u64::from(b)));
    let private = entropy.x25519_key();
    let public = x25519_public(&private);
    let reg = RegisterRepr {
        name: name.into(),
        timestamp_ms: wall,
        nonce,
        want_addr: Ipv4Addr::UNSPECIFIED,
        mtu: 0,
        public,
        routes: vec!["192.168.50.0/24".parse().expect("literal")],
        instance,
    };
    let key = test_key(name);
    hub.handle_datagram(t0, wall, from, &reg.emit(&key));
    let mut out = vec![0u8; common::wire::MAX_DATAGRAM];
    let (_, n) = next_datagram(hub, &mut out).expect("a Welcome");
    let w = WelcomeRepr::parse(&out[..n], &key, &public).expect("a valid Welcome");
    let agreement = Agreement { key: &key, nonce, peer_id: w.peer_id, peer_public: &public, hub_public: &w.public };
    let mut channel = Channel::establish(&agreement, private, true).expect("channel");
    hub.handle_datagram(t0, wall, from, &channel.seal_message(&HeartbeatRepr { seq: 1, rtt_us: 0 }.emit()));
    while next_datagram(hub, &mut out).is_some() {}
    channel
}

/// `test_hub` with `name` genuinely registered from 127.0.0.1:40000: the hub, that peer's
/// channel, its tunnel address, the clocks used.
pub fn hub_with_one_peer(name: &str) -> (Hub, Channel, SocketAddr, Instant, u64) {
    let (t0, wall) = (common::sim::epoch(), common::sim::SIM_WALL_START_MS);
    let mut hub = test_hub();
    let from = SocketAddr::from(([127, 0, 0, 1], 40000));
    let channel = register(&mut hub, name, from, 1, t0, wall);
    assert_eq!(hub.status(t0).len(), 1);
    (hub, channel, from, t0, wall)
}

/// The fuzzing harness (cargo fuzz target `hub_peer_input`, and a bounded run in the unit
/// tests): a hub with one genuinely registered peer, then `data` cut into datagrams that
/// all come from that peer's tunnel address: half of them sealed under the peer's channel
/// (most as KCP segments, so they reach KCP; some as they are: relay requests and the
/// like), the others raw, some of those to the rendezvous port (raw and sealed), some
/// to the port of the other hubs' forwarded packets (raw, and sealed as hub h2 of its
/// cluster). Any panic is a bug; afterwards the hub must still answer a valid heartbeat.
pub fn fuzz_peer_input(data: &[u8]) {
    let (mut hub, mut channel, from, t0, wall) = hub_with_one_peer("a");
    let cluster_key = [0xc1; 32];
    hub.join_cluster(t0, wall, "h1", &cluster_key);
    hub.set_cluster_hubs(t0, wall, &[("h2".into(), SocketAddr::from(([10, 90, 0, 2], 5300)))]);
    let mut forward_seq = 0;
    let mut seq = 1;
    let mut heartbeat = |channel: &mut Channel| {
        seq += 1;
        channel.seal_message(&HeartbeatRepr { seq, rtt_us: 0 }.emit())
    };
    let mut out = vec![0u8; common::wire::MAX_DATAGRAM];
    let mut answer = vec![0u8; common::wire::MAX_DATAGRAM];
    let mut now = t0;
    let mut rest = data;
    let mut n = 0u32;
    while let Some((&len, tail)) = rest.split_first() {
        let take = (len as usize).min(tail.len());
        let (chunk, tail) = tail.split_at(take);
        rest = tail;
        n += 1;
        if n.is_multiple_of(2) {
            // sealed: a KCP segment, or as it comes (a relay request, a candidate list ...)
            let mut m = Vec::with_capacity(chunk.len() + 1);
            if len % 4 != 1 {
                m.push(sealed_kind::KCP);
            }
            m.extend_from_slice(chunk);
            hub.handle_datagram(now, wall, from, &channel.seal_message(&m));
        } else if len % 8 == 5 {
            // from another hub: raw, and sealed as h2 (a table chunk, a packet, anything)
            hub.handle_forward_datagram(now, wall, &mut chunk.to_vec());
            forward_seq += 1;
            let mut d = crate::hub::seal_forward_as("h2", &cluster_key, [2; 16], forward_seq, wall, chunk);
            hub.handle_forward_datagram(now, wall, &mut d);
        } else if len % 8 == 3 {
            // the rendezvous port: raw, and sealed under the peer's channel
            let _ = hub.handle_rendezvous(now, from, chunk, &mut answer);
            let _ = hub.handle_rendezvous(now, from, &channel.seal_message(chunk), &mut answer);
        } else {
            hub.handle_datagram(now, wall, from, chunk);
        }
        now += Duration::from_millis(u64::from(len % 16));
        hub.handle_timeout(now);
        while !matches!(hub.poll_output(&mut out), HubOutput::Timeout(_)) {}
    }
    // still serving: a valid heartbeat from the peer (if it survived) gets an ack
    if !hub.status(now).is_empty() {
        hub.handle_datagram(now, wall, from, &heartbeat(&mut channel));
        assert!(next_datagram(&mut hub, &mut out).is_some(), "hub stopped answering its peer");
    }
}
