//! A CDC source: one PostgreSQL database read through a logical replication slot (pgoutput)
//! into this source's [`Spool`].
//!
//! Lifecycle of one session (reconnected with backoff after transient failures):
//!
//! 1. An ordinary connection (tokio-postgres) checks `wal_level = logical`, a UTF8 server
//!    encoding and that every configured table exists; it creates the publication when
//!    missing and adds configured tables it lacks.
//! 2. A replication connection finds the slot, or creates it with an exported snapshot
//!    (its consistent point is P1). A slot whose `wal_status` is `lost` stops the source with
//!    an error that says what to do.
//! 3. `snapshot: initial`: every table not yet copied (per the state file, see
//!    [`snapshot`]) is copied inside a snapshot: the slot's own exported snapshot when the
//!    slot was just created, else the snapshot of a TEMPORARY slot made only for it (P2).
//!    Each table is recorded with the LSN of the snapshot it was copied in; streamed
//!    changes to it from transactions that committed before that LSN are dropped (the rule
//!    PostgreSQL's tablesync uses), so a copy resumed after a restart meets the stream
//!    exactly.
//! 4. `START_REPLICATION` from the spool's durable position; changes become
//!    [`relay_proto::cdc`] records (see [`stream`]); the LSN is confirmed to PostgreSQL
//!    only once it is durable in the spool.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use routy_ops::drain::Drain;

use crate::cdc::replication::{self, ReplicationClient, ReplicationConfig, ReplicationError};
use crate::cdc::spool::{Spool, SpoolError};
use crate::config::{SnapshotMode, SourceConfig};
use routy_ops::backoff::Backoff;

mod catalog;
mod shape;
pub mod slot_watch;
pub mod snapshot;
pub mod stream;

use catalog::Db;
use snapshot::SnapshotState;

/// Gauge: WAL the slot holds on the source (`pg_current_wal_lsn() - restart_lsn`), bytes;
/// read by [`slot_watch`] whatever the session is doing.
pub const RETAINED_WAL_BYTES: &str = "routy_cdc_source_retained_wal_bytes";
/// Gauge: when [`RETAINED_WAL_BYTES`] was last read from the source, Unix seconds.
pub const SLOT_CHECKED: &str = "routy_cdc_source_slot_checked_timestamp_seconds";
/// Gauge: LSN last confirmed to the source (as a number).
pub const CONFIRMED_LSN: &str = "routy_cdc_source_confirmed_lsn";
/// Counter: events spooled, by `kind` (begin, commit, insert, …).
pub const EVENTS_TOTAL: &str = "routy_cdc_source_events_total";
/// Counter: transactions spooled.
pub const TRANSACTIONS_TOTAL: &str = "routy_cdc_source_transactions_total";
/// Counter: rows copied by the initial snapshot, by `table`.
pub const SNAPSHOT_ROWS_TOTAL: &str = "routy_cdc_source_snapshot_rows_total";
/// Counter: heartbeat messages emitted on the source.
pub const HEARTBEATS_TOTAL: &str = "routy_cdc_source_heartbeats_total";
/// Counter: session errors, by `reason` (fatal, transient, receive_timeout).
pub const ERRORS_TOTAL: &str = "routy_cdc_source_errors_total";
/// Gauge: 1 while the source has stopped on a fatal error (or was not started: its spool
/// is corrupt) and waits for an operator, by `source`; 0 while it runs or reconnects.
pub const STOPPED: &str = "routy_cdc_source_stopped";

/// Records are cut near this size inside a large transaction or a table copy.
pub const RECORD_TARGET_BYTES: usize = 256 * 1024;
/// A record is never made larger than this, except for one single huge row.
pub const RECORD_MAX_BYTES: usize = 8 * 1024 * 1024;

/// First reconnect delay ceiling.
const RECONNECT_INITIAL: Duration = Duration::from_millis(500);
/// Largest reconnect delay.
const RECONNECT_MAX: Duration = Duration::from_secs(30);
/// How long a session may take to finish after the stop signal.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// A session that ran this long resets the backoff.
const HEALTHY_AFTER: Duration = Duration::from_secs(60);

/// Why a source stopped or a session failed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Retrying cannot help: the operator must act (the message says how).
    #[error("{0}")]
    Fatal(String),
    /// Network trouble, source restart, admin shutdown …: the source reconnects.
    #[error("{0}")]
    Transient(String),
    /// The server stopped answering within `receive_timeout`: the source reconnects.
    #[error("{0}")]
    Stalled(String),
}

impl SourceError {
    /// Whether the source gives up.
    pub fn is_fatal(&self) -> bool {
        matches!(self, SourceError::Fatal(_))
    }

    fn reason(&self) -> &'static str {
        match self {
            SourceError::Fatal(_) => "fatal",
            SourceError::Transient(_) => "transient",
            SourceError::Stalled(_) => "receive_timeout",
        }
    }
}

/// SQLSTATEs that retrying does not fix.
fn fatal_sqlstate(code: &str) -> bool {
    matches!(
        code,
        "42501" // insufficient_privilege
            | "42P01" // undefined_table
            | "42704" // undefined_object (publication / slot options)
            | "3D000" // invalid_catalog_name: no such database
            | "0A000" // feature_not_supported
            // object_not_in_prerequisite_state: an invalidated slot ("cannot read from
            // logical replication slot"), wal_level below logical, a slot of another
            // database or kind
            | "55000"
    )
}

impl From<ReplicationError> for SourceError {
    fn from(e: ReplicationError) -> Self {
        match &e {
            ReplicationError::Server { code, .. } if fatal_sqlstate(code) => {
                SourceError::Fatal(format!("replication connection: {e}"))
            }
            ReplicationError::InvalidArgument(_) => {
                SourceError::Fatal(format!("replication connection: {e}"))
            }
            _ => SourceError::Transient(format!("replication connection: {e}")),
        }
    }
}

impl From<tokio_postgres::Error> for SourceError {
    fn from(e: tokio_postgres::Error) -> Self {
        let text = match e.as_db_error() {
            Some(db) => format!(
                "PostgreSQL {} {}: {}{}",
                db.severity(),
                db.code().code(),
                db.message(),
                db.detail().map(|d| format!(" ({d})")).unwrap_or_default()
            ),
            // The interesting part (TLS handshake, I/O) is in the source chain.
            None => routy_pg::tls::error_chain(&e),
        };
        match e.code() {
            Some(c) if fatal_sqlstate(c.code()) => SourceError::Fatal(text),
            _ => SourceError::Transient(text),
        }
    }
}

impl From<SpoolError> for SourceError {
    fn from(e: SpoolError) -> Self {
        SourceError::Fatal(format!("spool: {e}"))
    }
}

/// Errors `/status` keeps per source.
pub const RECENT_ERRORS: usize = 8;

#[derive(Debug, Default)]
struct StatusInner {
    phase: &'static str,
    last_error: Option<String>,
    /// The last few errors, oldest first (a retry's error soon replaces the one that
    /// caused it as the last).
    recent_errors: std::collections::VecDeque<String>,
    snapshot_table: Option<String>,
    snapshot_rows: u64,
    confirmed_lsn: u64,
    retained_wal_bytes: Option<u64>,
    wal_status: Option<String>,
    slot_checked: Option<std::time::SystemTime>,
    slot: String,
    /// Resyncs asked for and not taken by the stream yet.
    resync_requests: Vec<String>,
    /// Resyncs waiting or running, as `/status` shows them.
    resyncs: Vec<serde_json::Value>,
}

/// What a source is doing, for `/status` (shared with the admin endpoint).
#[derive(Debug, Default)]
pub struct SourceStatus {
    inner: Mutex<StatusInner>,
    /// Wakes the stream when a resync is asked for.
    resync_asked: tokio::sync::Notify,
}

impl SourceStatus {
    fn lock(&self) -> std::sync::MutexGuard<'_, StatusInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_phase(&self, phase: &'static str) {
        self.lock().phase = phase;
    }

    fn set_error(&self, e: Option<String>) {
        let mut s = self.lock();
        if let Some(e) = &e {
            if s.recent_errors.len() >= RECENT_ERRORS {
                s.recent_errors.pop_front();
            }
            s.recent_errors.push_back(e.clone());
        }
        s.last_error = e;
    }

    fn set_snapshot(&self, table: Option<String>, rows: u64) {
        let mut s = self.lock();
        s.snapshot_table = table;
        s.snapshot_rows = rows;
    }

    /// Asks the running source to copy `table` again (see `stream::resync`).
    pub fn request_resync(&self, table: &str) {
        self.lock().resync_requests.push(table.to_string());
        self.resync_asked.notify_one();
    }

    fn take_resync_requests(&self) -> Vec<String> {
        std::mem::take(&mut self.lock().resync_requests)
    }

    fn set_resyncs(&self, list: Vec<serde_json::Value>) {
        self.lock().resyncs = list;
    }

    /// More rows of `table`'s copy are spooled (workers of a parallel copy add theirs).
    fn add_snapshot_rows(&self, table: &str, n: u64) {
        let mut s = self.lock();
        if s.snapshot_table.as_deref() != Some(table) {
            s.snapshot_table = Some(table.to_string());
            s.snapshot_rows = 0;
        }
        s.snapshot_rows += n;
    }

    fn set_confirmed(&self, lsn: u64) {
        self.lock().confirmed_lsn = lsn;
    }

    fn set_slot(
        &self,
        wal_status: Option<String>,
        retained: Option<u64>,
        at: std::time::SystemTime,
    ) {
        let mut s = self.lock();
        s.wal_status = wal_status;
        s.retained_wal_bytes = retained;
        s.slot_checked = Some(at);
    }

    /// `connecting`, `snapshot`, `streaming` or `failed`.
    pub fn phase(&self) -> &'static str {
        match self.lock().phase {
            "" => "connecting",
            p => p,
        }
    }

    /// The last error, if any.
    pub fn last_error(&self) -> Option<String> {
        self.lock().last_error.clone()
    }

    /// The last [`RECENT_ERRORS`] errors, oldest first.
    pub fn recent_errors(&self) -> Vec<String> {
        self.lock().recent_errors.iter().cloned().collect()
    }

    /// The LSN last confirmed to the source.
    pub fn confirmed_lsn(&self) -> u64 {
        self.lock().confirmed_lsn
    }

    /// WAL retained by the slot, bytes, as last read from the source (None: no slot, or
    /// not read yet).
    pub fn retained_wal_bytes(&self) -> Option<u64> {
        self.lock().retained_wal_bytes
    }

    /// The slot's `wal_status` (reserved, extended, unreserved, lost).
    pub fn wal_status(&self) -> Option<String> {
        self.lock().wal_status.clone()
    }

    /// Everything as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let s = self.lock();
        serde_json::json!({
            "phase": match s.phase { "" => "connecting", p => p },
            "slot": s.slot,
            "last_error": s.last_error,
            "recent_errors": s.recent_errors,
            "snapshot": s.snapshot_table.as_ref().map(|t| serde_json::json!({"table": t, "rows": s.snapshot_rows})),
            "resync": s.resyncs,
            "confirmed_lsn": replication::format_lsn(s.confirmed_lsn),
            "retained_wal_bytes": s.retained_wal_bytes,
            "wal_status": s.wal_status,
            "slot_checked_seconds_ago": s.slot_checked
                .map(|t| t.elapsed().unwrap_or_default().as_secs_f64()),
        })
    }
}

/// Test hooks (not for production use).
#[doc(hidden)]
#[derive(Debug, Clone, Default)]
pub struct TestHooks {
    /// Stop (as if told to) once this many tables were copied in one session.
    pub stop_after_tables: Option<usize>,
}

/// Everything one source's sessions share.
pub(crate) struct Ctx {
    pub(crate) cfg: SourceConfig,
    pub(crate) rcfg: ReplicationConfig,
    pub(crate) spool: Arc<Spool>,
    pub(crate) stop: Drain,
    pub(crate) status: Arc<SourceStatus>,
    pub(crate) hooks: TestHooks,
}

impl Ctx {
    pub(crate) fn label(&self) -> String {
        self.cfg.name.clone()
    }
}

/// Runs the source until `stop`; reconnects with backoff after transient errors and
/// returns `Err` only for fatal conditions, with a message that says what to do.
pub async fn run(
    cfg: SourceConfig,
    spool: Arc<Spool>,
    stop: Drain,
    status: Arc<SourceStatus>,
) -> Result<(), SourceError> {
    run_with_hooks(cfg, spool, stop, status, TestHooks::default()).await
}

/// [`run`] with test hooks.
#[doc(hidden)]
pub async fn run_with_hooks(
    cfg: SourceConfig,
    spool: Arc<Spool>,
    stop: Drain,
    status: Arc<SourceStatus>,
    hooks: TestHooks,
) -> Result<(), SourceError> {
    let stopped = metrics::gauge!(STOPPED, "source" => cfg.name.clone());
    stopped.set(0.0);
    let rcfg = match parse_config(&cfg) {
        Ok(r) => r,
        Err(e) => {
            stopped.set(1.0);
            status.set_phase("failed");
            status.set_error(Some(e.to_string()));
            return Err(e);
        }
    };
    status.lock().slot = cfg.slot.clone();
    // Reports the slot until relay-inner stops, also after a fatal error: the slot still
    // holds WAL then.
    tokio::spawn(slot_watch::run(
        cfg.clone(),
        rcfg.clone(),
        status.clone(),
        stop.clone(),
    ));
    let ctx = Ctx {
        cfg,
        rcfg,
        spool,
        stop,
        status,
        hooks,
    };
    let mut backoff = Backoff::new(RECONNECT_INITIAL, RECONNECT_MAX);
    loop {
        if ctx.stop.is_stopping() {
            return Ok(());
        }
        ctx.status.set_phase("connecting");
        let started = Instant::now();
        let sess = session(&ctx);
        futures::pin_mut!(sess);
        let res = tokio::select! {
            r = &mut sess => r,
            _ = ctx.stop.stopping() => {
                // The session sees the stop too: let it sync and confirm, briefly.
                tokio::time::timeout(STOP_GRACE, &mut sess).await.unwrap_or(Ok(()))
            }
        };
        match res {
            Ok(()) => return Ok(()),
            Err(e) => {
                metrics::counter!(ERRORS_TOTAL, "source" => ctx.label(), "reason" => e.reason())
                    .increment(1);
                ctx.status.set_error(Some(e.to_string()));
                if e.is_fatal() {
                    stopped.set(1.0);
                    ctx.status.set_phase("failed");
                    tracing::error!(source = %ctx.cfg.name, error = %e, "CDC source stopped");
                    return Err(e);
                }
                // Not streaming while it waits to reconnect, whatever the session did last.
                ctx.status.set_phase("connecting");
                if started.elapsed() >= HEALTHY_AFTER {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                tracing::warn!(source = %ctx.cfg.name, error = %e, retry_in = ?delay,
                    "CDC source session failed; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = ctx.stop.stopping() => return Ok(()),
                }
            }
        }
    }
}

fn parse_config(cfg: &SourceConfig) -> Result<ReplicationConfig, SourceError> {
    let rcfg = replication::parse_dsn(&cfg.dsn)
        .map_err(|e| SourceError::Fatal(format!("source {}: postgres.dsn: {e}", cfg.name)))?;
    rcfg.tls()
        .map_err(|e| SourceError::Fatal(format!("source {}: postgres.dsn: {e}", cfg.name)))?;
    Ok(rcfg)
}

/// One connected session: checks, publication, slot, snapshot, streaming. `Ok` = stopped.
async fn session(ctx: &Ctx) -> Result<(), SourceError> {
    let cfg = &ctx.cfg;
    // Every wait on the source has a deadline: connecting has `connect_timeout` (in
    // Db::connect and ReplicationClient::connect), the catalog queries `receive_timeout`
    // (stream::bounded), the replication commands theirs (see crate::replication).
    let db = Db::connect(&ctx.rcfg).await?;
    stream::bounded(cfg, "checking the server", db.check_server()).await?;
    let tables =
        stream::bounded(cfg, "looking up the tables", db.resolve_tables(&cfg.tables)).await?;
    stream::bounded(
        cfg,
        "checking the publication",
        db.ensure_publication(&cfg.publication, &tables),
    )
    .await?;
    stream::bounded(cfg, "checking replica identities", async {
        db.warn_replica_identity(&tables).await;
        Ok(())
    })
    .await?;

    let mut state = SnapshotState::load(ctx.spool.dir(), &cfg.slot)?;
    // Tables a reload removed: out of the publication (the sinks keep what they have).
    let gone = state.forget_removed(&cfg.tables);
    if !gone.is_empty() {
        for t in &gone {
            stream::bounded(
                cfg,
                "changing the publication",
                db.drop_from_publication(&cfg.publication, t),
            )
            .await?;
        }
        state.save()?;
    }
    let filters = stream::bounded(
        cfg,
        "setting up the table filters",
        plan_filters(ctx, &db, &tables, &mut state),
    )
    .await?;
    let mut repl = ReplicationClient::connect(&ctx.rcfg).await?;
    let slot = stream::bounded(cfg, "reading the slot", db.slot_info(&cfg.slot)).await?;
    let mut exported = None;
    let confirmed_floor;
    match slot {
        Some(s) => {
            s.check(cfg, &ctx.rcfg)?;
            confirmed_floor = s.confirmed_flush_lsn;
            tracing::info!(source = %cfg.name, slot = %cfg.slot,
                confirmed_flush = %replication::format_lsn(s.confirmed_flush_lsn), "using the replication slot");
        }
        None => {
            // Every table must be copied (again) for a new slot: persist that first, so a
            // crash right after creating the slot cannot leave an old "done" behind.
            state.reset(&cfg.slot);
            state.save()?;
            let created = repl.create_logical_slot(&cfg.slot, "pgoutput").await?;
            tracing::info!(source = %cfg.name, slot = %cfg.slot,
                consistent_point = %replication::format_lsn(created.consistent_point),
                "created the replication slot");
            confirmed_floor = created.consistent_point;
            exported = created
                .snapshot_name
                .map(|name| (name, created.consistent_point));
        }
    }
    if cfg.snapshot == SnapshotMode::Initial {
        let pending: Vec<_> = tables
            .iter()
            .filter(|t| !state.is_done(&t.name))
            .cloned()
            .collect();
        if !pending.is_empty() && exported.is_none() {
            // The slot exists: these tables were added to a running source (a reload, or
            // a restart with a longer list) or their copy was cut off. They are copied by
            // a resync while the stream goes on.
            for t in &pending {
                tracing::info!(source = %cfg.name, table = %t.name,
                    "table not copied yet: copying it by a resync while streaming");
                state.copy_by_resync(t);
            }
            state.save()?;
        } else if !pending.is_empty() {
            ctx.status.set_phase("snapshot");
            // Keep the temporary slot's connection open until the copy is done: its
            // snapshot lives only as long as it.
            let mut _tmp_conn = None;
            let (name, lsn) = match exported.take() {
                Some(e) => e,
                None => {
                    let mut r2 = ReplicationClient::connect(&ctx.rcfg).await?;
                    let tmp_name = format!("routy_tmp_{:08x}", rand::random::<u32>());
                    let tmp = r2
                        .create_temporary_logical_slot(&tmp_name, "pgoutput")
                        .await?;
                    let name = tmp.snapshot_name.ok_or_else(|| {
                        SourceError::Transient("temporary slot exported no snapshot".into())
                    })?;
                    tracing::info!(source = %cfg.name, tables = pending.len(),
                        snapshot_lsn = %replication::format_lsn(tmp.consistent_point),
                        "copying tables not copied yet, in a new snapshot");
                    _tmp_conn = Some(r2);
                    (name, tmp.consistent_point)
                }
            };
            let finished =
                snapshot::copy_tables(ctx, &db, &mut state, &pending, &name, lsn, &filters).await?;
            drop(_tmp_conn);
            ctx.status.set_snapshot(None, 0);
            if !finished {
                return Ok(());
            }
        }
    }
    drop(exported);
    let copied = state.filters(&tables);
    ctx.status.set_phase("streaming");
    ctx.status.set_error(None);
    let wanted = stream::Wanted::new(&tables);
    let pending = state.pending_resyncs();
    stream::stream(
        ctx,
        &db,
        repl,
        stream::Setup {
            copied,
            wanted,
            shaper: filters.shaper,
            wheres: filters.wheres,
            state,
            tables,
            resyncs: pending,
        },
        confirmed_floor,
    )
    .await
}

/// Plans each table's filter ([`shape`]): puts what PostgreSQL can do into the
/// publication (when it changed since relay-inner last did) and returns the rest.
async fn plan_filters(
    ctx: &Ctx,
    db: &Db,
    tables: &[catalog::Table],
    state: &mut SnapshotState,
) -> Result<shape::Filters, SourceError> {
    let cfg = &ctx.cfg;
    let mut local = std::collections::HashMap::new();
    let mut wheres = std::collections::HashMap::new();
    let plain = shape::Pushdown::default().fingerprint();
    for t in tables {
        let push = match cfg.filters.get(&t.name) {
            Some(f) => {
                let info = db.table_info(t).await?;
                let (push, l) = shape::plan(&t.name, f, &info, db.server_version())?;
                local.insert(t.name.clone(), l);
                push
            }
            None => shape::Pushdown::default(),
        };
        let fp = push.fingerprint();
        let changed = match state.published(&t.name) {
            Some(r) => r != fp,
            None => fp != plain,
        };
        if changed && db.server_version() >= 150000 {
            db.set_pushdown(&cfg.publication, t, &push).await?;
            state.set_published(&t.name, fp);
            state.save()?;
        }
        if let Some(w) = push.where_ {
            wheres.insert(t.name.clone(), w);
        }
    }
    Ok(shape::Filters {
        shaper: shape::Shaper::new(cfg, local)?,
        wheres,
    })
}

/// Drops the source's slot and resets its snapshot state (the next start copies every
/// table again with `snapshot: initial`); returns what was done, for the operator.
pub async fn drop_slot(
    cfg: &SourceConfig,
    spool_dir_of_source: &Path,
) -> Result<String, SourceError> {
    let rcfg = parse_config(cfg)?;
    let db = Db::connect(&rcfg).await?;
    let mut state = SnapshotState::load(spool_dir_of_source, &cfg.slot)?;
    let msg = match stream::bounded(cfg, "reading the slot", db.slot_info(&cfg.slot)).await? {
        None => format!(
            "replication slot {} does not exist on {}:{}/{}; nothing to drop",
            cfg.slot, rcfg.host, rcfg.port, rcfg.dbname
        ),
        Some(s) => {
            if let Some(pid) = s.active_pid {
                return Err(SourceError::Transient(format!(
                    "replication slot {} is in use by server process {pid}: stop relay-inner (or the other client using it) first",
                    cfg.slot
                )));
            }
            stream::bounded(cfg, "dropping the slot", db.drop_slot(&cfg.slot)).await?;
            format!(
                "dropped replication slot {} on {}:{}/{}",
                cfg.slot, rcfg.host, rcfg.port, rcfg.dbname
            )
        }
    };
    state.reset(&cfg.slot);
    state.save()?;
    Ok(format!(
        "{msg}; the next start creates a new slot{}",
        if cfg.snapshot == SnapshotMode::Initial {
            " and copies every table again"
        } else {
            ""
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_source_that_stops_on_a_fatal_error_says_so_in_a_gauge() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let metrics = recorder.handle();
        let _local = metrics::set_default_local_recorder(&recorder);
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let cfg = SourceConfig {
            name: "orders".into(),
            dsn: "host=127.0.0.1 sslmode=bogus".into(),
            slot: "routy_orders".into(),
            publication: "routy_orders".into(),
            tables: vec!["public.orders".into()],
            filters: Default::default(),
            mask_key_file: None,
            snapshot: SnapshotMode::Never,
            heartbeat: Duration::ZERO,
            status_interval: Duration::from_secs(10),
            receive_timeout: Duration::ZERO,
            resync_chunk_rows: 10,
            snapshot_parallelism: 1,
            snapshot_chunk_rows: 10,
        };
        let status = Arc::new(SourceStatus::default());
        let r = run(cfg, spool, Drain::new(), status.clone()).await;
        assert!(r.is_err(), "{r:?}");
        assert_eq!(status.phase(), "failed");
        let text = metrics.render();
        assert!(
            text.lines()
                .any(|l| l == "routy_cdc_source_stopped{source=\"orders\"} 1"),
            "{text}"
        );
    }

    fn server(code: &str, message: &str) -> ReplicationError {
        ReplicationError::Server {
            severity: "ERROR".into(),
            code: code.into(),
            message: message.into(),
            detail: None,
        }
    }

    #[test]
    fn replication_errors_are_classified_by_sqlstate() {
        // PostgreSQL 15's answer to START_REPLICATION on an invalidated slot.
        let invalidated = server("55000", "cannot read from logical replication slot \"s\"");
        assert!(SourceError::from(invalidated).is_fatal());
        assert!(SourceError::from(server("42501", "permission denied")).is_fatal());
        // An admin shutdown or a slot in use by another process heals by retrying.
        let shutdown = server(
            "57P01",
            "terminating connection due to administrator command",
        );
        assert!(!SourceError::from(shutdown).is_fatal());
        let in_use = server("55006", "replication slot \"s\" is active for PID 7");
        assert!(!SourceError::from(in_use).is_fatal());
    }
}
