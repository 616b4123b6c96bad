//! Forwarding between the hubs of a cluster, in two seeded simulations whose hubs carry
//! each other's `Forward` datagrams: a peer of hub 1 reaches a peer of hub 2 through both;
//! what a captured, forged or stale datagram can do (nothing).

use ring::{aead, hkdf};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;
use vpn::hub::{Hub, HubCoreConfig};
use vpn::sim::{self, Nat, VpnSim};
use vpn::wire::{ForwardHeader, BOOT_LEN, INNER_IP};

const KEY: [u8; 32] = [0xc1; 32];
const A: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 10);
const B: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 11);
const C: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 12);

fn forward_addr(hub: &str) -> SocketAddr {
    match hub {
        "h1" => "10.90.0.1:5300".parse().unwrap(),
        _ => "10.90.0.2:5300".parse().unwrap(),
    }
}

/// hub.yaml of both hubs: a, b and c at fixed addresses (the cluster's store would give
/// them the same ones).
fn config() -> HubCoreConfig {
    let mut cfg = sim::hub_config(&["a", "b", "c"]);
    for (p, a) in cfg.peers.iter_mut().zip([A, B, C]) {
        p.fixed_addr = Some(a);
    }
    cfg
}

fn join(net: &mut VpnSim, name: &str) {
    let (now, wall) = (net.now, net.wall_ms());
    net.hub.join_cluster(now, wall, name, &KEY);
    let hubs = [("h1".to_string(), forward_addr("h1")), ("h2".to_string(), forward_addr("h2"))];
    net.hub.set_cluster_hubs(now, wall, &hubs);
}

/// Hub h1 with peer a, hub h2 with peer b.
fn two_hubs() -> (VpnSim, VpnSim) {
    let mut h1 = VpnSim::new(config(), 1);
    let mut h2 = VpnSim::new(config(), 2);
    join(&mut h1, "h1");
    join(&mut h2, "h2");
    h1.add_peer(sim::peer_config("a"), Nat::None);
    h2.add_peer(sim::peer_config("b"), Nat::None);
    run(&mut h1, &mut h2, Duration::from_secs(3));
    (h1, h2)
}

/// Both simulations in step, each hub's forwarded datagrams delivered to the other.
fn run(h1: &mut VpnSim, h2: &mut VpnSim, d: Duration) {
    let end = h1.now + d;
    while h1.now < end {
        h1.step();
        h2.step();
        carry(h1, h2);
        carry(h2, h1);
    }
}

fn carry(from: &mut VpnSim, to: &mut VpnSim) {
    for (addr, mut d) in std::mem::take(&mut from.forwarded) {
        assert!([forward_addr("h1"), forward_addr("h2")].contains(&addr), "only to the hubs' records: {addr}");
        let (now, wall) = (to.now, to.wall_ms());
        to.hub.handle_forward_datagram(now, wall, &mut d);
    }
}

/// Peer a sends b one packet tagged `tag`; 200 ms of both hubs; returns every datagram
/// h1 forwarded meanwhile (what an attacker between the hubs captured).
fn send_a_to_b_capturing(h1: &mut VpnSim, h2: &mut VpnSim, tag: u8) -> Vec<Vec<u8>> {
    let now = h1.now;
    h1.peers[0].core.handle_tun_packet(now, &ipv4(A, B, tag));
    let mut captured = Vec::new();
    for _ in 0..40 {
        h1.step();
        h2.step();
        captured.extend(h1.forwarded.iter().map(|(_, d)| d.clone()));
        carry(h1, h2);
        carry(h2, h1);
    }
    captured
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, tag: u8) -> Vec<u8> {
    let mut p = vec![tag; 60];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&60u16.to_be_bytes());
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p
}

fn received(net: &VpnSim, i: usize, tag: u8) -> usize {
    net.peers[i].tun_rx.iter().filter(|p| p.len() == 60 && p[59] == tag).count()
}

#[test]
fn a_peer_of_one_hub_reaches_a_peer_of_another_both_ways() {
    let (mut h1, mut h2) = two_hubs();
    let peers_of = |net: &VpnSim| net.hub.forwarding().iter().map(|f| (f.hub.clone(), f.peers)).collect::<Vec<_>>();
    assert_eq!(peers_of(&h1), [("h2".to_string(), 1)]);
    assert_eq!(peers_of(&h2), [("h1".to_string(), 1)]);
    let now = h1.now;
    h1.peers[0].core.handle_tun_packet(now, &ipv4(A, B, 0x11));
    run(&mut h1, &mut h2, Duration::from_millis(200));
    assert_eq!(received(&h2, 0, 0x11), 1, "a -> b through h1 and h2");
    let now = h2.now;
    h2.peers[0].core.handle_tun_packet(now, &ipv4(B, A, 0x22));
    run(&mut h1, &mut h2, Duration::from_millis(200));
    assert_eq!(received(&h1, 0, 0x22), 1, "b -> a");
    // each hub counts what it forwarded and what it delivered
    let (f1, f2) = (&h1.hub.forwarding()[0], &h2.hub.forwarding()[0]);
    assert_eq!((f1.tx_bytes, f1.rx_bytes, f2.tx_bytes, f2.rx_bytes), (60, 60, 60, 60));
    // every hub answers every peer's name
    assert_eq!(h1.hub.address_of("b"), Some(B));
    assert_eq!(h2.hub.address_of("a"), Some(A));
    assert_eq!(h1.hub.address_of("c"), None, "c is registered nowhere");
}

/// Peer a registers with both hubs (`hubs:`); b only with h2. What a sends b through h1
/// is forwarded to h2, which takes it though a is its own peer too (h1's table speaks
/// for a); what b answers goes to a through h2 directly.
#[test]
fn a_peer_registered_with_both_hubs_reaches_a_peer_of_one_through_the_other() {
    let (mut h1, mut h2) = two_hubs();
    // a second process of a's name on h2's side (a's registration with h2)
    h2.add_peer(sim::peer_config("a"), Nat::None);
    run(&mut h1, &mut h2, Duration::from_secs(3));
    assert!(h2.peers[1].core.is_up());
    let now = h1.now;
    h1.peers[0].core.handle_tun_packet(now, &ipv4(A, B, 0x33));
    run(&mut h1, &mut h2, Duration::from_millis(200));
    assert_eq!(received(&h2, 0, 0x33), 1, "a (through h1) -> b: {:?}", h2.hub.drops);
    assert_eq!(h2.hub.drops.spoofed_source, 0);
}

#[test]
fn captured_forged_and_stale_datagrams_do_nothing() {
    let (mut h1, mut h2) = two_hubs();
    let captured = send_a_to_b_capturing(&mut h1, &mut h2, 0x33);
    assert_eq!(received(&h2, 0, 0x33), 1);
    assert!(!captured.is_empty());
    // replayed: nothing delivered again
    let replayed = h2.hub.drops.replayed;
    for d in &captured {
        let (now, wall) = (h2.now, h2.wall_ms());
        h2.hub.handle_forward_datagram(now, wall, &mut d.clone());
    }
    run(&mut h1, &mut h2, Duration::from_millis(200));
    assert_eq!(received(&h2, 0, 0x33), 1, "a replay delivered nothing");
    assert!(h2.hub.drops.replayed >= replayed + captured.len() as u64);

    // forged under another key, or by a hub the cluster does not list: nothing
    let boot = [9; BOOT_LEN];
    let wall = h2.wall_ms();
    for (name, key) in [("h1", [0x99; 32]), ("h3", KEY)] {
        let mut d = forge(name, &key, boot, 0, wall, &ipv4(A, B, 0x44));
        let now = h2.now;
        h2.hub.handle_forward_datagram(now, wall, &mut d);
    }
    assert!(h2.hub.drops.bad_mac >= 1 && h2.hub.drops.forward_refused >= 1);
    // with the cluster key but a source h1's table does not have (c is nowhere): refused
    let spoofed = h2.hub.drops.spoofed_source;
    let mut d = forge("h1", &KEY, [10; BOOT_LEN], 0, wall + 1, &ipv4(C, B, 0x55));
    let now = h2.now;
    h2.hub.handle_forward_datagram(now, wall, &mut d);
    assert_eq!(h2.hub.drops.spoofed_source, spoofed + 1);
    run(&mut h1, &mut h2, Duration::from_millis(200));
    assert_eq!(received(&h2, 0, 0x44) + received(&h2, 0, 0x55), 0);

    // a boot far from h2's clock (a datagram kept for later): refused
    let replayed = h2.hub.drops.replayed;
    let mut d = forge("h1", &KEY, [11; BOOT_LEN], 0, wall + 120_000, &ipv4(A, B, 0x66));
    let now = h2.now;
    h2.hub.handle_forward_datagram(now, wall, &mut d);
    assert_eq!(h2.hub.drops.replayed, replayed + 1);
}

#[test]
fn a_restarted_hub_is_heard_again_and_its_old_boot_never() {
    let (mut h1, mut h2) = two_hubs();
    let old = send_a_to_b_capturing(&mut h1, &mut h2, 0x71);
    assert_eq!(received(&h2, 0, 0x71), 1);
    // h1 restarts (a new boot): a registers again, h2 takes h1's new table and packets
    h1.hub = Hub::new(config(), Box::new(common::sim::SimEntropy::new(77)));
    join(&mut h1, "h1");
    run(&mut h1, &mut h2, Duration::from_secs(12));
    assert!(h1.peers[0].core.is_up());
    let now = h1.now;
    h1.peers[0].core.handle_tun_packet(now, &ipv4(A, B, 0x72));
    run(&mut h1, &mut h2, Duration::from_millis(300));
    assert_eq!(received(&h2, 0, 0x72), 1, "h1's new boot is heard");
    // the old boot's datagrams, replayed now: nothing (and h1's new boot stays)
    for d in &old {
        let (now, wall) = (h2.now, h2.wall_ms());
        h2.hub.handle_forward_datagram(now, wall, &mut d.clone());
    }
    let now = h1.now;
    h1.peers[0].core.handle_tun_packet(now, &ipv4(A, B, 0x73));
    run(&mut h1, &mut h2, Duration::from_millis(300));
    assert_eq!(received(&h2, 0, 0x71), 1, "the old boot delivered nothing again");
    assert_eq!(received(&h2, 0, 0x73), 1, "the new boot still heard");
}

#[test]
fn a_hub_that_stops_is_forgotten_and_its_peers_unreachable() {
    let (_h1, mut h2) = two_hubs();
    assert_eq!(h2.hub.address_of("a"), Some(A));
    // h1 goes silent: h2 forgets its table after the TTL, and a's packets go nowhere
    h2.run_for(Duration::from_secs(5));
    assert_eq!(h2.hub.address_of("a"), None);
    assert_eq!(h2.hub.forwarding()[0].peers, 0);
    assert!(!h2.peers[0].core.peers().iter().any(|p| p.name == "a"), "b's list forgot a");
    let (now, no_route) = (h2.now, h2.hub.drops.no_route);
    h2.forwarded.clear();
    h2.peers[0].core.handle_tun_packet(now, &ipv4(B, A, 0x81));
    h2.run_for(Duration::from_millis(200));
    assert!(h2.forwarded.iter().all(|(_, d)| d.len() < 60), "nothing of b's packet forwarded");
    assert_eq!(h2.hub.drops.no_route, no_route + 1);
}

/// A `Forward` datagram made by hand: the layout and key derivation `wire::forward` and
/// `hub::forward` document.
fn forge(hub: &str, key: &[u8; 32], boot: [u8; BOOT_LEN], seq: u64, wall_ms: u64, packet: &[u8]) -> Vec<u8> {
    let header = ForwardHeader { hub, boot, seq, wall_ms };
    let mut d = vec![0u8; ForwardHeader::len_for(hub)];
    header.emit(&mut d);
    let mut body = vec![INNER_IP];
    body.extend_from_slice(packet);
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, key).extract(&boot);
    let info: [&[u8]; 2] = [b"mpvpn v1 hub forward", hub.as_bytes()];
    let okm = prk.expand(&info, &aead::AES_256_GCM).unwrap();
    let k = aead::LessSafeKey::new(aead::UnboundKey::from(okm));
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&seq.to_be_bytes());
    k.seal_in_place_append_tag(aead::Nonce::assume_unique_for_key(n), aead::Aad::from(&d.clone()), &mut body).unwrap();
    d.extend_from_slice(&body);
    d
}

#[test]
fn a_hub_gone_from_the_cluster_is_forgotten_at_once() {
    let (_h1, mut h2) = two_hubs();
    assert!(h2.peers[0].core.peers().iter().any(|p| p.name == "a"));
    // h1's record left etcd (its lease ended): h2 forgets it and its peers now
    let (now, wall) = (h2.now, h2.wall_ms());
    h2.hub.set_cluster_hubs(now, wall, &[("h2".to_string(), forward_addr("h2"))]);
    h2.run_for(Duration::from_millis(300));
    assert!(h2.hub.forwarding().is_empty());
    assert_eq!(h2.hub.address_of("a"), None);
    assert!(!h2.peers[0].core.peers().iter().any(|p| p.name == "a"), "b's list forgot a");
}

/// A hub of a cluster tells each peer which hub it is and where the others' multipath
/// servers are, when the peer registers and again when the cluster changes.
#[test]
fn a_hub_tells_its_peers_the_clusters_other_hubs() {
    use vpn::peer::PeerEvent;
    use vpn::wire::{ClusterHubsRepr, ListedHub};
    let mut net = VpnSim::new(config(), 1);
    let h2 = ListedHub { name: "h2".into(), tunnel: vec!["10.90.0.2:4000".parse().unwrap()], rendezvous: None };
    let listed = ClusterHubsRepr { this: "h1".into(), others: vec![h2.clone()] };
    net.hub.set_listed_hubs(listed.clone());
    net.add_peer(sim::peer_config("a"), Nat::None);
    net.run_for(Duration::from_secs(1));
    assert!(
        net.peers[0].events.contains(&PeerEvent::ClusterHubs { link: 0, hubs: listed }),
        "{:?}",
        net.peers[0].events
    );
    let h3 = ListedHub {
        name: "h3".into(),
        tunnel: vec!["10.90.0.3:4000".parse().unwrap()],
        rendezvous: Some("10.90.0.3:5200".parse().unwrap()),
    };
    let grown = ClusterHubsRepr { this: "h1".into(), others: vec![h2, h3] };
    net.hub.set_listed_hubs(grown.clone());
    net.hub.set_listed_hubs(grown.clone()); // unchanged: not sent again
    net.run_for(Duration::from_millis(300));
    let told =
        net.peers[0].events.iter().filter(|e| **e == PeerEvent::ClusterHubs { link: 0, hubs: grown.clone() }).count();
    assert_eq!(told, 1);
}
