//! Fake peers for the bad-input suites: a relay-inner impostor that holds a valid client
//! certificate but writes whatever bytes a test wants on the control stream, and a
//! relay-outer impostor that accepts a real relay-inner, completes the handshake, keeps
//! the session alive and then opens data streams carrying whatever a test wants.
//!
//! Both use the real protocol crate (TLS setup, yamux session, handshake, control loop),
//! so only the bytes the test chooses are bad.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use relay_proto::frame::{Frame, Hello};
use routy_tunnel::codec::{read_frame, write_frame};
use routy_tunnel::control::{self, ControlCommand, ControlEnd, ControlEvent, Keepalive};
use routy_tunnel::handshake;
use routy_tunnel::session::{self, Role, Session, SessionHandle, Stream};
use routy_tunnel::tls;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::relays::Pki;

/// Generous bound on any single step of a fake peer (connect, handshake, a read).
pub const STEP: Duration = Duration::from_secs(20);

/// A multi-threaded tokio runtime for a test's async parts.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build tokio runtime")
}

/// Deterministic pseudo-random bytes (xorshift64*) from `seed`.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A seed that differs between runs; tests print it so a failure can be replayed.
pub fn seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x5eed)
}

fn server_name(name: &str) -> ServerName<'static> {
    ServerName::try_from(name.to_owned()).expect("valid server name")
}

/// TLS to relay-outer's tunnel port as relay-inner `tunnel` would (client certificate
/// `TUNNEL.crt` from `pki`, relay-outer verified against `pki`'s CA as `name`).
pub async fn tls_as_inner(
    addr: SocketAddr,
    pki: &Pki,
    tunnel: &str,
    name: &str,
) -> io::Result<TlsStream<TcpStream>> {
    let cfg = tls::client_config(
        &pki.path(&format!("{tunnel}.crt")),
        &pki.path(&format!("{tunnel}.key")),
        &pki.path("ca.crt"),
    )
    .map_err(io::Error::other)?;
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(Arc::new(cfg))
        .connect(server_name(name), tcp)
        .await
}

/// TLS to relay-outer's tunnel port with no client certificate at all (trusting
/// `pki`'s CA, offering ALPN routy/1).
pub async fn tls_without_client_cert(
    addr: SocketAddr,
    pki: &Pki,
    name: &str,
) -> io::Result<TlsStream<TcpStream>> {
    tls_without_client_cert_ca(addr, &pki.path("ca.crt"), name).await
}

/// [`tls_without_client_cert`] trusting the CA file `ca`.
pub async fn tls_without_client_cert_ca(
    addr: SocketAddr,
    ca: &std::path::Path,
    name: &str,
) -> io::Result<TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in tls::load_certs(ca).map_err(io::Error::other)? {
        roots.add(c).map_err(io::Error::other)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![tls::ALPN.to_vec()];
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(Arc::new(cfg))
        .connect(server_name(name), tcp)
        .await
}

/// How a read that should end did end.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    /// Clean end of stream after `bytes` bytes of data.
    Eof {
        /// Bytes that arrived before the end.
        bytes: usize,
    },
    /// The read failed (reset, TLS alert, ...) after `bytes` bytes of data.
    Error {
        /// Bytes that arrived before the error.
        bytes: usize,
        /// The error.
        error: String,
    },
    /// The stream was still open at the deadline.
    Hang {
        /// Bytes that arrived before the deadline.
        bytes: usize,
    },
}

impl Ending {
    /// Whether the peer ended the stream (cleanly or not) instead of leaving it open.
    pub fn ended(&self) -> bool {
        !matches!(self, Ending::Hang { .. })
    }

    /// Bytes that arrived before the end.
    pub fn bytes(&self) -> usize {
        match self {
            Ending::Eof { bytes } | Ending::Error { bytes, .. } | Ending::Hang { bytes } => *bytes,
        }
    }
}

/// Reads until the peer ends the stream, or `within` passes; says how it ended.
pub async fn read_until_end<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    within: Duration,
) -> Ending {
    let mut bytes = 0usize;
    let mut buf = vec![0u8; 16 * 1024];
    let res = tokio::time::timeout(within, async {
        loop {
            match r.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(n) => bytes += n,
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await;
    match res {
        Ok(Ok(())) => Ending::Eof { bytes },
        Ok(Err(error)) => Ending::Error { bytes, error },
        Err(_) => Ending::Hang { bytes },
    }
}

/// A relay-inner impostor with a valid client certificate: a TLS + yamux session to
/// relay-outer and its control stream, on which the test writes raw bytes.
pub struct FakeInner {
    /// The yamux session (client side).
    pub session: SessionHandle,
    /// The control stream (the first stream opened).
    pub ctrl: Stream,
    _incoming: mpsc::UnboundedReceiver<Stream>,
}

impl FakeInner {
    /// Connects to relay-outer's tunnel port as `tunnel` and opens the control stream
    /// (nothing is written on it yet).
    pub async fn connect(addr: SocketAddr, pki: &Pki, tunnel: &str, name: &str) -> FakeInner {
        let tls = tokio::time::timeout(STEP, tls_as_inner(addr, pki, tunnel, name))
            .await
            .expect("fake inner: TLS handshake timed out")
            .expect("fake inner: TLS handshake with a valid client certificate failed");
        let Session { handle, incoming } = session::yamux(tls, Role::Client);
        let ctrl = tokio::time::timeout(STEP, handle.open())
            .await
            .expect("fake inner: opening the control stream timed out")
            .expect("fake inner: cannot open the control stream");
        FakeInner {
            session: handle,
            ctrl,
            _incoming: incoming,
        }
    }

    /// Writes raw bytes on the control stream.
    pub async fn write_raw(&mut self, bytes: &[u8]) {
        // The peer may already have closed the connection; that is fine for a test
        // that only wants the bytes sent.
        let _ = self.ctrl.write_all(bytes).await;
        let _ = self.ctrl.flush().await;
    }

    /// Whether relay-outer closes the whole connection within `within`.
    pub async fn closed_within(&self, within: Duration) -> bool {
        tokio::time::timeout(within, self.session.closed())
            .await
            .is_ok()
    }
}

/// A relay-outer impostor: a TLS server with relay-outer's certificate from `pki`,
/// requiring client certificates from `pki`'s CA.
pub struct FakeOuter {
    listener: TcpListener,
    acceptor: TlsAcceptor,
}

impl FakeOuter {
    /// Binds 127.0.0.1 on a free port.
    pub async fn bind(pki: &Pki) -> FakeOuter {
        let cfg = tls::server_config(
            &pki.path("outer.crt"),
            &pki.path("outer.key"),
            &pki.path("ca.crt"),
        )
        .expect("fake outer: TLS server config");
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("fake outer: bind 127.0.0.1:0");
        FakeOuter {
            listener,
            acceptor: TlsAcceptor::from(Arc::new(cfg)),
        }
    }

    /// The address relay-inner should dial.
    pub fn addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("local_addr")
    }

    /// Accepts one relay-inner, runs the handshake (accepting it as `tunnel`), and
    /// starts answering its keepalive on the control stream.
    pub async fn accept(&self, tunnel: &str, ka: Keepalive) -> OuterSession {
        let (tcp, _) = tokio::time::timeout(STEP, self.listener.accept())
            .await
            .expect("fake outer: no relay-inner connected")
            .expect("fake outer: accept");
        let tls = tokio::time::timeout(STEP, self.acceptor.accept(tcp))
            .await
            .expect("fake outer: TLS handshake timed out")
            .expect("fake outer: TLS handshake with relay-inner failed");
        let Session { handle, incoming } = session::yamux(tls, Role::Server);
        let mut incoming = incoming;
        let mut ctrl = tokio::time::timeout(STEP, incoming.recv())
            .await
            .expect("fake outer: no control stream")
            .expect("fake outer: session ended before the control stream");
        let hello = handshake::server_read_hello(&mut ctrl, handshake::HANDSHAKE_TIMEOUT)
            .await
            .expect("fake outer: reading relay-inner's Hello");
        handshake::accept(&mut ctrl, tunnel, 1)
            .await
            .expect("fake outer: sending HelloAck");
        let (cmd_tx, cmd_rx) = mpsc::channel(4);
        let (ev_tx, events) = mpsc::unbounded_channel();
        let control = tokio::spawn(control::run(ctrl, ka, cmd_rx, ev_tx));
        OuterSession {
            handle,
            hello,
            control,
            _commands: cmd_tx,
            _events: events,
            _incoming: incoming,
        }
    }
}

/// A session the fake relay-outer accepted from a real relay-inner.
pub struct OuterSession {
    /// Opens data streams toward relay-inner.
    pub handle: SessionHandle,
    /// What relay-inner said in its Hello.
    pub hello: Hello,
    control: JoinHandle<ControlEnd>,
    // Held so the control loop keeps running (a closed command channel stops it).
    _commands: mpsc::Sender<ControlCommand>,
    _events: mpsc::UnboundedReceiver<ControlEvent>,
    _incoming: mpsc::UnboundedReceiver<Stream>,
}

impl OuterSession {
    /// Opens a data stream and writes `bytes` at its head.
    pub async fn open_raw(&self, bytes: &[u8]) -> Stream {
        let mut s = tokio::time::timeout(STEP, self.handle.open())
            .await
            .expect("fake outer: opening a stream timed out")
            .expect("fake outer: cannot open a stream");
        // relay-inner may refuse the stream before all of it is written; the test
        // looks at how the stream ends, not at whether every byte went out.
        let _ = s.write_all(bytes).await;
        let _ = s.flush().await;
        s
    }

    /// Opens a data stream with a well-formed `Open { service }` and returns the
    /// stream with relay-inner's answer.
    pub async fn open_service(&self, service: &str) -> (Stream, Frame) {
        let mut s = tokio::time::timeout(STEP, self.handle.open())
            .await
            .expect("fake outer: opening a stream timed out")
            .expect("fake outer: cannot open a stream");
        let open = Frame::Open {
            service: service.to_owned(),
            client: "127.0.0.1:1".to_owned(),
        };
        write_frame(&mut s, &open, STEP)
            .await
            .expect("fake outer: writing Open");
        let answer = read_frame(&mut s, STEP)
            .await
            .unwrap_or_else(|e| panic!("fake outer: no answer to Open {service:?}: {e}"));
        (s, answer)
    }

    /// Whether the control loop (and so the session) is still running.
    pub fn alive(&self) -> bool {
        !self.control.is_finished() && !self.handle.is_closed()
    }
}
