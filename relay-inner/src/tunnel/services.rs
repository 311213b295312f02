//! Serving the streams relay-outer opens: read the Open frame, look the service up in
//! *our own* config, dial its target, answer, splice. relay-outer can never make us
//! dial an address our operator did not list.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use relay_proto::frame::{ErrorCode, Frame};
use routy_ops::drain::Drain;
use routy_ops::metrics as m;
use routy_tunnel::codec::{read_frame, write_frame};
use routy_tunnel::net;
use routy_tunnel::session::Stream;
use routy_tunnel::splice::{splice, ByteCounters};
use routy_tunnel::throttle::{Limit, Throttled};
use tokio::net::TcpStream;
use tracing::{debug, info, warn, Instrument};

use relay_inner::config::Service;

/// Bound on the Open frame arriving on a new stream.
const OPEN_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on writing our answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// The exposed services as configured now; replaced whole on reload.
pub struct ServiceTable {
    /// This relay's node name, for error messages.
    pub node: String,
    /// Exposed services by name.
    pub map: BTreeMap<String, Service>,
    /// Bytes per service.
    pub bytes: BTreeMap<String, Arc<ByteCounters>>,
}

impl ServiceTable {
    /// The table for these services.
    pub fn new(node: &str, map: &BTreeMap<String, Service>) -> Self {
        let bytes = map
            .keys()
            .map(|k| {
                (
                    k.clone(),
                    Arc::new(ByteCounters::registered(&[("service", k.clone())])),
                )
            })
            .collect();
        ServiceTable {
            node: node.to_owned(),
            map: map.clone(),
            bytes,
        }
    }
}

/// What every stream needs.
pub struct Services {
    table: RwLock<Arc<ServiceTable>>,
    /// Each service's `max_bandwidth` toward it and back, kept across reloads (which
    /// change the rate of streams already running).
    bandwidth: std::sync::Mutex<BTreeMap<String, Arc<[Arc<Limit>; 2]>>>,
    /// Shutdown signal and in-flight streams.
    pub drain: Drain,
}

impl Services {
    /// Serves `table` until it is replaced.
    pub fn new(table: ServiceTable, drain: Drain) -> Self {
        let s = Services {
            table: RwLock::new(Arc::new(ServiceTable {
                node: String::new(),
                map: BTreeMap::new(),
                bytes: BTreeMap::new(),
            })),
            bandwidth: Default::default(),
            drain,
        };
        s.replace(table);
        s
    }

    /// The bandwidth limits of `service`.
    fn bandwidth(&self, service: &str) -> Option<Arc<[Arc<Limit>; 2]>> {
        self.bandwidth
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(service)
            .cloned()
    }

    /// The services in force.
    pub fn table(&self) -> Arc<ServiceTable> {
        self.table.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts a new table in force for streams opened from now on; spliced streams go on.
    pub fn replace(&self, table: ServiceTable) {
        {
            let mut limits = self.bandwidth.lock().unwrap_or_else(|p| p.into_inner());
            for (name, svc) in &table.map {
                let l = limits.entry(name.clone()).or_insert_with(|| {
                    let labels = [("service", name.clone())];
                    Arc::new([
                        Arc::new(Limit::registered(0, &labels, "to_service")),
                        Arc::new(Limit::registered(0, &labels, "to_client")),
                    ])
                });
                for d in l.iter() {
                    d.set_rate(svc.max_bandwidth);
                }
            }
        }
        *self.table.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(table);
    }

    /// Answers a stream over the session's limit with an error, without reading it.
    pub async fn refuse_over_limit(mut stream: Stream, limit: usize) {
        failed("?", "over_limit");
        let msg = format!("relay-inner allows {limit} streams per session");
        refuse(&mut stream, ErrorCode::OverLimit, msg).await;
    }

    /// Serves one stream opened by relay-outer, to its end.
    pub async fn serve(self: Arc<Self>, mut stream: Stream, endpoint: Arc<[Arc<Limit>; 2]>) {
        let _guard = self.drain.guard();
        let (service, client) = match read_frame(&mut stream, OPEN_READ_TIMEOUT).await {
            Ok(Frame::Open { service, client }) => (service, client),
            Ok(other) => {
                failed("?", "bad_open");
                let msg = format!("expected Open, got {}", other.kind_name());
                warn!(reason = %msg, "stream refused");
                refuse(&mut stream, ErrorCode::Protocol, msg).await;
                return;
            }
            Err(e) => {
                failed("?", "bad_open");
                warn!(reason = %e, "stream refused: no valid Open frame");
                return;
            }
        };
        let span = tracing::info_span!("stream", %service, %client);
        self.open(stream, service, endpoint).instrument(span).await;
    }

    async fn open(&self, mut stream: Stream, service: String, endpoint: Arc<[Arc<Limit>; 2]>) {
        let started = Instant::now();
        if self.drain.is_stopping() {
            failed(&service, "shutting_down");
            warn!("stream refused: shutting down");
            refuse(
                &mut stream,
                ErrorCode::ShuttingDown,
                "relay-inner is shutting down".into(),
            )
            .await;
            return;
        }
        let table = self.table();
        let (Some(svc), Some(bytes)) = (table.map.get(&service), table.bytes.get(&service)) else {
            // Not the requested name as a label: relay-outer must not grow our metrics.
            failed("?", "unknown_service");
            let msg = format!(
                "relay-inner {:?} exposes no service named {service:?}",
                table.node
            );
            warn!("stream refused: unknown service");
            refuse(&mut stream, ErrorCode::UnknownService, msg).await;
            return;
        };
        let tcp = match tokio::time::timeout(svc.connect_timeout, TcpStream::connect(&svc.target))
            .await
        {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                failed(&service, m::io_reason(&e));
                let msg = format!(
                    "cannot connect to {} for service {service:?}: {e}",
                    svc.target
                );
                warn!(target = %svc.target, error = %e, "stream refused: target unreachable");
                refuse(&mut stream, ErrorCode::ConnectFailed, msg).await;
                return;
            }
            Err(_) => {
                failed(&service, "connect_timeout");
                let msg = format!(
                    "connecting to {} for service {service:?} timed out after {:?}",
                    svc.target, svc.connect_timeout
                );
                warn!(target = %svc.target, "stream refused: connect timed out");
                refuse(&mut stream, ErrorCode::ConnectTimeout, msg).await;
                return;
            }
        };
        net::tune_data_socket(&tcp);
        if let Err(e) = write_frame(&mut stream, &Frame::OpenOk, ANSWER_TIMEOUT).await {
            failed(&service, "stream_lost");
            warn!(error = %e, "stream lost before OpenOk");
            return;
        }
        let labels = [("service", service.clone())];
        metrics::histogram!(m::STREAM_OPEN_LATENCY, &labels)
            .record(started.elapsed().as_secs_f64());
        metrics::counter!(m::STREAMS_OPENED, &labels).increment(1);
        let active = metrics::gauge!(m::STREAMS_ACTIVE, &labels);
        active.increment(1.0);
        debug!(target = %svc.target, "stream open");
        // Toward the service: what is read from the tunnel; toward the client: what is
        // read from the service. Each under the endpoint's limit and the service's.
        let mut up = vec![endpoint[0].clone()];
        let mut down = vec![endpoint[1].clone()];
        if let Some(b) = self.bandwidth(&service) {
            up.push(b[0].clone());
            down.push(b[1].clone());
        }
        let (stream, tcp) = (Throttled::new(stream, up), Throttled::new(tcp, down));
        match splice(stream, tcp, bytes.clone()).await {
            Ok(m) => info!(
                to_service = m.to_service,
                to_client = m.to_client,
                "stream closed"
            ),
            Err(e) => info!(error = %e, "stream ended with an error"),
        }
        active.decrement(1.0);
    }
}

fn failed(service: &str, reason: &'static str) {
    let labels = [
        ("service", service.to_string()),
        ("reason", reason.to_string()),
    ];
    metrics::counter!(m::STREAMS_FAILED, &labels).increment(1);
}

async fn refuse(stream: &mut Stream, code: ErrorCode, message: String) {
    let _ = write_frame(stream, &Frame::Error { code, message }, ANSWER_TIMEOUT).await;
    // The FIN may wait for window credit from a peer that stopped reading.
    let _ = tokio::time::timeout(ANSWER_TIMEOUT, tokio::io::AsyncWriteExt::shutdown(stream)).await;
}
