//! The host's addresses, routes and link settings over rtnetlink (`netlink-packet-route`
//! messages on a `netlink-sys` socket): what `ip` did, without spawning a process per
//! change or parsing its output. One request at a time, answered by the kernel at once
//! (an ack, or the end of a dump).

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage};
use netlink_packet_route::link::{AfSpecInet6, AfSpecUnspec, In6AddrGenMode, LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use std::io;
use std::net::{IpAddr, Ipv4Addr};

use crate::ip::Prefix;

/// What to do with a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RouteChange {
    /// Fails if the route exists (one this peer did not install stays).
    Add,
    /// Adds or overwrites.
    Replace,
    Delete,
}

/// A route-netlink socket.
pub(super) struct Rtnl {
    sock: Socket,
    seq: u32,
}

impl Rtnl {
    pub(super) fn open() -> io::Result<Self> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        Ok(Self { sock, seq: 0 })
    }

    /// The index of interface `name`.
    pub(super) fn link_index(name: &str) -> io::Result<u32> {
        let c = std::ffi::CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
        match unsafe { libc::if_nametoindex(c.as_ptr()) } {
            0 => Err(io::Error::last_os_error()),
            i => Ok(i),
        }
    }

    /// No IPv6 link-local address on `index` (`addrgenmode none`).
    pub(super) fn disable_link_local(&mut self, index: u32) -> io::Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        let mode = AfSpecInet6::AddrGenMode(In6AddrGenMode::None);
        m.attributes.push(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(vec![mode])]));
        self.request(RouteNetlinkMessage::SetLink(m), NLM_F_ACK).map(drop)
    }

    /// Sets `index`'s MTU and brings it up.
    pub(super) fn set_mtu_up(&mut self, index: u32, mtu: u16) -> io::Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
        m.attributes.push(LinkAttribute::Mtu(u32::from(mtu)));
        self.request(RouteNetlinkMessage::SetLink(m), NLM_F_ACK).map(drop)
    }

    /// Removes every address of `index`.
    pub(super) fn flush_addresses(&mut self, index: u32) -> io::Result<()> {
        let all = self.request(RouteNetlinkMessage::GetAddress(AddressMessage::default()), NLM_F_DUMP)?;
        for m in all {
            if let RouteNetlinkMessage::NewAddress(a) = m {
                if a.header.index == index {
                    self.request(RouteNetlinkMessage::DelAddress(a), NLM_F_ACK)?;
                }
            }
        }
        Ok(())
    }

    /// Adds `addr/prefix_len` to `index` (an IPv6 one without duplicate detection: no
    /// one else is on a TUN device).
    pub(super) fn add_address(&mut self, index: u32, addr: IpAddr, prefix_len: u8) -> io::Result<()> {
        let mut m = AddressMessage::default();
        m.header.index = index;
        m.header.prefix_len = prefix_len;
        m.attributes.push(AddressAttribute::Address(addr));
        match addr {
            IpAddr::V4(_) => {
                m.header.family = AddressFamily::Inet;
                m.attributes.push(AddressAttribute::Local(addr));
            }
            IpAddr::V6(_) => {
                m.header.family = AddressFamily::Inet6;
                m.header.flags = AddressHeaderFlags::Nodad;
                m.attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
        }
        self.request(RouteNetlinkMessage::NewAddress(m), NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL).map(drop)
    }

    /// Adds, replaces or deletes the route to `prefix` on device `index` (main table).
    pub(super) fn change_route(&mut self, change: RouteChange, prefix: &Prefix, index: u32) -> io::Result<()> {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.destination_prefix_length = prefix.len;
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.protocol = RouteProtocol::Boot;
        m.header.scope = RouteScope::Link;
        m.header.kind = RouteType::Unicast;
        m.attributes.push(RouteAttribute::Destination(RouteAddress::Inet(prefix.addr)));
        m.attributes.push(RouteAttribute::Oif(index));
        let (msg, flags) = match change {
            RouteChange::Add => (RouteNetlinkMessage::NewRoute(m), NLM_F_CREATE | NLM_F_EXCL),
            RouteChange::Replace => (RouteNetlinkMessage::NewRoute(m), NLM_F_CREATE | NLM_F_REPLACE),
            RouteChange::Delete => (RouteNetlinkMessage::DelRoute(m), 0),
        };
        self.request(msg, NLM_F_ACK | flags).map(drop)
    }

    /// The gateways of the main table's IPv4 default routes.
    pub(super) fn default_gateways_v4(&mut self) -> io::Result<Vec<Ipv4Addr>> {
        let mut q = RouteMessage::default();
        q.header.address_family = AddressFamily::Inet;
        let routes = self.request(RouteNetlinkMessage::GetRoute(q), NLM_F_DUMP)?;
        Ok(routes
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r)
                    if r.header.destination_prefix_length == 0 && r.header.table == RouteHeader::RT_TABLE_MAIN =>
                {
                    r.attributes.into_iter().find_map(|a| match a {
                        RouteAttribute::Gateway(RouteAddress::Inet(g)) => Some(g),
                        _ => None,
                    })
                }
                _ => None,
            })
            .collect())
    }

    /// Sends one request (`flags` besides NLM_F_REQUEST) and reads until its ack or the
    /// end of its dump; returns the messages the kernel sent back for it.
    fn request(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut out = vec![0; packet.buffer_len()];
        packet.serialize(&mut out);
        self.sock.send(&out, 0)?;
        let mut got = Vec::new();
        loop {
            let (data, _) = self.sock.recv_from_full()?;
            let mut offset = 0;
            while offset < data.len() {
                let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = m.header.length as usize;
                if m.header.sequence_number == self.seq {
                    match m.payload {
                        NetlinkPayload::Done(_) => return Ok(got),
                        NetlinkPayload::Error(e) if e.code.is_none() => return Ok(got),
                        NetlinkPayload::Error(e) => return Err(e.to_io()),
                        NetlinkPayload::InnerMessage(inner) => got.push(inner),
                        _ => {}
                    }
                }
                if len == 0 {
                    break;
                }
                // messages are 4-byte aligned
                offset += (len + 3) & !3;
            }
        }
    }
}
