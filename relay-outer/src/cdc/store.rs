//! relay-outer's CDC store: one durable segment log per source (`<dir>/<tunnel>/<source>/`),
//! appended in the seq order relay-inner's spool assigned, deduplicated on resend, and
//! read by every sink and by `cdc tail` at their own positions.
//!
//! The store holds the records of one relay-inner spool only: the spool's random id is
//! kept in `SPOOL_ID` beside the segments the first time a stream is accepted, and a
//! stream from another spool is refused.
//!
//! Only durable records count as held. When a write or an fsync fails the log cannot be
//! trusted any further (the kernel may have dropped pages it reported as written): the
//! store then refuses every stream and batch until relay-outer is restarted, which
//! rescans the log and keeps what is really on disk.
//!
//! The log's lock is held across fsync on a blocking thread; what async code asks for
//! (first seq, durable seq, size, readers) is kept beside it and never waits for it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use relay_proto::cdc::Record;
use routy_log::segment_log::{self, LogError, LogOptions, Reader, SegmentLog};
use tokio::sync::watch;

/// Largest record the store accepts (the spool's bound).
pub const MAX_RECORD: usize = segment_log::DEFAULT_MAX_RECORD;

/// File in a store's directory holding the id of the spool its records come from.
pub const SPOOL_ID_FILE: &str = "SPOOL_ID";

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The segment log failed.
    #[error(transparent)]
    Log(#[from] segment_log::LogError),
    /// A record did not decode.
    #[error("record {seq} from relay-inner is malformed: {reason}")]
    BadRecord {
        /// Its seq.
        seq: u64,
        /// Why.
        reason: String,
    },
    /// relay-inner sent records that do not continue the store.
    #[error("{0}")]
    Gap(String),
    /// A stream from another spool than the one the store's records come from.
    #[error("{0}")]
    SpoolMismatch(String),
    /// An earlier write or fsync failed: the store refuses everything until a restart.
    #[error(
        "the store of {name} hit an I/O error ({reason}); it accepts nothing more until \
         relay-outer is restarted, which rescans the log (records acknowledged before stay durable)"
    )]
    Failed {
        /// `tunnel/source`.
        name: String,
        /// The error that stopped it.
        reason: String,
    },
    /// The spool id file could not be read or written.
    #[error("store file {path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A blocking task failed.
    #[error("store task failed: {0}")]
    Task(String),
}

/// What an append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Newest durable seq after it.
    pub synced: u64,
    /// Records of the batch that were new (the others were already held).
    pub new: usize,
}

/// Faults tests inject into the write path.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct Faults {
    /// Appending this seq fails (0: never).
    pub append_at: AtomicU64,
    /// The fsync after a batch fails.
    pub sync: std::sync::atomic::AtomicBool,
}

/// One source's log.
pub struct Store {
    /// `tunnel/source`.
    pub name: String,
    dir: PathBuf,
    log: Mutex<SegmentLog>,
    synced: watch::Sender<u64>,
    /// The log's first seq and size, updated under the log's lock, read without it.
    first: AtomicU64,
    bytes: AtomicU64,
    /// Set once when a write failed in a way the log cannot recover from in-process.
    failure: OnceLock<String>,
    /// Id of the spool the records come from (unset until a stream was accepted).
    spool: OnceLock<u64>,
    /// Damage found at open with valid records after it, set aside into a side file until
    /// relay-inner sends those seqs again (cleared then).
    damage: Mutex<Option<segment_log::SetAside>>,
    /// Held while a stream is being accepted, so two cannot race.
    accepting: Mutex<()>,
    /// Position of each reader (sink) that holds records back from retention: the newest
    /// seq it has applied.
    readers: Mutex<HashMap<String, u64>>,
    #[cfg(test)]
    pub(crate) faults: Faults,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("name", &self.name).finish()
    }
}

/// Reads the spool id kept in `dir` (`None` when no stream was accepted yet).
fn read_spool_id(dir: &Path) -> Result<Option<u64>, StoreError> {
    let path = dir.join(SPOOL_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(t) => u64::from_str_radix(t.trim(), 16)
            .map(Some)
            .map_err(|_| StoreError::File {
                path,
                reason: format!("holds {:?}, not a hexadecimal spool id", t.trim()),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::File {
            path,
            reason: e.to_string(),
        }),
    }
}

impl Store {
    /// Opens (creating) the store of `name` (`tunnel/source`) under `root`, with the
    /// default segment size.
    #[cfg(test)]
    pub fn open(root: &Path, name: &str) -> Result<Arc<Store>, StoreError> {
        Self::open_with(root, name, segment_log::DEFAULT_SEGMENT_BYTES)
    }

    /// [`Store::open`] with another segment size (tests use small ones).
    pub(crate) fn open_with(
        root: &Path,
        name: &str,
        segment_bytes: u64,
    ) -> Result<Arc<Store>, StoreError> {
        let dir = root.join(name);
        // Damage followed by valid records is set aside, never cut: relay-inner's spool may
        // still hold those seqs and sends them again; if not, `cdc salvage` puts it back.
        let (log, damage) = segment_log::open_setting_aside(
            &dir,
            LogOptions {
                max_record: MAX_RECORD,
                segment_bytes,
                // Sinks read the store without its lock (`read_dir`), which a log that
                // reuses segments does not allow; removals follow retention anyway.
                recycle_segments: 0,
            },
        )?;
        if let Some(d) = &damage {
            tracing::error!(source = %name, segment = %d.segment.display(), offset = d.offset,
                damage = %d.damage, damaged_seq = d.damaged_seq, valid_seq = d.valid_seq,
                side_file = %d.file.display(),
                "CDC store: a damaged record with valid records after it; the store now ends at seq {} \
                 and asks relay-inner for the rest again (the damaged part is kept in the side file)",
                d.damaged_seq - 1);
        }
        let spool = OnceLock::new();
        if let Some(id) = read_spool_id(&dir)? {
            let _ = spool.set(id);
        }
        let (synced, _) = watch::channel(log.synced_seq());
        Ok(Arc::new(Store {
            name: name.to_string(),
            dir,
            first: AtomicU64::new(log.first_seq()),
            bytes: AtomicU64::new(log.size_bytes()),
            log: Mutex::new(log),
            synced,
            failure: OnceLock::new(),
            spool,
            damage: Mutex::new(damage),
            accepting: Mutex::new(()),
            readers: Mutex::new(HashMap::new()),
            #[cfg(test)]
            faults: Faults::default(),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SegmentLog> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Copies what async code reads (first seq, size) out of the locked log.
    fn refresh(&self, log: &SegmentLog) {
        self.first.store(log.first_seq(), Ordering::Relaxed);
        self.bytes.store(log.size_bytes(), Ordering::Relaxed);
    }

    /// Publishes the log's durable seq to the sinks if it moved.
    fn publish_synced(&self, log: &SegmentLog) {
        let seq = log.synced_seq();
        self.synced.send_if_modified(|s| {
            let moved = *s != seq;
            *s = seq;
            moved
        });
    }

    /// Stops the store for good (until a restart) after `reason`.
    fn fail(&self, reason: String) -> StoreError {
        let reason = self.failure.get_or_init(|| {
            tracing::error!(source = %self.name, dir = %self.dir.display(), error = %reason,
                "CDC store hit an I/O error; it refuses every stream until relay-outer is restarted");
            reason
        });
        StoreError::Failed {
            name: self.name.clone(),
            reason: reason.clone(),
        }
    }

    /// An error when the store stopped after an I/O error (or its log is poisoned, or
    /// holds appended records that are not durable).
    fn check_usable(&self, log: &SegmentLog) -> Result<(), StoreError> {
        if let Some(reason) = self.failure.get() {
            return Err(StoreError::Failed {
                name: self.name.clone(),
                reason: reason.clone(),
            });
        }
        if log.is_poisoned() {
            return Err(self.fail("the segment log is poisoned by a failed write".into()));
        }
        if log.last_seq() != log.synced_seq() {
            return Err(self.fail(format!(
                "records {}..={} were appended but never made durable",
                log.synced_seq() + 1,
                log.last_seq()
            )));
        }
        Ok(())
    }

    /// Damage set aside at open that relay-inner has not sent again yet, described.
    pub fn damage(&self) -> Option<String> {
        self.damage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|d| {
                format!(
                    "seq {} was damaged at offset {} of {} ({}); seqs from {} on were set aside in {} \
                     until relay-inner sends them again",
                    d.damaged_seq,
                    d.offset,
                    d.segment.display(),
                    d.damage,
                    d.damaged_seq,
                    d.file.display()
                )
            })
    }

    /// Forgets the set-aside damage once the store holds its seqs again, removing the side
    /// file (every record in it came again from relay-inner).
    fn damage_repaired(&self, synced: u64) {
        let mut damage = self.damage.lock().unwrap_or_else(|p| p.into_inner());
        let Some(d) = damage.as_ref() else { return };
        if synced < d.valid_seq {
            return;
        }
        tracing::info!(source = %self.name, damaged_seq = d.damaged_seq, side_file = %d.file.display(),
            "CDC store: the damaged records came again from relay-inner; removing the side file");
        if let Err(e) = std::fs::remove_file(&d.file) {
            tracing::warn!(file = %d.file.display(), error = %e, "cannot remove the side file");
        }
        *damage = None;
    }

    /// Why the store refuses everything, if it does.
    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Seq of the oldest record held. Never waits for a write in progress.
    pub fn first_seq(&self) -> u64 {
        self.first.load(Ordering::Relaxed)
    }

    /// Seq of the newest durable record (0 when none).
    pub fn synced_seq(&self) -> u64 {
        *self.synced.borrow()
    }

    /// Watches the newest durable seq; sinks and tail read up to it.
    #[allow(dead_code)] // the sinks and tests use it
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.synced.subscribe()
    }

    /// Id of the spool the store's records come from, once a stream was accepted.
    pub fn spool_id(&self) -> Option<u64> {
        self.spool.get().copied()
    }

    /// Accepts a shipping stream from spool `spool_id` holding `first_seq..=last_seq`:
    /// refuses another spool than the one the store's records come from (remembering
    /// the first one), then answers as [`Store::next_seq_for`]. Blocking.
    pub fn accept_stream(
        &self,
        spool_id: u64,
        first_seq: u64,
        last_seq: u64,
    ) -> Result<u64, StoreError> {
        let _one = self.accepting.lock().unwrap_or_else(|p| p.into_inner());
        let known = self.spool_id();
        if let Some(old) = known {
            if old != spool_id {
                let (tunnel, source) = self.name.split_once('/').unwrap_or(("?", &self.name));
                return Err(StoreError::SpoolMismatch(format!(
                    "the store of {tunnel}/{source} holds records of spool {old:016x} but relay-inner's \
                     spool is {spool_id:016x}: either relay-inner's spool was reset/lost, or two \
                     relay-inner processes ship a source of the same name through tunnel {tunnel}. \
                     If the spool was reset, move the store directory {} away (its records stay \
                     readable with cdc tail --dir: moved to <root>/{tunnel}/{source}, read them with \
                     cdc tail --dir <root> --source {tunnel}/{source}) and restart relay-outer",
                    self.dir.display()
                )));
            }
        }
        let next = self.next_seq_for(first_seq, last_seq)?;
        if known.is_none() {
            routy_log::disk::write_atomic(
                &self.dir.join(SPOOL_ID_FILE),
                format!("{spool_id:016x}\n").as_bytes(),
            )
            .map_err(|e| StoreError::File {
                path: self.dir.join(SPOOL_ID_FILE),
                reason: e.to_string(),
            })?;
            let _ = self.spool.set(spool_id);
        }
        Ok(next)
    }

    /// The seq relay-inner should send next, given the range its spool holds; an error
    /// when the two cannot continue each other without a hole. Counts durable records
    /// only. Blocking.
    pub fn next_seq_for(&self, first_seq: u64, last_seq: u64) -> Result<u64, StoreError> {
        let mut log = self.lock();
        self.check_usable(&log)?;
        let have = log.synced_seq();
        if have == 0 && log.first_seq() == 1 && first_seq > 1 {
            // A new store joining a source whose older records were removed: start there.
            if let Err(e) = log.start_at(first_seq) {
                // The log may have lost its active segment half-way: do not go on with it.
                return Err(self.fail(e.to_string()));
            }
            self.refresh(&log);
            return Ok(first_seq);
        }
        let next = have + 1;
        if next < first_seq {
            if let Some(d) = self
                .damage
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
            {
                return Err(StoreError::Gap(format!(
                    "the store of {} found seq {next} damaged at open (offset {} of {}: {}) and \
                     set it and what followed aside in {}; relay-inner's spool no longer holds it \
                     (it starts at seq {first_seq}), so the store stops at seq {have} and its sinks \
                     with it. Way out (README, \"Damaged spool or store\"): stop relay-outer and run \
                     `relay-outer cdc salvage --config FILE --source {}`: it puts the set-aside \
                     records back and a marker in place of each unreadable seq",
                    self.name,
                    d.offset,
                    d.segment.display(),
                    d.damage,
                    d.file.display(),
                    self.name,
                )));
            }
            return Err(StoreError::Gap(format!(
                "the store of {} ends at seq {have} but relay-inner's spool starts at seq {first_seq}: \
                 records {next}..{} were removed from the spool without reaching this store",
                self.name,
                first_seq - 1
            )));
        }
        if have > last_seq && last_seq > 0 || (last_seq == 0 && have > 0 && first_seq <= 1) {
            return Err(StoreError::Gap(format!(
                "the store of {} already holds seq {have} but relay-inner's spool ends at seq {last_seq}: \
                 the spool was reset; move the store directory {} away (or the spool back) to continue",
                self.name,
                self.dir.display()
            )));
        }
        Ok(next)
    }

    /// Appends the records of a batch starting at `first_seq`, skipping the ones already
    /// held, and makes them durable. Returns the newest durable seq. Blocking: call from
    /// a blocking thread.
    #[allow(dead_code)] // the sinks and tests use it
    pub fn append_batch(&self, first_seq: u64, records: &[Vec<u8>]) -> Result<u64, StoreError> {
        self.append_batch_counted(first_seq, records)
            .map(|a| a.synced)
    }

    fn append_one(&self, log: &mut SegmentLog, payload: &[u8]) -> Result<(), LogError> {
        #[cfg(test)]
        if self.faults.append_at.load(Ordering::Relaxed) == log.last_seq() + 1 {
            return Err(LogError::Io {
                path: self.dir.clone(),
                source: std::io::Error::other("injected append failure"),
            });
        }
        log.append(payload).map(|_| ())
    }

    fn sync(&self, log: &mut SegmentLog) -> Result<(), LogError> {
        #[cfg(test)]
        if self.faults.sync.load(Ordering::Relaxed) && log.last_seq() != log.synced_seq() {
            return Err(LogError::Io {
                path: self.dir.clone(),
                source: std::io::Error::other("injected fsync failure"),
            });
        }
        log.sync()
    }

    /// [`Store::append_batch`], also saying how many records were new. Every new record
    /// is checked before the first is written, so a batch with a bad record stores
    /// nothing. When a write fails part-way, the records before it are made durable if
    /// the fsync works; if it does not, the store refuses everything from then on.
    pub fn append_batch_counted(
        &self,
        first_seq: u64,
        records: &[Vec<u8>],
    ) -> Result<Appended, StoreError> {
        if first_seq == 0 {
            return Err(StoreError::Gap(format!(
                "batch for {} starts at seq 0; seqs start at 1",
                self.name
            )));
        }
        let mut log = self.lock();
        self.check_usable(&log)?;
        let expected = log.last_seq() + 1;
        if first_seq > expected {
            return Err(StoreError::Gap(format!(
                "batch for {} starts at seq {first_seq} but the store expects {expected}",
                self.name
            )));
        }
        let skip = usize::try_from(expected - first_seq).unwrap_or(usize::MAX);
        let fresh = records.get(skip..).unwrap_or(&[]);
        for (i, payload) in fresh.iter().enumerate() {
            let seq = expected + i as u64;
            if payload.len() > MAX_RECORD {
                return Err(StoreError::BadRecord {
                    seq,
                    reason: format!(
                        "{} bytes exceed the largest record of {MAX_RECORD}",
                        payload.len()
                    ),
                });
            }
            if let Err(e) = Record::decode_rows(payload) {
                return Err(StoreError::BadRecord {
                    seq,
                    reason: e.to_string(),
                });
            }
        }
        let appended = fresh
            .iter()
            .try_for_each(|payload| self.append_one(&mut log, payload));
        if let Err(LogError::Io { source, .. }) = &appended {
            if routy_log::disk::is_no_space(source) {
                // A full disk: seal what the active segment holds so that retention can
                // remove it once the sinks consumed it (best effort).
                if let Err(e) = log.seal() {
                    tracing::debug!(source = %self.name, error = %e, "cannot seal the active segment yet");
                }
            }
        }
        // Also after a failed append: the records before it are then durable and count.
        let synced = self.sync(&mut log);
        self.refresh(&log);
        self.publish_synced(&log);
        self.damage_repaired(log.synced_seq());
        let result = match (appended, synced) {
            (Ok(()), Ok(())) => Ok(Appended {
                synced: log.synced_seq(),
                new: fresh.len(),
            }),
            // The records before the failed one are durable (and count); the log goes on.
            (Err(e), Ok(())) => Err(StoreError::Log(e)),
            (Ok(()), Err(s)) => Err(self.fail(s.to_string())),
            (Err(e), Err(s)) => Err(self.fail(format!("{e}; the fsync after it failed too: {s}"))),
        };
        drop(log);
        result
    }

    /// Async wrapper of [`Store::append_batch`].
    #[allow(dead_code)] // the sinks and tests use it
    pub async fn append(
        self: &Arc<Self>,
        first_seq: u64,
        records: Vec<Vec<u8>>,
    ) -> Result<u64, StoreError> {
        self.append_counted(first_seq, records)
            .await
            .map(|a| a.synced)
    }

    /// Async wrapper of [`Store::append_batch_counted`].
    pub async fn append_counted(
        self: &Arc<Self>,
        first_seq: u64,
        records: Vec<Vec<u8>>,
    ) -> Result<Appended, StoreError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.append_batch_counted(first_seq, &records))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// `relay-outer cdc salvage` of the store of `name` under `root` (relay-outer stopped):
    /// puts a side file made at open back at the end of the log if the log still ends
    /// where it was cut, then keeps every valid record and writes a [`Record::lost`]
    /// marker in place of each unreadable seq. Returns what it did, for the operator.
    pub fn salvage(root: &Path, name: &str) -> Result<Vec<String>, StoreError> {
        let dir = root.join(name);
        let mut done = Vec::new();
        let file_err = |path: &Path, e: std::io::Error| StoreError::File {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let entries = std::fs::read_dir(&dir).map_err(|e| file_err(&dir, e))?;
        let mut sides: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.to_string_lossy().ends_with(segment_log::SET_ASIDE_SUFFIX))
            .collect();
        sides.sort();
        for side in sides {
            // <segment>.<offset>.damaged
            let text = side.to_string_lossy().into_owned();
            let stem = &text[..text.len() - segment_log::SET_ASIDE_SUFFIX.len()];
            let parsed = stem
                .rsplit_once('.')
                .and_then(|(seg, off)| Some((PathBuf::from(seg), off.parse::<u64>().ok()?)));
            let Some((segment, offset)) = parsed else {
                done.push(format!(
                    "{}: not a side file made by the store; left alone",
                    text
                ));
                continue;
            };
            let len = std::fs::metadata(&segment).map(|m| m.len()).ok();
            if len != Some(offset) {
                done.push(format!(
                    "{text}: the log no longer ends where it was cut (relay-inner sent those seqs \
                     again, or the segment is gone); left alone, remove it by hand"
                ));
                continue;
            }
            let bytes = std::fs::read(&side).map_err(|e| file_err(&side, e))?;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&segment)
                .map_err(|e| file_err(&segment, e))?;
            use std::io::Write;
            f.write_all(&bytes)
                .and_then(|_| f.sync_all())
                .map_err(|e| file_err(&segment, e))?;
            std::fs::remove_file(&side).map_err(|e| file_err(&side, e))?;
            done.push(format!(
                "put {} bytes from {text} back at offset {offset} of {}",
                bytes.len(),
                segment.display()
            ));
        }
        let opts = LogOptions {
            max_record: MAX_RECORD,
            segment_bytes: segment_log::DEFAULT_SEGMENT_BYTES,
            recycle_segments: 0,
        };
        let lost = segment_log::salvage(&dir, opts, |seq, lost| {
            Record::lost(
                seq,
                lost.first_seq,
                lost.last_seq,
                lost.detail("store", name),
            )
            .encode()
        })?;
        for l in &lost {
            done.push(format!(
                "{l} (the sinks log them and count routy_cdc_sink_lost_records_total)"
            ));
        }
        Ok(done)
    }

    /// Reads records from `seq` on (0: the oldest). The reader may run ahead of
    /// [`Store::synced_seq`]; stop there.
    ///
    /// It does not take the log's lock (which a write holds across fsync): it finds the
    /// segment from the directory, as `cdc tail` does, so it costs a directory listing
    /// and one open.
    #[allow(dead_code)] // the sinks and tests use it
    pub fn reader(&self, seq: u64) -> Result<Reader, StoreError> {
        let first = self.first_seq();
        if seq != 0 && seq < first {
            return Err(LogError::Truncated {
                requested: seq,
                first,
            }
            .into());
        }
        let last = self.synced_seq().max(first.saturating_sub(1));
        if seq > last + 1 {
            return Err(LogError::BeyondEnd {
                requested: seq,
                last,
            }
            .into());
        }
        Ok(segment_log::read_dir(&self.dir, seq, MAX_RECORD)?)
    }

    /// Removes whole segments whose records are all `<= upto` and older than `cutoff`.
    pub fn remove_before(
        &self,
        upto: u64,
        cutoff: std::time::SystemTime,
    ) -> Result<u64, StoreError> {
        let mut log = self.lock();
        let segs = log.segments()?;
        // The newest segment whose successor starts at or below upto+1 and that is old enough.
        let mut limit = 0;
        for w in segs.windows(2) {
            let last_in = w[1].first_seq - 1;
            if last_in <= upto && w[0].modified <= cutoff {
                limit = last_in;
            } else {
                break;
            }
        }
        if limit > 0 {
            let res = log.truncate_front(limit);
            self.refresh(&log);
            res?;
        }
        Ok(log.first_seq())
    }

    /// Bytes on disk. Never waits for a write in progress.
    pub fn size_bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Records that `reader` (a sink's name) has applied every record up to `seq`;
    /// retention keeps the records after the lowest such position.
    #[allow(dead_code)] // the sinks and tests use it
    pub fn set_reader_position(&self, reader: &str, seq: u64) {
        let mut r = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        match r.get_mut(reader) {
            Some(v) => *v = seq,
            None => {
                r.insert(reader.to_string(), seq);
            }
        }
    }

    /// Registers `reader` at position 0 unless it already reported one, so retention
    /// keeps everything until the reader has said how far it got.
    pub fn register_reader(&self, reader: &str) {
        let mut r = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        r.entry(reader.to_string()).or_insert(0);
    }

    /// The position `reader` reported (or was registered at).
    pub fn reader_position(&self, reader: &str) -> Option<u64> {
        let r = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        r.get(reader).copied()
    }

    /// The lowest position over all readers; `None` when no reader registered.
    pub fn min_reader_position(&self) -> Option<u64> {
        let r = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        r.values().copied().min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_proto::cdc::{Event, Record};

    fn rec(i: u64) -> Vec<u8> {
        Record {
            lsn: i,
            events: vec![Event::Message {
                transactional: false,
                lsn: i,
                prefix: "t".into(),
                content: vec![],
            }],
        }
        .encode()
    }

    #[test]
    fn resent_records_are_dropped_and_gaps_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), "site-a/orders").unwrap();
        assert_eq!(s.next_seq_for(1, 0).unwrap(), 1);
        assert_eq!(s.append_batch(1, &[rec(1), rec(2), rec(3)]).unwrap(), 3);
        // Resend of 2..4: 2 and 3 dropped, 4 kept.
        assert_eq!(s.append_batch(2, &[rec(2), rec(3), rec(4)]).unwrap(), 4);
        assert!(matches!(
            s.append_batch(6, &[rec(6)]),
            Err(StoreError::Gap(_))
        ));
        assert!(matches!(
            s.append_batch(5, &[b"garbage".to_vec()]),
            Err(StoreError::BadRecord { seq: 5, .. })
        ));
        // A bad record anywhere in a batch stores nothing of it.
        assert!(matches!(
            s.append_batch(4, &[rec(4), rec(5), b"x".to_vec()]),
            Err(StoreError::BadRecord { seq: 6, .. })
        ));
        assert_eq!(s.lock().last_seq(), 4);
        // A block of copy rows that does not match its relation is refused with why.
        let rel = crate::cdc::sink::testkit::rel(1, "t", b'd', &[("id", "integer", true)]);
        let block = |data: &[u8]| {
            Record {
                lsn: 0,
                events: vec![
                    Event::Relation(rel.clone()),
                    Event::Rows {
                        rel: 1,
                        rows: 2,
                        data: data.to_vec(),
                    },
                ],
            }
            .encode()
        };
        match s.append_batch(5, &[block(b"1\n2\tx\n")]) {
            Err(StoreError::BadRecord { seq: 5, reason }) => {
                assert!(reason.contains("relation's columns"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.lock().last_seq(), 4);
        assert!(matches!(
            s.append_batch(0, &[rec(1)]),
            Err(StoreError::Gap(_))
        ));
        assert_eq!(
            s.append_batch_counted(3, &[rec(3), rec(4)]).unwrap(),
            Appended { synced: 4, new: 0 }
        );
        assert_eq!(s.next_seq_for(1, 10).unwrap(), 5);
        // The spool was reset (it ends below what the store holds).
        assert!(matches!(s.next_seq_for(1, 2), Err(StoreError::Gap(_))));
        let got: Vec<u64> = s.reader(0).unwrap().map(|r| r.unwrap().0).collect();
        assert_eq!(got, vec![1, 2, 3, 4]);
    }

    /// A store of `n` records (one segment) with 16 bytes flipped in record `bad`.
    fn damaged_store(n: u64, bad: u64) -> (tempfile::TempDir, Vec<Vec<u8>>) {
        let dir = tempfile::tempdir().unwrap();
        let recs: Vec<Vec<u8>> = (1..=n).map(rec).collect();
        let store = Store::open(dir.path(), "t/s").unwrap();
        store.append_batch(1, &recs).unwrap();
        drop(store);
        let seg = dir.path().join("t/s/00000000000000000001.seg");
        let mut data = std::fs::read(&seg).unwrap();
        let at: usize = recs[..bad as usize - 1].iter().map(|r| r.len() + 16).sum();
        data[at + 4..at + 20].iter_mut().for_each(|b| *b ^= 0x5A);
        std::fs::write(&seg, data).unwrap();
        (dir, recs)
    }

    #[test]
    fn damage_in_the_middle_is_set_aside_and_fetched_again_from_the_spool() {
        let (dir, recs) = damaged_store(50, 20);
        let store = Store::open(dir.path(), "t/s").unwrap();
        assert_eq!(store.synced_seq(), 19, "the store ends before the damage");
        let damage = store.damage().expect("damage reported");
        assert!(
            damage.contains("seq 20") && damage.contains(".damaged"),
            "{damage}"
        );
        // relay-inner still holds seq 20 on: it is asked for it again.
        assert_eq!(store.next_seq_for(15, 50).unwrap(), 20);
        store.append_batch(20, &recs[19..]).unwrap();
        assert_eq!(store.synced_seq(), 50);
        assert!(store.damage().is_none());
        let sides: Vec<_> = std::fs::read_dir(dir.path().join("t/s"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .to_string_lossy()
                    .ends_with(".damaged")
            })
            .collect();
        assert!(sides.is_empty(), "the side file is removed once repaired");
        let all: Vec<_> = store.reader(1).unwrap().map(|r| r.unwrap().1).collect();
        assert_eq!(all, recs);
    }

    #[test]
    fn damage_the_spool_no_longer_holds_stops_the_store_until_salvaged() {
        let (dir, recs) = damaged_store(50, 20);
        let store = Store::open(dir.path(), "t/s").unwrap();
        // relay-inner removed everything up to 40.
        let err = store.next_seq_for(41, 60).unwrap_err().to_string();
        assert!(
            err.contains("seq 20 damaged") && err.contains("cdc salvage"),
            "{err}"
        );
        assert_eq!(store.synced_seq(), 19);
        drop(store);
        let done = Store::salvage(dir.path(), "t/s").unwrap();
        assert_eq!(done.len(), 2, "{done:?}");
        assert!(done[1].contains("seqs 20..=20"), "{done:?}");
        let store = Store::open(dir.path(), "t/s").unwrap();
        assert!(store.damage().is_none());
        assert_eq!(store.synced_seq(), 50);
        let all: Vec<_> = store.reader(1).unwrap().map(|r| r.unwrap()).collect();
        for (seq, payload) in &all {
            let rec = Record::decode(payload).unwrap();
            if *seq == 20 {
                let lost = rec.lost_marker().expect("a marker at seq 20");
                assert_eq!(lost["first_seq"], 20);
                assert_eq!(lost["log"], "store");
            } else {
                assert_eq!(payload, &recs[*seq as usize - 1]);
            }
        }
        // The store continues where relay-inner's spool is.
        assert_eq!(store.next_seq_for(41, 60).unwrap(), 51);
    }

    #[test]
    fn a_new_store_starts_where_the_spool_starts() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), "t/s").unwrap();
        assert_eq!(s.next_seq_for(40, 45).unwrap(), 40);
        assert_eq!(s.append_batch(40, &[rec(40)]).unwrap(), 40);
        drop(s);
        let s = reopen(dir.path(), segment_log::DEFAULT_SEGMENT_BYTES);
        assert_eq!(s.synced_seq(), 40);
        assert_eq!(s.next_seq_for(40, 45).unwrap(), 41);
        assert!(matches!(s.next_seq_for(50, 55), Err(StoreError::Gap(_))));
    }

    #[test]
    fn a_failed_append_keeps_the_records_before_it_durable() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), "t/s").unwrap();
        s.faults.append_at.store(3, Ordering::Relaxed);
        assert!(matches!(
            s.append_batch(1, &[rec(1), rec(2), rec(3), rec(4)]),
            Err(StoreError::Log(_))
        ));
        // 1 and 2 were made durable after the failure; they count, nothing else does.
        assert_eq!(s.synced_seq(), 2);
        assert_eq!(s.lock().last_seq(), 2);
        assert!(s.failure().is_none());
        assert_eq!(s.next_seq_for(1, 4).unwrap(), 3);
        s.faults.append_at.store(0, Ordering::Relaxed);
        assert_eq!(s.append_batch(3, &[rec(3), rec(4)]).unwrap(), 4);
        let got: Vec<u64> = s.reader(0).unwrap().map(|r| r.unwrap().0).collect();
        assert_eq!(got, vec![1, 2, 3, 4]);
    }

    #[test]
    fn a_failed_fsync_stops_the_store_until_it_is_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), "t/s").unwrap();
        s.append_batch(1, &[rec(1)]).unwrap();
        s.faults.sync.store(true, Ordering::Relaxed);
        let e = s.append_batch(2, &[rec(2), rec(3)]).unwrap_err();
        assert!(matches!(e, StoreError::Failed { .. }), "{e}");
        assert!(e.to_string().contains("restarted"), "{e}");
        assert!(e.to_string().contains("injected fsync failure"), "{e}");
        // Appended but not durable: never counted as held, and everything is refused.
        assert_eq!(s.synced_seq(), 1);
        s.faults.sync.store(false, Ordering::Relaxed);
        let e = s.next_seq_for(1, 3).unwrap_err();
        assert!(matches!(e, StoreError::Failed { .. }), "{e}");
        assert!(matches!(
            s.append_batch(4, &[rec(4)]),
            Err(StoreError::Failed { .. })
        ));
        assert!(matches!(
            s.accept_stream(7, 1, 3),
            Err(StoreError::Failed { .. })
        ));
        assert!(s.failure().unwrap().contains("injected fsync failure"));
        // What was durable stays readable.
        let got: Vec<u64> = s.reader(0).unwrap().map(|r| r.unwrap().0).collect();
        assert_eq!(got[0], 1);
        // A restart rescans the log (here the records did reach the file).
        drop(s);
        let s = reopen(dir.path(), segment_log::DEFAULT_SEGMENT_BYTES);
        assert!(s.failure().is_none());
        assert_eq!(s.next_seq_for(1, 3).unwrap(), 4);
    }

    #[test]
    fn a_store_whose_log_has_unsynced_records_refuses_to_count_them() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), "t/s").unwrap();
        s.append_batch(1, &[rec(1)]).unwrap();
        // As if a write path had left records appended but not durable.
        s.lock().append(&rec(2)).unwrap();
        let e = s.next_seq_for(1, 2).unwrap_err();
        assert!(e.to_string().contains("never made durable"), "{e}");
        assert!(s.failure().is_some());
    }

    /// Opens the store `t/s` again after the test dropped it. Another test of this binary
    /// that starts a process (PostgreSQL, psql) forks: until the child's exec closes it,
    /// the child holds a copy of every descriptor, the lock file's among them, so the
    /// lock may still be held for a moment.
    fn reopen(dir: &Path, segment: u64) -> Arc<Store> {
        let t0 = std::time::Instant::now();
        loop {
            match Store::open_with(dir, "t/s", segment) {
                Err(StoreError::Log(LogError::Locked { .. }))
                    if t0.elapsed() < std::time::Duration::from_secs(10) =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                r => return r.unwrap(),
            }
        }
    }

    /// A real poisoned log: the next segment is /dev/full, so a write fails and cannot
    /// be rolled back.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_poisoned_log_stops_the_store() {
        if !Path::new("/dev/full").exists() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        // One record per segment.
        let s = Store::open_with(dir.path(), "t/s", 1).unwrap();
        s.append_batch(1, &[rec(1)]).unwrap();
        let next = s.dir().join(format!("{:020}.seg", 3));
        std::os::unix::fs::symlink("/dev/full", &next).unwrap();
        let e = s.append_batch(2, &[rec(2), rec(3)]).unwrap_err();
        assert!(matches!(e, StoreError::Failed { .. }), "{e}");
        assert!(s.lock().is_poisoned());
        // Record 2 was fsynced when its segment was sealed.
        assert_eq!(s.synced_seq(), 2);
        let e = s.next_seq_for(1, 3).unwrap_err();
        assert!(e.to_string().contains("restarted"), "{e}");
        drop(s);
        std::fs::remove_file(&next).unwrap();
        let s = reopen(dir.path(), 1);
        assert_eq!(s.next_seq_for(1, 3).unwrap(), 3);
        assert_eq!(s.append_batch(3, &[rec(3)]).unwrap(), 3);
    }

    #[test]
    fn a_store_takes_the_records_of_one_spool_only() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), "site-a/orders").unwrap();
        assert_eq!(s.spool_id(), None);
        assert_eq!(s.accept_stream(7, 1, 0).unwrap(), 1);
        assert_eq!(s.spool_id(), Some(7));
        s.append_batch(1, &[rec(1), rec(2)]).unwrap();
        let e = s.accept_stream(9, 1, 2).unwrap_err();
        assert!(matches!(e, StoreError::SpoolMismatch(_)), "{e}");
        let m = e.to_string();
        for needle in [
            "the store of site-a/orders holds records of spool 0000000000000007",
            "relay-inner's spool is 0000000000000009",
            "through tunnel site-a",
            &s.dir().display().to_string(),
            "cdc tail --dir",
        ] {
            assert!(m.contains(needle), "{m:?} lacks {needle:?}");
        }
        assert_eq!(s.accept_stream(7, 1, 2).unwrap(), 3);
        // The id survives a reopen.
        drop(s);
        let text = std::fs::read_to_string(dir.path().join("site-a/orders/SPOOL_ID")).unwrap();
        assert_eq!(text, "0000000000000007\n");
        let s = Store::open(dir.path(), "site-a/orders").unwrap();
        assert_eq!(s.spool_id(), Some(7));
        assert!(matches!(
            s.accept_stream(9, 1, 2),
            Err(StoreError::SpoolMismatch(_))
        ));
        assert_eq!(s.accept_stream(7, 2, 2).unwrap(), 3);
        // The gap and reset checks still apply to the right spool.
        assert!(matches!(s.accept_stream(7, 1, 1), Err(StoreError::Gap(_))));
        assert!(matches!(s.accept_stream(7, 9, 9), Err(StoreError::Gap(_))));
    }

    #[test]
    fn a_refused_first_stream_does_not_pick_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), "t/s").unwrap();
        s.append_batch(1, &[rec(1), rec(2)]).unwrap();
        // A store from before spool ids: the first stream that fits is remembered.
        assert!(matches!(s.accept_stream(5, 1, 1), Err(StoreError::Gap(_))));
        assert_eq!(s.spool_id(), None);
        assert_eq!(s.accept_stream(6, 1, 3).unwrap(), 3);
        assert_eq!(s.spool_id(), Some(6));
        std::fs::write(s.dir().join(SPOOL_ID_FILE), "zz\n").unwrap();
        drop(s);
        let e = Store::open(dir.path(), "t/s").unwrap_err();
        assert!(e.to_string().contains("SPOOL_ID"), "{e}");
    }

    #[test]
    fn what_async_code_reads_does_not_wait_for_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open_with(dir.path(), "t/s", 1).unwrap();
        s.append_batch(1, &[rec(1), rec(2), rec(3)]).unwrap();
        let bytes = s.size_bytes();
        assert_eq!(bytes, s.lock().size_bytes());
        assert!(bytes > 0);
        // A writer holds the log's lock (as across an fsync).
        let (locked_tx, locked_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let holder = {
            let s = s.clone();
            std::thread::spawn(move || {
                let _g = s.lock();
                locked_tx.send(()).unwrap();
                let _ = release_rx.recv();
            })
        };
        locked_rx.recv().unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        {
            let s = s.clone();
            std::thread::spawn(move || {
                let got = (
                    s.first_seq(),
                    s.synced_seq(),
                    s.size_bytes(),
                    s.spool_id(),
                    s.failure().is_none(),
                    s.reader(2).unwrap().next().unwrap().unwrap().0,
                );
                done_tx.send(got).unwrap();
            });
        }
        let got = done_rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("a read waited for the log's lock");
        assert_eq!(got, (1, 3, bytes, None, true, 2));
        release_tx.send(()).unwrap();
        holder.join().unwrap();
        // Retention moves the first seq and the size.
        let first = s
            .remove_before(
                3,
                std::time::SystemTime::now() + std::time::Duration::from_secs(60),
            )
            .unwrap();
        assert!(first > 1);
        assert_eq!(s.first_seq(), first);
        assert!(s.size_bytes() < bytes);
        assert_eq!(s.size_bytes(), s.lock().size_bytes());
        // Readers are bounded by what is held.
        assert!(matches!(
            s.reader(1),
            Err(StoreError::Log(LogError::Truncated { .. }))
        ));
        assert!(matches!(
            s.reader(5),
            Err(StoreError::Log(LogError::BeyondEnd { .. }))
        ));
        assert_eq!(s.reader(4).unwrap().count(), 0);
    }
}
