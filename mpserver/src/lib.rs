//! The mpserver driver: a mio loop around `common::server::Server`.
//!
//! One listening socket for all clients and paths; one upstream socket per session,
//! connected to that session's target, so the target sees one address per client.
//! The loop only moves bytes and time; every decision is the core's.

use common::config::{ServerConfig, DEFAULT_STATS_INTERVAL_SECS};
use common::crypto::{Cipher, Psk};
use common::driver::Readiness;
use common::driver::{self, control};
use common::server::{Server, ServerCoreConfig, ServerEvent, ServerRecv};
use common::wire::{AEAD_TAG_LEN, DATA_PAYLOAD_OFFSET, HANDSHAKE_RESP_LEN, MAX_DATAGRAM};
use mio::net::{UdpSocket, UnixListener};
use mio::{Interest, Registry, Token};
use slog::{debug, info, o, trace, warn, Logger};
use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const LISTEN: Token = Token(0);
const CONTROL: Token = Token(1);
const UPSTREAM_TOKEN_BASE: usize = 2;
/// Datagrams read from one socket per wake-up before the others get a turn.
const READ_BUDGET: usize = 256;

#[derive(Debug, Clone)]
pub struct ServerRuntime {
    pub listen: SocketAddr,
    pub core: ServerCoreConfig,
    pub control: PathBuf,
    pub stats_interval: Option<Duration>,
}

impl ServerRuntime {
    /// mptunnel's form: `mpserver <listen-port> <target-host> <target-port>`.
    pub fn from_args(listen_port: u16, target_host: &str, target_port: u16) -> Result<Self, String> {
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
            stats_interval: Some(Duration::from_secs(DEFAULT_STATS_INTERVAL_SECS)),
        })
    }

    pub fn from_config(file: &str, c: &ServerConfig) -> Result<Self, String> {
        let default_target = match &c.target {
            Some(t) => Some(driver::resolve(t).map_err(|e| format!("{file}: target: {e}"))?),
            None => None,
        };
        let mut targets = HashMap::new();
        for (name, t) in &c.targets {
            targets.insert(name.clone(), driver::resolve(t).map_err(|e| format!("{file}: targets.{name}: {e}"))?);
        }
        Ok(Self {
            listen: c.listen.parse().map_err(|_| format!("{file}: listen: bad address"))?,
            core: ServerCoreConfig {
                default_target,
                targets,
                ciphers: c.ciphers.clone(),
                max_sessions: c.max_sessions,
                max_paths_per_session: c.max_paths_per_session,
                session_timeout: Duration::from_secs(c.session_timeout_secs),
            },
            control: c.control_socket.clone().unwrap_or_else(|| control::default_control_path("mpserver")),
            stats_interval: (c.stats_interval_secs > 0).then(|| Duration::from_secs(c.stats_interval_secs)),
        })
    }
}

struct Driver {
    core: Server,
    listen: UdpSocket,
    /// Indexed by `SessionSlot`.
    upstream: Vec<Option<UdpSocket>>,
    control: UnixListener,
    listen_name: String,
    buf: Vec<u8>,
    reply: [u8; HANDSHAKE_RESP_LEN],
    log: Logger,
    send_errors: u64,
}

pub fn run(rt: ServerRuntime, psk: Psk, log: Logger) -> Result<(), String> {
    let mut io = Readiness::new(1024).map_err(|e| format!("poll: {e}"))?;
    let mut listen = driver::udp_socket(rt.listen, None, None).map_err(|e| format!("listen {}: {e}", rt.listen))?;
    io.registry().register(&mut listen, LISTEN, Interest::READABLE).map_err(|e| e.to_string())?;
    control::prepare_control_path(&rt.control)?;
    let mut control =
        UnixListener::bind(&rt.control).map_err(|e| format!("control socket {}: {e}", rt.control.display()))?;
    io.registry().register(&mut control, CONTROL, Interest::READABLE).map_err(|e| e.to_string())?;
    info!(log, "mpserver listening"; "listen" => %rt.listen, "default_target" => ?rt.core.default_target,
        "named_targets" => rt.core.targets.len(), "control" => %rt.control.display());
    let mut d = Driver {
        core: Server::new(psk, rt.core, Instant::now()),
        listen,
        upstream: Vec::new(),
        control,
        listen_name: rt.listen.to_string(),
        buf: vec![0; MAX_DATAGRAM],
        reply: [0; HANDSHAKE_RESP_LEN],
        log,
        send_errors: 0,
    };
    d.event_loop(&mut io, rt.stats_interval)
}

impl Driver {
    fn event_loop(&mut self, io: &mut Readiness, stats_interval: Option<Duration>) -> Result<(), String> {
        let mut next_stats = stats_interval.map(|d| Instant::now() + d);
        loop {
            let deadline = [Some(self.core.poll_timeout()), next_stats].into_iter().flatten().min();
            io.wait(deadline).map_err(|e| format!("poll: {e}"))?;
            while let Some(token) = io.next_ready() {
                let pending = match token {
                    LISTEN => self.read_listen(io.registry()),
                    CONTROL => {
                        self.accept_control();
                        false
                    }
                    Token(t) => self.read_upstream(t - UPSTREAM_TOKEN_BASE),
                };
                if pending {
                    io.still_pending(token);
                }
            }
            let now = Instant::now();
            self.core.handle_timeout(now);
            self.handle_events(io.registry());
            if let (Some(at), Some(every)) = (next_stats, stats_interval) {
                if now >= at {
                    info!(self.log, "stats"; "summary" => self.core.status(now, &self.listen_name).summary_line(), "send_errors" => self.send_errors);
                    next_stats = Some(now + every);
                }
            }
        }
    }

    fn read_listen(&mut self, registry: &Registry) -> bool {
        for _ in 0..READ_BUDGET {
            let (n, from) = match self.listen.recv_from(&mut self.buf) {
                Ok(r) => r,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                Err(e) if driver::is_transient(&e) => continue,
                Err(e) => {
                    warn!(self.log, "reading from clients"; "error" => %e);
                    return false;
                }
            };
            let now = Instant::now();
            let r = self.core.handle_datagram(now, from, &mut self.buf[..n], &mut self.reply);
            // Open upstream sockets for new sessions before anything is forwarded to them.
            self.handle_events(registry);
            match r {
                ServerRecv::Forward { slot, payload } => match self.upstream.get(slot).and_then(Option::as_ref) {
                    Some(sock) => {
                        if let Err(e) = sock.send(&self.buf[payload]) {
                            self.send_errors += 1;
                            trace!(self.log, "upstream send failed"; "slot" => slot, "error" => %e);
                        }
                    }
                    None => trace!(self.log, "no upstream socket"; "slot" => slot),
                },
                ServerRecv::Reply { len } => {
                    if let Err(e) = self.listen.send_to(&self.reply[..len], from) {
                        self.send_errors += 1;
                        trace!(self.log, "reply failed"; "to" => %from, "error" => %e);
                    }
                }
                ServerRecv::Dropped(reason) => {
                    trace!(self.log, "dropped"; "from" => %from, "reason" => ?reason)
                }
            }
        }
        true
    }

    fn read_upstream(&mut self, slot: usize) -> bool {
        let room = self.buf.len() - AEAD_TAG_LEN;
        for _ in 0..READ_BUDGET {
            let Some(sock) = self.upstream.get(slot).and_then(Option::as_ref) else {
                return false;
            };
            let n = match sock.recv(&mut self.buf[DATA_PAYLOAD_OFFSET..room]) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                Err(e) if driver::is_transient(&e) => continue,
                Err(e) => {
                    warn!(self.log, "reading from target"; "slot" => slot, "error" => %e);
                    return false;
                }
            };
            let now = Instant::now();
            if let Some((len, paths)) = self.core.encapsulate(now, slot, &mut self.buf, n) {
                for p in paths.iter() {
                    let Some(addr) = self.core.path_addr(slot, p) else {
                        continue;
                    };
                    if let Err(e) = self.listen.send_to(&self.buf[..len], addr) {
                        self.send_errors += 1;
                        trace!(self.log, "send to client failed"; "to" => %addr, "error" => %e);
                    }
                }
            }
        }
        true
    }

    fn handle_events(&mut self, registry: &Registry) {
        while let Some(ev) = self.core.poll_event() {
            match ev {
                ServerEvent::SessionOpened { slot, id, target, cipher } => {
                    match driver::udp_socket(driver::any_addr_for(target), None, Some(target)) {
                        Ok(mut sock) => {
                            if let Err(e) =
                                registry.register(&mut sock, Token(UPSTREAM_TOKEN_BASE + slot), Interest::READABLE)
                            {
                                warn!(self.log, "registering upstream socket"; "error" => %e);
                            }
                            if self.upstream.len() <= slot {
                                self.upstream.resize_with(slot + 1, || None);
                            }
                            self.upstream[slot] = Some(sock);
                            info!(self.log, "session opened"; "session" => %id, "target" => %target, "cipher" => cipher.name());
                        }
                        Err(e) => {
                            warn!(self.log, "cannot open upstream socket"; "session" => %id, "target" => %target, "error" => %e)
                        }
                    }
                }
                ServerEvent::SessionClosed { slot, id } => {
                    if let Some(mut sock) = self.upstream.get_mut(slot).and_then(Option::take) {
                        let _ = registry.deregister(&mut sock);
                    }
                    info!(self.log, "session closed"; "session" => %id);
                }
                ServerEvent::PathAdded { slot, addr } => {
                    debug!(self.log, "path learned"; "slot" => slot, "addr" => %addr)
                }
                ServerEvent::PathValidated { slot, addr } => {
                    info!(self.log, "path validated"; "slot" => slot, "addr" => %addr)
                }
                ServerEvent::PathRemoved { slot, addr } => {
                    info!(self.log, "path expired"; "slot" => slot, "addr" => %addr)
                }
                ServerEvent::Refused { from, status } => {
                    warn!(self.log, "handshake refused"; "from" => %from, "status" => ?status)
                }
            }
        }
    }

    fn accept_control(&mut self) {
        let (core, listen) = (&self.core, &self.listen_name);
        if let Err(e) = control::serve_pending(&self.control, || core.status(Instant::now(), listen)) {
            warn!(self.log, "control socket"; "error" => %e);
        }
    }
}

pub fn logger(level: &str) -> (Logger, common::log::LogGuard) {
    let (log, guard) = common::log::init(level);
    (log.new(o!("prog" => "mpserver")), guard)
}
