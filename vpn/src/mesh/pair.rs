//! A pair: the two tunnel sessions with one other peer (our client, our server), its
//! paths, its KCP link and its traffic.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    /// Our client's session (answers come back on it).
    Client,
    /// Their client's session with our server (their data arrives on it).
    Server,
}

pub(super) struct Pair {
    pub(super) name: String,
    pub(super) addr: Ipv4Addr,
    pub(super) routes: Vec<Prefix>,
    pub(super) candidates: Vec<SocketAddr>,
    pub(super) psk: Psk,
    pub(super) client: Client,
    pub(super) server: Server,
    /// Client path `i >= 1` goes from mesh socket `direct[i - 1].0` to `direct[i - 1].1`.
    pub(super) direct: Vec<(usize, SocketAddr)>,
    pub(super) client_session: Option<SessionId>,
    pub(super) established: bool,
    /// The link carries the pair's packets since our client first got through: from
    /// then on they stay on it (also while the client starts over), so they never
    /// overtake each other on two ways.
    pub(super) in_use: bool,
    /// Client paths an authenticated answer came back on lately.
    pub(super) up: PathMask,
    /// Their client's session with our server (the latest), and whether it has a live
    /// direct path: then our data can go back on it when our own client has none (their
    /// NAT maps a new port for us that no candidate names: a symmetric NAT).
    pub(super) server_slot: Option<common::server::SessionSlot>,
    pub(super) server_direct: bool,
    /// Which mesh socket each address their client reached our server from came in on
    /// (the latest `MAX_PATHS`): answers go back out of it.
    pub(super) server_sockets: VecDeque<(SocketAddr, usize)>,
    /// Per client path: the earliest the punch may send there again.
    pub(super) next_punch: Vec<Instant>,
    /// The client paths paused now (`refresh_paused`).
    pub(super) paused: PathMask,
    pub(super) punch_until: Option<Instant>,
    pub(super) retry_at: Option<Instant>,
    /// When its recent punch windows began (`start_punch`).
    pub(super) punch_starts: VecDeque<Instant>,
    pub(super) link: KcpLink,
    /// When our client last sent data (`PAIR_KEEPALIVE`).
    pub(super) last_data: Instant,
    /// When the last IP packet from the pair arrived.
    pub(super) last_rx: Option<Instant>,
    /// The way last told (`MeshEvent`); `None`: not yet.
    pub(super) reported: Option<Via>,
    /// Since when the peer is missing from our list (`PAIR_UNLISTED_GRACE`).
    pub(super) unlisted_since: Option<Instant>,
    /// `relay: fallback`: the relay path is a standby while a direct path is up.
    pub(super) relay_standby: bool,
    pub(super) tx_bytes: u64,
    pub(super) rx_bytes: u64,
}

impl Pair {
    pub(super) fn direct_up(&self) -> bool {
        self.up.0 & !1 != 0
    }

    pub(super) fn via(&self) -> Via {
        if self.established && (self.direct_up() || self.server_direct) {
            Via::Direct
        } else {
            Via::Relay
        }
    }

    /// Our server's live direct paths back to their client (not the relay's).
    pub(super) fn server_direct_paths(&self, now: Instant) -> PathMask {
        let Some(slot) = self.server_slot else { return PathMask::EMPTY };
        let mut out = PathMask::EMPTY;
        for i in self.server.live_paths(now, slot).iter() {
            if self.server.path_addr(slot, i).is_some_and(|a| !is_relay_addr(a)) {
                out.insert(i);
            }
        }
        out
    }

    /// A client's session starts with the first datagram of its application: an empty
    /// one (their server takes it and passes nothing on).
    pub(super) fn open_session(&mut self, now: Instant) {
        let mut buf = [0u8; DATA_PAYLOAD_OFFSET + common::wire::AEAD_TAG_LEN];
        let _ = self.client.handle_app_datagram(now, PAIR_APP, &mut buf, 0);
    }

    /// Which of `paths` data may go on.
    pub(super) fn data_paths(&self, relay: RelayMode, paths: PathMask) -> PathMask {
        let mut out = PathMask::EMPTY;
        for i in paths.iter() {
            let take =
                if i == RELAY_PATH { relay == RelayMode::Always || !self.direct_up() } else { self.up.contains(i) };
            if take {
                out.insert(i);
            }
        }
        if out.is_empty() {
            out.insert(RELAY_PATH);
        }
        out
    }

    /// Where our server's datagram for path `path` of their client's session `slot`
    /// goes: the relay (to peer `id`), or back to the address that path came from, out of
    /// the mesh socket that heard it.
    pub(super) fn server_dest(&self, id: u32, slot: common::server::SessionSlot, path: usize) -> Option<MeshAddr> {
        let addr = self.server.path_addr(slot, path)?;
        if is_relay_addr(addr) {
            return Some(MeshAddr::Relay(id));
        }
        let &(_, socket) = self.server_sockets.iter().find(|(a, _)| *a == addr)?;
        Some(MeshAddr::Direct { socket, addr })
    }

    pub(super) fn path_of(&self, from: MeshAddr) -> Option<usize> {
        match from {
            MeshAddr::Relay(_) => Some(RELAY_PATH),
            MeshAddr::Direct { socket, addr } => {
                self.direct.iter().position(|&(s, a)| s == socket && a == addr).map(|i| i + 1)
            }
        }
    }

    /// Our server of this pair heard (authentically) from `addr` on mesh socket `socket`:
    /// its answers to `addr` go out there.
    pub(super) fn note_server_socket(&mut self, addr: SocketAddr, socket: usize) {
        if !self.server_sockets.iter().any(|&(a, s)| (a, s) == (addr, socket)) {
            self.server_sockets.retain(|&(a, _)| a != addr);
            if self.server_sockets.len() >= MAX_PATHS {
                self.server_sockets.pop_front();
            }
            self.server_sockets.push_back((addr, socket));
        }
    }

    pub(super) fn source_allowed(&self, src: IpAddr, network: Prefix) -> bool {
        ip::source_of_peer(src, network, self.addr, &self.routes)
    }
}

/// The address a pair's server knows the relay path by: in 100::/64, which is never
/// anybody's.
pub(super) fn relay_addr(peer_id: u32) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, (peer_id >> 16) as u16, peer_id as u16)), 0)
}

pub(super) fn is_relay_addr(a: SocketAddr) -> bool {
    matches!(a.ip(), IpAddr::V6(v6) if v6.segments()[..6] == [0x100, 0, 0, 0, 0, 0])
}

/// The KCP conversation of a pair: from its key, so both sides agree and a new
/// introduction never meets an old link.
pub(super) fn pair_conv(key: &[u8; 32]) -> u32 {
    u32::from_be_bytes([key[0], key[1], key[2], key[3]])
}

/// Our server of a pair: it takes the sessions of their client (named `their_name`).
pub(super) fn pair_server(
    psk: &Psk,
    their_name: &str,
    now: Instant,
    wall_ms: u64,
    entropy: Box<dyn Entropy>,
) -> Server {
    Server::new(
        psk.clone(),
        ServerCoreConfig {
            default_target: None,
            targets: [(their_name.to_string(), PAIR_APP)].into_iter().collect(),
            ciphers: vec![Cipher::Aes256Gcm, Cipher::ChaCha20Poly1305],
            // their client may start over while its old session lingers
            max_sessions: 4,
            max_paths_per_session: MAX_PATHS,
            session_timeout: Duration::from_secs(30),
        },
        now,
        wall_ms,
        entropy,
    )
}

pub(super) fn pair_client(
    psk: &Psk,
    mesh: &MeshConfig,
    direct: &[(usize, SocketAddr)],
    now: Instant,
    wall_ms: u64,
    entropy: Box<dyn Entropy>,
) -> Client {
    let mut path_names = vec!["relay".to_string()];
    path_names.extend(direct.iter().map(|(s, a)| format!("{s}:{a}")));
    Client::new(
        psk.clone(),
        ClientCoreConfig {
            cipher: Cipher::Aes256Gcm,
            // their server finds the pair by our name
            target: mesh.name.clone(),
            path_names,
            session_idle_timeout: PAIR_IDLE_TIMEOUT,
            max_sessions: 1,
            // which paths may carry data is the relay mode's (paused paths); how the
            // others share it, the redundancy's
            redundancy: mesh.pair_redundancy(),
        },
        now,
        wall_ms,
        entropy,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Peer a's mesh: one wildcard socket, relay as a fallback, pairs made at once.
    fn test_mesh(now0: Instant) -> Mesh {
        let cfg = MeshConfig {
            name: "a".into(),
            sockets: vec!["0.0.0.0:5100".parse().unwrap()],
            relay: RelayMode::Fallback,
            connect: ConnectMode::Always,
            redundancy: common::redundancy::RedundancyConfig::default(),
        };
        Mesh::new(cfg, now0, 1_800_000_000_000, Box::new(common::sim::SimEntropy::new(1)))
    }

    /// A pair's datagram, relayed, still fits one datagram of the tunnel to the hub; and
    /// a full-sized packet takes two KCP segments.
    #[test]
    fn pair_datagrams_fit_the_relay() {
        assert_eq!(PAIR_PAYLOAD + TUNNEL_OVERHEAD + RELAY_HEADER_LEN + SEALED_OVERHEAD, crate::TUNNEL_PAYLOAD);
        let link = KcpLink::new(1, common::sim::epoch(), PAIR_PAYLOAD + SEALED_OVERHEAD);
        assert_eq!(link.mss(), 1321);
        assert_eq!((1 + crate::TUN_MTU as usize).div_ceil(link.mss()), 2);
    }

    /// A pair that hears nothing at all (relay and direct paths dead) never asks to be
    /// woken in the past: the driver would spin.
    #[test]
    fn a_silent_pair_never_spins() {
        let now0 = common::sim::epoch();
        let mut mesh = test_mesh(now0);
        let b = PeerEntry {
            id: 2,
            name: "b".into(),
            addr: Ipv4Addr::new(10, 99, 0, 3),
            routes: vec![],
            candidates: vec!["198.51.100.2:5100".parse().unwrap()],
        };
        mesh.set_peer_list(now0, 1, "10.99.0.0/24".parse().expect("literal"), &[b]);
        assert_eq!(mesh.poll_intro_request(), Some(2));
        mesh.on_intro(now0, &IntroRepr { peer_id: 2, key: [5; 32] });
        let (mut out, mut to) = (vec![0u8; common::wire::MAX_DATAGRAM], Vec::new());
        let mut now = now0;
        let mut wakeups = 0;
        while now < now0 + Duration::from_secs(90) {
            mesh.handle_timeout(now, 1_800_000_000_000 + (now - now0).as_millis() as u64);
            while mesh.poll_transmit(now, &mut out, &mut to).is_some() {}
            let next = mesh.poll_timeout().expect("a pair has timers");
            assert!(next > now, "asked to be woken at {:?}, now {:?}", next - now0, now - now0);
            now = next;
            wakeups += 1;
        }
        // probes on the relay path, its retries, KCP's timer: a few per second, not a spin
        assert!(wakeups < 90 * 100, "{wakeups} wake-ups in 90 s");
    }

    /// Before, every introduction restarted the pair: one peer asking for introductions
    /// to everyone each second kept every other peer punching its candidates. Now the
    /// pair we have, introduced again with its key, is left as it is; and however often
    /// its candidates change, it starts at most `PUNCH_WINDOWS_PER_RETRY` punch windows per
    /// `PUNCH_RETRY`.
    #[test]
    fn introductions_and_candidate_changes_do_not_keep_a_pair_punching() {
        let now0 = common::sim::epoch();
        let mut mesh = test_mesh(now0);
        let entry = |c: &str| PeerEntry {
            id: 2,
            name: "b".into(),
            addr: Ipv4Addr::new(10, 99, 0, 3),
            routes: vec![],
            candidates: vec![c.parse().unwrap()],
        };
        let net = "10.99.0.0/24".parse().expect("literal");
        mesh.set_peer_list(now0, 1, net, &[entry("192.168.9.2:5100")]);
        mesh.on_intro(now0, &IntroRepr { peer_id: 2, key: [5; 32] });
        let session = mesh.pairs[&2].client_session;
        assert!(session.is_some());
        mesh.on_intro(now0 + Duration::from_secs(1), &IntroRepr { peer_id: 2, key: [5; 32] });
        assert_eq!(mesh.pairs[&2].client_session, session, "the pair restarted");
        // its candidates flap every 2 s for a minute: at most 3 windows
        for i in 0..30u64 {
            let c = if i % 2 == 0 { "192.168.9.3:5100" } else { "192.168.9.2:5100" };
            mesh.set_peer_list(now0 + Duration::from_secs(2 + 2 * i), 1, net, &[entry(c)]);
        }
        assert_eq!(mesh.pairs[&2].punch_starts.len(), PUNCH_WINDOWS_PER_RETRY);
    }
}
