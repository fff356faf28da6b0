//! Mutual TLS between agents, QUIC endpoints and their transport tuning.
//!
//! Every agent holds an [`Identity`]: the cluster CA (the only trust root), its own certificate
//! chain and its private key (see [`crate::certs`]). Both directions of every connection are
//! authenticated: a server requires a client certificate issued by the cluster CA
//! ([`WebPkiClientVerifier`], no anonymous clients) and a client checks the server certificate
//! against the same CA and the peer's host name. TLS 1.3 only, with the ring provider; there
//! is no plaintext mode and no way to skip verification. [`peer_name`] gives the name of the
//! authenticated peer of a connection.
//!
//! [`Tuning`] sizes the QUIC flow-control windows, the UDP socket buffers and the packet size
//! for bulk transfer on a LAN. [`Tuning::for_path_mtu`] and [`link_mtu_for`] let a connection
//! start at the full size of a jumbo-frame link instead of probing up from 1200 bytes.

use crate::sys::{get_int_option, set_int_option};
use std::fmt;
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt};
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;

/// ALPN protocol name of the agent-to-agent protocol.
pub const ALPN: &[u8] = b"floe-peer";

/// The smallest UDP payload QUIC allows (RFC 9000 §14).
const MIN_QUIC_MTU: u16 = 1200;
/// The largest UDP payload over IPv6 (and what quinn accepts as an MTU).
const MAX_QUIC_MTU: u16 = 65527;
/// IP + UDP header bytes subtracted from a link MTU: 40 (IPv6) + 8 (UDP), which also covers
/// IPv4's 20 + 8.
const IP_UDP_OVERHEAD: u32 = 48;
/// Largest datagram size for which UDP segmentation offload (GSO) is used. quinn hands the
/// kernel batches of up to 10 datagrams in one `sendmsg`, and the kernel refuses (EMSGSIZE, which
/// quinn drops silently) a batch of more than 64 KiB; larger datagrams are sent one by one.
/// So this is also the largest datagram floe sends by default, on links with a larger MTU too:
/// over a 9000-byte veth, 6500-byte datagrams in batches of ten move 0.90 GiB/s where 8952-byte
/// ones sent one by one move 0.62 (and cost the sender twice the system time).
const MAX_GSO_MTU: u16 = 6500;
/// Largest datagram accepted from a peer: a 9000-byte jumbo frame's payload, so that a peer
/// configured for larger datagrams than ours can still talk to us.
const MAX_ACCEPTED_MTU: u16 = 9000 - IP_UDP_OVERHEAD as u16;
/// The smallest initial congestion window, in bytes (RFC 9002 §7.2).
const INITIAL_WINDOW: u64 = 14720;

/// What can go wrong while loading an identity or setting up an endpoint.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file does not exist.
    #[error("{path}: {what} not found; {hint}")]
    Missing {
        /// Which file: "cluster CA certificate", "host certificate" or "host key".
        what: &'static str,
        /// The missing file.
        path: PathBuf,
        /// What to do about it.
        hint: &'static str,
    },
    /// A certificate or key file could not be read.
    #[error("{path}: cannot read the {what}")]
    Read {
        /// Which file.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A file is not valid PEM.
    #[error("{path}: malformed PEM in the {what}")]
    BadPem {
        /// Which file.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A file holds no PEM item of the expected kind.
    #[error("{path}: no {expected} found in the {what} (expected PEM)")]
    Empty {
        /// Which file.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The PEM item looked for.
        expected: &'static str,
    },
    /// The CA certificate cannot be used as a trust root.
    #[error("{path}: not a usable CA certificate")]
    BadCa {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: rustls::Error,
    },
    /// The private key cannot be used.
    #[error("{path}: unsupported or malformed private key")]
    BadKey {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: rustls::Error,
    },
    /// The private key does not belong to the certificate.
    #[error("{key} is not the private key of {cert}")]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The host certificate was not issued by the cluster CA, has expired, or lacks a usage.
    #[error("{cert} is not a valid certificate from the cluster CA {ca} (reissue it with `floe certs issue HOST`)")]
    NotFromCa {
        /// The host certificate file.
        cert: PathBuf,
        /// The CA certificate file.
        ca: PathBuf,
        /// What the verifier reported.
        #[source]
        source: rustls::Error,
    },
    /// The host certificate carries no name.
    #[error("{path}: the certificate has neither a common name nor a DNS name")]
    NoName {
        /// The file.
        path: PathBuf,
    },
    /// The certificate verifier could not be built.
    #[error("cannot build the {what} certificate verifier")]
    Verifier {
        /// "client" or "server".
        what: &'static str,
        /// The underlying error.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    /// rustls refused the configuration.
    #[error("cannot build the TLS {what} configuration")]
    Rustls {
        /// "client" or "server".
        what: &'static str,
        /// The underlying error.
        #[source]
        source: rustls::Error,
    },
    /// quinn refused the rustls configuration.
    #[error("cannot use the TLS {what} configuration for QUIC")]
    Quic {
        /// "client" or "server".
        what: &'static str,
        /// The underlying error.
        #[source]
        source: quinn::crypto::rustls::NoInitialCipherSuite,
    },
    /// The UDP socket could not be created.
    #[error("cannot bind a UDP socket on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The QUIC endpoint could not be created.
    #[error("cannot create a QUIC endpoint on {addr}")]
    Endpoint {
        /// The address.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A QUIC endpoint was created outside of a tokio runtime.
    #[error("no async runtime: QUIC endpoints must be created inside a tokio runtime")]
    NoRuntime,
    /// A connection could not be started.
    #[error("cannot connect to {name} at {addr}")]
    Connect {
        /// The peer's address.
        addr: SocketAddr,
        /// The server name the peer's certificate must carry.
        name: String,
        /// The underlying error.
        #[source]
        source: quinn::ConnectError,
    },
}

/// This agent's TLS identity: the cluster CA (the only trust root), our certificate chain and
/// our private key.
pub struct Identity {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    name: String,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            roots: Arc::clone(&self.roots),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            name: self.name.clone(),
        }
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("name", &self.name)
            .field("roots", &self.roots.len())
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads the cluster CA certificate `ca`, our certificate chain `cert` (leaf first) and our
    /// private key `key`, all PEM.
    ///
    /// Checks that the key belongs to the certificate and that the certificate is currently
    /// valid under the CA both as a client and as a server certificate, so that a wrong or
    /// expired file is reported here rather than as a failed handshake later.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Identity, TlsError> {
        const CA: &str = "cluster CA certificate";
        const CERT: &str = "host certificate";
        const KEY: &str = "host key";
        const CA_HINT: &str = "create the cluster CA once with `floe certs init` and copy its ca.pem to every host";
        const HOST_HINT: &str =
            "issue one with `floe certs issue HOST` on the machine that holds the CA and copy HOST.pem and HOST.key here";

        let ca_pem = read_pem(CA, ca, CA_HINT)?;
        let cert_pem = read_pem(CERT, cert, HOST_HINT)?;
        let key_pem = read_pem(KEY, key, HOST_HINT)?;

        let ca_certs = parse_certs(CA, ca, &ca_pem)?;
        let mut roots = RootCertStore::empty();
        for root in ca_certs {
            roots.add(root).map_err(|source| TlsError::BadCa { path: ca.to_path_buf(), source })?;
        }
        let chain = parse_certs(CERT, cert, &cert_pem)?;
        let private_key = rustls_pemfile::private_key(&mut key_pem.as_slice())
            .map_err(|source| TlsError::BadPem { what: KEY, path: key.to_path_buf(), source })?
            .ok_or_else(|| TlsError::Empty { what: KEY, path: key.to_path_buf(), expected: "private key" })?;

        let provider = provider();
        let signing_key = provider
            .key_provider
            .load_private_key(private_key.clone_key())
            .map_err(|source| TlsError::BadKey { path: key.to_path_buf(), source })?;
        match CertifiedKey::new(chain.clone(), signing_key).keys_match() {
            Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(_) => return Err(TlsError::KeyMismatch { cert: cert.to_path_buf(), key: key.to_path_buf() }),
        }

        let name = chain
            .first()
            .and_then(|leaf| cert_name(leaf))
            .ok_or_else(|| TlsError::NoName { path: cert.to_path_buf() })?;
        let identity = Identity { roots: Arc::new(roots), chain, key: private_key, name };
        identity.check_chain().map_err(|source| TlsError::NotFromCa {
            cert: cert.to_path_buf(),
            ca: ca.to_path_buf(),
            source,
        })?;
        Ok(identity)
    }

    /// Our host name: the CN (or else the first DNS name) of our certificate.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Verifies our own certificate the way peers will: as a client certificate, and as a
    /// server certificate for our name.
    fn check_chain(&self) -> Result<(), rustls::Error> {
        let provider = provider();
        let now = UnixTime::now();
        let (leaf, intermediates) = self.chain.split_first().ok_or(rustls::Error::NoCertificatesPresented)?;
        let client = WebPkiClientVerifier::builder_with_provider(Arc::clone(&self.roots), Arc::clone(&provider))
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        client.verify_client_cert(leaf, intermediates, now)?;
        if let Ok(server_name) = ServerName::try_from(self.name.as_str()) {
            let server = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::clone(&self.roots), provider)
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
            server.verify_server_cert(leaf, intermediates, &server_name, &[], now)?;
        }
        Ok(())
    }
}

/// Reads a PEM file, turning "not found" into an error that says what to do.
fn read_pem(what: &'static str, path: &Path, hint: &'static str) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => TlsError::Missing { what, path: path.to_path_buf(), hint },
        _ => TlsError::Read { what, path: path.to_path_buf(), source },
    })
}

/// Every certificate of a PEM file; at least one.
fn parse_certs(what: &'static str, path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::BadPem { what, path: path.to_path_buf(), source })?;
    if certs.is_empty() {
        return Err(TlsError::Empty { what, path: path.to_path_buf(), expected: "certificate" });
    }
    Ok(certs)
}

/// The crypto provider of every configuration: ring.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// QUIC transport settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuning {
    /// UDP payload size used from the start of a connection (at least 1200).
    pub initial_mtu: u16,
    /// Upper bound of path MTU discovery (UDP payload bytes); also the largest datagram this
    /// endpoint accepts.
    pub max_mtu: u16,
    /// Flow-control window of one stream, in bytes.
    pub stream_window: u64,
    /// Flow-control window of a whole connection, in bytes.
    pub conn_window: u64,
    /// Bytes a connection may have in flight or buffered for sending.
    pub send_window: u64,
    /// Size asked for the UDP socket's receive and send buffers (0 leaves the system default).
    pub socket_buffer: usize,
    /// A connection with no traffic for this long is closed (0: never).
    pub idle_timeout_ms: u64,
    /// Interval of keep-alive packets on an idle connection (0: none).
    pub keep_alive_ms: u64,
}

impl Default for Tuning {
    /// Bulk transfer on a LAN: 64 MiB per stream, 256 MiB per connection, 32 MiB socket
    /// buffers; packets start at 1200 bytes and MTU discovery probes up to 6500 bytes (the
    /// largest datagram sent in GSO batches, see [`MAX_GSO_MTU`]); a silent peer is dropped
    /// after 10 s, with keep-alives every second.
    fn default() -> Self {
        Tuning {
            initial_mtu: MIN_QUIC_MTU,
            max_mtu: MAX_GSO_MTU,
            stream_window: 64 << 20,
            conn_window: 256 << 20,
            send_window: 256 << 20,
            socket_buffer: 32 << 20,
            idle_timeout_ms: 10_000,
            keep_alive_ms: 1_000,
        }
    }
}

impl Tuning {
    /// The default tuning, but starting at the full packet size of a link with MTU `link_mtu`
    /// (IP + UDP headers subtracted, conservatively as for IPv6), clamped to [1200, 6500]
    /// (QUIC's minimum; the largest datagram sent in GSO batches). MTU discovery then only
    /// confirms that size.
    pub fn for_path_mtu(link_mtu: u32) -> Tuning {
        let payload = link_mtu.saturating_sub(IP_UDP_OVERHEAD).clamp(u32::from(MIN_QUIC_MTU), u32::from(MAX_GSO_MTU));
        let mtu = u16::try_from(payload).unwrap_or(MAX_QUIC_MTU);
        Tuning { initial_mtu: mtu, max_mtu: mtu, ..Tuning::default() }
    }

    /// The quinn transport configuration for these settings.
    pub fn transport_config(&self) -> TransportConfig {
        let initial = self.initial_mtu.clamp(MIN_QUIC_MTU, MAX_QUIC_MTU);
        let max = self.max_mtu.clamp(initial, MAX_QUIC_MTU);
        let mut mtud = MtuDiscoveryConfig::default();
        mtud.upper_bound(max);

        // quinn's default initial congestion window (14720 bytes) is fixed in bytes: a connection
        // starting with larger datagrams could not send a single one. Ten datagrams, like
        // Linux TCP's initial window of ten segments.
        let mut cubic = quinn::congestion::CubicConfig::default();
        cubic.initial_window((10 * u64::from(initial)).max(INITIAL_WINDOW));

        let mut tc = TransportConfig::default();
        tc.enable_segmentation_offload(max <= MAX_GSO_MTU)
            .congestion_controller_factory(Arc::new(cubic))
            .initial_mtu(initial)
            .min_mtu(MIN_QUIC_MTU)
            .mtu_discovery_config(Some(mtud))
            .stream_receive_window(varint(self.stream_window))
            .receive_window(varint(self.conn_window))
            .send_window(self.send_window)
            .max_idle_timeout((self.idle_timeout_ms > 0).then(|| IdleTimeout::from(varint(self.idle_timeout_ms))))
            .keep_alive_interval((self.keep_alive_ms > 0).then(|| Duration::from_millis(self.keep_alive_ms)));
        tc
    }

    /// The quinn endpoint configuration: accepts datagrams up to `max_mtu`, and at least a
    /// jumbo frame's.
    fn endpoint_config(&self) -> quinn::EndpointConfig {
        let mut config = quinn::EndpointConfig::default();
        let max = self.max_mtu.clamp(self.initial_mtu.max(MIN_QUIC_MTU), MAX_QUIC_MTU).max(MAX_ACCEPTED_MTU);
        if let Err(e) = config.max_udp_payload_size(max) {
            tracing::warn!(max, "cannot raise the QUIC max UDP payload size: {e}");
        }
        config
    }
}

/// `value` as a QUIC variable-length integer, saturated at its maximum.
fn varint(value: u64) -> VarInt {
    VarInt::from_u64(value).unwrap_or(VarInt::MAX)
}

/// The rustls server configuration of `id`: TLS 1.3, our certificate, and a client certificate
/// issued by the cluster CA required from every client.
pub fn server_crypto(id: &Identity) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::clone(&id.roots), Arc::clone(&provider))
        .build()
        .map_err(|source| TlsError::Verifier { what: "client", source })?;
    let rustls_err = |source| TlsError::Rustls { what: "server", source };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(rustls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())
        .map_err(rustls_err)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// The rustls client configuration of `id`: TLS 1.3, servers verified against the cluster CA,
/// our certificate presented.
pub fn client_crypto(id: &Identity) -> Result<rustls::ClientConfig, TlsError> {
    let rustls_err = |source| TlsError::Rustls { what: "client", source };
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(rustls_err)?
        .with_root_certificates(Arc::clone(&id.roots))
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
        .map_err(rustls_err)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// The quinn server configuration of `id` with `tuning`.
pub fn server_config(id: &Identity, tuning: &Tuning) -> Result<quinn::ServerConfig, TlsError> {
    let crypto =
        QuicServerConfig::try_from(server_crypto(id)?).map_err(|source| TlsError::Quic { what: "server", source })?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(tuning.transport_config()));
    Ok(config)
}

/// The quinn client configuration of `id` with `tuning`.
pub fn client_config(id: &Identity, tuning: &Tuning) -> Result<quinn::ClientConfig, TlsError> {
    let crypto =
        QuicClientConfig::try_from(client_crypto(id)?).map_err(|source| TlsError::Quic { what: "client", source })?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(tuning.transport_config()));
    Ok(config)
}

/// A QUIC endpoint listening on `bind` that accepts only peers with a certificate from the
/// cluster CA, and that can also connect to peers (it has a default client configuration).
///
/// Must be called inside a tokio runtime.
pub fn server_endpoint(bind: SocketAddr, id: &Identity, tuning: &Tuning) -> Result<quinn::Endpoint, TlsError> {
    let server = server_config(id, tuning)?;
    let client = client_config(id, tuning)?;
    let mut endpoint = endpoint(bind, Some(server), tuning)?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

/// A client-only QUIC endpoint bound to `bind` (port 0 for any) that presents our certificate
/// and verifies servers against the cluster CA. Connect with [`connect`].
///
/// Must be called inside a tokio runtime.
pub fn client_endpoint(bind: SocketAddr, id: &Identity, tuning: &Tuning) -> Result<quinn::Endpoint, TlsError> {
    let client = client_config(id, tuning)?;
    let mut endpoint = endpoint(bind, None, tuning)?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

/// Starts a connection from `ep` to the agent at `addr`, whose certificate must carry
/// `server_name` (its host name).
pub fn connect(ep: &quinn::Endpoint, addr: SocketAddr, server_name: &str) -> Result<quinn::Connecting, TlsError> {
    ep.connect(addr, server_name).map_err(|source| TlsError::Connect { addr, name: server_name.to_string(), source })
}

/// The host name of the authenticated peer of `conn`: the CN of its certificate, or else its
/// first DNS name. None before the handshake completes.
pub fn peer_name(conn: &quinn::Connection) -> Option<String> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    cert_name(chain.first()?)
}

/// The CN of a DER certificate, or else its first DNS subject alternative name.
fn cert_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    if let Some(cn) = cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()) {
        return Some(cn.to_string());
    }
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::DNSName(dns) => Some(dns.to_string()),
        _ => None,
    })
}

/// A quinn endpoint on a UDP socket of our own, with enlarged buffers.
fn endpoint(
    bind: SocketAddr,
    server: Option<quinn::ServerConfig>,
    tuning: &Tuning,
) -> Result<quinn::Endpoint, TlsError> {
    let runtime = quinn::default_runtime().ok_or(TlsError::NoRuntime)?;
    let socket = UdpSocket::bind(bind).map_err(|source| TlsError::Bind { addr: bind, source })?;
    if tuning.socket_buffer > 0 {
        set_socket_buffers(&socket, tuning.socket_buffer);
    }
    quinn::Endpoint::new(tuning.endpoint_config(), server, socket, runtime)
        .map_err(|source| TlsError::Endpoint { addr: bind, source })
}

/// Asks for `size`-byte receive and send buffers on `socket`: with `SO_RCVBUFFORCE` /
/// `SO_SNDBUFFORCE` (which ignore `net.core.rmem_max` / `wmem_max` but need CAP_NET_ADMIN),
/// else with `SO_RCVBUF` / `SO_SNDBUF`. Logs a warning if the kernel grants less.
fn set_socket_buffers(socket: &UdpSocket, size: usize) {
    // The kernel doubles the value it is given (bookkeeping overhead) and stores it in an int.
    let value = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX).min(libc::c_int::MAX / 2);
    let fd = socket.as_fd();
    for (force, plain, what, sysctl) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, "receive", "net.core.rmem_max"),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, "send", "net.core.wmem_max"),
    ] {
        if set_int_option(fd, libc::SOL_SOCKET, force, value).is_err() {
            if let Err(e) = set_int_option(fd, libc::SOL_SOCKET, plain, value) {
                tracing::warn!(size, "cannot set the UDP {what} buffer size: {e}");
                continue;
            }
        }
        match get_int_option(fd, libc::SOL_SOCKET, plain) {
            // What getsockopt reports includes the kernel's doubling.
            Ok(granted) if granted / 2 < value => tracing::warn!(
                requested = value,
                granted = granted / 2,
                "UDP {what} buffer smaller than requested; raise {sysctl} or run with CAP_NET_ADMIN"
            ),
            Ok(granted) => tracing::debug!(granted = granted / 2, "UDP {what} buffer set"),
            Err(e) => tracing::debug!("cannot read the UDP {what} buffer size: {e}"),
        }
    }
}

/// The MTU of the network interface that traffic to `peer` leaves through, if it can be found:
/// the local address the kernel picks for `peer` (a connected UDP socket; nothing is sent) is
/// looked up among the interfaces' addresses, and the MTU read from
/// `/sys/class/net/IFACE/mtu`. Traffic to one of our own addresses goes through loopback.
pub fn link_mtu_for(peer: IpAddr) -> Option<u32> {
    let unspecified: IpAddr = match peer {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let socket = UdpSocket::bind((unspecified, 0)).ok()?;
    socket.connect((peer, 9)).ok()?;
    let local = socket.local_addr().ok()?.ip();
    let interfaces = crate::sys::interface_addresses().ok()?;
    let local_traffic = peer.is_loopback() || local == peer;
    let iface = interfaces.iter().find(|i| if local_traffic { i.loopback } else { i.addr == local })?;
    let mtu = fs::read_to_string(Path::new("/sys/class/net").join(&iface.name).join("mtu")).ok()?;
    mtu.trim().parse().ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is the test failure
mod tests {
    use super::*;
    use crate::certs;
    use std::time::Duration;
    use tokio::time::timeout;

    const LOCALHOST: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
    const LIMIT: Duration = Duration::from_secs(10);

    use crate::sys::{get_int_option, interface_addresses};

    /// A CA directory with certificates for the given hosts.
    struct Cluster {
        dir: tempfile::TempDir,
    }

    impl Cluster {
        fn new(hosts: &[&str]) -> Cluster {
            let dir = tempfile::tempdir().unwrap();
            certs::init_ca(dir.path(), false).unwrap();
            for host in hosts {
                certs::issue_host(dir.path(), host, &[], dir.path(), false).unwrap();
            }
            Cluster { dir }
        }

        fn path(&self, file: &str) -> PathBuf {
            self.dir.path().join(file)
        }

        fn identity(&self, host: &str) -> Identity {
            Identity::load(&self.path("ca.pem"), &self.path(&format!("{host}.pem")), &self.path(&format!("{host}.key")))
                .unwrap()
        }
    }

    /// Accepts one connection on `ep`, echoes one bidi stream back reversed; returns the peer name.
    async fn serve_one(ep: quinn::Endpoint) -> Result<Option<String>, String> {
        let incoming = ep.accept().await.ok_or("endpoint closed")?;
        let conn = incoming.await.map_err(|e| e.to_string())?;
        let name = peer_name(&conn);
        let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let mut data = recv.read_to_end(8 << 20).await.map_err(|e| e.to_string())?;
        data.reverse();
        send.write_all(&data).await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        // Wait for the client to close the connection.
        let _ = conn.closed().await;
        Ok(name)
    }

    /// Connects, sends `hello` on a bidi stream and reads the answer; returns (peer name, answer).
    async fn talk(ep: &quinn::Endpoint, addr: SocketAddr, name: &str) -> Result<(Option<String>, Vec<u8>), String> {
        let conn = connect(ep, addr, name).map_err(|e| e.to_string())?.await.map_err(|e| e.to_string())?;
        let peer = peer_name(&conn);
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(b"hello").await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        let answer = recv.read_to_end(1 << 20).await.map_err(|e| e.to_string())?;
        conn.close(0u32.into(), b"done");
        Ok((peer, answer))
    }

    #[tokio::test]
    async fn peers_of_one_cluster_talk_and_know_each_other() {
        let cluster = Cluster::new(&["alpha", "beta"]);
        let alpha = server_endpoint(LOCALHOST, &cluster.identity("alpha"), &Tuning::default()).unwrap();
        let beta = server_endpoint(LOCALHOST, &cluster.identity("beta"), &Tuning::default()).unwrap();
        let beta_addr = beta.local_addr().unwrap();

        // A listening endpoint also connects (its default client configuration).
        let server = tokio::spawn(serve_one(beta.clone()));
        let (peer, answer) = timeout(LIMIT, talk(&alpha, beta_addr, "beta")).await.unwrap().unwrap();
        assert_eq!(peer.as_deref(), Some("beta"));
        assert_eq!(answer, b"olleh");
        let seen = timeout(LIMIT, server).await.unwrap().unwrap().unwrap();
        assert_eq!(seen.as_deref(), Some("alpha"));

        // And a client-only endpoint.
        let client = client_endpoint(LOCALHOST, &cluster.identity("alpha"), &Tuning::default()).unwrap();
        let server = tokio::spawn(serve_one(beta.clone()));
        let (peer, _) = timeout(LIMIT, talk(&client, beta_addr, "beta")).await.unwrap().unwrap();
        assert_eq!(peer.as_deref(), Some("beta"));
        assert_eq!(timeout(LIMIT, server).await.unwrap().unwrap().unwrap().as_deref(), Some("alpha"));

        // The server name is checked against the certificate.
        let server = tokio::spawn(serve_one(beta.clone()));
        let err = timeout(LIMIT, talk(&client, beta_addr, "gamma")).await.unwrap().unwrap_err();
        assert!(err.contains("not valid for name"), "{err}");
        assert!(timeout(LIMIT, server).await.unwrap().unwrap().is_err());
    }

    #[tokio::test]
    async fn client_with_a_certificate_from_another_ca_is_refused() {
        let cluster = Cluster::new(&["alpha", "beta"]);
        let other = Cluster::new(&["mallory"]);
        let server = server_endpoint(LOCALHOST, &cluster.identity("alpha"), &Tuning::default()).unwrap();
        let addr = server.local_addr().unwrap();

        // Trusts the right CA, but presents a certificate from another one.
        let mut mallory = other.identity("mallory");
        mallory.roots = cluster.identity("beta").roots;
        let client = client_endpoint(LOCALHOST, &mallory, &Tuning::default()).unwrap();

        let served = tokio::spawn(serve_one(server));
        let talked = timeout(LIMIT, talk(&client, addr, "alpha")).await.unwrap();
        assert!(talked.is_err(), "{talked:?}");
        let seen = timeout(LIMIT, served).await.unwrap().unwrap();
        let err = seen.unwrap_err();
        assert!(err.contains("UnknownIssuer"), "{err}");
    }

    #[tokio::test]
    async fn server_with_a_certificate_from_another_ca_is_refused() {
        let cluster = Cluster::new(&["alpha", "beta"]);
        let other = Cluster::new(&["alpha"]);
        // Same name, wrong CA; it would accept our client.
        let mut impostor = other.identity("alpha");
        impostor.roots = cluster.identity("beta").roots;
        let server = server_endpoint(LOCALHOST, &impostor, &Tuning::default()).unwrap();
        let addr = server.local_addr().unwrap();
        let client = client_endpoint(LOCALHOST, &cluster.identity("beta"), &Tuning::default()).unwrap();

        let served = tokio::spawn(serve_one(server));
        let err = timeout(LIMIT, talk(&client, addr, "alpha")).await.unwrap().unwrap_err();
        assert!(err.contains("UnknownIssuer"), "{err}");
        assert!(timeout(LIMIT, served).await.unwrap().unwrap().is_err());
    }

    #[tokio::test]
    async fn client_without_a_certificate_is_refused() {
        let cluster = Cluster::new(&["alpha", "beta"]);
        let server = server_endpoint(LOCALHOST, &cluster.identity("alpha"), &Tuning::default()).unwrap();
        let addr = server.local_addr().unwrap();

        let mut crypto = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(Arc::clone(&cluster.identity("beta").roots))
            .with_no_client_auth();
        crypto.alpn_protocols = vec![ALPN.to_vec()];
        let config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(crypto).unwrap()));
        let mut anonymous = quinn::Endpoint::client(LOCALHOST).unwrap();
        anonymous.set_default_client_config(config);

        let served = tokio::spawn(serve_one(server));
        let talked = timeout(LIMIT, talk(&anonymous, addr, "alpha")).await.unwrap();
        assert!(talked.is_err(), "{talked:?}");
        let err = timeout(LIMIT, served).await.unwrap().unwrap().unwrap_err();
        assert!(err.contains("certificate"), "{err}");
    }

    #[test]
    fn tuning_for_path_mtu() {
        let jumbo = Tuning::for_path_mtu(9000);
        assert_eq!((jumbo.initial_mtu, jumbo.max_mtu), (6500, 6500));
        let ethernet = Tuning::for_path_mtu(1500);
        assert_eq!((ethernet.initial_mtu, ethernet.max_mtu), (1452, 1452));
        assert_eq!(Tuning::for_path_mtu(576).initial_mtu, 1200);
        assert_eq!(Tuning::for_path_mtu(0).initial_mtu, 1200);
        assert_eq!(Tuning::for_path_mtu(6548).initial_mtu, 6500);
        assert_eq!(Tuning::for_path_mtu(65536).initial_mtu, 6500);
        assert_eq!(Tuning::for_path_mtu(u32::MAX).max_mtu, 6500);
        // Everything else is the default.
        assert_eq!(Tuning { initial_mtu: 1200, ..jumbo }, Tuning::default());
        let _ = Tuning::default().transport_config();
    }

    #[tokio::test]
    async fn jumbo_tuning_starts_at_full_size_on_loopback() {
        let cluster = Cluster::new(&["alpha", "beta"]);
        let lo_mtu = link_mtu_for(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap_or(9000);
        for link_mtu in [9000, lo_mtu] {
            let tuning = Tuning::for_path_mtu(link_mtu.min(lo_mtu));
            let server = server_endpoint(LOCALHOST, &cluster.identity("alpha"), &tuning).unwrap();
            let addr = server.local_addr().unwrap();
            let client = client_endpoint(LOCALHOST, &cluster.identity("beta"), &tuning).unwrap();
            let served = tokio::spawn(serve_one(server));

            let conn = timeout(LIMIT, connect(&client, addr, "alpha").unwrap()).await.unwrap().unwrap();
            assert_eq!(conn.stats().path.current_mtu, tuning.initial_mtu);
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            let data: Vec<u8> = (0..4 << 20).map(|i: u32| i as u8).collect();
            send.write_all(&data).await.unwrap();
            send.finish().unwrap();
            let mut answer = timeout(LIMIT, recv.read_to_end(8 << 20)).await.unwrap().unwrap();
            answer.reverse();
            assert!(answer == data);
            // No datagram was lost to an oversized send: the size held.
            let stats = conn.stats();
            assert_eq!(stats.path.current_mtu, tuning.initial_mtu, "{link_mtu}: {stats:?}");
            assert_eq!(stats.path.black_holes_detected, 0, "{link_mtu}: {stats:?}");
            conn.close(0u32.into(), b"done");
            assert_eq!(timeout(LIMIT, served).await.unwrap().unwrap().unwrap().as_deref(), Some("beta"));
        }
    }

    #[test]
    fn link_mtu_of_loopback() {
        let Ok(expected) = fs::read_to_string("/sys/class/net/lo/mtu") else {
            return;
        };
        let expected: u32 = expected.trim().parse().unwrap();
        assert_eq!(link_mtu_for(IpAddr::V4(Ipv4Addr::LOCALHOST)), Some(expected));
        // One of our own addresses is reached through loopback too.
        if let Some(own) = interface_addresses().unwrap().iter().find(|i| !i.loopback && i.addr.is_ipv4()) {
            assert_eq!(link_mtu_for(own.addr), Some(expected), "{own:?}");
        }
    }

    #[test]
    fn socket_buffers_are_enlarged() {
        let socket = UdpSocket::bind(LOCALHOST).unwrap();
        set_socket_buffers(&socket, 8 << 20);
        let rcv = get_int_option(socket.as_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF).unwrap();
        let snd = get_int_option(socket.as_fd(), libc::SOL_SOCKET, libc::SO_SNDBUF).unwrap();
        // As root the FORCE options bypass rmem_max/wmem_max.
        if running_as_root() {
            assert!(rcv >= 8 << 20, "{rcv}");
            assert!(snd >= 8 << 20, "{snd}");
        }
    }

    fn running_as_root() -> bool {
        fs::read_to_string("/proc/self/status")
            .map(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0")))
            .unwrap_or(false)
    }

    #[test]
    fn identity_load_errors_say_what_to_do() {
        let cluster = Cluster::new(&["alpha"]);
        let ca = cluster.path("ca.pem");
        let cert = cluster.path("alpha.pem");
        let key = cluster.path("alpha.key");

        let id = Identity::load(&ca, &cert, &key).unwrap();
        assert_eq!(id.name(), "alpha");

        let err = Identity::load(&cluster.path("nope.pem"), &cert, &key).unwrap_err().to_string();
        assert!(err.contains("nope.pem") && err.contains("floe certs init"), "{err}");
        let err = Identity::load(&ca, &cluster.path("beta.pem"), &key).unwrap_err().to_string();
        assert!(err.contains("beta.pem") && err.contains("floe certs issue HOST"), "{err}");
        let err = Identity::load(&ca, &cert, &cluster.path("beta.key")).unwrap_err().to_string();
        assert!(err.contains("beta.key") && err.contains("floe certs issue HOST"), "{err}");

        // A key of another host.
        certs::issue_host(cluster.dir.path(), "beta", &[], cluster.dir.path(), false).unwrap();
        let err = Identity::load(&ca, &cert, &cluster.path("beta.key")).unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err:?}");

        // Not PEM.
        fs::write(cluster.path("junk.pem"), "hello\n").unwrap();
        let err = Identity::load(&ca, &cluster.path("junk.pem"), &key).unwrap_err();
        assert!(matches!(err, TlsError::Empty { .. }), "{err:?}");
        let err = Identity::load(&ca, &cert, &cluster.path("junk.pem")).unwrap_err();
        assert!(matches!(err, TlsError::Empty { .. }), "{err:?}");

        // A certificate from another CA.
        let other = Cluster::new(&["alpha"]);
        let err = Identity::load(&ca, &other.path("alpha.pem"), &other.path("alpha.key")).unwrap_err();
        assert!(matches!(err, TlsError::NotFromCa { .. }), "{err:?}");
    }
}
