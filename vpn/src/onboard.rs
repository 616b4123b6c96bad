//! `mpvpn hub add-peer`: a new peer's entry added to hub.yaml as text (its comments, order
//! and layout stay as the operator wrote them), and the peer.yaml to copy to that host.
//!
//! The edit is checked twice: the old text must be a valid hub.yaml, and the new text
//! must parse to the old config plus exactly the new peer.

use crate::config::HubConfig;
use crate::ip::Prefix;
use common::config::ConfigError;
use std::net::Ipv4Addr;

/// Replaces `config` with `text` (`files::replace_file`), giving the new file the old
/// one's owner and mode: the file holds keys, so never more open than it was, never
/// readable by others, and still the hub's (a hub running as its own user must read it).
pub fn replace_config(config: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(config)?;
    common::driver::files::replace_file(config, text.as_bytes(), |tmp| {
        std::os::unix::fs::chown(tmp, Some(meta.uid()), Some(meta.gid()))?;
        std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(meta.permissions().mode() & 0o7770))
    })
}

/// The peer to add.
pub struct NewPeer<'a> {
    pub name: &'a str,
    /// The peer key, base64.
    pub key: &'a str,
    pub address: Option<Ipv4Addr>,
    pub routes: &'a [Prefix],
}

fn entry_lines(p: &NewPeer, indent: &str) -> Vec<String> {
    let mut lines = vec![format!("{indent}- name: {}", p.name), format!("{indent}  key: {}", p.key)];
    if let Some(a) = p.address {
        lines.push(format!("{indent}  address: {a}"));
    }
    if !p.routes.is_empty() {
        let routes: Vec<String> = p.routes.iter().map(Prefix::to_string).collect();
        lines.push(format!("{indent}  routes: [{}]", routes.join(", ")));
    }
    lines
}

/// Whether `line` starts a top-level key (column 0, not a comment or list item).
fn top_level_key(line: &str) -> bool {
    line.chars().next().is_some_and(|c| !c.is_whitespace() && c != '#' && c != '-')
}

/// hub.yaml's text (`file` names it in errors) with `p` appended to its `peers:` list.
pub fn add_peer(file: &str, text: &str, p: &NewPeer) -> Result<String, ConfigError> {
    // an empty peers list is what a first add-peer starts from; anything else invalid
    // fails here, or in the check of the result
    let before = HubConfig::parse(file, text).or_else(|e| serde_yaml::from_str::<HubConfig>(text).map_err(|_| e))?;
    if before.peers.iter().any(|q| q.name == p.name) {
        return Err(ConfigError::field(file, "peers", format!("a peer named `{}` is already listed", p.name)));
    }
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.starts_with("peers:"))
        .ok_or_else(|| ConfigError::field(file, "peers", "no top-level `peers:` line to add to".to_string()))?;
    let rest = lines[start].trim_start_matches("peers:").trim();
    let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    if rest.starts_with('[') {
        // `peers: []` (or an inline list): only the empty one is rewritten as a block
        if !rest.starts_with("[]") {
            return Err(ConfigError::field(file, "peers", "an inline peers list; write it as a block".to_string()));
        }
        let comment = rest.find('#').map(|i| format!("  {}", &rest[i..])).unwrap_or_default();
        out[start] = format!("peers:{comment}");
        for (i, l) in entry_lines(p, "  ").into_iter().enumerate() {
            out.insert(start + 1 + i, l);
        }
    } else {
        // the block runs to the next top-level key; the new entry goes after its last
        // entry line, indented as its first one
        let end = lines[start + 1..].iter().position(|l| top_level_key(l)).map_or(lines.len(), |i| start + 1 + i);
        let body = &lines[start + 1..end];
        let first = body.iter().find(|l| l.trim_start().starts_with('-'));
        let indent: String = first.map_or("  ".into(), |l| l.chars().take_while(|c| *c == ' ').collect());
        let last = body.iter().rposition(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
        let at = last.map_or(start + 1, |i| start + 2 + i);
        for (i, l) in entry_lines(p, &indent).into_iter().enumerate() {
            out.insert(at + i, l);
        }
    }
    let mut new = out.join("\n");
    if text.ends_with('\n') {
        new.push('\n');
    }
    let after = HubConfig::parse(file, &new)?;
    let added = after.peers.iter().filter(|q| q.name == p.name).count();
    if added != 1 || after.peers.len() != before.peers.len() + 1 {
        return Err(ConfigError::field(file, "peers", "could not add the peer to this layout".to_string()));
    }
    Ok(new)
}

/// The peer.yaml for the new peer's host.
pub fn peer_yaml(p: &NewPeer) -> String {
    let mut s = format!(
        "# peer.yaml for {name}: copy it to that host (mode 600) and run `mpvpn peer -c peer.yaml`\n\
         # beside its mpclient (or set embedded_client:)\n\
         name: {name}\nkey: {key}\ntunnel: 127.0.0.1:3000\ntun: mpvpn0\n",
        name = p.name,
        key = p.key
    );
    if !p.routes.is_empty() {
        let routes: Vec<String> = p.routes.iter().map(Prefix::to_string).collect();
        s.push_str(&format!("routes: [{}]\n", routes.join(", ")));
    }
    s
}

#[cfg(test)]
mod tests {
    /// Before, the new hub.yaml (every key in it) was written with `fs::write`: through a
    /// link planted where the new file goes, and with the umask's mode until the chmod.
    #[test]
    fn a_config_is_replaced_owner_only_and_never_through_a_planted_link() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("mpvpn-replace-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("hub.yaml");
        std::fs::write(&config, "old").unwrap();
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o640)).unwrap();
        let stolen = dir.join("stolen");
        std::os::unix::fs::symlink(&stolen, dir.join(".hub.yaml.new")).unwrap();
        super::replace_config(&config, "new keys").unwrap();
        assert_eq!(std::fs::read_to_string(&config).unwrap(), "new keys");
        assert!(!stolen.exists(), "written through the planted link");
        assert_eq!(std::fs::metadata(&config).unwrap().permissions().mode() & 0o777, 0o640);
        let _ = std::fs::remove_dir_all(&dir);
    }

    use super::*;
    use crate::config::PeerConfig;

    /// Peers a and b of the existing configs, and the one added (every peer its own key).
    const KA: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
    const KB: &str = "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=";
    const KEY: &str = "AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM=";

    fn new_peer<'a>(name: &'a str, routes: &'a [Prefix]) -> NewPeer<'a> {
        NewPeer { name, key: KEY, address: Some(Ipv4Addr::new(10, 99, 0, 9)), routes }
    }

    #[test]
    fn an_entry_is_appended_with_comments_and_order_kept() {
        let text = format!(
            "# the hub\nnetwork: 10.99.0.0/24   # our VPN\npeers:\n    # first peer\n    - name: a\n      key: {KA}\n\n    - name: b   # the office\n      key: {KB}\n      routes: [192.168.50.0/24]\n\n# after the peers\nlog_level: info\n"
        );
        let routes: Vec<Prefix> = vec!["192.168.60.0/24".parse().unwrap()];
        let new = add_peer("hub.yaml", &text, &new_peer("c", &routes)).unwrap();
        let want = format!(
            "# the hub\nnetwork: 10.99.0.0/24   # our VPN\npeers:\n    # first peer\n    - name: a\n      key: {KA}\n\n    - name: b   # the office\n      key: {KB}\n      routes: [192.168.50.0/24]\n    - name: c\n      key: {KEY}\n      address: 10.99.0.9\n      routes: [192.168.60.0/24]\n\n# after the peers\nlog_level: info\n"
        );
        assert_eq!(new, want);
        let c = HubConfig::parse("hub.yaml", &new).unwrap();
        assert_eq!(c.peers.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);
    }

    #[test]
    fn an_empty_list_and_the_end_of_the_file() {
        let text = "network: 10.99.0.0/24\npeers: []   # none yet\n";
        let new = add_peer("hub.yaml", text, &new_peer("a", &[])).unwrap();
        assert_eq!(
            new,
            format!("network: 10.99.0.0/24\npeers:  # none yet\n  - name: a\n    key: {KEY}\n    address: 10.99.0.9\n")
        );
        let last = format!("network: 10.99.0.0/24\npeers:\n- name: a\n  key: {KA}");
        let new = add_peer("hub.yaml", &last, &NewPeer { address: None, ..new_peer("b", &[]) }).unwrap();
        assert_eq!(new, format!("{last}\n- name: b\n  key: {KEY}"));
    }

    #[test]
    fn what_would_make_a_bad_config_is_refused() {
        let text =
            format!("network: 10.99.0.0/24\npeers:\n  - name: a\n    key: {KA}\n    routes: [192.168.50.0/24]\n");
        let dup = add_peer("hub.yaml", &text, &new_peer("a", &[])).unwrap_err().to_string();
        assert!(dup.contains("peers") && dup.contains("already"), "{dup}");
        let overlap: Vec<Prefix> = vec!["192.168.50.128/25".parse().unwrap()];
        let e = add_peer("hub.yaml", &text, &new_peer("b", &overlap)).unwrap_err().to_string();
        assert!(e.contains("overlap"), "{e}");
        let taken = NewPeer { address: Some(Ipv4Addr::new(10, 99, 0, 1)), ..new_peer("b", &[]) };
        assert!(add_peer("hub.yaml", &text, &taken).is_err(), "the hub's own address");
        assert!(add_peer("hub.yaml", "network: nonsense\npeers: []\n", &new_peer("b", &[])).is_err());
    }

    #[test]
    fn the_printed_peer_yaml_parses() {
        let routes: Vec<Prefix> = vec!["192.168.60.0/24".parse().unwrap()];
        let y = peer_yaml(&new_peer("c", &routes));
        let p = PeerConfig::parse("peer.yaml", &y).unwrap();
        assert_eq!((p.name.as_str(), p.routes.len()), ("c", 1));
    }
}
