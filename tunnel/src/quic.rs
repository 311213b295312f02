//! The QUIC transport: quinn endpoints with the same mutual-TLS identity and ALPN as the
//! TLS transport (the rustls configs of [`crate::tls`]), and a transport config tuned for
//! long-lived bulk streams.
//!
//! Each tunnel session is one QUIC connection; each tunnel stream is one bidirectional
//! QUIC stream (see [`crate::session::quic`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Endpoint, TransportConfig, VarInt};

use crate::control::Keepalive;
use crate::session::MAX_STREAMS;

/// Receive window of one stream: enough for one bulk stream at full speed on loopback
/// and LAN paths (a window bounds what is in flight, it is not allocated up front).
pub const STREAM_WINDOW: u32 = 8 << 20;
/// Receive window of the whole connection, shared by its streams.
pub const CONNECTION_WINDOW: u32 = 64 << 20;
/// Data we keep unacknowledged in flight per connection.
pub const SEND_WINDOW: u64 = 64 << 20;
/// A connection from which nothing arrived for this long is dead (quinn's idle timeout),
/// or for twice the keepalive timeout if that is longer: a backstop, the control
/// stream's keepalive decides first (it ends a session at most `timeout + interval`
/// after the last answer, see [`crate::control`]).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// QUIC PINGs keep NAT and firewall state alive well inside the idle timeout.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// Largest UDP payload MTU discovery probes for. quinn's default, 1452, keeps every packet
/// inside Ethernet's 1500 bytes even where the path carries jumbo frames or, on loopback,
/// 64 KiB; each packet costs a syscall share and its own AEAD seal and header protection,
/// so on such paths fewer, larger packets are much cheaper. Probes that are lost cost
/// nothing but time (they are not counted as congestion), and black holes are detected.
pub const MTU_UPPER_BOUND: u16 = 65527;
/// UDP socket buffers asked of the kernel (it caps them at net.core.[rw]mem_max).
const SOCKET_BUFFER: usize = 8 << 20;

/// Why a QUIC endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    /// The rustls config is not usable for QUIC (it must allow TLS 1.3).
    #[error("TLS configuration for QUIC: {0}")]
    Tls(String),
    /// The UDP socket could not be bound.
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// The transport settings both ends use, for keepalive `ka`. The peer's idle timeout
/// counts too (the smaller one applies): keep both relays' keepalive alike.
///
/// Unlike TCP's, quinn's retransmission probes back off without a limit, and its
/// keep-alive PINGs wait for congestion window like data: after a link outage it may
/// resend only about as long again later. Measured through a tunnel with a counter
/// streaming over it and every packet dropped for 2, 3 and 5 s: data again 3.0, 0.7
/// and 5.6 s after the drop ended (TCP with its cap: within it).
pub fn transport_config(ka: Keepalive) -> Arc<TransportConfig> {
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MTU_UPPER_BOUND);
    let mut t = TransportConfig::default();
    t.mtu_discovery_config(Some(mtu));
    t.stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        .send_window(SEND_WINDOW)
        // The peer may open as many streams as a yamux session holds, plus the control
        // stream and headroom for streams whose close is still in flight.
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS as u32 + 1024))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .keep_alive_interval(Some(KEEP_ALIVE))
        // Beyond a QUIC varint of milliseconds (millions of years): no idle timeout.
        .max_idle_timeout(IDLE_TIMEOUT.max(ka.timeout * 2).try_into().ok());
    Arc::new(t)
}

fn udp_socket(addr: SocketAddr) -> Result<std::net::UdpSocket, QuicError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let bind_err = |source| QuicError::Bind { addr, source };
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(bind_err)?;
    if addr.is_ipv6() {
        // Like the TCP port: [::] takes IPv4 too.
        let _ = sock.set_only_v6(false);
    }
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    sock.bind(&addr.into()).map_err(bind_err)?;
    Ok(sock.into())
}

fn endpoint(addr: SocketAddr, server: Option<quinn::ServerConfig>) -> Result<Endpoint, QuicError> {
    let sock = udp_socket(addr)?;
    let runtime = Arc::new(quinn::TokioRuntime);
    Endpoint::new(quinn::EndpointConfig::default(), server, sock, runtime)
        .map_err(|source| QuicError::Bind { addr, source })
}

/// A rustls server config (from [`crate::tls::server_config`]) as a quinn one, for
/// sessions with keepalive `ka`.
pub fn server_config(
    tls: rustls::ServerConfig,
    ka: Keepalive,
) -> Result<quinn::ServerConfig, QuicError> {
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| QuicError::Tls(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport_config(ka));
    Ok(cfg)
}

/// relay-outer's endpoint: accepts QUIC tunnel connections on `addr` (UDP).
pub fn server_endpoint(
    addr: SocketAddr,
    tls: rustls::ServerConfig,
    ka: Keepalive,
) -> Result<Endpoint, QuicError> {
    server_endpoint_with(addr, server_config(tls, ka)?)
}

/// [`server_endpoint`] with a config already made by [`server_config`] (a reload
/// replaces it with `Endpoint::set_server_config`).
pub fn server_endpoint_with(
    addr: SocketAddr,
    cfg: quinn::ServerConfig,
) -> Result<Endpoint, QuicError> {
    endpoint(addr, Some(cfg))
}

/// relay-inner's endpoint for dialing `remote`: an ephemeral UDP port of the same
/// address family.
pub fn client_endpoint(remote: SocketAddr) -> Result<Endpoint, QuicError> {
    let local: SocketAddr = if remote.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    endpoint(local, None)
}

/// A rustls client config (from [`crate::tls::client_config`]) as a quinn one, for
/// sessions with keepalive `ka`.
pub fn client_config(
    tls: rustls::ClientConfig,
    ka: Keepalive,
) -> Result<quinn::ClientConfig, QuicError> {
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| QuicError::Tls(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport_config(ka));
    Ok(cfg)
}

/// Dials `addr` over QUIC and completes the handshake (our certificate is judged by the
/// server after that: a refusal arrives as the connection's close).
pub async fn connect(
    endpoint: &Endpoint,
    addr: SocketAddr,
    server_name: &str,
    tls: quinn::ClientConfig,
) -> Result<quinn::Connection, ConnectError> {
    let connecting = endpoint
        .connect_with(tls, addr, server_name)
        .map_err(ConnectError::Start)?;
    connecting.await.map_err(ConnectError::Handshake)
}

/// Why [`connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The connection could not be started (an endpoint or configuration problem).
    #[error("QUIC connect: {0}")]
    Start(quinn::ConnectError),
    /// The handshake failed: no answer, or the server closed the connection.
    #[error("QUIC handshake: {0}")]
    Handshake(quinn::ConnectionError),
}

impl ConnectError {
    /// Whether the server's TLS refused us (see [`tls_refused`]).
    pub fn tls_refused(&self) -> bool {
        match self {
            ConnectError::Start(_) => false,
            ConnectError::Handshake(e) => tls_refused(e),
        }
    }
}

/// Whether a QUIC connection ended because the peer's TLS refused this end: the peer
/// closed it with a CRYPTO_ERROR code (0x100 + a TLS alert, RFC 9001 §4.8), which is how
/// a certificate verdict arrives over QUIC.
pub fn tls_refused(e: &quinn::ConnectionError) -> bool {
    match e {
        quinn::ConnectionError::ConnectionClosed(close) => {
            (0x100..0x200).contains(&u64::from(close.error_code))
        }
        _ => false,
    }
}

/// The negotiated ALPN protocol of a connection.
pub fn alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

/// The tunnel name of a connection's peer: its client certificate's Common Name.
pub fn peer_identity(conn: &quinn::Connection) -> Result<String, String> {
    match peer_certificate(conn) {
        Some(c) => crate::tls::identity(&c),
        None => Err("no client certificate".to_string()),
    }
}

/// The peer's own certificate (the first of its chain), if it sent one.
pub fn peer_certificate(
    conn: &quinn::Connection,
) -> Option<rustls::pki_types::CertificateDer<'static>> {
    let certs = conn.peer_identity().and_then(|i| {
        i.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
            .ok()
    })?;
    certs.first().cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{self, testing, Session};
    use std::time::Duration;

    struct Pki {
        dir: tempfile::TempDir,
    }

    impl Pki {
        fn new(client_cn: &str, client_signed_by_other_ca: bool) -> Pki {
            use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
            let dir = tempfile::tempdir().unwrap();
            let mk_ca = |name: &str| {
                let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
                p.distinguished_name.push(DnType::CommonName, name);
                p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
                let k = KeyPair::generate().unwrap();
                let pem = p.self_signed(&k).unwrap().pem();
                (pem, rcgen::Issuer::new(p, k))
            };
            let (ca, ca_issuer) = mk_ca("test ca");
            let (_, other_issuer) = mk_ca("other ca");
            let w = |n: &str, s: String| std::fs::write(dir.path().join(n), s).unwrap();
            w("ca.crt", ca);
            let leaf = |cn: &str, sans: Vec<String>, issuer: &rcgen::Issuer<'_, KeyPair>| {
                let mut p = CertificateParams::new(sans).unwrap();
                p.distinguished_name.push(DnType::CommonName, cn);
                let key = KeyPair::generate().unwrap();
                let c = p.signed_by(&key, issuer).unwrap();
                (c.pem(), key.serialize_pem())
            };
            let (c, k) = leaf("localhost", vec!["localhost".into()], &ca_issuer);
            w("server.crt", c);
            w("server.key", k);
            let by = if client_signed_by_other_ca {
                &other_issuer
            } else {
                &ca_issuer
            };
            let (c, k) = leaf(client_cn, vec![], by);
            w("client.crt", c);
            w("client.key", k);
            Pki { dir }
        }

        fn path(&self, n: &str) -> std::path::PathBuf {
            self.dir.path().join(n)
        }
    }

    async fn pair(
        pki: &Pki,
    ) -> (
        Result<Session, ConnectError>,
        Result<quinn::Connection, String>,
    ) {
        let server_tls = crate::tls::server_config(
            &pki.path("server.crt"),
            &pki.path("server.key"),
            &pki.path("ca.crt"),
        )
        .unwrap();
        let ka = Keepalive {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(15),
        };
        let server = server_endpoint("127.0.0.1:0".parse().unwrap(), server_tls, ka).unwrap();
        let addr = server.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let incoming = server.accept().await.unwrap();
            incoming.await.map_err(|e| e.to_string())
        });
        let client_tls = crate::tls::client_config(
            &pki.path("client.crt"),
            &pki.path("client.key"),
            &pki.path("ca.crt"),
        )
        .unwrap();
        let ep = client_endpoint(addr).unwrap();
        let client = connect(
            &ep,
            addr,
            "localhost",
            client_config(client_tls, ka).unwrap(),
        )
        .await
        .map(session::quic);
        (client, accept.await.unwrap())
    }

    #[tokio::test]
    async fn streams_both_ways_with_half_close_and_kill() {
        let pki = Pki::new("site-a", false);
        let (client, server) = pair(&pki).await;
        let client = client.unwrap();
        let server = server.unwrap();
        assert_eq!(peer_identity(&server).unwrap(), "site-a");
        assert_eq!(alpn(&server).as_deref(), Some(crate::tls::ALPN));
        let mut server = session::quic(server);
        assert_eq!(server.handle.transport(), "quic");

        // Echo on both ends: whoever accepts a stream echoes it after the peer's FIN.
        let client_h = client.handle;
        testing::echo(client.incoming);
        let server_h = server.handle.clone();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let fwd = tokio::spawn(async move {
            while let Some(s) = server.incoming.recv().await {
                let _ = tx.send(s);
            }
        });
        testing::echo(rx);

        let tasks: Vec<_> = (0..20u8)
            .map(|i| {
                let h = if i % 2 == 0 { &client_h } else { &server_h };
                tokio::spawn(testing::echo_round_trip(h.clone(), i))
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        // Streams are counted while they live; a kill ends them.
        testing::kill_ends_streams(&client_h).await;
        // The peer sees the close, with a reason.
        tokio::time::timeout(Duration::from_secs(5), server_h.closed())
            .await
            .unwrap();
        let reason = server_h.close_reason().unwrap();
        assert!(reason.text.contains("closed by peer"), "{reason:?}");
        assert!(!reason.tls_refused, "{reason:?}");
        fwd.abort();
    }

    #[tokio::test]
    async fn a_client_certificate_from_another_ca_is_refused() {
        let pki = Pki::new("site-a", true);
        let (client, server) = pair(&pki).await;
        let e = server.unwrap_err();
        assert!(e.contains("certificate"), "{e}");
        // Under TLS 1.3 the client may finish its handshake before the verdict; then
        // the verdict ends the session. Either way the client knows it was refused.
        match client {
            Ok(c) => {
                let _ = tokio::time::timeout(Duration::from_secs(5), c.handle.closed()).await;
                let r = c
                    .handle
                    .close_reason()
                    .expect("the session ended with a reason");
                assert!(r.tls_refused, "{r:?}");
            }
            Err(e) => assert!(e.tls_refused(), "{e}"),
        }
    }

    /// The TLS-over-TCP side of the same question: a TLS alert the server sends is told
    /// apart from other I/O errors by type (here: the server insists on another ALPN and
    /// aborts the handshake with no_application_protocol).
    #[tokio::test]
    async fn a_tls_alert_from_the_server_is_recognised_over_tcp() {
        let pki = Pki::new("site-a", false);
        let mut server_tls = crate::tls::server_config(
            &pki.path("server.crt"),
            &pki.path("server.key"),
            &pki.path("ca.crt"),
        )
        .unwrap();
        server_tls.alpn_protocols = vec![b"other/1".to_vec()];
        let client_tls = crate::tls::client_config(
            &pki.path("client.crt"),
            &pki.path("client.key"),
            &pki.path("ca.crt"),
        )
        .unwrap();
        let (c, s) = tokio::io::duplex(64 << 10);
        let server = tokio::spawn(async move {
            tokio_rustls::TlsAcceptor::from(Arc::new(server_tls))
                .accept(s)
                .await
                .map(|_| ())
        });
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let e = tokio_rustls::TlsConnector::from(Arc::new(client_tls))
            .connect(name, c)
            .await
            .map(|_| ())
            .expect_err("the server refuses the handshake");
        assert!(crate::tls::alert_received(&e), "{e}");
        assert!(server.await.unwrap().is_err());
        // Any other I/O error is not a refusal.
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(!crate::tls::alert_received(&reset));
    }
}
