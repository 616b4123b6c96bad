//! The one event loop every daemon runs: mpclient, mpserver, mpbridge, mpvpn hub and peer.
//!
//! A daemon is a `Service`: its sockets, registered with tokens below `RESERVED_TOKENS`,
//! and its cores. The loop owns the rest: waiting on mio with the cores' deadline, the
//! read budget (a source that stopped at its budget is served again without waiting,
//! after the others), the periodic stats line, the control socket (served without ever
//! blocking: see `control`), and SIGTERM/SIGINT, which end `run` with `Ok` after a final
//! stats line; dropping the loop removes the control socket file.
//!
//! mio is edge-triggered: a source must be read until `WouldBlock` or kept pending.

use super::batch::{RecvBatch, BATCH};
use super::control::ControlServer;
use super::metrics::{Metrics, MetricsServer};
use super::{is_transient, DriverError, IoContext};
use mio::{Events, Interest, Poll, Registry, Token};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slog::{info, warn, Logger};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::path::Path;
use std::time::{Duration, Instant};

/// Datagrams (or TUN packets) read from one source per wake-up before the others get a
/// turn.
pub const READ_BUDGET: usize = 256;
/// mio events taken per wait.
const EVENT_CAPACITY: usize = 1024;

/// Tokens from here up are the loop's own (signals, the control socket and its
/// connections); a service's tokens are below.
pub const RESERVED_TOKENS: usize = usize::MAX - 64;
/// mio keeps `usize::MAX` for itself.
const SIGNAL: Token = Token(usize::MAX - 1);
pub(super) const CONTROL_LISTENER: Token = Token(usize::MAX - 2);
/// Control connection `i` has token `CONTROL_CONNECTION_BASE - i`.
pub(super) const CONTROL_CONNECTION_BASE: usize = usize::MAX - 3;
pub(super) const METRICS_LISTENER: Token = Token(usize::MAX - 3 - super::control::MAX_CONTROL_CONNECTIONS);
/// Metrics connection `i` has token `METRICS_CONNECTION_BASE - i`.
pub(super) const METRICS_CONNECTION_BASE: usize = METRICS_LISTENER.0 - 1;
const _: () = assert!(METRICS_CONNECTION_BASE - super::metrics::MAX_METRICS_CONNECTIONS >= RESERVED_TOKENS);

/// A daemon's sockets and cores, as the loop drives them.
pub trait Service {
    /// What the control socket answers (as JSON).
    type Status: serde::Serialize;
    type Error: From<DriverError>;

    /// Serves the ready source `token`. True if it stopped at its read budget with data
    /// left (it is served again without waiting).
    fn handle_ready(&mut self, registry: &Registry, token: Token) -> Result<bool, Self::Error>;

    /// The earliest deadline of the cores.
    fn poll_timeout(&self) -> Option<Instant>;

    /// Runs the cores' timers; called after every wake-up.
    fn handle_timeout(&mut self, registry: &Registry, now: Instant) -> Result<(), Self::Error>;

    fn status(&self, now: Instant) -> Self::Status;

    /// One line for the periodic and the final stats log entry.
    fn stats_line(&self, now: Instant) -> String;

    /// SIGHUP: re-read the configuration. One whose new config has an error keeps running
    /// as it was; the loop logs the outcome.
    fn reload(&mut self, _registry: &Registry, _now: Instant) -> Reload {
        Reload::Unsupported
    }

    /// What `GET /metrics` shows (see `metrics`).
    fn metrics(&self, now: Instant, m: &mut Metrics);
}

/// What a SIGHUP did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// This daemon re-reads nothing.
    Unsupported,
    /// The new config is in effect; what changed.
    Done(String),
    /// The new config was refused (why); the running one stays.
    Refused(String),
}

/// The loop: readiness, signals, the control socket, the stats tick.
pub struct EventLoop {
    io: Readiness,
    signals: Signals,
    control: Option<ControlServer>,
    metrics: Option<MetricsServer>,
    stats_interval: Option<Duration>,
    log: Logger,
}

impl EventLoop {
    /// Sets up polling and catches SIGTERM, SIGINT and SIGHUP from now on.
    pub fn new(log: Logger) -> Result<Self, DriverError> {
        let io = Readiness::new()?;
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP]).context(|| "signal handlers".into())?;
        io.poll.registry().register(&mut signals, SIGNAL, Interest::READABLE).context(|| "signal handlers".into())?;
        Ok(Self { io, signals, control: None, metrics: None, stats_interval: None, log })
    }

    /// Where the service registers its sockets (tokens below `RESERVED_TOKENS`).
    pub fn registry(&self) -> &Registry {
        self.io.poll.registry()
    }

    /// Answers `status` on the Unix socket `path` (fails if another live daemon does).
    pub fn serve_control(&mut self, path: &Path) -> Result<(), DriverError> {
        self.control = Some(ControlServer::bind(path, self.io.poll.registry())?);
        Ok(())
    }

    /// Serves `GET /metrics` on `addr` (the config's `metrics_listen`) from now on.
    pub fn serve_metrics(&mut self, addr: Option<SocketAddr>) -> Result<(), DriverError> {
        if let Some(addr) = addr {
            self.metrics = Some(MetricsServer::bind(addr, self.io.poll.registry())?);
            info!(self.log, "metrics"; "listen" => %addr, "path" => "/metrics");
        }
        Ok(())
    }

    /// Logs the service's stats line every `interval` (never with `None`).
    pub fn log_stats_every(&mut self, interval: Option<Duration>) {
        self.stats_interval = interval;
    }

    /// Runs `service` until SIGTERM/SIGINT (`Ok`) or a fatal error.
    pub fn run<S: Service>(mut self, service: &mut S) -> Result<(), S::Error> {
        let mut next_stats = self.stats_interval.map(|d| Instant::now() + d);
        // started by systemd (Type=notify): the sockets are open, the service is up
        if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
            warn!(self.log, "could not tell systemd we are ready"; "error" => %e);
        }
        loop {
            let control_due = self.control.as_ref().and_then(ControlServer::poll_timeout);
            let metrics_due = self.metrics.as_ref().and_then(MetricsServer::poll_timeout);
            let deadline = [service.poll_timeout(), next_stats, control_due, metrics_due].into_iter().flatten().min();
            self.io.wait(deadline)?;
            let (mut stop, mut reload) = (None, false);
            while let Some(token) = self.io.next_ready() {
                match token {
                    SIGNAL => {
                        for signal in self.signals.pending() {
                            if signal == SIGHUP {
                                reload = true;
                            } else {
                                stop = Some(signal);
                            }
                        }
                    }
                    Token(t)
                        if (METRICS_CONNECTION_BASE - super::metrics::MAX_METRICS_CONNECTIONS..=METRICS_LISTENER.0)
                            .contains(&t) =>
                    {
                        if let Some(m) = self.metrics.as_mut() {
                            let encode = || {
                                let mut all = Metrics::new();
                                service.metrics(Instant::now(), &mut all);
                                all.encode()
                            };
                            m.handle_ready(self.io.poll.registry(), token, encode, &self.log);
                        }
                    }
                    Token(t) if t >= RESERVED_TOKENS => {
                        if let Some(c) = self.control.as_mut() {
                            c.handle_ready(
                                self.io.poll.registry(),
                                token,
                                || service.status(Instant::now()),
                                &self.log,
                            );
                        }
                    }
                    _ => {
                        if service.handle_ready(self.io.poll.registry(), token)? {
                            self.io.still_pending(token);
                        }
                    }
                }
            }
            let now = Instant::now();
            if let Some(signal) = stop {
                let name = if signal == SIGTERM { "SIGTERM" } else { "SIGINT" };
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
                info!(self.log, "stopping"; "signal" => name, "stats" => service.stats_line(now));
                return Ok(());
            }
            if reload {
                match service.reload(self.io.poll.registry(), now) {
                    Reload::Unsupported => info!(self.log, "SIGHUP: this daemon has nothing to reload"),
                    Reload::Done(what) => info!(self.log, "reloaded"; "changes" => what),
                    Reload::Refused(why) => warn!(self.log, "reload refused; the running config stays"; "error" => why),
                }
            }
            service.handle_timeout(self.io.poll.registry(), now)?;
            if let Some(c) = self.control.as_mut() {
                c.expire(self.io.poll.registry(), now, &self.log);
            }
            if let Some(m) = self.metrics.as_mut() {
                m.expire(self.io.poll.registry(), now);
            }
            if let (Some(at), Some(every)) = (next_stats, self.stats_interval) {
                if now >= at {
                    info!(self.log, "stats"; "summary" => service.stats_line(now));
                    next_stats = Some(now + every);
                }
            }
        }
    }
}

/// The wait step: mio readiness plus the sources still pending from the last round.
struct Readiness {
    poll: Poll,
    events: Events,
    ready: VecDeque<Token>,
    backlog: Vec<Token>,
}

impl Readiness {
    fn new() -> Result<Self, DriverError> {
        Ok(Self {
            poll: Poll::new().context(|| "poll".into())?,
            events: Events::with_capacity(EVENT_CAPACITY),
            ready: VecDeque::new(),
            backlog: Vec::new(),
        })
    }

    /// Blocks until a source is ready or `deadline` passes (not at all while a source is
    /// pending); then `next_ready` yields each ready source once.
    fn wait(&mut self, deadline: Option<Instant>) -> Result<(), DriverError> {
        let timeout = if self.backlog.is_empty() {
            deadline.map(|d| d.saturating_duration_since(Instant::now()))
        } else {
            Some(Duration::ZERO)
        };
        match self.poll.poll(&mut self.events, timeout) {
            Err(e) if e.kind() != std::io::ErrorKind::Interrupted => {
                return Err(DriverError::Io { what: "poll".into(), source: e })
            }
            _ => {}
        }
        self.ready.clear();
        self.ready.extend(self.backlog.drain(..));
        for ev in self.events.iter() {
            if !self.ready.contains(&ev.token()) {
                self.ready.push_back(ev.token());
            }
        }
        Ok(())
    }

    fn next_ready(&mut self) -> Option<Token> {
        self.ready.pop_front()
    }

    /// `token` stopped at its read budget with data left: serve it again without waiting.
    fn still_pending(&mut self, token: Token) {
        self.backlog.push(token);
    }
}

/// Bytes kept free before and after each received datagram, to seal it in place.
pub type Room = (usize, usize);
/// Datagrams are used as they are.
pub const NO_ROOM: Room = (0, 0);

/// The read-budget loop of one UDP socket: receives into `rx` a batch at a time
/// (`recvmmsg`, leaving `room` around each datagram) and hands each batch to `each` with
/// the time it arrived, until the socket is empty or `READ_BUDGET` datagrams were read.
/// Errors about one datagram or peer (ICMP) are skipped; any other is logged and ends the
/// read. True if the budget ran out first.
pub fn read_batches(
    fd: RawFd,
    rx: &mut RecvBatch,
    (headroom, tailroom): Room,
    log: &Logger,
    what: &str,
    mut each: impl FnMut(&mut RecvBatch, Instant),
) -> bool {
    for _ in 0..READ_BUDGET / BATCH {
        match rx.recv_leaving(fd, headroom, tailroom) {
            Ok(0) => return false,
            Ok(_) => each(rx, Instant::now()),
            Err(e) if is_transient(&e) => continue,
            Err(e) => {
                warn!(log, "socket read failed"; "from" => what, "error" => %e);
                return false;
            }
        }
    }
    true
}
