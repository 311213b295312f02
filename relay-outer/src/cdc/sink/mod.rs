//! Sinks: where a source's change log goes from the store. One seam for every kind.
//!
//! A sink implements [`Sink`]: how to connect, write the events of a batch and commit it.
//! The [runner](runner) owns everything else, the same for every kind: reading the store
//! from the sink's position, keeping source transactions whole (a batch ends only between
//! transactions; a transaction cut off by a source crash is discarded and read again
//! whole), the per-sink filters, batching by records, events, bytes and time, retry with
//! backoff and jitter, pausing, replay, status and metrics labelled by `sink` and `kind`.
//!
//! Two durability levels ([`Durability`]):
//!
//! * **transactional** (PostgreSQL): the sink's position is written in the target in the
//!   same transaction as the data, and read back from there on connect: each change takes
//!   effect exactly once, whatever crashes.
//! * **at-least-once** (webhook): the target confirms a batch, then relay-outer writes the
//!   sink's position to `cdc.dir/_sinks/NAME.position` (atomically, fsynced; no tunnel
//!   can be named `_sinks`). A crash between the two sends the batch again; every change
//!   carries a stable id, its
//!   [`Position`], so a receiver drops what it has seen.
//! * **versioned** (ClickHouse): the target confirms a batch, then the sink writes its
//!   position in the target; a crash between the two writes the batch again, with the
//!   same versions, and the target's table engine collapses them.
//!
//! Either way, retention keeps every record a configured sink has not committed.

pub mod clickhouse;
pub mod filter;
pub mod kafka;
pub mod message;
pub mod nats;
pub mod pg;
pub mod position;
pub(crate) mod reader;
pub mod runner;
pub mod schema;
#[cfg(test)]
pub(crate) mod testkit;
pub mod webhook;

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use relay_proto::cdc::{Event, Relations};
use routy_ops::drain::Drain;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::store::Store;

pub use filter::Filter;
pub use position::Position;
pub use schema::SchemaChange;

/// Gauge: the store seq the sink has committed (every record through it delivered), by
/// `sink` and `kind`.
pub const APPLIED_SEQ: &str = "routy_cdc_sink_applied_seq";
/// Gauge: durable store records the sink has not committed yet, by `sink` and `kind`.
pub const LAG_RECORDS: &str = "routy_cdc_sink_lag_records";
/// Gauge: source commit time (Unix seconds) of the last transaction the sink committed,
/// by `sink` and `kind`; `time() - this` is its lag in seconds while it is behind.
pub const LAST_COMMIT_TIME: &str = "routy_cdc_sink_last_commit_timestamp_seconds";
/// Gauge: 1 while the sink is connected to its target and not failing, by `sink` and
/// `kind`.
pub const UP: &str = "routy_cdc_sink_up";
/// Gauge: 1 while the sink is paused, by `sink` and `kind`.
pub const PAUSED: &str = "routy_cdc_sink_paused";
/// Gauge: 1 while the sink has stopped on a batch or schema change the target refused
/// and waits for an operator (`cdc resume` or `cdc replay`), by `sink` and `kind`.
pub const STOPPED: &str = "routy_cdc_sink_stopped";
/// Counter: changes committed, by `sink`, `kind` and `op` (`insert`, `update`, `delete`,
/// `truncate`: tables truncated).
pub const ROWS: &str = "routy_cdc_sink_rows_total";
/// Counter: batches committed, by `sink` and `kind`.
pub const BATCHES: &str = "routy_cdc_sink_batches_total";
/// Counter: batches that ended inside a source transaction too big for one batch, by
/// `sink` and `kind` (see [`Split`]).
pub const SPLITS: &str = "routy_cdc_sink_split_batches_total";
/// Counter: failures (each followed by a retry, unless the sink stops), by `sink`,
/// `kind` and `reason`.
pub const ERRORS: &str = "routy_cdc_sink_errors_total";
/// Counter: records the sink passed that stand for records lost to corruption (markers
/// written by `cdc salvage`), by `sink` and `kind`.
pub const LOST_RECORDS: &str = "routy_cdc_sink_lost_records_total";
/// Histogram: time from the source commit to the target commit of the last transaction
/// of each batch, seconds, by `sink` and `kind`.
pub const COMMIT_LATENCY: &str = "routy_cdc_sink_commit_seconds";

/// Every sink metric with its help text (for `# HELP` lines and the README).
pub const METRICS: &[(&str, &str)] = &[
    (APPLIED_SEQ, "Store seq the sink has committed."),
    (
        LAG_RECORDS,
        "Durable store records the sink has not committed yet.",
    ),
    (
        LAST_COMMIT_TIME,
        "Source commit time (Unix seconds) of the last transaction the sink committed.",
    ),
    (
        UP,
        "1 while the sink is connected to its target and not failing.",
    ),
    (PAUSED, "1 while the sink is paused."),
    (
        STOPPED,
        "1 while the sink has stopped on a batch or schema change the target refused and waits for an operator.",
    ),
    (ROWS, "Changes committed to the target, by op."),
    (BATCHES, "Batches committed to the target."),
    (
        SPLITS,
        "Batches that ended inside a source transaction too big for one batch.",
    ),
    (ERRORS, "Sink failures, by reason."),
    (
        LOST_RECORDS,
        "Records passed that stand for records lost to corruption (cdc salvage markers).",
    ),
    (
        COMMIT_LATENCY,
        "Source commit to target commit latency in seconds.",
    ),
    (
        pg::MISSING_ROWS,
        "Updates and deletes that found no target row.",
    ),
    (
        nats::DUPLICATES,
        "Changes the target reported it already had (re-sends it dropped).",
    ),
    (
        webhook::DEAD_LETTERS,
        "Batches the target refused that were written to the dead-letter file.",
    ),
];

/// One `cdc.sinks` entry, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkConfig {
    /// Unique name: the `sink` label, its reader name in the store, its position's key.
    pub name: String,
    /// `tunnel/source` it reads.
    pub source: String,
    /// The kind and its settings.
    pub kind: SinkKind,
    /// `tables` and `ops`.
    pub filter: Filter,
    /// First retry delay after a failure.
    pub retry_initial: Duration,
    /// Largest retry delay.
    pub retry_max: Duration,
}

/// The kinds of sink, each under its own key in a `cdc.sinks` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkKind {
    /// `postgres:`.
    Postgres(pg::PgSinkConfig),
    /// `webhook:`.
    Webhook(webhook::WebhookConfig),
    /// `clickhouse:`.
    ClickHouse(clickhouse::ClickHouseConfig),
    /// `nats:`.
    Nats(nats::NatsConfig),
    /// `kafka:` (runs only in a build with the cargo feature `kafka`).
    Kafka(kafka::KafkaConfig),
}

/// The kind keys a `cdc.sinks` entry may have (exactly one).
pub const KINDS: &[&str] = &["postgres", "webhook", "clickhouse", "nats", "kafka"];

impl SinkKind {
    /// The kind key.
    pub fn key(&self) -> &'static str {
        match self {
            SinkKind::Postgres(_) => "postgres",
            SinkKind::Webhook(_) => "webhook",
            SinkKind::ClickHouse(_) => "clickhouse",
            SinkKind::Nats(_) => "nats",
            SinkKind::Kafka(_) => "kafka",
        }
    }

    /// Where the kind keeps its position.
    pub fn durability(&self) -> Durability {
        match self {
            SinkKind::Postgres(_) => Durability::Transactional,
            SinkKind::Webhook(_) => Durability::AtLeastOnce,
            SinkKind::ClickHouse(_) => Durability::Versioned,
            SinkKind::Nats(_) | SinkKind::Kafka(_) => Durability::AtLeastOnce,
        }
    }
}

/// Starts the runner of `cfg` on `store` (the store root is `root`, where at-least-once
/// positions live); it stops on `stop`.
pub fn spawn(
    cfg: &SinkConfig,
    root: &Path,
    store: Arc<Store>,
    stop: Drain,
) -> (Arc<SinkStatus>, JoinHandle<()>) {
    let durability = cfg.kind.durability();
    let status = Arc::new(SinkStatus::new(cfg.kind.key(), durability));
    let ctx = runner::RunCtx {
        name: cfg.name.clone(),
        source: cfg.source.clone(),
        store,
        filter: cfg.filter.clone(),
        retry_initial: cfg.retry_initial,
        retry_max: cfg.retry_max,
        positions: (durability == Durability::AtLeastOnce)
            .then(|| position::PositionFile::new(root, &cfg.name, &cfg.source)),
        schema_file: Some(schema::Known::path(root, &cfg.name)),
        stop,
        status: status.clone(),
    };
    let task = match &cfg.kind {
        SinkKind::Postgres(c) => tokio::spawn(runner::run(pg::PgSink::new(c.clone()), ctx)),
        SinkKind::Webhook(c) => {
            tokio::spawn(runner::run(webhook::WebhookSink::new(c.clone()), ctx))
        }
        SinkKind::ClickHouse(c) => {
            tokio::spawn(runner::run(clickhouse::ClickHouseSink::new(c.clone()), ctx))
        }
        SinkKind::Nats(c) => tokio::spawn(runner::run(nats::NatsSink::new(c.clone()), ctx)),
        #[cfg(feature = "kafka")]
        SinkKind::Kafka(c) => tokio::spawn(runner::run(kafka::KafkaSink::new(c.clone()), ctx)),
        // The configuration refuses a kafka sink in a build without it.
        #[cfg(not(feature = "kafka"))]
        SinkKind::Kafka(c) => {
            let name = c.name.clone();
            tokio::spawn(async move {
                tracing::error!(sink = %name, "this relay-outer was built without the Kafka sink (cargo feature kafka)");
            })
        }
    };
    (status, task)
}

/// How a sink makes its position durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// The position is stored in the target with the data: exactly-once effect.
    Transactional,
    /// The position is stored by relay-outer after the target confirmed: changes may
    /// come twice, each with the same id.
    AtLeastOnce,
    /// The position is stored in the target after the data: changes may be written
    /// twice, with the same version, and the target collapses them (ClickHouse).
    Versioned,
}

impl Durability {
    /// The word `/status` and `cdc sinks` use.
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Transactional => "transactional",
            Durability::AtLeastOnce => "at-least-once",
            Durability::Versioned => "versioned",
        }
    }
}

/// Whether a batch that is full inside a source transaction ends there, and where the
/// sink then resumes after a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Split {
    /// Never: a source transaction is one batch, whatever its size (the sink streams it
    /// to the target without holding it, like the PostgreSQL sink).
    #[default]
    Never,
    /// At the batch's end, the position written after it: the target shows the
    /// transaction's applied part until the rest comes (the PostgreSQL sink with
    /// `transaction_chunk_rows`).
    Exact,
    /// At the batch's end, the position kept at the transaction's `Begin`: after a
    /// restart the whole transaction is delivered again (at-least-once and versioned
    /// sinks, which would otherwise hold the whole transaction in memory).
    FromBegin,
}

/// When the runner ends a batch (between source transactions, or inside one as
/// [`BatchLimits::split`] allows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Store records at most.
    pub max_records: usize,
    /// Events passed to the sink at most.
    pub max_events: usize,
    /// What the sink reports as pending ([`Sink::pending_bytes`]) at most.
    pub max_bytes: usize,
    /// How long a batch may wait for more records once the store has no more
    /// (zero: commit as soon as the store is read to its end).
    pub max_delay: Duration,
    /// Whether a full batch ends inside a source transaction. The batch after it starts
    /// with the transaction's `Begin` again (at its own position), so a sink always
    /// knows the transaction its changes belong to.
    pub split: Split,
}

/// What the runner knows of the batch it commits.
#[derive(Debug, Clone, Default)]
pub struct BatchInfo {
    /// Position of the first event read into the batch.
    pub first: Position,
    /// Position of the last event passed to the sink (`None`: every event was filtered
    /// out or the batch holds only relations).
    pub last_written: Option<Position>,
    /// Seq of the last record in the batch.
    pub last_seq: u64,
    /// Where the sink resumes after this batch: `last_seq + 1`, event 0.
    pub next: Position,
    /// Source LSN the batch reaches (end of its last commit, or its last record's LSN).
    pub lsn: Option<u64>,
    /// Source commit time (microseconds since 2000-01-01) of its last transaction.
    pub commit_time: Option<i64>,
    /// Store records in it.
    pub records: usize,
    /// Events passed to the sink.
    pub events: usize,
    /// Changes passed, by op (`insert`, `update`, `delete`, tables truncated).
    pub ops: [u64; 4],
}

/// The op names, in the order of [`BatchInfo::ops`].
pub const OP_NAMES: [&str; 4] = ["insert", "update", "delete", "truncate"];

/// A destination kind. The runner calls, in order: [`connect`](Sink::connect) once per
/// session, then for each batch [`begin`](Sink::begin), [`write`](Sink::write) for every
/// event, and [`commit`](Sink::commit); [`abort`](Sink::abort) or [`fail`](Sink::fail)
/// end a batch that will be read again.
pub trait Sink: Send + 'static {
    /// The kind key in the config (`postgres`, `webhook`): the `kind` label.
    fn kind(&self) -> &'static str;

    /// Where its position lives.
    fn durability(&self) -> Durability;

    /// How big a batch may grow.
    fn limits(&self) -> BatchLimits;

    /// Connects to the target. A transactional sink returns its position stored there;
    /// an at-least-once sink returns `None` (the runner keeps its position).
    fn connect(&mut self) -> impl Future<Output = Result<Option<Position>, Flow>> + Send;

    /// Starts a batch; `from` is the position the runner holds as committed (a
    /// transactional sink checks the target still agrees).
    fn begin(&mut self, from: Position) -> impl Future<Output = Result<(), Flow>> + Send;

    /// One event of the batch, in order: filtered, never of a discarded transaction;
    /// `rels` knows every relation seen so far (relations are passed too, before the
    /// events that use them).
    fn write(
        &mut self,
        at: Position,
        ev: Event,
        rels: &Relations,
    ) -> impl Future<Output = Result<(), Flow>> + Send;

    /// A table's definition changed (the runner tells what, before the table's new
    /// relation and the events that use it, inside the batch). A sink that keeps tables
    /// applies it to the target, or refuses it with a `rejected` error that names the
    /// table and the change (the runner then stops the sink until an operator resumes
    /// it, with [`SchemaChange::accepted`] set). Message sinks carry the new names in
    /// their messages and need nothing: the default does nothing.
    fn schema(
        &mut self,
        at: Position,
        change: &SchemaChange,
    ) -> impl Future<Output = Result<(), Flow>> + Send {
        let _ = (at, change);
        async { Ok(()) }
    }

    /// Whether the sink takes a copy's rows as one [`Event::Rows`] block (written at the
    /// block's first position) instead of one [`Event::Insert`] each. A block is passed
    /// only whole, outside source transactions; the default takes inserts.
    fn takes_rows(&self) -> bool {
        false
    }

    /// Bytes held for the open batch (for [`BatchLimits::max_bytes`]).
    fn pending_bytes(&self) -> usize {
        0
    }

    /// Makes the batch durable in the target; a transactional sink stores `batch.next`
    /// in the same transaction.
    fn commit(&mut self, batch: &BatchInfo) -> impl Future<Output = Result<(), Flow>> + Send;

    /// Gives up the open batch (rolls back); it will be read again.
    fn abort(&mut self) -> impl Future<Output = ()> + Send;

    /// A failure ended the session: give up the batch and the connection; returns the
    /// error to report (a sink may know a better one, like the first of several
    /// pipelined statements that failed).
    fn fail(&mut self, e: SinkError) -> impl Future<Output = SinkError> + Send;

    /// Nothing to read for now: check the connection, and with a batch open, surface
    /// errors of work in flight.
    /// Nothing to check by default.
    fn idle(&mut self, in_batch: bool) -> impl Future<Output = Result<(), Flow>> + Send {
        let _ = in_batch;
        async { Ok(()) }
    }

    /// Moves the position stored in the target (replay), outside any batch. Only sinks
    /// that keep their position in the target (transactional, versioned) are asked; the
    /// default does nothing.
    fn set_position(&mut self, pos: Position) -> impl Future<Output = Result<(), Flow>> + Send {
        let _ = pos;
        async { Ok(()) }
    }
}

/// A failure: what it was about (`reason` label), the store seq being delivered, the text.
#[derive(Debug, Clone)]
pub struct SinkError {
    /// The `reason` label of [`ERRORS`].
    pub reason: &'static str,
    /// Store seq being delivered.
    pub seq: u64,
    /// What happened.
    pub msg: String,
    /// SQLSTATE when PostgreSQL reported it.
    pub code: Option<String>,
    /// From a pipelined statement: statements still outstanding were sent after it.
    pub pipelined: bool,
    /// The target refused this batch for good (an HTTP 4xx): retrying cannot help.
    pub rejected: bool,
    /// The target asked to wait at least this long before retrying (`Retry-After`).
    pub retry_after: Option<Duration>,
}

impl SinkError {
    /// A failure with its `reason` label.
    pub fn new(reason: &'static str, seq: u64, msg: impl Into<String>) -> SinkError {
        SinkError {
            reason,
            seq,
            msg: msg.into(),
            code: None,
            pipelined: false,
            rejected: false,
            retry_after: None,
        }
    }

    /// Reading the store failed.
    pub fn store(seq: u64, msg: impl Into<String>) -> SinkError {
        SinkError::new("store", seq, msg)
    }
}

impl std::fmt::Display for SinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.msg)
    }
}

/// How a session ends other than by stopping.
#[derive(Debug)]
pub enum Flow {
    /// A failure: back off and retry (or stop, for a refused batch).
    Fail(SinkError),
    /// Start over from the committed position at once (a discarded partial transaction,
    /// another process moved the offset, an idle partial transaction was rolled back, a
    /// replay).
    Restart {
        /// Wait until the store's durable seq exceeds this first.
        after_durable: Option<u64>,
        /// Logged.
        why: String,
    },
}

impl From<SinkError> for Flow {
    fn from(e: SinkError) -> Flow {
        Flow::Fail(e)
    }
}

/// What the runner is doing, for `/status` and `cdc sinks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Connecting to the target.
    Starting,
    /// Delivering (or caught up).
    Running,
    /// Waiting to retry after a failure.
    Retrying,
    /// Paused by an operator.
    Paused,
    /// Stopped: the target refused a batch (see the last error), or relay-outer stops.
    Stopped,
}

/// A running sink's status and controls, shared with the admin endpoint.
#[derive(Debug)]
pub struct SinkStatus {
    kind: &'static str,
    durability: Durability,
    position: Mutex<Position>,
    up: AtomicBool,
    state: Mutex<State>,
    last_error: Mutex<Option<String>>,
    /// Source commit time (Unix microseconds) of the last transaction committed.
    last_commit_us: AtomicI64,
    paused: watch::Sender<bool>,
    replay: watch::Sender<Option<Position>>,
    /// Bumped by an operator's resume: a stopped sink tries again.
    retry: watch::Sender<u64>,
}

/// A copy of a [`SinkStatus`] at one moment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SinkStatusView {
    /// The kind key.
    pub kind: &'static str,
    /// `transactional` or `at-least-once`.
    pub durability: &'static str,
    /// Store seq committed in the target.
    pub applied_seq: u64,
    /// Where the sink goes on: the next event's position.
    pub position: String,
    /// Connected and not failing.
    pub up: bool,
    /// What it is doing.
    pub state: State,
    /// The most recent failure, if any (kept after recovery).
    pub last_error: Option<String>,
    /// Source commit time (Unix microseconds) of the last transaction committed.
    pub last_commit_us: Option<i64>,
    /// A replay asked for and not done yet.
    pub replay_pending: Option<String>,
}

impl SinkStatus {
    /// A fresh status: nothing applied, down, no error.
    pub fn new(kind: &'static str, durability: Durability) -> SinkStatus {
        SinkStatus {
            kind,
            durability,
            position: Mutex::new(Position::START),
            up: AtomicBool::new(false),
            state: Mutex::new(State::Starting),
            last_error: Mutex::new(None),
            last_commit_us: AtomicI64::new(i64::MIN),
            paused: watch::channel(false).0,
            replay: watch::channel(None).0,
            retry: watch::channel(0).0,
        }
    }

    /// Store seq committed in the target (0 until the sink has connected once).
    pub fn applied_seq(&self) -> u64 {
        self.position().applied_seq()
    }

    /// The next event the sink delivers.
    pub fn position(&self) -> Position {
        *self.position.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connected and not failing.
    pub fn up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// The most recent failure text.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// What the runner is doing.
    pub fn state(&self) -> State {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether an operator paused it.
    pub fn paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Pauses (true) or resumes (false) delivery; takes effect between batches.
    pub fn set_paused(&self, paused: bool) {
        self.paused.send_replace(paused);
    }

    /// Asks a sink that stopped (the target refused a batch or a schema change) to try
    /// again: the operator fixed the target.
    pub fn request_retry(&self) {
        self.retry.send_modify(|n| *n += 1);
    }

    fn subscribe_retry(&self) -> watch::Receiver<u64> {
        self.retry.subscribe()
    }

    /// Asks the runner to move the sink to `pos` (it re-delivers from there).
    pub fn request_replay(&self, pos: Position) {
        self.replay.send_replace(Some(pos));
    }

    /// All of it at once.
    pub fn view(&self) -> SinkStatusView {
        let us = self.last_commit_us.load(Ordering::Acquire);
        SinkStatusView {
            kind: self.kind,
            durability: self.durability.as_str(),
            applied_seq: self.applied_seq(),
            position: self.position().to_string(),
            up: self.up(),
            state: self.state(),
            last_error: self.last_error(),
            last_commit_us: (us != i64::MIN).then_some(us),
            replay_pending: self.replay.borrow().map(|p| p.to_string()),
        }
    }

    fn set_position(&self, p: Position) {
        *self.position.lock().unwrap_or_else(|e| e.into_inner()) = p;
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Release);
    }

    fn set_state(&self, s: State) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }

    fn set_error(&self, e: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    }

    fn set_last_commit(&self, unix_us: i64) {
        self.last_commit_us.store(unix_us, Ordering::Release);
    }

    fn subscribe_paused(&self) -> watch::Receiver<bool> {
        self.paused.subscribe()
    }

    fn subscribe_replay(&self) -> watch::Receiver<Option<Position>> {
        self.replay.subscribe()
    }

    fn take_replay(&self) -> Option<Position> {
        let mut out = None;
        self.replay.send_if_modified(|v| {
            out = v.take();
            out.is_some()
        });
        out
    }
}
