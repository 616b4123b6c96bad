//! The mesh topology: a hub on a public network ("wan", a router namespace), and two
//! peers, each either on the wan itself or behind its own NAT router (nftables
//! `masquerade`, or `masquerade random`, with the input policy of a home router).
//!
//! ```text
//!  hub 10.200.0.1 ── wan ── 10.200.1.1 peer a         (public)
//!                     │
//!                     └──── 10.200.2.1 NAT ── 192.168.2.2 peer b   (behind a NAT)
//! ```
//! The peers reach the hub's embedded multipath server directly (or through an mpbridge
//! on the wan with a lab delay: a hub far away), and its rendezvous port.

use crate::lab::{bin, Lab};
use crate::tunnel::{BRIDGE_PORT, SERVER_PORT};
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub const HUB_WAN: &str = "10.200.0.1";
pub const WAN_ROUTER: &str = "10.200.0.254";
pub const RENDEZVOUS_PORT: u16 = 5200;
pub const MESH_PORT: u16 = 5100;

/// How a peer is connected to the wan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// On the wan itself.
    Public,
    /// Behind `masquerade`: endpoint-independent mapping.
    Masquerade,
    /// Behind `masquerade random`: a mapping per destination ("symmetric").
    Random,
    /// Behind one `masquerade` router shared by both peers (each on its own LAN port).
    Shared,
}

pub struct MeshOptions {
    pub nats: [Nat; 2],
    /// `mesh.relay` of both peers.
    pub relay: &'static str,
    /// `mesh.connect` of both peers.
    pub connect: &'static str,
    /// One-way delay (ms) between the peers and the hub, by an mpbridge on the wan.
    pub hub_delay_ms: u64,
    /// `mesh:` in peer.yaml; without it everything between the peers crosses the hub.
    pub mesh: bool,
    /// Peer a (public) has a second uplink to the wan, 10.200.11.1, and a mesh socket on
    /// each (`mesh.listen` lists both).
    pub a_second_uplink: bool,
    /// `mesh.redundancy` of both peers (pair sessions with `relay: fallback`).
    pub redundancy: &'static str,
}

impl Default for MeshOptions {
    fn default() -> Self {
        Self {
            nats: [Nat::Public, Nat::Public],
            relay: "fallback",
            connect: "always",
            hub_delay_ms: 0,
            mesh: true,
            a_second_uplink: false,
            redundancy: "adaptive",
        }
    }
}

pub struct MeshLab {
    pub lab: Lab,
    pub hub_ns: String,
    pub wan_ns: String,
    pub peer_ns: Vec<String>,
    /// The NAT router in front of each peer, if any.
    pub nat_ns: Vec<Option<String>>,
    pub nats: [Nat; 2],
    pub hub: usize,
    pub peers: Vec<usize>,
}

impl MeshLab {
    pub fn start(tag: &str, o: MeshOptions) -> Self {
        let mut lab = Lab::new(tag);
        let wan = lab.add_ns("wan");
        let hub_ns = lab.add_ns("hub");
        lab.link(&hub_ns, "w", HUB_WAN, &wan, "hub", WAN_ROUTER);
        lab.sh(&hub_ns, &format!("ip route add default via {WAN_ROUTER}"));
        lab.sh(&wan, "sysctl -qw net.ipv4.ip_forward=1");
        let mut peer_ns = Vec::new();
        let mut nat_ns = Vec::new();
        for (i, nat) in o.nats.iter().enumerate() {
            let n = i + 1;
            let name = ["a", "b"][i];
            let ns = lab.add_ns(&format!("p{name}"));
            lab.private_hosts(&ns);
            let (wan_ip, router) = (format!("10.200.{n}.1"), format!("10.200.{n}.254"));
            match nat {
                Nat::Public => {
                    lab.link(&ns, "w", &wan_ip, &wan, &format!("p{name}"), &router);
                    lab.sh(&ns, &format!("ip route add default via {router}"));
                    if i == 0 && o.a_second_uplink {
                        // what leaves from the second address goes out of the second uplink
                        lab.link(&ns, "w2", "10.200.11.1", &wan, "pa2", "10.200.11.254");
                        lab.sh(&ns, "ip rule add from 10.200.11.1 table 11 && ip route add default via 10.200.11.254 dev w2 table 11");
                    }
                    nat_ns.push(None);
                }
                Nat::Masquerade | Nat::Random | Nat::Shared => {
                    // the shared router is the first peer's, on the wan as 10.200.1.1
                    let shared = (*nat == Nat::Shared).then(|| nat_ns.first().cloned().flatten()).flatten();
                    let r = match shared {
                        Some(r) => r,
                        None => {
                            let r = lab.add_ns(&format!("n{name}"));
                            lab.link(&r, "w", &wan_ip, &wan, &format!("n{name}"), &router);
                            lab.sh(&r, &format!("ip route add default via {router}"));
                            lab.sh(&r, "sysctl -qw net.ipv4.ip_forward=1");
                            let random = if *nat == Nat::Random { " random" } else { "" };
                            // a home router: masquerade out of the wan side; nothing
                            // unsolicited in; its LAN ports talk to each other
                            lab.nft(&r, &format!(
                                "table ip nat {{\n  chain post {{\n    type nat hook postrouting priority 100;\n    oifname \"w\" masquerade{random}\n  }}\n}}\ntable ip filter {{\n  chain input {{\n    type filter hook input priority 0; policy drop;\n    ct state established,related accept\n    iifname {{ \"l*\", \"lo\" }} accept\n  }}\n  chain forward {{\n    type filter hook forward priority 0; policy drop;\n    ct state established,related accept\n    iifname \"l*\" accept\n  }}\n}}\n"
                            ));
                            r
                        }
                    };
                    lab.link(&ns, "lan", &format!("192.168.{n}.2"), &r, &format!("l{name}"), &format!("192.168.{n}.1"));
                    lab.sh(&ns, &format!("ip route add default via 192.168.{n}.1"));
                    nat_ns.push(Some(r));
                }
            }
            peer_ns.push(ns);
        }
        let dir = lab.dir.clone();
        let (tunnel_key, peer_keys) = crate::vpn_lab::lab_keys(&dir, ["a", "b"]);
        let [ka, kb] = peer_keys;
        let tk = tunnel_key.display().to_string();
        let server_yaml = dir.join("server.yaml");
        std::fs::write(&server_yaml, format!("listen: 0.0.0.0:{SERVER_PORT}\nkey_file: {tk}\n")).expect("server.yaml");
        let hub_yaml = dir.join("hub.yaml");
        std::fs::write(
            &hub_yaml,
            format!(
                "tun: mpvpn0\nnetwork: 10.99.0.0/24\ncontrol_socket: {}\nembedded_server: {}\nrendezvous: 0.0.0.0:{RENDEZVOUS_PORT}\npeers:\n  - name: a\n    key_file: {}\n  - name: b\n    key_file: {}\n",
                dir.join("hub.sock").display(),
                server_yaml.display(),
                ka.display(),
                kb.display(),
            ),
        )
        .expect("hub.yaml");
        let hub = lab.spawn(&hub_ns, "mpvpn-hub", &bin("mpvpn"), &["hub", "-c", &hub_yaml.display().to_string()]);
        // a hub far away: the peers reach it through an mpbridge on the wan that delays
        let tunnel_remote = if o.hub_delay_ms > 0 {
            let (listen, to, delay) =
                (format!("{WAN_ROUTER}:{BRIDGE_PORT}"), format!("{HUB_WAN}:{SERVER_PORT}"), o.hub_delay_ms.to_string());
            let args = ["--listen", &listen, "--to", &to, "--lab-delay", &delay];
            lab.spawn(&wan, "mpbridge-far", &bin("mpbridge"), &args);
            format!("{WAN_ROUTER}:{BRIDGE_PORT}")
        } else {
            format!("{HUB_WAN}:{SERVER_PORT}")
        };
        let mut peers = Vec::new();
        for (i, (name, key)) in [("a", &ka), ("b", &kb)].into_iter().enumerate() {
            let client_yaml = dir.join(format!("client-{name}.yaml"));
            std::fs::write(&client_yaml, format!("key_file: {tk}\npaths:\n  - remote: {tunnel_remote}\n"))
                .expect("client");
            let yaml = dir.join(format!("peer-{name}.yaml"));
            let listen = if i == 0 && o.a_second_uplink {
                format!("[10.200.1.1:{MESH_PORT}, 10.200.11.1:{MESH_PORT}]")
            } else {
                format!("0.0.0.0:{MESH_PORT}")
            };
            let mesh = if o.mesh {
                format!(
                    "mesh:\n  listen: {listen}\n  rendezvous: {HUB_WAN}:{RENDEZVOUS_PORT}\n  relay: {}\n  connect: {}\n  redundancy: {}\n",
                    o.relay, o.connect, o.redundancy
                )
            } else {
                String::new()
            };
            std::fs::write(
                &yaml,
                format!(
                    "name: {name}\nkey_file: {}\ntun: mpvpn0\ncontrol_socket: {}\nembedded_client: {}\n{mesh}",
                    key.display(),
                    dir.join(format!("peer-{name}.sock")).display(),
                    client_yaml.display(),
                ),
            )
            .expect("peer yaml");
            let ns = peer_ns[i].clone();
            peers.push(lab.spawn(
                &ns,
                &format!("mpvpn-{name}"),
                &bin("mpvpn"),
                &["peer", "-c", &yaml.display().to_string()],
            ));
        }
        Self { lab, hub_ns, wan_ns: wan, peer_ns, nat_ns, nats: o.nats, hub, peers }
    }

    /// Bytes peer `i`'s host has sent on its uplinks (every interface but lo and the TUN).
    pub fn uplink_tx_bytes(&self, i: usize) -> u64 {
        let script =
            "for d in /sys/class/net/*; do case ${d##*/} in lo|mpvpn0) ;; *) cat $d/statistics/tx_bytes;; esac; done";
        self.lab.sh(&self.peer_ns[i], script).lines().filter_map(|l| l.trim().parse::<u64>().ok()).sum()
    }

    pub fn control_of(&self, who: &str) -> PathBuf {
        crate::vpn_lab::control_in(&self.lab.dir, who)
    }

    /// `mpvpn status --json` of "hub", "a" or "b".
    pub fn status(&self, who: &str) -> serde_json::Value {
        crate::vpn_lab::mpvpn_status(&self.control_of(who))
    }

    pub fn status_table(&self, who: &str) -> String {
        crate::vpn_lab::mpvpn_status_table(&self.control_of(who))
    }

    /// Waits until both peers are up; returns their VPN addresses.
    pub fn wait_up(&self, within: Duration) -> [String; 2] {
        let start = Instant::now();
        loop {
            let a = self.status("a");
            let b = self.status("b");
            if a["state"] == "up" && b["state"] == "up" {
                return [a["addr"].as_str().unwrap_or("").into(), b["addr"].as_str().unwrap_or("").into()];
            }
            assert!(start.elapsed() < within, "peers not up within {within:?}: {a} {b}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// How `who` reaches the other peer (`via` in its status).
    pub fn via(&self, who: &str) -> String {
        let other = if who == "a" { "b" } else { "a" };
        let st = self.status(who);
        let p = st["peers"].as_array().and_then(|ps| ps.iter().find(|p| p["name"] == other).cloned());
        p.and_then(|p| p["via"].as_str().map(String::from)).unwrap_or_default()
    }

    /// Waits until `who` reaches the other peer `via` ("direct" or "relay"); returns how
    /// long that took.
    pub fn wait_via(&self, who: &str, via: &str, within: Duration) -> Duration {
        let start = Instant::now();
        loop {
            if self.via(who) == via {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < within,
                "{who} not {via} within {within:?}:\n{}\n{}",
                self.status_table(who),
                self.status_table("hub")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The other peer's underlay address as peer `i` reaches it (its wan side, or its
    /// NAT's): what a ping of the direct link goes to.
    pub fn wan_addr_of(&self, i: usize) -> String {
        format!("10.200.{}.1", i + 1)
    }

    /// Bytes the hub passed on from `who` to the other peer.
    pub fn relayed(&self, who: &str) -> u64 {
        let st = self.status("hub");
        st["peers"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == who))
            .and_then(|p| p["relayed_bytes"].as_u64())
            .unwrap_or(0)
    }

    /// Drops (or, `false`, lets through again) every UDP datagram between the two peers'
    /// wan sides in the wan router: their direct paths die, the hub stays reachable.
    pub fn blackhole_direct(&self, on: bool) {
        let rules = if on {
            "table ip mesh_cut {\n  chain cut {\n    type filter hook forward priority 0; policy accept;\n    ip saddr 10.200.1.0/24 ip daddr 10.200.2.0/24 drop\n    ip saddr 10.200.2.0/24 ip daddr 10.200.1.0/24 drop\n  }\n}\n"
        } else {
            "table ip mesh_cut\ndelete table ip mesh_cut\n"
        };
        self.lab.nft(&self.wan_ns, rules);
    }

    /// Peer `i`'s NAT moves it to another public address (a new mapping for every flow,
    /// as after a router reboot or a new lease).
    pub fn renumber_nat(&self, i: usize) {
        let r = self.nat_ns[i].as_ref().expect("a NAT'ed peer");
        let n = i + 1;
        self.lab.sh(
            r,
            &format!(
                "ip addr add 10.200.{n}.3/24 dev w && nft flush chain ip nat post && nft add rule ip nat post oifname w snat to 10.200.{n}.3 && conntrack -F 2>/dev/null; true"
            ),
        );
    }
}
