//! The daemons as an operator runs them, on loopback: SIGTERM and SIGINT end them cleanly,
//! a local status reader that never reads stalls nothing, and `status | head` ends
//! quietly.

use std::io::Read;
use std::net::UdpSocket;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tests::bin;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mpt-daemons-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A daemon started by a test, its log, and its directory; killed if the test fails.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(program: &str, args: &[&str], dir: &Path) -> Self {
        let log = dir.join(format!("{program}.log"));
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin(program))
            .args(args)
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        Self { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log mentions `what` (the daemon is up).
    fn wait_log(&mut self, what: &str) {
        let until = Instant::now() + Duration::from_secs(10);
        while !self.log().contains(what) {
            assert!(self.child.try_wait().unwrap().is_none(), "exited early:\n{}", self.log());
            assert!(Instant::now() < until, "no `{what}` in the log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` and waits (bounded) for the exit.
    fn stop(&mut self, signal: libc::c_int) -> ExitStatus {
        // SAFETY: kill has no memory preconditions; the PID is our own child's.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < until, "still running 5 s after signal {signal}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn write_key(dir: &Path) -> String {
    let key = dir.join("tunnel.key");
    assert!(key.exists() || Command::new(bin("mpclient")).arg("genkey").arg(&key).status().unwrap().success());
    key.display().to_string()
}

/// An mpclient on loopback with `paths` paths to nowhere (discard ports), listening on
/// `listen`, answering status on `control`.
fn client(dir: &Path, paths: usize, listen: &str, control: &Path) -> Daemon {
    let bridges: String = (0..paths).map(|i| format!("127.0.0.1 {}\n", 9 + i)).collect();
    std::fs::write(dir.join("bridges.conf"), bridges).unwrap();
    let (key, ctl, b) = (write_key(dir), control.display().to_string(), dir.join("bridges.conf"));
    let args = ["--key-file", &key, "--control", &ctl, "--listen", listen, &b.display().to_string()];
    let mut d = Daemon::start("mpclient", &args, dir);
    d.wait_log("mpclient listening");
    d
}

fn assert_clean_stop(d: &mut Daemon, signal: libc::c_int, control: Option<&Path>) {
    let status = d.stop(signal);
    let log = d.log();
    assert!(status.success(), "exit {status:?} after signal {signal}:\n{log}");
    assert!(log.contains("stopping") && log.contains("stats"), "no final stats line:\n{log}");
    if let Some(c) = control {
        assert!(!c.exists(), "control socket {} left behind", c.display());
    }
}

#[test]
fn sigterm_and_sigint_end_each_daemon_cleanly() {
    let dir = tmpdir("signals");
    let ctl = dir.join("mpclient.sock");
    let mut c = client(&dir, 2, &format!("127.0.0.1:{}", free_udp_port()), &ctl);
    assert!(ctl.exists());
    assert_clean_stop(&mut c, libc::SIGTERM, Some(&ctl));

    let ctl = dir.join("mpserver.sock");
    let (key, port) = (write_key(&dir), free_udp_port().to_string());
    let args = ["--key-file", &key, "--control", &ctl.display().to_string(), &port, "127.0.0.1", "9"];
    let mut s = Daemon::start("mpserver", &args, &dir);
    s.wait_log("mpserver listening");
    assert_clean_stop(&mut s, libc::SIGINT, Some(&ctl));

    let listen = format!("127.0.0.1:{}", free_udp_port());
    let mut b = Daemon::start("mpbridge", &["--listen", &listen, "--to", "127.0.0.1:9"], &dir);
    b.wait_log("mpbridge relaying");
    assert_clean_stop(&mut b, libc::SIGTERM, None);
}

/// Before: the report was written blocking (2 s timeout) inside the event loop, so each
/// local client that connected and never read stalled the daemon for 2 s once the report
/// outgrew the socket buffer; eight of them kept a status request from being answered.
#[test]
fn status_readers_that_never_read_stall_nothing() {
    let dir = tmpdir("slowreader");
    let ctl = dir.join("mpclient.sock");
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let mut c = client(&dir, 32, &listen, &ctl);
    // 256 application sessions with 32 paths each: a report of a few MB
    let apps: Vec<UdpSocket> = (0..256).map(|_| UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
    for a in &apps {
        a.send_to(b"hello", &listen).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let hogs: Vec<UnixStream> = (0..8).map(|_| UnixStream::connect(&ctl).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(100));

    let started = Instant::now();
    let out = Command::new(bin("mpclient")).args(["status", "--json", "--control"]).arg(&ctl).output().unwrap();
    let took = started.elapsed();
    assert!(out.status.success(), "status failed: {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sessions = report["sessions"].as_array().map_or(0, Vec::len);
    assert_eq!(sessions, 256, "every application has a session");
    assert!(
        out.stdout.len() > 1 << 20,
        "the report ({} bytes) must outgrow the socket buffer for this test to mean anything",
        out.stdout.len()
    );
    assert!(took < Duration::from_secs(2), "status took {took:?} with 8 readers that never read");
    // the daemon lives on and the hogs, once past their time, are gone
    std::thread::sleep(Duration::from_millis(2500));
    for mut h in hogs {
        h.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        assert!(h.read_to_end(&mut Vec::new()).is_ok(), "a reader past its time is closed by the daemon");
    }
    assert_clean_stop(&mut c, libc::SIGTERM, Some(&ctl));
}

/// Before: `println!` panicked with "failed printing to stdout: Broken pipe" and a
/// backtrace, exit status 101.
#[test]
fn a_closed_stdout_pipe_ends_the_cli_quietly() {
    let dir = tmpdir("pipe");
    let ctl = dir.join("mpclient.sock");
    let mut c = client(&dir, 3, &format!("127.0.0.1:{}", free_udp_port()), &ctl);
    let run_into_closed_pipe = |args: &[&str]| {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(bin("mpclient")).args(args).stdout(writer).stderr(Stdio::piped()).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success() && err.is_empty(), "{args:?} into a closed pipe: {:?}\n{err}", out.status);
    };
    let ctl_s = ctl.display().to_string();
    run_into_closed_pipe(&["status", "--control", &ctl_s]);
    run_into_closed_pipe(&["status", "--json", "--control", &ctl_s]);
    run_into_closed_pipe(&["genkey"]);
    assert_clean_stop(&mut c, libc::SIGTERM, Some(&ctl));
}

/// Before: the socket took the process umask's mode (0777 under `umask 000`, as some
/// service managers and containers run): any local user could read every session. Now
/// its owner and its group only.
#[test]
fn the_control_socket_is_owner_and_group_only_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = tmpdir("umask");
    let ctl = dir.join("mpclient.sock");
    std::fs::write(dir.join("bridges.conf"), "127.0.0.1 9\n").unwrap();
    let key = write_key(&dir);
    let log = std::fs::File::create(dir.join("mpclient.log")).unwrap();
    let mut cmd = Command::new(bin("mpclient"));
    cmd.args(["--key-file", &key, "--control"])
        .arg(&ctl)
        .args(["--listen", &format!("127.0.0.1:{}", free_udp_port())])
        .arg(dir.join("bridges.conf"))
        .stderr(log);
    // SAFETY: umask is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let mut d = Daemon { child: cmd.spawn().unwrap(), log: dir.join("mpclient.log") };
    d.wait_log("mpclient listening");
    let mode = std::fs::metadata(&ctl).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "control socket mode {mode:o}");
    assert_clean_stop(&mut d, libc::SIGTERM, Some(&ctl));
}

/// Two mpclients on one host with nothing but their config files (no control flags, no
/// control_socket): before, the second failed with "control socket in use". Now each
/// has its instance's socket; `status NAME` asks one, `status` alone lists both, and a
/// SIGHUP is not a stop for a daemon with nothing to reload.
#[test]
fn two_instances_on_one_host_need_no_flags() {
    let dir = tmpdir("instances");
    let key = write_key(&dir);
    let tag = std::process::id();
    let mut daemons = Vec::new();
    let mut names = Vec::new();
    for site in ["office", "home"] {
        let name = format!("{site}{tag}");
        let yaml = dir.join(format!("{name}.yaml"));
        let listen = format!("127.0.0.1:{}", free_udp_port());
        let remote = format!("127.0.0.1:{}", free_udp_port());
        std::fs::write(&yaml, format!("listen: {listen}\nkey_file: {key}\npaths:\n  - remote: {remote}\n")).unwrap();
        let mut d = Daemon::start("mpclient", &["-c", &yaml.display().to_string()], &dir);
        d.wait_log("control");
        daemons.push(d);
        names.push(name);
    }
    let status = |args: &[&str]| {
        let out = Command::new(bin("mpclient")).arg("status").args(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    for (d, name) in daemons.iter_mut().zip(&names) {
        let (ok, out) = status(&[name]);
        assert!(ok && out.contains("mpclient on 127.0.0.1:"), "status {name}: {out}\n{}", d.log());
    }
    let (ok, listing) = status(&[]);
    assert!(ok, "{listing}");
    for name in &names {
        assert!(listing.contains(name.as_str()), "`mpclient status` does not list {name}:\n{listing}");
    }
    let (_, json) = status(&["--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(v["instances"].as_array().is_some_and(|a| a.len() >= 2), "{json}");
    // `status --watch` redraws until its reader goes: `| head` ends it quietly
    let watch = format!("{} status {} --watch | head -3", bin("mpclient").display(), names[0]);
    let mut w = Command::new("sh").args(["-c", &watch]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    while w.try_wait().unwrap().is_none() {
        assert!(Instant::now() < until, "status --watch | head did not end");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = w.wait_with_output().unwrap();
    assert!(out.status.success() && out.stderr.is_empty(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).matches("mpclient on").count(), 2, "not redrawn: {out:?}");
    // SIGHUP: logged, not fatal
    // SAFETY: kill has no memory preconditions; the PID is our own child's.
    unsafe { libc::kill(daemons[0].child.id() as libc::pid_t, libc::SIGHUP) };
    daemons[0].wait_log("nothing to reload");
    assert!(daemons[0].child.try_wait().unwrap().is_none(), "SIGHUP stopped it");
    for d in &mut daemons {
        assert!(d.stop(libc::SIGTERM).success());
    }
    let (ok, out) = status(&[&names[0]]);
    assert!(!ok && out.contains("error"), "{out}");
}

/// `metrics_listen` in client.yaml and `--metrics-listen` on mpbridge: `GET /metrics`
/// answers Prometheus text that promtool accepts, with the paths' state; another path is
/// a 404; a scraper that connects and never asks holds up neither other scrapers nor
/// status.
#[test]
fn metrics_are_served_without_blocking_and_pass_promtool() {
    let dir = tmpdir("metrics");
    let key = write_key(&dir);
    let (listen, metrics) = (format!("127.0.0.1:{}", free_udp_port()), format!("127.0.0.1:{}", free_udp_port()));
    // a server on loopback, so that the client's first path has answers (RTT, loss)
    let server_port = free_udp_port();
    let sctl = dir.join("s.sock").display().to_string();
    let sargs = ["--key-file", &key, "--control", &sctl, &server_port.to_string(), "127.0.0.1", "9"];
    let mut server = Daemon::start("mpserver", &sargs, &dir);
    server.wait_log("listening");
    let control = dir.join("c.sock");
    let yaml = dir.join("client.yaml");
    std::fs::write(
        &yaml,
        format!(
            "listen: {listen}\nkey_file: {key}\ncontrol_socket: {}\nmetrics_listen: {metrics}\npaths:\n  - remote: 127.0.0.1:{server_port}\n    name: direct\n  - remote: 127.0.0.1:9\n    name: nowhere\n",
            control.display()
        ),
    )
    .unwrap();
    let mut c = Daemon::start("mpclient", &["-c", &yaml.display().to_string()], &dir);
    c.wait_log("metrics");
    UdpSocket::bind("127.0.0.1:0").unwrap().send_to(b"hello", &listen).unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    let silent = std::net::TcpStream::connect(&metrics).unwrap(); // never sends a request
    let addr = metrics.parse().unwrap();
    let (status, client_body) = tests::http_get(addr, "/metrics").unwrap();
    let body = &client_body;
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    assert!(
        ["probing", "down"].iter().any(|st| body.contains(&format!("path=\"nowhere\",state=\"{st}\"}} 1"))),
        "{body}"
    );
    assert!(body.contains("path=\"direct\",state=\"up\"} 1"), "{body}");
    assert!(body.contains("mptunnel_path_rtt_seconds{") && body.contains("mptunnel_path_packets_total{"), "{body}");
    match tests::promtool_check(body) {
        Ok(true) => {}
        Ok(false) => eprintln!("promtool not installed: format not checked"),
        Err(e) => panic!("promtool check metrics: {e}\n{body}"),
    }
    assert!(tests::http_get(addr, "/other").unwrap().0.starts_with("HTTP/1.1 404"));
    let out = Command::new(bin("mpclient")).args(["status", "--control"]).arg(&control).output().unwrap();
    assert!(out.status.success(), "status while a scraper stalls: {out:?}");
    drop(silent);
    assert_clean_stop(&mut c, libc::SIGTERM, Some(&control));

    let bridge_metrics = format!("127.0.0.1:{}", free_udp_port());
    let bl = format!("127.0.0.1:{}", free_udp_port());
    let args = ["--listen", &bl, "--to", "127.0.0.1:9", "--metrics-listen", &bridge_metrics];
    let mut b = Daemon::start("mpbridge", &args, &dir);
    b.wait_log("metrics");
    UdpSocket::bind("127.0.0.1:0").unwrap().send_to(b"x", &bl).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let (status, body) = tests::http_get(bridge_metrics.parse().unwrap(), "/metrics").unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(body.contains("mptunnel_bridge_flows 1"), "{body}");
    if let Err(e) = tests::promtool_check(&body) {
        panic!("promtool: {e}\n{body}");
    }
    assert!(b.stop(libc::SIGTERM).success());
    assert!(server.stop(libc::SIGTERM).success());

    // every tunnel or bridge metric the Grafana dashboard draws exists (the VPN's are
    // checked against a hub in tests/tests/vpn.rs)
    let served = format!("{client_body}{body}");
    for name in tests::dashboard_metrics().iter().filter(|n| !n.starts_with("mptunnel_vpn_")) {
        assert!(
            served.contains(&format!("\n{name}{{")) || served.contains(&format!("\n{name} ")),
            "the dashboard draws {name}, which nobody serves"
        );
    }
}

/// Started by systemd (`Type=notify`): the daemon says READY=1 on $NOTIFY_SOCKET once its
/// sockets are open, and STOPPING=1 when it stops.
#[test]
fn readiness_goes_to_the_notify_socket() {
    let dir = tmpdir("notify");
    let sock_path = dir.join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let key = write_key(&dir);
    let ctl = dir.join("c.sock").display().to_string();
    let listen = format!("127.0.0.1:{}", free_udp_port());
    std::fs::write(dir.join("bridges.conf"), "127.0.0.1 9\n").unwrap();
    let bridges = dir.join("bridges.conf").display().to_string();
    let log = std::fs::File::create(dir.join("mpclient.log")).unwrap();
    let mut child = Command::new(bin("mpclient"))
        .args(["--key-file", &key, "--control", &ctl, "--listen", &listen, &bridges])
        .env("NOTIFY_SOCKET", &sock_path)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("no READY=1 within 10 s");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
    assert!(UnixStream::connect(&ctl).is_ok(), "ready before its control socket was");
    // SAFETY: kill has no memory preconditions; the PID is our own child's.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let n = sock.recv(&mut buf).expect("no STOPPING=1");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    assert!(child.wait().unwrap().success());
}

/// `mpvpn reload` signals whoever answers on the control socket, as the kernel knows it.
/// Before, it sent SIGHUP to whatever pid the answer claimed: anything able to answer on
/// that path (a stale socket's new owner, a mistyped --control) could make it kill another
/// process. Here a fake "hub" (socat) claims the pid of a bystander.
#[test]
fn reload_never_signals_the_pid_an_answer_claims() {
    let dir = tmpdir("reload-pid");
    let mut bystander = Command::new("sleep").arg("30").spawn().unwrap();
    let status = format!(
        r#"{{"role":"hub","pid":{},"name":"","tun":"mpvpn0","addr":null,"state":"up","hub_rtt_ms":null,"last_heartbeat_s":null,"tx_bytes":0,"rx_bytes":0,"peers":[],"drops":{{}}}}"#,
        bystander.id()
    );
    let answer = dir.join("status.json");
    std::fs::write(&answer, status).unwrap();
    let sock = dir.join("fake-hub.sock");
    let mut fake = Command::new("socat")
        .arg(format!("UNIX-LISTEN:{},fork", sock.display()))
        .arg(format!("OPEN:{},rdonly", answer.display()))
        .spawn()
        .expect("socat");
    let until = Instant::now() + Duration::from_secs(5);
    while !sock.exists() {
        assert!(Instant::now() < until, "socat did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = Command::new(bin("mpvpn")).args(["reload", "--control"]).arg(&sock).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    std::thread::sleep(Duration::from_millis(200));
    let alive = bystander.try_wait().unwrap().is_none();
    let _ = bystander.kill();
    let _ = bystander.wait();
    let _ = fake.kill();
    let _ = fake.wait();
    assert!(alive, "the bystander got the hub's SIGHUP");
    assert!(!out.status.success() && err.contains("claims to be pid"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
