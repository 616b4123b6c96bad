//! Batched UDP receive and send (recvmmsg/sendmmsg): one system call for up to `BATCH`
//! datagrams. System calls per copy, not crypto, bound the tunnel on small machines.

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;

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
    n: usize,
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
        for (i, (v, m)) in iov.iter_mut().zip(msgs.iter_mut()).enumerate() {
            v.iov_base = self.data[i * SLOT_BYTES + headroom..].as_mut_ptr().cast();
            v.iov_len = SLOT_BYTES - headroom - tailroom;
            let h = &mut m.msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = v;
            h.msg_iovlen = 1;
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

    pub fn source(&self, i: usize) -> Option<SocketAddr> {
        // SAFETY: the kernel filled addrs[i] with addr_lens[i] valid bytes.
        let a = unsafe { socket2::SockAddr::new(self.addrs[i], self.addr_lens[i]) };
        a.as_socket()
    }
}

/// Sends the datagrams `which` of `batch` with `sendmmsg`, to `to` (or, with `None`, on a
/// connected socket). Returns how many went out; a datagram the kernel refuses is skipped.
pub fn send_batch(fd: RawFd, batch: &RecvBatch, which: &[usize], to: Option<SocketAddr>) -> usize {
    let dest = to.map(socket2::SockAddr::from);
    let mut sent = 0;
    let mut start = 0;
    while start < which.len() {
        let chunk = &which[start..which.len().min(start + BATCH)];
        // SAFETY: zeroed iovec/mmsghdr are valid; pointers reference `batch` and `dest`,
        // which outlive the call; the kernel only reads them.
        let mut iov: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for (k, &i) in chunk.iter().enumerate() {
            let d = batch.datagram(i);
            iov[k].iov_base = d.as_ptr() as *mut libc::c_void;
            iov[k].iov_len = d.len();
            let h = &mut msgs[k].msg_hdr;
            if let Some(a) = &dest {
                h.msg_name = a.as_ptr() as *mut libc::c_void;
                h.msg_namelen = a.len();
            }
            h.msg_iov = &mut iov[k];
            h.msg_iovlen = 1;
        }
        // SAFETY: chunk.len() headers initialised above.
        let r = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), chunk.len() as libc::c_uint, libc::MSG_DONTWAIT) };
        if r <= 0 {
            // the first datagram failed (full buffer, ICMP error): skip it, go on
            start += 1;
        } else {
            sent += r as usize;
            start += r as usize;
        }
    }
    sent
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    #[test]
    fn headroom_rewrite_and_batched_send() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        for k in 0..3u8 {
            tx.send_to(&[k; 5], rx.local_addr().unwrap()).unwrap();
        }
        let mut b = RecvBatch::new();
        let mut n = 0;
        for _ in 0..100 {
            n += b.recv_leaving(rx.as_raw_fd(), 7, 16).unwrap();
            if n == 3 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(b.len(), 3, "all three in one batch");
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
        assert_eq!(send_batch(out.as_raw_fd(), &b, &[2, 0], None), 2);
        let mut buf = [0u8; 64];
        for want in [2u8, 0] {
            let n = rx.recv(&mut buf).unwrap();
            assert_eq!(&buf[..7], b"header:");
            assert_eq!(&buf[7..n], &[want; 5]);
        }
    }
}
