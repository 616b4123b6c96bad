//! What `mpvpn status` and the metrics show of a hub or a peer.

use super::*;

/// Which daemon a status is of.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Hub,
    Peer,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Hub => "hub",
            Self::Peer => "peer",
        })
    }
}

/// What `mpvpn status` shows, on a hub or a peer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VpnStatus {
    pub role: Role,
    /// The daemon's process id (`mpvpn reload` signals it).
    #[serde(default)]
    pub pid: u32,
    pub name: String,
    pub tun: String,
    pub addr: Option<Ipv4Addr>,
    pub state: LinkState,
    /// Peer: heartbeat round trip to the hub.
    pub hub_rtt_ms: Option<f64>,
    /// Peer: seconds since the hub last answered.
    pub last_heartbeat_s: Option<f64>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub peers: Vec<PeerStatus>,
    /// The drop counters as the core keeps them (a peer's with its mesh's inside).
    pub drops: serde_json::Value,
    /// Every drop reason (`ALL` of the daemon's reasons) and its count, for the metrics.
    #[serde(skip)]
    pub drop_counts: Vec<(String, u64)>,
    /// Peer: announced routes the hub refused, with why.
    #[serde(default)]
    pub refused_routes: Vec<String>,
    /// Peer: routes from other peers it did not install, with why.
    #[serde(default)]
    pub skipped_routes: Vec<String>,
    /// Peer: its mesh sockets, and where the hub's rendezvous port sees each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mesh_sockets: Vec<MeshSocketStatus>,
    /// Peer with `hubs:` in peer.yaml: each hub and what the peer does with it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hubs: Vec<PeerHubStatus>,
    /// Hub: its cluster (alone: its own master, no etcd).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStatus>,
}

/// A hub's view of its cluster.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClusterStatus {
    /// This hub's name (`standalone` without `cluster:`).
    pub name: String,
    /// The master's name; `None`: none elected now (or etcd does not answer).
    pub master: Option<String>,
    pub is_master: bool,
    /// `up`, `unreachable`, or `none` (no cluster).
    pub etcd: String,
    pub etcd_members: Vec<String>,
    /// Every hub seen in etcd since this one started.
    pub hubs: Vec<ClusterHubStatus>,
    /// Hub records in etcd that the cluster key did not sign (ignored).
    pub unverified_records: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClusterHubStatus {
    pub name: String,
    /// `up`, `gone` (its lease ended) or `config-differs` (another `network`/`peers`).
    pub state: String,
    pub tunnel: Vec<String>,
    pub rendezvous: Option<String>,
    /// Where it takes forwarded packets, and how many peers its last table named (what
    /// this hub forwards to it).
    #[serde(default)]
    pub forward: Option<String>,
    #[serde(default)]
    pub forwards_for: usize,
    /// Bytes of IP packets forwarded to it, and from it to this hub's peers.
    #[serde(default)]
    pub forwarded_tx_bytes: u64,
    #[serde(default)]
    pub forwarded_rx_bytes: u64,
}

impl ClusterStatus {
    pub fn standalone() -> Self {
        Self {
            name: "standalone".into(),
            master: Some("standalone".into()),
            is_master: true,
            etcd: "none".into(),
            etcd_members: Vec::new(),
            hubs: Vec::new(),
            unverified_records: 0,
        }
    }

    fn write_rows(&self, s: &mut String) {
        use std::fmt::Write;
        let master = match (&self.master, self.is_master) {
            (_, true) => format!("{} (this hub)", self.name),
            (Some(m), false) => m.clone(),
            (None, false) => "- (none elected now)".into(),
        };
        let hubs: Vec<String> = self
            .hubs
            .iter()
            .map(|h| match (&h.forward, h.forwards_for) {
                (Some(_), 1) if h.name != self.name => format!("{} {} (1 peer)", h.name, h.state),
                (Some(_), n) if h.name != self.name => format!("{} {} ({n} peers)", h.name, h.state),
                _ => format!("{} {}", h.name, h.state),
            })
            .collect();
        let _ = writeln!(
            s,
            "  cluster: hub {}  master {master}  etcd {}{}  hubs: {}",
            self.name,
            self.etcd,
            if self.etcd_members.is_empty() { String::new() } else { format!(" ({})", self.etcd_members.join(",")) },
            if hubs.is_empty() { "-".into() } else { hubs.join(", ") }
        );
        let differ: Vec<&str> =
            self.hubs.iter().filter(|h| h.state == "config-differs").map(|h| h.name.as_str()).collect();
        if !differ.is_empty() {
            let _ = writeln!(
                s,
                "  !! hubs {} run with another `network`/`peers` than this one: make hub.yaml the same on every hub",
                differ.join(", ")
            );
        }
        if self.unverified_records > 0 {
            let _ = writeln!(
                s,
                "  !! {} hub records in etcd not signed with the cluster key (ignored)",
                self.unverified_records
            );
        }
    }
}

/// One of a peer's hubs (`hubs:` in peer.yaml).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerHubStatus {
    /// How peer.yaml reaches it (`mpclient at ...`, `embedded client ...`).
    pub name: String,
    /// `active` (registered; traffic through the hubs goes through it), `up` (registered),
    /// `registering`, `retrying` (heartbeats unanswered) or `hub lost` (registering again).
    pub state: String,
    pub rtt_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MeshSocketStatus {
    pub local: String,
    /// Its server-reflexive address; `None`: the rendezvous port has not answered.
    pub reflexive: Option<String>,
}

impl VpnStatus {
    /// One line for the stats log: state, peers, bytes, drops.
    pub fn summary_line(&self) -> String {
        format!(
            "state={} peers={} tx_bytes={} rx_bytes={} drops={}",
            self.state,
            self.peers.len(),
            self.tx_bytes,
            self.rx_bytes,
            self.drops
        )
    }

    pub fn to_table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "mpvpn {} {}  tun {}  address {}  state {}{}  tx {} B  rx {} B  drops {}",
            self.role,
            self.name,
            self.tun,
            self.addr.map_or("-".into(), |a| a.to_string()),
            self.state,
            self.hub_rtt_ms.map_or(String::new(), |r| format!("  hub rtt {r:.2} ms")),
            self.tx_bytes,
            self.rx_bytes,
            self.drops
        );
        if let Some(c) = &self.cluster {
            c.write_rows(&mut s);
        }
        for h in &self.hubs {
            let rtt = h.rtt_ms.map_or(String::new(), |r| format!("  rtt {r:.2} ms"));
            let _ = writeln!(s, "  hub {}  {}{rtt}", h.name, h.state);
        }
        for m in &self.mesh_sockets {
            let seen = m.reflexive.as_deref().unwrap_or("- (no answer from the hub's rendezvous port)");
            let _ = writeln!(s, "  mesh socket {}  seen by the hub as {seen}", m.local);
        }
        let hub = self.role == Role::Hub;
        let _ = writeln!(
            s,
            "  {:<16} {:<10} {:<15} {:<9} {:<6} {:>9} {:>9} {:>9} {:>12} {:>12} {:>12}  ROUTES",
            "NAME",
            "ID",
            "ADDRESS",
            "STATE",
            "VIA",
            "LAST HB s",
            "LAST RX s",
            "RTT ms",
            "TX BYTES",
            "RX BYTES",
            if hub { "RELAYED" } else { "" }
        );
        for r in &self.refused_routes {
            let _ = writeln!(s, "  route refused by the hub: {r}");
        }
        for r in &self.skipped_routes {
            let _ = writeln!(s, "  route not installed: {r}");
        }
        for p in &self.peers {
            p.write_rows(&mut s, hub);
        }
        s
    }
}

impl PeerStatus {
    /// This peer's row of the status table, and one row per path under it.
    fn write_rows(&self, s: &mut String, hub: bool) {
        use std::fmt::Write;
        let p = self;
        let routes: Vec<String> = p.routes.iter().map(|r| r.to_string()).collect();
        let _ = writeln!(
            s,
            "  {:<16} {:<10} {:<15} {:<9} {:<6} {:>9} {:>9} {:>9} {:>12} {:>12} {:>12}  {}",
            p.name,
            p.id,
            p.addr,
            p.state,
            p.via.map_or("-".into(), |v| v.to_string()),
            p.last_heartbeat_s.map_or("-".into(), |s| format!("{s:.1}")),
            p.last_rx_s.map_or("-".into(), |s| format!("{s:.1}")),
            p.rtt_ms.map_or("-".into(), |r| format!("{r:.2}")),
            p.tx_bytes,
            p.rx_bytes,
            if hub { p.relayed_bytes.to_string() } else { String::new() },
            routes.join(",")
        );
        for x in &p.paths {
            let pct = |l: Option<f64>| l.map_or("-".into(), |l| format!("{:.0}%", l * 100.0));
            let _ = writeln!(
                s,
                "      path {} -> {}  {}  rtt {}  loss up {} down {}",
                x.local,
                x.remote,
                x.state.name(),
                x.rtt_ms.map_or("-".into(), |r| format!("{r:.2} ms")),
                pct(x.loss_up),
                pct(x.loss_down)
            );
        }
    }
}

/// The metrics of a hub or peer, from its status: its own state and traffic, every
/// listed peer's state, bytes, heartbeat age and RTT, and drops by reason.
pub(super) fn vpn_metrics(st: &VpnStatus, m: &mut Metrics) {
    use common::driver::metrics::Unit;
    let own = || -> Labels { vec![("role".into(), st.role.to_string()), ("name".into(), st.name.clone())] };
    let up = f64::from(u8::from(st.state == LinkState::Up));
    m.gauge("vpn_up", "1 while the hub runs, or while a peer is registered", None, [(own(), up)]);
    if let Some(c) = &st.cluster {
        cluster_metrics(c, m);
    }
    m.counter(
        "vpn_tun",
        "Bytes of IP packets through the TUN device",
        Some(Unit::Bytes),
        [(with_label(own(), "direction", "tx"), st.tx_bytes), (with_label(own(), "direction", "rx"), st.rx_bytes)],
    );
    m.gauge(
        "vpn_hub_rtt",
        "A peer's heartbeat round trip to the hub",
        Some(Unit::Seconds),
        st.hub_rtt_ms.map(|v| (own(), v / 1000.0)),
    );
    let peer =
        |p: &PeerStatus| -> Labels { vec![("peer".into(), p.name.clone()), ("address".into(), p.addr.to_string())] };
    let mut state = Vec::new();
    for p in &st.peers {
        for s in [PeerState::Up, PeerState::Silent, PeerState::Relay, PeerState::Direct, PeerState::Own] {
            state.push((with_label(peer(p), "state", s.to_string()), f64::from(u8::from(p.state == s))));
        }
    }
    m.gauge("vpn_peer_state", "1 for the state each listed peer is in", None, state);
    let bytes = st.peers.iter().flat_map(|p| {
        [("tx", p.tx_bytes), ("rx", p.rx_bytes)].map(|(dir, n)| (with_label(peer(p), "direction", dir), n))
    });
    m.counter("vpn_peer", "Bytes of IP packets to (tx) and from (rx) each peer", Some(Unit::Bytes), bytes);
    let hb = st.peers.iter().filter_map(|p| p.last_heartbeat_s.map(|s| (peer(p), s)));
    m.gauge(
        "vpn_peer_last_heartbeat_age",
        "Seconds since a peer's last heartbeat (the hub's view)",
        Some(Unit::Seconds),
        hb,
    );
    let rtt = st.peers.iter().filter_map(|p| p.rtt_ms.map(|v| (peer(p), v / 1000.0)));
    m.gauge(
        "vpn_peer_rtt",
        "Round trip to a peer: its heartbeats (the hub's view) or its best direct path (a peer's view)",
        Some(Unit::Seconds),
        rtt,
    );
    if st.role == Role::Hub {
        let relayed = st.peers.iter().map(|p| (peer(p), p.relayed_bytes));
        m.counter(
            "vpn_peer_relayed",
            "Bytes from a peer the hub passed on to other peers (routed packets, relayed datagrams)",
            Some(Unit::Bytes),
            relayed,
        );
    }
    let drops = st.drop_counts.iter().map(|(why, n)| (with_label(own(), "reason", why.as_str()), *n));
    m.counter("vpn_drops", "Datagrams and packets dropped, by reason", None, drops);
}

/// A hub's cluster: whether it is master, whether etcd answers, how many hubs are up.
fn cluster_metrics(c: &ClusterStatus, m: &mut Metrics) {
    let own = || -> Labels { vec![("hub".into(), c.name.clone())] };
    let master = f64::from(u8::from(c.is_master));
    m.gauge("vpn_hub_is_master", "1 while this hub is the cluster's master (alone: always)", None, [(own(), master)]);
    let etcd_up = f64::from(u8::from(c.etcd == "up"));
    let etcd = (c.etcd != "none").then(|| (own(), etcd_up));
    m.gauge("vpn_cluster_etcd_up", "1 while etcd answers this hub (with a quorum)", None, etcd);
    let up = c.hubs.iter().filter(|h| h.state != "gone").count() as f64;
    let hubs = (c.etcd != "none").then(|| (own(), up));
    m.gauge("vpn_cluster_hubs", "Hubs in the cluster now, as this hub sees them", None, hubs);
    let forwarded = c.hubs.iter().filter(|h| h.name != c.name).flat_map(|h| {
        [("tx", h.forwarded_tx_bytes), ("rx", h.forwarded_rx_bytes)].map(|(dir, n)| {
            let labels = vec![
                ("hub".into(), c.name.clone()),
                ("to_hub".into(), h.name.clone()),
                ("direction".into(), dir.into()),
            ];
            (labels, n)
        })
    });
    m.counter(
        "vpn_cluster_forwarded",
        "Bytes of IP packets forwarded to (tx) and from (rx) each other hub",
        Some(common::driver::metrics::Unit::Bytes),
        forwarded,
    );
}

pub(super) fn hub_status(core: &Hub, now: Instant, tun: &str, addr: Ipv4Addr) -> VpnStatus {
    // the hub's own traffic is what it carries for its peers: their tx is its rx
    let peers = core.status(now);
    VpnStatus {
        role: Role::Hub,
        pid: std::process::id(),
        name: String::new(),
        tun: tun.into(),
        addr: Some(addr),
        state: LinkState::Up,
        hub_rtt_ms: None,
        last_heartbeat_s: None,
        tx_bytes: peers.iter().map(|p| p.rx_bytes).sum(),
        rx_bytes: peers.iter().map(|p| p.tx_bytes).sum(),
        peers,
        drops: serde_json::to_value::<&HubDrops>(&core.drops).unwrap_or_default(),
        drop_counts: core.drops.iter().map(|(why, n)| (why.to_string(), n)).collect(),
        refused_routes: Vec::new(),
        skipped_routes: Vec::new(),
        mesh_sockets: Vec::new(),
        hubs: Vec::new(),
        cluster: None,
    }
}

pub(super) fn peer_status(core: &Peer, now: Instant, name: &str, tun: &str, skipped: &[(Prefix, String)]) -> VpnStatus {
    let drops = core.drop_counts();
    VpnStatus {
        role: Role::Peer,
        pid: std::process::id(),
        name: name.into(),
        tun: tun.into(),
        addr: core.is_up().then(|| core.addr()),
        state: core.link_state(),
        hub_rtt_ms: core.rtt_ms(),
        last_heartbeat_s: core.last_ack().map(|t| now.saturating_duration_since(t).as_secs_f64()),
        tx_bytes: core.tx_bytes,
        rx_bytes: core.rx_bytes,
        peers: core.peer_status(now),
        drops: serde_json::to_value(&drops).unwrap_or_default(),
        drop_counts: drops.iter().collect(),
        refused_routes: core.refused_routes().iter().map(|(r, why)| format!("{r}: {why:?}")).collect(),
        skipped_routes: skipped.iter().map(|(r, why)| format!("{r}: {why}")).collect(),
        mesh_sockets: Vec::new(),
        hubs: Vec::new(),
        cluster: None,
    }
}
