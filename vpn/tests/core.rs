//! Hub and peers driven together with a fake clock: registry, pool, routing,
//! anti-spoofing, peer-list push, heartbeats, hub loss and return, MTU rules, keys.

use common::sim::SimEntropy;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};
use vpn::hub::{Hub, HubCoreConfig, PeerSpec, PeerState, DEFAULT_PEER_TIMEOUT};
use vpn::ip::Prefix;
use vpn::peer::{Peer, PeerCoreConfig, PeerEvent};
use vpn::sim::{self, key_of, Nat, SimPeer, VpnSim};
use vpn::wire::PeerKey;
use vpn::TUN_MTU;

/// A short wait in the tests.
const TICK: Duration = vpn::sim::STEP;

/// `sim::hub_config` with peer `fixed` at 10.99.0.77, `b` allowed to announce the subnet
/// behind it (nobody else anything), and DNS.
fn hub_config(names: &[&str]) -> HubCoreConfig {
    let mut cfg = sim::hub_config(names);
    for p in &mut cfg.peers {
        if p.name == "fixed" {
            p.fixed_addr = Some(Ipv4Addr::new(10, 99, 0, 77));
        }
        if p.name == "b" {
            p.allowed_routes = vec!["192.168.50.0/24".parse().unwrap()];
        }
    }
    cfg.dns_domain = Some("mpvpn".into());
    cfg
}

fn hub(seed: u64) -> Hub {
    Hub::new(hub_config(&["a", "b", "c", "fixed"]), Box::new(SimEntropy::new(seed)))
}

/// The hub of `net` restarted as the daemon restarts it: an empty registry, the
/// addresses given out before read back from its state file.
fn restarted_hub(net: &VpnSim, seed: u64) -> Hub {
    let cfg = HubCoreConfig { assigned: net.hub.assignments().clone(), ..hub_config(&["a", "b", "c", "fixed"]) };
    Hub::new(cfg, Box::new(SimEntropy::new(seed)))
}

/// A hub that knows a, b, c and fixed, and peers `names` (hosts 0, 1, ...).
fn net(names: &[&str]) -> VpnSim {
    let mut net = VpnSim::new(hub_config(&["a", "b", "c", "fixed"]), 100);
    for n in names {
        net.add_peer(sim::peer_config(n), Nat::None);
    }
    net
}

/// Host `i` running peer `name` with `mtu` and `routes`.
fn peer(net: &VpnSim, name: &str, mtu: Option<u16>, routes: Vec<Prefix>, i: usize) -> SimPeer {
    net.make_peer(PeerCoreConfig { mtu, routes, ..sim::peer_config(name) }, Nat::None, i)
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, len: usize, tag: u8) -> Vec<u8> {
    let mut p = vec![tag; len.max(20)];
    p[0] = 0x45;
    let total = p.len() as u16;
    p[2..4].copy_from_slice(&total.to_be_bytes());
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p
}

#[test]
fn peers_register_get_addresses_and_the_list() {
    let mut net = net(&["a", "b", "fixed"]);
    net.run_for(Duration::from_millis(200));
    for p in &net.peers {
        assert!(p.core.is_up(), "{}", p.core.link_state());
        assert!(matches!(p.events[0], PeerEvent::Configured { mtu, prefix_len: 24, .. } if mtu == TUN_MTU));
    }
    assert_eq!(net.addr(2), Ipv4Addr::new(10, 99, 0, 77), "fixed address by name");
    assert_ne!(net.addr(0), net.addr(1));
    assert!(Prefix::new(Ipv4Addr::new(10, 99, 0, 0), 24).unwrap().contains(net.addr(0)));
    // every peer has the whole list
    for p in &net.peers {
        assert_eq!(p.core.peers().len(), 3);
    }
    let st = net.hub.status(net.now);
    assert_eq!(st.len(), 3);
}

#[test]
fn packets_are_routed_between_peers_and_to_the_hub() {
    let mut net = net(&["a", "b"]);
    net.run_for(Duration::from_millis(200));
    let (a, b) = (net.addr(0), net.addr(1));
    for i in 0..200u8 {
        net.peers[0].core.handle_tun_packet(net.now, &ipv4(a, b, TUN_MTU as usize, i));
    }
    net.peers[1].core.handle_tun_packet(net.now, &ipv4(b, Ipv4Addr::new(10, 99, 0, 1), 100, 7));
    net.run_for(Duration::from_millis(100));
    assert_eq!(net.peers[1].tun_rx.len(), 200, "every packet arrives, once, in order");
    assert!(net.peers[1].tun_rx.iter().enumerate().all(|(i, p)| p[30] == i as u8 && p.len() == TUN_MTU as usize));
    assert_eq!(net.hub_tun_rx.len(), 1, "to the hub's own address");
    // and from the hub host to a peer
    net.hub.handle_tun_packet(&ipv4(Ipv4Addr::new(10, 99, 0, 1), a, 64, 9));
    net.run_for(Duration::from_millis(50));
    assert_eq!(net.peers[0].tun_rx.len(), 1);
}

/// Before: a peer listed every other peer as `listed` with no traffic and a heartbeat age
/// of 0; the hub showed every peer `up` whatever its heartbeats did.
#[test]
fn status_shows_real_traffic_and_heartbeat_state() {
    let mut net = net(&["a", "b"]);
    net.run_for(Duration::from_millis(200));
    let (a, b) = (net.addr(0), net.addr(1));
    for i in 0..50u8 {
        net.peers[0].core.handle_tun_packet(net.now, &ipv4(a, b, 1000, i));
    }
    net.run_for(Duration::from_millis(100));
    let now = net.now;
    let view_of = |p: &Peer, name: &str| p.peer_status(now).into_iter().find(|s| s.name == name).unwrap();
    let b_from_a = view_of(&net.peers[0].core, "b");
    assert_eq!((b_from_a.tx_bytes, b_from_a.rx_bytes, b_from_a.state), (50_000, 0, PeerState::Relay));
    assert_eq!(b_from_a.last_heartbeat_s, None, "a peer does not see other peers' heartbeats");
    let a_from_b = view_of(&net.peers[1].core, "a");
    assert_eq!((a_from_b.tx_bytes, a_from_b.rx_bytes), (0, 50_000));
    assert!(a_from_b.last_rx_s.is_some_and(|s| s < 0.2), "{a_from_b:?}");
    assert_eq!(view_of(&net.peers[0].core, "a").state, PeerState::Own);

    let hub_view = net.hub.status(now);
    assert!(
        hub_view.iter().all(|p| p.state == PeerState::Up && p.last_heartbeat_s.is_some_and(|s| s < 1.5)),
        "{hub_view:?}"
    );
    // heartbeats stop reaching the hub: the peers show as silent before they expire
    net.hub_cut = true;
    net.run_for(Duration::from_secs(4));
    net.hub_cut = false;
    let hub_view = net.hub.status(net.now);
    assert_eq!(hub_view.len(), 2);
    assert!(hub_view.iter().all(|p| p.state == PeerState::Silent), "{hub_view:?}");
}

#[test]
fn lossy_tunnel_still_delivers_everything_through_kcp() {
    let mut net = net(&["a", "b"]);
    net.loss = 0.1;
    net.run_for(Duration::from_millis(2000));
    assert!(net.peers.iter().all(|p| p.core.is_up()));
    let (a, b) = (net.addr(0), net.addr(1));
    for i in 0..500u32 {
        net.peers[0].core.handle_tun_packet(net.now, &ipv4(a, b, 200, (i % 251) as u8));
        net.run_for(TICK);
    }
    net.run_for(Duration::from_secs(3));
    assert_eq!(net.peers[1].tun_rx.len(), 500);
}

#[test]
fn spoofed_inner_sources_are_dropped() {
    let mut net = net(&["a", "b", "c"]);
    net.run_for(Duration::from_millis(200));
    let (b, c) = (net.addr(1), net.addr(2));
    // a claims to be b
    net.peers[0].core.handle_tun_packet(net.now, &ipv4(b, c, 100, 1));
    net.peers[0].core.handle_tun_packet(net.now, &ipv4(Ipv4Addr::new(192, 168, 9, 9), c, 100, 1));
    net.run_for(Duration::from_millis(100));
    assert!(net.peers[2].tun_rx.is_empty());
    assert_eq!(net.hub.drops.spoofed_source, 2);
}

#[test]
fn announced_routes_are_pushed_installed_and_removed() {
    let mut net = net(&["a"]);
    net.peers.push(peer(&net, "b", None, vec!["192.168.50.0/24".parse().unwrap()], 1));
    net.run_for(Duration::from_millis(200));
    let route: Prefix = "192.168.50.0/24".parse().unwrap();
    assert!(net.peers[0].events.contains(&PeerEvent::Routes { add: vec![route], remove: vec![] }));
    assert!(!net.peers[1].events.iter().any(|e| matches!(e, PeerEvent::Routes { .. })), "not its own route");
    // a host behind b is reachable from a, and b may send from it
    let a = net.addr(0);
    net.peers[0].core.handle_tun_packet(net.now, &ipv4(a, Ipv4Addr::new(192, 168, 50, 10), 100, 1));
    net.peers[1].core.handle_tun_packet(net.now, &ipv4(Ipv4Addr::new(192, 168, 50, 10), a, 100, 2));
    net.run_for(Duration::from_millis(100));
    assert_eq!(net.peers[1].tun_rx.len(), 1);
    assert_eq!(net.peers[0].tun_rx.len(), 1);
    // b goes silent: the hub drops it after its timeout and a removes the route
    net.peers.truncate(1);
    net.run_for(DEFAULT_PEER_TIMEOUT + Duration::from_secs(1));
    assert!(net.peers[0].events.contains(&PeerEvent::Routes { add: vec![], remove: vec![route] }));
    assert_eq!(net.peers[0].core.peers().len(), 1);
}

#[test]
fn hub_loss_is_detected_after_retries_and_the_address_survives_a_hub_restart() {
    let mut net = net(&["a", "b"]);
    net.run_for(Duration::from_millis(200));
    let before: Vec<Ipv4Addr> = (0..2).map(|i| net.addr(i)).collect();
    net.hub_cut = true;
    let down_at = net.now;
    let mut lost_at = None;
    for _ in 0..2400 {
        net.run_for(TICK);
        if lost_at.is_none() && net.peers[0].events.iter().any(|e| matches!(e, PeerEvent::HubLost { .. })) {
            lost_at = Some(net.now - down_at);
        }
    }
    let lost = lost_at.expect("hub declared lost");
    // last answered heartbeat, then retries at +1, +3, +7 s and lost at +8 s
    assert!(lost >= Duration::from_secs(8) && lost <= Duration::from_secs(10), "{lost:?}");
    // TUN packets are not taken while the hub is lost
    net.peers[0].core.handle_tun_packet(net.now, &ipv4(before[0], before[1], 100, 1));
    assert_eq!(net.peers[0].core.drops.hub_lost, 1);
    // a new hub (restarted: empty registry) comes up; peers come back with the same addresses
    net.hub = hub(500);
    net.hub_cut = false;
    net.run_for(Duration::from_secs(3));
    let after: Vec<Ipv4Addr> = (0..2).map(|i| net.addr(i)).collect();
    assert!(net.peers.iter().all(|p| p.core.is_up()));
    assert_eq!(before, after);
}

/// A peer with other hubs to go to (`hubs:`) declares its hub lost after
/// `STANDBY_HUB_LOST_AFTER`, not after every retry; one hub alone keeps the long wait.
#[test]
fn a_peer_with_standby_hubs_declares_its_hub_lost_sooner() {
    let mut net = net(&["a", "b"]);
    net.peers.clear();
    net.add_peer(sim::peer_config("a"), Nat::None);
    // b has another hub (which never answers) besides this one
    let b = net.add_peer(sim::peer_config("b"), Nat::None);
    net.peers[b].core.add_link(net.now);
    net.run_for(Duration::from_millis(200));
    assert!(net.peers.iter().all(|p| p.core.is_up()));
    net.hub_cut = true;
    let down_at = net.now;
    let mut lost_at = [None, None];
    while net.now - down_at < Duration::from_secs(12) {
        net.run_for(TICK);
        for (i, at) in lost_at.iter_mut().enumerate() {
            if at.is_none() && net.peers[i].events.iter().any(|e| matches!(e, PeerEvent::HubLost { .. })) {
                *at = Some(net.now - down_at);
            }
        }
    }
    let [alone, standby] = lost_at.map(|l| l.expect("hub declared lost"));
    // silence since the last answer, then the first miss is seen a heartbeat later
    assert!(standby >= Duration::from_secs(3) && standby <= Duration::from_secs(5), "{standby:?}");
    assert!(alone >= Duration::from_secs(8), "{alone:?}");
}

/// With another hub to go to, a peer carrying traffic through its hub watches it closely:
/// lost within about a second of falling silent; a busy peer whose hub answers is never
/// taken for lost (a long stream, some loss); an idle one keeps the standby wait.
#[test]
fn a_busy_peer_with_standby_hubs_declares_a_silent_hub_lost_within_a_second() {
    let mut net = net(&["a", "b"]);
    net.peers.clear();
    for name in ["a", "b"] {
        let i = net.add_peer(sim::peer_config(name), Nat::None);
        net.peers[i].core.add_link(net.now);
    }
    net.run_for(Duration::from_millis(200));
    let (a, b) = (net.addr(0), net.addr(1));
    // 20 s of a stream a -> b at 5% loss each way: the hub answers, nobody moves
    net.loss = 0.05;
    let start = net.now;
    let mut tag = 0u8;
    while net.now - start < Duration::from_secs(20) {
        let now = net.now;
        net.peers[0].core.handle_tun_packet(now, &ipv4(a, b, 200, tag));
        tag = tag.wrapping_add(1);
        net.run_for(Duration::from_millis(50));
    }
    assert!(
        !net.peers.iter().any(|p| p.events.iter().any(|e| matches!(e, PeerEvent::HubLost { .. }))),
        "a live hub taken for lost"
    );
    net.loss = 0.0;
    // the hub falls silent mid-stream: a (busy) moves on fast, b (idle) after the standby wait
    net.hub_cut = true;
    let down_at = net.now;
    let mut lost_at = [None, None];
    while net.now - down_at < Duration::from_secs(6) {
        let now = net.now;
        net.peers[0].core.handle_tun_packet(now, &ipv4(a, b, 200, 0));
        net.run_for(Duration::from_millis(20));
        for (i, at) in lost_at.iter_mut().enumerate() {
            if at.is_none() && net.peers[i].events.iter().any(|e| matches!(e, PeerEvent::HubLost { .. })) {
                *at = Some(net.now - down_at);
            }
        }
    }
    let [busy, idle] = lost_at.map(|l| l.expect("hub declared lost"));
    assert!(busy <= Duration::from_millis(1000), "busy: {busy:?}");
    assert!(idle >= Duration::from_secs(3), "idle: {idle:?}");
}

#[test]
fn mtu_mismatch_is_a_clear_error() {
    let mut net = net(&[]);
    net.peers.push(peer(&net, "a", Some(1400), vec![], 0));
    net.run_for(Duration::from_millis(100));
    let fatal = net.peers[0].events.iter().find_map(|e| match e {
        PeerEvent::Fatal(m) => Some(m.to_string()),
        _ => None,
    });
    let m = fatal.expect("a fatal error");
    assert!(m.contains(&TUN_MTU.to_string()) && m.contains("1400"), "{m}");
    assert!(!net.peers[0].core.is_up());
}

#[test]
fn wrong_key_and_unknown_names_get_nothing() {
    let mut net = net(&[]);
    let now = net.now;
    let mut p = peer(&net, "a", None, vec![], 0);
    p.core = Peer::new(
        PeerCoreConfig { key: PeerKey::new(&[1; 32]), ..sim::peer_config("a") },
        now,
        common::sim::SIM_WALL_START_MS,
        Box::new(SimEntropy::new(5)),
    );
    net.peers.push(p);
    net.peers.push(peer(&net, "stranger", None, vec![], 1));
    net.run_for(Duration::from_secs(2));
    assert!(net.peers.iter().all(|p| !p.core.is_up() && p.events.is_empty()));
    assert!(net.hub.drops.bad_mac > 0 && net.hub.drops.unknown_peer > 0);
    assert!(net.hub.status(net.now).is_empty());
}

/// Everything a peer sent, replayed from another address while the peer is registered:
/// the hub's view of the peer does not change (before, a replayed Register was only
/// refused by the in-memory timestamp, and KCP was trusted by tunnel address).
#[test]
fn replayed_traffic_changes_nothing() {
    let mut net = net(&["a", "b"]);
    net.run_for(Duration::from_millis(500));
    let (a, b) = (net.addr(0), net.addr(1));
    net.peers[0].core.handle_tun_packet(net.now, &ipv4(a, b, 100, 1));
    net.run_for(Duration::from_millis(100));
    assert_eq!(net.peers[1].tun_rx.len(), 1);
    let before = net.hub.status(net.now);
    let attacker: SocketAddr = "127.0.0.1:50000".parse().unwrap();
    let wall = net.wall_ms();
    let captured = net.sent_by(0);
    assert!(captured.len() > 3, "a Register, heartbeats and KCP");
    for d in &captured {
        net.hub.handle_datagram(net.now, wall, attacker, d);
    }
    net.exchange();
    let after = net.hub.status(net.now);
    assert_eq!(
        before.iter().map(|p| (p.id, &p.tunnel)).collect::<Vec<_>>(),
        after.iter().map(|p| (p.id, &p.tunnel)).collect::<Vec<_>>()
    );
    assert_eq!(net.peers[1].tun_rx.len(), 1, "a replayed IP packet was delivered again");
    assert!(net.hub.drops.replayed as usize >= captured.len() - 1, "{:?}", net.hub.drops);
}

/// A hub restarts; an attacker replays everything a peer sent before (its Register
/// within the clock-skew window included). Before: the Register re-bound the peer's name
/// to the attacker's tunnel address. Now it makes a registration nobody can use, the
/// peer's own re-registration wins, and nothing replayed is delivered.
#[test]
fn register_replayed_after_a_hub_restart_yields_nothing() {
    let mut net = net(&["a", "b"]);
    net.run_for(Duration::from_millis(500));
    let (a, b) = (net.addr(0), net.addr(1));
    net.peers[0].core.handle_tun_packet(net.now, &ipv4(a, b, 100, 1));
    net.run_for(Duration::from_millis(100));
    let captured = net.sent_by(0);
    net.hub = hub(777);
    let attacker: SocketAddr = "127.0.0.1:50000".parse().unwrap();
    let wall = net.wall_ms();
    for d in &captured {
        net.hub.handle_datagram(net.now, wall, attacker, d);
    }
    let answers = net.take_hub_datagrams();
    assert!(answers.iter().all(|(to, _)| *to == attacker));
    let welcomes = answers.iter().filter(|(_, d)| d[0] == vpn::wire::MSG_WELCOME).count();
    assert_eq!(welcomes, 1, "one Welcome, to a registration only the peer's key and ephemeral secret can use");
    // the rest are Resets of a registration the new hub does not know: shorter than any
    // datagram they answer, and telling nothing but that it is gone
    let resets = answers.iter().filter(|(_, d)| d[0] == vpn::wire::MSG_RESET && d.len() == vpn::wire::RESET_LEN);
    assert_eq!(resets.count(), answers.len() - 1);
    assert!(net.hub.status(net.now).is_empty(), "a replayed Register registered a peer");
    // the real peers notice the restart and come back; nothing replayed reached b
    net.run_for(Duration::from_secs(12));
    let st = net.hub.status(net.now);
    assert_eq!(st.len(), 2);
    let a_now = st.iter().find(|p| p.name == "a").unwrap();
    assert_eq!(a_now.tunnel, net.peers[0].tunnel.to_string());
    assert_eq!(net.peers[1].tun_rx.len(), 1);
    assert_eq!(net.hub.drops.unconfirmed, 1, "the peer's own Register replaced the replayed one");
}

/// A peer is gone; its last tunnel address keeps sending what it sent before (a reused
/// session slot, or an attacker). Liveness is refreshed only by what opens: the peer
/// expires on time.
#[test]
fn replayed_traffic_never_keeps_a_peer_alive() {
    let mut net = net(&["a", "b"]);
    net.run_for(Duration::from_millis(500));
    let a_tunnel = net.peers[0].tunnel;
    let captured = net.sent_by(0);
    net.peers.remove(0);
    let mut replays = captured.iter().cycle();
    let end = net.now + DEFAULT_PEER_TIMEOUT + Duration::from_secs(1);
    while net.now < end {
        let wall = net.wall_ms();
        let d = replays.next().unwrap();
        net.hub.handle_datagram(net.now, wall, a_tunnel, d);
        net.run_for(Duration::from_millis(50));
    }
    let st = net.hub.status(net.now);
    assert_eq!(st.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["b"], "{st:?}");
}

/// Registers resent every 500 ms while the round trip is longer (or released together
/// from a queue) all reach the hub before any Welcome reaches the peer. Before, each got
/// a new peer id and the peer kept the first while the hub kept the last: it never came
/// up. Now every copy gets the same Welcome.
#[test]
fn concurrent_registers_converge_on_one_id() {
    let mut net = net(&[]);
    net.peers.push(peer(&net, "a", None, vec![], 0));
    let mut registers = Vec::new();
    for _ in 0..4 {
        let wall = net.wall_ms();
        net.peers[0].core.handle_timeout(net.now, wall);
        registers.extend(net.take_peer_datagrams(0));
        net.now += vpn::peer::REGISTER_RETRY;
    }
    assert_eq!(registers.len(), 4);
    let wall = net.wall_ms();
    let from = net.peers[0].tunnel;
    let mut welcomes = Vec::new();
    for r in &registers {
        net.hub.handle_datagram(net.now, wall, from, r);
        welcomes.extend(net.take_hub_datagrams().into_iter().map(|(_, d)| d));
    }
    assert_eq!(welcomes.len(), 4);
    assert!(welcomes.windows(2).all(|w| w[0] == w[1]), "one registration, one Welcome");
    for w in &welcomes {
        net.peers[0].core.handle_datagram(net.now, 0, w);
    }
    net.run_for(Duration::from_millis(100));
    assert!(net.peers[0].core.is_up());
    let st = net.hub.status(net.now);
    assert_eq!(st.len(), 1);
    assert_eq!(st[0].state, PeerState::Up);
    // and it carries traffic
    let a = net.addr(0);
    net.peers[0].core.handle_tun_packet(net.now, &ipv4(a, Ipv4Addr::new(10, 99, 0, 1), 64, 3));
    net.run_for(Duration::from_millis(50));
    assert_eq!(net.hub_tun_rx.len(), 1);
}

/// Before, any peer could announce up to 32 prefixes anywhere but the VPN network, and
/// every other peer installed them (`ip route replace`): c could take over b's subnet,
/// a more specific part of it, or a /8 covering the bridges.
#[test]
fn announcements_outside_the_hub_yaml_allowance_are_refused_and_never_pushed() {
    use vpn::wire::RouteRefusalReason;
    let mut net = net(&["a"]);
    net.peers.push(peer(&net, "b", None, vec!["192.168.50.0/24".parse().unwrap()], 1));
    let hijack: Vec<Prefix> = ["192.168.50.0/24", "192.168.50.128/25", "10.0.0.0/8", "10.99.0.0/25"]
        .iter()
        .map(|p| p.parse().unwrap())
        .collect();
    net.peers.push(peer(&net, "c", None, hijack.clone(), 2));
    net.run_for(Duration::from_millis(300));
    assert!(net.peers.iter().all(|p| p.core.is_up()), "c registers; only its routes are refused");
    let refused = net.peers[2].core.refused_routes().to_vec();
    assert_eq!(refused.len(), 4, "{refused:?}");
    assert!(refused.contains(&(hijack[3], RouteRefusalReason::OverlapsNetwork)));
    assert!(refused.contains(&(hijack[0], RouteRefusalReason::NotAllowed)), "b's subnet is not c's");
    assert!(refused.contains(&(hijack[2], RouteRefusalReason::OverlapsNetwork)), "a /8 around the VPN");
    assert!(net.peers[2].events.iter().any(|e| matches!(e, PeerEvent::RouteRefused { .. })));
    assert_eq!(net.hub.drops.route_refused, 4);
    // a installs b's subnet and nothing of c's
    let b_route: Prefix = "192.168.50.0/24".parse().unwrap();
    let added: Vec<Prefix> = net.peers[0]
        .events
        .iter()
        .filter_map(|e| match e {
            PeerEvent::Routes { add, .. } => Some(add.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(added, vec![b_route]);
    let listed_c = net.peers[0].core.peers().iter().find(|p| p.name == "c").unwrap().routes.clone();
    assert!(listed_c.is_empty(), "c's refused routes were pushed: {listed_c:?}");
    // traffic for b's subnet still reaches b, and c may not send from it
    let (a, c) = (net.addr(0), net.addr(2));
    net.peers[0].core.handle_tun_packet(net.now, &ipv4(a, Ipv4Addr::new(192, 168, 50, 200), 100, 1));
    net.peers[2].core.handle_tun_packet(net.now, &ipv4(Ipv4Addr::new(192, 168, 50, 200), a, 100, 2));
    net.run_for(Duration::from_millis(100));
    assert_eq!((net.peers[1].tun_rx.len(), net.peers[2].tun_rx.len()), (1, 0));
    assert!(net.peers[0].tun_rx.is_empty(), "a took a packet spoofed from b's subnet by {c}");
}

/// An exit node's default route: only where explicitly allowed; it never captures the
/// VPN's own addresses.
#[test]
fn route_verdicts() {
    use vpn::hub::route_verdict;
    use vpn::wire::RouteRefusalReason::*;
    let net: Prefix = "10.99.0.0/24".parse().unwrap();
    let p = |s: &str| -> Prefix { s.parse().unwrap() };
    assert_eq!(route_verdict(&[p("192.168.0.0/16")], net, &p("192.168.50.0/24")), Ok(()));
    assert_eq!(route_verdict(&[p("192.168.50.0/24")], net, &p("192.168.0.0/16")), Err(NotAllowed));
    assert_eq!(route_verdict(&[], net, &p("0.0.0.0/0")), Err(NotAllowed));
    assert_eq!(route_verdict(&[p("0.0.0.0/0")], net, &p("0.0.0.0/0")), Ok(()));
    assert_eq!(route_verdict(&[p("0.0.0.0/0")], net, &p("10.99.0.128/25")), Err(OverlapsNetwork));
    assert_eq!(route_verdict(&[p("10.0.0.0/8")], net, &p("10.0.0.0/8")), Err(OverlapsNetwork));
}

/// 400 peers announcing 32 routes each: a peer list of ≈ 70 KB. Before, it was one KCP
/// message larger than the peers' receive buffer: it could never be taken, and every
/// message behind it (IP packets too) waited forever. Now it goes in chunks, once per
/// burst of registrations, and every peer ends up with the whole list.
#[test]
fn a_peer_list_larger_than_a_receive_buffer_arrives_whole() {
    const N: usize = 400;
    let names: Vec<String> = (0..N).map(|i| format!("p{i}")).collect();
    let routes_of = |i: usize| -> Vec<Prefix> {
        (0..32)
            .map(|j| Prefix::new(Ipv4Addr::new(11, ((i * 32 + j) >> 8) as u8, (i * 32 + j) as u8, 0), 24).unwrap())
            .collect()
    };
    let mut cfg = hub_config(&[]);
    cfg.peers = names
        .iter()
        .enumerate()
        .map(|(i, n)| PeerSpec {
            name: n.clone(),
            key: PeerKey::new(&key_of(n)),
            fixed_addr: None,
            allowed_routes: routes_of(i),
        })
        .collect();
    cfg.network = "10.99.0.0/16".parse().unwrap();
    let mut net = net(&[]);
    net.hub = Hub::new(cfg, Box::new(SimEntropy::new(3)));
    net.peers = names.iter().enumerate().map(|(i, n)| peer(&net, n, None, routes_of(i), i)).collect();
    net.run_for(Duration::from_secs(2));
    assert_eq!(net.hub.status(net.now).len(), N);
    for p in &net.peers {
        assert!(p.core.is_up(), "{}", p.core.link_state());
        assert_eq!(p.core.peers().len(), N);
        assert_eq!(p.core.drops.malformed, 0);
    }
    // and IP traffic still flows behind the list
    let (a, b) = (net.addr(0), net.addr(N - 1));
    net.peers[0].core.handle_tun_packet(net.now, &ipv4(a, b, 100, 1));
    net.run_for(Duration::from_millis(100));
    assert_eq!(net.peers[N - 1].tun_rx.len(), 1);
}

/// The peer's own inner-source check (before, it wrote to its TUN whatever the hub link
/// carried): a packet "from" itself, from inside its own routes or from a VPN address
/// nobody has is dropped; one from another peer, the hub or beyond the hub is taken.
#[test]
fn peers_take_from_the_hub_only_sources_it_can_carry() {
    let mut net = net(&["a"]);
    net.peers.push(peer(&net, "b", None, vec!["192.168.50.0/24".parse().unwrap()], 1));
    net.run_for(Duration::from_millis(300));
    let (a, b) = (net.addr(0), net.addr(1));
    let hub_addr = Ipv4Addr::new(10, 99, 0, 1);
    for src in
        [b, Ipv4Addr::new(10, 99, 0, 200), Ipv4Addr::new(192, 168, 50, 9), hub_addr, Ipv4Addr::new(203, 0, 113, 5)]
    {
        net.hub.handle_tun_packet(&ipv4(src, b, 64, 1));
    }
    net.hub.handle_tun_packet(&ipv4(Ipv4Addr::new(192, 168, 50, 9), a, 64, 2));
    net.run_for(Duration::from_millis(100));
    let from: Vec<Ipv4Addr> = net.peers[1].tun_rx.iter().map(|p| Ipv4Addr::new(p[12], p[13], p[14], p[15])).collect();
    assert_eq!(from, [hub_addr, Ipv4Addr::new(203, 0, 113, 5)], "b took a spoofed source");
    assert_eq!(net.peers[1].core.drops.spoofed_source, 3);
    assert_eq!(net.peers[0].tun_rx.len(), 1, "a host behind b reaches a");
}

/// hub.yaml re-read (SIGHUP): a peer taken out is dropped and withdrawn from everyone's
/// list; one added may register; a narrowed allowance withdraws the route; the others'
/// registrations and traffic are untouched.
#[test]
fn reconfigure_adds_drops_and_narrows_without_disturbing_others() {
    let mut net = net(&["a", "c"]);
    net.peers.push(peer(&net, "b", None, vec!["192.168.50.0/24".parse().unwrap()], 2));
    net.peers.push(peer(&net, "d", None, vec![], 3));
    net.run_for(Duration::from_millis(300));
    assert!(!net.peers[3].core.is_up(), "d is not configured yet");
    let ids: Vec<u32> = net.hub.status(net.now).iter().filter(|p| p.name != "c").map(|p| p.id).collect();
    let mut cfg = hub_config(&["a", "b", "d"]);
    cfg.peers.iter_mut().find(|p| p.name == "b").unwrap().allowed_routes.clear();
    let changes = net.hub.reconfigure(net.now, cfg.peers);
    assert_eq!(
        (changes.added, changes.removed, changes.changed),
        (vec!["d".to_string()], vec!["c".to_string(), "fixed".to_string()], vec!["b".to_string()])
    );
    net.run_for(Duration::from_secs(1));
    let st = net.hub.status(net.now);
    let names: Vec<&str> = st.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(names.contains(&"d") && !names.contains(&"c"));
    assert!(st.iter().filter(|p| p.name != "d").all(|p| ids.contains(&p.id)), "a or b had to register again");
    let a_view = net.peers[0].core.peers();
    assert!(a_view.iter().all(|p| p.name != "c" && p.routes.is_empty()), "{a_view:?}");
    assert!(net.peers[0]
        .events
        .contains(&PeerEvent::Routes { add: vec![], remove: vec!["192.168.50.0/24".parse().unwrap()] }));
    let (a, b) = (net.addr(0), net.addr(2));
    net.peers[0].core.handle_tun_packet(net.now, &ipv4(a, b, 100, 1));
    net.run_for(Duration::from_millis(100));
    assert_eq!(net.peers[2].tun_rx.len(), 1);
}

/// After a hub restart, a replayed Register of a (asking for no address in particular)
/// arrives before b comes back: it must not take the address b asks for again. Before,
/// its unused registration held b's old address and b (then a) came back renumbered;
/// then, a Register evicted any other name's pending registration for the address it
/// asked for (see `a_register_never_evicts_another_names_registration`). Now the
/// restarted hub has its state file: every name's address is its own.
#[test]
fn a_replayed_register_takes_no_address_another_peer_returns_for() {
    let mut net = net(&[]);
    net.peers.push(peer(&net, "b", None, vec![], 0));
    net.run_for(Duration::from_millis(100));
    net.peers.push(peer(&net, "a", None, vec![], 1));
    net.run_for(Duration::from_millis(300));
    let a_first = net.sent_by(1).remove(0); // a's very first Register: any address
    let before: Vec<Ipv4Addr> = (0..2).map(|i| net.addr(i)).collect();
    net.hub = restarted_hub(&net, 9);
    let wall = net.wall_ms();
    net.hub.handle_datagram(net.now, wall, "127.0.0.1:50000".parse().unwrap(), &a_first);
    net.run_for(Duration::from_secs(12));
    let after: Vec<Ipv4Addr> = (0..2).map(|i| net.addr(i)).collect();
    assert!(net.peers.iter().all(|p| p.core.is_up()));
    assert_eq!(before, after, "addresses moved after the hub restart");
}

/// The simulation wakes the cores only when they ask (`VpnSim::run_for`): an idle peer's
/// heartbeats still go exactly every `HEARTBEAT_INTERVAL` (a timer missing from a core's
/// `poll_timeout` would fire late or never), and an idle network asks for few wake-ups.
#[test]
fn timers_fire_when_asked_and_an_idle_network_sleeps() {
    let mut net = net(&["a", "b"]);
    net.run_for(Duration::from_secs(2));
    assert!(net.peers.iter().all(|p| p.core.is_up()));
    let (from, start) = (net.peers[0].tunnel, net.captured.len());
    let wakeups_before = net.wakeups;
    net.run_for(Duration::from_secs(10));
    let heartbeat_len = vpn::wire::SEALED_OVERHEAD + vpn::wire::HEARTBEAT_LEN;
    let beats: Vec<Instant> =
        net.captured[start..].iter().filter(|(_, f, d)| *f == from && d.len() == heartbeat_len).map(|c| c.0).collect();
    assert_eq!(beats.len(), 10, "one heartbeat a second");
    for w in beats.windows(2) {
        assert_eq!(w[1] - w[0], vpn::peer::HEARTBEAT_INTERVAL, "a heartbeat late or early");
    }
    let wakeups = net.wakeups - wakeups_before;
    eprintln!("an idle hub and two peers: {wakeups} wake-ups in 10 s");
    assert!(wakeups <= 100, "an idle network woke {wakeups} times in 10 s");
}

/// The hub's expiry timer fires exactly when it asked to: a peer cut off is gone
/// `DEFAULT_PEER_TIMEOUT` after the last datagram of it the hub took, not a step later
/// (before, `Hub::poll_timeout` read the real clock and a simulation never noticed).
#[test]
fn the_hub_expires_a_silent_peer_exactly_on_time() {
    let mut net = net(&["a"]);
    net.run_for(Duration::from_secs(2));
    assert!(net.peers[0].core.is_up());
    net.hub_cut = true;
    let cut = net.now;
    net.run_for(DEFAULT_PEER_TIMEOUT + Duration::from_secs(2));
    let last_taken = net.captured.iter().filter(|(at, _, _)| *at <= cut).map(|c| c.0).max().unwrap();
    let gone = net
        .hub_events
        .iter()
        .find_map(|(at, e)| matches!(e, vpn::hub::HubEvent::PeerGone { .. }).then_some(*at))
        .expect("a expired");
    assert_eq!(gone, last_taken + DEFAULT_PEER_TIMEOUT);
}

/// An exit node (hub.yaml allows x 0.0.0.0/0) through the hub: before, its default route
/// vouched for every source, the hub's own VPN address and other peers' included (e.g.
/// DNS answers "from" the hub). Now inside the VPN network only x's own address passes.
#[test]
fn an_exit_node_cannot_send_as_the_hub_or_another_peer() {
    let default: Prefix = "0.0.0.0/0".parse().unwrap();
    let mut cfg = sim::hub_config(&["a", "x"]);
    cfg.peers[1].allowed_routes = vec![default];
    let mut net = VpnSim::new(cfg, 100);
    net.add_peer(sim::peer_config("a"), Nat::None);
    net.add_peer(PeerCoreConfig { routes: vec![default], ..sim::peer_config("x") }, Nat::None);
    net.run_for(Duration::from_millis(300));
    let (a, x) = (net.addr(0), net.addr(1));
    let hub_addr = Ipv4Addr::new(10, 99, 0, 1);
    for (i, src) in [hub_addr, Ipv4Addr::new(10, 99, 0, 200), Ipv4Addr::new(8, 8, 8, 8), x].into_iter().enumerate() {
        net.peers[1].core.handle_tun_packet(net.now, &ipv4(src, a, 64, i as u8));
    }
    net.run_for(Duration::from_millis(100));
    let tags: Vec<u8> = net.peers[0].tun_rx.iter().map(|p| p[30]).collect();
    assert_eq!(tags, [2, 3], "only the internet source and x's own address");
    assert_eq!(net.hub.drops.spoofed_source, 2);
}

/// A Register from c (a valid peer) naming the address b's registration is pending on,
/// between b's Welcome and its first sealed datagram. Before, each such Register dropped
/// b's pending registration (also one refused for an MTU mismatch): b never came up.
/// Now a Register never evicts another name's entry, and c gets another address.
#[test]
fn a_register_never_evicts_another_names_registration() {
    use common::entropy::Entropy;
    let mut net = net(&[]);
    net.peers.push(peer(&net, "b", None, vec![], 0));
    let (now, wall) = (net.now, net.wall_ms());
    net.peers[0].core.handle_timeout(now, wall);
    let b_tunnel = net.peers[0].tunnel;
    for r in net.take_peer_datagrams(0) {
        net.hub.handle_datagram(now, wall, b_tunnel, &r);
    }
    for (_, w) in net.take_hub_datagrams() {
        net.peers[0].core.handle_datagram(now, 0, &w);
    }
    let b_addr = net.addr(0);
    assert!(b_addr != Ipv4Addr::UNSPECIFIED, "b has its Welcome");
    let b_confirms = net.take_peer_datagrams(0);
    // c asks for b's address: once as a valid peer, once with an MTU the hub refuses
    let c_key = PeerKey::new(&key_of("c"));
    let mut entropy = SimEntropy::new(77);
    for (nonce, mtu) in [(1u64, 0u16), (2, 1400)] {
        let public = common::crypto::x25519_public(&entropy.x25519_key());
        let reg = vpn::wire::RegisterRepr {
            name: "c".into(),
            timestamp_ms: wall + nonce,
            nonce,
            want_addr: b_addr,
            mtu,
            public,
            routes: vec![],
            instance: 0,
        };
        net.hub.handle_datagram(now, wall + nonce, "127.0.0.1:50000".parse().unwrap(), &reg.emit(&c_key));
    }
    net.take_hub_datagrams();
    for d in b_confirms {
        net.hub.handle_datagram(now, wall, b_tunnel, &d);
    }
    net.run_for(Duration::from_millis(500));
    let st = net.hub.status(net.now);
    let b = st.iter().find(|p| p.name == "b").expect("b registered");
    assert_eq!(b.addr, b_addr);
    assert_eq!(net.hub.drops.unconfirmed, 0, "no registration was dropped");
}

/// The addresses a hub gave out come back with its state file: a restarted hub gives a
/// name its own address whichever registers first, and never gives it to another.
#[test]
fn addresses_survive_a_hub_restart_through_its_state_file() {
    let mut net = net(&["a", "b"]);
    net.run_for(Duration::from_millis(300));
    let (a, b) = (net.addr(0), net.addr(1));
    assert_eq!(net.hub.assignments().len(), 2);
    assert!(net.hub_events.iter().any(|(_, e)| *e == vpn::hub::HubEvent::AddressesChanged));
    // restarted; only b comes back at first, having lost its state (asks for nothing)
    let mut fresh = VpnSim::new(
        HubCoreConfig { assigned: net.hub.assignments().clone(), ..hub_config(&["a", "b", "c", "fixed"]) },
        5,
    );
    fresh.peers.push(peer(&fresh, "c", None, vec![], 2));
    fresh.peers.push(peer(&fresh, "b", None, vec![], 1));
    fresh.run_for(Duration::from_millis(300));
    fresh.peers.push(peer(&fresh, "a", None, vec![], 0));
    fresh.run_for(Duration::from_millis(300));
    assert_eq!((fresh.addr(2), fresh.addr(1)), (a, b));
    assert!(fresh.addr(0) != a && fresh.addr(0) != b, "c took a kept address");
}

/// The hub restarts while a pings it every 50 ms. Before, a kept sealing datagrams for a
/// registration the new hub did not know until its heartbeat retries gave up (8 s). Now
/// the new hub answers with a Reset carrying that registration's token, and a registers
/// again at once: answers resume within a few pings.
#[test]
fn a_restarted_hub_is_back_within_a_few_pings() {
    let mut net = net(&["a", "b"]);
    net.run_for(Duration::from_secs(2));
    let a = net.addr(0);
    let hub_addr = Ipv4Addr::new(10, 99, 0, 1);
    net.hub = restarted_hub(&net, 31);
    let restarted = net.now;
    net.hub_tun_rx.clear();
    let mut back = None;
    for i in 0..100u8 {
        net.peers[0].core.handle_tun_packet(net.now, &ipv4(a, hub_addr, 64, i));
        net.run_for(Duration::from_millis(50));
        if back.is_none() && !net.hub_tun_rx.is_empty() {
            back = Some(net.now - restarted);
        }
    }
    let back = back.expect("a's pings reach the restarted hub");
    assert!(back <= Duration::from_millis(500), "took {back:?}");
    assert!(net.peers[0].events.iter().any(|e| matches!(e, PeerEvent::HubReset { .. })));
    assert_eq!(net.addr(0), a, "the same address");
}

/// A Reset is believed only for our registration and with its token: a forged one, one
/// naming another registration and one replayed after we registered again change nothing.
#[test]
fn a_reset_needs_the_registrations_token() {
    let mut net = net(&["a"]);
    net.run_for(Duration::from_secs(1));
    let captured_id_of = |d: &[u8]| u32::from_be_bytes(d[1..5].try_into().unwrap());
    let id = captured_id_of(net.sent_by(0).last().unwrap());
    let forged = vpn::wire::ResetRepr { peer_id: id, token: [9; 16] }.emit();
    let other = vpn::wire::ResetRepr { peer_id: id ^ 1, token: [9; 16] }.emit();
    for d in [&forged[..], &other[..]] {
        net.peers[0].core.handle_datagram(net.now, 0, d);
    }
    assert_eq!(net.peers[0].core.drops.unauthenticated, 2);
    assert!(!net.peers[0].events.iter().any(|e| matches!(e, PeerEvent::HubReset { .. })));
    // the genuine one, from a hub that forgot a: taken once; replayed later, nothing
    net.hub = restarted_hub(&net, 32);
    let a = net.addr(0);
    net.peers[0].core.handle_tun_packet(net.now, &ipv4(a, Ipv4Addr::new(10, 99, 0, 1), 64, 1));
    let (now, wall, from) = (net.now, net.wall_ms(), net.peers[0].tunnel);
    for d in net.take_peer_datagrams(0) {
        net.hub.handle_datagram(now, wall, from, &d);
    }
    let resets: Vec<Vec<u8>> =
        net.take_hub_datagrams().into_iter().map(|(_, d)| d).filter(|d| d[0] == vpn::wire::MSG_RESET).collect();
    assert!(!resets.is_empty() && resets.iter().all(|d| d.len() == vpn::wire::RESET_LEN));
    net.peers[0].core.handle_datagram(now, 0, &resets[0]);
    net.run_for(Duration::from_millis(200));
    assert!(net.peers[0].core.is_up());
    net.peers[0].core.handle_datagram(net.now, 0, &resets[0]);
    net.run_for(Duration::from_millis(200));
    assert_eq!(net.peers[0].events.iter().filter(|e| **e == PeerEvent::HubReset { link: 0 }).count(), 1);
    assert!(net.peers[0].core.is_up(), "a replayed Reset ended the new registration");
}

/// A hostile hub names a public suffix (`com`) as the VPN's DNS domain: before, the peer
/// routed every lookup in it to the hub (`resolvectl domain ~com`, or hosts lines). Now
/// it refuses it, as it refuses a domain other than the one peer.yaml pins.
#[test]
fn a_peer_routes_lookups_only_for_a_private_or_pinned_domain() {
    let configured_domain = |hub_domain: &str, pinned: Option<&str>| {
        let mut cfg = hub_config(&["a"]);
        cfg.dns_domain = Some(hub_domain.into());
        let mut net = VpnSim::new(cfg, 100);
        net.add_peer(PeerCoreConfig { dns_domain: pinned.map(String::from), ..sim::peer_config("a") }, Nat::None);
        net.run_for(Duration::from_millis(200));
        assert!(net.peers[0].core.is_up());
        let refused = net.peers[0].events.iter().any(|e| matches!(e, PeerEvent::DnsDomainRefused { .. }));
        let domain = net.peers[0].events.iter().find_map(|e| match e {
            PeerEvent::Configured { dns_domain, .. } => Some(dns_domain.clone()),
            _ => None,
        });
        (domain.flatten(), refused)
    };
    assert_eq!(configured_domain("mpvpn", None), (Some("mpvpn".into()), false));
    assert_eq!(configured_domain("com", None), (None, true));
    assert_eq!(configured_domain("co.uk", None), (None, true));
    assert_eq!(configured_domain("vpn.example.org", Some("mpvpn")), (None, true), "not the pinned one");
    assert_eq!(configured_domain("mpvpn", Some("mpvpn")), (Some("mpvpn".into()), false));
}

/// `AddressAuthority::Cluster`: the hub never picks an address itself. A new name is
/// refused while the store is down (the peer keeps asking); with the store up, the hub
/// asks it once per `ADDRESS_ASK_INTERVAL` and answers the Register that follows its
/// answer; a name the store knows registers at once, also with the store down again.
#[test]
fn cluster_hubs_take_addresses_only_from_the_store() {
    use vpn::hub::{AddressAuthority, HubEvent, ADDRESS_ASK_INTERVAL};
    use vpn::wire::RefusalReason;
    let cfg = HubCoreConfig { addresses: AddressAuthority::Cluster, ..hub_config(&["a", "b", "c", "fixed"]) };
    let mut net = VpnSim::new(cfg, 100);
    net.add_peer(sim::peer_config("a"), Nat::None);
    net.add_peer(sim::peer_config("fixed"), Nat::None);
    net.run_for(Duration::from_secs(1));
    assert!(!net.peers[0].core.is_up());
    assert!(net.peers[0].events.contains(&PeerEvent::Refused(RefusalReason::StoreUnavailable)));
    assert!(net.peers[1].core.is_up(), "a fixed address needs no store");
    let wanted = |net: &VpnSim| {
        net.hub_events.iter().filter(|(_, e)| matches!(e, HubEvent::AddressWanted { name, .. } if name == "a")).count()
    };
    assert_eq!(wanted(&net), 0, "nothing asked of a store that is down");
    net.hub.set_store_available(true);
    net.run_for(ADDRESS_ASK_INTERVAL * 3);
    assert!(!net.peers[0].core.is_up(), "no guessed address");
    let asked = wanted(&net);
    assert!((2..=4).contains(&asked), "asked {asked} times in 3 intervals");
    let given = Ipv4Addr::new(10, 99, 0, 42);
    net.hub.learn_assignments([("a".to_string(), given), ("nobody".to_string(), Ipv4Addr::new(10, 99, 0, 43))].into());
    net.run_for(Duration::from_secs(1));
    assert!(net.peers[0].core.is_up());
    assert_eq!(net.addr(0), given);
    assert!(!net.hub.assignments().contains_key("nobody"), "names not in hub.yaml are ignored");
    // the store goes down: known names keep registering (after a restart of the peer too)
    net.hub.set_store_available(false);
    // (host 7's entropy: a restarted peer registers with a new nonce)
    net.peers[0] = peer(&net, "a", None, Vec::new(), 7);
    net.run_for(Duration::from_secs(1));
    assert_eq!(net.addr(0), given);
}

/// Peers that take deltas get the list's changes, not the list: a join costs each of them
/// one entry; a peer whose list went stale asks for it whole and gets it; a peer that
/// takes no deltas (an older one) still gets whole lists. Every list stays the hub's.
#[test]
fn peer_lists_go_as_deltas_to_peers_that_take_them() {
    let names = ["a", "b", "c", "fixed"];
    let mut net = VpnSim::new(hub_config(&names), 100);
    for n in &names[..3] {
        net.add_peer(PeerCoreConfig { peer_list_deltas: *n != "c", ..sim::peer_config(n) }, Nat::None);
    }
    net.run_for(Duration::from_secs(2));
    let hub_list = |net: &VpnSim| {
        let mut v: Vec<String> = net.hub.status(net.now).iter().map(|p| p.name.clone()).collect();
        v.sort();
        v
    };
    let list_of = |net: &VpnSim, i: usize| {
        let mut v: Vec<String> = net.peers[i].core.peers().iter().map(|p| p.name.clone()).collect();
        v.sort();
        v
    };
    for i in 0..3 {
        assert_eq!(list_of(&net, i), hub_list(&net), "peer {i}");
    }
    // a fourth joins: the delta-takers get one entry, the older peer the whole list
    let sent_before: Vec<u64> = (0..3).map(|i| net.hub_bytes_to(i)).collect();
    net.add_peer(sim::peer_config("fixed"), Nat::None);
    net.run_for(Duration::from_secs(2));
    for i in 0..4 {
        assert_eq!(list_of(&net, i), hub_list(&net), "peer {i} after the join");
    }
    let cost: Vec<u64> = (0..3).map(|i| net.hub_bytes_to(i) - sent_before[i]).collect();
    println!("bytes to each peer for one join (a, b: deltas; c: whole lists): {cost:?}");
    assert!(cost[0] < cost[2] && cost[1] < cost[2], "{cost:?}");
    // a peer leaves: the others drop it
    net.peers.pop();
    net.run_for(DEFAULT_PEER_TIMEOUT + Duration::from_secs(3));
    for i in 0..3 {
        assert_eq!(list_of(&net, i), ["a", "b", "c"], "peer {i} after the leave");
    }
    let stale = |net: &VpnSim, i: usize| {
        net.peers[i].core.drop_counts().iter().find(|(w, _)| *w == "stale_list").map_or(0, |x| x.1)
    };
    assert_eq!(stale(&net, 0), 0);
    // a's list goes stale: the next delta does not apply; a asks for the list whole, and
    // holds the hub's list again
    net.peers[0].core.forget_peer_list_version();
    net.add_peer(sim::peer_config("fixed"), Nat::None);
    net.run_for(Duration::from_secs(2));
    assert_eq!(stale(&net, 0), 1, "the delta found a's list stale");
    for i in 0..4 {
        assert_eq!(list_of(&net, i), hub_list(&net), "peer {i} after a's stale list");
    }
    // and takes deltas again from there
    net.peers.pop();
    net.run_for(DEFAULT_PEER_TIMEOUT + Duration::from_secs(3));
    assert_eq!(list_of(&net, 0), ["a", "b", "c"]);
    assert_eq!(stale(&net, 0), 1);
}

/// One peer process with two ways to one hub (two `hubs:` entries reaching it): its
/// second registration is refused while the first is heard from, so the two never
/// replace each other (before, they did so every few seconds, forever); once the first
/// falls silent, a second way is taken. Another process of the name (a restart) is
/// never refused.
#[test]
fn a_second_way_to_one_hub_is_refused_while_the_first_is_heard() {
    use vpn::sim::raw::{next_datagram, register_instance, test_hub, test_key};
    use vpn::wire::{RefusalReason, RefusalRepr, RegisterRepr};
    let (t0, wall) = (common::sim::epoch(), common::sim::SIM_WALL_START_MS);
    let mut hub = test_hub();
    let way = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    register_instance(&mut hub, "a", way(40000), 1, 7, t0, wall);
    let mut out = vec![0u8; common::wire::MAX_DATAGRAM];
    let mut register = |hub: &mut Hub, at: Instant, wall: u64, from: SocketAddr, nonce: u64, instance: u64| {
        let reg = RegisterRepr {
            name: "a".into(),
            timestamp_ms: wall,
            nonce,
            want_addr: Ipv4Addr::UNSPECIFIED,
            mtu: 0,
            public: [9; 32],
            routes: vec![],
            instance,
        };
        hub.handle_datagram(at, wall, from, &reg.emit(&test_key("a")));
        let (to, n) = next_datagram(hub, &mut out).expect("an answer");
        assert_eq!(to, from);
        RefusalRepr::parse(&out[..n], &test_key("a")).ok().map(|r| r.reason)
    };
    let soon = t0 + Duration::from_millis(500);
    assert_eq!(register(&mut hub, soon, wall + 1, way(40001), 2, 7), Some(RefusalReason::RegisteredElsewhere));
    assert_eq!(hub.status(soon).len(), 1, "the first registration stands");
    // the first way silent past DUPLICATE_HEARD_WITHIN: the second is welcomed
    let later = t0 + vpn::hub::DUPLICATE_HEARD_WITHIN + Duration::from_millis(10);
    assert_eq!(register(&mut hub, later, wall + 3000, way(40001), 3, 7), None);
    // a restarted process (another instance) through a third way: welcomed at once
    assert_eq!(register(&mut hub, later, wall + 3001, way(40002), 4, 8), None);
}
