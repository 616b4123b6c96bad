//! The mesh end to end: a hub on a public network and two peers, public or behind NAT
//! routers built with nftables, real TUN devices and real processes in namespaces.

use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tests::{lab_or_skip, tcp_transfer, MeshLab, MeshOptions, Nat};

const TRANSFER_BYTES: usize = 8 << 20;

/// A bounded TCP transfer a -> b over the VPN: complete and intact. Returns Mbit/s.
fn transfer(m: &MeshLab, b: &str, port: u16) -> f64 {
    let to = SocketAddr::new(b.parse().unwrap(), port);
    let (n, same, secs) = tcp_transfer(&m.peer_ns[0], &m.peer_ns[1], to, TRANSFER_BYTES);
    assert_eq!(n, TRANSFER_BYTES, "transfer incomplete");
    assert!(same, "transfer corrupted");
    n as f64 * 8.0 / secs / 1e6
}

/// Both peers go direct, and a transfer between them costs the hub (almost) nothing.
fn direct_case(tag: &str, nats: [Nat; 2]) -> MeshLab {
    let m = MeshLab::start(tag, MeshOptions { nats, ..MeshOptions::default() });
    let [_, b] = m.wait_up(Duration::from_secs(20));
    let took = m.wait_via("a", "direct", Duration::from_secs(15));
    m.wait_via("b", "direct", Duration::from_secs(5));
    let before = m.relayed("a") + m.relayed("b");
    let mbit = transfer(&m, &b, 7001);
    let relayed = m.relayed("a") + m.relayed("b") - before;
    println!("{nats:?}: direct after {took:?}; {mbit:.0} Mbit/s; hub relayed {relayed} B of {TRANSFER_BYTES}");
    println!("{}", m.status_table("a"));
    // the relay path's probes, nothing of the transfer
    assert!(relayed < (TRANSFER_BYTES / 100) as u64, "the hub relayed {relayed} bytes of a direct transfer");
    let st = m.status("a");
    let b_entry = st["peers"].as_array().unwrap().iter().find(|p| p["name"] == "b").unwrap().clone();
    let paths = b_entry["paths"].as_array().expect("paths[]");
    let up = paths.iter().find(|p| p["state"] == "up").unwrap_or_else(|| panic!("no path up: {b_entry}"));
    for field in ["local", "remote", "rtt_ms", "loss_up", "loss_down"] {
        assert!(!up[field].is_null(), "paths[].{field} in {up}");
    }
    m
}

#[test]
fn public_peers_talk_directly() {
    let Some(_serial) = lab_or_skip() else { return };
    direct_case("ma", [Nat::Public, Nat::Public]);
}

#[test]
fn peers_behind_masquerade_nats_punch_through_and_keep_their_mappings() {
    let Some(_serial) = lab_or_skip() else { return };
    let m = direct_case("mb", [Nat::Masquerade, Nat::Masquerade]);
    // the reflexive candidate is the NAT's wan address
    let st = m.status("a");
    let b_entry = st["peers"].as_array().unwrap().iter().find(|p| p["name"] == "b").unwrap().clone();
    assert!(
        b_entry["paths"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["state"] == "up" && p["remote"].as_str().unwrap().starts_with("10.200.2.1:")),
        "{b_entry}"
    );
    // mappings expire after 5 s without packets; an idle pair keeps them
    for r in m.nat_ns.iter().flatten() {
        m.lab.sh(
            r,
            "sysctl -qw net.netfilter.nf_conntrack_udp_timeout=5 net.netfilter.nf_conntrack_udp_timeout_stream=5",
        );
    }
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(m.via("a"), "direct");
    assert_eq!(m.via("b"), "direct");
    let [_, b] = m.wait_up(Duration::from_secs(1));
    transfer(&m, &b, 7002);
    println!("{}", m.status_table("a"));
}

#[test]
fn peers_behind_one_nat_go_direct_over_their_host_candidates() {
    let Some(_serial) = lab_or_skip() else { return };
    let m = direct_case("mf", [Nat::Shared, Nat::Shared]);
    let st = m.status("a");
    let b_entry = st["peers"].as_array().unwrap().iter().find(|p| p["name"] == "b").unwrap().clone();
    assert!(
        b_entry["paths"].as_array().unwrap().iter().any(|p| p["state"] == "up" && p["remote"] == "192.168.2.2:5100"),
        "{b_entry}"
    );
}

#[test]
fn a_peer_behind_a_symmetric_nat_reaches_a_public_one_directly_both_ways() {
    let Some(_serial) = lab_or_skip() else { return };
    let m = direct_case("mg", [Nat::Random, Nat::Public]);
    // and back: b's data to a goes on the mapping a's NAT made for b
    let [a, _] = m.wait_up(Duration::from_secs(1));
    let before = m.relayed("b");
    let to = SocketAddr::new(a.parse().unwrap(), 7005);
    let (n, same, _) = tcp_transfer(&m.peer_ns[1], &m.peer_ns[0], to, TRANSFER_BYTES);
    assert!(n == TRANSFER_BYTES && same, "b -> a transfer");
    let relayed = m.relayed("b") - before;
    assert!(relayed < (TRANSFER_BYTES / 100) as u64, "the hub relayed {relayed} bytes of b's transfer to a");
    assert_eq!(m.via("b"), "direct");
}

#[test]
fn peers_behind_symmetric_nats_use_the_relay() {
    let Some(_serial) = lab_or_skip() else { return };
    let m = MeshLab::start("mc", MeshOptions { nats: [Nat::Random, Nat::Random], ..MeshOptions::default() });
    let [_, b] = m.wait_up(Duration::from_secs(20));
    // a punch window passes without a direct path
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(m.via("a"), "relay", "{}", m.status_table("a"));
    let before = m.relayed("a");
    let mbit = transfer(&m, &b, 7003);
    let relayed = m.relayed("a") - before;
    println!("symmetric NATs: relay, {mbit:.0} Mbit/s; hub relayed {relayed} B");
    assert!(relayed >= TRANSFER_BYTES as u64, "the transfer went through the hub's relay");
    assert_eq!(m.via("a"), "relay");
}

#[test]
fn a_blackholed_direct_path_falls_back_and_recovers() {
    let Some(_serial) = lab_or_skip() else { return };
    let m = MeshLab::start("md", MeshOptions::default());
    let [_, b] = m.wait_up(Duration::from_secs(20));
    m.wait_via("a", "direct", Duration::from_secs(15));
    let peer_ns = (m.peer_ns[0].clone(), m.peer_ns[1].clone());
    let to = SocketAddr::new(b.parse().unwrap(), 7004);
    let t = std::thread::spawn(move || tcp_transfer(&peer_ns.0, &peer_ns.1, to, 32 << 20));
    std::thread::sleep(Duration::from_millis(300));
    m.blackhole_direct(true);
    let cut = Instant::now();
    let fell_back = m.wait_via("a", "relay", Duration::from_secs(5));
    println!("fell back to the relay {fell_back:?} after the cut ({:?})", cut.elapsed());
    assert!(fell_back <= Duration::from_millis(1500), "fallback took {fell_back:?}");
    std::thread::sleep(Duration::from_millis(700));
    m.blackhole_direct(false);
    let back = m.wait_via("a", "direct", Duration::from_secs(10));
    println!("direct again {back:?} after healing");
    let (n, same, _) = t.join().expect("transfer");
    assert_eq!(n, 32 << 20, "transfer incomplete across the fallback");
    assert!(same, "transfer corrupted across the fallback");
}

#[test]
fn a_nat_that_maps_anew_is_punched_again_within_three_seconds() {
    let Some(_serial) = lab_or_skip() else { return };
    let m = MeshLab::start("me", MeshOptions { nats: [Nat::Public, Nat::Masquerade], ..MeshOptions::default() });
    let [_, b] = m.wait_up(Duration::from_secs(20));
    m.wait_via("a", "direct", Duration::from_secs(15));
    // keep traffic flowing while the NAT moves
    let ns = m.peer_ns[0].clone();
    let pinger = std::thread::spawn(move || tests::ping(&ns, &b, 300, "0.02", &[]));
    std::thread::sleep(Duration::from_millis(500));
    m.renumber_nat(1);
    let moved = Instant::now();
    let mut direct_again = None;
    while moved.elapsed() < Duration::from_secs(10) {
        let st = m.status("a");
        let on_new = st["peers"].as_array().and_then(|ps| ps.iter().find(|p| p["name"] == "b")).is_some_and(|p| {
            p["paths"].as_array().is_some_and(|ps| {
                ps.iter()
                    .any(|x| x["state"] == "up" && x["remote"].as_str().is_some_and(|r| r.starts_with("10.200.2.3:")))
            })
        });
        if on_new {
            direct_again = Some(moved.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let direct_again =
        direct_again.unwrap_or_else(|| panic!("not direct on the new mapping:\n{}", m.status_table("a")));
    println!("direct again on the NAT's new address after {direct_again:?}");
    assert!(direct_again <= Duration::from_secs(3), "took {direct_again:?}");
    let answered = pinger.join().expect("ping").len();
    assert!(answered >= 280, "{answered} of 300 pings answered across the move");
}

/// The direct paths of `who`'s pair with the other peer: (local, remote, state).
fn paths_of(m: &MeshLab, who: &str) -> Vec<(String, String, String)> {
    let other = if who == "a" { "b" } else { "a" };
    let st = m.status(who);
    let p = st["peers"].as_array().and_then(|ps| ps.iter().find(|p| p["name"] == other).cloned());
    let paths = p.and_then(|p| p["paths"].as_array().cloned()).unwrap_or_default();
    paths
        .iter()
        .map(|x| {
            let s = |k: &str| x[k].as_str().unwrap_or("").to_string();
            (s("local"), s("remote"), s("state"))
        })
        .collect()
}

/// Waits (5 s at most) until a's pair with b has a direct path up on each of a's uplinks.
fn wait_both_uplinks_up(m: &MeshLab) {
    let start = Instant::now();
    while paths_of(m, "a").iter().filter(|p| p.2 == "up").count() < 2 {
        assert!(start.elapsed() < Duration::from_secs(5), "both uplinks' paths up:\n{}", m.status_table("a"));
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_peer_with_two_uplinks_has_a_direct_path_on_each_and_loses_none_when_one_dies() {
    let Some(_serial) = lab_or_skip() else { return };
    let m = MeshLab::start("mu", MeshOptions { a_second_uplink: true, ..MeshOptions::default() });
    let [_, b] = m.wait_up(Duration::from_secs(20));
    m.wait_via("a", "direct", Duration::from_secs(15));
    wait_both_uplinks_up(&m);
    let locals: Vec<String> = paths_of(&m, "a").into_iter().map(|p| p.0).collect();
    assert!(locals.contains(&"10.200.1.1:5100".into()) && locals.contains(&"10.200.11.1:5100".into()), "{locals:?}");
    // the first uplink's direct path dies; the second carries on, nothing falls back
    let ns = m.peer_ns[0].clone();
    let dst = b.clone();
    let pinger = std::thread::spawn(move || tests::ping(&ns, &dst, 150, "0.02", &[]));
    std::thread::sleep(Duration::from_millis(300));
    m.blackhole_direct(true);
    let cut = Instant::now();
    while cut.elapsed() < Duration::from_secs(2) {
        assert_eq!(m.via("a"), "direct", "fell back with a second uplink up:\n{}", m.status_table("a"));
        std::thread::sleep(Duration::from_millis(50));
    }
    let paths = paths_of(&m, "a");
    assert!(paths.iter().any(|p| p.0 == "10.200.1.1:5100" && p.2 == "down"), "{paths:?}");
    assert!(paths.iter().any(|p| p.0 == "10.200.11.1:5100" && p.2 == "up"), "{paths:?}");
    let answered = pinger.join().expect("ping").len();
    println!("two uplinks, one cut: {answered} of 150 pings answered\n{}", m.status_table("a"));
    assert!(answered >= 148, "{answered} of 150 answered");
}

/// Peer a has two uplinks, so its pair with b has two direct paths. A transfer a -> b
/// costs about its own bytes on a's uplinks with `mesh.redundancy: adaptive` (the default:
/// one copy on the best path while both are clean), and twice them with `duplicate`.
#[test]
fn an_adaptive_pair_sends_one_copy_over_two_clean_uplinks() {
    let Some(_serial) = lab_or_skip() else { return };
    let mut ratios = Vec::new();
    for (tag, redundancy) in [("mr", "adaptive"), ("md", "duplicate")] {
        let m = MeshLab::start(tag, MeshOptions { a_second_uplink: true, redundancy, ..MeshOptions::default() });
        let [_, b] = m.wait_up(Duration::from_secs(20));
        m.wait_via("a", "direct", Duration::from_secs(15));
        wait_both_uplinks_up(&m);
        // a first transfer lets adaptive measure the paths (its receipts) and settle
        transfer(&m, &b, 7003);
        let before = m.uplink_tx_bytes(0);
        let mbit = transfer(&m, &b, 7004);
        let ratio = (m.uplink_tx_bytes(0) - before) as f64 / TRANSFER_BYTES as f64;
        println!("{redundancy}: {mbit:.0} Mbit/s, a's uplinks sent {ratio:.2} bytes per byte transferred");
        ratios.push(ratio);
    }
    // measured 1.28-1.48 and 2.5-2.9 (TCP's own resends and the tunnel's headers included)
    assert!(ratios[0] < 1.8, "adaptive sent {:.2}x", ratios[0]);
    assert!(ratios[1] > 2.2, "duplicate sent {:.2}x (two direct paths)", ratios[1]);
}
