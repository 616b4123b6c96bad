//! The cluster topology: three hub hosts on one switch, each running an etcd member and
//! `mpvpn hub` with `cluster:`; and a registrar that speaks the registration handshake
//! straight to a hub's tunnel socket (the hub takes each source as one tunnel session,
//! as it takes mpserver's), so many names can register at once without many peer hosts.

use crate::lab::{bin, run, spawn_in_ns, Lab};
use crate::mesh_lab::{MESH_PORT, RENDEZVOUS_PORT};
use crate::vpn_lab::mpvpn_status;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use vpn::wire::{PeerKey, RefusalReason, RefusalRepr, RegisterRepr, WelcomeRepr};

pub const CLUSTER_NETWORK: &str = "10.99.0.0/24";
/// etcd's client and peer ports in the lab (not its default ones).
pub const ETCD_CLIENT_PORT: u16 = 12379;
pub const ETCD_PEER_PORT: u16 = 12380;
/// Where each hub takes tunnel datagrams (inside its own namespace).
pub const HUB_LISTEN: &str = "127.0.0.1:5000";
/// Each hub's port for packets the other hubs forward (on its switch address).
pub const FORWARD_PORT: u16 = 5300;
/// Each hub host's mpserver (started with the first peer that needs it).
pub const HUB_TUNNEL_PORT: u16 = 4000;

/// The pairs the hub-failover test and bench run (`ClusterLab::start_pairs`): what they
/// are called, `mesh.relay`, and whether their hosts reach each other's mesh sockets.
pub const FAILOVER_PAIRS: [(&str, &str, bool); 3] =
    [("direct", "fallback", true), ("relayed, fallback", "fallback", false), ("relayed, always", "always", false)];

/// Hub `i`'s (1-based) address on the switch.
pub fn hub_ip(i: usize) -> String {
    format!("10.90.0.{i}")
}

/// Hub `i`'s second address (`ClusterLab::start_tunnel_forwarding`): a second path
/// between the hubs, which the peers do not use.
pub fn second_ip(i: usize) -> String {
    format!("10.90.1.{i}")
}

pub struct ClusterLab {
    pub lab: Lab,
    /// The switch every host hangs on.
    pub switch: String,
    /// Hub host `i - 1`'s namespace.
    pub hub_ns: Vec<String>,
    /// Process indexes: the etcd member and the hub on each host (the latest started).
    pub etcd: Vec<usize>,
    pub hubs: Vec<usize>,
    /// The configured peer names and their keys.
    pub peers: Vec<(String, [u8; 32])>,
    /// Where `on_master` writes `<hub> up|down`, one line per run.
    pub master_log: PathBuf,
    /// The mpserver on each hub host, once started, and the tunnel key they share.
    pub servers: Vec<Option<usize>>,
    pub tunnel_key: PathBuf,
    /// Peer hosts: the peer's index in `peers`, its namespace and process.
    pub peer_hosts: Vec<(usize, String, usize)>,
    /// etcd's client port speaks TLS and wants client certificates (`start_tls`).
    pub tls: bool,
}

impl ClusterLab {
    /// Three hub hosts; hub.yaml on each lists `n_peers` peers `p0`, `p1`, ...
    pub fn start(tag: &str, n_peers: usize) -> Self {
        Self::start_with(tag, n_peers, false, false)
    }

    /// `start`, the hubs forwarding to each other over the multipath tunnel
    /// (`tunnel_key_file`, no `forward_listen`) with two paths between any two: each hub
    /// host has a second address, `second_ip(i)`, both advertised. Their mpservers run.
    pub fn start_tunnel_forwarding(tag: &str, n_peers: usize) -> Self {
        let mut c = Self::start_with(tag, n_peers, false, true);
        c.start_servers(&[1, 2, 3]);
        c
    }

    /// `start`, with etcd's client port on TLS: a lab CA signs each member's server
    /// certificate and one client certificate the hubs present (`--client-cert-auth`).
    pub fn start_tls(tag: &str, n_peers: usize) -> Self {
        Self::start_with(tag, n_peers, true, false)
    }

    fn start_with(tag: &str, n_peers: usize, tls: bool, over_tunnel: bool) -> Self {
        let mut lab = Lab::new(tag);
        let switch = lab.add_ns("sw");
        lab.sh(&switch, "ip link add br0 type bridge && ip link set br0 up");
        let mut hub_ns = Vec::new();
        for i in 1..=3 {
            let ns = lab.add_ns(&format!("h{i}"));
            let port = format!("h{i}");
            run(Command::new("ip").args(["-n", &ns, "link", "add", "lan", "type", "veth", "peer", "name", &port]));
            run(Command::new("ip").args(["-n", &ns, "link", "set", &port, "netns", &switch]));
            lab.sh(&switch, &format!("ip link set {port} master br0 up"));
            lab.sh(&ns, &format!("ip addr add {}/24 dev lan && ip link set lan up", hub_ip(i)));
            if over_tunnel {
                lab.sh(&ns, &format!("ip addr add {}/24 dev lan", second_ip(i)));
            }
            hub_ns.push(ns);
        }
        let dir = lab.dir.clone();
        let cluster_key = dir.join("cluster.key");
        run(Command::new(bin("mpvpn")).arg("genkey").arg(&cluster_key));
        let master_log = dir.join("master.log");
        let hook = dir.join("on_master.sh");
        std::fs::write(&hook, format!("#!/bin/sh\necho \"$MPVPN_HUB $1\" >> {}\n", master_log.display())).unwrap();
        run(Command::new("chmod").arg("755").arg(&hook));
        let mut peers = Vec::new();
        let mut peer_yaml = String::new();
        for n in 0..n_peers {
            let mut key = [0u8; 32];
            std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut key).unwrap();
            let name = format!("p{n}");
            let path = dir.join(format!("{name}.key"));
            std::fs::write(&path, common::crypto::Psk::from_bytes(key).to_base64()).unwrap();
            run(Command::new("chmod").arg("600").arg(&path));
            peer_yaml.push_str(&format!("  - name: {name}\n    key_file: {}\n", path.display()));
            peers.push((name, key));
        }
        let tunnel_key = dir.join("tunnel.key");
        run(Command::new(bin("mpserver")).arg("genkey").arg(&tunnel_key));
        let mut me = Self {
            lab,
            switch,
            hub_ns,
            etcd: Vec::new(),
            hubs: Vec::new(),
            peers,
            master_log,
            servers: vec![None; 3],
            tunnel_key,
            peer_hosts: Vec::new(),
            tls,
        };
        if tls {
            make_certificates(&dir);
        }
        let scheme = if tls { "https" } else { "http" };
        let tls_files = if tls {
            format!(
                "  etcd_ca_file: {0}/ca.pem\n  etcd_cert_file: {0}/hub.pem\n  etcd_key_file: {0}/hub.key\n",
                dir.display()
            )
        } else {
            String::new()
        };
        for i in 1..=3 {
            let ip = hub_ip(i);
            let forwarding = match over_tunnel {
                true => format!(
                    "  tunnel_key_file: {}\n  advertise:\n    tunnel: [{ip}:{HUB_TUNNEL_PORT}, {}:{HUB_TUNNEL_PORT}]\n",
                    me.tunnel_key.display(),
                    second_ip(i)
                ),
                false => format!(
                    "  forward_listen: {ip}:{FORWARD_PORT}\n  advertise:\n    tunnel: [{ip}:{HUB_TUNNEL_PORT}]\n"
                ),
            };
            let idx = me.start_etcd(i, true);
            me.etcd.push(idx);
            // this hub's member first: it answers when the others are cut off
            let mut etcd: Vec<String> =
                (1..=3).map(|j| format!("{scheme}://{}:{ETCD_CLIENT_PORT}", hub_ip(j))).collect();
            etcd.rotate_left(i - 1);
            let yaml = dir.join(format!("hub{i}.yaml"));
            std::fs::write(
                &yaml,
                format!(
                    "listen: {HUB_LISTEN}\ntun: mpvpn0\nnetwork: {CLUSTER_NETWORK}\ncontrol_socket: {}\nstate_file: {}\n\
                     rendezvous: {ip}:{RENDEZVOUS_PORT}\n\
                     cluster:\n  name: h{i}\n  etcd: [{}]\n{tls_files}  key_file: {}\n  on_master: {}\n{forwarding}\
                     \x20   rendezvous: {ip}:{RENDEZVOUS_PORT}\n\
                     peers:\n{peer_yaml}",
                    me.control(i).display(),
                    dir.join(format!("hub{i}.state.json")).display(),
                    etcd.join(", "),
                    cluster_key.display(),
                    hook.display(),
                ),
            )
            .unwrap();
        }
        for i in 1..=3 {
            let idx = me.start_hub(i);
            me.hubs.push(idx);
        }
        me
    }

    /// Starts etcd member `i` (1-based) on hub host `i`: `first`, as the cluster's
    /// founding member; else again on its data dir (which then ignores the cluster flags).
    pub fn start_etcd(&mut self, i: usize, first: bool) -> usize {
        let (ns, ip, dir) = (self.hub_ns[i - 1].clone(), hub_ip(i), self.lab.dir.clone());
        let scheme = if self.tls { "https" } else { "http" };
        let client = format!("{scheme}://{ip}:{ETCD_CLIENT_PORT}");
        let peer = format!("http://{ip}:{ETCD_PEER_PORT}");
        let data = dir.join(format!("etcd{i}")).display().to_string();
        let mut args = vec![
            "--name".to_string(),
            format!("e{i}"),
            "--data-dir".into(),
            data,
            "--listen-client-urls".into(),
            client.clone(),
            "--advertise-client-urls".into(),
            client,
            "--listen-peer-urls".into(),
            peer.clone(),
            "--initial-advertise-peer-urls".into(),
            peer,
            // a LAN's timings (README: "Several hubs"): etcd elects a new leader, and so
            // ends a lost hub's lease, within a second
            "--heartbeat-interval".into(),
            "50".into(),
            "--election-timeout".into(),
            "500".into(),
        ];
        if self.tls {
            let d = dir.display();
            args.extend([
                "--cert-file".into(),
                format!("{d}/e{i}.pem"),
                "--key-file".into(),
                format!("{d}/e{i}.key"),
                "--trusted-ca-file".into(),
                format!("{d}/ca.pem"),
                "--client-cert-auth".into(),
            ]);
        }
        if first {
            let members: Vec<String> = (1..=3).map(|j| format!("e{j}=http://{}:{ETCD_PEER_PORT}", hub_ip(j))).collect();
            let token = format!("{}-etcd", dir.file_name().unwrap_or_default().to_string_lossy());
            args.extend(["--initial-cluster".into(), members.join(","), "--initial-cluster-token".into(), token]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let name = if first { format!("etcd{i}") } else { format!("etcd{i}-again") };
        self.lab.spawn(&ns, &name, std::path::Path::new("etcd"), &args)
    }

    /// Cuts hub host `i` (its hub and its etcd member) off the switch, or joins it again.
    pub fn partition(&self, i: usize, cut: bool) {
        let ns = &self.hub_ns[i - 1];
        let rules = if cut {
            "table inet partition {\n chain in { type filter hook input priority 0; iifname \"lan\" drop; }\n              chain out { type filter hook output priority 0; oifname \"lan\" drop; }\n}\n"
        } else {
            "table inet partition {}\ndelete table inet partition\n"
        };
        self.lab.nft(ns, rules);
    }

    pub fn control(&self, i: usize) -> PathBuf {
        self.lab.dir.join(format!("hub{i}.sock"))
    }

    /// Starts hub `i` (1-based); returns its process index.
    pub fn start_hub(&mut self, i: usize) -> usize {
        let ns = self.hub_ns[i - 1].clone();
        let yaml = self.lab.dir.join(format!("hub{i}.yaml")).display().to_string();
        self.lab.spawn(&ns, &format!("hub{i}"), &bin("mpvpn"), &["hub", "-c", &yaml])
    }

    /// Restarts hub `i` after it was stopped.
    pub fn restart_hub(&mut self, i: usize) {
        self.hubs[i - 1] = self.start_hub(i);
    }

    /// Hub `i`'s `cluster` status (Null when it does not answer).
    pub fn cluster_status(&self, i: usize) -> serde_json::Value {
        mpvpn_status(&self.control(i))["cluster"].clone()
    }

    /// Waits until every running hub in `which` sees the same master and `hubs_up` hubs
    /// up; returns the master's name.
    pub fn wait_agreed_master(&self, which: &[usize], hubs_up: usize, within: Duration) -> String {
        let until = Instant::now() + within;
        loop {
            let views: Vec<serde_json::Value> = which.iter().map(|&i| self.cluster_status(i)).collect();
            let masters: Vec<Option<&str>> = views.iter().map(|v| v["master"].as_str()).collect();
            let up = |v: &serde_json::Value| {
                v["hubs"].as_array().map_or(0, |a| a.iter().filter(|h| h["state"] == "up").count())
            };
            let agreed = masters[0].is_some() && masters.iter().all(|m| *m == masters[0]);
            if agreed && views.iter().all(|v| up(v) == hubs_up && v["etcd"] == "up") {
                return masters[0].unwrap_or_default().to_string();
            }
            assert!(
                Instant::now() < until,
                "hubs {which:?} did not agree on a master with {hubs_up} hubs up: {views:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The `on_master` runs so far, as `(hub, up|down)`.
    pub fn master_runs(&self) -> Vec<(String, String)> {
        std::fs::read_to_string(&self.master_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once(' ').map(|(h, w)| (h.to_string(), w.to_string())))
            .collect()
    }

    /// Starts a peer host on the switch running `mpvpn peer` as `peers[n]`, whose embedded
    /// clients reach the mpservers of `hubs` (started here if they are not yet), in that
    /// order (`hubs:` in peer.yaml when there are several); returns its namespace.
    pub fn start_peer(&mut self, n: usize, hubs: &[usize]) -> String {
        // only the hubs named: what goes to a peer of another hub is forwarded
        self.start_peer_with(n, hubs, "discover: false\n", false)
    }

    /// `start_peer` with one hub, from which the peer learns the others and registers
    /// with them too (`discover`, the default).
    pub fn start_discovering_peer(&mut self, n: usize, hub: usize) -> String {
        self.start_peer_with(n, &[hub], "", false)
    }

    /// `start_peer` with a mesh socket (`connect: always`, `relay` as given; each hub's
    /// own rendezvous port in its `hubs:` entry). With `direct` false the peer hosts cannot
    /// reach each other's mesh sockets (what two symmetric NATs leave): the pair is relayed.
    pub fn start_meshed_peer(&mut self, n: usize, hubs: &[usize], relay: &str, direct: bool) -> String {
        let mesh = format!(
            "mesh:\n  listen: 0.0.0.0:{MESH_PORT}\n  rendezvous: {}:{RENDEZVOUS_PORT}\n  relay: {relay}\n  connect: always\n",
            hub_ip(hubs[0])
        );
        let ns = self.start_peer_with(n, hubs, &mesh, true);
        if !direct {
            self.lab.nft(
                &ns,
                &format!(
                    "table inet nodirect {{\n chain out {{ type filter hook output priority 0; udp dport {MESH_PORT} ip daddr 10.90.0.100-10.90.0.199 drop; }}\n}}\n"
                ),
            );
        }
        ns
    }

    /// One pair per case (`relay`, whether its hosts reach each other's mesh sockets):
    /// peers `2k` and `2k + 1`, each listing hubs 1 then 2, `connect: always`. Waits until
    /// every peer is up, the direct pairs go direct and each pair answers pings; returns,
    /// per pair, the first peer's namespace and the second's VPN address.
    pub fn start_pairs(&mut self, cases: &[(&str, bool)]) -> Vec<(String, Ipv4Addr)> {
        let mut first = Vec::new();
        for (k, &(relay, direct)) in cases.iter().enumerate() {
            first.push(self.start_meshed_peer(2 * k, &[1, 2], relay, direct));
            self.start_meshed_peer(2 * k + 1, &[1, 2], relay, direct);
        }
        let up = Duration::from_secs(20);
        let pairs: Vec<(String, Ipv4Addr)> =
            first.into_iter().enumerate().map(|(k, ns)| (ns, self.wait_peer_up(2 * k + 1, up))).collect();
        for (k, &(_, direct)) in cases.iter().enumerate() {
            self.wait_peer_up(2 * k, up);
            // registered with both hubs, traffic through h1 (the first listed)
            for n in [2 * k, 2 * k + 1] {
                self.wait_hub_states(n, &["active", "up"], up);
            }
            if direct {
                self.wait_direct(2 * k, 2 * k + 1, Duration::from_secs(15));
            }
        }
        for (k, (ns, dst)) in pairs.iter().enumerate() {
            let warm = crate::traffic::ping(ns, &dst.to_string(), 20, "0.05", &[]);
            assert!(warm.len() >= 18, "pair {k} before: {} of 20", warm.len());
        }
        pairs
    }

    /// Waits until peer `a` reaches peer `b` over a direct path.
    pub fn wait_direct(&self, a: usize, b: usize, within: Duration) {
        let until = Instant::now() + within;
        let name = &self.peers[b].0;
        loop {
            let s = mpvpn_status(&self.peer_control(a));
            let via =
                s["peers"].as_array().and_then(|p| p.iter().find(|p| p["name"] == *name).map(|p| p["via"].clone()));
            if via.as_ref().and_then(|v| v.as_str()) == Some("direct") {
                return;
            }
            assert!(Instant::now() < until, "p{a} and {name} did not go direct: {s}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until peer `n`'s status shows its hubs in these states (`active`, `up`, ...).
    pub fn wait_hub_states(&self, n: usize, want: &[&str], within: Duration) {
        let until = Instant::now() + within;
        loop {
            let hubs = mpvpn_status(&self.peer_control(n))["hubs"].clone();
            let states: Vec<&str> =
                hubs.as_array().map_or(vec![], |h| h.iter().filter_map(|h| h["state"].as_str()).collect());
            if states == want {
                return;
            }
            assert!(Instant::now() < until, "p{n}'s hubs are not {want:?}: {hubs}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `count` pings every 20 ms over each of `pairs` (`start_pairs`); `kill -9` of hub
    /// `hub` 2 s in. Returns, per pair, how many were answered and the longest time
    /// without an answer.
    pub fn ping_pairs_across_kill(
        &mut self,
        pairs: &[(String, Ipv4Addr)],
        hub: usize,
        count: u32,
    ) -> Vec<(usize, Duration)> {
        let runs: Vec<_> = pairs
            .iter()
            .map(|(ns, dst)| {
                let (ns, dst) = (ns.clone(), dst.to_string());
                std::thread::spawn(move || crate::traffic::ping_gaps(&ns, &dst, count, "0.02"))
            })
            .collect();
        std::thread::sleep(Duration::from_secs(2));
        self.lab.kill9(self.hubs[hub - 1]);
        runs.into_iter().map(|r| r.join().expect("ping")).collect()
    }

    fn start_peer_with(&mut self, n: usize, hubs: &[usize], extra_yaml: &str, rendezvous: bool) -> String {
        self.start_servers(hubs);
        let tk = self.tunnel_key.display().to_string();
        let name = self.peers[n].0.clone();
        let (switch, ns) = (self.switch.clone(), self.lab.add_ns(&format!("p{n}")));
        let port = format!("p{n}");
        run(Command::new("ip").args(["-n", &ns, "link", "add", "lan", "type", "veth", "peer", "name", &port]));
        run(Command::new("ip").args(["-n", &ns, "link", "set", &port, "netns", &switch]));
        self.lab.sh(&switch, &format!("ip link set {port} master br0 up"));
        self.lab.sh(&ns, &format!("ip addr add 10.90.0.{}/24 dev lan && ip link set lan up", 100 + n));
        let dir = self.lab.dir.clone();
        let clients: Vec<String> = hubs
            .iter()
            .map(|&hub| {
                let client = dir.join(format!("client-{name}-h{hub}.yaml"));
                let remote = format!("{}:{HUB_TUNNEL_PORT}", hub_ip(hub));
                std::fs::write(&client, format!("key_file: {tk}\npaths:\n  - remote: {remote}\n")).unwrap();
                client.display().to_string()
            })
            .collect();
        let reach = match &clients[..] {
            [one] => format!("embedded_client: {one}\n"),
            several => several.iter().zip(hubs).fold("hubs:\n".to_string(), |s, (c, &hub)| {
                let rv = if rendezvous {
                    format!("    rendezvous: {}:{RENDEZVOUS_PORT}\n", hub_ip(hub))
                } else {
                    String::new()
                };
                s + &format!("  - embedded_client: {c}\n{rv}")
            }),
        };
        let yaml = dir.join(format!("peer-{name}.yaml"));
        std::fs::write(
            &yaml,
            format!(
                "name: {name}\nkey_file: {}\ntun: mpvpn0\ncontrol_socket: {}\n{reach}{extra_yaml}",
                dir.join(format!("{name}.key")).display(),
                self.peer_control(n).display(),
            ),
        )
        .unwrap();
        let yaml = yaml.display().to_string();
        let pid = self.lab.spawn(&ns, &format!("peer-{name}"), &bin("mpvpn"), &["peer", "-c", &yaml]);
        self.peer_hosts.push((n, ns.clone(), pid));
        ns
    }

    /// Starts the mpserver of each of `hubs` that has none yet (what `advertise.tunnel`
    /// names: peers reach the hub through it).
    pub fn start_servers(&mut self, hubs: &[usize]) {
        let tk = self.tunnel_key.display().to_string();
        let missing: Vec<usize> = hubs.iter().copied().filter(|&h| self.servers[h - 1].is_none()).collect();
        for hub in missing {
            let ns = self.hub_ns[hub - 1].clone();
            let port = HUB_TUNNEL_PORT.to_string();
            let control = self.lab.dir.join(format!("mpserver{hub}.sock")).display().to_string();
            let args = ["--key-file", &tk, "--control", &control, &port, "127.0.0.1", "5000"];
            self.servers[hub - 1] = Some(self.lab.spawn(&ns, &format!("mpserver{hub}"), &bin("mpserver"), &args));
        }
    }

    /// Waits until hubs `i` and `j` forward for a peer of each other, and their peers
    /// heard of it.
    pub fn wait_forwarding(&self, i: usize, j: usize) {
        self.wait_forwards(&[(i, j), (j, i)]);
    }

    /// Waits until hub `i` forwards for a peer of hub `j` (one that is not `i`'s own too),
    /// and its peers heard of it.
    pub fn wait_forwards_for(&self, i: usize, j: usize) {
        self.wait_forwards(&[(i, j)]);
    }

    fn wait_forwards(&self, each: &[(usize, usize)]) {
        let until = Instant::now() + Duration::from_secs(10);
        let forwards_for = |i: usize, other: usize| {
            self.cluster_status(i)["hubs"]
                .as_array()
                .and_then(|h| h.iter().find(|h| h["name"] == format!("h{other}")))
                .and_then(|h| h["forwards_for"].as_u64())
                .unwrap_or(0)
        };
        while let Some(&(i, j)) = each.iter().find(|&&(i, j)| forwards_for(i, j) < 1) {
            let (a, b) = (self.cluster_status(i), self.cluster_status(j));
            assert!(Instant::now() < until, "hub h{i} does not forward for h{j}'s peers: {a} / {b}");
            std::thread::sleep(Duration::from_millis(100));
        }
        // the peers hear of each other with their hubs' next list push
        std::thread::sleep(Duration::from_millis(500));
    }

    pub fn peer_control(&self, n: usize) -> PathBuf {
        self.lab.dir.join(format!("peer-p{n}.sock"))
    }

    /// Peer `peers[n]`'s VPN address once it is up.
    pub fn wait_peer_up(&self, n: usize, within: Duration) -> Ipv4Addr {
        let until = Instant::now() + within;
        loop {
            let s = mpvpn_status(&self.peer_control(n));
            if s["state"] == "up" {
                if let Some(a) = s["addr"].as_str().and_then(|a| a.parse().ok()) {
                    return a;
                }
            }
            assert!(Instant::now() < until, "peer p{n} not up: {s}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Registers peers `names` (indexes into `peers`) through hub `i`, all at once,
    /// each from its own socket; returns what each got, in order.
    pub fn register(&self, i: usize, names: &[usize], within: Duration) -> Vec<Registration> {
        let who: Vec<(String, [u8; 32])> = names.iter().map(|&n| self.peers[n].clone()).collect();
        spawn_in_ns(&self.hub_ns[i - 1], move || register_all(&who, within)).join().expect("registrar")
    }
}

/// What one Register got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registration {
    Address(Ipv4Addr),
    Refused(RefusalReason),
    NoAnswer,
}

/// Sends each name's Register every 300 ms (fresh timestamps, as a peer does) until its
/// Welcome or Refusal arrives or `within` passes.
pub fn register_all(who: &[(String, [u8; 32])], within: Duration) -> Vec<Registration> {
    let hub: SocketAddr = HUB_LISTEN.parse().unwrap();
    let socks: Vec<UdpSocket> = who
        .iter()
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    let mut got = vec![Registration::NoAnswer; who.len()];
    let until = Instant::now() + within;
    let mut next_send = Instant::now();
    let mut ts = 0u64;
    let mut buf = [0u8; 2048];
    while Instant::now() < until && got.contains(&Registration::NoAnswer) {
        if Instant::now() >= next_send {
            next_send = Instant::now() + Duration::from_millis(300);
            let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
            ts = wall.max(ts + 1);
            for (n, (name, key)) in who.iter().enumerate() {
                if got[n] != Registration::NoAnswer {
                    continue;
                }
                let reg = RegisterRepr {
                    name: name.clone(),
                    timestamp_ms: ts,
                    nonce: 0x1000 + n as u64,
                    want_addr: Ipv4Addr::UNSPECIFIED,
                    mtu: 0,
                    public: public_of(n),
                    routes: Vec::new(),
                    instance: 0,
                };
                let _ = socks[n].send_to(&reg.emit(&PeerKey::new(key)), hub);
            }
        }
        for (n, (_, key)) in who.iter().enumerate() {
            while let Ok((len, _)) = socks[n].recv_from(&mut buf) {
                let key = PeerKey::new(key);
                if let Ok(w) = WelcomeRepr::parse(&buf[..len], &key, &public_of(n)) {
                    got[n] = Registration::Address(w.addr);
                } else if let Ok(r) = RefusalRepr::parse(&buf[..len], &key) {
                    got[n] = Registration::Refused(r.reason);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    got
}

/// A registration's X25519 public key: any point will do for the hub to answer (the
/// registrar never uses the channel).
fn public_of(n: usize) -> [u8; 32] {
    let mut p = [9u8; 32];
    p[0] = 9;
    p[1] = n as u8;
    p[2] = (n >> 8) as u8;
    p
}

/// In `dir`: a CA (`ca.pem`), a server certificate for each etcd member (`e<i>.pem`,
/// `e<i>.key`, for its hub host's address) and a client certificate for the hubs
/// (`hub.pem`, `hub.key`), all P-256, made with the openssl command.
fn make_certificates(dir: &std::path::Path) {
    let openssl = |args: &[&str]| run(Command::new("openssl").args(args).current_dir(dir));
    let key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    openssl(
        &[
            &["req", "-x509"][..],
            &key,
            &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=mpt lab CA"],
        ]
        .concat(),
    );
    let sign = |name: &str, ext: &str| {
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        let (k, csr, pem, ext) =
            (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"), format!("{name}.ext"));
        openssl(&[&["req"][..], &key, &["-keyout", &k, "-out", &csr, "-subj", &format!("/CN={name}")]].concat());
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &ext,
        ]);
    };
    for i in 1..=3 {
        sign(&format!("e{i}"), &format!("subjectAltName=IP:{}\nextendedKeyUsage=serverAuth,clientAuth\n", hub_ip(i)));
    }
    sign("hub", "extendedKeyUsage=clientAuth\n");
}
