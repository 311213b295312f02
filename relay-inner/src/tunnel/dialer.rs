//! Keeping a session to one relay-outer: dial out (TLS over TCP, or QUIC over UDP),
//! handshake, serve its streams, watch the keepalive, and on any loss reconnect with
//! backoff, forever.
//!
//! With `transport: auto` a connection tries QUIC first and falls back to TLS when QUIC
//! does not answer within [`QUIC_PROBE_TIMEOUT`] (UDP blocked on the way). A session on
//! the fallback tries QUIC again every `quic_retry`; once it gets through, the new QUIC
//! session takes over and the TLS one is sent GoAway and closed when its streams have
//! finished (or after `shutdown_grace`).

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use relay_proto::frame::Hello;
use routy_ops::drain::Drain;
use routy_tunnel::control::{self, ControlCommand, ControlEnd, ControlEvent};
use routy_tunnel::handshake::{self, HandshakeError, PROTOCOL_VERSION};
use routy_tunnel::proxy::{self, ProxyError};
use routy_tunnel::session::{self, Role, Session, SessionHandle, Stream};
use routy_tunnel::{net, quic, tls, websocket};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tracing::{debug, error, info, warn, Instrument};

use super::endpoint::EndpointStatus;
use super::services::Services;
use relay_inner::config::{Config, OuterEndpoint, Transport};
use routy_ops::backoff::Backoff;
use routy_ops::metrics as m;

/// The configuration and TLS material new connections use; replaced whole on reload.
pub struct Current {
    /// The whole config.
    pub cfg: Arc<Config>,
    /// TLS with our client certificate.
    pub connector: TlsConnector,
    /// The same identity for QUIC.
    pub quic: quinn::ClientConfig,
}

/// How long `transport: auto` waits for QUIC before falling back to TLS.
pub const QUIC_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The transport of one connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tls,
    Quic,
    WebSocket,
}

/// A byte stream the tunnel's TLS can run over (a WebSocket over TCP or over TLS).
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// A session that completed its handshake.
struct Connected {
    session: Session,
    ctrl: Stream,
    tunnel: String,
    id: u64,
}

/// How serving a session ended.
enum Served {
    /// The session ended.
    Ended(ControlEnd),
    /// A new session took over from this one (QUIC from TLS, or after relay-outer's
    /// GoAway), which drains in the background.
    Upgraded(Connected),
}

/// Keeps one endpoint's session alive.
pub struct Dialer {
    /// What new connections use.
    pub current: Arc<RwLock<Arc<Current>>>,
    /// The endpoint this dialer serves.
    pub endpoint: OuterEndpoint,
    /// Streams are served here.
    pub services: Arc<Services>,
    /// Process-wide shutdown signal.
    pub drain: Drain,
    /// This dialer's own stop (its endpoint was removed by a reload).
    pub stop: Drain,
    /// What `/status` and `/readyz` report about this endpoint.
    pub status: Arc<EndpointStatus>,
}

impl Dialer {
    /// Runs until shutdown.
    pub async fn run(self) {
        let span = tracing::info_span!("outer", addr = %self.endpoint.addr);
        self.run_inner().instrument(span).await
    }

    fn current(&self) -> Arc<Current> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn run_inner(self) {
        let r = self.current().cfg.reconnect;
        let mut backoff = Backoff::new(r.initial, r.max);
        // A session that is already up (a QUIC one that took over from TLS).
        let mut next: Option<Connected> = None;
        loop {
            if self.drain.is_stopping() || self.stop.is_stopping() {
                return;
            }
            let cur = self.current();
            let r = cur.cfg.reconnect;
            backoff.set_bounds(r.initial, r.max);
            let attempt = match next.take() {
                Some(c) => Ok(Ok(c)),
                None => tokio::time::timeout(cur.cfg.dial_timeout, self.dial(&cur)).await,
            };
            match attempt {
                Ok(Ok(Connected {
                    session,
                    ctrl,
                    tunnel,
                    id,
                })) => {
                    let started = Instant::now();
                    let transport = session.handle.transport();
                    self.status.up(id, &tunnel, transport);
                    metrics::counter!(m::SESSION_CONNECTS, &self.labels()).increment(1);
                    metrics::gauge!(m::SESSIONS_UP, &self.labels()).increment(1.0);
                    let transport_label = [("transport", transport)];
                    metrics::gauge!(m::SESSION_TRANSPORT, &transport_label).increment(1.0);
                    info!(tunnel = %tunnel, session = id, transport, "tunnel up");
                    self.status.set_session(Some(session.handle.clone()));
                    let served = self
                        .serve(session, ctrl, &cur)
                        .instrument(tracing::info_span!("session", tunnel = %tunnel, session = id, transport))
                        .await;
                    let up = started.elapsed();
                    metrics::gauge!(m::SESSIONS_UP, &self.labels()).decrement(1.0);
                    metrics::gauge!(m::SESSION_TRANSPORT, &transport_label).decrement(1.0);
                    let end = match served {
                        Served::Upgraded(c) => {
                            let how =
                                if c.session.handle.transport() == "quic" && transport != "quic" {
                                    "moved to QUIC"
                                } else {
                                    "moved to a new session"
                                };
                            info!(tunnel = %tunnel, old_session = id, session = c.id, transport = c.session.handle.transport(),
                                "{how}: the old session is draining and closes when its streams are done");
                            next = Some(c);
                            continue;
                        }
                        Served::Ended(end) => end,
                    };
                    self.status.set_session(None);
                    self.status.down(&end.to_string());
                    let [outer] = self.labels();
                    let labels = [outer, ("reason", end.label().to_string())];
                    metrics::counter!(m::SESSION_DISCONNECTS, &labels).increment(1);
                    if up >= r.reset_after {
                        backoff.reset();
                    }
                    if self.drain.is_stopping() {
                        info!(reason = %end, "tunnel closed for shutdown");
                        return;
                    }
                    if self.stop.is_stopping() {
                        info!(reason = %end, "tunnel closed: this relay-outer was removed from the configuration");
                        return;
                    }
                    warn!(tunnel = %tunnel, session = id, transport, reason = %end, uptime = ?up, "tunnel down");
                }
                Ok(Err(ConnectError::Refused(e))) => {
                    self.connect_failed("refused", &e);
                    error!(reason = %e, "relay-outer refused this relay; will keep retrying");
                }
                Ok(Err(ConnectError::Other(e))) => {
                    self.connect_failed("connect", &e);
                    warn!(reason = %e, "cannot connect to relay-outer")
                }
                Ok(Err(ConnectError::Proxy(e))) => {
                    let text = e.to_string();
                    self.connect_failed("proxy", &text);
                    let proxy = self.endpoint(&cur).proxy.map(|p| p.proxy.to_string());
                    let labels = [
                        ("outer", self.endpoint.addr.clone()),
                        ("proxy", proxy.unwrap_or_default()),
                        ("reason", e.reason().to_string()),
                    ];
                    metrics::counter!(m::PROXY_FAILURES, &labels).increment(1);
                    warn!(reason = %text, "cannot connect to relay-outer through the proxy")
                }
                Err(_) => {
                    self.connect_failed("timeout", "timed out");
                    warn!(timeout = ?cur.cfg.dial_timeout, "cannot connect to relay-outer: timed out")
                }
            }
            let delay = backoff.next_delay();
            info!(?delay, "reconnecting");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.drain.stopping() => return,
                _ = self.stop.stopping() => return,
            }
        }
    }

    /// This endpoint as the current configuration has it (a reload may have changed its
    /// proxy; its address and server name are what identify it).
    fn endpoint(&self, cur: &Current) -> OuterEndpoint {
        cur.cfg
            .outer
            .iter()
            .find(|e| e.addr == self.endpoint.addr && e.server_name == self.endpoint.server_name)
            .unwrap_or(&self.endpoint)
            .clone()
    }

    /// One connection attempt with the configured transport.
    async fn dial(&self, cur: &Current) -> Result<Connected, ConnectError> {
        let proxy = self.endpoint(cur).proxy;
        self.status.set_proxy(proxy.as_ref());
        match cur.cfg.transport {
            Transport::Tls => self.connect(cur, Kind::Tls).await,
            Transport::WebSocket => self.connect(cur, Kind::WebSocket).await,
            // QUIC cannot go through an HTTP or SOCKS5 proxy.
            Transport::Auto if proxy.is_some() => self.connect(cur, Kind::Tls).await,
            Transport::Quic => self.connect(cur, Kind::Quic).await,
            Transport::Auto => match self.probe_quic(cur).await {
                Ok(c) => Ok(c),
                Err(ConnectError::Refused(e)) => Err(ConnectError::Refused(e)),
                Err(e) => {
                    info!(reason = %e, "QUIC did not get through; falling back to TLS over TCP");
                    self.connect(cur, Kind::Tls).await
                }
            },
        }
    }

    /// A QUIC attempt bounded by [`QUIC_PROBE_TIMEOUT`] (UDP that is dropped on the way
    /// shows as silence, not as an error).
    async fn probe_quic(&self, cur: &Current) -> Result<Connected, ConnectError> {
        let limit = QUIC_PROBE_TIMEOUT.min(cur.cfg.dial_timeout);
        match tokio::time::timeout(limit, self.connect(cur, Kind::Quic)).await {
            Ok(r) => r,
            Err(_) => Err(ConnectError::Other(format!(
                "QUIC: no answer within {limit:?} (UDP blocked?)"
            ))),
        }
    }

    fn labels(&self) -> [(&'static str, String); 1] {
        [("outer", self.endpoint.addr.clone())]
    }

    fn connect_failed(&self, reason: &'static str, detail: &str) {
        self.status.down(detail);
        let [outer] = self.labels();
        let labels = [outer, ("reason", reason.to_string())];
        metrics::counter!(m::HANDSHAKE_FAILURES, &labels).increment(1);
    }

    async fn connect(&self, cur: &Current, kind: Kind) -> Result<Connected, ConnectError> {
        let other = |m: String| ConnectError::Other(m);
        let session = match kind {
            Kind::Tls => {
                let ep = self.endpoint(cur);
                let tcp = match &ep.proxy {
                    Some(p) => proxy::connect(&p.proxy, &ep.host, ep.port, cur.cfg.dial_timeout)
                        .await
                        .map_err(ConnectError::Proxy)?,
                    None => TcpStream::connect(&self.endpoint.addr)
                        .await
                        .map_err(|e| other(format!("TCP connect: {e}")))?,
                };
                let ka = cur.cfg.keepalive;
                net::tune_tunnel_socket(&tcp, ka);
                let tls = self.mutual_tls(cur, net::ReadAhead::new(tcp)).await?;
                session::yamux(tls, Role::Client)
            }
            Kind::WebSocket => {
                let ep = self.endpoint(cur);
                let Some(ws) = ep.websocket.clone() else {
                    return Err(other("no WebSocket URL for this endpoint".into()));
                };
                let tcp = match &ep.proxy {
                    Some(p) => proxy::connect(&p.proxy, &ws.host, ws.port, cur.cfg.dial_timeout)
                        .await
                        .map_err(ConnectError::Proxy)?,
                    None => TcpStream::connect((ws.host.as_str(), ws.port))
                        .await
                        .map_err(|e| other(format!("TCP connect to {}: {e}", ws.url)))?,
                };
                net::tune_tunnel_socket(&tcp, cur.cfg.keepalive);
                let io: Box<dyn Io> = if ws.tls {
                    let cfg = tls::websocket_client_config(&ws.ca)
                        .map_err(|e| other(format!("TLS under the WebSocket: {e}")))?;
                    let outer = TlsConnector::from(Arc::new(cfg))
                        .connect(ws.server_name.clone(), net::ReadAhead::new(tcp))
                        .await
                        .map_err(|e| other(format!("TLS handshake with {}: {e}", ws.url)))?;
                    Box::new(outer)
                } else {
                    Box::new(net::ReadAhead::new(tcp))
                };
                let io = websocket::connect(io, &ws.url, cur.cfg.dial_timeout)
                    .await
                    .map_err(other)?;
                let tls = self.mutual_tls(cur, io).await?;
                session::yamux_as(tls, Role::Client, "websocket")
            }
            Kind::Quic => {
                let addr = tokio::net::lookup_host(&self.endpoint.addr)
                    .await
                    .map_err(|e| other(format!("resolving {}: {e}", self.endpoint.addr)))?
                    .next()
                    .ok_or_else(|| {
                        other(format!("{} resolves to no address", self.endpoint.addr))
                    })?;
                let ep = quic::client_endpoint(addr).map_err(|e| other(e.to_string()))?;
                let conn = quic::connect(
                    &ep,
                    addr,
                    &self.endpoint.server_name.to_str(),
                    cur.quic.clone(),
                )
                .await
                .map_err(|e| {
                    if e.tls_refused() {
                        refused_by_tls(&e.to_string())
                    } else {
                        other(e.to_string())
                    }
                })?;
                if quic::alpn(&conn).as_deref() != Some(tls::ALPN) {
                    conn.close(session::QUIC_CLOSE_CODE, b"ALPN routy/1 required");
                    return Err(other("relay-outer did not negotiate ALPN routy/1".into()));
                }
                session::quic(conn)
            }
        };
        let mut ctrl = session
            .handle
            .open()
            .await
            .map_err(|e| other(format!("opening the control stream: {e}")))?;
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            node: cur.cfg.node.clone(),
            services: cur.cfg.services.keys().cloned().collect(),
            features: vec![],
        };
        match handshake::client(&mut ctrl, hello, cur.cfg.dial_timeout).await {
            Ok(ack) => Ok(Connected {
                session,
                ctrl,
                tunnel: ack.tunnel,
                id: ack.session_id,
            }),
            Err(e) => {
                let refused = matches!(
                    e,
                    HandshakeError::Refused { .. } | HandshakeError::VersionMismatch { .. }
                );
                if refused {
                    session.handle.kill();
                    return Err(ConnectError::Refused(e.to_string()));
                }
                // Under TLS 1.3 relay-outer judges our certificate after our handshake has
                // finished; its verdict arrives as an alert that ends the connection. Say
                // that, not just "closed".
                let _ = tokio::time::timeout(Duration::from_secs(1), session.handle.closed()).await;
                session.handle.kill();
                match session.handle.close_reason() {
                    Some(r) if r.tls_refused => Err(refused_by_tls(&r.text)),
                    Some(r) => Err(other(format!("handshake: {e} ({})", r.text))),
                    None => Err(other(format!("handshake: {e}"))),
                }
            }
        }
    }

    /// The tunnel's mutual TLS with relay-outer over `io`, ALPN routy/1 checked.
    async fn mutual_tls<T>(
        &self,
        cur: &Current,
        io: T,
    ) -> Result<tokio_rustls::client::TlsStream<T>, ConnectError>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let tls = cur
            .connector
            .connect(self.endpoint.server_name.clone(), io)
            .await
            .map_err(|e| {
                let text = format!("TLS handshake: {e}");
                if tls::alert_received(&e) {
                    refused_by_tls(&text)
                } else {
                    ConnectError::Other(text)
                }
            })?;
        if tls.get_ref().1.alpn_protocol() != Some(tls::ALPN) {
            return Err(ConnectError::Other(
                "relay-outer did not negotiate ALPN routy/1".into(),
            ));
        }
        Ok(tls)
    }

    /// Serves the session until its control loop ends; on shutdown tells relay-outer
    /// to send no more streams and keeps the session up while streams finish. A TLS
    /// session under `transport: auto` also tries QUIC every `quic_retry` and hands over
    /// to it when it gets through.
    async fn serve(&self, session: Session, ctrl: Stream, cur: &Current) -> Served {
        let keepalive = cur.cfg.keepalive;
        let max_streams = cur.cfg.max_streams_per_session;
        let Session {
            handle,
            mut incoming,
        } = session;
        let (cmd_tx, cmd_rx) = mpsc::channel(4);
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
        let mut ctl = tokio::spawn(control::run(ctrl, keepalive, cmd_rx, ev_tx));
        let mut goaway_sent = false;
        let rtt_hist = metrics::histogram!(m::KEEPALIVE_RTT, &self.labels());
        let try_quic = cur.cfg.transport == Transport::Auto
            && handle.transport() == "tls"
            && self.endpoint(cur).proxy.is_none();
        let retry = cur.cfg.quic_retry;
        let upgrade = async {
            loop {
                tokio::time::sleep(retry).await;
                match self.probe_quic(cur).await {
                    Ok(c) => return c,
                    Err(e) => {
                        debug!(reason = %e, "QUIC still does not get through; staying on TLS");
                    }
                }
            }
        };
        tokio::pin!(upgrade);
        // relay-outer's GoAway (an operator drained this session): dial a new session and
        // hand over to it, as for QUIC; the old one drains.
        let outer_goaway = tokio::sync::Notify::new();
        let replacement = async {
            outer_goaway.notified().await;
            loop {
                match tokio::time::timeout(cur.cfg.dial_timeout, self.dial(cur)).await {
                    Ok(Ok(c)) => return c,
                    Ok(Err(e)) => debug!(reason = %e, "no replacement session yet"),
                    Err(_) => debug!("no replacement session yet: timed out"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        };
        tokio::pin!(replacement);
        let end = loop {
            tokio::select! {
                end = &mut ctl => break end.unwrap_or_else(|e| ControlEnd::Failed(e.to_string())),
                s = incoming.recv() => match s {
                    Some(s) => self.accept_stream(s, &handle, max_streams),
                    None => {
                        // The connection is gone; the control loop will say why.
                        break match (&mut ctl).await {
                            Ok(end) => end,
                            Err(e) => ControlEnd::Failed(e.to_string()),
                        };
                    }
                },
                ev = ev_rx.recv(), if !ev_rx.is_closed() => match ev {
                    Some(ControlEvent::Rtt(rtt)) => {
                        self.status.rtt(rtt);
                        rtt_hist.record(rtt.as_secs_f64());
                        debug!(?rtt, "keepalive");
                    }
                    Some(ControlEvent::GoAway(reason)) => {
                        info!(%reason, "relay-outer is draining this session: dialing a new one");
                        outer_goaway.notify_one();
                    }
                    None => {}
                },
                c = &mut replacement, if !goaway_sent => {
                    info!(session = c.id, "a new session took over from the drained one");
                    self.drain_old(handle, incoming, ctl, cmd_tx, max_streams, cur.cfg.shutdown_grace);
                    return Served::Upgraded(c);
                }
                c = &mut upgrade, if try_quic && !goaway_sent => {
                    info!(session = c.id, "QUIC gets through now; moving off the TLS fallback");
                    let _ = cmd_tx
                        .send(ControlCommand::GoAway("relay-inner moved this connection to QUIC".into()))
                        .await;
                    self.drain_old(handle, incoming, ctl, cmd_tx, max_streams, cur.cfg.shutdown_grace);
                    return Served::Upgraded(c);
                }
                _ = self.stop.stopping() => break ControlEnd::Local,
                _ = self.drain.stopping(), if !goaway_sent => {
                    goaway_sent = true;
                    let _ = cmd_tx.send(ControlCommand::GoAway("relay-inner shutting down".into())).await;
                }
            }
        };
        let end = handle.end_reason(end).await;
        handle.kill();
        Served::Ended(end)
    }

    /// Serves one stream relay-outer opened, or refuses it over the limit.
    fn accept_stream(&self, s: Stream, handle: &SessionHandle, max_streams: usize) {
        // The control stream counts too.
        if handle.open_streams() > max_streams + 1 {
            warn!(
                limit = max_streams,
                "stream refused: session is at max_streams_per_session"
            );
            tokio::spawn(Services::refuse_over_limit(s, max_streams));
        } else {
            let services = self.services.clone();
            let limits = self.status.bandwidth.clone();
            tokio::spawn(services.serve(s, limits).in_current_span());
        }
    }

    /// Keeps a session that was sent GoAway up while its streams finish (streams
    /// relay-outer opened before it read the GoAway are still served), for at most
    /// `grace`; then closes it.
    fn drain_old(
        &self,
        handle: SessionHandle,
        mut incoming: mpsc::UnboundedReceiver<Stream>,
        mut ctl: tokio::task::JoinHandle<ControlEnd>,
        cmd_tx: mpsc::Sender<ControlCommand>,
        max_streams: usize,
        grace: Duration,
    ) {
        let services = self.services.clone();
        let limits = self.status.bandwidth.clone();
        let stop = self.stop.clone();
        tokio::spawn(
            async move {
                let deadline = tokio::time::Instant::now() + grace;
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                loop {
                    tokio::select! {
                        _ = &mut ctl => break,
                        s = incoming.recv() => match s {
                            Some(s) if handle.open_streams() > max_streams + 1 => {
                                tokio::spawn(Services::refuse_over_limit(s, max_streams));
                            }
                            Some(s) => {
                                tokio::spawn(services.clone().serve(s, limits.clone()).in_current_span());
                            }
                            None => break,
                        },
                        _ = tick.tick() => {
                            // Only the control stream left, or out of time.
                            if handle.open_streams() <= 1 || tokio::time::Instant::now() >= deadline {
                                break;
                            }
                        }
                        _ = stop.stopping() => break,
                    }
                }
                drop(cmd_tx);
                handle.kill();
                info!("TLS session closed after the move to QUIC");
            }
            .in_current_span(),
        );
    }
}

/// A TLS verdict of relay-outer on our certificate (a TLS alert over TCP; a CRYPTO_ERROR
/// close over QUIC), with what the transport said.
fn refused_by_tls(reason: &str) -> ConnectError {
    if reason.contains("CertificateRevoked") {
        return ConnectError::Refused(format!(
            "relay-outer rejected the TLS session ({reason}): this relay's certificate is \
             revoked (relay-outer's tunnel.tls.crl lists it); issue it a new one"
        ));
    }
    ConnectError::Refused(format!(
        "relay-outer rejected the TLS session ({reason}); check that this relay's certificate \
         is signed by the CA relay-outer trusts (tunnel.tls.client_ca), not expired and not \
         revoked"
    ))
}

enum ConnectError {
    /// relay-outer answered and said no (identity, version): the operator must act.
    Refused(String),
    /// The network or TLS failed.
    Other(String),
    /// The proxy on the way failed or said no.
    Proxy(ProxyError),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Refused(e) | ConnectError::Other(e) => f.write_str(e),
            ConnectError::Proxy(e) => write!(f, "{e}"),
        }
    }
}
