//! The cluster CA and host certificates.
//!
//! Agents authenticate each other with mutual TLS: every agent holds a certificate issued by
//! the cluster CA and trusts only that CA. `floe certs init` creates the CA ([`init_ca`]),
//! once per cluster, on an administration machine; `floe certs issue HOST` issues one
//! certificate per host ([`issue_host`]). The same host certificate is used both as a server
//! (when a peer connects to the agent) and as a client (when the agent connects to a peer), so
//! it carries both the `serverAuth` and the `clientAuth` extended key usages.
//!
//! The CA's subject is CN "floe cluster CA" with OU "cluster ID", ID derived from its key.
//!
//! Files: `ca.pem` (the CA certificate, copied to every host), `ca.key` (the CA private key,
//! which stays on the administration machine), `HOST.pem` (the host certificate followed by
//! the CA certificate) and `HOST.key`. Keys are ECDSA P-256 in PKCS#8 PEM, mode 0600. Every
//! file is written to a temporary file first and renamed into place, so a crash never leaves a
//! half-written key or certificate behind.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// File name of the CA certificate inside the CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key inside the CA directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// Common name of the cluster CA certificate.
pub const CA_COMMON_NAME: &str = "floe cluster CA";

/// Validity of the CA certificate: 10 years.
const CA_VALIDITY: Duration = Duration::days(3653);
/// Validity of a host certificate: 2 years.
const HOST_VALIDITY: Duration = Duration::days(731);
/// Certificates start being valid a little before they are issued, so that hosts whose clocks
/// lag the issuing machine's accept them right away.
const BACKDATE: Duration = Duration::minutes(10);
/// Longest host name accepted (the DNS limit).
const MAX_HOST_LEN: usize = 253;

/// What can go wrong while creating the CA or issuing a host certificate.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The CA files already exist and `force` was not given.
    #[error("{path}: a cluster CA already exists; pass --force to replace it (every host certificate it issued will then be refused)")]
    CaExists {
        /// The existing file.
        path: PathBuf,
    },
    /// A host certificate or key already exists and `force` was not given.
    #[error("{path} already exists; pass --force to overwrite it")]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// The CA directory holds no CA.
    #[error("{path} not found; create the cluster CA with `floe certs init` first (or pass the directory that holds ca.pem and ca.key)")]
    NoCa {
        /// The missing file.
        path: PathBuf,
    },
    /// A directory could not be created.
    #[error("{path}: cannot create directory")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A file could not be read.
    #[error("{path}: cannot read")]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A file could not be written.
    #[error("{path}: cannot write")]
    Write {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The CA certificate file is not a usable certificate.
    #[error("{path}: not a valid CA certificate")]
    BadCaCert {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: rcgen::Error,
    },
    /// The CA certificate parses but is not a CA (no `CA:TRUE` basic constraint).
    #[error("{path}: the certificate is not a CA certificate")]
    NotCa {
        /// The file.
        path: PathBuf,
    },
    /// The CA key file is not a usable private key.
    #[error("{path}: not a valid private key (expected PKCS#8 PEM)")]
    BadCaKey {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: rcgen::Error,
    },
    /// The CA key does not belong to the CA certificate.
    #[error("{key} is not the private key of {cert}")]
    KeyMismatch {
        /// The certificate.
        cert: PathBuf,
        /// The key.
        key: PathBuf,
    },
    /// The host name is not usable as a certificate name.
    #[error("invalid host name {host:?}: expected 1 to {MAX_HOST_LEN} characters from A-Z, a-z, 0-9, '.' and '-' forming a valid DNS name")]
    BadHost {
        /// The rejected name.
        host: String,
    },
    /// An extra subject alternative name is not usable.
    #[error("invalid subject alternative name {san:?}: expected an IP address or a DNS name")]
    BadSan {
        /// The rejected name.
        san: String,
    },
    /// rcgen failed to generate a key or a certificate.
    #[error("cannot generate the {what}")]
    Generate {
        /// What was being generated.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: rcgen::Error,
    },
}

/// Whether `host` is usable as a host name in a certificate: 1 to 253 characters from
/// `[A-Za-z0-9.-]` that also form a valid DNS name (or an IP address), so that a TLS client
/// can use it as the server name.
pub fn valid_host_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= MAX_HOST_LEN
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        && rustls::pki_types::ServerName::try_from(host).is_ok()
}

/// Creates the cluster CA in `dir`: `ca.pem` (a self-signed CA certificate, CN
/// "floe cluster CA", valid 10 years) and `ca.key` (its private key, mode 0600).
///
/// `dir` is created with mode 0700 if it does not exist (an existing directory keeps its mode).
/// An existing CA is replaced only if `force` is set. Returns the path of `ca.pem`.
pub fn init_ca(dir: &Path, force: bool) -> Result<PathBuf, CertError> {
    create_private_dir(dir)?;
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    if !force {
        for path in [&cert_path, &key_path] {
            if exists(path)? {
                return Err(CertError::CaExists { path: path.clone() });
            }
        }
    }

    let key = KeyPair::generate().map_err(|source| CertError::Generate { what: "CA key", source })?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    // Tells clusters apart: a certificate from another cluster's CA is then reported as from an
    // unknown issuer rather than as a bad signature.
    let cluster_id = blake3::hash(&key.public_key_der());
    dn.push(DnType::OrganizationalUnitName, format!("cluster {}", &cluster_id.to_hex()[..16]));
    params.distinguished_name = dn;
    // No intermediates: the CA signs host certificates directly.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + CA_VALIDITY;
    let cert = params.self_signed(&key).map_err(|source| CertError::Generate { what: "CA certificate", source })?;

    // Key first: a CA certificate without its key would be useless, a stray key is harmless.
    write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&cert_path, cert.pem().as_bytes(), 0o644)?;
    tracing::info!(cert = %cert_path.display(), key = %key_path.display(), "created the cluster CA");
    Ok(cert_path)
}

/// Issues a certificate for `host`, signed by the CA in `ca_dir`, and writes it to
/// `<out_dir>/<host>.pem` (the host certificate followed by the CA certificate) and its key
/// to `<out_dir>/<host>.key` (mode 0600).
///
/// The certificate has CN = `host`, a subject alternative name for `host` and one for each of
/// `extra_sans` (an IP address if it parses as one, else a DNS name), is valid 2 years, and is
/// usable both as a TLS server and as a TLS client certificate. Existing files are replaced
/// only if `force` is set. Returns (certificate path, key path).
pub fn issue_host(
    ca_dir: &Path,
    host: &str,
    extra_sans: &[String],
    out_dir: &Path,
    force: bool,
) -> Result<(PathBuf, PathBuf), CertError> {
    if !valid_host_name(host) {
        return Err(CertError::BadHost { host: host.to_string() });
    }
    let mut sans = vec![san_for(host)?];
    for extra in extra_sans {
        let san = san_for(extra)?;
        if !sans.contains(&san) {
            sans.push(san);
        }
    }

    let (ca_pem, ca_params, ca_key) = load_ca(ca_dir)?;

    create_private_dir(out_dir)?;
    let cert_path = out_dir.join(format!("{host}.pem"));
    let key_path = out_dir.join(format!("{host}.key"));
    if !force {
        for path in [&cert_path, &key_path] {
            if exists(path)? {
                return Err(CertError::Exists { path: path.clone() });
            }
        }
    }

    // `signed_by` only uses the issuer's name, key identifier and key usages; the certificate
    // rebuilt here is never written out (the chain gets the original ca.pem).
    let issuer = ca_params.self_signed(&ca_key).map_err(|source| CertError::Generate { what: "CA issuer", source })?;

    let key = KeyPair::generate().map_err(|source| CertError::Generate { what: "host key", source })?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, host);
    params.distinguished_name = dn;
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + HOST_VALIDITY;
    let cert = params
        .signed_by(&key, &issuer, &ca_key)
        .map_err(|source| CertError::Generate { what: "host certificate", source })?;

    let mut chain = cert.pem();
    if !chain.ends_with('\n') {
        chain.push('\n');
    }
    chain.push_str(&ca_pem);
    write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&cert_path, chain.as_bytes(), 0o644)?;
    tracing::info!(host, cert = %cert_path.display(), key = %key_path.display(), "issued a host certificate");
    Ok((cert_path, key_path))
}

/// The subject alternative name for `name`: an IP address if it parses as one, else a DNS name.
fn san_for(name: &str) -> Result<SanType, CertError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    if !valid_host_name(name) {
        return Err(CertError::BadSan { san: name.to_string() });
    }
    let dns = name.try_into().map_err(|_| CertError::BadSan { san: name.to_string() })?;
    Ok(SanType::DnsName(dns))
}

/// Reads the CA of `dir`: the text of its first certificate (PEM), its parameters (for
/// signing) and its key, after checking that the key belongs to the certificate.
fn load_ca(dir: &Path) -> Result<(String, CertificateParams, KeyPair), CertError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    let cert_text = read_ca_file(&cert_path)?;
    let key_text = read_ca_file(&key_path)?;

    let bad_cert = |source| CertError::BadCaCert { path: cert_path.clone(), source };
    let der = rustls_pemfile::certs(&mut cert_text.as_bytes())
        .next()
        .ok_or(rcgen::Error::CouldNotParseCertificate)
        .and_then(|r| r.map_err(|_| rcgen::Error::CouldNotParseCertificate))
        .map_err(bad_cert)?;
    let params = CertificateParams::from_ca_cert_der(&der).map_err(bad_cert)?;
    if !matches!(params.is_ca, IsCa::Ca(_)) {
        return Err(CertError::NotCa { path: cert_path });
    }
    let key = KeyPair::from_pem(&key_text).map_err(|source| CertError::BadCaKey { path: key_path.clone(), source })?;

    let (_, parsed) =
        x509_parser::parse_x509_certificate(&der).map_err(|_| bad_cert(rcgen::Error::CouldNotParseCertificate))?;
    if parsed.tbs_certificate.subject_pki.raw != key.public_key_der().as_slice() {
        return Err(CertError::KeyMismatch { cert: cert_path, key: key_path });
    }
    // Re-encode only the CA certificate itself, whatever else ca.pem may hold.
    let ca_pem = pem_certificate(&der);
    Ok((ca_pem, params, key))
}

/// PEM text of one DER certificate.
fn pem_certificate(der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = Vec::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]);
            } else {
                b64.push(b'=');
            }
        }
    }
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Reads a file of the CA directory; a missing file means there is no CA there.
fn read_ca_file(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => CertError::NoCa { path: path.to_path_buf() },
        _ => CertError::Read { path: path.to_path_buf(), source },
    })
}

/// Whether `path` exists (a dangling symlink counts as existing).
fn exists(path: &Path) -> Result<bool, CertError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(CertError::Read { path: path.to_path_buf(), source }),
    }
}

/// Creates `dir` and its missing parents with mode 0700; an existing directory is left alone.
fn create_private_dir(dir: &Path) -> Result<(), CertError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CertError::CreateDir { path: dir.to_path_buf(), source })
}

/// Writes `data` to `path` with `mode`: into a temporary file in the same directory, synced,
/// then renamed over `path`.
fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), CertError> {
    let err = |source| CertError::Write { path: path.to_path_buf(), source };
    let file_name = path.file_name().ok_or_else(|| err(io::Error::from(io::ErrorKind::InvalidInput)))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);

    let result = (|| {
        // A leftover from an earlier crash of this same pid would make create_new fail.
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        file.write_all(data)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(err)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is the test failure
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use x509_parser::extensions::GeneralName;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn pem_ders(path: &Path) -> Vec<Vec<u8>> {
        let text = fs::read(path).unwrap();
        rustls_pemfile::certs(&mut text.as_slice()).map(|c| c.unwrap().to_vec()).collect()
    }

    #[test]
    fn init_ca_creates_a_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let cert = init_ca(&dir, false).unwrap();
        assert_eq!(cert, dir.join("ca.pem"));
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("ca.key")), 0o600);
        let key = fs::read_to_string(dir.join("ca.key")).unwrap();
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "{key}");

        let ders = pem_ders(&cert);
        assert_eq!(ders.len(), 1);
        let (_, x) = x509_parser::parse_x509_certificate(&ders[0]).unwrap();
        assert!(x.is_ca());
        let cn = x.subject().iter_common_name().next().unwrap().as_str().unwrap();
        assert_eq!(cn, CA_COMMON_NAME);
        assert_eq!(x.subject(), x.issuer());
        let years = (x.validity().not_after.timestamp() - x.validity().not_before.timestamp()) / (365 * 86400);
        assert_eq!(years, 10);
        // No temporary files left behind.
        let names: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn init_ca_refuses_to_overwrite_without_force() {
        let tmp = tempfile::tempdir().unwrap();
        init_ca(tmp.path(), false).unwrap();
        let before = fs::read(tmp.path().join("ca.pem")).unwrap();
        let err = init_ca(tmp.path(), false).unwrap_err();
        assert!(matches!(err, CertError::CaExists { .. }), "{err:?}");
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(fs::read(tmp.path().join("ca.pem")).unwrap(), before);

        init_ca(tmp.path(), true).unwrap();
        assert_ne!(fs::read(tmp.path().join("ca.pem")).unwrap(), before);
    }

    #[test]
    fn issue_host_writes_chain_and_key() {
        let tmp = tempfile::tempdir().unwrap();
        let ca_dir = tmp.path().join("ca");
        init_ca(&ca_dir, false).unwrap();
        let out = tmp.path().join("out");
        let sans = vec!["10.1.2.3".to_string(), "alpha.example".to_string(), "fd00::1".to_string()];
        let (cert, key) = issue_host(&ca_dir, "alpha", &sans, &out, false).unwrap();
        assert_eq!(cert, out.join("alpha.pem"));
        assert_eq!(key, out.join("alpha.key"));
        assert_eq!(mode(&key), 0o600);

        let ders = pem_ders(&cert);
        assert_eq!(ders.len(), 2, "host certificate then CA certificate");
        assert_eq!(ders[1], pem_ders(&ca_dir.join("ca.pem"))[0], "the chain holds the original CA certificate");
        let (_, host) = x509_parser::parse_x509_certificate(&ders[0]).unwrap();
        let (_, ca) = x509_parser::parse_x509_certificate(&ders[1]).unwrap();
        assert!(!host.is_ca());
        assert_eq!(host.issuer(), ca.subject());
        assert_eq!(host.subject().iter_common_name().next().unwrap().as_str().unwrap(), "alpha");
        host.verify_signature(Some(ca.public_key())).unwrap();

        let eku = host.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let san = host.subject_alternative_name().unwrap().unwrap().value;
        let names: Vec<String> = san
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::DNSName(d) => d.to_string(),
                GeneralName::IPAddress(ip) => format!("ip:{ip:?}"),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(names.len(), 4, "{names:?}");
        assert_eq!(names[0], "alpha");
        assert_eq!(names[1], "ip:[10, 1, 2, 3]");
        assert_eq!(names[2], "alpha.example");
        let days = (host.validity().not_after.timestamp() - host.validity().not_before.timestamp()) / 86400;
        assert!((730..=732).contains(&days), "{days}");
    }

    #[test]
    fn issue_host_refuses_to_overwrite_without_force() {
        let tmp = tempfile::tempdir().unwrap();
        init_ca(tmp.path(), false).unwrap();
        let (cert, _) = issue_host(tmp.path(), "beta", &[], tmp.path(), false).unwrap();
        let before = fs::read(&cert).unwrap();
        let err = issue_host(tmp.path(), "beta", &[], tmp.path(), false).unwrap_err();
        assert!(matches!(err, CertError::Exists { .. }), "{err:?}");
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(fs::read(&cert).unwrap(), before);
        issue_host(tmp.path(), "beta", &[], tmp.path(), true).unwrap();
        assert_ne!(fs::read(&cert).unwrap(), before);
    }

    #[test]
    fn issue_host_rejects_bad_names() {
        let tmp = tempfile::tempdir().unwrap();
        init_ca(tmp.path(), false).unwrap();
        let long = "a".repeat(254);
        for host in ["", "a/b", "../etc", "a b", "host_1", "-x", long.as_str()] {
            let err = issue_host(tmp.path(), host, &[], tmp.path(), false).unwrap_err();
            assert!(matches!(err, CertError::BadHost { .. }), "{host:?}: {err:?}");
        }
        let err = issue_host(tmp.path(), "ok", &["not valid".to_string()], tmp.path(), false).unwrap_err();
        assert!(matches!(err, CertError::BadSan { .. }), "{err:?}");
        assert!(valid_host_name("node-1.cluster.local"));
        assert!(valid_host_name("10.0.0.1"));
    }

    #[test]
    fn issue_host_without_ca_says_to_init() {
        let tmp = tempfile::tempdir().unwrap();
        let err = issue_host(tmp.path(), "alpha", &[], tmp.path(), false).unwrap_err();
        assert!(matches!(err, CertError::NoCa { .. }), "{err:?}");
        assert!(err.to_string().contains("floe certs init"), "{err}");
    }

    #[test]
    fn issue_host_detects_a_foreign_ca_key() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a");
        let b = tmp.path().join("b");
        init_ca(&a, false).unwrap();
        init_ca(&b, false).unwrap();
        fs::copy(b.join("ca.key"), a.join("ca.key")).unwrap();
        let err = issue_host(&a, "alpha", &[], tmp.path(), false).unwrap_err();
        assert!(matches!(err, CertError::KeyMismatch { .. }), "{err:?}");
    }

    #[test]
    fn pem_encoding_round_trips() {
        for len in [1usize, 2, 3, 4, 47, 48, 49, 50, 1000] {
            let der: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let pem = pem_certificate(&der);
            assert!(pem.lines().all(|l| l.len() <= 64), "{pem}");
            let back: Vec<_> = rustls_pemfile::certs(&mut pem.as_bytes()).map(|c| c.unwrap().to_vec()).collect();
            assert_eq!(back, vec![der]);
        }
    }
}
