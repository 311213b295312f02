//! The initial copy: each table read with `COPY … TO STDOUT` inside an exported snapshot,
//! and the state file that makes the copy resumable: per table, and for a large table
//! with a key that is not a string, per chunk (its key ranges not copied yet are kept in
//! `"copying"`; a copy cut off goes on over them as a resync).
//!
//! State file `<spool dir of the source>/source-state.json`, written atomically (temporary
//! file, fsync, rename, fsync of the directory):
//!
//! ```json
//! {
//!   "version": 1,
//!   "slot": "routy_orders",
//!   "tables": {
//!     "public.orders": { "state": "done", "oid": 16384, "snapshot_lsn": "0/1A2B3C8", "rows": 1200 }
//!   }
//! }
//! ```
//!
//! A configured table absent from `tables` (or with `"state": "pending"`) is copied at the
//! next start. `snapshot_lsn` is the consistent point of the snapshot the table was copied
//! in; streamed changes to it from transactions that committed before it are dropped. The
//! state belongs to one slot: a different slot name, a new slot, or `cdc drop-slot` resets
//! it. Records of one table's copy: `[Relation, Snapshot{Start, lsn}]`, then rows as
//! `Insert`s in records of about [`RECORD_TARGET_BYTES`], each starting with the
//! `Relation`, then `[Relation, Snapshot{Done, rows}]`; all with `Record.lsn = 0`. The table
//! is marked done once its Done record is synced.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use futures::StreamExt;
use relay_proto::cdc::{Event, Record, Relation, SnapshotPhase};
use serde::{Deserialize, Serialize};

use super::catalog::{ident, select_sql, Db, Table};
use super::shape::Filters;
use super::stream::resync::{is_string, key_cmp_sql, key_order_sql};
use super::stream::{bounded, relation_size, values_size};
use super::{Ctx, SourceError, RECORD_TARGET_BYTES, SNAPSHOT_ROWS_TOTAL};
use crate::cdc::replication::{format_lsn, parse_lsn, QUERY_TIMEOUT};
use crate::cdc::spool::MAX_RECORD;
use relay_proto::copy_text::parse_copy_line;

/// File name of the state file inside the source's spool directory.
pub const STATE_FILE: &str = "source-state.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct TableState {
    state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    oid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    snapshot_lsn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rows: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
struct StateFile {
    version: u32,
    slot: String,
    #[serde(default)]
    tables: BTreeMap<String, TableState>,
    /// What filter relay-inner last put into the publication, per table
    /// ([`super::shape::Pushdown::fingerprint`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    published: BTreeMap<String, String>,
    /// Resyncs waiting or running, with their progress.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    resync: BTreeMap<String, ResyncProgress>,
    /// Copies in key order under way: the key ranges not copied yet, per table. A copy
    /// cut off goes on from there as a resync.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    copying: BTreeMap<String, Vec<KeyRange>>,
}

/// A range of keys (as text, in key order: strings byte-wise) not copied yet.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub(crate) struct KeyRange {
    /// The rows with a key above this one (None: from the first key).
    #[serde(default)]
    pub(crate) after: Option<Vec<Option<String>>>,
    /// Up to this key, included (None: to the table's end).
    #[serde(default)]
    pub(crate) upto: Option<Vec<Option<String>>>,
}

/// How far a table's resync got: chunks done, and the last key copied.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub(crate) struct ResyncProgress {
    /// The last key copied (the key columns' values as text); None before the first chunk.
    #[serde(default)]
    pub(crate) after: Option<Vec<Option<String>>>,
    /// The current range's last key, included (a resync that continues a copy in key
    /// order); None: the table's end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) upto: Option<Vec<Option<String>>>,
    /// Ranges after the current one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) more: Vec<KeyRange>,
    #[serde(default)]
    pub(crate) rows: u64,
    #[serde(default)]
    pub(crate) chunks: u64,
    /// The resync's start was spooled.
    #[serde(default)]
    pub(crate) started: bool,
}

/// The snapshot progress of one source, kept in [`STATE_FILE`].
#[derive(Debug, Clone)]
pub struct SnapshotState {
    path: PathBuf,
    file: StateFile,
}

impl SnapshotState {
    /// Loads the state (empty when the file is missing, or when it belongs to another slot).
    pub fn load(dir: &Path, slot: &str) -> Result<SnapshotState, SourceError> {
        let path = dir.join(STATE_FILE);
        let file = match std::fs::read(&path) {
            Ok(bytes) => {
                let f: StateFile = serde_json::from_slice(&bytes).map_err(|e| {
                    SourceError::Fatal(format!(
                        "{}: unreadable ({e}); delete it to copy every table again",
                        path.display()
                    ))
                })?;
                if f.slot != slot {
                    tracing::info!(path = %path.display(), old = %f.slot, new = slot,
                        "snapshot state belongs to another slot; starting over");
                    StateFile::default()
                } else {
                    f
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StateFile::default(),
            Err(e) => {
                return Err(SourceError::Fatal(format!(
                    "{}: cannot read: {e}",
                    path.display()
                )))
            }
        };
        Ok(SnapshotState {
            path,
            file: StateFile {
                version: 1,
                slot: slot.to_string(),
                ..file
            },
        })
    }

    /// Forgets every table's progress (a new slot: everything is copied again).
    pub fn reset(&mut self, slot: &str) {
        // What the publication holds does not depend on the slot.
        let published = std::mem::take(&mut self.file.published);
        self.file = StateFile {
            version: 1,
            slot: slot.to_string(),
            tables: BTreeMap::new(),
            published,
            resync: BTreeMap::new(),
            copying: BTreeMap::new(),
        };
    }

    /// Starts (or starts over) a resync of `table`.
    pub(crate) fn start_resync(&mut self, table: &str) {
        self.file
            .resync
            .insert(table.to_string(), ResyncProgress::default());
    }

    /// A resync's progress.
    pub(crate) fn resync(&self, table: &str) -> Option<&ResyncProgress> {
        self.file.resync.get(table)
    }

    /// Records a resync's progress.
    pub(crate) fn set_resync(&mut self, table: &str, p: ResyncProgress) {
        self.file.resync.insert(table.to_string(), p);
    }

    /// A resync is done (or refused).
    pub(crate) fn finish_resync(&mut self, table: &str) {
        self.file.resync.remove(table);
    }

    /// Resyncs not done yet, in name order.
    pub(crate) fn pending_resyncs(&self) -> Vec<String> {
        self.file.resync.keys().cloned().collect()
    }

    /// Marks `table` as copied by a resync (started now, while streaming): no streamed
    /// change of it is dropped.
    pub(crate) fn copy_by_resync(&mut self, table: &Table) {
        // A copy in key order cut off: only the ranges it had not copied.
        let mut left = self.file.copying.remove(&table.name).unwrap_or_default();
        self.mark(table, true, 0, 0);
        self.start_resync(&table.name);
        if !left.is_empty() {
            let first = left.remove(0);
            self.set_resync(
                &table.name,
                ResyncProgress {
                    after: first.after,
                    upto: first.upto,
                    more: left,
                    ..ResyncProgress::default()
                },
            );
        }
    }

    /// Records the key ranges a copy in key order has not copied yet.
    pub(crate) fn set_copy_left(&mut self, table: &str, left: Vec<KeyRange>) {
        self.file.copying.insert(table.to_string(), left);
    }

    /// Forgets the tables no longer in `configured` (a reload removed them); returns them.
    pub(crate) fn forget_removed(&mut self, configured: &[String]) -> Vec<String> {
        let gone: Vec<String> = self
            .file
            .tables
            .keys()
            .filter(|t| !configured.contains(t))
            .cloned()
            .collect();
        for t in &gone {
            self.file.tables.remove(t);
            self.file.resync.remove(t);
            self.file.copying.remove(t);
            self.file.published.remove(t);
        }
        gone
    }

    /// The filter last put into the publication for `table`.
    pub(crate) fn published(&self, table: &str) -> Option<&str> {
        self.file.published.get(table).map(String::as_str)
    }

    /// Records the filter put into the publication for `table`.
    pub(crate) fn set_published(&mut self, table: &str, fingerprint: String) {
        self.file.published.insert(table.to_string(), fingerprint);
    }

    /// Whether the table's copy is complete.
    pub fn is_done(&self, table: &str) -> bool {
        self.file
            .tables
            .get(table)
            .is_some_and(|t| t.state == "done")
    }

    /// The snapshot LSN a done table was copied at.
    pub fn snapshot_lsn(&self, table: &str) -> Option<u64> {
        let t = self.file.tables.get(table)?;
        (t.state == "done")
            .then(|| t.snapshot_lsn.as_deref().and_then(|s| parse_lsn(s).ok()))
            .flatten()
    }

    fn mark(&mut self, table: &Table, done: bool, lsn: u64, rows: u64) {
        if done {
            self.file.copying.remove(&table.name);
        }
        self.file.tables.insert(
            table.name.clone(),
            TableState {
                state: if done { "done" } else { "pending" }.into(),
                oid: Some(table.oid),
                snapshot_lsn: Some(format_lsn(lsn)),
                rows: done.then_some(rows),
            },
        );
    }

    /// relation id → snapshot LSN, for the done tables among `tables`.
    pub(crate) fn filters(&self, tables: &[Table]) -> HashMap<u32, u64> {
        tables
            .iter()
            .filter_map(|t| self.snapshot_lsn(&t.name).map(|lsn| (t.oid, lsn)))
            .collect()
    }

    /// Writes the file atomically and durably.
    pub fn save(&self) -> Result<(), SourceError> {
        let err = |what: &str, e: std::io::Error| {
            let msg = format!("{}: {what}: {e}", self.path.display());
            if routy_log::disk::is_no_space(&e) {
                // A full disk (the spool may have filled it) passes: try again later.
                SourceError::Transient(msg)
            } else {
                SourceError::Fatal(msg)
            }
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| err("create directory", e))?;
        let body = serde_json::to_vec_pretty(&self.file).unwrap_or_default();
        routy_log::disk::write_atomic(&self.path, &body).map_err(|e| err("write", e))?;
        Ok(())
    }
}

/// Copies `tables` inside the exported snapshot `snapshot` (consistent point `lsn`), marking
/// each done in `state` once durable. `Ok(false)` when told to stop before the end.
pub(crate) async fn copy_tables(
    ctx: &Ctx,
    db: &Db,
    state: &mut SnapshotState,
    tables: &[Table],
    snapshot: &str,
    lsn: u64,
    filters: &Filters,
) -> Result<bool, SourceError> {
    if snapshot.contains('\'') {
        return Err(SourceError::Transient(format!(
            "odd snapshot name {snapshot:?}"
        )));
    }
    let begin = format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{snapshot}'"
    );
    bounded(&ctx.cfg, "starting the snapshot's transaction", async {
        Ok(db.client.batch_execute(&begin).await?)
    })
    .await?;
    for (i, t) in tables.iter().enumerate() {
        if ctx.stop.is_stopping() {
            return Ok(false);
        }
        let rows = copy_table(ctx, db, state, t, lsn, filters, snapshot).await?;
        state.mark(t, true, lsn, rows);
        state.save()?;
        if ctx.hooks.stop_after_tables.is_some_and(|n| i + 1 >= n) {
            return Ok(false);
        }
    }
    bounded(&ctx.cfg, "ending the snapshot's transaction", async {
        Ok(db.client.batch_execute("COMMIT").await?)
    })
    .await?;
    Ok(true)
}

/// Copies one table; returns its row count once its Done record is durable. A large
/// table is read in up to `snapshot_parallelism` ranges at once, each on a connection of
/// its own in the same exported snapshot: key ranges read in key order, chunk by chunk,
/// each chunk's progress kept in `state`, when the key allows it; ranges of pages
/// (`ctid`) otherwise. The rows are synced to the spool as they come, so they are shipped
/// while the copy runs.
async fn copy_table(
    ctx: &Ctx,
    db: &Db,
    state: &mut SnapshotState,
    t: &Table,
    lsn: u64,
    filters: &Filters,
    snapshot: &str,
) -> Result<u64, SourceError> {
    let src_rel = bounded(
        &ctx.cfg,
        "reading the table's columns",
        db.relation(t, &ctx.cfg.publication),
    )
    .await?;
    // Masks and excluded columns: the copy leaves relay-inner as the stream does.
    let (plan, rel) = match filters.shaper.plan(&src_rel) {
        Some((p, out)) => (Some(p), out),
        None => (None, src_rel.clone()),
    };
    let name = ctx.label();
    ctx.status.set_snapshot(Some(t.name.clone()), 0);
    tracing::info!(source = %name, table = %t.name, snapshot_lsn = %format_lsn(lsn), "copying table");
    snapshot_marker(ctx, &rel, SnapshotPhase::Start, lsn).await?;
    let pages: i64 = bounded(&ctx.cfg, "reading the table's size", async {
        Ok(db
            .client
            .query_one(
                "SELECT (pg_relation_size($1::oid) / current_setting('block_size')::int8)::int8",
                &[&t.oid],
            )
            .await?
            .get(0))
    })
    .await?;
    let workers = ctx
        .cfg
        .snapshot_parallelism
        .min((pages / PAGES_PER_WORKER).max(1) as usize)
        .max(1);
    let query = |range: Option<(i64, Option<i64>)>| {
        let mut conds = Vec::new();
        if let Some((a, b)) = range {
            conds.push(format!("ctid >= '({a},0)'::tid"));
            if let Some(b) = b {
                conds.push(format!("ctid < '({b},0)'::tid"));
            }
        }
        if let Some(w) = filters.wheres.get(&t.name) {
            conds.push(format!("({w})"));
        }
        format!("COPY ({}) TO STDOUT", select_sql(t, &src_rel, &conds))
    };
    let shape = Shape {
        t,
        src_rel: &src_rel,
        rel: &rel,
        plan: plan.as_ref(),
        filters,
    };
    let keys = src_rel.key_indexes();
    // A large table with a key that is not a string is copied in key order, chunk by
    // chunk, each range's progress kept in the state file: a copy cut off goes on as a
    // resync from where it got. (String keys would need the byte-wise order relay-outer
    // compares in, which an index in another collation cannot give: a sort per chunk.)
    let by_key = pages >= PAGES_PER_WORKER
        && !keys.is_empty()
        && src_rel.replica_identity != b'f'
        && src_rel.replica_identity != b'n'
        && keys.iter().all(|&i| !is_string(&src_rel.columns[i]));
    let mut conns = Vec::new();
    for _ in 1..workers {
        let c = Db::connect(&ctx.rcfg).await?;
        let begin = format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{snapshot}'"
        );
        bounded(&ctx.cfg, "joining the snapshot", async {
            Ok(c.client.batch_execute(&begin).await?)
        })
        .await?;
        conns.push(c);
    }
    let clients: Vec<&tokio_postgres::Client> = std::iter::once(&db.client)
        .chain(conns.iter().map(|c| &c.client))
        .collect();
    let rows = if by_key {
        let bounds = if workers > 1 {
            key_bounds(ctx, db, t, &src_rel, &keys, pages, workers).await?
        } else {
            Vec::new()
        };
        let mut ranges = Vec::with_capacity(bounds.len() + 1);
        let mut after = None;
        for b in bounds {
            ranges.push(Some(KeyRange {
                after: after.replace(b.clone()),
                upto: Some(b),
            }));
        }
        ranges.push(Some(KeyRange { after, upto: None }));
        tracing::info!(source = %name, table = %t.name, pages, ranges = ranges.len(),
            "copying the table in key order, in parallel ranges");
        state.set_copy_left(&t.name, ranges.iter().flatten().cloned().collect());
        state.save()?;
        let n_ranges = ranges.len();
        // The ranges' progress in memory, with a version per change; the version saved last.
        let progress = std::sync::Mutex::new((state, ranges, 0u64));
        let saved = std::sync::Arc::new(std::sync::Mutex::new(0u64));
        let key_sql = key_order_sql(&src_rel, &keys).join(", ");
        let src_rel = &src_rel;
        let jobs = clients
            .iter()
            .enumerate()
            .take(n_ranges)
            .map(|(i, c)| {
                let (shape, keys, key_sql, progress, saved) =
                    (&shape, &keys, &key_sql, &progress, &saved);
                async move {
                    // Each chunk must walk the key's index from where the last one ended.
                    // On a table without statistics (just loaded, never analyzed) the
                    // planner took a range with both ends for small and read all of it
                    // (bitmap scan) and sorted it for every chunk: a range's copy cost
                    // grew with the square of its chunks.
                    bounded(&ctx.cfg, "preparing the copy in key order", async {
                        Ok(c.batch_execute(
                            "SET LOCAL enable_bitmapscan = off; SET LOCAL enable_sort = off; \
                             SET LOCAL enable_seqscan = off",
                        )
                        .await?)
                    })
                    .await?;
                    let mut total = 0u64;
                    // A chunk's progress is made durable while the next chunk is read.
                    let mut durable: Option<DurableProgress<'_>> = None;
                    loop {
                        let r = {
                            let g = progress.lock().unwrap_or_else(|p| p.into_inner());
                            g.1[i].clone().unwrap_or_default()
                        };
                        let mut conds = Vec::new();
                        if let Some(a) = &r.after {
                            conds.push(key_cmp_sql(src_rel, keys, a, ">"));
                        }
                        if let Some(u) = &r.upto {
                            conds.push(key_cmp_sql(src_rel, keys, u, "<="));
                        }
                        if let Some(w) = filters.wheres.get(&t.name) {
                            conds.push(format!("({w})"));
                        }
                        let limit = ctx.cfg.snapshot_chunk_rows;
                        let sql = format!(
                            "COPY ({} ORDER BY {key_sql} LIMIT {limit}) TO STDOUT",
                            select_sql(t, src_rel, &conds)
                        );
                        let copy = copy_range(ctx, c, &sql, shape, Some(keys));
                        let (copied, before) = match durable.take() {
                            Some(d) => tokio::join!(copy, d),
                            None => (copy.await, Ok(())),
                        };
                        before?;
                        let (n, last) = copied?;
                        tracing::debug!(source = %ctx.cfg.name, table = %t.name, range = i, rows = n,
                            after = ?last, "copy chunk done");
                        total += n;
                        let done = n < limit as u64;
                        let (state, version) = {
                            let mut g = progress.lock().unwrap_or_else(|p| p.into_inner());
                            if done {
                                g.1[i] = None;
                            } else if let Some(r) = g.1[i].as_mut() {
                                r.after = last;
                            }
                            let left = g.1.iter().flatten().cloned().collect();
                            g.0.set_copy_left(&t.name, left);
                            g.2 += 1;
                            ((*g.0).clone(), g.2)
                        };
                        let d = Box::pin(save_progress(ctx, state, version, saved.clone()));
                        if done {
                            d.await?;
                            return Ok::<u64, SourceError>(total);
                        }
                        durable = Some(d);
                    }
                }
            })
            .collect::<Vec<_>>();
        futures::future::try_join_all(jobs).await?.iter().sum()
    } else if workers <= 1 {
        copy_range(ctx, &db.client, &query(None), &shape, None)
            .await?
            .0
    } else {
        // Ranges of pages; the last one is open, for pages added since the size was read.
        let per = pages / workers as i64 + 1;
        let ranges: Vec<(i64, Option<i64>)> = (0..workers as i64)
            .map(|i| (i * per, (i + 1 < workers as i64).then_some((i + 1) * per)))
            .collect();
        tracing::info!(source = %name, table = %t.name, pages, workers, "copying the table in parallel ranges");
        let jobs = clients
            .iter()
            .zip(&ranges)
            .map(|(c, r)| {
                let sql = query(Some(*r));
                let shape = &shape;
                async move { copy_range(ctx, c, &sql, shape, None).await.map(|r| r.0) }
            })
            .collect::<Vec<_>>();
        futures::future::try_join_all(jobs).await?.iter().sum()
    };
    for c in &conns {
        let _ = c.client.batch_execute("COMMIT").await;
    }
    snapshot_marker(ctx, &rel, SnapshotPhase::Done, rows).await?;
    ctx.spool.sync().await?;
    ctx.status.set_snapshot(Some(t.name.clone()), rows);
    tracing::info!(source = %name, table = %t.name, rows, "table copied");
    Ok(rows)
}

/// Pages per worker below which a table is not split (8 KiB pages: 8 MiB).
const PAGES_PER_WORKER: i64 = 1024;

/// `workers - 1` keys that split the table into ranges of about equal size, from a
/// sample of its pages (fewer when the sample has fewer distinct keys).
async fn key_bounds(
    ctx: &Ctx,
    db: &Db,
    t: &Table,
    src: &Relation,
    keys: &[usize],
    pages: i64,
    workers: usize,
) -> Result<Vec<Vec<Option<String>>>, SourceError> {
    // Named apart from the columns: ORDER BY a column's name would take the text.
    let cols: Vec<String> = keys
        .iter()
        .enumerate()
        .map(|(n, &i)| format!("{}::text AS routy_k{n}", ident(&src.columns[i].name)))
        .collect();
    // About 200 pages: enough rows for quantiles, cheap on any size.
    let pct = (100.0 * 200.0 / pages.max(1) as f64).clamp(0.0001, 100.0);
    let sql = format!(
        "SELECT {} FROM {}.{} TABLESAMPLE SYSTEM ({pct}) ORDER BY {}",
        cols.join(", "),
        ident(&t.schema),
        ident(&t.table),
        key_order_sql(src, keys).join(", ")
    );
    let got = bounded(&ctx.cfg, "sampling the table's keys", async {
        Ok(db.client.simple_query(&sql).await?)
    })
    .await?;
    let sample: Vec<Vec<Option<String>>> = got
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                (0..keys.len())
                    .map(|i| r.get(i).map(str::to_string))
                    .collect(),
            ),
            _ => None,
        })
        .collect();
    let mut bounds: Vec<Vec<Option<String>>> = Vec::new();
    for w in 1..workers {
        if let Some(k) = sample.get(w * sample.len() / workers) {
            if bounds.last() != Some(k) {
                bounds.push(k.clone());
            }
        }
    }
    Ok(bounds)
}
/// The copy syncs the spool (so the shipper sends the rows) at least this often.
const COPY_SYNC_BYTES: usize = 8 << 20;

/// What a copy's rows are checked and shaped with.
struct Shape<'a> {
    t: &'a Table,
    src_rel: &'a Relation,
    rel: &'a Relation,
    plan: Option<&'a super::shape::RelPlan>,
    filters: &'a Filters,
}

/// Runs one `COPY ... TO STDOUT` and spools its rows; returns how many.
/// With `keys`, also the last row's key as the source has it (a copy in key order).
async fn copy_range(
    ctx: &Ctx,
    client: &tokio_postgres::Client,
    sql: &str,
    shape: &Shape<'_>,
    keys: Option<&[usize]>,
) -> Result<(u64, Option<Vec<Option<String>>>), SourceError> {
    let Shape {
        t,
        src_rel,
        rel,
        plan,
        filters,
    } = *shape;
    let name = ctx.label();
    let rel_bytes = relation_size(rel);
    let copy = bounded(&ctx.cfg, "starting the COPY", async {
        Ok(client.copy_out(sql).await?)
    })
    .await?;
    futures::pin_mut!(copy);
    // No total deadline for a table of any size, but an idle one: each wait for the next
    // chunk gets `receive_timeout` (QUERY_TIMEOUT when that is off). Time spent appending
    // to a full spool does not count: the server is not being read then.
    let idle = match ctx.cfg.receive_timeout {
        d if d.is_zero() => QUERY_TIMEOUT,
        d => d,
    };
    let mut buf: Vec<u8> = Vec::new();
    let mut rows = 0u64;
    let mut events: Vec<Event> = vec![Event::Relation(rel.clone())];
    let mut bytes = rel_bytes;
    let mut unsynced = 0usize;
    let counter =
        metrics::counter!(SNAPSHOT_ROWS_TOTAL, "source" => name.clone(), "table" => t.name.clone());
    let mut pending_rows = 0u64;
    let mut last_line: Vec<u8> = Vec::new();
    // Rows nothing is done to in relay-inner travel as the source wrote them: lines of
    // COPY text in one `Rows` event per record, parsed only by a sink that needs values.
    let raw =
        plan.is_none() && !src_rel.columns.is_empty() && src_rel.columns.len() == rel.columns.len();
    let mut block: Vec<u8> = Vec::new();
    let mut block_rows = 0u32;
    loop {
        let chunk = match tokio::time::timeout(idle, copy.next()).await {
            Ok(c) => c.transpose()?,
            Err(_) => {
                return Err(SourceError::Stalled(format!(
                    "copying {}: no data from PostgreSQL for {idle:?} (receive_timeout) after {rows} rows: \
                     the server or the network is stalled; dropping the connection",
                    t.name
                )))
            }
        };
        let end = chunk.is_none();
        if let Some(c) = chunk {
            buf.extend_from_slice(&c);
        }
        let mut start = 0;
        let mut last = None;
        while let Some(nl) = memchr::memchr(b'\n', &buf[start..]) {
            let line = &buf[start..start + nl];
            last = Some(start..start + nl);
            if raw {
                let fields = 1 + memchr::memchr_iter(b'\t', line).count();
                if fields != src_rel.columns.len() {
                    return Err(SourceError::Fatal(format!(
                        "copying {}: a row has {fields} values for {} columns",
                        t.name,
                        src_rel.columns.len()
                    )));
                }
                row_fits(&t.name, nl + rel_bytes)?;
                if block_rows > 0 && rel_bytes + block.len() + nl + 1 > super::RECORD_MAX_BYTES {
                    unsynced += block.len();
                    flush_block(ctx, rel, &mut block, &mut block_rows).await?;
                }
                block.extend_from_slice(&buf[start..=start + nl]);
                start += nl + 1;
                block_rows += 1;
                rows += 1;
                pending_rows += 1;
                if rel_bytes + block.len() >= RECORD_TARGET_BYTES {
                    unsynced += block.len();
                    flush_block(ctx, rel, &mut block, &mut block_rows).await?;
                    rows_spooled(ctx, &t.name, &counter, &mut pending_rows, &mut unsynced).await?;
                }
                continue;
            }
            start += nl + 1;
            let values = parse_copy_line(line)
                .map_err(|e| SourceError::Fatal(format!("copying {}: {e}", t.name)))?;
            if values.len() != src_rel.columns.len()
                && !(src_rel.columns.is_empty() && line.is_empty())
            {
                return Err(SourceError::Fatal(format!(
                    "copying {}: a row has {} values for {} columns",
                    t.name,
                    values.len(),
                    src_rel.columns.len()
                )));
            }
            let values = match plan {
                Some(p) => filters.shaper.apply(p, values),
                None => values,
            };
            let size = values_size(&values) + 8;
            row_fits(&t.name, size + rel_bytes)?;
            if events.len() > 1 && bytes + size > super::RECORD_MAX_BYTES {
                unsynced += bytes;
                flush_rows(ctx, rel, &mut events, &mut bytes, rel_bytes).await?;
            }
            events.push(Event::Insert {
                rel: rel.id,
                new: if rel.columns.is_empty() {
                    Vec::new()
                } else {
                    values
                },
            });
            bytes += size;
            rows += 1;
            pending_rows += 1;
            if bytes >= RECORD_TARGET_BYTES {
                unsynced += bytes;
                flush_rows(ctx, rel, &mut events, &mut bytes, rel_bytes).await?;
                rows_spooled(ctx, &t.name, &counter, &mut pending_rows, &mut unsynced).await?;
            }
        }
        if let (Some(_), Some(r)) = (keys, last) {
            // Only the last row's key is needed: kept as its line, once per piece read.
            last_line.clear();
            last_line.extend_from_slice(&buf[r]);
        }
        buf.drain(..start);
        if end {
            break;
        }
    }
    if !buf.is_empty() {
        return Err(SourceError::Fatal(format!(
            "copying {}: COPY output ended inside a row",
            t.name
        )));
    }
    if events.len() > 1 {
        flush_rows(ctx, rel, &mut events, &mut bytes, rel_bytes).await?;
    }
    if block_rows > 0 {
        flush_block(ctx, rel, &mut block, &mut block_rows).await?;
    }
    counter.increment(pending_rows);
    ctx.status.add_snapshot_rows(&t.name, pending_rows);
    let last_key = match keys {
        Some(k) if rows > 0 => {
            // Parsed without error above.
            let values = parse_copy_line(&last_line)
                .map_err(|e| SourceError::Fatal(format!("copying {}: {e}", t.name)))?;
            Some(
                k.iter()
                    .map(|&i| match values.get(i) {
                        Some(relay_proto::cdc::Value::Text(s)) => Some(s.clone()),
                        _ => None,
                    })
                    .collect(),
            )
        }
        _ => None,
    };
    Ok((rows, last_key))
}

/// Spools the start (`value`: the snapshot's LSN) or the end (`value`: rows copied) of a
/// table's copy, with the relation it describes.
async fn snapshot_marker(
    ctx: &Ctx,
    rel: &Relation,
    phase: SnapshotPhase,
    value: u64,
) -> Result<(), SourceError> {
    let events = vec![
        Event::Relation(rel.clone()),
        Event::Snapshot {
            rel: rel.id,
            phase,
            value,
        },
    ];
    ctx.spool.append(&Record { lsn: 0, events }).await?;
    Ok(())
}

/// A range's progress being made durable.
type DurableProgress<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), SourceError>> + Send + 'a>>;

/// Makes the chunks a copy's progress `state` counts durable, then the progress: syncs
/// the spool (every chunk counted was appended before), then saves `state` unless a
/// later version was saved already (ranges save concurrently; an older version would
/// only make a resumed copy do more).
async fn save_progress(
    ctx: &Ctx,
    state: SnapshotState,
    version: u64,
    saved: std::sync::Arc<std::sync::Mutex<u64>>,
) -> Result<(), SourceError> {
    ctx.spool.sync().await?;
    tokio::task::spawn_blocking(move || {
        let mut last = saved.lock().unwrap_or_else(|p| p.into_inner());
        if version > *last {
            state.save()?;
            *last = version;
        }
        Ok(())
    })
    .await
    .map_err(|e| SourceError::Fatal(format!("saving the copy's progress: {e}")))?
}

/// A row (with its record's relation: `bytes`) must fit in a spool record.
fn row_fits(table: &str, bytes: usize) -> Result<(), SourceError> {
    if bytes + 64 > MAX_RECORD {
        return Err(SourceError::Fatal(format!(
            "copying {table}: a row of {bytes} bytes (with its table's description) exceeds \
             the spool's record limit of {MAX_RECORD} bytes"
        )));
    }
    Ok(())
}

/// A record of a copy's rows went to the spool: counts them, and syncs the spool every
/// [`COPY_SYNC_BYTES`] (durable rows are shipped: the target fills while the copy runs).
async fn rows_spooled(
    ctx: &Ctx,
    table: &str,
    counter: &metrics::Counter,
    pending: &mut u64,
    unsynced: &mut usize,
) -> Result<(), SourceError> {
    let n = std::mem::take(pending);
    counter.increment(n);
    ctx.status.add_snapshot_rows(table, n);
    if *unsynced >= COPY_SYNC_BYTES {
        ctx.spool.sync().await?;
        *unsynced = 0;
    }
    Ok(())
}

/// Spools a block of copy rows as the source wrote them; `block` comes back empty, its
/// buffer kept for the next one (the spool encodes a copy of the record).
async fn flush_block(
    ctx: &Ctx,
    rel: &Relation,
    block: &mut Vec<u8>,
    rows: &mut u32,
) -> Result<(), SourceError> {
    let n = std::mem::take(rows);
    let mut rec = Record {
        lsn: 0,
        events: vec![
            Event::Relation(rel.clone()),
            Event::Rows {
                rel: rel.id,
                rows: n,
                data: std::mem::take(block),
            },
        ],
    };
    let appended = ctx.spool.append(&rec).await;
    if let Some(Event::Rows { mut data, .. }) = rec.events.pop() {
        data.clear();
        *block = data;
    }
    appended?;
    metrics::counter!(super::EVENTS_TOTAL, "source" => ctx.label(), "kind" => "insert")
        .increment(u64::from(n));
    Ok(())
}

async fn flush_rows(
    ctx: &Ctx,
    rel: &relay_proto::cdc::Relation,
    events: &mut Vec<Event>,
    bytes: &mut usize,
    rel_bytes: usize,
) -> Result<(), SourceError> {
    let evs = std::mem::replace(events, vec![Event::Relation(rel.clone())]);
    let n = (evs.len() - 1) as u64;
    ctx.spool
        .append(&Record {
            lsn: 0,
            events: evs,
        })
        .await?;
    metrics::counter!(super::EVENTS_TOTAL, "source" => ctx.label(), "kind" => "insert")
        .increment(n);
    *bytes = rel_bytes;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_resets() {
        let dir = std::env::temp_dir().join(format!(
            "routy-state-test-{}-{:x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        struct Rm(PathBuf);
        impl Drop for Rm {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let dir = Rm(dir);
        let t = Table {
            name: "public.a".into(),
            schema: "public".into(),
            table: "a".into(),
            oid: 42,
        };
        let mut s = SnapshotState::load(&dir.0, "slot_a").unwrap();
        assert!(!s.is_done("public.a"));
        s.mark(&t, true, 0x1_0000_0010, 5);
        s.save().unwrap();
        let s2 = SnapshotState::load(&dir.0, "slot_a").unwrap();
        assert!(s2.is_done("public.a"));
        assert_eq!(s2.snapshot_lsn("public.a"), Some(0x1_0000_0010));
        assert_eq!(
            s2.filters(std::slice::from_ref(&t)).get(&42),
            Some(&0x1_0000_0010)
        );
        let other = SnapshotState::load(&dir.0, "slot_b").unwrap();
        assert!(!other.is_done("public.a"));
        let text = std::fs::read_to_string(dir.0.join(STATE_FILE)).unwrap();
        assert!(text.contains("\"snapshot_lsn\": \"1/10\""), "{text}");
    }
}
