//! Helpers shared by the binaries' drivers: sockets, the control socket, keys, exits.
//! Nothing in the sans-IO cores uses this module.

pub mod batch;
pub mod control;

use crate::crypto::Psk;
use std::net::SocketAddr;
use std::path::Path;

/// Kernel socket buffer we ask for: bursts of full-size datagrams on every path must not
/// overflow while the loop is busy elsewhere.
pub const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// The wait step shared by the drivers' mio loops.
///
/// mio is edge-triggered: a source must be read until `WouldBlock`. Drivers cap the
/// datagrams read per source per wake-up so one busy socket cannot starve the others; a
/// source that hit its cap is put back with `still_pending` and the next `wait` does not
/// block, so it is served again right after the others.
pub struct Readiness {
    poll: mio::Poll,
    events: mio::Events,
    ready: std::collections::VecDeque<mio::Token>,
    backlog: Vec<mio::Token>,
}

impl Readiness {
    pub fn new(event_capacity: usize) -> std::io::Result<Self> {
        Ok(Self {
            poll: mio::Poll::new()?,
            events: mio::Events::with_capacity(event_capacity),
            ready: std::collections::VecDeque::new(),
            backlog: Vec::new(),
        })
    }

    pub fn registry(&self) -> &mio::Registry {
        self.poll.registry()
    }

    /// Blocks until a source is ready or `deadline` passes (not at all while a source is
    /// pending); then `next_ready` yields each ready source once.
    pub fn wait(&mut self, deadline: Option<std::time::Instant>) -> std::io::Result<()> {
        let timeout = if self.backlog.is_empty() {
            deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()))
        } else {
            Some(std::time::Duration::ZERO)
        };
        match self.poll.poll(&mut self.events, timeout) {
            Err(e) if e.kind() != std::io::ErrorKind::Interrupted => return Err(e),
            _ => {}
        }
        self.ready.clear();
        self.ready.extend(self.backlog.drain(..));
        for ev in self.events.iter() {
            if !self.ready.contains(&ev.token()) {
                self.ready.push_back(ev.token());
            }
        }
        Ok(())
    }

    pub fn next_ready(&mut self) -> Option<mio::Token> {
        self.ready.pop_front()
    }

    /// `token` stopped at its read budget with data left: serve it again without waiting.
    pub fn still_pending(&mut self, token: mio::Token) {
        self.backlog.push(token);
    }
}

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
) -> std::io::Result<mio::net::UdpSocket> {
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
    Ok(mio::net::UdpSocket::from_std(sock.into()))
}

/// The unspecified address of `peer`'s family, port 0: where to bind a socket that
/// talks to `peer`.
pub fn any_addr_for(peer: SocketAddr) -> SocketAddr {
    match peer {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    }
}

/// Resolves `host:port` (first address), with an error naming what failed.
pub fn resolve(host_port: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    host_port
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve `{host_port}`: {e}"))?
        .next()
        .ok_or_else(|| format!("`{host_port}` resolves to no address"))
}

/// `genkey [FILE]`: prints a new key, or writes it to a new owner-only file.
pub fn genkey(path: Option<&Path>) -> Result<(), String> {
    let key = Psk::generate();
    match path {
        None => println!("{}", key.to_base64()),
        Some(p) => {
            key.write_new(p).map_err(|e| format!("writing key file {}: {e}", p.display()))?;
            eprintln!("wrote a new key to {} (mode 600); copy it to the other end", p.display());
        }
    }
    Ok(())
}

/// Loads the key or explains how to make one; encryption is never silently off.
pub fn require_key(program: &str, path: Option<&Path>) -> Result<(Psk, Option<String>), String> {
    let Some(path) = path else {
        return Err(format!(
            "no key given: pass --key-file FILE (or key_file: in the YAML config). \
             Make one with `{program} genkey /etc/mptunnel/tunnel.key` and copy that file to both ends"
        ));
    };
    Psk::load(path).map_err(|e| e.to_string())
}

/// The subcommands every daemon has.
#[derive(clap::Subcommand)]
pub enum DaemonCommand {
    /// Print a new random key, or write it to FILE (mode 600).
    Genkey { file: Option<std::path::PathBuf> },
    /// Show sessions and paths of the running daemon.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The daemon's control socket [default: /run/mptunnel/<program>.sock].
        #[arg(long, value_name = "PATH")]
        control: Option<std::path::PathBuf>,
    },
}

impl DaemonCommand {
    /// Runs the subcommand for `program`, then exits (non-zero with a one-line error).
    pub fn run(self, program: &str) -> ! {
        let result = match self {
            Self::Genkey { file } => genkey(file.as_deref()),
            Self::Status { json, control: path } => {
                let path = path.unwrap_or_else(|| control::default_control_path(program));
                control::print_status(&path, json)
            }
        };
        match result {
            Ok(()) => std::process::exit(0),
            Err(e) => exit_with_error(program, &e),
        }
    }
}

/// Prints `program: error: message` and exits non-zero.
pub fn exit_with_error(program: &str, message: &str) -> ! {
    eprintln!("{program}: error: {message}");
    std::process::exit(1)
}
