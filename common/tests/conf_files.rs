//! Every file in conf/ parses (examples must not rot).

use common::config::{parse_bridges, ClientConfig, ServerConfig};
use std::path::Path;

#[test]
fn every_example_config_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("conf/ exists") {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        let file = path.display().to_string();
        match name.as_str() {
            n if n.starts_with("bridges") && n.ends_with(".conf") => {
                parse_bridges(&file, &text).unwrap_or_else(|e| panic!("{e}"));
            }
            n if n.starts_with("client") && n.ends_with(".yaml") => {
                ClientConfig::parse(&file, &text).unwrap_or_else(|e| panic!("{e}"));
            }
            n if n.starts_with("server") && n.ends_with(".yaml") => {
                ServerConfig::parse(&file, &text).unwrap_or_else(|e| panic!("{e}"));
            }
            // VPN configs: parsed by vpn/tests/conf_files.rs; mpbridge's by bridge's tests;
            // the Grafana dashboard is checked against real metrics by tests/tests/daemons.rs
            n if (n.starts_with("hub") || n.starts_with("peer")) && n.ends_with(".yaml") => continue,
            n if n.starts_with("bridge") && n.ends_with(".yaml") => continue,
            "grafana-dashboard.json" => continue,
            n => panic!("conf/{n}: no parser for this file; name it bridges*.conf, bridge*.yaml, client*.yaml, server*.yaml, hub*.yaml or peer*.yaml"),
        }
        checked += 1;
    }
    assert!(checked >= 4, "only {checked} files in conf/");
}
