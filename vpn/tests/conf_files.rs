//! The VPN's example configs in conf/ parse (key files they name need not exist here); a
//! published example key, were one printed in them, would be refused.

use std::path::Path;
use vpn::config::{HubConfig, PeerConfig};

#[test]
fn vpn_example_configs_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf");
    // the cluster key is read when hub.yaml is: one in a file of this test's own
    let cluster_key = std::env::temp_dir().join(format!("mpvpn-conf-test-{}.key", std::process::id()));
    std::fs::write(&cluster_key, "Q0xVU1RFUktFWUNMVVNURVJLRVlDTFVTVEVSS0VZMDE=").unwrap();
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !name.ends_with(".yaml") {
            continue;
        }
        // a key_file that does not exist on this machine is the only acceptable failure
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("key_file: /etc/mptunnel/beta.key", "key: AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
            .replace("key_file: /etc/mptunnel/alpha.key", "key: BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBA=")
            .replace("/etc/mptunnel/cluster.key", &cluster_key.display().to_string())
            .replace("/etc/mptunnel/tunnel.key", &cluster_key.display().to_string());
        let file = path.display().to_string();
        let as_printed = text.clone();
        let text = vpn::config::EXAMPLE_KEYS
            .iter()
            .fold(text, |t, k| t.replace(k, "CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk="));
        if text != as_printed {
            let e = if name.starts_with("hub") {
                HubConfig::parse(&file, &as_printed).map(drop)
            } else {
                PeerConfig::parse(&file, &as_printed).map(drop)
            };
            assert!(e.is_err_and(|e| e.to_string().contains("example key")), "{file} is taken with its example key");
        }
        if name.starts_with("hub") {
            HubConfig::parse(&file, &text).unwrap_or_else(|e| panic!("{e}"));
            checked += 1;
        } else if name.starts_with("peer") {
            PeerConfig::parse(&file, &text).unwrap_or_else(|e| panic!("{e}"));
            checked += 1;
        }
    }
    let _ = std::fs::remove_file(&cluster_key);
    assert!(checked >= 3);
}
