//! `INNER_HUBS`: a hub tells its peers which hub it is and how the cluster's other hubs'
//! multipath servers are reached (their signed records' `advertise.tunnel`), so that a
//! peer can move to one of them when its hub is lost (`discover`).
//!
//! ```text
//! INNER_HUBS 0x09 | name_len u8 | name (this hub) | count u8
//!                 | (name_len u8 | name | n_addrs u8 | address* | has_rendezvous u8 | address?)*
//! ```

use super::*;

pub const INNER_HUBS: u8 = 0x09;
/// The most other hubs one message lists, and addresses per hub.
pub const MAX_LISTED_HUBS: usize = 16;
pub const MAX_HUB_ADDRS: usize = 8;

/// One other hub of the cluster, as a peer may reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedHub {
    pub name: String,
    pub tunnel: Vec<SocketAddr>,
    /// Its rendezvous port (`advertise.rendezvous`), if it has one.
    pub rendezvous: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterHubsRepr {
    /// The hub that sends it.
    pub this: String,
    pub others: Vec<ListedHub>,
}

impl ClusterHubsRepr {
    /// The message (at most `MAX_LISTED_HUBS` hubs of `MAX_HUB_ADDRS` addresses; names
    /// are hub names, 1-32 bytes).
    pub fn emit(&self) -> Vec<u8> {
        let mut out = vec![INNER_HUBS, self.this.len() as u8];
        out.extend_from_slice(self.this.as_bytes());
        let others = &self.others[..self.others.len().min(MAX_LISTED_HUBS)];
        out.push(others.len() as u8);
        for h in others {
            out.push(h.name.len() as u8);
            out.extend_from_slice(h.name.as_bytes());
            let addrs = &h.tunnel[..h.tunnel.len().min(MAX_HUB_ADDRS)];
            out.push(addrs.len() as u8);
            for &a in addrs {
                put_addr(&mut out, a);
            }
            out.push(u8::from(h.rendezvous.is_some()));
            if let Some(r) = h.rendezvous {
                put_addr(&mut out, r);
            }
        }
        out
    }

    pub fn parse(b: &[u8]) -> Result<Self, VpnWireError> {
        match b.first() {
            None => return Err(VpnWireError::Truncated),
            Some(&t) if t != INNER_HUBS => return Err(VpnWireError::Unknown),
            Some(_) => {}
        }
        let (this, mut at) = name_at(b, 1)?;
        let count = *b.get(at).ok_or(VpnWireError::Truncated)? as usize;
        if count > MAX_LISTED_HUBS {
            return Err(VpnWireError::BadField);
        }
        at += 1;
        let mut others = Vec::with_capacity(count);
        for _ in 0..count {
            let (name, end) = name_at(b, at)?;
            let n = *b.get(end).ok_or(VpnWireError::Truncated)? as usize;
            if n > MAX_HUB_ADDRS {
                return Err(VpnWireError::BadField);
            }
            at = end + 1;
            let mut tunnel = Vec::with_capacity(n);
            for _ in 0..n {
                let (a, end) = addr_at(b, at)?;
                tunnel.push(a);
                at = end;
            }
            let (rendezvous, next) = match b.get(at) {
                Some(0) => (None, at + 1),
                Some(1) => {
                    let (r, end) = addr_at(b, at + 1)?;
                    (Some(r), end)
                }
                Some(_) => return Err(VpnWireError::BadField),
                None => return Err(VpnWireError::Truncated),
            };
            at = next;
            others.push(ListedHub { name: name.to_string(), tunnel, rendezvous });
        }
        if at != b.len() {
            return Err(VpnWireError::BadField);
        }
        Ok(Self { this: this.to_string(), others })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_hubs_golden_bytes_and_hostile_input() {
        let r = ClusterHubsRepr {
            this: "h1".into(),
            others: vec![ListedHub {
                name: "h2".into(),
                tunnel: vec!["10.0.2.1:4000".parse().unwrap()],
                rendezvous: Some("10.0.2.1:5200".parse().unwrap()),
            }],
        };
        let b = r.emit();
        assert_eq!(
            b,
            [0x09, 2, b'h', b'1', 1, 2, b'h', b'2', 1, 4, 10, 0, 2, 1, 0x0f, 0xa0, 1, 4, 10, 0, 2, 1, 0x14, 0x50]
        );
        let without =
            ClusterHubsRepr { this: "h1".into(), others: vec![ListedHub { rendezvous: None, ..r.others[0].clone() }] };
        assert_eq!(ClusterHubsRepr::parse(&without.emit()), Ok(without));
        assert_eq!(ClusterHubsRepr::parse(&b), Ok(r));
        for cut in 0..b.len() {
            assert!(ClusterHubsRepr::parse(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(ClusterHubsRepr::parse(&long).is_err(), "trailing bytes");
        let mut many = b.clone();
        many[4] = 200;
        assert_eq!(ClusterHubsRepr::parse(&many), Err(VpnWireError::BadField));
        let mut addrs = b.clone();
        addrs[8] = 99;
        assert_eq!(ClusterHubsRepr::parse(&addrs), Err(VpnWireError::BadField));
        let mut flag = b;
        flag[16] = 2;
        assert_eq!(ClusterHubsRepr::parse(&flag), Err(VpnWireError::BadField));
    }
}
