//! Hub failover under meshed pairs, in network namespaces with real etcd members (the
//! cluster lab of `tests`): three pairs whose peers list hubs h1 then h2 — one direct,
//! one relayed with `relay: fallback`, one relayed with `relay: always` — ping across
//! every 20 ms while one of the two hubs is killed (`kill -9`; the peers are registered
//! with both). Trials kill h1 and h2 in turn, restarting each afterwards: a `fallback`
//! pair's relay stays on the hub that carried it last (h2 after h1's death), so every
//! kill after the first hits it. Per pair: pings answered and the longest time without
//! an answer.

use serde::Serialize;
use std::time::Duration;
use tests::{ClusterLab, FAILOVER_PAIRS as CASES};

/// Pings per pair and trial (every 20 ms: 8 s).
const PINGS: u32 = 400;

#[derive(Debug, Serialize)]
pub struct HubFailover {
    pub pings_per_trial: u32,
    pub pairs: Vec<PairFailover>,
}

#[derive(Debug, Serialize)]
pub struct PairFailover {
    pub pair: String,
    /// Per trial: pings answered, and the longest gap in ms.
    pub answered: Vec<usize>,
    pub gap_ms: Vec<f64>,
}

/// Runs `trials` kills; needs root, `ip`, `nft`, `ping` and etcd.
pub fn run(trials: usize) -> HubFailover {
    let mut c = ClusterLab::start("bf", 2 * CASES.len());
    c.wait_agreed_master(&[1, 2, 3], 3, Duration::from_secs(30));
    let pairs = c.start_pairs(&CASES.map(|(_, relay, direct)| (relay, direct)));
    let mut out: Vec<PairFailover> = CASES
        .iter()
        .map(|(what, ..)| PairFailover { pair: (*what).into(), answered: Vec::new(), gap_ms: Vec::new() })
        .collect();
    for trial in 0..trials {
        let hub = 1 + trial % 2;
        let results = c.ping_pairs_across_kill(&pairs, hub, PINGS);
        for (o, (answered, gap)) in out.iter_mut().zip(results) {
            println!("trial {trial}, h{hub} killed, {}: {answered} of {PINGS}, longest gap {:.0} ms", o.pair, ms(gap));
            o.answered.push(answered);
            o.gap_ms.push(ms(gap));
        }
        c.restart_hub(hub);
        c.wait_agreed_master(&[1, 2, 3], 3, Duration::from_secs(30));
        // every peer is registered with both again (h1 its active hub) before the next kill
        for n in 0..2 * CASES.len() {
            c.wait_hub_states(n, &["active", "up"], Duration::from_secs(20));
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    HubFailover { pings_per_trial: PINGS, pairs: out }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round()
}

pub fn markdown(h: &HubFailover) -> String {
    let mut s = format!(
        "### Hub killed under meshed pairs ({} pings every 20 ms per pair and trial)\n\n\
         | pair | trials | answered (fewest) | longest gap, median | longest gap, worst |\n|---|---|---|---|---|\n",
        h.pings_per_trial
    );
    for p in &h.pairs {
        let mut gaps = p.gap_ms.clone();
        gaps.sort_by(f64::total_cmp);
        let median = gaps.get(gaps.len() / 2).copied().unwrap_or(0.0);
        let worst = gaps.last().copied().unwrap_or(0.0);
        let fewest = p.answered.iter().min().copied().unwrap_or(0);
        s += &format!("| {} | {} | {fewest} | {median:.0} ms | {worst:.0} ms |\n", p.pair, p.answered.len());
    }
    s
}
