//! The mpbridge command line.

use std::process::Command;

fn mpbridge() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mpbridge"))
}

#[test]
fn help_marks_lab_options() {
    let out = mpbridge().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("--listen") && text.contains("--to") && text.contains("--idle-timeout"));
    assert_eq!(text.matches("LAB ONLY").count(), 3, "{text}");
}

#[test]
fn bad_arguments_are_one_line_errors() {
    let out =
        mpbridge().args(["--listen", "127.0.0.1:0", "--to", "127.0.0.1:9", "--lab-loss", "150"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("--lab-loss"), "{err}");
    let out = mpbridge().args(["--listen", "127.0.0.1:0", "--to", "nohostport"]).output().unwrap();
    assert!(!out.status.success());
}

/// A relay on loopback: many datagrams through, replies come back to the right client,
/// and the lab delay is applied in each direction.
#[test]
fn relays_both_ways_with_lab_delay() {
    use std::net::UdpSocket;
    use std::time::{Duration, Instant};
    let target = UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = target.local_addr().unwrap();
    // pick a free port for the relay
    let listen = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut relay = mpbridge()
        .args(["--listen", &listen.to_string(), "--to", &to.to_string(), "--lab-delay", "20", "--log-level", "error"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let echo = std::thread::spawn(move || {
        target.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut buf = [0u8; 2048];
        let mut n = 0;
        while let Ok((len, from)) = target.recv_from(&mut buf) {
            target.send_to(&buf[..len], from).unwrap();
            n += 1;
            if n == 200 {
                break;
            }
        }
        n
    });
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let start = Instant::now();
    for i in 0..200u32 {
        client.send_to(&i.to_be_bytes(), listen).unwrap();
    }
    let mut got = 0;
    let mut buf = [0u8; 64];
    while got < 200 {
        match client.recv(&mut buf) {
            Ok(_) => got += 1,
            Err(_) => break,
        }
    }
    let elapsed = start.elapsed();
    let _ = relay.kill();
    let _ = relay.wait();
    assert_eq!(echo.join().unwrap(), 200);
    assert_eq!(got, 200, "every reply came back through the relay");
    assert!(elapsed >= Duration::from_millis(40), "20 ms each way: {elapsed:?}");
}

/// conf/bridge.yaml parses; a bad field is a one-line error naming it and its line;
/// `-c` and the flags do not mix.
#[test]
fn yaml_config_parses_and_errors_name_the_field() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../conf/bridge.yaml");
    let text = std::fs::read_to_string(example).unwrap();
    let c = bridge::BridgeConfig::parse(example, &text).unwrap();
    assert_eq!((c.max_flows, c.idle_timeout_secs), (4096, 120));
    let bad = "listen: 0.0.0.0:4000\nto: 127.0.0.1:9\nmax_flows: 0\n";
    let e = bridge::BridgeConfig::parse("b.yaml", bad).unwrap_err().to_string();
    assert!(e.contains("max_flows") && e.contains("b.yaml:3"), "{e}");
    let unknown = bridge::BridgeConfig::parse("b.yaml", "listen: 0.0.0.0:4000\nto: x:1\nfoo: 1\n");
    assert!(unknown.unwrap_err().to_string().contains("foo"));
    let out = mpbridge().args(["-c", example, "--listen", "127.0.0.1:0"]).output().unwrap();
    assert!(!out.status.success());
}
