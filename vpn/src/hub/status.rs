//! What `mpvpn status` shows of the peers.

use super::*;

/// A listed peer's state in `mpvpn status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeerState {
    /// The hub's view: heartbeats arrive.
    Up,
    /// The hub's view: no heartbeat for `PEER_SILENT_AFTER`; removed after the timeout.
    Silent,
    /// A peer's view of another: traffic goes through the hub (its relay, or its KCP
    /// link when there is no mesh): `Via::Relay`.
    Relay,
    /// A peer's view of another: traffic goes over a direct path of the mesh.
    Direct,
    /// A peer's view of itself in the list.
    #[serde(rename = "self")]
    Own,
}

impl std::fmt::Display for PeerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Up => "up",
            Self::Silent => "silent",
            Self::Relay => "relay",
            Self::Direct => "direct",
            Self::Own => "self",
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerStatus {
    pub id: u32,
    pub name: String,
    pub addr: Ipv4Addr,
    pub state: PeerState,
    pub tunnel: String,
    pub routes: Vec<Prefix>,
    /// Seconds since the last heartbeat (the hub's view only).
    pub last_heartbeat_s: Option<f64>,
    /// Seconds since the last packet from that peer.
    pub last_rx_s: Option<f64>,
    pub rtt_ms: Option<f64>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    /// A peer's view of another: how it is reached (the mesh; without it, `relay`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<Via>,
    /// A peer's view of another: the direct paths of the pair (none without the mesh).
    #[serde(default)]
    pub paths: Vec<MeshPathStatus>,
    /// Where its mesh sockets may be reached, as the hub lists them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<SocketAddr>,
    /// The hub's view: bytes from this peer it passed on to other peers (IP packets it
    /// routed and datagrams of direct sessions it relayed).
    #[serde(default)]
    pub relayed_bytes: u64,
}

impl Hub {
    pub fn status(&self, now: Instant) -> Vec<PeerStatus> {
        self.peers
            .values()
            .map(|p| PeerStatus {
                id: p.id,
                name: p.name.clone(),
                addr: p.addr,
                state: if now.saturating_duration_since(p.last_heartbeat) < PEER_SILENT_AFTER {
                    PeerState::Up
                } else {
                    PeerState::Silent
                },
                tunnel: p.tunnel.to_string(),
                routes: p.routes.clone(),
                last_heartbeat_s: Some(now.saturating_duration_since(p.last_heartbeat).as_secs_f64()),
                last_rx_s: Some(now.saturating_duration_since(p.last_seen).as_secs_f64()),
                rtt_ms: (p.rtt_us > 0).then(|| f64::from(p.rtt_us) / 1000.0),
                tx_bytes: p.tx_bytes,
                rx_bytes: p.rx_bytes,
                via: None,
                paths: Vec::new(),
                candidates: if p.mesh { p.candidates() } else { Vec::new() },
                relayed_bytes: p.relayed_bytes,
            })
            .collect()
    }
}
