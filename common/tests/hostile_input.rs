//! Arbitrary bytes from the network: never a panic, never delivered, never answered,
//! and a live session keeps working afterwards.

use common::client::ClientRecv;
use common::crypto::Cipher;
use common::server::ServerRecv;
use common::sim::{LinkDir, Sim};
use common::wire::HANDSHAKE_RESP_LEN;
use proptest::prelude::*;
use std::net::SocketAddr;
use std::time::Duration;

fn established() -> Sim {
    let dir = LinkDir::lossy(0.0, 2);
    let mut sim = Sim::new(21, vec![(dir, dir); 2], Cipher::Aes256Gcm);
    sim.app_send("127.0.0.1:5000".parse().unwrap(), b"hello");
    sim.run_for(Duration::from_millis(300));
    assert_eq!(sim.app_received.len(), 1);
    sim
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// What a session's peer may send once it holds the keys (the fuzz target's input):
    /// coded data, parity with any header, receipts, in any order.
    #[test]
    fn hostile_inner_messages_never_panic(msgs in prop::collection::vec(
        (3u8..=5, any::<[u8; 9]>(), prop::collection::vec(any::<u8>(), 0..230)),
        1..120,
    )) {
        // framed as the fuzz target reads them: a length byte, then the message; parity
        // headers get their group within a few, counts as drawn, the length they carry
        let mut data = Vec::new();
        for (kind, mut header, body) in msgs {
            let mut m = vec![kind];
            if kind == 4 {
                header[..3].fill(0);
                header[7..9].copy_from_slice(&(body.len() as u16 & !1).to_be_bytes());
                m.extend_from_slice(&header);
                m.extend_from_slice(&body[..body.len() & !1]);
            } else {
                m.extend_from_slice(&body);
                m.extend_from_slice(&header[..5]);
            }
            m.truncate(255);
            data.push(m.len() as u8);
            data.extend_from_slice(&m);
        }
        common::sim::fuzz_inner_messages(&data);
    }

    #[test]
    fn junk_is_dropped(datagrams in prop::collection::vec(
        (prop::sample::select(vec![0x11u8, 0x12, 0x13, 0x00, 0xff]), prop::collection::vec(any::<u8>(), 0..200)),
        1..40,
    )) {
        let mut sim = established();
        let from: SocketAddr = "10.66.0.1:1".parse().unwrap();
        let mut out = [0u8; HANDSHAKE_RESP_LEN];
        for (kind, body) in &datagrams {
            let mut d = vec![*kind];
            d.extend_from_slice(body);
            let mut copy = d.clone();
            let r = sim.server.handle_datagram(sim.now, from, &mut d, &mut out);
            prop_assert!(matches!(r, ServerRecv::Dropped(_)), "server answered junk: {:?}", r);
            let r = sim.client.handle_path_datagram(sim.now, 0, &mut copy);
            prop_assert!(matches!(r, ClientRecv::Dropped(_)), "client took junk: {:?}", r);
        }
        sim.app_received.clear();
        sim.app_send("127.0.0.1:5000".parse().unwrap(), b"still there");
        sim.run_for(Duration::from_millis(100));
        prop_assert_eq!(sim.app_received.len(), 1);
    }

    /// A real transport datagram with bits flipped, or replayed, changes nothing.
    #[test]
    fn tampered_and_replayed_datagrams_are_dropped(flips in prop::collection::vec((0usize..64, 0u8..8), 1..4)) {
        let mut sim = established();
        // capture a genuine client->server datagram by sealing one through the core
        let mut buf = vec![0u8; 2048];
        let payload = b"genuine";
        buf[common::wire::DATA_PAYLOAD_OFFSET..common::wire::DATA_PAYLOAD_OFFSET + payload.len()].copy_from_slice(payload);
        let app: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let common::client::ClientSend::Sealed { len, .. } = sim.client.handle_app_datagram(sim.now, app, &mut buf, payload.len()) else {
            panic!("session is established");
        };
        let genuine = buf[..len].to_vec();
        let from: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let mut out = [0u8; HANDSHAKE_RESP_LEN];
        let mut tampered = genuine.clone();
        for (pos, bit) in &flips {
            let i = pos % tampered.len();
            tampered[i] ^= 1 << bit;
        }
        if tampered != genuine {
            let r = sim.server.handle_datagram(sim.now, from, &mut tampered, &mut out);
            prop_assert!(matches!(r, ServerRecv::Dropped(_)), "tampered datagram accepted: {:?}", r);
        }
        let mut first = genuine.clone();
        let r = sim.server.handle_datagram(sim.now, from, &mut first, &mut out);
        prop_assert!(matches!(r, ServerRecv::Forward { .. }), "genuine datagram refused after a forgery: {:?}", r);
        let mut again = genuine.clone();
        let r = sim.server.handle_datagram(sim.now, from, &mut again, &mut out);
        prop_assert_eq!(r, ServerRecv::Dropped(common::stats::DropReason::Duplicate));
    }
}

/// Before, every datagram from a known but unvalidated path's address counted towards its
/// anti-amplification budget before it was authenticated: forged datagrams spoofing that
/// address bought replies to it.
#[test]
fn forged_datagrams_buy_no_reply_budget_on_an_unvalidated_path() {
    use common::wire::{emit_transport_header, DATA_PAYLOAD_OFFSET};
    use common::SessionId;
    let dir = LinkDir::lossy(0.0, 2);
    // path 1 hears nothing back: the client never learns its challenge, it stays unvalidated
    let mut links = vec![(dir, dir); 2];
    links[1].1 = LinkDir::lossy(1.0, 2);
    let mut sim = Sim::new(22, links, Cipher::Aes256Gcm);
    sim.app_send("127.0.0.1:5000".parse().unwrap(), b"hello");
    sim.run_for(Duration::from_millis(500));
    let status = sim.server.status(sim.now, "x");
    let session = &status.sessions[0];
    let victim = sim.links[1].server_side_addr;
    assert!(session.paths.iter().any(|p| p.name.starts_with(&victim.to_string())), "path 1 is known: {session:?}");
    let id = SessionId(u64::from_str_radix(&session.id, 16).unwrap());
    // room for one more full datagram to path 1?
    let reaches_victim = |sim: &mut Sim| {
        let mut buf = vec![0u8; 2048];
        let (_, paths) = sim.server.encapsulate(sim.now, 0, &mut buf, 1400).expect("sealed");
        paths.iter().any(|p| sim.server.path_addr(0, p) == Some(victim))
    };
    let before = reaches_victim(&mut sim);
    // 200 forged 1400-byte transport datagrams "from" the unvalidated path
    let mut out = [0u8; HANDSHAKE_RESP_LEN];
    for k in 0..200u64 {
        let mut d = vec![0xa5u8; DATA_PAYLOAD_OFFSET + 1400];
        emit_transport_header(&mut d, id, 1_000_000 + k);
        assert!(matches!(sim.server.handle_datagram(sim.now, victim, &mut d, &mut out), ServerRecv::Dropped(_)));
    }
    assert!(!before, "an unvalidated path gets no 1400-byte datagram on a few probes' budget");
    assert!(!reaches_victim(&mut sim), "forged bytes bought a reply budget");
}

/// Before, every init from anywhere cost an HMAC: a flood from one source was verified in
/// full. Now each source has a token bucket, checked before the MAC; other sources are
/// not affected.
#[test]
fn an_init_flood_from_one_source_is_cut_before_the_mac() {
    use common::server::INIT_BURST_PER_SOURCE;
    let mut sim = established();
    let mut out = [0u8; HANDSHAKE_RESP_LEN];
    let flooder: SocketAddr = "10.66.0.9:4444".parse().unwrap();
    let mut forged = sim.inits_seen[0].clone();
    let last = forged.len() - 1;
    forged[last] ^= 1; // a bad MAC: only verifying it tells
    let sent = INIT_BURST_PER_SOURCE as u64 + 1000;
    for _ in 0..sent {
        let mut d = forged.clone();
        assert!(matches!(sim.server.handle_datagram(sim.now, flooder, &mut d, &mut out), ServerRecv::Dropped(_)));
    }
    let drops = sim.server.status(sim.now, "x").drops;
    assert!(drops.bad_mac <= INIT_BURST_PER_SOURCE as u64, "{} MACs verified for one source", drops.bad_mac);
    assert!(drops.rate_limited >= sent - INIT_BURST_PER_SOURCE as u64 - 1);
    // another source, and the same one a second later, are verified again
    let mut d = forged.clone();
    sim.server.handle_datagram(sim.now, "10.66.0.10:1".parse().unwrap(), &mut d, &mut out);
    sim.run_for(Duration::from_secs(1));
    let mut d = forged.clone();
    sim.server.handle_datagram(sim.now, flooder, &mut d, &mut out);
    assert_eq!(sim.server.status(sim.now, "x").drops.bad_mac, drops.bad_mac + 2);
    // and the real client still works
    sim.app_send("127.0.0.1:5000".parse().unwrap(), b"again");
    sim.run_for(Duration::from_millis(300));
    assert_eq!(sim.app_received.len(), 2);
}
