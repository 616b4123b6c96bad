//! A hub's place in the cluster (hub.yaml's `cluster:`), on etcd: membership, the
//! cluster-wide name → address store and the master.
//!
//! Everything here runs on its own thread, because every etcd call blocks (`etcd.rs`);
//! it tells the event loop what changed through a channel and a `mio::Waker`, and takes
//! the loop's questions ("an address for this name") through another channel. The hub
//! core never waits for it.
//!
//! Invariants:
//! - Membership: `<prefix>hubs/<name>` under this hub's lease, signed with the cluster
//!   key; a hub that stops renewing disappears within the lease TTL. Records that do not
//!   verify are not believed.
//! - Addresses: a name gets one only through a transaction that creates both
//!   `names/<name>` and `addrs/<ip>` or neither, so no two names ever share one, whichever
//!   hubs ask at once. Nothing is guessed while etcd does not answer.
//! - Master: etcd's election under this hub's lease. This hub calls itself master only
//!   between winning and the moment its lease could have expired on etcd's side, counted
//!   from when it *sent* its last renewal: a hub cut off from the quorum steps down before
//!   anyone else can be elected. `on_master` runs once per change, `up` or `down`.

use super::etcd::{Etcd, EtcdAccess, EtcdError, LeaderKey, LeaseId};
use crate::ip::Prefix;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::hmac;
use serde::{Deserialize, Serialize};
use slog::{debug, error, info, warn, Logger};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the thread reads membership, the master and the assignments.
pub(super) const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How long one campaign call waits for the election before asking again.
const CAMPAIGN_WAIT: Duration = Duration::from_secs(60);
/// After a failed campaign call, before the next.
const CAMPAIGN_RETRY: Duration = Duration::from_millis(500);
/// Mastership ends this long before the lease could end on etcd's side (clock rates
/// differ a little; a renewal's answer may be late).
const LEASE_MARGIN: Duration = Duration::from_millis(500);
/// Renewals per lease TTL: one late answer costs nothing.
const RENEWALS_PER_TTL: u32 = 4;
/// Attempts at taking a free address when other hubs take the same ones at once.
const ASSIGN_ATTEMPTS: usize = 64;

/// The cluster thread's clock (the drivers' one reading, `super::clock`).
fn now() -> Instant {
    super::clock().0
}

/// What the cluster thread needs to know, from hub.yaml.
pub(super) struct ClusterSpec {
    pub(super) name: String,
    pub(super) etcd: EtcdAccess,
    pub(super) key: [u8; 32],
    pub(super) advertise_tunnel: Vec<SocketAddr>,
    pub(super) advertise_rendezvous: Option<SocketAddr>,
    pub(super) advertise_forward: Option<SocketAddr>,
    pub(super) on_master: Option<PathBuf>,
    pub(super) lease_ttl: Duration,
    /// Where this network's keys live in etcd.
    pub(super) prefix: String,
    /// Of hub.yaml's `network` and `peers`: hubs that disagree are named in status.
    pub(super) digest: String,
    pub(super) network: Prefix,
    /// The hub's address and the fixed ones (hub.yaml): never handed to a name.
    pub(super) reserved: HashSet<Ipv4Addr>,
}

/// Where the keys of the VPN on `network` live in etcd.
pub(super) fn key_prefix(network: Prefix) -> String {
    format!("/mpvpn/{}_{}/", network.addr, network.len)
}

/// What a hub publishes about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubRecord {
    pub name: String,
    pub tunnel: Vec<SocketAddr>,
    pub rendezvous: Option<SocketAddr>,
    /// Where it takes forwarded packets (`forward_listen`); none: it does not forward.
    #[serde(default)]
    pub forward: Option<SocketAddr>,
    pub digest: String,
}

/// A record as it sits in etcd: the record's JSON and its MAC under the cluster key.
#[derive(Serialize, Deserialize)]
struct SignedRecord {
    body: String,
    mac: String,
}

fn sign(key: &hmac::Key, r: &HubRecord) -> Vec<u8> {
    let body = serde_json::to_string(r).unwrap_or_default();
    let mac = B64.encode(hmac::sign(key, body.as_bytes()).as_ref());
    serde_json::to_vec(&SignedRecord { body, mac }).unwrap_or_default()
}

/// The record in `value`, if it is one the cluster key signed for hub `name`.
fn verify(key: &hmac::Key, name: &str, value: &[u8]) -> Option<HubRecord> {
    let s: SignedRecord = serde_json::from_slice(value).ok()?;
    let mac = B64.decode(&s.mac).ok()?;
    hmac::verify(key, s.body.as_bytes(), &mac).ok()?;
    let r: HubRecord = serde_json::from_str(&s.body).ok()?;
    (r.name == name).then_some(r)
}

/// What the cluster thread tells the event loop.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum ClusterEvent {
    /// Whether etcd answers (with a quorum behind it).
    Store(bool),
    /// The hubs in etcd now (this one included), and records that did not verify.
    Hubs { hubs: Vec<HubRecord>, unverified: u64 },
    /// Who is master (`None`: nobody now), and whether it is this hub.
    Master { master: Option<String>, me: bool },
    /// Every name → address assignment.
    Assignments(BTreeMap<String, Ipv4Addr>),
    /// A name could not get an address.
    AssignFailed { name: String, why: String },
}

enum Request {
    Assign { name: String, want: Ipv4Addr },
    Won { lease: LeaseId, leader: LeaderKey },
    CampaignEnded { lease: LeaseId },
    Stop,
}

/// The event loop's end of the cluster thread.
pub(super) struct ClusterLink {
    requests: Sender<Request>,
    events: Receiver<ClusterEvent>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ClusterLink {
    /// Starts the thread; it wakes the loop with `waker` when it has something.
    pub(super) fn start(spec: ClusterSpec, waker: mio::Waker, log: Logger) -> std::io::Result<Self> {
        let (requests, from_loop) = channel();
        let (to_loop, events) = channel();
        let own = requests.clone();
        let thread = std::thread::Builder::new().name("cluster".into()).spawn(move || {
            Worker::new(spec, to_loop, waker, own, log).run(from_loop);
        })?;
        Ok(Self { requests, events, thread: Some(thread) })
    }

    /// Asks the store for `name`'s address (answered with `Assignments`, or `AssignFailed`).
    pub(super) fn ask(&self, name: String, want: Ipv4Addr) {
        let _ = self.requests.send(Request::Assign { name, want });
    }

    pub(super) fn try_recv(&self) -> Option<ClusterEvent> {
        self.events.try_recv().ok()
    }
}

impl Drop for ClusterLink {
    /// Leaves the cluster at once (revokes the lease: membership and mastership end now,
    /// not a TTL later).
    fn drop(&mut self) {
        let _ = self.requests.send(Request::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Lease {
    id: LeaseId,
    /// Until when this hub may count on it (see the module's invariants).
    valid_until: Instant,
    next_renewal: Instant,
    published: bool,
    campaigning: bool,
}

struct Worker {
    spec: ClusterSpec,
    key: hmac::Key,
    etcd: Etcd,
    events: Sender<ClusterEvent>,
    waker: mio::Waker,
    /// For the campaign threads' answers.
    own: Sender<Request>,
    log: Logger,
    lease: Option<Lease>,
    /// The lease a campaign thread may campaign with (0: none).
    campaign_lease: Arc<AtomicI64>,
    /// Set while this hub is master.
    leader: Option<LeaderKey>,
    // what the loop was told last
    store: Option<bool>,
    hubs: Option<(Vec<HubRecord>, u64)>,
    master: Option<(Option<String>, bool)>,
    assignments: Option<BTreeMap<String, Ipv4Addr>>,
    next_poll: Instant,
}

impl Worker {
    fn new(
        spec: ClusterSpec,
        events: Sender<ClusterEvent>,
        waker: mio::Waker,
        own: Sender<Request>,
        log: Logger,
    ) -> Self {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &spec.key);
        let etcd = Etcd::new(&spec.etcd);
        Self {
            spec,
            key,
            etcd,
            events,
            waker,
            own,
            log,
            lease: None,
            campaign_lease: Arc::new(AtomicI64::new(0)),
            leader: None,
            store: None,
            hubs: None,
            master: None,
            assignments: None,
            next_poll: now(),
        }
    }

    fn tell(&mut self, ev: ClusterEvent) {
        let _ = self.events.send(ev);
        let _ = self.waker.wake();
    }

    fn run(mut self, requests: Receiver<Request>) {
        loop {
            let wait = self.next_poll.saturating_duration_since(now());
            match requests.recv_timeout(wait) {
                Ok(Request::Assign { name, want }) => self.assign(name, want),
                Ok(Request::Won { lease, leader }) => self.won(lease, leader),
                Ok(Request::CampaignEnded { lease }) => {
                    if let Some(l) = self.lease.as_mut().filter(|l| l.id == lease) {
                        l.campaigning = false;
                    }
                }
                Ok(Request::Stop) | Err(RecvTimeoutError::Disconnected) => return self.leave(),
                Err(RecvTimeoutError::Timeout) => {
                    self.tick();
                    let renewal = self.lease.as_ref().map(|l| l.next_renewal);
                    self.next_poll = renewal.into_iter().fold(now() + POLL_INTERVAL, Instant::min);
                }
            }
        }
    }

    /// Keeps the lease, the membership record and the campaign going; reads what the
    /// others did.
    fn tick(&mut self) {
        self.bound_calls();
        self.keep_lease();
        self.bound_calls();
        let read = self.read_cluster();
        self.set_store(read.is_ok());
        if let Err(e) = read {
            debug!(self.log, "etcd"; "error" => %e);
        }
        self.check_master();
    }

    /// While master, no etcd call may outlast the lease: the hub must be able to step
    /// down at its end, not a blocked call later.
    fn bound_calls(&mut self) {
        self.etcd.deadline = self.leader.as_ref().and(self.lease.as_ref()).map(|l| l.valid_until);
    }

    fn keep_lease(&mut self) {
        let now = now();
        let ttl = self.spec.lease_ttl;
        if let Some(l) = &self.lease {
            if now >= l.valid_until {
                warn!(self.log, "cluster lease lapsed (etcd did not answer in time)"; "lease" => l.id);
                self.lose_lease();
            }
        }
        match &mut self.lease {
            None => {
                if let Ok(id) = self.etcd.grant(ttl) {
                    let valid_until = now + ttl - LEASE_MARGIN;
                    let next_renewal = now + ttl / RENEWALS_PER_TTL;
                    self.lease = Some(Lease { id, valid_until, next_renewal, published: false, campaigning: false });
                }
            }
            Some(l) if now >= l.next_renewal => match self.etcd.keep_alive(l.id) {
                Ok(true) => {
                    l.valid_until = now + ttl - LEASE_MARGIN;
                    l.next_renewal = now + ttl / RENEWALS_PER_TTL;
                }
                Ok(false) => {
                    warn!(self.log, "cluster lease gone on etcd's side"; "lease" => l.id);
                    self.lose_lease();
                }
                Err(_) => {} // tried again at the next poll, until valid_until
            },
            Some(_) => {}
        }
        let Some(l) = &mut self.lease else { return };
        if !l.published {
            let record = HubRecord {
                name: self.spec.name.clone(),
                tunnel: self.spec.advertise_tunnel.clone(),
                rendezvous: self.spec.advertise_rendezvous,
                forward: self.spec.advertise_forward,
                digest: self.spec.digest.clone(),
            };
            let key = format!("{}hubs/{}", self.spec.prefix, self.spec.name);
            l.published = self.etcd.put(&key, &sign(&self.key, &record), l.id).is_ok();
        }
        if !l.campaigning {
            l.campaigning = true;
            let id = l.id;
            self.campaign_lease.store(id, Ordering::SeqCst);
            self.start_campaign(id);
        }
    }

    fn lose_lease(&mut self) {
        self.lease = None;
        self.campaign_lease.store(0, Ordering::SeqCst);
        self.step_down();
    }

    /// A thread that waits to win the election under `lease` (the call blocks until it
    /// wins), and says so.
    fn start_campaign(&self, lease: LeaseId) {
        let access = self.spec.etcd.clone();
        let (election, name) = (format!("{}master", self.spec.prefix), self.spec.name.clone());
        let (current, own) = (self.campaign_lease.clone(), self.own.clone());
        let spawned = std::thread::Builder::new().name("cluster-campaign".into()).spawn(move || {
            let mut etcd = Etcd::new(&access);
            while current.load(Ordering::SeqCst) == lease {
                match etcd.campaign(&election, lease, name.as_bytes(), CAMPAIGN_WAIT) {
                    Ok(leader) => {
                        let _ = own.send(Request::Won { lease, leader });
                        return;
                    }
                    Err(EtcdError::Server(_)) => break, // the lease is gone: a new one campaigns
                    Err(EtcdError::Unreachable(_)) => std::thread::sleep(CAMPAIGN_RETRY),
                }
            }
            let _ = own.send(Request::CampaignEnded { lease });
        });
        if let Err(e) = spawned {
            error!(self.log, "cannot start the campaign thread"; "error" => %e);
        }
    }

    fn won(&mut self, lease: LeaseId, leader: LeaderKey) {
        let valid = self.lease.as_ref().is_some_and(|l| l.id == lease && now() < l.valid_until);
        if !valid || self.leader.is_some() {
            return;
        }
        info!(self.log, "this hub is the cluster's master"; "name" => &self.spec.name);
        self.leader = Some(leader);
        self.run_on_master("up");
        self.report_master(Some(self.spec.name.clone()));
    }

    fn step_down(&mut self) {
        if self.leader.take().is_some() {
            warn!(self.log, "this hub is no longer the cluster's master"; "name" => &self.spec.name);
            self.run_on_master("down");
            self.report_master(None);
        }
    }

    /// Reads the hubs, the master and the assignments; tells the loop what changed.
    fn read_cluster(&mut self) -> Result<(), EtcdError> {
        let p = &self.spec.prefix;
        let (hubs_prefix, names_prefix, election) = (format!("{p}hubs/"), format!("{p}names/"), format!("{p}master"));
        let mut hubs = Vec::new();
        let mut unverified = 0;
        for kv in self.etcd.range_prefix(&hubs_prefix)? {
            let name = kv.key.strip_prefix(&hubs_prefix).unwrap_or_default();
            match verify(&self.key, name, &kv.value) {
                Some(r) => hubs.push(r),
                None => unverified += 1,
            }
        }
        if self.hubs.as_ref() != Some(&(hubs.clone(), unverified)) {
            if unverified > 0 {
                warn!(self.log, "hub records in etcd not signed with the cluster key (ignored)"; "records" => unverified);
            }
            self.hubs = Some((hubs.clone(), unverified));
            self.tell(ClusterEvent::Hubs { hubs, unverified });
        }
        let master = self.etcd.leader(&election)?.map(|v| String::from_utf8_lossy(&v).into_owned());
        // etcd names someone else (our lease ended there before we noticed): step down
        if self.leader.is_some() && master.as_deref() != Some(self.spec.name.as_str()) {
            self.step_down();
        }
        self.report_master(master);
        let mut assigned = BTreeMap::new();
        for kv in self.etcd.range_prefix(&names_prefix)? {
            let name = kv.key.strip_prefix(&names_prefix).unwrap_or_default().to_string();
            if let Some(a) = std::str::from_utf8(&kv.value).ok().and_then(|s| s.parse().ok()) {
                assigned.insert(name, a);
            }
        }
        self.report_assignments(assigned);
        Ok(())
    }

    fn report_master(&mut self, master: Option<String>) {
        let me = self.leader.is_some();
        let now = (if me { Some(self.spec.name.clone()) } else { master }, me);
        if self.master.as_ref() != Some(&now) {
            self.master = Some(now.clone());
            self.tell(ClusterEvent::Master { master: now.0, me: now.1 });
        }
    }

    fn report_assignments(&mut self, all: BTreeMap<String, Ipv4Addr>) {
        if self.assignments.as_ref() != Some(&all) {
            self.assignments = Some(all.clone());
            self.tell(ClusterEvent::Assignments(all));
        }
    }

    fn set_store(&mut self, up: bool) {
        if self.store != Some(up) {
            if up {
                info!(self.log, "etcd answers"; "members" => self.spec.etcd.endpoints.join(","));
            } else {
                warn!(self.log, "etcd does not answer: known peers keep their addresses, new names are refused";
                    "members" => self.spec.etcd.endpoints.join(","));
            }
            self.store = Some(up);
            self.tell(ClusterEvent::Store(up));
        }
    }

    fn check_master(&mut self) {
        let lapsed = self.lease.as_ref().is_none_or(|l| now() >= l.valid_until);
        if lapsed {
            self.step_down();
        }
    }

    /// `name`'s address: the one the store has for it, or a free one taken in a
    /// transaction (`want` if it is free).
    fn assign(&mut self, name: String, want: Ipv4Addr) {
        match self.take_address(&name, want) {
            Ok(a) => {
                info!(self.log, "address for a new name"; "name" => &name, "address" => %a);
                let mut all = self.assignments.clone().unwrap_or_default();
                all.insert(name, a);
                self.report_assignments(all);
            }
            Err(why) => {
                if matches!(why, EtcdError::Unreachable(_)) {
                    self.set_store(false);
                }
                warn!(self.log, "no address for a new name"; "name" => &name, "why" => %why);
                self.tell(ClusterEvent::AssignFailed { name, why: why.to_string() });
            }
        }
    }

    fn take_address(&mut self, name: &str, want: Ipv4Addr) -> Result<Ipv4Addr, EtcdError> {
        let p = self.spec.prefix.clone();
        let net = self.spec.network;
        let name_key = format!("{p}names/{name}");
        for _ in 0..ASSIGN_ATTEMPTS {
            let taken: BTreeSet<Ipv4Addr> = self
                .etcd
                .range_prefix(&format!("{p}addrs/"))?
                .iter()
                .filter_map(|kv| kv.key.rsplit('/').next().and_then(|a| a.parse().ok()))
                .collect();
            let free = |a: Ipv4Addr| net.is_host(a) && !taken.contains(&a) && !self.spec.reserved.contains(&a);
            let candidate = if free(want) {
                Some(want)
            } else {
                (1..net.size().min(1 << 20) as u32).filter_map(|n| net.nth(n)).find(|&a| free(a))
            };
            let Some(a) = candidate else {
                return Err(EtcdError::Server(format!("no free address left in {net}")));
            };
            let addr_key = format!("{p}addrs/{a}");
            match self.etcd.create_both((&name_key, a.to_string().as_bytes()), (&addr_key, name.as_bytes()))? {
                None => return Ok(a),
                Some(Some(held)) => {
                    // another hub gave this name one first: that one it is
                    if let Some(a) = std::str::from_utf8(&held).ok().and_then(|s| s.parse().ok()) {
                        return Ok(a);
                    }
                    return Err(EtcdError::Server(format!("{name_key} holds no address")));
                }
                Some(None) => {} // the address went to another name meanwhile: next one
            }
        }
        Err(EtcdError::Server("addresses taken faster than this hub could choose".into()))
    }

    fn run_on_master(&self, what: &str) {
        let Some(path) = &self.spec.on_master else { return };
        let mut cmd = std::process::Command::new(path);
        cmd.arg(what).env("MPVPN_HUB", &self.spec.name).stdin(std::process::Stdio::null());
        match cmd.spawn() {
            Ok(mut child) => {
                info!(self.log, "on_master"; "run" => %path.display(), "arg" => what);
                // reaped beside, so a slow hook never holds the cluster thread
                let _ = std::thread::Builder::new().name("on-master".into()).spawn(move || child.wait());
            }
            Err(e) => error!(self.log, "on_master could not run"; "path" => %path.display(), "error" => %e),
        }
    }

    /// Stops: resigns (if master) and revokes the lease, so the others see this hub go
    /// now rather than a TTL later.
    fn leave(&mut self) {
        self.campaign_lease.store(0, Ordering::SeqCst);
        if let Some(leader) = self.leader.clone() {
            let _ = self.etcd.resign(&leader);
        }
        self.step_down();
        if let Some(l) = self.lease.take() {
            let _ = self.etcd.revoke(l.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> HubRecord {
        HubRecord {
            name: "h1".into(),
            tunnel: vec!["10.0.1.1:4000".parse().unwrap()],
            rendezvous: None,
            forward: Some("10.0.1.1:5300".parse().unwrap()),
            digest: "abc".into(),
        }
    }

    #[test]
    fn records_verify_only_under_the_cluster_key_and_their_own_name() {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &[7; 32]);
        let other = hmac::Key::new(hmac::HMAC_SHA256, &[8; 32]);
        let signed = sign(&key, &record());
        assert_eq!(verify(&key, "h1", &signed), Some(record()));
        assert_eq!(verify(&other, "h1", &signed), None);
        assert_eq!(verify(&key, "h2", &signed), None, "a record moved under another hub's key");
        let mut forged = serde_json::from_slice::<SignedRecord>(&signed).unwrap();
        forged.body = forged.body.replace("10.0.1.1", "10.6.6.6");
        assert_eq!(verify(&key, "h1", &serde_json::to_vec(&forged).unwrap()), None);
        assert_eq!(verify(&key, "h1", b"\\xff not json"), None);
    }

    #[test]
    fn each_network_has_its_own_keys() {
        assert_eq!(key_prefix("10.99.0.0/24".parse().unwrap()), "/mpvpn/10.99.0.0_24/");
    }
}
