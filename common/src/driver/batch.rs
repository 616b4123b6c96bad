//! Batched UDP receive and send (recvmmsg/sendmmsg): one system call for up to `BATCH`
//! datagrams. System calls per copy, not crypto, bound the tunnel on small machines.

use std::cell::Cell;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};

/// Datagrams per system call.
pub const BATCH: usize = 32;
/// Room per datagram: any UDP datagram fits.
const SLOT_BYTES: usize = 65_536;

/// Caller-owned buffers for one `recvmmsg`, reused for every call.
pub struct RecvBatch {
    data: Vec<u8>,
    /// Where each datagram starts in its slot (the receive headroom, or 0 once rewritten).
    starts: [usize; BATCH],
    lens: [usize; BATCH],
    addrs: Box<[libc::sockaddr_storage; BATCH]>,
    addr_lens: [libc::socklen_t; BATCH],
    /// The local address each datagram was sent to, where the socket reports it
    /// (`receive_local_addresses`).
    locals: [Option<IpAddr>; BATCH],
    n: usize,
}

/// Room for the control messages of one datagram: a UDP_SEGMENT (24 bytes) and an
/// IPv6 packet info (40 bytes), 8-byte aligned.
type Control = [u64; 8];

// SAFETY: CMSG_SPACE only computes an aligned length.
const _: () = assert!(
    std::mem::size_of::<Control>()
        >= unsafe {
            libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32)
                + libc::CMSG_SPACE(std::mem::size_of::<libc::in6_pktinfo>() as u32)
        } as usize,
    "a segment size and an IPv6 packet info fit one datagram's control buffer"
);

/// A non-blocking UDP socket and what its sends learned: whether its route takes UDP
/// GSO. A socket whose kernel path refuses GSO (a device that cannot segment, a route with
/// a small MTU) sends plain datagrams from then on; other sockets are not affected.
pub struct BatchSocket {
    socket: mio::net::UdpSocket,
    gso: Cell<bool>,
    /// The errno of the last send the kernel refused, until `take_send_error`.
    send_error: Cell<Option<i32>>,
}

impl BatchSocket {
    pub fn new(socket: mio::net::UdpSocket) -> Self {
        Self { socket, gso: Cell::new(true), send_error: Cell::new(None) }
    }

    /// The errno of the last refused send since the last call, if any.
    pub fn take_send_error(&self) -> Option<i32> {
        self.send_error.take()
    }

    /// False once the kernel refused a GSO send on this socket.
    pub fn gso_enabled(&self) -> bool {
        self.gso.get()
    }

    /// See the free function `send_batch`.
    pub fn send_batch(
        &self,
        batch: &RecvBatch,
        which: &[usize],
        to: Option<SocketAddr>,
        from: Option<IpAddr>,
    ) -> usize {
        let (sent, error) = send_batch(self.socket.as_raw_fd(), &self.gso, batch, which, to, from);
        if error.is_some() {
            self.send_error.set(error);
        }
        sent
    }

    /// One datagram on this connected socket; a refusal is remembered as by `send_batch`.
    pub fn send(&self, data: &[u8]) -> io::Result<usize> {
        let r = self.socket.send(data);
        if let Err(e) = &r {
            self.send_error.set(e.raw_os_error());
        }
        r
    }

    /// Sends every datagram of `batch` to its address (`source`, as pushed) from this
    /// unconnected socket: each run of datagrams to one address goes with one
    /// `send_batch`. Returns how many could not be sent.
    pub fn send_to_sources(&self, batch: &RecvBatch) -> usize {
        let mut failed = 0;
        let mut start = 0;
        while start < batch.len() {
            let to = batch.source(start);
            let end = (start..batch.len()).find(|&i| batch.source(i) != to).unwrap_or(batch.len());
            let run = &INDICES[start..end];
            failed += run.len() - self.send_batch(batch, run, to, None);
            start = end;
        }
        failed
    }

    /// Sends one datagram to `to` from the local address `from` (or the kernel's choice).
    pub fn send_one(&self, data: &[u8], to: SocketAddr, from: Option<IpAddr>) -> io::Result<()> {
        send_one(self.socket.as_raw_fd(), data, to, from)
    }
}

impl std::ops::Deref for BatchSocket {
    type Target = mio::net::UdpSocket;

    fn deref(&self) -> &mio::net::UdpSocket {
        &self.socket
    }
}

impl mio::event::Source for BatchSocket {
    fn register(&mut self, r: &mio::Registry, t: mio::Token, i: mio::Interest) -> io::Result<()> {
        self.socket.register(r, t, i)
    }

    fn reregister(&mut self, r: &mio::Registry, t: mio::Token, i: mio::Interest) -> io::Result<()> {
        self.socket.reregister(r, t, i)
    }

    fn deregister(&mut self, r: &mio::Registry) -> io::Result<()> {
        self.socket.deregister(r)
    }
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl RecvBatch {
    pub fn new() -> Self {
        Self {
            data: vec![0; BATCH * SLOT_BYTES],
            starts: [0; BATCH],
            lens: [0; BATCH],
            // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid value.
            addrs: Box::new(unsafe { std::mem::zeroed() }),
            addr_lens: [0; BATCH],
            locals: [None; BATCH],
            n: 0,
        }
    }

    /// Receives up to `BATCH` datagrams without blocking. `Ok(0)`: none waiting.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.recv_leaving(fd, 0, 0)
    }

    /// Like `recv`, leaving `headroom` bytes before and `tailroom` bytes after each
    /// datagram in its slot, so it can be sealed in place (`slot_mut`, `set_datagram`).
    pub fn recv_leaving(&mut self, fd: RawFd, headroom: usize, tailroom: usize) -> io::Result<usize> {
        assert!(headroom + tailroom < SLOT_BYTES, "room for a datagram");
        // SAFETY: zeroed iovec/mmsghdr are valid; every pointer set below points into
        // self's buffers, which outlive the call.
        let mut iov: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        let mut controls = [[0u64; 8]; BATCH];
        for (i, ((v, m), c)) in iov.iter_mut().zip(msgs.iter_mut()).zip(controls.iter_mut()).enumerate() {
            v.iov_base = self.data[i * SLOT_BYTES + headroom..].as_mut_ptr().cast();
            v.iov_len = SLOT_BYTES - headroom - tailroom;
            let h = &mut m.msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = v;
            h.msg_iovlen = 1;
            h.msg_control = c.as_mut_ptr().cast();
            h.msg_controllen = std::mem::size_of::<Control>();
        }
        // SAFETY: msgs holds BATCH initialised headers as described above.
        let r = unsafe {
            libc::recvmmsg(fd, msgs.as_mut_ptr(), BATCH as libc::c_uint, libc::MSG_DONTWAIT, std::ptr::null_mut())
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            self.n = 0;
            return if e.kind() == io::ErrorKind::WouldBlock { Ok(0) } else { Err(e) };
        }
        self.n = r as usize;
        for (i, m) in msgs.iter().take(self.n).enumerate() {
            self.starts[i] = headroom;
            self.lens[i] = m.msg_len as usize;
            self.addr_lens[i] = m.msg_hdr.msg_namelen;
            self.locals[i] = local_address(&m.msg_hdr);
        }
        Ok(self.n)
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    pub fn datagram(&self, i: usize) -> &[u8] {
        let at = i * SLOT_BYTES + self.starts[i];
        &self.data[at..at + self.lens[i]]
    }

    pub fn datagram_mut(&mut self, i: usize) -> &mut [u8] {
        let at = i * SLOT_BYTES + self.starts[i];
        &mut self.data[at..at + self.lens[i]]
    }

    /// The whole slot of datagram `i`, headroom and tailroom included.
    pub fn slot_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.data[i * SLOT_BYTES..(i + 1) * SLOT_BYTES]
    }

    /// After rewriting slot `i`: the datagram is now its bytes `start..start + len`.
    pub fn set_datagram(&mut self, i: usize, start: usize, len: usize) {
        assert!(start + len <= SLOT_BYTES, "datagram within its slot");
        self.starts[i] = start;
        self.lens[i] = len;
    }

    /// Empties the batch, to fill it with `push_with` for sending.
    pub fn clear(&mut self) {
        self.n = 0;
    }

    pub fn is_full(&self) -> bool {
        self.n == BATCH
    }

    /// Adds the datagram `fill` writes into the next free slot, `headroom` bytes in (room
    /// to seal it in place). `fill` gets the slot's room after the headroom and returns
    /// the datagram's address (kept as its `source`) and length, or `None` when it has
    /// nothing to add; the result says whether a datagram was added.
    pub fn push_with(&mut self, headroom: usize, fill: impl FnOnce(&mut [u8]) -> Option<(SocketAddr, usize)>) -> bool {
        assert!(!self.is_full(), "a free slot");
        let i = self.n;
        let Some((addr, len)) = fill(&mut self.slot_mut(i)[headroom..]) else { return false };
        self.set_datagram(i, headroom, len);
        self.locals[i] = None;
        let a = socket2::SockAddr::from(addr);
        self.addr_lens[i] = a.len();
        self.addrs[i] = a.as_storage();
        self.n += 1;
        true
    }

    /// The local address datagram `i` was sent to, on a socket that reports it.
    pub fn local(&self, i: usize) -> Option<IpAddr> {
        self.locals[i]
    }

    /// Where datagram `i` came from (received), or the address it was pushed with.
    pub fn source(&self, i: usize) -> Option<SocketAddr> {
        // SAFETY: the kernel filled addrs[i] with addr_lens[i] valid bytes.
        let a = unsafe { socket2::SockAddr::new(self.addrs[i], self.addr_lens[i]) };
        a.as_socket()
    }
}

/// Most datagrams in one UDP GSO send (the kernel's UDP_MAX_SEGMENTS is 64).
const GSO_MAX_SEGMENTS: usize = 64;
/// Most bytes in one UDP GSO send (one UDP datagram's worth).
const GSO_MAX_BYTES: usize = 65_507;
/// Larger datagrams are not segmented: they would exceed a 1500-byte path MTU, and the
/// kernel refuses to fragment GSO segments.
const GSO_MAX_SEGMENT_BYTES: usize = 1_452;
/// Sends the datagrams `which` of `batch` with `sendmmsg`, to `to` (or, with `None`, on a
/// connected socket), from the local address `from` (or the kernel's choice). While
/// `gso_usable` holds, runs of equal-sized datagrams go as one UDP GSO message each (one
/// pass through the stack, segmented below it); the kernel sends the segments in order.
/// Returns how many datagrams went out and the errno of the last refusal; a message the
/// kernel refuses is skipped. A GSO
/// message it cannot segment (EIO: the device; EINVAL: the route's MTU or the socket's
/// options) is retried as plain datagrams, and `gso_usable` is cleared.
fn send_batch(
    fd: RawFd,
    gso_usable: &Cell<bool>,
    batch: &RecvBatch,
    which: &[usize],
    to: Option<SocketAddr>,
    from: Option<IpAddr>,
) -> (usize, Option<i32>) {
    let dest = to.map(socket2::SockAddr::from);
    let mut sent = 0;
    let mut refused = None;
    let mut start = 0;
    // datagrams before this index of `which` go without GSO (a GSO message failed)
    let mut plain_until = 0;
    while start < which.len() {
        let chunk = &which[start..which.len().min(start + BATCH)];
        let gso = gso_usable.get();
        // SAFETY: zeroed iovec/mmsghdr are valid; pointers reference `batch`, `dest` and
        // the arrays here, which outlive the call; the kernel only reads them.
        let mut iov: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        let mut controls = [[0u64; 8]; BATCH];
        let mut runs = [0usize; BATCH];
        let (mut m, mut k) = (0, 0);
        while k < chunk.len() {
            let first = batch.datagram(chunk[k]).len();
            let mut run = 1;
            if gso && start + k >= plain_until && first <= GSO_MAX_SEGMENT_BYTES {
                let mut total = first;
                while k + run < chunk.len() && run < GSO_MAX_SEGMENTS {
                    let next = batch.datagram(chunk[k + run]).len();
                    // equal segments; only the last may be shorter
                    if next > first || total + next > GSO_MAX_BYTES || next == 0 {
                        break;
                    }
                    total += next;
                    run += 1;
                    if next < first {
                        break;
                    }
                }
            }
            for (v, &i) in iov[k..k + run].iter_mut().zip(&chunk[k..k + run]) {
                let d = batch.datagram(i);
                v.iov_base = d.as_ptr() as *mut libc::c_void;
                v.iov_len = d.len();
            }
            let h = &mut msgs[m].msg_hdr;
            if let Some(a) = &dest {
                h.msg_name = a.as_ptr() as *mut libc::c_void;
                h.msg_namelen = a.len();
            }
            h.msg_iov = &mut iov[k];
            h.msg_iovlen = run;
            set_control(h, &mut controls[m], (run > 1).then_some(first as u16), from);
            runs[m] = run;
            m += 1;
            k += run;
        }
        // SAFETY: m headers initialised above.
        let r = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), m as libc::c_uint, libc::MSG_DONTWAIT) };
        if r > 0 {
            let done: usize = runs[..r as usize].iter().sum();
            sent += done;
            start += done;
            continue;
        }
        // the first message failed
        let e = io::Error::last_os_error().raw_os_error();
        refused = e.or(refused);
        if runs[0] > 1 && !matches!(e, Some(libc::EAGAIN | libc::ENOBUFS)) {
            if matches!(e, Some(libc::EIO | libc::EINVAL)) {
                gso_usable.set(false);
            }
            plain_until = start + runs[0];
        } else {
            // full buffer, ICMP error, refused: this message is lost, go on
            start += runs[0];
        }
    }
    (sent, refused)
}

/// `0, 1, .., BATCH - 1`: the indices of a batch's datagrams.
const INDICES: [usize; BATCH] = {
    let mut a = [0; BATCH];
    let mut i = 0;
    while i < BATCH {
        a[i] = i;
        i += 1;
    }
    a
};

/// Every datagram of `batch`, in order, as `which` for `send_batch`.
pub fn all_of(batch: &RecvBatch) -> &'static [usize] {
    &INDICES[..batch.len()]
}

/// Sends one datagram to `to` from the local address `from` (or the kernel's choice).
fn send_one(fd: RawFd, data: &[u8], to: SocketAddr, from: Option<IpAddr>) -> io::Result<()> {
    let dest = socket2::SockAddr::from(to);
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    let mut control: Control = [0; 8];
    // SAFETY: a zeroed msghdr is valid; its pointers reference locals that outlive the
    // call, and the kernel only reads them.
    let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
    h.msg_name = dest.as_ptr() as *mut libc::c_void;
    h.msg_namelen = dest.len();
    h.msg_iov = &mut iov;
    h.msg_iovlen = 1;
    set_control(&mut h, &mut control, None, from);
    // SAFETY: h is initialised as described above.
    if unsafe { libc::sendmsg(fd, &h, libc::MSG_DONTWAIT) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Attaches to `h`, in `control`, a UDP_SEGMENT message (GSO segment size) and a packet
/// info message choosing the source address, each if asked for.
fn set_control(h: &mut libc::msghdr, control: &mut Control, segment: Option<u16>, from: Option<IpAddr>) {
    // a v4-mapped address (a dual-stack socket) is sent from as IPv4
    let from = from.map(|a| match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, IpAddr::V4),
        v4 => v4,
    });
    // SAFETY: CMSG_SPACE only computes an aligned length.
    let space = |len: usize| unsafe { libc::CMSG_SPACE(len as u32) as usize };
    let segment_space = segment.map_or(0, |_| space(std::mem::size_of::<u16>()));
    let from_space = match from {
        None => 0,
        Some(IpAddr::V4(_)) => space(std::mem::size_of::<libc::in_pktinfo>()),
        Some(IpAddr::V6(_)) => space(std::mem::size_of::<libc::in6_pktinfo>()),
    };
    if segment_space + from_space == 0 {
        return;
    }
    // SAFETY: `control` is 8-byte aligned and large enough for both messages (asserted at
    // compile time above); CMSG_FIRSTHDR/CMSG_NXTHDR return a header inside
    // msg_control..+msg_controllen or null, and each is checked before it is written;
    // CMSG_DATA of a header with room for `len` bytes holds them. `control` was zeroed.
    unsafe {
        h.msg_control = control.as_mut_ptr().cast();
        h.msg_controllen = segment_space + from_space;
        let mut c = libc::CMSG_FIRSTHDR(h);
        if let Some(size) = segment {
            if c.is_null() {
                return;
            }
            (*c).cmsg_level = libc::SOL_UDP;
            (*c).cmsg_type = libc::UDP_SEGMENT;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), size);
            c = libc::CMSG_NXTHDR(h, c);
        }
        if c.is_null() {
            return;
        }
        match from {
            None => {}
            Some(IpAddr::V4(a)) => {
                (*c).cmsg_level = libc::IPPROTO_IP;
                (*c).cmsg_type = libc::IP_PKTINFO;
                (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::in_pktinfo>() as u32) as usize;
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr { s_addr: u32::from(a).to_be() },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::in_pktinfo>(), info);
            }
            Some(IpAddr::V6(a)) => {
                (*c).cmsg_level = libc::IPPROTO_IPV6;
                (*c).cmsg_type = libc::IPV6_PKTINFO;
                (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::in6_pktinfo>() as u32) as usize;
                let info = libc::in6_pktinfo { ipi6_addr: libc::in6_addr { s6_addr: a.octets() }, ipi6_ifindex: 0 };
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::in6_pktinfo>(), info);
            }
        }
    }
}

/// The destination address in a received message's packet info, if the socket asked for
/// it (IP_PKTINFO / IPV6_RECVPKTINFO); v4-mapped addresses come back as IPv4.
fn local_address(h: &libc::msghdr) -> Option<IpAddr> {
    if h.msg_controllen == 0 {
        return None;
    }
    // SAFETY: the kernel wrote msg_controllen bytes of control messages at msg_control;
    // CMSG_FIRSTHDR/CMSG_NXTHDR stay inside them and CMSG_DATA of a packet info message
    // holds that struct.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            match ((*c).cmsg_level, (*c).cmsg_type) {
                (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                    let info = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::in_pktinfo>());
                    return Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr))));
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                    let info = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::in6_pktinfo>());
                    let a = Ipv6Addr::from(info.ipi6_addr.s6_addr);
                    return Some(a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4));
                }
                _ => {}
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
}

/// Asks the kernel to report, with each datagram `fd` receives, the local address it was
/// sent to (`RecvBatch::local`): needed to answer from that address on a socket bound to
/// a wildcard address of a host with several.
pub fn receive_local_addresses(fd: RawFd, ipv6: bool) -> io::Result<()> {
    let on: libc::c_int = 1;
    let set = |level, name| {
        // SAFETY: `on` is a c_int that outlives the call, as the option expects.
        let r = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    if ipv6 {
        // also covers IPv4 clients of a dual-stack socket (as v4-mapped addresses)
        set(libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)
    } else {
        set(libc::IPPROTO_IP, libc::IP_PKTINFO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;

    fn batch_socket(addr: &str) -> BatchSocket {
        let s = UdpSocket::bind(addr).unwrap();
        s.set_nonblocking(true).unwrap();
        BatchSocket::new(mio::net::UdpSocket::from_std(s))
    }

    /// A socket the kernel refuses GSO on (SO_NO_CHECK: no UDP checksum, which GSO needs)
    /// falls back to plain datagrams and remembers it; another socket keeps GSO.
    #[test]
    fn gso_refusal_is_remembered_per_socket() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let refusing = batch_socket("127.0.0.1:0");
        let on: libc::c_int = 1;
        // SAFETY: `on` is a c_int that outlives the call, as the option expects.
        let r = unsafe {
            libc::setsockopt(
                refusing.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_NO_CHECK,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0);
        let other = batch_socket("127.0.0.1:0");
        let mut out = RecvBatch::new();
        for _ in 0..3 {
            out.push_with(0, |room| {
                room[..200].fill(9);
                Some((to, 200))
            });
        }
        assert_eq!(refusing.send_batch(&out, all_of(&out), Some(to), None), 3, "retried as plain datagrams");
        assert!(!refusing.gso_enabled());
        assert_eq!(other.send_batch(&out, all_of(&out), Some(to), None), 3);
        assert!(other.gso_enabled(), "one socket's refusal does not turn GSO off for all");
        let mut buf = [0u8; 512];
        for _ in 0..6 {
            assert_eq!(rx.recv(&mut buf).unwrap(), 200);
        }
    }

    #[test]
    fn headroom_rewrite_and_batched_send() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        for k in 0..3u8 {
            tx.send_to(&[k; 5], rx.local_addr().unwrap()).unwrap();
        }
        // loopback delivers during send_to; one recvmmsg then takes them all
        let mut b = RecvBatch::new();
        assert_eq!(b.recv_leaving(rx.as_raw_fd(), 7, 16).unwrap(), 3);
        for i in 0..3 {
            assert_eq!(b.datagram(i), &[i as u8; 5]);
            assert_eq!(b.source(i), Some(tx.local_addr().unwrap()));
            // the payload sits after the headroom; grow it into a framed datagram
            let slot = b.slot_mut(i);
            assert_eq!(&slot[7..12], &[i as u8; 5]);
            slot[..7].copy_from_slice(b"header:");
            b.set_datagram(i, 0, 12);
        }
        let out = UdpSocket::bind("127.0.0.1:0").unwrap();
        out.connect(rx.local_addr().unwrap()).unwrap();
        assert_eq!(send_batch(out.as_raw_fd(), &Cell::new(true), &b, &[2, 0], None, None).0, 2);
        let mut buf = [0u8; 64];
        for want in [2u8, 0] {
            let n = rx.recv(&mut buf).unwrap();
            assert_eq!(&buf[..7], b"header:");
            assert_eq!(&buf[7..n], &[want; 5]);
        }
    }

    #[test]
    fn pushed_datagrams_keep_headroom_and_address() {
        let to: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut b = RecvBatch::new();
        assert!(b.push_with(3, |room| {
            room[..2].copy_from_slice(b"ab");
            Some((to, 2))
        }));
        assert!(!b.push_with(3, |_| None), "nothing to add leaves the slot free");
        assert_eq!(b.len(), 1);
        assert_eq!(b.datagram(0), b"ab");
        assert_eq!(&b.slot_mut(0)[3..5], b"ab");
        assert_eq!(b.source(0), Some(to));
        while !b.is_full() {
            b.push_with(0, |_| Some((to, 1)));
        }
        assert_eq!(b.len(), BATCH);
        b.clear();
        assert!(b.is_empty());
    }

    #[test]
    fn each_datagram_goes_to_its_own_address() {
        let rx_a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let rx_b = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (a, b_addr) = (rx_a.local_addr().unwrap(), rx_b.local_addr().unwrap());
        let mut batch = RecvBatch::new();
        for (to, byte) in [(a, 1u8), (a, 2), (b_addr, 3), (a, 4)] {
            batch.push_with(0, |room| {
                room[..10].fill(byte);
                Some((to, 10))
            });
        }
        let tx = batch_socket("127.0.0.1:0");
        assert_eq!(tx.send_to_sources(&batch), 0);
        let mut buf = [0u8; 64];
        for want in [1u8, 2, 4] {
            assert_eq!(rx_a.recv(&mut buf).unwrap(), 10);
            assert_eq!(buf[0], want);
        }
        assert_eq!(rx_b.recv(&mut buf).unwrap(), 10);
        assert_eq!(buf[0], 3);
    }

    /// A client on 127.0.0.1 sends one datagram to 127.0.0.2 (another address of this
    /// host: all of 127/8 is on lo) at `wild`, which reports local addresses; returns the
    /// client and the datagram as `wild` received it, its local address checked.
    fn sent_to_second_address(wild: &UdpSocket, ipv6: bool) -> (UdpSocket, RecvBatch) {
        receive_local_addresses(wild.as_raw_fd(), ipv6).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(b"hi", ("127.0.0.2", wild.local_addr().unwrap().port())).unwrap();
        let mut b = RecvBatch::new();
        assert_eq!(b.recv(wild.as_raw_fd()).unwrap(), 1);
        assert_eq!(b.local(0), Some("127.0.0.2".parse().unwrap()));
        (client, b)
    }

    #[test]
    fn a_wildcard_socket_learns_and_answers_from_the_address_it_was_sent_to() {
        let wild = UdpSocket::bind("0.0.0.0:0").unwrap();
        let (client, b) = sent_to_second_address(&wild, false);
        let (to, local) = (b.source(0).unwrap(), b.local(0));

        // one datagram, and a GSO run of three
        send_one(wild.as_raw_fd(), b"one", to, local).unwrap();
        let gso = Cell::new(true);
        let mut out = RecvBatch::new();
        for _ in 0..3 {
            out.push_with(0, |room| {
                room[..100].fill(7);
                Some((to, 100))
            });
        }
        assert_eq!(send_batch(wild.as_raw_fd(), &gso, &out, all_of(&out), Some(to), local).0, 3);
        let mut buf = [0u8; 256];
        let port = wild.local_addr().unwrap().port();
        for want in [3, 100, 100, 100] {
            let (n, from) = client.recv_from(&mut buf).unwrap();
            assert_eq!((n, from), (want, SocketAddr::from(([127, 0, 0, 2], port))));
        }
    }

    #[test]
    fn a_dual_stack_wildcard_socket_answers_ipv4_clients_from_the_right_address() {
        let Ok(wild) = UdpSocket::bind("[::]:0") else { return }; // no IPv6 here
        let (client, b) = sent_to_second_address(&wild, true);
        send_one(wild.as_raw_fd(), b"one", b.source(0).unwrap(), b.local(0)).unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = client.recv_from(&mut buf).unwrap();
        assert_eq!((n, from), (3, SocketAddr::from(([127, 0, 0, 2], wild.local_addr().unwrap().port()))));
    }

    #[test]
    fn gso_runs_arrive_as_separate_datagrams_in_order() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        // runs: 4 x 100 bytes with a 50-byte tail, then 100, 100, then one of 1500 (not
        // segmented: above GSO_MAX_SEGMENT_BYTES)
        let sizes = [100usize, 100, 100, 100, 50, 100, 100, 1500];
        for (k, &n) in sizes.iter().enumerate() {
            tx.send_to(&vec![k as u8; n], rx.local_addr().unwrap()).unwrap();
        }
        // loopback delivers during send_to; one recvmmsg then takes them all
        let mut b = RecvBatch::new();
        assert_eq!(b.recv(rx.as_raw_fd()).unwrap(), sizes.len());
        let out = UdpSocket::bind("127.0.0.1:0").unwrap();
        let which: Vec<usize> = (0..sizes.len()).collect();
        let gso = Cell::new(true);
        assert_eq!(send_batch(out.as_raw_fd(), &gso, &b, &which, Some(rx.local_addr().unwrap()), None).0, sizes.len());
        assert!(gso.get(), "loopback takes GSO");
        let mut buf = [0u8; 2048];
        for (k, &size) in sizes.iter().enumerate() {
            let n = rx.recv(&mut buf).unwrap();
            assert_eq!(n, size, "datagram {k} keeps its size");
            assert!(buf[..n].iter().all(|&x| x == k as u8), "datagram {k} in order");
        }
    }
}
