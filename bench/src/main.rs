//! `mpt-bench`: measures the tunnel against plain baselines in one namespace lab.
//!
//! Lab: a client host with three links to three bridge hosts and one direct link to the
//! server host. Bridge 1 runs a socat relay to the sink (the one-relay baseline) and an
//! mpbridge to mpserver; bridges 2 and 3 run mpbridge. The server host runs mpserver and
//! a UDP sink/echo. Loss is applied per direction on the client's links, dropped at the
//! receiving end (`Lab::link_loss`). Every cell is measured with the same load generator in
//! the same run; the lab is deleted at the end (also on failure or Ctrl-C). The full mode
//! adds single-stream TCP through TCP without a tunnel, kcptun, OpenVPN (one path and over
//! our tunnel) and our VPN; targets are medians of interleaved rounds.
//!
//! iperf3 is not used for the UDP cells: it needs a TCP control connection, which a
//! UDP-only tunnel does not carry; the generator here paces numbered, timestamped
//! datagrams instead and the sink counts them.

use clap::Parser;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tests::{bin, lab_available, run, udp_stream, Echo, Lab};

mod hub_failover;
mod hub_scale;

#[global_allocator]
static ALLOC: hub_scale::CountingAlloc = hub_scale::CountingAlloc;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Measures the multipath tunnel in network namespaces; writes results.json and results.md.
#[derive(Parser)]
struct Cli {
    /// Short runs (< 3 min), for CI and a first look.
    #[arg(long, conflicts_with = "full")]
    quick: bool,
    /// Longer runs and more samples (< 30 min).
    #[arg(long)]
    full: bool,
    /// Output directory [default: bench/results/<date>].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also profile the tunnel at 1 Gbit/s offered with `perf` (mpclient, mpserver,
    /// mpbridges): writes profile.txt and, with inferno installed, flamegraph.svg.
    #[arg(long)]
    profile: bool,
    /// Only the hub-scale bench: peers joining one hub in the simulator (no namespaces,
    /// no root), peer lists as deltas and whole; writes hub-scale.json and hub-scale.md.
    #[arg(long, conflicts_with = "profile")]
    hub_scale: bool,
    /// Only the hub-failover bench: three hubs with etcd in namespaces, meshed pairs
    /// (direct; relayed with `relay: fallback`; with `always`) pinging while their hub is
    /// killed, 6 times (2 min); writes hub-failover.json and hub-failover.md. Needs etcd.
    #[arg(long, conflicts_with_all = ["profile", "hub_scale"])]
    hub_failover: bool,
}

/// Where the hub-scale bench measures a join (peers already on the hub).
const HUB_SCALE_CHECKPOINTS: [usize; 4] = [100, 500, 1000, 2000];

#[derive(Clone, Copy)]
struct Scale {
    name: &'static str,
    throughput_secs: f64,
    rtt_probes: u64,
    loss_datagrams: u64,
    losses: &'static [u32],
    offered_mbit: &'static [u64],
    /// Interleaved rounds of the target measurements; targets report their median.
    target_rounds: usize,
    /// Redundancy cells: datagrams measured (after as many again of warm-up).
    redundancy_datagrams: u64,
}

const QUICK: Scale = Scale {
    name: "quick",
    throughput_secs: 1.0,
    rtt_probes: 400,
    loss_datagrams: 5_000,
    losses: &[0, 20],
    offered_mbit: &[10, 100, 500, 1000],
    target_rounds: 3,
    redundancy_datagrams: 6_000,
};
const FULL: Scale = Scale {
    name: "full",
    throughput_secs: 3.0,
    rtt_probes: 1000,
    loss_datagrams: 20_000,
    losses: &[0, 5, 20],
    offered_mbit: &[10, 100, 500, 1000],
    target_rounds: 5,
    redundancy_datagrams: 20_000,
};

#[derive(Serialize, Default, Clone)]
struct Cell {
    name: String,
    setup: String,
    paths: usize,
    cipher: String,
    loss_pct: u32,
    /// offered Mbit/s -> delivered Mbit/s
    throughput: BTreeMap<u64, f64>,
    /// offered Mbit/s -> fraction lost
    throughput_loss: BTreeMap<u64, f64>,
    rtt_ms: Option<Percentiles>,
    rtt_samples_ms: Vec<f64>,
    probe_loss: Option<f64>,
    residual_loss: Option<f64>,
    /// CPU seconds per GB of mpclient + mpserver (or the relay), at the highest offered rate.
    cpu_s_per_gb: Option<f64>,
    /// The same per process, bridges and baselines' relays included: where the time goes.
    cpu_s_per_gb_by_process: BTreeMap<String, f64>,
    peak_rss_kb: BTreeMap<String, u64>,
    /// Single-stream TCP goodput (VPN and TCP cells).
    tcp_mbit: Option<f64>,
    /// TCP request/response latency (VPN and TCP cells) and how many of RR_COUNT answered.
    rr_ms: Option<Percentiles>,
    rr_answered: Option<usize>,
    /// Redundancy cells: bytes the client put on its links (IP and UDP headers, probes and
    /// receipts included) per payload byte, after the warm-up.
    wire_per_payload: Option<f64>,
    /// Redundancy cells: the longest gap in a stream whose path died.
    longest_gap_ms: Option<f64>,
}

#[derive(Serialize, Clone, Copy)]
struct Percentiles {
    p50: f64,
    p99: f64,
    p999: f64,
}

#[derive(Serialize)]
struct Target {
    what: String,
    /// The median over the rounds.
    measured: f64,
    rounds: Vec<f64>,
    limit: f64,
    met: bool,
}

#[derive(Serialize)]
struct Results {
    date: String,
    mode: String,
    cpus: usize,
    cells: Vec<Cell>,
    failover: BTreeMap<String, f64>,
    /// Full mode: the VPN between two peers (3 paths each) beside TCP over one lossy
    /// path without a tunnel and beside kcptun (fast3) over one lossy path.
    vpn: Vec<Cell>,
    /// The mesh: peer to peer directly, through the hub (20 ms away), and the direct
    /// link's own RTT.
    mesh: Vec<Cell>,
    /// Redundancy modes (duplicate, fixed fec, adaptive) over 3 paths at each loss, and
    /// with a path dying mid-stream.
    redundancy: Vec<Cell>,
    /// Full mode: one hub's cost per join and memory per peer, up to 2000 peers.
    hub_scale: Option<hub_scale::HubScale>,
    targets: Vec<Target>,
}

use tests::tunnel::{
    bridge_addr, server_addr_via, Topology, CLIENT_LISTEN, ECHO_PORT as SINK_PORT, SERVER_PORT as TUNNEL_PORT,
};
/// The one-relay baseline: socat on bridge 1, straight to the sink.
const RELAY_PORT: u16 = 5000;
/// The TCP cells' listener (server host or VPN peer B).
const TCP_PORT: u16 = 7102;
const KCPTUN_PORT: u16 = 29900;
const KCPTUN_LOCAL_PORT: u16 = 12948;
const OPENVPN_PORT: u16 = 1194;
const OPENVPN_SERVER_ADDR: &str = "10.200.0.1";
const OPENVPN_CLIENT_ADDR: &str = "10.200.0.2";
/// The mesh bench's hub is this far from both peers (one way, an mpbridge's lab delay).
const MESH_HUB_DELAY_MS: u64 = 20;
/// The mesh's targets: added RTT p50 of a direct path over the link's own (ms, at most),
/// and direct TCP over through-hub TCP (at least).
const MESH_TARGETS: [(&str, f64, bool); 2] = [
    ("mesh: direct RTT p50 over the direct link's own (ms)", 0.5, false),
    ("mesh: direct TCP / through-hub TCP (hub 20 ms away)", 2.0, true),
];
/// The redundancy modes compared, with what client.yaml says for each.
const REDUNDANCY_MODES: [(&str, &str); 3] = [
    ("duplicate", "redundancy: duplicate\n"),
    ("fec 10+4", "redundancy: fec\nfec: {data: 10, parity: 4}\n"),
    ("adaptive", "redundancy: adaptive\n"),
];
/// Loss per path and direction of the redundancy cells.
const REDUNDANCY_LOSSES: [u32; 5] = [0, 1, 5, 10, 20];
/// The redundancy cells' stream: 1000-byte datagrams at this rate (16 Mbit/s).
const REDUNDANCY_PPS: u64 = 2000;
const REDUNDANCY_SIZE: usize = 1000;
/// ... and their 1400-byte throughput, offered at this rate.
const REDUNDANCY_OFFERED_MBIT: u64 = 300;
/// What a veth counts of each frame besides its IP packet.
const ETHERNET_HEADER_LEN: u64 = 14;
/// Loss per path and direction of the TCP/VPN comparison (full mode).
const VPN_LOSSES: [u32; 4] = [0, 5, 10, 20];
const PINGS: u32 = 200;
/// TCP request/response: 64-byte transactions, one every RR_INTERVAL.
const RR_COUNT: usize = 500;
const RR_INTERVAL: Duration = Duration::from_millis(10);
/// Single-stream TCP goodput: at most this long or this many bytes.
const TCP_SECS: f64 = 5.0;
const TCP_MAX_BYTES: usize = 256 << 20;

struct BenchLab {
    lab: Lab,
    c: String,
    s: String,
    sink: Echo,
    server: usize,
    client: Option<usize>,
    relay: usize,
    bridges: Vec<usize>,
    bridge_ns: Vec<String>,
    key: PathBuf,
}

impl BenchLab {
    fn start() -> Self {
        let mut lab = Lab::new("bench");
        let Topology { client_ns: c, bridge_ns, server_ns: s } = Topology::build(&mut lab);
        // the direct link, beside the three paths
        lab.link(&c, "cd", "10.90.0.1", &s, "sd", "10.90.0.2");
        let mut bridges = Vec::new();
        for (i, b) in bridge_ns.iter().enumerate() {
            let to = format!("{}:{TUNNEL_PORT}", server_addr_via(i + 1));
            let listen = format!("0.0.0.0:{TUNNEL_PORT}");
            bridges.push(lab.spawn(
                b,
                &format!("mpbridge-b{}", i + 1),
                &bin("mpbridge"),
                &["--listen", &listen, "--to", &to],
            ));
        }
        let listen = format!("UDP4-LISTEN:{RELAY_PORT},fork,reuseaddr");
        let to = format!("UDP4:{}:{SINK_PORT}", server_addr_via(1));
        let relay = lab.spawn(&bridge_ns[0], "socat-relay", Path::new("socat"), &["-T", "60", &listen, &to]);
        let sink = Echo::start(&s, SocketAddr::from(([0, 0, 0, 0], SINK_PORT)));
        let key = lab.dir.join("tunnel.key");
        run(std::process::Command::new(bin("mpserver")).arg("genkey").arg(&key));
        let mut me = Self { lab, c, s, sink, server: usize::MAX, client: None, relay, bridges, bridge_ns, key };
        me.server(SINK_PORT);
        me
    }

    /// (Re)starts mpserver, forwarding to `target_port` on the server host's loopback.
    fn server(&mut self, target_port: u16) {
        if self.server != usize::MAX {
            self.lab.kill9(self.server);
        }
        let k = self.key.display().to_string();
        let ctl = self.lab.dir.join("mpserver.sock").display().to_string();
        let (port, target) = (TUNNEL_PORT.to_string(), target_port.to_string());
        let s = self.s.clone();
        let args = ["--key-file", &k, "--control", &ctl, &port, "127.0.0.1", &target];
        self.server = self.lab.spawn(&s, "mpserver", &bin("mpserver"), &args);
    }

    /// (Re)starts mpclient with the first `paths` bridges and `cipher`, duplicating (the
    /// tunnel cells measure what mptunnel does; the redundancy cells compare the modes).
    fn client(&mut self, paths: usize, cipher: &str) {
        self.client_with(paths, cipher, "redundancy: duplicate\n");
    }

    /// (Re)starts mpclient with the first `paths` bridges, `cipher` and `extra` lines of
    /// client.yaml.
    fn client_with(&mut self, paths: usize, cipher: &str, extra: &str) {
        if let Some(old) = self.client.take() {
            self.lab.kill9(old);
        }
        let yaml = self.lab.dir.join("client.yaml");
        let list: String = (1..=paths).map(|i| format!("  - remote: {}:{TUNNEL_PORT}\n", bridge_addr(i))).collect();
        let ctl = self.lab.dir.join("mpclient.sock");
        std::fs::write(
            &yaml,
            format!(
                "listen: {CLIENT_LISTEN}\nkey_file: {}\ncipher: {cipher}\ncontrol_socket: {}\nstats_interval_secs: 0\n{extra}paths:\n{list}",
                self.key.display(),
                ctl.display()
            ),
        )
        .expect("client.yaml");
        let c = self.c.clone();
        self.client = Some(self.lab.spawn(&c, "mpclient", &bin("mpclient"), &["-c", &yaml.display().to_string()]));
        std::thread::sleep(Duration::from_millis(200));
    }

    /// Loss on the client's three bridge links and the direct link, each direction.
    fn loss(&self, pct: u32) {
        for ifname in ["c1", "c2", "c3", "cd"] {
            self.lab.link_loss(&self.c, ifname, pct, pct);
        }
    }

    /// Restarts the mpbridges, each with its lab delay (ms, each direction; 0 = none).
    fn bridge_delays(&mut self, delays_ms: &[u64]) {
        for (i, d) in delays_ms.iter().enumerate() {
            self.lab.kill9(self.bridges[i]);
            let ns = self.bridge_ns[i].clone();
            let to = format!("{}:{TUNNEL_PORT}", server_addr_via(i + 1));
            let listen = format!("0.0.0.0:{TUNNEL_PORT}");
            let delay = d.to_string();
            let mut args = vec!["--listen", &listen, "--to", &to];
            if *d > 0 {
                args.extend(["--lab-delay", &delay]);
            }
            self.bridges[i] = self.lab.spawn(&ns, &format!("mpbridge-b{}", i + 1), &bin("mpbridge"), &args);
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    /// Rate limits (Mbit/s, 0 = none) on each path, both directions, with tbf.
    fn rates(&self, mbit: &[u64]) {
        for (i, r) in mbit.iter().enumerate() {
            for (ns, dev) in [(self.c.clone(), format!("c{}", i + 1)), (self.bridge_ns[i].clone(), "toc".to_string())] {
                let cmd = if *r == 0 {
                    format!("tc qdisc del dev {dev} root 2>/dev/null || true")
                } else {
                    format!("tc qdisc replace dev {dev} root tbf rate {r}mbit burst 64kb latency 50ms")
                };
                self.lab.sh(&ns, &cmd);
            }
        }
    }

    fn blackhole(&self, ifname: &str) {
        self.lab.link_loss(&self.c, ifname, 100, 100);
    }

    /// IP bytes the client host has sent on its three bridge links: what a provider bills
    /// as egress (the veths count each packet's 14-byte Ethernet header too; taken off).
    fn client_tx_bytes(&self) -> u64 {
        let cmd = "cd /sys/class/net && cat c1/statistics/tx_bytes c1/statistics/tx_packets \
                   c2/statistics/tx_bytes c2/statistics/tx_packets c3/statistics/tx_bytes c3/statistics/tx_packets";
        let counts: Vec<u64> = self.lab.sh(&self.c, cmd).split_whitespace().filter_map(|v| v.parse().ok()).collect();
        counts.chunks_exact(2).map(|bp| bp[0].saturating_sub(bp[1] * ETHERNET_HEADER_LEN)).sum()
    }
}

fn installed(program: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// CPU seconds (user + system) of a process and each of its descendants, by PID.
struct CpuSnapshot(BTreeMap<u32, f64>);

impl CpuSnapshot {
    fn of(pid: u32) -> Self {
        let cpu = |p: u32| -> Option<f64> {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / clk_tck())
        };
        Self(tests::process_tree(pid).into_iter().filter_map(|p| Some((p, cpu(p)?))).collect())
    }

    /// CPU seconds spent since `earlier`. A descendant that exited in between (socat's
    /// idle per-flow children) takes its earlier time with it, so only processes alive
    /// now count, each from where it stood then (or from zero if it is new).
    fn since(&self, earlier: &Self) -> f64 {
        self.0.iter().map(|(pid, t)| t - earlier.0.get(pid).copied().unwrap_or(0.0)).sum()
    }
}

fn peak_rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn percentiles(v: &mut [f64]) -> Option<Percentiles> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let at = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    Some(Percentiles { p50: at(0.5), p99: at(0.99), p999: at(0.999) })
}

struct Runner {
    bl: BenchLab,
    scale: Scale,
    next_number: u64,
    step: usize,
    steps: usize,
    started: Instant,
}

impl Runner {
    fn progress(&mut self, what: &str) {
        self.step += 1;
        eprint!("\r[{:>2}/{}] {:>5.0}s  {:<70}", self.step, self.steps, self.started.elapsed().as_secs_f64(), what);
        if STOP.load(Ordering::SeqCst) {
            eprintln!("\ninterrupted; cleaning up");
            panic!("interrupted");
        }
    }

    fn numbers(&mut self, n: u64) -> u64 {
        let first = self.next_number;
        self.next_number += n + 10;
        first
    }

    /// Throughput at each offered rate (sink counts, no echo), with CPU per GB at the
    /// highest rate for the given processes.
    /// `cpu_pids` count towards `cpu_s_per_gb`; `extra_pids` are only reported per process.
    fn throughput(
        &mut self,
        cell: &mut Cell,
        to: SocketAddr,
        cpu_pids: &[(String, u32)],
        extra_pids: &[(String, u32)],
    ) {
        self.bl.sink.reply.store(false, Ordering::Relaxed);
        for &mbit in self.scale.offered_mbit {
            self.progress(&format!("{}: {} Mbit/s offered", cell.name, mbit));
            let pps = mbit * 1_000_000 / (1400 * 8);
            let count = (pps as f64 * self.scale.throughput_secs) as u64;
            let first = self.numbers(count);
            let (p0, b0) = (self.bl.sink.packets.load(Ordering::Relaxed), self.bl.sink.bytes.load(Ordering::Relaxed));
            let before: Vec<CpuSnapshot> =
                cpu_pids.iter().chain(extra_pids).map(|(_, p)| CpuSnapshot::of(*p)).collect();
            udp_stream(&self.bl.c, true, to, first, count, 1400, pps, Duration::from_millis(300))
                .join()
                .expect("stream");
            let spent: Vec<f64> = cpu_pids
                .iter()
                .chain(extra_pids)
                .zip(&before)
                .map(|((_, p), b)| CpuSnapshot::of(*p).since(b))
                .collect();
            let cpu: f64 = spent[..cpu_pids.len()].iter().sum();
            let got = self.bl.sink.packets.load(Ordering::Relaxed) - p0;
            let bytes = self.bl.sink.bytes.load(Ordering::Relaxed) - b0;
            cell.throughput.insert(mbit, bytes as f64 * 8.0 / self.scale.throughput_secs / 1e6);
            cell.throughput_loss.insert(mbit, 1.0 - got as f64 / count as f64);
            if mbit == *self.scale.offered_mbit.last().expect("rates") && bytes > 0 {
                let gb = bytes as f64 / 1e9;
                if !cpu_pids.is_empty() {
                    cell.cpu_s_per_gb = Some(cpu / gb);
                }
                for ((name, _), spent) in cpu_pids.iter().chain(extra_pids).zip(spent) {
                    cell.cpu_s_per_gb_by_process.insert(name.clone(), spent / gb);
                }
            }
        }
        for (name, pid) in cpu_pids {
            cell.peak_rss_kb.insert(name.clone(), peak_rss_kb(*pid));
        }
    }

    fn rtt(&mut self, cell: &mut Cell, to: SocketAddr) {
        self.progress(&format!("{}: RTT of {} probes", cell.name, self.scale.rtt_probes));
        self.bl.sink.reply.store(true, Ordering::Relaxed);
        let n = self.scale.rtt_probes;
        let first = self.numbers(n);
        let r = udp_stream(&self.bl.c, true, to, first, n, 64, 500, Duration::from_millis(500)).join().expect("stream");
        let mut ms: Vec<f64> = r.rtts.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        cell.rtt_ms = percentiles(&mut ms);
        cell.rtt_samples_ms = ms;
        cell.probe_loss = Some(1.0 - r.echoed.len() as f64 / n as f64);
    }

    /// One-way delivered loss of a stream of small datagrams (sink counts).
    fn residual(&mut self, cell: &mut Cell, to: SocketAddr) {
        self.progress(&format!("{}: residual loss, {} datagrams", cell.name, self.scale.loss_datagrams));
        self.bl.sink.reply.store(false, Ordering::Relaxed);
        let n = self.scale.loss_datagrams;
        let first = self.numbers(n);
        udp_stream(&self.bl.c, true, to, first, n, 64, 5000, Duration::from_millis(500)).join().expect("stream");
        let seen = self.bl.sink.seen.lock().expect("lock");
        let got = (first..first + n).filter(|k| seen.contains(k)).count();
        cell.residual_loss = Some(1.0 - got as f64 / n as f64);
    }

    /// Single-stream TCP through one setup, from `from_ns` to a listener on `listen` in
    /// `to_ns`: ping (where ICMP passes), request/response latency, goodput.
    fn tcp_cell(
        &mut self,
        mut cell: Cell,
        from_ns: &str,
        to_ns: &str,
        connect: SocketAddr,
        listen: SocketAddr,
        ping_dst: Option<&str>,
    ) -> Cell {
        self.progress(&cell.name.clone());
        if let Some(dst) = ping_dst {
            let mut ms = tests::ping(from_ns, dst, PINGS, "0.01", &[]);
            cell.probe_loss = Some(1.0 - ms.len() as f64 / f64::from(PINGS));
            cell.rtt_ms = percentiles(&mut ms);
        }
        let mut ms = tests::tcp_request_response(from_ns, connect, to_ns, listen, RR_COUNT, RR_INTERVAL);
        cell.rr_answered = Some(ms.len());
        cell.rr_ms = percentiles(&mut ms);
        cell.tcp_mbit = Some(tests::tcp_goodput(from_ns, connect, to_ns, listen, TCP_MAX_BYTES, TCP_SECS));
        cell
    }

    /// Each redundancy mode over 3 paths at each loss, then with a path dying: one flow
    /// of `redundancy_datagrams` after as many of warm-up (the session measures its paths
    /// meanwhile); wire bytes per payload byte, residual loss, echo RTT, and 1400-byte
    /// throughput at `REDUNDANCY_OFFERED_MBIT`.
    fn redundancy(&mut self, cells: &mut Vec<Cell>) {
        let tunnel: SocketAddr = CLIENT_LISTEN.parse().expect("literal");
        for (mode, yaml) in REDUNDANCY_MODES {
            self.bl.client_with(3, "aes-256-gcm", yaml);
            for loss in REDUNDANCY_LOSSES.into_iter().map(Some).chain([None]) {
                self.bl.loss(loss.unwrap_or(5));
                let name = match loss {
                    Some(l) => format!("{mode}, 3 paths, {l}% loss"),
                    None => format!("{mode}, 3 paths, 5% loss, path 2 dies mid-stream"),
                };
                let mut c = Cell {
                    name,
                    setup: mode.into(),
                    paths: 3,
                    cipher: "aes-256-gcm".into(),
                    loss_pct: loss.unwrap_or(5),
                    ..Cell::default()
                };
                self.redundancy_stream(&mut c, tunnel, loss.is_none());
                if loss.is_some() {
                    self.rtt(&mut c, tunnel);
                    let saved = self.scale.offered_mbit;
                    self.scale.offered_mbit = &[REDUNDANCY_OFFERED_MBIT];
                    self.throughput(&mut c, tunnel, &[], &[]);
                    self.scale.offered_mbit = saved;
                }
                cells.push(c);
            }
        }
        self.bl.loss(0);
    }

    /// One flow through a redundancy cell: warm-up, then the measured part (with path 2
    /// blackholed halfway if `path_dies`).
    fn redundancy_stream(&mut self, cell: &mut Cell, to: SocketAddr, path_dies: bool) {
        self.progress(&format!("{}: stream", cell.name));
        self.bl.sink.reply.store(true, Ordering::Relaxed);
        let n = self.scale.redundancy_datagrams;
        let first = self.numbers(2 * n);
        let at = |k: u64| Duration::from_secs_f64(k as f64 / REDUNDANCY_PPS as f64);
        let started = Instant::now();
        let h =
            udp_stream(&self.bl.c, true, to, first, 2 * n, REDUNDANCY_SIZE, REDUNDANCY_PPS, Duration::from_millis(500));
        std::thread::sleep(at(n).saturating_sub(started.elapsed()));
        let bytes_before = self.bl.client_tx_bytes();
        if path_dies {
            std::thread::sleep(at(n / 2));
            self.bl.blackhole("c2");
        }
        let r = h.join().expect("stream");
        let bytes = self.bl.client_tx_bytes() - bytes_before;
        cell.wire_per_payload = Some(bytes as f64 / (n as f64 * REDUNDANCY_SIZE as f64));
        let measured = first + n..first + 2 * n;
        let seen = self.bl.sink.seen.lock().expect("lock");
        let got = measured.clone().filter(|k| seen.contains(k)).count();
        cell.residual_loss = Some(1.0 - got as f64 / n as f64);
        if path_dies {
            let arrivals: Vec<Duration> =
                r.arrivals.iter().filter(|(_, k)| measured.contains(k)).map(|(t, _)| *t).collect();
            let gap = arrivals.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
            cell.longest_gap_ms = Some(gap.as_secs_f64() * 1000.0);
        }
    }

    /// An OpenVPN point-to-point link (static key) from the client host to the server host,
    /// the client sending to `remote`; waits until the tunnel answers pings.
    fn openvpn(&mut self, remote: &str, rport: u16) -> Option<[usize; 2]> {
        let key = self.bl.lab.dir.join("openvpn.key");
        if !key.exists() {
            run(std::process::Command::new("openvpn").args(["--genkey", "secret"]).arg(&key));
        }
        let k = key.display().to_string();
        // tun MTU 1360: the encrypted packet (1424 bytes of UDP payload) fits a 1500-byte
        // path directly and through our tunnel (+34) without IP fragmentation
        let common = [
            "--dev",
            "tun",
            "--secret",
            &k,
            "--proto",
            "udp",
            "--cipher",
            "AES-256-CBC",
            "--auth",
            "SHA256",
            "--tun-mtu",
            "1360",
            "--verb",
            "1",
        ];
        let (c, s) = (self.bl.c.clone(), self.bl.s.clone());
        let lport = OPENVPN_PORT.to_string();
        let mut server = common.to_vec();
        server.extend(["--lport", &lport, "--ifconfig", OPENVPN_SERVER_ADDR, OPENVPN_CLIENT_ADDR]);
        let ps = self.bl.lab.spawn(&s, "openvpn-server", Path::new("openvpn"), &server);
        let rport = rport.to_string();
        let mut client = common.to_vec();
        client.extend(["--remote", remote, "--rport", &rport, "--nobind"]);
        client.extend(["--ifconfig", OPENVPN_CLIENT_ADDR, OPENVPN_SERVER_ADDR]);
        let pc = self.bl.lab.spawn(&c, "openvpn-client", Path::new("openvpn"), &client);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if !tests::ping(&c, OPENVPN_SERVER_ADDR, 1, "0.2", &[]).is_empty() {
                return Some([pc, ps]);
            }
        }
        eprintln!("\nOpenVPN did not come up within 15 s; see its logs in {}", self.bl.lab.dir.display());
        self.bl.lab.kill9(pc);
        self.bl.lab.kill9(ps);
        None
    }

    /// Per loss level: TCP over one lossy path without a tunnel, kcptun (fast3) over one
    /// lossy path, OpenVPN over one lossy path, OpenVPN over our tunnel (3 lossy paths), and
    /// our VPN between two peers (3 lossy paths each).
    fn vpn_and_tcp(&mut self, cells: &mut Vec<Cell>) {
        let have_kcptun = installed("kcptun-client") && installed("kcptun-server");
        if !have_kcptun {
            eprintln!("\nkcptun-client/kcptun-server not installed (Debian package kcptun): no kcptun cells");
        }
        let have_openvpn = installed("openvpn");
        if !have_openvpn {
            eprintln!("\nopenvpn not installed (Debian package openvpn): no OpenVPN cells");
        }
        let (c, s) = (self.bl.c.clone(), self.bl.s.clone());
        let any = SocketAddr::from(([0, 0, 0, 0], TCP_PORT));
        let loopback = SocketAddr::from(([127, 0, 0, 1], TCP_PORT));
        for loss in VPN_LOSSES {
            let cell = |name: &str, setup: &str, paths: usize| Cell {
                name: format!("{name}, {loss}% loss"),
                setup: setup.into(),
                paths,
                loss_pct: loss,
                ..Cell::default()
            };
            self.bl.loss(loss);
            let direct = SocketAddr::from(([10, 90, 0, 2], TCP_PORT));
            let one = cell("TCP, one path, no tunnel", "tcp-one-path", 1);
            cells.push(self.tcp_cell(one, &c, &s, direct, any, Some("10.90.0.2")));

            if have_kcptun {
                // a fresh kcptun pair per cell, forwarding to the TCP listener
                let opts = [
                    "--mode", "fast3", "--crypt", "none", "--nocomp", "--sndwnd", "1024", "--rcvwnd", "1024", "--quiet",
                ];
                let kport = format!(":{KCPTUN_PORT}");
                let target = loopback.to_string();
                let mut server = vec!["-l", &kport, "-t", &target];
                server.extend(opts);
                let ks = self.bl.lab.spawn(&s, "kcptun-server", Path::new("kcptun-server"), &server);
                let remote = format!("10.90.0.2:{KCPTUN_PORT}");
                let local = format!("127.0.0.1:{KCPTUN_LOCAL_PORT}");
                let mut client = vec!["-l", &local, "-r", &remote];
                client.extend(opts);
                let kc = self.bl.lab.spawn(&c, "kcptun-client", Path::new("kcptun-client"), &client);
                std::thread::sleep(Duration::from_millis(500));
                let connect = SocketAddr::from(([127, 0, 0, 1], KCPTUN_LOCAL_PORT));
                let k = cell("kcptun fast3, one path", "kcptun-one-path", 1);
                cells.push(self.tcp_cell(k, &c, &s, connect, loopback, None));
                self.bl.lab.kill9(kc);
                self.bl.lab.kill9(ks);
            }

            if have_openvpn {
                let inner =
                    SocketAddr::from((OPENVPN_SERVER_ADDR.parse::<std::net::Ipv4Addr>().expect("literal"), TCP_PORT));
                let mut o = cell("OpenVPN, one path", "openvpn-one-path", 1);
                if let Some(procs) = self.openvpn("10.90.0.2", OPENVPN_PORT) {
                    o = self.tcp_cell(o, &c, &s, inner, any, Some(OPENVPN_SERVER_ADDR));
                    procs.into_iter().for_each(|p| self.bl.lab.kill9(p));
                }
                cells.push(o);
                // the classic mptunnel use: OpenVPN's datagrams through mpclient/mpserver
                self.bl.server(OPENVPN_PORT);
                self.bl.client(3, "aes-256-gcm");
                let mut o = cell("OpenVPN over our tunnel, 3 paths", "openvpn-over-tunnel", 3);
                let listen: SocketAddr = CLIENT_LISTEN.parse().expect("literal");
                if let Some(procs) = self.openvpn(&listen.ip().to_string(), listen.port()) {
                    o = self.tcp_cell(o, &c, &s, inner, any, Some(OPENVPN_SERVER_ADDR));
                    procs.into_iter().for_each(|p| self.bl.lab.kill9(p));
                }
                cells.push(o);
                self.bl.server(SINK_PORT);
                self.bl.client(3, "aes-256-gcm");
            }

            // beside mpclient/mpserver processes (what users run), and with the tunnel
            // embedded in mpvpn (no loopback hop)
            // (duplicating, as the tunnel cells; and embedded with adaptive redundancy)
            for (embedded, redundancy, name, setup) in [
                (false, "duplicate", "VPN peer to peer, 3 paths each", "vpn"),
                (true, "duplicate", "VPN peer to peer, 3 paths each, tunnel embedded", "vpn-embedded"),
                (
                    true,
                    "adaptive",
                    "VPN peer to peer, 3 paths each, tunnel embedded, adaptive",
                    "vpn-embedded-adaptive",
                ),
            ] {
                self.progress(&format!("{name}, {loss}% loss: starting"));
                let tag = format!("bv{}{}{loss}", u8::from(embedded), &redundancy[..1]);
                let v = tests::VpnLab::start_with(&tag, loss, embedded, Some(redundancy));
                v.wait_peer_up("a", Duration::from_secs(20));
                let b = v.wait_peer_up("b", Duration::from_secs(20));
                std::thread::sleep(Duration::from_millis(500));
                let p = cell(name, setup, 3);
                let (from, to) = (v.peer_ns[0].clone(), v.peer_ns[1].clone());
                cells.push(self.tcp_cell(p, &from, &to, SocketAddr::from((b, TCP_PORT)), any, Some(&b.to_string())));
            }
        }
        self.bl.loss(0);
    }

    /// The mesh, in its own lab (a hub `MESH_HUB_DELAY_MS` away from both peers, the
    /// peers next to each other): ping and single-stream TCP peer to peer over a direct
    /// path, then with the same lab without `mesh:` (everything through the hub), and the
    /// direct link's own RTT. Returns the two targets' measurements: added RTT p50 of
    /// the direct path over the link's own, and direct TCP / through-hub TCP.
    fn mesh(&mut self, cells: &mut Vec<Cell>) -> [Option<f64>; 2] {
        let any = SocketAddr::from(([0, 0, 0, 0], TCP_PORT));
        let mut tcp = [None, None];
        let mut rtt = [None, None];
        for (k, mesh) in [true, false].into_iter().enumerate() {
            let what = if mesh { "direct" } else { "through the hub" };
            self.progress(&format!("mesh: peer to peer {what}: starting"));
            let o = tests::MeshOptions { hub_delay_ms: MESH_HUB_DELAY_MS, mesh, ..tests::MeshOptions::default() };
            let m = tests::MeshLab::start(&format!("bm{k}"), o);
            let [_, b] = m.wait_up(Duration::from_secs(30));
            if mesh {
                // the bench reports; it does not gate (a pair still on the relay is said)
                let since = Instant::now();
                while m.via("a") != "direct" && since.elapsed() < Duration::from_secs(15) {
                    std::thread::sleep(Duration::from_millis(100));
                }
                let mut own = Cell {
                    name: "mesh: the direct link itself (underlay ping)".into(),
                    setup: "mesh-link".into(),
                    ..Cell::default()
                };
                let mut ms = tests::ping(&m.peer_ns[0], &m.wan_addr_of(1), PINGS, "0.01", &[]);
                own.probe_loss = Some(1.0 - ms.len() as f64 / f64::from(PINGS));
                own.rtt_ms = percentiles(&mut ms);
                rtt[1] = own.rtt_ms.map(|p| p.p50);
                cells.push(own);
            } else {
                std::thread::sleep(Duration::from_millis(500)); // the peer list
            }
            let name = format!("mesh: peer to peer {what}, hub {MESH_HUB_DELAY_MS} ms away each way");
            let c = Cell { name, setup: if mesh { "mesh-direct" } else { "mesh-hub" }.into(), ..Cell::default() };
            let (from, to) = (m.peer_ns[0].clone(), m.peer_ns[1].clone());
            let b_addr: std::net::Ipv4Addr = b.parse().expect("peer address");
            let c = self.tcp_cell(c, &from, &to, SocketAddr::from((b_addr, TCP_PORT)), any, Some(&b));
            tcp[k] = c.tcp_mbit;
            if mesh {
                rtt[0] = c.rtt_ms.map(|p| p.p50);
                if m.via("a") != "direct" {
                    eprintln!("\nmesh: peer a is not reached directly: the direct cell measured the relay");
                }
            }
            cells.push(c);
        }
        [rtt[0].zip(rtt[1]).map(|(d, l)| d - l), tcp[0].zip(tcp[1]).map(|(d, h)| d / h.max(1e-9))]
    }

    /// One round of the target measurements, interleaved so that the ratios compare
    /// cells measured moments apart: one socat relay and the tunnel over 3 paths (RTT,
    /// 1 Gbit/s offered with CPU), then the tunnel's residual loss at 20% per path.
    fn target_round(&mut self, round: usize) -> [Option<f64>; 4] {
        let relay = SocketAddr::from(([10, 77, 1, 2], RELAY_PORT));
        let tunnel: SocketAddr = CLIENT_LISTEN.parse().expect("literal");
        let saved = self.scale.offered_mbit;
        self.scale.offered_mbit = &saved[saved.len() - 1..];
        self.bl.loss(0);
        let cell = |setup: &str, paths: usize, cipher: &str, loss_pct: u32| Cell {
            name: format!("target round {round}: {setup}"),
            setup: setup.into(),
            paths,
            cipher: cipher.into(),
            loss_pct,
            ..Cell::default()
        };
        let mut socat = cell("socat", 1, "", 0);
        self.rtt(&mut socat, relay);
        let socat_pid = self.bl.lab.pid(self.bl.relay);
        self.throughput(&mut socat, relay, &[("socat".into(), socat_pid)], &[]);
        let mut tun = cell("tunnel", 3, "aes-256-gcm", 0);
        self.rtt(&mut tun, tunnel);
        let pids = [
            ("mpclient".to_string(), self.bl.lab.pid(self.bl.client.expect("client"))),
            ("mpserver".to_string(), self.bl.lab.pid(self.bl.server)),
        ];
        self.throughput(&mut tun, tunnel, &pids, &[]);
        self.bl.loss(20);
        let mut lossy = cell("tunnel", 3, "aes-256-gcm", 20);
        self.residual(&mut lossy, tunnel);
        self.bl.loss(0);
        self.scale.offered_mbit = saved;
        target_measures(&[socat, tun, lossy])
    }

    /// A run of the tunnel (3 paths, 1 Gbit/s offered) under `perf record`, written to
    /// `out/perf.data`; not counted in any cell.
    fn profile(&mut self, out: &Path) {
        self.progress("profile: tunnel 3 paths at 1 Gbit/s under perf");
        self.bl.client(3, "aes-256-gcm");
        self.bl.loss(0);
        self.bl.sink.reply.store(false, Ordering::Relaxed);
        let mut pids = vec![self.bl.lab.pid(self.bl.client.expect("client")), self.bl.lab.pid(self.bl.server)];
        pids.extend(self.bl.bridges.iter().map(|&b| self.bl.lab.pid(b)));
        let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
        let secs = self.scale.throughput_secs;
        let data = out.join("perf.data");
        let mut perf = std::process::Command::new("perf")
            .args(["record", "-q", "-F", "999", "--call-graph", "dwarf,16384", "-o"])
            .arg(&data)
            .args(["-p", &pids.join(","), "--", "sleep", &format!("{}", secs + 0.5)])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("perf");
        std::thread::sleep(Duration::from_millis(300));
        let pps = 1000 * 1_000_000 / (1400 * 8);
        let count = (pps as f64 * secs) as u64;
        let first = self.numbers(count);
        let to: SocketAddr = CLIENT_LISTEN.parse().expect("literal");
        udp_stream(&self.bl.c, true, to, first, count, 1400, pps, Duration::from_millis(300)).join().expect("stream");
        let _ = perf.wait();
    }

    fn failover(&mut self, out: &mut BTreeMap<String, f64>) {
        self.bl.client(3, "aes-256-gcm");
        self.bl.loss(0);
        self.bl.sink.reply.store(true, Ordering::Relaxed);
        let to: SocketAddr = CLIENT_LISTEN.parse().expect("literal");
        for case in ["path blackholed", "mpserver kill -9 + restart"] {
            self.progress(&format!("failover: {case}"));
            let first = self.numbers(3000);
            let h = udp_stream(&self.bl.c, true, to, first, 3000, 64, 1000, Duration::from_millis(1500));
            std::thread::sleep(Duration::from_millis(1500));
            if case.starts_with("path") {
                self.bl.blackhole("c2");
            } else {
                self.bl.server(SINK_PORT);
            }
            let r = h.join().expect("stream");
            let gap = r.arrivals.windows(2).map(|w| w[1].0 - w[0].0).max().unwrap_or_default();
            out.insert(format!("{case}: longest gap ms"), gap.as_secs_f64() * 1000.0);
            out.insert(format!("{case}: datagrams lost of 3000"), (3000 - r.echoed.len()) as f64);
            self.bl.loss(0);
        }
    }
}

fn main() {
    let cli = Cli::parse();
    if cli.hub_scale {
        let out = cli.out.unwrap_or_else(|| PathBuf::from("bench/results/hub-scale"));
        std::fs::create_dir_all(&out).expect("output directory");
        let h = hub_scale::run(&HUB_SCALE_CHECKPOINTS);
        std::fs::write(out.join("hub-scale.json"), serde_json::to_string_pretty(&h).expect("json")).expect("write");
        let md = hub_scale::markdown(&h);
        std::fs::write(out.join("hub-scale.md"), &md).expect("write");
        println!("\n{md}\nwrote {}/hub-scale.json and hub-scale.md", out.display());
        return;
    }
    if let Err(why) = lab_available() {
        eprintln!("mpt-bench: {why}; run as root (see README)");
        std::process::exit(1);
    }
    if cli.hub_failover {
        if std::process::Command::new("etcd").arg("--version").output().is_err() {
            eprintln!("mpt-bench: --hub-failover needs etcd (apt-get install etcd-server)");
            std::process::exit(1);
        }
        let out = cli.out.unwrap_or_else(|| PathBuf::from("bench/results/hub-failover"));
        std::fs::create_dir_all(&out).expect("output directory");
        let h = hub_failover::run(6);
        std::fs::write(out.join("hub-failover.json"), serde_json::to_string_pretty(&h).expect("json")).expect("write");
        let md = hub_failover::markdown(&h);
        std::fs::write(out.join("hub-failover.md"), &md).expect("write");
        println!("\n{md}\nwrote {}/hub-failover.json and hub-failover.md", out.display());
        return;
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let scale = if cli.full { FULL } else { QUICK };
    let date = run(std::process::Command::new("date").arg("+%Y-%m-%d")).trim().to_string();
    let out = cli.out.unwrap_or_else(|| PathBuf::from(format!("bench/results/{date}")));
    std::fs::create_dir_all(&out).expect("output directory");
    let profile = cli.profile.then_some(out.as_path());
    let result = std::panic::catch_unwind(|| bench(scale, &date, profile));
    match result {
        Ok(results) => {
            std::fs::write(out.join("results.json"), serde_json::to_string_pretty(&results).expect("json"))
                .expect("write");
            let md = markdown(&results);
            std::fs::write(out.join("results.md"), &md).expect("write");
            println!("\n{md}");
            println!("wrote {}/results.json and results.md", out.display());
            if cli.profile {
                write_profile(&out);
            }
        }
        Err(_) => std::process::exit(1),
    }
}

/// profile.txt (where the CPU time goes, by process and function) and, with inferno
/// installed, flamegraph.svg, from `out/perf.data`, which is then removed (it is large).
fn write_profile(out: &Path) {
    let data = out.join("perf.data");
    let report = |sort: &str, limit: &str| {
        std::process::Command::new("perf")
            .arg("report")
            .arg("-i")
            .arg(&data)
            .args(["--stdio", "--no-children", "-g", "none", "-q", "--sort", sort, "--percent-limit", limit])
            .output()
            .ok()
            .filter(|r| r.status.success())
            .map(|r| String::from_utf8_lossy(&r.stdout).into_owned())
    };
    match (report("comm,dso", "0.5"), report("comm,dso,sym", "0.4")) {
        (Some(by_object), Some(by_function)) => {
            let text = format!(
                "# perf: tunnel, 3 paths, AES-256-GCM, 1 Gbit/s of 1400-byte UDP offered; samples of mpclient, \
                 mpserver and the three mpbridges (999 Hz)\n\n## By process and object (kernel = system calls, \
                 the network stack and wake-ups)\n\n{by_object}\n## By function\n\n{by_function}"
            );
            std::fs::write(out.join("profile.txt"), text).expect("write profile.txt");
            println!("wrote {}/profile.txt", out.display());
        }
        _ => eprintln!("perf report failed: no profile.txt"),
    }
    if installed("inferno-collapse-perf") && installed("inferno-flamegraph") {
        let svg = out.join("flamegraph.svg");
        let pipeline = format!(
            "perf script -i '{}' 2>/dev/null | inferno-collapse-perf | inferno-flamegraph --title 'tunnel, 3 paths, 1 Gbit/s offered' > '{}'",
            data.display(),
            svg.display()
        );
        match std::process::Command::new("sh").args(["-c", &pipeline]).status() {
            Ok(s) if s.success() => println!("wrote {}", svg.display()),
            _ => eprintln!("flame graph failed"),
        }
    } else {
        eprintln!("inferno not installed (cargo install inferno): no flamegraph.svg");
    }
    let _ = std::fs::remove_file(&data);
    let _ = std::fs::remove_file(out.join("perf.data.old"));
}

fn bench(scale: Scale, date: &str, profile: Option<&Path>) -> Results {
    let started = Instant::now();
    let tunnel_cells = 3 * scale.losses.len() + 1;
    let vpn_steps = if scale.name == "full" { VPN_LOSSES.len() * 8 } else { 0 };
    let redundancy_steps = REDUNDANCY_MODES.len() * (REDUNDANCY_LOSSES.len() * 3 + 1);
    let steps = (2 + tunnel_cells + 3) * (scale.offered_mbit.len() + 2)
        + 6
        + redundancy_steps
        + 5 * scale.target_rounds
        + vpn_steps
        + usize::from(profile.is_some());
    let mut r = Runner { bl: BenchLab::start(), scale, next_number: 1, step: 0, steps, started };
    let mut cells = Vec::new();
    let sink_direct: SocketAddr = SocketAddr::from(([10, 90, 0, 2], SINK_PORT));
    let relay: SocketAddr = SocketAddr::from(([10, 77, 1, 2], RELAY_PORT));
    let tunnel: SocketAddr = CLIENT_LISTEN.parse().expect("literal");

    // baselines at 0% loss: plain veth, one socat relay
    r.bl.loss(0);
    let mut veth = Cell { name: "plain veth".into(), setup: "veth".into(), ..Cell::default() };
    // RTT first in every cell: a throughput run leaves queues and CPU busy for a while
    r.rtt(&mut veth, sink_direct);
    r.throughput(&mut veth, sink_direct, &[], &[]);
    cells.push(veth);
    let socat_pid = r.bl.lab.pid(r.bl.relay);
    let mut socat = Cell { name: "one socat relay".into(), setup: "socat".into(), paths: 1, ..Cell::default() };
    r.rtt(&mut socat, relay);
    r.throughput(&mut socat, relay, &[("socat".into(), socat_pid)], &[]);
    for &loss in scale.losses.iter().filter(|&&l| l > 0) {
        r.bl.loss(loss);
        let mut c = Cell {
            name: format!("one socat relay, {loss}% loss"),
            setup: "socat".into(),
            paths: 1,
            loss_pct: loss,
            ..Cell::default()
        };
        r.residual(&mut c, relay);
        cells.push(c);
    }
    cells.insert(1, socat);

    // the tunnel: 1-3 paths through mpbridge bridges, each loss level, AES-256-GCM;
    // ChaCha20-Poly1305 at 3 paths without loss
    let mut configs: Vec<(usize, &str, u32)> = Vec::new();
    for paths in 1..=3 {
        for &loss in scale.losses {
            configs.push((paths, "aes-256-gcm", loss));
        }
    }
    configs.push((3, "chacha20-poly1305", 0));
    let mut current = (0, "");
    for (paths, cipher, loss) in configs {
        if current != (paths, cipher) {
            r.bl.client(paths, cipher);
            current = (paths, cipher);
        }
        r.bl.loss(loss);
        let mut c = Cell {
            name: format!("tunnel {paths} path{}, {cipher}, {loss}% loss", if paths > 1 { "s" } else { "" }),
            setup: "tunnel".into(),
            paths,
            cipher: cipher.into(),
            loss_pct: loss,
            ..Cell::default()
        };
        r.rtt(&mut c, tunnel);
        if loss == 0 {
            let pids = vec![
                ("mpclient".to_string(), r.bl.lab.pid(r.bl.client.expect("client"))),
                ("mpserver".to_string(), r.bl.lab.pid(r.bl.server)),
            ];
            let bridges: Vec<(String, u32)> =
                (0..paths).map(|i| (format!("mpbridge-b{}", i + 1), r.bl.lab.pid(r.bl.bridges[i]))).collect();
            r.throughput(&mut c, tunnel, &pids, &bridges);
        } else {
            r.residual(&mut c, tunnel);
        }
        cells.push(c);
    }
    // heterogeneous paths, 3 paths, AES-256-GCM
    let heterogeneous = |name: &str| Cell {
        name: name.into(),
        setup: "heterogeneous".into(),
        paths: 3,
        cipher: "aes-256-gcm".into(),
        ..Cell::default()
    };
    r.bl.client(3, "aes-256-gcm");
    r.bl.loss(0);
    r.bl.bridge_delays(&[20, 40, 60]);
    r.bl.client(3, "aes-256-gcm");
    let mut c = heterogeneous("tunnel 3 paths, delays 20/40/60 ms each way");
    r.rtt(&mut c, tunnel);
    cells.push(c);
    r.bl.bridge_delays(&[0, 0, 0]);
    r.bl.client(3, "aes-256-gcm");
    r.bl.rates(&[10, 50, 100]);
    let mut c = heterogeneous("tunnel 3 paths, rates 10/50/100 Mbit/s");
    let saved = r.scale.offered_mbit;
    r.scale.offered_mbit = &[10, 50, 100, 200];
    r.rtt(&mut c, tunnel);
    r.throughput(&mut c, tunnel, &[], &[]);
    r.scale.offered_mbit = saved;
    cells.push(c);
    r.bl.rates(&[0, 0, 0]);
    r.bl.blackhole("c2");
    let mut c = heterogeneous("tunnel 3 paths, path 2 dead");
    std::thread::sleep(Duration::from_millis(1200));
    r.rtt(&mut c, tunnel);
    r.throughput(&mut c, tunnel, &[], &[]);
    cells.push(c);
    r.bl.loss(0);

    if let Some(out) = profile {
        r.profile(out);
    }
    let mut failover = BTreeMap::new();
    r.failover(&mut failover);
    let mut vpn = Vec::new();
    if scale.name == "full" {
        r.vpn_and_tcp(&mut vpn);
    }
    let mut mesh = Vec::new();
    let mesh_measured = r.mesh(&mut mesh);
    let mut redundancy = Vec::new();
    r.redundancy(&mut redundancy);
    eprintln!();
    r.bl.client(3, "aes-256-gcm");
    let mut rounds = Vec::new();
    for round in 1..=scale.target_rounds {
        rounds.push(r.target_round(round));
    }
    Results {
        date: date.into(),
        mode: scale.name.into(),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cells,
        failover,
        vpn,
        mesh,
        redundancy,
        hub_scale: (scale.name == "full").then(|| hub_scale::run(&HUB_SCALE_CHECKPOINTS)),
        targets: targets(&rounds).into_iter().chain(mesh_targets(mesh_measured)).collect(),
    }
}

/// The mesh's targets, from one measurement each.
fn mesh_targets(measured: [Option<f64>; 2]) -> Vec<Target> {
    MESH_TARGETS
        .iter()
        .zip(measured)
        .filter_map(|(&(what, limit, at_least), m)| {
            let measured = m?;
            let met = if at_least { measured >= limit } else { measured < limit };
            Some(Target { what: what.into(), measured, rounds: vec![measured], limit, met })
        })
        .collect()
}

fn find(cells: &[Cell], f: impl Fn(&Cell) -> bool) -> Option<&Cell> {
    cells.iter().find(|c| f(c))
}

/// The issue's targets: what, limit, and whether the measurement must reach the limit
/// (at least) or stay below it.
const TARGETS: [(&str, f64, bool); 4] = [
    ("3-path delivered throughput / one socat relay's, 1 Gbit/s offered", 0.5, true),
    ("CPU s/GB of mpclient+mpserver / socat's, 1 Gbit/s offered", 3.0, false),
    ("added RTT p50 over one socat relay (ms)", 0.15, false),
    ("3 paths at 20% loss: residual loss / 0.2^3", 1.2, false),
];

/// One round's measurement for each of TARGETS, from its cells.
fn target_measures(cells: &[Cell]) -> [Option<f64>; 4] {
    let socat = find(cells, |c| c.setup == "socat" && c.loss_pct == 0);
    let tun3 = find(cells, |c| c.setup == "tunnel" && c.paths == 3 && c.loss_pct == 0 && c.cipher == "aes-256-gcm");
    let lossy = find(cells, |c| c.setup == "tunnel" && c.paths == 3 && c.loss_pct == 20);
    let top = |c: &Cell| c.throughput.iter().next_back().map(|(_, v)| *v);
    [
        socat.zip(tun3).and_then(|(s, m)| Some(top(m)? / top(s)?.max(1e-9))),
        socat.zip(tun3).and_then(|(s, m)| Some(m.cpu_s_per_gb? / s.cpu_s_per_gb?)),
        socat.zip(tun3).and_then(|(s, m)| Some(m.rtt_ms?.p50 - s.rtt_ms?.p50)),
        lossy.and_then(|m| m.residual_loss).map(|l| l / 0.2f64.powi(3)),
    ]
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Each target's median over the rounds that measured it.
fn targets(rounds: &[[Option<f64>; 4]]) -> Vec<Target> {
    TARGETS
        .iter()
        .enumerate()
        .filter_map(|(k, &(what, limit, at_least))| {
            let values: Vec<f64> = rounds.iter().filter_map(|r| r[k]).collect();
            if values.is_empty() {
                return None;
            }
            let measured = median(&values);
            let met = if at_least { measured >= limit } else { measured < limit };
            Some(Target { what: what.into(), measured, rounds: values, limit, met })
        })
        .collect()
}

fn markdown(r: &Results) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "# mpt-bench {} ({} mode, {} CPUs)\n", r.date, r.mode, r.cpus);
    let rates: Vec<u64> = r
        .cells
        .iter()
        .flat_map(|c| c.throughput.keys().copied())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let _ = write!(s, "| cell |");
    for m in &rates {
        let _ = write!(s, " {m}M offered |");
    }
    let _ = writeln!(s, " residual loss | RTT p50 / p99 / p99.9 ms | probe loss | CPU s/GB | peak RSS KB |");
    let _ = write!(s, "|---|");
    for _ in &rates {
        let _ = write!(s, "---|");
    }
    let _ = writeln!(s, "---|---|---|---|---|");
    for c in &r.cells {
        let _ = write!(s, "| {} |", c.name);
        for m in &rates {
            match (c.throughput.get(m), c.throughput_loss.get(m)) {
                (Some(d), Some(l)) => {
                    let _ = write!(s, " {d:.0} ({:.1}% lost) |", l * 100.0);
                }
                _ => {
                    let _ = write!(s, " |");
                }
            }
        }
        let rl = c.residual_loss.map_or(String::new(), |l| format!("{:.3}%", l * 100.0));
        let rtt = c.rtt_ms.map_or(String::new(), |p| format!("{:.3} / {:.3} / {:.3}", p.p50, p.p99, p.p999));
        let pl = c.probe_loss.map_or(String::new(), |l| format!("{:.1}%", l * 100.0));
        let cpu = c.cpu_s_per_gb.map_or(String::new(), |v| format!("{v:.2}"));
        let rss: Vec<String> = c.peak_rss_kb.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(s, " {rl} | {rtt} | {pl} | {cpu} | {} |", rss.join(", "));
    }
    let _ = writeln!(s, "\n## CPU seconds per GB delivered, per process (highest offered rate)\n");
    for c in r.cells.iter().filter(|c| !c.cpu_s_per_gb_by_process.is_empty()) {
        let parts: Vec<String> = c.cpu_s_per_gb_by_process.iter().map(|(k, v)| format!("{k} {v:.2}")).collect();
        let _ = writeln!(s, "- {}: {}", c.name, parts.join(", "));
    }
    let _ = writeln!(s, "\n## Failover (3 paths, 1000 datagrams/s)\n");
    for (k, v) in &r.failover {
        let _ = writeln!(s, "- {k}: {v:.1}");
    }
    for (title, cells) in [("TCP through each setup", &r.vpn), ("The mesh: peer to peer", &r.mesh)] {
        if cells.is_empty() {
            continue;
        }
        let _ = writeln!(
            s,
            "\n## {title} (single stream, {TCP_SECS} s; request/response: {RR_COUNT} x 64 bytes, \
             one every {} ms)\n\n| cell | ping p50 / p99 ms | ping loss | TCP req/resp p50 / p99 / p99.9 ms | \
             answered | TCP Mbit/s |\n|---|---|---|---|---|---|",
            RR_INTERVAL.as_millis()
        );
        for c in cells {
            let rtt = c.rtt_ms.map_or("-".into(), |p| format!("{:.2} / {:.2}", p.p50, p.p99));
            let pl = c.probe_loss.map_or("-".into(), |l| format!("{:.1}%", l * 100.0));
            let rr = c.rr_ms.map_or("-".into(), |p| format!("{:.2} / {:.2} / {:.2}", p.p50, p.p99, p.p999));
            let answered = c.rr_answered.map_or("-".into(), |n| format!("{n}/{RR_COUNT}"));
            let tcp = c.tcp_mbit.map_or("-".into(), |m| format!("{m:.1}"));
            let _ = writeln!(s, "| {} | {rtt} | {pl} | {rr} | {answered} | {tcp} |", c.name);
        }
    }
    if !r.redundancy.is_empty() {
        let _ = writeln!(
            s,
            "\n## Redundancy modes (3 paths; one flow of {REDUNDANCY_SIZE}-byte datagrams at {REDUNDANCY_PPS}/s, \
             measured after as many of warm-up; wire bytes are IP packets: IP/UDP headers, probes and receipts included)\n\n\
             | cell | wire bytes / payload byte | residual loss | echo RTT p50 / p99 ms | \
             1400-byte UDP at {REDUNDANCY_OFFERED_MBIT}M offered | longest gap ms |\n|---|---|---|---|---|---|"
        );
        for c in &r.redundancy {
            let wire = c.wire_per_payload.map_or("-".into(), |v| format!("{v:.2}"));
            let rl = c.residual_loss.map_or("-".into(), |l| format!("{:.3}%", l * 100.0));
            let rtt = c.rtt_ms.map_or("-".into(), |p| format!("{:.2} / {:.2}", p.p50, p.p99));
            let tput = c.throughput.get(&REDUNDANCY_OFFERED_MBIT).map_or("-".into(), |d| format!("{d:.0} Mbit/s"));
            let gap = c.longest_gap_ms.map_or("-".into(), |g| format!("{g:.0}"));
            let _ = writeln!(s, "| {} | {wire} | {rl} | {rtt} | {tput} | {gap} |", c.name);
        }
    }
    if let Some(h) = &r.hub_scale {
        let _ = write!(s, "\n{}", hub_scale::markdown(h));
    }
    let _ = writeln!(
        s,
        "\n## Targets (median of {} interleaved rounds)\n\n| target | median | rounds | limit | met |\n|---|---|---|---|---|",
        r.targets.iter().map(|t| t.rounds.len()).max().unwrap_or(0)
    );
    for t in &r.targets {
        let rounds: Vec<String> = t.rounds.iter().map(|v| format!("{v:.3}")).collect();
        let met = if t.met { "yes" } else { "**no**" };
        let _ = writeln!(s, "| {} | {:.3} | {} | {} | {met} |", t.what, t.measured, rounds.join(", "), t.limit);
    }
    s
}
