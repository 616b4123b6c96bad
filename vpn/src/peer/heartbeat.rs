//! Heartbeats: sent every `HEARTBEAT_INTERVAL`, answered by the hub with its list version;
//! their round trip is the hub RTT.

use super::*;

impl Peer {
    pub(super) fn on_ack(&mut self, now: Instant, m: &[u8]) {
        let Ok(ack) = HeartbeatAckRepr::parse(m) else {
            self.drops.malformed += 1;
            return;
        };
        let State::Up(s) = &mut self.state else { return };
        if let Some((seq, sent)) = s.pending_hb {
            if seq == ack.seq {
                self.rtt_us = now.saturating_duration_since(sent).as_micros().min(u32::MAX as u128) as u32;
            }
        }
        s.first_miss = None;
        s.retries_sent = 0;
        s.pending_hb = None;
        self.last_ack = Some(now);
    }

    /// Queues a sealed heartbeat (the first one also confirms a new registration).
    pub(super) fn send_heartbeat(&mut self, now: Instant) {
        let State::Up(s) = &mut self.state else { return };
        s.hb_seq = s.hb_seq.wrapping_add(1);
        s.next_heartbeat = now + HEARTBEAT_INTERVAL;
        if s.pending_hb.is_none() || s.first_miss.is_some() {
            s.pending_hb = Some((s.hb_seq, now));
        }
        let hb = HeartbeatRepr { seq: s.hb_seq, rtt_us: self.rtt_us }.emit();
        self.transmit.push_back(s.channel.seal_message(&hb));
    }
}
