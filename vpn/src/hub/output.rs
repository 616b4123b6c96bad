//! The one way out of the hub core: `poll_output` hands the driver the next thing to do,
//! in the order the core fixes (see `HubOutput`).

use super::*;

/// What the hub core has for its driver next: the tunnel's datagrams, then the TUN's
/// packets, then events; `Timeout` once there is nothing more. (The rendezvous port's
/// answers are returned by `handle_rendezvous` itself: one answer per question.)
#[derive(Debug)]
pub enum HubOutput {
    /// A datagram for the tunnel in `buf[..len]`, to the peer at tunnel address `to`.
    Tunnel {
        to: SocketAddr,
        len: usize,
    },
    /// A datagram for another hub of the cluster in `buf[..len]`, to its forwarding
    /// address `to` (its `cluster.forward_listen`).
    Forward {
        to: SocketAddr,
        len: usize,
    },
    /// An IP packet for the TUN device in `buf[..len]`.
    Tun(usize),
    Event(HubEvent),
    /// Nothing more now: call `handle_timeout` at this time (or when input arrives).
    Timeout(Option<Instant>),
}

impl Hub {
    /// The next output, built in `buf` (at least a tunnel payload); nothing is allocated.
    pub fn poll_output(&mut self, buf: &mut [u8]) -> HubOutput {
        if let Some((to, len)) = self.poll_transmit(buf) {
            return HubOutput::Tunnel { to, len };
        }
        if let Some((to, len)) = self.poll_forward(buf) {
            return HubOutput::Forward { to, len };
        }
        if let Some(len) = self.poll_tun(buf) {
            return HubOutput::Tun(len);
        }
        match self.poll_event() {
            Some(ev) => HubOutput::Event(ev),
            None => HubOutput::Timeout(self.poll_timeout()),
        }
    }
}
