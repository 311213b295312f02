//! What relay-inner knows about each relay-outer endpoint (for `/readyz` and `/status`),
//! and where its dialer publishes the live session for the CDC shippers to subscribe to.

use std::sync::{Arc, Mutex};

use routy_tunnel::throttle::Limit;
use std::time::{Duration, Instant, SystemTime};

/// State of one endpoint's session.
#[derive(Debug)]
pub struct EndpointStatus {
    /// `host:port` dialed.
    pub addr: String,
    state: Mutex<State>,
    /// The live session, for the CDC shippers.
    session: tokio::sync::watch::Sender<Option<routy_tunnel::session::SessionHandle>>,
    /// Which of the endpoint's connections this is (index, count).
    connection: std::sync::atomic::AtomicU64,
    /// The proxy the last attempt went through (URL without password, and where the
    /// setting came from).
    proxy: Mutex<Option<(String, String)>>,
    /// `outer[].max_bandwidth` toward the service and toward the client, over every
    /// stream of this endpoint's sessions.
    pub bandwidth: Arc<[Arc<Limit>; 2]>,
}

#[derive(Debug, Default)]
struct State {
    session: Option<Live>,
    last_error: Option<(SystemTime, String)>,
    connects: u64,
}

#[derive(Debug)]
struct Live {
    id: u64,
    tunnel: String,
    transport: &'static str,
    since: Instant,
    rtt: Option<Duration>,
}

impl EndpointStatus {
    /// A new, not yet connected endpoint; its connections share `bandwidth` (see
    /// [`EndpointStatus::bandwidth_limits`]).
    pub fn new(addr: &str, bandwidth: Arc<[Arc<Limit>; 2]>) -> Self {
        EndpointStatus {
            addr: addr.to_owned(),
            state: Mutex::default(),
            session: tokio::sync::watch::channel(None).0,
            connection: std::sync::atomic::AtomicU64::new(1),
            proxy: Mutex::new(None),
            bandwidth,
        }
    }

    /// The limits of an endpoint's `max_bandwidth` (bytes per second, 0: none), to share
    /// between its connections.
    pub fn bandwidth_limits(addr: &str, rate: u64) -> Arc<[Arc<Limit>; 2]> {
        let labels = [("outer", addr.to_owned())];
        Arc::new([
            Arc::new(Limit::registered(rate, &labels, "to_service")),
            Arc::new(Limit::registered(rate, &labels, "to_client")),
        ])
    }

    /// Sets the endpoint's `max_bandwidth` (0: none).
    pub fn set_bandwidth(&self, rate: u64) {
        for l in self.bandwidth.iter() {
            if l.rate() != rate {
                l.set_rate(rate);
            }
        }
    }

    /// Records the proxy connections go through (none: direct).
    pub fn set_proxy(&self, p: Option<&relay_inner::config::ProxyUse>) {
        let v = p.map(|p| (p.proxy.to_string(), p.from.to_string()));
        *self.proxy.lock().unwrap_or_else(|p| p.into_inner()) = v;
    }

    /// Records that this is connection `i` of `n` to its endpoint.
    pub fn set_connection(&self, i: usize, n: usize) {
        self.connection.store(
            ((i as u64) << 32) | n as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Publishes the live session (or its end) to the CDC shippers.
    pub fn set_session(&self, s: Option<routy_tunnel::session::SessionHandle>) {
        self.session.send_replace(s);
    }

    /// Watches the live session.
    pub fn session(&self) -> routy_tunnel::session::SessionWatch {
        self.session.subscribe()
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        // Every update is a plain assignment, so a poisoned lock holds usable data.
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// A session is up, over `transport` (`tls` or `quic`).
    pub fn up(&self, id: u64, tunnel: &str, transport: &'static str) {
        self.with(|s| {
            s.connects += 1;
            s.session = Some(Live {
                id,
                tunnel: tunnel.to_owned(),
                transport,
                since: Instant::now(),
                rtt: None,
            })
        });
    }

    /// The session ended or a connection attempt failed.
    pub fn down(&self, reason: &str) {
        self.with(|s| {
            s.session = None;
            s.last_error = Some((SystemTime::now(), reason.to_owned()));
        });
    }

    /// A keepalive round trip was measured.
    pub fn rtt(&self, rtt: Duration) {
        self.with(|s| {
            if let Some(l) = s.session.as_mut() {
                l.rtt = Some(rtt);
            }
        });
    }

    /// Whether a session is up now.
    pub fn is_up(&self) -> bool {
        self.with(|s| s.session.is_some())
    }

    /// This endpoint as a JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        self.with(|s| {
            let session = s.session.as_ref().map(|l| {
                serde_json::json!({
                    "id": l.id,
                    "tunnel": l.tunnel,
                    "transport": l.transport,
                    "uptime_seconds": l.since.elapsed().as_secs_f64(),
                    "rtt_seconds": l.rtt.map(|r| r.as_secs_f64()),
                })
            });
            let last_error = s.last_error.as_ref().map(|(t, e)| {
                let ago = t.elapsed().unwrap_or_default().as_secs_f64();
                serde_json::json!({ "seconds_ago": ago, "reason": e })
            });
            let c = self.connection.load(std::sync::atomic::Ordering::Relaxed);
            let proxy = self
                .proxy
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .map(|(url, from)| serde_json::json!({ "url": url, "from": from }));
            serde_json::json!({
                "addr": self.addr,
                "connection": c >> 32,
                "connections": c & 0xffff_ffff,
                "up": s.session.is_some(),
                "session": session,
                "connects": s.connects,
                "proxy": proxy,
                "last_error": last_error,
            })
        })
    }
}
