//! The agent's configuration file (TOML, by default `/etc/floe/agent.toml`).
//!
//! ```toml
//! name = "alpha"                      # this host; must match its certificate's name
//! listen = "0.0.0.0:7420"
//! allowed_peers = ["beta", "gamma"]   # empty: any host with a certificate from the cluster CA
//!
//! [peers]                             # used by `floe migrate PID --to NAME`
//! beta = "10.0.0.2:7420"
//! gamma = "gamma.lan:7420"
//!
//! [limits]
//! max_concurrent_migrations = 4
//!
//! [tuning]
//! max_mtu = 1400
//! ```
//!
//! Only `name` is required. Unknown keys are refused, so a misspelt key is reported instead of
//! silently ignored.

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::certs::valid_host_name;
use crate::tls::Tuning;

/// Default port of the agent.
pub const DEFAULT_PORT: u16 = 7420;
/// Default path of the configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/floe/agent.toml";
/// Directory of the default certificate and key paths.
const DEFAULT_CERT_DIR: &str = "/etc/floe";
/// Smallest `limits.max_frame_bytes` accepted.
/// (page batches are up to 16 MiB of data plus their description).
const MIN_FRAME_BYTES: u32 = 16 << 20;

/// What can go wrong while loading the configuration or resolving a peer.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read the configuration")]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The file is not valid TOML or does not match the expected keys and types. `message` is
    /// toml's, with the line, the column and the offending key.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's description of the problem.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{}{key}: {reason}", in_file(.path))]
    Invalid {
        /// The file, when the configuration came from one.
        path: Option<PathBuf>,
        /// The key, dotted (`limits.max_frame_bytes`).
        key: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// `--to` is neither a name in `[peers]` nor an address.
    #[error("unknown peer {to:?}: it is not a name in [peers]; add `{to} = \"ADDR:{DEFAULT_PORT}\"` under [peers] in the agent configuration, or pass --to HOST:PORT")]
    UnknownPeer {
        /// What was asked for.
        to: String,
    },
    /// `--to` is an IP address that `[peers]` does not name, so the name its certificate must
    /// carry is unknown.
    #[error("{addr} is not listed in [peers], so the name its certificate must carry is unknown; add `NAME = \"{addr}\"` under [peers] (NAME as in the peer's certificate) or pass --to NAME:PORT")]
    UnnamedPeer {
        /// The address.
        addr: SocketAddr,
    },
    /// The host part of `--to HOST:PORT` is not a usable host name.
    #[error("{to:?}: {host:?} is not a valid host name")]
    BadPeerHost {
        /// What was asked for.
        to: String,
        /// Its host part.
        host: String,
    },
    /// A peer address could not be resolved.
    #[error("cannot resolve {addr:?} (peer {name}); check the name and the port, or use an IP address")]
    Resolve {
        /// The peer's name.
        name: String,
        /// The address that failed.
        addr: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// "FILE: " or nothing, for [`ConfigError::Invalid`].
fn in_file(path: &Option<PathBuf>) -> String {
    path.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default()
}

/// The agent's configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This host's name; must be the name in its certificate.
    pub name: String,
    /// Address the agent listens on for peers (UDP, QUIC).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Unix socket on which the agent takes commands from `floe`.
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// Directory of the agent's state and of incoming images.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The cluster CA certificate; see [`AgentConfig::ca_path`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// This host's certificate chain; see [`AgentConfig::cert_path`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// This host's private key; see [`AgentConfig::key_path`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// Host names allowed to connect; empty means any host with a certificate from the cluster CA.
    #[serde(default)]
    pub allowed_peers: Vec<String>,
    /// Log filter, in `tracing`'s EnvFilter syntax (`info`, `floe_agent=debug,info`, ...).
    #[serde(default = "default_log")]
    pub log: String,
    /// Known peers: host name → "ADDR:PORT" (an IP address or a DNS name).
    #[serde(default)]
    pub peers: BTreeMap<String, String>,
    /// Resource limits.
    #[serde(default)]
    pub limits: Limits,
    /// Overrides of the transport tuning.
    #[serde(default)]
    pub tuning: TuningOverrides,
    /// A program run instead of `ip addr del/add` + gratuitous ARP when a
    /// migration moves a service address (routed or anycast setups):
    /// `PROGRAM release IP/PREFIX` on the source after the freeze (and
    /// `acquire` there again if the migration fails), `PROGRAM acquire
    /// IP/PREFIX` on the target before the connections are restored. A
    /// non-zero exit fails the migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address_hook: Option<PathBuf>,
}

/// Resource limits (`[limits]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Migrations in flight at once, incoming and outgoing together.
    pub max_concurrent_migrations: usize,
    /// Largest protocol frame accepted from a peer, in bytes.
    pub max_frame_bytes: u32,
    /// Memory an incoming migration may use, in bytes; 0: no limit besides MemAvailable.
    pub max_memory_bytes: u64,
    /// How long a migration whose outcome is unknown (the connection dropped at the switch
    /// over) waits for the other side before it is resolved, in seconds.
    pub in_doubt_timeout_s: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_concurrent_migrations: 4, max_frame_bytes: 16 << 20, max_memory_bytes: 0, in_doubt_timeout_s: 120 }
    }
}

/// Overrides of the transport tuning (`[tuning]`); unset values come from the link MTU.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TuningOverrides {
    /// UDP payload size at the start of a connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_mtu: Option<u16>,
    /// Upper bound of MTU discovery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_mtu: Option<u16>,
    /// A connection silent this long (milliseconds) is dead: the migration on it fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u64>,
    /// Keep-alive interval (milliseconds); must be below idle_timeout_ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_alive_ms: Option<u64>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT))
}

fn default_control_socket() -> PathBuf {
    PathBuf::from("/run/floe/agent.sock")
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/floe")
}

fn default_log() -> String {
    "info".to_string()
}

impl AgentConfig {
    /// A configuration for host `name` with every other setting at its default.
    pub fn new(name: &str) -> AgentConfig {
        AgentConfig {
            name: name.to_string(),
            listen: default_listen(),
            control_socket: default_control_socket(),
            data_dir: default_data_dir(),
            ca: None,
            cert: None,
            key: None,
            allowed_peers: Vec::new(),
            log: default_log(),
            peers: BTreeMap::new(),
            limits: Limits::default(),
            tuning: TuningOverrides::default(),
            address_hook: None,
        }
    }

    /// Reads, parses and validates the configuration file `path`.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let config =
            AgentConfig::parse(&text).map_err(|message| ConfigError::Parse { path: path.to_path_buf(), message })?;
        config.validate().map_err(|e| match e {
            ConfigError::Invalid { path: None, key, reason } => {
                ConfigError::Invalid { path: Some(path.to_path_buf()), key, reason }
            }
            other => other,
        })?;
        Ok(config)
    }

    /// Parses TOML text (no validation); the error is toml's message.
    fn parse(text: &str) -> Result<AgentConfig, String> {
        toml::from_str(text).map_err(|e: toml::de::Error| e.to_string().trim_end().to_string())
    }

    /// Checks the values that parsing alone does not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid =
            |key: &str, reason: String| Err(ConfigError::Invalid { path: None, key: key.to_string(), reason });
        let name_rule = "expected a host name of 1 to 253 characters from A-Z, a-z, 0-9, '.' and '-'";

        if !valid_host_name(&self.name) {
            return invalid("name", format!("{:?}: {name_rule}", self.name));
        }
        if !self.control_socket.is_absolute() {
            return invalid("control_socket", format!("{}: must be an absolute path", self.control_socket.display()));
        }
        if !self.data_dir.is_absolute() {
            return invalid("data_dir", format!("{}: must be an absolute path", self.data_dir.display()));
        }
        for (key, path) in [("ca", &self.ca), ("cert", &self.cert), ("key", &self.key)] {
            if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return invalid(key, "must not be empty (remove the key to use the default)".to_string());
            }
        }
        for peer in &self.allowed_peers {
            if !valid_host_name(peer) {
                return invalid("allowed_peers", format!("{peer:?}: {name_rule}"));
            }
        }
        for (name, addr) in &self.peers {
            if !valid_host_name(name) {
                return invalid("peers", format!("{name:?}: {name_rule}"));
            }
            if split_host_port(addr).is_none() {
                return invalid(
                    &format!("peers.{name}"),
                    format!(
                        "{addr:?}: expected ADDR:PORT, e.g. \"10.0.0.2:{DEFAULT_PORT}\" or \"host.lan:{DEFAULT_PORT}\""
                    ),
                );
            }
        }

        let limits = &self.limits;
        if limits.max_concurrent_migrations == 0 {
            return invalid("limits.max_concurrent_migrations", "must be at least 1".to_string());
        }
        if limits.max_frame_bytes < MIN_FRAME_BYTES {
            return invalid("limits.max_frame_bytes", format!("must be at least {MIN_FRAME_BYTES}"));
        }
        if limits.in_doubt_timeout_s == 0 {
            return invalid("limits.in_doubt_timeout_s", "must be at least 1".to_string());
        }

        for (key, value) in [("tuning.initial_mtu", self.tuning.initial_mtu), ("tuning.max_mtu", self.tuning.max_mtu)] {
            if let Some(v) = value {
                if !(1200..=65527).contains(&v) {
                    return invalid(key, format!("{v}: must be between 1200 and 65527 (UDP payload bytes)"));
                }
            }
        }
        if self.tuning.idle_timeout_ms.is_some_and(|ms| ms < 100) {
            return invalid("tuning.idle_timeout_ms", "must be at least 100".to_string());
        }
        if let (Some(idle), Some(ka)) = (self.tuning.idle_timeout_ms, self.tuning.keep_alive_ms) {
            if ka == 0 || ka >= idle {
                return invalid("tuning.keep_alive_ms", format!("{ka} must be between 1 and idle_timeout_ms ({idle})"));
            }
        }
        if let (Some(initial), Some(max)) = (self.tuning.initial_mtu, self.tuning.max_mtu) {
            if initial > max {
                return invalid("tuning.initial_mtu", format!("{initial} is larger than tuning.max_mtu ({max})"));
            }
        }

        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log) {
            return invalid("log", format!("{:?}: {e}", self.log));
        }
        Ok(())
    }

    /// The cluster CA certificate: `ca`, by default `/etc/floe/ca.pem`.
    pub fn ca_path(&self) -> PathBuf {
        self.ca.clone().unwrap_or_else(|| Path::new(DEFAULT_CERT_DIR).join("ca.pem"))
    }

    /// This host's certificate chain: `cert`, by default `/etc/floe/NAME.pem`.
    pub fn cert_path(&self) -> PathBuf {
        self.cert.clone().unwrap_or_else(|| Path::new(DEFAULT_CERT_DIR).join(format!("{}.pem", self.name)))
    }

    /// This host's private key: `key`, by default `/etc/floe/NAME.key`.
    pub fn key_path(&self) -> PathBuf {
        self.key.clone().unwrap_or_else(|| Path::new(DEFAULT_CERT_DIR).join(format!("{}.key", self.name)))
    }

    /// Whether a peer authenticated as `name` may connect: listed in `allowed_peers`, or any
    /// peer if the list is empty.
    pub fn peer_allowed(&self, name: &str) -> bool {
        self.allowed_peers.is_empty() || self.allowed_peers.iter().any(|p| p == name)
    }

    /// `base` with the `[tuning]` overrides applied.
    pub fn apply_tuning(&self, base: Tuning) -> Tuning {
        let mut tuning = base;
        if let Some(initial) = self.tuning.initial_mtu {
            tuning.initial_mtu = initial;
            tuning.max_mtu = tuning.max_mtu.max(initial);
        }
        if let Some(max) = self.tuning.max_mtu {
            tuning.max_mtu = max;
            tuning.initial_mtu = tuning.initial_mtu.min(max);
        }
        if let Some(ms) = self.tuning.idle_timeout_ms {
            tuning.idle_timeout_ms = ms;
            tuning.keep_alive_ms = tuning.keep_alive_ms.min(ms / 2).max(1);
        }
        if let Some(ms) = self.tuning.keep_alive_ms {
            tuning.keep_alive_ms = ms;
        }
        tuning
    }

    /// Where `floe migrate --to TO` goes: (address, name the peer's certificate must carry).
    ///
    /// `TO` is a name from `[peers]`; or `HOST:PORT`, whose host part is then the name; or
    /// `IP:PORT` (`[IPv6]:PORT`), whose name is looked up by address in `[peers]`.
    pub fn resolve_peer(&self, to: &str) -> Result<(SocketAddr, String), ConfigError> {
        if let Some(addr) = self.peers.get(to) {
            return Ok((resolve(to, addr)?, to.to_string()));
        }
        if let Ok(addr) = to.parse::<SocketAddr>() {
            let name = self.peer_named_by_addr(addr).ok_or(ConfigError::UnnamedPeer { addr })?;
            return Ok((addr, name));
        }
        let Some((host, _)) = split_host_port(to) else {
            return Err(ConfigError::UnknownPeer { to: to.to_string() });
        };
        if !valid_host_name(host) {
            return Err(ConfigError::BadPeerHost { to: to.to_string(), host: host.to_string() });
        }
        Ok((resolve(host, to)?, host.to_string()))
    }

    /// The name under `[peers]` whose address is `addr`: literal addresses first, then names
    /// resolved (failures ignored).
    fn peer_named_by_addr(&self, addr: SocketAddr) -> Option<String> {
        let literal = self.peers.iter().find(|(_, a)| a.parse::<SocketAddr>().ok() == Some(addr));
        if let Some((name, _)) = literal {
            return Some(name.clone());
        }
        self.peers
            .iter()
            .filter(|(_, a)| a.parse::<SocketAddr>().is_err())
            .find(|(_, a)| a.to_socket_addrs().is_ok_and(|mut it| it.any(|resolved| resolved == addr)))
            .map(|(name, _)| name.clone())
    }

    /// The configuration as TOML text.
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string(self)
    }
}

/// Splits "HOST:PORT" or "[IPV6]:PORT" into host and port; None without a valid port or host.
fn split_host_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port = port.parse::<u16>().ok().filter(|&p| p != 0)?;
    let host = match host.strip_prefix('[') {
        Some(bracketed) => {
            let ip = bracketed.strip_suffix(']')?;
            ip.parse::<Ipv6Addr>().ok()?;
            ip
        }
        // An unbracketed IPv6 address ("::1:7420") is ambiguous.
        None if host.is_empty() || host.contains(':') => return None,
        None => host,
    };
    Some((host, port))
}

/// Resolves `addr` ("HOST:PORT") of peer `name` to its first address.
fn resolve(name: &str, addr: &str) -> Result<SocketAddr, ConfigError> {
    let err = |source| ConfigError::Resolve { name: name.to_string(), addr: addr.to_string(), source };
    let mut addrs = addr.to_socket_addrs().map_err(err)?;
    addrs.next().ok_or_else(|| err(io::Error::new(io::ErrorKind::NotFound, "no address found")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is the test failure
mod tests {
    use super::*;

    fn parse(text: &str) -> AgentConfig {
        let config = AgentConfig::parse(text).unwrap();
        config.validate().unwrap();
        config
    }

    #[test]
    fn defaults() {
        let c = parse("name = \"alpha\"\n");
        assert_eq!(c.name, "alpha");
        assert_eq!(c.listen, "0.0.0.0:7420".parse().unwrap());
        assert_eq!(c.control_socket, Path::new("/run/floe/agent.sock"));
        assert_eq!(c.data_dir, Path::new("/var/lib/floe"));
        assert_eq!(c.ca_path(), Path::new("/etc/floe/ca.pem"));
        assert_eq!(c.cert_path(), Path::new("/etc/floe/alpha.pem"));
        assert_eq!(c.key_path(), Path::new("/etc/floe/alpha.key"));
        assert!(c.allowed_peers.is_empty());
        assert!(c.peer_allowed("anyone"));
        assert!(c.peers.is_empty());
        assert_eq!(c.limits, Limits::default());
        assert_eq!(c.limits.max_concurrent_migrations, 4);
        assert_eq!(c.limits.max_frame_bytes, 16 << 20);
        assert_eq!(c.limits.max_memory_bytes, 0);
        assert_eq!(c.limits.in_doubt_timeout_s, 120);
        assert_eq!(c.tuning, TuningOverrides::default());
        assert_eq!(c.log, "info");
        assert_eq!(c.apply_tuning(Tuning::default()), Tuning::default());
    }

    #[test]
    fn full_file() {
        let c = parse(
            r#"
name = "alpha"
listen = "[::]:7000"
control_socket = "/tmp/agent.sock"
data_dir = "/srv/floe"
ca = "/x/ca.pem"
cert = "/x/a.pem"
key = "/x/a.key"
allowed_peers = ["beta"]
log = "floe_agent=debug,info"

[peers]
beta = "10.0.0.2:7420"
gamma = "localhost:7421"

[limits]
max_concurrent_migrations = 2
max_frame_bytes = 33554432
max_memory_bytes = 1073741824
in_doubt_timeout_s = 30

[tuning]
initial_mtu = 8952
"#,
        );
        assert_eq!(c.listen, "[::]:7000".parse().unwrap());
        assert_eq!(c.cert_path(), Path::new("/x/a.pem"));
        assert!(c.peer_allowed("beta") && !c.peer_allowed("gamma"));
        assert_eq!(c.limits.max_memory_bytes, 1 << 30);
        let t = c.apply_tuning(Tuning::default());
        assert_eq!((t.initial_mtu, t.max_mtu), (8952, 8952));
        let t = c.apply_tuning(Tuning::for_path_mtu(65536));
        assert_eq!((t.initial_mtu, t.max_mtu), (8952, 8952));

        // Serializes back to an equivalent file.
        let again = parse(&c.to_toml().unwrap());
        assert_eq!(again.peers, c.peers);
        assert_eq!(again.limits, c.limits);
        assert_eq!(again.tuning, c.tuning);
        assert_eq!(again.key, c.key);
        let minimal = AgentConfig::new("alpha").to_toml().unwrap();
        assert!(!minimal.contains("cert"), "{minimal}");
        parse(&minimal);
    }

    #[test]
    fn unknown_keys_are_refused() {
        for (text, key) in [
            ("name = \"a\"\nlisten_addr = \"0.0.0.0:1\"\n", "listen_addr"),
            ("name = \"a\"\n[limits]\nmax_migrations = 3\n", "max_migrations"),
            ("name = \"a\"\n[tuning]\nmtu = 9000\n", "mtu"),
        ] {
            let err = AgentConfig::parse(text).unwrap_err();
            assert!(err.contains(key) && err.contains("line"), "{err}");
        }
        let err = AgentConfig::parse("listen = \"0.0.0.0:1\"\n").unwrap_err();
        assert!(err.contains("name"), "{err}");
        let err = AgentConfig::parse("name = \"a\"\nlisten = \"nowhere\"\n").unwrap_err();
        assert!(err.contains("listen"), "{err}");
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "name = \"alpha\"\n\nbogus = 1\n").unwrap();
        let err = AgentConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("agent.toml") && err.contains("bogus") && err.contains("line 3"), "{err}");

        std::fs::write(&path, "name = \"alpha\"\n[limits]\nmax_concurrent_migrations = 0\n").unwrap();
        let err = AgentConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("agent.toml: limits.max_concurrent_migrations: must be at least 1"), "{err}");

        std::fs::write(&path, "name = \"alpha\"\n").unwrap();
        assert_eq!(AgentConfig::load(&path).unwrap().name, "alpha");

        let err = AgentConfig::load(&dir.path().join("missing.toml")).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
    }

    #[test]
    fn validation() {
        let bad = [
            ("name = \"a b\"", "name"),
            ("name = \"a\"\ncontrol_socket = \"agent.sock\"", "control_socket"),
            ("name = \"a\"\ndata_dir = \"floe\"", "data_dir"),
            ("name = \"a\"\nallowed_peers = [\"x/y\"]", "allowed_peers"),
            ("name = \"a\"\n[peers]\nb = \"10.0.0.2\"", "peers.b"),
            ("name = \"a\"\n[limits]\nmax_frame_bytes = 0", "limits.max_frame_bytes"),
            ("name = \"a\"\n[limits]\nin_doubt_timeout_s = 0", "limits.in_doubt_timeout_s"),
            ("name = \"a\"\n[tuning]\ninitial_mtu = 100", "tuning.initial_mtu"),
            ("name = \"a\"\n[tuning]\ninitial_mtu = 9000\nmax_mtu = 1500", "tuning.initial_mtu"),
            ("name = \"a\"\nlog = \"foo=notalevel\"", "log"),
        ];
        for (text, key) in bad {
            let err = AgentConfig::parse(text).unwrap().validate().unwrap_err();
            match &err {
                ConfigError::Invalid { key: k, .. } => assert_eq!(k, key, "{text}: {err}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn resolve_peer() {
        let c = parse(
            r#"
name = "alpha"
[peers]
beta = "10.0.0.2:7420"
gamma = "127.0.0.1:7421"
local = "localhost:7422"
v6 = "[::1]:7423"
"#,
        );
        // A name.
        assert_eq!(c.resolve_peer("beta").unwrap(), ("10.0.0.2:7420".parse().unwrap(), "beta".to_string()));
        let (addr, name) = c.resolve_peer("local").unwrap();
        assert!(addr.ip().is_loopback() && addr.port() == 7422 && name == "local", "{addr} {name}");
        assert_eq!(c.resolve_peer("v6").unwrap().0, "[::1]:7423".parse().unwrap());
        // An address listed under [peers].
        assert_eq!(c.resolve_peer("10.0.0.2:7420").unwrap().1, "beta");
        assert_eq!(c.resolve_peer("127.0.0.1:7421").unwrap().1, "gamma");
        assert_eq!(c.resolve_peer("[::1]:7423").unwrap().1, "v6");
        // Found through a name under [peers] that resolves to it.
        assert_eq!(c.resolve_peer("127.0.0.1:7422").unwrap().1, "local");
        // An address not listed: its name is unknown.
        let err = c.resolve_peer("10.0.0.9:7420").unwrap_err();
        assert!(matches!(err, ConfigError::UnnamedPeer { .. }), "{err:?}");
        assert!(err.to_string().contains("[peers]"), "{err}");
        // Host:port: the host is the name.
        let (addr, name) = c.resolve_peer("localhost:9000").unwrap();
        assert_eq!((addr.port(), name.as_str()), (9000, "localhost"));
        // Neither.
        let err = c.resolve_peer("delta").unwrap_err();
        assert!(matches!(err, ConfigError::UnknownPeer { .. }), "{err:?}");
        assert!(err.to_string().contains("[peers]") && err.to_string().contains("--to HOST:PORT"), "{err}");
        let err = c.resolve_peer("bad_host:1").unwrap_err();
        assert!(matches!(err, ConfigError::BadPeerHost { .. }), "{err:?}");
        let err = c.resolve_peer("no-such-host.invalid:7420").unwrap_err();
        assert!(matches!(err, ConfigError::Resolve { .. }), "{err:?}");
    }

    #[test]
    fn host_port_splitting() {
        assert_eq!(split_host_port("a:1"), Some(("a", 1)));
        assert_eq!(split_host_port("[::1]:1"), Some(("::1", 1)));
        assert_eq!(split_host_port("::1:1"), None);
        assert_eq!(split_host_port("a"), None);
        assert_eq!(split_host_port("a:0"), None);
        assert_eq!(split_host_port(":1"), None);
        assert_eq!(split_host_port("a:x"), None);
    }
}
