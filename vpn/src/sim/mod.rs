//! The VPN's seeded simulator (behind the test-only `sim` feature, as `common::sim`): a
//! hub and peers — their meshes and pair sessions the tunnel's own cores — over a
//! simulated internet with NATs, on a fake clock that steps to the earliest
//! `poll_timeout` any core asks for.
//!
//! Invariants: the run is a function of the seeds (entropy, loss); every core is woken at
//! the time it asked for, never later; a core that keeps asking for a time already past
//! fails the run (it would spin a real daemon). `raw` drives a hub with hand-made peers
//! (attacks, the fuzz harness).

mod nat;
pub mod raw;

pub use nat::{Nat, NAT_PORT_BASE};

use crate::hub::{Hub, HubCoreConfig, HubEvent, HubOutput, PeerSpec, DEFAULT_PEER_TIMEOUT};
use crate::mesh::MeshAddr;
use crate::peer::{Peer, PeerCoreConfig, PeerEvent, PeerOutput};
use crate::wire::PeerKey;
use crate::{TUNNEL_PAYLOAD, TUN_MTU};
use common::sim::{SimEntropy, SimRng};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

/// The hub's rendezvous port, as the peers reach it.
pub const HUB_RENDEZVOUS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 250)), 5200);
/// How long `step` runs.
pub const STEP: Duration = Duration::from_millis(5);
/// Rounds of delivery per wake-up before the simulator calls the cores stuck.
const MAX_ROUNDS: usize = 200;

/// A peer's key in the simulations: its name, padded.
pub fn key_of(name: &str) -> Vec<u8> {
    let mut k = name.as_bytes().to_vec();
    k.resize(32, 0x42);
    k
}

/// hub.yaml's entry for `name`: its key, any address, no routes.
pub fn peer_spec(name: &str) -> PeerSpec {
    PeerSpec { name: name.into(), key: PeerKey::new(&key_of(name)), fixed_addr: None, allowed_routes: vec![] }
}

/// A hub on 10.99.0.0/24 (itself .1) that knows `names`, without DNS.
pub fn hub_config(names: &[&str]) -> HubCoreConfig {
    HubCoreConfig {
        network: "10.99.0.0/24".parse().expect("literal"),
        hub_addr: Ipv4Addr::new(10, 99, 0, 1),
        mtu: TUN_MTU,
        tunnel_payload: TUNNEL_PAYLOAD,
        peers: names.iter().map(|n| peer_spec(n)).collect(),
        peer_timeout: DEFAULT_PEER_TIMEOUT,
        dns_domain: None,
        assigned: Default::default(),
        // one secret for every hub of a simulation: a "restarted" hub knows its tokens
        reset_secret: [0x5e; 32],
        relay_bytes_per_pair: crate::hub::DEFAULT_RELAY_BYTES_PER_PAIR,
        addresses: crate::hub::AddressAuthority::Local,
    }
}

/// peer.yaml for `name`: its key, no routes, no mesh.
pub fn peer_config(name: &str) -> PeerCoreConfig {
    PeerCoreConfig {
        name: name.into(),
        key: PeerKey::new(&key_of(name)),
        mtu: None,
        routes: vec![],
        tunnel_payload: TUNNEL_PAYLOAD,
        mesh: None,
        dns_domain: None,
        peer_list_deltas: true,
    }
}

/// A peer host: the core, its tunnel address at the hub, its NAT and what it got.
pub struct SimPeer {
    pub core: Peer,
    /// Where its datagrams come from at the hub's tunnel.
    pub tunnel: SocketAddr,
    pub nat: Nat,
    /// Its mesh socket's address on the host (behind `nat`).
    pub local: SocketAddr,
    pub public_ip: Ipv4Addr,
    /// The first port its NAT maps to (a NAT that restarted maps elsewhere).
    pub port_base: u16,
    /// Its NAT's mappings: destination → the source the world sees.
    pub mappings: HashMap<SocketAddr, SocketAddr>,
    pub events: Vec<PeerEvent>,
    pub tun_rx: Vec<Vec<u8>>,
    /// When it sent each direct datagram.
    pub direct_sent: Vec<Instant>,
}

/// Another hub of the simulation (`VpnSim::add_hub`): every peer registers with it too.
pub struct OtherHub {
    pub hub: Hub,
    /// Every datagram between the peers and this hub is lost (it died).
    pub cut: bool,
}

pub struct VpnSim {
    t0: Instant,
    pub now: Instant,
    /// Hub link 0's hub.
    pub hub: Hub,
    /// Hub link `1 + i`'s hub.
    pub other_hubs: Vec<OtherHub>,
    pub peers: Vec<SimPeer>,
    /// Every datagram between the peers and the hub (tunnel and rendezvous) is lost; the
    /// hub runs on.
    pub hub_cut: bool,
    /// Every tunnel datagram between this peer and the hub is lost.
    pub peer_cut: Option<usize>,
    /// Every direct datagram between peers is lost.
    pub direct_blocked: bool,
    /// The chance that a datagram between a peer and the hub's tunnel is lost.
    pub loss: f64,
    rng: SimRng,
    pub hub_tun_rx: Vec<Vec<u8>>,
    /// The hub's events, with when it gave them.
    pub hub_events: Vec<(Instant, HubEvent)>,
    /// Every tunnel datagram a peer sent, when and from which tunnel address (what an
    /// attacker on its path captured).
    pub captured: Vec<(Instant, SocketAddr, Vec<u8>)>,
    /// How often `run_for` woke the cores.
    pub wakeups: u64,
    /// Bytes of tunnel datagrams the hub sent, by the tunnel address they went to.
    pub hub_sent: HashMap<SocketAddr, u64>,
    /// Datagrams the hub sent to other hubs (a test carries them to another simulation).
    pub forwarded: Vec<(SocketAddr, Vec<u8>)>,
    /// Real (not simulated) time spent in the hub's calls: its CPU cost, for the bench.
    pub hub_busy: Duration,
    /// Which peer a tunnel address was last seen at (checked on use: tests edit `peers`).
    by_tunnel: HashMap<SocketAddr, usize>,
    out: Vec<u8>,
}

/// Runs `f`, adding the real time it took to `busy`.
// the one place the simulator reads the real clock: measuring, never deciding
#[allow(clippy::disallowed_methods)]
fn timed<R>(busy: &mut Duration, f: impl FnOnce() -> R) -> R {
    let start = Instant::now();
    let r = f();
    *busy += start.elapsed();
    r
}

impl VpnSim {
    /// A hub with `cfg` (entropy seeded by `seed`) and no peers yet; the loss model is
    /// seeded by `seed` too.
    pub fn new(cfg: HubCoreConfig, seed: u64) -> Self {
        let now = common::sim::epoch();
        Self {
            t0: now,
            now,
            hub: Hub::new(cfg, Box::new(SimEntropy::new(seed))),
            other_hubs: Vec::new(),
            peers: Vec::new(),
            hub_cut: false,
            peer_cut: None,
            direct_blocked: false,
            loss: 0.0,
            rng: SimRng::new(seed ^ 0x5eed),
            hub_tun_rx: Vec::new(),
            hub_events: Vec::new(),
            captured: Vec::new(),
            wakeups: 0,
            hub_sent: HashMap::new(),
            forwarded: Vec::new(),
            hub_busy: Duration::ZERO,
            by_tunnel: HashMap::new(),
            out: vec![0; common::wire::MAX_DATAGRAM],
        }
    }

    /// Host number `i` running a peer with `cfg` (entropy seeded by `i`): its tunnel
    /// address is 127.0.0.1:40000+i; a mesh socket it has is `Nat::local`.
    pub fn make_peer(&self, cfg: PeerCoreConfig, nat: Nat, i: usize) -> SimPeer {
        let mesh = cfg.mesh.is_some();
        let mut core = Peer::new(cfg, self.now, self.wall_ms(), Box::new(SimEntropy::new(1000 + i as u64)));
        for _ in &self.other_hubs {
            core.add_link(self.now);
        }
        let local = nat.local(i);
        if mesh {
            core.set_host_candidates(vec![local]);
        }
        SimPeer {
            core,
            tunnel: SocketAddr::from(([127, 0, 0, 1], 40000 + i as u16)),
            nat,
            local,
            public_ip: Nat::public_ip(i),
            port_base: NAT_PORT_BASE,
            mappings: HashMap::new(),
            events: Vec::new(),
            tun_rx: Vec::new(),
            direct_sent: Vec::new(),
        }
    }

    /// Another hub with `cfg` (entropy seeded by `seed`): every peer, those added later
    /// too, registers with it as well (its hub link is `other_hubs.len()` after this).
    pub fn add_hub(&mut self, cfg: HubCoreConfig, seed: u64) {
        self.other_hubs.push(OtherHub { hub: Hub::new(cfg, Box::new(SimEntropy::new(seed))), cut: false });
        for p in &mut self.peers {
            p.core.add_link(self.now);
        }
    }

    /// Hub link `link`'s hub, unless it is cut off.
    fn reachable_hub(&mut self, link: usize) -> Option<&mut Hub> {
        match link {
            0 => (!self.hub_cut).then_some(&mut self.hub),
            _ => self.other_hubs.get_mut(link - 1).filter(|h| !h.cut).map(|h| &mut h.hub),
        }
    }

    /// Adds a peer as host number `peers.len()`; returns that number.
    pub fn add_peer(&mut self, cfg: PeerCoreConfig, nat: Nat) -> usize {
        let i = self.peers.len();
        let p = self.make_peer(cfg, nat, i);
        self.peers.push(p);
        i
    }

    /// The wall clock now, in ms.
    pub fn wall_ms(&self) -> u64 {
        common::sim::SIM_WALL_START_MS + self.now.duration_since(self.t0).as_millis() as u64
    }

    /// The earliest time any core asks to be woken at.
    pub fn next_deadline(&self) -> Option<Instant> {
        let others = self.other_hubs.iter().filter_map(|h| h.hub.poll_timeout());
        self.peers.iter().filter_map(|p| p.core.poll_timeout()).chain(self.hub.poll_timeout()).chain(others).min()
    }

    /// Runs for `d`, stepping the clock to the earliest deadline any core asks for (as a
    /// driver's event loop would) and waking every core then.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        let mut at_once = 0;
        loop {
            let (hub, busy) = (&self.hub, &mut self.hub_busy);
            let hub_next = timed(busy, || hub.poll_timeout());
            let peers_next = self.peers.iter().filter_map(|p| p.core.poll_timeout()).min();
            let others_next = self.other_hubs.iter().filter_map(|h| h.hub.poll_timeout()).min();
            let next = peers_next.into_iter().chain(hub_next).chain(others_next).min().map_or(end, |t| t.min(end));
            if next <= self.now {
                at_once += 1;
                assert!(at_once < 100, "a core keeps asking to be woken in the past");
            } else {
                at_once = 0;
                self.now = next;
            }
            self.wakeups += 1;
            let wall = self.wall_ms();
            for p in &mut self.peers {
                p.core.handle_timeout(self.now, wall);
            }
            let (hub, now) = (&mut self.hub, self.now);
            timed(&mut self.hub_busy, || hub.handle_timeout(now));
            for h in &mut self.other_hubs {
                h.hub.handle_timeout(now);
            }
            self.exchange();
            if self.now >= end {
                return;
            }
        }
    }

    /// `STEP` of time (every deadline in it kept).
    pub fn step(&mut self) {
        self.run_for(STEP);
    }

    /// Delivers everything the cores have to send, and what that makes them send, until
    /// nothing moves.
    pub fn exchange(&mut self) {
        for _ in 0..MAX_ROUNDS {
            let mut moved = false;
            for i in 0..self.peers.len() {
                moved |= self.drain_peer(i);
            }
            moved |= self.drain_hub();
            for h in 0..self.other_hubs.len() {
                moved |= self.drain_other_hub(h);
            }
            if !moved {
                return;
            }
        }
        panic!("the cores kept sending for {MAX_ROUNDS} rounds without time passing");
    }

    /// Takes peer `i`'s output; true if it sent anything.
    fn drain_peer(&mut self, i: usize) -> bool {
        let now = self.now;
        let mut moved = false;
        loop {
            let mut direct = Vec::new();
            match self.peers[i].core.poll_output(now, &mut self.out) {
                PeerOutput::Rendezvous { socket, len } => {
                    let q = self.out[..len].to_vec();
                    self.ask_rendezvous(i, socket, &q);
                }
                PeerOutput::Mesh { len, to } => {
                    direct.extend(to.iter().copied());
                    let d = self.out[..len].to_vec();
                    for to in direct {
                        self.send_direct(i, to, &d);
                    }
                }
                PeerOutput::Tunnel { link: 0, len: n } => {
                    let from = self.peers[i].tunnel;
                    self.captured.push((now, from, self.out[..n].to_vec()));
                    if !self.hub_cut && self.peer_cut != Some(i) && !self.rng.chance(self.loss) {
                        let wall = self.wall_ms();
                        let (hub, d) = (&mut self.hub, &self.out[..n]);
                        timed(&mut self.hub_busy, || hub.handle_datagram(now, wall, from, d));
                    }
                }
                PeerOutput::Tunnel { link, len } => {
                    let (from, wall) = (self.peers[i].tunnel, self.wall_ms());
                    let d = self.out[..len].to_vec();
                    if let Some(hub) = self.reachable_hub(link) {
                        hub.handle_datagram(now, wall, from, &d);
                    }
                }
                PeerOutput::Tun(n) => {
                    self.peers[i].tun_rx.push(self.out[..n].to_vec());
                    continue;
                }
                PeerOutput::Event(ev) => {
                    self.peers[i].events.push(ev);
                    continue;
                }
                PeerOutput::Timeout(_) => return moved,
            }
            moved = true;
        }
    }

    /// Takes the hub's output; true if it sent anything.
    fn drain_hub(&mut self) -> bool {
        let mut moved = false;
        loop {
            let (hub, out) = (&mut self.hub, &mut self.out);
            match timed(&mut self.hub_busy, || hub.poll_output(out)) {
                HubOutput::Tunnel { to, len } => {
                    moved = true;
                    *self.hub_sent.entry(to).or_default() += len as u64;
                    if self.hub_cut || self.rng.chance(self.loss) {
                        continue;
                    }
                    if let Some(i) = self.peer_at_tunnel(to).filter(|&i| self.peer_cut != Some(i)) {
                        self.peers[i].core.handle_datagram(self.now, 0, &self.out[..len]);
                    }
                }
                HubOutput::Forward { to, len } => self.forwarded.push((to, self.out[..len].to_vec())),
                HubOutput::Tun(n) => self.hub_tun_rx.push(self.out[..n].to_vec()),
                HubOutput::Event(ev) => self.hub_events.push((self.now, ev)),
                HubOutput::Timeout(_) => return moved,
            }
        }
    }

    /// Takes other hub `h`'s output (hub link `h + 1`); true if it sent anything.
    fn drain_other_hub(&mut self, h: usize) -> bool {
        let mut moved = false;
        loop {
            match self.other_hubs[h].hub.poll_output(&mut self.out) {
                HubOutput::Tunnel { to, len } => {
                    moved = true;
                    if self.other_hubs[h].cut {
                        continue;
                    }
                    if let Some(i) = self.peer_at_tunnel(to) {
                        self.peers[i].core.handle_datagram(self.now, h + 1, &self.out[..len]);
                    }
                }
                HubOutput::Timeout(_) => return moved,
                // no TUN, no forwarding between the simulation's hubs
                HubOutput::Forward { .. } | HubOutput::Tun(_) | HubOutput::Event(_) => {}
            }
        }
    }

    /// The peer whose tunnel address is `to`.
    fn peer_at_tunnel(&mut self, to: SocketAddr) -> Option<usize> {
        if let Some(&i) = self.by_tunnel.get(&to) {
            if self.peers.get(i).is_some_and(|p| p.tunnel == to) {
                return Some(i);
            }
        }
        let i = self.peers.iter().position(|p| p.tunnel == to)?;
        self.by_tunnel.insert(to, i);
        Some(i)
    }

    /// Peer `i`'s question to the rendezvous port from its mesh socket `socket`, and the
    /// answer back through its NAT.
    fn ask_rendezvous(&mut self, i: usize, socket: usize, q: &[u8]) {
        let from = self.peers[i].nat_source(HUB_RENDEZVOUS);
        let now = self.now;
        let Some(hub) = self.reachable_hub(self.peers[i].core.active_link()) else { return };
        let mut answer = vec![0u8; common::wire::MAX_DATAGRAM];
        if let Some(n) = hub.handle_rendezvous(now, from, q, &mut answer) {
            assert!(n <= q.len(), "the rendezvous port never amplifies");
            self.peers[i].core.handle_mesh_datagram(now, socket, HUB_RENDEZVOUS, &mut answer[..n]);
        }
    }

    /// A direct datagram from peer `i` to `to`, through both NATs.
    fn send_direct(&mut self, i: usize, to: MeshAddr, d: &[u8]) {
        let MeshAddr::Direct { addr: to, .. } = to else { return };
        let now = self.now;
        self.peers[i].direct_sent.push(now);
        let from = self.peers[i].nat_source(to);
        if self.direct_blocked {
            return;
        }
        if let Some(j) = self.receiver(from, to) {
            let mut d = d.to_vec();
            self.peers[j].core.handle_mesh_datagram(now, 0, from, &mut d);
        }
    }

    /// The peer a datagram from `from` to `to` reaches, if its NAT lets it in.
    fn receiver(&self, from: SocketAddr, to: SocketAddr) -> Option<usize> {
        self.peers.iter().position(|p| p.admits(from, to))
    }

    /// Bytes of tunnel datagrams the hub sent peer `i` (to its tunnel address) so far.
    pub fn hub_bytes_to(&self, i: usize) -> u64 {
        self.hub_sent.get(&self.peers[i].tunnel).copied().unwrap_or(0)
    }

    /// Peer `i`'s VPN address.
    pub fn addr(&self, i: usize) -> Ipv4Addr {
        self.peers[i].core.addr()
    }

    /// Every tunnel datagram peer `i` sent so far.
    pub fn sent_by(&self, i: usize) -> Vec<Vec<u8>> {
        let from = self.peers[i].tunnel;
        self.captured.iter().filter(|(_, f, _)| *f == from).map(|(_, _, d)| d.clone()).collect()
    }

    /// What the hub has for the tunnel now, taken without delivering it.
    pub fn take_hub_datagrams(&mut self) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut got = Vec::new();
        loop {
            let (hub, out) = (&mut self.hub, &mut self.out);
            match timed(&mut self.hub_busy, || hub.poll_output(out)) {
                HubOutput::Tunnel { to, len } => got.push((to, self.out[..len].to_vec())),
                HubOutput::Forward { to, len } => self.forwarded.push((to, self.out[..len].to_vec())),
                HubOutput::Tun(n) => self.hub_tun_rx.push(self.out[..n].to_vec()),
                HubOutput::Event(ev) => self.hub_events.push((self.now, ev)),
                HubOutput::Timeout(_) => return got,
            }
        }
    }

    /// The direct datagrams peer `i` has now, each with where it goes, taken without
    /// delivering them.
    pub fn take_direct_datagrams(&mut self, i: usize) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut got = Vec::new();
        loop {
            match self.peers[i].core.poll_output(self.now, &mut self.out) {
                PeerOutput::Mesh { len, to } => {
                    for t in to {
                        if let MeshAddr::Direct { addr, .. } = *t {
                            got.push((addr, self.out[..len].to_vec()));
                        }
                    }
                }
                PeerOutput::Event(ev) => self.peers[i].events.push(ev),
                PeerOutput::Timeout(_) => return got,
                _ => {}
            }
        }
    }

    /// What peer `i` has for the tunnel now, taken without delivering it.
    pub fn take_peer_datagrams(&mut self, i: usize) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        loop {
            match self.peers[i].core.poll_output(self.now, &mut self.out) {
                PeerOutput::Tunnel { len, .. } => got.push(self.out[..len].to_vec()),
                PeerOutput::Event(ev) => self.peers[i].events.push(ev),
                PeerOutput::Timeout(_) => return got,
                _ => {}
            }
        }
    }
}
