//! Heartbeats: sent every `HEARTBEAT_INTERVAL`, answered by the hub with its list version;
//! their round trip is the hub RTT. A peer with other hubs to go to that carries traffic
//! through its hub sends them every `QUICK_HEARTBEAT_INTERVAL` and moves on when nothing
//! at all came back for `QUICK_HUB_LOST_AFTER` (or four round trips, if longer).

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
        s.last_hb_at = Some(now);
        s.unanswered_since.get_or_insert(now);
        if s.pending_hb.is_none() || s.first_miss.is_some() {
            s.pending_hb = Some((s.hb_seq, now));
        }
        let hb = HeartbeatRepr { seq: s.hb_seq, rtt_us: self.rtt_us }.emit();
        self.transmit.push_back(s.channel.seal_message(&hb));
    }

    /// How long after the first unanswered heartbeat the hub is lost.
    pub(super) fn hub_lost_after(&self) -> Duration {
        if self.cfg.other_hubs {
            STANDBY_HUB_LOST_AFTER
        } else {
            HUB_LOST_AFTER
        }
    }

    /// While the hub is watched closely (other hubs to go to, traffic through it lately):
    /// when the next heartbeat is due, and when the hub is lost unless something comes.
    pub(super) fn quick_deadlines(&self) -> Option<(Instant, Option<Instant>)> {
        let State::Up(s) = &self.state else { return None };
        if !self.cfg.other_hubs {
            return None;
        }
        let busy_until = self.busy_until?;
        let hb = s.last_hb_at.map_or(busy_until, |t| (t + QUICK_HEARTBEAT_INTERVAL).min(busy_until));
        let silence = QUICK_HUB_LOST_AFTER.max(Duration::from_micros(u64::from(self.rtt_us) * 4));
        Some((hb, s.unanswered_since.map(|t| t + silence)))
    }

    /// Runs the close watch: a heartbeat when due, the hub lost when silent. True if it
    /// was lost.
    pub(super) fn watch_closely(&mut self, now: Instant) -> bool {
        if self.busy_until.is_some_and(|t| now >= t) {
            self.busy_until = None;
        }
        let Some((hb, lost)) = self.quick_deadlines() else { return false };
        if lost.is_some_and(|t| now >= t) {
            self.lose_hub(now);
            return true;
        }
        if now >= hb {
            self.send_heartbeat(now);
        }
        false
    }
}
