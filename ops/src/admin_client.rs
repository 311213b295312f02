//! A small HTTP/1.1 client for the commands that talk to a running relay's admin
//! endpoint on this machine (`relay-inner cdc resync`, `relay-outer cdc sinks|pause|
//! resume|replay`): one request, the status and the body; with the configuration's token
//! and TLS.

use std::net::SocketAddr;
use std::time::Duration;

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{verify_tls12_signature, verify_tls13_signature};
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::{ClientConfig, DigitallySignedStruct, Error, SignatureScheme};

/// How long a command waits for the relay's answer.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// The address to reach an endpoint listening on `listen` from this machine (an
/// unspecified address becomes loopback).
pub fn local(mut listen: SocketAddr) -> SocketAddr {
    if listen.ip().is_unspecified() {
        listen.set_ip(if listen.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    listen
}

/// Sends `method path` (no body) to the admin endpoint `admin` describes, as this
/// machine reaches it: with a token from `admin.tokens` (an admin one when there is one)
/// and over TLS with `admin.tls` (trusting exactly the configured certificate); returns
/// the status code and the body.
pub async fn request(
    admin: &crate::admin::AdminSettings,
    method: &str,
    path: &str,
) -> Result<(u16, String), String> {
    let addr = local(admin.listen);
    let token = match admin
        .admin_token_file()
        .or(admin.tokens.first().map(|t| t.file.as_path()))
    {
        Some(f) => Some(crate::admin::read_secret(f).map_err(|e| format!("admin.tokens: {e}"))?),
        None => None,
    };
    let tls = match &admin.tls {
        None => None,
        Some(t) if t.client_ca.is_some() => {
            return Err(format!(
                "admin.tls.client_ca is set: this command has no client certificate; call \
                 https://{addr}{path} with one (curl --cert C --key K --cacert {} -X {method})",
                t.cert.display()
            ))
        }
        Some(t) => Some(pinned(&t.cert)?),
    };
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}Content-Length: 0\r\n\r\n"
    );
    let io = async {
        let s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot reach the admin endpoint at {addr}: {e} (is the relay running with this configuration?)"))?;
        let mut buf = Vec::new();
        let err = |e: std::io::Error| format!("admin endpoint {addr}: {e}");
        match tls {
            None => exchange(s, req.as_bytes(), &mut buf).await.map_err(err)?,
            Some(cfg) => {
                let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost")
                    .map_err(|e| e.to_string())?;
                let s = tokio_rustls::TlsConnector::from(cfg)
                    .connect(name, s)
                    .await
                    .map_err(|e| format!("admin endpoint {addr}: TLS: {e}"))?;
                exchange(s, req.as_bytes(), &mut buf).await.map_err(err)?
            }
        }
        Ok::<_, String>(buf)
    };
    let buf = tokio::time::timeout(TIMEOUT, io)
        .await
        .map_err(|_| format!("the admin endpoint at {addr} did not answer within {TIMEOUT:?}"))??;
    parse(&buf).ok_or_else(|| {
        format!("the admin endpoint at {addr} sent something that is not an HTTP answer")
    })
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    req: &[u8],
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    s.write_all(req).await?;
    match s.read_to_end(buf).await {
        // A TLS server that closes without close_notify: the answer is whole or `parse`
        // says it is not.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty() => Ok(()),
        r => r.map(|_| ()),
    }
}

/// A TLS client that trusts exactly the first certificate in `cert` (the endpoint's own,
/// read from the same configuration): no CA, no name to match.
fn pinned(cert: &std::path::Path) -> Result<Arc<ClientConfig>, String> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    let leaf = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("admin.tls.cert: {}: {e}", cert.display()))?
        .next()
        .ok_or_else(|| format!("admin.tls.cert: {}: no certificate", cert.display()))?
        .map_err(|e| format!("admin.tls.cert: {}: {e}", cert.display()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let verifier = Arc::new(Pinned {
        leaf,
        provider: provider.clone(),
    });
    let cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

#[derive(Debug)]
struct Pinned {
    leaf: CertificateDer<'static>,
    provider: Arc<tokio_rustls::rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &tokio_rustls::rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: tokio_rustls::rustls::pki_types::UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        if end_entity.as_ref() == self.leaf.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(Error::General(
                "the endpoint's certificate is not the one in admin.tls.cert".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `s` for a URL's path or query: unreserved characters as they are, the rest as `%XX`.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3 / 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Status and body of a whole HTTP/1.1 answer (`Content-Length`, chunked, or to the end).
fn parse(buf: &[u8]) -> Option<(u16, String)> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..head_end]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let mut chunked = false;
    let mut len = None;
    for l in lines {
        let (k, v) = l.split_once(':')?;
        match k.trim().to_ascii_lowercase().as_str() {
            "transfer-encoding" => chunked = v.trim().eq_ignore_ascii_case("chunked"),
            "content-length" => len = v.trim().parse::<usize>().ok(),
            _ => {}
        }
    }
    let mut body = &buf[head_end + 4..];
    let out = if chunked {
        let mut out = Vec::new();
        loop {
            let nl = body.windows(2).position(|w| w == b"\r\n")?;
            let n =
                usize::from_str_radix(std::str::from_utf8(&body[..nl]).ok()?.trim(), 16).ok()?;
            body = &body[nl + 2..];
            if n == 0 {
                break;
            }
            out.extend_from_slice(body.get(..n)?);
            body = body.get(n + 2..)?;
        }
        out
    } else {
        match len {
            Some(n) => body.get(..n)?.to_vec(),
            None => body.to_vec(),
        }
    };
    Some((status, String::from_utf8_lossy(&out).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse_whole_or_not_at_all() {
        assert_eq!(
            parse(b"HTTP/1.1 202 Accepted\r\ncontent-length: 2\r\n\r\n{}"),
            Some((202, "{}".into()))
        );
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"),
            Some((200, "abcde".into()))
        );
        assert_eq!(
            parse(b"HTTP/1.1 404 Not Found\r\n\r\nnope"),
            Some((404, "nope".into()))
        );
        assert_eq!(parse(b"garbage"), None);
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nab"),
            None
        );
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
            None
        );
    }
}
