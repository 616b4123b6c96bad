//! The hub's state file: the address it gave each peer name, kept across restarts so that
//! a returning peer gets its address back and no other name takes it first, and the
//! secret its registrations' reset tokens derive from (so a restarted hub can tell a peer
//! it no longer knows its registration). JSON, written whole to a new file beside it
//! (owner-only) and renamed over it: a crash leaves the old file or the new one, never
//! half of one.

use crate::VpnError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;

/// The file's format version.
const STATE_VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    /// Base64 of 32 bytes.
    #[serde(default)]
    reset_secret: Option<String>,
    /// Peer name → VPN address.
    addresses: BTreeMap<String, Ipv4Addr>,
}

/// What a hub keeps across restarts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct HubState {
    pub(super) addresses: BTreeMap<String, Ipv4Addr>,
    pub(super) reset_secret: [u8; 32],
}

fn error(path: &Path, why: impl std::fmt::Display) -> VpnError {
    VpnError::StateFile(format!("state_file {}: {why}", path.display()))
}

/// The state kept at `path`; with no file yet (or no secret in it), no addresses and the
/// secret `fresh` makes.
pub(super) fn load(path: &Path, fresh: impl FnOnce() -> [u8; 32]) -> Result<HubState, VpnError> {
    use base64::Engine;
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(HubState { addresses: BTreeMap::new(), reset_secret: fresh() })
        }
        Err(e) => return Err(error(path, e)),
    };
    let f: StateFile = serde_json::from_str(&text).map_err(|e| error(path, e))?;
    if f.version != STATE_VERSION {
        return Err(error(path, format!("version {} (this hub reads {STATE_VERSION})", f.version)));
    }
    let reset_secret = match f.reset_secret {
        None => fresh(),
        Some(b64) => base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .ok()
            .and_then(|v| <[u8; 32]>::try_from(v).ok())
            .ok_or_else(|| error(path, "reset_secret is not base64 of 32 bytes"))?,
    };
    Ok(HubState { addresses: f.addresses, reset_secret })
}

/// Writes `state` to `path` atomically, readable by the owner only.
pub(super) fn save(path: &Path, state: &HubState) -> Result<(), VpnError> {
    use base64::Engine;
    let f = StateFile {
        version: STATE_VERSION,
        reset_secret: Some(base64::engine::general_purpose::STANDARD.encode(state.reset_secret)),
        addresses: state.addresses.clone(),
    };
    let text = serde_json::to_string_pretty(&f).map_err(|e| error(path, e))?;
    common::driver::files::replace_file(path, text.as_bytes(), |_| Ok(())).map_err(|e| error(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_across_a_save_and_a_load_owner_only_and_bad_files_are_one_line_errors() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("mpvpn-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("hub.state.json");
        let fresh = || [7u8; 32];
        let empty = load(&path, fresh).unwrap();
        assert!(empty.addresses.is_empty() && empty.reset_secret == [7; 32], "no file yet");
        let mut addresses = BTreeMap::new();
        addresses.insert("alpha".to_string(), Ipv4Addr::new(10, 99, 0, 2));
        let state = HubState { addresses, reset_secret: [3; 32] };
        save(&path, &state).unwrap();
        assert_eq!(load(&path, fresh).unwrap(), state, "the secret is kept, not made again");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::write(&path, "{\"version\": 1, \"addresses\": {\"alpha\": \"not an address\"}}").unwrap();
        let e = load(&path, fresh).unwrap_err().to_string();
        assert!(e.starts_with("state_file ") && e.contains("hub.state.json") && !e.contains('\n'), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
