//! A seeded, in-process network for testing the cores with a fake clock.
//!
//! One `Client` and one `Server` joined by N links (one per client path). Each link has
//! per-direction loss (independent, or bursty: Gilbert–Elliott), delay, jitter (which
//! reorders) and duplication, and can be cut or have its server-side address changed (a
//! restarted relay). The target behind the server
//! echoes every datagram, or just records it. Everything random comes from one seed (the
//! network's choices and both cores' `Entropy`: session ids, challenges, ephemeral keys),
//! so a failing run replays exactly, byte for byte; `trace` records what happened.
//!
//! Test-only: compiled with the `sim` feature, which only dev-dependencies turn on.

use crate::client::{Client, ClientCoreConfig, ClientRecv, ClientSend};
use crate::crypto::{Cipher, Psk};
use crate::entropy::Entropy;
use crate::redundancy::RedundancyConfig;
use crate::server::{Server, ServerCoreConfig, ServerRecv, SessionSlot};
use crate::wire::{DATA_PAYLOAD_OFFSET, HANDSHAKE_RESP_LEN, MAX_DATAGRAM};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// splitmix64: small, fast, good enough for test randomness, and seedable.
#[derive(Debug, Clone)]
pub struct SimRng(u64);

impl SimRng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }
}

/// A core's random source drawn from a seed: deterministic, for the simulator only.
pub struct SimEntropy(SimRng);

impl SimEntropy {
    pub fn new(seed: u64) -> Self {
        Self(SimRng::new(seed))
    }
}

impl Entropy for SimEntropy {
    fn fill(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            let b = self.0.next_u64().to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
    }

    #[allow(deprecated)] // ring's fixed-bytes random source: meant for tests, as here
    fn x25519_key(&mut self) -> ring::agreement::EphemeralPrivateKey {
        let mut seed = [0u8; 32];
        self.fill(&mut seed);
        let fixed = ring::test::rand::FixedSliceRandom { bytes: &seed };
        ring::agreement::EphemeralPrivateKey::generate(&ring::agreement::X25519, &fixed).expect("x25519 from 32 bytes")
    }

    fn fork(&mut self) -> Box<dyn Entropy> {
        Box::new(SimEntropy::new(self.0.next_u64()))
    }
}

/// One direction of a link.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinkDir {
    pub loss: f64,
    pub delay: Duration,
    /// Extra delay uniform in [0, jitter): reorders datagrams.
    pub jitter: Duration,
    pub duplicate: f64,
    /// Bursty loss (Gilbert–Elliott): the chance per datagram of going from the good
    /// state (where `loss` applies) to the bad one, of coming back, and the loss in it.
    pub to_bad: f64,
    pub to_good: f64,
    pub bad_loss: f64,
}

impl LinkDir {
    pub fn lossy(loss: f64, delay_ms: u64) -> Self {
        Self { loss, delay: Duration::from_millis(delay_ms), ..Self::default() }
    }

    /// Bursty loss averaging about `mean_loss`, in bursts of `burst` datagrams on average
    /// during which everything is lost.
    pub fn bursty(mean_loss: f64, burst: f64, delay_ms: u64) -> Self {
        let to_good = 1.0 / burst;
        // stationary share of the bad state = to_bad / (to_bad + to_good) = mean_loss
        let to_bad = mean_loss * to_good / (1.0 - mean_loss);
        Self { delay: Duration::from_millis(delay_ms), to_bad, to_good, bad_loss: 1.0, ..Self::default() }
    }
}

#[derive(Debug, Clone)]
pub struct Link {
    pub to_server: LinkDir,
    pub to_client: LinkDir,
    /// The address the server sees this path's datagrams come from (the relay's).
    pub server_side_addr: SocketAddr,
    pub cut: bool,
    /// Each direction's Gilbert–Elliott state: in the bad state.
    bad: [bool; 2],
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Hop {
    ToServer { link: usize, from: SocketAddr },
    ToClient { link: usize },
}

#[derive(Debug, Default, Clone)]
pub struct SimCounters {
    pub sent_to_server: u64,
    pub sent_to_client: u64,
    pub lost: u64,
    /// Server replies to an address no link has (any more): lost.
    pub unroutable: u64,
    /// Bytes the client and the server put on the links, every copy counted.
    pub bytes_to_server: u64,
    pub bytes_to_client: u64,
}

/// Delivery time, a tie-breaking order, where to, the bytes.
type InFlight = (Instant, u64, Hop, Vec<u8>);

pub struct Sim {
    pub now: Instant,
    pub rng: SimRng,
    pub psk: Psk,
    pub client_cfg: ClientCoreConfig,
    pub server_cfg: ServerCoreConfig,
    pub client: Client,
    pub server: Server,
    pub links: Vec<Link>,
    /// When false the server side is down: datagrams to it vanish.
    pub server_up: bool,
    /// The target echoes each datagram back through the tunnel.
    pub echo: bool,
    /// The server is one from before redundancy modes: it drops an init that asks for
    /// one, without a word (its parser refuses the length).
    pub server_before_redundancy: bool,
    /// Datagrams the target received (per session slot, in order).
    pub target_received: Vec<(SessionSlot, Vec<u8>)>,
    /// Datagrams delivered to local applications.
    pub app_received: Vec<(SocketAddr, Vec<u8>)>,
    /// Every handshake init that reached the server, as an eavesdropper would capture it.
    pub inits_seen: Vec<Vec<u8>>,
    pub counters: SimCounters,
    /// What happened, in order: core events and deliveries with their time since the
    /// start and a digest of the bytes. The same seed gives the same trace.
    pub trace: Vec<String>,
    start: Instant,
    in_flight: BinaryHeap<Reverse<InFlight>>,
    order: u64,
    buf: Vec<u8>,
}

pub const SIM_TARGET: &str = "10.9.9.9:9000";
/// The simulated wall clock at the start of a run (ms since the Unix epoch).
pub const SIM_WALL_START_MS: u64 = 1_800_000_000_000;

/// The origin of a simulated clock. `Instant` has no constructor, so a run starts at the
/// real clock's reading; only offsets from it ever matter, so a run replays exactly.
pub fn epoch() -> Instant {
    Instant::now()
}

impl Sim {
    /// A client with `links.len()` paths and a server with a default echo target.
    pub fn new(seed: u64, links: Vec<(LinkDir, LinkDir)>, cipher: Cipher) -> Self {
        let now = epoch();
        let psk = Psk::from_bytes([7; 32]);
        let client_cfg = ClientCoreConfig {
            cipher,
            target: String::new(),
            path_names: (0..links.len()).map(|i| format!("link{i}")).collect(),
            session_idle_timeout: Duration::from_secs(60),
            max_sessions: 16,
            redundancy: RedundancyConfig::default(),
        };
        let server_cfg = ServerCoreConfig {
            default_target: Some(SIM_TARGET.parse().expect("literal")),
            targets: HashMap::new(),
            ciphers: vec![Cipher::Aes256Gcm, Cipher::ChaCha20Poly1305],
            max_sessions: 16,
            max_paths_per_session: 8,
            session_timeout: Duration::from_secs(30),
        };
        let links = links
            .into_iter()
            .enumerate()
            .map(|(i, (up, down))| Link {
                to_server: up,
                to_client: down,
                server_side_addr: SocketAddr::from(([10, 0, i as u8, 1], 40000)),
                cut: false,
                bad: [false; 2],
            })
            .collect();
        let mut rng = SimRng::new(seed);
        Self {
            client: Client::new(
                psk.clone(),
                client_cfg.clone(),
                now,
                SIM_WALL_START_MS,
                Box::new(SimEntropy::new(rng.next_u64())),
            ),
            server: Server::new(
                psk.clone(),
                server_cfg.clone(),
                now,
                SIM_WALL_START_MS,
                Box::new(SimEntropy::new(rng.next_u64())),
            ),
            now,
            rng,
            psk,
            client_cfg,
            server_cfg,
            links,
            server_up: true,
            echo: true,
            server_before_redundancy: false,
            target_received: Vec::new(),
            app_received: Vec::new(),
            inits_seen: Vec::new(),
            counters: SimCounters::default(),
            trace: Vec::new(),
            start: now,
            in_flight: BinaryHeap::new(),
            order: 0,
            buf: vec![0; MAX_DATAGRAM],
        }
    }

    /// The simulated wall clock now (ms since the Unix epoch).
    pub fn wall_ms(&self) -> u64 {
        SIM_WALL_START_MS + (self.now - self.start).as_millis() as u64
    }

    /// Forgets all server state, as a `kill -9` and restart would.
    pub fn restart_server(&mut self) {
        let entropy = Box::new(SimEntropy::new(self.rng.next_u64()));
        self.server = Server::new(self.psk.clone(), self.server_cfg.clone(), self.now, self.wall_ms(), entropy);
    }

    /// Forgets all client state; the new client's wall clock is off by `offset_ms`.
    pub fn restart_client_with_clock(&mut self, offset_ms: i64) {
        let entropy = Box::new(SimEntropy::new(self.rng.next_u64()));
        let wall = self.wall_ms().saturating_add_signed(offset_ms);
        self.client = Client::new(self.psk.clone(), self.client_cfg.clone(), self.now, wall, entropy);
    }

    /// A new client (all state forgotten) whose sessions use `redundancy`.
    pub fn set_redundancy(&mut self, redundancy: RedundancyConfig) {
        self.client_cfg.redundancy = redundancy;
        self.restart_client();
    }

    /// Forgets all client state.
    pub fn restart_client(&mut self) {
        let entropy = Box::new(SimEntropy::new(self.rng.next_u64()));
        self.client = Client::new(self.psk.clone(), self.client_cfg.clone(), self.now, self.wall_ms(), entropy);
    }

    /// The relay of `link` restarted: the server sees a new source port.
    pub fn restart_relay(&mut self, link: usize) {
        let a = &mut self.links[link].server_side_addr;
        a.set_port(a.port() + 1);
    }

    /// Whether one datagram on `link`'s direction `d` (0 up, 1 down) is lost.
    fn lost(&mut self, link: usize, d: usize, dir: LinkDir) -> bool {
        let bad = &mut self.links[link].bad[d];
        let flip = if *bad { dir.to_good } else { dir.to_bad };
        if self.rng.chance(flip) {
            *bad = !*bad;
        }
        let loss = if self.links[link].bad[d] { dir.bad_loss } else { dir.loss };
        self.rng.chance(loss)
    }

    fn enqueue(&mut self, hop: Hop, dir: LinkDir, bytes: &[u8]) {
        let copies = if self.rng.chance(dir.duplicate) { 2 } else { 1 };
        let (link, d) = match hop {
            Hop::ToServer { link, .. } => (link, 0),
            Hop::ToClient { link } => (link, 1),
        };
        if d == 0 {
            self.counters.bytes_to_server += bytes.len() as u64;
        } else {
            self.counters.bytes_to_client += bytes.len() as u64;
        }
        for _ in 0..copies {
            if self.lost(link, d, dir) {
                self.counters.lost += 1;
                continue;
            }
            let jitter = dir.jitter.mul_f64(self.rng.unit());
            let at = self.now + dir.delay + jitter;
            self.order += 1;
            let hop = match &hop {
                Hop::ToServer { link, from } => Hop::ToServer { link: *link, from: *from },
                Hop::ToClient { link } => Hop::ToClient { link: *link },
            };
            self.in_flight.push(Reverse((at, self.order, hop, bytes.to_vec())));
        }
    }

    fn send_client_paths(&mut self, len: usize, paths: crate::PathMask) {
        let bytes = self.buf[..len].to_vec();
        for p in paths.iter() {
            let link = &self.links[p];
            if link.cut {
                self.counters.lost += 1;
                continue;
            }
            self.counters.sent_to_server += 1;
            let (dir, from) = (link.to_server, link.server_side_addr);
            self.enqueue(Hop::ToServer { link: p, from }, dir, &bytes);
        }
    }

    fn send_to_client(&mut self, to: SocketAddr, bytes: &[u8]) {
        let Some(i) = self.links.iter().position(|l| l.server_side_addr == to) else {
            self.counters.unroutable += 1;
            return;
        };
        if self.links[i].cut {
            self.counters.lost += 1;
            return;
        }
        self.counters.sent_to_client += 1;
        let dir = self.links[i].to_client;
        self.enqueue(Hop::ToClient { link: i }, dir, bytes);
    }

    /// The local application at `app` sends `payload`.
    pub fn app_send(&mut self, app: SocketAddr, payload: &[u8]) -> ClientSend {
        self.buf[DATA_PAYLOAD_OFFSET..DATA_PAYLOAD_OFFSET + payload.len()].copy_from_slice(payload);
        let mut buf = std::mem::take(&mut self.buf);
        let r = self.client.handle_app_datagram(self.now, app, &mut buf, payload.len());
        self.buf = buf;
        if let ClientSend::Sealed { len, paths } = r {
            self.send_client_paths(len, paths);
        }
        self.flush();
        r
    }

    /// Drains both cores' transmit queues, rebuilt datagrams and events.
    fn flush(&mut self) {
        loop {
            let mut buf = std::mem::take(&mut self.buf);
            let t = self.client.poll_transmit(self.now, &mut buf);
            self.buf = buf;
            match t {
                Some(t) => self.send_client_paths(t.len, t.paths),
                None => break,
            }
        }
        let mut buf = std::mem::take(&mut self.buf);
        while let Some((slot, len, paths)) = self.server.poll_transmit(self.now, &mut buf) {
            self.send_server_paths(slot, &buf[..len], paths);
        }
        while let Some((app, n)) = self.client.poll_recovered(self.now, &mut buf) {
            self.app_received.push((app, buf[..n].to_vec()));
        }
        let mut rebuilt = Vec::new();
        while let Some((slot, n)) = self.server.poll_recovered(&mut buf[DATA_PAYLOAD_OFFSET..]) {
            rebuilt.push((slot, n));
            self.target_got(slot, &mut buf, DATA_PAYLOAD_OFFSET..DATA_PAYLOAD_OFFSET + n);
        }
        self.buf = buf;
        if !rebuilt.is_empty() {
            // the echoes may have made parity of their own
            let mut buf = std::mem::take(&mut self.buf);
            while let Some((slot, len, paths)) = self.server.poll_transmit(self.now, &mut buf) {
                self.send_server_paths(slot, &buf[..len], paths);
            }
            self.buf = buf;
        }
        let at = self.now - self.start;
        while let Some(ev) = self.client.poll_event() {
            self.trace.push(format!("{at:?} client {ev:?}"));
        }
        while let Some(ev) = self.server.poll_event() {
            self.trace.push(format!("{at:?} server {ev:?}"));
        }
    }

    fn record(&mut self, what: &str, bytes: &[u8]) {
        // FNV-1a: equal bytes, equal digest; enough to tell two runs apart
        let digest = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        let at = self.now - self.start;
        self.trace.push(format!("{at:?} {what} {} bytes {digest:016x}", bytes.len()));
    }

    fn deliver(&mut self, hop: Hop, mut bytes: Vec<u8>) {
        self.record(if matches!(hop, Hop::ToServer { .. }) { "to-server" } else { "to-client" }, &bytes);
        match hop {
            Hop::ToServer { from, .. } => {
                if !self.server_up {
                    return;
                }
                if bytes.first() == Some(&crate::wire::TYPE_HANDSHAKE_INIT) {
                    self.inits_seen.push(bytes.clone());
                    let asks = crate::wire::HandshakeInitRepr::parse(&bytes).is_ok_and(|(i, _)| i.redundancy.is_some());
                    if asks && self.server_before_redundancy {
                        return;
                    }
                }
                let mut out = [0u8; HANDSHAKE_RESP_LEN];
                let n = bytes.len();
                self.buf[..n].copy_from_slice(&bytes);
                let mut buf = std::mem::take(&mut self.buf);
                let r = self.server.handle_datagram(self.now, from, &mut buf[..n], &mut out);
                match r {
                    ServerRecv::Reply { len } => self.send_to_client(from, &out[..len]),
                    ServerRecv::Forward { slot, payload } => self.target_got(slot, &mut buf, payload),
                    ServerRecv::Consumed | ServerRecv::Dropped(_) => {}
                }
                self.buf = buf;
            }
            Hop::ToClient { link } => {
                let r = self.client.handle_path_datagram(self.now, link, &mut bytes);
                if let ClientRecv::Deliver { app, payload } = r {
                    self.app_received.push((app, bytes[payload].to_vec()));
                }
            }
        }
        self.flush();
    }

    /// The target received `buf[payload]` from session `slot`; it records it and, if
    /// echoing, answers at once from the session's upstream socket.
    fn target_got(&mut self, slot: SessionSlot, buf: &mut [u8], payload: std::ops::Range<usize>) {
        self.target_received.push((slot, buf[payload.clone()].to_vec()));
        if !self.echo {
            return;
        }
        let plen = payload.len();
        buf.copy_within(payload, DATA_PAYLOAD_OFFSET);
        if let Some((len, paths)) = self.server.encapsulate(self.now, slot, buf, plen) {
            self.send_server_paths(slot, &buf[..len], paths);
        }
    }

    fn send_server_paths(&mut self, slot: SessionSlot, bytes: &[u8], paths: crate::PathMask) {
        for p in paths.iter() {
            if let Some(addr) = self.server.path_addr(slot, p) {
                self.send_to_client(addr, bytes);
            }
        }
    }

    /// Runs the network and both cores until `deadline`.
    pub fn run_until(&mut self, deadline: Instant) {
        loop {
            let next_packet = self.in_flight.peek().map(|Reverse((t, ..))| *t);
            let next_timer = [self.client.poll_timeout(), Some(self.server.poll_timeout())].into_iter().flatten().min();
            let next = [next_packet, next_timer].into_iter().flatten().min().unwrap_or(deadline);
            if next > deadline {
                self.now = deadline;
                break;
            }
            self.now = self.now.max(next);
            if next_packet == Some(next) {
                let Reverse((_, _, hop, bytes)) = self.in_flight.pop().expect("peeked");
                self.deliver(hop, bytes);
            } else {
                self.client.handle_timeout(self.now);
                self.server.handle_timeout(self.now);
                self.flush();
            }
        }
        self.client.handle_timeout(self.now);
        self.server.handle_timeout(self.now);
        self.flush();
    }

    pub fn run_for(&mut self, d: Duration) {
        let deadline = self.now + d;
        self.run_until(deadline);
    }
}

/// What a session's peer may send once it holds the keys, straight into the redundancy
/// layer: `data` is split into inner messages (a length byte, then that many bytes), each
/// parsed as the cores parse an opened datagram and handed to a receiver (coded data,
/// parity) or a sent log (receipts). Rebuilt datagrams are drained as a driver would. For
/// the fuzzer: nothing here may panic, and nothing delivered is longer than a datagram.
pub fn fuzz_inner_messages(data: &[u8]) {
    use crate::fec::MAX_DATAGRAM;
    use crate::redundancy::{RedundancyReceiver, SentLog};
    use crate::wire::InnerRepr;
    let now = epoch();
    let mut receiver = RedundancyReceiver::default();
    let mut sent = SentLog::default();
    for seq in 0..64 {
        sent.record(now, seq * 3);
    }
    let mut out = vec![0u8; MAX_DATAGRAM];
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let (msg, next) = tail.split_at(usize::from(len).min(tail.len()));
        rest = next;
        match InnerRepr::parse(msg) {
            Ok(InnerRepr::FecData(d, tag)) => {
                receiver.handle_data(tag, d);
            }
            Ok(InnerRepr::FecParity(h, shard)) => receiver.handle_parity(h, shard),
            Ok(InnerRepr::Receipt(r)) => {
                for e in r.entries() {
                    // a second later, so every datagram logged had its chance; the
                    // round trip any the receipt's count suggests
                    let rtt = Duration::from_micros(u64::from(e.received % 1_000_000));
                    let count = sent.on_receipt(now + Duration::from_secs(1), e.highest, e.received, Some(rtt));
                    if let Some((s, l)) = count.counted {
                        assert!(l <= s, "lost more than sent");
                    }
                }
            }
            _ => {}
        }
        while let Some(n) = receiver.poll_recovered(&mut out) {
            assert!(n <= MAX_DATAGRAM);
        }
    }
}
