//! Client-facing listeners: each accepts clients, checks the allowlist and its
//! connection limit, opens a stream on a live session of its tunnel, asks relay-inner for
//! its service, and splices.
//!
//! A listener stays bound while its tunnel is down; a client arriving then is closed at
//! once (fail fast) so replication clients retry instead of hanging.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use relay_proto::codec::{read_frame, write_frame};
use relay_proto::drain::Drain;
use relay_proto::frame::Frame;
use relay_proto::net;
use relay_proto::splice::{splice, ByteCounters};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{info, warn, Instrument};

use crate::config::ListenerConfig;
use crate::registry::Registry;

/// Bound on writing the Open frame into a fresh stream.
const OPEN_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// One running listener.
pub struct Listener {
    /// Its settings.
    pub cfg: ListenerConfig,
    /// Sessions to route to.
    pub registry: Arc<Registry>,
    /// Bytes through this listener.
    pub bytes: Arc<ByteCounters>,
    /// Shutdown signal and in-flight streams.
    pub drain: Drain,
    /// Bounds concurrent clients.
    pub slots: Arc<Semaphore>,
}

impl Listener {
    /// Accepts clients until shutdown.
    pub async fn serve(self: Arc<Self>, socket: TcpListener) {
        loop {
            let (client, addr) = tokio::select! {
                _ = self.drain.stopping() => return,
                r = socket.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(listener = %self.cfg.name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            self.clone().admit(client, addr);
        }
    }

    fn admit(self: Arc<Self>, client: TcpStream, addr: SocketAddr) {
        let cfg = &self.cfg;
        if !cfg.allow.is_empty() && !cfg.allow.iter().any(|c| c.contains(addr.ip())) {
            warn!(listener = %cfg.name, client = %addr, "client refused: source address not allowed");
            return;
        }
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            warn!(listener = %cfg.name, client = %addr, limit = cfg.max_connections,
                "client refused: listener is at max_connections");
            return;
        };
        let Some(assigned) = self.registry.pick(&cfg.tunnel) else {
            warn!(listener = %cfg.name, tunnel = %cfg.tunnel, client = %addr,
                "client refused: tunnel is down (no live session)");
            return;
        };
        net::tune_data_socket(&client);
        let guard = self.drain.guard();
        let span = tracing::info_span!("stream", listener = %cfg.name, tunnel = %cfg.tunnel,
            service = %cfg.service, client = %addr, session = assigned.session().id);
        tokio::spawn(
            async move {
                let _permit = permit;
                let _guard = guard;
                self.stream(client, addr, assigned.session()).await;
            }
            .instrument(span),
        );
    }

    async fn stream(
        &self,
        client: TcpStream,
        addr: SocketAddr,
        session: &crate::registry::SessionEntry,
    ) {
        let cfg = &self.cfg;
        let mut stream = match tokio::time::timeout(OPEN_WRITE_TIMEOUT, session.handle.open()).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                warn!(error = %e, "client closed: cannot open a stream on the tunnel");
                return;
            }
            Err(_) => {
                warn!("client closed: opening a stream on the tunnel timed out");
                return;
            }
        };
        let open = Frame::Open {
            service: cfg.service.clone(),
            client: addr.to_string(),
        };
        if let Err(e) = write_frame(&mut stream, &open, OPEN_WRITE_TIMEOUT).await {
            warn!(error = %e, "client closed: cannot send Open");
            return;
        }
        match read_frame(&mut stream, cfg.open_timeout).await {
            Ok(Frame::OpenOk) => {}
            Ok(Frame::Error { code, message }) => {
                warn!(%code, reason = %message, "client closed: relay-inner refused the stream");
                return;
            }
            Ok(other) => {
                warn!(
                    frame = other.kind_name(),
                    "client closed: unexpected answer to Open"
                );
                return;
            }
            Err(e) => {
                warn!(error = %e, "client closed: no answer to Open");
                return;
            }
        }
        info!("stream open");
        match splice(client, stream, self.bytes.clone()).await {
            Ok(m) => info!(
                to_service = m.to_service,
                to_client = m.to_client,
                "stream closed"
            ),
            Err(e) => info!(error = %e, "stream ended with an error"),
        }
    }
}
