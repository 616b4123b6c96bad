//! Punching: when a pair's direct paths that are not up may be sent to (punch windows,
//! at most one datagram per `PUNCH_INTERVAL`), and when to try again.

use super::*;

impl Pair {
    /// A punch window, if the pair has not had `PUNCH_WINDOWS_PER_RETRY` within the last
    /// `PUNCH_RETRY` (else one when the oldest of them ages out): whatever makes it punch
    /// again (new candidates, a path lost), each candidate gets a bounded number of
    /// datagrams per `PUNCH_RETRY`.
    pub(super) fn start_punch(&mut self, now: Instant) {
        if self.direct.is_empty() {
            return;
        }
        while self.punch_starts.front().is_some_and(|&t| now >= t + PUNCH_RETRY) {
            self.punch_starts.pop_front();
        }
        if self.punch_starts.len() >= PUNCH_WINDOWS_PER_RETRY {
            self.retry_at = self.punch_starts.front().map(|&t| t + PUNCH_RETRY);
            return;
        }
        self.punch_starts.push_back(now);
        self.punch_until = Some(now + PUNCH_WINDOW);
        self.retry_at = None;
        self.next_punch.iter_mut().for_each(|t| *t = now);
    }

    /// Pauses, in our client, the direct paths that are not up and not due a punch now
    /// (outside a punch window, or within `PUNCH_INTERVAL` of the last): they get no
    /// datagram, and their trackers count only the probes that went out.
    pub(super) fn refresh_paused(&mut self, now: Instant) {
        let punching = self.punch_until.is_some_and(|t| now < t);
        let mut paused = PathMask::EMPTY;
        for i in 1..=self.direct.len() {
            let due = punching && self.next_punch.get(i).is_some_and(|&t| now >= t);
            if !self.up.contains(i) && !due {
                paused.insert(i);
            }
        }
        self.paused = paused;
        self.client.set_paused_paths(paused);
        let mut standby = PathMask::EMPTY;
        if self.relay_standby && self.direct_up() {
            standby.insert(RELAY_PATH);
        }
        self.client.set_standby_paths(standby);
    }

    /// Our client sent on `paths`: the ones being punched wait `PUNCH_INTERVAL`.
    pub(super) fn punched(&mut self, now: Instant, paths: PathMask) {
        for i in paths.iter().filter(|&i| i != RELAY_PATH && !self.up.contains(i)) {
            if let Some(t) = self.next_punch.get_mut(i) {
                *t = now + PUNCH_INTERVAL;
            }
        }
        self.refresh_paused(now);
    }
}
