//! The NATS JetStream sink: every change (or every transaction) as a JSON message on a
//! JetStream subject, with a `Nats-Msg-Id` from its position so the stream drops what it
//! already has.
//!
//! Subjects: `<subject_prefix>.<schema>.<table>` for a change (a character a subject
//! token cannot hold, space, `.`, `*`, `>`, becomes `_`); with `message: transaction`,
//! `<subject_prefix>.transactions` for a whole transaction. Bodies: the event in
//! `relay-outer cdc tail`'s shape with its `id` (the position, `SEQ.INDEX`), and the
//! transaction's `commit_lsn` and `commit_time`; a transaction message is
//! `{"id", "source", "xid", "commit_lsn", "commit_time", "events": [...]}`. Headers:
//! `Nats-Msg-Id: <source>/<id>` (a TRUNCATE of several tables sends one message per
//! table, the later ones with `/<n>` appended) and `Routy-Op`.
//!
//! Publishes are pipelined (up to [`MAX_ACK_INFLIGHT`] unacknowledged); the sink's
//! position advances once every message of a batch was acknowledged by the stream.
//! After a crash the messages of the last batch are sent again with the same ids; the
//! stream's duplicate window (two minutes unless the stream says otherwise; ten in a
//! stream this sink creates) drops them, and the ack says `duplicate` (counted in
//! `routy_cdc_sink_duplicates_total`). Past the window a consumer still recognises a
//! repeat by its `id`.
//!
//! The stream `stream` is created when missing (`create_stream`, the default): subjects
//! `<subject_prefix>.>`, file storage, duplicate window ten minutes, limits retention
//! without limits, one replica. An existing stream must take `<subject_prefix>.>`.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use relay_proto::cdc::{Event, Relations};

use super::{BatchInfo, BatchLimits, Durability, Flow, Position, Sink, SinkError, Split};

/// Counter: changes the target reported it already had (a re-send it dropped), by `sink`
/// and `kind`.
pub const DUPLICATES: &str = "routy_cdc_sink_duplicates_total";

/// Default messages per batch (the position is written once per batch).
pub const DEFAULT_MAX_MESSAGES: usize = 10_000;
/// Default time a batch waits for more changes once the store is read to its end.
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_millis(20);
/// Default bound on connecting and on each acknowledgement.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Publishes awaiting their ack at most.
pub const MAX_ACK_INFLIGHT: usize = 20_000;
/// The duplicate window of a stream the sink creates.
pub const CREATED_DUPLICATE_WINDOW: Duration = Duration::from_secs(600);

/// How the sink authenticates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsAuth {
    /// A `.creds` file (user JWT and NKey seed).
    Credentials(PathBuf),
    /// A token, read from this file.
    Token(PathBuf),
}

/// TLS to the server.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NatsTls {
    /// CA certificate(s) to trust instead of the system's roots.
    pub ca: Option<PathBuf>,
    /// Client certificate (with `key`), for servers that verify clients.
    pub cert: Option<PathBuf>,
    /// The client certificate's key.
    pub key: Option<PathBuf>,
}

/// What one message holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Per {
    /// One change.
    Change,
    /// One whole source transaction.
    Transaction,
}

/// One NATS sink, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsConfig {
    /// Sink name.
    pub name: String,
    /// `tunnel/source`.
    pub source: String,
    /// Server URL(s), comma-separated (`nats://host:4222`, `tls://...`).
    pub url: String,
    /// Authentication.
    pub auth: Option<NatsAuth>,
    /// TLS (also implied by a `tls://` URL).
    pub tls: Option<NatsTls>,
    /// The JetStream stream.
    pub stream: String,
    /// Subjects start with this.
    pub subject_prefix: String,
    /// A message per change or per transaction.
    pub per: Per,
    /// Create the stream when it is missing.
    pub create_stream: bool,
    /// Bound on connecting and on each acknowledgement.
    pub timeout: Duration,
    /// Messages per batch at most.
    pub max_messages: usize,
    /// Time a batch waits for more changes.
    pub max_delay: Duration,
}

struct Ready {
    js: async_nats::jetstream::Context,
    /// The server's `max_payload`.
    max_payload: usize,
}

/// The open transaction, with `message: transaction`.
struct TxnMsg {
    id: Position,
    /// The message so far: its head and the events written, comma-separated.
    body: Vec<u8>,
    /// Events in it.
    events: usize,
}

/// The NATS JetStream sink.
pub struct NatsSink {
    cfg: NatsConfig,
    ready: Option<Ready>,
    acks: Vec<(Position, PublishAckFuture)>,
    /// The open transaction's commit LSN and time (for change messages).
    commit: Option<super::message::Commit>,
    txn: Option<TxnMsg>,
    bytes: usize,
}

impl std::fmt::Debug for NatsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSink")
            .field("name", &self.cfg.name)
            .field("url", &self.cfg.url)
            .finish()
    }
}

/// `name` as a subject token: characters a token cannot hold become `_`.
pub fn token(name: &str) -> String {
    let t: String = name
        .chars()
        .map(|c| {
            if c == '.' || c == '*' || c == '>' || c.is_whitespace() || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect();
    if t.is_empty() {
        "_".into()
    } else {
        t
    }
}

/// Whether a stream subject `pattern` takes every subject under `prefix.`.
pub fn covers(pattern: &str, prefix: &str) -> bool {
    let mut p = pattern.split('.');
    for want in prefix.split('.') {
        match p.next() {
            Some(">") => return true,
            Some("*") => {}
            Some(t) if t == want => {}
            _ => return false,
        }
    }
    p.next() == Some(">") && p.next().is_none()
}

impl NatsSink {
    /// A sink that connects on the runner's first session.
    pub fn new(cfg: NatsConfig) -> NatsSink {
        NatsSink {
            cfg,
            ready: None,
            acks: Vec::new(),
            commit: None,
            txn: None,
            bytes: 0,
        }
    }

    async fn setup(&self) -> Result<Ready, SinkError> {
        let config = |msg: String| SinkError::new("config", 0, msg);
        let mut opts = async_nats::ConnectOptions::new()
            .name(format!("routy sink {}", self.cfg.name))
            .connection_timeout(self.cfg.timeout)
            .request_timeout(Some(self.cfg.timeout));
        match &self.cfg.auth {
            None => {}
            Some(NatsAuth::Token(f)) => opts = opts.token(super::webhook::read_secret(f)?),
            Some(NatsAuth::Credentials(f)) => {
                opts = opts
                    .credentials_file(f)
                    .await
                    .map_err(|e| config(format!("credentials_file {}: {e}", f.display())))?
            }
        }
        let tls_url = self
            .cfg
            .url
            .split(',')
            .any(|u| u.trim().starts_with("tls://"));
        if self.cfg.tls.is_some() || tls_url {
            let t = self.cfg.tls.clone().unwrap_or_default();
            let client = t.cert.as_deref().zip(t.key.as_deref());
            let tls = super::webhook::client_tls_auth(t.ca.as_deref(), client)
                .map_err(|e| config(format!("tls: {e}")))?;
            opts = opts.require_tls(true).tls_client_config(tls);
        }
        let client = tokio::time::timeout(
            self.cfg.timeout + Duration::from_secs(1),
            opts.connect(self.cfg.url.as_str()),
        )
        .await
        .map_err(|_| {
            SinkError::new(
                "connection",
                0,
                format!(
                    "NATS {}: no connection within {:?}",
                    self.cfg.url, self.cfg.timeout
                ),
            )
        })?
        .map_err(|e| SinkError::new("connection", 0, format!("NATS {}: {e}", self.cfg.url)))?;
        let max_payload = client.server_info().max_payload;
        let js = async_nats::jetstream::context::ContextBuilder::new()
            .timeout(self.cfg.timeout)
            .max_ack_inflight(MAX_ACK_INFLIGHT)
            .backpressure_on_inflight(true)
            .build(client);
        self.ensure_stream(&js).await?;
        Ok(Ready { js, max_payload })
    }

    async fn ensure_stream(&self, js: &async_nats::jetstream::Context) -> Result<(), SinkError> {
        use async_nats::jetstream::context::GetStreamErrorKind;
        let name = &self.cfg.stream;
        let want = format!("{}.>", self.cfg.subject_prefix);
        match js.get_stream(name).await {
            Ok(s) => {
                let subjects = &s.cached_info().config.subjects;
                if !subjects.iter().any(|p| covers(p, &self.cfg.subject_prefix)) {
                    return Err(SinkError::new(
                        "config",
                        0,
                        format!(
                            "NATS stream {name:?} does not take the subjects {want} (its subjects: {subjects:?}); \
                             add them to the stream or change subject_prefix"
                        ),
                    ));
                }
                Ok(())
            }
            Err(e)
                if matches!(e.kind(), GetStreamErrorKind::JetStream(ref j)
                    if j.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND) =>
            {
                if !self.cfg.create_stream {
                    return Err(SinkError::new(
                        "config",
                        0,
                        format!("NATS stream {name:?} does not exist (create_stream is off)"),
                    ));
                }
                js.create_stream(async_nats::jetstream::stream::Config {
                    name: name.clone(),
                    subjects: vec![want.clone()],
                    storage: async_nats::jetstream::stream::StorageType::File,
                    duplicate_window: CREATED_DUPLICATE_WINDOW,
                    num_replicas: 1,
                    ..Default::default()
                })
                .await
                .map_err(|e| {
                    SinkError::new("nats", 0, format!("creating NATS stream {name:?}: {e}"))
                })?;
                tracing::info!(sink = %self.cfg.name, stream = %name, subjects = %want, "created the NATS stream");
                Ok(())
            }
            Err(e) => Err(SinkError::new(
                "connection",
                0,
                format!("NATS stream {name:?}: {e}"),
            )),
        }
    }

    fn js(&self, seq: u64) -> Result<&async_nats::jetstream::Context, SinkError> {
        self.ready
            .as_ref()
            .map(|r| &r.js)
            .ok_or_else(|| SinkError::new("connection", seq, "NATS: not connected"))
    }

    fn publish_error(
        &self,
        at: Position,
        subject: &str,
        e: async_nats::jetstream::context::PublishError,
    ) -> SinkError {
        let seq = at.seq;
        match e.kind() {
            PublishErrorKind::StreamNotFound => SinkError::new(
                "config",
                seq,
                format!(
                    "NATS: no stream takes subject {subject} (stream {:?} was removed or changed?)",
                    self.cfg.stream
                ),
            ),
            PublishErrorKind::MaxPayloadExceeded => SinkError {
                rejected: true,
                ..SinkError::new(
                    "rejected",
                    seq,
                    format!(
                        "NATS: the message for {at} on {subject} exceeds the server's max_payload ({} bytes){}",
                        self.ready.as_ref().map_or(0, |r| r.max_payload),
                        if self.cfg.per == Per::Transaction {
                            "; a transaction this large needs `message: change`"
                        } else {
                            ""
                        }
                    ),
                )
            },
            PublishErrorKind::TimedOut => SinkError::new(
                "timeout",
                seq,
                format!("NATS: no ack for {at} on {subject} within {:?}", self.cfg.timeout),
            ),
            _ => SinkError::new("nats", seq, format!("NATS: publishing {at} on {subject}: {e}")),
        }
    }

    async fn publish(
        &mut self,
        at: Position,
        n: usize,
        subject: String,
        op: &str,
        body: Vec<u8>,
    ) -> Result<(), Flow> {
        let mut id = format!("{}/{at}", self.cfg.source);
        if n > 0 {
            id.push_str(&format!("/{n}"));
        }
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Routy-Op", op);
        self.bytes += body.len();
        let msg = PublishMessage::build()
            .payload(Bytes::from(body))
            .headers(headers)
            .message_id(id);
        let js = self.js(at.seq)?;
        let ack = js
            .send_publish(subject.clone(), msg)
            .await
            .map_err(|e| self.publish_error(at, &subject, e))?;
        self.acks.push((at, ack));
        Ok(())
    }

    fn clear(&mut self) {
        self.acks.clear();
        self.txn = None;
        self.commit = None;
        self.bytes = 0;
    }
}

impl Sink for NatsSink {
    fn kind(&self) -> &'static str {
        "nats"
    }

    fn durability(&self) -> Durability {
        Durability::AtLeastOnce
    }

    fn limits(&self) -> BatchLimits {
        BatchLimits {
            max_records: usize::MAX,
            max_events: self.cfg.max_messages,
            max_bytes: 64 << 20,
            max_delay: self.cfg.max_delay,
            // One message per transaction holds the transaction whole.
            split: if self.cfg.per == Per::Transaction {
                Split::Never
            } else {
                Split::FromBegin
            },
        }
    }

    async fn connect(&mut self) -> Result<Option<Position>, Flow> {
        self.clear();
        if self.ready.is_none() {
            self.ready = Some(self.setup().await?);
        }
        Ok(None)
    }

    async fn begin(&mut self, _from: Position) -> Result<(), Flow> {
        self.clear();
        Ok(())
    }

    async fn write(&mut self, at: Position, ev: Event, rels: &Relations) -> Result<(), Flow> {
        match &ev {
            Event::Relation(_) | Event::Message { .. } => return Ok(()),
            Event::Begin {
                xid,
                commit_lsn,
                commit_time,
            } => {
                let c = super::message::Commit::new(*commit_lsn, *commit_time);
                if self.cfg.per == Per::Transaction {
                    let mut body = Vec::with_capacity(4096);
                    body.extend_from_slice(format!("{{\"id\":\"{at}\",\"source\":").as_bytes());
                    super::message::json_str(&mut body, self.cfg.source.as_bytes());
                    body.extend_from_slice(
                        format!(
                            ",\"xid\":{xid},\"commit_lsn\":\"{}\",\"commit_time\":\"{}\",\"events\":[",
                            c.lsn, c.time
                        )
                        .as_bytes(),
                    );
                    self.txn = Some(TxnMsg {
                        id: at,
                        body,
                        events: 0,
                    });
                }
                self.commit = Some(c);
                return Ok(());
            }
            Event::Commit { .. } => {
                self.commit = None;
                if let Some(mut t) = self.txn.take().filter(|t| t.events > 0) {
                    t.body.extend_from_slice(b"]}");
                    let subject = format!("{}.transactions", self.cfg.subject_prefix);
                    self.publish(t.id, 0, subject, "transaction", t.body)
                        .await?;
                }
                return Ok(());
            }
            _ => {}
        }
        if let Some(t) = self.txn.as_mut() {
            if t.events > 0 {
                t.body.push(b',');
            }
            t.events += 1;
            super::message::write_change(&mut t.body, at, &ev, rels, self.commit.as_ref());
            return Ok(());
        }
        // One message per table the event is about.
        let ids = super::message::tables_of(&ev);
        let single = ids.len() == 1;
        let mut body = Vec::with_capacity(256);
        if single {
            super::message::write_change(&mut body, at, &ev, rels, self.commit.as_ref());
        }
        for (n, id) in ids.iter().enumerate() {
            let rel = rels.get(*id).ok_or_else(|| {
                SinkError::new(
                    "schema",
                    at.seq,
                    format!("a change of relation {id}, whose schema was not seen"),
                )
            })?;
            let subject = format!(
                "{}.{}.{}",
                self.cfg.subject_prefix,
                token(&rel.schema),
                token(&rel.name)
            );
            if !single {
                body = super::message::table_change(at, &ev, rels, self.commit.as_ref(), rel);
            }
            self.publish(at, n, subject, ev.kind(), std::mem::take(&mut body))
                .await?;
        }
        Ok(())
    }

    fn pending_bytes(&self) -> usize {
        self.bytes
    }

    async fn commit(&mut self, batch: &BatchInfo) -> Result<(), Flow> {
        let mut dups = 0u64;
        for (at, ack) in std::mem::take(&mut self.acks) {
            match ack.await {
                Ok(a) => dups += u64::from(a.duplicate),
                Err(e) => {
                    let _ = batch;
                    return Err(self.publish_error(at, "(ack)", e).into());
                }
            }
        }
        if dups > 0 {
            metrics::counter!(DUPLICATES, "sink" => self.cfg.name.clone(), "kind" => "nats")
                .increment(dups);
        }
        self.clear();
        Ok(())
    }

    async fn abort(&mut self) {
        self.clear();
    }

    async fn fail(&mut self, e: SinkError) -> SinkError {
        self.clear();
        // A new connection on the next session (the old one may be half broken).
        self.ready = None;
        e
    }
}

#[cfg(test)]
mod tests;
