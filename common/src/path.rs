//! Per-path health from authenticated probes.
//!
//! The client probes every path every `PROBE_INTERVAL`; the server answers each probe on
//! the path it came from, echoing the client's timestamp and reporting which of the last
//! 64 probes it received. From that the client gets RTT, jitter and loss in each
//! direction. A path with no answer for `PATH_DOWN_AFTER` is down: it carries no data but
//! is still probed, and the first answer brings it back.

use crate::stats::PathState;
use crate::wire::{ProbeReplyRepr, ProbeRepr, PROBE_FLAG_PATH_DOWN, PROBE_REPLY_FLAG_VALIDATED};
use std::time::{Duration, Instant};

pub const PROBE_INTERVAL: Duration = Duration::from_millis(200);
/// Once two probes in a row went unanswered, probe this often: a lossy path gets more
/// chances to answer before it is declared down, a dead one is still found within ~1 s.
pub const SUSPECT_PROBE_INTERVAL: Duration = Duration::from_millis(100);
const SUSPECT_AFTER_UNANSWERED: u32 = 2;
/// Until the server reports the path validated, probe this often: until then it may
/// send there only as many bytes as it received (anti-amplification), so a quick
/// validation restores full redundancy on a new or changed path.
pub const VALIDATION_PROBE_INTERVAL: Duration = Duration::from_millis(50);
/// A path that carries the only copy of data is probed this often: its death must be
/// seen fast, as no other path covers for it.
pub const SOLE_COPY_PROBE_INTERVAL: Duration = Duration::from_millis(50);
/// A path whose probes got no answer for this long is down.
pub const PATH_DOWN_AFTER: Duration = Duration::from_millis(1000);
/// ... provided at least this many probes went unanswered in that time (at 20% loss each
/// way a probe round trip fails 36% of the time; 0.36^6 makes false alarms rare).
const PATH_DOWN_MIN_UNANSWERED: u32 = 6;
/// Replies claiming an RTT above this are ignored for RTT (clock wrap or garbage).
const MAX_PLAUSIBLE_RTT_US: u32 = 30_000_000;
/// A probe's fate in each direction is settled once the server reports a probe this many
/// later: a reply still missing by then is lost, not late.
const SETTLE_AFTER_PROBES: u32 = 8;
/// The loss averages' horizons, longest first: a sample weighs `1 - 1/h` as much as the
/// one after it. The longest sees a loss rate well below 1e-4 on a busy path; the
/// shortest sees a rise at once.
const LOSS_HORIZONS: [f64; 3] = [65_536.0, 8_192.0, 1_024.0];
/// Samples a shorter average needs before it counts.
const LOSS_RECENT_MIN: f64 = 32.0;
/// A shorter average is believed over the longer ones only this many standard errors
/// above them: at 1% loss the shortest wanders by ±0.2% by chance alone, which would buy
/// a coded group a parity shard it does not need a fifth of the time.
const LOSS_RISE_Z: f64 = 2.5;
/// A probe unanswered this many smoothed RTTs after it went out makes the path suspect.
const OVERDUE_RTTS: u32 = 3;
/// ... but never sooner than this after it went out.
const OVERDUE_MIN: Duration = Duration::from_millis(30);

/// The loss of one direction of a path, as redundancy needs it, from probes and data
/// receipts alike: a chain of averages (`LOSS_HORIZONS`). The longest starts from one
/// loss in the first sample, so a path earns trust only as evidence comes in (after n
/// clean samples it is about 1/n); each shorter one replaces the estimate when it is
/// significantly above it (`LOSS_RISE_Z`), so a rise shows at once and noise does not.
#[derive(Debug, Clone, Copy, Default)]
pub struct LossEstimate {
    averages: [LossAverage; LOSS_HORIZONS.len()],
}

/// An exponentially weighted count of samples and losses.
#[derive(Debug, Clone, Copy, Default)]
struct LossAverage {
    lost: f64,
    total: f64,
    /// Sum of the squared weights, for the effective sample count.
    weight_sq: f64,
}

impl LossAverage {
    fn add(&mut self, horizon: f64, lost: f64, total: f64) {
        let keep = (1.0 - 1.0 / horizon).powf(total);
        self.lost = self.lost * keep + lost;
        self.total = self.total * keep + total;
        self.weight_sq = self.weight_sq * keep * keep + total;
    }

    /// How many independent samples the weighted ones are worth.
    fn effective_samples(&self) -> f64 {
        if self.weight_sq > 0.0 {
            self.total * self.total / self.weight_sq
        } else {
            0.0
        }
    }
}

impl LossEstimate {
    /// Adds `total` samples of which `lost` were lost.
    pub fn add(&mut self, lost: f64, total: f64) {
        // NaN and negative counts are refused too
        if total.is_nan() || total <= 0.0 || !(0.0..=total).contains(&lost) {
            return;
        }
        for (a, h) in self.averages.iter_mut().zip(LOSS_HORIZONS) {
            a.add(h, lost, total);
        }
    }

    /// The estimate; `None` before any sample.
    pub fn get(&self) -> Option<f64> {
        let [long, shorter @ ..] = &self.averages;
        if long.total <= 0.0 {
            return None;
        }
        let mut estimate = (long.lost + 1.0) / (long.total + 1.0);
        for a in shorter.iter().filter(|a| a.total >= LOSS_RECENT_MIN) {
            let rate = a.lost / a.total;
            let stderr = (estimate * (1.0 - estimate) / a.effective_samples()).sqrt();
            if rate > estimate + LOSS_RISE_Z * stderr {
                estimate = rate;
            }
        }
        Some(estimate.min(1.0))
    }

    /// Samples behind the long average.
    pub fn samples(&self) -> f64 {
        self.averages[0].total
    }
}

/// The client's view of one path of one session.
#[derive(Debug, Clone)]
pub struct ProbeTracker {
    path_id: u8,
    /// Sequence number of the last probe sent (0 = none yet; probes start at 1).
    last_sent: u32,
    /// Bit k set = the reply to probe `last_sent - k` arrived.
    replied: u64,
    sent_since_reply: u32,
    started: Instant,
    last_reply_at: Option<Instant>,
    next_probe_at: Instant,
    srtt_us: Option<f64>,
    last_rtt_us: Option<f64>,
    jitter_us: f64,
    loss_up: Option<f64>,
    loss_down: Option<f64>,
    estimate_up: LossEstimate,
    estimate_down: LossEstimate,
    /// Probes up to this one have their fate counted in the estimates.
    settled_through: u32,
    /// When the oldest probe still unanswered went out (reset by any reply).
    unanswered_since: Option<Instant>,
    /// The server's current challenge for this path, echoed in the next probe.
    challenge: u64,
    /// The server's last word on whether it has validated this path.
    server_validated: bool,
    /// It carries the only copy of data (see `SOLE_COPY_PROBE_INTERVAL`).
    sole_copy: bool,
    state: PathState,
}

impl ProbeTracker {
    pub fn new(path_id: u8, now: Instant) -> Self {
        Self {
            path_id,
            last_sent: 0,
            replied: 0,
            sent_since_reply: 0,
            started: now,
            last_reply_at: None,
            next_probe_at: now,
            srtt_us: None,
            last_rtt_us: None,
            jitter_us: 0.0,
            loss_up: None,
            loss_down: None,
            estimate_up: LossEstimate::default(),
            estimate_down: LossEstimate::default(),
            settled_through: 0,
            unanswered_since: None,
            challenge: 0,
            server_validated: false,
            sole_copy: false,
            state: PathState::Probing,
        }
    }

    pub fn state(&self) -> PathState {
        self.state
    }

    pub fn next_probe_at(&self) -> Instant {
        self.next_probe_at
    }

    /// Whether the path carries the only copy of data: then it is probed faster.
    pub fn set_sole_copy(&mut self, now: Instant, sole: bool) {
        if sole && !self.sole_copy {
            self.next_probe_at = self.next_probe_at.min(now + SOLE_COPY_PROBE_INTERVAL);
        }
        self.sole_copy = sole;
    }

    /// Ask for a probe as soon as possible (e.g. to answer a new challenge).
    pub fn probe_now(&mut self, now: Instant) {
        self.next_probe_at = now;
    }

    /// Builds the next probe and schedules the one after.
    pub fn make_probe(&mut self, now: Instant, now_us: u32) -> ProbeRepr {
        self.last_sent = self.last_sent.wrapping_add(1).max(1);
        self.replied <<= 1;
        self.sent_since_reply += 1;
        let interval = if !self.server_validated {
            VALIDATION_PROBE_INTERVAL
        } else if self.sent_since_reply > SUSPECT_AFTER_UNANSWERED {
            SUSPECT_PROBE_INTERVAL
        } else {
            PROBE_INTERVAL
        };
        let interval = if self.sole_copy { interval.min(SOLE_COPY_PROBE_INTERVAL) } else { interval };
        self.next_probe_at = now + interval;
        self.unanswered_since.get_or_insert(now);
        ProbeRepr {
            path_id: self.path_id,
            flags: if self.state == PathState::Down { PROBE_FLAG_PATH_DOWN } else { 0 },
            probe_seq: self.last_sent,
            tx_time_us: now_us,
            echo_challenge: self.challenge,
            down_loss_ppm: self.estimate_down.get().map(|l| (l * 1e6).round() as u32),
            rtt_us: self.srtt_us.map(|us| us.round().min(f64::from(MAX_PLAUSIBLE_RTT_US)) as u32),
        }
    }

    /// Processes an authenticated reply. Returns true if the path just came up, and
    /// whether the server sent a new challenge (which wants an immediate probe).
    pub fn on_reply(&mut self, now: Instant, now_us: u32, r: &ProbeReplyRepr) -> (bool, bool) {
        if r.probe_seq == 0 || r.probe_seq > self.last_sent || self.last_sent - r.probe_seq >= 64 {
            return (false, false);
        }
        self.replied |= 1 << (self.last_sent - r.probe_seq);
        self.sent_since_reply = 0;
        self.unanswered_since = None;
        self.last_reply_at = Some(now);
        let rtt = now_us.wrapping_sub(r.tx_time_us);
        if rtt <= MAX_PLAUSIBLE_RTT_US {
            let rtt = rtt as f64;
            self.srtt_us = Some(self.srtt_us.map_or(rtt, |s| s + (rtt - s) / 8.0));
            if let Some(prev) = self.last_rtt_us {
                // RFC 3550-style smoothed jitter over successive RTT samples.
                self.jitter_us += ((rtt - prev).abs() - self.jitter_us) / 16.0;
            }
            self.last_rtt_us = Some(rtt);
        }
        self.update_loss(r);
        self.server_validated = r.flags & PROBE_REPLY_FLAG_VALIDATED != 0;
        let new_challenge = r.challenge != self.challenge;
        self.challenge = r.challenge;
        let came_up = self.state != PathState::Up;
        self.state = PathState::Up;
        (came_up, new_challenge)
    }

    fn update_loss(&mut self, r: &ProbeReplyRepr) {
        let high = r.rx_highest;
        if high == 0 || high > self.last_sent || self.last_sent - high >= 64 {
            return;
        }
        let offset = self.last_sent - high;
        let (mut up_total, mut up_lost, mut down_total, mut down_lost) = (0u32, 0u32, 0u32, 0u32);
        for k in 0..(64 - offset) {
            if k >= high {
                break; // before the first probe
            }
            up_total += 1;
            if r.rx_bitmap & (1 << k) == 0 {
                up_lost += 1;
            } else {
                down_total += 1;
                if self.replied & (1 << (offset + k)) == 0 {
                    down_lost += 1;
                }
            }
        }
        if up_total > 0 {
            self.loss_up = Some(up_lost as f64 / up_total as f64);
        }
        if down_total > 0 {
            self.loss_down = Some(down_lost as f64 / down_total as f64);
        }
        self.settle(high, r.rx_bitmap);
    }

    /// Counts, once each, the fates of the probes the server's report (`high`, `bitmap`)
    /// has settled: up lost if the server never got it, down lost if it did but its
    /// reply never came.
    fn settle(&mut self, high: u32, bitmap: u64) {
        let through = high.saturating_sub(SETTLE_AFTER_PROBES);
        // probes older than both bitmaps are unknown (a path silent for long): skipped
        let oldest_known = high.saturating_sub(63).max(self.last_sent.saturating_sub(63)).max(1);
        for seq in self.settled_through.saturating_add(1).max(oldest_known)..=through {
            let arrived = bitmap & (1 << (high - seq)) != 0;
            self.estimate_up.add(f64::from(u8::from(!arrived)), 1.0);
            if arrived {
                let lost = self.replied & (1 << (self.last_sent - seq)) == 0;
                self.estimate_down.add(f64::from(u8::from(lost)), 1.0);
            }
        }
        self.settled_through = self.settled_through.max(through);
    }

    /// The server's receipt for data sent on this path: `sent` went out, `received` came.
    pub fn on_data_receipt(&mut self, sent: u64, received: u64) {
        self.estimate_up.add(sent.saturating_sub(received) as f64, sent as f64);
    }

    /// The loss towards the server, for redundancy (see `LossEstimate`).
    pub fn loss_up_estimate(&self) -> Option<f64> {
        self.estimate_up.get()
    }

    /// The loss from the server, for redundancy; the client reports it in its probes.
    pub fn loss_down_estimate(&self) -> Option<f64> {
        self.estimate_down.get()
    }

    /// A probe has gone unanswered, with nothing else heard on the path since, for longer
    /// than its round trip should take: a path that carries the only copy of data should
    /// not be trusted with the next.
    pub fn reply_overdue(&self, now: Instant) -> bool {
        let Some(sent) = self.unanswered_since else { return false };
        let rtt = Duration::from_micros(self.srtt_us.unwrap_or(0.0) as u64);
        now.saturating_duration_since(sent) >= (rtt * OVERDUE_RTTS).max(OVERDUE_MIN)
    }

    /// An authenticated datagram (data, not only a probe reply) arrived on this path: it
    /// works towards us. Returns true if the path just came up.
    pub fn on_authenticated_rx(&mut self, now: Instant) -> bool {
        self.last_reply_at = Some(now);
        self.sent_since_reply = 0;
        self.unanswered_since = None;
        let came_up = self.state != PathState::Up;
        self.state = PathState::Up;
        came_up
    }

    /// Updates the up/down state. Returns true if the path just went down.
    pub fn check_down(&mut self, now: Instant) -> bool {
        let since = self.last_reply_at.unwrap_or(self.started);
        if self.state != PathState::Down
            && now.saturating_duration_since(since) >= PATH_DOWN_AFTER
            && self.sent_since_reply >= PATH_DOWN_MIN_UNANSWERED
        {
            self.state = PathState::Down;
            return true;
        }
        false
    }

    pub fn rtt_ms(&self) -> Option<f64> {
        self.srtt_us.map(|v| v / 1000.0)
    }

    /// The smoothed round trip.
    pub fn srtt(&self) -> Option<Duration> {
        self.srtt_us.map(|us| Duration::from_secs_f64(us / 1e6))
    }

    pub fn jitter_ms(&self) -> Option<f64> {
        self.last_rtt_us.map(|_| self.jitter_us / 1000.0)
    }

    pub fn loss_up(&self) -> Option<f64> {
        self.loss_up
    }

    pub fn loss_down(&self) -> Option<f64> {
        self.loss_down
    }
}

/// The server's record of which probes arrived on one path (reported back in replies).
#[derive(Debug, Clone, Copy, Default)]
pub struct ProbeReceipts {
    highest: u32,
    /// Bit k = probe `highest - k` arrived. History from before the path was learned
    /// counts as received, so a new path does not report phantom loss.
    bitmap: u64,
}

impl ProbeReceipts {
    pub fn on_probe(&mut self, seq: u32) {
        if self.highest == 0 {
            self.highest = seq;
            self.bitmap = u64::MAX;
        } else if seq > self.highest {
            let shift = seq - self.highest;
            self.bitmap = if shift >= 64 { 0 } else { self.bitmap << shift };
            self.bitmap |= 1;
            self.highest = seq;
        } else if self.highest - seq < 64 {
            self.bitmap |= 1 << (self.highest - seq);
        }
    }

    pub fn highest(&self) -> u32 {
        self.highest
    }

    pub fn bitmap(&self) -> u64 {
        self.bitmap
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(p: &ProbeRepr, receipts: &ProbeReceipts) -> ProbeReplyRepr {
        ProbeReplyRepr {
            path_id: p.path_id,
            probe_seq: p.probe_seq,
            tx_time_us: p.tx_time_us,
            challenge: 7,
            rx_highest: receipts.highest(),
            rx_bitmap: receipts.bitmap(),
            flags: PROBE_REPLY_FLAG_VALIDATED,
        }
    }

    #[test]
    fn rtt_loss_and_state() {
        let t0 = Instant::now();
        let mut t = ProbeTracker::new(0, t0);
        let mut rx = ProbeReceipts::default();
        let mut now = t0;
        let mut us = 0u32;
        // 40 probes: every 4th lost on the way up, every 5th reply lost on the way down.
        for i in 1..=40u32 {
            let p = t.make_probe(now, us);
            if i % 4 != 0 {
                rx.on_probe(p.probe_seq);
                if i % 5 != 0 {
                    let r = reply(&p, &rx);
                    t.on_reply(now + Duration::from_millis(10), us + 10_000, &r);
                }
            }
            now += PROBE_INTERVAL;
            us += 200_000;
        }
        assert_eq!(t.state(), PathState::Up);
        assert!((t.rtt_ms().unwrap() - 10.0).abs() < 0.01);
        assert!(t.jitter_ms().unwrap() < 0.01);
        let up = t.loss_up().unwrap();
        let down = t.loss_down().unwrap();
        assert!((up - 0.25).abs() < 0.05, "up loss {up}");
        assert!((down - 0.2).abs() < 0.08, "down loss {down}");
        // now silence: down after about a second
        let mut went_down_at = None;
        for _ in 0..10 {
            t.make_probe(now, us);
            if t.check_down(now) {
                went_down_at = Some(now);
                break;
            }
            now += PROBE_INTERVAL;
            us += 200_000;
        }
        let last_reply = t0 + PROBE_INTERVAL * 38 + Duration::from_millis(10);
        let took = went_down_at.expect("path must go down").duration_since(last_reply);
        assert!(took <= Duration::from_millis(1300), "{took:?}");
        // and up again on the next answer, with the down flag on probes meanwhile
        let p = t.make_probe(now, us);
        assert_eq!(p.flags, PROBE_FLAG_PATH_DOWN);
        rx.on_probe(p.probe_seq);
        let (came_up, _) = t.on_reply(now, us + 5_000, &reply(&p, &rx));
        assert!(came_up);
    }

    #[test]
    fn bogus_replies_are_ignored() {
        let t0 = Instant::now();
        let mut t = ProbeTracker::new(0, t0);
        let r = ProbeReplyRepr {
            path_id: 0,
            probe_seq: 5,
            tx_time_us: 0,
            challenge: 1,
            rx_highest: 5,
            rx_bitmap: 1,
            flags: 0,
        };
        assert_eq!(t.on_reply(t0, 0, &r), (false, false));
        assert_eq!(t.state(), PathState::Probing);
    }

    #[test]
    fn receipts_window() {
        let mut r = ProbeReceipts::default();
        r.on_probe(10);
        assert_eq!(r.bitmap(), u64::MAX);
        r.on_probe(12);
        assert_eq!(r.bitmap() & 0b111, 0b101);
        r.on_probe(11);
        assert_eq!(r.bitmap() & 0b111, 0b111);
        r.on_probe(200);
        assert_eq!(r.bitmap(), 1);
        r.on_probe(100); // too old: ignored
        assert_eq!(r.highest(), 200);
    }
}
