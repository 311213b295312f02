//! relay-outer's CDC store: one durable segment log per source (`<dir>/<tunnel>/<source>/`),
//! appended in the seq order relay-inner's spool assigned, deduplicated on resend, and
//! read by every sink and by `cdc tail` at their own positions.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use relay_proto::cdc::Record;
use relay_proto::segment_log::{self, LogOptions, Reader, SegmentLog};
use tokio::sync::watch;

/// Largest record the store accepts (the spool's bound).
pub const MAX_RECORD: usize = segment_log::DEFAULT_MAX_RECORD;

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

/// One source's log.
pub struct Store {
    /// `tunnel/source`.
    pub name: String,
    dir: PathBuf,
    log: Mutex<SegmentLog>,
    synced: watch::Sender<u64>,
    /// Position of each reader (sink) that holds records back from retention: the newest
    /// seq it has applied.
    readers: Mutex<HashMap<String, u64>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("name", &self.name).finish()
    }
}

impl Store {
    /// Opens (creating) the store of `name` (`tunnel/source`) under `root`.
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
        let log = SegmentLog::open(
            &dir,
            LogOptions {
                max_record: MAX_RECORD,
                segment_bytes,
            },
        )?;
        let (synced, _) = watch::channel(log.synced_seq());
        Ok(Arc::new(Store {
            name: name.to_string(),
            dir,
            log: Mutex::new(log),
            synced,
            readers: Mutex::new(HashMap::new()),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SegmentLog> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Seq of the oldest record held.
    pub fn first_seq(&self) -> u64 {
        self.lock().first_seq()
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

    /// The seq relay-inner should send next, given the range its spool holds; an error
    /// when the two cannot continue each other without a hole.
    pub fn next_seq_for(&self, first_seq: u64, last_seq: u64) -> Result<u64, StoreError> {
        let mut log = self.lock();
        let have = log.last_seq();
        if have == 0 && log.first_seq() == 1 && first_seq > 1 {
            // A new store joining a source whose older records were removed: start there.
            log.start_at(first_seq)?;
            return Ok(first_seq);
        }
        let next = have + 1;
        if next < first_seq {
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

    /// [`Store::append_batch`], also saying how many records were new. Every new record
    /// is checked before the first is written, so a batch with a bad record stores
    /// nothing.
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
            if let Err(e) = Record::decode(payload) {
                return Err(StoreError::BadRecord {
                    seq,
                    reason: e.to_string(),
                });
            }
        }
        for payload in fresh {
            log.append(payload)?;
        }
        log.sync()?;
        let synced = log.synced_seq();
        drop(log);
        self.synced.send_replace(synced);
        Ok(Appended {
            synced,
            new: fresh.len(),
        })
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

    /// Reads records from `seq` on (0: the oldest). The reader may run ahead of
    /// [`Store::synced_seq`]; stop there.
    #[allow(dead_code)] // the sinks and tests use it
    pub fn reader(&self, seq: u64) -> Result<Reader, StoreError> {
        Ok(self.lock().read_from(seq)?)
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
            log.truncate_front(limit)?;
        }
        Ok(log.first_seq())
    }

    /// Bytes on disk.
    pub fn size_bytes(&self) -> u64 {
        self.lock().size_bytes()
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

    #[test]
    fn a_new_store_starts_where_the_spool_starts() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), "t/s").unwrap();
        assert_eq!(s.next_seq_for(40, 45).unwrap(), 40);
        assert_eq!(s.append_batch(40, &[rec(40)]).unwrap(), 40);
        drop(s);
        let s = Store::open(dir.path(), "t/s").unwrap();
        assert_eq!(s.synced_seq(), 40);
        assert_eq!(s.next_seq_for(40, 45).unwrap(), 41);
        assert!(matches!(s.next_seq_for(50, 55), Err(StoreError::Gap(_))));
    }
}
