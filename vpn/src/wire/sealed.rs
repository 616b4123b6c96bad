//! What travels sealed under a registration's channel: its header, heartbeats and their
//! acks.

use super::*;

/// Sealed kind `HEARTBEAT`: the peer's liveness probe (the hub answers with an ack).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatRepr {
    pub seq: u32,
    /// The peer's last measured heartbeat round trip (for the hub's status).
    pub rtt_us: u32,
}

impl HeartbeatRepr {
    pub fn emit(&self) -> [u8; HEARTBEAT_LEN] {
        use field::heartbeat as f;
        let mut b = [0u8; HEARTBEAT_LEN];
        b[field::TYPE] = sealed_kind::HEARTBEAT;
        put_u32(&mut b, f::SEQ, self.seq);
        put_u32(&mut b, f::RTT, self.rtt_us);
        b
    }

    pub fn parse(b: &[u8]) -> Result<Self, VpnWireError> {
        use field::heartbeat as f;
        let b = checked(b, sealed_kind::HEARTBEAT, HEARTBEAT_LEN)?;
        Ok(Self { seq: u32_at(b, f::SEQ), rtt_us: u32_at(b, f::RTT) })
    }
}

/// Sealed kind `HEARTBEAT_ACK`: the hub's answer, with the version of its peer list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatAckRepr {
    pub seq: u32,
    pub peers_version: u32,
}

impl HeartbeatAckRepr {
    pub fn emit(&self) -> [u8; HEARTBEAT_ACK_LEN] {
        use field::heartbeat_ack as f;
        let mut b = [0u8; HEARTBEAT_ACK_LEN];
        b[field::TYPE] = sealed_kind::HEARTBEAT_ACK;
        put_u32(&mut b, f::SEQ, self.seq);
        put_u32(&mut b, f::PEERS_VERSION, self.peers_version);
        b
    }

    pub fn parse(b: &[u8]) -> Result<Self, VpnWireError> {
        use field::heartbeat_ack as f;
        let b = checked(b, sealed_kind::HEARTBEAT_ACK, HEARTBEAT_ACK_LEN)?;
        Ok(Self { seq: u32_at(b, f::SEQ), peers_version: u32_at(b, f::PEERS_VERSION) })
    }
}

/// The clear header of a `Sealed` datagram: which registration, which sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealedHeader {
    pub peer_id: u32,
    pub seq: u64,
}

impl SealedHeader {
    pub fn emit(&self, out: &mut [u8]) {
        use field::sealed as f;
        out[field::TYPE] = MSG_SEALED;
        put_u32(out, f::PEER_ID, self.peer_id);
        put_u64(out, f::SEQ, self.seq);
    }

    pub fn parse(b: &[u8]) -> Result<Self, VpnWireError> {
        use field::sealed as f;
        match b.first() {
            None => return Err(VpnWireError::Truncated),
            Some(&MSG_SEALED) => {}
            Some(_) => return Err(VpnWireError::Unknown),
        }
        if b.len() < SEALED_OVERHEAD + 1 {
            return Err(VpnWireError::Truncated);
        }
        Ok(Self { peer_id: u32_at(b, f::PEER_ID), seq: u64_at(b, f::SEQ) })
    }
}
