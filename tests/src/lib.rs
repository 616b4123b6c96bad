//! A lab of network namespaces for end-to-end tests (and the demo).
//!
//! `Lab` creates uniquely named namespaces (prefix + pid), veth links between them,
//! nftables loss rules, and processes inside them; dropping it (also on panic) kills
//! every process it started, by PID, and deletes every namespace it created. Traffic goes
//! only to addresses inside those namespaces.
//!
//! `TunnelLab` is the standard topology: a client host, three bridge hosts (the first
//! runs socat, the others mpbridge) and a server host with a UDP echo target.

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Runs a command and returns stdout; panics with stderr on failure.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Root and the tools? Otherwise the namespace tests cannot run here.
pub fn lab_available() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("needs root (ip netns)".into());
    }
    for tool in ["ip", "nft", "socat", "ping"] {
        let found =
            Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().is_ok_and(|o| o.status.success());
        if !found {
            return Err(format!("needs `{tool}` (installed by .ci/run)"));
        }
    }
    Ok(())
}

static LAB_SERIAL: Mutex<()> = Mutex::new(());

/// For namespace tests: skips (with a message) where namespaces cannot be made, which in
/// CI is an error; otherwise holds a lock so the tests of one binary run one at a time
/// (they share two cores and measure loss and latency).
pub fn lab_or_skip() -> Option<std::sync::MutexGuard<'static, ()>> {
    if let Err(why) = lab_available() {
        assert!(std::env::var_os("CI").is_none(), "namespace tests cannot run in CI: {why}");
        eprintln!("skipped: {why}");
        return None;
    }
    Some(LAB_SERIAL.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Where cargo put the workspace's binaries (next to this test's `deps/`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") || dir.ends_with("examples") {
        dir.pop();
    }
    let p = dir.join(name);
    assert!(p.exists(), "{} not built; run `cargo build --workspace` (cargo test builds it too)", p.display());
    p
}

/// A process started in a namespace, and its log file.
pub struct Proc {
    pub child: Child,
    pub name: String,
    pub log: PathBuf,
}

pub struct Lab {
    prefix: String,
    pub dir: PathBuf,
    namespaces: Vec<String>,
    procs: Vec<Proc>,
    /// Both ends, (namespace, interface), of every veth link.
    links: Vec<[(String, String); 2]>,
}

static LAB_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Lab {
    /// `tag` keeps labs of one test run apart; the pid keeps runs apart.
    pub fn new(tag: &str) -> Self {
        let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("mpt{}{}{}", std::process::id(), tag, n);
        let dir = std::env::temp_dir().join(format!("{prefix}-lab"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("lab dir");
        Self { prefix, dir, namespaces: Vec::new(), procs: Vec::new(), links: Vec::new() }
    }

    /// Creates a namespace with loopback up; returns its full name.
    pub fn add_ns(&mut self, role: &str) -> String {
        let ns = format!("{}-{role}", self.prefix);
        run(Command::new("ip").args(["netns", "add", &ns]));
        self.namespaces.push(ns.clone());
        run(Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]));
        ns
    }

    /// A veth pair `a_if` in `a` (address `a_ip`/24) to `b_if` in `b` (`b_ip`/24), both up.
    /// Like a real wire, it carries one MTU-sized packet per frame: no GSO super-packets,
    /// so loss hits TCP segments one at a time, as on a lossy Internet path.
    pub fn link(&mut self, a: &str, a_if: &str, a_ip: &str, b: &str, b_if: &str, b_ip: &str) {
        run(Command::new("ip").args(["-n", a, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b]));
        for (ns, ifname, ip) in [(a, a_if, a_ip), (b, b_if, b_ip)] {
            run(Command::new("ip").args(["-n", ns, "addr", "add", &format!("{ip}/24"), "dev", ifname]));
            run(Command::new("ip").args(["-n", ns, "link", "set", ifname, "gso_max_segs", "1", "up"]));
        }
        self.links.push([(a.into(), a_if.into()), (b.into(), b_if.into())]);
    }

    /// Random loss on the link whose end `ifname` is in `ns`: `out_pct` of the packets
    /// leaving through it and `in_pct` of those arriving (100 = all). Each direction is
    /// dropped at the receiving end's ingress, so senders see no error, as on a real lossy
    /// wire (a drop in the sender's output hook fails its sendmsg with EPERM, which some
    /// programs, kcptun for one, treat as fatal).
    pub fn link_loss(&self, ns: &str, ifname: &str, out_pct: u32, in_pct: u32) {
        let [near, far] = self
            .links
            .iter()
            .find_map(|[x, y]| {
                if (x.0.as_str(), x.1.as_str()) == (ns, ifname) {
                    Some([x, y])
                } else if (y.0.as_str(), y.1.as_str()) == (ns, ifname) {
                    Some([y, x])
                } else {
                    None
                }
            })
            .unwrap_or_else(|| panic!("no lab link {ifname} in {ns}"));
        self.ingress_loss(&far.0, &far.1, out_pct);
        self.ingress_loss(&near.0, &near.1, in_pct);
    }

    /// Drops `pct` percent of the IP packets arriving on `ifname` (netdev ingress hook,
    /// one table per interface, replaced on each call).
    fn ingress_loss(&self, ns: &str, ifname: &str, pct: u32) {
        let table: String = ifname.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
        let reset = format!("table netdev loss_{table}\ndelete table netdev loss_{table}\n");
        // IP only: ARP stays reliable (the lossy part of a real path lies beyond the first
        // hop; lost ARP would stall a path for seconds, which is not what is measured)
        let rule = match pct {
            0 => return self.nft(ns, &reset),
            100.. => "meta protocol { ip, ip6 } drop".to_string(),
            p => format!("meta protocol {{ ip, ip6 }} numgen random mod 100 < {p} drop"),
        };
        self.nft(
            ns,
            &format!(
                "{reset}table netdev loss_{table} {{\n  chain ingress {{\n    type filter hook ingress device \"{ifname}\" priority 0; policy accept;\n    {rule}\n  }}\n}}\n"
            ),
        );
    }

    /// Runs a shell command in `ns` and returns stdout.
    pub fn sh(&self, ns: &str, script: &str) -> String {
        run(Command::new("ip").args(["netns", "exec", ns, "sh", "-c", script]))
    }

    /// Loads an nftables ruleset into `ns` (replacing the lab table).
    pub fn nft(&self, ns: &str, ruleset: &str) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nft");
        child.stdin.take().expect("stdin").write_all(ruleset.as_bytes()).expect("write ruleset");
        let out = child.wait_with_output().expect("nft");
        assert!(out.status.success(), "nft: {}\n{ruleset}", String::from_utf8_lossy(&out.stderr));
    }

    /// Starts `program args` inside `ns` with its stderr/stdout in a log file. Returns an
    /// index for `kill9`.
    pub fn spawn(&mut self, ns: &str, name: &str, program: &Path, args: &[&str]) -> usize {
        let log = self.dir.join(format!("{name}.log"));
        let f = File::options().create(true).append(true).open(&log).expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("log fd"))
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        self.procs.push(Proc { child, name: name.into(), log });
        self.procs.len() - 1
    }

    /// `kill -9` a process this lab started and its descendants (socat's per-flow
    /// children would otherwise outlive it until their idle timeout), and reap it.
    pub fn kill9(&mut self, idx: usize) {
        kill9_tree(&mut self.procs[idx].child);
    }

    /// Sends `signal` to a process this lab started and waits (at most 10 s) for its exit.
    pub fn stop(&mut self, idx: usize, signal: libc::c_int) -> std::process::ExitStatus {
        let child = &mut self.procs[idx].child;
        // SAFETY: kill has no memory preconditions; the PID is our own child's (`ip netns
        // exec` execs the program in place).
        unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < until, "{} still running 10 s after signal {signal}", self.procs[idx].name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The PID of a process this lab started.
    pub fn pid(&self, idx: usize) -> u32 {
        self.procs[idx].child.id()
    }

    /// Still running?
    pub fn alive(&mut self, idx: usize) -> bool {
        matches!(self.procs[idx].child.try_wait(), Ok(None))
    }

    pub fn log_of(&self, idx: usize) -> String {
        std::fs::read_to_string(&self.procs[idx].log).unwrap_or_default()
    }

    fn dump_logs(&self) {
        for p in &self.procs {
            let text = std::fs::read_to_string(&p.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            eprintln!("----- {} (last {} lines) -----", p.name, tail.len());
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// `pid` and all its descendants, parents first, from /proc.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(|p| {
                    let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
                    let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
                    Some((p, ppid))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut tree = vec![pid];
    let mut k = 0;
    while k < tree.len() {
        let p = tree[k];
        tree.extend(parents.iter().filter(|&&(_, ppid)| ppid == p).map(|&(q, _)| q));
        k += 1;
    }
    tree
}

/// SIGKILL to a child this process started and to its descendants (by PID), then reaps it.
fn kill9_tree(child: &mut Child) {
    let descendants = match child.try_wait() {
        Ok(None) => process_tree(child.id()).split_off(1),
        _ => Vec::new(),
    };
    // the parent first, so it cannot fork again; its orphans keep their PIDs
    let _ = child.kill();
    for pid in descendants {
        // SAFETY: kill has no memory preconditions; these PIDs descend from our child.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    let _ = child.wait();
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for p in &mut self.procs {
            kill9_tree(&mut p.child);
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `f` on a new thread that has entered network namespace `ns`, so sockets it
/// creates live there.
pub fn spawn_in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: a valid namespace fd; CLONE_NEWNET switches only this thread.
        let r = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

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

pub const CLIENT_LISTEN: &str = "127.0.0.1:3000";
pub const ECHO_ADDR: &str = "127.0.0.1:7000";
pub const SERVER_PORT: u16 = 4000;
pub const BRIDGE_PORT: u16 = 4000;

/// Client, three bridges (socat, mpbridge, mpbridge), server with an echo target.
pub struct TunnelLab {
    pub lab: Lab,
    pub client_ns: String,
    pub bridge_ns: Vec<String>,
    pub server_ns: String,
    pub key: PathBuf,
    pub server: usize,
    pub client: usize,
    pub bridges: Vec<usize>,
    pub echo: Echo,
}

impl TunnelLab {
    /// Builds the topology and starts everything. `client_args` are extra mpclient flags.
    pub fn start(tag: &str) -> Self {
        let mut lab = Lab::new(tag);
        let client_ns = lab.add_ns("c");
        let server_ns = lab.add_ns("s");
        let mut bridge_ns = Vec::new();
        for i in 1..=3 {
            let b = lab.add_ns(&format!("b{i}"));
            lab.link(&client_ns, &format!("c{i}"), &format!("10.77.{i}.1"), &b, "toc", &format!("10.77.{i}.2"));
            lab.link(&b, "tos", &format!("10.78.{i}.1"), &server_ns, &format!("s{i}"), &format!("10.78.{i}.2"));
            bridge_ns.push(b);
        }
        let key = lab.dir.join("tunnel.key");
        run(Command::new(bin("mpserver")).arg("genkey").arg(&key));
        let echo = Echo::start(&server_ns, ECHO_ADDR.parse().expect("literal"));
        let mut me =
            Self { lab, client_ns, bridge_ns, server_ns, key, server: 0, client: 0, bridges: Vec::new(), echo };
        me.server = me.start_server();
        for i in 0..3 {
            let idx = me.start_bridge(i);
            me.bridges.push(idx);
        }
        let bridges_file = me.lab.dir.join("bridges.conf");
        std::fs::write(&bridges_file, "# lab relays\n10.77.1.2 4000\n10.77.2.2 4000\n10.77.3.2 4000\n").expect("write");
        me.client = me.start_client();
        me
    }

    pub fn start_server(&mut self) -> usize {
        let key = self.key.display().to_string();
        let control = self.lab.dir.join("mpserver.sock").display().to_string();
        let port = SERVER_PORT.to_string();
        let (ns, bin) = (self.server_ns.clone(), bin("mpserver"));
        self.lab.spawn(&ns, "mpserver", &bin, &["--key-file", &key, "--control", &control, &port, "127.0.0.1", "7000"])
    }

    pub fn start_client(&mut self) -> usize {
        let key = self.key.display().to_string();
        let control = self.lab.dir.join("mpclient.sock").display().to_string();
        let bridges = self.lab.dir.join("bridges.conf").display().to_string();
        let (ns, bin) = (self.client_ns.clone(), bin("mpclient"));
        self.lab.spawn(
            &ns,
            "mpclient",
            &bin,
            &["--key-file", &key, "--control", &control, "--listen", CLIENT_LISTEN, &bridges],
        )
    }

    /// Bridge 0 is socat; 1 and 2 are mpbridge.
    pub fn start_bridge(&mut self, i: usize) -> usize {
        let ns = self.bridge_ns[i].clone();
        let server = format!("10.78.{}.2:{SERVER_PORT}", i + 1);
        if i == 0 {
            let listen = format!("UDP4-LISTEN:{BRIDGE_PORT},fork,reuseaddr");
            let to = format!("UDP4:{server}");
            self.lab.spawn(&ns, "socat-b1", Path::new("socat"), &["-T", "60", &listen, &to])
        } else {
            let listen = format!("0.0.0.0:{BRIDGE_PORT}");
            self.lab.spawn(
                &ns,
                &format!("mpbridge-b{}", i + 1),
                &bin("mpbridge"),
                &["--listen", &listen, "--to", &server],
            )
        }
    }

    /// Loss in percent on path `i` (0-based), towards the server and back, on the wire
    /// between the client host and that bridge.
    pub fn set_loss(&self, i: usize, up_pct: u32, down_pct: u32) {
        self.lab.link_loss(&self.client_ns, &format!("c{}", i + 1), up_pct, down_pct);
    }

    /// Sends datagrams until one comes back (the session is up), at most `within`.
    pub fn wait_ready(&self, within: Duration) -> Duration {
        let start = Instant::now();
        let mut n = 1u64 << 60;
        while start.elapsed() < within {
            let to = CLIENT_LISTEN.parse().expect("literal");
            let r = udp_stream(&self.client_ns, false, to, n, 5, 64, 50, Duration::from_millis(300))
                .join()
                .expect("stream");
            n += 5;
            if !r.echoed.is_empty() {
                return start.elapsed();
            }
        }
        panic!("tunnel not ready within {within:?}");
    }

    /// The table from `mpclient status` (or mpserver).
    pub fn status(&self, program: &str, json: bool) -> String {
        let control = self.lab.dir.join(format!("{program}.sock"));
        let mut cmd = Command::new(bin(program));
        cmd.arg("status").arg("--control").arg(control);
        if json {
            cmd.arg("--json");
        }
        run(&mut cmd)
    }
}

/// Hub host (mpserver + mpvpn hub), two peer hosts (mpclient + mpvpn peer), and three
/// bridge hosts shared by both peers (socat, mpbridge, mpbridge).
pub struct VpnLab {
    pub lab: Lab,
    pub peer_ns: Vec<String>,
    pub server_ns: String,
    pub hub: usize,
    pub peers: Vec<usize>,
    hub_yaml: PathBuf,
    loss_pct: u32,
    pub embedded: bool,
}

pub const VPN_NETWORK: &str = "10.99.0.0/24";
pub const HUB_VPN_ADDR: &str = "10.99.0.1";
/// Peer B announces this subnet (its loopback holds 192.168.50.1).
pub const PEER_B_SUBNET: &str = "192.168.50.0/24";

impl VpnLab {
    /// `embedded`: the hub and peers run the multipath server/client in-process instead
    /// of beside separate mpserver/mpclient processes.
    pub fn start(tag: &str, loss_pct: u32, embedded: bool) -> Self {
        let mut lab = Lab::new(tag);
        let server_ns = lab.add_ns("s");
        let peer_ns = vec![lab.add_ns("pa"), lab.add_ns("pb")];
        for i in 1..=3 {
            let b = lab.add_ns(&format!("b{i}"));
            lab.link(&peer_ns[0], &format!("p{i}"), &format!("10.81.{i}.1"), &b, "toa", &format!("10.81.{i}.2"));
            lab.link(&peer_ns[1], &format!("p{i}"), &format!("10.82.{i}.1"), &b, "tob", &format!("10.82.{i}.2"));
            lab.link(&b, "tos", &format!("10.78.{i}.1"), &server_ns, &format!("s{i}"), &format!("10.78.{i}.2"));
            let server = format!("10.78.{i}.2:{SERVER_PORT}");
            if i == 1 {
                let listen = format!("UDP4-LISTEN:{BRIDGE_PORT},fork,reuseaddr");
                lab.spawn(&b, "socat-b1", Path::new("socat"), &["-T", "60", &listen, &format!("UDP4:{server}")]);
            } else {
                let listen = format!("0.0.0.0:{BRIDGE_PORT}");
                lab.spawn(&b, &format!("mpbridge-b{i}"), &bin("mpbridge"), &["--listen", &listen, "--to", &server]);
            }
        }
        let dir = lab.dir.clone();
        let tunnel_key = dir.join("tunnel.key");
        run(Command::new(bin("mpserver")).arg("genkey").arg(&tunnel_key));
        let key = |name: &str| {
            let p = dir.join(format!("{name}.key"));
            run(Command::new(bin("mpvpn")).arg("genkey").arg(&p));
            p
        };
        let (ka, kb, kc) = (key("a"), key("b"), key("c"));
        let tk = tunnel_key.display().to_string();
        let hub_yaml = dir.join("hub.yaml");
        let embedded_server = if embedded {
            let server_yaml = dir.join("server.yaml");
            std::fs::write(&server_yaml, format!("listen: 0.0.0.0:{SERVER_PORT}\nkey_file: {tk}\n"))
                .expect("server.yaml");
            format!("embedded_server: {}\n", server_yaml.display())
        } else {
            let sctl = dir.join("mpserver.sock").display().to_string();
            let port = SERVER_PORT.to_string();
            let args = ["--key-file", &tk, "--control", &sctl, &port, "127.0.0.1", "5000"];
            lab.spawn(&server_ns, "mpserver", &bin("mpserver"), &args);
            String::new()
        };
        std::fs::write(
            &hub_yaml,
            format!(
                "listen: 127.0.0.1:5000\ntun: mpvpn0\nnetwork: {VPN_NETWORK}\ncontrol_socket: {}\n{embedded_server}peers:\n  - name: a\n    key_file: {}\n  - name: b\n    key_file: {}\n  - name: c\n    key_file: {}\n",
                dir.join("hub.sock").display(),
                ka.display(),
                kb.display(),
                kc.display(),
            ),
        )
        .expect("hub.yaml");
        let mut me = Self { lab, peer_ns, server_ns, hub: 0, peers: Vec::new(), hub_yaml, loss_pct, embedded };
        me.hub = me.start_hub();
        // peer B's subnet
        me.lab.sh(&me.peer_ns[1], "ip addr add 192.168.50.1/32 dev lo");
        for (i, (name, key)) in [("a", &ka), ("b", &kb)].into_iter().enumerate() {
            let ns = me.peer_ns[i].clone();
            let net = if i == 0 { 81 } else { 82 };
            let embedded_client = if embedded {
                let client_yaml = dir.join(format!("client-{name}.yaml"));
                let paths: String = (1..=3).map(|j| format!("  - remote: 10.{net}.{j}.2:{BRIDGE_PORT}\n")).collect();
                std::fs::write(&client_yaml, format!("key_file: {tk}\npaths:\n{paths}")).expect("client.yaml");
                format!("embedded_client: {}\n", client_yaml.display())
            } else {
                let bridges = dir.join(format!("bridges-{name}.conf"));
                std::fs::write(
                    &bridges,
                    (1..=3).map(|j| format!("10.{net}.{j}.2 {BRIDGE_PORT}\n")).collect::<String>(),
                )
                .expect("bridges");
                let cctl = dir.join(format!("mpclient-{name}.sock")).display().to_string();
                let args = ["--key-file", &tk, "--control", &cctl, &bridges.display().to_string()];
                me.lab.spawn(&ns, &format!("mpclient-{name}"), &bin("mpclient"), &args);
                String::new()
            };
            let routes = if name == "b" { format!("routes: [{PEER_B_SUBNET}]\n") } else { String::new() };
            let yaml = dir.join(format!("peer-{name}.yaml"));
            std::fs::write(
                &yaml,
                format!(
                    "name: {name}\nkey_file: {}\ntunnel: 127.0.0.1:3000\ntun: mpvpn0\ncontrol_socket: {}\n{routes}{embedded_client}",
                    key.display(),
                    dir.join(format!("peer-{name}.sock")).display(),
                ),
            )
            .expect("peer yaml");
            let idx = me.spawn_peer(i, name, &yaml);
            me.peers.push(idx);
        }
        for ns in &me.peer_ns {
            for j in 1..=3 {
                me.lab.link_loss(ns, &format!("p{j}"), loss_pct, loss_pct);
            }
        }
        me
    }

    pub fn loss_pct(&self) -> u32 {
        self.loss_pct
    }

    /// Starts the hub; its control socket is the one `hub.yaml` names (`control_of("hub")`).
    pub fn start_hub(&mut self) -> usize {
        let (ns, yaml) = (self.server_ns.clone(), self.hub_yaml.display().to_string());
        self.lab.spawn(&ns, "mpvpn-hub", &bin("mpvpn"), &["hub", "-c", &yaml])
    }

    /// Starts a peer on peer host `i`; `yaml` names its control socket, `control_of(name)`.
    pub fn spawn_peer(&mut self, i: usize, name: &str, yaml: &Path) -> usize {
        let ns = self.peer_ns[i].clone();
        self.lab.spawn(&ns, &format!("mpvpn-{name}"), &bin("mpvpn"), &["peer", "-c", &yaml.display().to_string()])
    }

    /// The control socket of the hub ("hub") or a peer ("a", "b", ...); all of them are
    /// on this one host (the namespaces share the file system).
    pub fn control_of(&self, who: &str) -> PathBuf {
        if who == "hub" {
            self.lab.dir.join("hub.sock")
        } else {
            self.lab.dir.join(format!("peer-{who}.sock"))
        }
    }

    /// `mpvpn status --json` of the hub ("hub") or a peer ("a", "b", ...).
    pub fn status(&self, who: &str) -> serde_json::Value {
        let sock = self.control_of(who);
        let out = Command::new(bin("mpvpn"))
            .args(["status", "--json", "--control"])
            .arg(sock)
            .output()
            .expect("mpvpn status");
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    pub fn status_table(&self, who: &str) -> String {
        let sock = self.control_of(who);
        let out = Command::new(bin("mpvpn")).args(["status", "--control"]).arg(sock).output().expect("mpvpn status");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until peer `who` is up; returns its VPN address.
    pub fn wait_peer_up(&self, who: &str, within: Duration) -> std::net::Ipv4Addr {
        let start = Instant::now();
        while start.elapsed() < within {
            let s = self.status(who);
            if s["state"] == "up" {
                if let Some(a) = s["addr"].as_str().and_then(|a| a.parse().ok()) {
                    return a;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("peer {who} not up within {within:?}: {}", self.status(who));
    }

    /// `ping` from peer host `i`; returns the RTTs (ms) of the answers.
    pub fn ping(&self, i: usize, dst: &str, count: u32, interval: &str, extra: &[&str]) -> Vec<f64> {
        ping(&self.peer_ns[i], dst, count, interval, extra)
    }
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
