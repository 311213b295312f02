//! The consumer endpoint (`cdc.consumers`): a source's change log over HTTP, as
//! Server-Sent Events (`/v1/sources/{tunnel}/{source}/events`) or in pages
//! (`/v1/sources/{tunnel}/{source}/changes`).
//!
//! Every request needs `Authorization: Bearer <token>`; a token reads only its sources
//! (401 without a token or with a wrong one, 403 for a source it may not read, 404 for a
//! source relay-outer has no store of). Tokens are read from their files at start and on
//! every reload (SIGHUP).
//!
//! Each consumer reads the store on its own, so no consumer slows the store, a sink or
//! another consumer: a Server-Sent Events consumer is fed at the pace it reads; one that
//! stops reading (its [`SSE_BUFFER`] events stay unread for [`STALL`]) is dropped, and
//! resumes by `Last-Event-ID`. Consumers do not
//! hold retention back: a position retention removed is answered 410 with the oldest
//! position held.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use routy_ops::drain::Drain;
use routy_ops::http::{json, text};
use serde_json::json;
use tokio::sync::mpsc;

use super::changes::{Change, ChangeStream};
use super::sink::{Filter, Position};
use super::Cdc;
use crate::config::{ConsumersConfig, TokenSpec};

/// Gauge: Server-Sent Events consumers connected, by `source`.
pub const CONNECTED: &str = "routy_cdc_consumers_connected";
/// Counter: events sent to consumers (both APIs), by `source` and `token`.
pub const EVENTS: &str = "routy_cdc_consumer_events_total";
/// Counter: requests refused, by `reason` (`unauthorized`, `forbidden`, `not_found`,
/// `gone`, `bad_request`).
pub const REFUSED: &str = "routy_cdc_consumer_refused_total";
/// Counter: Server-Sent Events consumers dropped, by `source` and `reason` (`slow`: its
/// buffer was full; `store`: the store could not be read at its position).
pub const DROPPED: &str = "routy_cdc_consumers_dropped_total";

/// Every consumer metric with its help text.
pub const METRICS: &[(&str, &str)] = &[
    (CONNECTED, "Server-Sent Events consumers connected."),
    (EVENTS, "Events sent to consumers, by token."),
    (REFUSED, "Consumer requests refused, by reason."),
    (
        DROPPED,
        "Server-Sent Events consumers dropped, by reason (slow: buffer full).",
    ),
];

/// Events queued for one Server-Sent Events consumer at most.
pub const SSE_BUFFER: usize = 4096;
/// A consumer whose queue stays full this long has stopped reading and is dropped.
pub const STALL: Duration = Duration::from_secs(10);
/// A comment line this often keeps idle streams open through proxies.
pub const HEARTBEAT: Duration = Duration::from_secs(15);
/// Events per `/changes` page by default, and at most.
pub const PAGE_DEFAULT: usize = 1000;
/// See [`PAGE_DEFAULT`].
pub const PAGE_MAX: usize = 10_000;
/// Events read per trip for a stream.
const STREAM_BATCH: usize = 512;

/// One token as loaded: its secret and what it may read.
#[derive(Debug, Clone)]
struct Token {
    name: String,
    /// SHA-256 of the token: requests are compared by digest, so the comparison's time
    /// tells nothing about the token.
    digest: Vec<u8>,
    sources: Vec<String>,
}

impl Token {
    fn may_read(&self, source: &str) -> bool {
        self.sources.iter().any(|s| s == "*" || s == source)
    }
}

/// The consumer endpoint's shared state.
pub struct Consumers {
    cdc: Arc<Cdc>,
    tokens: Mutex<Vec<Token>>,
    stop: Drain,
}

impl std::fmt::Debug for Consumers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumers").finish()
    }
}

/// Reads every token file (for `check-config`): how many tokens there are; the error
/// names the token and the file.
pub fn load_tokens(specs: &[TokenSpec]) -> Result<usize, String> {
    read_tokens(specs).map(|t| t.len())
}

fn read_tokens(specs: &[TokenSpec]) -> Result<Vec<Token>, String> {
    let mut out = Vec::new();
    for s in specs {
        let text = std::fs::read_to_string(&s.token_file).map_err(|e| {
            format!(
                "cdc.consumers.tokens ({}): reading {}: {e}",
                s.name,
                s.token_file.display()
            )
        })?;
        let secret = text.trim().as_bytes();
        if secret.len() < 16 {
            return Err(format!(
                "cdc.consumers.tokens ({}): the token in {} is shorter than 16 characters",
                s.name,
                s.token_file.display()
            ));
        }
        out.push(Token {
            name: s.name.clone(),
            digest: sha256(secret),
            sources: s.sources.clone(),
        });
    }
    Ok(out)
}

impl Consumers {
    /// Binds `cfg.listen` and serves consumers until `stop`.
    pub async fn start(
        cdc: Arc<Cdc>,
        cfg: &ConsumersConfig,
        stop: Drain,
    ) -> anyhow::Result<Arc<Consumers>> {
        let tokens = read_tokens(&cfg.tokens).map_err(anyhow::Error::msg)?;
        let tls = match &cfg.tls {
            None => None,
            Some((cert, key)) => {
                let sc = routy_tunnel::tls::https_server_config(cert, key, None)
                    .map_err(|e| anyhow::anyhow!("cdc.consumers.tls: {e}"))?;
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(sc)))
            }
        };
        let sock = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| {
                anyhow::anyhow!("cdc.consumers.listen: cannot bind {}: {e}", cfg.listen)
            })?;
        let addr = sock.local_addr().unwrap_or(cfg.listen);
        let me = Arc::new(Consumers {
            cdc,
            tokens: Mutex::new(tokens),
            stop: stop.clone(),
        });
        let app = Router::new()
            .route("/v1/sources/{tunnel}/{source}/events", get(events))
            .route("/v1/sources/{tunnel}/{source}/changes", get(changes))
            .fallback(|| async {
                text(
                    StatusCode::NOT_FOUND,
                    "not found: /v1/sources/{tunnel}/{source}/events or /changes\n",
                )
            })
            .with_state(me.clone());
        let limits = routy_ops::http::Limits {
            endpoint: "consumers",
            max_connections: 1024,
            max_per_client: 256,
            ..routy_ops::http::Limits::default()
        };
        tracing::info!(listen = %addr, tls = tls.is_some(), tokens = me.token_names().len(),
            "consumer endpoint ready (/v1/sources/TUNNEL/SOURCE/events, /changes)");
        tokio::spawn(routy_ops::http::serve_tls(sock, app, stop, limits, tls));
        Ok(me)
    }

    /// Reads the token files again (a reload); keeps the old tokens on an error.
    pub fn reload_tokens(&self, specs: &[TokenSpec]) -> Result<usize, String> {
        let t = read_tokens(specs)?;
        let n = t.len();
        *self.tokens.lock().unwrap_or_else(|p| p.into_inner()) = t;
        Ok(n)
    }

    fn token_names(&self) -> Vec<String> {
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|t| t.name.clone())
            .collect()
    }

    /// The token a request carries, checked against `source`.
    fn authorize(&self, headers: &HeaderMap, source: &str) -> Result<String, Refusal> {
        let given = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let Some(given) = given else {
            return Err(refuse(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "an Authorization: Bearer <token> header is required",
            ));
        };
        let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        let digest = sha256(given.as_bytes());
        let found = tokens.iter().find(|t| t.digest == digest);
        let Some(t) = found else {
            return Err(refuse(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "the token is not valid",
            ));
        };
        if !t.may_read(source) {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "forbidden",
                &format!("token {} may not read source {source}", t.name),
            ));
        }
        Ok(t.name.clone())
    }
}

fn sha256(b: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, b)
        .as_ref()
        .to_vec()
}

/// A refused request: its status, `reason` label and message.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    reason: &'static str,
    msg: String,
    /// For a 410: the oldest position held.
    oldest: Option<String>,
}

fn refuse(status: StatusCode, reason: &'static str, msg: &str) -> Refusal {
    Refusal {
        status,
        reason,
        msg: msg.to_string(),
        oldest: None,
    }
}

impl axum::response::IntoResponse for Refusal {
    fn into_response(self) -> Response {
        metrics::counter!(REFUSED, "reason" => self.reason).increment(1);
        let mut r = json(self.status, &json!({ "error": self.msg }));
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        if let Some(v) = self
            .oldest
            .and_then(|o| axum::http::HeaderValue::from_str(&o).ok())
        {
            r.headers_mut().insert("routy-oldest-position", v);
        }
        r
    }
}

/// The source of a request, authorized, with its store open.
fn open_source(
    c: &Consumers,
    headers: &HeaderMap,
    tunnel: &str,
    source: &str,
) -> Result<(String, String, Arc<super::Source>), Refusal> {
    let full = format!("{tunnel}/{source}");
    let token = c.authorize(headers, &full)?;
    match c.cdc.get(&full) {
        Some(s) => Ok((full, token, s)),
        None => Err(refuse(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no change log of source {full} here"),
        )),
    }
}

/// `tables=a.b,c.d` and `ops=insert,update` from the query.
fn filter_from(q: &HashMap<String, String>) -> Result<Filter, Refusal> {
    let mut f = Filter::default();
    if let Some(t) = q.get("tables").filter(|t| !t.is_empty()) {
        f.tables = Some(t.split(',').map(|s| s.trim().to_string()).collect());
    }
    if let Some(o) = q.get("ops").filter(|o| !o.is_empty()) {
        let list: Vec<String> = o.split(',').map(|s| s.trim().to_string()).collect();
        f.ops =
            Some(Filter::parse_ops(&list).map_err(|e| {
                refuse(StatusCode::BAD_REQUEST, "bad_request", &format!("ops: {e}"))
            })?);
    }
    Ok(f)
}

fn parse_pos(what: &str, v: &str) -> Result<Position, Refusal> {
    v.parse().map_err(|e| {
        refuse(
            StatusCode::BAD_REQUEST,
            "bad_request",
            &format!("{what}: {e}"),
        )
    })
}

/// 410 when `seq` is older than what the store holds.
fn check_held(store: &super::store::Store, at: Position) -> Result<(), Refusal> {
    let first = store.first_seq();
    if at.seq != 0 && at.seq < first {
        let mut r = refuse(
            StatusCode::GONE,
            "gone",
            &format!(
                "position {at} was removed by retention; the oldest position held is {first}.0"
            ),
        );
        r.oldest = Some(format!("{first}.0"));
        return Err(r);
    }
    Ok(())
}

/// `GET /v1/sources/{tunnel}/{source}/changes?after=POSITION&limit=N`: a JSON page.
async fn changes(
    State(c): State<Arc<Consumers>>,
    Path((tunnel, source)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    let (full, token, src) = open_source(&c, &headers, &tunnel, &source)?;
    let filter = filter_from(&q)?;
    let limit = match q.get("limit").map(|l| l.parse::<usize>()) {
        None => PAGE_DEFAULT,
        Some(Ok(n)) if (1..=PAGE_MAX).contains(&n) => n,
        _ => {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!("limit: 1 to {PAGE_MAX}"),
            ))
        }
    };
    let after = q.get("after").map(|a| parse_pos("after", a)).transpose()?;
    let start = after.map_or(Position::START, |p| {
        Position::new(p.seq, p.idx.saturating_add(1))
    });
    check_held(&src.store, after.unwrap_or(Position::START))?;
    let mut stream = ChangeStream::new(src.store.clone(), start, filter);
    let page = match stream.next_batch(limit).await {
        Ok(p) => p,
        Err(e) => {
            // Retention may have removed the records between the check and the read.
            check_held(&src.store, start)?;
            return Ok(json(
                StatusCode::INTERNAL_SERVER_ERROR,
                &json!({ "error": e.msg }),
            ));
        }
    };
    let next = page
        .last()
        .map(|c| c.at.to_string())
        .or_else(|| after.map(|p| p.to_string()));
    metrics::counter!(EVENTS, "source" => full.clone(), "token" => token)
        .increment(page.len() as u64);
    let mut body = String::with_capacity(64 + page.iter().map(|c| c.json.len() + 1).sum::<usize>());
    body.push_str("{\"source\":");
    body.push_str(&serde_json::Value::from(full).to_string());
    body.push_str(",\"events\":[");
    for (i, ch) in page.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&ch.json);
    }
    body.push_str("],\"next\":");
    body.push_str(&serde_json::to_string(&next).unwrap_or_else(|_| "null".into()));
    body.push_str(&format!(
        ",\"oldest\":\"{}.0\",\"last_seq\":{}}}",
        src.store.first_seq(),
        src.store.synced_seq()
    ));
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(axum::http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "response")))
}

/// `GET /v1/sources/{tunnel}/{source}/events`: Server-Sent Events, `id:` = position.
async fn events(
    State(c): State<Arc<Consumers>>,
    Path((tunnel, source)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    let (full, token, src) = open_source(&c, &headers, &tunnel, &source)?;
    let filter = filter_from(&q)?;
    let last_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.trim().is_empty());
    let start = if let Some(id) = last_id {
        let p = parse_pos("Last-Event-ID", id)?;
        check_held(&src.store, p)?;
        Position::new(p.seq, p.idx.saturating_add(1))
    } else if let Some(f) = q.get("from") {
        let p = parse_pos("from", f)?;
        check_held(&src.store, p)?;
        p
    } else if let Some(s) = q.get("since") {
        let Some(t) = relay_proto::cdc::parse_time(s) else {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!("since: {s:?} is not a time like 2026-11-22T07:00:00Z"),
            ));
        };
        let store = src.store.clone();
        match tokio::task::spawn_blocking(move || super::manage::position_since(&store, t)).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                return Ok(json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &json!({ "error": e }),
                ))
            }
            Err(e) => {
                return Ok(json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &json!({ "error": e.to_string() }),
                ))
            }
        }
    } else {
        // The live end: what arrives from now on.
        Position::after_record(src.store.synced_seq())
    };
    let (tx, rx) = mpsc::channel::<bytes::Bytes>(SSE_BUFFER);
    let stream = ChangeStream::new(src.store.clone(), start, filter);
    tokio::spawn(feed(stream, tx, full, token, c.stop.clone()));
    let body = Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    }));
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(axum::http::header::CONTENT_TYPE, "text/event-stream")
        .header(axum::http::header::CACHE_CONTROL, "no-store")
        .header("x-accel-buffering", "no")
        .body(body)
        .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "response")))
}

/// Reads the store for one SSE consumer and queues its events at the pace it reads;
/// drops the consumer when its queue stays full for [`STALL`].
async fn feed(
    mut stream: ChangeStream,
    tx: mpsc::Sender<bytes::Bytes>,
    source: String,
    token: String,
    stop: Drain,
) {
    let gauge = metrics::gauge!(CONNECTED, "source" => source.clone());
    gauge.increment(1.0);
    let sent = metrics::counter!(EVENTS, "source" => source.clone(), "token" => token.clone());
    // Tell the client how long to wait before reconnecting.
    let _ = tx.try_send(bytes::Bytes::from_static(b"retry: 2000\n\n"));
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.tick().await;
    let why = loop {
        if tx.is_closed() {
            break None;
        }
        let batch: Vec<Change> = match stream.next_batch(STREAM_BATCH).await {
            Ok(b) => b,
            Err(e) => {
                let _ = tx.try_send(bytes::Bytes::from(format!(
                    ": error: {}\n\n",
                    e.msg.replace('\n', " ")
                )));
                break Some("store");
            }
        };
        if batch.is_empty() {
            tokio::select! {
                _ = stream.changed() => {}
                _ = heartbeat.tick() => {
                    // A full queue needs no heartbeat: the consumer has data to read.
                    let _ = tx.try_send(bytes::Bytes::from_static(b": heartbeat\n\n"));
                }
                _ = tx.closed() => break None,
                _ = stop.stopping() => break None,
            }
            continue;
        }
        let mut stalled = false;
        for ch in batch {
            let mut s = String::with_capacity(ch.json.len() + 32);
            s.push_str("id: ");
            s.push_str(&ch.at.to_string());
            s.push_str("\ndata: ");
            s.push_str(&ch.json);
            s.push_str("\n\n");
            let send = tx.send(bytes::Bytes::from(s));
            tokio::select! {
                r = tokio::time::timeout(STALL, send) => match r {
                    Ok(Ok(())) => sent.increment(1),
                    Ok(Err(_)) => break, // the consumer left
                    Err(_) => {
                        stalled = true;
                        break;
                    }
                },
                _ = stop.stopping() => break,
            }
        }
        if stalled {
            break Some("slow");
        }
        if stop.is_stopping() {
            break None;
        }
        heartbeat.reset();
    };
    if let Some(reason) = why {
        tracing::info!(source = %source, token = %token, reason,
            "consumer dropped (it can resume with Last-Event-ID)");
        metrics::counter!(DROPPED, "source" => source, "reason" => reason).increment(1);
    }
    gauge.decrement(1.0);
}
