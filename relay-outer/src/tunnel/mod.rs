//! The tunnel port: accepts inner relays over mutual TLS (TCP, yamux) and over QUIC (the
//! same port, UDP), checks their identity, runs the handshake and the control stream,
//! and registers each live session. After the transport both take the same path.
//!
//! Anything that goes wrong with one connection (garbage, a wrong certificate, an
//! unknown tunnel, a malformed frame) closes that connection with a logged reason and
//! touches nothing else.

mod penalty;
pub mod registry;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use relay_proto::frame::ErrorCode;
use routy_ops::drain::Drain;
use routy_ops::metrics as m;
use routy_tunnel::control::{self, ControlCommand, ControlEnd, ControlEvent};
use routy_tunnel::handshake;
use routy_tunnel::lanes;
use routy_tunnel::session::{self, Role, Session};
use routy_tunnel::{net, quic, tls, websocket};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::{LazyConfigAcceptor, TlsAcceptor};
use tracing::{debug, info, warn, Instrument};

use crate::cdc::{receiver, Cdc};
use crate::config::TunnelConfig;
use crate::tunnel::registry::{Identity, Registry, SessionEntry};

/// The WebSocket upgrade of a new tunnel connection, before `deadline`; a failure is
/// logged and counted, and gives `None`.
async fn upgrade<S>(
    deadline: tokio::time::Instant,
    limit: Duration,
    io: S,
) -> Option<websocket::WsIo<websocket::Rewind<S>>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match tokio::time::timeout_at(deadline, websocket::accept(io)).await {
        Ok(Ok(ws)) => Some(ws),
        Ok(Err(e)) => {
            refused!("websocket", reason = %e, "tunnel connection refused: WebSocket upgrade failed");
            None
        }
        Err(_) => {
            refused!("tls_timeout", timeout = ?limit, "tunnel connection refused: WebSocket upgrade timed out");
            None
        }
    }
}

/// How long a refused peer gets to read our refusal before the connection is cut.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);

/// What a new tunnel connection is checked against; replaced whole on reload, while
/// established sessions keep running.
pub struct Settings {
    /// Settings of the tunnel port.
    pub cfg: TunnelConfig,
    /// TLS with client authentication (certificates re-read on reload).
    pub acceptor: TlsAcceptor,
    /// The outer TLS of `wss://` (no client certificate, ALPN http/1.1), when
    /// `tunnel.websocket` is on.
    pub websocket: Option<Arc<rustls::ServerConfig>>,
    /// The same identity for QUIC, when `tunnel.quic` is on.
    pub quic: Option<quinn::ServerConfig>,
    /// Tunnel names that some listener uses; others are refused.
    pub tunnels: HashSet<String>,
}

/// Streams relay-inner may have open at once on one session (CDC shipping streams, one
/// per source); more are refused.
pub const MAX_INNER_STREAMS: usize = 256;

/// What every tunnel connection needs to be served.
pub struct TunnelServer {
    settings: RwLock<Arc<Settings>>,
    /// Where live sessions go.
    pub registry: Arc<Registry>,
    /// Shutdown signal.
    pub drain: Drain,
    /// Receives the CDC shipping streams relay-inner opens; `None` without a `cdc` section.
    pub cdc: Option<Arc<Cdc>>,
    /// The main runtime: CDC streams are served there, because the store's fsyncs must
    /// not stall a data-path thread (see `routy_tunnel::lanes`).
    main: tokio::runtime::Handle,
}

impl TunnelServer {
    /// A server with these settings; call it on the main runtime.
    pub fn new(
        settings: Settings,
        registry: Arc<Registry>,
        drain: Drain,
        cdc: Option<Arc<Cdc>>,
    ) -> Self {
        TunnelServer {
            settings: RwLock::new(Arc::new(settings)),
            registry,
            drain,
            cdc,
            main: tokio::runtime::Handle::current(),
        }
    }

    /// The settings new connections get.
    pub fn settings(&self) -> Arc<Settings> {
        self.settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Puts new settings in force for connections from now on.
    pub fn update(&self, settings: Settings) {
        *self.settings.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(settings);
    }

    /// Accepts QUIC tunnel connections until shutdown. New connections get the TLS
    /// material in force: [`Settings::quic`] is put on the endpoint by the reload.
    pub async fn serve_quic(self: Arc<Self>, endpoint: quinn::Endpoint) {
        loop {
            let incoming = tokio::select! {
                _ = self.drain.stopping() => break,
                i = endpoint.accept() => match i {
                    Some(i) => i,
                    None => break,
                },
            };
            let peer = incoming.remote_address();
            let me = self.clone();
            let span = tracing::info_span!("tunnel", %peer, transport = "quic");
            tokio::spawn(async move { me.quic_connection(incoming, peer).await }.instrument(span));
        }
        // Sessions end on their own (their relay-inner sees the close).
        endpoint.close(session::QUIC_CLOSE_CODE, b"relay-outer shutting down");
    }

    async fn quic_connection(self: Arc<Self>, incoming: quinn::Incoming, peer: SocketAddr) {
        let settings = self.settings();
        let conn = match tokio::time::timeout(settings.cfg.handshake_timeout, incoming).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                refused!("tls", reason = %e, "tunnel connection refused: QUIC handshake failed");
                return;
            }
            Err(_) => {
                refused!("tls_timeout", timeout = ?settings.cfg.handshake_timeout, "tunnel connection refused: QUIC handshake timed out");
                return;
            }
        };
        if quic::alpn(&conn).as_deref() != Some(tls::ALPN) {
            refused!(
                "alpn",
                "tunnel connection refused: peer did not negotiate ALPN routy/1"
            );
            conn.close(session::QUIC_CLOSE_CODE, b"ALPN routy/1 required");
            return;
        }
        let tunnel_name = match quic::peer_identity(&conn) {
            Ok(t) => t,
            Err(e) => {
                refused!("identity", reason = %e, "tunnel connection refused");
                conn.close(session::QUIC_CLOSE_CODE, e.as_bytes());
                return;
            }
        };
        let cert = quic::peer_certificate(&conn).and_then(|c| tls::revocation_key(&c));
        let span = tracing::info_span!("session", tunnel = %tunnel_name);
        self.session(session::quic(conn), peer, tunnel_name, cert, &settings)
            .instrument(span)
            .await;
    }

    /// Accepts tunnel connections until shutdown.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = self.drain.stopping() => return,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and the like: back off instead of spinning.
                        warn!(error = %e, "tunnel accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            // The connection lives on a lane from its handshake on (see lanes).
            let tcp = match lanes::MovingTcp::away(tcp) {
                Ok(t) => t,
                Err(e) => {
                    warn!(%peer, error = %e, "tunnel connection dropped: cannot hand it to a lane");
                    continue;
                }
            };
            let settings = self.settings();
            let limit = settings.cfg.failed_handshake_limit;
            if PENALTY.shut_out(peer.ip(), std::time::Instant::now(), limit) {
                // Closed before any TLS: cheap, and the log stays quiet (rate-limited).
                refused!("throttled", %peer, limit, window = ?penalty::WINDOW,
                    "tunnel connection refused: this address failed too many handshakes \
                     (tunnel.failed_handshake_limit); closed at accept for now");
                drop(tcp);
                continue;
            }
            let me = self.clone();
            let span = tracing::info_span!("tunnel", %peer);
            lanes::spawn_connection(
                async move {
                    match tcp.arrive() {
                        Ok(tcp) => {
                            PEER_IP
                                .scope(peer.ip(), me.connection(tcp, peer, settings))
                                .await
                        }
                        Err(e) => warn!(error = %e, "tunnel connection dropped: cannot register it on a lane"),
                    }
                }
                .instrument(span),
            );
        }
    }

    async fn connection(
        self: Arc<Self>,
        tcp: TcpStream,
        peer: SocketAddr,
        settings: Arc<Settings>,
    ) {
        let ka = settings.cfg.keepalive;
        net::tune_tunnel_socket(&tcp, ka);
        let limit = settings.cfg.handshake_timeout;
        let deadline = tokio::time::Instant::now() + limit;
        // What the first bytes say: a TLS ClientHello, or an HTTP request (a WebSocket
        // upgrade without TLS of its own). Anything else fails the TLS handshake below.
        let mut first = [0u8; 4];
        let peeked = tokio::time::timeout_at(deadline, tcp.peek(&mut first)).await;
        let http = matches!(peeked, Ok(Ok(4))) && &first == b"GET ";
        // Everything after the first bytes is boxed: a connection that sends nothing (a
        // flood of idle connections) holds only this small future until its deadline,
        // not the state of a handshake and session (tens of KiB each).
        Box::pin(self.after_first_bytes(tcp, peer, settings, deadline, http)).await;
    }

    /// The rest of [`Self::connection`] once the first bytes arrived (or the deadline
    /// passed): TLS, WebSocket or refusal, then the session.
    async fn after_first_bytes(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        settings: Arc<Settings>,
        deadline: tokio::time::Instant,
        http: bool,
    ) {
        let limit = settings.cfg.handshake_timeout;
        if http && settings.websocket.is_some() {
            let Some(ws) = upgrade(deadline, limit, net::ReadAhead::new(tcp)).await else {
                return;
            };
            return self
                .tls_session(ws, peer, &settings, deadline, "websocket")
                .await;
        }
        let hello = LazyConfigAcceptor::new(
            rustls::server::Acceptor::default(),
            net::ReadAhead::new(tcp),
        );
        let start = match tokio::time::timeout_at(deadline, hello).await {
            Ok(Ok(start)) => start,
            Ok(Err(e)) => {
                refused!("tls", reason = %e, "tunnel connection refused: TLS handshake failed");
                return;
            }
            Err(_) => {
                refused!("tls_timeout", timeout = ?limit, "tunnel connection refused: TLS handshake timed out");
                return;
            }
        };
        let wants_http = start
            .client_hello()
            .alpn()
            .is_some_and(|mut a| a.any(|p| p == tls::ALPN_HTTP1))
            && !start
                .client_hello()
                .alpn()
                .is_some_and(|mut a| a.any(|p| p == tls::ALPN));
        if let (true, Some(ws_tls)) = (wants_http, settings.websocket.clone()) {
            // wss://: TLS without a client certificate, then the upgrade, then the
            // tunnel's mutual TLS inside.
            let outer = match tokio::time::timeout_at(
                deadline,
                start.into_stream(ws_tls).into_fallible(),
            )
            .await
            {
                Ok(Ok(s)) => s,
                Ok(Err((e, tcp))) => {
                    refused!("tls", reason = %e, "tunnel connection refused: TLS handshake (WebSocket) failed");
                    linger_close(tcp.into_inner()).await;
                    return;
                }
                Err(_) => {
                    refused!("tls_timeout", timeout = ?limit, "tunnel connection refused: TLS handshake timed out");
                    return;
                }
            };
            let Some(ws) = upgrade(deadline, limit, outer).await else {
                return;
            };
            return self
                .tls_session(ws, peer, &settings, deadline, "websocket")
                .await;
        }
        let accept = start
            .into_stream(settings.acceptor.config().clone())
            .into_fallible();
        let tls = match tokio::time::timeout_at(deadline, accept).await {
            Ok(Ok(s)) => s,
            Ok(Err((e, tcp))) => {
                refused!("tls", reason = %e, "tunnel connection refused: TLS handshake failed");
                linger_close(tcp.into_inner()).await;
                return;
            }
            Err(_) => {
                refused!("tls_timeout", timeout = ?limit, "tunnel connection refused: TLS handshake timed out");
                return;
            }
        };
        self.authenticated(tls, peer, &settings, "tls").await;
    }

    /// The tunnel's mutual TLS over `io` (a WebSocket), then the session.
    async fn tls_session<T>(
        &self,
        io: T,
        peer: SocketAddr,
        settings: &Settings,
        deadline: tokio::time::Instant,
        label: &'static str,
    ) where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let accept = settings.acceptor.accept(io).into_fallible();
        let tls = match tokio::time::timeout_at(deadline, accept).await {
            Ok(Ok(s)) => s,
            Ok(Err((e, mut io))) => {
                refused!("tls", reason = %e, transport = label, "tunnel connection refused: TLS handshake failed");
                // Let the alert reach the peer.
                let _ = tokio::time::timeout(
                    REFUSAL_LINGER,
                    tokio::io::AsyncWriteExt::shutdown(&mut io),
                )
                .await;
                return;
            }
            Err(_) => {
                refused!("tls_timeout", timeout = ?settings.cfg.handshake_timeout, transport = label, "tunnel connection refused: TLS handshake timed out");
                return;
            }
        };
        self.authenticated(tls, peer, settings, label).await;
    }

    /// A finished mutual TLS handshake: checks ALPN and the client's identity, then serves
    /// the session.
    async fn authenticated<T>(
        &self,
        tls: tokio_rustls::server::TlsStream<T>,
        peer: SocketAddr,
        settings: &Settings,
        label: &'static str,
    ) where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (_, conn) = tls.get_ref();
        if conn.alpn_protocol() != Some(tls::ALPN) {
            refused!(
                "alpn",
                "tunnel connection refused: peer did not negotiate ALPN routy/1"
            );
            return;
        }
        let identity = match conn.peer_certificates().and_then(|c| c.first()) {
            Some(cert) => tls::identity(cert),
            None => Err("no client certificate".to_string()),
        };
        let tunnel_name = match identity {
            Ok(t) => t,
            Err(e) => {
                refused!("identity", reason = %e, "tunnel connection refused");
                return;
            }
        };
        let cert = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(tls::revocation_key);
        let span = tracing::info_span!("session", tunnel = %tunnel_name);
        self.session(
            session::yamux_as(tls, Role::Server, label),
            peer,
            tunnel_name,
            cert,
            settings,
        )
        .instrument(span)
        .await;
    }

    /// Serves one authenticated connection, whatever its transport: handshake, registry,
    /// control stream, inner-opened streams, until the session ends.
    async fn session(
        &self,
        session: Session,
        peer: SocketAddr,
        tunnel_name: String,
        cert: Option<tls::RevocationKey>,
        settings: &Settings,
    ) {
        let handle = session.handle.clone();
        let transport = handle.transport();
        let mut incoming = session.incoming;
        let first = tokio::time::timeout(settings.cfg.handshake_timeout, incoming.recv()).await;
        let mut ctrl = match first {
            Ok(Some(s)) => s,
            Ok(None) => {
                refused!(
                    "no_control_stream",
                    "tunnel connection closed before opening its control stream"
                );
                handle.kill();
                return;
            }
            Err(_) => {
                refused!(
                    "no_control_stream",
                    "tunnel connection refused: no control stream within the handshake timeout"
                );
                handle.kill();
                return;
            }
        };
        let hello =
            match handshake::server_read_hello(&mut ctrl, settings.cfg.handshake_timeout).await {
                Ok(h) => h,
                Err(e) => {
                    refused!(match e {
                        handshake::HandshakeError::VersionMismatch { .. } => "version_mismatch",
                        _ => "hello",
                    }, reason = %e, "tunnel handshake failed");
                    // A version mismatch or protocol error was answered: let it reach the peer.
                    handle.close_after(&mut ctrl, REFUSAL_LINGER).await;
                    return;
                }
            };
        // Checked against the settings in force now: a reload may have happened since
        // the TLS handshake.
        if !self.settings().tunnels.contains(&tunnel_name) {
            let msg = format!(
                "tunnel {tunnel_name:?} is not configured on this relay-outer (no listener or CDC sink uses it)"
            );
            refused!("unknown_tunnel", node = %hello.node, "tunnel connection refused: {msg}");
            let _ = handshake::refuse(&mut ctrl, ErrorCode::UnknownTunnel, &msg).await;
            handle.close_after(&mut ctrl, REFUSAL_LINGER).await;
            return;
        }
        let id = self.registry.next_id();
        if let Err(e) = handshake::accept(&mut ctrl, &tunnel_name, id).await {
            refused!("hello", reason = %e, "tunnel handshake failed");
            handle.kill();
            return;
        }
        let who = Identity {
            tunnel: tunnel_name.clone(),
            peer,
            node: hello.node.clone(),
            services: hello.services.clone(),
            cert,
        };
        let entry = Arc::new(SessionEntry::new(id, who, handle.clone()));
        let count = self.registry.add(entry.clone());
        let tunnel_label = [("tunnel", tunnel_name.clone())];
        metrics::counter!(m::SESSION_CONNECTS, &tunnel_label).increment(1);
        metrics::gauge!(m::SESSIONS_UP, &tunnel_label).increment(1.0);
        let transport_label = [("transport", transport)];
        metrics::gauge!(m::SESSION_TRANSPORT, &transport_label).increment(1.0);
        let rtt_hist = metrics::histogram!(m::KEEPALIVE_RTT, &tunnel_label);
        info!(session = id, node = %hello.node, services = ?hello.services, sessions = count, transport, "tunnel up");

        // Streams opened by relay-inner carry CDC shipping.
        {
            let cdc = self.cdc.clone();
            let tunnel = tunnel_name.clone();
            let first_frame = settings.cfg.handshake_timeout;
            let limit = Arc::new(tokio::sync::Semaphore::new(MAX_INNER_STREAMS));
            let main = self.main.clone();
            tokio::spawn(
                async move {
                    while let Some(s) = incoming.recv().await {
                        let Ok(permit) = limit.clone().try_acquire_owned() else {
                            warn!(
                                limit = MAX_INNER_STREAMS,
                                "dropping a stream opened by relay-inner: too many open"
                            );
                            continue;
                        };
                        let (cdc, tunnel) = (cdc.clone(), tunnel.clone());
                        main.spawn(
                            async move {
                                receiver::serve(cdc, &tunnel, s, first_frame).await;
                                drop(permit);
                            }
                            .in_current_span(),
                        );
                    }
                }
                .in_current_span(),
            );
        }

        let (cmd_tx, cmd_rx) = mpsc::channel(4);
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
        let ctl = tokio::spawn(control::run(ctrl, settings.cfg.keepalive, cmd_rx, ev_tx));
        let events = {
            let entry = entry.clone();
            async move {
                while let Some(ev) = ev_rx.recv().await {
                    match ev {
                        ControlEvent::Rtt(rtt) => {
                            rtt_hist.record(rtt.as_secs_f64());
                            let us = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX).max(1);
                            entry.rtt_micros.store(us, Ordering::Relaxed);
                            debug!(session = entry.id, ?rtt, "keepalive");
                        }
                        ControlEvent::GoAway(reason) => {
                            info!(session = entry.id, %reason, "relay-inner is draining; no new streams to this session");
                            entry.draining.store(true, Ordering::Relaxed);
                        }
                    }
                }
            }
        };
        tokio::spawn(events);
        let drainer = tokio::spawn(drain_when_asked(entry.clone(), cmd_tx.clone()));
        let end = ctl
            .await
            .unwrap_or_else(|e| ControlEnd::Failed(format!("control task failed: {e}")));
        drainer.abort();
        drop(cmd_tx);
        let left = self.registry.remove(&tunnel_name, id);
        let end = handle.end_reason(end).await;
        metrics::gauge!(m::SESSIONS_UP, &tunnel_label).decrement(1.0);
        metrics::gauge!(m::SESSION_TRANSPORT, &transport_label).decrement(1.0);
        let reason = [
            ("tunnel", tunnel_name.clone()),
            ("reason", end.label().to_string()),
        ];
        metrics::counter!(m::SESSION_DISCONNECTS, &reason).increment(1);
        if matches!(end, ControlEnd::Failed(_)) {
            // The control loop may have answered with an Error frame; give it time to
            // reach the peer (the peer ends the session once it has read it).
            let _ = tokio::time::timeout(REFUSAL_LINGER, handle.closed()).await;
        }
        handle.kill();
        warn!(session = id, node = %entry.node, peer = %entry.peer, services = ?entry.services,
            uptime = ?entry.since.elapsed(), reason = %end, sessions_left = left, transport, "tunnel down");
    }
}

/// Waits for an operator's drain of `entry` ([`SessionEntry::drain`]): sends relay-inner
/// GoAway, waits for the session's client streams to finish (at most the grace the drain
/// gave), then ends the session.
async fn drain_when_asked(entry: Arc<SessionEntry>, cmd_tx: mpsc::Sender<ControlCommand>) {
    entry.drain_asked.notified().await;
    let grace = Duration::from_millis(entry.drain_grace_ms.load(Ordering::Relaxed));
    info!(session = entry.id, node = %entry.node, open_streams = entry.load.load(Ordering::Relaxed),
        ?grace, "draining the session: GoAway sent, no new streams");
    let _ = cmd_tx
        .send(ControlCommand::GoAway("drained by an operator".into()))
        .await;
    let deadline = tokio::time::Instant::now() + grace;
    while entry.load.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = cmd_tx.send(ControlCommand::Stop).await;
}

/// Closes a refused connection so that the TLS alert already sent reaches the peer:
/// a plain close with unread bytes (relay-inner's first frames, sent before our verdict
/// under TLS 1.3) would make the kernel send a reset that destroys the alert. So: FIN
/// first, then read and discard until the peer closes, for at most a short while.
async fn linger_close(mut tcp: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tcp.shutdown().await;
    let mut buf = [0u8; 4096];
    let mut budget = 1usize << 20;
    let deadline = tokio::time::Instant::now() + REFUSAL_LINGER;
    while budget > 0 {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => budget = budget.saturating_sub(n),
            _ => break,
        }
    }
}

tokio::task_local! {
    /// The address of the tunnel connection being handled, for [`handshake_failed`].
    static PEER_IP: std::net::IpAddr;
}

/// Failed handshakes by address (see [`penalty`]).
static PENALTY: std::sync::LazyLock<penalty::Penalty> =
    std::sync::LazyLock::new(penalty::Penalty::default);

/// Counts a refused tunnel connection (and, inside a TCP connection's handling, a failed
/// handshake of its address); whether to log it one by one (see [`RefusalLog`]).
fn handshake_failed(reason: &'static str) -> bool {
    metrics::counter!(m::HANDSHAKE_FAILURES, "reason" => reason).increment(1);
    let now = std::time::Instant::now();
    // Outside a connection's handling (QUIC, or `throttled` at accept) there is no
    // address to charge.
    let _ = PEER_IP.try_with(|ip| PENALTY.failed(*ip, now));
    REFUSALS.admit(reason, now)
}

/// Counts a refused tunnel connection and logs it with `warn!`, unless its reason has
/// been logged [`REFUSALS_LOGGED`] times in the current [`REFUSAL_WINDOW`] already.
macro_rules! refused {
    ($reason:expr, $($arg:tt)+) => {
        if handshake_failed($reason) {
            warn!($($arg)+);
        }
    };
}
use refused;

/// Refusals of one reason logged one by one in a window; the rest are counted.
const REFUSALS_LOGGED: u32 = 10;
/// The window of [`REFUSALS_LOGGED`].
const REFUSAL_WINDOW: Duration = Duration::from_secs(10);

static REFUSALS: RefusalLog = RefusalLog {
    windows: std::sync::Mutex::new(Vec::new()),
};

/// Rate limit on the log lines of refused tunnel connections (a scan or a flood of
/// garbage would otherwise write a line per connection): per reason, the first
/// [`REFUSALS_LOGGED`] of each [`REFUSAL_WINDOW`] are logged, and the first line of the
/// next window that has any says how many were left out. `routy_handshake_failures_total`
/// counts every one.
struct RefusalLog {
    /// Per reason: the window's start, lines logged in it, refusals left out.
    windows: std::sync::Mutex<Vec<(&'static str, std::time::Instant, u32, u64)>>,
}

impl RefusalLog {
    /// Whether a refusal for `reason` at `now` is logged; logs the count left out when a
    /// new window starts after one that left some out.
    fn admit(&self, reason: &'static str, now: std::time::Instant) -> bool {
        let mut w = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let i = match w.iter().position(|(r, ..)| *r == reason) {
            Some(i) => i,
            None => {
                w.push((reason, now, 0, 0));
                w.len() - 1
            }
        };
        let (_, start, logged, left_out) = &mut w[i];
        if now.duration_since(*start) >= REFUSAL_WINDOW {
            if *left_out > 0 {
                warn!(reason, left_out = *left_out, window = ?REFUSAL_WINDOW, limit = REFUSALS_LOGGED,
                    "more tunnel connections were refused for this reason than are logged one by one");
            }
            (*start, *logged, *left_out) = (now, 0, 0);
        }
        if *logged < REFUSALS_LOGGED {
            *logged += 1;
            true
        } else {
            if *left_out == 0 {
                warn!(reason, limit = REFUSALS_LOGGED, window = ?REFUSAL_WINDOW,
                    "tunnel connections refused for this reason are no longer logged one by one in this window; they are counted");
            }
            *left_out += 1;
            false
        }
    }
}
