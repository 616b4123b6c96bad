//! The mpclient driver: a mio loop around `common::client::Client`.
//!
//! Sockets: one for local applications (`listen`), one per path (connected to its relay,
//! optionally bound to a local address or interface), and the control socket. The loop
//! only moves bytes and time; every decision is the core's.

use common::client::{Client, ClientCoreConfig, ClientEvent, ClientRecv, ClientSend};
use common::config::{ClientConfig, DEFAULT_STATS_INTERVAL_SECS};
use common::crypto::{Cipher, Psk};
use common::driver::batch::{self, RecvBatch, BATCH};
use common::driver::Readiness;
use common::driver::{self, control};
use common::wire::{AEAD_TAG_LEN, DATA_PAYLOAD_OFFSET, MAX_DATAGRAM};
use common::PathMask;
use mio::net::{UdpSocket, UnixListener};
use mio::{Interest, Registry, Token};
use slog::{debug, info, o, trace, warn, Logger};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const APP: Token = Token(0);
const CONTROL: Token = Token(1);
const PATH_TOKEN_BASE: usize = 2;
/// Datagrams read from one socket per wake-up before the others get a turn.
const READ_BUDGET: usize = 256;

/// One path, resolved.
#[derive(Debug, Clone)]
pub struct PathSpec {
    pub name: String,
    pub remote: SocketAddr,
    pub bind: Option<SocketAddr>,
    pub interface: Option<String>,
}

/// Everything the driver needs, from a bridges file + flags or a YAML config.
#[derive(Debug, Clone)]
pub struct ClientRuntime {
    pub listen: SocketAddr,
    pub cipher: Cipher,
    pub target: String,
    pub paths: Vec<PathSpec>,
    pub session_idle_timeout: Duration,
    pub max_sessions: usize,
    pub control: PathBuf,
    pub stats_interval: Option<Duration>,
}

impl ClientRuntime {
    /// From a YAML config; resolves host names now, so errors show at startup.
    pub fn from_config(file: &str, c: &ClientConfig) -> Result<Self, String> {
        let mut paths = Vec::new();
        for (i, p) in c.paths.iter().enumerate() {
            let remote = driver::resolve(&p.remote).map_err(|e| format!("{file}: paths[{i}].remote: {e}"))?;
            let bind = match &p.bind {
                None => None,
                Some(b) => Some(match b.parse::<SocketAddr>() {
                    Ok(a) => a,
                    Err(_) => {
                        SocketAddr::new(b.parse().map_err(|_| format!("{file}: paths[{i}].bind: bad address"))?, 0)
                    }
                }),
            };
            paths.push(PathSpec {
                name: p.name.clone().unwrap_or_else(|| p.remote.clone()),
                remote,
                bind,
                interface: p.interface.clone(),
            });
        }
        Ok(Self {
            listen: c.listen.parse().map_err(|_| format!("{file}: listen: bad address"))?,
            cipher: c.cipher,
            target: c.target.clone(),
            paths,
            session_idle_timeout: Duration::from_secs(c.session_idle_timeout_secs),
            max_sessions: c.max_sessions,
            control: c.control_socket.clone().unwrap_or_else(|| control::default_control_path("mpclient")),
            stats_interval: (c.stats_interval_secs > 0).then(|| Duration::from_secs(c.stats_interval_secs)),
        })
    }

    /// From an mptunnel bridges file's entries.
    pub fn from_bridges(file: &str, bridges: &[common::config::Bridge], listen: SocketAddr) -> Result<Self, String> {
        let mut paths = Vec::new();
        for b in bridges {
            let hp = format!("{}:{}", b.host, b.port);
            let remote = driver::resolve(&hp).map_err(|e| format!("{file}:{}: {e}", b.line))?;
            paths.push(PathSpec { name: hp, remote, bind: None, interface: None });
        }
        Ok(Self {
            listen,
            cipher: Cipher::Aes256Gcm,
            target: String::new(),
            paths,
            session_idle_timeout: common::client::DEFAULT_SESSION_IDLE_TIMEOUT,
            max_sessions: common::client::DEFAULT_MAX_SESSIONS,
            control: control::default_control_path("mpclient"),
            stats_interval: Some(Duration::from_secs(DEFAULT_STATS_INTERVAL_SECS)),
        })
    }
}

fn path_socket(p: &PathSpec) -> std::io::Result<UdpSocket> {
    let bind = p.bind.unwrap_or_else(|| driver::any_addr_for(p.remote));
    driver::udp_socket(bind, p.interface.as_deref(), Some(p.remote))
}

/// The client's half of the tunnel without its application socket: the core and one
/// socket per path. `mpclient` puts a UDP socket for local applications in front of it;
/// `mpvpn peer` in embedded mode feeds it VPN datagrams directly.
pub struct Multipath {
    pub core: Client,
    paths: Vec<UdpSocket>,
    token_base: usize,
    /// Datagrams read from a path.
    rx: RecvBatch,
    /// What the core sends on its own (handshakes, probes, held datagrams).
    buf: Vec<u8>,
    log: Logger,
    pub send_errors: u64,
}

impl Multipath {
    /// Opens the path sockets and registers them as tokens `token_base..`.
    pub fn open(
        rt: &ClientRuntime,
        psk: Psk,
        registry: &Registry,
        token_base: usize,
        log: Logger,
    ) -> Result<Self, String> {
        let core_cfg = ClientCoreConfig {
            cipher: rt.cipher,
            target: rt.target.clone(),
            path_names: rt.paths.iter().map(|p| p.name.clone()).collect(),
            session_idle_timeout: rt.session_idle_timeout,
            max_sessions: rt.max_sessions,
        };
        let mut paths = Vec::new();
        for (i, p) in rt.paths.iter().enumerate() {
            let mut s = path_socket(p).map_err(|e| format!("path {} ({}): {e}", i, p.name))?;
            registry.register(&mut s, Token(token_base + i), Interest::READABLE).map_err(|e| e.to_string())?;
            info!(log, "path"; "name" => &p.name, "remote" => %p.remote, "bind" => ?p.bind, "interface" => ?p.interface);
            paths.push(s);
        }
        Ok(Self {
            core: Client::new(psk, core_cfg, Instant::now()),
            paths,
            token_base,
            rx: RecvBatch::new(),
            buf: vec![0; MAX_DATAGRAM],
            log,
            send_errors: 0,
        })
    }

    /// The path a token belongs to.
    pub fn path_of(&self, token: Token) -> Option<usize> {
        token.0.checked_sub(self.token_base).filter(|&i| i < self.paths.len())
    }

    /// Seals in place the application datagrams of `batch` (received with
    /// `recv_leaving(fd, DATA_PAYLOAD_OFFSET, AEAD_TAG_LEN)`, or pushed with that room by
    /// an in-process application) and sends each path its
    /// copies with one `sendmmsg`: under load, one system call per path per batch instead
    /// of one per copy.
    pub fn send_batch(&mut self, now: Instant, batch: &mut RecvBatch) {
        let mut masks = [PathMask::EMPTY; BATCH];
        for (i, mask) in masks.iter_mut().enumerate().take(batch.len()) {
            let Some(from) = batch.source(i) else { continue };
            let n = batch.datagram(i).len();
            match self.core.handle_app_datagram(now, from, batch.slot_mut(i), n) {
                ClientSend::Sealed { len, paths } => {
                    batch.set_datagram(i, 0, len);
                    *mask = paths;
                }
                ClientSend::Queued => {}
                ClientSend::Dropped(reason) => trace!(self.log, "dropped app datagram"; "reason" => ?reason),
            }
        }
        let mut which = [0usize; BATCH];
        for (p, sock) in self.paths.iter().enumerate() {
            let mut k = 0;
            for (i, mask) in masks.iter().enumerate().take(batch.len()) {
                if mask.contains(p) {
                    which[k] = i;
                    k += 1;
                }
            }
            if k > 0 {
                let sent = batch::send_batch(sock.as_raw_fd(), batch, &which[..k], None, None);
                if sent < k {
                    self.send_errors += (k - sent) as u64;
                    trace!(self.log, "path send failed"; "path" => p, "datagrams" => k - sent);
                }
            }
        }
        self.flush(now);
    }

    /// Reads datagrams arriving on path `i` (`recvmmsg`) and opens them in place, handing
    /// each delivered payload to `deliver(app, payload)`; true if the read budget ran out
    /// first.
    pub fn read_path(&mut self, i: usize, mut deliver: impl FnMut(SocketAddr, &[u8])) -> bool {
        for _ in 0..READ_BUDGET / BATCH {
            let n = match self.rx.recv(self.paths[i].as_raw_fd()) {
                Ok(0) => return false,
                Ok(n) => n,
                Err(e) if driver::is_transient(&e) => continue,
                Err(e) => {
                    warn!(self.log, "reading from path"; "path" => i, "error" => %e);
                    return false;
                }
            };
            let now = Instant::now();
            for k in 0..n {
                let d = self.rx.datagram_mut(k);
                match self.core.handle_path_datagram(now, i, d) {
                    ClientRecv::Deliver { app, payload } => deliver(app, &d[payload]),
                    ClientRecv::Consumed => {}
                    ClientRecv::Dropped(reason) => trace!(self.log, "dropped"; "path" => i, "reason" => ?reason),
                }
            }
            self.flush(now);
        }
        true
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.core.poll_timeout()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.core.handle_timeout(now);
        self.flush(now);
    }

    /// Sends what the core queued (handshakes, probes, datagrams held during a handshake)
    /// and logs its events.
    fn flush(&mut self, now: Instant) {
        while let Some(t) = self.core.poll_transmit(now, &mut self.buf) {
            for p in t.paths.iter() {
                if let Err(e) = self.paths[p].send(&self.buf[..t.len]) {
                    self.send_errors += 1;
                    trace!(self.log, "path send failed"; "path" => p, "error" => %e);
                }
            }
        }
        while let Some(ev) = self.core.poll_event() {
            match ev {
                ClientEvent::SessionStarted { app, id } => {
                    debug!(self.log, "handshaking"; "app" => %app, "session" => %id)
                }
                ClientEvent::Established { app, id, cipher } => {
                    info!(self.log, "session established"; "app" => %app, "session" => %id, "cipher" => cipher.name())
                }
                ClientEvent::Refused { app, status } => {
                    warn!(self.log, "server refused the session"; "app" => %app, "status" => ?status)
                }
                ClientEvent::ServerLost { app, old } => {
                    warn!(self.log, "no answer from the server on any path; handshaking again"; "app" => %app, "session" => %old)
                }
                ClientEvent::PathUp { app, path } => info!(self.log, "path up"; "app" => %app, "path" => path),
                ClientEvent::PathDown { app, path } => warn!(self.log, "path down"; "app" => %app, "path" => path),
                ClientEvent::SessionClosed { app, id } => {
                    info!(self.log, "session idle, closed"; "app" => %app, "session" => %id)
                }
            }
        }
    }
}

/// Sends `batch` to the applications and empties it. A full socket buffer or a vanished
/// application loses the datagram, as UDP may.
fn send_to_apps(app: &UdpSocket, batch: &mut RecvBatch) {
    batch::send_to_sources(app.as_raw_fd(), batch);
    batch.clear();
}

struct Driver {
    mp: Multipath,
    app: UdpSocket,
    app_batch: RecvBatch,
    /// Payloads delivered from the paths, sent to their applications a batch at a time.
    to_apps: RecvBatch,
    control: UnixListener,
    listen_name: String,
}

/// Runs the client until a fatal error.
pub fn run(rt: ClientRuntime, psk: Psk, log: Logger) -> Result<(), String> {
    let mut io = Readiness::new(256).map_err(|e| format!("poll: {e}"))?;
    let mut app = driver::udp_socket(rt.listen, None, None).map_err(|e| format!("listen {}: {e}", rt.listen))?;
    io.registry().register(&mut app, APP, Interest::READABLE).map_err(|e| e.to_string())?;
    control::prepare_control_path(&rt.control)?;
    let mut control =
        UnixListener::bind(&rt.control).map_err(|e| format!("control socket {}: {e}", rt.control.display()))?;
    io.registry().register(&mut control, CONTROL, Interest::READABLE).map_err(|e| e.to_string())?;
    info!(log, "mpclient listening"; "listen" => %rt.listen, "paths" => rt.paths.len(), "cipher" => rt.cipher.name(), "control" => %rt.control.display());
    let mp = Multipath::open(&rt, psk, io.registry(), PATH_TOKEN_BASE, log.clone())?;
    let mut d = Driver {
        mp,
        app,
        app_batch: RecvBatch::new(),
        to_apps: RecvBatch::new(),
        control,
        listen_name: rt.listen.to_string(),
    };
    d.event_loop(&mut io, rt.stats_interval, &log)
}

impl Driver {
    fn event_loop(&mut self, io: &mut Readiness, stats_interval: Option<Duration>, log: &Logger) -> Result<(), String> {
        let mut next_stats = stats_interval.map(|d| Instant::now() + d);
        loop {
            let deadline = [self.mp.poll_timeout(), next_stats].into_iter().flatten().min();
            io.wait(deadline).map_err(|e| format!("poll: {e}"))?;
            while let Some(token) = io.next_ready() {
                let pending = match token {
                    APP => self.read_app(log),
                    CONTROL => {
                        let (core, listen) = (&self.mp.core, &self.listen_name);
                        if let Err(e) = control::serve_pending(&self.control, || core.status(Instant::now(), listen)) {
                            warn!(log, "control socket"; "error" => %e);
                        }
                        false
                    }
                    t => match self.mp.path_of(t) {
                        Some(i) => self.read_path(i),
                        None => false,
                    },
                };
                if pending {
                    io.still_pending(token);
                }
            }
            let now = Instant::now();
            self.mp.handle_timeout(now);
            if let (Some(at), Some(every)) = (next_stats, stats_interval) {
                if now >= at {
                    info!(log, "stats"; "summary" => self.mp.core.status(now, &self.listen_name).summary_line(), "send_errors" => self.mp.send_errors);
                    next_stats = Some(now + every);
                }
            }
        }
    }

    /// Reads path `i` and sends the delivered payloads to their applications, a batch
    /// at a time; true if the budget ran out first.
    fn read_path(&mut self, i: usize) -> bool {
        let (app, to_apps) = (&self.app, &mut self.to_apps);
        let pending = self.mp.read_path(i, |to, payload| {
            if to_apps.is_full() {
                send_to_apps(app, to_apps);
            }
            to_apps.push_with(0, |room| {
                room[..payload.len()].copy_from_slice(payload);
                Some((to, payload.len()))
            });
        });
        send_to_apps(app, to_apps);
        pending
    }

    /// Reads local application datagrams, a batch at a time; true if the budget ran out
    /// first.
    fn read_app(&mut self, log: &Logger) -> bool {
        for _ in 0..READ_BUDGET / BATCH {
            match self.app_batch.recv_leaving(self.app.as_raw_fd(), DATA_PAYLOAD_OFFSET, AEAD_TAG_LEN) {
                Ok(0) => return false,
                Ok(_) => self.mp.send_batch(Instant::now(), &mut self.app_batch),
                Err(e) if driver::is_transient(&e) => continue,
                Err(e) => {
                    warn!(log, "reading from applications"; "error" => %e);
                    return false;
                }
            }
        }
        true
    }
}

/// Builds the logger for a daemon, keyed by program name.
pub fn logger(level: &str) -> (Logger, common::log::LogGuard) {
    let (log, guard) = common::log::init(level);
    (log.new(o!("prog" => "mpclient")), guard)
}
