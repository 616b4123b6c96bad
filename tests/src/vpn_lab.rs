//! The VPN topology: a hub host, two peer hosts and three bridge hosts between them.

use crate::lab::{bin, run, Lab};
use crate::traffic::ping;
use crate::tunnel::{server_addr_via, BRIDGE_PORT, SERVER_PORT};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

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
/// hub.yaml's `dns: {domain}`: peer b is b.mpvpn.
pub const VPN_DOMAIN: &str = "mpvpn";
/// The hub's `metrics_listen`, inside the hub's namespace.
pub const HUB_METRICS: &str = "127.0.0.1:9109";
pub const HUB_VPN_ADDR: &str = "10.99.0.1";
/// Peer B announces this subnet (its loopback holds 192.168.50.1).
pub const PEER_B_SUBNET: &str = "192.168.50.0/24";
/// hub.yaml allows peer C this subnet: it covers b's first bridge (10.82.1.2), more
/// specifically than b's own route to it.
pub const PEER_C_SUBNET: &str = "10.82.1.0/25";

impl VpnLab {
    /// `embedded`: the hub and peers run the multipath server/client in-process instead
    /// of beside separate mpserver/mpclient processes.
    pub fn start(tag: &str, loss_pct: u32, embedded: bool) -> Self {
        Self::start_with(tag, loss_pct, embedded, None)
    }

    /// As `start`, the peers' tunnels with `redundancy` (`duplicate`, `fec`, `adaptive`;
    /// `None`: the default).
    pub fn start_with(tag: &str, loss_pct: u32, embedded: bool, redundancy: Option<&str>) -> Self {
        let mut lab = Lab::new(tag);
        let server_ns = lab.add_ns("s");
        let peer_ns = vec![lab.add_ns("pa"), lab.add_ns("pb")];
        for ns in &peer_ns {
            lab.private_hosts(ns);
        }
        for i in 1..=3 {
            let b = lab.add_ns(&format!("b{i}"));
            lab.link(&peer_ns[0], &format!("p{i}"), &format!("10.81.{i}.1"), &b, "toa", &format!("10.81.{i}.2"));
            lab.link(&peer_ns[1], &format!("p{i}"), &format!("10.82.{i}.1"), &b, "tob", &format!("10.82.{i}.2"));
            lab.link(&b, "tos", &format!("10.78.{i}.1"), &server_ns, &format!("s{i}"), &server_addr_via(i));
            let server = format!("{}:{SERVER_PORT}", server_addr_via(i));
            if i == 1 {
                let listen = format!("UDP4-LISTEN:{BRIDGE_PORT},fork,reuseaddr");
                lab.spawn(&b, "socat-b1", Path::new("socat"), &["-T", "60", &listen, &format!("UDP4:{server}")]);
            } else {
                let listen = format!("0.0.0.0:{BRIDGE_PORT}");
                lab.spawn(&b, &format!("mpbridge-b{i}"), &bin("mpbridge"), &["--listen", &listen, "--to", &server]);
            }
        }
        let dir = lab.dir.clone();
        let (tunnel_key, peer_keys) = crate::vpn_lab::lab_keys(&dir, ["a", "b", "c"]);
        let [ka, kb, kc] = peer_keys;
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
                "listen: 127.0.0.1:5000\ntun: mpvpn0\nnetwork: {VPN_NETWORK}\ncontrol_socket: {}\nmetrics_listen: {HUB_METRICS}\ndns:\n  domain: {VPN_DOMAIN}\n{embedded_server}peers:\n  - name: a\n    key_file: {}\n  - name: b\n    key_file: {}\n    routes: [{PEER_B_SUBNET}]\n  - name: c\n    key_file: {}\n    routes: [{PEER_C_SUBNET}]\n",
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
            let mut tunnel_control = String::new();
            let embedded_client = if embedded {
                let client_yaml = dir.join(format!("client-{name}.yaml"));
                let paths: String = (1..=3).map(|j| format!("  - remote: 10.{net}.{j}.2:{BRIDGE_PORT}\n")).collect();
                let mode = redundancy.map_or(String::new(), |r| format!("redundancy: {r}\n"));
                std::fs::write(&client_yaml, format!("key_file: {tk}\n{mode}paths:\n{paths}")).expect("client.yaml");
                format!("embedded_client: {}\n", client_yaml.display())
            } else {
                let bridges = dir.join(format!("bridges-{name}.conf"));
                std::fs::write(
                    &bridges,
                    (1..=3).map(|j| format!("10.{net}.{j}.2 {BRIDGE_PORT}\n")).collect::<String>(),
                )
                .expect("bridges");
                let cctl = dir.join(format!("mpclient-{name}.sock")).display().to_string();
                let bridges = bridges.display().to_string();
                let mut args = vec!["--key-file", &tk, "--control", &cctl, &bridges];
                if let Some(r) = redundancy {
                    args.extend(["--redundancy", r]);
                }
                me.lab.spawn(&ns, &format!("mpclient-{name}"), &bin("mpclient"), &args);
                tunnel_control = format!("tunnel_control: {cctl}\n");
                String::new()
            };
            let routes = if name == "b" { format!("routes: [{PEER_B_SUBNET}]\n") } else { String::new() };
            let yaml = dir.join(format!("peer-{name}.yaml"));
            std::fs::write(
                &yaml,
                format!(
                    "name: {name}\nkey_file: {}\ntunnel: 127.0.0.1:3000\n{tunnel_control}tun: mpvpn0\ncontrol_socket: {}\n{routes}{embedded_client}",
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
        control_in(&self.lab.dir, who)
    }

    /// `mpvpn status --json` of the hub ("hub") or a peer ("a", "b", ...).
    pub fn status(&self, who: &str) -> serde_json::Value {
        mpvpn_status(&self.control_of(who))
    }

    pub fn status_table(&self, who: &str) -> String {
        mpvpn_status_table(&self.control_of(who))
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

/// The control socket a lab's hub.yaml ("hub") or peer-<who>.yaml names, in `dir`.
pub fn control_in(dir: &Path, who: &str) -> PathBuf {
    if who == "hub" {
        dir.join("hub.sock")
    } else {
        dir.join(format!("peer-{who}.sock"))
    }
}

/// `mpvpn status --json --control sock` (Null when it does not answer).
pub fn mpvpn_status(sock: &Path) -> serde_json::Value {
    let out =
        Command::new(bin("mpvpn")).args(["status", "--json", "--control"]).arg(sock).output().expect("mpvpn status");
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// `mpvpn status --control sock`, the table.
pub fn mpvpn_status_table(sock: &Path) -> String {
    let out = Command::new(bin("mpvpn")).args(["status", "--control"]).arg(sock).output().expect("mpvpn status");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A tunnel key (`tunnel.key`) and one peer key per name (`<name>.key`) in `dir`.
pub fn lab_keys<const N: usize>(dir: &Path, names: [&str; N]) -> (PathBuf, [PathBuf; N]) {
    let tunnel_key = dir.join("tunnel.key");
    run(Command::new(bin("mpserver")).arg("genkey").arg(&tunnel_key));
    let peer_keys = names.map(|name| {
        let p = dir.join(format!("{name}.key"));
        run(Command::new(bin("mpvpn")).arg("genkey").arg(&p));
        p
    });
    (tunnel_key, peer_keys)
}
