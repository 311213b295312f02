//! TLS configuration for both ends: PEM loading, mutual authentication, ALPN, and the
//! tunnel identity taken from the client certificate.
//!
//! One crypto provider (ring) for the whole tree, TLS 1.3 only.
//!
//! The peer's chain is verified by webpki and then by [`Trust`]'s own rules, which
//! webpki leaves out: webpki treats a CA file's certificate as a bare trust anchor and
//! ignores its basic constraints, so a CA with `pathlen:0` (what `relay-outer certs
//! init` makes) would still accept a leaf issued through an intermediate CA. Here a
//! chain may pass through at most [`Trust::max_intermediates`] intermediate CAs (0
//! unless configured: CA → leaf only), and never more than the anchor's own path
//! length allows. Name constraints on the CA (DNS, IP) are webpki's. Certificate
//! revocation lists ([`Trust::crls`]) are checked for the peer's own certificate.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};

/// ALPN protocol name of the tunnel.
pub const ALPN: &[u8] = b"routy/1";

/// Why TLS material could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or held no usable PEM.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the material.
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn file_err(path: &Path, reason: impl Into<String>) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads every certificate of a PEM file (a chain or a CA bundle).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = std::fs::read(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&data).collect();
    let certs = certs.map_err(|e| file_err(path, format!("invalid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(file_err(path, "contains no CERTIFICATE block"));
    }
    Ok(certs)
}

/// Loads the first private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let data = std::fs::read(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
    PrivateKeyDer::from_pem_slice(&data)
        .map_err(|e| file_err(path, format!("no usable private key: {e}")))
}

fn roots(ca: &Path) -> Result<RootCertStore, TlsError> {
    roots_of(ca, load_certs(ca)?)
}

/// The trust store of the certificates read from the CA file `ca`.
fn roots_of(ca: &Path, certs: Vec<CertificateDer<'static>>) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in certs {
        store
            .add(cert)
            .map_err(|e| file_err(ca, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(store)
}

/// Server side (relay-outer): our certificate, and client certificates required and
/// verified against `client_ca` under the default [`Trust`].
pub fn server_config(cert: &Path, key: &Path, client_ca: &Path) -> Result<ServerConfig, TlsError> {
    server_config_with(cert, key, client_ca, &Trust::default())
}

/// [`server_config`] under `trust`'s rules and revocation lists.
pub fn server_config_with(
    cert: &Path,
    key: &Path,
    client_ca: &Path,
    trust: &Trust,
) -> Result<ServerConfig, TlsError> {
    let chain = load_certs(cert)?;
    let key = load_key(key)?;
    let (roots, rules, crls) = trust_material(client_ca, trust)?;
    let mut builder = WebPkiClientVerifier::builder_with_provider(roots, provider());
    if !crls.is_empty() {
        builder = builder
            .with_crls(crls)
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status();
    }
    let webpki = builder.build().map_err(|e| {
        TlsError::Config(format!("client verifier from {}: {e}", client_ca.display()))
    })?;
    let verifier = Arc::new(RuledClientVerifier { webpki, rules });
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(format!("{} with its key: {e}", cert.display())))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// ALPN of the outer TLS under a WebSocket (`wss://`): plain HTTP/1.1, what a load
/// balancer or proxy in between expects.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Server side of the outer TLS under a WebSocket (`wss://` to relay-outer's tunnel
/// port): our certificate, no client certificate at this layer (a load balancer in
/// front may have terminated the client's TLS), ALPN `http/1.1`. Inside the WebSocket the
/// tunnel's own mutual TLS ([`server_config`]) authenticates relay-inner.
pub fn websocket_server_config(cert: &Path, key: &Path) -> Result<ServerConfig, TlsError> {
    let chain = load_certs(cert)?;
    let key = load_key(key)?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(format!("{} with its key: {e}", cert.display())))?;
    cfg.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(cfg)
}

/// An HTTPS endpoint's server side (the admin endpoint, the consumer API): our
/// certificate, TLS 1.2 or 1.3, ALPN `http/1.1`; with `client_ca`, clients must present
/// a certificate that CA signed.
pub fn https_server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<ServerConfig, TlsError> {
    let chain = load_certs(cert)?;
    let key = load_key(key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(roots(ca)?.into(), provider())
                    .build()
                    .map_err(|e| {
                        TlsError::Config(format!("client verifier from {}: {e}", ca.display()))
                    })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(format!("{} with its key: {e}", cert.display())))?;
    cfg.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(cfg)
}

/// The admin endpoint's TLS acceptor (`admin.tls`), when configured; errors name the key.
pub fn admin_acceptor(
    admin: &routy_ops::admin::AdminSettings,
) -> Result<Option<tokio_rustls::TlsAcceptor>, String> {
    let Some(t) = &admin.tls else {
        return Ok(None);
    };
    https_server_config(&t.cert, &t.key, t.client_ca.as_deref())
        .map(|c| Some(tokio_rustls::TlsAcceptor::from(Arc::new(c))))
        .map_err(|e| format!("admin.tls: {e}"))
}

/// Client side of the outer TLS under a WebSocket (`wss://`): the server (relay-outer,
/// or a load balancer in front of it) verified against `ca`, no client certificate,
/// ALPN `http/1.1`.
pub fn websocket_client_config(ca: &Path) -> Result<ClientConfig, TlsError> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots(ca)?)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(cfg)
}

/// Client side (relay-inner): our certificate, and the server verified against `ca`
/// under the default [`Trust`].
pub fn client_config(cert: &Path, key: &Path, ca: &Path) -> Result<ClientConfig, TlsError> {
    client_config_with(cert, key, ca, &Trust::default())
}

/// [`client_config`] under `trust`'s rules and revocation lists.
pub fn client_config_with(
    cert: &Path,
    key: &Path,
    ca: &Path,
    trust: &Trust,
) -> Result<ClientConfig, TlsError> {
    let chain = load_certs(cert)?;
    let key = load_key(key)?;
    let (roots, rules, crls) = trust_material(ca, trust)?;
    let mut builder = WebPkiServerVerifier::builder_with_provider(roots, provider());
    if !crls.is_empty() {
        builder = builder
            .with_crls(crls)
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status();
    }
    let webpki = builder
        .build()
        .map_err(|e| TlsError::Config(format!("server verifier from {}: {e}", ca.display())))?;
    let verifier = Arc::new(RuledServerVerifier { webpki, rules });
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .map_err(|e| TlsError::Config(format!("{} with its key: {e}", cert.display())))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// Rules for the peer's certificate beyond webpki's (see the module).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trust {
    /// Intermediate CAs a chain may pass through between the CA file's certificate and
    /// the peer's certificate (the anchor's own path length still applies).
    pub max_intermediates: u32,
    /// Certificate revocation list files (PEM or DER), issued by a CA of the CA file.
    pub crls: Vec<PathBuf>,
}

impl Trust {
    /// From a config file's `max_intermediates` and `crl` keys, each CRL path resolved
    /// by `resolve` (against the file's directory).
    pub fn from_keys(
        max_intermediates: Option<u32>,
        crl: Option<&routy_ops::config_file::OneOrMany<PathBuf>>,
        resolve: impl Fn(&Path) -> PathBuf,
    ) -> Trust {
        Trust {
            max_intermediates: max_intermediates.unwrap_or(0),
            crls: crl
                .cloned()
                .map(|c| c.into_vec())
                .unwrap_or_default()
                .iter()
                .map(|p| resolve(p))
                .collect(),
        }
    }
}

/// What verifying a peer against the CA file `ca` under `trust` takes, the file read
/// once: the trust store, the chain rules and the revocation lists.
#[allow(clippy::type_complexity)]
fn trust_material(
    ca: &Path,
    trust: &Trust,
) -> Result<
    (
        Arc<RootCertStore>,
        ChainRules,
        Vec<CertificateRevocationListDer<'static>>,
    ),
    TlsError,
> {
    let certs = load_certs(ca)?;
    let rules = ChainRules::of(ca, &certs, trust.max_intermediates)?;
    let crls = crls_issued_by(&trust.crls, &rules.anchors, ca)?;
    Ok((Arc::new(roots_of(ca, certs)?), rules, crls))
}

/// What the chain rules know of one trust anchor.
#[derive(Debug, Clone)]
struct Anchor {
    subject: Vec<u8>,
    /// Its subject key identifier, if it has one.
    key_id: Option<Vec<u8>>,
    name: String,
    /// `pathlen` of its basic constraints: intermediate CAs it allows below it.
    path_len: Option<u32>,
}

#[derive(Debug, Clone)]
struct ChainRules {
    anchors: Vec<Anchor>,
    max_intermediates: u32,
}

impl ChainRules {
    /// The rules for the certificates `certs` read from the CA file `ca`.
    fn of(
        ca: &Path,
        certs: &[CertificateDer<'_>],
        max_intermediates: u32,
    ) -> Result<ChainRules, TlsError> {
        let mut anchors = Vec::new();
        for der in certs {
            let (_, c) = x509_parser::parse_x509_certificate(der.as_ref())
                .map_err(|e| file_err(ca, format!("not a usable CA certificate: {e}")))?;
            let path_len = match c.basic_constraints() {
                Ok(Some(bc)) => bc.value.path_len_constraint,
                _ => None,
            };
            anchors.push(Anchor {
                subject: c.subject().as_raw().to_vec(),
                key_id: subject_key_id(&c),
                name: c.subject().to_string(),
                path_len,
            });
        }
        Ok(ChainRules {
            anchors,
            max_intermediates,
        })
    }

    /// Follows the chain from `end_entity` by issuer name through `intermediates` to an
    /// anchor and checks the number of intermediate CAs on the way. Called after webpki
    /// accepted the chain (signatures, validity, usages).
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        let refuse = |why: String| {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
                PathRefused(why),
            ))))
        };
        let parsed: Vec<_> = intermediates
            .iter()
            .filter_map(|c| x509_parser::parse_x509_certificate(c.as_ref()).ok())
            .map(|(_, c)| c)
            .collect();
        let (_, leaf) = x509_parser::parse_x509_certificate(end_entity.as_ref())
            .map_err(|e| refuse(format!("unparsable certificate: {e}")))?;
        let mut issuer = leaf.issuer().as_raw();
        let mut through: Vec<String> = Vec::new();
        loop {
            if let Some(a) = self.anchors.iter().find(|a| a.subject == issuer) {
                let n = through.len() as u32;
                if n > self.max_intermediates {
                    return Err(refuse(format!(
                        "the chain passes through {n} intermediate CA(s) ({}) and at most {} \
                         are allowed (tls.max_intermediates)",
                        through.join(" <- "),
                        self.max_intermediates
                    )));
                }
                if let Some(p) = a.path_len.filter(|p| n > *p) {
                    return Err(refuse(format!(
                        "the CA {} allows {p} intermediate CA(s) below it (pathlen:{p}) and \
                         the chain passes through {n} ({})",
                        a.name,
                        through.join(" <- ")
                    )));
                }
                return Ok(());
            }
            let next = parsed.iter().find(|c| c.subject().as_raw() == issuer);
            match next {
                Some(c) if through.len() < parsed.len() => {
                    through.push(c.subject().to_string());
                    issuer = c.issuer().as_raw();
                }
                _ => return Err(refuse("no chain to a CA of the CA file".to_string())),
            }
        }
    }
}

/// Why [`ChainRules`] refused a chain.
#[derive(Debug)]
struct PathRefused(String);

impl std::fmt::Display for PathRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PathRefused {}

#[derive(Debug)]
struct RuledClientVerifier {
    webpki: Arc<dyn ClientCertVerifier>,
    rules: ChainRules,
}

impl ClientCertVerifier for RuledClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.webpki.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.webpki.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self
            .webpki
            .verify_client_cert(end_entity, intermediates, now)?;
        self.rules.check(end_entity, intermediates)?;
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

#[derive(Debug)]
struct RuledServerVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    rules: ChainRules,
}

impl ServerCertVerifier for RuledServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ok = self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        self.rules.check(end_entity, intermediates)?;
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// Reads certificate revocation lists (each file PEM with one or more `X509 CRL` blocks,
/// or one DER list), each of which must be issued by a CA in `ca`.
pub fn load_crls(
    files: &[PathBuf],
    ca: &Path,
) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    if files.is_empty() {
        return Ok(Vec::new());
    }
    let rules = ChainRules::of(ca, &load_certs(ca)?, 0)?;
    crls_issued_by(files, &rules.anchors, ca)
}

/// [`load_crls`] against the anchors already read from the CA file `ca`.
fn crls_issued_by(
    files: &[PathBuf],
    anchors: &[Anchor],
    ca: &Path,
) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let mut out = Vec::new();
    for path in files {
        for crl in read_crl_file(path)? {
            let (_, parsed) = x509_parser::parse_x509_crl(crl.as_ref())
                .map_err(|e| file_err(path, format!("not a certificate revocation list: {e}")))?;
            let ours = anchors.iter().any(|a| {
                issued_by(
                    parsed.issuer().as_raw(),
                    parsed.extensions(),
                    &a.subject,
                    a.key_id.as_deref(),
                )
            });
            if !ours {
                return Err(file_err(
                    path,
                    format!(
                        "issued by {}, which is not a CA in {}",
                        parsed.issuer(),
                        ca.display()
                    ),
                ));
            }
            out.push(crl);
        }
    }
    Ok(out)
}

/// Whether a certificate or revocation list naming `issuer` (DER) with extensions `exts`
/// was issued by the CA whose subject is `ca_subject` and key identifier `ca_key_id`.
/// The same name is not enough (every `relay-outer certs init` CA is "Routy CA"): where
/// both say their key identifier, it must be the same key.
pub fn issued_by(
    issuer: &[u8],
    exts: &[x509_parser::extensions::X509Extension<'_>],
    ca_subject: &[u8],
    ca_key_id: Option<&[u8]>,
) -> bool {
    issuer == ca_subject
        && match (authority_key_id(exts), ca_key_id) {
            (Some(a), Some(k)) => a == k,
            _ => true,
        }
}

/// The authority key identifier among `exts`, if any.
fn authority_key_id(exts: &[x509_parser::extensions::X509Extension<'_>]) -> Option<Vec<u8>> {
    exts.iter().find_map(|e| match e.parsed_extension() {
        x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(a) => {
            a.key_identifier.as_ref().map(|k| k.0.to_vec())
        }
        _ => None,
    })
}

/// A certificate's subject key identifier, if it has one.
fn subject_key_id(cert: &x509_parser::certificate::X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
}

fn read_crl_file(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let data = std::fs::read(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
    if data.starts_with(b"-----") || data.iter().take(64).all(|b| b.is_ascii()) {
        let crls: Result<Vec<_>, _> = CertificateRevocationListDer::pem_slice_iter(&data).collect();
        let crls = crls.map_err(|e| file_err(path, format!("invalid PEM: {e}")))?;
        if crls.is_empty() {
            return Err(file_err(path, "contains no X509 CRL block"));
        }
        Ok(crls)
    } else {
        Ok(vec![CertificateRevocationListDer::from(data)])
    }
}

/// The certificates the revocation lists in `files` name, as (issuer, serial) pairs;
/// [`revocation_key`] gives a certificate's pair. Used to close live sessions whose
/// certificate a reload's lists revoke.
pub fn revoked(files: &[PathBuf], ca: &Path) -> Result<HashSet<RevocationKey>, TlsError> {
    let mut out = HashSet::new();
    for crl in load_crls(files, ca)? {
        if let Ok((_, parsed)) = x509_parser::parse_x509_crl(crl.as_ref()) {
            let issuer = parsed.issuer().as_raw().to_vec();
            for r in parsed.iter_revoked_certificates() {
                out.insert((issuer.clone(), r.raw_serial().to_vec()));
            }
        }
    }
    Ok(out)
}

/// A certificate's issuer name (DER) and serial number, as revocation lists name it.
pub type RevocationKey = (Vec<u8>, Vec<u8>);

/// A certificate's (issuer, serial) pair, as [`revoked`] lists them.
pub fn revocation_key(cert: &CertificateDer<'_>) -> Option<RevocationKey> {
    let (_, c) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some((c.issuer().as_raw().to_vec(), c.raw_serial().to_vec()))
}

/// One certificate's expiry, for metrics and warnings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expiry {
    /// The certificate's subject, as text.
    pub subject: String,
    /// Its `notAfter`, in seconds since the Unix epoch.
    pub not_after: i64,
}

/// The expiry of every certificate in the PEM file `path`.
pub fn expiries(path: &Path) -> Result<Vec<Expiry>, TlsError> {
    let mut out = Vec::new();
    for der in load_certs(path)? {
        let (_, c) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| file_err(path, format!("unparsable certificate: {e}")))?;
        let subject = c
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map_or_else(|| c.subject().to_string(), str::to_owned);
        out.push(Expiry {
            subject,
            not_after: c.validity().not_after.timestamp(),
        });
    }
    Ok(out)
}

/// The tunnel name a certificate stands for: its subject Common Name.
pub fn identity(cert: &CertificateDer<'_>) -> Result<String, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("unparsable client certificate: {e}"))?;
    let cn = parsed
        .subject()
        .iter_common_name()
        .next()
        .ok_or_else(|| "client certificate has no Common Name".to_string())?;
    cn.as_str()
        .map(str::to_owned)
        .map_err(|e| format!("client certificate Common Name is not text: {e}"))
}

/// Whether an I/O error of a TLS stream is a TLS alert the peer sent: the peer's TLS
/// refused this end (tokio-rustls hands rustls' errors on inside the `io::Error`).
pub fn alert_received(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| matches!(e, rustls::Error::AlertReceived(_)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
        ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
        RevokedCertParams, SerialNumber,
    };

    /// A CA, an intermediate CA under it, and certificates issued by either, in a temp dir.
    struct Pki {
        dir: tempfile::TempDir,
        ca: Issuer<'static, KeyPair>,
        mid: Issuer<'static, KeyPair>,
        mid_pem: String,
    }

    fn ca_params(cn: &str, path_len: Option<u8>) -> CertificateParams {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(match path_len {
            Some(n) => BasicConstraints::Constrained(n),
            None => BasicConstraints::Unconstrained,
        });
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p
    }

    impl Pki {
        /// The CA's `pathlen` is `ca_path_len` (None: unconstrained).
        fn new(ca_path_len: Option<u8>) -> Pki {
            Pki::with_ca(ca_params("Routy CA", ca_path_len))
        }

        /// A PKI whose CA is made from `p`.
        fn with_ca(p: CertificateParams) -> Pki {
            let dir = tempfile::tempdir().unwrap();
            let k = KeyPair::generate().unwrap();
            std::fs::write(dir.path().join("ca.crt"), p.self_signed(&k).unwrap().pem()).unwrap();
            let ca = Issuer::new(p, k);
            let mp = ca_params("Intermediate CA", Some(0));
            let mk = KeyPair::generate().unwrap();
            let mid_pem = mp.signed_by(&mk, &ca).unwrap().pem();
            let mid = Issuer::new(mp, mk);
            let pki = Pki {
                dir,
                ca,
                mid,
                mid_pem,
            };
            pki.leaf("outer", ExtendedKeyUsagePurpose::ServerAuth, false, 1);
            pki
        }

        fn path(&self, n: &str) -> PathBuf {
            self.dir.path().join(n)
        }

        /// Writes `NAME.crt` (with the intermediate after the leaf when `via_mid`) and
        /// `NAME.key`.
        fn leaf(&self, cn: &str, eku: ExtendedKeyUsagePurpose, via_mid: bool, serial: u64) {
            let mut p = CertificateParams::new(vec![cn.to_string()]).unwrap();
            p.distinguished_name.push(DnType::CommonName, cn);
            p.is_ca = IsCa::ExplicitNoCa;
            p.extended_key_usages = vec![eku];
            p.serial_number = Some(SerialNumber::from(serial));
            let k = KeyPair::generate().unwrap();
            let mut pem = p
                .signed_by(&k, if via_mid { &self.mid } else { &self.ca })
                .unwrap()
                .pem();
            if via_mid {
                pem.push_str(&self.mid_pem);
            }
            std::fs::write(self.path(&format!("{cn}.crt")), pem).unwrap();
            std::fs::write(self.path(&format!("{cn}.key")), k.serialize_pem()).unwrap();
        }

        /// Writes `crl.pem` revoking `serials`, signed by `issuer` (or the CA).
        fn crl(&self, serials: &[u64], issuer: Option<&Issuer<'static, KeyPair>>) -> PathBuf {
            let now = time::OffsetDateTime::now_utc();
            let params = CertificateRevocationListParams {
                this_update: now - time::Duration::hours(1),
                next_update: now + time::Duration::days(7),
                crl_number: SerialNumber::from(1u64),
                issuing_distribution_point: None,
                revoked_certs: serials
                    .iter()
                    .map(|s| RevokedCertParams {
                        serial_number: SerialNumber::from(*s),
                        revocation_time: now - time::Duration::minutes(5),
                        reason_code: None,
                        invalidity_date: None,
                    })
                    .collect(),
                key_identifier_method: KeyIdMethod::Sha256,
            };
            let crl = params.signed_by(issuer.unwrap_or(&self.ca)).unwrap();
            let path = self.path("crl.pem");
            std::fs::write(&path, crl.pem().unwrap()).unwrap();
            path
        }

        fn server(&self, trust: &Trust) -> Result<ServerConfig, TlsError> {
            server_config_with(
                &self.path("outer.crt"),
                &self.path("outer.key"),
                &self.path("ca.crt"),
                trust,
            )
        }

        fn client(&self, name: &str, trust: &Trust) -> ClientConfig {
            client_config_with(
                &self.path(&format!("{name}.crt")),
                &self.path(&format!("{name}.key")),
                &self.path("ca.crt"),
                trust,
            )
            .unwrap()
        }
    }

    /// A TLS handshake in memory: the server's verdict, then the client's.
    fn handshake(
        server: ServerConfig,
        client: ClientConfig,
    ) -> (Result<(), String>, Result<(), String>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (a, b) = tokio::io::duplex(64 * 1024);
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
            let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
            let name = ServerName::try_from("outer").unwrap();
            let (s, c) = tokio::join!(
                async move {
                    use tokio::io::AsyncWriteExt;
                    // A byte for the client once accepted; then the stream is dropped.
                    let mut tls = acceptor.accept(a).await?;
                    tls.write_all(b"k").await?;
                    tls.flush().await
                },
                async move {
                    use tokio::io::AsyncReadExt;
                    // TLS 1.3: the client learns of a refused certificate on its first read.
                    let mut tls = connector.connect(name, b).await?;
                    let mut byte = [0u8; 1];
                    tls.read_exact(&mut byte).await.map(drop)
                }
            );
            (s.map_err(|e| e.to_string()), c.map_err(|e| e.to_string()))
        })
    }

    #[test]
    fn a_leaf_under_an_intermediate_is_refused_by_default_and_by_pathlen_0() {
        let pki = Pki::new(Some(0));
        pki.leaf("site-a", ExtendedKeyUsagePurpose::ClientAuth, true, 7);
        pki.leaf("site-b", ExtendedKeyUsagePurpose::ClientAuth, false, 8);
        let client = pki.client("site-a", &Trust::default());
        let (server, _) = handshake(pki.server(&Trust::default()).unwrap(), client.clone());
        let e = server.unwrap_err();
        assert!(
            e.contains("1 intermediate CA") && e.contains("tls.max_intermediates"),
            "{e}"
        );
        // Allowed by config, still refused: the CA's own pathlen:0.
        let one = Trust {
            max_intermediates: 1,
            ..Trust::default()
        };
        let (server, _) = handshake(pki.server(&one).unwrap(), client);
        let e = server.unwrap_err();
        assert!(
            e.contains("pathlen:0") && e.contains("Intermediate CA"),
            "{e}"
        );
        // A leaf issued by the CA itself passes.
        let (server, client) = handshake(
            pki.server(&Trust::default()).unwrap(),
            pki.client("site-b", &Trust::default()),
        );
        assert_eq!((server, client), (Ok(()), Ok(())));
    }

    #[test]
    fn intermediates_pass_only_when_configured_and_the_ca_allows_them() {
        let pki = Pki::new(None);
        pki.leaf("site-a", ExtendedKeyUsagePurpose::ClientAuth, true, 7);
        let (server, _) = handshake(
            pki.server(&Trust::default()).unwrap(),
            pki.client("site-a", &Trust::default()),
        );
        assert!(server.is_err());
        let one = Trust {
            max_intermediates: 1,
            ..Trust::default()
        };
        let (server, client) = handshake(pki.server(&one).unwrap(), pki.client("site-a", &one));
        assert_eq!((server, client), (Ok(()), Ok(())));
    }

    #[test]
    fn relay_inner_applies_the_same_rules_to_relay_outer() {
        let pki = Pki::new(Some(0));
        pki.leaf("outer", ExtendedKeyUsagePurpose::ServerAuth, true, 9);
        pki.leaf("site-b", ExtendedKeyUsagePurpose::ClientAuth, false, 8);
        let one = Trust {
            max_intermediates: 1,
            ..Trust::default()
        };
        for trust in [Trust::default(), one] {
            let (_, client) = handshake(
                pki.server(&Trust::default()).unwrap(),
                pki.client("site-b", &trust),
            );
            let e = client.unwrap_err();
            assert!(e.contains("intermediate CA"), "{e}");
        }
    }

    #[test]
    fn a_revoked_certificate_is_refused_on_both_sides_and_listed() {
        let pki = Pki::new(Some(0));
        pki.leaf("site-a", ExtendedKeyUsagePurpose::ClientAuth, false, 7);
        pki.leaf("site-b", ExtendedKeyUsagePurpose::ClientAuth, false, 8);
        let crl = pki.crl(&[7], None);
        let trust = Trust {
            crls: vec![crl.clone()],
            ..Trust::default()
        };
        let (server, _) = handshake(
            pki.server(&trust).unwrap(),
            pki.client("site-a", &Trust::default()),
        );
        let e = server.unwrap_err();
        assert!(e.to_lowercase().contains("revoked"), "{e}");
        let (server, client) = handshake(
            pki.server(&trust).unwrap(),
            pki.client("site-b", &Trust::default()),
        );
        assert_eq!((server, client), (Ok(()), Ok(())));
        let list = revoked(&trust.crls, &pki.path("ca.crt")).unwrap();
        let key_of = |n: &str| revocation_key(&load_certs(&pki.path(n)).unwrap()[0]).unwrap();
        assert!(list.contains(&key_of("site-a.crt")));
        assert!(!list.contains(&key_of("site-b.crt")));
        // relay-inner with a list revoking relay-outer's certificate (serial 1).
        let crl = pki.crl(&[1], None);
        let (_, client) = handshake(
            pki.server(&Trust::default()).unwrap(),
            pki.client(
                "site-b",
                &Trust {
                    crls: vec![crl],
                    ..Trust::default()
                },
            ),
        );
        assert!(client.unwrap_err().to_lowercase().contains("revoked"));
    }

    #[test]
    fn revocation_lists_that_are_not_lists_or_from_another_ca_are_refused() {
        let pki = Pki::new(Some(0));
        let other = Issuer::new(ca_params("Other CA", Some(0)), KeyPair::generate().unwrap());
        let crl = pki.crl(&[7], Some(&other));
        let trust = Trust {
            crls: vec![crl],
            ..Trust::default()
        };
        let e = pki.server(&trust).unwrap_err().to_string();
        assert!(e.contains("Other CA") && e.contains("not a CA in"), "{e}");
        std::fs::write(pki.path("crl.pem"), "hello\n").unwrap();
        let e = pki.server(&trust).unwrap_err().to_string();
        assert!(e.contains("no X509 CRL"), "{e}");
        std::fs::write(pki.path("crl.pem"), [0x30u8, 0x82, 0x01]).unwrap();
        let e = pki.server(&trust).unwrap_err().to_string();
        assert!(e.contains("not a certificate revocation list"), "{e}");
        let missing = Trust {
            crls: vec![pki.path("nope.pem")],
            ..Trust::default()
        };
        assert!(pki
            .server(&missing)
            .unwrap_err()
            .to_string()
            .contains("cannot read"));
    }

    #[test]
    fn a_cas_name_constraints_hold_for_the_certificates_it_signs() {
        let mut p = ca_params("Routy CA", Some(0));
        p.name_constraints = Some(rcgen::NameConstraints {
            permitted_subtrees: vec![rcgen::GeneralSubtree::DnsName("example.com".into())],
            excluded_subtrees: vec![],
        });
        let pki = Pki::with_ca(p);
        pki.leaf("site-b", ExtendedKeyUsagePurpose::ClientAuth, false, 8);
        // relay-outer's certificate names "outer", outside example.com.
        let (_, client) = handshake(
            pki.server(&Trust::default()).unwrap(),
            pki.client("site-b", &Trust::default()),
        );
        let e = client.unwrap_err();
        assert!(e.contains("NameConstraintViolation"), "{e}");
    }

    #[test]
    fn expiries_name_each_certificate() {
        let pki = Pki::new(Some(0));
        let e = expiries(&pki.path("outer.crt")).unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].subject, "outer");
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        assert!(e[0].not_after > now, "{e:?}");
    }
}
