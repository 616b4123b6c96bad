//! The local control socket behind `status` commands (driver helper; the sans-IO cores
//! never use it).
//!
//! The daemon listens on a Unix stream socket; each connection gets one JSON
//! `StatusReport` and is closed. Only local users that can open the socket file
//! (root by default: it lives in /run/mptunnel) can read it.

use crate::stats::StatusReport;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

const CONTROL_IO_TIMEOUT: Duration = Duration::from_secs(2);

/// `/run/mptunnel/<role>.sock` for root, `/tmp/mptunnel-<uid>/<role>.sock` otherwise.
pub fn default_control_path(role: &str) -> PathBuf {
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        PathBuf::from(format!("/run/mptunnel/{role}.sock"))
    } else {
        PathBuf::from(format!("/tmp/mptunnel-{uid}/{role}.sock"))
    }
}

/// Prepares `path` for binding: creates its directory and removes a stale socket file.
/// Fails if another live process is listening there.
pub fn prepare_control_path(path: &Path) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("control socket directory {}: {e}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(format!(
                "control socket {} is in use by another running instance; pass --control PATH",
                path.display()
            ));
        }
        std::fs::remove_file(path).map_err(|e| format!("removing stale control socket {}: {e}", path.display()))?;
    }
    Ok(())
}

/// Writes the report to a freshly accepted control connection (blocking, with timeout).
fn serve_status<T: serde::Serialize>(mut stream: UnixStream, report: &T) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(CONTROL_IO_TIMEOUT));
    if let Ok(json) = serde_json::to_vec(report) {
        let _ = stream.write_all(&json);
    }
}

/// Answers every pending connection on a non-blocking listener with `report()`.
pub fn serve_pending<T: serde::Serialize>(
    listener: &mio::net::UnixListener,
    report: impl Fn() -> T,
) -> std::io::Result<()> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                // SAFETY: the fd was just released by the mio stream and is owned here only.
                let stream = unsafe { UnixStream::from_raw_fd(stream.into_raw_fd()) };
                serve_status(stream, &report());
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// Fetches the daemon's report.
pub fn fetch<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, String> {
    let mut s = UnixStream::connect(path).map_err(|e| {
        format!("cannot reach the daemon's control socket {}: {e} (is it running? pass --control PATH)", path.display())
    })?;
    s.set_read_timeout(Some(CONTROL_IO_TIMEOUT)).map_err(|e| e.to_string())?;
    let mut body = Vec::new();
    s.read_to_end(&mut body).map_err(|e| format!("reading status: {e}"))?;
    serde_json::from_slice(&body).map_err(|e| format!("bad status from daemon: {e}"))
}

/// The `status` subcommand: fetch the report and print it as a table or JSON.
pub fn print_status(path: &Path, json: bool) -> Result<(), String> {
    let report: StatusReport = fetch(path)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?);
    } else {
        print!("{}", report.to_table());
    }
    Ok(())
}
