//! One connection's worth of applying: target transactions, pipelined statements, events.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use relay_proto::cdc::{format_lsn, Event, OldRow, Relation, SnapshotPhase, Value};
use tokio::task::JoinHandle;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, Statement};

use super::table::{
    quote_ident, Op, StmtKey, Table, TargetCol, COLUMNS_SQL, W_NULL, W_SKIP, W_VALUE,
};
use super::{pg_error, target_config, PgSinkConfig, MISSING_ROWS};
use crate::cdc::sink::{Flow, Position, SinkError};

mod ddl;
mod resync;

/// Rows per batched insert statement.
const CHUNK_ROWS: usize = 2000;
/// Text bytes per batched insert statement.
const CHUNK_BYTES: usize = 4 << 20;
/// Bytes of an initial copy's rows handed to the open `COPY` at a time.
const COPY_PIECE: usize = 256 << 10;
/// Statements sent and not yet answered at most.
const MAX_INFLIGHT: usize = 256;
/// Parameter bytes of batched inserts sent and not yet answered at most: a large
/// transaction's statements are encoded and queued while the target works, and 256 of
/// them held about 50 MB (2M rows of 100 bytes); at this bound relay-outer's peak through
/// such a transaction is about half that, at the same speed.
const MAX_INFLIGHT_BYTES: usize = 8 << 20;
const SETUP_SQL: &str = "\
SELECT pg_advisory_xact_lock(7235123591);
CREATE SCHEMA IF NOT EXISTS _routy;
CREATE TABLE IF NOT EXISTS _routy.sink_offsets (
    sink text PRIMARY KEY,
    seq bigint NOT NULL,
    lsn text,
    source text,
    updated_at timestamptz DEFAULT now()
);
ALTER TABLE _routy.sink_offsets ADD COLUMN IF NOT EXISTS next_event integer NOT NULL DEFAULT 0;";

/// Why a pipelined statement's result matters.
enum Kind {
    Plain,
    /// An update or delete: 0 rows is a missing row.
    ExpectRow {
        table: String,
        op: &'static str,
    },
    /// A batched insert into this table (for the duplicate-key fallback).
    Batch {
        table: String,
    },
}

struct InFlight {
    result: Pending,
    kind: Kind,
    seq: u64,
    what: &'static str,
    /// Text bytes of its parameters (batched inserts), for [`MAX_INFLIGHT_BYTES`].
    bytes: usize,
}

enum Pending {
    Done(Option<Result<u64, tokio_postgres::Error>>),
    Task(JoinHandle<Result<u64, tokio_postgres::Error>>),
}

/// Inserts waiting to be sent as one statement.
struct Batch {
    rel: u32,
    mask: Vec<u8>,
    cols: Vec<Vec<Option<String>>>,
    rows: usize,
    bytes: usize,
    keys: HashSet<Vec<Option<String>>>,
}

/// One connection to the target and what it knows (tables, prepared statements,
/// statements in flight).
pub(crate) struct Conn {
    cfg: PgSinkConfig,
    client: Arc<Client>,
    conn_task: JoinHandle<()>,
    lock_stmt: Option<Statement>,
    offset_stmt: Option<Statement>,
    tables: HashMap<u32, Table>,
    inflight: VecDeque<InFlight>,
    /// Sum of `bytes` over `inflight`.
    inflight_bytes: usize,
    batch: Option<Batch>,
    /// Table of the batched insert that failed last (for the duplicate-key fallback).
    pub(crate) batch_table: Option<String>,
    /// The position committed in the target (what `begin` expects to find there).
    committed: Position,
    tx_open: bool,
    /// Store seq being applied.
    pub(crate) seq: u64,
    /// Tables between their initial copy's start (the target table emptied) and its end,
    /// as seen in this session: their rows go in with `COPY` (no key can be there yet).
    copying: HashSet<u32>,
    /// The `COPY ... FROM STDIN` into a table of `copying` that rows go to, kept open
    /// while they come, so the target works on them while the sink reads on.
    copy: Option<CopyIn>,
}

/// An initial copy's rows on their way to the target.
struct CopyIn {
    rel: u32,
    /// Rows not handed over yet, in COPY's text format.
    buf: Vec<u8>,
    /// The open statement (`None` until the first piece is sent).
    sink: Option<std::pin::Pin<Box<tokio_postgres::CopyInSink<bytes::Bytes>>>>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("sink", &self.cfg.name)
            .field("committed", &self.committed)
            .finish()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        for f in &self.inflight {
            if let Pending::Task(h) = &f.result {
                h.abort();
            }
        }
        self.conn_task.abort();
    }
}

impl Conn {
    pub(crate) async fn connect(cfg: &PgSinkConfig) -> Result<Conn, SinkError> {
        let (pc, tls) = target_config(cfg).map_err(|e| SinkError::new("config", 0, e))?;
        // tokio-postgres's connect_timeout covers the TCP connect only: TLS, startup and
        // authentication get the same deadline.
        let limit = pc
            .get_connect_timeout()
            .copied()
            .unwrap_or(Duration::from_secs(10));
        let (client, conn) = tokio::time::timeout(limit, pc.connect(tls.make_tls_connect()))
            .await
            .map_err(|_| {
                SinkError::new(
                    "connection",
                    0,
                    format!("connecting to the target: no answer within {limit:?}"),
                )
            })?
            .map_err(|e| pg_error(0, "connecting to the target", &e))?;
        let sink = cfg.name.clone();
        let conn_task = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(sink = %sink, "target connection ended: {e}");
            }
        });
        Ok(Conn {
            cfg: cfg.clone(),
            client: Arc::new(client),
            conn_task,
            lock_stmt: None,
            offset_stmt: None,
            tables: HashMap::new(),
            inflight: VecDeque::new(),
            inflight_bytes: 0,
            batch: None,
            batch_table: None,
            committed: Position::START,
            tx_open: false,
            seq: 0,
            copying: HashSet::new(),
            copy: None,
        })
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    fn pg_err(&self, what: &str, e: &tokio_postgres::Error) -> SinkError {
        pg_error(self.seq, what, e)
    }

    /// Creates the offset table and this sink's row; reads the committed position.
    pub(crate) async fn setup(&mut self) -> Result<Position, Flow> {
        let c = self.client.clone();
        let name = self.cfg.name.clone();
        let r: Result<(u64, i32, Option<String>), tokio_postgres::Error> = async {
            c.batch_execute(&format!("BEGIN; {SETUP_SQL}")).await?;
            c.execute(
                "INSERT INTO _routy.sink_offsets (sink, seq, source) VALUES ($1, 0, $2) \
                 ON CONFLICT (sink) DO NOTHING",
                &[&name, &self.cfg.source],
            )
            .await?;
            let row = c
                .query_one(
                    "SELECT seq, next_event, source FROM _routy.sink_offsets WHERE sink = $1",
                    &[&name],
                )
                .await?;
            let seq: i64 = row.get(0);
            let next_event: i32 = row.get(1);
            let source: Option<String> = row.get(2);
            if seq <= 0 && next_event <= 0 && source.as_deref() != Some(self.cfg.source.as_str()) {
                // No position yet: the row is this source's from now on.
                c.execute(
                    "UPDATE _routy.sink_offsets SET source = $2 WHERE sink = $1",
                    &[&name, &self.cfg.source],
                )
                .await?;
            }
            c.batch_execute("COMMIT").await?;
            Ok((seq.max(0) as u64, next_event.max(0), source))
        }
        .await;
        let (seq, next_event, source) =
            r.map_err(|e| self.pg_err("setting up _routy.sink_offsets", &e))?;
        if let Some(other) = source.filter(|s| seq > 0 && *s != self.cfg.source) {
            return Err(SinkError::new(
                "config",
                seq,
                format!(
                    "sink name {name} already holds the position of source {other} (seq {seq}) in this \
                     target, but this sink reads source {}; pick another sink name, or delete its \
                     row in _routy.sink_offsets (DELETE FROM _routy.sink_offsets WHERE sink = '{}') \
                     to start it over",
                    self.cfg.source,
                    name.replace('\'', "''")
                ),
            )
            .into());
        }
        self.lock_stmt = Some(
            c.prepare_typed(
                "SELECT seq, next_event FROM _routy.sink_offsets WHERE sink = $1 FOR UPDATE",
                &[Type::TEXT],
            )
            .await
            .map_err(|e| self.pg_err("preparing", &e))?,
        );
        self.offset_stmt = Some(
            c.prepare_typed(
                "UPDATE _routy.sink_offsets SET seq = $2::bigint, next_event = $5::integer, \
                 lsn = COALESCE($3, lsn), source = $4, updated_at = now() WHERE sink = $1",
                &[Type::TEXT, Type::TEXT, Type::TEXT, Type::TEXT, Type::TEXT],
            )
            .await
            .map_err(|e| self.pg_err("preparing", &e))?,
        );
        let pos = from_offset(seq, next_event);
        self.committed = pos;
        Ok(pos)
    }

    /// Moves this sink's offset row to `pos` (a replay), outside any transaction.
    pub(crate) async fn set_offset(&mut self, pos: Position) -> Result<(), Flow> {
        let (seq, next_event) = to_offset(pos);
        self.client
            .execute(
                "UPDATE _routy.sink_offsets SET seq = $2, next_event = $3, lsn = NULL, \
                 updated_at = now() WHERE sink = $1",
                &[&self.cfg.name, &(seq as i64), &(next_event as i32)],
            )
            .await
            .map_err(|e| self.pg_err("moving the sink offset (replay)", &e))?;
        self.committed = pos;
        Ok(())
    }

    /// BEGIN, and lock this sink's offset row (a second process running the same sink
    /// waits here, and finds the offset moved).
    pub(crate) async fn begin(&mut self, from: Position) -> Result<(), Flow> {
        self.committed = from;
        self.send_simple("BEGIN", "BEGIN");
        let stmt = self.lock_stmt.clone().expect("prepared in setup");
        let r = self.client.query_opt(&stmt, &[&self.cfg.name]).await;
        let row = r.map_err(|e| self.pg_err("locking the sink offset", &e))?;
        let stored = match row {
            Some(r) => from_offset(r.get::<_, i64>(0).max(0) as u64, r.get::<_, i32>(1).max(0)),
            None => {
                return Err(SinkError::new(
                    "conflict",
                    self.seq,
                    format!(
                        "the offset row of sink {} in _routy.sink_offsets is gone",
                        self.cfg.name
                    ),
                )
                .into())
            }
        };
        if stored != self.committed {
            return Err(Flow::Restart {
                after_durable: None,
                why: format!(
                    "the offset of sink {} in the target moved from {} to {stored}: is another relay-outer running it?",
                    self.cfg.name, self.committed
                ),
            });
        }
        self.tx_open = true;
        Ok(())
    }

    /// Writes the offset `next` (and the source LSN reached) and commits.
    pub(crate) async fn commit(&mut self, next: Position, lsn: Option<u64>) -> Result<(), Flow> {
        if !self.tx_open {
            return Ok(());
        }
        self.flush().await?;
        let stmt = self.offset_stmt.clone().expect("prepared in setup");
        let (seq, next_event) = to_offset(next);
        let params = vec![
            Some(self.cfg.name.clone()),
            Some(seq.to_string()),
            lsn.map(format_lsn),
            Some(self.cfg.source.clone()),
            Some(next_event.to_string()),
        ];
        self.send(&stmt, params, Kind::Plain, "writing the sink offset");
        self.send_simple("COMMIT", "COMMIT");
        self.drain().await?;
        self.tx_open = false;
        self.committed = next;
        tracing::debug!(sink = %self.cfg.name, position = %next, "committed");
        Ok(())
    }

    /// Best-effort rollback before a restart on the same connection's way out.
    pub(crate) async fn rollback(&mut self) {
        // A COPY dropped unfinished is aborted (CopyFail).
        self.copy = None;
        // Bounded: a target that stopped answering must not hold a restart or a shutdown
        // up; the connection is dropped afterwards anyway, which rolls back too.
        let grace = Duration::from_secs(5);
        let _ = tokio::time::timeout(grace, async {
            while let Some(f) = self.inflight.pop_front() {
                let _ = wait(f.result).await;
            }
            if self.tx_open {
                let _ = self.client.batch_execute("ROLLBACK").await;
            }
        })
        .await;
        self.inflight.clear();
        self.inflight_bytes = 0;
        self.tx_open = false;
    }

    /// Sends a prepared statement with text parameters without waiting for its result.
    fn send<P>(&mut self, stmt: &Statement, params: Vec<P>, kind: Kind, what: &'static str)
    where
        P: tokio_postgres::types::ToSql + Sync + Send + 'static,
    {
        let client = self.client.clone();
        let stmt = stmt.clone();
        let fut = async move { client.execute_raw(&stmt, params).await };
        self.push(Box::pin(fut), kind, what, 0);
    }

    /// Sends a simple-protocol statement without waiting for its result.
    fn send_simple(&mut self, sql: &str, what: &'static str) {
        let client = self.client.clone();
        let sql = sql.to_string();
        let fut = async move { client.batch_execute(&sql).await.map(|_| 0) };
        self.push(Box::pin(fut), Kind::Plain, what, 0);
    }

    fn push(
        &mut self,
        mut fut: std::pin::Pin<
            Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + Send + 'static>,
        >,
        kind: Kind,
        what: &'static str,
        bytes: usize,
    ) {
        // The first poll writes the request, so requests go out in this order; the task
        // then collects the answer while we go on.
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        let result = match fut.as_mut().poll(&mut cx) {
            Poll::Ready(r) => Pending::Done(Some(r)),
            Poll::Pending => Pending::Task(tokio::spawn(fut)),
        };
        self.inflight_bytes += bytes;
        self.inflight.push_back(InFlight {
            result,
            kind,
            seq: self.seq,
            what,
            bytes,
        });
    }

    /// Waits for the oldest statements while too many are outstanding.
    async fn throttle(&mut self) -> Result<(), Flow> {
        while self.inflight.len() > MAX_INFLIGHT || self.inflight_bytes > MAX_INFLIGHT_BYTES {
            let Some(f) = self.inflight.pop_front() else {
                break;
            };
            self.finish(f).await?;
        }
        Ok(())
    }

    /// Ends an open COPY and waits for every outstanding statement.
    pub(crate) async fn drain(&mut self) -> Result<(), Flow> {
        self.flush_copy().await?;
        self.drain_statements().await
    }

    async fn drain_statements(&mut self) -> Result<(), Flow> {
        while let Some(f) = self.inflight.pop_front() {
            self.finish(f).await?;
        }
        Ok(())
    }

    async fn finish(&mut self, f: InFlight) -> Result<(), Flow> {
        self.inflight_bytes = self.inflight_bytes.saturating_sub(f.bytes);
        match wait(f.result).await {
            Ok(rows) => {
                if let Kind::ExpectRow { table, op } = &f.kind {
                    if rows == 0 {
                        tracing::warn!(sink = %self.cfg.name, seq = f.seq, table = %table,
                            "{op} found no row in the target; skipped");
                        metrics::counter!(MISSING_ROWS, "sink" => self.cfg.name.clone(), "kind" => "postgres").increment(1);
                    }
                }
                Ok(())
            }
            Err(Failed::Pg(e)) => {
                if let Kind::Batch { table } = &f.kind {
                    self.batch_table = Some(table.clone());
                }
                let mut e = pg_error(f.seq, f.what, &e);
                e.pipelined = true;
                Err(e.into())
            }
            Err(Failed::Task(e)) => {
                let mut e = SinkError::new(
                    "sql",
                    f.seq,
                    format!("{}: the statement's outcome is unknown: {e}", f.what),
                );
                e.pipelined = true;
                Err(e.into())
            }
        }
    }

    /// After a failure: the first error among the outstanding statements, if any.
    pub(crate) async fn first_error(&mut self) -> Option<SinkError> {
        while let Some(f) = self.inflight.pop_front() {
            if let Err(Flow::Fail(e)) = self.finish(f).await {
                return Some(e);
            }
        }
        None
    }

    /// Applies one event of the open transaction (Begin and Commit are the runner's).
    pub(crate) async fn event(
        &mut self,
        seq: u64,
        ev: Event,
        per_row: &HashSet<String>,
    ) -> Result<(), Flow> {
        self.seq = seq;
        {
            match ev {
                // Copy rows come outside source transactions: a transaction means no copy
                // runs now (the stream starts after a copy's end, or a cut-off copy was
                // given up and its table is resynced).
                Event::Begin { .. } => {
                    self.flush().await?;
                    self.copying.clear();
                }
                Event::Commit { .. } => {}
                Event::Relation(r) => self.observe(r).await?,
                Event::Insert { rel, new } => self.insert(rel, new, per_row).await?,
                Event::Rows { rel, rows, data } => self.copy_rows(rel, rows, data, per_row).await?,
                Event::Update { rel, old, new } => {
                    self.flush().await?;
                    self.update(rel, old, new).await?;
                }
                Event::Delete { rel, old } => {
                    self.flush().await?;
                    self.delete(rel, old).await?;
                }
                Event::Truncate {
                    rels,
                    cascade,
                    restart_identity,
                } => {
                    self.flush().await?;
                    self.truncate(&rels, cascade, restart_identity).await?;
                }
                Event::Message {
                    transactional,
                    prefix,
                    content,
                    ..
                } => {
                    tracing::debug!(sink = %self.cfg.name, seq, transactional, prefix = %prefix,
                        bytes = content.len(), "logical message ignored");
                }
                Event::Chunk { rel, lo, hi, keys } => self.chunk(rel, lo, hi, keys).await?,
                Event::Snapshot { rel, phase, value } => {
                    self.flush().await?;
                    self.ensure_table_for(rel, phase == SnapshotPhase::Start)
                        .await?;
                    if phase != SnapshotPhase::Start {
                        self.ensure_key(rel).await?;
                    }
                    let t = &self.tables[&rel];
                    match phase {
                        SnapshotPhase::Start => {
                            tracing::info!(sink = %self.cfg.name, seq, table = %t.display,
                                "initial copy starts; emptying the target table");
                            let sql = format!("TRUNCATE {}", t.ident);
                            self.send_simple(&sql, "emptying the table for its initial copy");
                            self.copying.insert(rel);
                        }
                        SnapshotPhase::Resync => {
                            // A resync's rows are upserts: the table was not emptied (a
                            // copy cut off before may have left rows behind).
                            self.copying.remove(&rel);
                            tracing::info!(sink = %self.cfg.name, seq, table = %t.display,
                                "resync starts: rows are replaced chunk by chunk, the table is not emptied");
                        }
                        SnapshotPhase::Done => {
                            self.copying.remove(&rel);
                            tracing::info!(sink = %self.cfg.name, seq, table = %t.display,
                                rows = value, "initial copy applied");
                        }
                    }
                }
            }
            self.throttle().await?;
        }
        Ok(())
    }

    async fn observe(&mut self, r: Relation) -> Result<(), Flow> {
        if self.tables.get(&r.id).is_some_and(|t| t.rel == r) {
            return Ok(());
        }
        if self.batch.as_ref().is_some_and(|b| b.rel == r.id)
            || self.copy.as_ref().is_some_and(|c| c.rel == r.id)
        {
            self.flush().await?;
        }
        if self.tables.contains_key(&r.id) {
            tracing::info!(sink = %self.cfg.name, seq = self.seq, table = %r.qualified(),
                "table definition changed");
        }
        let t = Table::new(r, self.cfg.schema.as_deref());
        self.tables.insert(t.rel.id, t);
        Ok(())
    }

    fn table(&self, rel: u32) -> Result<&Table, SinkError> {
        self.tables.get(&rel).ok_or_else(|| {
            SinkError::store(
                self.seq,
                format!(
                    "record {} uses relation {rel} before describing it",
                    self.seq
                ),
            )
        })
    }

    /// Reads the target columns of a table: name → (type, has equality).
    async fn target_columns(
        &mut self,
        schema: &str,
        name: &str,
    ) -> Result<HashMap<String, (String, bool)>, Flow> {
        self.drain().await?;
        let rows = self
            .client
            .query(COLUMNS_SQL, &[&schema, &name])
            .await
            .map_err(|e| self.pg_err("reading the target table's columns", &e))?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get::<_, String>(0),
                    (r.get::<_, String>(1), r.get::<_, bool>(2)),
                )
            })
            .collect())
    }

    /// Warns of columns created as `text` because their source type is not a plain type
    /// name (it came over the tunnel and is pasted into the SQL).
    fn warn_replaced_types(&self, rel: u32, idx: &[usize]) {
        let t = &self.tables[&rel];
        for (col, ty) in t.replaced_types(idx) {
            tracing::warn!(sink = %self.cfg.name, seq = self.seq, table = %t.display, column = %col,
                "the source type {ty:?} is not a plain type name; creating the column as text");
        }
    }

    /// Checks (and with `create_tables`, creates) the target table of `rel`.
    async fn ensure_table(&mut self, rel: u32) -> Result<(), Flow> {
        self.ensure_table_for(rel, false).await
    }

    /// Checks (and creates, with `create_tables`) the target table. Created for an
    /// initial copy (`copy`), a keyed table gets its primary key once the copy's rows
    /// are in (see [`Conn::ensure_key`]); found without a unique index on the key (a copy
    /// cut off by a restart of this sink), it gets it before the first write that needs it.
    async fn ensure_table_for(&mut self, rel: u32, copy: bool) -> Result<(), Flow> {
        let t = self.table(rel)?;
        if t.ready {
            return Ok(());
        }
        let (schema, name, tdisp) = (t.schema.clone(), t.rel.name.clone(), t.display.clone());
        let mut cols = self.target_columns(&schema, &name).await?;
        let create = self.cfg.create_tables;
        let mut created = false;
        if cols.is_empty() {
            if !create {
                return Err(SinkError::new(
                    "schema",
                    self.seq,
                    format!(
                        "target table {tdisp} does not exist (create it, or set create_tables)"
                    ),
                )
                .into());
            }
            let exists = self
                .client
                .query_opt(
                    "SELECT 1 FROM pg_namespace WHERE nspname::text = $1",
                    &[&schema],
                )
                .await
                .map_err(|e| self.pg_err("looking up the target schema", &e))?
                .is_some();
            if !exists {
                self.send_simple(
                    &format!("CREATE SCHEMA IF NOT EXISTS {}", quote_ident(&schema)),
                    "creating the target schema",
                );
            }
            let all: Vec<usize> = (0..self.tables[&rel].rel.columns.len()).collect();
            self.warn_replaced_types(rel, &all);
            let sql = self.tables[&rel].create_sql(copy);
            self.send_simple(&sql, "creating the target table");
            tracing::info!(sink = %self.cfg.name, table = %tdisp, "creating the target table: {sql}");
            cols = self.target_columns(&schema, &name).await?;
            created = true;
        }
        let t = &self.tables[&rel];
        let missing: Vec<usize> = t
            .rel
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| !cols.contains_key(&c.name))
            .map(|(i, _)| i)
            .collect();
        if !missing.is_empty() {
            let names: Vec<&str> = missing
                .iter()
                .map(|&i| t.rel.columns[i].name.as_str())
                .collect();
            if !create {
                return Err(SinkError::new(
                    "schema",
                    self.seq,
                    format!(
                        "target table {tdisp} lacks column(s) {} (add them, or set create_tables)",
                        names.join(", ")
                    ),
                )
                .into());
            }
            tracing::info!(sink = %self.cfg.name, table = %tdisp, "adding column(s) {}", names.join(", "));
            self.warn_replaced_types(rel, &missing);
            let t = &self.tables[&rel];
            let sqls: Vec<String> = missing.iter().map(|&i| t.add_column_sql(i)).collect();
            for sql in sqls {
                self.send_simple(&sql, "adding a target column");
            }
            cols = self.target_columns(&schema, &name).await?;
        }
        let t = &self.tables[&rel];
        let key_deferred = if !create || !t.keyed || t.key_idx.is_empty() {
            false
        } else if created {
            copy
        } else {
            let key: Vec<String> = t
                .key_idx
                .iter()
                .map(|&i| t.rel.columns[i].name.clone())
                .collect();
            self.drain().await?;
            let row = self
                .client
                .query_one(ddl::UNIQUE_SQL, &[&schema, &name, &key])
                .await
                .map_err(|e| self.pg_err("looking for the target table's key index", &e))?;
            !row.get::<_, bool>(0)
        };
        let t = self.tables.get_mut(&rel).expect("checked");
        t.key_deferred = key_deferred;
        let mut out = Vec::with_capacity(t.rel.columns.len());
        for c in &t.rel.columns {
            let Some((ty, has_eq)) = cols.get(&c.name) else {
                return Err(SinkError::new(
                    "schema",
                    self.seq,
                    format!("target table {tdisp} lacks column {}", c.name),
                )
                .into());
            };
            out.push(TargetCol {
                name: quote_ident(&c.name),
                ty: ty.clone(),
                has_eq: *has_eq,
            });
        }
        t.cols = out;
        t.stmts.clear();
        t.ready = true;
        Ok(())
    }

    /// Adds the primary key a table created for its initial copy was created without,
    /// after the rows sent so far: before the first write that needs a key, or when the
    /// copy is done.
    async fn ensure_key(&mut self, rel: u32) -> Result<(), Flow> {
        if !self.tables.get(&rel).is_some_and(|t| t.key_deferred) {
            return Ok(());
        }
        self.flush().await?;
        let t = self.tables.get_mut(&rel).expect("checked");
        t.key_deferred = false;
        let sql = t.add_key_sql();
        tracing::info!(sink = %self.cfg.name, table = %t.display,
            "building the target table's primary key after its initial copy: {sql}");
        self.send_simple(
            &sql,
            "adding the primary key after the initial copy (duplicate keys in the target?)",
        );
        Ok(())
    }

    /// The cached statement for a shape, prepared on first use.
    async fn stmt(
        &mut self,
        rel: u32,
        key: StmtKey,
        nparams: usize,
        ty: Type,
    ) -> Result<Statement, Flow> {
        let t = self.tables.get(&rel).expect("ensured");
        if let Some(s) = t.stmts.get(&key) {
            return Ok(s.clone());
        }
        let n = t.rel.columns.len();
        let sql = match key.op {
            Op::InsertBatch => t.insert_batch_sql(&key.shape),
            Op::InsertRow => t.insert_row_sql(&key.shape),
            Op::Update => t.update_sql(&key.shape[..n], &key.shape[n..]),
            Op::Delete => t.delete_sql(&key.shape),
        };
        self.drain().await?;
        let types = vec![ty; nparams];
        let stmt = self
            .client
            .prepare_typed(&sql, &types)
            .await
            .map_err(|e| self.pg_err(&format!("preparing {sql}"), &e))?;
        self.tables
            .get_mut(&rel)
            .expect("ensured")
            .stmts
            .insert(key, stmt.clone());
        Ok(stmt)
    }

    fn check_len(&self, rel: u32, got: usize) -> Result<(), SinkError> {
        let t = &self.tables[&rel];
        if got != t.rel.columns.len() {
            return Err(SinkError::store(
                self.seq,
                format!(
                    "a row of {} has {got} values but the relation has {} columns",
                    t.display,
                    t.rel.columns.len()
                ),
            ));
        }
        Ok(())
    }

    async fn insert(
        &mut self,
        rel: u32,
        new: Vec<Value>,
        per_row: &HashSet<String>,
    ) -> Result<(), Flow> {
        self.ensure_table(rel).await?;
        self.check_len(rel, new.len())?;
        if self.copying.contains(&rel) && !new.iter().any(|v| matches!(v, Value::Unchanged)) {
            return self.copy_row(rel, new).await;
        }
        self.ensure_key(rel).await?;
        let mask: Vec<u8> = new
            .iter()
            .map(|v| u8::from(!matches!(v, Value::Unchanged)))
            .collect();
        let t = &self.tables[&rel];
        if per_row.contains(&t.display) {
            self.flush().await?;
            let params: Vec<Option<String>> = new.into_iter().filter_map(text_param).collect();
            let n = params.len();
            let stmt = self
                .stmt(
                    rel,
                    StmtKey {
                        op: Op::InsertRow,
                        shape: mask,
                    },
                    n,
                    Type::TEXT,
                )
                .await?;
            self.send(&stmt, params, Kind::Plain, "inserting a row");
            return Ok(());
        }
        let key: Option<Vec<Option<String>>> = t.keyed.then(|| {
            t.key_idx
                .iter()
                .map(|&i| match &new[i] {
                    Value::Text(s) => Some(s.clone()),
                    _ => None,
                })
                .collect()
        });
        let fits = self.batch.as_ref().is_some_and(|b| {
            b.rel == rel && b.mask == mask && key.as_ref().is_none_or(|k| !b.keys.contains(k))
        });
        if !fits {
            self.flush().await?;
            let ncols = mask.iter().filter(|m| **m != 0).count();
            self.batch = Some(Batch {
                rel,
                mask,
                cols: vec![Vec::with_capacity(CHUNK_ROWS); ncols],
                rows: 0,
                bytes: 0,
                keys: HashSet::new(),
            });
        }
        let b = self.batch.as_mut().expect("set above");
        let mut c = 0;
        for v in new {
            match v {
                Value::Unchanged => continue,
                Value::Null => b.cols[c].push(None),
                Value::Text(s) => {
                    b.bytes += s.len();
                    b.cols[c].push(Some(s));
                }
            }
            c += 1;
        }
        b.rows += 1;
        if let Some(k) = key {
            b.keys.insert(k);
        }
        if b.rows >= CHUNK_ROWS || b.bytes >= CHUNK_BYTES {
            self.flush().await?;
        }
        Ok(())
    }

    /// Rows of a copy as the source's `COPY` wrote them (checked when the store took
    /// them: lines of the relation's columns): into the open `COPY` as they are during a
    /// table's initial copy, else (a resync's rows, or a copy after a restart of this
    /// sink) as inserts.
    async fn copy_rows(
        &mut self,
        rel: u32,
        rows: u32,
        data: Vec<u8>,
        per_row: &HashSet<String>,
    ) -> Result<(), Flow> {
        self.ensure_table(rel).await?;
        if !self.copying.contains(&rel) {
            let ncols = self.table(rel)?.rel.columns.len();
            let mut inserts = Vec::with_capacity(rows as usize);
            relay_proto::copy_text::each_copy_row(&data, rows, ncols, |new| inserts.push(new))
                .map_err(|e| SinkError::store(self.seq, format!("record {}: {e}", self.seq)))?;
            for new in inserts {
                self.insert(rel, new, per_row).await?;
            }
            return Ok(());
        }
        let buf = self.copy_buf(rel).await?;
        if buf.is_empty() {
            // Handed over as it came, without a copy.
            *buf = data;
        } else {
            buf.extend_from_slice(&data);
        }
        self.send_copy_piece_if_full().await
    }

    /// Adds a row of an initial copy to the open `COPY` (handed over in pieces of
    /// [`COPY_PIECE`] bytes).
    async fn copy_row(&mut self, rel: u32, new: Vec<Value>) -> Result<(), Flow> {
        let buf = self.copy_buf(rel).await?;
        if buf.capacity() == 0 {
            // One piece's room, not grown row by row (a piece sent leaves an empty buffer).
            buf.reserve(COPY_PIECE + 4096);
        }
        for (i, v) in new.iter().enumerate() {
            if i > 0 {
                buf.push(b'\t');
            }
            match v {
                Value::Text(s) => copy_escape(buf, s),
                _ => buf.extend_from_slice(b"\\N"),
            }
        }
        buf.push(b'\n');
        self.send_copy_piece_if_full().await
    }

    /// The buffer of the open `COPY` into `rel` (other work pending is sent first).
    async fn copy_buf(&mut self, rel: u32) -> Result<&mut Vec<u8>, Flow> {
        if self.copy.as_ref().is_some_and(|c| c.rel != rel) || self.batch.is_some() {
            self.flush().await?;
        }
        let c = self.copy.get_or_insert_with(|| CopyIn {
            rel,
            buf: Vec::new(),
            sink: None,
        });
        Ok(&mut c.buf)
    }

    async fn send_copy_piece_if_full(&mut self) -> Result<(), Flow> {
        if self
            .copy
            .as_ref()
            .is_some_and(|c| c.buf.len() >= COPY_PIECE)
        {
            self.send_copy_piece().await?;
        }
        Ok(())
    }

    /// Hands the buffered rows to the COPY, opening it first (after every statement in
    /// flight: the target applies in order).
    async fn send_copy_piece(&mut self) -> Result<(), Flow> {
        if self.copy.as_ref().is_some_and(|c| c.sink.is_none()) {
            self.drain_statements().await?;
        }
        let Some(c) = self.copy.as_mut() else {
            return Ok(());
        };
        let t = &self.tables[&c.rel];
        let piece = bytes::Bytes::from(std::mem::take(&mut c.buf));
        let res = async {
            if c.sink.is_none() {
                let cols: Vec<&str> = t.cols.iter().map(|col| col.name.as_str()).collect();
                let sql = format!("COPY {} ({}) FROM STDIN", t.ident, cols.join(", "));
                c.sink = Some(Box::pin(self.client.copy_in(sql.as_str()).await?));
            }
            use futures::SinkExt;
            match c.sink.as_mut() {
                Some(sink) => sink.send(piece).await,
                None => Ok(()),
            }
        }
        .await;
        res.map_err(|e| self.copy_err(&e))
    }

    /// A failed COPY, naming its table.
    fn copy_err(&self, e: &tokio_postgres::Error) -> Flow {
        let table = self
            .copy
            .as_ref()
            .and_then(|c| self.tables.get(&c.rel))
            .map_or("?", |t| t.display.as_str());
        self.pg_err(&format!("copying rows into {table}"), e).into()
    }

    /// Ends the open COPY: sends what is buffered and waits for the target's answer.
    async fn flush_copy(&mut self) -> Result<(), Flow> {
        if self
            .copy
            .as_ref()
            .is_none_or(|c| c.buf.is_empty() && c.sink.is_none())
        {
            self.copy = None;
            return Ok(());
        }
        self.send_copy_piece().await?;
        let res = match self.copy.as_mut().and_then(|c| c.sink.as_mut()) {
            Some(sink) => sink.as_mut().finish().await.map(|_| ()),
            None => Ok(()),
        };
        let res = res.map_err(|e| self.copy_err(&e));
        self.copy = None;
        res
    }

    /// Sends the pending batched insert (or copy).
    async fn flush(&mut self) -> Result<(), Flow> {
        self.flush_copy().await?;
        let Some(b) = self.batch.take() else {
            return Ok(());
        };
        let n = b.cols.len();
        let stmt = self
            .stmt(
                b.rel,
                StmtKey {
                    op: Op::InsertBatch,
                    shape: b.mask,
                },
                n,
                Type::TEXT_ARRAY,
            )
            .await?;
        let table = self.tables[&b.rel].display.clone();
        let client = self.client.clone();
        let fut = async move { client.execute_raw(&stmt, b.cols).await };
        self.push(
            Box::pin(fut),
            Kind::Batch { table },
            "inserting rows",
            b.bytes,
        );
        self.throttle().await
    }

    async fn update(&mut self, rel: u32, old: Option<OldRow>, new: Vec<Value>) -> Result<(), Flow> {
        self.ensure_table(rel).await?;
        self.ensure_key(rel).await?;
        self.check_len(rel, new.len())?;
        if let Some(o) = &old {
            self.check_len(rel, o.values.len())?;
        }
        let t = &self.tables[&rel];
        let n = new.len();
        let Some((filter, fvals)) = self.filter(t, old.as_ref().map(|o| &o.values[..]), &new)
        else {
            self.missing(
                rel,
                "update",
                "no old row to match (needs REPLICA IDENTITY FULL on the source)",
            );
            return Ok(());
        };
        let key_changed = t.keyed
            && old
                .as_ref()
                .is_some_and(|o| t.key_idx.iter().any(|&i| o.values[i] != new[i]));
        let mut set = vec![0u8; n];
        let mut params = Vec::with_capacity(n + fvals.len());
        for (i, v) in new.into_iter().enumerate() {
            if t.keyed && !key_changed && t.key_idx.contains(&i) {
                continue;
            }
            match v {
                Value::Unchanged => continue,
                Value::Null => params.push(None),
                Value::Text(s) => params.push(Some(s)),
            }
            set[i] = 1;
        }
        if params.is_empty() {
            return Ok(());
        }
        params.extend(fvals);
        let display = t.display.clone();
        let mut shape = set;
        shape.extend_from_slice(&filter);
        let np = params.len();
        let stmt = self
            .stmt(
                rel,
                StmtKey {
                    op: Op::Update,
                    shape,
                },
                np,
                Type::TEXT,
            )
            .await?;
        self.send(
            &stmt,
            params,
            Kind::ExpectRow {
                table: display,
                op: "update",
            },
            "updating a row",
        );
        Ok(())
    }

    async fn delete(&mut self, rel: u32, old: OldRow) -> Result<(), Flow> {
        self.ensure_table(rel).await?;
        self.ensure_key(rel).await?;
        self.check_len(rel, old.values.len())?;
        let t = &self.tables[&rel];
        let Some((filter, fvals)) = self.filter(t, Some(&old.values), &old.values) else {
            self.missing(rel, "delete", "no old values to match");
            return Ok(());
        };
        let display = t.display.clone();
        let np = fvals.len();
        let stmt = self
            .stmt(
                rel,
                StmtKey {
                    op: Op::Delete,
                    shape: filter,
                },
                np,
                Type::TEXT,
            )
            .await?;
        self.send(
            &stmt,
            fvals,
            Kind::ExpectRow {
                table: display,
                op: "delete",
            },
            "deleting a row",
        );
        Ok(())
    }

    /// The row filter: key values (old key if given, else the new row's), or every old
    /// value for a table without a key. `None` when there is nothing to match on.
    #[allow(clippy::type_complexity)]
    fn filter(
        &self,
        t: &Table,
        old: Option<&[Value]>,
        new: &[Value],
    ) -> Option<(Vec<u8>, Vec<Option<String>>)> {
        let n = new.len();
        let mut shape = vec![W_SKIP; n];
        let mut vals = Vec::new();
        let mut put = |i: usize, v: &Value| match v {
            Value::Text(s) => {
                shape[i] = W_VALUE;
                vals.push(Some(s.clone()));
            }
            Value::Null => shape[i] = W_NULL,
            Value::Unchanged => {}
        };
        if t.keyed {
            for &i in &t.key_idx {
                let v = match old.map(|o| &o[i]) {
                    Some(v @ Value::Text(_)) => v,
                    _ => &new[i],
                };
                put(i, v);
            }
        } else {
            let old = old?;
            for (i, v) in old.iter().enumerate() {
                put(i, v);
            }
        }
        shape.iter().any(|w| *w != W_SKIP).then_some((shape, vals))
    }

    fn missing(&self, rel: u32, op: &str, why: &str) {
        let t = &self.tables[&rel];
        tracing::warn!(sink = %self.cfg.name, seq = self.seq, table = %t.display, "{op} skipped: {why}");
        metrics::counter!(MISSING_ROWS, "sink" => self.cfg.name.clone(), "kind" => "postgres")
            .increment(1);
    }

    async fn truncate(&mut self, rels: &[u32], cascade: bool, restart: bool) -> Result<(), Flow> {
        let mut idents = Vec::new();
        for &r in rels {
            if self.tables.contains_key(&r) {
                self.ensure_table(r).await?;
                idents.push(self.tables[&r].ident.clone());
            } else {
                tracing::warn!(sink = %self.cfg.name, seq = self.seq, rel = r,
                    "truncate of a table this sink does not know; skipped");
            }
        }
        if idents.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "TRUNCATE {}{}{}",
            idents.join(", "),
            if restart { " RESTART IDENTITY" } else { "" },
            if cascade { " CASCADE" } else { "" }
        );
        self.send_simple(&sql, "truncating");
        Ok(())
    }
}

fn text_param(v: Value) -> Option<Option<String>> {
    match v {
        Value::Unchanged => None,
        Value::Null => Some(None),
        Value::Text(s) => Some(Some(s)),
    }
}

/// Why a pipelined statement has no result.
enum Failed {
    /// The target refused it (or the connection broke).
    Pg(tokio_postgres::Error),
    /// The task collecting its answer panicked or was cancelled: its outcome is unknown.
    Task(tokio::task::JoinError),
}

async fn wait(p: Pending) -> Result<u64, Failed> {
    match p {
        Pending::Done(r) => r.expect("taken once").map_err(Failed::Pg),
        Pending::Task(h) => match h.await {
            Ok(r) => r.map_err(Failed::Pg),
            Err(e) => Err(Failed::Task(e)),
        },
    }
}

/// The position an offset row holds: `seq` (every record through it applied) and
/// `next_event` (events of record `seq + 1` before it applied: a replay to the middle of
/// a record).
fn from_offset(seq: u64, next_event: i32) -> Position {
    if seq == 0 && next_event <= 0 {
        Position::START
    } else {
        Position::new(seq + 1, next_event.max(0) as u32)
    }
}

/// The offset row's `(seq, next_event)` for a position.
fn to_offset(p: Position) -> (u64, u32) {
    if p == Position::START {
        (0, 0)
    } else {
        (p.applied_seq(), p.idx)
    }
}

/// Appends `s` in `COPY`'s text format (backslash, tab, newline and carriage return
/// escaped).
fn copy_escape(out: &mut Vec<u8>, s: &str) {
    // Runs without a byte to escape are copied whole (most values have none).
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'\\' => b"\\\\",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(esc);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

#[cfg(test)]
mod copy_tests {
    use super::*;

    #[test]
    fn copy_escape_round_trips_through_the_copy_parser() {
        let values = [
            "plain",
            "",
            "tab\there",
            "new\nline\r\n",
            "back\\slash\\",
            "\\N",
            "ünïcødé\t\\",
        ];
        let mut line = Vec::new();
        for (i, v) in values.iter().enumerate() {
            if i > 0 {
                line.push(b'\t');
            }
            copy_escape(&mut line, v);
        }
        let back = relay_proto::copy_text::parse_copy_line(&line).unwrap();
        let want: Vec<Value> = values.iter().map(|v| Value::Text(v.to_string())).collect();
        assert_eq!(back, want);
    }
}
