//! The messages of a VPN KCP stream (the hub link, or a pair session's): one parser
//! that every receiver's message loop matches on.

use super::*;
use std::net::IpAddr;

/// One message taken from a KCP stream, parsed.
#[derive(Debug)]
pub enum InnerMessage<'a> {
    /// An IP packet (its addresses read, nothing else checked yet).
    Ip { packet: &'a [u8], src: IpAddr, dst: IpAddr },
    /// Hub → peer: a chunk of the peer list.
    PeerList(PeerListChunk),
    /// Peer → hub: where its mesh sockets are on its host.
    Candidates(Vec<SocketAddr>),
    /// Peer → hub: introduce me to this peer id.
    IntroRequest(u32),
    /// Hub → peer: a pair's key and the other side's candidates.
    Intro(IntroRepr),
    /// Hub → peer: the token a `Reset` for this registration carries.
    ResetToken([u8; RESET_TOKEN_LEN]),
    /// Hub → peer: what changed in the peer list.
    PeerListDelta(PeerListDelta),
    /// Peer → hub: it takes deltas, and has this list version (0: none).
    PeersWant(u32),
    /// Hub → peer: which hub it is, and the cluster's other hubs.
    ClusterHubs(ClusterHubsRepr),
}

/// Parses one message; anything else is an error (dropped and counted as malformed).
pub fn parse_inner(m: &[u8]) -> Result<InnerMessage<'_>, VpnWireError> {
    match m.first() {
        Some(&INNER_IP) => {
            let packet = m.get(field::inner::BODY..).ok_or(VpnWireError::Truncated)?;
            let (src, dst) = crate::ip::addresses(packet).ok_or(VpnWireError::BadField)?;
            Ok(InnerMessage::Ip { packet, src, dst })
        }
        Some(&INNER_PEERS) => parse_peer_list(m).map(InnerMessage::PeerList),
        Some(&INNER_CANDIDATES) => parse_candidates(m).map(InnerMessage::Candidates),
        Some(&INNER_INTRO_REQUEST) => parse_intro_request(m).map(InnerMessage::IntroRequest),
        Some(&INNER_INTRO) => IntroRepr::parse(m).map(InnerMessage::Intro),
        Some(&INNER_RESET_TOKEN) => {
            let t = m.get(1..).filter(|t| t.len() == RESET_TOKEN_LEN).ok_or(VpnWireError::Truncated)?;
            let mut token = [0u8; RESET_TOKEN_LEN];
            token.copy_from_slice(t);
            Ok(InnerMessage::ResetToken(token))
        }
        Some(&INNER_PEERS_DELTA) => PeerListDelta::parse(m).map(InnerMessage::PeerListDelta),
        Some(&INNER_PEERS_WANT) => parse_peers_want(m).map(InnerMessage::PeersWant),
        Some(&INNER_HUBS) => ClusterHubsRepr::parse(m).map(InnerMessage::ClusterHubs),
        Some(_) => Err(VpnWireError::Unknown),
        None => Err(VpnWireError::Truncated),
    }
}

/// The message telling a registration its reset token.
pub fn emit_reset_token(token: &[u8; RESET_TOKEN_LEN]) -> [u8; 1 + RESET_TOKEN_LEN] {
    let mut b = [0u8; 1 + RESET_TOKEN_LEN];
    b[0] = INNER_RESET_TOKEN;
    b[1..].copy_from_slice(token);
    b
}
