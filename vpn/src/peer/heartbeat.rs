//! Heartbeats, one stream per hub link: sent every `HEARTBEAT_INTERVAL`, answered by the
//! hub with its list version; their round trip is that hub's RTT. A peer with other hubs
//! that carries traffic through its hubs sends them every `QUICK_HEARTBEAT_INTERVAL` and
//! declares a hub lost when nothing at all came back from it for `QUICK_HUB_LOST_AFTER`
//! (or four of its round trips, if longer).

use super::*;

impl Peer {
    pub(super) fn on_ack(&mut self, now: Instant, l: usize, m: &[u8]) {
        let Ok(ack) = HeartbeatAckRepr::parse(m) else {
            self.drops.malformed += 1;
            return;
        };
        let link = &mut self.links[l];
        let State::Up(s) = &mut link.state else { return };
        if let Some((seq, sent)) = s.pending_hb {
            if seq == ack.seq {
                link.rtt_us = now.saturating_duration_since(sent).as_micros().min(u32::MAX as u128) as u32;
            }
        }
        s.first_miss = None;
        s.retries_sent = 0;
        s.pending_hb = None;
        link.last_ack = Some(now);
    }

    /// Queues a sealed heartbeat on link `l` (the first one also confirms a new
    /// registration).
    pub(super) fn send_heartbeat(&mut self, now: Instant, l: usize) {
        let link = &mut self.links[l];
        let State::Up(s) = &mut link.state else { return };
        s.hb_seq = s.hb_seq.wrapping_add(1);
        s.next_heartbeat = now + HEARTBEAT_INTERVAL;
        s.last_hb_at = Some(now);
        s.unanswered_since.get_or_insert(now);
        if s.pending_hb.is_none() || s.first_miss.is_some() {
            s.pending_hb = Some((s.hb_seq, now));
        }
        let hb = HeartbeatRepr { seq: s.hb_seq, rtt_us: link.rtt_us }.emit();
        link.transmit.push_back(s.channel.seal_message(&hb));
    }

    /// Whether this peer has other hubs to go to.
    fn other_hubs(&self) -> bool {
        self.links.len() > 1
    }

    /// How long after the first unanswered heartbeat a hub is lost.
    pub(super) fn hub_lost_after(&self) -> Duration {
        if self.other_hubs() {
            STANDBY_HUB_LOST_AFTER
        } else {
            HUB_LOST_AFTER
        }
    }

    /// While hub link `l` is watched closely (other hubs to go to, traffic through the
    /// hubs lately): when its next heartbeat is due, and when it is lost unless something
    /// comes.
    pub(super) fn quick_deadlines(&self, l: usize) -> Option<(Instant, Option<Instant>)> {
        let link = &self.links[l];
        let State::Up(s) = &link.state else { return None };
        if !self.other_hubs() {
            return None;
        }
        let busy_until = self.busy_until?;
        let hb = s.last_hb_at.map_or(busy_until, |t| (t + QUICK_HEARTBEAT_INTERVAL).min(busy_until));
        let silence = QUICK_HUB_LOST_AFTER.max(Duration::from_micros(u64::from(link.rtt_us) * 4));
        Some((hb, s.unanswered_since.map(|t| t + silence)))
    }

    /// Runs hub link `l`'s close watch: a heartbeat when due, the hub lost when silent.
    /// True if it was lost.
    pub(super) fn watch_closely(&mut self, now: Instant, l: usize) -> bool {
        let Some((hb, lost)) = self.quick_deadlines(l) else { return false };
        if lost.is_some_and(|t| now >= t) {
            self.lose_hub(now, l);
            return true;
        }
        if now >= hb {
            self.send_heartbeat(now, l);
        }
        false
    }
}
