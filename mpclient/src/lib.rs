//! The mpclient driver: a mio loop around `common::client::Client`.
//!
//! Sockets: one for local applications (`listen`), one per path (connected to its relay,
//! optionally bound to a local address or interface), and the control socket. The loop
//! only moves bytes and time; every decision is the core's.

pub mod cli;

use common::client::{Client, ClientCoreConfig, ClientEvent, ClientRecv, ClientSend};
use common::config::RedundancySettings;
use common::config::{ClientConfig, ConfigError, DEFAULT_STATS_INTERVAL_SECS};
use common::crypto::{Cipher, Psk};
use common::driver::address_watch::AddressWatch;
use common::driver::batch::{BatchSocket, RecvBatch, BATCH};
use common::driver::event_loop::{read_batches, EventLoop, Room, Service, NO_ROOM};
use common::driver::metrics::Metrics;
use common::driver::{self, control, DriverError, IoContext};
use common::entropy::OsEntropy;
use common::redundancy::RedundancyConfig;
use common::stats::StatusReport;
use common::wire::{DATA_PAYLOAD_OFFSET, DATA_TAIL_ROOM, MAX_DATAGRAM};
use common::PathMask;
use mio::{Interest, Registry, Token};
use slog::{debug, info, trace, warn, Logger};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const APP: Token = Token(0);
const PATH_TOKEN_BASE: usize = 1;
/// Application datagrams are read with room to seal them in place.
const SEALING_ROOM: Room = (DATA_PAYLOAD_OFFSET, DATA_TAIL_ROOM);

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
    /// How sessions spread datagrams over the paths, both ways.
    pub redundancy: RedundancyConfig,
    pub control: PathBuf,
    /// Where `GET /metrics` is served (`metrics_listen`), if anywhere.
    pub metrics: Option<SocketAddr>,
    pub stats_interval: Option<Duration>,
}

impl ClientRuntime {
    /// From a YAML config; resolves host names now, so errors show at startup.
    pub fn from_config(file: &str, c: &ClientConfig) -> Result<Self, ConfigError> {
        let err = |field: String, message: String| ConfigError::field(file, field, message);
        let mut paths = Vec::new();
        for (i, p) in c.paths.iter().enumerate() {
            let remote = driver::resolve(&p.remote).map_err(|e| err(format!("paths[{i}].remote"), e.to_string()))?;
            let bind = match &p.bind {
                None => None,
                Some(b) => Some(match b.parse::<SocketAddr>() {
                    Ok(a) => a,
                    Err(_) => SocketAddr::new(
                        b.parse()
                            .map_err(|_| err(format!("paths[{i}].bind"), format!("`{b}` is not ip or ip:port")))?,
                        0,
                    ),
                }),
            };
            paths.push(PathSpec {
                name: p.name.clone().unwrap_or_else(|| p.remote.clone()),
                remote,
                bind,
                interface: p.interface.clone(),
            });
        }
        let redundancy = c.redundancy_settings().to_config().map_err(|(field, message)| err(field.into(), message))?;
        Ok(Self {
            listen: c.listen.parse().map_err(|_| err("listen".into(), format!("`{}` is not ip:port", c.listen)))?,
            redundancy,
            cipher: c.cipher,
            target: c.target.clone(),
            paths,
            session_idle_timeout: Duration::from_secs(c.session_idle_timeout_secs),
            max_sessions: c.max_sessions,
            control: c.control_socket.clone().unwrap_or_else(|| instance_control_path(file)),
            metrics: c.metrics_listen,
            stats_interval: (c.stats_interval_secs > 0).then(|| Duration::from_secs(c.stats_interval_secs)),
        })
    }

    /// From an mptunnel bridges file's entries.
    pub fn from_bridges(
        file: &str,
        bridges: &[common::config::Bridge],
        listen: SocketAddr,
    ) -> Result<Self, ConfigError> {
        let mut paths = Vec::new();
        for b in bridges {
            let hp = format!("{}:{}", b.host, b.port);
            let remote = driver::resolve(&hp)
                .map_err(|e| ConfigError { line: Some(b.line), ..ConfigError::field(file, "", e.to_string()) })?;
            paths.push(PathSpec { name: hp, remote, bind: None, interface: None });
        }
        Ok(Self {
            listen,
            cipher: Cipher::Aes256Gcm,
            target: String::new(),
            paths,
            session_idle_timeout: common::client::DEFAULT_SESSION_IDLE_TIMEOUT,
            max_sessions: common::client::DEFAULT_MAX_SESSIONS,
            redundancy: RedundancySettings::default().to_config().expect("the defaults are valid"),
            control: instance_control_path(file),
            metrics: None,
            stats_interval: Some(Duration::from_secs(DEFAULT_STATS_INTERVAL_SECS)),
        })
    }
}

/// The default control socket of the mpclient configured by `file` (YAML or bridges):
/// `/run/mptunnel/mpclient-<file name>.sock`.
fn instance_control_path(file: &str) -> std::path::PathBuf {
    control::config_control_path("mpclient", std::path::Path::new(file))
}

fn path_socket(p: &PathSpec, bind: SocketAddr) -> std::io::Result<BatchSocket> {
    driver::udp_socket(bind, p.interface.as_deref(), Some(p.remote))
}

/// A path silent this long gets a fresh socket (its source address may be gone); the
/// wait doubles while the silence lasts, up to `PATH_REOPEN_MAX`.
pub const PATH_REOPEN_SILENT: Duration = Duration::from_secs(3);
pub const PATH_REOPEN_MAX: Duration = Duration::from_secs(60);
/// A path's socket is re-opened at most this often.
const PATH_REOPEN_MIN_INTERVAL: Duration = Duration::from_millis(500);

/// Send errors that mean the socket itself is stale (its source address or interface is
/// gone, or its route changed), not that one datagram or the remote failed.
fn socket_is_stale(errno: i32) -> bool {
    matches!(errno, libc::EINVAL | libc::EADDRNOTAVAIL | libc::ENETUNREACH | libc::ENODEV | libc::ENXIO)
}

/// Whether a fresh socket for `spec` would send from another address than `sock` does
/// (its address went away, or the route to the remote changed). False when no fresh
/// socket can be opened now: then the old one is as good as any.
fn source_moved(link: &PathLink) -> bool {
    let Ok(current) = link.sock.local_addr() else { return true };
    path_socket(&link.spec, link.bind_now())
        .and_then(|probe| probe.local_addr())
        .is_ok_and(|fresh| fresh.ip() != current.ip())
}

/// One path: what it is, its socket, and what decides when the socket is re-opened.
struct PathLink {
    spec: PathSpec,
    /// The interface a `bind:` path follows to its new address when the host is
    /// renumbered (`interface:`, else the one that held the address at start).
    bind_interface: Option<String>,
    sock: BatchSocket,
    opened: Instant,
    last_rx: Instant,
    /// Silence that makes us re-open now.
    reopen_after: Duration,
}

impl PathLink {
    fn open(spec: PathSpec, registry: &Registry, token: Token, now: Instant) -> std::io::Result<Self> {
        let bind_interface = spec.bind.and_then(|b| spec.interface.clone().or_else(|| driver::interface_of(b.ip())));
        let bind = spec.bind.unwrap_or_else(|| driver::any_addr_for(spec.remote));
        let mut sock = path_socket(&spec, bind)?;
        registry.register(&mut sock, token, Interest::READABLE)?;
        Ok(Self { spec, bind_interface, sock, opened: now, last_rx: now, reopen_after: PATH_REOPEN_SILENT })
    }

    /// Where the path's socket binds now: its `bind:` address, or what its interface
    /// holds instead once that address is gone.
    fn bind_now(&self) -> SocketAddr {
        match (self.spec.bind, &self.bind_interface) {
            (Some(b), Some(dev)) => driver::follow_interface(b, dev),
            (Some(b), None) => b,
            (None, _) => driver::any_addr_for(self.spec.remote),
        }
    }

    /// A fresh socket in place of this one; on failure the old one stays (registered
    /// again) and is tried later.
    fn reopen(&mut self, registry: &Registry, token: Token, now: Instant) -> std::io::Result<()> {
        let _ = registry.deregister(&mut self.sock);
        let fresh = path_socket(&self.spec, self.bind_now()).and_then(|mut s| {
            registry.register(&mut s, token, Interest::READABLE)?;
            Ok(s)
        });
        // a path that stays silent is tried less and less often
        let silent = now >= self.silent_until();
        self.opened = now;
        match fresh {
            Ok(sock) => {
                self.sock = sock;
                self.reopen_after =
                    if silent { (self.reopen_after * 2).min(PATH_REOPEN_MAX) } else { PATH_REOPEN_SILENT };
                Ok(())
            }
            Err(e) => {
                let _ = registry.register(&mut self.sock, token, Interest::READABLE);
                Err(e)
            }
        }
    }

    fn silent_until(&self) -> Instant {
        self.last_rx.max(self.opened) + self.reopen_after
    }
}

/// The client's half of the tunnel without its application socket: the core and one
/// socket per path. `mpclient` puts a UDP socket for local applications in front of it;
/// `mpvpn peer` in embedded mode feeds it VPN datagrams directly.
///
/// A path's socket is re-opened (a new source port and address, the same remote) when
/// its sends fail because the socket is stale, when the host's addresses or routes change
/// (netlink), and when it stays silent: a client whose addresses are renumbered keeps
/// going, and the server learns the new path from its first authenticated datagram.
pub struct Multipath {
    pub core: Client,
    paths: Vec<PathLink>,
    /// The host's address and route changes; token `token_base + paths.len()`.
    watch: Option<AddressWatch>,
    token_base: usize,
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
    ) -> Result<Self, DriverError> {
        let core_cfg = ClientCoreConfig {
            cipher: rt.cipher,
            target: rt.target.clone(),
            path_names: rt.paths.iter().map(|p| p.name.clone()).collect(),
            session_idle_timeout: rt.session_idle_timeout,
            max_sessions: rt.max_sessions,
            redundancy: rt.redundancy,
        };
        let now = Instant::now();
        let mut paths = Vec::new();
        for (i, p) in rt.paths.iter().enumerate() {
            let link = PathLink::open(p.clone(), registry, Token(token_base + i), now)
                .context(|| format!("path {i} ({})", p.name))?;
            info!(log, "path"; "name" => &p.name, "remote" => %p.remote, "bind" => ?p.bind, "interface" => ?p.interface);
            paths.push(link);
        }
        // best effort: without it, stale sockets are still found by their send errors
        let watch = AddressWatch::open().and_then(|mut w| {
            registry.register(&mut w, Token(token_base + paths.len()), Interest::READABLE)?;
            Ok(w)
        });
        let watch = watch.map_err(|e| warn!(log, "no address change notifications"; "error" => %e)).ok();
        Ok(Self {
            core: Client::new(psk, core_cfg, now, driver::wall_ms(), Box::new(OsEntropy::new())),
            paths,
            watch,
            token_base,
            buf: vec![0; MAX_DATAGRAM],
            log,
            send_errors: 0,
        })
    }

    /// The remote end of every path.
    pub fn remotes(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.paths.iter().map(|p| p.spec.remote)
    }

    /// Whether `token` is one of this tunnel's (a path or the address watch).
    pub fn owns(&self, token: Token) -> bool {
        token.0.checked_sub(self.token_base).is_some_and(|i| i <= self.paths.len())
    }

    /// Serves one of this tunnel's ready tokens: reads a path (delivering payloads as
    /// `read_path`), or takes address changes (re-opening every path socket). True if a
    /// read budget ran out first.
    pub fn handle_ready(
        &mut self,
        registry: &Registry,
        token: Token,
        rx: &mut RecvBatch,
        deliver: impl FnMut(SocketAddr, &[u8]),
    ) -> bool {
        match token.0.checked_sub(self.token_base) {
            Some(i) if i < self.paths.len() => self.read_path(i, rx, deliver),
            Some(i) if i == self.paths.len() => {
                if self.watch.as_ref().is_some_and(AddressWatch::changed) {
                    // only paths a fresh socket would send from another address: most
                    // changes (an IPv6 link-local address appearing) concern none
                    let moved = self.reopen_paths(registry, Instant::now(), source_moved);
                    if moved > 0 {
                        info!(self.log, "addresses or routes changed; new path sockets"; "paths" => moved);
                    }
                }
                false
            }
            _ => false,
        }
    }

    /// Re-opens the sockets of the paths `due` picks (and may re-open now); returns how
    /// many it re-opened.
    fn reopen_paths(&mut self, registry: &Registry, now: Instant, mut due: impl FnMut(&PathLink) -> bool) -> usize {
        let mut reopened = 0;
        for (i, link) in self.paths.iter_mut().enumerate() {
            if now.saturating_duration_since(link.opened) < PATH_REOPEN_MIN_INTERVAL || !due(link) {
                continue;
            }
            match link.reopen(registry, Token(self.token_base + i), now) {
                Ok(()) => {
                    debug!(self.log, "path socket re-opened"; "path" => &link.spec.name);
                    reopened += 1;
                }
                Err(e) => debug!(self.log, "cannot re-open path socket"; "path" => &link.spec.name, "error" => %e),
            }
        }
        reopened
    }

    /// Re-opens path sockets whose sends failed as stale or that stayed silent.
    fn maintain_paths(&mut self, registry: &Registry, now: Instant) {
        self.reopen_paths(registry, now, |link| {
            link.sock.take_send_error().is_some_and(socket_is_stale) || now >= link.silent_until()
        });
    }

    /// Seals in place the application datagrams of `batch` (received with
    /// `recv_leaving(fd, DATA_PAYLOAD_OFFSET, DATA_TAIL_ROOM)`, or pushed with that room by
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
        for (p, link) in self.paths.iter().enumerate() {
            let mut k = 0;
            for (i, mask) in masks.iter().enumerate().take(batch.len()) {
                if mask.contains(p) {
                    which[k] = i;
                    k += 1;
                }
            }
            if k > 0 {
                let sent = link.sock.send_batch(batch, &which[..k], None, None);
                if sent < k {
                    self.send_errors += (k - sent) as u64;
                    trace!(self.log, "path send failed"; "path" => p, "datagrams" => k - sent);
                }
            }
        }
        self.flush(now);
    }

    /// Reads datagrams arriving on path `i` (`recvmmsg`, into `rx`) and opens them in place, handing
    /// each delivered payload to `deliver(app, payload)`; true if the read budget ran out
    /// first.
    fn read_path(&mut self, i: usize, rx: &mut RecvBatch, mut deliver: impl FnMut(SocketAddr, &[u8])) -> bool {
        let fd = self.paths[i].sock.as_raw_fd();
        let log = self.log.clone();
        read_batches(fd, rx, NO_ROOM, &log, "path", |rx, now| {
            let link = &mut self.paths[i];
            link.last_rx = now;
            link.reopen_after = PATH_REOPEN_SILENT;
            for k in 0..rx.len() {
                let d = rx.datagram_mut(k);
                match self.core.handle_path_datagram(now, i, d) {
                    ClientRecv::Deliver { app, payload } => deliver(app, &d[payload]),
                    ClientRecv::Consumed => {}
                    ClientRecv::Dropped(reason) => trace!(self.log, "dropped"; "path" => i, "reason" => ?reason),
                }
                // datagrams parity rebuilt are due now, as the one that arrived
                while let Some((app, n)) = self.core.poll_recovered(now, &mut self.buf) {
                    deliver(app, &self.buf[..n]);
                }
            }
            self.flush(now);
        })
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let reopen = self.paths.iter().map(PathLink::silent_until).min();
        [self.core.poll_timeout(), reopen].into_iter().flatten().min()
    }

    pub fn handle_timeout(&mut self, registry: &Registry, now: Instant) {
        self.core.handle_timeout(now);
        self.flush(now);
        self.maintain_paths(registry, now);
    }

    /// Sends what the core queued (handshakes, probes, datagrams held during a handshake)
    /// and logs its events.
    fn flush(&mut self, now: Instant) {
        while let Some(t) = self.core.poll_transmit(now, &mut self.buf) {
            for p in t.paths.iter() {
                if let Err(e) = self.paths[p].sock.send(&self.buf[..t.len]) {
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
                ClientEvent::SessionEvicted { app, id } => {
                    debug!(self.log, "session table full: longest-idle session closed"; "app" => %app, "session" => %id)
                }
                ClientEvent::SessionClosed { app, id } => {
                    info!(self.log, "session idle, closed"; "app" => %app, "session" => %id)
                }
                ClientEvent::RedundancyUnsupported { app, id } => warn!(self.log,
                    "the server answered only the plain handshake (an mpserver older than redundancy modes?): \
                     this session duplicates; upgrade the server for fec or adaptive";
                    "app" => %app, "session" => %id),
            }
        }
    }
}

/// Sends `batch` to the applications and empties it. A full socket buffer or a vanished
/// application loses the datagram, as UDP may.
fn send_to_apps(app: &BatchSocket, batch: &mut RecvBatch) {
    app.send_to_sources(batch);
    batch.clear();
}

/// `mpclient` as the event loop runs it: the application socket in front of `Multipath`.
struct Driver {
    mp: Multipath,
    app: BatchSocket,
    app_batch: RecvBatch,
    /// Datagrams read from a path.
    path_rx: RecvBatch,
    /// Payloads delivered from the paths, sent to their applications a batch at a time.
    to_apps: RecvBatch,
    listen_name: String,
    log: Logger,
}

/// Runs the client until SIGTERM/SIGINT or a fatal error.
pub fn run(rt: ClientRuntime, psk: Psk, log: &Logger) -> Result<(), DriverError> {
    let mut el = EventLoop::new(log.clone())?;
    el.serve_control(&rt.control)?;
    el.serve_metrics(rt.metrics)?;
    el.log_stats_every(rt.stats_interval);
    let listen = || format!("listen {}", rt.listen);
    let mut app = driver::udp_socket(rt.listen, None, None).context(listen)?;
    el.registry().register(&mut app, APP, Interest::READABLE).context(listen)?;
    info!(log, "mpclient listening"; "listen" => %rt.listen, "paths" => rt.paths.len(), "cipher" => rt.cipher.name(), "control" => %rt.control.display());
    let mp = Multipath::open(&rt, psk, el.registry(), PATH_TOKEN_BASE, log.clone())?;
    let mut d = Driver {
        mp,
        app,
        app_batch: RecvBatch::new(),
        path_rx: RecvBatch::new(),
        to_apps: RecvBatch::new(),
        listen_name: rt.listen.to_string(),
        log: log.clone(),
    };
    el.run(&mut d)
}

impl Service for Driver {
    type Status = StatusReport;
    type Error = DriverError;

    fn handle_ready(&mut self, registry: &Registry, token: Token) -> Result<bool, DriverError> {
        Ok(match token {
            APP => self.read_app(),
            t => self.read_paths(registry, t),
        })
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.mp.poll_timeout()
    }

    fn handle_timeout(&mut self, registry: &Registry, now: Instant) -> Result<(), DriverError> {
        self.mp.handle_timeout(registry, now);
        Ok(())
    }

    fn status(&self, now: Instant) -> StatusReport {
        let mut report = self.mp.core.status(now, &self.listen_name);
        report.remotes = self.mp.remotes().map(|a| a.to_string()).collect();
        report
    }

    fn stats_line(&self, now: Instant) -> String {
        format!("{} send_errors={}", self.status(now).summary_line(), self.mp.send_errors)
    }

    fn metrics(&self, now: Instant, m: &mut Metrics) {
        common::driver::metrics::tunnel_metrics(&self.status(now), m);
    }
}

impl Driver {
    /// Serves a ready path (or address-change) token and sends the delivered payloads to
    /// their applications, a batch at a time; true if the budget ran out first.
    fn read_paths(&mut self, registry: &Registry, token: Token) -> bool {
        let (app, to_apps) = (&self.app, &mut self.to_apps);
        let pending = self.mp.handle_ready(registry, token, &mut self.path_rx, |to, payload| {
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
    fn read_app(&mut self) -> bool {
        let (mp, fd) = (&mut self.mp, self.app.as_raw_fd());
        read_batches(fd, &mut self.app_batch, SEALING_ROOM, &self.log, "applications", |batch, now| {
            mp.send_batch(now, batch)
        })
    }
}
