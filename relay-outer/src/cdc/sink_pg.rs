//! The PostgreSQL sink: applies a source's change log from the store to a target database.
//!
//! Inserts, updates, deletes and truncates are applied by the table's key; every source
//! transaction becomes one target transaction (several small consecutive ones may share
//! one), and the sink's position (`_routy.sink_offsets`, one row per sink) is written in the
//! same target transaction, so after any crash the sink resumes exactly where it was: no
//! transaction is lost or applied twice. Values travel as text and are cast to the target
//! column's type, so any type PostgreSQL can print and read back works.
//!
//! With `create_tables`, missing schemas, tables and columns are created from the relation
//! metadata (the source's column types; a `PRIMARY KEY` on the replica identity key when the
//! table has one). Existing target tables need every published column; extra target
//! columns are left alone. A source type that is not a plain type name (it comes over the
//! tunnel and is pasted into the SQL) is created as `text`, with a warning.
//!
//! A sink without a position starts at the store's oldest record. When that is not seq 1
//! (retention removed older records, or the store joined the stream later), the target
//! misses the initial copies before it: this is logged once as an error, shown as the
//! status' last error and counted (`reason="gap"`), and the sink goes on. A sink name whose
//! offset row holds another source's position is refused.
//!
//! **Tables without a key.** A table is applied by key when its replica identity is the
//! primary key (`REPLICA IDENTITY DEFAULT`) or a unique index (`REPLICA IDENTITY USING
//! INDEX`). A table without either is applied as follows:
//!
//! * inserts (and initial copies) always work; they are plain `INSERT`s;
//! * updates and deletes need `REPLICA IDENTITY FULL` on the source table (PostgreSQL
//!   itself refuses them on the source for a published table without a replica identity).
//!   The sink then changes exactly one target row whose columns all equal the old row's
//!   values (NULLs match NULLs; unchanged TOAST values are not compared), so duplicates
//!   stay duplicates. Without an index on the target such a change scans the table;
//! * a table with `REPLICA IDENTITY FULL` is applied this way even when it has a primary
//!   key (the stream then does not say which columns form the key).
//!
//! An update or delete that finds no target row is logged, counted in
//! `routy_cdc_sink_missing_rows_total`, and skipped. A sink that cannot write (target down,
//! a constraint or type error) rolls back, logs the source seq and the SQL error, counts it
//! in `routy_cdc_sink_errors_total`, waits (exponential backoff with jitter between
//! `retry_initial` and `retry_max`), reconnects and resumes from the position stored in the
//! target. Every sink reads the store at its own position, so a failing sink holds back no
//! other sink.
//!
//! Triggers and foreign keys on the target fire as for any client; the target user needs
//! `INSERT`, `UPDATE`, `DELETE`, `TRUNCATE` on the target tables, and `CREATE` on the
//! database (for the `_routy` schema, created once) and on the schemas it creates tables in.

mod apply;
mod source;
mod table;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use routy_ops::drain::Drain;
use routy_pg::tls::PgTls;
use tokio::sync::watch;

use super::store::Store;

/// Gauge: the store seq the target has committed, by `sink`.
pub const APPLIED_SEQ: &str = "routy_cdc_sink_applied_seq";
/// Gauge: durable store records the sink has not applied yet, by `sink`.
pub const LAG_RECORDS: &str = "routy_cdc_sink_lag_records";
/// Gauge: 1 while the sink is connected to its target and not failing, by `sink`.
pub const UP: &str = "routy_cdc_sink_up";
/// Counter: rows applied (committed), by `sink` and `op` (`insert`, `update`, `delete`,
/// `truncate`: tables truncated).
pub const ROWS: &str = "routy_cdc_sink_rows_total";
/// Counter: failures (each followed by a retry), by `sink` and `reason`.
pub const ERRORS: &str = "routy_cdc_sink_errors_total";
/// Counter: updates and deletes that found no target row, by `sink`.
pub const MISSING_ROWS: &str = "routy_cdc_sink_missing_rows_total";
/// Counter: records the sink passed that stand for records lost to corruption (markers
/// written by `cdc salvage`), by `sink`.
pub const LOST_RECORDS: &str = "routy_cdc_sink_lost_records_total";
/// Histogram: time from the source commit to the target commit of the last transaction
/// of each target transaction, seconds, by `sink`.
pub const COMMIT_LATENCY: &str = "routy_cdc_sink_commit_seconds";

/// Every sink metric with its help text (for `# HELP` lines and the README).
pub const METRICS: &[(&str, &str)] = &[
    (
        LOST_RECORDS,
        "Records passed that stand for records lost to corruption (cdc salvage markers).",
    ),
    (APPLIED_SEQ, "Store seq committed in the sink's target."),
    (
        LAG_RECORDS,
        "Durable store records the sink has not applied yet.",
    ),
    (
        UP,
        "1 while the sink is connected to its target and not failing.",
    ),
    (ROWS, "Rows applied to the target, by op."),
    (ERRORS, "Sink failures (each retried), by reason."),
    (
        MISSING_ROWS,
        "Updates and deletes that found no target row.",
    ),
    (
        COMMIT_LATENCY,
        "Source commit to target commit latency in seconds.",
    ),
];

/// One PostgreSQL sink, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgSinkConfig {
    /// Sink name (unique in the config; the key of its offset row in the target).
    pub name: String,
    /// Source it reads: `tunnel/source`.
    pub source: String,
    /// libpq-style connection string of the target.
    pub dsn: String,
    /// Create missing target schemas and tables from the relation metadata.
    pub create_tables: bool,
    /// Write every table into this schema instead of the source's schema name.
    pub schema: Option<String>,
    /// First retry delay after a failure.
    pub retry_initial: Duration,
    /// Largest retry delay.
    pub retry_max: Duration,
}

/// What a running sink reports, for the status page.
#[derive(Debug, Default)]
pub struct SinkStatus {
    applied_seq: AtomicU64,
    up: AtomicBool,
    last_error: Mutex<Option<String>>,
}

/// A copy of a [`SinkStatus`] at one moment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SinkStatusView {
    /// Store seq committed in the target.
    pub applied_seq: u64,
    /// Connected and not failing.
    pub up: bool,
    /// The most recent failure, if any (kept after recovery).
    pub last_error: Option<String>,
}

impl SinkStatus {
    /// A fresh status: nothing applied, down, no error.
    pub fn new() -> SinkStatus {
        SinkStatus::default()
    }

    /// Store seq committed in the target (0 until the sink has connected once).
    pub fn applied_seq(&self) -> u64 {
        self.applied_seq.load(Ordering::Acquire)
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

    /// All of it at once.
    pub fn view(&self) -> SinkStatusView {
        SinkStatusView {
            applied_seq: self.applied_seq(),
            up: self.up(),
            last_error: self.last_error(),
        }
    }

    fn set_applied(&self, seq: u64) {
        self.applied_seq.store(seq, Ordering::Release);
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Release);
    }

    fn set_error(&self, e: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    }
}

/// A failure: what it was about (`reason` label), the store seq being applied, the text.
#[derive(Debug, Clone)]
pub(crate) struct SinkError {
    reason: &'static str,
    seq: u64,
    msg: String,
    /// SQLSTATE when PostgreSQL reported it.
    code: Option<String>,
    /// From a pipelined statement: statements still outstanding were sent after it.
    pipelined: bool,
}

impl SinkError {
    fn new(reason: &'static str, seq: u64, msg: impl Into<String>) -> SinkError {
        SinkError {
            reason,
            seq,
            msg: msg.into(),
            code: None,
            pipelined: false,
        }
    }

    fn store(seq: u64, msg: impl Into<String>) -> SinkError {
        SinkError::new("store", seq, msg)
    }

    /// From a tokio-postgres error: SQLSTATE, message, detail, hint, where it happened.
    fn pg(seq: u64, what: &str, e: &tokio_postgres::Error) -> SinkError {
        let Some(db) = e.as_db_error() else {
            let reason = if e.is_closed() || e.code().is_none() {
                "connection"
            } else {
                "sql"
            };
            let e = routy_pg::tls::error_chain(e);
            return SinkError::new(reason, seq, format!("{what}: {e}"));
        };
        let code = db.code().code();
        let reason = match code.get(..2).unwrap_or("") {
            "23" => "constraint",
            "42" => "schema",
            "08" | "57" => "connection",
            "22" => "data",
            _ => "sql",
        };
        let mut msg = format!("{what}: {} {code}: {}", db.severity(), db.message());
        if let Some(d) = db.detail() {
            msg.push_str(&format!(" (detail: {d})"));
        }
        if let Some(h) = db.hint() {
            msg.push_str(&format!(" (hint: {h})"));
        }
        if let Some(t) = db.table() {
            let s = db.schema().map(|s| format!("{s}.")).unwrap_or_default();
            msg.push_str(&format!(" (table {s}{t})"));
        }
        let mut e = SinkError::new(reason, seq, msg);
        e.code = Some(code.to_string());
        e
    }

    /// "ON CONFLICT DO UPDATE command cannot affect row a second time".
    fn is_cardinality(&self) -> bool {
        self.code.as_deref() == Some("21000")
    }
}

impl std::fmt::Display for SinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.msg)
    }
}

/// How a session ends other than by stopping.
#[derive(Debug)]
pub(crate) enum Flow {
    /// A failure: back off and retry.
    Fail(SinkError),
    /// Start over from the target's offset at once (a discarded partial transaction,
    /// another process moved the offset, an idle partial transaction was rolled back).
    Restart {
        /// Wait until the store's durable seq exceeds this first.
        after_durable: Option<u64>,
        why: String,
    },
}

impl From<SinkError> for Flow {
    fn from(e: SinkError) -> Flow {
        Flow::Fail(e)
    }
}

/// What outlives one connection.
#[derive(Debug, Default)]
pub(crate) struct Memo {
    /// Partial source transactions cut off by a new `Begin` (or an event that only occurs
    /// outside transactions: a snapshot phase, a non-transactional message): `[start, end)`
    /// as (seq, event index); their events, but for relations, are skipped when read again.
    discards: Vec<((u64, usize), (u64, usize))>,
    /// Tables whose inserts go row by row (a batch hit the same key twice as the target
    /// sees it).
    per_row: HashSet<String>,
    /// Something was committed since the last failure (resets the backoff).
    progressed: bool,
    /// Up to this seq (where the last failure was), every source transaction gets a
    /// target transaction of its own, so the good ones before a bad one get through.
    careful_until: u64,
    /// The missing start of the store (a sink without a position whose store no longer
    /// begins at seq 1) was reported.
    gap_reported: bool,
}

impl Memo {
    fn discarded(&self, seq: u64, idx: usize) -> bool {
        self.discards
            .iter()
            .any(|(a, b)| (seq, idx) >= *a && (seq, idx) < *b)
    }
}

/// Runs the sink until `stop`, reporting into `status`.
pub async fn run_with_status(
    cfg: PgSinkConfig,
    store: Arc<Store>,
    stop: Drain,
    status: Arc<SinkStatus>,
) {
    let sink = cfg.name.clone();
    store.register_reader(&reader_name(&cfg));
    metrics::gauge!(UP, "sink" => sink.clone()).set(0.0);
    let mut memo = Memo::default();
    let mut backoff = routy_ops::backoff::Backoff::new(cfg.retry_initial, cfg.retry_max);
    let mut durable_rx: watch::Receiver<u64> = store.subscribe();
    while !stop.is_stopping() {
        let outcome = tokio::select! {
            r = apply::session(&cfg, &store, &status, &mut memo) => r,
            _ = stop.stopping() => break,
        };
        status.set_up(false);
        metrics::gauge!(UP, "sink" => sink.clone()).set(0.0);
        if std::mem::take(&mut memo.progressed) {
            backoff.reset();
        }
        match outcome {
            Flow::Restart { after_durable, why } => {
                tracing::info!(sink = %sink, "{why}; starting over from the target's position");
                if let Some(seen) = after_durable {
                    tokio::select! {
                        _ = durable_rx.wait_for(|d| *d > seen) => {}
                        _ = stop.stopping() => break,
                    }
                }
            }
            Flow::Fail(e) => {
                metrics::counter!(ERRORS, "sink" => sink.clone(), "reason" => e.reason)
                    .increment(1);
                let text = format!("seq {}: {}", e.seq, e.msg);
                status.set_error(text);
                let sleep = backoff.next_delay();
                tracing::warn!(
                    sink = %sink,
                    seq = e.seq,
                    reason = e.reason,
                    retry_in_ms = sleep.as_millis() as u64,
                    "sink failed, rolled back: {}",
                    e.msg
                );
                tokio::select! {
                    _ = tokio::time::sleep(sleep) => {}
                    _ = stop.stopping() => break,
                }
            }
        }
    }
    status.set_up(false);
    metrics::gauge!(UP, "sink" => sink).set(0.0);
}

/// The name the sink reports its store position under.
/// The sink's reader name in its store (retention keeps what it has not applied).
pub fn reader_name(cfg: &PgSinkConfig) -> String {
    cfg.name.clone()
}

/// The target's client configuration and TLS side. This is the seam for the target
/// connection: TLS follows libpq's `sslmode` / `sslrootcert` via [`routy_pg::tls`].
pub(crate) fn target_config(cfg: &PgSinkConfig) -> Result<(tokio_postgres::Config, PgTls), String> {
    let dsn = routy_pg::dsn::parse(&cfg.dsn).map_err(|e| format!("target {e}"))?;
    let (mode, root) = (dsn.sslmode().map_err(|e| e.to_string())?, dsn.sslrootcert());
    let mut pc = dsn.tokio_postgres().map_err(|e| format!("target {e}"))?;
    pc.ssl_mode(mode.tokio_postgres());
    if pc.get_connect_timeout().is_none() {
        pc.connect_timeout(Duration::from_secs(10));
    }
    if pc.get_application_name().is_none() {
        pc.application_name(format!("routy sink {}", cfg.name));
    }
    pc.keepalives_idle(Duration::from_secs(30));
    let tls = PgTls::new(mode, root.as_deref())?;
    Ok((pc, tls))
}
