//! The tunnel topology shared by the tests and the bench: a client host with one link to
//! each of three bridge hosts, each with a link to the server host.

use crate::lab::{bin, run, Lab};
use crate::traffic::{udp_stream, Echo};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub const CLIENT_LISTEN: &str = "127.0.0.1:3000";
/// The echo target behind mpserver, on the server host.
pub const ECHO_PORT: u16 = 7000;
pub const ECHO_ADDR: &str = "127.0.0.1:7000";
pub const SERVER_PORT: u16 = 4000;
pub const BRIDGE_PORT: u16 = 4000;

/// The address plan. Path `i` (1-based) runs from the client's `c{i}` (10.77.i.1) to
/// bridge `i` (10.77.i.2, interface `toc`), and from there (10.78.i.1, `tos`) to the
/// server's `s{i}` (10.78.i.2).
pub fn bridge_addr(i: usize) -> String {
    format!("10.77.{i}.2")
}

/// The server's address on path `i` (1-based), as bridge `i` reaches it.
pub fn server_addr_via(i: usize) -> String {
    format!("10.78.{i}.2")
}

/// The hosts of the tunnel topology, linked, with nothing running yet.
pub struct Topology {
    pub client_ns: String,
    pub bridge_ns: Vec<String>,
    pub server_ns: String,
}

impl Topology {
    pub fn build(lab: &mut Lab) -> Self {
        let client_ns = lab.add_ns("c");
        let server_ns = lab.add_ns("s");
        let mut bridge_ns = Vec::new();
        for i in 1..=3 {
            let b = lab.add_ns(&format!("b{i}"));
            lab.link(&client_ns, &format!("c{i}"), &format!("10.77.{i}.1"), &b, "toc", &bridge_addr(i));
            lab.link(&b, "tos", &format!("10.78.{i}.1"), &server_ns, &format!("s{i}"), &server_addr_via(i));
            bridge_ns.push(b);
        }
        Self { client_ns, bridge_ns, server_ns }
    }
}

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
    /// YAML the client's config gets besides its paths; `None`: a bridges file.
    client_yaml: Option<String>,
}

impl TunnelLab {
    /// Builds the topology and starts everything; the client reads a bridges file.
    pub fn start(tag: &str) -> Self {
        Self::start_with(tag, None)
    }

    /// Builds the topology and starts everything; with `client_yaml`, the client reads a
    /// YAML config of the three paths and these lines (e.g. `redundancy: adaptive`).
    pub fn start_with(tag: &str, client_yaml: Option<&str>) -> Self {
        let mut lab = Lab::new(tag);
        let Topology { client_ns, bridge_ns, server_ns } = Topology::build(&mut lab);
        let key = lab.dir.join("tunnel.key");
        run(Command::new(bin("mpserver")).arg("genkey").arg(&key));
        let echo = Echo::start(&server_ns, ECHO_ADDR.parse().expect("literal"));
        let mut me = Self {
            lab,
            client_ns,
            bridge_ns,
            server_ns,
            key,
            server: 0,
            client: 0,
            bridges: Vec::new(),
            echo,
            client_yaml: client_yaml.map(String::from),
        };
        me.server = me.start_server();
        for i in 0..3 {
            let idx = me.start_bridge(i);
            me.bridges.push(idx);
        }
        let bridges_file = me.lab.dir.join("bridges.conf");
        let relays: String = (1..=3).map(|i| format!("{} {BRIDGE_PORT}\n", bridge_addr(i))).collect();
        std::fs::write(&bridges_file, format!("# lab relays\n{relays}")).expect("write");
        me.client = me.start_client();
        me
    }

    pub fn start_server(&mut self) -> usize {
        let key = self.key.display().to_string();
        let control = self.lab.dir.join("mpserver.sock").display().to_string();
        let port = SERVER_PORT.to_string();
        let (ns, bin) = (self.server_ns.clone(), bin("mpserver"));
        let echo_port = ECHO_PORT.to_string();
        self.lab.spawn(
            &ns,
            "mpserver",
            &bin,
            &["--key-file", &key, "--control", &control, &port, "127.0.0.1", &echo_port],
        )
    }

    pub fn start_client(&mut self) -> usize {
        let key = self.key.display().to_string();
        let control = self.lab.dir.join("mpclient.sock").display().to_string();
        let (ns, bin) = (self.client_ns.clone(), bin("mpclient"));
        let Some(extra) = &self.client_yaml else {
            let bridges = self.lab.dir.join("bridges.conf").display().to_string();
            let args = ["--key-file", &key, "--control", &control, "--listen", CLIENT_LISTEN, &bridges];
            return self.lab.spawn(&ns, "mpclient", &bin, &args);
        };
        let paths: String = (1..=3).map(|i| format!("  - remote: {}:{BRIDGE_PORT}\n", bridge_addr(i))).collect();
        let yaml = format!("listen: {CLIENT_LISTEN}\nkey_file: {key}\npaths:\n{paths}{extra}");
        let config = self.lab.dir.join("client.yaml");
        std::fs::write(&config, yaml).expect("write");
        let config = config.display().to_string();
        self.lab.spawn(&ns, "mpclient", &bin, &["-c", &config, "--control", &control])
    }

    /// Bridge 0 is socat; 1 and 2 are mpbridge.
    pub fn start_bridge(&mut self, i: usize) -> usize {
        let ns = self.bridge_ns[i].clone();
        let server = format!("{}:{SERVER_PORT}", server_addr_via(i + 1));
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
