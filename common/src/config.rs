//! Configuration: mptunnel-style bridges files and YAML configs, with validation errors
//! that name the file, line and field.
//!
//! Defaults are named constants; unknown fields are errors (a typo must not silently
//! fall back to a default).

use crate::crypto::Cipher;
use crate::redundancy::{RedundancyConfig, RedundancyMode, DEFAULT_GROUP_DEADLINE, DEFAULT_TARGET_LOSS};
use crate::MAX_PATHS;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

pub const DEFAULT_CLIENT_LISTEN: &str = "127.0.0.1:3000";
pub const DEFAULT_LOG_LEVEL: &str = "info";
pub const DEFAULT_STATS_INTERVAL_SECS: u64 = 30;

/// A config problem, printed as one line: `file:line: field: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    /// A problem with `field` that no line of the file points at (a name that does not
    /// resolve, an address that does not parse).
    pub fn field(file: &str, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { file: file.into(), line: None, field: field.into(), message: message.into() }
    }
}

/// One relay (or direct server address) from a bridges file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bridge {
    pub host: String,
    pub port: u16,
    pub line: usize,
}

/// Parses mptunnel's bridges file: one `host port` per line, `#` starts a comment.
pub fn parse_bridges(file: &str, text: &str) -> Result<Vec<Bridge>, ConfigError> {
    let err =
        |line, message: String| ConfigError { file: file.into(), line: Some(line), field: String::new(), message };
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let content = raw.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        let mut it = content.split_whitespace();
        let (Some(host), Some(port), None) = (it.next(), it.next(), it.next()) else {
            return Err(err(line, format!("expected `host port`, got `{content}`")));
        };
        let port = match port.parse::<u16>() {
            Ok(p) if p != 0 => p,
            _ => return Err(err(line, format!("bad port `{port}` (1-65535)"))),
        };
        out.push(Bridge { host: host.into(), port, line });
    }
    if out.is_empty() {
        return Err(ConfigError {
            file: file.into(),
            line: None,
            field: String::new(),
            message: "no bridges: expected lines of `host port`".into(),
        });
    }
    if out.len() > MAX_PATHS {
        return Err(err(out[MAX_PATHS].line, format!("at most {MAX_PATHS} paths")));
    }
    Ok(out)
}

/// One path in a client YAML config.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PathConfig {
    /// `host:port` of a bridge, or of the server itself for a direct path.
    pub remote: String,
    /// Local address to send from (`ip` or `ip:port`): one uplink among several.
    #[serde(default)]
    pub bind: Option<String>,
    /// Local interface to send from (SO_BINDTODEVICE), e.g. `wwan0`.
    #[serde(default)]
    pub interface: Option<String>,
    /// A name for status output (default: the remote).
    #[serde(default)]
    pub name: Option<String>,
}

fn default_client_listen() -> String {
    DEFAULT_CLIENT_LISTEN.into()
}
fn default_log_level() -> String {
    DEFAULT_LOG_LEVEL.into()
}
fn default_stats_interval() -> u64 {
    DEFAULT_STATS_INTERVAL_SECS
}
fn default_cipher() -> Cipher {
    Cipher::Aes256Gcm
}
fn default_client_idle() -> u64 {
    crate::client::DEFAULT_SESSION_IDLE_TIMEOUT.as_secs()
}
fn default_client_max_sessions() -> usize {
    crate::client::DEFAULT_MAX_SESSIONS
}
fn default_server_timeout() -> u64 {
    crate::server::DEFAULT_SESSION_TIMEOUT.as_secs()
}
fn default_server_max_sessions() -> usize {
    crate::server::DEFAULT_MAX_SESSIONS
}
fn default_max_paths() -> usize {
    crate::server::DEFAULT_MAX_PATHS_PER_SESSION
}
fn default_ciphers() -> Vec<Cipher> {
    vec![Cipher::Aes256Gcm, Cipher::ChaCha20Poly1305]
}

pub fn default_target_loss() -> f64 {
    DEFAULT_TARGET_LOSS
}
fn default_group_deadline_ms() -> u64 {
    DEFAULT_GROUP_DEADLINE.as_millis() as u64
}

/// How a client's sessions spread datagrams over the paths (`redundancy:`).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RedundancyName {
    /// Every datagram on every live path (mptunnel's behaviour).
    Duplicate,
    /// Fixed Reed–Solomon groups (`fec: {data, parity}`).
    Fec,
    /// Per direction, the cheapest scheme that meets `target_loss` on the measured loss:
    /// the default (the bench's numbers in the README say why).
    #[default]
    Adaptive,
}

impl std::str::FromStr for RedundancyName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "duplicate" => Ok(Self::Duplicate),
            "fec" => Ok(Self::Fec),
            "adaptive" => Ok(Self::Adaptive),
            _ => Err(format!("`{s}` is not one of duplicate, fec, adaptive")),
        }
    }
}

/// A fixed coding group: `fec: {data: 10, parity: 4}`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FecShape {
    pub data: u8,
    pub parity: u8,
}

/// The shape `redundancy: fec` uses when `fec:` is not given.
pub const DEFAULT_FEC: FecShape = FecShape { data: 10, parity: 4 };

/// The redundancy settings a client config (or command line) gives.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RedundancySettings {
    pub name: RedundancyName,
    pub fec: Option<FecShape>,
    pub target_loss: f64,
    pub group_deadline_ms: u64,
}

impl Default for RedundancySettings {
    fn default() -> Self {
        Self {
            name: RedundancyName::default(),
            fec: None,
            target_loss: DEFAULT_TARGET_LOSS,
            group_deadline_ms: default_group_deadline_ms(),
        }
    }
}

impl RedundancySettings {
    /// The core's configuration, or the field that is wrong and why.
    pub fn to_config(&self) -> Result<RedundancyConfig, (&'static str, String)> {
        let mode = match (self.name, self.fec) {
            (RedundancyName::Duplicate, None) => RedundancyMode::Duplicate,
            (RedundancyName::Adaptive, None) => RedundancyMode::Adaptive,
            (RedundancyName::Fec, shape) => {
                let FecShape { data, parity } = shape.unwrap_or(DEFAULT_FEC);
                RedundancyMode::Fec { data, parity }
            }
            (_, Some(_)) => return Err(("fec", "only with `redundancy: fec`".into())),
        };
        let cfg = RedundancyConfig {
            mode,
            target_loss: self.target_loss,
            group_deadline: std::time::Duration::from_millis(self.group_deadline_ms),
        };
        cfg.validate().map_err(|e| {
            let field = match e {
                crate::redundancy::RedundancyError::Data => "fec.data",
                crate::redundancy::RedundancyError::Parity => "fec.parity",
                crate::redundancy::RedundancyError::TargetLoss => "target_loss",
                _ => "group_deadline_ms",
            };
            (field, e.to_string())
        })?;
        Ok(cfg)
    }
}

/// `mpclient -c client.yaml`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Where local applications send their datagrams.
    #[serde(default = "default_client_listen")]
    pub listen: String,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    #[serde(default = "default_cipher")]
    pub cipher: Cipher,
    /// A named target from the server's allow-list; empty = the server's default.
    #[serde(default)]
    pub target: String,
    pub paths: Vec<PathConfig>,
    #[serde(default = "default_client_idle")]
    pub session_idle_timeout_secs: u64,
    #[serde(default = "default_client_max_sessions")]
    pub max_sessions: usize,
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// `ip:port` to serve Prometheus metrics on (`GET /metrics`); none by default.
    #[serde(default)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// Seconds between one-line stats logs; 0 = off.
    #[serde(default = "default_stats_interval")]
    pub stats_interval_secs: u64,
    /// `adaptive` (default), `duplicate` or `fec`: how sessions spread datagrams over
    /// the paths, both ways (the server follows).
    #[serde(default)]
    pub redundancy: RedundancyName,
    /// With `redundancy: fec`: datagrams and parity shards per group [10 and 4].
    #[serde(default)]
    pub fec: Option<FecShape>,
    /// With `redundancy: adaptive`: the residual loss to reach at the least cost.
    #[serde(default = "default_target_loss")]
    pub target_loss: f64,
    /// A coding group's parity goes out at most this long after its first datagram.
    #[serde(default = "default_group_deadline_ms")]
    pub group_deadline_ms: u64,
}

impl ClientConfig {
    pub fn redundancy_settings(&self) -> RedundancySettings {
        RedundancySettings {
            name: self.redundancy,
            fec: self.fec,
            target_loss: self.target_loss,
            group_deadline_ms: self.group_deadline_ms,
        }
    }
}

/// `mpserver -c server.yaml`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// `ip:port` the server listens on.
    pub listen: String,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// `host:port` sessions go to when the client names no target.
    #[serde(default)]
    pub target: Option<String>,
    /// Named targets clients may ask for (`name: host:port`); nothing else is reachable.
    #[serde(default)]
    pub targets: BTreeMap<String, String>,
    #[serde(default = "default_ciphers")]
    pub ciphers: Vec<Cipher>,
    #[serde(default = "default_server_max_sessions")]
    pub max_sessions: usize,
    #[serde(default = "default_max_paths")]
    pub max_paths_per_session: usize,
    #[serde(default = "default_server_timeout")]
    pub session_timeout_secs: u64,
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// `ip:port` to serve Prometheus metrics on (`GET /metrics`); none by default.
    #[serde(default)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    #[serde(default = "default_log_level")]
    pub log_level: String,
    #[serde(default = "default_stats_interval")]
    pub stats_interval_secs: u64,
}

/// The first line of `text` that mentions `needle` (1-based), to point at a field.
pub fn line_of(text: &str, needle: &str) -> Option<usize> {
    if needle.is_empty() {
        return None;
    }
    text.lines().position(|l| l.split('#').next().unwrap_or("").contains(needle)).map(|i| i + 1)
}

/// Parses YAML into `T`, with serde's error turned into a one-line `ConfigError`.
pub fn from_yaml<T: serde::de::DeserializeOwned>(file: &str, text: &str) -> Result<T, ConfigError> {
    serde_yaml::from_str(text).map_err(|e| yaml_error(file, e))
}

fn yaml_error(file: &str, e: serde_yaml::Error) -> ConfigError {
    let line = e.location().map(|l| l.line());
    // serde_yaml appends "at line X column Y"; the line is already in our prefix.
    let msg = e.to_string();
    let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
    ConfigError { file: file.into(), line, field: String::new(), message: msg }
}

/// `log_level` must be a level slog knows.
pub fn check_log_level(level: &str, file: &str, text: &str) -> Result<(), ConfigError> {
    check(
        validate_log_level(level),
        file,
        text,
        "log_level",
        "log_level",
        "one of error, warn, info, debug, trace".into(),
    )
}

pub fn validate_log_level(level: &str) -> bool {
    matches!(level, "error" | "warn" | "info" | "debug" | "trace")
}

/// `Ok` if `ok`; otherwise an error naming `field`, at the first line mentioning `locate`.
pub fn check(ok: bool, file: &str, text: &str, field: &str, locate: &str, message: String) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError { file: file.into(), line: line_of(text, locate), field: field.into(), message })
    }
}

/// `host:port` with a non-zero port (the host is resolved by the driver).
pub fn valid_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0),
        None => false,
    }
}

impl ClientConfig {
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let c: Self = serde_yaml::from_str(text).map_err(|e| yaml_error(file, e))?;
        check(
            c.listen.parse::<std::net::SocketAddr>().is_ok(),
            file,
            text,
            "listen",
            "listen",
            format!("`{}` is not ip:port", c.listen),
        )?;
        check(!c.paths.is_empty(), file, text, "paths", "paths", "at least one path is required".into())?;
        check(c.paths.len() <= MAX_PATHS, file, text, "paths", "paths", format!("at most {MAX_PATHS} paths"))?;
        for (i, p) in c.paths.iter().enumerate() {
            check(
                valid_host_port(&p.remote),
                file,
                text,
                &format!("paths[{i}].remote"),
                &p.remote,
                format!("`{}` is not host:port", p.remote),
            )?;
            if let Some(b) = &p.bind {
                let ok = b.parse::<std::net::IpAddr>().is_ok() || b.parse::<std::net::SocketAddr>().is_ok();
                check(ok, file, text, &format!("paths[{i}].bind"), b, format!("`{b}` is not an ip or ip:port"))?;
            }
            if let Some(dev) = &p.interface {
                let ok = !dev.is_empty() && dev.len() < 16 && !dev.contains('/');
                check(
                    ok,
                    file,
                    text,
                    &format!("paths[{i}].interface"),
                    dev,
                    format!("`{dev}` is not an interface name"),
                )?;
            }
        }
        check(
            c.target.len() <= crate::wire::MAX_TARGET_NAME_LEN,
            file,
            text,
            "target",
            "target",
            format!("at most {} bytes", crate::wire::MAX_TARGET_NAME_LEN),
        )?;
        check(
            c.session_idle_timeout_secs > 0,
            file,
            text,
            "session_idle_timeout_secs",
            "session_idle_timeout_secs",
            "must be > 0".into(),
        )?;
        check(c.max_sessions > 0, file, text, "max_sessions", "max_sessions", "must be > 0".into())?;
        if let Err((field, message)) = c.redundancy_settings().to_config() {
            let locate = field.split('.').next_back().unwrap_or(field);
            return Err(ConfigError { file: file.into(), line: line_of(text, locate), field: field.into(), message });
        }
        check_log_level(&c.log_level, file, text)?;
        Ok(c)
    }
}

impl ServerConfig {
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        Self::parse_for(file, text, true)
    }

    /// For a server embedded in `mpvpn hub`, whose sessions all go to the hub: no target.
    pub fn parse_embedded(file: &str, text: &str) -> Result<Self, ConfigError> {
        Self::parse_for(file, text, false)
    }

    fn parse_for(file: &str, text: &str, needs_target: bool) -> Result<Self, ConfigError> {
        let c: Self = serde_yaml::from_str(text).map_err(|e| yaml_error(file, e))?;
        check(
            c.listen.parse::<std::net::SocketAddr>().is_ok(),
            file,
            text,
            "listen",
            "listen",
            format!("`{}` is not ip:port", c.listen),
        )?;
        if let Some(t) = &c.target {
            check(valid_host_port(t), file, text, "target", "target", format!("`{t}` is not host:port"))?;
        }
        for (name, t) in &c.targets {
            let field = format!("targets.{name}");
            check(valid_host_port(t), file, text, &field, t, format!("`{t}` is not host:port"))?;
            let ok = !name.is_empty() && name.len() <= crate::wire::MAX_TARGET_NAME_LEN;
            check(ok, file, text, &field, name, format!("names are 1-{} bytes", crate::wire::MAX_TARGET_NAME_LEN))?;
        }
        check(
            !needs_target || c.target.is_some() || !c.targets.is_empty(),
            file,
            text,
            "target",
            "",
            "give a default `target` or at least one entry in `targets`".into(),
        )?;
        check(!c.ciphers.is_empty(), file, text, "ciphers", "ciphers", "at least one cipher".into())?;
        check(c.max_sessions > 0, file, text, "max_sessions", "max_sessions", "must be > 0".into())?;
        check(
            (1..=MAX_PATHS).contains(&c.max_paths_per_session),
            file,
            text,
            "max_paths_per_session",
            "max_paths_per_session",
            format!("1-{MAX_PATHS}"),
        )?;
        check(
            c.session_timeout_secs > 0,
            file,
            text,
            "session_timeout_secs",
            "session_timeout_secs",
            "must be > 0".into(),
        )?;
        check_log_level(&c.log_level, file, text)?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridges_file() {
        let b = parse_bridges("b.conf", "# relays\n10.0.0.1 4000\n\n  relay.example 4001 # second\n").unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(b[1], Bridge { host: "relay.example".into(), port: 4001, line: 4 });
        let e = parse_bridges("b.conf", "10.0.0.1 4000\n10.0.0.2\n").unwrap_err();
        assert_eq!(e.to_string(), "b.conf:2: expected `host port`, got `10.0.0.2`");
        let e = parse_bridges("b.conf", "h 99999\n").unwrap_err();
        assert_eq!(e.line, Some(1));
        assert!(parse_bridges("b.conf", "# nothing\n").is_err());
    }

    #[test]
    fn client_yaml_errors_name_field_and_line() {
        let ok = "listen: 127.0.0.1:3000\nkey_file: /k\npaths:\n  - remote: 10.0.0.1:4000\n  - remote: b:4000\n    interface: wwan0\n";
        let c = ClientConfig::parse("c.yaml", ok).unwrap();
        assert_eq!(c.paths.len(), 2);
        assert_eq!(c.cipher, Cipher::Aes256Gcm);

        let e = ClientConfig::parse("c.yaml", "paths:\n  - remote: a:1\n    remtoe: x\n").unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
        assert!(e.to_string().contains("remtoe"), "{e}");

        let e = ClientConfig::parse("c.yaml", "paths:\n  - remote: a:1\n  - remote: nope\n").unwrap_err();
        assert_eq!(e.to_string(), "c.yaml:3: paths[1].remote: `nope` is not host:port");

        let e = ClientConfig::parse("c.yaml", "listen: 1.2.3.4\npaths:\n  - remote: a:1\n").unwrap_err();
        assert_eq!(e.field, "listen");
        assert_eq!(e.line, Some(1));

        let e = ClientConfig::parse("c.yaml", "cipher: des\npaths:\n  - remote: a:1\n").unwrap_err();
        assert_eq!(e.line, Some(1), "{e}");
    }

    #[test]
    fn client_redundancy() {
        let paths = "paths:\n  - remote: a:1\n";
        let cfg = |extra: &str| ClientConfig::parse("c.yaml", &format!("{paths}{extra}"));
        let c = cfg("").unwrap();
        assert_eq!(c.redundancy_settings().to_config().unwrap().mode, RedundancyMode::Adaptive);
        let c = cfg("redundancy: duplicate\n").unwrap();
        assert_eq!(c.redundancy_settings().to_config().unwrap().mode, RedundancyMode::Duplicate);
        let c = cfg("redundancy: fec\n").unwrap();
        assert_eq!(c.redundancy_settings().to_config().unwrap().mode, RedundancyMode::Fec { data: 10, parity: 4 });
        let c = cfg("redundancy: fec\nfec: {data: 8, parity: 3}\n").unwrap();
        assert_eq!(c.redundancy_settings().to_config().unwrap().mode, RedundancyMode::Fec { data: 8, parity: 3 });
        let c = cfg("redundancy: adaptive\ntarget_loss: 0.001\ngroup_deadline_ms: 3\n").unwrap();
        let r = c.redundancy_settings().to_config().unwrap();
        assert_eq!((r.mode, r.group_deadline.as_millis()), (RedundancyMode::Adaptive, 3));

        let e = cfg("redundancy: fec\nfec: {data: 40, parity: 3}\n").unwrap_err();
        assert_eq!(e.to_string(), "c.yaml:4: fec.data: fec.data must be 1..=16");
        let e = cfg("redundancy: adaptive\nfec: {data: 4, parity: 3}\n").unwrap_err();
        assert_eq!(e.to_string(), "c.yaml:4: fec: only with `redundancy: fec`");
        let e = cfg("redundancy: adaptive\ntarget_loss: 2\n").unwrap_err();
        assert_eq!((e.field.as_str(), e.line), ("target_loss", Some(4)));
        let e = cfg("redundancy: triple\n").unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
        let e = cfg("redundancy: adaptive\ngroup_deadline_ms: 0\n").unwrap_err();
        assert_eq!(e.field, "group_deadline_ms");
    }

    #[test]
    fn server_yaml() {
        let c = ServerConfig::parse(
            "s.yaml",
            "listen: 0.0.0.0:4000\ntarget: 127.0.0.1:1194\ntargets:\n  ssh: 127.0.0.1:22\n",
        )
        .unwrap();
        assert_eq!(c.targets.len(), 1);
        assert_eq!(c.ciphers.len(), 2);
        let e = ServerConfig::parse("s.yaml", "listen: 0.0.0.0:4000\n").unwrap_err();
        assert_eq!(e.field, "target");
        let e = ServerConfig::parse("s.yaml", "listen: 0.0.0.0:4000\ntargets:\n  ssh: 127.0.0.1\n").unwrap_err();
        assert_eq!(e.to_string(), "s.yaml:3: targets.ssh: `127.0.0.1` is not host:port");
        let e = ServerConfig::parse("s.yaml", "listen: 0.0.0.0:4000\ntarget: a:1\nmax_paths_per_session: 99\n")
            .unwrap_err();
        assert_eq!(e.line, Some(3));
    }
}
