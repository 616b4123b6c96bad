//! The namespace and process lab: uniquely named namespaces (prefix + pid), veth links,
//! nftables loss rules, and processes inside them. Dropping a `Lab` (also on panic)
//! kills every process it started, by PID, and deletes every namespace it created.
//! Traffic goes only to addresses inside those namespaces.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Runs a command and returns stdout; panics with stderr on failure.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Root and the tools? Otherwise the namespace tests cannot run here.
pub fn lab_available() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("needs root (ip netns)".into());
    }
    for tool in ["ip", "nft", "socat", "ping"] {
        let found =
            Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().is_ok_and(|o| o.status.success());
        if !found {
            return Err(format!("needs `{tool}` (installed by .ci/run)"));
        }
    }
    Ok(())
}

static LAB_SERIAL: Mutex<()> = Mutex::new(());

/// For namespace tests: skips (with a message) where namespaces cannot be made, which in
/// CI is an error; otherwise holds a lock so the tests of one binary run one at a time
/// (they share two cores and measure loss and latency).
pub fn lab_or_skip() -> Option<std::sync::MutexGuard<'static, ()>> {
    if let Err(why) = lab_available() {
        assert!(std::env::var_os("CI").is_none(), "namespace tests cannot run in CI: {why}");
        eprintln!("skipped: {why}");
        return None;
    }
    Some(LAB_SERIAL.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Where cargo put the workspace's binaries (next to this test's `deps/`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") || dir.ends_with("examples") {
        dir.pop();
    }
    let p = dir.join(name);
    assert!(p.exists(), "{} not built; run `cargo build --workspace` (cargo test builds it too)", p.display());
    p
}

/// A process started in a namespace, and its log file.
pub struct Proc {
    pub child: Child,
    pub name: String,
    pub log: PathBuf,
}

pub struct Lab {
    prefix: String,
    pub dir: PathBuf,
    namespaces: Vec<String>,
    procs: Vec<Proc>,
    /// Both ends, (namespace, interface), of every veth link.
    links: Vec<[(String, String); 2]>,
}

static LAB_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Lab {
    /// `tag` keeps labs of one test run apart; the pid keeps runs apart.
    pub fn new(tag: &str) -> Self {
        let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("mpt{}{}{}", std::process::id(), tag, n);
        let dir = std::env::temp_dir().join(format!("{prefix}-lab"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("lab dir");
        Self { prefix, dir, namespaces: Vec::new(), procs: Vec::new(), links: Vec::new() }
    }

    /// Creates a namespace with loopback up; returns its full name.
    pub fn add_ns(&mut self, role: &str) -> String {
        let ns = format!("{}-{role}", self.prefix);
        run(Command::new("ip").args(["netns", "add", &ns]));
        self.namespaces.push(ns.clone());
        run(Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]));
        ns
    }

    /// Gives `ns` its own /etc/hosts (`ip netns exec` bind-mounts /etc/netns/<ns>/hosts
    /// over it), so what a daemon there writes stays in the lab; removed with the lab.
    pub fn private_hosts(&mut self, ns: &str) -> PathBuf {
        let dir = PathBuf::from(format!("/etc/netns/{ns}"));
        std::fs::create_dir_all(&dir).expect("/etc/netns/<ns>");
        let hosts = dir.join("hosts");
        std::fs::write(&hosts, "127.0.0.1 localhost\n::1 localhost\n").expect("hosts");
        hosts
    }

    /// A veth pair `a_if` in `a` (address `a_ip`/24) to `b_if` in `b` (`b_ip`/24), both up.
    /// Like a real wire, it carries one MTU-sized packet per frame: no GSO super-packets,
    /// so loss hits TCP segments one at a time, as on a lossy Internet path.
    pub fn link(&mut self, a: &str, a_if: &str, a_ip: &str, b: &str, b_if: &str, b_ip: &str) {
        run(Command::new("ip").args(["-n", a, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b]));
        for (ns, ifname, ip) in [(a, a_if, a_ip), (b, b_if, b_ip)] {
            run(Command::new("ip").args(["-n", ns, "addr", "add", &format!("{ip}/24"), "dev", ifname]));
            run(Command::new("ip").args(["-n", ns, "link", "set", ifname, "gso_max_segs", "1", "up"]));
        }
        self.links.push([(a.into(), a_if.into()), (b.into(), b_if.into())]);
    }

    /// Random loss on the link whose end `ifname` is in `ns`: `out_pct` of the packets
    /// leaving through it and `in_pct` of those arriving (100 = all). Each direction is
    /// dropped at the receiving end's ingress, so senders see no error, as on a real lossy
    /// wire (a drop in the sender's output hook fails its sendmsg with EPERM, which some
    /// programs, kcptun for one, treat as fatal).
    pub fn link_loss(&self, ns: &str, ifname: &str, out_pct: u32, in_pct: u32) {
        let [near, far] = self
            .links
            .iter()
            .find_map(|[x, y]| {
                if (x.0.as_str(), x.1.as_str()) == (ns, ifname) {
                    Some([x, y])
                } else if (y.0.as_str(), y.1.as_str()) == (ns, ifname) {
                    Some([y, x])
                } else {
                    None
                }
            })
            .unwrap_or_else(|| panic!("no lab link {ifname} in {ns}"));
        self.ingress_loss(&far.0, &far.1, out_pct);
        self.ingress_loss(&near.0, &near.1, in_pct);
    }

    /// Drops `pct` percent of the IP packets arriving on `ifname` (netdev ingress hook,
    /// one table per interface, replaced on each call).
    fn ingress_loss(&self, ns: &str, ifname: &str, pct: u32) {
        let table: String = ifname.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
        let reset = format!("table netdev loss_{table}\ndelete table netdev loss_{table}\n");
        // IP only: ARP stays reliable (the lossy part of a real path lies beyond the first
        // hop; lost ARP would stall a path for seconds, which is not what is measured)
        let rule = match pct {
            0 => return self.nft(ns, &reset),
            100.. => "meta protocol { ip, ip6 } drop".to_string(),
            p => format!("meta protocol {{ ip, ip6 }} numgen random mod 100 < {p} drop"),
        };
        self.nft(
            ns,
            &format!(
                "{reset}table netdev loss_{table} {{\n  chain ingress {{\n    type filter hook ingress device \"{ifname}\" priority 0; policy accept;\n    {rule}\n  }}\n}}\n"
            ),
        );
    }

    /// Runs a shell command in `ns` and returns stdout.
    pub fn sh(&self, ns: &str, script: &str) -> String {
        run(Command::new("ip").args(["netns", "exec", ns, "sh", "-c", script]))
    }

    /// Loads an nftables ruleset into `ns` (replacing the lab table).
    pub fn nft(&self, ns: &str, ruleset: &str) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nft");
        child.stdin.take().expect("stdin").write_all(ruleset.as_bytes()).expect("write ruleset");
        let out = child.wait_with_output().expect("nft");
        assert!(out.status.success(), "nft: {}\n{ruleset}", String::from_utf8_lossy(&out.stderr));
    }

    /// Starts `program args` inside `ns` with its stderr/stdout in a log file. Returns an
    /// index for `kill9`.
    pub fn spawn(&mut self, ns: &str, name: &str, program: &Path, args: &[&str]) -> usize {
        let log = self.dir.join(format!("{name}.log"));
        let f = File::options().create(true).append(true).open(&log).expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("log fd"))
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        self.procs.push(Proc { child, name: name.into(), log });
        self.procs.len() - 1
    }

    /// `kill -9` a process this lab started and its descendants (socat's per-flow
    /// children would otherwise outlive it until their idle timeout), and reap it.
    pub fn kill9(&mut self, idx: usize) {
        kill9_tree(&mut self.procs[idx].child);
    }

    /// Sends `signal` to a process this lab started and waits (at most 10 s) for its exit.
    pub fn stop(&mut self, idx: usize, signal: libc::c_int) -> std::process::ExitStatus {
        let child = &mut self.procs[idx].child;
        // SAFETY: kill has no memory preconditions; the PID is our own child's (`ip netns
        // exec` execs the program in place).
        unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < until, "{} still running 10 s after signal {signal}", self.procs[idx].name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The PID of a process this lab started.
    pub fn pid(&self, idx: usize) -> u32 {
        self.procs[idx].child.id()
    }

    /// Still running?
    pub fn alive(&mut self, idx: usize) -> bool {
        matches!(self.procs[idx].child.try_wait(), Ok(None))
    }

    pub fn log_of(&self, idx: usize) -> String {
        std::fs::read_to_string(&self.procs[idx].log).unwrap_or_default()
    }

    fn dump_logs(&self) {
        for p in &self.procs {
            let text = std::fs::read_to_string(&p.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            eprintln!("----- {} (last {} lines) -----", p.name, tail.len());
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// `pid` and all its descendants, parents first, from /proc.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(|p| {
                    let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
                    let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
                    Some((p, ppid))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut tree = vec![pid];
    let mut k = 0;
    while k < tree.len() {
        let p = tree[k];
        tree.extend(parents.iter().filter(|&&(_, ppid)| ppid == p).map(|&(q, _)| q));
        k += 1;
    }
    tree
}

/// SIGKILL to a child this process started and to its descendants (by PID), then reaps it.
fn kill9_tree(child: &mut Child) {
    let descendants = match child.try_wait() {
        Ok(None) => process_tree(child.id()).split_off(1),
        _ => Vec::new(),
    };
    // the parent first, so it cannot fork again; its orphans keep their PIDs
    let _ = child.kill();
    for pid in descendants {
        // SAFETY: kill has no memory preconditions; these PIDs descend from our child.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    let _ = child.wait();
}

/// Set when a lab is torn down by a panic that is no failure (the demo's reader went
/// away, or Ctrl-C): the processes' logs are not printed then.
pub static QUIET_TEARDOWN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() && !QUIET_TEARDOWN.load(std::sync::atomic::Ordering::SeqCst) {
            self.dump_logs();
        }
        for p in &mut self.procs {
            kill9_tree(&mut p.child);
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
            // names are unique to this run: a /etc/netns/<ns> is this lab's own
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{ns}"));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `f` on a new thread that has entered network namespace `ns`, so sockets it
/// creates live there.
pub fn spawn_in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: a valid namespace fd; CLONE_NEWNET switches only this thread.
        let r = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}
