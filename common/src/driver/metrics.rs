//! Prometheus metrics: `GET /metrics` on `metrics_listen`, served inside the event loop.
//!
//! Each scrape builds a fresh registry from the service's current state (prometheus-client
//! encodes it in the Prometheus text format, version 0.0.4, which `promtool check metrics`
//! checks), so nothing on the forwarding path counts. The server never blocks the loop: requests are read and answers written
//! non-blocking, at most `MAX_METRICS_CONNECTIONS` at once, each dropped after
//! `METRICS_TIMEOUT`, with a request of at most `METRICS_REQUEST_MAX` bytes.
//!
//! Names start with `mptunnel_` and carry their unit (`_seconds`, `_bytes`, `_ratio`,
//! `_total` for counters).

use super::event_loop::{METRICS_CONNECTION_BASE, METRICS_LISTENER};
use super::{DriverError, IoContext};
use crate::stats::{PathState, SessionState, StatusReport};
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as PromRegistry;
pub use prometheus_client::registry::Unit;
use slog::{debug, warn, Logger};
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

pub const MAX_METRICS_CONNECTIONS: usize = 16;
/// A scraper has this long to send its request and take the answer.
pub const METRICS_TIMEOUT: Duration = Duration::from_secs(5);
/// The most of a request we read (the request line is all we need).
pub const METRICS_REQUEST_MAX: usize = 8192;

/// Labels of one sample: name and value pairs.
pub type Labels = Vec<(String, String)>;

/// One scrape's metrics, filled by the service.
pub struct Metrics {
    registry: PromRegistry,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self { registry: PromRegistry::with_prefix("mptunnel") }
    }

    /// A gauge family `name` (with `unit` appended) holding `samples`.
    pub fn gauge(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<Unit>,
        samples: impl IntoIterator<Item = (Labels, f64)>,
    ) {
        let family = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        for (labels, v) in samples {
            family.get_or_create(&labels).set(v);
        }
        match unit {
            Some(u) => self.registry.register_with_unit(name, help, u, family),
            None => self.registry.register(name, help, family),
        }
    }

    /// A counter family `name` (unit, then `_total`, appended) holding `samples`.
    pub fn counter(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<Unit>,
        samples: impl IntoIterator<Item = (Labels, u64)>,
    ) {
        let family = Family::<Labels, Counter>::default();
        for (labels, v) in samples {
            family.get_or_create(&labels).inc_by(v);
        }
        match unit {
            Some(u) => self.registry.register_with_unit(name, help, u, family),
            None => self.registry.register(name, help, family),
        }
    }

    /// The Prometheus text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // writing into a String cannot fail
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// `labels` and one more.
pub fn with_label(mut labels: Labels, key: &str, value: impl Into<String>) -> Labels {
    labels.push((key.to_string(), value.into()));
    labels
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// The metrics of an mpclient or mpserver, from its status report: per session and
/// path state, RTT, jitter, loss both ways, packets, bytes and drops by reason.
pub fn tunnel_metrics(r: &StatusReport, m: &mut Metrics) {
    let role = r.role.as_str();
    m.gauge(
        "uptime",
        "Seconds since the daemon started",
        Some(Unit::Seconds),
        [(labels(&[("role", role)]), r.uptime_s as f64)],
    );
    m.gauge("sessions", "Sessions open", None, [(labels(&[("role", role)]), r.sessions.len() as f64)]);
    m.gauge(
        "max_sessions",
        "Most sessions kept (max_sessions)",
        None,
        [(labels(&[("role", role)]), r.max_sessions as f64)],
    );
    m.counter(
        "evicted_sessions",
        "Sessions closed to make room in a full table",
        None,
        [(labels(&[("role", role)]), r.evicted_sessions)],
    );
    let mut drops: Vec<(Labels, u64)> =
        r.drops.by_reason().map(|(why, n)| (labels(&[("session", ""), ("reason", why)]), n)).collect();
    let (mut state, mut path_state) = (Vec::new(), Vec::new());
    let (mut rtt, mut jitter, mut loss_up, mut loss_down) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut packets, mut bytes) = (Vec::new(), Vec::new());
    let (mut scheme, mut cost, mut parity, mut recovered, mut lost) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for s in &r.sessions {
        let id = s.id.as_str();
        if let Some(red) = &s.redundancy {
            let l = labels(&[("session", id)]);
            scheme.push((with_label(with_label(l.clone(), "mode", &red.mode), "scheme", &red.scheme), 1.0));
            cost.extend(red.wire_per_payload.map(|v| (l.clone(), v)));
            parity.push((l.clone(), red.parity_sent));
            recovered.push((l.clone(), red.recovered));
            lost.push((l, red.lost));
        }
        for st in SessionState::ALL {
            state.push((labels(&[("session", id), ("state", st.name())]), f64::from(u8::from(s.state == st))));
        }
        drops.extend(s.drops.by_reason().map(|(why, n)| (labels(&[("session", id), ("reason", why)]), n)));
        for p in &s.paths {
            let l = |extra: &[(&str, &str)]| {
                let mut v = labels(&[("session", id), ("path", &p.name)]);
                v.extend(labels(extra));
                v
            };
            for st in PathState::ALL {
                path_state.push((l(&[("state", st.name())]), f64::from(u8::from(p.state == st))));
            }
            let secs = |ms: Option<f64>| ms.map(|v| v / 1000.0);
            rtt.extend(secs(p.rtt_ms).map(|v| (l(&[]), v)));
            jitter.extend(secs(p.jitter_ms).map(|v| (l(&[]), v)));
            loss_up.extend(p.loss_up.map(|v| (l(&[]), v)));
            loss_down.extend(p.loss_down.map(|v| (l(&[]), v)));
            for (dir, t) in [("tx", &p.tx), ("rx", &p.rx)] {
                packets.push((l(&[("direction", dir)]), t.packets));
                bytes.push((l(&[("direction", dir)]), t.bytes));
            }
        }
    }
    m.gauge("session_state", "1 for the state each session is in", None, state);
    m.gauge("path_state", "1 for the state each path of a session is in", None, path_state);
    m.gauge("path_rtt", "Round trip time of a path", Some(Unit::Seconds), rtt);
    m.gauge("path_jitter", "Round trip jitter of a path", Some(Unit::Seconds), jitter);
    m.gauge(
        "path_loss_up",
        "Probe loss towards the server, over the last 64 probes",
        Some(Unit::Other("ratio".into())),
        loss_up,
    );
    m.gauge(
        "path_loss_down",
        "Probe loss towards the client, over the last 64 probes",
        Some(Unit::Other("ratio".into())),
        loss_down,
    );
    m.counter("path_packets", "Datagrams on a path", None, packets);
    m.counter("path", "Bytes on a path", Some(Unit::Bytes), bytes);
    m.counter("drops", "Datagrams dropped, by reason (session empty: not attributable to one)", None, drops);
    m.gauge("redundancy_scheme", "1 for the redundancy mode and the scheme a session sends with now", None, scheme);
    m.gauge(
        "redundancy_wire_per_payload",
        "Bytes sent (every copy and parity shard) per payload byte",
        Some(Unit::Other("ratio".into())),
        cost,
    );
    m.counter("redundancy_parity_sent", "Parity shards sent", None, parity);
    m.counter("redundancy_recovered", "Datagrams from the other end rebuilt from parity", None, recovered);
    m.counter(
        "redundancy_lost",
        "Datagrams from the other end that arrived on no path and were not rebuilt",
        None,
        lost,
    );
}

enum Phase {
    Reading(Vec<u8>),
    Writing { out: Vec<u8>, sent: usize },
}

struct Connection {
    stream: TcpStream,
    phase: Phase,
    deadline: Instant,
}

/// What a request asks for: the answer's status line and body.
fn answer(request_line: &str, metrics: impl FnOnce() -> String) -> Vec<u8> {
    let mut words = request_line.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", prometheus_client::encoding::prometheus_text::CONTENT_TYPE, metrics()),
        ("GET", _) => ("404 Not Found", "text/plain", "only /metrics is served here\n".to_string()),
        _ => ("405 Method Not Allowed", "text/plain", "GET /metrics\n".to_string()),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// The `/metrics` endpoint of a daemon.
pub struct MetricsServer {
    listener: TcpListener,
    connections: Vec<Option<Connection>>,
}

impl MetricsServer {
    pub(super) fn bind(addr: SocketAddr, registry: &Registry) -> Result<Self, DriverError> {
        let mut listener = TcpListener::bind(addr).context(|| format!("metrics_listen {addr}"))?;
        registry
            .register(&mut listener, METRICS_LISTENER, Interest::READABLE)
            .context(|| format!("metrics_listen {addr}"))?;
        Ok(Self { listener, connections: (0..MAX_METRICS_CONNECTIONS).map(|_| None).collect() })
    }

    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        self.connections.iter().flatten().map(|c| c.deadline).min()
    }

    /// Serves a ready metrics token; `metrics` encodes the service's metrics (called only
    /// for a complete `GET /metrics`).
    pub(super) fn handle_ready(
        &mut self,
        registry: &Registry,
        token: Token,
        metrics: impl FnOnce() -> String,
        log: &Logger,
    ) {
        if token == METRICS_LISTENER {
            self.accept_all(registry, log);
            return;
        }
        let i = METRICS_CONNECTION_BASE - token.0;
        let Some(slot) = self.connections.get_mut(i) else { return };
        let done = match slot.as_mut() {
            Some(c) => c.advance(registry, token, metrics),
            None => false,
        };
        if done {
            close(registry, slot);
        }
    }

    fn accept_all(&mut self, registry: &Registry, log: &Logger) {
        loop {
            let mut stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!(log, "metrics accept failed"; "error" => %e);
                    return;
                }
            };
            let Some(i) = self.connections.iter().position(Option::is_none) else {
                debug!(log, "too many metrics scrapers; closing a new one");
                continue;
            };
            let token = Token(METRICS_CONNECTION_BASE - i);
            if registry.register(&mut stream, token, Interest::READABLE).is_ok() {
                let deadline = Instant::now() + METRICS_TIMEOUT;
                self.connections[i] = Some(Connection { stream, phase: Phase::Reading(Vec::new()), deadline });
            }
        }
    }

    /// Drops scrapers that did not finish in time.
    pub(super) fn expire(&mut self, registry: &Registry, now: Instant) {
        for slot in &mut self.connections {
            if slot.as_ref().is_some_and(|c| now >= c.deadline) {
                close(registry, slot);
            }
        }
    }
}

impl Connection {
    /// Reads the request or writes the answer as far as the socket allows; true when
    /// the connection is done (answered, closed by the peer, or failed).
    fn advance(&mut self, registry: &Registry, token: Token, metrics: impl FnOnce() -> String) -> bool {
        if let Phase::Reading(buf) = &mut self.phase {
            let mut chunk = [0u8; 2048];
            loop {
                match self.stream.read(&mut chunk) {
                    Ok(0) => return true,
                    Ok(n) => {
                        buf.extend_from_slice(&chunk[..n]);
                        if buf.len() > METRICS_REQUEST_MAX {
                            return true;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => return true,
                }
            }
            // answered once the headers are in (closing on unread bytes would reset the
            // connection under the answer); only the request line is looked at
            let text = String::from_utf8_lossy(buf);
            if !text.contains("\r\n\r\n") && !text.contains("\n\n") {
                return false;
            }
            let line = text.lines().next().unwrap_or("").to_string();
            self.phase = Phase::Writing { out: answer(&line, metrics), sent: 0 };
            if registry.reregister(&mut self.stream, token, Interest::WRITABLE).is_err() {
                return true;
            }
        }
        let Phase::Writing { out, sent } = &mut self.phase else { return true };
        while *sent < out.len() {
            match self.stream.write(&out[*sent..]) {
                Ok(0) => return true,
                Ok(n) => *sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return true,
            }
        }
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        true
    }
}

fn close(registry: &Registry, slot: &mut Option<Connection>) {
    if let Some(mut c) = slot.take() {
        let _ = registry.deregister(&mut c.stream);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_by_request_line() {
        let ok = String::from_utf8(answer("GET /metrics HTTP/1.1\r", || "x 1\n".into())).unwrap();
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n") && ok.ends_with("\r\n\r\nx 1\n"), "{ok}");
        assert!(ok.contains("Content-Length: 4\r\n"));
        let q = String::from_utf8(answer("GET /metrics?x=1 HTTP/1.0", || "y\n".into())).unwrap();
        assert!(q.starts_with("HTTP/1.1 200"));
        let nf = String::from_utf8(answer("GET /other HTTP/1.1", || panic!("not encoded"))).unwrap();
        assert!(nf.starts_with("HTTP/1.1 404"));
        let post = String::from_utf8(answer("POST /metrics HTTP/1.1", || panic!("not encoded"))).unwrap();
        assert!(post.starts_with("HTTP/1.1 405"));
    }

    #[test]
    fn names_carry_prefix_units_and_totals() {
        let mut m = Metrics::new();
        m.gauge("path_rtt", "Round trip time of a path", Some(Unit::Seconds), [(labels(&[("path", "a")]), 0.002)]);
        m.counter("path", "Bytes on a path", Some(Unit::Bytes), [(labels(&[("path", "a")]), 7)]);
        let text = m.encode();
        assert!(text.contains("# TYPE mptunnel_path_rtt_seconds gauge"), "{text}");
        assert!(text.contains("# HELP mptunnel_path_bytes_total Bytes on a path."), "{text}");
        assert!(text.contains("mptunnel_path_rtt_seconds{path=\"a\"} 0.002"), "{text}");
        assert!(text.contains("mptunnel_path_bytes_total{path=\"a\"} 7"), "{text}");
    }
}
