//! Hub scale, in the VPN's seeded simulator (real hub and peer cores, a fake clock, no
//! namespaces): peers join one hub up to `peers`; at each checkpoint one more peer joins
//! while the hub sends peer lists as deltas and one more while it sends them whole (as
//! before deltas), in the same run. A join is measured from its Register until every
//! peer holds the new list: the hub's tunnel bytes in that window (heartbeat answers to
//! the others included) and the real time spent in the hub's calls (its CPU). The hub's
//! heap, measured by dropping it at the end, gives its memory per peer.

use serde::Serialize;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use vpn::hub::{Hub, HubCoreConfig};
use vpn::sim::{hub_config, peer_config, peer_spec, Nat, VpnSim};

/// The system allocator, counting the bytes live: the hub's memory is what dropping it
/// gives back.
pub struct CountingAlloc;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call goes to `System` unchanged; only a counter is kept beside it.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(l.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is System's
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE_BYTES.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is System's
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new, Ordering::Relaxed);
        LIVE_BYTES.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is System's
        unsafe { System.realloc(p, l, new) }
    }
}

/// Peers join in batches of this many between checkpoints (not measured).
const GROW_BATCH: usize = 100;
/// A join that has not reached every peer after this long of simulated time failed.
const JOIN_LIMIT: Duration = Duration::from_secs(10);

#[derive(Serialize, Clone)]
pub struct JoinCost {
    /// Peers on the hub before the join.
    pub peers: usize,
    /// "deltas" or "whole".
    pub lists: &'static str,
    pub hub_bytes: u64,
    pub hub_cpu_ms: f64,
    /// Simulated time until every peer held the new list.
    pub sim_ms: f64,
}

/// What the hub costs with `peers` on it and nothing joining.
#[derive(Serialize, Clone)]
pub struct IdleCost {
    pub peers: usize,
    /// The hub's CPU per second of heartbeats and timers.
    pub hub_cpu_ms_per_s: f64,
    pub hub_bytes_per_s: u64,
}

#[derive(Serialize, Clone)]
pub struct HubScale {
    pub joins: Vec<JoinCost>,
    pub idle: Vec<IdleCost>,
    pub peers: usize,
    pub hub_heap_bytes_per_peer: f64,
}

/// A hub on 10.96.0.0/20 (4094 addresses) that knows `n` peers, p0 .. p{n-1}.
fn big_hub(n: usize) -> HubCoreConfig {
    let mut cfg = hub_config(&[]);
    cfg.network = "10.96.0.0/20".parse().expect("literal");
    cfg.hub_addr = std::net::Ipv4Addr::new(10, 96, 0, 1);
    cfg.peers = (0..n).map(|i| peer_spec(&format!("p{i}"))).collect();
    cfg
}

/// Adds `count` peers at once and runs until every peer is up and holds the whole list.
/// Returns the simulated time it took.
fn join(sim: &mut VpnSim, count: usize) -> Duration {
    let start = sim.now;
    for _ in 0..count {
        let i = sim.peers.len();
        sim.add_peer(peer_config(&format!("p{i}")), Nat::None);
    }
    let n = sim.peers.len();
    while !sim.peers.iter().all(|p| p.core.is_up() && p.core.peers().len() == n) {
        assert!(sim.now - start < JOIN_LIMIT, "{count} peers joining {n} did not reach everyone");
        sim.step();
    }
    sim.now - start
}

/// One peer joins with the hub sending lists as `lists`.
fn measured_join(sim: &mut VpnSim, lists: &'static str) -> JoinCost {
    sim.hub.send_whole_lists(lists == "whole");
    let peers = sim.peers.len();
    let (bytes0, busy0) = (sim.hub_sent.values().sum::<u64>(), sim.hub_busy);
    let took = join(sim, 1);
    sim.hub.send_whole_lists(false);
    JoinCost {
        peers,
        lists,
        hub_bytes: sim.hub_sent.values().sum::<u64>() - bytes0,
        hub_cpu_ms: (sim.hub_busy - busy0).as_secs_f64() * 1000.0,
        sim_ms: took.as_secs_f64() * 1000.0,
    }
}

/// A second of the hub with nothing joining.
fn idle_second(sim: &mut VpnSim) -> IdleCost {
    let (bytes0, busy0) = (sim.hub_sent.values().sum::<u64>(), sim.hub_busy);
    sim.run_for(Duration::from_secs(1));
    IdleCost {
        peers: sim.peers.len(),
        hub_cpu_ms_per_s: (sim.hub_busy - busy0).as_secs_f64() * 1000.0,
        hub_bytes_per_s: sim.hub_sent.values().sum::<u64>() - bytes0,
    }
}

/// A hub grown to each of `checkpoints` peers in turn (in batches), with one join
/// measured at each, its lists sent as `lists`, and a second of it idle before.
fn grow_and_join(checkpoints: &[usize], lists: &'static str) -> (VpnSim, Vec<JoinCost>, Vec<IdleCost>) {
    let top = checkpoints.iter().copied().max().unwrap_or(0);
    let mut sim = VpnSim::new(big_hub(top + checkpoints.len()), 1);
    let (mut joins, mut idle) = (Vec::new(), Vec::new());
    for &at in checkpoints {
        while sim.peers.len() < at {
            let batch = GROW_BATCH.min(at - sim.peers.len());
            join(&mut sim, batch);
        }
        // the batches' heartbeats spread over a second first, as a running network's are
        sim.run_for(Duration::from_secs(3));
        idle.push(idle_second(&mut sim));
        let j = measured_join(&mut sim, lists);
        eprintln!(
            "  hub scale: join at {} peers, lists {lists}: {} bytes from the hub, {:.2} ms hub CPU",
            j.peers, j.hub_bytes, j.hub_cpu_ms
        );
        joins.push(j);
    }
    (sim, joins, idle)
}

/// Measures joins at each of `checkpoints` peers with deltas and with whole lists (two
/// hubs grown alike), and the first hub's heap.
pub fn run(checkpoints: &[usize]) -> HubScale {
    let (mut sim, deltas, idle) = grow_and_join(checkpoints, "deltas");
    let peers = sim.peers.len();
    let empty = Hub::new(hub_config(&[]), Box::new(common::sim::SimEntropy::new(2)));
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    drop(std::mem::replace(&mut sim.hub, empty));
    let heap = before.saturating_sub(LIVE_BYTES.load(Ordering::Relaxed));
    drop(sim);
    let (_, whole, _) = grow_and_join(checkpoints, "whole");
    let joins = deltas.into_iter().zip(whole).flat_map(|(d, w)| [d, w]).collect();
    HubScale { joins, idle, peers, hub_heap_bytes_per_peer: heap as f64 / peers.max(1) as f64 }
}

/// The table: per checkpoint, a join's cost with deltas and whole lists, and their ratio.
pub fn markdown(h: &HubScale) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "## Hub scale (simulator: one hub, peers joining one at a time)\n");
    let _ = writeln!(
        s,
        "| peers on the hub | hub bytes per join, deltas | whole lists | whole / deltas | \
         hub CPU ms per join, deltas | whole lists | hub idle: CPU ms per s, bytes per s |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    for (pair, idle) in h.joins.chunks(2).zip(&h.idle) {
        if let [d, w] = pair {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.0}× | {:.2} | {:.2} | {:.2}, {} |",
                d.peers,
                d.hub_bytes,
                w.hub_bytes,
                w.hub_bytes as f64 / d.hub_bytes.max(1) as f64,
                d.hub_cpu_ms,
                w.hub_cpu_ms,
                idle.hub_cpu_ms_per_s,
                idle.hub_bytes_per_s
            );
        }
    }
    let _ = writeln!(
        s,
        "\nA join's window (Register until every peer holds the new list, ~100 ms simulated) \
         includes the other peers' heartbeats in it."
    );
    let _ = writeln!(s, "\nhub heap at {} peers: {:.0} bytes per peer", h.peers, h.hub_heap_bytes_per_peer);
    s
}
