//! TLS to PostgreSQL with rustls (ring provider), honouring libpq's `sslmode` and
//! `sslrootcert`: a tokio-postgres [`MakeTlsConnect`] of our own ([`MakeRustlsConnect`]) and
//! the SSLRequest upgrade for clients that speak the wire protocol themselves
//! ([`PgTls::negotiate`], used by relay-inner's replication client).
//!
//! Modes, as libpq defines them:
//!
//! | sslmode | TLS | certificate check |
//! | --- | --- | --- |
//! | `disable` | never | — |
//! | `allow`, `prefer` (default) | when the server offers it | none |
//! | `require` | always | none; like libpq, with `sslrootcert` it checks the chain (verify-ca) |
//! | `verify-ca` | always | chain up to `sslrootcert` |
//! | `verify-full` | always | chain up to `sslrootcert` and the host name |
//!
//! `verify-ca` and `verify-full` need `sslrootcert` (or `~/.postgresql/root.crt`, libpq's
//! default); there is no system trust store here.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// Plain first; libpq would retry with TLS. Here: TLS when offered, like `prefer`.
    Allow,
    /// TLS when the server offers it, no certificate check (libpq's default).
    #[default]
    Prefer,
    /// TLS or fail; no certificate check unless `sslrootcert` is given.
    Require,
    /// TLS or fail; the server's chain must lead to `sslrootcert`.
    VerifyCa,
    /// TLS or fail; chain and host name checked.
    VerifyFull,
}

impl SslMode {
    /// Parses a libpq `sslmode` value.
    pub fn parse(s: &str) -> Result<SslMode, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => {
                return Err(format!(
                "invalid sslmode \"{s}\": use disable, allow, prefer, require, verify-ca or verify-full"
            ))
            }
        })
    }

    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether a server without TLS must be refused.
    pub fn requires_tls(self) -> bool {
        matches!(
            self,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }

    /// The tokio-postgres mode that makes it do what this mode means (our connector does
    /// the certificate checks).
    pub fn tokio_postgres(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as T;
        match self {
            SslMode::Disable => T::Disable,
            SslMode::Allow | SslMode::Prefer => T::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => T::Require,
        }
    }
}

/// The TLS side of a PostgreSQL connection: mode plus the rustls client configuration.
#[derive(Clone)]
pub struct PgTls {
    mode: SslMode,
    /// What the certificate check is, for error messages.
    check: String,
    config: Option<Arc<ClientConfig>>,
}

impl std::fmt::Debug for PgTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTls")
            .field("mode", &self.mode)
            .field("check", &self.check)
            .finish()
    }
}

/// An error with its causes, `outer: inner: innermost`. tokio-postgres says only "error
/// performing TLS handshake"; why (an unknown issuer, a name mismatch) is in the chain.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    let certs = routy_tunnel::tls::load_certs(path).map_err(|e| format!("sslrootcert: {e}"))?;
    let mut store = RootCertStore::empty();
    for c in certs {
        store.add(c).map_err(|e| {
            format!(
                "sslrootcert {}: not a usable CA certificate: {e}",
                path.display()
            )
        })?;
    }
    Ok(store)
}

fn default_root_cert() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let p = Path::new(&home).join(".postgresql").join("root.crt");
    p.is_file().then_some(p)
}

impl PgTls {
    /// Builds the TLS side for `sslmode` and an optional `sslrootcert` file.
    pub fn new(mode: SslMode, root_cert: Option<&Path>) -> Result<PgTls, String> {
        let root_cert = root_cert.map(Path::to_path_buf).or_else(|| {
            matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull)
                .then(default_root_cert)
                .flatten()
        });
        let provider = provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS configuration: {e}"))?;
        let (verifier, check): (Arc<dyn ServerCertVerifier>, String) = match (mode, &root_cert) {
            (SslMode::Disable, _) => {
                return Ok(PgTls {
                    mode,
                    check: "none".into(),
                    config: None,
                })
            }
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
                return Err(format!(
                    "sslmode={} needs sslrootcert=<file with the CA certificate> (no ~/.postgresql/root.crt either)",
                    mode.as_str()
                ))
            }
            (SslMode::Allow | SslMode::Prefer, _) | (SslMode::Require, None) => (
                Arc::new(NoCheck(provider.clone())),
                "no certificate check".into(),
            ),
            (SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull, Some(path)) => {
                let inner = WebPkiServerVerifier::builder_with_provider(
                    Arc::new(load_roots(path)?),
                    provider.clone(),
                )
                .build()
                .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
                let full = mode == SslMode::VerifyFull;
                (
                    Arc::new(ChainCheck { inner, full }),
                    format!(
                        "{} against sslrootcert {}",
                        if full {
                            "chain and host name checked"
                        } else {
                            "chain checked"
                        },
                        path.display()
                    ),
                )
            }
        };
        let config = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(PgTls {
            mode,
            check,
            config: Some(Arc::new(config)),
        })
    }

    /// The mode.
    pub fn mode(&self) -> SslMode {
        self.mode
    }

    /// A tokio-postgres connector; pair it with `config.ssl_mode(mode.tokio_postgres())`.
    pub fn make_tls_connect(&self) -> MakeRustlsConnect {
        MakeRustlsConnect {
            config: self.config.clone(),
            check: self.check.clone(),
        }
    }

    /// SSLRequest on a fresh connection (before the startup message), then the TLS
    /// handshake when the server agrees; falls back to plain text only when the mode allows.
    pub async fn negotiate(&self, mut tcp: TcpStream, host: &str) -> Result<PgStream, String> {
        let Some(config) = self.config.clone() else {
            return Ok(PgStream::Plain(tcp));
        };
        let mut req = [0u8; 8];
        req[..4].copy_from_slice(&8i32.to_be_bytes());
        req[4..].copy_from_slice(&80_877_103i32.to_be_bytes());
        tcp.write_all(&req)
            .await
            .map_err(|e| format!("sending SSLRequest: {e}"))?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer)
            .await
            .map_err(|e| format!("reading the answer to SSLRequest: {e}"))?;
        match answer[0] {
            b'S' => {}
            b'N' if !self.mode.requires_tls() => return Ok(PgStream::Plain(tcp)),
            b'N' => {
                return Err(format!(
                    "the server does not support TLS (ssl = off), but sslmode={}",
                    self.mode.as_str()
                ))
            }
            other => {
                return Err(format!(
                    "unexpected answer {:?} to SSLRequest",
                    char::from(other)
                ))
            }
        }
        let name = server_name(host).map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| handshake_error(host, &self.check, &e))?;
        Ok(PgStream::Tls(Box::new(tls)))
    }
}

fn handshake_error(host: &str, check: &str, e: &io::Error) -> String {
    format!("TLS handshake with PostgreSQL at {host} failed ({check}): {e}")
}

fn server_name(host: &str) -> io::Result<ServerName<'static>> {
    ServerName::try_from(host.to_string()).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("\"{host}\" is not a valid TLS server name: {e}"),
        )
    })
}

/// `require`/`prefer` without a CA: encryption only, like libpq. The handshake signature is
/// still checked (against the certificate the server sent).
#[derive(Debug)]
struct NoCheck(Arc<CryptoProvider>);

impl ServerCertVerifier for NoCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// verify-ca (`full == false`: a name mismatch is accepted) and verify-full.
#[derive(Debug)]
struct ChainCheck {
    inner: Arc<WebPkiServerVerifier>,
    full: bool,
}

impl ServerCertVerifier for ChainCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.full => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A connection to PostgreSQL, plain or TLS.
pub enum PgStream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl PgStream {
    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            PgStream::Plain(s) => s,
            PgStream::Tls(s) => s.get_ref().0,
        }
    }

    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, PgStream::Tls(_))
    }
}

impl AsyncRead for PgStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PgStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PgStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgStream::Plain(s) => Pin::new(s).poll_flush(cx),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// tokio-postgres connector over rustls.
#[derive(Clone)]
pub struct MakeRustlsConnect {
    config: Option<Arc<ClientConfig>>,
    check: String,
}

impl<S> MakeTlsConnect<S> for MakeRustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<RustlsConnect> {
        let config = self.config.clone().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "TLS is disabled (sslmode=disable)",
            )
        })?;
        Ok(RustlsConnect {
            config,
            name: server_name(domain)?,
            host: domain.to_string(),
            check: self.check.clone(),
        })
    }
}

/// One pending TLS connection of [`MakeRustlsConnect`].
pub struct RustlsConnect {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    host: String,
    check: String,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            tokio_rustls::TlsConnector::from(self.config)
                .connect(self.name, stream)
                .await
                .map(|s| RustlsStream(Box::new(s)))
                .map_err(|e| io::Error::other(handshake_error(&self.host, &self.check, &e)))
        })
    }
}

/// A TLS stream handed to tokio-postgres.
pub struct RustlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().0.as_mut()).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().0.as_mut()).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().0.as_mut()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().0.as_mut()).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        // No tls-server-end-point binding (it would need the certificate's hash algorithm);
        // SCRAM without channel binding, as with libpq's channel_binding=prefer on a
        // server that does not insist.
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse() {
        for m in [
            "disable",
            "allow",
            "prefer",
            "require",
            "verify-ca",
            "verify-full",
        ] {
            assert_eq!(SslMode::parse(m).unwrap().as_str(), m);
        }
        assert!(SslMode::parse("verify_full").is_err());
        assert!(SslMode::VerifyCa.requires_tls());
        assert!(!SslMode::Prefer.requires_tls());
    }

    #[test]
    fn verify_modes_need_a_root_cert() {
        // HOME without ~/.postgresql/root.crt.
        let err =
            PgTls::new(SslMode::VerifyFull, Some(Path::new("/nonexistent/ca.crt"))).unwrap_err();
        assert!(err.contains("sslrootcert"), "{err}");
        assert!(PgTls::new(SslMode::Require, None).is_ok());
        assert!(PgTls::new(SslMode::Disable, None).unwrap().config.is_none());
    }
}
