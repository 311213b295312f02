//! `relay-outer certs`: the CA, relay-outer's server certificate and the inner relays'
//! client certificates (see certs/README.md).
//!
//! Keys are ECDSA P-256 in PKCS#8 PEM, written with mode 0600; certificates are PEM,
//! mode 0644. Every file is written to a temporary name in the same directory, fsynced
//! and renamed into place, so a crash never leaves a half-written key or certificate.

use std::fs::{self, DirBuilder};
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use rcgen::string::{Ia5String, PrintableString};
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use time::{Duration, OffsetDateTime};
use x509_parser::asn1_rs::Header;
use x509_parser::extensions::ParsedExtension;
use x509_parser::oid_registry::OID_X509_EXT_SUBJECT_KEY_IDENTIFIER;
use x509_parser::prelude::{parse_x509_certificate, X509Certificate};
use x509_parser::x509::X509Name;

/// File name of the CA certificate.
pub const CA_CERT: &str = "ca.crt";
/// File name of the CA's certificate revocation list (`certs revoke` writes it).
pub const CRL_FILE: &str = "crl.pem";
/// How long a list written by `certs revoke` says it is current (its `nextUpdate`;
/// the relays use a list past it all the same, and warn).
const CRL_VALIDITY: Duration = Duration::days(365);
/// File name of the CA private key.
pub const CA_KEY: &str = "ca.key";
/// File name of relay-outer's server certificate.
pub const OUTER_CERT: &str = "outer.crt";
/// File name of relay-outer's server private key.
pub const OUTER_KEY: &str = "outer.key";

const CA_COMMON_NAME: &str = "Routy CA";
/// Ten years, leap days included.
const CA_VALIDITY: Duration = Duration::days(3653);
const LEAF_VALIDITY: Duration = Duration::days(825);
/// Certificates start this long before "now", so a peer whose clock is a little behind
/// still accepts them.
const BACKDATE: Duration = Duration::hours(1);
const MAX_TUNNEL_NAME_LEN: usize = 63;
/// Tunnel names whose files would collide with the CA's and relay-outer's own.
const RESERVED_TUNNEL_NAMES: [&str; 2] = ["ca", "outer"];

const KEY_MODE: u32 = 0o600;
const CERT_MODE: u32 = 0o644;
const DIR_MODE: u32 = 0o700;

/// Why a certificate operation failed; every variant names the file or input involved.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file or directory operation failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// A file exists and `force` was not given.
    #[error("refusing to overwrite {}: it already exists (pass --force to replace it)", path.display())]
    Exists { path: PathBuf },
    /// The CA certificate or key is not there.
    #[error(
        "{} does not exist: create the CA with `relay-outer certs init --dir {}` first, \
         or issue certificates where the CA key is kept",
        path.display(),
        dir.display()
    )]
    MissingCa { path: PathBuf, dir: PathBuf },
    /// The CA certificate file cannot be used.
    #[error("{} is not a usable CA certificate: {reason}", path.display())]
    BadCaCert { path: PathBuf, reason: String },
    /// The CA key file cannot be used.
    #[error("{} is not a usable private key: {reason}", path.display())]
    BadCaKey { path: PathBuf, reason: String },
    /// The CA key does not belong to any certificate in the CA certificate file.
    #[error("{} does not belong to any certificate in {}", key.display(), cert.display())]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    /// No server name was given for relay-outer's certificate.
    #[error("at least one server name (--server-name) is required")]
    NoServerName,
    /// A server name is neither an IP address nor a valid DNS name.
    #[error("invalid server name {name:?}: {reason}")]
    InvalidServerName { name: String, reason: String },
    /// A tunnel name breaks a naming rule; the message says which.
    #[error("{0}")]
    InvalidTunnelName(String),
    /// rcgen failed to generate a key or certificate.
    #[error("cannot create {what}: {source}")]
    Generate { what: String, source: rcgen::Error },
    /// A certificate to revoke cannot be read, or was not issued by this CA.
    #[error("{}: {reason}", path.display())]
    BadCert { path: PathBuf, reason: String },
    /// The existing revocation list cannot be read.
    #[error("{} is not a usable revocation list: {reason} (move it away to start a new one)", path.display())]
    BadCrl { path: PathBuf, reason: String },
}

/// What [`revoke`] did.
#[derive(Debug)]
pub struct Revoked {
    /// The revocation list written.
    pub crl: PathBuf,
    /// The revoked certificate's serial number, in hex.
    pub serial: String,
    /// It was already on the list (the list was written again all the same).
    pub already: bool,
    /// Certificates on the list now.
    pub listed: usize,
}

/// Adds the certificate `cert` (by default `dir/<tunnel>.crt`) to the CA's revocation
/// list `dir/crl.pem`, creating the list if needed, signed by the CA in `dir` with a
/// higher CRL number. The relays refuse it once their `tls.crl` names the list and they
/// reload (relay-outer also closes its live sessions).
pub fn revoke(dir: &Path, cert: &Path) -> Result<Revoked, CertError> {
    use x509_parser::prelude::FromDer;

    let ca = load_ca(dir)?;
    let bad_cert = |reason: String| CertError::BadCert {
        path: cert.to_path_buf(),
        reason,
    };
    let pem = fs::read(cert).map_err(|source| io_error("read", cert, source))?;
    let der = CertificateDer::pem_slice_iter(&pem)
        .next()
        .ok_or_else(|| bad_cert("contains no PEM CERTIFICATE block".to_string()))?
        .map_err(|e| bad_cert(format!("invalid PEM: {e}")))?;
    let (_, parsed) =
        parse_x509_certificate(&der).map_err(|e| bad_cert(format!("not valid X.509 DER: {e}")))?;
    if !ca.issued(parsed.issuer().as_raw(), parsed.extensions()) {
        return Err(bad_cert(format!(
            "issued by {}, not by the CA in {}",
            if parsed.issuer().as_raw() == ca.subject.as_slice() {
                "another CA of the same name".to_string()
            } else {
                parsed.issuer().to_string()
            },
            ca.cert_path.display()
        )));
    }
    let serial = parsed.raw_serial().to_vec();

    let crl_path = dir.join(CRL_FILE);
    let now = OffsetDateTime::now_utc();
    let mut entries: Vec<(Vec<u8>, OffsetDateTime)> = Vec::new();
    let mut number: u64 = 0;
    match fs::read(&crl_path) {
        Ok(old) => {
            let bad_crl = |reason: String| CertError::BadCrl {
                path: crl_path.clone(),
                reason,
            };
            let old_der = rustls_pki_types::CertificateRevocationListDer::pem_slice_iter(&old)
                .next()
                .ok_or_else(|| bad_crl("contains no X509 CRL block".to_string()))?
                .map_err(|e| bad_crl(format!("invalid PEM: {e}")))?;
            let (_, list) =
                x509_parser::revocation_list::CertificateRevocationList::from_der(&old_der)
                    .map_err(|e| bad_crl(e.to_string()))?;
            if !ca.issued(list.issuer().as_raw(), list.extensions()) {
                return Err(bad_crl(format!(
                    "issued by {}, not by this CA",
                    list.issuer()
                )));
            }
            number = list
                .crl_number()
                .and_then(|n| u64::try_from(n).ok())
                .unwrap_or(0);
            for r in list.iter_revoked_certificates() {
                let when = OffsetDateTime::from_unix_timestamp(r.revocation_date.timestamp())
                    .unwrap_or(now);
                entries.push((r.raw_serial().to_vec(), when));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(io_error("read", &crl_path, source)),
    }
    let already = entries.iter().any(|(s, _)| *s == serial);
    if !already {
        entries.push((serial.clone(), now));
    }
    let params = rcgen::CertificateRevocationListParams {
        this_update: now - BACKDATE,
        next_update: now + CRL_VALIDITY,
        crl_number: SerialNumber::from(number.saturating_add(1)),
        issuing_distribution_point: None,
        revoked_certs: entries
            .iter()
            .map(|(s, when)| rcgen::RevokedCertParams {
                serial_number: SerialNumber::from_slice(s),
                revocation_time: *when,
                reason_code: None,
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params
        .signed_by(&ca.issuer)
        .map_err(|source| generate_error("the revocation list", source))?;
    let crl_pem = crl
        .pem()
        .map_err(|source| generate_error("the revocation list", source))?;
    write_atomic(&crl_path, crl_pem.as_bytes(), CERT_MODE)?;
    sync_dir(dir)?;
    Ok(Revoked {
        crl: crl_path,
        serial: serial.iter().map(|b| format!("{b:02x}")).collect(),
        already,
        listed: entries.len(),
    })
}

/// Creates the CA (`ca.crt`, `ca.key`) and relay-outer's server certificate (`outer.crt`, `outer.key`) in `dir`.
pub fn init(dir: &Path, server_names: &[String], force: bool) -> Result<Vec<PathBuf>, CertError> {
    let sans = server_sans(server_names)?;
    let paths = [CA_CERT, CA_KEY, OUTER_CERT, OUTER_KEY].map(|name| dir.join(name));
    if !force {
        refuse_existing(&paths)?;
    }
    create_dir(dir)?;

    let now = OffsetDateTime::now_utc();
    let ca_key = generate_key("the CA key")?;
    let ca_params = ca_params(now);
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(|source| generate_error("the CA certificate", source))?;
    let issuer = Issuer::new(ca_params, ca_key);
    let (outer_cert, outer_key) = sign_outer(&issuer, server_names, sans, now)?;

    let [ca_crt_path, ca_key_path, outer_crt_path, outer_key_path] = paths;
    write_atomic(
        &ca_key_path,
        issuer.key().serialize_pem().as_bytes(),
        KEY_MODE,
    )?;
    write_atomic(&ca_crt_path, ca_cert.pem().as_bytes(), CERT_MODE)?;
    write_atomic(
        &outer_key_path,
        outer_key.serialize_pem().as_bytes(),
        KEY_MODE,
    )?;
    write_atomic(&outer_crt_path, outer_cert.pem().as_bytes(), CERT_MODE)?;
    sync_dir(dir)?;
    Ok(vec![
        ca_crt_path,
        ca_key_path,
        outer_crt_path,
        outer_key_path,
    ])
}

/// Issues the client certificate `dir/<tunnel>.crt` + `dir/<tunnel>.key` for one inner relay, signed by the CA in `dir`.
pub fn issue(dir: &Path, tunnel: &str, force: bool) -> Result<Vec<PathBuf>, CertError> {
    validate_tunnel_name(tunnel).map_err(CertError::InvalidTunnelName)?;
    let crt_path = dir.join(format!("{tunnel}.crt"));
    let key_path = dir.join(format!("{tunnel}.key"));
    if !force {
        refuse_existing(&[crt_path.clone(), key_path.clone()])?;
    }
    let ca = load_ca(dir)?;

    let now = OffsetDateTime::now_utc();
    let dns = Ia5String::try_from(tunnel).map_err(|e| {
        CertError::InvalidTunnelName(format!("tunnel name {tunnel:?} is not a DNS name: {e}"))
    })?;
    let params = leaf_params(
        tunnel,
        vec![SanType::DnsName(dns)],
        ExtendedKeyUsagePurpose::ClientAuth,
        now,
    );
    let what = format!("the client certificate for tunnel {tunnel:?}");
    let key = generate_key(&what)?;
    let cert = params
        .signed_by(&key, &ca.issuer)
        .map_err(|source| generate_error(&what, source))?;
    ca.check_issued(cert.der())?;

    write_atomic(&key_path, key.serialize_pem().as_bytes(), KEY_MODE)?;
    write_atomic(&crt_path, cert.pem().as_bytes(), CERT_MODE)?;
    sync_dir(dir)?;
    Ok(vec![crt_path, key_path])
}

/// Re-issues `outer.crt` + `outer.key` from the existing CA in `dir` (overwriting those two only).
pub fn renew_outer(dir: &Path, server_names: &[String]) -> Result<Vec<PathBuf>, CertError> {
    let sans = server_sans(server_names)?;
    let ca = load_ca(dir)?;
    let now = OffsetDateTime::now_utc();
    let (cert, key) = sign_outer(&ca.issuer, server_names, sans, now)?;
    ca.check_issued(cert.der())?;

    let crt_path = dir.join(OUTER_CERT);
    let key_path = dir.join(OUTER_KEY);
    write_atomic(&key_path, key.serialize_pem().as_bytes(), KEY_MODE)?;
    write_atomic(&crt_path, cert.pem().as_bytes(), CERT_MODE)?;
    sync_dir(dir)?;
    Ok(vec![crt_path, key_path])
}

/// Checks a tunnel name: 1-63 characters of `a-z`, `0-9` and `-`, not starting or ending with `-`, not `ca` or `outer`.
pub fn validate_tunnel_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("tunnel name must not be empty".to_string());
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!(
            "tunnel name {name:?} contains {bad:?}: only lowercase letters a-z, digits 0-9 and '-' are allowed"
        ));
    }
    if name.len() > MAX_TUNNEL_NAME_LEN {
        return Err(format!(
            "tunnel name {name:?} is {} characters long: at most {MAX_TUNNEL_NAME_LEN} are allowed",
            name.len()
        ));
    }
    if name.starts_with('-') {
        return Err(format!("tunnel name {name:?} must not start with '-'"));
    }
    if name.ends_with('-') {
        return Err(format!("tunnel name {name:?} must not end with '-'"));
    }
    if RESERVED_TUNNEL_NAMES.contains(&name) {
        return Err(format!(
            "tunnel name {name:?} is reserved: {name}.crt and {name}.key are {} own files",
            if name == "ca" {
                "the CA's"
            } else {
                "relay-outer's"
            }
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Certificate parameters

fn ca_params(now: OffsetDateTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(CA_COMMON_NAME);
    // Path length 0: this CA signs end-entity certificates only, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(random_serial());
    params.not_before = now - BACKDATE;
    params.not_after = params.not_before + CA_VALIDITY;
    params
}

fn leaf_params(
    cn: &str,
    sans: Vec<SanType>,
    eku: ExtendedKeyUsagePurpose,
    now: OffsetDateTime,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(cn);
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![eku];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    params.not_before = now - BACKDATE;
    params.not_after = params.not_before + LEAF_VALIDITY;
    params
}

/// Signs relay-outer's server certificate with a new key.
fn sign_outer(
    issuer: &Issuer<'_, KeyPair>,
    server_names: &[String],
    sans: Vec<SanType>,
    now: OffsetDateTime,
) -> Result<(Certificate, KeyPair), CertError> {
    let cn = server_names.first().ok_or(CertError::NoServerName)?;
    let params = leaf_params(cn, sans, ExtendedKeyUsagePurpose::ServerAuth, now);
    let what = "relay-outer's server certificate";
    let key = generate_key(what)?;
    let cert = params
        .signed_by(&key, issuer)
        .map_err(|source| generate_error(what, source))?;
    Ok((cert, key))
}

/// Turns server names into SANs: an IP address becomes an IP SAN, anything else must be a DNS name.
fn server_sans(server_names: &[String]) -> Result<Vec<SanType>, CertError> {
    if server_names.is_empty() {
        return Err(CertError::NoServerName);
    }
    server_names
        .iter()
        .map(|name| {
            let invalid = |reason: String| CertError::InvalidServerName {
                name: name.clone(),
                reason,
            };
            if let Ok(ip) = name.parse::<IpAddr>() {
                return Ok(SanType::IpAddress(ip));
            }
            // The same check relay-inner applies to its `server_name`.
            match ServerName::try_from(name.as_str()) {
                Ok(ServerName::DnsName(_)) => {}
                Ok(_) => return Err(invalid("not a DNS name".to_string())),
                Err(e) => return Err(invalid(e.to_string())),
            }
            let dns = Ia5String::try_from(name.as_str()).map_err(|e| invalid(e.to_string()))?;
            Ok(SanType::DnsName(dns))
        })
        .collect()
}

fn common_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and without a leading zero byte, so the DER INTEGER stays 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn generate_key(what: &str) -> Result<KeyPair, CertError> {
    KeyPair::generate().map_err(|source| generate_error(&format!("the key for {what}"), source))
}

fn generate_error(what: &str, source: rcgen::Error) -> CertError {
    CertError::Generate {
        what: what.to_string(),
        source,
    }
}

// ---------------------------------------------------------------------------------------
// Loading the CA

/// The CA from `ca.crt` + `ca.key`, ready to sign.
struct LoadedCa {
    issuer: Issuer<'static, KeyPair>,
    /// The DER encoding of the CA certificate's subject name, which every certificate it
    /// signs must carry as its issuer name.
    subject: Vec<u8>,
    /// Its subject key identifier, which the certificates it signs name as their
    /// authority key identifier.
    key_id: Option<Vec<u8>>,
    cert_path: PathBuf,
}

impl LoadedCa {
    /// Whether a certificate or list naming `issuer` with extensions `exts` is this CA's
    /// (see [`routy_tunnel::tls::issued_by`]).
    fn issued(&self, issuer: &[u8], exts: &[x509_parser::extensions::X509Extension<'_>]) -> bool {
        routy_tunnel::tls::issued_by(issuer, exts, &self.subject, self.key_id.as_deref())
    }

    /// Checks that a certificate we just signed names this CA exactly as its issuer.
    fn check_issued(&self, der: &[u8]) -> Result<(), CertError> {
        match parse_x509_certificate(der) {
            Ok((_, cert)) if cert.issuer().as_raw() == self.subject.as_slice() => Ok(()),
            _ => Err(CertError::BadCaCert {
                path: self.cert_path.clone(),
                reason:
                    "its subject name cannot be reproduced exactly in the certificates it signs"
                        .to_string(),
            }),
        }
    }
}

/// Loads the CA: the certificate in `ca.crt` (which may be a bundle) whose public key is `ca.key`'s.
fn load_ca(dir: &Path) -> Result<LoadedCa, CertError> {
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    let cert_pem = read_ca_file(dir, &cert_path)?;
    let key_pem = read_ca_file(dir, &key_path)?;
    let key_pem = String::from_utf8(key_pem).map_err(|_| CertError::BadCaKey {
        path: key_path.clone(),
        reason: "not a PEM file (not UTF-8 text)".to_string(),
    })?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| CertError::BadCaKey {
        path: key_path.clone(),
        reason: e.to_string(),
    })?;
    let key_spki = key.subject_public_key_info();
    let bad_cert = |reason: String| CertError::BadCaCert {
        path: cert_path.clone(),
        reason,
    };

    let mut found_any = false;
    for item in CertificateDer::pem_slice_iter(&cert_pem) {
        let der = item.map_err(|e| bad_cert(format!("invalid PEM: {e}")))?;
        found_any = true;
        let (cert, subject_key_id) = parse_cert(&der)
            .ok_or_else(|| bad_cert("a certificate in it is not valid X.509 DER".to_string()))?;
        if cert.public_key().raw != key_spki.as_slice() {
            continue;
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(cert.subject()).map_err(bad_cert)?;
        params.key_identifier_method = match subject_key_id {
            Some(id) => KeyIdMethod::PreSpecified(id.to_vec()),
            None => KeyIdMethod::Sha256,
        };
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let subject = cert.subject().as_raw().to_vec();
        return Ok(LoadedCa {
            issuer: Issuer::new(params, key),
            subject,
            key_id: subject_key_id.map(<[u8]>::to_vec),
            cert_path,
        });
    }
    if found_any {
        Err(CertError::KeyMismatch {
            key: key_path,
            cert: cert_path,
        })
    } else {
        Err(bad_cert("it contains no PEM CERTIFICATE block".to_string()))
    }
}

fn read_ca_file(dir: &Path, path: &Path) -> Result<Vec<u8>, CertError> {
    fs::read(path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            CertError::MissingCa {
                path: path.to_path_buf(),
                dir: dir.to_path_buf(),
            }
        } else {
            io_error("read", path, source)
        }
    })
}

// ---------------------------------------------------------------------------------------
// Files

fn io_error(action: &'static str, path: &Path, source: io::Error) -> CertError {
    CertError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Fails on the first of `paths` that already exists (checked before anything is written).
fn refuse_existing(paths: &[PathBuf]) -> Result<(), CertError> {
    for path in paths {
        match fs::symlink_metadata(path) {
            Ok(_) => return Err(CertError::Exists { path: path.clone() }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("inspect", path, e)),
        }
    }
    Ok(())
}

/// Creates `dir` (and missing parents) with mode 0700; an existing directory is left as it is.
fn create_dir(dir: &Path) -> Result<(), CertError> {
    if dir.is_dir() {
        return Ok(());
    }
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(|e| io_error("create directory", dir, e))
}

/// Writes `contents` to `path` with exactly `mode`: temp file in the same directory, fsync, rename.
fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    routy_log::disk::write_atomic_with(path, contents, Some(mode))
        .map_err(|e| io_error("write", path, e))
}

fn sync_dir(dir: &Path) -> Result<(), CertError> {
    routy_log::disk::sync_dir(dir).map_err(|e| io_error("fsync directory", dir, e))
}

// ---------------------------------------------------------------------------------------
// Reading the few parts of a certificate we need

/// Parses a DER certificate and its subject key identifier, if it has one; `None` if the
/// certificate or that extension is malformed. The input is the operator's own CA file:
/// x509-parser bounds-checks every read, so no input makes this panic.
fn parse_cert(der: &[u8]) -> Option<(X509Certificate<'_>, Option<&[u8]>)> {
    let (_, cert) = parse_x509_certificate(der).ok()?;
    let subject_key_id = match cert
        .extensions()
        .iter()
        .find(|ext| ext.oid == OID_X509_EXT_SUBJECT_KEY_IDENTIFIER)
        .map(|ext| ext.parsed_extension())
    {
        None => None,
        Some(ParsedExtension::SubjectKeyIdentifier(id)) => Some(id.0),
        Some(_) => return None,
    };
    Some((cert, subject_key_id))
}

/// Rebuilds an rcgen name from a certificate's Name, so rcgen re-encodes it byte for byte
/// (the caller checks that). Only UTF8String, PrintableString and IA5String values are
/// supported: those are the string types rcgen writes exactly as they were read.
fn distinguished_name(name: &X509Name<'_>) -> Result<DistinguishedName, String> {
    let malformed = || "its subject name is malformed".to_string();
    let mut dn = DistinguishedName::new();
    for atv in name.iter_attributes() {
        let arcs: Vec<u64> = atv.attr_type().iter().ok_or_else(malformed)?.collect();
        let value = atv.attr_value();
        let tag = identifier_octet(&value.header);
        if !matches!(tag, UTF8_STRING | PRINTABLE_STRING | IA5_STRING) {
            return Err(format!(
                "its subject name uses an unsupported string type (DER tag {tag:#04x})"
            ));
        }
        let text = std::str::from_utf8(value.data).map_err(|_| malformed())?;
        let value = match tag {
            PRINTABLE_STRING => {
                DnValue::PrintableString(PrintableString::try_from(text).map_err(|_| malformed())?)
            }
            IA5_STRING => DnValue::Ia5String(Ia5String::try_from(text).map_err(|_| malformed())?),
            _ => DnValue::Utf8String(text.to_string()),
        };
        dn.push(DnType::from_oid(&arcs), value);
    }
    Ok(dn)
}

const UTF8_STRING: u8 = 0x0c;
const PRINTABLE_STRING: u8 = 0x13;
const IA5_STRING: u8 = 0x16;

/// The first byte of an element's DER encoding: class, constructed bit and tag number
/// (0x1f for the multi-byte tag numbers).
fn identifier_octet(header: &Header<'_>) -> u8 {
    let number = u8::try_from(header.tag().0).map_or(0x1f, |n| n.min(0x1f));
    (header.class() as u8) << 6 | u8::from(header.is_constructed()) << 5 | number
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    use rustls::client::danger::ServerCertVerifier;
    use rustls::client::WebPkiServerVerifier;
    use rustls::server::WebPkiClientVerifier;
    use rustls::RootCertStore;
    use rustls_pki_types::UnixTime;
    use x509_parser::extensions::GeneralName;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn cert_der(path: &Path) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(path).unwrap()
    }

    fn with_cert<T>(path: &Path, f: impl FnOnce(&X509Certificate<'_>) -> T) -> T {
        let der = cert_der(path);
        let (_, cert) = parse_x509_certificate(&der).unwrap();
        f(&cert)
    }

    fn common_name_of(cert: &X509Certificate<'_>) -> String {
        let cn = cert.subject().iter_common_name().next().unwrap();
        cn.as_str().unwrap().to_string()
    }

    fn validity_days(cert: &X509Certificate<'_>) -> i64 {
        let v = cert.validity();
        (v.not_after.to_datetime() - v.not_before.to_datetime()).whole_days()
    }

    fn roots(ca: &Path) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(cert_der(ca)).unwrap();
        Arc::new(roots)
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// What relay-outer's acceptor does with a client certificate.
    fn client_verifies(ca: &Path, cert: &Path) -> Result<(), rustls::Error> {
        let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca), provider())
            .build()
            .unwrap();
        verifier
            .verify_client_cert(&cert_der(cert), &[], UnixTime::now())
            .map(|_| ())
    }

    /// What relay-inner's dialer does with relay-outer's certificate.
    fn server_verifies(ca: &Path, cert: &Path, name: &str) -> Result<(), rustls::Error> {
        let verifier = WebPkiServerVerifier::builder_with_provider(roots(ca), provider())
            .build()
            .unwrap();
        let name = ServerName::try_from(name.to_string()).unwrap();
        verifier
            .verify_server_cert(&cert_der(cert), &[], &name, &[], UnixTime::now())
            .map(|_| ())
    }

    fn init_dir() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pki");
        init(&dir, &names(&["relay.example.com", "203.0.113.10"]), false).unwrap();
        (tmp, dir)
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut files: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        files
    }

    #[test]
    fn init_writes_four_files_with_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("etc").join("pki");
        let written = init(&dir, &names(&["relay.example.com"]), false).unwrap();
        let expected: Vec<PathBuf> = ["ca.crt", "ca.key", "outer.crt", "outer.key"]
            .iter()
            .map(|n| dir.join(n))
            .collect();
        assert_eq!(written, expected);
        assert_eq!(
            listing(&dir),
            ["ca.crt", "ca.key", "outer.crt", "outer.key"]
        );
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("ca.key")), 0o600);
        assert_eq!(mode(&dir.join("outer.key")), 0o600);
        assert_eq!(mode(&dir.join("ca.crt")), 0o644);
        assert_eq!(mode(&dir.join("outer.crt")), 0o644);
        let key = fs::read_to_string(dir.join("ca.key")).unwrap();
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "{key}");
        KeyPair::from_pem(&key).unwrap();
    }

    #[test]
    fn ca_certificate_is_a_ten_year_signing_ca() {
        let (_tmp, dir) = init_dir();
        with_cert(&dir.join("ca.crt"), |cert| {
            assert_eq!(common_name_of(cert), "Routy CA");
            assert_eq!(cert.subject(), cert.issuer());
            let bc = cert.basic_constraints().unwrap().unwrap().value;
            assert!(bc.ca);
            let ku = cert.key_usage().unwrap().unwrap().value;
            assert!(ku.key_cert_sign() && ku.crl_sign());
            assert!((3652..=3653).contains(&validity_days(cert)));
        });
    }

    #[test]
    fn outer_certificate_names_every_server_name() {
        let (_tmp, dir) = init_dir();
        let (ca, outer) = (dir.join("ca.crt"), dir.join("outer.crt"));
        with_cert(&outer, |cert| {
            assert_eq!(common_name_of(cert), "relay.example.com");
            let san = cert.subject_alternative_name().unwrap().unwrap().value;
            assert!(san
                .general_names
                .contains(&GeneralName::DNSName("relay.example.com")));
            assert!(san
                .general_names
                .contains(&GeneralName::IPAddress(&[203, 0, 113, 10])));
            let eku = cert.extended_key_usage().unwrap().unwrap().value;
            assert!(eku.server_auth && !eku.client_auth);
            assert_eq!(validity_days(cert), 825);
        });
        server_verifies(&ca, &outer, "relay.example.com").unwrap();
        server_verifies(&ca, &outer, "203.0.113.10").unwrap();
        assert!(server_verifies(&ca, &outer, "other.example.com").is_err());
    }

    #[test]
    fn init_refuses_to_overwrite_without_force() {
        let (_tmp, dir) = init_dir();
        let ca_before = fs::read(dir.join("ca.crt")).unwrap();
        let err = init(&dir, &names(&["relay.example.com"]), false).unwrap_err();
        assert!(matches!(err, CertError::Exists { .. }), "{err:?}");
        assert!(err.to_string().contains("ca.crt"), "{err}");
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(fs::read(dir.join("ca.crt")).unwrap(), ca_before);

        // Only outer.key left behind: still refused, naming that file, nothing written.
        for name in ["ca.crt", "ca.key", "outer.crt"] {
            fs::remove_file(dir.join(name)).unwrap();
        }
        let err = init(&dir, &names(&["relay.example.com"]), false).unwrap_err();
        assert!(err.to_string().contains("outer.key"), "{err}");
        assert_eq!(listing(&dir), ["outer.key"]);

        init(&dir, &names(&["relay.example.com"]), true).unwrap();
        assert_ne!(fs::read(dir.join("ca.crt")).unwrap(), ca_before);
        assert_eq!(
            listing(&dir),
            ["ca.crt", "ca.key", "outer.crt", "outer.key"]
        );
    }

    #[test]
    fn init_checks_server_names() {
        let tmp = tempfile::tempdir().unwrap();
        let err = init(tmp.path(), &[], false).unwrap_err();
        assert!(matches!(err, CertError::NoServerName), "{err:?}");
        let err = init(tmp.path(), &names(&["ok.example.com", "bad name"]), false).unwrap_err();
        assert!(err.to_string().contains("\"bad name\""), "{err}");
        assert!(listing(tmp.path()).is_empty());
    }

    #[test]
    fn issue_makes_a_client_certificate_that_chains_to_the_ca() {
        let (_tmp, dir) = init_dir();
        let written = issue(&dir, "site-a", false).unwrap();
        assert_eq!(written, [dir.join("site-a.crt"), dir.join("site-a.key")]);
        assert_eq!(mode(&dir.join("site-a.key")), 0o600);
        assert_eq!(mode(&dir.join("site-a.crt")), 0o644);
        with_cert(&dir.join("site-a.crt"), |cert| {
            assert_eq!(common_name_of(cert), "site-a");
            let san = cert.subject_alternative_name().unwrap().unwrap().value;
            assert_eq!(san.general_names, [GeneralName::DNSName("site-a")]);
            let eku = cert.extended_key_usage().unwrap().unwrap().value;
            assert!(eku.client_auth && !eku.server_auth);
            assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
            assert_eq!(validity_days(cert), 825);
        });
        client_verifies(&dir.join("ca.crt"), &dir.join("site-a.crt")).unwrap();

        // A different CA does not accept it, and it is no server certificate.
        let (_tmp2, other) = init_dir();
        assert!(client_verifies(&other.join("ca.crt"), &dir.join("site-a.crt")).is_err());
        assert!(client_verifies(&dir.join("ca.crt"), &dir.join("outer.crt")).is_err());
        assert_eq!(
            listing(&dir),
            [
                "ca.crt",
                "ca.key",
                "outer.crt",
                "outer.key",
                "site-a.crt",
                "site-a.key"
            ]
        );
    }

    #[test]
    fn issue_refuses_to_overwrite_without_force() {
        let (_tmp, dir) = init_dir();
        issue(&dir, "site-a", false).unwrap();
        let before = fs::read(dir.join("site-a.crt")).unwrap();
        let err = issue(&dir, "site-a", false).unwrap_err();
        assert!(err.to_string().contains("site-a.crt"), "{err}");
        assert_eq!(fs::read(dir.join("site-a.crt")).unwrap(), before);
        issue(&dir, "site-a", true).unwrap();
        assert_ne!(fs::read(dir.join("site-a.crt")).unwrap(), before);
        client_verifies(&dir.join("ca.crt"), &dir.join("site-a.crt")).unwrap();
    }

    #[test]
    fn tunnel_names_follow_the_rules() {
        for good in ["site-a", "a", "0", "a-b-c", "x1", &"a".repeat(63)] {
            assert_eq!(validate_tunnel_name(good), Ok(()), "{good}");
        }
        let cases = [
            ("", "must not be empty"),
            (&"a".repeat(64), "at most 63"),
            ("Site-a", "contains 'S'"),
            ("site_a", "contains '_'"),
            ("site.a", "contains '.'"),
            ("sité", "contains 'é'"),
            ("-site", "must not start with '-'"),
            ("site-", "must not end with '-'"),
            ("ca", "reserved"),
            ("outer", "reserved"),
        ];
        for (bad, rule) in cases {
            let err = validate_tunnel_name(bad).unwrap_err();
            assert!(err.contains(rule), "{bad:?}: {err}");
        }
    }

    #[test]
    fn issue_refuses_bad_tunnel_names() {
        let (_tmp, dir) = init_dir();
        for bad in ["Site-A", "-x", "ca", "../etc/x"] {
            let err = issue(&dir, bad, true).unwrap_err();
            assert!(matches!(err, CertError::InvalidTunnelName(_)), "{err:?}");
        }
        let err = issue(&dir, "site_a", false).unwrap_err();
        assert!(err.to_string().contains("contains '_'"), "{err}");
        assert_eq!(
            listing(&dir),
            ["ca.crt", "ca.key", "outer.crt", "outer.key"]
        );
    }

    #[test]
    fn issue_without_a_ca_names_the_missing_file() {
        let tmp = tempfile::tempdir().unwrap();
        let err = issue(tmp.path(), "site-a", false).unwrap_err();
        assert!(matches!(err, CertError::MissingCa { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("ca.crt") && msg.contains("certs init"),
            "{msg}"
        );

        let (_tmp, dir) = init_dir();
        fs::remove_file(dir.join("ca.key")).unwrap();
        let err = issue(&dir, "site-a", false).unwrap_err();
        assert!(err.to_string().contains("ca.key"), "{err}");
        assert!(!dir.join("site-a.crt").exists());
    }

    #[test]
    fn issue_rejects_a_key_that_is_not_the_cas() {
        let (_tmp, dir) = init_dir();
        let (_tmp2, other) = init_dir();
        fs::copy(other.join("ca.key"), dir.join("ca.key")).unwrap();
        let err = issue(&dir, "site-a", false).unwrap_err();
        assert!(matches!(err, CertError::KeyMismatch { .. }), "{err:?}");
        assert!(err.to_string().contains("ca.key"), "{err}");

        fs::write(dir.join("ca.key"), "not a key").unwrap();
        let err = issue(&dir, "site-a", false).unwrap_err();
        assert!(matches!(err, CertError::BadCaKey { .. }), "{err:?}");
        fs::write(dir.join("ca.crt"), "not a certificate").unwrap();
        fs::copy(other.join("ca.key"), dir.join("ca.key")).unwrap();
        let err = issue(&dir, "site-a", false).unwrap_err();
        assert!(matches!(err, CertError::BadCaCert { .. }), "{err:?}");
        assert!(err.to_string().contains("ca.crt"), "{err}");
    }

    #[test]
    fn issue_finds_the_ca_in_a_bundle() {
        // During a CA rotation ca.crt may hold the old and the new CA.
        let (_tmp, dir) = init_dir();
        let (_tmp2, other) = init_dir();
        let mut bundle = fs::read_to_string(other.join("ca.crt")).unwrap();
        bundle.push_str(&fs::read_to_string(dir.join("ca.crt")).unwrap());
        let own_ca = dir.join("own-ca.pem");
        fs::rename(dir.join("ca.crt"), &own_ca).unwrap();
        fs::write(dir.join("ca.crt"), bundle).unwrap();
        issue(&dir, "site-a", false).unwrap();
        client_verifies(&own_ca, &dir.join("site-a.crt")).unwrap();
    }

    #[test]
    fn issue_accepts_a_ca_made_elsewhere() {
        // A CA not made by `init`: several name attributes, PrintableString values and a
        // SHA-384 key identifier. Issued certificates must name it byte for byte.
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut params = ca_params(OffsetDateTime::now_utc());
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CountryName,
            DnValue::PrintableString(rcgen::string::PrintableString::try_from("DE").unwrap()),
        );
        dn.push(DnType::OrganizationName, "Example Ops");
        dn.push(DnType::CommonName, "Example Routy CA");
        params.distinguished_name = dn;
        params.key_identifier_method = KeyIdMethod::Sha384;
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        fs::write(dir.join("ca.crt"), cert.pem()).unwrap();
        fs::write(dir.join("ca.key"), key.serialize_pem()).unwrap();

        issue(dir, "site-b", false).unwrap();
        client_verifies(&dir.join("ca.crt"), &dir.join("site-b.crt")).unwrap();
        let ca_ski = with_cert(&dir.join("ca.crt"), |ca| {
            match ca
                .get_extension_unique(
                    &x509_parser::oid_registry::OID_X509_EXT_SUBJECT_KEY_IDENTIFIER,
                )
                .unwrap()
                .unwrap()
                .parsed_extension()
            {
                x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(id) => id.0.to_vec(),
                other => panic!("{other:?}"),
            }
        });
        with_cert(&dir.join("site-b.crt"), |leaf| {
            let aki = leaf
                .get_extension_unique(
                    &x509_parser::oid_registry::OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER,
                )
                .unwrap()
                .unwrap();
            match aki.parsed_extension() {
                x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(aki) => {
                    assert_eq!(aki.key_identifier.as_ref().unwrap().0, ca_ski.as_slice());
                }
                other => panic!("{other:?}"),
            }
        });
    }

    #[test]
    fn issue_refuses_a_ca_name_it_cannot_reproduce() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut params = ca_params(OffsetDateTime::now_utc());
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            DnValue::BmpString(rcgen::string::BmpString::try_from("Routy CA").unwrap()),
        );
        params.distinguished_name = dn;
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        fs::write(dir.join("ca.crt"), cert.pem()).unwrap();
        fs::write(dir.join("ca.key"), key.serialize_pem()).unwrap();
        let err = issue(dir, "site-a", false).unwrap_err();
        assert!(matches!(err, CertError::BadCaCert { .. }), "{err:?}");
        assert!(
            err.to_string()
                .contains("its subject name uses an unsupported string type (DER tag 0x1e)"),
            "{err}"
        );
        assert!(!dir.join("site-a.crt").exists());
    }

    #[test]
    fn renew_outer_keeps_the_ca() {
        let (_tmp, dir) = init_dir();
        issue(&dir, "site-a", false).unwrap();
        let ca_crt = fs::read(dir.join("ca.crt")).unwrap();
        let ca_key = fs::read(dir.join("ca.key")).unwrap();
        let outer_before = fs::read(dir.join("outer.crt")).unwrap();
        let outer_key_before = fs::read(dir.join("outer.key")).unwrap();

        let written = renew_outer(&dir, &names(&["relay2.example.com"])).unwrap();
        assert_eq!(written, [dir.join("outer.crt"), dir.join("outer.key")]);
        assert_eq!(fs::read(dir.join("ca.crt")).unwrap(), ca_crt);
        assert_eq!(fs::read(dir.join("ca.key")).unwrap(), ca_key);
        assert_ne!(fs::read(dir.join("outer.crt")).unwrap(), outer_before);
        assert_ne!(fs::read(dir.join("outer.key")).unwrap(), outer_key_before);
        assert_eq!(mode(&dir.join("outer.key")), 0o600);

        let (ca, outer) = (dir.join("ca.crt"), dir.join("outer.crt"));
        server_verifies(&ca, &outer, "relay2.example.com").unwrap();
        assert!(server_verifies(&ca, &outer, "relay.example.com").is_err());
        // Certificates issued before the renewal still chain to the same CA.
        client_verifies(&ca, &dir.join("site-a.crt")).unwrap();
        assert_eq!(
            listing(&dir),
            [
                "ca.crt",
                "ca.key",
                "outer.crt",
                "outer.key",
                "site-a.crt",
                "site-a.key"
            ]
        );
    }

    #[test]
    fn renew_outer_without_a_ca_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let err = renew_outer(tmp.path(), &names(&["relay.example.com"])).unwrap_err();
        assert!(err.to_string().contains("ca.crt"), "{err}");
        assert!(listing(tmp.path()).is_empty());
    }

    #[test]
    fn parse_cert_never_panics_on_damaged_certificates() {
        let (_tmp, dir) = init_dir();
        let der = cert_der(&dir.join("ca.crt"));
        let (cert, subject_key_id) = parse_cert(&der).unwrap();
        assert_eq!(cert.issuer().as_raw(), cert.subject().as_raw());
        assert!(subject_key_id.is_some());
        for len in 0..der.len() {
            assert!(parse_cert(&der[..len]).is_none(), "prefix {len}");
        }
        let mut flipped = der.to_vec();
        for i in 0..flipped.len() {
            flipped[i] ^= 0xff;
            let _ = parse_cert(&flipped);
            flipped[i] ^= 0xff;
        }
        assert!(parse_cert(&[]).is_none());
        assert!(parse_cert(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_none());
        assert!(parse_cert(&[0x30, 0x85, 0, 0, 0, 0, 1]).is_none());
        assert!(parse_cert(&[0x1f, 0x01, 0x00]).is_none());
    }

    #[test]
    fn revoke_lists_certificates_in_a_signed_list_that_grows() {
        use rustls_pki_types::CertificateRevocationListDer;
        let (_tmp, dir) = init_dir();
        issue(&dir, "site-a", false).unwrap();
        issue(&dir, "site-b", false).unwrap();
        let a = dir.join("site-a.crt");
        let b = dir.join("site-b.crt");
        let r = revoke(&dir, &a).unwrap();
        assert!(!r.already);
        assert_eq!((r.listed, r.crl.clone()), (1, dir.join(CRL_FILE)));
        assert_eq!(mode(&r.crl), CERT_MODE);
        let verifier = |crl: &Path| {
            let pem = fs::read(crl).unwrap();
            let crls: Vec<CertificateRevocationListDer<'static>> =
                CertificateRevocationListDer::pem_slice_iter(&pem)
                    .map(|c| c.unwrap())
                    .collect();
            WebPkiClientVerifier::builder_with_provider(roots(&dir.join(CA_CERT)), provider())
                .with_crls(crls)
                .build()
                .unwrap()
        };
        let check = |crl: &Path, cert: &Path| {
            verifier(crl)
                .verify_client_cert(&cert_der(cert), &[], UnixTime::now())
                .map(|_| ())
        };
        let e = check(&r.crl, &a).unwrap_err();
        assert!(e.to_string().to_lowercase().contains("revoked"), "{e}");
        assert!(check(&r.crl, &b).is_ok());
        // A second revocation keeps the first and numbers the list higher.
        let r2 = revoke(&dir, &b).unwrap();
        assert_eq!(r2.listed, 2);
        assert!(check(&r2.crl, &a).is_err() && check(&r2.crl, &b).is_err());
        let pem = fs::read(&r2.crl).unwrap();
        let der = CertificateRevocationListDer::pem_slice_iter(&pem)
            .next()
            .unwrap()
            .unwrap();
        let (_, list) = x509_parser::parse_x509_crl(&der).unwrap();
        assert_eq!(list.crl_number().map(|n| n.to_string()), Some("2".into()));
        // Again: nothing new, still both.
        let r3 = revoke(&dir, &a).unwrap();
        assert!(r3.already);
        assert_eq!(r3.listed, 2);
    }

    #[test]
    fn revoke_refuses_foreign_certificates_and_broken_lists() {
        let (_tmp, dir) = init_dir();
        let (_tmp2, other) = init_dir();
        issue(&other, "site-x", false).unwrap();
        let e = revoke(&dir, &other.join("site-x.crt"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not by the CA"), "{e}");
        let e = revoke(&dir, &dir.join("nope.crt")).unwrap_err().to_string();
        assert!(e.contains("cannot read"), "{e}");
        issue(&dir, "site-a", false).unwrap();
        fs::write(dir.join(CRL_FILE), "junk\n").unwrap();
        let e = revoke(&dir, &dir.join("site-a.crt"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a usable revocation list"), "{e}");
        // Another CA's list is not extended.
        issue(&other, "site-y", false).unwrap();
        let theirs = revoke(&other, &other.join("site-y.crt")).unwrap();
        fs::copy(&theirs.crl, dir.join(CRL_FILE)).unwrap();
        let e = revoke(&dir, &dir.join("site-a.crt"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not by this CA"), "{e}");
    }
}
