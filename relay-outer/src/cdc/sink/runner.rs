//! The runner: what every sink needs, whatever its kind. It reads the store from the
//! sink's position, keeps source transactions whole, filters, batches, retries with
//! backoff, pauses, replays, and reports status and metrics; the [`Sink`] only writes
//! and commits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use relay_proto::cdc::{Event, Record, Relation, Relations};
use routy_ops::drain::Drain;
use tokio::sync::watch;

use super::position::PositionFile;
use super::reader::RecordReader;
use super::schema::{self, Known, SchemaChange};
use super::{
    BatchInfo, Durability, Filter, Flow, Position, Sink, SinkError, SinkStatus, Split, State,
    APPLIED_SEQ, BATCHES, COMMIT_LATENCY, ERRORS, LAG_RECORDS, LAST_COMMIT_TIME, LOST_RECORDS,
    OP_NAMES, PAUSED, ROWS, SPLITS, STOPPED, UP,
};
use crate::cdc::store::Store;

/// An open source transaction whose rest does not arrive for this long is rolled back
/// in a transactional sink's target (its locks released) until more records come.
const IDLE_TXN: Duration = Duration::from_secs(60);
/// After a burst of this many records, memory is given back once idle for [`TRIM_IDLE`].
const TRIM_AFTER_RECORDS: u64 = 64;
/// See [`TRIM_AFTER_RECORDS`].
const TRIM_IDLE: Duration = Duration::from_secs(2);
/// How often an idle runner checks on its target.
const IDLE_CHECK: Duration = Duration::from_secs(10);

/// What a runner needs besides its sink.
#[derive(Debug, Clone)]
pub struct RunCtx {
    /// Sink name (the `sink` label, its reader name in the store).
    pub name: String,
    /// `tunnel/source`.
    pub source: String,
    /// The source's store.
    pub store: Arc<Store>,
    /// Which changes the sink gets.
    pub filter: Filter,
    /// First retry delay.
    pub retry_initial: Duration,
    /// Largest retry delay.
    pub retry_max: Duration,
    /// Where an at-least-once sink's position is kept.
    pub positions: Option<PositionFile>,
    /// Where the table definitions the sink committed are kept (see [`schema`]).
    pub schema_file: Option<std::path::PathBuf>,
    /// Shutdown.
    pub stop: Drain,
    /// Status and controls.
    pub status: Arc<SinkStatus>,
}

/// What outlives one session.
#[derive(Debug, Default)]
struct Memo {
    /// Partial source transactions cut off by a new `Begin` (or an event that only occurs
    /// outside transactions: a snapshot phase, a non-transactional message): `[start,
    /// end)`; their events, but for relations, are skipped when read again.
    discards: Vec<(Position, Position)>,
    /// Something was committed since the last failure (resets the backoff).
    progressed: bool,
    /// Up to this seq (where the last failure was), every source transaction gets a
    /// batch of its own, so the good ones before a bad one get through.
    careful_until: u64,
    /// The missing start of the store was reported.
    gap_reported: bool,
    /// The last failure happened in careful mode (its batch held one transaction).
    failed_careful: bool,
    /// Table definitions committed (see [`schema`]).
    known: Known,
    /// The table whose schema change the sink stopped on.
    schema_stop: Option<String>,
    /// An operator resumed the sink after it stopped on this table's schema change.
    accept: Option<String>,
}

impl Memo {
    fn discarded(&self, at: Position) -> bool {
        self.discards.iter().any(|(a, b)| at >= *a && at < *b)
    }

    /// Whether a discarded range reaches into record `seq`.
    fn discards_in(&self, seq: u64) -> bool {
        self.discards
            .iter()
            .any(|(a, b)| a.seq <= seq && *b > Position::new(seq, 0))
    }
}

/// Runs `sink` until `ctx.stop`.
pub async fn run<S: Sink>(mut sink: S, ctx: RunCtx) {
    let labels = [
        ("sink", ctx.name.clone()),
        ("kind", sink.kind().to_string()),
    ];
    ctx.store.register_reader(&ctx.name);
    if let Some(f) = &ctx.positions {
        // Retention keeps what the sink has not committed, from the start on.
        if let Ok(p) = f.load() {
            ctx.store.set_reader_position(&ctx.name, p.applied_seq());
            ctx.status.set_position(p);
        }
    }
    metrics::gauge!(UP, &labels).set(0.0);
    metrics::gauge!(PAUSED, &labels).set(0.0);
    let stopped = metrics::gauge!(STOPPED, &labels);
    stopped.set(0.0);
    let mut memo = Memo::default();
    match Known::load(ctx.schema_file.clone(), &ctx.name, &ctx.source) {
        Ok(k) => memo.known = k,
        Err(e) => {
            // Without it the sink goes by the target's tables as they are.
            tracing::warn!(sink = %ctx.name, "table definitions not read: {e}");
            memo.known = Known::load(None, &ctx.name, &ctx.source).unwrap_or_default();
        }
    }
    let mut backoff = routy_ops::backoff::Backoff::new(ctx.retry_initial, ctx.retry_max);
    let mut durable_rx: watch::Receiver<u64> = ctx.store.subscribe();
    let mut replay_rx = ctx.status.subscribe_replay();
    let mut retry_rx = ctx.status.subscribe_retry();
    while !ctx.stop.is_stopping() {
        ctx.status.set_state(State::Starting);
        let outcome = tokio::select! {
            r = session(&mut sink, &ctx, &labels, &mut memo) => r,
            _ = ctx.stop.stopping() => break,
        };
        ctx.status.set_up(false);
        metrics::gauge!(UP, &labels).set(0.0);
        if std::mem::take(&mut memo.progressed) {
            backoff.reset();
        }
        match outcome {
            Flow::Restart { after_durable, why } => {
                tracing::info!(sink = %ctx.name, "{why}; starting over from the committed position");
                if let Some(seen) = after_durable {
                    tokio::select! {
                        _ = durable_rx.wait_for(|d| *d > seen) => {}
                        _ = replay_rx.wait_for(Option::is_some) => {}
                        _ = ctx.stop.stopping() => break,
                    }
                }
            }
            Flow::Fail(e) => {
                metrics::counter!(ERRORS, "sink" => ctx.name.clone(), "kind" => sink.kind(), "reason" => e.reason)
                    .increment(1);
                ctx.status.set_error(format!("seq {}: {}", e.seq, e.msg));
                if e.rejected && !memo.failed_careful {
                    // The refused batch may hold good transactions before the bad one:
                    // read it again a transaction at a time, so they get through and the
                    // refusal names the transaction it is about.
                    tracing::info!(sink = %ctx.name, seq = e.seq,
                        "the target refused a batch; sending it again a transaction at a time: {}", e.msg);
                    continue;
                }
                if e.rejected {
                    // Retrying cannot help: stop until an operator moves the sink (a
                    // replay) or restarts relay-outer.
                    tracing::error!(sink = %ctx.name, seq = e.seq, reason = e.reason,
                        "the target refused a batch; the sink stops here (nothing is skipped): {}; \
                         fix the target or the data and `relay-outer cdc resume`, or move the sink on with \
                         `relay-outer cdc replay`", e.msg);
                    ctx.status.set_state(State::Stopped);
                    stopped.set(1.0);
                    retry_rx.borrow_and_update();
                    let resumed = tokio::select! {
                        _ = replay_rx.wait_for(Option::is_some) => false,
                        _ = retry_rx.changed() => true,
                        _ = ctx.stop.stopping() => break,
                    };
                    stopped.set(0.0);
                    if resumed {
                        memo.accept = memo.schema_stop.take();
                        memo.failed_careful = false;
                        tracing::info!(sink = %ctx.name, accept = ?memo.accept, "resumed by an operator; trying again");
                    }
                    continue;
                }
                ctx.status.set_state(State::Retrying);
                let sleep = backoff.next_delay().max(e.retry_after.unwrap_or_default());
                tracing::warn!(
                    sink = %ctx.name,
                    seq = e.seq,
                    reason = e.reason,
                    retry_in_ms = sleep.as_millis() as u64,
                    "sink failed, batch given up: {}",
                    e.msg
                );
                tokio::select! {
                    _ = tokio::time::sleep(sleep) => {}
                    _ = replay_rx.wait_for(Option::is_some) => {}
                    _ = ctx.stop.stopping() => break,
                }
            }
        }
    }
    ctx.status.set_up(false);
    ctx.status.set_state(State::Stopped);
    metrics::gauge!(UP, &labels).set(0.0);
}

async fn session<S: Sink>(
    sink: &mut S,
    ctx: &RunCtx,
    labels: &[(&'static str, String); 2],
    memo: &mut Memo,
) -> Flow {
    let known = memo.known.clone();
    let mut s = Session {
        sink,
        ctx,
        labels,
        memo,
        rels: Relations::default(),
        known,
        known_dirty: false,
        accept_used: false,
        next: Position::START,
        batch: None,
        src_open: false,
        src_begin: Position::START,
        src_begin_ev: None,
        seq: 0,
    };
    match s.run().await {
        Err(Flow::Fail(e)) => {
            let e = s.sink.fail(e).await;
            s.memo.failed_careful = e.seq <= s.memo.careful_until;
            s.memo.careful_until = s.memo.careful_until.max(e.seq);
            Flow::Fail(e)
        }
        Err(f) => {
            s.sink.abort().await;
            f
        }
        Ok(never) => match never {},
    }
}

enum Never {}

struct Open {
    info: BatchInfo,
    started: Instant,
}

struct Session<'a, S: Sink> {
    sink: &'a mut S,
    ctx: &'a RunCtx,
    labels: &'a [(&'static str, String); 2],
    memo: &'a mut Memo,
    rels: Relations,
    /// Table definitions as of the open batch (the memo's once committed).
    known: Known,
    /// `known` changed in the open batch.
    known_dirty: bool,
    /// The open batch applied a schema change an operator accepted.
    accept_used: bool,
    /// The committed position: the next event to deliver.
    next: Position,
    batch: Option<Open>,
    src_open: bool,
    src_begin: Position,
    /// The open source transaction's `Begin`, given again to the batch that continues it
    /// after a split.
    src_begin_ev: Option<Event>,
    seq: u64,
}

impl<S: Sink> Session<'_, S> {
    fn name(&self) -> &str {
        &self.ctx.name
    }

    async fn load_position(&mut self) -> Result<Position, Flow> {
        if let Some(p) = self.sink.connect().await? {
            return Ok(p);
        }
        let Some(f) = self.ctx.positions.clone() else {
            return Err(SinkError::new(
                "config",
                0,
                "an at-least-once sink without a position file",
            )
            .into());
        };
        tokio::task::spawn_blocking(move || f.load())
            .await
            .map_err(|e| SinkError::new("position", 0, e.to_string()))?
            .map_err(|e| SinkError::new("position", 0, e).into())
    }

    /// Moves the sink to `to` (a replay), outside any batch.
    async fn replay(&mut self, to: Position) -> Result<(), Flow> {
        let first = self.ctx.store.first_seq();
        if to != Position::START && to.seq < first {
            let msg = format!(
                "replay to {to} refused: the store holds seq {first} on (older records were removed by retention)"
            );
            tracing::warn!(sink = %self.name(), "{msg}");
            self.ctx.status.set_error(msg);
            return Ok(());
        }
        match self.sink.durability() {
            Durability::Transactional | Durability::Versioned => self.sink.set_position(to).await?,
            Durability::AtLeastOnce => self.save_position(to).await?,
        }
        tracing::info!(sink = %self.name(), from = %self.next, to = %to, "sink moved (replay)");
        self.set_committed(to);
        self.memo.discards.clear();
        Err(Flow::Restart {
            after_durable: None,
            why: format!("replay to {to}"),
        })
    }

    async fn save_position(&self, p: Position) -> Result<(), Flow> {
        let Some(f) = self.ctx.positions.clone() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || f.save(p))
            .await
            .map_err(|e| SinkError::new("position", p.seq, e.to_string()))?
            .map_err(|e| SinkError::new("position", p.seq, e).into())
    }

    fn set_committed(&mut self, p: Position) {
        self.next = p;
        self.ctx.status.set_position(p);
        self.ctx
            .store
            .set_reader_position(&self.ctx.name, p.applied_seq());
        metrics::gauge!(APPLIED_SEQ, self.labels).set(p.applied_seq() as f64);
    }

    async fn run(&mut self) -> Result<Never, Flow> {
        let from = self.load_position().await?;
        self.set_committed(from);
        if let Some(to) = self.ctx.status.take_replay() {
            self.replay(to).await?;
        }
        self.ctx.status.set_up(true);
        metrics::gauge!(UP, self.labels).set(1.0);
        tracing::info!(sink = %self.name(), kind = self.sink.kind(), source = %self.ctx.source, position = %from,
            "sink connected; resuming at {from}");
        let mut src =
            RecordReader::new(self.ctx.store.clone(), from.seq).with_rows(self.sink.takes_rows());
        let mut paused = self.ctx.status.subscribe_paused();
        let mut replay = self.ctx.status.subscribe_replay();
        let limits = self.sink.limits();
        let mut idle_since: Option<Instant> = None;
        // Records delivered since memory was last given back (see below).
        let mut since_trim = 0u64;
        // Only the first record read tells whether the store still starts where the sink
        // does.
        let mut start_checked = false;
        loop {
            if self.batch.is_none() {
                if replay.borrow_and_update().is_some() {
                    if let Some(to) = self.ctx.status.take_replay() {
                        self.replay(to).await?;
                    }
                }
                if *paused.borrow_and_update() {
                    self.pause(&mut paused, &mut replay).await?;
                    continue;
                }
                self.ctx.status.set_state(State::Running);
            }
            match src.try_next().await? {
                Some((seq, rec)) => {
                    idle_since = None;
                    since_trim += 1;
                    if seq < self.next.seq {
                        continue;
                    }
                    if !std::mem::replace(&mut start_checked, true) && seq > self.next.seq.max(1) {
                        self.report_gap(seq);
                    }
                    self.record(seq, rec).await?;
                    let careful = seq <= self.memo.careful_until;
                    let full = self.batch.as_ref().is_some_and(|b| {
                        b.info.records >= limits.max_records
                            || b.info.events >= limits.max_events
                            || self.sink.pending_bytes() >= limits.max_bytes
                    });
                    if !self.src_open && (careful || full) {
                        self.commit().await?;
                    } else if self.src_open && full && limits.split != Split::Never {
                        // A transaction bigger than a batch: end the batch inside it rather
                        // than hold it all (see `Split`).
                        self.split(limits.split).await?;
                    }
                }
                None => {
                    let mut wait = IDLE_CHECK;
                    if !self.src_open {
                        if let Some(b) = &self.batch {
                            let age = b.started.elapsed();
                            if age >= limits.max_delay {
                                self.commit().await?;
                                continue;
                            }
                            wait = limits.max_delay - age;
                        }
                    }
                    let durable = src.durable();
                    metrics::gauge!(LAG_RECORDS, self.labels)
                        .set(durable.saturating_sub(self.next.applied_seq()) as f64);
                    self.sink.idle(self.batch.is_some()).await?;
                    if self.batch.is_none() && since_trim >= TRIM_AFTER_RECORDS {
                        // Caught up after a burst (a large transaction): once nothing new
                        // came for TRIM_IDLE (the statements' and the receiver's buffers
                        // are freed by then), give the memory back to the kernel instead
                        // of keeping it resident while idle.
                        let since = *idle_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= TRIM_IDLE {
                            since_trim = 0;
                            routy_ops::malloc::release_free();
                        } else {
                            wait = wait.min(TRIM_IDLE.saturating_sub(since.elapsed()));
                        }
                    }
                    if self.src_open && self.sink.durability() == Durability::Transactional {
                        // Inside a source transaction whose rest has not arrived: its
                        // target transaction holds locks. (Other kinds hold none; giving
                        // up their batch would only deliver again the parts of a split
                        // transaction they already delivered.)
                        let since = *idle_since.get_or_insert_with(Instant::now);
                        let left = IDLE_TXN.saturating_sub(since.elapsed());
                        if left.is_zero() {
                            return Err(Flow::Restart {
                                after_durable: Some(durable),
                                why: format!(
                                    "no new records for {}s inside the source transaction begun at {}; \
                                     gave up the batch until more arrive",
                                    IDLE_TXN.as_secs(),
                                    self.src_begin
                                ),
                            });
                        }
                        wait = wait.min(left);
                    }
                    tokio::select! {
                        _ = src.changed() => {}
                        _ = tokio::time::sleep(wait) => {}
                        _ = paused.changed(), if self.batch.is_none() => {}
                        _ = replay.changed(), if self.batch.is_none() => {}
                    }
                }
            }
        }
    }

    /// Paused: holds the connection, delivers nothing, until resumed (or a replay).
    async fn pause(
        &mut self,
        paused: &mut watch::Receiver<bool>,
        replay: &mut watch::Receiver<Option<Position>>,
    ) -> Result<(), Flow> {
        tracing::info!(sink = %self.name(), position = %self.next, "sink paused");
        self.ctx.status.set_state(State::Paused);
        metrics::gauge!(PAUSED, self.labels).set(1.0);
        loop {
            tokio::select! {
                r = paused.changed() => {
                    if r.is_err() || !*paused.borrow_and_update() {
                        break;
                    }
                }
                _ = replay.changed() => {
                    if let Some(to) = self.ctx.status.take_replay() {
                        // Takes effect now; the sink stays paused.
                        self.replay(to).await?;
                    }
                }
                _ = tokio::time::sleep(IDLE_CHECK) => self.sink.idle(false).await?,
            }
        }
        metrics::gauge!(PAUSED, self.labels).set(0.0);
        tracing::info!(sink = %self.name(), "sink resumed");
        Ok(())
    }

    /// A sink starting at the store's oldest record, or past the store's end, misses
    /// what came before it (initial copies among it). Logged once, shown as the status'
    /// last error and counted; the sink goes on.
    fn report_gap(&mut self, first: u64) {
        if std::mem::replace(&mut self.memo.gap_reported, true) {
            return;
        }
        let from = self.next.seq.max(1);
        let missing = if first == from + 1 {
            format!("record {from} is")
        } else {
            format!("records {from}..{} are", first - 1)
        };
        let msg = format!(
            "sink {} starts at the store's oldest record, seq {first}: {missing} no longer in \
             the store (removed by retention, or the store joined the stream later); tables \
             copied before that are missing in the target: re-copy the source with \
             `relay-inner cdc drop-slot` and a restart of relay-inner",
            self.name()
        );
        tracing::error!(sink = %self.name(), first_seq = first, "{msg}");
        metrics::counter!(ERRORS, "sink" => self.ctx.name.clone(), "kind" => self.sink.kind(), "reason" => "gap")
            .increment(1);
        self.ctx.status.set_error(format!("seq {first}: {msg}"));
    }

    async fn record(&mut self, seq: u64, rec: Record) -> Result<(), Flow> {
        self.seq = seq;
        if self.batch.is_none() {
            self.sink.begin(self.next).await?;
            self.batch = Some(Open {
                info: BatchInfo {
                    first: Position::new(seq, 0),
                    ..BatchInfo::default()
                },
                started: Instant::now(),
            });
            if self.src_open {
                // A batch that opens inside a source transaction continues a split one:
                // its Begin first, as the sink saw it in the batch before.
                if let Some(ev) = self.src_begin_ev.clone() {
                    if let Some(ev) = self.ctx.filter.apply(ev, &self.rels) {
                        self.sink.write(self.src_begin, ev, &self.rels).await?;
                    }
                }
            }
        }
        // Copy rows go as a block only whole and outside transactions; else as inserts,
        // each at its own position.
        let events = if rec.events.iter().any(|e| matches!(e, Event::Rows { .. }))
            && (self.src_open || self.next > Position::new(seq, 0) || self.memo.discards_in(seq))
        {
            Record::expand_rows(rec.events).map_err(|e| {
                SinkError::store(
                    seq,
                    format!("record {seq} in the store does not decode: {e}"),
                )
            })?
        } else {
            rec.events
        };
        let mut idx = 0u64;
        for ev in events {
            let at = Position::new(seq, u32::try_from(idx).unwrap_or(u32::MAX));
            let width = ev.positions();
            idx += width;
            // A relation only describes a table (records are read on their own, so the
            // ones in a discarded range come again where they are used): it is kept, also
            // because the event that ends a partial transaction may follow its own
            // relations in the same record.
            let ev = match ev {
                Event::Relation(r) => {
                    let ev = Event::Relation(self.schema_step(at, r).await?);
                    self.rels.observe(&ev);
                    ev
                }
                ev if at < self.next || self.memo.discarded(at) => {
                    let _ = ev;
                    continue;
                }
                ev => ev,
            };
            // A Begin while a source transaction is open means the open one was cut off
            // (a crash on the source side) and comes again whole; so does an event that
            // only occurs outside transactions (a table's initial copy, a
            // non-transactional message). Discard the partial one, up to this event, and
            // deliver this event normally when reading again.
            if self.src_open
                && matches!(
                    ev,
                    Event::Begin { .. }
                        | Event::Snapshot { .. }
                        | Event::Chunk { .. }
                        | Event::Message {
                            transactional: false,
                            ..
                        }
                )
            {
                let start = self.src_begin;
                tracing::warn!(sink = %self.name(), seq, event = ev.kind(),
                    "a transaction begun at {start} was cut off before its commit (source crash): \
                     a {} at seq {seq} cannot be inside it; discarding the partial transaction",
                    ev.kind());
                self.memo.discards.push((start, at));
                return Err(Flow::Restart {
                    after_durable: None,
                    why: "discarded a partial source transaction".into(),
                });
            }
            let b = &mut self.batch.as_mut().expect("opened above").info;
            match &ev {
                Event::Begin { .. } => {
                    self.src_open = true;
                    self.src_begin = at;
                    self.src_begin_ev = Some(ev.clone());
                }
                Event::Commit {
                    end_lsn,
                    commit_time,
                    ..
                } => {
                    self.src_open = false;
                    b.lsn = Some(*end_lsn);
                    b.commit_time = Some(*commit_time);
                }
                Event::Message {
                    transactional: false,
                    prefix,
                    content,
                    ..
                } if prefix == relay_proto::cdc::LOST_PREFIX => {
                    tracing::error!(sink = %self.ctx.name, seq, lost = %String::from_utf8_lossy(content),
                        "the store holds a marker for a record lost to corruption (cdc salvage): \
                         the changes it held are missing from the target; copy the tables they touched again");
                    metrics::counter!(LOST_RECORDS, self.labels).increment(1);
                }
                _ => {}
            }
            let Some(ev) = self.ctx.filter.apply(ev, &self.rels) else {
                continue;
            };
            match &ev {
                Event::Insert { .. } => b.ops[0] += 1,
                Event::Rows { rows, .. } => b.ops[0] += u64::from(*rows),
                Event::Update { .. } => b.ops[1] += 1,
                Event::Delete { .. } => b.ops[2] += 1,
                Event::Truncate { rels, .. } => b.ops[3] += rels.len() as u64,
                _ => {}
            }
            if !matches!(ev, Event::Relation(_)) {
                b.events += width as usize;
                let last = u32::try_from(width.saturating_sub(1)).unwrap_or(u32::MAX);
                b.last_written = Some(Position::new(at.seq, at.idx.saturating_add(last)));
            }
            self.sink.write(at, ev, &self.rels).await?;
        }
        let b = &mut self.batch.as_mut().expect("opened above").info;
        if rec.lsn != 0 {
            b.lsn = Some(rec.lsn);
        }
        b.records += 1;
        b.last_seq = seq;
        Ok(())
    }

    /// A table's relation: what changed since the definition the sink committed, handed
    /// to the sink; the relation comes back with today's column names when it is older
    /// than that definition (a replay).
    async fn schema_step(&mut self, at: Position, mut r: Relation) -> Result<Relation, Flow> {
        if !self.ctx.filter.passes(&r) {
            return Ok(r);
        }
        let table = r.qualified();
        // Every record carries its relations: the usual case (nothing changed) costs a
        // comparison, no copy.
        let old = match self.known.get(&table) {
            None => {
                // First sight: the sink checks the target table against it.
                self.known.set(at.seq, r.clone());
                self.known_dirty = true;
                return Ok(r);
            }
            Some((seen, old)) if at.seq <= *seen => {
                schema::map_names(old, &mut r);
                return Ok(r);
            }
            Some((_, old)) if *old == r => return Ok(r),
            Some((_, old)) => old.clone(),
        };
        let accepted = self.memo.accept.as_deref() == Some(table.as_str());
        let changes = match schema::diff(&old, &r) {
            Ok(c) => c,
            Err(_) if accepted => Vec::new(),
            Err(why) => {
                self.memo.schema_stop = Some(table.clone());
                let mut e = SinkError::new(
                    "schema",
                    at.seq,
                    format!(
                        "{table}: {why}. The sink stops here: make the target table match the \
                         source by hand, then run `relay-outer cdc resume --sink {}` (the sink then \
                         takes the target table as it is)",
                        self.ctx.name
                    ),
                );
                e.rejected = true;
                return Err(e.into());
            }
        };
        for kind in changes {
            let change = SchemaChange {
                table: table.clone(),
                schema: r.schema.clone(),
                name: r.name.clone(),
                kind,
                accepted,
            };
            tracing::info!(sink = %self.ctx.name, seq = at.seq, "schema change: {change}");
            if let Err(f) = self.sink.schema(at, &change).await {
                if matches!(&f, Flow::Fail(e) if e.rejected) {
                    self.memo.schema_stop = Some(table.clone());
                }
                return Err(f);
            }
        }
        self.accept_used |= accepted;
        schema::keep_numbers(&old, &mut r);
        self.known.set(at.seq, r.clone());
        self.known_dirty = true;
        Ok(r)
    }

    async fn commit(&mut self) -> Result<(), Flow> {
        self.commit_to(None).await
    }

    /// Ends the batch inside the open source transaction; the next batch continues it
    /// (a batch is only ever opened inside one after this).
    async fn split(&mut self, how: Split) -> Result<(), Flow> {
        let next = match how {
            Split::Never => return Ok(()),
            Split::Exact => None,
            Split::FromBegin => Some(self.src_begin),
        };
        if let Some(b) = &self.batch {
            tracing::debug!(sink = %self.name(), seq = b.info.last_seq, events = b.info.events,
                begun = %self.src_begin, "a batch ends inside a large source transaction");
        }
        self.commit_to(next).await?;
        metrics::counter!(SPLITS, self.labels).increment(1);
        Ok(())
    }

    /// Commits the open batch; the sink resumes at `next`, by default after the batch.
    async fn commit_to(&mut self, next: Option<Position>) -> Result<(), Flow> {
        let Some(open) = self.batch.take() else {
            return Ok(());
        };
        let mut info = open.info;
        info.next = next.unwrap_or_else(|| Position::after_record(info.last_seq));
        self.sink.commit(&info).await?;
        if self.sink.durability() == Durability::AtLeastOnce {
            self.save_position(info.next).await?;
        }
        if std::mem::take(&mut self.known_dirty) {
            self.memo.known = self.known.clone();
            let k = self.known.clone();
            // Not fatal: a sink applies a change again harmlessly (it checks the target).
            match tokio::task::spawn_blocking(move || k.save()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(sink = %self.ctx.name, "table definitions not saved: {e}")
                }
                Err(e) => tracing::warn!(sink = %self.ctx.name, "table definitions not saved: {e}"),
            }
        }
        if std::mem::take(&mut self.accept_used) {
            self.memo.accept = None;
        }
        self.set_committed(info.next);
        self.ctx.status.set_up(true);
        self.memo.progressed = true;
        let next = self.next;
        self.memo.discards.retain(|(_, end)| *end > next);
        metrics::gauge!(UP, self.labels).set(1.0);
        metrics::counter!(BATCHES, self.labels).increment(1);
        let durable = self.ctx.store.synced_seq();
        metrics::gauge!(LAG_RECORDS, self.labels)
            .set(durable.saturating_sub(self.next.applied_seq()) as f64);
        for (i, n) in info.ops.iter().enumerate() {
            if *n > 0 {
                metrics::counter!(ROWS, "sink" => self.ctx.name.clone(), "kind" => self.sink.kind(), "op" => OP_NAMES[i])
                    .increment(*n);
            }
        }
        if let Some(t) = info.commit_time {
            let src_us = t + relay_proto::cdc::PG_EPOCH_UNIX_SECS * 1_000_000;
            let now_us = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros() as i64)
                .unwrap_or(0);
            let secs = (now_us - src_us).max(0) as f64 / 1e6;
            metrics::histogram!(COMMIT_LATENCY, self.labels).record(secs);
            metrics::gauge!(LAST_COMMIT_TIME, self.labels).set(src_us as f64 / 1e6);
            self.ctx.status.set_last_commit(src_us);
        }
        tracing::debug!(sink = %self.name(), seq = info.last_seq, events = info.events, "committed");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::super::testkit::{begin, commit, ins, rel, Harness};
    use super::super::{BatchLimits, SinkStatus};
    use super::*;
    use relay_proto::cdc::SnapshotPhase;

    /// What the recording sink saw: one line per batch, its events' kinds and positions,
    /// and where the runner said it resumes.
    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<String>>>);

    impl Log {
        fn lines(&self) -> Vec<String> {
            self.0.lock().unwrap().clone()
        }
    }

    struct Recorder {
        split: Split,
        log: Log,
        open: String,
        rows: bool,
    }

    impl Sink for Recorder {
        fn kind(&self) -> &'static str {
            "recorder"
        }
        fn durability(&self) -> Durability {
            Durability::AtLeastOnce
        }
        fn takes_rows(&self) -> bool {
            self.rows
        }
        fn limits(&self) -> BatchLimits {
            BatchLimits {
                max_records: usize::MAX,
                max_events: 4,
                max_bytes: usize::MAX,
                max_delay: Duration::ZERO,
                split: self.split,
            }
        }
        async fn connect(&mut self) -> Result<Option<Position>, Flow> {
            Ok(None)
        }
        async fn begin(&mut self, _from: Position) -> Result<(), Flow> {
            self.open.clear();
            Ok(())
        }
        async fn write(&mut self, at: Position, ev: Event, _rels: &Relations) -> Result<(), Flow> {
            let k = match ev {
                Event::Begin { .. } => "B",
                Event::Commit { .. } => "C",
                Event::Insert { .. } => "i",
                Event::Rows { rows, .. } => {
                    self.open.push_str(&format!("r{at}x{rows} "));
                    return Ok(());
                }
                Event::Snapshot { .. } => "S",
                Event::Relation(_) => return Ok(()),
                _ => "?",
            };
            self.open.push_str(&format!("{k}{at} "));
            Ok(())
        }
        async fn commit(&mut self, batch: &BatchInfo) -> Result<(), Flow> {
            let line = format!("{}-> {}", self.open, batch.next);
            self.log.0.lock().unwrap().push(line);
            Ok(())
        }
        async fn abort(&mut self) {}
        async fn fail(&mut self, e: SinkError) -> SinkError {
            e
        }
    }

    fn start(
        split: Split,
        h: &Harness,
        root: &std::path::Path,
    ) -> (Log, Drain, tokio::task::JoinHandle<()>) {
        start_with(split, h, root, false, None)
    }

    fn start_with(
        split: Split,
        h: &Harness,
        root: &std::path::Path,
        rows: bool,
        replay: Option<Position>,
    ) -> (Log, Drain, tokio::task::JoinHandle<()>) {
        let log = Log::default();
        let stop = Drain::new();
        let ctx = RunCtx {
            name: "rec".into(),
            source: "t/s".into(),
            store: h.store.clone(),
            filter: Filter::default(),
            retry_initial: Duration::from_millis(50),
            retry_max: Duration::from_millis(100),
            positions: Some(PositionFile::new(root, "rec", "t/s")),
            schema_file: None,
            stop: stop.clone(),
            status: Arc::new(SinkStatus::new("recorder", Durability::AtLeastOnce)),
        };
        if let Some(p) = replay {
            ctx.status.request_replay(p);
        }
        let sink = Recorder {
            split,
            log: log.clone(),
            open: String::new(),
            rows,
        };
        (log, stop, tokio::spawn(run(sink, ctx)))
    }

    async fn wait_lines(log: &Log, n: usize) -> Vec<String> {
        let t0 = Instant::now();
        while log.lines().len() < n {
            assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", log.lines());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        log.lines()
    }

    /// A transaction of 10 inserts in 4 records, the last with its commit.
    fn big_txn() -> Vec<Record> {
        let r = rel(1, "t", b'd', &[("id", "int", true)]);
        let i = |n: u32| ins(1, &[Some(&n.to_string())]);
        vec![
            Record {
                lsn: 0,
                events: vec![begin(5), Event::Relation(r), i(1), i(2), i(3)],
            },
            Record {
                lsn: 0,
                events: vec![i(4), i(5), i(6)],
            },
            Record {
                lsn: 0,
                events: vec![i(7), i(8), i(9)],
            },
            Record {
                lsn: 508,
                events: vec![i(10), commit(5)],
            },
        ]
    }

    /// A block of copy rows takes one position per row: a sink that takes blocks gets it
    /// whole at its first row's position, one that does not (or a replay from inside the
    /// block) gets the rows as inserts at the same positions.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn copy_rows_take_a_position_each_as_a_block_or_as_inserts() {
        let r = rel(1, "t", b'd', &[("id", "int", true)]);
        let recs = vec![Record {
            lsn: 0,
            events: vec![
                Event::Relation(r),
                Event::Rows {
                    rel: 1,
                    rows: 3,
                    data: b"1\n2\n3\n".to_vec(),
                },
                Event::Snapshot {
                    rel: 1,
                    phase: SnapshotPhase::Done,
                    value: 3,
                },
            ],
        }];
        for (rows, replay, want) in [
            (true, None, "r1.1x3 S1.4 -> 2.0"),
            (false, None, "i1.1 i1.2 i1.3 S1.4 -> 2.0"),
            (true, Some(Position::new(1, 2)), "i1.2 i1.3 S1.4 -> 2.0"),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let mut h = Harness::new();
            h.push(recs.clone()).await;
            let (log, stop, task) = start_with(Split::Never, &h, dir.path(), rows, replay);
            assert_eq!(wait_lines(&log, 1).await, [want]);
            stop.stop();
            task.await.unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transaction_bigger_than_a_batch_is_split_and_each_part_begins_with_its_begin() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = Harness::new();
        h.push(big_txn()[..3].to_vec()).await;
        let (log, stop, task) = start(Split::FromBegin, &h, dir.path());
        // The commit has not arrived: the parts so far are delivered, each resuming at
        // the Begin, and the second starts with the Begin again.
        let lines = wait_lines(&log, 2).await;
        assert_eq!(
            lines,
            [
                "B1.0 i1.2 i1.3 i1.4 -> 1.0",
                "B1.0 i2.0 i2.1 i2.2 i3.0 i3.1 i3.2 -> 1.0",
            ]
        );
        stop.stop();
        task.await.unwrap();
        // After a restart the whole transaction comes again (at-least-once), and the
        // commit moves the position past it.
        h.push(big_txn()[3..].to_vec()).await;
        let (log, stop, task) = start(Split::FromBegin, &h, dir.path());
        let lines = wait_lines(&log, 3).await;
        assert_eq!(
            lines,
            [
                "B1.0 i1.2 i1.3 i1.4 -> 1.0",
                "B1.0 i2.0 i2.1 i2.2 i3.0 i3.1 i3.2 -> 1.0",
                "B1.0 i4.0 C4.1 -> 5.0",
            ]
        );
        stop.stop();
        task.await.unwrap();
    }

    /// Refuses every batch for good while `refuse` is set.
    struct Refuser {
        refuse: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Sink for Refuser {
        fn kind(&self) -> &'static str {
            "refuser"
        }
        fn durability(&self) -> Durability {
            Durability::AtLeastOnce
        }
        fn takes_rows(&self) -> bool {
            false
        }
        fn limits(&self) -> BatchLimits {
            BatchLimits {
                max_records: usize::MAX,
                max_events: usize::MAX,
                max_bytes: usize::MAX,
                max_delay: Duration::ZERO,
                split: Split::Never,
            }
        }
        async fn connect(&mut self) -> Result<Option<Position>, Flow> {
            Ok(None)
        }
        async fn begin(&mut self, _from: Position) -> Result<(), Flow> {
            Ok(())
        }
        async fn write(&mut self, _: Position, _: Event, _: &Relations) -> Result<(), Flow> {
            Ok(())
        }
        async fn commit(&mut self, batch: &BatchInfo) -> Result<(), Flow> {
            if self.refuse.load(std::sync::atomic::Ordering::Relaxed) {
                let mut e = SinkError::new("rejected", batch.last_seq, "refused");
                e.rejected = true;
                return Err(e.into());
            }
            Ok(())
        }
        async fn abort(&mut self) {}
        async fn fail(&mut self, e: SinkError) -> SinkError {
            e
        }
    }

    /// `routy_cdc_sink_stopped` is 1 while a sink waits for an operator after a refused
    /// batch, and 0 again once resumed.
    #[tokio::test]
    async fn a_sink_stopped_on_a_refused_batch_says_so_until_resumed() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let metrics = recorder.handle();
        let _local = metrics::set_default_local_recorder(&recorder);
        let stopped = || {
            let text = metrics.render();
            let series = "routy_cdc_sink_stopped{sink=\"rec\",kind=\"refuser\"} ";
            text.lines()
                .find_map(|l| l.strip_prefix(series))
                .map(str::to_owned)
        };
        let dir = tempfile::tempdir().unwrap();
        let mut h = Harness::new();
        let r = rel(1, "t", b'd', &[("id", "int", true)]);
        let last = h
            .push(vec![
                super::super::testkit::txn(1, &[&r], vec![ins(1, &[Some("1")])]),
                super::super::testkit::txn(2, &[], vec![ins(1, &[Some("2")])]),
            ])
            .await;
        let refuse = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let stop = Drain::new();
        let status = Arc::new(SinkStatus::new("refuser", Durability::AtLeastOnce));
        let ctx = RunCtx {
            name: "rec".into(),
            source: "t/s".into(),
            store: h.store.clone(),
            filter: Filter::default(),
            retry_initial: Duration::from_millis(10),
            retry_max: Duration::from_millis(50),
            positions: Some(PositionFile::new(dir.path(), "rec", "t/s")),
            schema_file: None,
            stop: stop.clone(),
            status: status.clone(),
        };
        let task = tokio::spawn(run(
            Refuser {
                refuse: refuse.clone(),
            },
            ctx,
        ));
        super::super::testkit::wait_stopped(&status).await;
        assert_eq!(stopped().as_deref(), Some("1"));
        refuse.store(false, std::sync::atomic::Ordering::Relaxed);
        status.request_retry();
        super::super::testkit::wait_applied(&status, last).await;
        assert_eq!(stopped().as_deref(), Some("0"));
        stop.stop();
        task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_exact_split_resumes_after_the_part_and_never_splits_without_leave() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = Harness::new();
        h.push(big_txn()).await;
        let (log, stop, task) = start(Split::Exact, &h, dir.path());
        let lines = wait_lines(&log, 3).await;
        assert_eq!(
            lines,
            [
                "B1.0 i1.2 i1.3 i1.4 -> 2.0",
                "B1.0 i2.0 i2.1 i2.2 i3.0 i3.1 i3.2 -> 4.0",
                "B1.0 i4.0 C4.1 -> 5.0",
            ]
        );
        stop.stop();
        task.await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (log, stop, task) = start(Split::Never, &h, dir.path());
        let lines = wait_lines(&log, 1).await;
        assert_eq!(
            lines,
            ["B1.0 i1.2 i1.3 i1.4 i2.0 i2.1 i2.2 i3.0 i3.1 i3.2 i4.0 C4.1 -> 5.0"]
        );
        stop.stop();
        task.await.unwrap();
    }
}
