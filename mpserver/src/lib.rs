//! The mpserver driver: a mio loop around `common::server::Server`.
//!
//! One listening socket for all clients and paths; one upstream socket per session,
//! connected to that session's target, so the target sees one address per client.
//! The loop only moves bytes and time; every decision is the core's.

pub mod cli;

use common::config::{ConfigError, ServerConfig, DEFAULT_STATS_INTERVAL_SECS};
use common::crypto::{Cipher, Psk};
use common::driver::batch::{self, BatchSocket, RecvBatch, BATCH};
use common::driver::event_loop::{read_batches, EventLoop, Room, Service, NO_ROOM};
use common::driver::metrics::Metrics;
use common::driver::{self, control, DriverError, IoContext, RateLimitedLog, SlotSockets};
use common::entropy::OsEntropy;
use common::server::{Server, ServerCoreConfig, ServerEvent, ServerRecv, SessionSlot};
use common::stats::StatusReport;
use common::wire::HandshakeStatus;
use common::wire::{DATA_PAYLOAD_OFFSET, DATA_TAIL_ROOM, HANDSHAKE_RESP_LEN, MAX_DATAGRAM};
use common::PathMask;
use mio::{Interest, Registry, Token};
use slog::{debug, info, trace, warn, Logger};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const LISTEN: Token = Token(0);
const UPSTREAM_TOKEN_BASE: usize = 1;
/// Refused handshakes are logged at most this often.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Target replies are read with room to seal them in place.
const SEALING_ROOM: Room = (DATA_PAYLOAD_OFFSET, DATA_TAIL_ROOM);

#[derive(Debug, Clone)]
pub struct ServerRuntime {
    pub listen: SocketAddr,
    pub core: ServerCoreConfig,
    pub control: PathBuf,
    /// Where `GET /metrics` is served (`metrics_listen`), if anywhere.
    pub metrics: Option<SocketAddr>,
    pub stats_interval: Option<Duration>,
}

impl ServerRuntime {
    /// mptunnel's form: `mpserver <listen-port> <target-host> <target-port>`.
    pub fn from_args(listen_port: u16, target_host: &str, target_port: u16) -> Result<Self, DriverError> {
        let target = driver::resolve(&format!("{target_host}:{target_port}"))?;
        Ok(Self {
            listen: SocketAddr::from(([0, 0, 0, 0], listen_port)),
            core: ServerCoreConfig {
                default_target: Some(target),
                targets: HashMap::new(),
                ciphers: vec![Cipher::Aes256Gcm, Cipher::ChaCha20Poly1305],
                max_sessions: common::server::DEFAULT_MAX_SESSIONS,
                max_paths_per_session: common::server::DEFAULT_MAX_PATHS_PER_SESSION,
                session_timeout: common::server::DEFAULT_SESSION_TIMEOUT,
            },
            control: control::default_control_path("mpserver"),
            metrics: None,
            stats_interval: Some(Duration::from_secs(DEFAULT_STATS_INTERVAL_SECS)),
        })
    }

    pub fn from_config(file: &str, c: &ServerConfig) -> Result<Self, ConfigError> {
        let err = |field: String, message: String| ConfigError::field(file, field, message);
        let default_target = match &c.target {
            Some(t) => Some(driver::resolve(t).map_err(|e| err("target".into(), e.to_string()))?),
            None => None,
        };
        let mut targets = HashMap::new();
        for (name, t) in &c.targets {
            let addr = driver::resolve(t).map_err(|e| err(format!("targets.{name}"), e.to_string()))?;
            targets.insert(name.clone(), addr);
        }
        Ok(Self {
            listen: c.listen.parse().map_err(|_| err("listen".into(), format!("`{}` is not ip:port", c.listen)))?,
            core: ServerCoreConfig {
                default_target,
                targets,
                ciphers: c.ciphers.clone(),
                max_sessions: c.max_sessions,
                max_paths_per_session: c.max_paths_per_session,
                session_timeout: Duration::from_secs(c.session_timeout_secs),
            },
            control: c
                .control_socket
                .clone()
                .unwrap_or_else(|| control::config_control_path("mpserver", std::path::Path::new(file))),
            metrics: c.metrics_listen,
            stats_interval: (c.stats_interval_secs > 0).then(|| Duration::from_secs(c.stats_interval_secs)),
        })
    }
}

/// What the tunnel hands its front end: core events and datagrams for targets. The front
/// end answers `false` to a `SessionOpened` it cannot serve (the client is refused).
pub enum Inbound<'a> {
    Event(&'a ServerEvent),
    Forward(SessionSlot, &'a [u8]),
}

/// The server's half of the tunnel without the targets: the core and the listening
/// socket. `mpserver` puts one upstream socket per session behind it; `mpvpn hub` in
/// embedded mode hands sessions' datagrams to the hub directly.
pub struct TunnelServer {
    pub core: Server,
    listen: BatchSocket,
    rb: RecvBatch,
    reply: [u8; HANDSHAKE_RESP_LEN],
    /// Parity shards, receipts and datagrams rebuilt from parity pass through here.
    scratch: Vec<u8>,
    /// Refused handshakes are logged at most every `REFUSAL_LOG_INTERVAL`.
    refusals: RateLimitedLog,
    log: Logger,
    pub send_errors: u64,
}

impl TunnelServer {
    pub fn open(
        listen_addr: SocketAddr,
        core: ServerCoreConfig,
        psk: Psk,
        registry: &Registry,
        token: Token,
        log: Logger,
    ) -> Result<Self, DriverError> {
        let what = || format!("listen {listen_addr}");
        let mut listen = driver::udp_socket(listen_addr, None, None).context(what)?;
        registry.register(&mut listen, token, Interest::READABLE).context(what)?;
        if listen_addr.ip().is_unspecified() {
            // on a host with several addresses, answer each client from the one it used
            batch::receive_local_addresses(listen.as_raw_fd(), listen_addr.is_ipv6())
                .context(|| format!("listen {listen_addr}: packet info"))?;
        }
        Ok(Self {
            core: Server::new(psk, core, Instant::now(), driver::wall_ms(), Box::new(OsEntropy::new())),
            listen,
            rb: RecvBatch::new(),
            reply: [0; HANDSHAKE_RESP_LEN],
            scratch: vec![0; MAX_DATAGRAM],
            refusals: RateLimitedLog::new(REFUSAL_LOG_INTERVAL),
            log,
            send_errors: 0,
        })
    }

    /// Reads client datagrams. Core events reach `out` first (a new session's resources
    /// exist before anything is forwarded to it), then each datagram for a target. True
    /// if the read budget ran out first.
    pub fn read_listen(&mut self, mut out: impl FnMut(Inbound) -> bool) -> bool {
        // recvmmsg: with N paths most datagrams are copies that die at the replay
        // window, so reading them in batches saves most of the server's system calls
        let (fd, log) = (self.listen.as_raw_fd(), self.log.clone());
        read_batches(fd, &mut self.rb, NO_ROOM, &log, "clients", |rb, now| {
            for i in 0..rb.len() {
                let Some(from) = rb.source(i) else { continue };
                let local = rb.local(i);
                let r = self.core.handle_datagram_to(now, from, local, rb.datagram_mut(i), &mut self.reply);
                let unserved = Self::drain_events(&mut self.core, &self.log, &mut self.refusals, &mut out);
                match r {
                    ServerRecv::Forward { slot, payload } => {
                        out(Inbound::Forward(slot, &rb.datagram(i)[payload]));
                    }
                    ServerRecv::Consumed => {}
                    ServerRecv::Reply { len } => {
                        if let Some(slot) = unserved {
                            // a clear refusal instead of a session that drops everything
                            warn!(self.log, "refusing a session: no upstream socket for it"; "from" => %from);
                            self.core.refuse_opened(slot, HandshakeStatus::TargetUnavailable, &mut self.reply);
                            Self::drain_events(&mut self.core, &self.log, &mut self.refusals, &mut out);
                        }
                        if let Err(e) = self.listen.send_one(&self.reply[..len], from, local) {
                            self.send_errors += 1;
                            trace!(self.log, "reply failed"; "to" => %from, "error" => %e);
                        }
                    }
                    ServerRecv::Dropped(reason) => trace!(self.log, "dropped"; "from" => %from, "reason" => ?reason),
                }
                // datagrams parity rebuilt are due now, as the one that arrived
                while let Some((slot, n)) = self.core.poll_recovered(&mut self.scratch) {
                    out(Inbound::Forward(slot, &self.scratch[..n]));
                }
            }
        })
    }

    /// Sends what the core has ready besides sealed data: parity shards and receipts.
    fn flush(&mut self, now: Instant) {
        while let Some((slot, len, paths)) = self.core.poll_transmit(now, &mut self.scratch) {
            for p in paths.iter() {
                let Some(to) = self.core.path_addr(slot, p) else { continue };
                if let Err(e) = self.listen.send_one(&self.scratch[..len], to, self.core.path_local(slot, p)) {
                    self.send_errors += 1;
                    trace!(self.log, "send to client failed"; "to" => %to, "error" => %e);
                }
            }
        }
    }

    /// Seals in place the datagrams of `batch` (received with `recv_leaving(fd,
    /// DATA_PAYLOAD_OFFSET, DATA_TAIL_ROOM)`, or pushed with that room), each for the
    /// session `slot_of` names, and sends the copies: one `sendmmsg` (GSO where it can) per
    /// run of copies to one client address, so one per path per batch when a batch is
    /// one session's.
    pub fn send_batch(
        &mut self,
        now: Instant,
        batch: &mut RecvBatch,
        slot_of: impl Fn(&RecvBatch, usize) -> Option<SessionSlot>,
    ) {
        let mut sealed = [None::<(SessionSlot, PathMask)>; BATCH];
        let mut all_paths = PathMask::EMPTY;
        for (i, sealed) in sealed.iter_mut().enumerate().take(batch.len()) {
            let Some(slot) = slot_of(batch, i) else { continue };
            let n = batch.datagram(i).len();
            if let Some((len, paths)) = self.core.encapsulate(now, slot, batch.slot_mut(i), n) {
                batch.set_datagram(i, 0, len);
                *sealed = Some((slot, paths));
                for p in paths.iter() {
                    all_paths.insert(p);
                }
            }
        }
        // path by path, so the copies of one session's datagrams to one address are a run
        let mut which = [0usize; BATCH];
        for p in all_paths.iter() {
            let (mut k, mut hop) = (0, None);
            for (i, sealed) in sealed.iter().enumerate().take(batch.len()) {
                let Some((slot, paths)) = *sealed else { continue };
                let Some(addr) = paths.contains(p).then(|| self.core.path_addr(slot, p)).flatten() else { continue };
                let this = Some((addr, self.core.path_local(slot, p)));
                if k > 0 && hop != this {
                    self.send_run(batch, &which[..k], hop);
                    k = 0;
                }
                hop = this;
                which[k] = i;
                k += 1;
            }
            if k > 0 {
                self.send_run(batch, &which[..k], hop);
            }
        }
        self.flush(now);
    }

    /// Sends a run of datagrams to one client address, from the local address it used.
    fn send_run(&mut self, batch: &RecvBatch, which: &[usize], hop: Option<(SocketAddr, Option<IpAddr>)>) {
        let (to, from) = (hop.map(|h| h.0), hop.and_then(|h| h.1));
        let sent = self.listen.send_batch(batch, which, to, from);
        if sent < which.len() {
            self.send_errors += (which.len() - sent) as u64;
            trace!(self.log, "send to client failed"; "to" => ?to, "datagrams" => which.len() - sent);
        }
    }

    pub fn poll_timeout(&self) -> Instant {
        self.core.poll_timeout()
    }

    pub fn handle_timeout(&mut self, now: Instant, mut out: impl FnMut(Inbound) -> bool) {
        self.core.handle_timeout(now);
        self.flush(now);
        Self::drain_events(&mut self.core, &self.log, &mut self.refusals, &mut out);
    }

    /// Hands the core's events to `out`; returns a session `out` could not serve.
    fn drain_events(
        core: &mut Server,
        log: &Logger,
        refusals: &mut RateLimitedLog,
        out: &mut impl FnMut(Inbound) -> bool,
    ) -> Option<SessionSlot> {
        let mut unserved = None;
        while let Some(ev) = core.poll_event() {
            if !out(Inbound::Event(&ev)) {
                if let ServerEvent::SessionOpened { slot, .. } = ev {
                    unserved = Some(slot);
                }
            }
            match ev {
                ServerEvent::SessionOpened { id, target, cipher, .. } => {
                    info!(log, "session opened"; "session" => %id, "target" => %target, "cipher" => cipher.name())
                }
                ServerEvent::SessionClosed { id, .. } => info!(log, "session closed"; "session" => %id),
                ServerEvent::PathAdded { slot, addr } => {
                    debug!(log, "path learned"; "slot" => slot, "addr" => %addr)
                }
                ServerEvent::PathValidated { slot, addr } => {
                    info!(log, "path validated"; "slot" => slot, "addr" => %addr)
                }
                ServerEvent::PathRemoved { slot, addr } => {
                    info!(log, "path expired"; "slot" => slot, "addr" => %addr)
                }
                ServerEvent::Refused { from, status } => {
                    // replayed or flooded inits are refused by the thousand: one line per while
                    if let Some(left_out) = refusals.allow(Instant::now()) {
                        warn!(log, "handshake refused"; "from" => %from, "status" => ?status, "similar_left_out" => left_out)
                    }
                }
            }
        }
        unserved
    }
}

/// One socket per session towards its target, indexed by session slot.
struct Upstreams {
    socks: SlotSockets,
    log: Logger,
}

impl Upstreams {
    /// False for a session whose upstream socket could not be opened.
    fn handle(&mut self, registry: &Registry, inbound: Inbound) -> bool {
        match inbound {
            Inbound::Event(ev) => self.on_event(registry, ev),
            Inbound::Forward(slot, payload) => {
                self.forward(slot, payload);
                true
            }
        }
    }

    fn on_event(&mut self, registry: &Registry, ev: &ServerEvent) -> bool {
        match *ev {
            ServerEvent::SessionOpened { slot, id, target, .. } => match self.socks.open(registry, slot, target) {
                Ok(()) => true,
                Err(e) => {
                    warn!(self.log, "cannot open upstream socket"; "session" => %id, "target" => %target, "error" => %e);
                    false
                }
            },
            ServerEvent::SessionClosed { slot, .. } => {
                self.socks.close(registry, slot);
                true
            }
            _ => true,
        }
    }

    fn forward(&self, slot: SessionSlot, payload: &[u8]) {
        if let Some(sock) = self.socks.get(slot) {
            // a target that is down: the datagram is lost, as UDP may
            let _ = sock.send(payload);
        }
    }
}

/// `mpserver` as the event loop runs it: the tunnel server and one upstream socket per
/// session.
struct Driver {
    server: TunnelServer,
    upstreams: Upstreams,
    /// Target replies read from an upstream socket.
    upstream_rx: RecvBatch,
    listen_name: String,
}

/// Runs the server until SIGTERM/SIGINT or a fatal error.
pub fn run(rt: ServerRuntime, psk: Psk, log: &Logger) -> Result<(), DriverError> {
    let mut el = EventLoop::new(log.clone())?;
    el.serve_control(&rt.control)?;
    el.serve_metrics(rt.metrics)?;
    el.log_stats_every(rt.stats_interval);
    info!(log, "mpserver listening"; "listen" => %rt.listen, "default_target" => ?rt.core.default_target,
        "named_targets" => rt.core.targets.len(), "control" => %rt.control.display());
    let server = TunnelServer::open(rt.listen, rt.core, psk, el.registry(), LISTEN, log.clone())?;
    let mut d = Driver {
        server,
        upstreams: Upstreams { socks: SlotSockets::new(UPSTREAM_TOKEN_BASE), log: log.clone() },
        upstream_rx: RecvBatch::new(),
        listen_name: rt.listen.to_string(),
    };
    el.run(&mut d)
}

impl Service for Driver {
    type Status = StatusReport;
    type Error = DriverError;

    fn handle_ready(&mut self, registry: &Registry, token: Token) -> Result<bool, DriverError> {
        let upstreams = &mut self.upstreams;
        Ok(match token {
            LISTEN => self.server.read_listen(|inbound| upstreams.handle(registry, inbound)),
            t => self.upstreams.socks.slot_of(t).is_some_and(|slot| self.read_upstream(slot)),
        })
    }

    fn poll_timeout(&self) -> Option<Instant> {
        Some(self.server.poll_timeout())
    }

    fn handle_timeout(&mut self, registry: &Registry, now: Instant) -> Result<(), DriverError> {
        let upstreams = &mut self.upstreams;
        self.server.handle_timeout(now, |inbound| upstreams.handle(registry, inbound));
        Ok(())
    }

    fn status(&self, now: Instant) -> StatusReport {
        self.server.core.status(now, &self.listen_name)
    }

    fn stats_line(&self, now: Instant) -> String {
        format!("{} send_errors={}", self.status(now).summary_line(), self.server.send_errors)
    }

    fn metrics(&self, now: Instant, m: &mut Metrics) {
        common::driver::metrics::tunnel_metrics(&self.status(now), m);
    }
}

impl Driver {
    /// Reads a session's target replies and sends them back to the client, a batch at a
    /// time; true if the read budget ran out first.
    fn read_upstream(&mut self, slot: SessionSlot) -> bool {
        let Some(sock) = self.upstreams.socks.get(slot) else {
            return false;
        };
        let server = &mut self.server;
        let log = &self.upstreams.log;
        read_batches(sock.as_raw_fd(), &mut self.upstream_rx, SEALING_ROOM, log, "target", |rx, now| {
            server.send_batch(now, rx, |_, _| Some(slot))
        })
    }
}
