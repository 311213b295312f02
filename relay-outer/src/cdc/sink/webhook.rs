//! The webhook sink: POSTs whole source transactions as JSON to an HTTP endpoint,
//! at least once.
//!
//! Body: `{"sink", "source", "first", "last", "events": [...]}`; `events` holds whole
//! transactions (`begin` … `commit`, transactions the filters left empty are left out)
//! and initial-copy rows, each event in the shape `relay-outer cdc tail` prints plus its
//! `id`: its position (`SEQ.INDEX`), stable across restarts and re-deliveries, so a
//! receiver drops an event whose id it has seen (or, simpler, any event whose id is not
//! greater than the last it stored, since ids only grow).
//!
//! Headers: `Routy-Sink`, `Routy-Source`, `Routy-First-Position`, `Routy-Last-Position`
//! (the first and last event ids), `Idempotency-Key` (`SOURCE/FIRST-LAST`), the configured
//! `headers` and authorization, and with `hmac_secret_file` a signature:
//! `Routy-Signature: t=UNIX_SECONDS,v1=HEX` where `HEX` is HMAC-SHA256 with the secret
//! over `UNIX_SECONDS` + `.` + the body bytes (also sent as `Routy-Timestamp`).
//!
//! Answers: 2xx delivered; 408, 429, 5xx and connection errors are retried with backoff,
//! honouring `Retry-After` (seconds or an HTTP date); any other status means the target
//! refuses this batch: the sink stops with that error (nothing is skipped), or with
//! `on_rejected: dead_letter` the batch goes to `cdc.dir/_dead-letter/SINK.jsonl` (one line
//! per batch: time, status, the answer's start, the body) and the sink moves on.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use relay_proto::cdc::{event_json, Event, Relations};

use super::{BatchInfo, BatchLimits, Durability, Flow, Position, Sink, SinkError, Split};

/// Counter: batches the target refused that went to the dead-letter file, by `sink` and
/// `kind`.
pub const DEAD_LETTERS: &str = "routy_cdc_sink_dead_letter_batches_total";

/// Default events per request at most.
pub const DEFAULT_MAX_EVENTS: usize = 1000;
/// Default body bytes per request (a single transaction larger than this goes alone).
pub const DEFAULT_MAX_BYTES: usize = 1 << 20;
/// Default time a batch waits for more changes once the store is read to its end.
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_millis(50);
/// Default bound on one request, connect to the end of the answer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// Bytes of a refusal's answer kept for the error and the dead-letter file.
const ANSWER_SNIPPET: usize = 512;

/// How the sink authenticates to the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// `Authorization: Bearer <file contents>`.
    Bearer(PathBuf),
    /// `Authorization: Basic`, the password read from a file.
    Basic {
        /// User name.
        user: String,
        /// File holding the password.
        password_file: PathBuf,
    },
}

/// What to do with a batch the target refuses (a 4xx other than 408 and 429).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRejected {
    /// Stop the sink with the error (the default: nothing is skipped silently).
    Stop,
    /// Write the batch to the dead-letter file, count it, and go on.
    DeadLetter,
}

/// One webhook sink, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    /// Sink name.
    pub name: String,
    /// `tunnel/source`.
    pub source: String,
    /// `http://` or `https://` endpoint.
    pub url: String,
    /// Extra request headers.
    pub headers: Vec<(String, String)>,
    /// Authorization.
    pub auth: Option<Auth>,
    /// File holding the HMAC-SHA256 secret.
    pub hmac_secret_file: Option<PathBuf>,
    /// CA certificate(s) to trust instead of the system's roots.
    pub ca: Option<PathBuf>,
    /// Bound on one request.
    pub timeout: Duration,
    /// Events per request at most.
    pub max_events: usize,
    /// Body bytes per request at most (whole transactions: one larger goes alone).
    pub max_bytes: usize,
    /// Time a batch waits for more changes.
    pub max_delay: Duration,
    /// Refused batches.
    pub on_rejected: OnRejected,
    /// Where dead letters go: `cdc.dir/_dead-letter`.
    pub dead_letter_dir: PathBuf,
}

/// Secrets and the client, set up on connect.
struct Ready {
    client: reqwest::Client,
    authorization: Option<String>,
    hmac: Option<ring::hmac::Key>,
}

/// Where the open transaction starts in the batch.
struct OpenTxn {
    bytes: usize,
    count: usize,
    last: Option<Position>,
    /// Its changes so far.
    changes: usize,
}

/// The webhook sink.
pub struct WebhookSink {
    cfg: WebhookConfig,
    ready: Option<Ready>,
    /// The events of the open batch, JSON objects separated by commas.
    events: Vec<u8>,
    /// Events in `events`.
    count: usize,
    /// The open transaction (to drop it when the filters left it empty).
    txn: Option<OpenTxn>,
    /// Position of the last `Begin` seen: seen again, it starts the next part of a
    /// transaction split over batches (kept across batches).
    begun: Option<Position>,
    first: Option<Position>,
    last: Option<Position>,
}

impl std::fmt::Debug for WebhookSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSink")
            .field("name", &self.cfg.name)
            .field("url", &self.cfg.url)
            .finish()
    }
}

impl WebhookSink {
    /// A sink that sets up on the runner's first session.
    pub fn new(cfg: WebhookConfig) -> WebhookSink {
        WebhookSink {
            cfg,
            ready: None,
            events: Vec::new(),
            count: 0,
            txn: None,
            begun: None,
            first: None,
            last: None,
        }
    }

    fn clear(&mut self) {
        self.events.clear();
        self.count = 0;
        self.txn = None;
        self.first = None;
        self.last = None;
        if self.events.capacity() > 4 * self.cfg.max_bytes.min(64 << 20) {
            self.events = Vec::new();
        }
    }

    fn setup(&self) -> Result<Ready, SinkError> {
        let client = http_client(self.cfg.ca.as_deref(), self.cfg.timeout, "webhook")
            .map_err(|e| SinkError::new("config", 0, e))?;
        let authorization = match &self.cfg.auth {
            None => None,
            Some(Auth::Bearer(f)) => Some(format!("Bearer {}", read_secret(f)?)),
            Some(Auth::Basic {
                user,
                password_file,
            }) => {
                let pw = read_secret(password_file)?;
                Some(routy_ops::http::basic_auth(user, &pw))
            }
        };
        let hmac = match &self.cfg.hmac_secret_file {
            None => None,
            Some(f) => Some(ring::hmac::Key::new(
                ring::hmac::HMAC_SHA256,
                read_secret(f)?.as_bytes(),
            )),
        };
        Ok(Ready {
            client,
            authorization,
            hmac,
        })
    }

    fn body(&self) -> bytes::Bytes {
        let first = self.first.map(|p| p.to_string()).unwrap_or_default();
        let last = self.last.map(|p| p.to_string()).unwrap_or_default();
        let head = serde_json::json!({
            "sink": self.cfg.name,
            "source": self.cfg.source,
            "first": first,
            "last": last,
        })
        .to_string();
        let mut body = Vec::with_capacity(head.len() + self.events.len() + 16);
        // `{"sink":...,"last":"..."` + `,"events":[` + events + `]}`.
        body.extend_from_slice(&head.as_bytes()[..head.len() - 1]);
        body.extend_from_slice(b",\"events\":[");
        body.extend_from_slice(&self.events);
        body.extend_from_slice(b"]}");
        body.into()
    }

    async fn post(&self, seq: u64, body: &bytes::Bytes) -> Result<(), Post> {
        let ready = self.ready.as_ref().ok_or_else(|| {
            Post::Retry(
                SinkError::new("connection", seq, "webhook not set up"),
                None,
            )
        })?;
        let first = self.first.map(|p| p.to_string()).unwrap_or_default();
        let last = self.last.map(|p| p.to_string()).unwrap_or_default();
        let mut req = ready
            .client
            .post(&self.cfg.url)
            .header("content-type", "application/json")
            .header("routy-sink", &self.cfg.name)
            .header("routy-source", &self.cfg.source)
            .header("routy-first-position", &first)
            .header("routy-last-position", &last)
            .header(
                "idempotency-key",
                format!("{}/{first}-{last}", self.cfg.source),
            );
        for (k, v) in &self.cfg.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        if let Some(a) = &ready.authorization {
            req = req.header("authorization", a.as_str());
        }
        if let Some(key) = &ready.hmac {
            let t = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            req = req
                .header("routy-timestamp", t.to_string())
                .header("routy-signature", signature(key, t, body));
        }
        let resp = req.body(body.clone()).send().await.map_err(|e| {
            let what = if e.is_timeout() {
                format!("no answer within {:?}", self.cfg.timeout)
            } else {
                routy_pg::tls::error_chain(&e)
            };
            Post::Retry(
                SinkError::new("connection", seq, format!("POST {}: {what}", self.cfg.url)),
                None,
            )
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let code = status.as_u16();
        let answer = match tokio::time::timeout(self.cfg.timeout, resp.bytes()).await {
            Ok(Ok(b)) => snippet(&b),
            _ => String::new(),
        };
        let msg = format!("POST {}: HTTP {code}: {answer}", self.cfg.url);
        if code == 408 || code == 429 || status.is_server_error() {
            let reason = if code == 429 {
                "throttled"
            } else {
                "http_status"
            };
            return Err(Post::Retry(SinkError::new(reason, seq, msg), retry_after));
        }
        Err(Post::Rejected {
            code,
            answer,
            err: SinkError {
                rejected: true,
                ..SinkError::new("rejected", seq, msg)
            },
        })
    }

    /// Appends the refused batch to the dead-letter file (fsynced).
    fn dead_letter(&self, code: u16, answer: &str, body: &[u8]) -> Result<PathBuf, String> {
        let dir = &self.cfg.dead_letter_dir;
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let path = dir.join(format!("{}.jsonl", self.cfg.name));
        let body: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let line = serde_json::json!({
            "at": time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            "status": code,
            "answer": answer,
            "batch": body,
        });
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("opening {}: {e}", path.display()))?;
        let mut text = line.to_string();
        text.push('\n');
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_data())
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        Ok(path)
    }
}

/// How a POST went wrong.
enum Post {
    /// Worth retrying, after at least this long if the target said so.
    Retry(SinkError, Option<Duration>),
    /// The target refuses this batch.
    Rejected {
        code: u16,
        answer: String,
        err: SinkError,
    },
}

impl Sink for WebhookSink {
    fn kind(&self) -> &'static str {
        "webhook"
    }

    fn durability(&self) -> Durability {
        Durability::AtLeastOnce
    }

    fn limits(&self) -> BatchLimits {
        BatchLimits {
            max_records: usize::MAX,
            max_events: self.cfg.max_events,
            max_bytes: self.cfg.max_bytes,
            max_delay: self.cfg.max_delay,
            split: Split::FromBegin,
        }
    }

    async fn connect(&mut self) -> Result<Option<Position>, Flow> {
        // Secrets are read on every session, so a rotated token is picked up after the
        // target refused the old one.
        self.ready = Some(self.setup()?);
        Ok(None)
    }

    async fn begin(&mut self, _from: Position) -> Result<(), Flow> {
        self.clear();
        Ok(())
    }

    async fn write(&mut self, at: Position, ev: Event, rels: &Relations) -> Result<(), Flow> {
        match &ev {
            // Tables are named in each event; relations are left out.
            Event::Relation(_) => return Ok(()),
            Event::Begin { .. } => {
                // The part of a split transaction is kept even without changes of its
                // own: it carries the commit.
                let continues = self.begun == Some(at);
                self.begun = Some(at);
                self.txn = Some(OpenTxn {
                    bytes: self.events.len(),
                    count: self.count,
                    last: self.last,
                    changes: usize::from(continues),
                })
            }
            Event::Commit { .. } => {
                if let Some(t) = self.txn.take().filter(|t| t.changes == 0) {
                    // The filters left nothing of this transaction.
                    self.events.truncate(t.bytes);
                    self.count = t.count;
                    self.last = t.last;
                    if self.count == 0 {
                        self.first = None;
                    }
                    return Ok(());
                }
            }
            _ => {
                if let Some(t) = self.txn.as_mut() {
                    t.changes += 1;
                }
            }
        }
        let mut v = event_json(at.seq, &ev, rels);
        v["id"] = at.to_string().into();
        if self.count > 0 {
            self.events.push(b',');
        }
        serde_json::to_writer(&mut self.events, &v).expect("JSON into a Vec");
        self.count += 1;
        if self.first.is_none() {
            self.first = Some(at);
        }
        self.last = Some(at);
        Ok(())
    }

    fn pending_bytes(&self) -> usize {
        self.events.len()
    }

    async fn commit(&mut self, batch: &BatchInfo) -> Result<(), Flow> {
        if self.count == 0 {
            self.clear();
            return Ok(());
        }
        let seq = self.first.map_or(batch.first.seq, |p| p.seq);
        let body = self.body();
        match self.post(seq, &body).await {
            Ok(()) => {}
            Err(Post::Retry(e, after)) => {
                return Err(Flow::Fail(SinkError {
                    retry_after: after,
                    ..e
                }))
            }
            Err(Post::Rejected { code, answer, err }) => {
                if self.cfg.on_rejected == OnRejected::Stop {
                    return Err(err.into());
                }
                let path = self
                    .dead_letter(code, &answer, &body)
                    .map_err(|e| SinkError::new("dead_letter", seq, e))?;
                tracing::warn!(sink = %self.cfg.name, first = ?self.first.map(|p| p.to_string()),
                    last = ?self.last.map(|p| p.to_string()), status = code, file = %path.display(),
                    "the target refused a batch; written to the dead-letter file: {}", err.msg);
                metrics::counter!(DEAD_LETTERS, "sink" => self.cfg.name.clone(), "kind" => "webhook")
                    .increment(1);
            }
        }
        self.clear();
        Ok(())
    }

    async fn abort(&mut self) {
        self.clear();
    }

    async fn fail(&mut self, e: SinkError) -> SinkError {
        self.clear();
        if e.reason == "config" {
            self.ready = None;
        }
        e
    }
}

/// `t=T,v1=HEX`: HMAC-SHA256 over `T.body`.
pub fn signature(key: &ring::hmac::Key, t: u64, body: &[u8]) -> String {
    let mut ctx = ring::hmac::Context::with_key(key);
    ctx.update(t.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let tag = ctx.sign();
    let mut hex = String::with_capacity(64);
    for b in tag.as_ref() {
        hex.push_str(&format!("{b:02x}"));
    }
    format!("t={t},v1={hex}")
}

/// A secret file's contents without the trailing newline; it must not be empty.
pub(crate) fn read_secret(path: &std::path::Path) -> Result<String, SinkError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| SinkError::new("config", 0, format!("reading {}: {e}", path.display())))?;
    let text = text.trim_end_matches(['\n', '\r']).to_string();
    if text.is_empty() {
        return Err(SinkError::new(
            "config",
            0,
            format!("{} is empty", path.display()),
        ));
    }
    Ok(text)
}

/// An HTTP client for a sink: our rustls configuration (`ca`, or the system's roots),
/// `timeout` on each request, no redirects, no proxy from the environment.
pub(crate) fn http_client(
    ca: Option<&std::path::Path>,
    timeout: Duration,
    what: &str,
) -> Result<reqwest::Client, String> {
    let tls = client_tls(ca)?;
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("routy/", env!("CARGO_PKG_VERSION")))
        .pool_idle_timeout(Duration::from_secs(30))
        .no_proxy()
        .build()
        .map_err(|e| format!("{what} client: {}", routy_pg::tls::error_chain(&e)))
}

/// The TLS client configuration: the given CA file, or the system's roots.
pub(crate) fn client_tls(ca: Option<&std::path::Path>) -> Result<rustls::ClientConfig, String> {
    client_tls_auth(ca, None)
}

/// [`client_tls`] presenting a client certificate (`cert`, `key` files) when given.
pub(crate) fn client_tls_auth(
    ca: Option<&std::path::Path>,
    client: Option<(&std::path::Path, &std::path::Path)>,
) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            for c in routy_tunnel::tls::load_certs(path).map_err(|e| format!("ca: {e}"))? {
                roots.add(c).map_err(|e| {
                    format!("ca {}: not a usable CA certificate: {e}", path.display())
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                // A system store may hold a certificate rustls cannot use; skip it.
                let _ = roots.add(c);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS configuration: {e}"))?
        .with_root_certificates(roots);
    match client {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let certs = routy_tunnel::tls::load_certs(cert).map_err(|e| format!("cert: {e}"))?;
            let key = routy_tunnel::tls::load_key(key).map_err(|e| format!("key: {e}"))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| format!("client certificate and key: {e}"))
        }
    }
}

/// `Retry-After`: delay-seconds or an HTTP date, capped.
fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    let d = if let Ok(secs) = v.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let fmt = time::format_description::well_known::Rfc2822;
        let at = time::OffsetDateTime::parse(v, &fmt).ok()?;
        let secs = (at - time::OffsetDateTime::now_utc())
            .whole_seconds()
            .max(0);
        Duration::from_secs(secs as u64)
    };
    Some(d.min(MAX_RETRY_AFTER))
}

fn snippet(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(ANSWER_SNIPPET)]);
    s.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_and_signature_match_known_values() {
        assert_eq!(
            routy_ops::http::basic_auth("user", "pass"),
            "Basic dXNlcjpwYXNz"
        );
        // HMAC-SHA256("key", "The quick brown fox jumps over the lazy dog"), RFC 4231
        // style check with a known digest.
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"key");
        let tag = ring::hmac::sign(&key, b"The quick brown fox jumps over the lazy dog");
        let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
        let s = signature(&key, 17, b"{}");
        let expect = ring::hmac::sign(&key, b"17.{}");
        let hex: String = expect.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(s, format!("t=17,v1={hex}"));
    }

    #[tokio::test]
    async fn the_last_part_of_a_split_transaction_keeps_its_commit() {
        let mut sink = WebhookSink::new(WebhookConfig {
            name: "h".into(),
            source: "t/s".into(),
            url: "http://127.0.0.1:9/".into(),
            headers: Vec::new(),
            auth: None,
            hmac_secret_file: None,
            ca: None,
            timeout: Duration::from_secs(1),
            max_events: 2,
            max_bytes: 1 << 20,
            max_delay: Duration::ZERO,
            on_rejected: OnRejected::Stop,
            dead_letter_dir: PathBuf::from("/nonexistent"),
        });
        let rels = Relations::default();
        let begin = Event::Begin {
            xid: 7,
            commit_lsn: 700,
            commit_time: 0,
        };
        let commit = Event::Commit {
            commit_lsn: 700,
            end_lsn: 708,
            commit_time: 0,
        };
        let at = |seq, idx| Position::new(seq, idx);
        // A transaction the filters left empty is left out.
        sink.begin(at(1, 0)).await.unwrap();
        sink.write(at(1, 0), begin.clone(), &rels).await.unwrap();
        sink.write(at(1, 1), commit.clone(), &rels).await.unwrap();
        assert_eq!(sink.count, 0);
        // The part of a split transaction with only its commit (the runner gives the
        // Begin again) is not.
        sink.begin(at(2, 0)).await.unwrap();
        sink.write(at(2, 0), begin.clone(), &rels).await.unwrap();
        sink.clear();
        sink.write(at(2, 0), begin, &rels).await.unwrap();
        sink.write(at(3, 0), commit, &rels).await.unwrap();
        assert_eq!(sink.count, 2);
        let body = String::from_utf8(sink.events.clone()).unwrap();
        assert!(body.contains("\"id\":\"3.0\""), "{body}");
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("999999"), Some(MAX_RETRY_AFTER));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
