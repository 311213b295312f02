//! Streaming: pgoutput messages from the slot become [`relay_proto::cdc`] records in the
//! spool; positions are confirmed to PostgreSQL only once durable there.
//!
//! * Transactions stay whole: a record holding a `Commit` ends with it and has
//!   `Record.lsn` = the commit's `end_lsn`; a large transaction is cut into records of about
//!   [`RECORD_TARGET_BYTES`] (never above [`RECORD_MAX_BYTES`], except one single row that
//!   is larger, up to the spool's record limit; beyond that the source fails naming the
//!   table and size). Every record carries the `Relation` of each table its row events use,
//!   before the first use.
//! * Transactions whose commit is before the spool's durable position are skipped (already
//!   spooled before a restart). Row and truncate events of a table copied in a snapshot at
//!   LSN P are dropped from transactions that committed before P.
//! * A non-transactional logical message is a record of its own with `Record.lsn` = the
//!   message's LSN + 1 (the position just past its start: durable means "not again"); the
//!   heartbeat's messages (prefix [`relay_proto::cdc::HEARTBEAT_PREFIX`]) are not spooled.
//! * Group commit: the spool is synced when the stream has nothing more ready at once, or
//!   after [`SYNC_MAX_DELAY`] / [`SYNC_MAX_BYTES`]; then the durable LSN is confirmed. With
//!   no transaction open and everything synced, the WAL position of keepalives and of
//!   heartbeat messages is confirmed too, so an idle slot advances.
//! * A stalled server is noticed: after half of `receive_timeout` spent waiting with nothing
//!   received, a status update asks for a keepalive; after all of it the session fails
//!   ([`SourceError::Stalled`]) and the source reconnects. The queries made on the ordinary
//!   connection while streaming have the same deadline.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::FutureExt;
use relay_proto::cdc::{self, Event, OldRow, Record, Relation, Value};

use super::catalog::{lost_slot, Db, Table};
use super::shape::{RelPlan, Shaper};
use super::snapshot::SnapshotState;
use super::{
    Ctx, SourceError, CONFIRMED_LSN, EVENTS_TOTAL, HEARTBEATS_TOTAL, RECORD_MAX_BYTES,
    RECORD_TARGET_BYTES, TRANSACTIONS_TOTAL,
};
use crate::cdc::replication::{
    format_lsn, ReplicationClient, ReplicationEvent, ReplicationStream, QUERY_TIMEOUT,
};
use crate::cdc::spool::MAX_RECORD;
use crate::config::SourceConfig;
use relay_proto::pgoutput::{self, Message, OldKind};

/// Longest time appended records wait for a sync while the stream keeps delivering.
pub const SYNC_MAX_DELAY: Duration = Duration::from_millis(200);
/// Most bytes appended before a sync while the stream keeps delivering.
pub const SYNC_MAX_BYTES: usize = 32 << 20;
/// Status update interval while the spool is full and appending waits.
const STATUS_WHILE_WAITING: Duration = Duration::from_secs(5);

/// Rough encoded size of values.
pub(crate) fn values_size(v: &[Value]) -> usize {
    4 + v
        .iter()
        .map(|x| match x {
            Value::Text(s) => 5 + s.len(),
            _ => 1,
        })
        .sum::<usize>()
}

/// Rough encoded size of a relation event.
pub(crate) fn relation_size(r: &Relation) -> usize {
    24 + r.schema.len()
        + r.name.len()
        + r.columns
            .iter()
            .map(|c| 22 + c.name.len() + c.type_name.len())
            .sum::<usize>()
}

fn event_size(ev: &Event) -> usize {
    match ev {
        Event::Insert { new, .. } => 5 + values_size(new),
        Event::Update { old, new, .. } => {
            6 + values_size(new) + old.as_ref().map_or(0, |o| 1 + values_size(&o.values))
        }
        Event::Delete { old, .. } => 6 + values_size(&old.values),
        Event::Truncate { rels, .. } => 6 + 4 * rels.len(),
        Event::Message {
            prefix, content, ..
        } => 18 + prefix.len() + content.len(),
        Event::Relation(r) => relation_size(r),
        _ => 32,
    }
}

/// Which relations of the replication stream are forwarded: the tables `postgres.tables`
/// lists, and the partitions of those that are partitioned (pgoutput names a change to a
/// partition after the partition). A publication may publish more, made by hand with more
/// tables or `FOR ALL TABLES`, or still holding a table removed from the config: those
/// changes are dropped here, so the outside gets only what the inside chose to expose.
pub(crate) struct Wanted {
    names: HashSet<(String, String)>,
    oids: HashSet<u32>,
    /// The decision for each relation id the stream described.
    decided: HashMap<u32, bool>,
}

impl Wanted {
    /// The configured tables.
    pub(crate) fn new(tables: &[Table]) -> Wanted {
        Wanted {
            names: tables
                .iter()
                .map(|t| (t.schema.clone(), t.table.clone()))
                .collect(),
            oids: tables.iter().map(|t| t.oid).collect(),
            decided: HashMap::new(),
        }
    }

    /// Decides (and remembers) whether changes to `rel` are forwarded: by its name, by its
    /// id, or, for a partition, by a configured ancestor (asked of the catalog once per
    /// relation message).
    async fn decide(&mut self, db: &Db, rel: &Relation) -> Result<bool, SourceError> {
        let mut yes = self.oids.contains(&rel.id)
            || self.names.contains(&(rel.schema.clone(), rel.name.clone()));
        if !yes {
            let oid = rel.id;
            let ancestors: Vec<u32> = self.oids.iter().copied().collect();
            yes = db
                .client
                .query_opt(
                    "SELECT 1 FROM pg_partition_ancestors($1::oid) a WHERE a.relid = ANY($2::oid[])",
                    &[&oid, &ancestors],
                )
                .await?
                .is_some();
        }
        self.decided.insert(rel.id, yes);
        Ok(yes)
    }

    /// Whether changes to relation `id` are forwarded. A relation the stream has not
    /// described yet is not (pgoutput describes a relation before its first change).
    fn is_wanted(&self, id: u32) -> bool {
        self.decided.get(&id).copied().unwrap_or(false)
    }
}

struct Txn {
    final_lsn: u64,
    xid: u32,
    skip: bool,
}

/// How long relay-inner has waited on the replication connection with nothing arriving.
///
/// Only time spent waiting counts: while appending waits for a full spool or a catalog
/// query runs, the stream is not read, and what the server sent meanwhile is still
/// buffered. At half of `receive_timeout` a keepalive is requested (once per silence); at
/// `receive_timeout` the connection is taken for dead, like PostgreSQL's
/// `wal_receiver_timeout`. A zero limit turns both off.
#[derive(Debug)]
struct Silence {
    limit: Duration,
    silent: Duration,
    pinged: bool,
}

impl Silence {
    fn new(limit: Duration) -> Silence {
        Silence {
            limit,
            silent: Duration::ZERO,
            pinged: false,
        }
    }

    /// A message arrived.
    fn heard(&mut self) {
        self.silent = Duration::ZERO;
        self.pinged = false;
    }

    /// A wait ended without a message.
    fn waited(&mut self, d: Duration) {
        self.silent += d;
    }

    fn expired(&self) -> bool {
        !self.limit.is_zero() && self.silent >= self.limit
    }

    fn ping_due(&self) -> bool {
        !self.limit.is_zero() && !self.pinged && self.silent >= self.limit / 2
    }

    /// When a wait starting at `now` must end to ping or to give up.
    fn wake(&self, now: Instant) -> Option<Instant> {
        if self.limit.is_zero() {
            return None;
        }
        let at = if self.pinged {
            self.limit
        } else {
            self.limit / 2
        };
        Some(now + at.saturating_sub(self.silent))
    }
}

struct Streamer<'a> {
    ctx: &'a Ctx,
    db: &'a Db,
    rels: HashMap<u32, Relation>,
    types: HashMap<(u32, i32), String>,
    /// Relation id → LSN of the snapshot it was copied in.
    filters: HashMap<u32, u64>,
    /// What `postgres.tables` lists; nothing else leaves the source (see [`Wanted`]).
    wanted: Wanted,
    /// Masks and excluded columns, done before the spool.
    shaper: Shaper,
    /// Row filters (a resync's chunks read with them).
    wheres: HashMap<String, String>,
    /// The state file (resync progress).
    state: SnapshotState,
    /// The configured tables, resolved.
    resync_tables: Vec<Table>,
    /// Resyncs.
    resync: resync::Driver,
    /// A resync watermark seen in the open transaction (acted on at its commit).
    watermark: Option<Vec<u8>>,
    /// Relation id → what the shaper does to its rows.
    plans: HashMap<u32, RelPlan>,
    /// Transactions committed before this are in the spool already.
    skip_before: u64,
    txn: Option<Txn>,
    events: Vec<Event>,
    included: HashSet<u32>,
    bytes: usize,
    dirty: bool,
    dirty_since: Instant,
    dirty_bytes: usize,
    /// A position everything before which is durable or irrelevant (keepalive/heartbeat).
    idle_lsn: u64,
    /// Like `idle_lsn`, valid once the records appended so far are synced.
    idle_after_sync: u64,
    /// Never confirm below the slot's confirmed position.
    floor: u64,
    last_decoded: Instant,
    next_status: Instant,
    next_slot_check: Instant,
}

/// What a streaming session starts from.
pub(crate) struct Setup {
    /// Relation id → LSN of the snapshot it was copied in.
    pub(crate) copied: HashMap<u32, u64>,
    /// The configured tables.
    pub(crate) wanted: Wanted,
    /// Masks and excluded columns.
    pub(crate) shaper: Shaper,
    /// `schema.table` → row filter.
    pub(crate) wheres: HashMap<String, String>,
    /// The source's state file (resync progress).
    pub(crate) state: SnapshotState,
    /// The configured tables, resolved.
    pub(crate) tables: Vec<Table>,
    /// Resyncs to go on with.
    pub(crate) resyncs: Vec<String>,
}

/// Streams from the slot until stopped (`Ok`) or failed.
pub(crate) async fn stream(
    ctx: &Ctx,
    db: &Db,
    repl: ReplicationClient,
    setup: Setup,
    floor: u64,
) -> Result<(), SourceError> {
    let Setup {
        copied: filters,
        wanted,
        shaper,
        wheres,
        state,
        tables,
        resyncs,
    } = setup;
    let cfg = &ctx.cfg;
    // What an earlier session appended is in the log: make it durable so its transactions
    // count as spooled and are not appended a second time.
    ctx.spool.sync().await?;
    let durable = ctx.spool.durable_lsn();
    let mut s = repl
        .start_logical(
            &cfg.slot,
            durable,
            &[
                ("proto_version", "1"),
                ("publication_names", cfg.publication.as_str()),
                ("messages", "true"),
            ],
        )
        .await?;
    tracing::info!(source = %cfg.name, slot = %cfg.slot, from = %format_lsn(durable.max(floor)), "streaming changes");
    let now = Instant::now();
    let mut st = Streamer {
        ctx,
        db,
        rels: HashMap::new(),
        types: HashMap::new(),
        filters,
        wanted,
        shaper,
        plans: HashMap::new(),
        wheres,
        state,
        resync_tables: tables,
        resync: resync::Driver::new(resyncs),
        watermark: None,
        skip_before: durable,
        txn: None,
        events: Vec::new(),
        included: HashSet::new(),
        bytes: 0,
        dirty: false,
        dirty_since: now,
        dirty_bytes: 0,
        idle_lsn: 0,
        idle_after_sync: 0,
        floor,
        last_decoded: now,
        next_status: now,
        next_slot_check: now + cfg.status_interval,
    };
    st.send_status(&mut s, false).await?;
    st.publish_resyncs();
    let mut silence = Silence::new(cfg.receive_timeout);
    loop {
        if st.txn.is_none() {
            st.take_resync_requests()?;
            if st.resync.wants_chunk() {
                st.start_chunk().await?;
            }
        }
        if ctx.stop.is_stopping() {
            st.sync(&mut s).await?;
            return Ok(());
        }
        if silence.expired() {
            return Err(SourceError::Stalled(format!(
                "no message from PostgreSQL on the replication connection for {:.1}s \
                 (receive_timeout {:?}{}): the server, its walsender or the network is stalled; \
                 dropping the connection",
                silence.silent.as_secs_f64(),
                cfg.receive_timeout,
                if silence.pinged {
                    "; the keepalive requested at half of it did not come either"
                } else {
                    ""
                }
            )));
        }
        if silence.ping_due() {
            // An idle server may send nothing (wal_sender_timeout = 0, or our status
            // updates keep it from pinging): ask for a keepalive before giving up on it.
            st.send_status(&mut s, true).await?;
            silence.pinged = true;
        }
        let now = Instant::now();
        if now >= st.next_slot_check {
            st.check_slot().await?;
        }
        if now >= st.next_status {
            st.send_status(&mut s, false).await?;
        }
        let mut ready = None;
        if st.dirty {
            match s.next().now_or_never() {
                Some(r) => ready = Some(r),
                None => st.sync(&mut s).await?,
            }
        }
        let ev = match ready {
            Some(r) => r,
            None => {
                let hb = cfg.heartbeat;
                let hb_at = st.last_decoded + hb;
                let since = Instant::now();
                let mut wake = st.next_status.min(st.next_slot_check);
                if let Some(w) = silence.wake(since) {
                    wake = wake.min(w);
                }
                if let Some(t) = st.resync.retry_at() {
                    wake = wake.min(t);
                }
                // Biased: a message already there wins over a timer due at the same time,
                // so a wait cut short by the timers never counts as silence wrongly.
                tokio::select! {
                    biased;
                    r = s.next() => r,
                    _ = ctx.stop.stopping() => continue,
                    _ = ctx.status.resync_asked.notified() => continue,
                    _ = tokio::time::sleep_until(wake.into()) => {
                        silence.waited(since.elapsed());
                        continue;
                    }
                    _ = tokio::time::sleep_until(hb_at.into()), if !hb.is_zero() => {
                        silence.waited(since.elapsed());
                        bounded(cfg, "emitting the heartbeat", st.db.heartbeat()).await?;
                        metrics::counter!(HEARTBEATS_TOTAL, "source" => ctx.label()).increment(1);
                        st.last_decoded = Instant::now();
                        continue;
                    }
                }
            }
        };
        if matches!(ev, Ok(Some(_))) {
            silence.heard();
        }
        match ev? {
            None => {
                return Err(SourceError::Transient(
                    "PostgreSQL ended the replication stream".into(),
                ))
            }
            Some(ReplicationEvent::XLogData { data, .. }) => st.handle(&mut s, &data).await?,
            Some(ReplicationEvent::Keepalive {
                wal_end,
                reply_requested,
                ..
            }) => {
                st.on_idle_position(wal_end);
                if reply_requested {
                    st.send_status(&mut s, false).await?;
                }
            }
        }
        if st.dirty
            && (st.dirty_since.elapsed() >= SYNC_MAX_DELAY || st.dirty_bytes >= SYNC_MAX_BYTES)
        {
            st.sync(&mut s).await?;
        }
    }
}

/// Runs a query on the ordinary connection with a deadline (`receive_timeout`, or
/// [`QUERY_TIMEOUT`] when that is off): a server that stopped answering must not hold the
/// stream, and with it the receive timeout, up forever. The session's setup, the snapshot's
/// queries and each wait for the next chunk of a COPY use it too.
pub(crate) async fn bounded<T>(
    cfg: &SourceConfig,
    what: &str,
    query: impl std::future::Future<Output = Result<T, SourceError>>,
) -> Result<T, SourceError> {
    let limit = match cfg.receive_timeout {
        d if d.is_zero() => QUERY_TIMEOUT,
        d => d,
    };
    tokio::time::timeout(limit, query).await.map_err(|_| {
        SourceError::Stalled(format!(
            "PostgreSQL did not answer within {limit:?} on the query connection while {what}"
        ))
    })?
}

/// Largest logical-message content kept: anyone may call `pg_logical_emit_message`, so an
/// oversized one must not stop the source (sinks ignore messages; `cdc tail` shows them).
pub const MAX_MESSAGE_CONTENT: usize = 1 << 20;

fn bounded_message(prefix: &str, content: Vec<u8>) -> Vec<u8> {
    if content.len() <= MAX_MESSAGE_CONTENT {
        return content;
    }
    tracing::warn!(
        prefix,
        bytes = content.len(),
        limit = MAX_MESSAGE_CONTENT,
        "logical decoding message too large: kept without its content"
    );
    Vec::new()
}

fn convert_values(tuple: Vec<pgoutput::Value>, rel: &Relation) -> Result<Vec<Value>, SourceError> {
    tuple
        .into_iter()
        .map(|v| match v {
            pgoutput::Value::Null => Ok(Value::Null),
            pgoutput::Value::UnchangedToast => Ok(Value::Unchanged),
            pgoutput::Value::Text(b) => String::from_utf8(b).map(Value::Text).map_err(|_| {
                SourceError::Fatal(format!("a value of {} is not valid UTF-8", rel.qualified()))
            }),
            pgoutput::Value::Binary(_) => Err(SourceError::Fatal(
                "pgoutput sent a binary value although binary mode was not requested".into(),
            )),
        })
        .collect()
}

impl Streamer<'_> {
    /// The position to confirm: everything before it is durable in the spool.
    fn confirmable(&self) -> u64 {
        self.floor
            .max(self.ctx.spool.durable_lsn())
            .max(self.idle_lsn)
    }

    async fn send_status(
        &mut self,
        s: &mut ReplicationStream,
        reply: bool,
    ) -> Result<(), SourceError> {
        let lsn = self.confirmable();
        s.send_status(lsn, lsn, lsn, reply).await?;
        self.ctx.status.set_confirmed(lsn);
        metrics::gauge!(CONFIRMED_LSN, "source" => self.ctx.label()).set(lsn as f64);
        self.next_status = Instant::now() + self.ctx.cfg.status_interval;
        Ok(())
    }

    async fn sync(&mut self, s: &mut ReplicationStream) -> Result<(), SourceError> {
        if self.dirty {
            self.ctx.spool.sync().await?;
            self.dirty = false;
            self.dirty_bytes = 0;
        }
        self.idle_lsn = self.idle_lsn.max(self.idle_after_sync);
        self.send_status(s, false).await
    }

    /// A WAL position before which the server has sent everything (keepalive, heartbeat).
    fn on_idle_position(&mut self, lsn: u64) {
        if self.txn.is_some() {
            return;
        }
        if self.dirty {
            self.idle_after_sync = self.idle_after_sync.max(lsn);
        } else {
            self.idle_lsn = self.idle_lsn.max(lsn);
        }
    }

    async fn check_slot(&mut self) -> Result<(), SourceError> {
        self.next_slot_check = Instant::now() + self.ctx.cfg.status_interval;
        let cfg = &self.ctx.cfg;
        let info = bounded(cfg, "checking the slot", self.db.slot_info(&cfg.slot)).await?;
        match info {
            None => Err(SourceError::Transient(format!(
                "replication slot {} disappeared while streaming",
                cfg.slot
            ))),
            // The slot_watch reports it; this decides.
            Some(info) => {
                if info.wal_status == "lost" {
                    return Err(lost_slot(cfg));
                }
                if info.wal_status == "unreserved" {
                    tracing::warn!(source = %cfg.name, slot = %cfg.slot,
                        "the slot's WAL is about to be removed (wal_status = unreserved): it is close to max_slot_wal_keep_size");
                }
                Ok(())
            }
        }
    }

    async fn type_name(&mut self, oid: u32, typmod: i32) -> Result<String, SourceError> {
        if let Some(n) = self.types.get(&(oid, typmod)) {
            return Ok(n.clone());
        }
        let n = bounded(
            &self.ctx.cfg,
            "looking up a type name",
            self.db.format_type(oid, typmod),
        )
        .await?;
        self.types.insert((oid, typmod), n.clone());
        Ok(n)
    }

    async fn handle(&mut self, s: &mut ReplicationStream, data: &[u8]) -> Result<(), SourceError> {
        let msg = pgoutput::decode(data).map_err(|e| {
            SourceError::Fatal(format!("undecodable pgoutput message from the source: {e}"))
        })?;
        self.last_decoded = Instant::now();
        match msg {
            Message::Begin(b) => {
                if self.txn.is_some() {
                    tracing::warn!(
                        "transaction began while another was open; the open one is dropped"
                    );
                }
                self.events.clear();
                self.included.clear();
                self.bytes = 0;
                let skip = b.final_lsn.0 < self.skip_before;
                self.txn = Some(Txn {
                    final_lsn: b.final_lsn.0,
                    xid: b.xid,
                    skip,
                });
                if !skip {
                    self.push(Event::Begin {
                        xid: b.xid,
                        commit_lsn: b.final_lsn.0,
                        commit_time: b.commit_time,
                    });
                }
            }
            Message::Commit(c) => {
                let Some(txn) = self.txn.take() else {
                    return Err(SourceError::Transient(
                        "commit without a transaction in the replication stream".into(),
                    ));
                };
                self.resync.committed(txn.xid);
                if txn.skip {
                    return Ok(());
                }
                let watermark = self.watermark.take();
                if watermark.is_some()
                    && self.events.len() == 1
                    && matches!(self.events[0], Event::Begin { .. })
                {
                    // The watermark's own transaction: nothing to spool.
                    self.events.clear();
                    self.bytes = 0;
                    self.on_idle_position(c.end_lsn.0);
                } else {
                    self.push(Event::Commit {
                        commit_lsn: c.commit_lsn.0,
                        end_lsn: c.end_lsn.0,
                        commit_time: c.commit_time,
                    });
                    self.cut(s, c.end_lsn.0).await?;
                    metrics::counter!(TRANSACTIONS_TOTAL, "source" => self.ctx.label())
                        .increment(1);
                }
                if let Some(w) = watermark {
                    self.on_watermark(s, &w).await?;
                }
            }
            Message::Relation(r) => {
                let mut columns = Vec::with_capacity(r.columns.len());
                for c in &r.columns {
                    columns.push(cdc::Column {
                        name: c.name.clone(),
                        type_oid: c.type_oid,
                        type_modifier: c.type_modifier,
                        type_name: self.type_name(c.type_oid, c.type_modifier).await?,
                        key: c.is_key(),
                        attnum: 0,
                    });
                }
                let mut rel = Relation {
                    id: r.rel_id,
                    schema: if r.namespace.is_empty() {
                        "pg_catalog".into()
                    } else {
                        r.namespace
                    },
                    name: r.name,
                    replica_identity: match r.replica_identity {
                        pgoutput::ReplicaIdentity::Default => b'd',
                        pgoutput::ReplicaIdentity::Nothing => b'n',
                        pgoutput::ReplicaIdentity::Full => b'f',
                        pgoutput::ReplicaIdentity::Index => b'i',
                    },
                    columns,
                };
                let ctx = self.ctx;
                let decided = bounded(
                    &ctx.cfg,
                    "looking up a partition's ancestors",
                    self.wanted.decide(self.db, &rel),
                )
                .await?;
                if !decided {
                    tracing::warn!(source = %self.ctx.cfg.name, table = %rel.qualified(),
                        publication = %self.ctx.cfg.publication,
                        "the publication publishes a table that postgres.tables does not list: its changes are not forwarded");
                } else {
                    // pgoutput does not send attnums; the sinks need them to tell a
                    // renamed column from a dropped one and a new one.
                    let db = self.db;
                    let nums = bounded(
                        &ctx.cfg,
                        "reading the table's column numbers",
                        db.attnums(&rel),
                    )
                    .await?;
                    for (c, n) in rel.columns.iter_mut().zip(nums) {
                        c.attnum = n;
                    }
                }
                // Excluded columns and masks: from here on the relation and its rows are
                // as they leave relay-inner.
                match self.shaper.plan(&rel) {
                    Some((plan, out)) => {
                        self.plans.insert(rel.id, plan);
                        rel = out;
                    }
                    None => {
                        self.plans.remove(&rel.id);
                    }
                }
                // A changed schema: send it again before the next use in this record.
                self.included.remove(&rel.id);
                self.rels.insert(rel.id, rel);
            }
            Message::Type(_) | Message::Origin(_) => {}
            Message::Insert(i) => {
                let Some(rel) = self.row_rel(i.rel_id)? else {
                    return Ok(());
                };
                let new = self.shape(rel.id, convert_values(i.new, &rel)?);
                self.row(s, &rel, Event::Insert { rel: rel.id, new })
                    .await?;
            }
            Message::Update(u) => {
                let Some(rel) = self.row_rel(u.rel_id)? else {
                    return Ok(());
                };
                let old = match (u.key, u.old) {
                    (_, Some(o)) => Some(OldRow {
                        key_only: false,
                        values: self.shape(rel.id, convert_values(o, &rel)?),
                    }),
                    (Some(k), None) => Some(OldRow {
                        key_only: true,
                        values: self.shape(rel.id, convert_values(k, &rel)?),
                    }),
                    (None, None) => None,
                };
                let new = self.shape(rel.id, convert_values(u.new, &rel)?);
                self.row(
                    s,
                    &rel,
                    Event::Update {
                        rel: rel.id,
                        old,
                        new,
                    },
                )
                .await?;
            }
            Message::Delete(d) => {
                let Some(rel) = self.row_rel(d.rel_id)? else {
                    return Ok(());
                };
                let old = OldRow {
                    key_only: d.which == OldKind::Key,
                    values: self.shape(rel.id, convert_values(d.key_or_old, &rel)?),
                };
                self.row(s, &rel, Event::Delete { rel: rel.id, old })
                    .await?;
            }
            Message::Truncate(t) => {
                let Some(txn) = &self.txn else {
                    return Err(SourceError::Transient(
                        "truncate outside a transaction in the replication stream".into(),
                    ));
                };
                if txn.skip {
                    return Ok(());
                }
                let final_lsn = txn.final_lsn;
                let rels: Vec<u32> = t
                    .rel_ids
                    .into_iter()
                    .filter(|id| self.filters.get(id).is_none_or(|&p| final_lsn >= p))
                    .filter(|id| self.wanted.is_wanted(*id))
                    .collect();
                if rels.is_empty() {
                    return Ok(());
                }
                for id in &rels {
                    if !self.included.contains(id) {
                        if let Some(r) = self.rels.get(id).cloned() {
                            self.push(Event::Relation(r));
                            self.included.insert(*id);
                        }
                    }
                }
                let ev = Event::Truncate {
                    rels,
                    cascade: t.options.cascade(),
                    restart_identity: t.options.restart_identity(),
                };
                self.resync_touch(&ev);
                self.push(ev);
            }
            Message::Message(m) => {
                if m.transactional && m.prefix == resync::WATERMARK_PREFIX {
                    // A resync's watermark: acted on at its transaction's commit, never
                    // spooled.
                    if self.txn.as_ref().is_some_and(|t| !t.skip) {
                        self.watermark = Some(m.content);
                    }
                } else if m.transactional {
                    if self.txn.as_ref().is_some_and(|t| !t.skip) {
                        let content = bounded_message(&m.prefix, m.content);
                        let ev = Event::Message {
                            transactional: true,
                            lsn: m.lsn.0,
                            prefix: m.prefix,
                            content,
                        };
                        self.maybe_cut_before(s, event_size(&ev)).await?;
                        self.push(ev);
                    }
                } else if m.prefix == cdc::HEARTBEAT_PREFIX {
                    self.on_idle_position(m.lsn.0 + 1);
                } else if m.lsn.0 >= self.skip_before {
                    if !self.events.is_empty() {
                        // Not expected (pgoutput sends transactions whole), but keep order.
                        self.cut(s, 0).await?;
                    }
                    let content = bounded_message(&m.prefix, m.content);
                    self.push(Event::Message {
                        transactional: false,
                        lsn: m.lsn.0,
                        prefix: m.prefix,
                        content,
                    });
                    self.cut(s, m.lsn.0 + 1).await?;
                }
            }
        }
        Ok(())
    }

    /// The relation of a row event, or `None` when the event is to be dropped (skipped
    /// transaction, or a table whose snapshot is newer than this transaction).
    fn row_rel(&self, id: u32) -> Result<Option<Relation>, SourceError> {
        let Some(txn) = &self.txn else {
            return Err(SourceError::Transient(
                "row change outside a transaction in the replication stream".into(),
            ));
        };
        if txn.skip
            || self.filters.get(&id).is_some_and(|&p| txn.final_lsn < p)
            || !self.wanted.is_wanted(id)
        {
            return Ok(None);
        }
        match self.rels.get(&id) {
            Some(r) => Ok(Some(r.clone())),
            None => Err(SourceError::Transient(format!(
                "row change for relation {id} before its schema in the replication stream"
            ))),
        }
    }

    /// A row of relation `id` as it leaves relay-inner (masks, excluded columns).
    fn shape(&self, id: u32, vals: Vec<Value>) -> Vec<Value> {
        match self.plans.get(&id) {
            Some(p) => self.shaper.apply(p, vals),
            None => vals,
        }
    }

    fn push(&mut self, ev: Event) {
        self.bytes += event_size(&ev);
        self.events.push(ev);
    }

    async fn maybe_cut_before(
        &mut self,
        s: &mut ReplicationStream,
        need: usize,
    ) -> Result<(), SourceError> {
        if !self.events.is_empty() && self.bytes + need > RECORD_MAX_BYTES {
            self.cut(s, 0).await?;
        }
        Ok(())
    }

    async fn row(
        &mut self,
        s: &mut ReplicationStream,
        rel: &Relation,
        ev: Event,
    ) -> Result<(), SourceError> {
        let size = event_size(&ev);
        let rel_size = relation_size(rel);
        if size + rel_size + 64 > MAX_RECORD {
            return Err(SourceError::Fatal(format!(
                "a change to {} is {size} bytes, above the spool's record limit of {MAX_RECORD} bytes; \
                 the source cannot forward it (remove the table from postgres.tables or shrink the row)",
                rel.qualified()
            )));
        }
        let need = size
            + if self.included.contains(&rel.id) {
                0
            } else {
                rel_size
            };
        self.maybe_cut_before(s, need).await?;
        self.resync_touch(&ev);
        if !self.included.contains(&rel.id) {
            self.push(Event::Relation(rel.clone()));
            self.included.insert(rel.id);
        }
        self.push(ev);
        if self.bytes >= RECORD_TARGET_BYTES {
            self.cut(s, 0).await?;
        }
        Ok(())
    }

    /// Appends the events gathered so far as one record.
    async fn cut(&mut self, s: &mut ReplicationStream, lsn: u64) -> Result<(), SourceError> {
        let events = std::mem::take(&mut self.events);
        self.included.clear();
        let bytes = std::mem::take(&mut self.bytes);
        if events.is_empty() {
            return Ok(());
        }
        let mut counts: HashMap<&'static str, u64> = HashMap::new();
        for e in &events {
            *counts.entry(e.kind()).or_default() += 1;
        }
        let rec = Record { lsn, events };
        let spool = self.ctx.spool.clone();
        let append = spool.append(&rec);
        futures::pin_mut!(append);
        loop {
            tokio::select! {
                r = &mut append => { r?; break; }
                _ = tokio::time::sleep(STATUS_WHILE_WAITING) => {
                    // The spool is full: keep the walsender from timing us out.
                    self.send_status(s, false).await?;
                }
            }
        }
        for (kind, n) in counts {
            metrics::counter!(EVENTS_TOTAL, "source" => self.ctx.label(), "kind" => kind)
                .increment(n);
        }
        if !self.dirty {
            self.dirty = true;
            self.dirty_since = Instant::now();
        }
        self.dirty_bytes += bytes;
        Ok(())
    }
}

pub(crate) mod resync;
pub use resync::{RESYNC_CHUNKS_TOTAL, RESYNC_ROWS_TOTAL, WATERMARK_PREFIX};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_asks_for_a_keepalive_then_gives_up() {
        let s = Duration::from_secs;
        let mut q = Silence::new(s(4));
        let now = Instant::now();
        assert_eq!(q.wake(now), Some(now + s(2)));
        q.waited(s(1));
        assert!(!q.ping_due() && !q.expired());
        q.waited(s(1));
        assert!(q.ping_due() && !q.expired());
        q.pinged = true;
        assert!(!q.ping_due());
        assert_eq!(q.wake(now), Some(now + s(2)), "the rest of the limit");
        q.waited(Duration::from_millis(1999));
        assert!(!q.expired());
        // The keepalive came: the count starts over.
        q.heard();
        assert!(!q.ping_due() && !q.expired());
        q.waited(s(5));
        assert!(q.expired(), "a wait that ran over still ends it");

        let mut off = Silence::new(Duration::ZERO);
        off.waited(s(3600));
        assert!(!off.ping_due() && !off.expired() && off.wake(now).is_none());
    }
}
