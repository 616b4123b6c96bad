//! The local control socket behind `status` commands.
//!
//! The daemon listens on a Unix stream socket; each connection gets one JSON status
//! report and is closed. Only local users that can open the socket file (root by default:
//! it lives in /run/mptunnel) can connect.
//!
//! Served inside the event loop without ever blocking it: the report is written
//! non-blocking from a per-connection buffer (at most `CONTROL_OUTPUT_MAX` bytes) as the
//! socket takes it; a reader slower than `CONTROL_WRITE_TIMEOUT`, or one beyond
//! `MAX_CONTROL_CONNECTIONS`, is dropped. A local client that connects and never reads
//! costs one slot for two seconds, never forwarding time.

use super::event_loop::{CONTROL_CONNECTION_BASE, CONTROL_LISTENER};
use super::{DriverError, IoContext};
use mio::net::{UnixListener, UnixStream};
use mio::{Interest, Registry, Token};
use slog::{debug, warn, Logger};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a status reader may take to read its report.
pub const CONTROL_WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Status connections served at once; more are closed at once.
pub const MAX_CONTROL_CONNECTIONS: usize = 16;
/// The largest report one connection buffers.
pub const CONTROL_OUTPUT_MAX: usize = 8 << 20;
/// How long `status` waits for the daemon's report.
const CONTROL_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Where default control sockets live: the directory systemd made for the service
/// (`RuntimeDirectory=mptunnel`, so `$RUNTIME_DIRECTORY` is `/run/mptunnel`), else
/// `/run/mptunnel` for root, else `/tmp/mptunnel-<uid>`.
pub fn control_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("RUNTIME_DIRECTORY").filter(|d| !d.is_empty()) {
        // several directories are separated by ':'; ours is the first
        let first = dir.to_string_lossy().split(':').next().unwrap_or_default().to_string();
        return PathBuf::from(first);
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        PathBuf::from("/run/mptunnel")
    } else {
        PathBuf::from(format!("/tmp/mptunnel-{uid}"))
    }
}

/// `<control_dir>/<program>.sock`: the default of a daemon started without a config file.
pub fn default_control_path(program: &str) -> PathBuf {
    instance_control_path(program, None)
}

/// `<control_dir>/<program>-<instance>.sock`, or `<program>.sock` without an instance.
pub fn instance_control_path(program: &str, instance: Option<&str>) -> PathBuf {
    match instance {
        Some(i) => control_dir().join(format!("{program}-{i}.sock")),
        None => control_dir().join(format!("{program}.sock")),
    }
}

/// The default control socket of `program` configured by `config`:
/// `<control_dir>/<program>-<instance>.sock`, the instance being the file's name without
/// its extension (`/etc/mptunnel/office.yaml` is `office`), so that several daemons of one
/// program run side by side with nothing more than their config files.
pub fn config_control_path(program: &str, config: &Path) -> PathBuf {
    instance_control_path(program, instance_of(config).as_deref())
}

fn instance_of(config: &Path) -> Option<String> {
    let stem = config.file_stem()?.to_str()?;
    (!stem.is_empty() && stem.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c)))
        .then(|| stem.to_string())
}

/// The running instances of `program` in `control_dir()`: every socket there named after
/// it that a daemon answers on, by instance name ("" for the one without an instance).
pub fn running_instances(program: &str) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(control_dir()) else { return Vec::new() };
    let mut out: Vec<(String, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let stem = name.strip_suffix(".sock")?;
            let instance = if stem == program { "" } else { stem.strip_prefix(program)?.strip_prefix('-')? };
            Some((instance.to_string(), e.path()))
        })
        .filter(|(_, path)| std::os::unix::net::UnixStream::connect(path).is_ok())
        .collect();
    out.sort();
    out
}

/// The control socket a command means: `control`, else the named instance's, else the
/// only running instance's (or the default one when none runs); `Err` with the list
/// when several run and none was named.
pub fn which_instance(
    program: &str,
    instance: Option<&str>,
    control: Option<&Path>,
) -> Result<PathBuf, Vec<(String, PathBuf)>> {
    match (control, instance) {
        (Some(p), _) => Ok(p.to_owned()),
        (None, Some(name)) => Ok(instance_control_path(program, Some(name))),
        (None, None) => {
            let mut running = running_instances(program);
            match running.len() {
                0 => Ok(default_control_path(program)),
                1 => Ok(running.remove(0).1),
                _ => Err(running),
            }
        }
    }
}

/// What `status` asks for: its command-line arguments, the same for every program.
#[derive(clap::Args)]
pub struct StatusRequest {
    /// The instance: its config file's name without `.yaml`.
    #[arg(value_name = "NAME")]
    pub instance: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Redraw every second (plain output, appended, when not on a terminal).
    #[arg(long)]
    pub watch: bool,
    /// The daemon's control socket [default: /run/mptunnel/<program>-NAME.sock]; wins
    /// over NAME.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
}

/// How often `status --watch` redraws.
pub const STATUS_WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// The `status` subcommand of `program`: the named instance, the only running one, or
/// (when several run) the list of them; as a table (`to_table`) or JSON, once or, with
/// `watch`, every second: redrawn in place on a terminal, appended otherwise.
pub fn run_status<T: serde::de::DeserializeOwned + serde::Serialize>(
    program: &str,
    req: &StatusRequest,
    to_table: impl Fn(&T) -> String,
) -> Result<(), DriverError> {
    use std::io::IsTerminal;
    let path = match which_instance(program, req.instance.as_deref(), req.control.as_deref()) {
        Ok(path) => path,
        Err(several) => return print_instances(program, &several, req.json),
    };
    if req.instance.is_none() && req.control.is_none() && !path.exists() {
        return Err(DriverError::NoInstance { program: program.into(), dir: control_dir() });
    }
    let terminal = std::io::stdout().is_terminal();
    loop {
        let report: T = fetch(&path)?;
        let mut text = if req.json {
            serde_json::to_string_pretty(&report).map_err(DriverError::BadStatus)? + "\n"
        } else {
            to_table(&report)
        };
        if !req.watch {
            return super::print_stdout(&text);
        }
        if terminal {
            // home and clear, as `watch` does
            text.insert_str(0, "\x1b[H\x1b[2J");
        } else {
            text.push('\n');
        }
        if !super::write_stdout(&text)? {
            return Ok(()); // the reader went away (`| head`)
        }
        std::thread::sleep(STATUS_WATCH_INTERVAL);
    }
}

fn print_instances(program: &str, instances: &[(String, PathBuf)], json: bool) -> Result<(), DriverError> {
    let label = |i: &str| if i.is_empty() { "(default)".to_string() } else { i.to_string() };
    if json {
        let list: Vec<serde_json::Value> = instances
            .iter()
            .map(|(i, p)| serde_json::json!({ "instance": i, "control": p.display().to_string() }))
            .collect();
        let v = serde_json::json!({ "instances": list });
        return super::print_stdout(&(serde_json::to_string_pretty(&v).map_err(DriverError::BadStatus)? + "\n"));
    }
    let mut s = format!("{} {program} instances are running; `{program} status NAME` shows one:\n", instances.len());
    for (i, p) in instances {
        s.push_str(&format!("  {:<16} {}\n", label(i), p.display()));
    }
    super::print_stdout(&s)
}

/// Why a directory must not hold our control socket: someone else could replace or
/// intercept it there.
fn unsafe_directory(dir: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    // whoever owns a link can point it elsewhere later
    if std::fs::symlink_metadata(dir).ok()?.file_type().is_symlink() {
        return Some("it is a symbolic link; name the directory itself".into());
    }
    let meta = std::fs::metadata(dir).ok()?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let (owner, mode) = (meta.uid(), meta.mode());
    if owner != me && owner != 0 {
        return Some(format!("it belongs to uid {owner}, not to this user ({me}) or root"));
    }
    // writable by others without the sticky bit (as /tmp has): they could swap the socket
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Some(format!("others may write to it (mode {:o})", mode & 0o7777));
    }
    None
}

/// Prepares `path` for binding: creates its directory private (0700) if missing, refuses
/// a directory others control (or a symbolic link to one), and removes a stale socket
/// file. Fails if another live process is listening there, or if something other than a
/// socket is there (never deleted: a mistyped path could name a config).
fn prepare_control_path(path: &Path) -> Result<(), DriverError> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .context(|| format!("control socket directory {}", dir.display()))?;
        }
        if let Some(why) = unsafe_directory(dir) {
            return Err(DriverError::ControlDirUnsafe { dir: dir.to_owned(), why });
        }
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(DriverError::ControlPathNotSocket(path.to_owned()));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(DriverError::ControlInUse(path.to_owned()));
        }
        std::fs::remove_file(path).context(|| format!("removing stale control socket {}", path.display()))?;
    }
    Ok(())
}

/// One status reader: its socket and the part of the report it has not taken yet.
struct Connection {
    stream: UnixStream,
    out: Vec<u8>,
    sent: usize,
    deadline: Instant,
    registered: bool,
}

impl Connection {
    /// Writes what the socket takes; true when the report is out or the reader is gone.
    fn write_some(&mut self) -> bool {
        while self.sent < self.out.len() {
            match self.stream.write(&self.out[self.sent..]) {
                Ok(0) => return true,
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return true,
            }
        }
        true
    }
}

/// The listening socket and its connections; removes the socket file when dropped.
pub struct ControlServer {
    path: PathBuf,
    listener: UnixListener,
    connections: Vec<Option<Connection>>,
}

impl ControlServer {
    pub(super) fn bind(path: &Path, registry: &Registry) -> Result<Self, DriverError> {
        prepare_control_path(path)?;
        // the socket is its owner's and its group's only (0660) whatever the process umask:
        // whoever can connect reads every session's addresses and counters (a packaged
        // mpvpn peer is in mpclient's group to ask it where its paths go)
        // SAFETY: umask has no preconditions; it is restored right after the bind.
        let umask = unsafe { libc::umask(0o117) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above.
        unsafe { libc::umask(umask) };
        let mut listener = bound.context(|| format!("control socket {}", path.display()))?;
        registry
            .register(&mut listener, CONTROL_LISTENER, Interest::READABLE)
            .context(|| format!("control socket {}", path.display()))?;
        let connections = (0..MAX_CONTROL_CONNECTIONS).map(|_| None).collect();
        Ok(Self { path: path.to_owned(), listener, connections })
    }

    /// The earliest deadline of a connection still being written.
    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        self.connections.iter().flatten().map(|c| c.deadline).min()
    }

    /// Serves a ready control token: new connections get `report()` (serialized once per
    /// wake-up), writable ones get more of theirs.
    pub(super) fn handle_ready<T: serde::Serialize>(
        &mut self,
        registry: &Registry,
        token: Token,
        report: impl FnOnce() -> T,
        log: &Logger,
    ) {
        if token == CONTROL_LISTENER {
            self.accept_all(registry, report, log);
            return;
        }
        let i = CONTROL_CONNECTION_BASE - token.0;
        if let Some(slot) = self.connections.get_mut(i) {
            if slot.as_mut().is_some_and(Connection::write_some) {
                close(registry, slot);
            }
        }
    }

    fn accept_all<T: serde::Serialize>(&mut self, registry: &Registry, report: impl FnOnce() -> T, log: &Logger) {
        let mut report = Some(report);
        // serialized once, for the first reader of this wake-up
        let mut json: Option<Vec<u8>> = None;
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!(log, "control socket accept failed"; "error" => %e);
                    return;
                }
            };
            let Some(i) = self.connections.iter().position(Option::is_none) else {
                debug!(log, "too many status readers; closing a new one");
                continue;
            };
            let out = json
                .get_or_insert_with(|| {
                    let r = report.take().expect("serialized once")();
                    match serde_json::to_vec(&r) {
                        Ok(v) if v.len() <= CONTROL_OUTPUT_MAX => v,
                        _ => br#"{"error":"status report too large"}"#.to_vec(),
                    }
                })
                .clone();
            let deadline = Instant::now() + CONTROL_WRITE_TIMEOUT;
            let mut c = Connection { stream, out, sent: 0, deadline, registered: false };
            if c.write_some() {
                continue;
            }
            let token = Token(CONTROL_CONNECTION_BASE - i);
            if registry.register(&mut c.stream, token, Interest::WRITABLE).is_ok() {
                c.registered = true;
                self.connections[i] = Some(c);
            }
        }
    }

    /// Drops readers that did not take their report in time.
    pub(super) fn expire(&mut self, registry: &Registry, now: Instant, log: &Logger) {
        for slot in &mut self.connections {
            if slot.as_ref().is_some_and(|c| now >= c.deadline) {
                debug!(log, "slow status reader dropped");
                close(registry, slot);
            }
        }
    }
}

fn close(registry: &Registry, slot: &mut Option<Connection>) {
    if let Some(mut c) = slot.take() {
        if c.registered {
            let _ = registry.deregister(&mut c.stream);
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Fetches the daemon's report.
pub fn fetch<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, DriverError> {
    fetch_with_pid(path).map(|(report, _)| report)
}

/// Fetches the daemon's report, and the process id of whoever answered on `path` as the
/// kernel knows it (`SO_PEERCRED`), not as the report claims: the one to signal.
pub fn fetch_with_pid<T: serde::de::DeserializeOwned>(path: &Path) -> Result<(T, u32), DriverError> {
    let mut s = std::os::unix::net::UnixStream::connect(path)
        .map_err(|source| DriverError::ControlUnreachable { path: path.to_owned(), source })?;
    let pid = peer_pid(&s).context(|| format!("credentials of {}", path.display()))?;
    s.set_read_timeout(Some(CONTROL_READ_TIMEOUT)).context(|| "control socket".into())?;
    let mut body = Vec::new();
    s.read_to_end(&mut body).context(|| "reading status".into())?;
    Ok((serde_json::from_slice(&body).map_err(DriverError::BadStatus)?, pid))
}

/// The process id of the other end of a Unix stream (`SO_PEERCRED`).
fn peer_pid(s: &std::os::unix::net::UnixStream) -> std::io::Result<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given; the fd is open.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    match r {
        0 if cred.pid > 0 => Ok(cred.pid as u32),
        0 => Err(std::io::Error::other("no peer process")),
        _ => Err(std::io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn directories_others_control_are_refused() {
        let base = std::env::temp_dir().join(format!("mpt-ctl-dir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        // created private when missing
        let sock = base.join("new").join("d.sock");
        prepare_control_path(&sock).unwrap();
        let mode = std::fs::metadata(base.join("new")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        // /tmp: world-writable but sticky, owned by root
        assert!(unsafe_directory(&std::env::temp_dir()).is_none());
        let open = base.join("open");
        std::fs::create_dir_all(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(prepare_control_path(&open.join("d.sock")), Err(DriverError::ControlDirUnsafe { .. })));
        // SAFETY: geteuid has no preconditions.
        // a symbolic link to a private directory: refused (its owner could repoint it)
        let private = base.join("new");
        std::os::unix::fs::symlink(&private, base.join("link")).unwrap();
        let e = prepare_control_path(&base.join("link").join("d.sock")).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        if unsafe { libc::geteuid() } == 0 {
            let theirs = base.join("theirs");
            std::fs::create_dir_all(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
            let e = prepare_control_path(&theirs.join("d.sock")).unwrap_err().to_string();
            assert!(e.contains("belongs to uid 65534"), "{e}");
        }
        std::fs::remove_dir_all(&base).unwrap();
    }

    /// Before, a control path naming an existing file (a mistyped `control_socket:`
    /// pointing at the config) was deleted at start. Now only a stale socket is removed.
    #[test]
    fn a_file_at_the_control_path_is_never_deleted() {
        let base = std::env::temp_dir().join(format!("mpt-ctl-file-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o700)).unwrap();
        let config = base.join("hub.yaml");
        std::fs::write(&config, "network: 10.99.0.0/24\n").unwrap();
        let e = prepare_control_path(&config).unwrap_err().to_string();
        assert!(e.contains("is not a socket"), "{e}");
        assert_eq!(std::fs::read_to_string(&config).unwrap(), "network: 10.99.0.0/24\n");
        // a stale socket (nobody listening) is still cleaned up
        let stale = base.join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        prepare_control_path(&stale).unwrap();
        assert!(!stale.exists());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
