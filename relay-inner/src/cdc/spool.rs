//! The spool: one source's change log on relay-inner's disk, between the source (which
//! appends records and confirms LSNs to PostgreSQL only once they are durable here) and
//! the shippers (which send durable records to every relay-outer and remove segments once
//! all of them acknowledged).
//!
//! Layout: `<spool dir>/<source>/log/` holds the segment log; the source keeps its own
//! state file next to it. The log's segments are at most an eighth of `max_bytes` (and at
//! most 64 MiB) so acknowledged data can be removed well before the bound is reached.
//!
//! When the spool holds `max_bytes`, [`Spool::append`] waits until acknowledgements free
//! space: reading from the source pauses, nothing is dropped, and the source's WAL
//! retention grows instead.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use relay_proto::cdc::Record;
use routy_log::disk::{blocking, is_no_space, write_atomic, write_small_even_when_full};
use routy_log::segment_log::{self, LogOptions, Reader, SegmentLog};
use tokio::sync::{watch, Notify};

/// Largest record the spool accepts.
pub const MAX_RECORD: usize = segment_log::DEFAULT_MAX_RECORD;

/// What can go wrong with the spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The segment log failed.
    #[error(transparent)]
    Log(#[from] segment_log::LogError),
    /// A record in the spool does not decode (written by a different version?).
    #[error("spool record {seq} is unreadable: {reason}")]
    BadRecord {
        /// Its seq.
        seq: u64,
        /// Why.
        reason: String,
    },
    /// The spool's log is corrupt in a way opening must not repair: damage with valid
    /// records after it (see `segment_log`). The source is not started.
    #[error(
        "{log}. The records after the damage may already be confirmed to PostgreSQL (the \
         spool's durable position is {durable_lsn}), so the source no longer holds them and \
         cutting the spool would lose them for good: the source is not started. Way out \
         (README, \"Damaged spool or store\"): stop relay-inner and run `relay-inner cdc \
         salvage --config FILE --source NAME`; it keeps every valid record (the original \
         segment stays as *.salvaged) and puts a marker in place of each unreadable seq, which \
         the sinks log as lost changes. What the damaged records held is lost from the \
         source: copy the tables they touched again (a new slot: `cdc drop-slot`)"
    )]
    Damaged {
        /// The segment log's report (file, offset, seqs).
        log: segment_log::LogError,
        /// The spool's durable LSN as far as it is known.
        durable_lsn: String,
    },
    /// A blocking task failed.
    #[error("spool task failed: {0}")]
    Task(String),
    /// A small file of the spool could not be read or written.
    #[error("spool file {0}: {1}")]
    File(PathBuf, std::io::Error),
    /// A small file of the spool holds something unexpected.
    #[error("spool file {0} holds {1:?}, not a hexadecimal number")]
    BadFile(PathBuf, String),
}

struct State {
    log: SegmentLog,
    /// Highest `Record.lsn` appended (durable once synced).
    appended_lsn: u64,
    /// Highest seq acknowledged by each relay-outer endpoint.
    acked: BTreeMap<String, u64>,
}

/// One source's spool.
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
    /// Newest durable seq, for shippers.
    synced: watch::Sender<u64>,
    /// Highest `Record.lsn` that is durable.
    durable_lsn: std::sync::atomic::AtomicU64,
    /// Woken when segments are removed.
    space: Notify,
    /// Set while the spool is full.
    full: std::sync::atomic::AtomicBool,
    /// When "spool is full" was last logged, and the episodes since.
    full_logged: Mutex<Option<std::time::Instant>>,
    full_episodes: AtomicU64,
    /// Random id made when the spool was created; relay-outer's store holds one spool's
    /// records only.
    id: u64,
}

/// File in the source's spool directory holding the spool's id.
const ID_FILE: &str = "SPOOL_ID";
/// File holding the durable LSN as of the last segment removal (the log alone may no
/// longer show it once acknowledged segments are gone).
const LSN_FILE: &str = "DURABLE_LSN";

fn read_u64(dir: &Path, name: &str) -> Result<Option<u64>, SpoolError> {
    match std::fs::read_to_string(dir.join(name)) {
        Ok(t) => u64::from_str_radix(t.trim(), 16)
            .map(Some)
            .map_err(|_| SpoolError::BadFile(dir.join(name), t.trim().to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(SpoolError::File(dir.join(name), e)),
    }
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool").field("dir", &self.dir).finish()
    }
}

impl Spool {
    /// Opens (creating) the spool in `dir` (this source's directory).
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Arc<Spool>, SpoolError> {
        let log = match SegmentLog::open(dir.join("log"), log_options(max_bytes)) {
            Err(e @ segment_log::LogError::DamagedMidLog { .. }) => {
                let lsn = read_u64(dir, LSN_FILE).ok().flatten().unwrap_or(0);
                return Err(SpoolError::Damaged {
                    log: e,
                    durable_lsn: if lsn == 0 {
                        "unknown".into()
                    } else {
                        relay_proto::cdc::format_lsn(lsn)
                    },
                });
            }
            other => other?,
        };
        let kept_lsn = read_u64(dir, LSN_FILE)?;
        let lsn = last_lsn(&log)?.max(kept_lsn.unwrap_or(0));
        if kept_lsn.is_none() {
            // Made now, while there is space, so that a full disk can still update it.
            write_atomic(&dir.join(LSN_FILE), format!("{lsn:016x}\n").as_bytes())
                .map_err(|e| SpoolError::File(dir.join(LSN_FILE), e))?;
        }
        let id = match read_u64(dir, ID_FILE)? {
            Some(id) => id,
            None => {
                let id = rand::random::<u64>() | 1;
                write_atomic(&dir.join(ID_FILE), format!("{id:016x}\n").as_bytes())
                    .map_err(|e| SpoolError::File(dir.join(ID_FILE), e))?;
                id
            }
        };
        let synced = log.synced_seq();
        let (tx, _) = watch::channel(synced);
        let spool = Arc::new(Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            state: Mutex::new(State {
                log,
                appended_lsn: lsn,
                acked: BTreeMap::new(),
            }),
            synced: tx,
            durable_lsn: lsn.into(),
            space: Notify::new(),
            full: false.into(),
            full_logged: Mutex::new(None),
            full_episodes: AtomicU64::new(0),
            id,
        });
        metrics::gauge!(SPOOL_MAX_BYTES, "source" => spool.name()).set(max_bytes as f64);
        Ok(spool)
    }

    /// `relay-inner cdc salvage`: repairs a corrupt spool in `dir` (relay-inner stopped)
    /// keeping every valid record and writing a [`Record::lost`] marker in place of each
    /// unreadable seq. Returns the runs replaced (empty: nothing was damaged).
    pub fn salvage(dir: &Path, max_bytes: u64) -> Result<Vec<segment_log::Lost>, SpoolError> {
        let source = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let lost = segment_log::salvage(dir.join("log"), log_options(max_bytes), |seq, lost| {
            Record::lost(
                seq,
                lost.first_seq,
                lost.last_seq,
                lost.detail("spool", &source),
            )
            .encode()
        })?;
        Ok(lost)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The spool's random id (made when it was created).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The source's name (the spool directory's name).
    pub fn name(&self) -> String {
        self.dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// This source's spool directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends a record (durable after [`Spool::sync`]); waits while the spool is full:
    /// at `max_bytes`, or when its filesystem has no space left (checked again every
    /// [`NO_SPACE_RETRY`] as well as after each removal, since space may come back from
    /// outside).
    pub async fn append(&self, rec: &Record) -> Result<u64, SpoolError> {
        let payload = rec.encode();
        loop {
            let notified = self.space.notified();
            let appended = blocking(|| {
                let mut st = self.lock();
                // Full only when sealed segments (which acknowledgements can remove) take
                // part: records in the active segment alone must not block for good.
                let size = st.log.size_bytes();
                if size >= self.max_bytes && size > st.log.active_bytes() {
                    return Ok::<_, SpoolError>(Err(Full::Bound));
                }
                match st.log.append(&payload) {
                    Ok(seq) => {
                        st.appended_lsn = st.appended_lsn.max(rec.lsn);
                        Ok(Ok(seq))
                    }
                    // The write was undone (the log is not poisoned): wait for space.
                    Err(segment_log::LogError::Io { source, path })
                        if is_no_space(&source) && !st.log.is_poisoned() =>
                    {
                        // Seal what the active segment holds, so acknowledgements can
                        // remove it and free the space (best effort: the disk is full).
                        let freed = self.make_room(&mut st);
                        drop(st);
                        if freed {
                            self.space.notify_waiters();
                        }
                        Ok(Err(Full::Disk(format!("{}: {source}", path.display()))))
                    }
                    Err(e) => Err(e.into()),
                }
            })?;
            let full = match appended {
                Ok(seq) => {
                    if self.full.swap(false, std::sync::atomic::Ordering::Relaxed) {
                        tracing::info!(source = %self.name(), "spool has room again; reading from the source resumes");
                    }
                    return Ok(seq);
                }
                Err(full) => full,
            };
            // Full: make what we have durable so it can be shipped and acknowledged.
            self.sync().await?;
            metrics::counter!(SPOOL_FULL_WAITS, "source" => self.name(), "reason" => full.reason())
                .increment(1);
            if !self.full.swap(true, std::sync::atomic::Ordering::Relaxed) {
                self.log_full(&full);
            }
            match full {
                Full::Bound => notified.await,
                Full::Disk(_) => {
                    let _ = tokio::time::timeout(NO_SPACE_RETRY, notified).await;
                }
            }
        }
    }

    /// Logs that the spool is full: once per episode, and at most once per
    /// [`FULL_LOG_INTERVAL`] when episodes follow each other (a backlog that fills the
    /// spool again after every acknowledgement), with the number of waits between.
    fn log_full(&self, full: &Full) {
        let mut last = self.full_logged.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        let waits = self
            .full_episodes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        if last.is_some_and(|t| now.duration_since(t) < FULL_LOG_INTERVAL) {
            tracing::debug!(source = %self.name(), "reading pauses again (the full-spool warning is rate-limited)");
            return;
        }
        *last = Some(now);
        self.full_episodes
            .store(0, std::sync::atomic::Ordering::Relaxed);
        match full {
            Full::Bound => {
                tracing::warn!(source = %self.name(), dir = %self.dir.display(), max_bytes = self.max_bytes,
                times_full = waits,
                "spool is full; reading from the source pauses until relay-outer acknowledges records")
            }
            Full::Disk(e) => {
                tracing::warn!(source = %self.name(), dir = %self.dir.display(), error = %e,
                times_full = waits,
                "spool is full: no space left on its filesystem; reading from the source pauses until \
                 relay-outer acknowledges records or space is freed (nothing is lost)")
            }
        }
    }

    /// Makes every appended record durable.
    pub async fn sync(&self) -> Result<(), SpoolError> {
        // fdatasync is fast enough on a spool to hold the lock (appends wait for it anyway).
        let (seq, lsn) = blocking(|| {
            let mut st = self.lock();
            st.log.sync()?;
            Ok::<_, SpoolError>((st.log.synced_seq(), st.appended_lsn))
        })?;
        self.durable_lsn
            .fetch_max(lsn, std::sync::atomic::Ordering::AcqRel);
        self.synced.send_if_modified(|s| {
            let changed = *s != seq;
            *s = seq;
            changed
        });
        Ok(())
    }

    /// Highest `Record.lsn` that is durable: the position to confirm to PostgreSQL.
    pub fn durable_lsn(&self) -> u64 {
        self.durable_lsn.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Seq of the oldest record held.
    pub fn first_seq(&self) -> u64 {
        self.lock().log.first_seq()
    }

    /// Seq of the newest durable record (0 when none).
    pub fn synced_seq(&self) -> u64 {
        *self.synced.borrow()
    }

    /// Watches the newest durable seq.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.synced.subscribe()
    }

    /// Reads records from `seq` on; the reader may run ahead of the durable seq.
    pub fn reader(&self, seq: u64) -> Result<Reader, SpoolError> {
        Ok(self.lock().log.read_from(seq)?)
    }

    /// Bytes on disk.
    pub fn size_bytes(&self) -> u64 {
        self.lock().log.size_bytes()
    }

    /// Sets the relay-outer endpoints that must acknowledge a record before it is
    /// removed. Endpoints that are new start at "nothing acknowledged".
    pub fn set_endpoints<I: IntoIterator<Item = String>>(&self, endpoints: I) {
        let mut st = self.lock();
        let new: BTreeMap<String, u64> = endpoints
            .into_iter()
            .map(|e| {
                let v = st.acked.get(&e).copied().unwrap_or(0);
                (e, v)
            })
            .collect();
        st.acked = new;
    }

    /// Records that `endpoint` holds everything up to `seq`, and removes the segments
    /// every endpoint holds.
    pub fn ack(&self, endpoint: &str, seq: u64) -> Result<(), SpoolError> {
        let removed = blocking(|| {
            let mut st = self.lock();
            match st.acked.get_mut(endpoint) {
                Some(v) => *v = (*v).max(seq),
                None => return Ok(false),
            }
            self.remove_acked(&mut st)
        })?;
        if removed {
            self.space.notify_waiters();
        }
        Ok(())
    }

    /// Removes the sealed segments every endpoint acknowledged; whether any went.
    fn remove_acked(&self, st: &mut State) -> Result<bool, SpoolError> {
        let min = st.acked.values().copied().min().unwrap_or(0);
        if !st.log.segments_removable(min) {
            return Ok(false);
        }
        // The records about to go may be the last ones that show the durable LSN.
        // On a full disk too: removing segments is what frees space.
        let lsn = self.durable_lsn();
        write_small_even_when_full(&self.dir.join(LSN_FILE), format!("{lsn:016x}\n").as_bytes())
            .map_err(|e| SpoolError::File(self.dir.join(LSN_FILE), e))?;
        let before = st.log.first_seq();
        st.log.truncate_front(min)?;
        Ok(st.log.first_seq() != before)
    }

    /// On a full disk: seals the active segment (best effort: the new segment may not be
    /// creatable either) and removes what is acknowledged. The acknowledgements of the
    /// records in the active segment may all have arrived already, while it could not be
    /// removed: no later acknowledgement would come to remove it (nothing new can be
    /// appended), so this is the moment. Whether space was freed.
    fn make_room(&self, st: &mut State) -> bool {
        if let Err(e) = st.log.seal() {
            tracing::debug!(error = %e, "cannot seal the active segment yet");
        }
        self.remove_acked(st).unwrap_or_else(|e| {
            tracing::debug!(error = %e, "cannot remove acknowledged segments yet");
            false
        })
    }

    /// The lowest seq every endpoint acknowledged.
    pub fn acked_seq(&self) -> u64 {
        self.lock().acked.values().copied().min().unwrap_or(0)
    }
}

/// The segment log's options for a spool bounded by `max_bytes`: segments of an eighth
/// of it (1 MiB to 64 MiB), and up to [`RECYCLED_SEGMENTS`] acknowledged segments kept
/// to be written again.
fn log_options(max_bytes: u64) -> LogOptions {
    LogOptions {
        segment_bytes: (max_bytes / 8).clamp(1 << 20, segment_log::DEFAULT_SEGMENT_BYTES),
        max_record: MAX_RECORD,
        recycle_segments: RECYCLED_SEGMENTS,
    }
}

/// Acknowledged segments the spool keeps and writes its next segments into, over
/// `max_bytes` on disk: a segment written over cached pages of a reused file costs a
/// fraction of the CPU of a new file (see the README's *First copy*). Only the shipper
/// reads the spool, through the log, so nothing reads a reused file's older bytes.
const RECYCLED_SEGMENTS: usize = 2;

/// Why an append waits.
enum Full {
    /// The spool holds `max_bytes`.
    Bound,
    /// Its filesystem has no space left (the error).
    Disk(String),
}

impl Full {
    fn reason(&self) -> &'static str {
        match self {
            Full::Bound => "max_bytes",
            Full::Disk(_) => "no_space",
        }
    }
}

/// How often an append that found no space on the spool's filesystem tries again.
pub const NO_SPACE_RETRY: std::time::Duration = std::time::Duration::from_secs(1);
/// Least time between two "spool is full" warnings.
pub const FULL_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// Counter: times an append waited because the spool was full.
pub const SPOOL_FULL_WAITS: &str = "routy_cdc_spool_full_waits_total";
/// Gauge: the spool's `max_bytes`, by `source`, set when it opens: `routy_cdc_spool_bytes`
/// over this is how full it is.
pub const SPOOL_MAX_BYTES: &str = "routy_cdc_spool_max_bytes";

/// The highest `Record.lsn` in the log, found by reading back from the newest segment.
fn last_lsn(log: &SegmentLog) -> Result<u64, SpoolError> {
    let segments = log.segments()?;
    for seg in segments.iter().rev() {
        if seg.first_seq > log.last_seq() {
            continue;
        }
        let mut best = 0;
        for r in log.read_from(seg.first_seq)? {
            let (seq, payload) = r?;
            let rec = Record::decode_rows(&payload).map_err(|e| SpoolError::BadRecord {
                seq,
                reason: e.to_string(),
            })?;
            best = best.max(rec.lsn);
        }
        if best > 0 {
            return Ok(best);
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_proto::cdc::Event;

    #[test]
    fn opening_a_spool_exports_its_max_bytes() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let metrics = recorder.handle();
        let _local = metrics::set_default_local_recorder(&recorder);
        let dir = tempfile::tempdir().unwrap();
        let orders = dir.path().join("orders");
        std::fs::create_dir_all(&orders).unwrap();
        let _spool = Spool::open(&orders, 3 << 20).unwrap();
        assert!(
            metrics
                .render()
                .lines()
                .any(|l| l == "routy_cdc_spool_max_bytes{source=\"orders\"} 3145728"),
            "{}",
            metrics.render()
        );
    }

    fn rec(lsn: u64, bytes: usize) -> Record {
        Record {
            lsn,
            events: vec![Event::Message {
                transactional: true,
                lsn,
                prefix: "x".into(),
                content: vec![7; bytes],
            }],
        }
    }

    #[tokio::test]
    async fn lsn_is_durable_only_after_sync_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(s.append(&rec(100, 10)).await.unwrap(), 1);
        assert_eq!(s.append(&rec(0, 10)).await.unwrap(), 2);
        assert_eq!(s.durable_lsn(), 0);
        s.sync().await.unwrap();
        assert_eq!((s.durable_lsn(), s.synced_seq()), (100, 2));
        drop(s);
        let s = Spool::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(s.durable_lsn(), 100);
        assert_eq!(s.synced_seq(), 2);
    }

    #[tokio::test]
    async fn a_corrupt_spool_is_refused_and_salvage_keeps_every_valid_record() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 1 << 30).unwrap();
        for i in 1..=30 {
            s.append(&rec(i * 10, 100)).await.unwrap();
        }
        s.sync().await.unwrap();
        drop(s);
        let seg = dir.path().join("log/00000000000000000001.seg");
        let mut data = std::fs::read(&seg).unwrap();
        let mid = data.len() / 2;
        data[mid..mid + 16].iter_mut().for_each(|b| *b ^= 0xFF);
        std::fs::write(&seg, &data).unwrap();
        let err = Spool::open(dir.path(), 1 << 30).unwrap_err();
        assert!(matches!(err, SpoolError::Damaged { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("00000000000000000001.seg")
                && text.contains("offset")
                && text.contains("cdc salvage"),
            "{text}"
        );
        assert_eq!(std::fs::read(&seg).unwrap(), data, "nothing was cut");
        let lost = Spool::salvage(dir.path(), 1 << 30).unwrap();
        assert_eq!(lost.len(), 1);
        let s = Spool::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(s.synced_seq(), 30, "every seq is still there");
        assert_eq!(s.durable_lsn(), 300);
        let mut markers = 0;
        for r in s.reader(1).unwrap() {
            let (seq, payload) = r.unwrap();
            let record = Record::decode(&payload).unwrap();
            match record.lost_marker() {
                Some(m) => {
                    markers += 1;
                    assert_eq!(m["seq"], seq);
                    assert_eq!(m["log"], "spool");
                }
                None => assert_eq!(record.lsn, seq * 10),
            }
        }
        assert!((1..=2).contains(&markers), "{markers}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_as_big_as_the_bound_does_not_block_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        s.set_endpoints(["a".to_string()]);
        let seq = s.append(&rec(1, 1_200_000)).await.unwrap();
        s.sync().await.unwrap();
        s.ack("a", seq).unwrap();
        // Everything is in the active segment and acknowledged: the next append must go
        // through (it rolls the segment), not wait for an acknowledgement that cannot free
        // anything.
        let next = tokio::time::timeout(std::time::Duration::from_secs(5), s.append(&rec(2, 10)))
            .await
            .expect("append must not block")
            .unwrap();
        assert_eq!(next, seq + 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_durable_lsn_and_id_survive_removal_of_every_lsn_record() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 8 << 20).unwrap();
        let id = s.id();
        s.set_endpoints(["a".to_string()]);
        s.append(&rec(500, 10)).await.unwrap();
        // A big transaction's middle records carry no LSN; they fill several segments.
        let mut last = 0;
        for _ in 0..6 {
            last = s.append(&rec(0, 700_000)).await.unwrap();
        }
        s.sync().await.unwrap();
        s.ack("a", last).unwrap();
        assert!(s.first_seq() > 1, "the segment with lsn 500 was removed");
        drop(s);
        let s = Spool::open(dir.path(), 8 << 20).unwrap();
        assert_eq!(s.durable_lsn(), 500);
        assert_eq!(s.id(), id);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_a_full_disk_records_acknowledged_before_the_seal_are_removed() {
        // The acknowledgements of the active segment's records arrive while it cannot be
        // removed; then the disk fills and the segment is sealed. No acknowledgement will
        // come after (nothing new can be appended): sealing must remove it at once, or
        // the spool stays full for good.
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 1 << 30).unwrap();
        s.set_endpoints(["a".to_string()]);
        let mut last = 0;
        for i in 1..=5 {
            last = s.append(&rec(i, 1000)).await.unwrap();
        }
        s.sync().await.unwrap();
        s.ack("a", last).unwrap();
        assert_eq!(s.first_seq(), 1, "the active segment is not removed");
        let freed = {
            let mut st = s.lock();
            s.make_room(&mut st)
        };
        assert!(freed);
        assert_eq!(s.first_seq(), last + 1);
        assert_eq!(s.size_bytes(), 0);
        drop(s);
        let s = Spool::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(s.durable_lsn(), 5, "the durable LSN outlives its records");
        assert_eq!(s.append(&rec(9, 10)).await.unwrap(), last + 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_spool_waits_for_acks_and_drops_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        s.set_endpoints(["a".to_string(), "b".to_string()]);
        // 1 MiB bound, 1 MiB segments: fill past it.
        let mut last = 0;
        while s.size_bytes() < 1 << 20 {
            last = s.append(&rec(last + 1, 60_000)).await.unwrap();
        }
        let s2 = s.clone();
        let writer = tokio::spawn(async move { s2.append(&rec(999, 10)).await.unwrap() });
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(
            !writer.is_finished(),
            "append must wait while the spool is full"
        );
        // It synced before waiting, so shippers can send everything.
        assert_eq!(s.synced_seq(), last);
        s.ack("a", last).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(
            !writer.is_finished(),
            "one endpoint acknowledging is not enough"
        );
        s.ack("b", last).unwrap();
        let seq = tokio::time::timeout(std::time::Duration::from_secs(5), writer)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(seq, last + 1);
        // Nothing unacknowledged was removed.
        assert!(s.first_seq() <= last + 1);
        let seqs: Vec<u64> = s
            .reader(s.first_seq())
            .unwrap()
            .map(|r| r.unwrap().0)
            .collect();
        assert_eq!(*seqs.last().unwrap(), last + 1);
    }
}
