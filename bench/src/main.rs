//! `mpt-bench`: measures the tunnel against plain baselines in one namespace lab.
//!
//! Lab: a client host with three links to three bridge hosts and one direct link to the
//! server host. Bridge 1 runs a socat relay to the sink (the one-relay baseline) and an
//! mpbridge to mpserver; bridges 2 and 3 run mpbridge. The server host runs mpserver and
//! a UDP sink/echo. Loss is nftables on the client's links, per direction. Every cell is
//! measured with the same load generator in the same run; the lab is deleted at the end
//! (also on failure or Ctrl-C).
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
}

#[derive(Clone, Copy)]
struct Scale {
    name: &'static str,
    throughput_secs: f64,
    rtt_probes: u64,
    loss_datagrams: u64,
    losses: &'static [u32],
    offered_mbit: &'static [u64],
}

const QUICK: Scale = Scale {
    name: "quick",
    throughput_secs: 1.0,
    rtt_probes: 400,
    loss_datagrams: 5_000,
    losses: &[0, 20],
    offered_mbit: &[10, 100, 500, 1000],
};
const FULL: Scale = Scale {
    name: "full",
    throughput_secs: 3.0,
    rtt_probes: 1000,
    loss_datagrams: 20_000,
    losses: &[0, 5, 20],
    offered_mbit: &[10, 100, 500, 1000],
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
    measured: f64,
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
    targets: Vec<Target>,
}

const SINK_PORT: u16 = 7000;
const RELAY_PORT: u16 = 5000;
const TUNNEL_PORT: u16 = 4000;
const CLIENT_LISTEN: &str = "127.0.0.1:3000";

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
        let c = lab.add_ns("c");
        let s = lab.add_ns("s");
        lab.link(&c, "cd", "10.90.0.1", &s, "sd", "10.90.0.2");
        let mut relay = 0;
        let mut bridges = Vec::new();
        let mut bridge_ns = Vec::new();
        for i in 1..=3 {
            let b = lab.add_ns(&format!("b{i}"));
            bridge_ns.push(b.clone());
            lab.link(&c, &format!("c{i}"), &format!("10.77.{i}.1"), &b, "toc", &format!("10.77.{i}.2"));
            lab.link(&b, "tos", &format!("10.78.{i}.1"), &s, &format!("s{i}"), &format!("10.78.{i}.2"));
            let to = format!("10.78.{i}.2:{TUNNEL_PORT}");
            let bridge = lab.spawn(
                &b,
                &format!("mpbridge-b{i}"),
                &bin("mpbridge"),
                &["--listen", &format!("0.0.0.0:{TUNNEL_PORT}"), "--to", &to],
            );
            bridges.push(bridge);
            if i == 1 {
                let listen = format!("UDP4-LISTEN:{RELAY_PORT},fork,reuseaddr");
                let to = format!("UDP4:10.78.1.2:{SINK_PORT}");
                relay = lab.spawn(&b, "socat-relay", Path::new("socat"), &["-T", "60", &listen, &to]);
            }
        }
        let sink = Echo::start(&s, SocketAddr::from(([0, 0, 0, 0], SINK_PORT)));
        let key = lab.dir.join("tunnel.key");
        run(std::process::Command::new(bin("mpserver")).arg("genkey").arg(&key));
        let k = key.display().to_string();
        let ctl = lab.dir.join("mpserver.sock").display().to_string();
        let port = TUNNEL_PORT.to_string();
        let sink_port = SINK_PORT.to_string();
        let server = lab.spawn(
            &s,
            "mpserver",
            &bin("mpserver"),
            &["--key-file", &k, "--control", &ctl, &port, "127.0.0.1", &sink_port],
        );
        Self { lab, c, s, sink, server, client: None, relay, bridges, bridge_ns, key }
    }

    /// (Re)starts mpclient with the first `paths` bridges and `cipher`.
    fn client(&mut self, paths: usize, cipher: &str) {
        if let Some(old) = self.client.take() {
            self.lab.kill9(old);
        }
        let yaml = self.lab.dir.join("client.yaml");
        let list: String = (1..=paths).map(|i| format!("  - remote: 10.77.{i}.2:{TUNNEL_PORT}\n")).collect();
        let ctl = self.lab.dir.join("mpclient.sock");
        std::fs::write(
            &yaml,
            format!(
                "listen: {CLIENT_LISTEN}\nkey_file: {}\ncipher: {cipher}\ncontrol_socket: {}\nstats_interval_secs: 0\npaths:\n{list}",
                self.key.display(),
                ctl.display()
            ),
        )
        .expect("client.yaml");
        let c = self.c.clone();
        self.client = Some(self.lab.spawn(&c, "mpclient", &bin("mpclient"), &["-c", &yaml.display().to_string()]));
        std::thread::sleep(Duration::from_millis(200));
    }

    /// Loss on the client's bridge links 1..=n (and the direct link), each direction.
    fn loss(&self, pct: u32) {
        let rule = |dir: &str, ifname: &str| {
            if pct == 0 {
                String::new()
            } else {
                format!("    {dir} \"{ifname}\" numgen random mod 100 < {pct} drop\n")
            }
        };
        let ifs = ["c1", "c2", "c3", "cd"];
        let out: String = ifs.iter().map(|i| rule("oifname", i)).collect();
        let inp: String = ifs.iter().map(|i| rule("iifname", i)).collect();
        self.lab.nft(
            &self.c,
            &format!("table inet lab\ndelete table inet lab\ntable inet lab {{\n  chain o {{\n    type filter hook output priority 0; policy accept;\n{out}  }}\n  chain i {{\n    type filter hook input priority 0; policy accept;\n{inp}  }}\n}}\n"),
        );
    }

    /// Restarts the mpbridges, each with its lab delay (ms, each direction; 0 = none).
    fn bridge_delays(&mut self, delays_ms: &[u64]) {
        for (i, d) in delays_ms.iter().enumerate() {
            self.lab.kill9(self.bridges[i]);
            let ns = self.bridge_ns[i].clone();
            let to = format!("10.78.{}.2:{TUNNEL_PORT}", i + 1);
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
        self.lab.nft(
            &self.c,
            &format!("table inet lab\ndelete table inet lab\ntable inet lab {{\n  chain o {{\n    type filter hook output priority 0;\n    oifname \"{ifname}\" drop\n  }}\n  chain i {{\n    type filter hook input priority 0;\n    iifname \"{ifname}\" drop\n  }}\n}}\n"),
        );
    }
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// CPU seconds (user + system) of `pid` and all its descendants.
fn cpu_seconds(pid: u32) -> f64 {
    let mut total = 0.0;
    let mut stack = vec![pid];
    let all: Vec<(u32, u32, f64)> = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(|p| {
                    let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
                    let rest = stat.rsplit_once(')')?.1;
                    let f: Vec<&str> = rest.split_whitespace().collect();
                    let ppid = f.get(1)?.parse().ok()?;
                    let t = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
                    Some((p, ppid, t / clk_tck()))
                })
                .collect()
        })
        .unwrap_or_default();
    while let Some(p) = stack.pop() {
        for &(q, ppid, t) in &all {
            if q == p {
                total += t;
            }
            if ppid == p {
                stack.push(q);
            }
        }
    }
    total
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
            let cpu0: f64 = cpu_pids.iter().map(|(_, p)| cpu_seconds(*p)).sum();
            let each0: Vec<f64> = cpu_pids.iter().chain(extra_pids).map(|(_, p)| cpu_seconds(*p)).collect();
            udp_stream(&self.bl.c, true, to, first, count, 1400, pps, Duration::from_millis(300))
                .join()
                .expect("stream");
            let cpu = cpu_pids.iter().map(|(_, p)| cpu_seconds(*p)).sum::<f64>() - cpu0;
            let got = self.bl.sink.packets.load(Ordering::Relaxed) - p0;
            let bytes = self.bl.sink.bytes.load(Ordering::Relaxed) - b0;
            cell.throughput.insert(mbit, bytes as f64 * 8.0 / self.scale.throughput_secs / 1e6);
            cell.throughput_loss.insert(mbit, 1.0 - got as f64 / count as f64);
            if mbit == *self.scale.offered_mbit.last().expect("rates") && bytes > 0 {
                let gb = bytes as f64 / 1e9;
                if !cpu_pids.is_empty() {
                    cell.cpu_s_per_gb = Some(cpu / gb);
                }
                for ((name, pid), before) in cpu_pids.iter().chain(extra_pids).zip(each0) {
                    cell.cpu_s_per_gb_by_process.insert(name.clone(), (cpu_seconds(*pid) - before) / gb);
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

    /// VPN peers vs TCP over one lossy path vs kcptun over one lossy path, per loss level.
    fn vpn_and_tcp(&mut self, cells: &mut Vec<Cell>) {
        const SECS: f64 = 5.0;
        const MAX_BYTES: usize = 256 << 20;
        let have_kcptun = std::process::Command::new("sh")
            .args(["-c", "command -v kcptun-client && command -v kcptun-server"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !have_kcptun {
            eprintln!("\nkcptun-client/kcptun-server not installed (Debian package kcptun): no kcptun cells");
        }
        for (k, &loss) in [0u32, 5, 10, 20].iter().enumerate() {
            self.progress(&format!("TCP over one path, {loss}% loss"));
            self.bl.loss(loss);
            let mut ms = tests::ping(&self.bl.c, "10.90.0.2", 200, "0.01", &[]);
            let port = 7110 + k as u16 * 3;
            let tcp = tests::tcp_goodput(
                &self.bl.c,
                SocketAddr::from(([10, 90, 0, 2], port)),
                &self.bl.s,
                SocketAddr::from(([0, 0, 0, 0], port)),
                MAX_BYTES,
                SECS,
            );
            cells.push(Cell {
                name: format!("TCP, one path, no tunnel, {loss}% loss"),
                setup: "tcp-one-path".into(),
                paths: 1,
                loss_pct: loss,
                probe_loss: Some(1.0 - ms.len() as f64 / 200.0),
                rtt_ms: percentiles(&mut ms),
                tcp_mbit: Some(tcp),
                ..Cell::default()
            });
            if have_kcptun {
                self.progress(&format!("kcptun fast3 over one path, {loss}% loss"));
                // a fresh kcptun pair per cell
                let opts = [
                    "--mode", "fast3", "--crypt", "none", "--nocomp", "--sndwnd", "1024", "--rcvwnd", "1024", "--quiet",
                ];
                let (c, s) = (self.bl.c.clone(), self.bl.s.clone());
                let kport = format!(":{}", 29900 + k);
                let mut server = vec!["-l", &kport, "-t", "127.0.0.1:7102"];
                server.extend(opts);
                let ks = self.bl.lab.spawn(&s, "kcptun-server", Path::new("kcptun-server"), &server);
                let remote = format!("10.90.0.2:{}", 29900 + k);
                let mut client = vec!["-l", "127.0.0.1:12948", "-r", &remote];
                client.extend(opts);
                let kc = self.bl.lab.spawn(&c, "kcptun-client", Path::new("kcptun-client"), &client);
                std::thread::sleep(Duration::from_millis(500));
                let tcp = tests::tcp_goodput(
                    &self.bl.c,
                    SocketAddr::from(([127, 0, 0, 1], 12948)),
                    &self.bl.s,
                    SocketAddr::from(([127, 0, 0, 1], 7102)),
                    MAX_BYTES,
                    SECS,
                );
                self.bl.lab.kill9(kc);
                self.bl.lab.kill9(ks);
                cells.push(Cell {
                    name: format!("kcptun fast3, one path, {loss}% loss"),
                    setup: "kcptun-one-path".into(),
                    paths: 1,
                    loss_pct: loss,
                    tcp_mbit: Some(tcp),
                    ..Cell::default()
                });
            }
            self.progress(&format!("VPN, 2 peers, 3 paths each, {loss}% loss"));
            let v = tests::VpnLab::start(&format!("bv{loss}"), loss, false);
            v.wait_peer_up("a", Duration::from_secs(20));
            let b = v.wait_peer_up("b", Duration::from_secs(20));
            std::thread::sleep(Duration::from_millis(500));
            let mut ms = v.ping(0, &b.to_string(), 200, "0.01", &[]);
            let tcp = tests::tcp_goodput(
                &v.peer_ns[0],
                SocketAddr::from((b, port + 1)),
                &v.peer_ns[1],
                SocketAddr::from(([0, 0, 0, 0], port + 1)),
                MAX_BYTES,
                SECS,
            );
            cells.push(Cell {
                name: format!("VPN peer to peer, 3 paths each, {loss}% loss"),
                setup: "vpn".into(),
                paths: 3,
                loss_pct: loss,
                probe_loss: Some(1.0 - ms.len() as f64 / 200.0),
                rtt_ms: percentiles(&mut ms),
                tcp_mbit: Some(tcp),
                ..Cell::default()
            });
        }
        self.bl.loss(0);
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
                self.bl.lab.kill9(self.bl.server);
                let k = self.bl.key.display().to_string();
                let ctl = self.bl.lab.dir.join("mpserver.sock").display().to_string();
                let s = self.bl.s.clone();
                self.bl.server = self.bl.lab.spawn(
                    &s,
                    "mpserver",
                    &bin("mpserver"),
                    &["--key-file", &k, "--control", &ctl, "4000", "127.0.0.1", "7000"],
                );
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
    if let Err(why) = lab_available() {
        eprintln!("mpt-bench: {why}; run as root (see README)");
        std::process::exit(1);
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let scale = if cli.full { FULL } else { QUICK };
    let date = run(std::process::Command::new("date").arg("+%Y-%m-%d")).trim().to_string();
    let out = cli.out.unwrap_or_else(|| PathBuf::from(format!("bench/results/{date}")));
    let result = std::panic::catch_unwind(|| bench(scale, &date));
    match result {
        Ok(results) => {
            std::fs::create_dir_all(&out).expect("output directory");
            std::fs::write(out.join("results.json"), serde_json::to_string_pretty(&results).expect("json"))
                .expect("write");
            let md = markdown(&results);
            std::fs::write(out.join("results.md"), &md).expect("write");
            println!("\n{md}");
            println!("wrote {}/results.json and results.md", out.display());
        }
        Err(_) => std::process::exit(1),
    }
}

fn bench(scale: Scale, date: &str) -> Results {
    let started = Instant::now();
    let tunnel_cells = 3 * scale.losses.len() + 1;
    let vpn_steps = if scale.name == "full" { 12 } else { 0 };
    let steps = (2 + tunnel_cells + 3) * (scale.offered_mbit.len() + 2) + 2 + vpn_steps;
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
    r.bl.client(3, "aes-256-gcm");
    r.bl.loss(0);
    r.bl.bridge_delays(&[20, 40, 60]);
    r.bl.client(3, "aes-256-gcm");
    let mut c = Cell {
        name: "tunnel 3 paths, delays 20/40/60 ms each way".into(),
        setup: "heterogeneous".into(),
        paths: 3,
        cipher: "aes-256-gcm".into(),
        ..Cell::default()
    };
    r.rtt(&mut c, tunnel);
    cells.push(c);
    r.bl.bridge_delays(&[0, 0, 0]);
    r.bl.client(3, "aes-256-gcm");
    r.bl.rates(&[10, 50, 100]);
    let mut c = Cell {
        name: "tunnel 3 paths, rates 10/50/100 Mbit/s".into(),
        setup: "heterogeneous".into(),
        paths: 3,
        cipher: "aes-256-gcm".into(),
        ..Cell::default()
    };
    let saved = r.scale.offered_mbit;
    r.scale.offered_mbit = &[10, 50, 100, 200];
    r.rtt(&mut c, tunnel);
    r.throughput(&mut c, tunnel, &[], &[]);
    r.scale.offered_mbit = saved;
    cells.push(c);
    r.bl.rates(&[0, 0, 0]);
    r.bl.blackhole("c2");
    let mut c = Cell {
        name: "tunnel 3 paths, path 2 dead".into(),
        setup: "heterogeneous".into(),
        paths: 3,
        cipher: "aes-256-gcm".into(),
        ..Cell::default()
    };
    std::thread::sleep(Duration::from_millis(1200));
    r.rtt(&mut c, tunnel);
    r.throughput(&mut c, tunnel, &[], &[]);
    cells.push(c);
    r.bl.loss(0);

    let mut failover = BTreeMap::new();
    r.failover(&mut failover);
    let mut vpn = Vec::new();
    if scale.name == "full" {
        r.vpn_and_tcp(&mut vpn);
    }
    eprintln!();
    let mut targets = targets(&cells);
    targets.extend(vpn_targets(&vpn));
    Results {
        date: date.into(),
        mode: scale.name.into(),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cells,
        failover,
        vpn,
        targets,
    }
}

fn find(cells: &[Cell], f: impl Fn(&Cell) -> bool) -> Option<&Cell> {
    cells.iter().find(|c| f(c))
}

fn targets(cells: &[Cell]) -> Vec<Target> {
    let mut t = Vec::new();
    let socat = find(cells, |c| c.setup == "socat" && c.loss_pct == 0);
    let tun3 = find(cells, |c| c.setup == "tunnel" && c.paths == 3 && c.loss_pct == 0 && c.cipher == "aes-256-gcm");
    if let (Some(s), Some(m)) = (socat, tun3) {
        // at the highest offered rate (1 Gbit/s)
        let top = |c: &Cell| c.throughput.iter().next_back().map_or(0.0, |(_, v)| *v);
        let ratio = top(m) / top(s).max(1e-9);
        t.push(Target {
            what: "3-path delivered throughput / one socat relay's, 1 Gbit/s offered".into(),
            measured: ratio,
            limit: 0.5,
            met: ratio >= 0.5,
        });
        if let (Some(cm), Some(cs)) = (m.cpu_s_per_gb, s.cpu_s_per_gb) {
            let ratio = cm / cs;
            t.push(Target {
                what: "CPU s/GB of mpclient+mpserver / socat's".into(),
                measured: ratio,
                limit: 3.0,
                met: ratio <= 3.0,
            });
        }
        if let (Some(rm), Some(rs)) = (m.rtt_ms, s.rtt_ms) {
            let added = rm.p50 - rs.p50;
            t.push(Target {
                what: "added RTT p50 over one socat relay (ms)".into(),
                measured: added,
                limit: 0.15,
                met: added < 0.15,
            });
        }
    }
    if let Some(m) = find(cells, |c| c.setup == "tunnel" && c.paths == 3 && c.loss_pct == 20) {
        if let Some(l) = m.residual_loss {
            let ratio = l / 0.2f64.powi(3);
            t.push(Target {
                what: "3 paths at 20%: residual loss / 0.2^3".into(),
                measured: ratio,
                limit: 1.2,
                met: ratio <= 1.2,
            });
        }
    }
    t
}

fn vpn_targets(vpn: &[Cell]) -> Vec<Target> {
    let mut t = Vec::new();
    let at = |setup: &str, loss: u32| vpn.iter().find(|c| c.setup == setup && c.loss_pct == loss);
    for (loss, limit) in [(10, 3.0), (20, 10.0)] {
        if let Some(p) = at("vpn", loss).and_then(|c| c.rtt_ms) {
            t.push(Target {
                what: format!("VPN ping p99 at {loss}% loss per path (ms; request/response stand-in)"),
                measured: p.p99,
                limit,
                met: p.p99 <= limit,
            });
        }
    }
    // kcptun under loss has delivered ~0 in this harness (not understood yet): a ratio
    // against that would be meaningless, so it is only computed from a working cell
    if let (Some(v), Some(k)) = (
        at("vpn", 10).and_then(|c| c.tcp_mbit),
        at("kcptun-one-path", 10).and_then(|c| c.tcp_mbit).filter(|&k| k >= 1.0),
    ) {
        let ratio = v / k.max(1e-9);
        t.push(Target {
            what: "VPN TCP goodput at 10% / kcptun's on one path".into(),
            measured: ratio,
            limit: 1.0,
            met: ratio >= 1.0,
        });
    }
    t
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
    if !r.vpn.is_empty() {
        let _ = writeln!(s, "\n## VPN and TCP (single stream, 5 s)\n\n| cell | ping p50 / p99 ms | ping loss | TCP Mbit/s |\n|---|---|---|---|");
        for c in &r.vpn {
            let rtt = c.rtt_ms.map_or("-".into(), |p| format!("{:.2} / {:.2}", p.p50, p.p99));
            let pl = c.probe_loss.map_or("-".into(), |l| format!("{:.1}%", l * 100.0));
            let tcp = c.tcp_mbit.map_or("-".into(), |m| format!("{m:.1}"));
            let _ = writeln!(s, "| {} | {rtt} | {pl} | {tcp} |", c.name);
        }
    }
    if r.vpn.iter().any(|c| c.setup == "kcptun-one-path" && c.tcp_mbit.is_some_and(|m| m < 1.0)) {
        let _ = writeln!(
            s,
            "\nkcptun cells below 1 Mbit/s are a harness problem under investigation, not kcptun's real \
             performance; no ratio is computed from them."
        );
    }
    let _ = writeln!(s, "\n## Targets\n\n| target | measured | limit | met |\n|---|---|---|---|");
    for t in &r.targets {
        let _ =
            writeln!(s, "| {} | {:.3} | {} | {} |", t.what, t.measured, t.limit, if t.met { "yes" } else { "**no**" });
    }
    s
}
