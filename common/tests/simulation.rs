//! The client and server cores in the seeded network simulator, with a fake clock.

use common::client::ClientSend;
use common::crypto::Cipher;
use common::sim::{LinkDir, Sim};
use common::stats::PathState;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

const APP: &str = "127.0.0.1:5000";

fn app() -> SocketAddr {
    APP.parse().unwrap()
}

fn numbered(i: u32) -> Vec<u8> {
    let mut v = i.to_be_bytes().to_vec();
    v.resize(200, 0xab);
    v
}

fn number(d: &[u8]) -> u32 {
    u32::from_be_bytes(d[..4].try_into().unwrap())
}

/// Sends `count` datagrams at `interval`, then lets everything settle.
fn stream(sim: &mut Sim, count: u32, interval: Duration) {
    for i in 0..count {
        sim.app_send(app(), &numbered(i));
        sim.run_for(interval);
    }
    sim.run_for(Duration::from_secs(2));
}

fn establish(sim: &mut Sim) {
    sim.app_send(app(), &numbered(u32::MAX));
    sim.run_for(Duration::from_secs(2));
    sim.target_received.clear();
    sim.app_received.clear();
}

fn unique(list: &[Vec<u8>]) -> (usize, usize) {
    let mut seen = HashSet::new();
    let mut dups = 0;
    for d in list {
        if !seen.insert(number(d)) {
            dups += 1;
        }
    }
    (seen.len(), dups)
}

#[test]
fn exactly_once_over_reordering_duplicating_paths() {
    let dir = LinkDir {
        loss: 0.0,
        delay: Duration::from_millis(5),
        jitter: Duration::from_millis(30),
        duplicate: 0.2,
        ..LinkDir::default()
    };
    let mut sim = Sim::new(1, vec![(dir, dir); 3], Cipher::Aes256Gcm);
    establish(&mut sim);
    stream(&mut sim, 2000, Duration::from_micros(500));
    let target: Vec<Vec<u8>> = sim.target_received.iter().map(|(_, d)| d.clone()).collect();
    let back: Vec<Vec<u8>> = sim.app_received.iter().map(|(_, d)| d.clone()).collect();
    assert_eq!(unique(&target), (2000, 0), "every datagram reaches the target exactly once");
    assert_eq!(unique(&back), (2000, 0), "every echo comes back exactly once");
}

fn residual_loss(seed: u64, loss: f64, paths: usize, cipher: Cipher) -> (f64, f64) {
    let dir = LinkDir {
        loss,
        delay: Duration::from_millis(10),
        jitter: Duration::from_millis(4),
        duplicate: 0.0,
        ..LinkDir::default()
    };
    let mut sim = Sim::new(seed, vec![(dir, dir); paths], cipher);
    establish(&mut sim);
    let n = 20_000;
    stream(&mut sim, n, Duration::from_micros(200));
    let (up, dups_up) = unique(&sim.target_received.iter().map(|(_, d)| d.clone()).collect::<Vec<_>>());
    let (down, dups_down) = unique(&sim.app_received.iter().map(|(_, d)| d.clone()).collect::<Vec<_>>());
    assert_eq!((dups_up, dups_down), (0, 0));
    let loss_up = 1.0 - up as f64 / n as f64;
    // the echo of what arrived: loss on the way back alone
    let loss_down = 1.0 - down as f64 / up as f64;
    (loss_up, loss_down)
}

#[test]
fn residual_loss_is_the_product_of_path_losses() {
    for (seed, cipher) in [(11, Cipher::Aes256Gcm), (12, Cipher::ChaCha20Poly1305)] {
        let (up, down) = residual_loss(seed, 0.2, 3, cipher);
        let expected = 0.2f64.powi(3);
        // 20 000 datagrams: expected 160 lost each way, sd ~13
        assert!(up < expected * 1.3 && up > expected * 0.7, "up {up} vs {expected}");
        assert!(down < expected * 1.3 && down > expected * 0.7, "down {down} vs {expected}");
    }
    let (up, _) = residual_loss(13, 0.3, 2, Cipher::Aes256Gcm);
    assert!((up - 0.09).abs() < 0.02, "two paths at 30%: {up}");
}

#[test]
fn dead_path_goes_down_and_comes_back() {
    let dir = LinkDir::lossy(0.0, 10);
    let mut sim = Sim::new(3, vec![(dir, dir); 3], Cipher::Aes256Gcm);
    establish(&mut sim);
    let st = sim.client.status(sim.now, "x");
    assert!(st.sessions[0].paths.iter().all(|p| p.state == PathState::Up), "{st:?}");
    assert!(st.sessions[0].paths[0].rtt_ms.unwrap() > 19.0);

    sim.links[1].cut = true;
    sim.run_for(Duration::from_millis(1400));
    let st = sim.client.status(sim.now, "x");
    assert_eq!(st.sessions[0].paths[1].state, PathState::Down, "down within ~1 s");
    // traffic keeps flowing on the other two, nothing lost
    let before = sim.counters.sent_to_server;
    stream(&mut sim, 500, Duration::from_millis(1));
    assert_eq!(unique(&sim.app_received.iter().map(|(_, d)| d.clone()).collect::<Vec<_>>()).0, 500);
    // data no longer goes into the dead path: ~2 copies per datagram plus probes
    let copies = sim.counters.sent_to_server - before;
    assert!(copies < 500 * 2 + 200, "{copies} datagrams sent for 500");

    sim.links[1].cut = false;
    sim.run_for(Duration::from_millis(600));
    let st = sim.client.status(sim.now, "x");
    assert_eq!(st.sessions[0].paths[1].state, PathState::Up, "back when it answers");
    let server = sim.server.status(sim.now, "x");
    assert_eq!(server.sessions[0].paths.len(), 3);
}

#[test]
fn server_restart_recovers_within_two_seconds() {
    let dir = LinkDir::lossy(0.05, 10);
    let mut sim = Sim::new(4, vec![(dir, dir); 3], Cipher::Aes256Gcm);
    establish(&mut sim);
    sim.restart_server();
    let restarted_at = sim.now;
    // the application keeps sending one datagram every 10 ms
    let mut first_back = None;
    for i in 0..400u32 {
        sim.app_send(app(), &numbered(i));
        sim.run_for(Duration::from_millis(10));
        if first_back.is_none() && !sim.app_received.is_empty() {
            first_back = Some(sim.now - restarted_at);
        }
    }
    let took = first_back.expect("traffic must resume");
    assert!(took <= Duration::from_secs(2), "resumed after {took:?}");
    // queued while re-handshaking, so only what went into the dead session is lost
    let got = unique(&sim.target_received.iter().map(|(_, d)| d.clone()).collect::<Vec<_>>()).0;
    assert!(got >= 400 - 120, "{got} of 400 reached the target");
}

#[test]
fn client_restart_and_relay_restart() {
    let dir = LinkDir::lossy(0.0, 10);
    let mut sim = Sim::new(5, vec![(dir, dir); 3], Cipher::Aes256Gcm);
    establish(&mut sim);
    sim.restart_client();
    stream(&mut sim, 50, Duration::from_millis(10));
    assert_eq!(sim.app_received.len(), 50, "a restarted client starts a new session at once");
    assert_eq!(sim.server.session_count(), 2, "the old session lingers until it expires");
    sim.run_for(Duration::from_secs(31));
    assert_eq!(sim.server.session_count(), 1, "... and then it is gone");

    // every relay restarts (new source ports): the server learns the new paths
    sim.app_received.clear();
    for l in 0..3 {
        sim.restart_relay(l);
    }
    stream(&mut sim, 50, Duration::from_millis(10));
    assert!(sim.app_received.len() >= 45, "{} of 50", sim.app_received.len());
    let st = sim.server.status(sim.now, "x");
    assert!(st.sessions[0].paths.len() >= 3);
}

#[test]
fn several_applications_get_separate_sessions() {
    let dir = LinkDir::lossy(0.0, 3);
    let mut sim = Sim::new(6, vec![(dir, dir); 2], Cipher::Aes256Gcm);
    let a: SocketAddr = "127.0.0.1:6001".parse().unwrap();
    let b: SocketAddr = "127.0.0.1:6002".parse().unwrap();
    for i in 0..20 {
        assert_ne!(sim.app_send(a, &numbered(i)), ClientSend::Dropped(common::stats::DropReason::QueueFull));
        sim.app_send(b, &numbered(1000 + i));
        sim.run_for(Duration::from_millis(5));
    }
    sim.run_for(Duration::from_secs(1));
    assert_eq!(sim.server.session_count(), 2);
    let to_a = sim.app_received.iter().filter(|(x, d)| *x == a && number(d) < 1000).count();
    let to_b = sim.app_received.iter().filter(|(x, d)| *x == b && number(d) >= 1000).count();
    assert_eq!((to_a, to_b), (20, 20), "each reply goes back to its own application");
}

#[test]
fn forged_and_replayed_datagrams_change_nothing() {
    let dir = LinkDir::lossy(0.0, 3);
    let mut sim = Sim::new(7, vec![(dir, dir); 1], Cipher::Aes256Gcm);
    establish(&mut sim);
    let mut rng = common::sim::SimRng::new(99);
    let mut out = [0u8; common::wire::HANDSHAKE_RESP_LEN];
    let from: SocketAddr = "10.66.0.1:1".parse().unwrap();
    for len in [0usize, 1, 17, 33, 34, 60, 75, 100, 1500] {
        for _ in 0..50 {
            let mut junk: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            if len > 0 {
                junk[0] = [0x11, 0x12, 0x13, 0x00][(rng.next_u64() % 4) as usize];
            }
            let r = sim.server.handle_datagram(sim.now, from, &mut junk, &mut out);
            assert!(matches!(r, common::server::ServerRecv::Dropped(_)), "{r:?}");
            let mut junk2: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            let r = sim.client.handle_path_datagram(sim.now, 0, &mut junk2);
            assert!(matches!(r, common::client::ClientRecv::Dropped(_)), "{r:?}");
        }
    }
    let st = sim.server.status(sim.now, "x");
    assert_eq!(st.sessions[0].paths.len(), 1, "no path learned from junk");
    assert!(st.drops.malformed + st.drops.unknown_session + st.drops.bad_mac > 0);
    stream(&mut sim, 10, Duration::from_millis(5));
    assert_eq!(sim.app_received.len(), 10, "the session still works");
}

#[test]
fn named_targets_come_only_from_the_allow_list() {
    let dir = LinkDir::lossy(0.0, 3);
    let mut sim = Sim::new(8, vec![(dir, dir); 2], Cipher::ChaCha20Poly1305);
    sim.server_cfg.default_target = None;
    sim.server_cfg.targets.insert("dns".into(), "10.9.9.53:53".parse().unwrap());
    sim.restart_server();

    // no target named, and the server has no default: refused with a signed answer
    sim.app_send(app(), &numbered(1));
    sim.run_for(Duration::from_millis(500));
    assert!(sim.target_received.is_empty());
    let st = sim.client.status(sim.now, "x");
    assert_eq!(st.sessions[0].state, common::stats::SessionState::Refused);
    assert_eq!(sim.server.session_count(), 0);

    // a name on the allow-list works
    sim.client_cfg.target = "dns".into();
    sim.restart_client();
    sim.app_send(app(), &numbered(2));
    sim.run_for(Duration::from_millis(500));
    assert_eq!(sim.target_received.len(), 1);
    assert_eq!(sim.server.session_target(sim.target_received[0].0), Some("10.9.9.53:53".parse().unwrap()));

    // any other name is refused
    sim.client_cfg.target = "ssh".into();
    sim.restart_client();
    sim.app_send(app(), &numbered(3));
    sim.run_for(Duration::from_millis(500));
    assert_eq!(sim.target_received.len(), 1);
    assert_eq!(sim.client.status(sim.now, "x").sessions[0].state, common::stats::SessionState::Refused);
}

#[test]
fn cipher_not_allowed_by_the_server_is_refused() {
    let dir = LinkDir::lossy(0.0, 3);
    let mut sim = Sim::new(9, vec![(dir, dir); 1], Cipher::ChaCha20Poly1305);
    sim.server_cfg.ciphers = vec![Cipher::Aes256Gcm];
    sim.restart_server();
    sim.app_send(app(), &numbered(1));
    sim.run_for(Duration::from_millis(500));
    assert!(sim.target_received.is_empty());
    assert_eq!(sim.client.status(sim.now, "x").sessions[0].state, common::stats::SessionState::Refused);
}

/// One run with loss, reordering, duplication and both ends restarting; its trace.
fn traced_run(seed: u64) -> Vec<String> {
    let dir = LinkDir {
        loss: 0.1,
        delay: Duration::from_millis(5),
        jitter: Duration::from_millis(10),
        duplicate: 0.1,
        ..LinkDir::default()
    };
    let mut sim = Sim::new(seed, vec![(dir, dir); 3], Cipher::ChaCha20Poly1305);
    establish(&mut sim);
    stream(&mut sim, 200, Duration::from_millis(1));
    sim.restart_server();
    stream(&mut sim, 100, Duration::from_millis(5));
    sim.restart_client();
    stream(&mut sim, 100, Duration::from_millis(5));
    sim.trace
}

#[test]
fn a_seed_replays_a_run_exactly() {
    let first = traced_run(7);
    assert!(first.iter().filter(|l| l.contains("Established")).count() >= 3, "three sessions: {first:#?}");
    assert!(first.len() > 1000, "a real run: {} entries", first.len());
    // session ids, challenges, ephemeral keys and so every ciphertext come from the seed
    assert_eq!(first, traced_run(7), "the same seed gives the same trace, byte for byte");
    assert_ne!(first, traced_run(8), "another seed gives another run");
}

/// Before, a full table refused every new flow (counted as `queue`) until an old session
/// had been idle for the whole idle timeout.
#[test]
fn a_full_table_makes_room_by_evicting_the_longest_idle_session() {
    let dir = LinkDir::lossy(0.0, 3);
    let mut sim = Sim::new(9, vec![(dir, dir); 2], Cipher::Aes256Gcm);
    // room on the server for the evicted session (it expires there later) and the new one
    sim.server_cfg.max_sessions = 64;
    sim.restart_server();
    let max = sim.client_cfg.max_sessions as u16;
    let app_at = |i: u16| SocketAddr::from(([127, 0, 0, 1], 7000 + i));
    for i in 0..max {
        assert_eq!(sim.app_send(app_at(i), &numbered(i as u32)), ClientSend::Queued, "application {i}");
        sim.run_for(Duration::from_millis(10));
    }
    sim.run_for(Duration::from_millis(500));
    // application 0 stays busy; application 1 is now the longest idle
    sim.app_send(app_at(0), &numbered(1000));
    sim.run_for(Duration::from_millis(10));
    let one_more = app_at(max);
    assert!(matches!(sim.app_send(one_more, &numbered(2000)), ClientSend::Queued | ClientSend::Sealed { .. }));
    sim.run_for(Duration::from_secs(1));
    let st = sim.client.status(sim.now, "x");
    assert_eq!((st.sessions.len(), st.evicted_sessions), (max as usize, 1));
    let peers: Vec<&str> = st.sessions.iter().map(|s| s.peer.as_str()).collect();
    assert!(!peers.contains(&app_at(1).to_string().as_str()), "the longest-idle flow made room");
    assert!(peers.contains(&app_at(0).to_string().as_str()) && peers.contains(&one_more.to_string().as_str()));
    assert!(sim.app_received.iter().any(|(a, d)| *a == one_more && number(d) == 2000), "the new flow works");
}

/// A flow that never got an answer gives its session up after UNREPLIED_IDLE_TIMEOUT; a
/// replied one keeps it for the configured idle timeout.
#[test]
fn unreplied_flows_expire_sooner() {
    let dir = LinkDir::lossy(0.0, 3);
    let mut sim = Sim::new(10, vec![(dir, dir); 2], Cipher::Aes256Gcm);
    let (replied, unreplied) = (app(), SocketAddr::from(([127, 0, 0, 1], 5999)));
    sim.app_send(replied, &numbered(1));
    sim.run_for(Duration::from_secs(1));
    sim.echo = false;
    sim.app_send(unreplied, &numbered(2));
    sim.run_for(common::client::UNREPLIED_IDLE_TIMEOUT + Duration::from_secs(1));
    let peers: Vec<String> = sim.client.status(sim.now, "x").sessions.iter().map(|s| s.peer.clone()).collect();
    assert_eq!(peers, vec![replied.to_string()], "only the replied flow keeps its session");
}

/// Before, an init carried no freshness: one captured init opened a session (an X25519,
/// a slot, an upstream socket for 10 s) every time it was replayed, forever, also after
/// server restarts; 1024 of them replayed every 10 s filled `max_sessions`.
#[test]
fn a_captured_init_opens_at_most_one_session_and_nothing_once_stale() {
    use common::server::{ServerRecv, INIT_FRESHNESS};
    use common::wire::HANDSHAKE_RESP_LEN;
    let dir = LinkDir::lossy(0.0, 3);
    let mut sim = Sim::new(12, vec![(dir, dir); 2], Cipher::Aes256Gcm);
    establish(&mut sim);
    let captured = sim.inits_seen[0].clone();
    let attacker: SocketAddr = "10.66.6.6:6666".parse().unwrap();
    let mut out = [0u8; HANDSHAKE_RESP_LEN];
    let mut replay = |sim: &mut Sim| {
        let mut d = captured.clone();
        sim.server.handle_datagram(sim.now, attacker, &mut d, &mut out)
    };
    // the server restarts; the replays come every second for 30 s
    sim.restart_server();
    sim.echo = false;
    let mut most = 0;
    for _ in 0..30 {
        replay(&mut sim);
        most = most.max(sim.server.session_count());
        sim.run_for(Duration::from_secs(1));
    }
    // (the real client handshook again on its own: one session is its)
    let replayed = sim.server.status(sim.now, "x").drops.replayed_init;
    assert!(most <= 2, "replays opened {most} sessions");
    assert!(replayed >= 15, "replays after the first session expired were not refused: {replayed}");
    // once stale, a replay opens nothing and costs no key agreement: a signed refusal
    sim.run_for(INIT_FRESHNESS + Duration::from_secs(10));
    let before = sim.server.session_count();
    assert!(matches!(replay(&mut sim), ServerRecv::Reply { .. }), "a stale init gets a signed refusal");
    assert_eq!(sim.server.session_count(), before);
}

/// A client whose clock is far off is refused with a signed StaleInit, so it can say why.
#[test]
fn a_client_with_a_wrong_clock_is_told() {
    use common::stats::SessionState;
    let dir = LinkDir::lossy(0.0, 3);
    let mut sim = Sim::new(13, vec![(dir, dir); 2], Cipher::Aes256Gcm);
    sim.restart_client_with_clock(-10 * 60 * 1000);
    sim.app_send(app(), &numbered(1));
    sim.run_for(Duration::from_secs(1));
    assert_eq!(sim.server.session_count(), 0);
    assert_eq!(sim.client.status(sim.now, "x").sessions[0].state, SessionState::Refused);
    assert!(sim.trace.iter().any(|l| l.contains("StaleInit")), "the refusal names its reason");
}

/// A paused path (the mesh's direct paths between punches) gets nothing at all: no
/// copies, no probes; its tracker counts nothing as lost; unpaused it carries again.
#[test]
fn paused_paths_get_nothing_and_count_nothing_lost() {
    let dir = LinkDir::lossy(0.0, 5);
    let mut sim = Sim::new(4, vec![(dir, dir); 3], Cipher::Aes256Gcm);
    establish(&mut sim);
    sim.client.set_paused_paths(common::PathMask::single(2));
    let tx_of = |sim: &Sim| sim.client.status(sim.now, "x").sessions[0].paths[2].tx.packets;
    let before = tx_of(&sim);
    stream(&mut sim, 300, Duration::from_millis(2));
    sim.run_for(Duration::from_secs(2));
    assert_eq!(unique(&sim.app_received.iter().map(|(_, d)| d.clone()).collect::<Vec<_>>()).0, 300);
    assert_eq!(tx_of(&sim), before, "datagrams went to a paused path");
    let st = sim.client.status(sim.now, "x");
    assert_ne!(st.sessions[0].paths[2].state, PathState::Down, "not probed, so not found down");
    assert_eq!(st.sessions[0].paths[2].loss_up.unwrap_or(0.0), 0.0);
    sim.client.set_paused_paths(common::PathMask::EMPTY);
    sim.run_for(Duration::from_millis(500));
    assert!(tx_of(&sim) > before, "probed again once unpaused");
    assert_eq!(sim.client.status(sim.now, "x").sessions[0].paths[2].state, PathState::Up);
}

/// A relay operator captured a client's handshake inits (one per flow) and replays them,
/// a few hundred a second, right after the server restarts (the server's memory of the
/// inits it saw died with it). Before, each opened a session; a new client starting a
/// moment later waited seconds for its first answer. Now a replayed init opens nothing
/// that anyone waits behind: a new client is answered within its first round trip.
#[test]
fn inits_replayed_after_a_server_restart_keep_no_new_client_waiting() {
    use common::wire::HANDSHAKE_RESP_LEN;
    let dir = LinkDir::lossy(0.0, 5);
    let mut sim = Sim::new(21, vec![(dir, dir); 2], Cipher::Aes256Gcm);
    // 40 flows, 40 sessions: the inits an on-path attacker captured
    for f in 0..40u16 {
        let a: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 7000 + f));
        sim.app_send(a, &numbered(u32::from(f)));
        sim.run_for(Duration::from_millis(20));
    }
    sim.run_for(Duration::from_secs(1));
    let captured = sim.inits_seen.clone();
    assert!(captured.len() >= 40);
    sim.restart_server();
    sim.restart_client();
    sim.app_received.clear();
    let attacker: SocketAddr = "10.66.6.6:6666".parse().unwrap();
    let mut out = [0u8; HANDSHAKE_RESP_LEN];
    let mut replays = captured.iter().cycle();
    // replays at 400/s for 2 s, then the new client starts, replays going on
    let started = sim.now + Duration::from_secs(2);
    let mut answered = None;
    for step in 0..800u32 {
        for _ in 0..4 {
            let mut d = replays.next().unwrap().clone();
            sim.server.handle_datagram(sim.now, attacker, &mut d, &mut out);
        }
        if sim.now >= started && step % 10 == 0 {
            sim.app_send(app(), &numbered(step));
        }
        sim.run_for(Duration::from_millis(10));
        if answered.is_none() && !sim.app_received.is_empty() {
            answered = Some(sim.now - started);
        }
    }
    let took = answered.expect("the new client was answered");
    println!("a new client during replayed inits: first answer after {took:?}");
    assert!(took <= Duration::from_millis(100), "the new client waited {took:?}");
}
