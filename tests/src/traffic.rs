//! Traffic generators and sinks, bounded in count and time: a UDP echo/sink, paced
//! numbered UDP streams, TCP transfers, request/response and goodput, ping.

use crate::lab::spawn_in_ns;
use std::collections::HashSet;
use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A UDP echo server that also records which numbered datagrams it saw.
pub struct Echo {
    pub seen: Arc<Mutex<HashSet<u64>>>,
    pub packets: Arc<AtomicU64>,
    pub bytes: Arc<AtomicU64>,
    /// Echo back (default) or only count: a sink for one-way throughput.
    pub reply: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Echo {
    pub fn start(ns: &str, addr: SocketAddr) -> Self {
        let seen = Arc::new(Mutex::new(HashSet::new()));
        let packets = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let reply = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, p2, b2, r2, st2) = (seen.clone(), packets.clone(), bytes.clone(), reply.clone(), stop.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = spawn_in_ns(ns, move || {
            let sock = UdpSocket::bind(addr).expect("echo bind");
            // as much kernel buffer as the lab allows: the sink must not be the bottleneck
            // SAFETY: setsockopt on our own socket with a valid int.
            unsafe {
                let size: libc::c_int = 8 << 20;
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    &size as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
            sock.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
            ready_tx.send(()).expect("ready");
            let mut buf = vec![0u8; 65536];
            while !st2.load(Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else { continue };
                // warm-up datagrams (number u64::MAX) are always answered and never
                // counted, so a stream can wait for its session while the sink only counts
                if n >= 8 && buf[..8] == u64::MAX.to_be_bytes() {
                    let _ = sock.send_to(&buf[..n], from);
                    continue;
                }
                p2.fetch_add(1, Ordering::Relaxed);
                b2.fetch_add(n as u64, Ordering::Relaxed);
                if n >= 8 {
                    s2.lock().expect("lock").insert(u64::from_be_bytes(buf[..8].try_into().expect("8 bytes")));
                }
                if r2.load(Ordering::Relaxed) {
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        ready_rx.recv_timeout(Duration::from_secs(5)).expect("echo started");
        Self { seen, packets, bytes, reply, stop, handle: Some(handle) }
    }

    pub fn seen_count(&self) -> usize {
        self.seen.lock().expect("lock").len()
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// What a paced stream of numbered datagrams saw come back.
#[derive(Debug, Clone)]
pub struct StreamResult {
    pub sent: u64,
    /// Distinct numbers echoed back.
    pub echoed: HashSet<u64>,
    /// Echoes received at all (a number twice would mean a duplicate got through).
    pub echo_packets: u64,
    /// (time since start, number) of each echo.
    pub arrivals: Vec<(Duration, u64)>,
    /// Round trip of each echo (datagrams of at least 16 bytes carry their send time).
    pub rtts: Vec<Duration>,
}

/// From inside `ns`: sends `count` datagrams of `size` bytes (numbered from `first`) to
/// `to` at `pps`, collecting echoes until `linger` after the last. With `warm_up`, first
/// waits (at most 10 s) until one datagram makes the round trip. Bounded in count and
/// time by construction.
#[allow(clippy::too_many_arguments)]
pub fn udp_stream(
    ns: &str,
    warm_up: bool,
    to: SocketAddr,
    first: u64,
    count: u64,
    size: usize,
    pps: u64,
    linger: Duration,
) -> JoinHandle<StreamResult> {
    assert!(size >= 8 && pps > 0);
    spawn_in_ns(ns, move || {
        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
        sock.set_read_timeout(Some(Duration::from_millis(20))).expect("timeout");
        let rx = sock.try_clone().expect("clone");
        let rx_probe = sock.try_clone().expect("clone");
        let mut payload = vec![0x5au8; size];
        // Warm up: one probe datagram (number u64::MAX) at a time until one comes back, so
        // the measured stream starts on an established session.
        if warm_up {
            payload[..8].copy_from_slice(&u64::MAX.to_be_bytes());
            let mut buf = [0u8; 64];
            let warm_start = Instant::now();
            'warm: while warm_start.elapsed() < Duration::from_secs(10) {
                let _ = sock.send_to(&payload, to);
                let tick = Instant::now();
                while tick.elapsed() < Duration::from_millis(100) {
                    if rx_probe.recv(&mut buf).is_ok() {
                        break 'warm;
                    }
                }
            }
        }
        let start = Instant::now();
        let done = Arc::new(AtomicBool::new(false));
        let done2 = done.clone();
        let receiver = std::thread::spawn(move || {
            let mut echoed = HashSet::new();
            let mut arrivals = Vec::new();
            let mut rtts = Vec::new();
            let mut packets = 0;
            let mut buf = vec![0u8; 65536];
            let mut last_rx = Instant::now();
            loop {
                if done2.load(Ordering::Relaxed) && last_rx.elapsed() > linger {
                    break;
                }
                if let Ok(n) = rx.recv(&mut buf) {
                    if n >= 8 {
                        let k = u64::from_be_bytes(buf[..8].try_into().expect("8 bytes"));
                        if k == u64::MAX {
                            continue; // a late warm-up echo
                        }
                        packets += 1;
                        echoed.insert(k);
                        let now = start.elapsed();
                        arrivals.push((now, k));
                        if n >= 16 {
                            let sent = u64::from_be_bytes(buf[8..16].try_into().expect("8 bytes"));
                            rtts.push(now.saturating_sub(Duration::from_nanos(sent)));
                        }
                        last_rx = Instant::now();
                    }
                }
                if start.elapsed() > Duration::from_secs(600) {
                    break; // hard bound
                }
            }
            (echoed, packets, arrivals, rtts)
        });
        let interval = Duration::from_secs_f64(1.0 / pps as f64);
        for i in 0..count {
            let due = start + interval.mul_f64(i as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            payload[..8].copy_from_slice(&(first + i).to_be_bytes());
            if size >= 16 {
                payload[8..16].copy_from_slice(&(start.elapsed().as_nanos() as u64).to_be_bytes());
            }
            let _ = sock.send_to(&payload, to);
        }
        done.store(true, Ordering::Relaxed);
        let (echoed, echo_packets, arrivals, rtts) = receiver.join().expect("receiver");
        StreamResult { sent: count, echoed, echo_packets, arrivals, rtts }
    })
}

/// FNV-1a over a stream, to compare what was sent with what arrived.
pub fn fnv1a(h: u64, data: &[u8]) -> u64 {
    data.iter().fold(h, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// A bounded TCP transfer from namespace `from_ns` to `to` (listening in `to_ns`):
/// returns (bytes received, hashes equal, seconds).
pub fn tcp_transfer(from_ns: &str, to_ns: &str, to: SocketAddr, bytes: usize) -> (usize, bool, f64) {
    use std::io::Read;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let receiver = spawn_in_ns(to_ns, move || {
        let l = std::net::TcpListener::bind(to).expect("listen");
        ready_tx.send(()).expect("ready");
        let (mut s, _) = l.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let (mut h, mut n) = (FNV_OFFSET, 0usize);
        let mut buf = vec![0u8; 65536];
        while let Ok(k) = s.read(&mut buf) {
            if k == 0 {
                break;
            }
            h = fnv1a(h, &buf[..k]);
            n += k;
        }
        (n, h)
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).expect("receiver ready");
    let sender = spawn_in_ns(from_ns, move || {
        let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(10)).expect("connect");
        s.set_write_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let mut rng = 0x1234_5678u64;
        let mut h = FNV_OFFSET;
        let mut buf = vec![0u8; 65536];
        let start = Instant::now();
        let mut sent = 0;
        while sent < bytes {
            let k = (bytes - sent).min(buf.len());
            for b in &mut buf[..k] {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                *b = rng as u8;
            }
            s.write_all(&buf[..k]).expect("send");
            h = fnv1a(h, &buf[..k]);
            sent += k;
        }
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
        (h, start)
    });
    let (h_sent, start) = sender.join().expect("sender");
    let (n, h_recv) = receiver.join().expect("receiver");
    (n, h_sent == h_recv, start.elapsed().as_secs_f64())
}

/// Runs `ping` inside `ns`; returns the RTTs (ms) of the answers.
pub fn ping(ns: &str, dst: &str, count: u32, interval: &str, extra: &[&str]) -> Vec<f64> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "ping", "-n", "-W", "2", "-c", &count.to_string(), "-i", interval]);
    cmd.args(extra).arg(dst);
    let out = cmd.output().expect("ping");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect()
}

/// `count` pings from `ns` to `dst` every `interval` (as `ping -i`): how many were
/// answered and the longest time without an answer (from the first ping sent to the first
/// answer, between answers, and from the last answer to the end).
pub fn ping_gaps(ns: &str, dst: &str, count: u32, interval: &str) -> (usize, Duration) {
    let start = Instant::now();
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "ping", "-n", "-D", "-W", "1", "-c", &count.to_string(), "-i", interval, dst])
        .output()
        .expect("ping");
    let end = Instant::now();
    // -D: each reply line starts with [unix seconds.micros]
    let stamps: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("time="))
        .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
        .collect();
    let wall_now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs_f64();
    let wall_start = wall_now - end.duration_since(start).as_secs_f64();
    let points: Vec<f64> = std::iter::once(wall_start).chain(stamps.iter().copied()).chain([wall_now]).collect();
    let longest = points.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max);
    (stamps.len(), Duration::from_secs_f64(longest.max(0.0)))
}

/// How long a TCP receiver waits for the connection through a tunnel under test.
const ACCEPT_WITHIN: Duration = Duration::from_secs(20);

/// Accepts one connection within `within`, or none; the stream is blocking.
fn accept_within(l: &std::net::TcpListener, within: Duration) -> Option<std::net::TcpStream> {
    l.set_nonblocking(true).ok()?;
    let deadline = Instant::now() + within;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).ok()?;
                return Some(s);
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => return None,
        }
    }
}

/// TCP request/response latency, the way an interactive application sees a path: from
/// `from_ns`, `count` requests of 64 bytes, one every `interval`, each answered with 64
/// bytes by a server listening on `listen` in `to_ns` (nodelay on both sides). Returns
/// the milliseconds of each answered transaction; the run ends early if one takes longer
/// than 5 s or the whole exceeds `count * interval + 30 s`.
pub fn tcp_request_response(
    from_ns: &str,
    connect: SocketAddr,
    to_ns: &str,
    listen: SocketAddr,
    count: usize,
    interval: Duration,
) -> Vec<f64> {
    use std::io::{Read, Write};
    const MESSAGE: usize = 64;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = spawn_in_ns(to_ns, move || {
        let l = std::net::TcpListener::bind(listen).expect("listen");
        ready_tx.send(()).expect("ready");
        let Some(mut s) = accept_within(&l, ACCEPT_WITHIN) else { return };
        let _ = s.set_nodelay(true);
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let mut buf = [0u8; MESSAGE];
        while s.read_exact(&mut buf).is_ok() && s.write_all(&buf).is_ok() {}
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).expect("server ready");
    let client = spawn_in_ns(from_ns, move || {
        let mut ms = Vec::with_capacity(count);
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&connect, Duration::from_secs(10)) else { return ms };
        let _ = s.set_nodelay(true);
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
        let start = Instant::now();
        let give_up = interval * count as u32 + Duration::from_secs(30);
        let mut buf = [0x5au8; MESSAGE];
        for k in 0..count {
            let due = start + interval * k as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let t = Instant::now();
            if s.write_all(&buf).is_err() || s.read_exact(&mut buf).is_err() || start.elapsed() > give_up {
                break;
            }
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        ms
    });
    let ms = client.join().expect("client");
    let _ = server.join();
    ms
}

/// Single-stream TCP goodput: from `from_ns`, connect to `connect`, which leads (maybe
/// through a tunnel) to a listener at `listen` in `to_ns`. Sends for at most `max_secs`
/// or `max_bytes`; returns Mbit/s received.
pub fn tcp_goodput(
    from_ns: &str,
    connect: SocketAddr,
    to_ns: &str,
    listen: SocketAddr,
    max_bytes: usize,
    max_secs: f64,
) -> f64 {
    use std::io::Read;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let receiver = spawn_in_ns(to_ns, move || {
        let l = std::net::TcpListener::bind(listen).expect("listen");
        ready_tx.send(()).expect("ready");
        // a tunnel that never delivers the connection counts as 0
        let Some(mut s) = accept_within(&l, ACCEPT_WITHIN) else { return (0, 1.0) };
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut n = 0usize;
        let mut buf = vec![0u8; 65536];
        let start = Instant::now();
        while let Ok(k) = s.read(&mut buf) {
            if k == 0 {
                break;
            }
            n += k;
        }
        (n, start.elapsed().as_secs_f64())
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).expect("receiver ready");
    let sender = spawn_in_ns(from_ns, move || {
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&connect, Duration::from_secs(10)) else { return };
        let _ = s.set_write_timeout(Some(Duration::from_millis(500)));
        let buf = vec![0x5au8; 65536];
        let start = Instant::now();
        let mut sent = 0;
        while sent < max_bytes && start.elapsed().as_secs_f64() < max_secs {
            match s.write(&buf) {
                Ok(k) => sent += k,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => break,
            }
        }
        let _ = s.shutdown(std::net::Shutdown::Write);
    });
    let _ = sender.join();
    let (n, secs) = receiver.join().expect("receiver");
    n as f64 * 8.0 / secs.max(1e-6) / 1e6
}

/// `GET path` over HTTP/1.1 from this network namespace: the status line and the body.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(String, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut all = String::new();
    s.read_to_string(&mut all)?;
    let (head, body) = all.split_once("\r\n\r\n").unwrap_or((&all, ""));
    Ok((head.lines().next().unwrap_or("").to_string(), body.to_string()))
}

/// `promtool check metrics` on `text`: `Ok(false)` when promtool is not installed (and
/// this is not CI, where .ci/run installs it), else whether it passed, with its output.
pub fn promtool_check(text: &str) -> Result<bool, String> {
    use std::io::Write;
    use std::process::Stdio;
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(_) if std::env::var_os("CI").is_none() => return Ok(false),
        Err(e) => return Err(format!("promtool: {e} (Debian package prometheus)")),
    };
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(true)
    } else {
        Err(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }
}

/// The metric names conf/grafana-dashboard.json draws (from its queries).
pub fn dashboard_metrics() -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../conf/grafana-dashboard.json");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard")).expect("JSON");
    let mut names: Vec<String> = dash["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(String::from))
        .flat_map(|e| {
            e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("mptunnel_"))
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect();
    names.sort();
    names.dedup();
    assert!(names.len() > 10, "{names:?}");
    names
}

/// Asks `server` (a DNS server, `ip:port`) for the A records of `name` from this network
/// namespace: the addresses, or the response code when it is not NOERROR.
pub fn dns_query_a(server: &str, name: &str) -> Result<Vec<std::net::Ipv4Addr>, String> {
    use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
    use hickory_proto::rr::{Name, RData, RecordType};
    use std::str::FromStr;
    let mut q = Message::new(0x4d50, MessageType::Query, OpCode::Query);
    q.add_query(Query::query(Name::from_str(name).map_err(|e| e.to_string())?, RecordType::A));
    let sock = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(3))).map_err(|e| e.to_string())?;
    sock.send_to(&q.to_vec().map_err(|e| e.to_string())?, server).map_err(|e| e.to_string())?;
    let mut buf = [0u8; 1500];
    let n = sock.recv(&mut buf).map_err(|e| format!("no answer: {e}"))?;
    let r = Message::from_vec(&buf[..n]).map_err(|e| e.to_string())?;
    if r.metadata.response_code != ResponseCode::NoError {
        return Err(format!("{:?}", r.metadata.response_code));
    }
    Ok(r.answers
        .iter()
        .filter_map(|a| match &a.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect())
}
