//! The driver skeleton every daemon shares: the event loop (`event_loop`), batched UDP
//! sockets (`batch`), the control socket (`control`), key and config files (`files`),
//! logging setup (`log`), and the CLI pieces every daemon has. Nothing in the sans-IO
//! cores uses this module; it exists only with the `driver` feature.

pub mod address_watch;
pub mod batch;
pub mod control;
pub mod event_loop;
pub mod files;
pub mod log;
pub mod metrics;

use crate::config::ConfigError;
use crate::crypto::Psk;
use crate::entropy::OsEntropy;
use files::KeyError;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

/// What can stop a daemon from starting or running, or a CLI command from finishing.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// A system call failed; `what` names what it was for.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("cannot resolve `{host_port}`: {reason}")]
    Resolve { host_port: String, reason: String },
    #[error(
        "no key given: pass --key-file FILE (or key_file: in the YAML config). \
         Make one with `{program} genkey /etc/mptunnel/tunnel.key` and copy that file to both ends"
    )]
    NoKey { program: String },
    #[error(
        "control socket {} is in use by another running instance; pass --control PATH \
         (or control_socket: in the config)", .0.display()
    )]
    ControlInUse(PathBuf),
    #[error("control socket directory {}: {why}; choose another with --control PATH", .dir.display())]
    ControlDirUnsafe { dir: PathBuf, why: String },
    #[error(
        "control socket {} exists and is not a socket (a mistyped control_socket:?); \
         not touching it: choose another with --control PATH", .0.display()
    )]
    ControlPathNotSocket(PathBuf),
    #[error("cannot reach the daemon's control socket {}: {source} (is it running? pass --control PATH)", .path.display())]
    ControlUnreachable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no {program} is running (no control socket of one in {}); pass NAME or --control PATH", .dir.display())]
    NoInstance { program: String, dir: PathBuf },
    #[error("bad status from the daemon: {0}")]
    BadStatus(#[source] serde_json::Error),
}

/// Adds what an I/O call was for to its error.
pub trait IoContext<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, DriverError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, DriverError> {
        self.map_err(|source| DriverError::Io { what: what(), source })
    }
}

/// Writes `text` to stdout. A closed pipe (`status | head -3`) is not an error: the
/// reader has what it wanted, so the command ends quietly, as every Unix tool does.
pub fn print_stdout(text: &str) -> Result<(), DriverError> {
    write_stdout(text).map(|_| ())
}

/// `print_stdout` that tells whether the reader is still there (false: the pipe closed).
pub fn write_stdout(text: &str) -> Result<bool, DriverError> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(DriverError::Io { what: "stdout".into(), source: e }),
    }
}

/// Kernel socket buffer we ask for: bursts of full-size datagrams on every path must not
/// overflow while the loop is busy elsewhere.
pub const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// Errors on a UDP socket that are about one datagram or one peer (ICMP errors surface
/// on connected sockets when a relay or target is down), not about the socket itself.
pub fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(e.kind(), ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset)
        || matches!(e.raw_os_error(), Some(libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EPERM | libc::ENOBUFS))
}

/// A non-blocking UDP socket bound to `bind`, optionally pinned to an interface
/// (SO_BINDTODEVICE) and connected to `connect` (so the kernel filters other sources).
pub fn udp_socket(
    bind: SocketAddr,
    device: Option<&str>,
    connect: Option<SocketAddr>,
) -> std::io::Result<batch::BatchSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: the kernel clamps to its maximum, which is fine.
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    if let Some(dev) = device {
        sock.bind_device(Some(dev.as_bytes()))
            .map_err(|e| std::io::Error::new(e.kind(), format!("binding to interface {dev}: {e}")))?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&bind.into())?;
    if let Some(to) = connect {
        sock.connect(&to.into())?;
    }
    Ok(batch::BatchSocket::new(mio::net::UdpSocket::from_std(sock.into())))
}

/// A log line that may repeat per packet (a refused handshake, a failed socket) written
/// at most once per `every`, with how many were left out since.
pub struct RateLimitedLog {
    every: std::time::Duration,
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    pub const fn new(every: std::time::Duration) -> Self {
        Self { every, last: None, suppressed: 0 }
    }

    /// `Some(left out since the last line)` when a line may be written now.
    pub fn allow(&mut self, now: std::time::Instant) -> Option<u64> {
        if self.last.is_some_and(|t| now.saturating_duration_since(t) < self.every) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// The wall clock, ms since the Unix epoch (what the cores stamp into handshakes).
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Raises the soft limit on open files towards `want` (at most to the hard limit); returns
/// the soft limit now in effect.
pub fn raise_open_files_limit(want: usize) -> std::io::Result<usize> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid rlimit for the kernel to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let want = want as libc::rlim_t;
    if lim.rlim_cur < want {
        let raised = libc::rlimit { rlim_cur: want.min(lim.rlim_max), rlim_max: lim.rlim_max };
        // SAFETY: as above; raising the soft limit up to the hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        }
    }
    Ok(usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX))
}

/// One socket per slot (a relay flow, a server session), each connected to its
/// destination and registered readable as `token_base + slot`.
pub struct SlotSockets {
    socks: Vec<Option<batch::BatchSocket>>,
    token_base: usize,
}

impl SlotSockets {
    pub fn new(token_base: usize) -> Self {
        Self { socks: Vec::new(), token_base }
    }

    /// Opens slot `slot`'s socket to `to` (closing one it had).
    pub fn open(&mut self, registry: &mio::Registry, slot: usize, to: SocketAddr) -> std::io::Result<()> {
        self.close(registry, slot);
        let mut s = udp_socket(any_addr_for(to), None, Some(to))?;
        registry.register(&mut s, mio::Token(self.token_base + slot), mio::Interest::READABLE)?;
        if self.socks.len() <= slot {
            self.socks.resize_with(slot + 1, || None);
        }
        self.socks[slot] = Some(s);
        Ok(())
    }

    pub fn close(&mut self, registry: &mio::Registry, slot: usize) {
        if let Some(mut s) = self.socks.get_mut(slot).and_then(Option::take) {
            let _ = registry.deregister(&mut s);
        }
    }

    pub fn get(&self, slot: usize) -> Option<&batch::BatchSocket> {
        self.socks.get(slot).and_then(Option::as_ref)
    }

    /// The slot a token belongs to.
    pub fn slot_of(&self, token: mio::Token) -> Option<usize> {
        token.0.checked_sub(self.token_base)
    }
}

/// The unspecified address of `peer`'s family, port 0: where to bind a socket that
/// talks to `peer`.
pub fn any_addr_for(peer: SocketAddr) -> SocketAddr {
    match peer {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    }
}

/// The interface that holds the local address `ip`, if one does.
pub fn interface_of(ip: IpAddr) -> Option<String> {
    if_addrs::get_if_addrs().ok()?.into_iter().find(|i| i.ip() == ip).map(|i| i.name)
}

/// Where a socket bound to `bind` (an address of `interface`) should be bound now: `bind`
/// while the host has that address, else the interface's current address of the same
/// family (not link-local), same port: a `bind:` path follows its interface when the
/// host is renumbered. `bind` when there is none (the bind then fails and is retried).
pub fn follow_interface(bind: SocketAddr, interface: &str) -> SocketAddr {
    let Ok(all) = if_addrs::get_if_addrs() else { return bind };
    if all.iter().any(|i| i.ip() == bind.ip()) {
        return bind;
    }
    all.iter()
        .filter(|i| i.name == interface && i.ip().is_ipv4() == bind.is_ipv4() && !i.is_link_local())
        .map(|i| SocketAddr::new(i.ip(), bind.port()))
        .next()
        .unwrap_or(bind)
}

/// Resolves `host:port` (first address), with an error naming what failed.
pub fn resolve(host_port: &str) -> Result<SocketAddr, DriverError> {
    use std::net::ToSocketAddrs;
    let err = |reason: String| DriverError::Resolve { host_port: host_port.into(), reason };
    host_port.to_socket_addrs().map_err(|e| err(e.to_string()))?.next().ok_or_else(|| err("no address".into()))
}

/// `genkey [FILE]`: prints a new key, or writes it to a new owner-only file.
pub fn genkey(path: Option<&Path>) -> Result<(), DriverError> {
    let key = Psk::generate(&mut OsEntropy::new());
    match path {
        None => print_stdout(&format!("{}\n", key.to_base64()))?,
        Some(p) => {
            files::write_new_key(&key, p).context(|| format!("writing key file {}", p.display()))?;
            eprintln!("wrote a new key to {} (mode 600); copy it to the other end", p.display());
        }
    }
    Ok(())
}

/// Loads the key or explains how to make one; encryption is never silently off.
pub fn require_key(program: &str, path: Option<&Path>) -> Result<files::LoadedKey, DriverError> {
    let path = path.ok_or_else(|| DriverError::NoKey { program: program.into() })?;
    Ok(files::load_key(path)?)
}

/// The flags every tunnel daemon (mpclient, mpserver) takes besides its own.
#[derive(clap::Args)]
pub struct DaemonArgs {
    /// The shared key (make one with `genkey FILE`) [default: the config's key_file].
    #[arg(long, env = "MPT_KEY_FILE", value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// Control socket for `status` [default: the config's control_socket, else
    /// /run/mptunnel/<program>-<config file name>.sock].
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// error, warn, info, debug or trace [default: info, or the config's].
    #[arg(long)]
    pub log_level: Option<String>,
}

impl DaemonArgs {
    /// Loads the key (`--key-file`, else the config's `key_file`) and runs the daemon
    /// with `run_daemon` at `--log-level`, else the config's; never returns.
    pub fn run<E: std::fmt::Display>(
        self,
        program: &'static str,
        config_key_file: Option<PathBuf>,
        config_log_level: String,
        run: impl FnOnce(&slog::Logger, Psk) -> Result<(), E>,
    ) -> ! {
        let key_file = self.key_file.or(config_key_file);
        let key =
            require_key(program, key_file.as_deref()).unwrap_or_else(|e| exit_with_error(program, &e.to_string()));
        run_daemon(program, &self.log_level.unwrap_or(config_log_level), |log| {
            if let Some(w) = &key.warning {
                slog::warn!(log, "{}", w);
            }
            run(log, key.key)
        })
    }
}

/// The subcommands every daemon has.
#[derive(clap::Subcommand)]
pub enum DaemonCommand {
    /// Print a new random key, or write it to FILE (mode 600).
    Genkey { file: Option<std::path::PathBuf> },
    /// Show sessions and paths of a running daemon: the instance NAME (started with
    /// `-c .../NAME.yaml`), else the only one running, else the list of them.
    Status(control::StatusRequest),
}

impl DaemonCommand {
    /// Runs the subcommand for `program`, then exits (non-zero with a one-line error).
    pub fn run(self, program: &str) -> ! {
        let result = match self {
            Self::Genkey { file } => genkey(file.as_deref()),
            Self::Status(req) => control::run_status(program, &req, crate::stats::StatusReport::to_table),
        };
        match result {
            Ok(()) => std::process::exit(0),
            Err(e) => exit_with_error(program, &e.to_string()),
        }
    }
}

/// Runs a daemon's `main`: logging at `level` (validated: a bad level is a one-line error),
/// then `run`. Exits 0 after a clean stop (SIGTERM/SIGINT); a fatal error is logged and
/// printed as one line, and the exit status is 1.
pub fn run_daemon<E: std::fmt::Display>(
    program: &'static str,
    level: &str,
    run: impl FnOnce(&slog::Logger) -> Result<(), E>,
) -> ! {
    if !crate::config::validate_log_level(level) {
        exit_with_error(program, &format!("log level `{level}` is not one of error, warn, info, debug, trace"));
    }
    let (log, guard) = log::init(level, program);
    let result = run(&log);
    if let Err(e) = &result {
        slog::crit!(log, "{}", e);
    }
    // flush the log before the process ends
    drop(log);
    drop(guard);
    match result {
        Ok(()) => std::process::exit(0),
        Err(e) => exit_with_error(program, &e.to_string()),
    }
}

/// Sends SIGHUP (re-read the configuration) to process `pid`.
pub fn send_sighup(pid: u32) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: kill has no memory preconditions; a bad pid is an error return.
    if pid > 0 && unsafe { libc::kill(pid, libc::SIGHUP) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Prints `program: error: message` and exits non-zero.
pub fn exit_with_error(program: &str, message: &str) -> ! {
    eprintln!("{program}: error: {message}");
    std::process::exit(1)
}
