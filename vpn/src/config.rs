//! `hub.yaml` and `peer.yaml`, validated with errors that name the field and line.

use crate::ip::Prefix;
use crate::{PLAIN_TUN_MTU, TUN_MTU};
use common::config::{check, check_log_level, from_yaml, ConfigError, DEFAULT_LOG_LEVEL};
use common::crypto::Psk;
use common::driver::files::{load_key, loose_permissions, KeyError};
use serde::Deserialize;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

pub const DEFAULT_HUB_LISTEN: &str = "127.0.0.1:5000";
pub const DEFAULT_TUNNEL: &str = "127.0.0.1:3000";
pub const DEFAULT_TUN: &str = "mpvpn0";
pub const DEFAULT_PEER_TIMEOUT_SECS: u64 = 15;

fn default_hub_listen() -> String {
    DEFAULT_HUB_LISTEN.into()
}
fn default_tunnel() -> String {
    DEFAULT_TUNNEL.into()
}
fn default_tun() -> String {
    DEFAULT_TUN.into()
}
fn default_peer_timeout() -> u64 {
    DEFAULT_PEER_TIMEOUT_SECS
}
fn default_log_level() -> String {
    DEFAULT_LOG_LEVEL.into()
}

/// A peer as the hub knows it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HubPeerConfig {
    pub name: String,
    /// The peer's key (base64, as `mpvpn genkey` prints) ...
    #[serde(default)]
    pub key: Option<String>,
    /// ... or a file holding it.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// A fixed VPN address; otherwise one from the pool, kept for the name.
    #[serde(default)]
    pub address: Option<Ipv4Addr>,
    /// Subnets this peer may announce (default: none). Announcements outside them are
    /// refused. 0.0.0.0/0 makes it an exit node and must be listed explicitly.
    #[serde(default)]
    pub routes: Vec<Prefix>,
}

/// `mpvpn hub -c hub.yaml`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HubConfig {
    /// Where the hub takes datagrams: the target of the local mpserver.
    #[serde(default = "default_hub_listen")]
    pub listen: String,
    #[serde(default = "default_tun")]
    pub tun: String,
    /// The VPN network, e.g. 10.99.0.0/24.
    pub network: Prefix,
    /// The hub's own VPN address (default: the network's first host).
    #[serde(default)]
    pub address: Option<Ipv4Addr>,
    /// TUN MTU announced to peers (default and maximum: derived from the tunnel).
    #[serde(default)]
    pub mtu: Option<u16>,
    #[serde(default = "default_peer_timeout")]
    pub peer_timeout_secs: u64,
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// `ip:port` to serve Prometheus metrics on (`GET /metrics`); none by default.
    #[serde(default)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    #[serde(default = "default_log_level")]
    pub log_level: String,
    pub peers: Vec<HubPeerConfig>,
    /// Names: the hub answers DNS for `<peer>.<domain>` on its VPN address (port 53), and
    /// peers point their resolver at it for that domain.
    #[serde(default)]
    pub dns: Option<HubDnsConfig>,
    /// Run the multipath server in this process (an mpserver YAML config; its `target`
    /// is not needed) instead of taking datagrams from a separate mpserver on `listen`.
    #[serde(default)]
    pub embedded_server: Option<PathBuf>,
    /// The mesh's rendezvous port (public `ip:port`, e.g. `0.0.0.0:5200`): peers' mesh
    /// sockets ask it where they are seen from (their server-reflexive candidates).
    #[serde(default)]
    pub rendezvous: Option<SocketAddr>,
    /// Where the hub keeps the addresses it gave out, by peer name, across restarts
    /// (default: beside the config, `<name>.state.json`; `--state-file` overrides).
    #[serde(default)]
    pub state_file: Option<PathBuf>,
    /// What the relay carries for one mesh pair (both ways), at most, in Mbit/s.
    #[serde(default = "default_relay_mbit")]
    pub relay_mbit_per_pair: u64,
    /// Several hubs as one, on etcd (none: this hub alone, its own master).
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
}

/// etcd's shortest lease with its default election timeout (1 s): a hub that dies, or
/// is cut off, leaves the cluster 2 s after its last renewal.
pub const DEFAULT_LEASE_TTL_SECS: u64 = 2;

fn default_lease_ttl() -> u64 {
    DEFAULT_LEASE_TTL_SECS
}

/// hub.yaml's `cluster:`: this hub's place among the hubs of one network.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This hub's name, unique among the hubs.
    pub name: String,
    /// The client URLs of the etcd members (`http://ip:port`, or all `https://`).
    pub etcd: Vec<String>,
    /// The key every hub of the cluster holds (`mpvpn genkey`): it signs what a hub
    /// publishes about itself, so a record in etcd without it is not believed.
    pub key_file: PathBuf,
    /// How peers and the other hubs reach this hub.
    #[serde(default)]
    pub advertise: ClusterAdvertise,
    /// Run with `up` when this hub becomes the master, `down` when it stops being it.
    #[serde(default)]
    pub on_master: Option<PathBuf>,
    /// etcd's user, when etcd has authentication on (with `etcd_password_file`).
    #[serde(default)]
    pub etcd_user: Option<String>,
    #[serde(default)]
    pub etcd_password_file: Option<PathBuf>,
    /// With `https://` members: the CA that signed their certificates (PEM; default:
    /// the public web's roots), and this hub's client certificate and key (PEM, with
    /// etcd's `--client-cert-auth`).
    #[serde(default)]
    pub etcd_ca_file: Option<PathBuf>,
    #[serde(default)]
    pub etcd_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub etcd_key_file: Option<PathBuf>,
    /// How long this hub's membership (and mastership) outlives its last word to etcd.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl_secs: u64,
    /// Where this hub takes packets the other hubs forward to its peers over one UDP
    /// path (none: only over the multipath tunnel, `tunnel_key_file`).
    #[serde(default)]
    pub forward_listen: Option<SocketAddr>,
    /// The key the hubs' multipath servers take (the peers' tunnel key): with it this hub
    /// forwards to each other hub over the multipath tunnel, every address in its
    /// `advertise.tunnel` a path, rather than to its `forward_listen`. Without
    /// `forward_listen` and this, the hub neither forwards nor takes forwarded packets.
    #[serde(default)]
    pub tunnel_key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterAdvertise {
    /// The multipath server's public address(es).
    #[serde(default)]
    pub tunnel: Vec<SocketAddr>,
    /// The public rendezvous port.
    #[serde(default)]
    pub rendezvous: Option<SocketAddr>,
    /// Where the other hubs send what they forward [default: `forward_listen`, when it
    /// names an address].
    #[serde(default)]
    pub forward: Option<SocketAddr>,
}

impl ClusterConfig {
    /// Where the other hubs reach this one's `forward_listen`.
    pub fn forward_advertised(&self) -> Option<SocketAddr> {
        self.advertise.forward.or(self.forward_listen.filter(|a| !a.ip().is_unspecified()))
    }

    fn check(&self, file: &str, text: &str) -> Result<(), ConfigError> {
        let why = "1-32 of a-z A-Z 0-9 - _ .".to_string();
        check(valid_name(&self.name), file, text, "cluster.name", "name", why)?;
        check(!self.etcd.is_empty(), file, text, "cluster.etcd", "etcd", "at least one etcd member URL".into())?;
        let tls = self.etcd.first().is_some_and(|e| e.starts_with("https://"));
        let scheme = if tls { "https://" } else { "http://" };
        for e in &self.etcd {
            let host = e.strip_prefix(scheme).map(|h| h.trim_end_matches('/'));
            let why = format!("`{e}` is not {scheme}host:port (all members http, or all https)");
            check(host.is_some_and(common::config::valid_host_port), file, text, "cluster.etcd", e, why)?;
        }
        let files = [
            ("cluster.etcd_ca_file", "etcd_ca_file", &self.etcd_ca_file),
            ("cluster.etcd_cert_file", "etcd_cert_file", &self.etcd_cert_file),
            ("cluster.etcd_key_file", "etcd_key_file", &self.etcd_key_file),
        ];
        for (field, key, path) in files {
            if path.is_none() {
                continue;
            }
            // etcd_tls below reads them (and says what is wrong with one)
            check(tls, file, text, field, key, "only with https:// etcd members".into())?;
        }
        let both = self.etcd_cert_file.is_some() == self.etcd_key_file.is_some();
        let why = "etcd_cert_file and etcd_key_file go together".to_string();
        check(both, file, text, "cluster.etcd_cert_file", "etcd_cert_file", why)?;
        if let (true, Err((field, why))) = (tls, crate::driver::etcd_tls(self)) {
            let key = field.trim_start_matches("cluster.");
            check(false, file, text, field, key, why)?;
        }
        let key = load_key(&self.key_file);
        let why = key.as_ref().err().map(|e| e.to_string()).unwrap_or_default();
        check(key.is_ok(), file, text, "cluster.key_file", "key_file", why)?;
        if let Some(t) = &self.tunnel_key_file {
            let key = load_key(t);
            let why = key.as_ref().err().map(|e| e.to_string()).unwrap_or_default();
            check(key.is_ok(), file, text, "cluster.tunnel_key_file", "tunnel_key_file", why)?;
        }
        let both = self.etcd_user.is_some() == self.etcd_password_file.is_some();
        let advertised = self.forward_listen.is_none() || self.forward_advertised().is_some();
        let why = "listens on every address: say in advertise.forward where the other hubs reach it".to_string();
        check(advertised, file, text, "cluster.forward_listen", "forward_listen", why)?;
        let why = "etcd_user and etcd_password_file go together".to_string();
        check(both, file, text, "cluster.etcd_user", "etcd_user", why)?;
        if let Some(p) = &self.etcd_password_file {
            let read = std::fs::read_to_string(p);
            let why = read.as_ref().err().map(|e| format!("{}: {e}", p.display())).unwrap_or_default();
            check(read.is_ok(), file, text, "cluster.etcd_password_file", "etcd_password_file", why)?;
        }
        let why = "2-60 (seconds)".to_string();
        check((2..=60).contains(&self.lease_ttl_secs), file, text, "cluster.lease_ttl_secs", "lease_ttl_secs", why)?;
        Ok(())
    }
}

fn default_relay_mbit() -> u64 {
    crate::hub::DEFAULT_RELAY_BYTES_PER_PAIR * 8 / 1_000_000
}

/// One address or a list of them.
#[derive(Debug, Clone, PartialEq)]
pub enum OneOrMany {
    One(SocketAddr),
    Many(Vec<SocketAddr>),
}

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        fn addr<E: serde::de::Error>(s: &str) -> Result<SocketAddr, E> {
            s.parse().map_err(|_| E::custom(format!("`{s}` is not ip:port")))
        }
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("ip:port or a list of them")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<OneOrMany, E> {
                addr(s).map(OneOrMany::One)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
                let mut v = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    v.push(addr(&s)?);
                }
                Ok(OneOrMany::Many(v))
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl OneOrMany {
    pub fn to_vec(&self) -> Vec<SocketAddr> {
        match self {
            Self::One(a) => vec![*a],
            Self::Many(v) => v.clone(),
        }
    }
}

/// `mesh:` in peer.yaml: direct sessions with other peers.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PeerMeshConfig {
    /// The mesh socket's address (`0.0.0.0:5100`), or one per local uplink.
    pub listen: OneOrMany,
    /// The hub's rendezvous port as this peer reaches it (`rendezvous:` in hub.yaml).
    pub rendezvous: String,
    /// `fallback` (default): the hub relays only while no direct path is up; `always`:
    /// the relay carries a copy too (first copy wins).
    #[serde(default)]
    pub relay: crate::mesh::RelayMode,
    /// `on-demand` (default): punch at the first packet for a peer; `always`: to every
    /// peer with a mesh socket at once.
    #[serde(default)]
    pub connect: crate::mesh::ConnectMode,
    /// How pair sessions spread datagrams over their direct paths with `relay:
    /// fallback`: `adaptive` (default), `duplicate` or `fec` (with `fec:`), as a
    /// client's `redundancy:`. With `relay: always` every datagram goes on every path.
    #[serde(default)]
    pub redundancy: common::config::RedundancyName,
    #[serde(default)]
    pub fec: Option<common::config::FecShape>,
    #[serde(default = "common::config::default_target_loss")]
    pub target_loss: f64,
}

impl PeerMeshConfig {
    /// What pair sessions use with `relay: fallback`, or the field that is wrong and why.
    pub fn redundancy(&self) -> Result<common::redundancy::RedundancyConfig, (&'static str, String)> {
        common::config::RedundancySettings {
            name: self.redundancy,
            fec: self.fec,
            target_loss: self.target_loss,
            ..Default::default()
        }
        .to_config()
    }
}

/// `dns:` in hub.yaml.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HubDnsConfig {
    /// E.g. `mpvpn`: peer `beta` is `beta.mpvpn`.
    pub domain: String,
}

/// `mpvpn peer -c peer.yaml`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub name: String,
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The local mpclient's listen address.
    #[serde(default = "default_tunnel")]
    pub tunnel: String,
    /// The local mpclient's control socket (its `control_socket`): asked for the paths'
    /// remote addresses, so that no route from another peer covers a bridge. Default: the
    /// only mpclient running on this host.
    #[serde(default)]
    pub tunnel_control: Option<PathBuf>,
    #[serde(default = "default_tun")]
    pub tun: String,
    /// Expect this TUN MTU; the hub's must match (default: take the hub's).
    #[serde(default)]
    pub mtu: Option<u16>,
    /// Subnets behind this peer, announced to the others.
    #[serde(default)]
    pub routes: Vec<Prefix>,
    /// The VPN's DNS domain, pinned: names resolve through the hub only if its domain is
    /// this one (default: any private domain the hub names).
    #[serde(default)]
    pub dns_domain: Option<String>,
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// `ip:port` to serve Prometheus metrics on (`GET /metrics`); none by default.
    #[serde(default)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// Run the multipath client in this process (an mpclient YAML config: paths, key,
    /// cipher) instead of talking to a separate mpclient at `tunnel`.
    #[serde(default)]
    pub embedded_client: Option<PathBuf>,
    /// Direct sessions with other peers (the mesh); without it, everything goes through
    /// the hub.
    #[serde(default)]
    pub mesh: Option<PeerMeshConfig>,
    /// Several hubs of one cluster: the peer registers with every one at once; its
    /// traffic goes through the first in this order that is up (another takes over at once
    /// when it is lost); the mesh's relay goes through every one (`relay: always`)
    /// or the best. Each entry takes the keys the top-level `tunnel`, `tunnel_control`
    /// and `embedded_client` take for one hub.
    #[serde(default)]
    pub hubs: Vec<HubEndpoint>,
    /// With one hub reached by `embedded_client`: learn the cluster's other hubs from it
    /// and register with them too [true].
    #[serde(default = "default_true")]
    pub discover: bool,
}

fn default_true() -> bool {
    true
}

/// How a peer reaches one hub: a separate mpclient at `tunnel`, or an embedded client.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HubEndpoint {
    #[serde(default)]
    pub tunnel: Option<String>,
    #[serde(default)]
    pub tunnel_control: Option<PathBuf>,
    #[serde(default)]
    pub embedded_client: Option<PathBuf>,
    /// This hub's rendezvous port for the mesh (else `mesh.rendezvous`).
    #[serde(default)]
    pub rendezvous: Option<String>,
}

impl HubEndpoint {
    /// How the status and the log name it.
    pub fn describe(&self) -> String {
        match (&self.embedded_client, &self.tunnel) {
            (Some(p), _) => format!("embedded client {}", p.display()),
            (None, Some(t)) => format!("mpclient at {t}"),
            (None, None) => format!("mpclient at {DEFAULT_TUNNEL}"),
        }
    }
}

/// The most hubs a peer.yaml lists.
pub const MAX_HUBS: usize = 8;

/// A peer's name: 1-32 of a-z A-Z 0-9 - _ . (hub.yaml's rule; also what a peer takes
/// from a peer list into its hosts file).
pub fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= crate::wire::MAX_NAME_LEN
        && n.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

fn valid_tun(n: &str) -> bool {
    !n.is_empty() && n.len() < 16 && n.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// A key given inline or by file; `None` if neither.
/// Why a `key` / `key_file` pair gives no key.
#[derive(Debug, thiserror::Error)]
pub enum PeerKeyError {
    #[error("give `key` or `key_file`, not both")]
    Both,
    #[error("`key` is not 32 bytes of base64")]
    BadInline,
    #[error(transparent)]
    File(#[from] KeyError),
    #[error("this is a published example key: anyone can use it; make this peer's own with `mpvpn genkey`")]
    Example,
}

/// Keys once printed in the examples (conf/hub.yaml, conf/peer.yaml, before they named key
/// files): copied from there by many, never accepted.
pub const EXAMPLE_KEYS: &[&str] = &["8yU4dwHo24RNnX640qEnjIeC/tDzN0zynqJnajQ2fh8="];

/// A peer key, and a warning for the operator when its file is readable by others.
pub struct ResolvedKey {
    pub key: [u8; 32],
    pub warning: Option<String>,
}

/// The key given inline (`key`) or in a file (`key_file`); `None` if neither is given.
pub fn resolve_key(key: &Option<String>, key_file: &Option<PathBuf>) -> Result<Option<ResolvedKey>, PeerKeyError> {
    let resolved = resolve_any_key(key, key_file)?;
    let example =
        |k: &ResolvedKey| EXAMPLE_KEYS.iter().any(|e| Psk::from_base64(e).is_some_and(|e| e.bytes() == k.key));
    match resolved {
        Some(k) if example(&k) => Err(PeerKeyError::Example),
        r => Ok(r),
    }
}

fn resolve_any_key(key: &Option<String>, key_file: &Option<PathBuf>) -> Result<Option<ResolvedKey>, PeerKeyError> {
    match (key, key_file) {
        (Some(_), Some(_)) => Err(PeerKeyError::Both),
        (Some(k), None) => {
            let key = Psk::from_base64(k).ok_or(PeerKeyError::BadInline)?.bytes();
            Ok(Some(ResolvedKey { key, warning: None }))
        }
        (None, Some(f)) => {
            let loaded = load_key(f)?;
            Ok(Some(ResolvedKey { key: loaded.key.bytes(), warning: loaded.warning }))
        }
        (None, None) => Ok(None),
    }
}

impl HubConfig {
    /// The settings `new` changes that a running hub cannot take (a reload takes only
    /// `peers`): their names in hub.yaml. Every field is named here, so a new one must be
    /// sorted into "reloads" or "needs a restart".
    pub fn changes_needing_restart(&self, new: &HubConfig) -> Vec<&'static str> {
        let HubConfig {
            listen,
            tun,
            network,
            address,
            mtu,
            peer_timeout_secs,
            control_socket,
            metrics_listen,
            log_level,
            peers: _,
            dns,
            embedded_server,
            rendezvous,
            state_file,
            relay_mbit_per_pair,
            cluster,
        } = self;
        [
            ("listen", *listen != new.listen),
            ("tun", *tun != new.tun),
            ("network", *network != new.network),
            ("address", *address != new.address),
            ("mtu", *mtu != new.mtu),
            ("peer_timeout_secs", *peer_timeout_secs != new.peer_timeout_secs),
            ("control_socket", *control_socket != new.control_socket),
            ("metrics_listen", *metrics_listen != new.metrics_listen),
            ("log_level", *log_level != new.log_level),
            ("dns", *dns != new.dns),
            ("embedded_server", *embedded_server != new.embedded_server),
            ("rendezvous", *rendezvous != new.rendezvous),
            ("state_file", *state_file != new.state_file),
            ("relay_mbit_per_pair", *relay_mbit_per_pair != new.relay_mbit_per_pair),
            ("cluster", *cluster != new.cluster),
        ]
        .into_iter()
        .filter_map(|(field, changed)| changed.then_some(field))
        .collect()
    }

    /// The state file of the hub configured by `config` (`state_file`, else beside it).
    pub fn state_path(&self, config: &std::path::Path) -> PathBuf {
        self.state_file.clone().unwrap_or_else(|| config.with_extension("state.json"))
    }

    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let c: Self = from_yaml(file, text)?;
        check(
            c.listen.parse::<SocketAddr>().is_ok(),
            file,
            text,
            "listen",
            "listen",
            format!("`{}` is not ip:port", c.listen),
        )?;
        check(valid_tun(&c.tun), file, text, "tun", "tun", format!("`{}` is not an interface name", c.tun))?;
        check((8..=30).contains(&c.network.len), file, text, "network", "network", "prefix length 8-30".into())?;
        if let Some(a) = c.address {
            let why = format!("{a} is not a host address of {} (not its network or broadcast address)", c.network);
            check(c.network.is_host(a), file, text, "address", "address", why)?;
        }
        if let Some(m) = c.mtu {
            check(
                (576..=PLAIN_TUN_MTU).contains(&m),
                file,
                text,
                "mtu",
                "mtu",
                format!("576-{PLAIN_TUN_MTU} (up to {TUN_MTU} a packet is one tunnel datagram)"),
            )?;
        }
        check(c.peer_timeout_secs >= 3, file, text, "peer_timeout_secs", "peer_timeout_secs", "at least 3".into())?;
        let why = "1-100000 (Mbit/s the relay carries for one mesh pair)".to_string();
        let relay_ok = (1..=100_000).contains(&c.relay_mbit_per_pair);
        check(relay_ok, file, text, "relay_mbit_per_pair", "relay_mbit_per_pair", why)?;
        if let Some(d) = &c.dns {
            let why = format!("`{}` is not a DNS domain (labels of a-z 0-9 -)", d.domain);
            check(crate::dns::valid_domain(&d.domain), file, text, "dns.domain", "domain", why)?;
        }
        check_log_level(&c.log_level, file, text)?;
        if let Some(cl) = &c.cluster {
            cl.check(file, text)?;
        }
        check(!c.peers.is_empty(), file, text, "peers", "peers", "at least one peer".into())?;
        // every key is read once (a key file per peer: not once per later peer)
        let mut keys = Vec::with_capacity(c.peers.len());
        for i in 0..c.peers.len() {
            keys.push(c.check_peer(i, &keys, file, text)?);
        }
        Ok(c)
    }

    /// hub.yaml's `peers[i]`: its name, key, address and routes, against those before it
    /// (`earlier_keys`: theirs). Returns its key.
    fn check_peer(&self, i: usize, earlier_keys: &[[u8; 32]], file: &str, text: &str) -> Result<[u8; 32], ConfigError> {
        let p = &self.peers[i];
        let field = format!("peers[{i}]");
        check(valid_name(&p.name), file, text, &format!("{field}.name"), &p.name, "1-32 of a-z A-Z 0-9 - _ .".into())?;
        let dup = self.peers.iter().filter(|q| q.name == p.name).count() > 1;
        check(!dup, file, text, &format!("{field}.name"), &p.name, format!("`{}` appears twice", p.name))?;
        let key = resolve_key(&p.key, &p.key_file);
        let bytes = key.as_ref().ok().and_then(|k| k.as_ref()).map(|k| k.key);
        let msg = key.err().map_or_else(|| "needs `key` or `key_file`".into(), |e| e.to_string());
        check(bytes.is_some(), file, text, &format!("{field}.key"), &p.name, msg)?;
        let bytes = bytes.unwrap_or_default(); // there: checked just above
                                               // one key, one peer: with another's key, a peer could register as it
        let same = earlier_keys.iter().position(|k| *k == bytes).map(|j| &self.peers[j]);
        let why = same.map(|q| format!("the same key as peer `{}`: each peer needs its own", q.name));
        check(why.is_none(), file, text, &format!("{field}.key"), &p.name, why.unwrap_or_default())?;
        if let Some(a) = p.address {
            let (field, at) = (format!("{field}.address"), format!("address: {a}"));
            let why = if !self.network.contains(a) {
                Some(format!("{a} is not in {}", self.network))
            } else if !self.network.is_host(a) {
                Some(format!("{a} is the network or broadcast address of {}", self.network))
            } else if a == self.hub_addr() {
                Some(format!("{a} is the hub's own address"))
            } else {
                self.peers[..i]
                    .iter()
                    .find(|q| q.address == Some(a))
                    .map(|q| format!("{a} is also peer `{}`'s address", q.name))
            };
            check(why.is_none(), file, text, &field, &at, why.unwrap_or_default())?;
        }
        for r in &p.routes {
            let (field, at) = (format!("{field}.routes"), r.to_string());
            let why = if r.len > 0 && r.overlaps(&self.network) {
                Some(format!("{r} overlaps the VPN network {}", self.network))
            } else {
                // the default route only clashes with another default route
                self.peers[..i].iter().find_map(|q| {
                    q.routes
                        .iter()
                        .find(|o| (o.len == 0) == (r.len == 0) && o.overlaps(r))
                        .map(|o| format!("{r} overlaps peer `{}`'s {o}", q.name))
                })
            };
            check(why.is_none(), file, text, &field, &at, why.unwrap_or_default())?;
        }
        Ok(bytes)
    }

    /// A warning when this config, read from `path`, holds inline peer keys (`key:`) and
    /// others may read it: inline keys are only as private as the file that holds them.
    pub fn inline_key_warning(&self, path: &std::path::Path) -> Option<String> {
        let mode = loose_permissions(path).filter(|m| m & 0o007 != 0)?;
        self.peers.iter().any(|p| p.key.is_some()).then(|| {
            let p = path.display();
            format!("{p} holds peer keys and is world-readable (mode {mode:o}); run `chmod 600 {p}`")
        })
    }

    pub fn hub_addr(&self) -> Ipv4Addr {
        self.address.or_else(|| self.network.nth(1)).expect("validated prefix has hosts")
    }
}

impl PeerConfig {
    /// The hubs this peer reaches, in order: `hubs`, else the one the top-level keys name.
    pub fn endpoints(&self) -> Vec<HubEndpoint> {
        if !self.hubs.is_empty() {
            return self.hubs.clone();
        }
        vec![HubEndpoint {
            tunnel: Some(self.tunnel.clone()),
            tunnel_control: self.tunnel_control.clone(),
            embedded_client: self.embedded_client.clone(),
            rendezvous: None,
        }]
    }

    fn check_hubs(&self, file: &str, text: &str) -> Result<(), ConfigError> {
        if self.hubs.is_empty() {
            return Ok(());
        }
        let why = format!("1 to {MAX_HUBS} hubs");
        check(self.hubs.len() <= MAX_HUBS, file, text, "hubs", "hubs", why)?;
        let top = self.embedded_client.is_some() || self.tunnel_control.is_some() || self.tunnel != DEFAULT_TUNNEL;
        let why = "with hubs:, say tunnel / tunnel_control / embedded_client in each entry, not at the top".to_string();
        check(!top, file, text, "hubs", "hubs", why)?;
        for h in &self.hubs {
            let why = "each hub needs one of tunnel (a separate mpclient) or embedded_client".to_string();
            check(h.tunnel.is_some() != h.embedded_client.is_some(), file, text, "hubs", "hubs", why)?;
            if let Some(t) = &h.tunnel {
                let ok = common::config::valid_host_port(t);
                // the line of the value: `tunnel` alone would find an earlier key
                check(ok, file, text, "hubs.tunnel", t, format!("`{t}` is not host:port"))?;
            }
            if let Some(r) = &h.rendezvous {
                let ok = common::config::valid_host_port(r);
                check(ok, file, text, "hubs.rendezvous", r, format!("`{r}` is not host:port"))?;
            }
        }
        Ok(())
    }

    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let c: Self = from_yaml(file, text)?;
        check(valid_name(&c.name), file, text, "name", "name", "1-32 of a-z A-Z 0-9 - _ .".into())?;
        let key = resolve_key(&c.key, &c.key_file);
        let ok = matches!(key, Ok(Some(_)));
        let msg = key
            .err()
            .map_or_else(|| "needs `key` or `key_file` (make one with `mpvpn genkey`)".into(), |e| e.to_string());
        check(ok, file, text, "key", "key", msg)?;
        check(
            common::config::valid_host_port(&c.tunnel),
            file,
            text,
            "tunnel",
            "tunnel",
            format!("`{}` is not host:port", c.tunnel),
        )?;
        check(valid_tun(&c.tun), file, text, "tun", "tun", format!("`{}` is not an interface name", c.tun))?;
        c.check_hubs(file, text)?;
        check(c.routes.len() <= crate::wire::MAX_ROUTES, file, text, "routes", "routes", "at most 32".into())?;
        if let Some(d) = &c.dns_domain {
            let why = format!("`{d}` is not a private DNS domain (labels of a-z 0-9 -, not a public suffix)");
            check(crate::dns::acceptable_vpn_domain(d), file, text, "dns_domain", "dns_domain", why)?;
        }
        if let Some(m) = &c.mesh {
            let n = m.listen.to_vec().len();
            let max = crate::hub::MAX_MESH_SOCKETS;
            check((1..=max).contains(&n), file, text, "mesh.listen", "listen", format!("1 to {max} addresses"))?;
            check(
                common::config::valid_host_port(&m.rendezvous),
                file,
                text,
                "mesh.rendezvous",
                "rendezvous",
                format!("`{}` is not host:port", m.rendezvous),
            )?;
            if let Err((field, why)) = m.redundancy() {
                // `fec:` (not `redundancy: fec`), `target_loss:`
                let locate = format!("{}:", field.split('.').next().unwrap_or(field));
                check(false, file, text, &format!("mesh.{field}"), &locate, why)?;
            }
        }
        check_log_level(&c.log_level, file, text)?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    /// Another peer's (every peer has its own).
    const KEY2: &str = "BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBA=";

    /// Before, a hub started from the example config let anyone register with the key
    /// printed in it, and two peers could share one key (so A could register as B). Now
    /// both are config errors naming the field.
    #[test]
    fn the_example_key_and_a_shared_key_are_refused() {
        let example = EXAMPLE_KEYS[0];
        let hub = |a: &str, b: &str| {
            HubConfig::parse(
                "h.yaml",
                &format!("network: 10.99.0.0/24\npeers:\n  - name: a\n    key: {a}\n  - name: b\n    key: {b}\n"),
            )
        };
        let e = hub(KEY, example).unwrap_err().to_string();
        assert!(e.starts_with("h.yaml:5: peers[1].key: ") && e.contains("example key"), "{e}");
        let e = hub(KEY, KEY).unwrap_err().to_string();
        assert!(e.starts_with("h.yaml:5: peers[1].key: ") && e.contains("same key as peer `a`"), "{e}");
        assert!(hub(KEY, KEY2).is_ok());
        let e = PeerConfig::parse("p.yaml", &format!("name: a\nkey: {example}\n")).unwrap_err().to_string();
        assert!(e.contains("key") && e.contains("example key"), "{e}");
        // the keys the examples print are the ones refused
        for conf in [include_str!("../../conf/hub.yaml"), include_str!("../../conf/peer.yaml")] {
            for line in conf.lines().filter(|l| l.trim_start().starts_with("key:")) {
                let key = line.split_whitespace().nth(1).expect("a key");
                assert!(EXAMPLE_KEYS.contains(&key), "{key} is printed in an example but not refused");
            }
        }
    }

    /// Before, a reload that changed `dns:` or `metrics_listen` said nothing: those kept
    /// their running values silently.
    #[test]
    fn a_reload_names_every_setting_that_needs_a_restart() {
        let yaml = |extra: &str| format!("network: 10.99.0.0/24\npeers:\n  - name: a\n    key: {KEY}\n{extra}");
        let old = HubConfig::parse("hub.yaml", &yaml("")).unwrap();
        let peers_only = HubConfig::parse("hub.yaml", &yaml(&format!("  - name: b\n    key: {KEY2}\n"))).unwrap();
        assert_eq!(peers_only.peers.len(), 2);
        assert!(old.changes_needing_restart(&peers_only).is_empty());
        let new = HubConfig::parse(
            "hub.yaml",
            &yaml("dns:\n  domain: vpn\nmetrics_listen: 127.0.0.1:9100\nrendezvous: 0.0.0.0:5200\ntun: mpvpn9\n"),
        )
        .unwrap();
        assert_eq!(old.changes_needing_restart(&new), ["tun", "metrics_listen", "dns", "rendezvous"]);
    }

    /// Before: `resolve_key` dropped the loose-permission warning of key files, and
    /// inline keys in a world-readable hub.yaml were never checked.
    #[test]
    fn keys_others_can_read_are_warned_about() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("mpvpn-keyperm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let chmod = |p: &std::path::Path, m| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
        let key_file = dir.join("a.key");
        std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
        chmod(&key_file, 0o644);
        let resolved = resolve_key(&None, &Some(key_file.clone())).unwrap().unwrap();
        assert!(resolved.warning.is_some_and(|w| w.contains("chmod 600")));
        chmod(&key_file, 0o600);
        assert!(resolve_key(&None, &Some(key_file.clone())).unwrap().unwrap().warning.is_none());

        let hub_yaml = dir.join("hub.yaml");
        let text = format!("network: 10.99.0.0/24\npeers:\n  - name: a\n    key: {KEY}\n");
        std::fs::write(&hub_yaml, &text).unwrap();
        let c = HubConfig::parse("hub.yaml", &text).unwrap();
        chmod(&hub_yaml, 0o644);
        assert!(c.inline_key_warning(&hub_yaml).is_some_and(|w| w.contains("world-readable")));
        chmod(&hub_yaml, 0o640);
        assert!(c.inline_key_warning(&hub_yaml).is_none(), "group-readable is the operator's choice");
        let by_file = format!("network: 10.99.0.0/24\npeers:\n  - name: a\n    key_file: {}\n", key_file.display());
        chmod(&hub_yaml, 0o644);
        assert!(HubConfig::parse("hub.yaml", &by_file).unwrap().inline_key_warning(&hub_yaml).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dns_domain_is_checked() {
        let ok = format!("network: 10.99.0.0/24\ndns:\n  domain: vpn.example\npeers:\n  - name: a\n    key: {KEY}\n");
        assert_eq!(HubConfig::parse("hub.yaml", &ok).unwrap().dns.unwrap().domain, "vpn.example");
        let bad = ok.replace("vpn.example", "bad_domain");
        let e = HubConfig::parse("hub.yaml", &bad).unwrap_err().to_string();
        assert!(e.contains("dns.domain") && e.contains("hub.yaml:3"), "{e}");
    }

    /// A hub.yaml with `cluster:`, and its key file (written for test `tag`).
    fn cluster_yaml(tag: &str) -> (String, PathBuf) {
        let key = std::env::temp_dir().join(format!("mpvpn-cluster-test-{}-{tag}.key", std::process::id()));
        std::fs::write(&key, KEY2).unwrap();
        let text = format!(
            "network: 10.99.0.0/24\ncluster:\n  name: h1\n  etcd: [http://10.0.1.1:2379]\n  key_file: {}\npeers:\n  - name: a\n    key: {KEY}\n",
            key.display()
        );
        (text, key)
    }

    #[test]
    fn cluster_tls_config_is_checked() {
        let (text, key) = cluster_yaml("tls");
        // https members, the public roots
        assert!(HubConfig::parse("h.yaml", &text.replace("http://", "https://")).is_ok());
        for (from, to, why) in [
            (
                "[http://10.0.1.1:2379]",
                "[https://10.0.1.1:2379, http://10.0.2.1:2379]",
                "h.yaml:4: cluster.etcd: `http://10.0.2.1:2379` is not https://host:port (all members http, or all https)",
            ),
            ("  name: h1\n", "  name: h1\n  etcd_ca_file: /etc/hostname\n", "cluster.etcd_ca_file: only with https://"),
            (
                "[http://10.0.1.1:2379]\n",
                "[https://10.0.1.1:2379]\n  etcd_ca_file: /etc/hostname\n",
                "h.yaml:5: cluster.etcd_ca_file: /etc/hostname: no certificate in it",
            ),
            (
                "[http://10.0.1.1:2379]\n",
                "[https://10.0.1.1:2379]\n  etcd_ca_file: /no/such.pem\n",
                "h.yaml:5: cluster.etcd_ca_file: /no/such.pem: No such file",
            ),
            (
                "[http://10.0.1.1:2379]\n",
                "[https://10.0.1.1:2379]\n  etcd_cert_file: /etc/hostname\n",
                "cluster.etcd_cert_file: etcd_cert_file and etcd_key_file go together",
            ),
        ] {
            let e = HubConfig::parse("h.yaml", &text.replace(from, to)).unwrap_err().to_string();
            assert!(e.contains(why), "{to}: {e}");
        }
        let _ = std::fs::remove_file(&key);
    }

    #[test]
    fn cluster_config_is_checked() {
        let (text, key) = cluster_yaml("plain");
        let c = HubConfig::parse("h.yaml", &text).unwrap();
        let cl = c.cluster.as_ref().unwrap();
        assert_eq!((cl.lease_ttl_secs, cl.advertise.tunnel.len()), (DEFAULT_LEASE_TTL_SECS, 0));
        for (from, to, why) in [
            ("name: h1", "name: h/1", "h.yaml:3: cluster.name: 1-32 of"),
            ("[http://10.0.1.1:2379]", "[10.0.1.1:2379]", "cluster.etcd: `10.0.1.1:2379` is not http://host:port"),
            ("[http://10.0.1.1:2379]", "[]", "cluster.etcd: at least one"),
            ("mpvpn-cluster-test", "mpvpn-no-such-file", "h.yaml:5: cluster.key_file: "),
            (
                "  name: h1\n",
                "  name: h1\n  etcd_user: u\n",
                "cluster.etcd_user: etcd_user and etcd_password_file go together",
            ),
            ("  name: h1\n", "  name: h1\n  lease_ttl_secs: 1\n", "cluster.lease_ttl_secs: 2-60"),
            ("  name: h1\n", "  name: h1\n  leader: x\n", "unknown field `leader`"),
            (
                "  name: h1\n",
                "  name: h1\n  forward_listen: 0.0.0.0:5300\n",
                "h.yaml:4: cluster.forward_listen: listens on every address: say in advertise.forward",
            ),
            (
                "  name: h1\n",
                "  name: h1\n  tunnel_key_file: /nonexistent/tunnel.key\n",
                "h.yaml:4: cluster.tunnel_key_file: ",
            ),
        ] {
            let e = HubConfig::parse("h.yaml", &text.replace(from, to)).unwrap_err().to_string();
            assert!(e.contains(why), "{from} -> {to}: {e}");
        }
        let on = |extra: &str| {
            let c = HubConfig::parse("h.yaml", &text.replace("  name: h1\n", &format!("  name: h1\n{extra}"))).unwrap();
            c.cluster.unwrap().forward_advertised()
        };
        assert_eq!(on(""), None);
        assert_eq!(on("  forward_listen: 10.0.1.1:5300\n"), Some("10.0.1.1:5300".parse().unwrap()));
        let both = "  forward_listen: 0.0.0.0:5300\n  advertise:\n    forward: 203.0.113.1:5300\n";
        assert_eq!(on(both), Some("203.0.113.1:5300".parse().unwrap()));
        let _ = std::fs::remove_file(&key);
    }

    #[test]
    fn hub_config() {
        let text = format!("network: 10.99.0.0/24\npeers:\n  - name: a\n    key: {KEY}\n  - name: b\n    key: {KEY2}\n    address: 10.99.0.9\n");
        let c = HubConfig::parse("h.yaml", &text).unwrap();
        assert_eq!(c.hub_addr(), Ipv4Addr::new(10, 99, 0, 1));
        for (addr, why) in [
            ("10.99.0.1", "the hub's own address"),
            ("10.99.0.0", "network or broadcast"),
            ("10.99.0.255", "network or broadcast"),
        ] {
            let e = HubConfig::parse("h.yaml", &text.replace("10.99.0.9", addr)).unwrap_err().to_string();
            assert!(e.starts_with("h.yaml:7: peers[1].address: ") && e.contains(why), "{e}");
        }
        let twice = text.replace(
            &format!("    key: {KEY}\n  - name: b"),
            &format!("    key: {KEY}\n    address: 10.99.0.9\n  - name: b"),
        );
        let e = HubConfig::parse("h.yaml", &twice).unwrap_err().to_string();
        assert!(e.contains("peers[1].address") && e.contains("also peer `a`'s address"), "{e}");
        let e = HubConfig::parse("h.yaml", &format!("address: 10.99.0.255\n{text}")).unwrap_err().to_string();
        assert!(e.contains("address: 10.99.0.255 is not a host address"), "{e}");
        // route allowances: never into the VPN, never two peers' overlapping
        let with_routes = |a: &str, b: &str| {
            text.replace(
                &format!("    key: {KEY}\n  - name: b"),
                &format!("    key: {KEY}\n    routes: [{a}]\n  - name: b"),
            )
            .replace("    address: 10.99.0.9\n", &format!("    address: 10.99.0.9\n    routes: [{b}]\n"))
        };
        assert!(HubConfig::parse("h.yaml", &with_routes("192.168.1.0/24", "192.168.2.0/24")).is_ok());
        assert!(HubConfig::parse("h.yaml", &with_routes("0.0.0.0/0", "192.168.2.0/24")).is_ok(), "an exit node");
        let e = HubConfig::parse("h.yaml", &with_routes("192.168.0.0/16", "192.168.2.0/24")).unwrap_err().to_string();
        assert!(e.contains("peers[1].routes") && e.contains("overlaps peer `a`'s 192.168.0.0/16"), "{e}");
        let e = HubConfig::parse("h.yaml", &with_routes("10.0.0.0/8", "192.168.2.0/24")).unwrap_err().to_string();
        assert!(e.contains("peers[0].routes") && e.contains("overlaps the VPN network"), "{e}");
        let e = HubConfig::parse("h.yaml", &with_routes("0.0.0.0/0", "0.0.0.0/0")).unwrap_err().to_string();
        assert!(e.contains("overlaps peer `a`'s 0.0.0.0/0"), "two exit nodes: {e}");
        let bad = text.replace("10.99.0.9", "10.98.0.9");
        let e = HubConfig::parse("h.yaml", &bad).unwrap_err();
        assert_eq!(e.to_string(), "h.yaml:7: peers[1].address: 10.98.0.9 is not in 10.99.0.0/24");
        let e = HubConfig::parse("h.yaml", &text.replace("key: AAAA", "kye: AAAA")).unwrap_err();
        assert!(e.to_string().contains("kye"), "{e}");
        let e = HubConfig::parse("h.yaml", &format!("{text}mtu: 1500\n")).unwrap_err();
        assert_eq!(e.field, "mtu");
        let e = HubConfig::parse("h.yaml", "network: 10.99.0.0/24\npeers:\n  - name: a\n").unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
    }

    #[test]
    fn peer_config() {
        let c = PeerConfig::parse("p.yaml", &format!("name: a\nkey: {KEY}\nroutes: [192.168.50.0/24]\n")).unwrap();
        assert_eq!(c.routes.len(), 1);
        assert_eq!(c.tunnel, DEFAULT_TUNNEL);
        let e = PeerConfig::parse("p.yaml", "name: a\n").unwrap_err();
        assert_eq!(e.field, "key");
        let e = PeerConfig::parse("p.yaml", &format!("name: a\nkey: {KEY}\nroutes: [192.168.50.0/40]\n")).unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
        assert_eq!(c.endpoints(), [HubEndpoint { tunnel: Some(DEFAULT_TUNNEL.into()), ..HubEndpoint::default() }]);
    }

    #[test]
    fn several_hubs_in_peer_config() {
        let base = format!("name: a\nkey: {KEY}\n");
        let hubs = "hubs:\n  - tunnel: 127.0.0.1:3000\n  - embedded_client: /etc/mptunnel/h2.yaml\n";
        let c = PeerConfig::parse("p.yaml", &format!("{base}{hubs}    rendezvous: 203.0.113.2:5200\n")).unwrap();
        assert_eq!(c.endpoints().len(), 2);
        assert_eq!(c.endpoints()[1].rendezvous.as_deref(), Some("203.0.113.2:5200"));
        assert_eq!(c.endpoints()[1].describe(), "embedded client /etc/mptunnel/h2.yaml");
        assert!(c.discover, "on by default");
        let off = PeerConfig::parse("p.yaml", &format!("{base}discover: false\n")).unwrap();
        assert!(!off.discover);
        for (yaml, why) in [
            (format!("{base}embedded_client: /x.yaml\n{hubs}"), "p.yaml:4: hubs: with hubs:, say tunnel"),
            (
                format!("{base}hubs:\n  - tunnel: 127.0.0.1:1\n    embedded_client: /x\n"),
                "p.yaml:3: hubs: each hub needs one of",
            ),
            (format!("{base}hubs:\n  - tunnel_control: /x.sock\n"), "each hub needs one of"),
            (format!("{base}hubs:\n  - tunnel: nope\n"), "hubs.tunnel: `nope` is not host:port"),
            (
                format!("{base}hubs:\n  - tunnel: 127.0.0.1:1\n    rendezvous: 10.0.0.1\n"),
                "p.yaml:5: hubs.rendezvous: `10.0.0.1` is not host:port",
            ),
            (
                format!("{base}mesh:\n  listen: 0.0.0.0:5100\n  rendezvous: h:5200\n  redundancy: fec\n  fec: {{data: 0, parity: 2}}\nhubs:\n  - tunnel: 127.0.0.1:1\n    rendezvous: nohost\n"),
                "p.yaml:10: hubs.rendezvous: `nohost` is not host:port",
            ),
            (
                format!("{base}mesh:\n  listen: 0.0.0.0:5100\n  rendezvous: h:5200\n  redundancy: fec\n  fec: {{data: 0, parity: 2}}\n"),
                "p.yaml:7: mesh.fec.data: fec.data must be",
            ),
            (format!("{base}hubs:\n  - tunel: 127.0.0.1:1\n"), "unknown field `tunel`"),
        ] {
            let e = PeerConfig::parse("p.yaml", &yaml).unwrap_err().to_string();
            assert!(e.contains(why), "{yaml}: {e}");
        }
    }
}
