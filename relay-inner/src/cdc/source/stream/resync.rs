//! Resync: one table copied again while the stream goes on, in chunks by key, with
//! watermarks (the approach of DBLog and of Debezium's incremental snapshots).
//!
//! For each chunk relay-inner writes a low watermark into the WAL (a logical message in a
//! transaction of its own, whose commit flushes the WAL so the walsender sends it at
//! once), reads the next `resync_chunk_rows` rows after the last key copied
//! (ordinary connection, READ COMMITTED), and writes a high watermark. The stream brings
//! the watermarks back in WAL order, with every transaction that committed between them:
//! a row such a transaction touched is newer in the stream than in the chunk, so the
//! chunk sends the row as those changes left it (over the chunk's copy, for values an
//! update left unchanged), or nothing if it was deleted: a sink may not have had the row
//! before, so the update alone would not put it there. At the high watermark the chunk is
//! spooled as inserts, then an [`Event::Chunk`] naming the key range and every key the source has
//! in it, so a sink that keeps rows deletes the ones the source no longer has: the
//! target's table ends as the source's without ever being emptied. Only then does the
//! chunk count as done (the state file keeps the last key copied): a restart goes on
//! with the next chunk.
//!
//! PostgreSQL's order of commits in the WAL is not quite the order in which they become
//! visible: a transaction writes its commit record, flushes it (and waits for a
//! synchronous standby) and only then leaves the list of running transactions. One that
//! committed just before the low watermark can thus still be invisible to the chunk's
//! read, while the stream has passed it already: the chunk would send the row as it was
//! before that transaction. So the chunk is read in a REPEATABLE READ transaction that
//! also returns its snapshot's running transactions (`pg_current_snapshot()`), and when
//! one of them is among the transactions the stream brought before the low watermark,
//! the chunk is thrown away and read again.

use std::collections::{HashMap, VecDeque};

use relay_proto::cdc::{Event, Record, Relation, SnapshotPhase, Value};

use super::super::catalog::{ident, select_sql};
use super::super::{SourceError, RECORD_TARGET_BYTES};
use super::{bounded, relation_size, values_size, ReplicationStream, Streamer};

/// Prefix of the watermark messages relay-inner writes into the source's WAL.
pub const WATERMARK_PREFIX: &str = "routy.resync";
/// Counter: rows copied by resyncs, by `source` and `table`.
pub const RESYNC_ROWS_TOTAL: &str = "routy_cdc_source_resync_rows_total";
/// Counter: resync chunks done, by `source` and `table`.
pub const RESYNC_CHUNKS_TOTAL: &str = "routy_cdc_source_resync_chunks_total";

/// A chunk read and waiting for its watermarks to come back in the stream.
struct Window {
    n: u64,
    table: String,
    /// The relation as the chunk leaves relay-inner.
    rel: Relation,
    /// Key column indexes in `rel`.
    keys: Vec<usize>,
    /// Whether a sink may delete by range (no key column masked).
    ranged: bool,
    /// The chunk's rows, as they leave relay-inner.
    rows: Vec<Vec<Value>>,
    /// The last key of the chunk as the source has it (where the next chunk starts).
    last: Option<Vec<Value>>,
    /// Fewer rows than asked for: the table's end.
    end: bool,
    low_seen: bool,
    /// Keys the stream changed between the watermarks: the row as the changes leave it
    /// (over the chunk's copy, for values a change left unchanged), or None once deleted.
    touched: HashMap<Vec<Value>, Option<Vec<Value>>>,
    /// Key → index in `rows`.
    by_key: HashMap<Vec<Value>, usize>,
    /// The table was truncated between the watermarks.
    truncated: bool,
    /// Transactions running when the chunk's snapshot was taken (low 32 bits of their ids).
    xip: Vec<u32>,
}

/// How many of the stream's last committed transactions are remembered, to tell whether
/// one the chunk's snapshot did not see committed before the low watermark.
const RECENT_XIDS: usize = 1 << 16;

/// The resyncs of one source.
pub(crate) struct Driver {
    /// `schema.table` waiting or running, in order.
    jobs: VecDeque<String>,
    window: Option<Window>,
    /// Distinguishes this session's watermarks from earlier ones read again.
    nonce: u32,
    next_n: u64,
    /// The ids of the stream's last [`RECENT_XIDS`] committed transactions, a ring whose
    /// next slot is `recent_at`: one store per commit; searched once per chunk.
    recent: Vec<u32>,
    recent_at: usize,
    /// Chunks read again because their snapshot missed a transaction committed before
    /// their low watermark.
    rereads: u64,
    /// Rereads in a row, and when the next read may start (the transaction the snapshot
    /// missed may take a while to become visible: a synchronous standby's answer).
    rereads_in_row: u32,
    retry_at: Option<std::time::Instant>,
}

impl Driver {
    /// A driver that goes on with the resyncs `pending` (from the state file).
    pub(crate) fn new(pending: Vec<String>) -> Driver {
        Driver {
            jobs: pending.into(),
            window: None,
            nonce: rand::random(),
            next_n: 0,
            recent: Vec::new(),
            recent_at: 0,
            rereads: 0,
            rereads_in_row: 0,
            retry_at: None,
        }
    }

    /// When a chunk read again may start, if one waits.
    pub(crate) fn retry_at(&self) -> Option<std::time::Instant> {
        self.retry_at.filter(|_| self.window.is_none())
    }

    /// The stream brought the commit of transaction `xid`.
    pub(crate) fn committed(&mut self, xid: u32) {
        if self.recent.len() < RECENT_XIDS {
            self.recent.push(xid);
        } else {
            self.recent[self.recent_at] = xid;
        }
        self.recent_at = (self.recent_at + 1) % RECENT_XIDS;
    }

    /// Whether a chunk should be started now.
    pub(crate) fn wants_chunk(&self) -> bool {
        self.window.is_none()
            && !self.jobs.is_empty()
            && self.retry_at.is_none_or(|t| std::time::Instant::now() >= t)
    }

    /// The tables being resynced or waiting.
    pub(crate) fn tables(&self) -> impl Iterator<Item = &String> {
        self.jobs.iter()
    }
}

/// The running transactions of a `pg_current_snapshot()` (`xmin:xmax:xip,...`), low 32
/// bits of each (the xid pgoutput sends); None if it is not one.
fn running_xids(snapshot: &str) -> Option<Vec<u32>> {
    let mut parts = snapshot.trim().splitn(3, ':');
    let (_, _, xip) = (parts.next()?, parts.next()?, parts.next()?);
    xip.split(',')
        .filter(|x| !x.is_empty())
        .map(|x| x.parse::<u64>().ok().map(|x| x as u32))
        .collect()
}

fn text(v: &Value) -> Option<&str> {
    match v {
        Value::Text(t) => Some(t),
        _ => None,
    }
}

/// `'text'` as an SQL literal.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Whether a column's values are strings (compared byte-wise, `COLLATE "C"`).
pub(crate) fn is_string(c: &relay_proto::cdc::Column) -> bool {
    c.type_name == "text" || c.type_name.starts_with("character")
}

/// The key columns of `src` in key order as relay-outer compares: strings byte-wise.
pub(crate) fn key_order_sql(src: &Relation, keys: &[usize]) -> Vec<String> {
    keys.iter()
        .map(|&i| {
            let c = &src.columns[i];
            if is_string(c) {
                format!("{} COLLATE \"C\"", ident(&c.name))
            } else {
                ident(&c.name)
            }
        })
        .collect()
}

/// `(key columns) OP (values)`, in the order of [`key_order_sql`].
pub(crate) fn key_cmp_sql(
    src: &Relation,
    keys: &[usize],
    vals: &[Option<String>],
    op: &str,
) -> String {
    let lits: Vec<String> = keys
        .iter()
        .zip(vals)
        .map(|(&i, v)| {
            let c = &src.columns[i];
            let lit = format!("{}::{}", literal(v.as_deref().unwrap_or("")), c.type_name);
            if is_string(c) {
                format!("{lit} COLLATE \"C\"")
            } else {
                lit
            }
        })
        .collect();
    format!(
        "({}) {op} ({})",
        key_order_sql(src, keys).join(", "),
        lits.join(", ")
    )
}

impl Streamer<'_> {
    /// Takes new resync requests (from the admin endpoint) into the state file.
    pub(super) fn take_resync_requests(&mut self) -> Result<(), SourceError> {
        let asked = self.ctx.status.take_resync_requests();
        if asked.is_empty() {
            return Ok(());
        }
        for table in asked {
            if self.resync.jobs.contains(&table) {
                tracing::info!(source = %self.ctx.cfg.name, table = %table, "a resync of the table is already running");
                continue;
            }
            tracing::info!(source = %self.ctx.cfg.name, table = %table, "resync requested");
            self.state.start_resync(&table);
            self.resync.jobs.push_back(table);
        }
        self.state.save()?;
        self.publish_resyncs();
        Ok(())
    }

    /// Shows the resyncs in `/status`.
    pub(super) fn publish_resyncs(&self) {
        let list = self
            .resync
            .tables()
            .map(|t| {
                let p = self.state.resync(t).cloned().unwrap_or_default();
                serde_json::json!({
                    "table": t,
                    "state": if self.resync.window.as_ref().is_some_and(|w| &w.table == t) { "copying" } else { "waiting" },
                    "rows": p.rows,
                    "chunks": p.chunks,
                    "rereads": self.resync.rereads,
                })
            })
            .collect();
        self.ctx.status.set_resyncs(list);
    }

    /// Reads the next chunk of the first resync between two watermarks.
    pub(super) async fn start_chunk(&mut self) -> Result<(), SourceError> {
        let Some(name) = self.resync.jobs.front().cloned() else {
            return Ok(());
        };
        let cfg = &self.ctx.cfg;
        let db = self.db;
        let Some(t) = self.resync_tables.iter().find(|t| t.name == name).cloned() else {
            return self.drop_resync(&name, "the table is not in postgres.tables");
        };
        let src = bounded(cfg, "reading the table's columns", async {
            let mut r = db.relation(&t, &cfg.publication).await?;
            let nums = db.attnums(&r).await?;
            for (c, n) in r.columns.iter_mut().zip(nums) {
                c.attnum = n;
            }
            Ok(r)
        })
        .await?;
        let keys = src.key_indexes();
        if keys.is_empty() || src.replica_identity == b'f' || src.replica_identity == b'n' {
            return self.drop_resync(
                &name,
                "a resync reads the table in key order: it needs a primary key (or a replica identity index)",
            );
        }
        let (plan, rel) = match self.shaper.plan(&src) {
            Some((p, out)) => (Some(p), out),
            None => (None, src.clone()),
        };
        let ranged = keys.iter().all(|&i| {
            !self
                .shaper
                .masks(&name)
                .is_some_and(|m| m.contains_key(&src.columns[i].name))
        });
        let progress = self.state.resync(&name).cloned().unwrap_or_default();
        let n = self.resync.next_n;
        self.resync.next_n += 1;
        let wm = format!("{:08x}:{n}", self.resync.nonce);
        let key_sql = key_order_sql(&src, &keys);
        let mut conds = Vec::new();
        if let Some(after) = &progress.after {
            conds.push(key_cmp_sql(&src, &keys, after, ">"));
        }
        // The copy this resync continues left ranges behind: the current one ends here.
        if let Some(upto) = &progress.upto {
            conds.push(key_cmp_sql(&src, &keys, upto, "<="));
        }
        if let Some(w) = self.wheres.get(&name) {
            conds.push(format!("({w})"));
        }
        let limit = cfg.resync_chunk_rows;
        let sql = format!(
            "{} ORDER BY {} LIMIT {limit}",
            select_sql(&t, &src, &conds),
            key_sql.join(", ")
        );
        let emit = |what: &'static str| {
            let content = format!("{wm}:{what}");
            async move {
                // In a transaction of its own: its commit flushes the WAL, so the walsender
                // sends it at once (a non-transactional message can sit unflushed on an idle
                // server), and it arrives in commit order with the changes around it.
                db.client
                    .batch_execute(&format!(
                        "BEGIN; SELECT pg_logical_emit_message(true, {}, {}); COMMIT",
                        literal(WATERMARK_PREFIX),
                        literal(&content)
                    ))
                    .await?;
                Ok(())
            }
        };
        bounded(cfg, "writing a resync's low watermark", emit("low")).await?;
        // One snapshot for both: the chunk's rows and the transactions it did not see.
        let got = bounded(cfg, "reading a resync chunk", async {
            let read = db
                .client
                .simple_query(&format!(
                    "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; \
                     SELECT pg_current_snapshot()::text; {sql}; COMMIT"
                ))
                .await;
            if read.is_err() {
                // A failed statement leaves the transaction open and aborted.
                let _ = db.client.batch_execute("ROLLBACK").await;
            }
            Ok(read?)
        })
        .await?;
        bounded(cfg, "writing a resync's high watermark", emit("high")).await?;
        let mut raw_rows = Vec::new();
        let mut xip: Option<Vec<u32>> = None;
        for m in got {
            if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                if xip.is_none() {
                    xip = Some(running_xids(r.get(0).unwrap_or_default()).ok_or_else(|| {
                        SourceError::Transient(format!(
                            "pg_current_snapshot() returned {:?}, not xmin:xmax:xip",
                            r.get(0)
                        ))
                    })?);
                    continue;
                }
                let vals: Vec<Value> = (0..src.columns.len())
                    .map(|i| match r.get(i) {
                        Some(s) => Value::Text(s.to_string()),
                        None => Value::Null,
                    })
                    .collect();
                raw_rows.push(vals);
            }
        }
        let xip = xip.ok_or_else(|| {
            SourceError::Transient("a resync chunk's read returned no pg_current_snapshot()".into())
        })?;
        let end = raw_rows.len() < limit;
        let last = raw_rows
            .last()
            .map(|r| keys.iter().map(|&i| r[i].clone()).collect::<Vec<_>>());
        let rows: Vec<Vec<Value>> = raw_rows
            .into_iter()
            .map(|r| match &plan {
                Some(p) => self.shaper.apply(p, r),
                None => r,
            })
            .collect();
        // Key positions in the relation as it leaves relay-inner.
        let out_keys = rel.key_indexes();
        let by_key = rows
            .iter()
            .enumerate()
            .map(|(n, r)| {
                let k: Vec<Value> = out_keys
                    .iter()
                    .map(|&i| r.get(i).cloned().unwrap_or(Value::Null))
                    .collect();
                (k, n)
            })
            .collect();
        tracing::debug!(source = %cfg.name, table = %name, chunk = n, rows = rows.len(), "resync chunk read");
        self.resync.window = Some(Window {
            n,
            table: name,
            rel,
            keys: out_keys,
            ranged,
            rows,
            last,
            end,
            low_seen: false,
            touched: HashMap::new(),
            by_key,
            truncated: false,
            xip,
        });
        self.publish_resyncs();
        Ok(())
    }

    fn drop_resync(&mut self, table: &str, why: &str) -> Result<(), SourceError> {
        tracing::error!(source = %self.ctx.cfg.name, table, "resync refused: {why}");
        self.ctx
            .status
            .set_error(Some(format!("resync of {table} refused: {why}")));
        self.resync.jobs.retain(|t| t != table);
        self.state.finish_resync(table);
        self.state.save()?;
        self.publish_resyncs();
        Ok(())
    }

    /// A row change between a chunk's watermarks supersedes the chunk's copy of the row:
    /// the row as the window's changes leave it is what the chunk sends (a sink may not
    /// have the row yet, so an update alone would not put it there).
    pub(super) fn resync_touch(&mut self, ev: &Event) {
        let Some(w) = self.resync.window.as_mut() else {
            return;
        };
        if !w.low_seen {
            return;
        }
        let key_of = |keys: &[usize], vals: &[Value]| -> Vec<Value> {
            keys.iter()
                .map(|&i| vals.get(i).cloned().unwrap_or(Value::Null))
                .collect()
        };
        match ev {
            Event::Insert { rel, new } if *rel == w.rel.id => {
                w.touched.insert(key_of(&w.keys, new), Some(new.clone()));
            }
            Event::Update { rel, old, new } if *rel == w.rel.id => {
                let k = key_of(&w.keys, new);
                if let Some(o) = old {
                    let ok = key_of(&w.keys, &o.values);
                    if ok != k {
                        w.touched.insert(ok, None);
                    }
                }
                // Values the change left unchanged (TOAST) come from the row before it.
                let base: Option<Vec<Value>> = match w.touched.get(&k) {
                    Some(b) => b.clone(),
                    None if w.truncated => None,
                    None => w.by_key.get(&k).map(|&n| w.rows[n].clone()),
                };
                let mut row = new.clone();
                if let Some(b) = base {
                    for (v, o) in row.iter_mut().zip(b) {
                        if matches!(v, Value::Unchanged) {
                            *v = o;
                        }
                    }
                }
                w.touched.insert(k, Some(row));
            }
            Event::Delete { rel, old } if *rel == w.rel.id => {
                w.touched.insert(key_of(&w.keys, &old.values), None);
            }
            Event::Truncate { rels, .. } if rels.contains(&w.rel.id) => {
                w.truncated = true;
                w.touched.clear();
            }
            _ => {}
        }
    }

    /// A watermark came back in the stream.
    pub(super) async fn on_watermark(
        &mut self,
        s: &mut ReplicationStream,
        content: &[u8],
    ) -> Result<(), SourceError> {
        let content = String::from_utf8_lossy(content);
        let Some(w) = self.resync.window.as_mut() else {
            return Ok(());
        };
        let me = format!("{:08x}:{}", self.resync.nonce, w.n);
        match content.strip_prefix(&me) {
            Some(":low") => {
                let missed = w.xip.iter().find(|x| self.resync.recent.contains(x));
                if let Some(x) = missed {
                    // See the module's documentation: the chunk's copy is older than what
                    // the stream applied already.
                    tracing::debug!(source = %self.ctx.cfg.name, table = %w.table, chunk = w.n, xid = x,
                        "the chunk's snapshot missed a transaction committed before its low watermark; reading the chunk again");
                    self.resync.window = None;
                    self.resync.rereads += 1;
                    self.resync.rereads_in_row += 1;
                    let wait = std::time::Duration::from_millis(10)
                        * 2u32.pow(self.resync.rereads_in_row.min(7));
                    self.resync.retry_at = Some(std::time::Instant::now() + wait);
                    self.publish_resyncs();
                    return Ok(());
                }
                w.low_seen = true;
                self.resync.rereads_in_row = 0;
                self.resync.retry_at = None;
                Ok(())
            }
            Some(":high") if w.low_seen => self.finish_chunk(s).await,
            // A watermark of an earlier chunk or session, read again.
            _ => Ok(()),
        }
    }

    /// Spools what is left of the chunk, its end, and records the progress.
    async fn finish_chunk(&mut self, s: &mut ReplicationStream) -> Result<(), SourceError> {
        let Some(w) = self.resync.window.take() else {
            return Ok(());
        };
        if !self.events.is_empty() {
            // Not expected between transactions; keep the order.
            self.cut(s, 0).await?;
        }
        let mut progress = self.state.resync(&w.table).cloned().unwrap_or_default();
        let rel_bytes = relation_size(&w.rel);
        let spool = self.ctx.spool.clone();
        if !progress.started {
            spool
                .append(&Record {
                    lsn: 0,
                    events: vec![
                        Event::Relation(w.rel.clone()),
                        Event::Snapshot {
                            rel: w.rel.id,
                            phase: SnapshotPhase::Resync,
                            value: 0,
                        },
                    ],
                })
                .await?;
            progress.started = true;
        }
        let key_of = |r: &[Value]| -> Vec<Value> {
            w.keys
                .iter()
                .map(|&i| r.get(i).cloned().unwrap_or(Value::Null))
                .collect()
        };
        let mut live: Vec<Vec<Value>> = Vec::new();
        let mut events = vec![Event::Relation(w.rel.clone())];
        let mut bytes = rel_bytes;
        let mut sent = 0u64;
        // The chunk's rows the window did not touch, then the rows it touched as it left
        // them (whole rows only: one with a value left unchanged and no copy to take it
        // from is outside the chunk, and the target has it already).
        let untouched = w
            .rows
            .iter()
            .filter(|r| !w.truncated && !w.touched.contains_key(&key_of(r)));
        let changed = w
            .touched
            .values()
            .flatten()
            .filter(|r| !r.iter().any(|v| matches!(v, Value::Unchanged)));
        for r in untouched.chain(changed) {
            let k = key_of(r);
            live.push(k);
            bytes += values_size(r) + 8;
            events.push(Event::Insert {
                rel: w.rel.id,
                new: r.clone(),
            });
            sent += 1;
            if bytes >= RECORD_TARGET_BYTES {
                let evs = std::mem::replace(&mut events, vec![Event::Relation(w.rel.clone())]);
                spool
                    .append(&Record {
                        lsn: 0,
                        events: evs,
                    })
                    .await?;
                bytes = rel_bytes;
            }
        }
        live.extend(
            w.touched
                .iter()
                .filter(|(_, row)| {
                    row.as_ref()
                        .is_some_and(|r| r.iter().any(|v| matches!(v, Value::Unchanged)))
                })
                .map(|(k, _)| k.clone()),
        );
        let as_values = |k: &Vec<Option<String>>| -> Vec<Value> {
            k.iter()
                .map(|v| v.clone().map_or(Value::Null, Value::Text))
                .collect()
        };
        if w.ranged {
            events.push(Event::Chunk {
                rel: w.rel.id,
                lo: progress.after.as_ref().map(as_values),
                // At a range's end, the range's end: the rows after it are another
                // range's (the copy this resync continues may have copied them).
                hi: if w.end {
                    progress.upto.as_ref().map(as_values)
                } else {
                    w.last.clone()
                },
                keys: live,
            });
        }
        // The end of a range that is not the last one: on with the next.
        let next_range = (w.end && !progress.more.is_empty()).then(|| progress.more.remove(0));
        let end = w.end && next_range.is_none();
        progress.rows += sent;
        progress.chunks += 1;
        if end {
            events.push(Event::Snapshot {
                rel: w.rel.id,
                phase: SnapshotPhase::Done,
                value: progress.rows,
            });
        }
        if events.len() > 1 {
            spool.append(&Record { lsn: 0, events }).await?;
        }
        spool.sync().await?;
        let label = self.ctx.label();
        metrics::counter!(RESYNC_ROWS_TOTAL, "source" => label.clone(), "table" => w.table.clone())
            .increment(sent);
        metrics::counter!(RESYNC_CHUNKS_TOTAL, "source" => label, "table" => w.table.clone())
            .increment(1);
        if let Some(r) = next_range {
            progress.after = r.after;
            progress.upto = r.upto;
        } else if let Some(last) = &w.last {
            progress.after = Some(last.iter().map(|v| text(v).map(str::to_string)).collect());
        }
        if end {
            tracing::info!(source = %self.ctx.cfg.name, table = %w.table, rows = progress.rows,
                chunks = progress.chunks, "resync done");
            self.resync.jobs.retain(|t| t != &w.table);
            self.state.finish_resync(&w.table);
        } else {
            self.state.set_resync(&w.table, progress);
        }
        self.state.save()?;
        self.publish_resyncs();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_gives_its_running_transactions() {
        assert_eq!(running_xids("740:745:740,742"), Some(vec![740, 742]));
        assert_eq!(running_xids("745:745:"), Some(vec![]));
        // xid8 beyond the first epoch: pgoutput sends the low 32 bits.
        assert_eq!(
            running_xids("4294967300:4294967301:4294967300"),
            Some(vec![4])
        );
        assert_eq!(running_xids("garbage"), None);
        assert_eq!(running_xids("1:2:x"), None);
    }

    #[test]
    fn the_stream_remembers_a_bounded_number_of_commits() {
        let mut d = Driver::new(Vec::new());
        for x in 0..(RECENT_XIDS as u32 + 10) {
            d.committed(x);
        }
        assert_eq!(d.recent.len(), RECENT_XIDS);
        assert!(!d.recent.contains(&9) && d.recent.contains(&10));
        assert!(d.recent.contains(&(RECENT_XIDS as u32 + 9)));
    }
}
