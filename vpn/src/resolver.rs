//! Pointing this host's resolver at the hub for the VPN's domain, and taking it back.
//!
//! With systemd-resolved: per-link DNS on the TUN device (`resolvectl dns` and
//! `resolvectl domain ~<domain>`), so only names in that domain go to the hub. Without
//! it: a block of `/etc/hosts` this peer owns (marked with its TUN device's name), kept
//! to the peer list and removed when the peer stops. The file is rewritten in place (it
//! may be a bind mount, as `ip netns exec` makes of `/etc/netns/<ns>/hosts`).

use crate::ip;
use crate::wire::PeerEntry;
use slog::{info, warn, Logger};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const HOSTS_FILE: &str = "/etc/hosts";

/// How names in the VPN's domain get resolved on this host.
pub enum SystemResolver {
    Resolved { tun: String },
    Hosts { path: PathBuf, tun: String, domain: String, written: Vec<(String, Ipv4Addr)> },
}

fn begin_marker(tun: &str) -> String {
    format!("# mpvpn peer on {tun}: names in the VPN (kept by mpvpn; removed when it stops)")
}

fn end_marker(tun: &str) -> String {
    format!("# end of mpvpn peer on {tun}")
}

/// `text` (a hosts file) without the block of the peer on `tun`, and with its new block
/// for `names` when there are any.
pub fn hosts_with_block(text: &str, tun: &str, domain: &str, names: &[(String, Ipv4Addr)]) -> String {
    let (begin, end) = (begin_marker(tun), end_marker(tun));
    let mut out = String::new();
    let mut inside = false;
    for line in text.lines() {
        if line == begin {
            inside = true;
        } else if inside && line == end {
            inside = false;
        } else if !inside {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !names.is_empty() {
        out.push_str(&begin);
        out.push('\n');
        for (name, addr) in names {
            out.push_str(&format!("{addr} {name}.{domain}\n{} {name}.{domain}\n", ip::v6_of(*addr)));
        }
        out.push_str(&end);
        out.push('\n');
    }
    out
}

fn resolvectl(args: &[&str]) -> Result<(), String> {
    let out = Command::new("resolvectl").args(args).output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

impl SystemResolver {
    /// Sends `domain` to the hub at `hub` for names: through systemd-resolved when it
    /// runs here, else through /etc/hosts.
    pub fn point(tun: &str, hub: Ipv4Addr, domain: &str, log: &Logger) -> Self {
        debug_assert!(crate::dns::acceptable_vpn_domain(domain), "the peer core checked the domain");
        if Path::new("/run/systemd/resolve").is_dir() {
            let routing = format!("~{domain}");
            match resolvectl(&["dns", tun, &hub.to_string()]).and_then(|()| resolvectl(&["domain", tun, &routing])) {
                Ok(()) => {
                    info!(log, "names in the VPN resolve through the hub (systemd-resolved)"; "domain" => domain, "link" => tun);
                    return Self::Resolved { tun: tun.into() };
                }
                Err(e) => warn!(log, "systemd-resolved refused per-link DNS; using /etc/hosts"; "error" => e),
            }
        }
        info!(log, "names in the VPN go to a block of /etc/hosts"; "domain" => domain);
        Self::Hosts { path: HOSTS_FILE.into(), tun: tun.into(), domain: domain.into(), written: Vec::new() }
    }

    /// Keeps the hosts block to a new peer list (systemd-resolved asks the hub itself).
    pub fn update(&mut self, peers: &[PeerEntry], log: &Logger) {
        let Self::Hosts { path, tun, domain, written } = self else { return };
        // a name that could not be a peer's (a space, a line break ...) never reaches the file
        let names: Vec<(String, Ipv4Addr)> = peers
            .iter()
            .filter(|p| crate::config::valid_name(&p.name))
            .map(|p| (p.name.to_ascii_lowercase(), p.addr))
            .collect();
        if names == *written {
            return;
        }
        match rewrite(path, tun, domain, &names) {
            Ok(()) => *written = names,
            Err(e) => warn!(log, "cannot update the hosts file"; "file" => %path.display(), "error" => %e),
        }
    }

    /// Takes the resolver back: the per-link settings, or this peer's hosts block.
    pub fn remove(&mut self, log: &Logger) {
        match self {
            Self::Resolved { tun } => {
                if let Err(e) = resolvectl(&["revert", tun]) {
                    warn!(log, "resolvectl revert"; "error" => e);
                }
            }
            Self::Hosts { path, tun, domain, written } => {
                if let Err(e) = rewrite(path, tun, domain, &[]) {
                    warn!(log, "cannot clean the hosts file"; "file" => %path.display(), "error" => %e);
                }
                written.clear();
            }
        }
    }
}

fn rewrite(path: &Path, tun: &str, domain: &str, names: &[(String, Ipv4Addr)]) -> std::io::Result<()> {
    let text = std::fs::read_to_string(path)?;
    let new = hosts_with_block(&text, tun, domain, names);
    if new != text {
        std::fs::write(path, new)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_block_is_added_replaced_and_removed_leaving_the_rest() {
        let base = "127.0.0.1 localhost\n# a comment\n::1 localhost\n";
        let names =
            vec![("alpha".to_string(), Ipv4Addr::new(10, 99, 0, 2)), ("beta".into(), Ipv4Addr::new(10, 99, 0, 3))];
        let with = hosts_with_block(base, "mpvpn0", "mpvpn", &names);
        assert!(with.starts_with(base));
        assert!(with.contains("\n10.99.0.3 beta.mpvpn\nfd6d:7074::a63:3 beta.mpvpn\n"), "{with}");
        // another peer's block on the same host stays
        let two = hosts_with_block(&with, "mpvpn1", "mpvpn", &names[..1]);
        let replaced = hosts_with_block(&two, "mpvpn0", "mpvpn", &names[1..]);
        assert!(!replaced.contains("10.99.0.2 alpha.mpvpn\nfd6d:7074::a63:2 alpha.mpvpn\n10.99.0.3"));
        assert!(replaced.contains(&begin_marker("mpvpn1")) && replaced.contains("10.99.0.3 beta.mpvpn"));
        let back = hosts_with_block(&hosts_with_block(&replaced, "mpvpn0", "mpvpn", &[]), "mpvpn1", "mpvpn", &[]);
        assert_eq!(back, base);
    }

    /// A hostile hub's peer list names a peer "x\n203.0.113.9 bank.example": before, the
    /// line went into the hosts file as it was. Now only names a peer could have are
    /// written.
    #[test]
    fn only_valid_peer_names_reach_the_hosts_file() {
        let dir = std::env::temp_dir().join(format!("mpvpn-hosts-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("hosts");
        std::fs::write(&path, "127.0.0.1 localhost\n").unwrap();
        let mut r =
            SystemResolver::Hosts { path: path.clone(), tun: "mpvpn0".into(), domain: "mpvpn".into(), written: vec![] };
        let entry = |name: &str, last: u8| PeerEntry {
            id: u32::from(last),
            name: name.into(),
            addr: Ipv4Addr::new(10, 99, 0, last),
            routes: vec![],
            candidates: vec![],
        };
        let log = slog::Logger::root(slog::Discard, slog::o!());
        r.update(&[entry("alpha", 2), entry("x\n203.0.113.9 bank.example", 3), entry("a b", 4)], &log);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("10.99.0.2 alpha.mpvpn"));
        assert!(!text.contains("bank.example") && !text.contains("10.99.0.4"), "{text}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
