//! Keeping a session to one relay-outer: dial out, TLS, handshake, serve its streams,
//! watch the keepalive, and on any loss reconnect with backoff, forever.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use relay_proto::control::{self, ControlCommand, ControlEnd, ControlEvent, Keepalive};
use relay_proto::drain::Drain;
use relay_proto::frame::Hello;
use relay_proto::handshake::{self, HandshakeError, PROTOCOL_VERSION};
use relay_proto::session::{self, Role, Session, Stream};
use relay_proto::{net, tls};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tracing::{debug, error, info, warn, Instrument};

use crate::backoff::Backoff;
use crate::config::{Config, OuterEndpoint};
use crate::services::Services;
use crate::status::EndpointStatus;
use relay_proto::metrics as m;

/// The configuration and TLS material new connections use; replaced whole on reload.
pub struct Current {
    /// The whole config.
    pub cfg: Arc<Config>,
    /// TLS with our client certificate.
    pub connector: TlsConnector,
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
        loop {
            if self.drain.is_stopping() || self.stop.is_stopping() {
                return;
            }
            let cur = self.current();
            let r = cur.cfg.reconnect;
            backoff.set_bounds(r.initial, r.max);
            match tokio::time::timeout(cur.cfg.dial_timeout, self.connect(&cur)).await {
                Ok(Ok((session, ctrl, tunnel, id))) => {
                    let started = Instant::now();
                    self.status.up(id, &tunnel);
                    metrics::counter!(m::SESSION_CONNECTS, &self.labels()).increment(1);
                    metrics::gauge!(m::SESSIONS_UP, &self.labels()).increment(1.0);
                    info!(tunnel = %tunnel, session = id, "tunnel up");
                    self.status.set_session(Some(session.handle.clone()));
                    let end = self
                        .serve(
                            session,
                            ctrl,
                            cur.cfg.keepalive,
                            cur.cfg.max_streams_per_session,
                        )
                        .instrument(tracing::info_span!("session", tunnel = %tunnel, session = id))
                        .await;
                    let up = started.elapsed();
                    self.status.set_session(None);
                    self.status.down(&end.to_string());
                    metrics::gauge!(m::SESSIONS_UP, &self.labels()).decrement(1.0);
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
                    warn!(tunnel = %tunnel, session = id, reason = %end, uptime = ?up, "tunnel down");
                }
                Ok(Err(ConnectError::Refused(e))) => {
                    self.connect_failed("refused", &e);
                    error!(reason = %e, "relay-outer refused this relay; will keep retrying");
                }
                Ok(Err(ConnectError::Other(e))) => {
                    self.connect_failed("connect", &e);
                    warn!(reason = %e, "cannot connect to relay-outer")
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

    fn labels(&self) -> [(&'static str, String); 1] {
        [("outer", self.endpoint.addr.clone())]
    }

    fn connect_failed(&self, reason: &'static str, detail: &str) {
        self.status.down(detail);
        let [outer] = self.labels();
        let labels = [outer, ("reason", reason.to_string())];
        metrics::counter!(m::HANDSHAKE_FAILURES, &labels).increment(1);
    }

    async fn connect(&self, cur: &Current) -> Result<(Session, Stream, String, u64), ConnectError> {
        let other = |m: String| ConnectError::Other(m);
        let tcp = TcpStream::connect(&self.endpoint.addr)
            .await
            .map_err(|e| other(format!("TCP connect: {e}")))?;
        let ka = cur.cfg.keepalive;
        net::tune_tunnel_socket(&tcp, ka.interval, ka.timeout);
        let tls = cur
            .connector
            .connect(self.endpoint.server_name.clone(), tcp)
            .await
            .map_err(|e| other(format!("TLS handshake: {e}")))?;
        if tls.get_ref().1.alpn_protocol() != Some(tls::ALPN) {
            return Err(other("relay-outer did not negotiate ALPN routy/1".into()));
        }
        let session = session::yamux(tls, Role::Client);
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
            Ok(ack) => Ok((session, ctrl, ack.tunnel, ack.session_id)),
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
                    Some(r) if r.contains("alert") => Err(ConnectError::Refused(format!(
                        "relay-outer rejected the TLS session ({r}); check that this relay's certificate \
                         is signed by the CA relay-outer trusts (tunnel.tls.client_ca) and not expired"
                    ))),
                    Some(r) => Err(other(format!("handshake: {e} ({r})"))),
                    None => Err(other(format!("handshake: {e}"))),
                }
            }
        }
    }

    /// Serves the session until its control loop ends; on shutdown tells relay-outer
    /// to send no more streams and keeps the session up while streams finish.
    async fn serve(
        &self,
        session: Session,
        ctrl: Stream,
        keepalive: Keepalive,
        max_streams: usize,
    ) -> ControlEnd {
        let Session {
            handle,
            mut incoming,
        } = session;
        let (cmd_tx, cmd_rx) = mpsc::channel(4);
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
        let mut ctl = tokio::spawn(control::run(ctrl, keepalive, cmd_rx, ev_tx));
        let mut goaway_sent = false;
        let rtt_hist = metrics::histogram!(m::KEEPALIVE_RTT, &self.labels());
        let end = loop {
            tokio::select! {
                end = &mut ctl => break end.unwrap_or_else(|e| ControlEnd::Failed(e.to_string())),
                s = incoming.recv() => match s {
                    Some(s) => {
                        // The control stream counts too.
                        if handle.open_streams() > max_streams + 1 {
                            warn!(limit = max_streams, "stream refused: session is at max_streams_per_session");
                            tokio::spawn(Services::refuse_over_limit(s, max_streams));
                        } else {
                            let services = self.services.clone();
                            tokio::spawn(services.serve(s).in_current_span());
                        }
                    }
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
                    Some(ControlEvent::GoAway(reason)) => info!(%reason, "relay-outer is draining"),
                    None => {}
                },
                _ = self.stop.stopping() => break ControlEnd::Local,
                _ = self.drain.stopping(), if !goaway_sent => {
                    goaway_sent = true;
                    let _ = cmd_tx.send(ControlCommand::GoAway("relay-inner shutting down".into())).await;
                }
            }
        };
        handle.kill();
        end
    }
}

enum ConnectError {
    /// relay-outer answered and said no (identity, version): the operator must act.
    Refused(String),
    /// The network or TLS failed.
    Other(String),
}
