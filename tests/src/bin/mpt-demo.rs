//! `mpt-demo`: the multipath tunnel working end to end in network namespaces.
//!
//! Builds a client host, three bridge hosts (socat, mpbridge, mpbridge) and a server host
//! with a UDP echo target, puts 10% loss on every path in each direction, streams
//! datagrams through the tunnel and prints what arrived, the status tables, a path dying
//! and a server restart; then the VPN, the mesh and several hubs on etcd. Everything it
//! creates is deleted when it ends (also on Ctrl-C).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tests::{lab_available, udp_stream, TunnelLab, CLIENT_LISTEN};

static STOP: AtomicBool = AtomicBool::new(false);
/// Standard output went away (`mpt-demo | head`): stop, clean up, say nothing more.
static READER_GONE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn check_stop() {
    if STOP.load(Ordering::SeqCst) {
        println!("\ninterrupted; cleaning up");
        // unwinding drops the lab: processes killed, namespaces deleted
        panic!("interrupted");
    }
}

const LOSS_PCT: u32 = 10;

fn main() {
    if let Err(why) = lab_available() {
        eprintln!("mpt-demo: {why}; run it as root on Linux (see README)");
        std::process::exit(1);
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    // a reader that went away, or Ctrl-C, ends the demo by unwinding (the labs are deleted
    // on the way) without a panic message or the processes' logs
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload.downcast_ref::<String>().map(String::as_str).or(payload.downcast_ref::<&str>().copied());
        if msg.is_some_and(|m| m.contains("Broken pipe")) {
            READER_GONE.store(true, Ordering::SeqCst);
        }
        if READER_GONE.load(Ordering::SeqCst) || STOP.load(Ordering::SeqCst) {
            tests::QUIET_TEARDOWN.store(true, Ordering::SeqCst);
            return;
        }
        default_hook(info);
    }));
    let result = std::panic::catch_unwind(demo);
    let code = match result {
        Ok(()) => 0,
        Err(_) if READER_GONE.load(Ordering::SeqCst) => 0,
        Err(_) if STOP.load(Ordering::SeqCst) => 130,
        Err(_) => 1,
    };
    std::process::exit(code);
}

fn demo() {
    println!("building the lab: client host -> 3 bridge hosts (socat, mpbridge, mpbridge) -> server host");
    let mut t = TunnelLab::start("demo");
    println!("  namespaces: {}, {}, {}", t.client_ns, t.bridge_ns.join(", "), t.server_ns);
    println!("  mpclient listens on {CLIENT_LISTEN} in the client host; mpserver forwards to a UDP echo");
    for i in 0..3 {
        t.set_loss(i, LOSS_PCT, LOSS_PCT);
    }
    println!(
        "  nftables drops {LOSS_PCT}% on every path, each direction (p^3 = {:.2}%)",
        (LOSS_PCT as f64 / 100.0).powi(3) * 100.0
    );
    let ready = t.wait_ready(Duration::from_secs(10));
    println!("tunnel up after {ready:.2?}");
    check_stop();

    let (n, pps) = (10_000u64, 2_000u64);
    println!("\nstreaming {n} datagrams of 200 bytes at {pps}/s through the tunnel and back ...");
    let h = udp_stream(&t.client_ns, true, CLIENT_LISTEN.parse().unwrap(), 1, n, 200, pps, Duration::from_millis(1500));
    let started = Instant::now();
    while !h.is_finished() {
        std::thread::sleep(Duration::from_millis(500));
        print!("\r  {:>4.1}s  target has {:>6} of {n}", started.elapsed().as_secs_f64(), t.echo.seen_count());
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
    let r = h.join().unwrap();
    let reached = t.echo.seen_count().min(n as usize) as f64;
    println!();
    println!(
        "  one path alone would lose {LOSS_PCT}% each way; through the tunnel: client->server {:.2}%, server->client {:.2}%",
        (1.0 - reached / n as f64) * 100.0,
        (1.0 - r.echoed.len() as f64 / reached) * 100.0
    );
    println!("\n$ mpclient status\n{}", t.status("mpclient", false));
    println!("$ mpserver status\n{}", t.status("mpserver", false));
    check_stop();

    println!("cutting path 2 completely ...");
    t.set_loss(1, 100, 100);
    std::thread::sleep(Duration::from_millis(1500));
    let json: serde_json::Value = serde_json::from_str(&t.status("mpclient", true)).unwrap();
    for s in json["sessions"].as_array().unwrap() {
        let states: Vec<&str> = s["paths"].as_array().unwrap().iter().map(|p| p["state"].as_str().unwrap()).collect();
        println!("  session {}: paths {:?}", s["id"].as_str().unwrap(), states);
    }
    t.set_loss(1, LOSS_PCT, LOSS_PCT);
    check_stop();

    println!("\nkill -9 mpserver and start it again while 100 datagrams/s flow ...");
    let h = udp_stream(
        &t.client_ns,
        true,
        CLIENT_LISTEN.parse().unwrap(),
        100_000,
        400,
        64,
        100,
        Duration::from_millis(1500),
    );
    std::thread::sleep(Duration::from_millis(1500));
    t.lab.kill9(t.server);
    t.server = t.start_server();
    let r = h.join().unwrap();
    let gap = r.arrivals.windows(2).map(|w| w[1].0 - w[0].0).max().unwrap_or_default();
    println!("  traffic resumed by itself; longest gap {gap:.2?} ({} of 400 echoed)", r.echoed.len());
    drop(t);
    check_stop();
    vpn_demo();
    check_stop();
    mesh_demo();
    check_stop();
    cluster_demo();
    println!("\ndone; deleting the namespaces");
}

/// The VPN on top: a hub and two peers, each peer behind three lossy bridges.
fn vpn_demo() {
    println!(
        "\n=== the VPN: mpvpn hub + two peers, each reaching the hub over 3 bridges with {LOSS_PCT}% loss per path ==="
    );
    let v = tests::VpnLab::start("demov", LOSS_PCT, false);
    let a = v.wait_peer_up("a", Duration::from_secs(20));
    let b = v.wait_peer_up("b", Duration::from_secs(20));
    println!("  peer a got {a}, peer b got {b} (hub {})", tests::HUB_VPN_ADDR);
    std::thread::sleep(Duration::from_millis(500));
    let mut rtts = v.ping(0, &b.to_string(), 100, "0.02", &[]);
    rtts.sort_by(|x, y| x.partial_cmp(y).unwrap());
    if rtts.is_empty() {
        println!("  ping a -> b: no answers");
    } else {
        println!(
            "  $ ping -c 100 {b}   (from peer a)\n  {} of 100 answered, rtt p50 {:.2} ms, p99 {:.2} ms",
            rtts.len(),
            rtts[rtts.len() / 2],
            rtts[(rtts.len() - 1) * 99 / 100]
        );
    }
    let lan = v.ping(0, "192.168.50.1", 10, "0.05", &[]);
    println!("  $ ping -c 10 192.168.50.1   (a subnet behind peer b, announced by it): {} of 10 answered", lan.len());
    // names: the hub answers <peer>.mpvpn; peer a keeps them in its (lab-private) hosts file
    let by_name = v.ping(0, "b.mpvpn", 5, "0.05", &[]);
    println!("  $ ping -c 5 b.mpvpn   (peers by name): {} of 5 answered", by_name.len());
    let (n, same, secs) =
        tests::tcp_transfer(&v.peer_ns[0], &v.peer_ns[1], std::net::SocketAddr::from((b, 7001)), 8 << 20);
    println!(
        "  TCP a -> b: {} MiB in {secs:.2}s ({:.1} Mbit/s), hash {}",
        n >> 20,
        n as f64 * 8.0 / secs / 1e6,
        if same { "matches" } else { "DIFFERS" }
    );
    println!("\n$ mpvpn status   (on the hub)\n{}", v.status_table("hub"));
}

/// The mesh: two peers behind their own NAT routers punch through and talk directly.
fn mesh_demo() {
    println!(
        "\n=== the mesh: a hub on a public network, peers a and b each behind a NAT router (nftables masquerade) ==="
    );
    let o =
        tests::MeshOptions { nats: [tests::Nat::Masquerade, tests::Nat::Masquerade], ..tests::MeshOptions::default() };
    let m = tests::MeshLab::start("demom", o);
    let [_, b] = m.wait_up(Duration::from_secs(20));
    let took = m.wait_via("a", "direct", Duration::from_secs(15));
    println!("  a reaches b directly {took:.2?} after both registered (hole punched through both NATs)");
    let mut rtts = tests::ping(&m.peer_ns[0], &b, 100, "0.01", &[]);
    rtts.sort_by(|x, y| x.partial_cmp(y).unwrap());
    if let Some(p50) = rtts.get(rtts.len() / 2) {
        println!("  $ ping -c 100 {b}   (from peer a): {} of 100 answered, rtt p50 {p50:.2} ms", rtts.len());
    }
    let before = m.relayed("a");
    let (n, same, secs) =
        tests::tcp_transfer(&m.peer_ns[0], &m.peer_ns[1], format!("{b}:7001").parse().unwrap(), 8 << 20);
    println!(
        "  TCP a -> b: {} MiB in {secs:.2}s ({:.1} Mbit/s), hash {}; the hub relayed {} bytes of it",
        n >> 20,
        n as f64 * 8.0 / secs / 1e6,
        if same { "matches" } else { "DIFFERS" },
        m.relayed("a") - before
    );
    println!("\n$ mpvpn status   (on peer a)\n{}", m.status_table("a"));
}

/// Several hubs as one: three hub hosts, each beside an etcd member; one master; names
/// registering through any hub get distinct addresses; the master killed and replaced.
fn cluster_demo() {
    println!("\n=== several hubs: three hub hosts, each running an etcd member beside `mpvpn hub` with cluster: ===");
    if std::process::Command::new("etcd").arg("--version").output().is_err() {
        println!("  skipped: no etcd here (apt-get install etcd-server)");
        return;
    }
    let started = Instant::now();
    let mut c = tests::ClusterLab::start("democ", 8);
    let master = c.wait_agreed_master(&[1, 2, 3], 3, Duration::from_secs(20));
    println!("  all three hubs agree: {master} is master ({:.1?} after the start)", started.elapsed());
    check_stop();
    // two names through each hub at once
    let mut by_name = Vec::new();
    let threads: Vec<_> = (1..=3)
        .map(|i| {
            let names = [2 * (i - 1), 2 * (i - 1) + 1];
            let who: Vec<(String, [u8; 32])> = names.iter().map(|&n| c.peers[n].clone()).collect();
            (
                i,
                who.clone(),
                tests::spawn_in_ns(&c.hub_ns[i - 1], move || tests::register_all(&who, Duration::from_secs(10))),
            )
        })
        .collect();
    for (i, who, t) in threads {
        for ((name, _), got) in who.iter().zip(t.join().expect("registrar")) {
            by_name.push(format!("{name} -> {} (through h{i})", show(&got)));
        }
    }
    println!("  6 names registering at once, two through each hub: {}", by_name.join(", "));
    let m: usize = master.trim_start_matches('h').parse().expect("hub name");
    let others: Vec<usize> = (1..=3).filter(|&i| i != m).collect();
    // two real peers: p6 lists the master's hub, then another (registered with both, its
    // traffic through the first); p7 registers with the third
    let (p6_ns, _) = (c.start_peer(6, &[m, others[0]]), c.start_peer(7, &[others[1]]));
    let (p6, p7) = (c.wait_peer_up(6, Duration::from_secs(15)), c.wait_peer_up(7, Duration::from_secs(15)));
    c.wait_hub_states(6, &["active", "up"], Duration::from_secs(15));
    c.wait_forwarding(m, others[1]);
    let rtts = tests::ping(&p6_ns, &p7.to_string(), 20, "0.05", &[]);
    println!(
        "  p6 ({p6}, on h{m}) -> p7 ({p7}, on h{}): the hubs forward between them: {} of 20 answered",
        others[1],
        rtts.len()
    );
    println!("\n$ mpvpn status   (on {master})\n{}", tests::mpvpn_status_table(&c.control(m)));
    check_stop();
    println!("kill -9 the master ({master}) ...");
    let killed = Instant::now();
    c.lab.kill9(c.hubs[m - 1]);
    // p6 (idle) finds its hub silent while the others elect
    let p6_control = c.peer_control(6);
    let moved = std::thread::spawn(move || {
        let until = killed + Duration::from_secs(20);
        while tests::mpvpn_status(&p6_control)["hubs"][1]["state"] != "active" && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
        killed.elapsed()
    });
    let new = c.wait_agreed_master(&others, 2, Duration::from_secs(15));
    println!("  {new} is master {:.2?} after the kill; on_master ran: {:?}", killed.elapsed(), c.master_runs());
    let moved = moved.join().expect("p6 watcher");
    c.wait_forwarding(others[0], others[1]);
    let rtts = tests::ping(&p6_ns, &p7.to_string(), 20, "0.1", &[]);
    println!(
        "  p6's traffic through h{} (registered all along) {moved:.2?} after the kill, address {}; p6 -> p7: {} of 20 answered",
        others[0],
        tests::mpvpn_status(&c.peer_control(6))["addr"].as_str().unwrap_or("-"),
        rtts.len()
    );
    let again = c.register(others[1], &[0], Duration::from_secs(5));
    println!(
        "  p0 registering again, through h{}: {} (its address, wherever it registers)",
        others[1],
        show(&again[0])
    );
}

fn show(r: &tests::Registration) -> String {
    match r {
        tests::Registration::Address(a) => a.to_string(),
        other => format!("{other:?}"),
    }
}
