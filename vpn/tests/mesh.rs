//! The mesh with a fake clock: a hub and peers whose pair sessions are the tunnel's own
//! cores, over a simulated internet with NATs (endpoint-independent mapping, or one
//! mapping per destination) that filter what their hosts did not send to first.

use common::sim::SimEntropy;
use common::stats::PathState;
use std::collections::{BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};
use vpn::hub::{Hub, HubCoreConfig, PeerSpec, DEFAULT_PEER_TIMEOUT};
use vpn::mesh::{ConnectMode, MeshConfig, RelayMode, Via, PUNCH_RETRY, PUNCH_WINDOW};
use vpn::peer::{Peer, PeerCoreConfig};
use vpn::wire::PeerKey;
use vpn::{TUNNEL_PAYLOAD, TUN_MTU};

const TICK: Duration = Duration::from_millis(5);
const RENDEZVOUS: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(198, 51, 100, 250)), 5200);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Nat {
    /// A public address: the mesh socket is reachable as it is bound.
    None,
    /// Linux `masquerade`: one mapping for every destination.
    EndpointIndependent,
    /// `masquerade random`: a new mapping per destination.
    Symmetric,
}

fn key_of(name: &str) -> Vec<u8> {
    let mut k = name.as_bytes().to_vec();
    k.resize(32, 0x42);
    k
}

struct SimPeer {
    core: Peer,
    tunnel: SocketAddr,
    nat: Nat,
    /// The mesh socket's address on its host.
    local: SocketAddr,
    public_ip: Ipv4Addr,
    /// The first port the NAT maps to (a NAT that restarted maps elsewhere).
    port_base: u16,
    /// NAT mappings: destination → the source the world sees.
    mappings: HashMap<SocketAddr, SocketAddr>,
    tun_rx: Vec<Vec<u8>>,
}

struct MeshNet {
    t0: Instant,
    now: Instant,
    hub: Hub,
    peers: Vec<SimPeer>,
    /// Every direct datagram between peers is lost.
    direct_blocked: bool,
    /// Everything between the peers and the hub (tunnel and rendezvous) is lost.
    hub_down: bool,
    /// Direct datagrams sent by each peer, by when.
    direct_sent: Vec<Vec<Instant>>,
    out: Vec<u8>,
}

impl MeshNet {
    fn new(nats: &[Nat], relay: RelayMode, connect: ConnectMode) -> Self {
        let names = ["a", "b", "c"];
        let now = common::sim::epoch();
        let hub = Hub::new(
            HubCoreConfig {
                network: "10.99.0.0/24".parse().unwrap(),
                hub_addr: Ipv4Addr::new(10, 99, 0, 1),
                mtu: TUN_MTU,
                tunnel_payload: TUNNEL_PAYLOAD,
                peers: names
                    .iter()
                    .map(|n| PeerSpec {
                        name: n.to_string(),
                        key: PeerKey::new(&key_of(n)),
                        fixed_addr: None,
                        allowed_routes: vec![],
                    })
                    .collect(),
                peer_timeout: DEFAULT_PEER_TIMEOUT,
                dns_domain: None,
            },
            Box::new(SimEntropy::new(7)),
        );
        let peers = nats
            .iter()
            .enumerate()
            .map(|(i, &nat)| {
                let i8 = i as u8 + 1;
                let local = match nat {
                    Nat::None => SocketAddr::from(([198, 51, 100, i8], 5100)),
                    _ => SocketAddr::from(([192, 168, i8, 2], 5100)),
                };
                let cfg = PeerCoreConfig {
                    name: names[i].into(),
                    key: PeerKey::new(&key_of(names[i])),
                    mtu: None,
                    routes: vec![],
                    tunnel_payload: TUNNEL_PAYLOAD,
                    mesh: Some(MeshConfig { name: names[i].into(), sockets: vec![local], relay, connect }),
                };
                let mut core =
                    Peer::new(cfg, now, common::sim::SIM_WALL_START_MS, Box::new(SimEntropy::new(100 + i as u64)));
                core.set_host_candidates(vec![local]);
                SimPeer {
                    core,
                    tunnel: SocketAddr::from(([127, 0, 0, 1], 40000 + i as u16)),
                    nat,
                    local,
                    public_ip: Ipv4Addr::new(203, 0, 113, i8),
                    port_base: 40000,
                    mappings: HashMap::new(),
                    tun_rx: Vec::new(),
                }
            })
            .collect();
        Self {
            t0: now,
            now,
            hub,
            peers,
            direct_blocked: false,
            hub_down: false,
            direct_sent: vec![Vec::new(); nats.len()],
            out: vec![0; common::wire::MAX_DATAGRAM],
        }
    }

    fn wall_ms(&self) -> u64 {
        common::sim::SIM_WALL_START_MS + self.now.duration_since(self.t0).as_millis() as u64
    }

    /// The source peer `i`'s datagram to `to` has once out of its NAT.
    fn source_for(&mut self, i: usize, to: SocketAddr) -> SocketAddr {
        let p = &mut self.peers[i];
        let next_port = p.port_base + p.mappings.len() as u16;
        match p.nat {
            Nat::None => p.local,
            Nat::EndpointIndependent => {
                let ext = SocketAddr::from((p.public_ip, p.port_base));
                *p.mappings.entry(to).or_insert(ext)
            }
            Nat::Symmetric => *p.mappings.entry(to).or_insert(SocketAddr::from((p.public_ip, next_port))),
        }
    }

    /// The peer a datagram from `from` to `to` reaches, if its NAT lets it in.
    fn receiver(&self, from: SocketAddr, to: SocketAddr) -> Option<usize> {
        self.peers.iter().position(|p| match p.nat {
            Nat::None => p.local == to,
            // a mapping to `to` exists, and it was made by sending to `from`
            _ => p.mappings.get(&from) == Some(&to),
        })
    }

    fn exchange(&mut self) {
        let wall = self.wall_ms();
        for _ in 0..200 {
            let mut moved = false;
            for i in 0..self.peers.len() {
                let now = self.now;
                while let Some((socket, len)) = self.peers[i].core.poll_rendezvous(&mut self.out) {
                    moved = true;
                    if self.hub_down {
                        continue;
                    }
                    let q = self.out[..len].to_vec();
                    let from = self.source_for(i, RENDEZVOUS);
                    let mut answer = Vec::new();
                    if let Some(n) = self.hub.handle_rendezvous(now, from, &q, &mut answer) {
                        assert!(n <= q.len(), "the rendezvous port never amplifies");
                        let mut a = answer[..n].to_vec();
                        self.peers[i].core.handle_mesh_datagram(now, socket, RENDEZVOUS, &mut a);
                    }
                }
                let mut sends = Vec::new();
                while let Some((n, dests)) = self.peers[i].core.poll_mesh_transmit(now, &mut self.out) {
                    for d in dests {
                        if let vpn::mesh::MeshAddr::Direct { addr, .. } = *d {
                            sends.push((addr, self.out[..n].to_vec()));
                        }
                    }
                }
                for (to, mut d) in sends {
                    moved = true;
                    self.direct_sent[i].push(now);
                    let from = self.source_for(i, to);
                    if self.direct_blocked {
                        continue;
                    }
                    if let Some(j) = self.receiver(from, to) {
                        self.peers[j].core.handle_mesh_datagram(now, 0, from, &mut d);
                    }
                }
                while let Some(n) = self.peers[i].core.poll_transmit(&mut self.out) {
                    moved = true;
                    if !self.hub_down {
                        self.hub.handle_datagram(now, wall, self.peers[i].tunnel, &self.out[..n]);
                    }
                }
            }
            while let Some((to, n)) = self.hub.poll_transmit(&mut self.out) {
                moved = true;
                if self.hub_down {
                    continue;
                }
                if let Some(p) = self.peers.iter_mut().find(|p| p.tunnel == to) {
                    p.core.handle_datagram(self.now, &self.out[..n]);
                }
            }
            for p in &mut self.peers {
                while p.core.poll_event().is_some() {}
                while let Some(n) = p.core.poll_tun(&mut self.out) {
                    p.tun_rx.push(self.out[..n].to_vec());
                }
            }
            while self.hub.poll_event().is_some() {}
            if !moved {
                break;
            }
        }
    }

    /// Runs for `d`, stepping the clock to the earliest deadline any core asks for and
    /// waking every core then (a timer missing from a core's `poll_timeout` fires late; a
    /// core that keeps asking for a time already past fails the run).
    fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        let mut at_once = 0;
        loop {
            let deadlines = self.peers.iter().filter_map(|p| p.core.poll_timeout()).chain(self.hub.poll_timeout());
            let next = deadlines.min().map_or(end, |t| t.min(end));
            if next <= self.now {
                at_once += 1;
                assert!(at_once < 100, "a core keeps asking to be woken in the past");
            } else {
                at_once = 0;
                self.now = next;
            }
            let wall = self.wall_ms();
            for p in &mut self.peers {
                p.core.handle_timeout(self.now, wall);
            }
            self.hub.handle_timeout(self.now);
            self.exchange();
            if self.now >= end {
                return;
            }
        }
    }

    /// `TICK` of time (every deadline in it kept).
    fn step(&mut self) {
        self.run_for(TICK);
    }

    fn addr(&self, i: usize) -> Ipv4Addr {
        self.peers[i].core.addr()
    }

    fn via(&self, i: usize, j: usize) -> Option<Via> {
        let name = ["a", "b", "c"][j];
        self.peers[i].core.peer_status(self.now).into_iter().find(|p| p.name == name)?.via
    }

    /// Peer `i` sends packet number `tag` to peer `j`.
    fn send(&mut self, i: usize, j: usize, tag: u32) {
        let (src, dst) = (self.addr(i), self.addr(j));
        let mut p = vec![0u8; 200];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&200u16.to_be_bytes());
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst.octets());
        p[20..24].copy_from_slice(&tag.to_be_bytes());
        let now = self.now;
        self.peers[i].core.handle_tun_packet(now, &p);
    }

    /// The tags peer `i` received, in order.
    fn received(&self, i: usize) -> Vec<u32> {
        self.peers[i].tun_rx.iter().map(|p| u32::from_be_bytes(p[20..24].try_into().unwrap())).collect()
    }

    fn relayed(&self, name: &str) -> u64 {
        self.hub.status(self.now).into_iter().find(|p| p.name == name).map_or(0, |p| p.relayed_bytes)
    }

    /// Sends `n` packets i → j, one every 10 ms; returns when the last went.
    fn stream(&mut self, i: usize, j: usize, tags: std::ops::Range<u32>) {
        for t in tags {
            self.send(i, j, t);
            self.step();
            self.step();
        }
    }
}

fn assert_exactly_once(got: &[u32], want: std::ops::Range<u32>) {
    let set: BTreeSet<u32> = got.iter().copied().collect();
    assert_eq!(set.len(), got.len(), "duplicates delivered");
    assert_eq!(set, want.collect::<BTreeSet<u32>>(), "packets lost");
}

#[test]
fn public_peers_go_direct_after_relaying_the_first_packets() {
    let mut net = MeshNet::new(&[Nat::None, Nat::None], RelayMode::Fallback, ConnectMode::OnDemand);
    net.run_for(Duration::from_millis(1500));
    assert!(net.peers.iter().all(|p| p.core.is_up()));
    assert_eq!(net.via(0, 1), Some(Via::Relay), "nothing asked for yet");
    // the first packets go through the hub while the pair comes up
    net.stream(0, 1, 0..300);
    net.run_for(Duration::from_millis(500));
    assert_eq!(net.via(0, 1), Some(Via::Direct));
    assert_eq!(net.via(1, 0), Some(Via::Direct));
    let relayed = net.relayed("a");
    assert!(relayed > 0, "the first packets went through the hub");
    net.stream(0, 1, 300..600);
    net.run_for(Duration::from_millis(500));
    assert_exactly_once(&net.received(1), 0..600);
    // once direct, the hub carried nothing more of it (only the relay path's probes)
    let more = net.relayed("a") - relayed;
    assert!(more < 300 * 200 / 20, "hub relayed {more} bytes of a direct transfer");
    let st = net.peers[0].core.peer_status(net.now);
    let b = st.iter().find(|p| p.name == "b").unwrap();
    assert_eq!(b.paths.len(), 1);
    assert_eq!(b.paths[0].state, PathState::Up);
    assert_eq!(b.paths[0].remote, "198.51.100.2:5100");
    assert!(b.paths[0].rtt_ms.is_some());
}

#[test]
fn peers_behind_endpoint_independent_nats_punch_through() {
    let mut net =
        MeshNet::new(&[Nat::EndpointIndependent, Nat::EndpointIndependent], RelayMode::Fallback, ConnectMode::Always);
    net.run_for(Duration::from_secs(4));
    assert_eq!(net.via(0, 1), Some(Via::Direct));
    let st = net.peers[0].core.peer_status(net.now);
    let b = st.iter().find(|p| p.name == "b").unwrap();
    // the reflexive candidate (what the rendezvous port saw) is the one that works
    assert!(b.paths.iter().any(|p| p.remote == "203.0.113.2:40000" && p.state == PathState::Up), "{:?}", b.paths);
    assert_eq!(net.peers[0].core.reflexive(), &[Some("203.0.113.1:40000".parse().unwrap())]);
    net.stream(0, 1, 0..200);
    net.stream(1, 0, 0..200);
    net.run_for(Duration::from_millis(500));
    assert_exactly_once(&net.received(1), 0..200);
    assert_exactly_once(&net.received(0), 0..200);
}

#[test]
fn symmetric_nats_stay_on_the_relay_and_punch_again_only_after_the_back_off() {
    let mut net = MeshNet::new(&[Nat::Symmetric, Nat::Symmetric], RelayMode::Fallback, ConnectMode::Always);
    net.run_for(Duration::from_secs(3));
    assert_eq!(net.via(0, 1), Some(Via::Relay));
    net.stream(0, 1, 0..200);
    net.run_for(Duration::from_millis(500));
    assert_exactly_once(&net.received(1), 0..200);
    // the punch window closes; nothing goes to the candidates until the retry
    net.run_for(PUNCH_WINDOW);
    let quiet_from = net.now;
    net.run_for(PUNCH_RETRY - PUNCH_WINDOW - Duration::from_secs(2));
    let sent: usize = net.direct_sent.iter().map(|s| s.iter().filter(|&&t| t > quiet_from).count()).sum();
    assert_eq!(sent, 0, "probes to candidates outside a punch window");
    net.run_for(Duration::from_secs(12));
    let sent: usize = net.direct_sent.iter().map(|s| s.iter().filter(|&&t| t > quiet_from).count()).sum();
    assert!(sent > 0, "punched again after the back-off");
    // at most one datagram per PUNCH_INTERVAL and path while punching (b's two
    // candidates: its reflexive and its host address)
    let window: Vec<&Instant> = net.direct_sent[0].iter().filter(|&&t| t > quiet_from).collect();
    let span = window.last().unwrap().duration_since(*window[0]).as_millis() as usize;
    assert!(window.len() <= 2 * (span / 200 + 2), "{} punches in {span} ms", window.len());
}

#[test]
fn a_blackholed_direct_path_falls_back_to_the_relay_within_a_second_and_comes_back() {
    let mut net = MeshNet::new(&[Nat::None, Nat::None], RelayMode::Fallback, ConnectMode::Always);
    net.run_for(Duration::from_secs(2));
    assert_eq!(net.via(0, 1), Some(Via::Direct));
    net.stream(0, 1, 0..100);
    net.direct_blocked = true;
    let cut = net.now;
    let mut fell_back = None;
    for t in 100..400 {
        net.send(0, 1, t);
        net.step();
        net.step();
        if fell_back.is_none() && net.via(0, 1) == Some(Via::Relay) {
            fell_back = Some(net.now.duration_since(cut));
        }
    }
    let fell_back = fell_back.expect("fell back to the relay");
    assert!(fell_back <= Duration::from_millis(1300), "fallback took {fell_back:?}");
    net.direct_blocked = false;
    net.stream(0, 1, 400..500);
    net.run_for(Duration::from_secs(2));
    assert_eq!(net.via(0, 1), Some(Via::Direct), "back to direct when healed");
    assert_exactly_once(&net.received(1), 0..500);
}

#[test]
fn relay_always_keeps_a_copy_on_the_hub() {
    let mut net = MeshNet::new(&[Nat::None, Nat::None], RelayMode::Always, ConnectMode::Always);
    net.run_for(Duration::from_secs(2));
    assert_eq!(net.via(0, 1), Some(Via::Direct));
    let before = net.relayed("a");
    net.stream(0, 1, 0..100);
    net.run_for(Duration::from_millis(300));
    assert!(net.relayed("a") - before >= 100 * 200, "the relay carried a copy of each");
    assert_exactly_once(&net.received(1), 0..100);
}

#[test]
fn pair_keys_belong_to_one_pair_and_nothing_else_opens() {
    let mut net = MeshNet::new(&[Nat::None, Nat::None, Nat::None], RelayMode::Fallback, ConnectMode::Always);
    net.run_for(Duration::from_secs(2));
    assert_eq!(net.via(0, 1), Some(Via::Direct));
    assert_eq!(net.via(0, 2), Some(Via::Direct));
    // c takes every datagram a sends to b: none opens under the a-c pair, nothing arrives
    let mut captured = Vec::new();
    let now = net.now;
    let b = net.peers[1].local;
    net.send(0, 1, 1);
    while let Some((n, dests)) = net.peers[0].core.poll_mesh_transmit(now, &mut net.out) {
        if dests.iter().any(|d| matches!(d, vpn::mesh::MeshAddr::Direct { addr, .. } if *addr == b)) {
            captured.push(net.out[..n].to_vec());
        }
    }
    assert!(!captured.is_empty());
    let before = net.peers[2].tun_rx.len();
    let from = net.peers[0].local;
    for mut d in captured {
        net.peers[2].core.handle_mesh_datagram(now, 0, from, &mut d);
    }
    net.exchange();
    assert_eq!(net.peers[2].tun_rx.len(), before);
}

#[test]
fn a_changed_nat_mapping_is_announced_and_punched_again_within_three_seconds() {
    let mut net =
        MeshNet::new(&[Nat::EndpointIndependent, Nat::EndpointIndependent], RelayMode::Fallback, ConnectMode::Always);
    net.run_for(Duration::from_secs(4));
    assert_eq!(net.via(0, 1), Some(Via::Direct));
    // b's NAT forgets everything and maps its socket to another port
    net.peers[1].mappings.clear();
    net.peers[1].port_base = 45000;
    let changed = net.now;
    let mut back = None;
    for t in 0..600 {
        net.send(0, 1, t);
        net.step();
        net.step();
        let st = net.peers[0].core.peer_status(net.now);
        let b = st.iter().find(|p| p.name == "b").unwrap();
        let on_new = b.paths.iter().any(|p| p.remote == "203.0.113.2:45000" && p.state == PathState::Up);
        if back.is_none() && on_new {
            back = Some(net.now.duration_since(changed));
        }
    }
    let back = back.expect("direct again on b's new mapping");
    assert!(back <= Duration::from_secs(3), "took {back:?}");
    net.run_for(Duration::from_millis(500));
    assert_exactly_once(&net.received(1), 0..600);
}

#[test]
fn direct_traffic_must_come_from_the_sending_peers_addresses() {
    let mut net = MeshNet::new(&[Nat::None, Nat::None], RelayMode::Fallback, ConnectMode::Always);
    net.run_for(Duration::from_secs(2));
    assert_eq!(net.via(0, 1), Some(Via::Direct));
    let (b, spoofed) = (net.addr(1), Ipv4Addr::new(10, 99, 0, 200));
    let mut p = vec![0u8; 100];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&100u16.to_be_bytes());
    p[12..16].copy_from_slice(&spoofed.octets());
    p[16..20].copy_from_slice(&b.octets());
    let now = net.now;
    net.peers[0].core.handle_tun_packet(now, &p);
    net.run_for(Duration::from_millis(100));
    assert!(net.peers[1].tun_rx.is_empty(), "a packet from an address a does not have");
    assert_eq!(net.peers[1].core.drop_counts().mesh.unwrap().spoofed_source, 1);
}

#[test]
fn direct_sessions_outlive_a_lost_hub_until_the_peers_register_again() {
    let mut net = MeshNet::new(&[Nat::None, Nat::None], RelayMode::Fallback, ConnectMode::Always);
    net.run_for(Duration::from_secs(2));
    assert_eq!(net.via(0, 1), Some(Via::Direct));
    net.hub_down = true;
    net.run_for(Duration::from_secs(10));
    assert!(!net.peers[0].core.is_up(), "the hub is lost");
    net.stream(0, 1, 0..200);
    net.run_for(Duration::from_millis(300));
    assert_exactly_once(&net.received(1), 0..200);
    // the hub is back: new registrations, new pairs, direct again
    net.hub_down = false;
    net.run_for(Duration::from_secs(5));
    assert!(net.peers.iter().all(|p| p.core.is_up()));
    assert_eq!(net.via(0, 1), Some(Via::Direct));
    net.stream(0, 1, 200..300);
    net.run_for(Duration::from_millis(500));
    assert_exactly_once(&net.received(1), 0..300);
}

/// Garbage on a mesh socket (and garbage that looks like each message type, from
/// anywhere) is dropped and counted; the pair goes on.
#[test]
fn garbage_on_the_mesh_socket_changes_nothing() {
    let mut net = MeshNet::new(&[Nat::None, Nat::None], RelayMode::Fallback, ConnectMode::Always);
    net.run_for(Duration::from_secs(2));
    assert_eq!(net.via(0, 1), Some(Via::Direct));
    let mut rng = common::sim::SimRng::new(99);
    let a = net.peers[0].local;
    let now = net.now;
    for i in 0..20_000u32 {
        let len = (rng.next_u64() % 1500) as usize;
        let mut d: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        if let Some(first) = d.first_mut() {
            *first = [0x11, 0x12, 0x13, 0x27, 0x00][i as usize % 5];
        }
        // from a's own address half the time: it must not help
        let from = if i % 2 == 0 { a } else { SocketAddr::from(([203, 0, 113, 9], 4000 + (i % 100) as u16)) };
        net.peers[1].core.handle_mesh_datagram(now, 0, from, &mut d);
    }
    let drops = net.peers[1].core.drop_counts().mesh.unwrap();
    assert!(drops.malformed + drops.unknown + drops.unauthenticated > 10_000, "{drops:?}");
    net.stream(0, 1, 0..100);
    net.run_for(Duration::from_millis(300));
    assert_exactly_once(&net.received(1), 0..100);
    assert_eq!(net.via(0, 1), Some(Via::Direct));
}

/// One peer behind a symmetric NAT, the other public: the symmetric side's probes get
/// through (the public side's server learns the mapping made for it), the public side's
/// to the symmetric one's candidates do not; its data goes back on the mapping its server
/// learned. Both directions are direct.
#[test]
fn a_symmetric_nat_facing_a_public_peer_goes_direct_both_ways() {
    let mut net = MeshNet::new(&[Nat::Symmetric, Nat::None], RelayMode::Fallback, ConnectMode::Always);
    net.run_for(Duration::from_secs(3));
    assert_eq!(net.via(0, 1), Some(Via::Direct), "a's own paths to b");
    assert_eq!(net.via(1, 0), Some(Via::Direct), "b back on what a's NAT mapped for it");
    let before = net.relayed("b");
    net.stream(1, 0, 0..300);
    net.stream(0, 1, 0..300);
    net.run_for(Duration::from_millis(500));
    assert_exactly_once(&net.received(0), 0..300);
    assert_exactly_once(&net.received(1), 0..300);
    // what the hub relays is the relay path's probes, not the 60 kB of data
    let relayed = net.relayed("b") - before;
    assert!(relayed < 300 * 200 / 10, "the hub relayed {relayed} bytes of b's direct traffic");
}
