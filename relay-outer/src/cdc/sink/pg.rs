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
//! a constraint or type error) rolls back; the runner logs the source seq and the SQL
//! error, counts it in `routy_cdc_sink_errors_total`, waits (exponential backoff with
//! jitter between `retry.initial` and `retry.max`), and the sink reconnects and resumes
//! from the position stored in the target. Every sink reads the store at its own position,
//! so a failing sink holds back no other sink.
//!
//! Triggers and foreign keys on the target fire as for any client; the target user needs
//! `INSERT`, `UPDATE`, `DELETE`, `TRUNCATE` on the target tables, and `CREATE` on the
//! database (for the `_routy` schema, created once) and on the schemas it creates tables in.

mod apply;
mod table;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::time::Duration;

use relay_proto::cdc::{Event, Relations};
use routy_pg::tls::PgTls;

use super::{
    BatchInfo, BatchLimits, Durability, Flow, Position, SchemaChange, Sink, SinkError, Split,
};
use apply::Conn;

/// Counter: updates and deletes that found no target row, by `sink` and `kind`.
pub const MISSING_ROWS: &str = "routy_cdc_sink_missing_rows_total";

/// Records grouped into one target transaction at most (complete source transactions only).
const GROUP_RECORDS: usize = 1000;
/// Row changes grouped into one target transaction at most (same).
const GROUP_ROWS: usize = 200_000;

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
    /// Apply a source transaction with more row changes than this in several target
    /// transactions of this many, the position written with each (readers of the target
    /// see the part applied so far). `None`: one target transaction per source
    /// transaction, whatever its size.
    pub transaction_chunk_rows: Option<usize>,
}

/// The PostgreSQL sink: one connection at a time, and what outlives it.
#[derive(Debug)]
pub struct PgSink {
    cfg: PgSinkConfig,
    /// Tables whose inserts go row by row (a batch hit the same key twice as the target
    /// sees it).
    per_row: HashSet<String>,
    conn: Option<Conn>,
}

impl PgSink {
    /// A sink that connects on the runner's first session.
    pub fn new(cfg: PgSinkConfig) -> PgSink {
        PgSink {
            cfg,
            per_row: HashSet::new(),
            conn: None,
        }
    }

    fn conn(&mut self) -> Result<&mut Conn, SinkError> {
        self.conn
            .as_mut()
            .ok_or_else(|| SinkError::new("connection", 0, "not connected to the target"))
    }
}

impl Sink for PgSink {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn durability(&self) -> Durability {
        Durability::Transactional
    }

    fn takes_rows(&self) -> bool {
        // An initial copy's rows go to the target's COPY as the source wrote them.
        true
    }

    fn limits(&self) -> BatchLimits {
        match self.cfg.transaction_chunk_rows {
            None => BatchLimits {
                max_records: GROUP_RECORDS,
                max_events: GROUP_ROWS,
                max_bytes: usize::MAX,
                max_delay: Duration::ZERO,
                split: Split::Never,
            },
            // Counted in rows only, so a chunk holds what the operator asked for.
            Some(rows) => BatchLimits {
                max_records: usize::MAX,
                max_events: rows,
                max_bytes: usize::MAX,
                max_delay: Duration::ZERO,
                split: Split::Exact,
            },
        }
    }

    async fn connect(&mut self) -> Result<Option<Position>, Flow> {
        // The statements applied to the target have no client-side deadline on purpose:
        // they may wait on the target's locks (an application holding a row or the
        // table), and an apply cut short would be retried into the same wait. A dead
        // target host is found by TCP keepalives (keepalives_idle 30s, see
        // target_config); the target's own statement_timeout / lock_timeout (settable
        // per role) bound the rest.
        self.conn = None;
        let mut c = Conn::connect(&self.cfg).await?;
        let pos = c.setup().await?;
        self.conn = Some(c);
        Ok(Some(pos))
    }

    async fn begin(&mut self, from: Position) -> Result<(), Flow> {
        self.conn()?.begin(from).await
    }

    async fn write(&mut self, at: Position, ev: Event, _rels: &Relations) -> Result<(), Flow> {
        let per_row = &self.per_row;
        let c = self
            .conn
            .as_mut()
            .ok_or_else(|| SinkError::new("connection", at.seq, "not connected to the target"))?;
        c.event(at.seq, ev, per_row).await
    }

    async fn schema(&mut self, at: Position, change: &SchemaChange) -> Result<(), Flow> {
        self.conn()?.schema(at.seq, change).await
    }

    async fn commit(&mut self, batch: &BatchInfo) -> Result<(), Flow> {
        self.conn()?.commit(batch.next, batch.lsn).await
    }

    async fn abort(&mut self) {
        if let Some(c) = self.conn.as_mut() {
            c.rollback().await;
        }
    }

    async fn fail(&mut self, e: SinkError) -> SinkError {
        let Some(mut c) = self.conn.take() else {
            return e;
        };
        // An awaited query fails when an earlier pipelined statement did: report that.
        let e = if e.pipelined {
            e
        } else {
            c.first_error().await.unwrap_or(e)
        };
        if e.code.as_deref() == Some("21000") {
            // "ON CONFLICT DO UPDATE command cannot affect row a second time".
            if let Some(t) = c.batch_table.take() {
                tracing::warn!(sink = %self.cfg.name, table = %t,
                    "a batched insert hit the same key twice; inserting this table's rows one by one");
                self.per_row.insert(t);
            }
        }
        e
    }

    async fn idle(&mut self, in_batch: bool) -> Result<(), Flow> {
        let c = self.conn()?;
        if c.is_closed() {
            return Err(SinkError::new(
                "connection",
                c.seq + 1,
                "the connection to the target was closed",
            )
            .into());
        }
        if in_batch {
            c.drain().await?;
        }
        Ok(())
    }

    async fn set_position(&mut self, pos: Position) -> Result<(), Flow> {
        self.conn()?.set_offset(pos).await
    }
}

/// A failure from a tokio-postgres error: SQLSTATE, message, detail, hint, where.
pub(crate) fn pg_error(seq: u64, what: &str, e: &tokio_postgres::Error) -> SinkError {
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
