//! Key and config files: the only file reading the daemons do besides their sockets.

use crate::config::ConfigError;
use crate::crypto::{Psk, PSK_LEN};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("key file {path}: expected one line of base64 encoding {PSK_LEN} bytes (make one with `genkey`)")]
    Format { path: String },
}

/// A key read from a file, and a warning for the operator when the file is readable by
/// group or others.
pub struct LoadedKey {
    pub key: Psk,
    pub warning: Option<String>,
}

/// Reads a key file (one line of base64).
pub fn load_key(path: &Path) -> Result<LoadedKey, KeyError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io { path: p.clone(), source })?;
    let key = Psk::from_base64(&text).ok_or(KeyError::Format { path: p.clone() })?;
    let warning =
        loose_permissions(path).map(|mode| format!("key file {p} has loose permissions {mode:o}; run `chmod 600 {p}`"));
    Ok(LoadedKey { key, warning })
}

/// The file's permission bits if group or others may read it.
pub fn loose_permissions(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then_some(mode)
}

/// Writes `key` as base64 to a new file readable only by its owner.
pub fn write_new_key(key: &Psk, path: &Path) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    writeln!(f, "{}", key.to_base64())
}

/// Replaces `path` with `contents` as a whole: written to `.<name>.new` beside it, created
/// owner-only and exclusively (a stale file or a planted link there is removed, never
/// written through), synced, handed to `finish` (to give it its owner and mode), then
/// renamed over `path`. A crash leaves the old file or the new one, never half of one.
pub fn replace_file(
    path: &Path,
    contents: &[u8],
    finish: impl FnOnce(&Path) -> std::io::Result<()>,
) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let name = path.file_name().ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let tmp = path.with_file_name(format!(".{}.new", name.to_string_lossy()));
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        finish(&tmp)?;
        std::fs::rename(&tmp, path)
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Reads `path` and parses it with `parse(file_name, text)` (e.g. `ClientConfig::parse`).
pub fn load_config<T>(path: &Path, parse: fn(&str, &str) -> Result<T, ConfigError>) -> Result<T, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::field(&file, "", e.to_string()))?;
    parse(&file, &text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entropy::OsEntropy;

    #[test]
    fn key_file_round_trip_and_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("mpt-key-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k");
        let k = Psk::generate(&mut OsEntropy::new());
        write_new_key(&k, &path).unwrap();
        let loaded = load_key(&path).unwrap();
        assert_eq!(loaded.key.bytes(), k.bytes());
        assert!(loaded.warning.is_none());
        assert!(write_new_key(&k, &path).is_err(), "must not overwrite an existing key");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load_key(&path).unwrap().warning.is_some());
        std::fs::write(&path, "not base64!").unwrap();
        assert!(matches!(load_key(&path), Err(KeyError::Format { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
