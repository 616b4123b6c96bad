//! The mpbridge mio loop: one listening socket, one connected socket per flow.

use crate::{FlowTable, Hop, Impairment, LabLine, Verdict};
use common::driver;
use common::driver::batch::{self, RecvBatch, BATCH};
use common::driver::Readiness;
use mio::net::UdpSocket;
use mio::{Interest, Registry, Token};
use slog::{info, trace, warn, Logger};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

const LISTEN: Token = Token(0);
const FLOW_TOKEN_BASE: usize = 1;
const READ_BUDGET: usize = 256;
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
const STATS_INTERVAL: Duration = Duration::from_secs(30);

pub struct BridgeRuntime {
    pub listen: SocketAddr,
    pub to: SocketAddr,
    pub idle_timeout: Duration,
    pub max_flows: usize,
    pub lab: Impairment,
}

struct Driver {
    listen: UdpSocket,
    to: SocketAddr,
    table: FlowTable,
    socks: Vec<Option<UdpSocket>>,
    /// Per flow: our address its client sends to, when `listen` is a wildcard; answers go
    /// out from it (a host with several addresses would otherwise pick its own).
    locals: Vec<Option<IpAddr>>,
    lab: Option<LabLine>,
    rb: RecvBatch,
    log: Logger,
    forwarded: u64,
    refused_flows: u64,
    send_errors: u64,
}

pub fn run(rt: BridgeRuntime, log: Logger) -> Result<(), String> {
    let mut io = Readiness::new(1024).map_err(|e| format!("poll: {e}"))?;
    let mut listen = driver::udp_socket(rt.listen, None, None).map_err(|e| format!("listen {}: {e}", rt.listen))?;
    io.registry().register(&mut listen, LISTEN, Interest::READABLE).map_err(|e| e.to_string())?;
    if rt.listen.ip().is_unspecified() {
        batch::receive_local_addresses(listen.as_raw_fd(), rt.listen.is_ipv6())
            .map_err(|e| format!("listen {}: packet info: {e}", rt.listen))?;
    }
    info!(log, "mpbridge relaying"; "listen" => %rt.listen, "to" => %rt.to, "idle_timeout_s" => rt.idle_timeout.as_secs(), "max_flows" => rt.max_flows);
    let lab = rt.lab.is_active().then(|| {
        warn!(log, "LAB IMPAIRMENT ON: this relay drops and delays traffic on purpose";
            "loss_pct" => rt.lab.loss * 100.0, "delay_ms" => rt.lab.delay.as_millis() as u64, "jitter_ms" => rt.lab.jitter.as_millis() as u64);
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
        LabLine::new(rt.lab, seed)
    });
    let mut d = Driver {
        listen,
        to: rt.to,
        table: FlowTable::new(rt.idle_timeout, rt.max_flows),
        socks: Vec::new(),
        locals: Vec::new(),
        lab,
        rb: RecvBatch::new(),
        log,
        forwarded: 0,
        refused_flows: 0,
        send_errors: 0,
    };
    d.event_loop(&mut io)
}

impl Driver {
    fn event_loop(&mut self, io: &mut Readiness) -> Result<(), String> {
        let mut next_sweep = Instant::now() + SWEEP_INTERVAL;
        let mut next_stats = Instant::now() + STATS_INTERVAL;
        let mut expired = Vec::new();
        loop {
            let lab_due = self.lab.as_ref().and_then(LabLine::next_due);
            let deadline = [Some(next_sweep), Some(next_stats), lab_due].into_iter().flatten().min();
            io.wait(deadline).map_err(|e| format!("poll: {e}"))?;
            while let Some(token) = io.next_ready() {
                let pending = match token {
                    LISTEN => self.read_clients(io.registry()),
                    Token(t) => self.read_flow(t - FLOW_TOKEN_BASE),
                };
                if pending {
                    io.still_pending(token);
                }
            }
            let now = Instant::now();
            self.release_delayed(now);
            if now >= next_sweep {
                next_sweep = now + SWEEP_INTERVAL;
                expired.clear();
                self.table.expire(now, &mut expired);
                for &slot in &expired {
                    if let Some(mut s) = self.socks.get_mut(slot).and_then(Option::take) {
                        let _ = io.registry().deregister(&mut s);
                    }
                }
            }
            if now >= next_stats {
                next_stats = now + STATS_INTERVAL;
                let lab_dropped = self.lab.as_ref().map_or(0, |l| l.dropped);
                info!(self.log, "stats"; "flows" => self.table.len(), "forwarded" => self.forwarded,
                    "refused_flows" => self.refused_flows, "send_errors" => self.send_errors, "lab_dropped" => lab_dropped);
            }
        }
    }

    /// Sends one datagram (released by the lab delay line).
    fn send(&mut self, hop: Hop, data: &[u8]) {
        let r = match hop {
            Hop::ToTarget(slot) => match self.socks.get(slot).and_then(Option::as_ref) {
                Some(s) => s.send(data),
                None => return,
            },
            Hop::ToClient(slot) => match self.table.client(slot) {
                Some(c) => batch::send_one(self.listen.as_raw_fd(), data, c, self.local(slot)).map(|_| data.len()),
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

    /// Lab impairment decides; `true` = send now.
    fn admit(&mut self, now: Instant, hop: Hop, datagram: &[u8]) -> bool {
        match self.lab.as_mut() {
            None => true,
            Some(l) => matches!(l.admit(now, hop, datagram), Verdict::Send),
        }
    }

    /// Sends `which` datagrams of the batch to `hop` in one system call.
    fn send_batch(&mut self, hop: Hop, which: &[usize]) {
        if which.is_empty() {
            return;
        }
        let sent = match hop {
            Hop::ToTarget(slot) => match self.socks.get(slot).and_then(Option::as_ref) {
                Some(s) => batch::send_batch(s.as_raw_fd(), &self.rb, which, None, None),
                None => return,
            },
            Hop::ToClient(slot) => match self.table.client(slot) {
                Some(c) => batch::send_batch(self.listen.as_raw_fd(), &self.rb, which, Some(c), self.local(slot)),
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

    fn read_clients(&mut self, registry: &Registry) -> bool {
        let mut group: Vec<usize> = Vec::with_capacity(BATCH);
        for _ in 0..READ_BUDGET / BATCH {
            let n = match self.rb.recv(self.listen.as_raw_fd()) {
                Ok(0) => return false,
                Ok(n) => n,
                Err(e) if driver::is_transient(&e) => continue,
                Err(e) => {
                    warn!(self.log, "reading from clients"; "error" => %e);
                    return false;
                }
            };
            let now = Instant::now();
            // consecutive datagrams of one flow go out in one sendmmsg
            let mut group_slot = None;
            group.clear();
            for i in 0..n {
                let Some(from) = self.rb.source(i) else { continue };
                let Some(slot) = self.flow_socket(now, from, registry) else { continue };
                if self.locals.len() <= slot {
                    self.locals.resize(slot + 1, None);
                }
                self.locals[slot] = self.rb.local(i);
                if self.lab.is_some() {
                    // lab mode only: the delay line keeps its own copy
                    let d = self.rb.datagram(i).to_vec();
                    if !self.admit(now, Hop::ToTarget(slot), &d) {
                        continue;
                    }
                }
                if group_slot != Some(slot) {
                    if let Some(g) = group_slot {
                        self.send_batch(Hop::ToTarget(g), &group);
                        group.clear();
                    }
                    group_slot = Some(slot);
                }
                group.push(i);
            }
            if let Some(g) = group_slot {
                self.send_batch(Hop::ToTarget(g), &group);
            }
        }
        true
    }

    /// The flow of `from`, opening its socket if new; `None` if the table is full.
    fn flow_socket(&mut self, now: Instant, from: SocketAddr, registry: &Registry) -> Option<usize> {
        let Some((slot, new)) = self.table.flow_for(now, from) else {
            self.refused_flows += 1;
            return None;
        };
        if new {
            match driver::udp_socket(driver::any_addr_for(self.to), None, Some(self.to)) {
                Ok(mut s) => {
                    if let Err(e) = registry.register(&mut s, Token(FLOW_TOKEN_BASE + slot), Interest::READABLE) {
                        warn!(self.log, "register flow socket"; "error" => %e);
                    }
                    if self.socks.len() <= slot {
                        self.socks.resize_with(slot + 1, || None);
                    }
                    self.socks[slot] = Some(s);
                    info!(self.log, "new flow"; "client" => %from, "flows" => self.table.len());
                }
                Err(e) => warn!(self.log, "cannot open flow socket"; "client" => %from, "error" => %e),
            }
        }
        Some(slot)
    }

    fn read_flow(&mut self, slot: usize) -> bool {
        let mut which: Vec<usize> = Vec::with_capacity(BATCH);
        for _ in 0..READ_BUDGET / BATCH {
            let Some(fd) = self.socks.get(slot).and_then(Option::as_ref).map(|s| s.as_raw_fd()) else {
                return false;
            };
            let n = match self.rb.recv(fd) {
                Ok(0) => return false,
                Ok(n) => n,
                Err(e) if driver::is_transient(&e) => continue,
                Err(e) => {
                    warn!(self.log, "reading from target"; "error" => %e);
                    return false;
                }
            };
            let now = Instant::now();
            self.table.touch(slot, now);
            which.clear();
            for i in 0..n {
                if self.lab.is_some() {
                    let d = self.rb.datagram(i).to_vec();
                    if !self.admit(now, Hop::ToClient(slot), &d) {
                        continue;
                    }
                }
                which.push(i);
            }
            self.send_batch(Hop::ToClient(slot), &which);
        }
        true
    }
}
