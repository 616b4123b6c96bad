//! The mpvpn driver: a TUN device and a UDP socket around the hub or peer core, run by
//! the shared event loop (`common::driver::event_loop`).
//!
//! The TUN fd is registered readable only (it is always writable; the kernel drops when
//! its queue is full). Addresses, MTU and routes are set over netlink (`netlink`). The
//! loop only moves bytes and time.

mod cluster;
mod etcd;
mod hub;
mod hub_forward;
mod netlink;
mod peer;
mod state;
mod status;
mod system;

pub use cluster::HubRecord;
pub use etcd::etcd_tls;
pub use hub::{run_hub, HubPaths};
use netlink::RouteChange;
pub use peer::run_peer;
use status::{hub_status, peer_status, vpn_metrics};
pub use status::{ClusterHubStatus, ClusterStatus, MeshSocketStatus, Role, VpnStatus};
use system::{change_route, configure_tun, open_tun, protected_addresses, RemotesQuery};

use crate::config::{resolve_key, HubConfig, PeerConfig};
use crate::hub::{Hub, HubCoreConfig, HubDrops, HubEvent, PeerSpec, PeerState, PeerStatus};
use crate::ip::{self, Prefix};
use crate::peer::{route_hazard, LinkState, Peer, PeerCoreConfig, PeerEvent};
use crate::resolver::SystemResolver;
use crate::wire::PeerKey;
use crate::{VpnError, TUNNEL_PAYLOAD, TUN_MTU};
use common::config::{ClientConfig, ServerConfig};
use common::driver::batch::{BatchSocket, RecvBatch};
use common::driver::event_loop::{read_batches, EventLoop, Reload, Room, Service, NO_ROOM, READ_BUDGET};
use common::driver::files::load_config;
use common::driver::metrics::{with_label, Labels, Metrics};
use common::driver::{self, IoContext};
use common::entropy::OsEntropy;
use common::wire::{AEAD_TAG_LEN, DATA_PAYLOAD_OFFSET};
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use serde::{Deserialize, Serialize};
use slog::{error, info, trace, warn, Logger};
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub(super) const TUN: Token = Token(0);
pub(super) const UDP: Token = Token(1);
/// The embedded server's listening socket, or the first of the embedded client's paths.
pub(super) const EMBEDDED: Token = Token(2);
/// The hub's DNS socket (`dns:` in hub.yaml), on its VPN address.
pub(super) const DNS: Token = Token(common::driver::event_loop::RESERVED_TOKENS - 1);
/// The hub's rendezvous socket (`rendezvous:` in hub.yaml).
pub(super) const RENDEZVOUS: Token = Token(common::driver::event_loop::RESERVED_TOKENS - 2);
/// A peer's question to its separate mpclient's control socket (`system::RemotesQuery`).
pub(super) const MPCLIENT_QUERY: Token = Token(common::driver::event_loop::RESERVED_TOKENS - 3);
/// A peer's mesh socket `i` has token `MESH_BASE - i`.
pub(super) const MESH_BASE: usize = common::driver::event_loop::RESERVED_TOKENS - 4;
/// The hub's cluster thread wakes the loop with it (`cluster::ClusterLink`).
pub(super) const CLUSTER: Token = Token(MESH_BASE - crate::hub::MAX_MESH_SOCKETS - 1);
/// The hub's socket for the other hubs' forwarded packets (`cluster.forward_listen`).
pub(super) const FORWARD: Token = Token(MESH_BASE - crate::hub::MAX_MESH_SOCKETS - 2);
/// The hub's and the peer's stats line.
pub(super) const STATS_INTERVAL: Duration = Duration::from_secs(30);

/// The one place the VPN's drivers read the clocks (the cores never do: vpn/clippy.toml),
/// once per wake-up: the monotonic clock and the wall clock in ms.
#[allow(clippy::disallowed_methods)]
pub(super) fn clock() -> (Instant, u64) {
    (Instant::now(), driver::wall_ms())
}

/// The wall clock in ms, beside the event loop's reading of the monotonic one.
#[allow(clippy::disallowed_methods)]
pub(super) fn wall_clock_ms() -> u64 {
    driver::wall_ms()
}

/// The OS's randomness, for the cores' keys and ids.
#[allow(clippy::disallowed_methods)]
pub(super) fn os_entropy() -> Box<dyn common::entropy::Entropy> {
    Box::new(OsEntropy::new())
}

/// Reads TUN packets until empty or the budget is spent; true if data may remain.
pub(super) fn read_tun(dev: &tun::Device, buf: &mut [u8], log: &Logger, mut each: impl FnMut(&[u8])) -> bool {
    for _ in 0..READ_BUDGET {
        match dev.recv(buf) {
            Ok(n) => each(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                warn!(log, "TUN read failed"; "error" => %e);
                return false;
            }
        }
    }
    true
}

/// Reads datagrams from the local mpclient/mpserver (`recvmmsg`, into `rx`) until empty
/// or the budget is spent; true if data may remain.
pub(super) fn read_udp(
    sock: &BatchSocket,
    rx: &mut RecvBatch,
    log: &Logger,
    mut each: impl FnMut(SocketAddr, &[u8]),
) -> bool {
    read_batches(sock.as_raw_fd(), rx, NO_ROOM, log, "tunnel", |rx, _| {
        for i in 0..rx.len() {
            if let Some(from) = rx.source(i) {
                each(from, rx.datagram(i));
            }
        }
    })
}

/// The driver's reused buffers: nothing is allocated per packet.
pub(super) struct IoBuffers {
    /// One packet read from the TUN device, or one question to the rendezvous port.
    tun_in: Vec<u8>,
    /// Datagrams read from the tunnel socket.
    rx: RecvBatch,
    /// Datagrams for the tunnel, filled by the core; also where it writes everything else
    /// it outputs (`poll_output`).
    tx: RecvBatch,
    /// The rendezvous port's answer, built by the core.
    out: Vec<u8>,
}

impl IoBuffers {
    fn new() -> Self {
        Self {
            tun_in: vec![0; common::wire::MAX_DATAGRAM],
            rx: RecvBatch::new(),
            tx: RecvBatch::new(),
            out: vec![0; common::wire::MAX_DATAGRAM],
        }
    }
}

/// An embedded client or server seals each datagram in its slot: its header goes before,
/// the AEAD tag after.
pub(super) const SEALING_ROOM: Room = (DATA_PAYLOAD_OFFSET, AEAD_TAG_LEN);
