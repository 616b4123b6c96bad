//! The mpbridge driver: one listening socket, one connected socket per flow, run by the
//! shared event loop.

use crate::{FlowEntry, FlowSlot, FlowTable, Hop, Impairment, LabLine, Verdict};
use common::driver::batch::{self, BatchSocket, RecvBatch, BATCH};
use common::driver::event_loop::{read_batches, EventLoop, Service, NO_ROOM};
use common::driver::metrics::Metrics;
use common::driver::{self, DriverError, IoContext, RateLimitedLog, SlotSockets};
use mio::{Interest, Registry, Token};
use slog::{debug, info, trace, warn, Logger};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

const LISTEN: Token = Token(0);
const FLOW_TOKEN_BASE: usize = 1;
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
const STATS_INTERVAL: Duration = Duration::from_secs(30);
/// Repeated warnings (flow sockets that cannot be opened) at most this often.
const WARNING_INTERVAL: Duration = Duration::from_secs(10);
/// Descriptors kept for everything but flow sockets (listening socket, poll, signals,
/// logging).
const FD_RESERVE: usize = 64;

pub struct BridgeRuntime {
    pub listen: SocketAddr,
    pub to: SocketAddr,
    pub idle_timeout: Duration,
    pub max_flows: usize,
    /// Where `GET /metrics` is served, if anywhere.
    pub metrics: Option<SocketAddr>,
    pub lab: Impairment,
}

/// mpbridge as the event loop runs it: the receive buffer and the relay state.
struct Driver {
    rb: RecvBatch,
    relay: Relay,
}

/// Flows, their sockets and counters.
struct Relay {
    listen: BatchSocket,
    to: SocketAddr,
    table: FlowTable,
    socks: SlotSockets,
    /// Per flow: our address its client sends to, when `listen` is a wildcard; answers go
    /// out from it (a host with several addresses would otherwise pick its own).
    locals: Vec<Option<IpAddr>>,
    lab: Option<LabLine>,
    /// Datagram indices of the batch going to one hop.
    which: Vec<usize>,
    expired: Vec<FlowSlot>,
    next_sweep: Instant,
    log: Logger,
    forwarded: u64,
    refused_flows: u64,
    /// Unanswered flows that made room for new ones.
    evicted_flows: u64,
    /// Flow sockets that could not be opened.
    socket_failures: u64,
    socket_warnings: RateLimitedLog,
    send_errors: u64,
}

/// Runs the relay until SIGTERM/SIGINT or a fatal error.
pub fn run(rt: BridgeRuntime, log: &Logger) -> Result<(), DriverError> {
    let mut el = EventLoop::new(log.clone())?;
    el.log_stats_every(Some(STATS_INTERVAL));
    el.serve_metrics(rt.metrics)?;
    let what = || format!("listen {}", rt.listen);
    let mut listen = driver::udp_socket(rt.listen, None, None).context(what)?;
    el.registry().register(&mut listen, LISTEN, Interest::READABLE).context(what)?;
    if rt.listen.ip().is_unspecified() {
        batch::receive_local_addresses(listen.as_raw_fd(), rt.listen.is_ipv6())
            .context(|| format!("listen {}: packet info", rt.listen))?;
    }
    // one descriptor per flow: make room for max_flows, or fewer flows if the hard limit
    // is lower (refused, not black-holed, beyond it)
    let files = driver::raise_open_files_limit(rt.max_flows + FD_RESERVE).context(|| "RLIMIT_NOFILE".into())?;
    let max_flows = rt.max_flows.min(files.saturating_sub(FD_RESERVE)).max(1);
    if max_flows < rt.max_flows {
        warn!(log, "the open-files limit allows fewer flows than --max-flows"; "max_flows" => max_flows, "open_files_limit" => files);
    }
    info!(log, "mpbridge relaying"; "listen" => %rt.listen, "to" => %rt.to, "idle_timeout_s" => rt.idle_timeout.as_secs(), "max_flows" => max_flows);
    let lab = rt.lab.is_active().then(|| {
        warn!(log, "LAB IMPAIRMENT ON: this relay drops and delays traffic on purpose";
            "loss_pct" => rt.lab.loss * 100.0, "delay_ms" => rt.lab.delay.as_millis() as u64, "jitter_ms" => rt.lab.jitter.as_millis() as u64);
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
        LabLine::new(rt.lab, seed)
    });
    let relay = Relay {
        listen,
        to: rt.to,
        table: FlowTable::new(rt.idle_timeout, max_flows),
        socks: SlotSockets::new(FLOW_TOKEN_BASE),
        locals: Vec::new(),
        lab,
        which: Vec::with_capacity(BATCH),
        expired: Vec::new(),
        next_sweep: Instant::now() + SWEEP_INTERVAL,
        log: log.clone(),
        forwarded: 0,
        refused_flows: 0,
        evicted_flows: 0,
        socket_failures: 0,
        socket_warnings: RateLimitedLog::new(WARNING_INTERVAL),
        send_errors: 0,
    };
    el.run(&mut Driver { rb: RecvBatch::new(), relay })
}

impl Service for Driver {
    type Status = ();
    type Error = DriverError;

    fn handle_ready(&mut self, registry: &Registry, token: Token) -> Result<bool, DriverError> {
        let (rb, relay) = (&mut self.rb, &mut self.relay);
        Ok(match token {
            LISTEN => {
                let (fd, log) = (relay.listen.as_raw_fd(), relay.log.clone());
                read_batches(fd, rb, NO_ROOM, &log, "clients", |rb, now| relay.relay_from_clients(rb, now, registry))
            }
            t => {
                let Some(slot) = relay.socks.slot_of(t) else { return Ok(false) };
                let Some(fd) = relay.socks.get(slot).map(|s| s.as_raw_fd()) else { return Ok(false) };
                let log = relay.log.clone();
                read_batches(fd, rb, NO_ROOM, &log, "target", |rb, now| relay.relay_from_target(rb, now, slot))
            }
        })
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.relay.poll_timeout()
    }

    fn handle_timeout(&mut self, registry: &Registry, now: Instant) -> Result<(), DriverError> {
        self.relay.handle_timeout(registry, now);
        Ok(())
    }

    fn status(&self, _: Instant) {}

    fn stats_line(&self, _: Instant) -> String {
        self.relay.stats_line()
    }

    fn metrics(&self, _: Instant, m: &mut Metrics) {
        let r = &self.relay;
        let none = || Vec::new();
        m.gauge("bridge_flows", "Client flows relayed now", None, [(none(), r.table.len() as f64)]);
        m.counter("bridge_forwarded", "Datagrams relayed, both ways", None, [(none(), r.forwarded)]);
        let events = [
            ("refused", r.refused_flows),
            ("evicted", r.evicted_flows),
            ("socket_failure", r.socket_failures),
            ("send_error", r.send_errors),
            ("lab_dropped", r.lab.as_ref().map_or(0, |l| l.dropped)),
        ];
        let samples = events.map(|(what, n)| (vec![("event".to_string(), what.to_string())], n));
        m.counter(
            "bridge_flow_events",
            "Flows refused or evicted, sockets that failed, sends that failed",
            None,
            samples,
        );
    }
}

impl Relay {
    fn poll_timeout(&self) -> Option<Instant> {
        let lab_due = self.lab.as_ref().and_then(LabLine::next_due);
        Some(lab_due.map_or(self.next_sweep, |d| d.min(self.next_sweep)))
    }

    fn handle_timeout(&mut self, registry: &Registry, now: Instant) {
        self.release_delayed(now);
        if now >= self.next_sweep {
            self.next_sweep = now + SWEEP_INTERVAL;
            self.expired.clear();
            self.table.expire(now, &mut self.expired);
            for &slot in &self.expired {
                self.socks.close(registry, slot);
            }
        }
    }

    fn stats_line(&self) -> String {
        let lab_dropped = self.lab.as_ref().map_or(0, |l| l.dropped);
        format!(
            "flows={} forwarded={} refused_flows={} evicted_flows={} socket_failures={} send_errors={} \
             lab_dropped={lab_dropped}",
            self.table.len(),
            self.forwarded,
            self.refused_flows,
            self.evicted_flows,
            self.socket_failures,
            self.send_errors
        )
    }
    /// Sends one datagram (released by the lab delay line).
    fn send(&mut self, hop: Hop, data: &[u8]) {
        let r = match hop {
            Hop::ToTarget(slot) => match self.socks.get(slot) {
                Some(s) => s.send(data),
                None => return,
            },
            Hop::ToClient(slot) => match self.table.client(slot) {
                Some(c) => self.listen.send_one(data, c, self.local(slot)).map(|_| data.len()),
                None => return,
            },
        };
        match r {
            Ok(_) => self.forwarded += 1,
            Err(e) => {
                self.send_errors += 1;
                trace!(self.log, "send failed"; "hop" => ?hop, "error" => %e);
            }
        }
    }

    /// Lab impairment decides; `true` = send now (the delay line keeps its own copy).
    fn admit(&mut self, now: Instant, hop: Hop, datagram: &[u8]) -> bool {
        match self.lab.as_mut() {
            None => true,
            Some(l) => matches!(l.admit(now, hop, datagram), Verdict::Send),
        }
    }

    /// Sends the `which` datagrams of `rb` to `hop` in one system call.
    fn send_batch(&mut self, rb: &RecvBatch, hop: Hop) {
        let which = &self.which;
        if which.is_empty() {
            return;
        }
        let sent = match hop {
            Hop::ToTarget(slot) => match self.socks.get(slot) {
                Some(s) => s.send_batch(rb, which, None, None),
                None => return,
            },
            Hop::ToClient(slot) => match self.table.client(slot) {
                Some(c) => self.listen.send_batch(rb, which, Some(c), self.local(slot)),
                None => return,
            },
        };
        self.forwarded += sent as u64;
        self.send_errors += (which.len() - sent) as u64;
    }

    fn local(&self, slot: usize) -> Option<IpAddr> {
        self.locals.get(slot).copied().flatten()
    }

    fn release_delayed(&mut self, now: Instant) {
        while let Some((hop, d)) = self.lab.as_mut().and_then(|l| l.pop_due(now)) {
            self.send(hop, &d);
        }
    }

    /// Relays a batch from clients, each datagram through its flow's socket.
    fn relay_from_clients(&mut self, rb: &RecvBatch, now: Instant, registry: &Registry) {
        // consecutive datagrams of one flow go out in one sendmmsg

        let mut group_slot = None;
        self.which.clear();
        for i in 0..rb.len() {
            let Some(from) = rb.source(i) else { continue };
            let Some(slot) = self.flow_socket(now, from, registry) else { continue };
            if self.locals.len() <= slot {
                self.locals.resize(slot + 1, None);
            }
            self.locals[slot] = rb.local(i);
            if !self.admit(now, Hop::ToTarget(slot), rb.datagram(i)) {
                continue;
            }
            if group_slot != Some(slot) {
                if let Some(g) = group_slot {
                    self.send_batch(rb, Hop::ToTarget(g));
                    self.which.clear();
                }
                group_slot = Some(slot);
            }
            self.which.push(i);
        }
        if let Some(g) = group_slot {
            self.send_batch(rb, Hop::ToTarget(g));
        }
    }

    /// The flow of `from`, opening its socket if new; `None` if the table is full of
    /// answered flows or no socket could be opened (then the flow is not kept).
    fn flow_socket(&mut self, now: Instant, from: SocketAddr, registry: &Registry) -> Option<FlowSlot> {
        let slot = match self.table.flow_for(now, from) {
            None => {
                self.refused_flows += 1;
                return None;
            }
            Some(FlowEntry::Existing(slot)) => return Some(slot),
            Some(FlowEntry::New { slot, evicted }) => {
                self.evicted_flows += u64::from(evicted.is_some());
                slot
            }
        };
        // (an evicted flow's socket in this slot is closed first: its descriptor is ours)
        match self.socks.open(registry, slot, self.to) {
            Ok(()) => {
                debug!(self.log, "new flow"; "client" => %from, "flows" => self.table.len());
                Some(slot)
            }
            Err(e) => {
                // a flow without a socket would black-hole its client: forget it, so its
                // next datagram tries again
                self.table.remove(slot);
                self.socket_failures += 1;
                if self.socket_warnings.allow(now).is_some() {
                    warn!(self.log, "cannot open flow sockets; new flows are not relayed";
                        "client" => %from, "error" => %e, "failures_so_far" => self.socket_failures);
                }
                None
            }
        }
    }

    /// Relays a batch of the target's answers to the flow's client.
    fn relay_from_target(&mut self, rb: &RecvBatch, now: Instant, slot: FlowSlot) {
        self.table.answered(slot, now);
        self.which.clear();
        for i in 0..rb.len() {
            if self.admit(now, Hop::ToClient(slot), rb.datagram(i)) {
                self.which.push(i);
            }
        }
        self.send_batch(rb, Hop::ToClient(slot));
    }
}
