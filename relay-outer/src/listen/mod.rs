//! Client-facing listeners: each accepts clients, checks the allowlist and its
//! connection limit, opens a stream on a live session of its tunnel, asks relay-inner for
//! its service, and splices.
//!
//! A listener stays bound while its tunnel is down; a client arriving then is closed at
//! once (fail fast) so replication clients retry instead of hanging.

pub mod answer;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use relay_proto::frame::Frame;
use routy_ops::drain::Drain;
use routy_ops::metrics as m;
use routy_tunnel::codec::write_frame;
use routy_tunnel::lanes::MovingTcp;
use routy_tunnel::net;
use routy_tunnel::splice::{splice, ByteCounters};
use routy_tunnel::throttle::{Limit, Throttled};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, error, info, warn, Instrument};

use crate::config::ListenerConfig;
use crate::listen::answer::{AwaitAnswer, Refusal};
use crate::tunnel::registry::{PickError, Registry};

/// Bound on writing the Open frame into a fresh stream.
const OPEN_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a listener refreshes `routy_listener_tunnel_up` (sessions come and go, and
/// start draining, in the tunnel's own tasks).
const TUNNEL_UP_EVERY: Duration = Duration::from_secs(1);

/// Clients connected through one listener, counted against a limit that may change.
#[derive(Debug, Default)]
pub struct Slots {
    in_use: AtomicUsize,
}

/// One client's place in [`Slots`], given back on drop.
#[derive(Debug)]
pub struct Slot(Arc<Slots>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.in_use.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Slots {
    /// Takes a place if fewer than `limit` are taken.
    pub fn take(this: &Arc<Slots>, limit: usize) -> Option<Slot> {
        this.in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(this.clone()))
    }

    /// Places taken now.
    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Acquire)
    }
}

/// `tunnel.max_bandwidth`: the limits over every listener's clients, toward the service
/// and toward the client (`listener="*"` in the metrics). Set at start and by reloads.
pub fn tunnel_bandwidth() -> &'static Arc<[Arc<Limit>; 2]> {
    static ALL: std::sync::OnceLock<Arc<[Arc<Limit>; 2]>> = std::sync::OnceLock::new();
    ALL.get_or_init(|| {
        let labels = [("listener", "*".to_string())];
        Arc::new([
            Arc::new(Limit::registered(0, &labels, "to_service")),
            Arc::new(Limit::registered(0, &labels, "to_client")),
        ])
    })
}

/// A listener's settings and the state that goes with them; replaced whole on reload.
pub struct Listener {
    /// Its settings.
    pub cfg: ListenerConfig,
    /// Sessions to route to.
    pub registry: Arc<Registry>,
    /// Bytes through this listener.
    pub bytes: Arc<ByteCounters>,
    /// Shutdown signal and in-flight streams (process-wide).
    pub drain: Drain,
    /// Bounds concurrent clients.
    pub slots: Arc<Slots>,
    /// `max_bandwidth` toward the service and toward the client, shared by every client
    /// (and kept across reloads, which change the rate of streams already running).
    pub bandwidth: Arc<[Arc<Limit>; 2]>,
}

impl Listener {
    /// A listener for `cfg`; shares `previous`'s count of connected clients, so clients
    /// admitted before a reload still count against a changed limit.
    pub fn new(
        cfg: ListenerConfig,
        registry: Arc<Registry>,
        drain: Drain,
        previous: Option<&Listener>,
    ) -> Self {
        let slots = previous.map_or_else(Default::default, |p| p.slots.clone());
        let bandwidth = previous.map_or_else(
            || {
                let labels = [("listener", cfg.name.clone())];
                Arc::new([
                    Arc::new(Limit::registered(cfg.max_bandwidth, &labels, "to_service")),
                    Arc::new(Limit::registered(cfg.max_bandwidth, &labels, "to_client")),
                ])
            },
            |p| p.bandwidth.clone(),
        );
        for l in bandwidth.iter() {
            l.set_rate(cfg.max_bandwidth);
        }
        let bytes = Arc::new(ByteCounters::registered(&[
            ("listener", cfg.name.clone()),
            ("tunnel", cfg.tunnel.clone()),
            ("service", cfg.service.clone()),
        ]));
        Listener {
            cfg,
            registry,
            bytes,
            drain,
            slots,
            bandwidth,
        }
    }
}

/// A bound listener socket and its accept loop; the settings it admits clients with can
/// be swapped while it runs (allowlist, limit, tunnel, service).
pub struct Running {
    current: RwLock<Arc<Listener>>,
    stop: Drain,
    /// The tunnel whose `routy_listener_tunnel_up` series this listener sets; `None` once
    /// stopped. Held while the gauge is set, so a stopped listener never sets it again.
    published: Mutex<Option<String>>,
    /// The bound address.
    pub bind: SocketAddr,
}

impl Running {
    /// Starts accepting on `socket` with `listener`'s settings.
    pub fn start(listener: Listener, socket: TcpListener) -> Arc<Running> {
        let bind = socket.local_addr().unwrap_or(listener.cfg.bind);
        let global = listener.drain.clone();
        let tunnel = listener.cfg.tunnel.clone();
        let running = Arc::new(Running {
            current: RwLock::new(Arc::new(listener)),
            stop: Drain::new(),
            published: Mutex::new(Some(tunnel)),
            bind,
        });
        running.publish_tunnel_up();
        // Accept on the first data-path thread: a tunnel's first session goes there too
        // (lanes::spawn_connection), so the clients of a one-session tunnel are never
        // handed to another thread. bench-tunnel, new connections/s against direct
        // (3 interleaved reps): 0.50-0.52x accepting on the main runtime, 0.53-0.58x here.
        let r = running.clone();
        let Some(lane) = routy_tunnel::lanes::get(0) else {
            tokio::spawn(r.serve(socket, global));
            return running;
        };
        let name = r.current().cfg.name.clone();
        match socket.into_std() {
            Ok(std) => {
                lane.spawn(async move {
                    match TcpListener::from_std(std) {
                        Ok(socket) => r.serve(socket, global).await,
                        Err(e) => error!(listener = %name, error = %e,
                            "listener cannot accept: registering its socket failed"),
                    }
                });
            }
            Err(e) => error!(listener = %name, error = %e,
                "listener cannot accept: moving its socket to a data-path thread failed"),
        }
        running
    }

    /// The settings in force.
    pub fn current(&self) -> Arc<Listener> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Puts new settings in force for the clients that arrive from now on.
    pub fn update(&self, listener: Listener) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(listener);
        self.publish_tunnel_up();
    }

    /// Stops accepting and closes the socket; streams already spliced go on. Its
    /// `routy_listener_tunnel_up` series becomes NaN (a listener started in its place sets
    /// it again).
    pub fn stop(&self) {
        let mut published = self.published.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tunnel) = published.take() {
            tunnel_up_gauge(&self.current().cfg.name, &tunnel).set(f64::NAN);
        }
        drop(published);
        self.stop.stop();
    }

    /// Sets `routy_listener_tunnel_up`: 1 while a session of the listener's tunnel can
    /// take streams. After a reload moved the listener to another tunnel, the old
    /// tunnel's series becomes NaN. Nothing once stopped.
    fn publish_tunnel_up(&self) {
        let mut published = self.published.lock().unwrap_or_else(|p| p.into_inner());
        let Some(tunnel) = published.as_mut() else {
            return;
        };
        let l = self.current();
        if *tunnel != l.cfg.tunnel {
            tunnel_up_gauge(&l.cfg.name, tunnel).set(f64::NAN);
            *tunnel = l.cfg.tunnel.clone();
        }
        let up = l
            .registry
            .all()
            .iter()
            .any(|s| s.tunnel == l.cfg.tunnel && s.usable());
        tunnel_up_gauge(&l.cfg.name, &l.cfg.tunnel).set(if up { 1.0 } else { 0.0 });
    }

    async fn serve(self: Arc<Self>, socket: TcpListener, global: Drain) {
        let mut tick = tokio::time::interval(TUNNEL_UP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let (client, addr) = tokio::select! {
                _ = global.stopping() => return,
                _ = self.stop.stopping() => return,
                _ = tick.tick() => {
                    self.publish_tunnel_up();
                    continue;
                }
                r = socket.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(listener = %self.current().cfg.name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            self.current().admit(client, addr);
        }
    }
}

fn tunnel_up_gauge(listener: &str, tunnel: &str) -> metrics::Gauge {
    let labels = [
        ("listener", listener.to_string()),
        ("tunnel", tunnel.to_string()),
    ];
    metrics::gauge!(m::LISTENER_TUNNEL_UP, &labels)
}

impl Listener {
    fn refused(&self, reason: &'static str) {
        let labels = [
            ("listener", self.cfg.name.clone()),
            ("reason", reason.to_string()),
        ];
        metrics::counter!(m::LISTENER_REFUSED, &labels).increment(1);
    }

    fn labels(&self) -> [(&'static str, String); 3] {
        [
            ("listener", self.cfg.name.clone()),
            ("tunnel", self.cfg.tunnel.clone()),
            ("service", self.cfg.service.clone()),
        ]
    }

    fn failed(&self, reason: &'static str) {
        let [a, b, c] = self.labels();
        let labels = [a, b, c, ("reason", reason.to_string())];
        metrics::counter!(m::STREAMS_FAILED, &labels).increment(1);
    }

    fn admit(self: Arc<Self>, client: TcpStream, addr: SocketAddr) {
        let arrived = Instant::now();
        let cfg = &self.cfg;
        if !cfg.allow.is_empty() && !cfg.allow.iter().any(|c| c.contains(addr.ip())) {
            self.refused("not_allowed");
            warn!(listener = %cfg.name, client = %addr, "client refused: source address not allowed");
            return;
        }
        let Some(permit) = Slots::take(&self.slots, cfg.max_connections) else {
            self.refused("over_limit");
            warn!(listener = %cfg.name, client = %addr, limit = cfg.max_connections,
                "client refused: listener is at max_connections");
            return;
        };
        let assigned = match self.registry.pick(&cfg.tunnel) {
            Ok(a) => a,
            Err(PickError::Full) => {
                self.refused("over_limit");
                warn!(listener = %cfg.name, tunnel = %cfg.tunnel, client = %addr,
                    "client refused: every session of the tunnel is at max_streams_per_session");
                return;
            }
            Err(PickError::NoSession) => {
                self.refused("no_session");
                warn!(listener = %cfg.name, tunnel = %cfg.tunnel, client = %addr,
                "client refused: tunnel is down (no live session)");
                return;
            }
        };
        net::tune_data_socket(&client);
        let guard = self.drain.guard();
        let span = tracing::info_span!("stream", listener = %cfg.name, tunnel = %cfg.tunnel,
            service = %cfg.service, client = %addr, session = assigned.session().id);
        // The stream runs on the session's lane, next to its driver (see lanes).
        let lane = assigned.session().handle.lane().cloned();
        let client = match MovingTcp::to(client, lane.as_ref()) {
            Ok(c) => c,
            Err(e) => {
                self.failed("lane");
                warn!(listener = %cfg.name, client = %addr, error = %e,
                    "client closed: cannot hand the connection to its session's thread");
                return;
            }
        };
        let run = async move {
            let _permit = permit;
            let _guard = guard;
            match client.arrive() {
                Ok(client) => self.stream(client, addr, assigned.session(), arrived).await,
                Err(e) => {
                    self.failed("lane");
                    warn!(error = %e, "client closed: cannot register the connection on its session's thread");
                }
            }
        }
        .instrument(span);
        match lane {
            Some(lane) => drop(lane.spawn(run)),
            None => drop(tokio::spawn(run)),
        }
    }

    async fn stream(
        &self,
        client: TcpStream,
        addr: SocketAddr,
        session: &crate::tunnel::registry::SessionEntry,
        arrived: Instant,
    ) {
        let cfg = &self.cfg;
        let mut stream = match tokio::time::timeout(OPEN_WRITE_TIMEOUT, session.handle.open()).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.failed("open_failed");
                warn!(error = %e, "client closed: cannot open a stream on the tunnel");
                return;
            }
            Err(_) => {
                self.failed("open_timeout");
                warn!("client closed: opening a stream on the tunnel timed out");
                return;
            }
        };
        let open = Frame::Open {
            service: cfg.service.clone(),
            client: addr.to_string(),
        };
        if let Err(e) = write_frame(&mut stream, &open, OPEN_WRITE_TIMEOUT).await {
            self.failed("open_failed");
            warn!(error = %e, "client closed: cannot send Open");
            return;
        }
        // Optimistic open: the client's bytes follow `Open` at once; relay-inner's answer
        // heads the other direction (answer.rs).
        let labels = self.labels();
        let active = metrics::gauge!(m::STREAMS_ACTIVE, &labels);
        let on_open = {
            let (labels, active) = (labels.clone(), active.clone());
            Box::new(move || {
                metrics::histogram!(m::STREAM_OPEN_LATENCY, &labels)
                    .record(arrived.elapsed().as_secs_f64());
                metrics::counter!(m::STREAMS_OPENED, &labels).increment(1);
                active.increment(1.0);
                debug!("stream open");
            })
        };
        let mut stream = AwaitAnswer::new(stream, cfg.open_timeout, on_open);
        let [up, down] = &*self.bandwidth;
        let [all_up, all_down] = &**tunnel_bandwidth();
        // The listener's counters, and the session's total beside them.
        let bytes = Arc::new(ByteCounters {
            also: Some(session.bytes.clone()),
            ..ByteCounters::clone(&self.bytes)
        });
        let result = splice(
            Throttled::new(client, vec![up.clone(), all_up.clone()]),
            Throttled::new(&mut stream, vec![down.clone(), all_down.clone()]),
            bytes,
        )
        .await;
        if let Some(refusal) = stream.refusal() {
            self.failed(refusal.reason());
            match refusal {
                Refusal::Refused(code, message) => {
                    warn!(%code, reason = %message, "client closed: relay-inner refused the stream")
                }
                Refusal::Protocol(m) => {
                    warn!(error = %m, "client closed: unexpected answer to Open")
                }
                Refusal::NoAnswer(m) => warn!(error = %m, "client closed: no answer to Open"),
            }
            return;
        }
        match result {
            Ok(moved) => info!(
                to_service = moved.to_service,
                to_client = moved.to_client,
                "stream closed"
            ),
            Err(e) => info!(error = %e, "stream ended with an error"),
        }
        if stream.is_open() {
            active.decrement(1.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::registry::SessionEntry;

    fn config(name: &str, tunnel: &str) -> ListenerConfig {
        ListenerConfig {
            name: name.into(),
            bind: "127.0.0.1:0".parse().unwrap(),
            tunnel: tunnel.into(),
            service: "svc".into(),
            allow: vec![],
            max_connections: 10,
            max_bandwidth: 0,
            backlog: 16,
            open_timeout: Duration::from_secs(5),
        }
    }

    /// The value of `routy_listener_tunnel_up{listener, tunnel}` in `text`.
    fn tunnel_up(text: &str, listener: &str, tunnel: &str) -> Option<String> {
        let series = format!(
            "{}{{listener=\"{listener}\",tunnel=\"{tunnel}\"}} ",
            m::LISTENER_TUNNEL_UP
        );
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .map(str::to_owned)
    }

    #[tokio::test]
    async fn tunnel_up_follows_the_sessions_a_reload_and_a_stop() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let metrics = recorder.handle();
        let _local = metrics::set_default_local_recorder(&recorder);
        let registry = Arc::new(Registry::default());
        let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let drain = Drain::new();
        let listener = Listener::new(config("l", "t"), registry.clone(), drain.clone(), None);
        let running = Running::start(listener, socket);
        let value = |tunnel: &str| tunnel_up(&metrics.render(), "l", tunnel);
        assert_eq!(value("t").as_deref(), Some("0"), "no session yet");

        let (io, _peer) = tokio::io::duplex(1024);
        let session = Arc::new(SessionEntry::for_test(
            registry.next_id(),
            "t",
            routy_tunnel::session::yamux(io, routy_tunnel::session::Role::Server).handle,
        ));
        registry.add(session.clone());
        running.publish_tunnel_up();
        assert_eq!(value("t").as_deref(), Some("1"), "a live session");
        session.draining.store(true, Ordering::Relaxed);
        running.publish_tunnel_up();
        assert_eq!(value("t").as_deref(), Some("0"), "only a draining session");
        session.draining.store(false, Ordering::Relaxed);
        // The accept loop refreshes it on its own.
        let t0 = Instant::now();
        while value("t").as_deref() != Some("1") {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "{}",
                metrics.render()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // A reload moves the listener to tunnel u: the old series no longer says down or
        // up, the new one says down.
        let moved = Listener::new(config("l", "u"), registry.clone(), drain.clone(), None);
        running.update(moved);
        assert_eq!(value("t").as_deref(), Some("NaN"));
        assert_eq!(value("u").as_deref(), Some("0"));

        // Removed: NaN, and the accept loop does not set it again.
        running.stop();
        assert_eq!(value("u").as_deref(), Some("NaN"));
        running.publish_tunnel_up();
        tokio::time::sleep(TUNNEL_UP_EVERY + Duration::from_millis(200)).await;
        assert_eq!(value("u").as_deref(), Some("NaN"));
    }

    #[test]
    fn slots_follow_a_changed_limit() {
        let slots = Arc::new(Slots::default());
        let held: Vec<_> = (0..3).map(|_| Slots::take(&slots, 3).unwrap()).collect();
        assert!(Slots::take(&slots, 3).is_none());
        // Limit lowered below what is connected: nobody new until enough have left.
        assert!(Slots::take(&slots, 2).is_none());
        drop(held);
        assert_eq!(slots.in_use(), 0);
        let _a = Slots::take(&slots, 2).unwrap();
        let _b = Slots::take(&slots, 2).unwrap();
        assert!(Slots::take(&slots, 2).is_none());
        assert!(Slots::take(&slots, 5).is_some());
    }
}
