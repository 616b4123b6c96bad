//! Datagrams between the hubs of a cluster (`crate::hub::forward`).
//!
//! ```text
//! Forward 0x28 | name_len u8 | name (the sending hub) | boot [16] | seq u64 | wall_ms u64
//!              | AEAD(message) | tag[16]
//! ```
//! The header is the AEAD's associated data. The key is the sending hub's for this boot
//! (HKDF-SHA256 of the cluster key and `boot`, info: the hub's name), the nonce `seq`. The
//! message is one the KCP stream also carries: `INNER_IP` (a packet for a peer of the
//! receiving hub) or `INNER_PEERS` (one chunk of the sending hub's table: its peers'
//! names, addresses and routes).

use super::*;

pub const MSG_FORWARD: u8 = 0x28;
pub const BOOT_LEN: usize = 16;

/// The header of a `Forward` datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardHeader<'a> {
    pub hub: &'a str,
    pub boot: [u8; BOOT_LEN],
    pub seq: u64,
    pub wall_ms: u64,
}

impl<'a> ForwardHeader<'a> {
    /// The header's length for a hub named `name`.
    pub fn len_for(name: &str) -> usize {
        field::forward::NAME + name.len() + field::forward::AFTER_NAME
    }

    /// Writes the header into `out` (at least `len_for(hub)` long); returns its length.
    pub fn emit(&self, out: &mut [u8]) -> usize {
        use field::forward as f;
        let end = f::NAME + self.hub.len();
        out[field::TYPE] = MSG_FORWARD;
        out[f::NAME_LEN] = self.hub.len() as u8;
        out[f::NAME..end].copy_from_slice(self.hub.as_bytes());
        let rest = &mut out[end..end + f::AFTER_NAME];
        rest[f::BOOT].copy_from_slice(&self.boot);
        put_u64(rest, f::SEQ, self.seq);
        put_u64(rest, f::WALL_MS, self.wall_ms);
        end + f::AFTER_NAME
    }

    /// The header of `b` and its length (where the sealed message starts).
    pub fn parse(b: &'a [u8]) -> Result<(Self, usize), VpnWireError> {
        use field::forward as f;
        match b.first() {
            None => return Err(VpnWireError::Truncated),
            Some(&t) if t != MSG_FORWARD => return Err(VpnWireError::Unknown),
            Some(_) => {}
        }
        let (hub, end) = name_at(b, f::NAME_LEN)?;
        let rest = region(b, end, f::AFTER_NAME)?;
        let mut boot = [0u8; BOOT_LEN];
        boot.copy_from_slice(&rest[f::BOOT]);
        let h = Self { hub, boot, seq: u64_at(rest, f::SEQ), wall_ms: u64_at(rest, f::WALL_MS) };
        Ok((h, end + f::AFTER_NAME))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_header_golden_bytes() {
        let h = ForwardHeader { hub: "h1", boot: [0xb0; BOOT_LEN], seq: 7, wall_ms: 0x0102 };
        let mut out = [0u8; 64];
        let n = h.emit(&mut out);
        let mut want = vec![0x28, 2, b'h', b'1'];
        want.extend_from_slice(&[0xb0; 16]);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 7]);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(&out[..n], &want[..]);
        assert_eq!(n, ForwardHeader::len_for("h1"));
        assert_eq!(ForwardHeader::parse(&out[..n]), Ok((h, n)));
    }

    #[test]
    fn hostile_forward_headers_are_refused() {
        let h = ForwardHeader { hub: "hub-sh", boot: [1; BOOT_LEN], seq: 1, wall_ms: 2 };
        let mut out = [0u8; 64];
        let n = h.emit(&mut out);
        for cut in 0..n {
            assert!(ForwardHeader::parse(&out[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = out;
        bad[1] = 0; // an empty name
        assert!(ForwardHeader::parse(&bad[..n]).is_err());
        bad[1] = 200; // longer than the datagram
        assert!(ForwardHeader::parse(&bad[..n]).is_err());
        bad = out;
        bad[0] = MSG_SEALED;
        assert_eq!(ForwardHeader::parse(&bad[..n]), Err(VpnWireError::Unknown));
    }
}
