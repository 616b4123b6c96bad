//! A small blocking client for etcd's v3 API through its JSON gateway (`POST /v3/...`,
//! keys and values base64, 64-bit integers as strings), which every etcd member serves
//! on its client URL. Only what the cluster needs: leases, ranges by prefix, one
//! transaction shape (create two keys or read one), and the election service.
//!
//! Why not the `etcd-client` crate: it needs tokio, tonic and `protoc` at build time; the
//! gateway is etcd's documented HTTP face of the same API, so one well-kept blocking HTTP
//! client (ureq, no TLS) does, and the build needs no system tool.
//!
//! Every call has a timeout and tries the configured members in turn, starting with the
//! one that answered last: one member down costs a connection error, not an outage.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use ureq::tls::{parse_pem, Certificate, ClientCert, PemItem, RootCerts, TlsConfig};

/// How long one request may take (the campaign has its own, longer wait).
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_millis(1500);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum EtcdError {
    /// No member answered (connection refused, timed out, no quorum behind it).
    #[error("etcd unreachable: {0}")]
    Unreachable(String),
    /// A member answered with an error.
    #[error("etcd: {0}")]
    Server(String),
}

/// A lease id as etcd gives it.
pub(super) type LeaseId = i64;

/// One key and its value, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct KeyValue {
    pub(super) key: String,
    pub(super) value: Vec<u8>,
    pub(super) lease: LeaseId,
}

/// The key an election's winner holds (what `resign` takes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct LeaderKey(Value);

/// How a hub reaches etcd: the members, and the credentials and TLS they want.
#[derive(Clone)]
pub(super) struct EtcdAccess {
    pub(super) endpoints: Vec<String>,
    pub(super) credentials: Option<(String, String)>,
    /// With `https://` members.
    pub(super) tls: Option<TlsConfig>,
}

/// The TLS settings of `cluster:` for `https://` members: the CA (`etcd_ca_file`, else
/// the public web's roots) and this hub's client certificate (`etcd_cert_file`,
/// `etcd_key_file`). An error names the field and says what is wrong with its file.
pub fn etcd_tls(cc: &crate::config::ClusterConfig) -> Result<TlsConfig, (&'static str, String)> {
    fn pem(field: &'static str, path: &std::path::Path) -> Result<Vec<PemItem<'static>>, (&'static str, String)> {
        let bytes = std::fs::read(path).map_err(|e| (field, format!("{}: {e}", path.display())))?;
        let items: Result<Vec<PemItem<'static>>, _> = parse_pem(&bytes).collect();
        items.map_err(|e| (field, format!("{}: not PEM ({e})", path.display())))
    }
    fn certificates(
        field: &'static str,
        path: &std::path::Path,
    ) -> Result<Vec<Certificate<'static>>, (&'static str, String)> {
        let certs: Vec<Certificate<'static>> = pem(field, path)?
            .into_iter()
            .filter_map(|i| match i {
                PemItem::Certificate(c) => Some(c),
                _ => None,
            })
            .collect();
        if certs.is_empty() {
            return Err((field, format!("{}: no certificate in it", path.display())));
        }
        Ok(certs)
    }
    let mut b = TlsConfig::builder();
    if let Some(path) = &cc.etcd_ca_file {
        b = b.root_certs(RootCerts::new_with_certs(&certificates("cluster.etcd_ca_file", path)?));
    }
    if let (Some(cert), Some(key)) = (&cc.etcd_cert_file, &cc.etcd_key_file) {
        let chain = certificates("cluster.etcd_cert_file", cert)?;
        let private = pem("cluster.etcd_key_file", key)?.into_iter().find_map(|i| match i {
            PemItem::PrivateKey(k) => Some(k),
            _ => None,
        });
        let Some(private) = private else {
            return Err(("cluster.etcd_key_file", format!("{}: no private key in it", key.display())));
        };
        b = b.client_cert(Some(ClientCert::new_with_certs(&chain, private)));
    }
    Ok(b.build())
}

pub(super) struct Etcd {
    endpoints: Vec<String>,
    /// The member that answered last.
    current: usize,
    agent: ureq::Agent,
    credentials: Option<(String, String)>,
    token: Option<String>,
    /// No call runs past this (all members tried included): the cluster thread sets it
    /// to the end of its lease, so a hub cut off from etcd notices in time.
    pub(super) deadline: Option<Instant>,
}

fn b64(s: impl AsRef<[u8]>) -> String {
    B64.encode(s)
}

/// The end of the range of keys that start with `prefix` (its last byte plus one).
fn prefix_end(prefix: &str) -> String {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1; // our prefixes end in '/', never 0xff
    }
    b64(end)
}

fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn decode(v: &Value) -> Vec<u8> {
    v.as_str().and_then(|s| B64.decode(s).ok()).unwrap_or_default()
}

fn key_value(kv: &Value) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(&decode(&kv["key"])).into_owned(),
        value: decode(&kv["value"]),
        lease: int(&kv["lease"]),
    }
}

impl Etcd {
    pub(super) fn new(access: &EtcdAccess) -> Self {
        let mut config =
            ureq::Agent::config_builder().timeout_global(Some(REQUEST_TIMEOUT)).http_status_as_error(false);
        if let Some(tls) = &access.tls {
            config = config.tls_config(tls.clone());
        }
        Self {
            endpoints: access.endpoints.clone(),
            current: 0,
            agent: config.build().into(),
            credentials: access.credentials.clone(),
            token: None,
            deadline: None,
        }
    }

    /// POSTs `body` to `path` on a member, trying each once from the last that answered,
    /// all within `timeout` (and `deadline`).
    fn call(&mut self, path: &str, body: &Value, timeout: Duration) -> Result<Value, EtcdError> {
        let now = || super::clock().0;
        let end = self.deadline.map_or(now() + timeout, |d| d.min(now() + timeout));
        let mut last = String::from("no endpoints");
        for attempt in 0..self.endpoints.len() {
            let i = (self.current + attempt) % self.endpoints.len();
            let timeout = end.saturating_duration_since(now());
            if timeout.is_zero() {
                last = format!("{last} (and no time left for another member)");
                break;
            }
            if self.credentials.is_some() && self.token.is_none() {
                if let Err(e) = self.authenticate(i) {
                    last = e.to_string();
                    continue;
                }
            }
            match self.post(i, path, body, timeout) {
                Ok(v) => {
                    self.current = i;
                    return Ok(v);
                }
                Err(EtcdError::Server(m)) if m.contains("invalid auth token") => {
                    self.token = None;
                    last = m;
                }
                Err(EtcdError::Server(m)) => {
                    self.current = i;
                    return Err(EtcdError::Server(m));
                }
                Err(EtcdError::Unreachable(m)) => last = m,
            }
        }
        Err(EtcdError::Unreachable(last))
    }

    fn post(&self, i: usize, path: &str, body: &Value, timeout: Duration) -> Result<Value, EtcdError> {
        let url = format!("{}{path}", self.endpoints[i]);
        let mut req = self.agent.post(&url).config().timeout_global(Some(timeout)).build();
        if let Some(t) = &self.token {
            req = req.header("Authorization", t);
        }
        let mut resp =
            req.send_json(body).map_err(|e| EtcdError::Unreachable(format!("{}: {e}", self.endpoints[i])))?;
        let status = resp.status();
        let v: Value =
            resp.body_mut().read_json().map_err(|e| EtcdError::Unreachable(format!("{}: {e}", self.endpoints[i])))?;
        if let Some(m) = v.get("error").or_else(|| v.get("message")).and_then(Value::as_str) {
            // a member without a quorum behind it answers, but cannot serve: try another
            // ("election: no leader" is an answer: nobody won that election)
            let no_quorum = m.contains("timed out") || m.contains("etcdserver: no leader") || m.contains("unhealthy");
            if no_quorum {
                return Err(EtcdError::Unreachable(format!("{}: {m}", self.endpoints[i])));
            }
            return Err(EtcdError::Server(m.to_string()));
        }
        if !status.is_success() {
            return Err(EtcdError::Server(format!("{}: HTTP {status}", self.endpoints[i])));
        }
        Ok(v)
    }

    fn authenticate(&mut self, i: usize) -> Result<(), EtcdError> {
        let Some((user, password)) = &self.credentials else { return Ok(()) };
        let v = self.post(i, "/v3/auth/authenticate", &json!({"name": user, "password": password}), REQUEST_TIMEOUT)?;
        self.token = v["token"].as_str().map(str::to_string);
        Ok(())
    }

    /// A lease of `ttl`; keys put under it vanish when it is not kept alive.
    pub(super) fn grant(&mut self, ttl: Duration) -> Result<LeaseId, EtcdError> {
        let v = self.call("/v3/lease/grant", &json!({"TTL": ttl.as_secs().max(1)}), REQUEST_TIMEOUT)?;
        match int(&v["ID"]) {
            0 => Err(EtcdError::Server("lease grant without an id".into())),
            id => Ok(id),
        }
    }

    /// Renews `lease`; false if etcd no longer has it (it expired or was revoked).
    pub(super) fn keep_alive(&mut self, lease: LeaseId) -> Result<bool, EtcdError> {
        let v = self.call("/v3/lease/keepalive", &json!({"ID": lease.to_string()}), REQUEST_TIMEOUT)?;
        Ok(int(&v["result"]["TTL"]) > 0)
    }

    pub(super) fn revoke(&mut self, lease: LeaseId) -> Result<(), EtcdError> {
        self.call("/v3/lease/revoke", &json!({"ID": lease.to_string()}), REQUEST_TIMEOUT).map(|_| ())
    }

    pub(super) fn put(&mut self, key: &str, value: &[u8], lease: LeaseId) -> Result<(), EtcdError> {
        let body = json!({"key": b64(key), "value": b64(value), "lease": lease.to_string()});
        self.call("/v3/kv/put", &body, REQUEST_TIMEOUT).map(|_| ())
    }

    /// Every key starting with `prefix` (a linearizable read: it needs a quorum).
    pub(super) fn range_prefix(&mut self, prefix: &str) -> Result<Vec<KeyValue>, EtcdError> {
        let body = json!({"key": b64(prefix), "range_end": prefix_end(prefix)});
        let v = self.call("/v3/kv/range", &body, REQUEST_TIMEOUT)?;
        Ok(v["kvs"].as_array().map(|a| a.iter().map(key_value).collect()).unwrap_or_default())
    }

    /// Creates `a` and `b` with their values if neither exists; otherwise changes nothing
    /// and returns what `a` holds (if anything). `Ok(None)`: created.
    pub(super) fn create_both(
        &mut self,
        (a, a_value): (&str, &[u8]),
        (b, b_value): (&str, &[u8]),
    ) -> Result<Option<Option<Vec<u8>>>, EtcdError> {
        let absent = |k: &str| json!({"key": b64(k), "target": "CREATE", "create_revision": "0"});
        let put = |k: &str, v: &[u8]| json!({"requestPut": {"key": b64(k), "value": b64(v)}});
        let body = json!({
            "compare": [absent(a), absent(b)],
            "success": [put(a, a_value), put(b, b_value)],
            "failure": [{"requestRange": {"key": b64(a)}}],
        });
        let v = self.call("/v3/kv/txn", &body, REQUEST_TIMEOUT)?;
        if v["succeeded"].as_bool() == Some(true) {
            return Ok(None);
        }
        let kvs = &v["responses"][0]["response_range"]["kvs"];
        Ok(Some(kvs.as_array().and_then(|a| a.first()).map(|kv| decode(&kv["value"]))))
    }

    /// Waits (up to `wait`) to win election `name` under `lease`, announcing `value`.
    pub(super) fn campaign(
        &mut self,
        name: &str,
        lease: LeaseId,
        value: &[u8],
        wait: Duration,
    ) -> Result<LeaderKey, EtcdError> {
        let body = json!({"name": b64(name), "lease": lease.to_string(), "value": b64(value)});
        let v = self.call("/v3/election/campaign", &body, wait)?;
        Ok(LeaderKey(v["leader"].clone()))
    }

    /// What the current winner of election `name` announced; `None`: no winner.
    pub(super) fn leader(&mut self, name: &str) -> Result<Option<Vec<u8>>, EtcdError> {
        match self.call("/v3/election/leader", &json!({"name": b64(name)}), REQUEST_TIMEOUT) {
            Ok(v) => Ok(Some(decode(&v["kv"]["value"]))),
            Err(EtcdError::Server(m)) if m.contains("election: no leader") => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub(super) fn resign(&mut self, leader: &LeaderKey) -> Result<(), EtcdError> {
        self.call("/v3/election/resign", &json!({"leader": leader.0}), REQUEST_TIMEOUT).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ends_at_its_last_byte_plus_one() {
        assert_eq!(B64.decode(prefix_end("/mpvpn/n/hubs/")).unwrap(), b"/mpvpn/n/hubs0");
    }

    #[test]
    fn numbers_come_as_strings_or_numbers() {
        assert_eq!(int(&json!("7587873")), 7587873);
        assert_eq!(int(&json!(5)), 5);
        assert_eq!(int(&json!(null)), 0);
        assert_eq!(int(&json!("x")), 0);
    }
}
