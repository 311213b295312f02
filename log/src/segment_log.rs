//! A durable, append-only log of numbered records kept in segment files: the storage under
//! relay-inner's spool and relay-outer's store.
//!
//! The API is synchronous `std::fs`; callers run it on a blocking thread. One directory
//! holds one log; a `LOCK` file keeps a second process out.
//!
//! Segments are named by the sequence number of their first record, zero-padded to 20
//! digits (`00000000000000000001.seg`), so a reader finds the segment for any seq from the
//! file names alone. Records get consecutive sequence numbers starting at 1.
//!
//! Record format (all integers little-endian, 16-byte header):
//!
//! ```text
//! len: u32 | crc: u32 | seq: u64 | payload: [u8; len]
//! crc = crc32c(len bytes ++ seq bytes ++ payload)
//! ```
//!
//! The checksum covers the length and the sequence number as well as the payload, so a
//! torn, shifted or zero-filled record fails it. On open, the last (active) segment is
//! scanned. A damaged tail (short record, bad length, bad checksum, unexpected seq) with
//! nothing valid after it is cut back to the last good record and fsynced: those are
//! writes that never completed. Damage *followed by a valid record* is not a torn write
//! but corruption of durable data: open refuses with [`LogError::DamagedMidLog`] (file,
//! offset, the damaged and the next valid seq) and cuts nothing, since the records after
//! it may already have been acknowledged. [`open_setting_aside`] moves the damaged part
//! into a side file (relay-outer's store, which can fetch it again from relay-inner);
//! [`salvage`] keeps every valid record and puts a marker record in place of each
//! damaged one (the operator's way out when no copy exists).
//! Sealed segments are not scanned on open (they can be gigabytes); they were fdatasynced
//! before the next segment was created, so damage in one is real corruption, reported by
//! the reader (or [`SegmentLog::verify`]) with the file and offset, never skipped.
//!
//! With [`LogOptions::recycle_segments`], removed segments are kept (renamed
//! `<segment>.free`) and reused as new ones, as PostgreSQL recycles its WAL segments:
//! writing over a file's cached pages costs a fraction of writing new ones (no pages to
//! allocate, no blocks to allocate in the filesystem). A reused file holds the bytes of
//! its previous use after the last record written: records there carry seqs older than
//! the segment's first, so opening the log cuts them like a torn tail (they never count as
//! valid records after damage), a sealed segment is cut to its last record before the next
//! one is made, and readers made by [`SegmentLog::read_from`] read the active segment only
//! as far as the writer got. Readers from [`read_dir`], which know nothing of the writer,
//! must not follow a recycling log while it is written.

use std::collections::VecDeque;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Bytes in a record header: len (4) + crc (4) + seq (8).
pub const HEADER_BYTES: u64 = 16;
/// Default size at which the log rolls to a new segment: 64 MiB.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Default largest accepted payload: 256 MiB (one row of a change log can be that big).
pub const DEFAULT_MAX_RECORD: usize = 256 * 1024 * 1024;
/// File name suffix of a segment.
const SEGMENT_SUFFIX: &str = ".seg";
/// Digits in a segment's file name.
const NAME_DIGITS: usize = 20;
/// Name of the file locked while a log is open.
const LOCK_FILE: &str = "LOCK";

/// Result of segment log operations.
pub type Result<T> = std::result::Result<T, LogError>;

/// What can go wrong with a segment log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// An I/O call on a file or directory failed.
    #[error("segment log I/O on {path}: {source}")]
    Io {
        /// File or directory the call was on.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A record in a sealed segment (or in the middle of the log) is damaged.
    #[error("corrupt record in {path} at offset {offset}: {damage}")]
    Corrupt {
        /// Segment file holding the record.
        path: PathBuf,
        /// Byte offset of the record in that file.
        offset: u64,
        /// What is wrong with it.
        damage: Damage,
    },
    /// A damaged record in the last segment with valid records after it: not a write
    /// that never completed (a torn tail has nothing valid after it) but corruption of
    /// data that was durable. Opening refuses to cut it; see [`open_setting_aside`] and
    /// [`salvage`] for the ways out.
    #[error(
        "corrupt record in {path} at offset {offset} ({damage}): seq {damaged_seq} is unreadable \
         but valid records follow (seq {valid_seq} at offset {valid_offset}), so this is not a \
         torn tail and nothing is cut"
    )]
    DamagedMidLog {
        /// Segment file holding the damage.
        path: PathBuf,
        /// Byte offset of the first damaged record.
        offset: u64,
        /// What is wrong with it.
        damage: Damage,
        /// Seq the damaged record should carry.
        damaged_seq: u64,
        /// Offset of the first valid record after the damage.
        valid_offset: u64,
        /// Its seq.
        valid_seq: u64,
    },
    /// A payload is larger than `max_record`.
    #[error("record of {len} bytes exceeds max_record {max}")]
    TooLarge {
        /// Payload size.
        len: usize,
        /// The configured limit.
        max: usize,
    },
    /// The requested seq was already removed by `truncate_front`.
    #[error("seq {requested} was already removed; the log starts at {first}")]
    Truncated {
        /// The seq asked for.
        requested: u64,
        /// The first seq still in the log.
        first: u64,
    },
    /// The requested seq is past the end of the log.
    #[error("seq {requested} is beyond the end of the log (last seq {last})")]
    BeyondEnd {
        /// The seq asked for.
        requested: u64,
        /// The last seq in the log.
        last: u64,
    },
    /// A `.seg` file whose name is not a 20-digit sequence number.
    #[error("unexpected segment file name {path}")]
    BadName {
        /// The offending file.
        path: PathBuf,
    },
    /// Another process holds the log directory.
    #[error("segment log {path} is locked by another process")]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// Options that cannot work.
    #[error("invalid segment log options: {0}")]
    InvalidOptions(&'static str),
    /// An earlier write failed and could not be rolled back; the log must be reopened.
    #[error("segment log {path} is unusable after a failed write; reopen it")]
    Poisoned {
        /// The active segment.
        path: PathBuf,
    },
}

/// What is wrong with a damaged record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Damage {
    /// The file ends inside the record.
    Short,
    /// The length field is larger than any record can be.
    BadLength(u32),
    /// The checksum does not match.
    BadChecksum,
    /// The record (or the next segment) does not carry the expected seq.
    SeqMismatch {
        /// The seq that should come next.
        expected: u64,
        /// The seq found.
        found: u64,
    },
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Damage::Short => write!(f, "file ends inside the record"),
            Damage::BadLength(len) => write!(f, "implausible length {len}"),
            Damage::BadChecksum => write!(f, "checksum mismatch"),
            Damage::SeqMismatch { expected, found } => {
                write!(f, "expected seq {expected}, found {found}")
            }
        }
    }
}

/// Tuning for a segment log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogOptions {
    /// Size at which the log rolls to a new segment.
    pub segment_bytes: u64,
    /// Largest accepted payload.
    pub max_record: usize,
    /// How many removed segments to keep for reuse as new segments (0: remove them).
    /// Only segments at least half of `segment_bytes` are kept, only while the
    /// filesystem has room for four more segments; kept files are removed when a write
    /// finds the filesystem full, and when the log is opened.
    pub recycle_segments: usize,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            max_record: DEFAULT_MAX_RECORD,
            recycle_segments: 0,
        }
    }
}

/// One segment file, for retention decisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    /// Seq of the segment's first record (also its file name).
    pub first_seq: u64,
    /// The segment file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// Its last modification time.
    pub modified: SystemTime,
}

/// A segment the log knows about.
#[derive(Debug, Clone)]
struct Segment {
    first_seq: u64,
    path: PathBuf,
    bytes: u64,
}

/// Where the writer got: the active segment's first seq and the bytes of whole records
/// written in it. Shared with the readers [`SegmentLog::read_from`] makes, which read the
/// active segment no further (a reused segment holds older bytes after that point).
type WriteEnd = std::sync::Arc<std::sync::Mutex<(u64, u64)>>;

/// Suffix added to a removed segment's name while it waits to be reused.
const FREE_SUFFIX: &str = ".free";

/// An open, writable segment log.
#[derive(Debug)]
pub struct SegmentLog {
    dir: PathBuf,
    opts: LogOptions,
    sealed: VecDeque<Segment>,
    active: Segment,
    file: File,
    /// Removed segments kept for reuse (`<segment>.free`), see [`LogOptions::recycle_segments`].
    free: Vec<PathBuf>,
    end: WriteEnd,
    last_seq: u64,
    synced_seq: u64,
    poisoned: bool,
    _lock: File,
}

impl SegmentLog {
    /// Opens (creating if needed) the log in `dir`, cutting a torn tail off the last segment.
    pub fn open(dir: impl AsRef<Path>, opts: LogOptions) -> Result<SegmentLog> {
        let dir = dir.as_ref().to_path_buf();
        if opts.segment_bytes == 0 {
            return Err(LogError::InvalidOptions("segment_bytes must be positive"));
        }
        if opts.max_record > u32::MAX as usize {
            return Err(LogError::InvalidOptions("max_record must fit in 32 bits"));
        }
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let lock = lock_dir(&dir)?;
        // Files kept for reuse by an earlier run are not reused: what they hold is not
        // known to be older than every record this run writes.
        remove_free_files(&dir)?;
        let mut segments: VecDeque<Segment> = list_segments(&dir)?
            .into_iter()
            .map(|(first_seq, path)| {
                let bytes = fs::metadata(&path).map_err(io_err(&path))?.len();
                Ok(Segment {
                    first_seq,
                    path,
                    bytes,
                })
            })
            .collect::<Result<_>>()?;
        let (active, last_seq) = match segments.pop_back() {
            None => {
                let path = segment_path(&dir, 1);
                create_segment(&path)?;
                sync_dir(&dir)?;
                let seg = Segment {
                    first_seq: 1,
                    path,
                    bytes: 0,
                };
                (seg, 0)
            }
            Some(mut seg) => {
                let (bytes, count) = recover(&seg)?;
                seg.bytes = bytes;
                let last = seg.first_seq + count - 1;
                (seg, last)
            }
        };
        let mut file = OpenOptions::new()
            .write(true)
            .open(&active.path)
            .map_err(io_err(&active.path))?;
        file.seek(SeekFrom::Start(active.bytes))
            .map_err(io_err(&active.path))?;
        tracing::debug!(dir = %dir.display(), segments = segments.len() + 1, last_seq, "segment log opened");
        let end = std::sync::Arc::new(std::sync::Mutex::new((active.first_seq, active.bytes)));
        Ok(SegmentLog {
            dir,
            opts,
            sealed: segments,
            active,
            file,
            free: Vec::new(),
            end,
            last_seq,
            // `recover` fsynced the active segment and sealed ones were synced when sealed.
            synced_seq: last_seq,
            poisoned: false,
            _lock: lock,
        })
    }

    /// Appends a record and returns its seq; durable only after [`SegmentLog::sync`].
    pub fn append(&mut self, payload: &[u8]) -> Result<u64> {
        if self.poisoned {
            return Err(LogError::Poisoned {
                path: self.active.path.clone(),
            });
        }
        if payload.len() > self.opts.max_record {
            return Err(LogError::TooLarge {
                len: payload.len(),
                max: self.opts.max_record,
            });
        }
        let record_bytes = HEADER_BYTES + payload.len() as u64;
        if self.active.bytes > 0 && self.active.bytes + record_bytes > self.opts.segment_bytes {
            self.roll()?;
        }
        let seq = self.last_seq + 1;
        let record = encode(seq, payload);
        if let Err(e) = self.file.write_all(&record) {
            // Undo a partial write so the next record does not follow garbage.
            let undone = self.file.set_len(self.active.bytes).is_ok()
                && self.file.seek(SeekFrom::Start(self.active.bytes)).is_ok();
            self.poisoned = !undone;
            if crate::disk::is_no_space(&e) {
                // Files kept for reuse take space the log needs now.
                self.remove_free();
            }
            return Err(LogError::Io {
                path: self.active.path.clone(),
                source: e,
            });
        }
        self.active.bytes += record_bytes;
        self.last_seq = seq;
        self.publish_end();
        Ok(seq)
    }

    /// Tells the readers how far the active segment holds records.
    fn publish_end(&self) {
        *self.end.lock().unwrap_or_else(|p| p.into_inner()) =
            (self.active.first_seq, self.active.bytes);
    }

    /// Removes the files kept for reuse (best effort: they are removed on open anyway).
    fn remove_free(&mut self) {
        for path in self.free.drain(..) {
            let _ = fs::remove_file(&path);
        }
    }

    /// Makes every appended record durable (fdatasync of the active segment).
    pub fn sync(&mut self) -> Result<()> {
        if self.poisoned {
            return Err(LogError::Poisoned {
                path: self.active.path.clone(),
            });
        }
        if self.synced_seq == self.last_seq {
            return Ok(());
        }
        if let Err(e) = self.file.sync_data() {
            // After a failed fsync the kernel may have dropped the dirty pages and a retry
            // can report success for data that is gone: stop here, a reopen rescans.
            self.poisoned = true;
            return Err(LogError::Io {
                path: self.active.path.clone(),
                source: e,
            });
        }
        self.synced_seq = self.last_seq;
        Ok(())
    }

    /// Seq of the first record still in the log (`last_seq() + 1` when it holds none).
    pub fn first_seq(&self) -> u64 {
        self.sealed
            .front()
            .map_or(self.active.first_seq, |s| s.first_seq)
    }

    /// Seq of the last appended record, 0 when nothing was ever appended.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Seq of the last record known to be on stable storage.
    pub fn synced_seq(&self) -> u64 {
        self.synced_seq
    }

    /// Bytes in the active (newest, unsealed) segment.
    pub fn active_bytes(&self) -> u64 {
        self.active.bytes
    }

    /// Whether an I/O error made the log refuse further writes (reopen it).
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Sum of the segment files' sizes in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.sealed.iter().map(|s| s.bytes).sum::<u64>() + self.active.bytes
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads records from `seq` onward (seq 0 means the first record); see [`Reader`].
    pub fn read_from(&self, seq: u64) -> Result<Reader> {
        let first = self.first_seq();
        let seq = if seq == 0 { first.max(1) } else { seq };
        if seq < first {
            return Err(LogError::Truncated {
                requested: seq,
                first,
            });
        }
        if seq > self.last_seq + 1 {
            return Err(LogError::BeyondEnd {
                requested: seq,
                last: self.last_seq,
            });
        }
        let seg = self
            .sealed
            .iter()
            .rev()
            .find(|s| s.first_seq <= seq)
            .filter(|_| seq < self.active.first_seq)
            .unwrap_or(&self.active);
        let mut reader = Reader::new(&self.dir, seg, seq, self.opts.max_record)?;
        reader.end = Some(self.end.clone());
        reader.recycling = self.opts.recycle_segments > 0;
        Ok(reader)
    }

    /// Reads the whole log, failing on the first damaged record.
    pub fn verify(&self) -> Result<()> {
        for record in self.read_from(self.first_seq())? {
            record?;
        }
        Ok(())
    }

    /// Whether [`SegmentLog::truncate_front`] with `upto_seq` would delete a segment.
    pub fn segments_removable(&self, upto_seq: u64) -> bool {
        self.sealed.front().is_some_and(|_| {
            let next_first = self
                .sealed
                .get(1)
                .map_or(self.active.first_seq, |s| s.first_seq);
            next_first - 1 <= upto_seq
        })
    }

    /// Deletes the sealed segments whose every record is `<= upto_seq`.
    pub fn truncate_front(&mut self, upto_seq: u64) -> Result<()> {
        let mut removed = 0;
        while let Some(oldest) = self.sealed.front() {
            let next_first = self
                .sealed
                .get(1)
                .map_or(self.active.first_seq, |s| s.first_seq);
            if next_first - 1 > upto_seq {
                break;
            }
            let keep = self.free.len() < self.opts.recycle_segments
                && oldest.bytes >= self.opts.segment_bytes / 2
                && has_room(&self.dir, 4 * self.opts.segment_bytes);
            let done = if keep {
                let free = free_path(&oldest.path);
                fs::rename(&oldest.path, &free).map(|()| Some(free))
            } else {
                fs::remove_file(&oldest.path).map(|()| None)
            };
            match done {
                Ok(Some(free)) => self.free.push(free),
                Ok(None) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(LogError::Io {
                        path: oldest.path.clone(),
                        source: e,
                    })
                }
            }
            self.sealed.pop_front();
            removed += 1;
        }
        if removed > 0 {
            sync_dir(&self.dir)?;
            tracing::debug!(dir = %self.dir.display(), removed, first_seq = self.first_seq(), "segments removed");
        }
        Ok(())
    }

    /// Makes an empty log number its next record `seq` (a store that receives a source's
    /// log from the middle, because the older part was acknowledged and removed before
    /// this store existed). Only allowed while the log holds no record.
    pub fn start_at(&mut self, seq: u64) -> Result<()> {
        if seq == 0 {
            return Err(LogError::InvalidOptions("a log cannot start at seq 0"));
        }
        if seq == self.last_seq + 1 {
            return Ok(());
        }
        if !self.sealed.is_empty() || self.active.bytes > 0 {
            return Err(LogError::InvalidOptions(
                "start_at needs an empty log; this one holds records",
            ));
        }
        // Remove the empty segment first: a crash in between leaves an empty directory,
        // which opens as a new log, never two segments that do not follow each other.
        fs::remove_file(&self.active.path).map_err(io_err(&self.active.path))?;
        sync_dir(&self.dir)?;
        let path = segment_path(&self.dir, seq);
        let file = create_segment(&path)?;
        sync_dir(&self.dir)?;
        self.active = Segment {
            first_seq: seq,
            path,
            bytes: 0,
        };
        self.file = file;
        self.last_seq = seq - 1;
        self.synced_seq = seq - 1;
        self.publish_end();
        Ok(())
    }

    /// Every segment, oldest first, with size and modification time.
    pub fn segments(&self) -> Result<Vec<SegmentInfo>> {
        self.sealed
            .iter()
            .chain(std::iter::once(&self.active))
            .map(|s| {
                let meta = fs::metadata(&s.path).map_err(io_err(&s.path))?;
                Ok(SegmentInfo {
                    first_seq: s.first_seq,
                    path: s.path.clone(),
                    bytes: s.bytes,
                    modified: meta.modified().map_err(io_err(&s.path))?,
                })
            })
            .collect()
    }

    /// Seals the active segment if it holds records, so that once they are consumed
    /// [`SegmentLog::truncate_front`] can remove them (a full disk frees space only that
    /// way). Fails like an append would (a full disk may refuse the new segment too).
    pub fn seal(&mut self) -> Result<()> {
        if self.poisoned {
            return Err(LogError::Poisoned {
                path: self.active.path.clone(),
            });
        }
        if self.active.bytes == 0 {
            return Ok(());
        }
        self.roll()
    }

    /// Seals the active segment (fdatasync) and starts the next one (fsync of the directory).
    fn roll(&mut self) -> Result<()> {
        // A failed fdatasync leaves the log in a state a retry cannot trust (see `sync`):
        // poison it, a reopen rescans.
        self.poisoned = true;
        let len = self
            .file
            .metadata()
            .map_err(io_err(&self.active.path))?
            .len();
        if len > self.active.bytes {
            // A reused file, its previous use's bytes after the last record: a sealed
            // segment ends at its last record (readers take its end for final, and it is
            // not scanned on open).
            self.file
                .set_len(self.active.bytes)
                .map_err(io_err(&self.active.path))?;
        }
        self.file.sync_data().map_err(io_err(&self.active.path))?;
        self.synced_seq = self.last_seq;
        let first_seq = self.last_seq + 1;
        let path = segment_path(&self.dir, first_seq);
        // The new segment cannot be made (a full disk, say): remove what was made of it,
        // so a later open does not take an empty file for the active segment while the
        // records go on in this one, and let the caller retry.
        let made = self
            .reuse_or_create(&path)
            .and_then(|made| sync_dir(&self.dir).map(|()| made));
        let file = match made {
            Ok(made) => made,
            Err(e) => {
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(r) if r.kind() == io::ErrorKind::NotFound => {}
                    Err(_) => return Err(e),
                }
                self.poisoned = false;
                return Err(e);
            }
        };
        self.poisoned = false;
        let sealed = std::mem::replace(
            &mut self.active,
            Segment {
                first_seq,
                path,
                bytes: 0,
            },
        );
        self.sealed.push_back(sealed);
        self.file = file;
        self.publish_end();
        Ok(())
    }

    /// The file for a new segment at `path`: a removed one kept for reuse (renamed, its
    /// bytes left as they are: the records written over them are told apart by their
    /// seqs) or a new empty one.
    fn reuse_or_create(&mut self, path: &Path) -> Result<File> {
        while let Some(free) = self.free.pop() {
            let reused =
                fs::rename(&free, path).and_then(|()| OpenOptions::new().write(true).open(path));
            match reused {
                Ok(file) => return Ok(file),
                Err(e) => {
                    tracing::debug!(file = %free.display(), error = %e, "a segment kept for reuse cannot be reused; removed");
                    let _ = fs::remove_file(&free);
                    let _ = fs::remove_file(path);
                }
            }
        }
        create_segment(path)
    }
}

/// Reads the log in `dir` from `seq` (0: the first record) without opening it for
/// writing: no lock is taken, so this works while another process appends (`cdc tail`).
/// A torn tail is simply the current end.
pub fn read_dir(dir: impl AsRef<Path>, seq: u64, max_record: usize) -> Result<Reader> {
    let dir = dir.as_ref();
    let segments = list_segments(dir)?;
    let Some((first, _)) = segments.first() else {
        return Err(LogError::Truncated {
            requested: seq,
            first: 1,
        });
    };
    let seq = if seq == 0 { *first } else { seq };
    if seq < *first {
        return Err(LogError::Truncated {
            requested: seq,
            first: *first,
        });
    }
    let (first_seq, path) = segments
        .iter()
        .rev()
        .find(|(f, _)| *f <= seq)
        .cloned()
        .unwrap_or_else(|| segments[0].clone());
    let seg = Segment {
        first_seq,
        path,
        bytes: 0,
    };
    Reader::new(dir, &seg, seq, max_record)
}

/// Iterator over `(seq, payload)` from a starting seq; independent of the [`SegmentLog`].
///
/// It sees records appended after it was created. At the current end of the log it
/// returns `None`; calling `next` again later continues with whatever was appended since.
/// After an error it stays finished.
#[derive(Debug)]
pub struct Reader {
    dir: PathBuf,
    max_record: usize,
    /// Bound on a record's length in the current segment: `max_record`, or the segment's
    /// size when opened if larger (records written under a higher `max_record`).
    max_len: usize,
    /// Records below this seq are read (and checked) but not yielded.
    from_seq: u64,
    /// Seq the next record in the file must carry.
    next_seq: u64,
    seg_first: u64,
    path: PathBuf,
    /// The open segment; closed whenever the reader reaches the current end, so a reader
    /// waiting for more never keeps a removed segment's space allocated.
    file: Option<BufReader<Bounded>>,
    /// Offset of the next record in the current segment.
    offset: u64,
    /// Set when a later segment exists, so the current one is sealed and its end final.
    next_segment: Option<u64>,
    failed: bool,
    /// Drop the pages read from the cache ([`Reader::drop_behind`]), and the offset in the
    /// current segment below which they were.
    drop_behind: bool,
    dropped_to: u64,
    /// The writer's end, for a reader made by [`SegmentLog::read_from`]: the active
    /// segment is read no further.
    end: Option<WriteEnd>,
    /// The log reuses removed segments: [`Reader::drop_behind`] leaves their pages cached.
    recycling: bool,
}

/// A reader that drops what it read from the cache does so in steps of this many bytes.
const DROP_BEHIND_STEP: u64 = 8 << 20;

impl Reader {
    fn new(dir: &Path, seg: &Segment, from_seq: u64, max_record: usize) -> Result<Reader> {
        let (file, max_len) = open_for_read(&seg.path, max_record)?;
        Ok(Reader {
            dir: dir.to_path_buf(),
            max_record,
            max_len,
            from_seq,
            next_seq: seg.first_seq,
            seg_first: seg.first_seq,
            path: seg.path.clone(),
            file: Some(BufReader::new(Bounded::new(file))),
            offset: 0,
            next_segment: None,
            failed: false,
            drop_behind: false,
            dropped_to: 0,
            end: None,
            recycling: false,
        })
    }

    /// How far the current segment may be read: to the writer's end in the active
    /// segment, nothing in a segment the writer has not yet announced (a reused file
    /// renamed into place), to its end in a sealed one. Without the writer's end, to the
    /// end of the file.
    fn limit(&self) -> u64 {
        let Some(end) = &self.end else {
            return u64::MAX;
        };
        let (first, bytes) = *end.lock().unwrap_or_else(|p| p.into_inner());
        match first.cmp(&self.seg_first) {
            std::cmp::Ordering::Equal => bytes,
            std::cmp::Ordering::Less => 0,
            std::cmp::Ordering::Greater => u64::MAX,
        }
    }

    /// Drops the pages of what was read from the page cache, in steps of 8 MiB: for the
    /// reader that follows a log's end right behind its writer (a sink reading the
    /// store), so the gigabytes of a first copy do not stay in the cache after use and
    /// push out the database's pages. Another reader further behind reads
    /// those records from the disk. Does nothing on a log that reuses removed segments
    /// ([`LogOptions::recycle_segments`]): a reused segment is written into those pages.
    pub fn drop_behind(&mut self) {
        if self.recycling {
            return;
        }
        self.drop_behind = true;
        self.dropped_to = self.offset;
    }

    /// Drops what was read of the current segment since the last drop. With the file
    /// closed (released at the end) the range waits for the next drop.
    fn drop_read(&mut self) {
        if let Some(f) = &self.file {
            drop_cached(&f.get_ref().file, self.dropped_to, self.offset);
            self.dropped_to = self.offset;
        }
    }

    fn corrupt(&self, damage: Damage) -> LogError {
        LogError::Corrupt {
            path: self.path.clone(),
            offset: self.offset,
            damage,
        }
    }

    /// Closes the open segment file; the next read opens it again where this one
    /// stopped. A reader that has caught up calls this before it waits, so it never keeps
    /// a removed segment's space allocated (it closes by itself at the log's end).
    pub fn release(&mut self) {
        self.file = None;
    }

    /// The open segment, opened again at the next record's offset if it was closed at
    /// the end. `None` when the segment is gone (removed once every record in it was
    /// consumed): the caller moves on to the next one.
    fn file(&mut self) -> Result<Option<&mut BufReader<Bounded>>> {
        if self.file.is_none() {
            let (file, max_len) = match open_for_read(&self.path, self.max_record) {
                Ok(f) => f,
                Err(LogError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                    return Ok(None)
                }
                Err(e) => return Err(e),
            };
            let mut file = Bounded::new(file);
            file.seek(SeekFrom::Start(self.offset))
                .map_err(io_err(&self.path))?;
            self.file = Some(BufReader::new(file));
            self.max_len = max_len;
        }
        Ok(self.file.as_mut())
    }

    /// Reads the next record, `None` at the current end of the log.
    fn step(&mut self) -> Result<Option<(u64, Vec<u8>)>> {
        let r = self.step_open();
        if matches!(r, Ok(None)) {
            self.file = None;
        }
        r
    }

    fn step_open(&mut self) -> Result<Option<(u64, Vec<u8>)>> {
        loop {
            let max_len = self.max_len;
            let next_seq = self.next_seq;
            let limit = self.limit();
            let outcome = match self.file()? {
                Some(file) => {
                    // What the buffer holds was read below an earlier limit: written.
                    file.get_mut().limit = limit;
                    read_record(file, max_len, next_seq).map_err(io_err(&self.path))?
                }
                None => {
                    // Removed while closed: everything in it was read; go on if the next
                    // segment continues here.
                    match next_segment_after(&self.dir, self.seg_first)? {
                        Some(next) if next == self.next_seq => {
                            self.switch_to(next)?;
                            continue;
                        }
                        Some(next) => {
                            return Err(LogError::Truncated {
                                requested: self.next_seq,
                                first: next,
                            })
                        }
                        None => {
                            return Err(LogError::Io {
                                path: self.path.clone(),
                                source: io::Error::new(
                                    io::ErrorKind::NotFound,
                                    "segment removed and no segment follows it",
                                ),
                            })
                        }
                    }
                }
            };
            match outcome {
                Read1::Record(seq, payload) => {
                    self.offset += HEADER_BYTES + payload.len() as u64;
                    self.next_seq += 1;
                    self.next_segment = None;
                    if self.drop_behind && self.offset - self.dropped_to >= DROP_BEHIND_STEP {
                        self.drop_read();
                    }
                    if seq >= self.from_seq {
                        return Ok(Some((seq, payload)));
                    }
                }
                Read1::Damaged(damage) if damage != Damage::Short => {
                    return Err(self.corrupt(damage));
                }
                outcome @ (Read1::Damaged(_) | Read1::End) => {
                    let short = !matches!(outcome, Read1::End);
                    self.rewind()?;
                    if let Some(next) = self.next_segment {
                        // Sealed and re-read after seeing the next segment: this end is final.
                        if short {
                            return Err(self.corrupt(Damage::Short));
                        }
                        self.switch_to(next)?;
                        continue;
                    }
                    match next_segment_after(&self.dir, self.seg_first)? {
                        // The writer is still on this segment (possibly mid-write).
                        None => return Ok(None),
                        // Read again: records may have landed before the roll.
                        Some(next) => self.next_segment = Some(next),
                    }
                }
            }
        }
    }

    /// Seeks back to the start of the next unread record, dropping buffered partial bytes.
    fn rewind(&mut self) -> Result<()> {
        if let Some(file) = self.file.as_mut() {
            file.seek(SeekFrom::Start(self.offset))
                .map_err(io_err(&self.path))?;
        }
        Ok(())
    }

    fn switch_to(&mut self, first_seq: u64) -> Result<()> {
        let path = segment_path(&self.dir, first_seq);
        if first_seq != self.next_seq {
            return Err(LogError::Corrupt {
                path,
                offset: 0,
                damage: Damage::SeqMismatch {
                    expected: self.next_seq,
                    found: first_seq,
                },
            });
        }
        let (file, max_len) = open_for_read(&path, self.max_record)?;
        if self.drop_behind {
            self.drop_read();
        }
        self.file = Some(BufReader::new(Bounded::new(file)));
        self.max_len = max_len;
        self.path = path;
        self.seg_first = first_seq;
        self.offset = 0;
        self.dropped_to = 0;
        self.next_segment = None;
        Ok(())
    }
}

/// A segment file read no further than `limit` (a file offset), which the reader moves
/// as the writer goes on.
#[derive(Debug)]
struct Bounded {
    file: File,
    /// Offset of the next byte `read` returns.
    pos: u64,
    limit: u64,
}

impl Bounded {
    fn new(file: File) -> Bounded {
        Bounded {
            file,
            pos: 0,
            limit: u64::MAX,
        }
    }
}

impl Read for Bounded {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let room = self.limit.saturating_sub(self.pos);
        let take = usize::try_from(room).unwrap_or(usize::MAX).min(buf.len());
        if take == 0 {
            return Ok(0);
        }
        let n = self.file.read(&mut buf[..take])?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Bounded {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = self.file.seek(to)?;
        Ok(self.pos)
    }
}

/// Asks the kernel to drop `file`'s cached pages in `from..to` (read, so written and
/// synced: clean). Only advice: an error changes nothing that matters.
#[allow(unsafe_code)]
fn drop_cached(file: &File, from: u64, to: u64) {
    use std::os::fd::AsRawFd;
    if to <= from {
        return;
    }
    let (Ok(off), Ok(len)) = (
        libc::off_t::try_from(from),
        libc::off_t::try_from(to - from),
    ) else {
        return;
    };
    // SAFETY: a plain system call on a descriptor `file` owns; it reads no memory of ours.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), off, len, libc::POSIX_FADV_DONTNEED);
    }
}

impl Iterator for Reader {
    type Item = Result<(u64, Vec<u8>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.step() {
            Ok(record) => record.map(Ok),
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// Opens a segment for reading; returns it with the bound on its record lengths.
fn open_for_read(path: &Path, max_record: usize) -> Result<(File, usize)> {
    let file = File::open(path).map_err(io_err(path))?;
    let size = file.metadata().map_err(io_err(path))?.len();
    let max_len = usize::try_from(size).unwrap_or(usize::MAX).max(max_record);
    Ok((file, max_len))
}

/// Outcome of reading one record.
enum Read1 {
    Record(u64, Vec<u8>),
    /// Clean end of file at a record boundary.
    End,
    Damaged(Damage),
}

/// Reads one record that must carry seq `expected` and at most `max_len` payload bytes.
fn read_record(r: &mut impl Read, max_len: usize, expected: u64) -> io::Result<Read1> {
    let mut header = [0u8; HEADER_BYTES as usize];
    match read_full(r, &mut header)? {
        0 => return Ok(Read1::End),
        n if n < header.len() => return Ok(Read1::Damaged(Damage::Short)),
        _ => {}
    }
    let len_bytes: [u8; 4] = [header[0], header[1], header[2], header[3]];
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let mut seq_bytes = [0u8; 8];
    seq_bytes.copy_from_slice(&header[8..16]);
    let len = u32::from_le_bytes(len_bytes);
    if len as usize > max_len {
        return Ok(Read1::Damaged(Damage::BadLength(len)));
    }
    let mut payload = vec![0u8; len as usize];
    if read_full(r, &mut payload)? < payload.len() {
        return Ok(Read1::Damaged(Damage::Short));
    }
    if checksum(len_bytes, seq_bytes, &payload) != crc {
        return Ok(Read1::Damaged(Damage::BadChecksum));
    }
    let seq = u64::from_le_bytes(seq_bytes);
    if seq != expected {
        return Ok(Read1::Damaged(Damage::SeqMismatch {
            expected,
            found: seq,
        }));
    }
    Ok(Read1::Record(seq, payload))
}

/// Fills `buf` as far as the file goes; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn checksum(len_bytes: [u8; 4], seq_bytes: [u8; 8], payload: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&len_bytes);
    let crc = crc32c::crc32c_append(crc, &seq_bytes);
    crc32c::crc32c_append(crc, payload)
}

fn encode(seq: u64, payload: &[u8]) -> Vec<u8> {
    let len_bytes = (payload.len() as u32).to_le_bytes();
    let seq_bytes = seq.to_le_bytes();
    let mut record = Vec::with_capacity(HEADER_BYTES as usize + payload.len());
    record.extend_from_slice(&len_bytes);
    record.extend_from_slice(&checksum(len_bytes, seq_bytes, payload).to_le_bytes());
    record.extend_from_slice(&seq_bytes);
    record.extend_from_slice(payload);
    record
}

/// Scans the last segment, cuts a torn tail and fsyncs; returns (good bytes, records).
/// Damage with a valid record after it is corruption: [`LogError::DamagedMidLog`].
///
/// Lengths are bounded by the file size, not `max_record`, so lowering `max_record` never
/// cuts records written under a higher one.
fn recover(seg: &Segment) -> Result<(u64, u64)> {
    let path = &seg.path;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    let (offset, count, damage) = scan_segment(&file, seg)?;
    if let Some(damage) = damage {
        let expected = seg.first_seq + count;
        if let Some((valid_offset, valid_seq)) =
            find_valid_record(&file, offset, damage, expected).map_err(io_err(path))?
        {
            return Err(LogError::DamagedMidLog {
                path: path.clone(),
                offset,
                damage,
                damaged_seq: expected,
                valid_offset,
                valid_seq,
            });
        }
        tracing::warn!(
            path = %path.display(),
            offset,
            dropped_bytes = seg.bytes.saturating_sub(offset),
            %damage,
            "cutting torn tail of segment log (nothing valid after it)"
        );
        file.set_len(offset).map_err(io_err(path))?;
    }
    file.sync_all().map_err(io_err(path))?;
    Ok((offset, count))
}

/// Reads a segment's records from the start: (offset after the last good record, good
/// records, the damage that stopped the scan).
fn scan_segment(file: &File, seg: &Segment) -> Result<(u64, u64, Option<Damage>)> {
    let mut reader = BufReader::new(file);
    reader.seek(SeekFrom::Start(0)).map_err(io_err(&seg.path))?;
    let max_len = usize::try_from(seg.bytes).unwrap_or(usize::MAX);
    let (mut offset, mut count) = (0u64, 0u64);
    loop {
        match read_record(&mut reader, max_len, seg.first_seq + count).map_err(io_err(&seg.path))? {
            Read1::Record(_, payload) => {
                offset += HEADER_BYTES + payload.len() as u64;
                count += 1;
            }
            Read1::End => return Ok((offset, count, None)),
            Read1::Damaged(damage) => return Ok((offset, count, Some(damage))),
        }
    }
}

/// Looks for a valid record at or after the damage at `offset` (where seq `expected`
/// should have been): `(offset, seq)` of the first one, or `None` when the rest of the
/// file holds nothing valid (a torn tail).
///
/// A record found at `offset` itself (its checksum holds but its seq is not the one
/// expected) counts. Elsewhere every byte offset is tried; a candidate must carry a seq
/// from `expected` to what could fit in the rest of the file and a length that fits
/// before the checksum is computed, so random or zeroed bytes cost a few compares each.
fn find_valid_record(
    file: &File,
    offset: u64,
    damage: Damage,
    expected: u64,
) -> io::Result<Option<(u64, u64)>> {
    let mut rest = Vec::new();
    let mut f = file;
    f.seek(SeekFrom::Start(offset))?;
    f.read_to_end(&mut rest)?;
    Ok(find_valid_in(&rest, damage, expected).map(|(at, seq)| (offset + at as u64, seq)))
}

/// [`find_valid_record`] on the bytes from the damage to the end of the segment: the
/// position in `rest` and the seq of the first valid record.
fn find_valid_in(rest: &[u8], damage: Damage, expected: u64) -> Option<(usize, u64)> {
    // A valid record with a seq from before the one expected is not data after the
    // damage but what a reused segment held before (or a record written twice): it
    // counts only when it is ahead.
    if let Damage::SeqMismatch { found, .. } = damage {
        if found >= expected {
            return Some((0, found));
        }
    }
    let header = HEADER_BYTES as usize;
    let max_seq = expected.saturating_add(rest.len() as u64 / HEADER_BYTES);
    for i in 1..rest.len().saturating_sub(header - 1) {
        let h = &rest[i..i + header];
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let Some(end) = (len as usize).checked_add(i + header) else {
            continue;
        };
        if end > rest.len() {
            continue;
        }
        let mut seq_bytes = [0u8; 8];
        seq_bytes.copy_from_slice(&h[8..16]);
        let seq = u64::from_le_bytes(seq_bytes);
        if seq < expected || seq > max_seq {
            continue;
        }
        let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        if checksum([h[0], h[1], h[2], h[3]], seq_bytes, &rest[i + header..end]) == crc {
            return Some((i, seq));
        }
    }
    None
}

/// What [`open_setting_aside`] moved out of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetAside {
    /// The segment that held the damage.
    pub segment: PathBuf,
    /// The file now holding the bytes from the damage to the segment's end.
    pub file: PathBuf,
    /// Offset of the damage in the segment (where it now ends).
    pub offset: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// First seq that was unreadable (the log now ends just before it).
    pub damaged_seq: u64,
    /// First valid seq after the damage (in the side file).
    pub valid_seq: u64,
    /// What was wrong.
    pub damage: Damage,
}

/// Suffix of a side file made by [`open_setting_aside`].
pub const SET_ASIDE_SUFFIX: &str = ".damaged";

/// Opens the log in `dir`; when its last segment is damaged with valid records after the
/// damage ([`LogError::DamagedMidLog`]), first moves the bytes from the damage to the end
/// into a side file next to the segment (`<segment>.<offset>.damaged`, fsynced before the
/// segment is cut), so the log ends at the last good record and nothing is deleted. For a
/// log whose records can be fetched again from elsewhere (relay-outer's store).
pub fn open_setting_aside(
    dir: impl AsRef<Path>,
    opts: LogOptions,
) -> Result<(SegmentLog, Option<SetAside>)> {
    let dir = dir.as_ref();
    match SegmentLog::open(dir, opts) {
        Err(LogError::DamagedMidLog {
            path,
            offset,
            damage,
            damaged_seq,
            valid_seq,
            ..
        }) => {
            let (file, bytes) = set_aside_damage(&path, offset)?;
            let log = SegmentLog::open(dir, opts)?;
            Ok((
                log,
                Some(SetAside {
                    segment: path,
                    file,
                    offset,
                    bytes,
                    damaged_seq,
                    valid_seq,
                    damage,
                }),
            ))
        }
        other => other.map(|log| (log, None)),
    }
}

/// Moves the bytes of `segment` from `offset` on into `<segment>.<offset>.damaged`, then
/// cuts the segment there; returns the side file and the bytes moved. The side file is
/// durable before the cut.
fn set_aside_damage(segment: &Path, offset: u64) -> Result<(PathBuf, u64)> {
    let mut name = segment.as_os_str().to_owned();
    name.push(format!(".{offset}{SET_ASIDE_SUFFIX}"));
    let side = PathBuf::from(name);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(segment)
        .map_err(io_err(segment))?;
    let mut rest = Vec::new();
    (&file)
        .seek(SeekFrom::Start(offset))
        .and_then(|_| (&file).read_to_end(&mut rest))
        .map_err(io_err(segment))?;
    let mut out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&side)
        .map_err(io_err(&side))?;
    out.write_all(&rest)
        .and_then(|_| out.sync_all())
        .map_err(io_err(&side))?;
    let dir = segment.parent().unwrap_or(Path::new("."));
    sync_dir(dir)?;
    file.set_len(offset).map_err(io_err(segment))?;
    file.sync_all().map_err(io_err(segment))?;
    tracing::error!(segment = %segment.display(), offset, moved_bytes = rest.len(), side_file = %side.display(),
        "damaged records with valid ones after them: moved from the damage on into a side file");
    Ok((side, rest.len() as u64))
}

/// One run of unreadable seqs that [`salvage`] replaced by markers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    /// First seq replaced.
    pub first_seq: u64,
    /// Last seq replaced.
    pub last_seq: u64,
    /// Segment and offset of the damage.
    pub path: PathBuf,
    /// Offset of the damage in the segment.
    pub offset: u64,
    /// What was wrong.
    pub damage: Damage,
}

impl Lost {
    /// The run described as JSON for a marker record: which `log` ("spool" or "store")
    /// of which `source`, the file, offset and damage.
    pub fn detail(&self, log: &str, source: &str) -> serde_json::Value {
        serde_json::json!({
            "log": log,
            "source": source,
            "file": self.path.display().to_string(),
            "offset": self.offset,
            "damage": self.damage.to_string(),
        })
    }
}

impl fmt::Display for Lost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seqs {}..={} unreadable ({} at offset {} of {}): replaced by lost-record markers; \
             the original segment is kept as {}.salvaged",
            self.first_seq,
            self.last_seq,
            self.damage,
            self.offset,
            self.path.display(),
            self.path.display()
        )
    }
}

/// Repairs a corrupt log without losing a valid record: each damaged segment is
/// rewritten with every valid record kept and, in place of each unreadable seq, the
/// payload `marker(seq, &lost)`, so seqs stay consecutive and readers learn what is
/// missing. In a sealed segment the seqs up to the next segment's first are accounted for
/// the same way; a torn tail of the last segment is dropped as on open. Each original is
/// kept as `<segment>.salvaged`. The log must not be open (its lock is taken). Returns the
/// runs replaced (empty when nothing was damaged).
pub fn salvage(
    dir: impl AsRef<Path>,
    opts: LogOptions,
    marker: impl Fn(u64, &Lost) -> Vec<u8>,
) -> Result<Vec<Lost>> {
    let dir = dir.as_ref();
    let _lock = lock_dir(dir)?;
    let segments = list_segments(dir)?;
    let mut lost = Vec::new();
    for (i, (first_seq, path)) in segments.iter().enumerate() {
        let end_seq = segments.get(i + 1).map(|(next, _)| next - 1);
        lost.extend(salvage_segment(path, *first_seq, end_seq, opts, &marker)?);
    }
    if !lost.is_empty() {
        sync_dir(dir)?;
    }
    Ok(lost)
}

/// [`salvage`] of one segment holding `first_seq..=end_seq` (`None`: the last segment).
fn salvage_segment(
    path: &Path,
    first_seq: u64,
    end_seq: Option<u64>,
    opts: LogOptions,
    marker: &impl Fn(u64, &Lost) -> Vec<u8>,
) -> Result<Vec<Lost>> {
    let data = fs::read(path).map_err(io_err(path))?;
    let max_len = data.len().max(opts.max_record);
    let mut out = Vec::with_capacity(data.len());
    let mut lost = Vec::new();
    let mut add_run = |out: &mut Vec<u8>, run: Lost| {
        for s in run.first_seq..=run.last_seq {
            out.extend_from_slice(&encode(s, &marker(s, &run)));
        }
        tracing::error!(path = %path.display(), offset = run.offset, first_seq = run.first_seq,
            last_seq = run.last_seq, damage = %run.damage, "salvage: unreadable records replaced by markers");
        lost.push(run);
    };
    let (mut offset, mut seq) = (0usize, first_seq);
    // No record of this segment can be further ahead than one header per byte left.
    let max_seq = first_seq.saturating_add(data.len() as u64 / HEADER_BYTES);
    let mut tail_damage = None;
    // Damaged bytes skipped or valid records dropped (their seq was already taken, or
    // impossible here): the segment is rewritten even when no run was lost.
    let mut changed = false;
    loop {
        if end_seq.is_some_and(|end| seq > end) {
            // A sealed segment ends where the next one starts: anything further holds
            // seqs the next segment has (segments that overlap), and would make the
            // reader fail at the next segment's first record.
            changed |= offset < data.len();
            break;
        }
        let mut r = &data[offset..];
        let damage = match read_record(&mut r, max_len, seq).map_err(io_err(path))? {
            Read1::Record(_, payload) => {
                out.extend_from_slice(&encode(seq, &payload));
                offset += HEADER_BYTES as usize + payload.len();
                seq += 1;
                continue;
            }
            Read1::End => break,
            Read1::Damaged(damage) => damage,
        };
        let found = find_valid_in(&data[offset..], damage, seq)
            .map(|(at, valid_seq)| ((offset + at) as u64, valid_seq));
        let Some((valid_offset, valid_seq)) = found else {
            tail_damage = Some((offset, damage));
            break;
        };
        changed = true;
        if valid_seq < seq || valid_seq > max_seq {
            // A valid record with a seq already accounted for, or one no record of this
            // segment can have (markers up to it would never end): drop it.
            let mut r = &data[valid_offset as usize..];
            let len = match read_record(&mut r, max_len, valid_seq).map_err(io_err(path))? {
                Read1::Record(_, p) => p.len(),
                _ => 0,
            };
            offset = valid_offset as usize + HEADER_BYTES as usize + len;
            continue;
        }
        if valid_seq > seq {
            let run = Lost {
                first_seq: seq,
                last_seq: end_seq.map_or(valid_seq - 1, |end| end.min(valid_seq - 1)),
                path: path.to_path_buf(),
                offset: offset as u64,
                damage,
            };
            add_run(&mut out, run);
        }
        seq = valid_seq;
        offset = valid_offset as usize;
    }
    if let Some(end) = end_seq {
        // A sealed segment must reach the next one's first seq.
        if seq <= end {
            let (at, damage) = tail_damage.unwrap_or((offset, Damage::Short));
            let run = Lost {
                first_seq: seq,
                last_seq: end,
                path: path.to_path_buf(),
                offset: at as u64,
                damage,
            };
            add_run(&mut out, run);
        }
    }
    if lost.is_empty() && !changed {
        return Ok(lost);
    }
    let with_suffix = |suffix: &str| {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    };
    let (keep, tmp) = (with_suffix(".salvaged"), with_suffix(".tmp"));
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(&out)
        .and_then(|_| f.sync_all())
        .map_err(io_err(&tmp))?;
    fs::write(&keep, &data)
        .and_then(|_| File::open(&keep)?.sync_all())
        .map_err(io_err(&keep))?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    Ok(lost)
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!(
        "{first_seq:0width$}{SEGMENT_SUFFIX}",
        width = NAME_DIGITS
    ))
}

/// Parses a segment file name; `None` for files that are not segments.
fn parse_name(name: &str) -> Option<std::result::Result<u64, ()>> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != NAME_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Err(()));
    }
    Some(digits.parse().ok().filter(|&seq| seq > 0).ok_or(()))
}

/// The segments in `dir`, oldest first.
fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        match parse_name(name) {
            None => {}
            Some(Ok(seq)) => found.push((seq, entry.path())),
            Some(Err(())) => return Err(LogError::BadName { path: entry.path() }),
        }
    }
    found.sort_unstable_by_key(|(seq, _)| *seq);
    Ok(found)
}

fn next_segment_after(dir: &Path, first_seq: u64) -> Result<Option<u64>> {
    Ok(list_segments(dir)?
        .into_iter()
        .map(|(seq, _)| seq)
        .find(|&seq| seq > first_seq))
}

/// `<segment>.free`: the name of a removed segment kept for reuse.
fn free_path(segment: &Path) -> PathBuf {
    let mut name = segment.as_os_str().to_owned();
    name.push(FREE_SUFFIX);
    PathBuf::from(name)
}

/// Removes the segments an earlier run kept for reuse.
fn remove_free_files(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        let is_free = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(FREE_SUFFIX))
            .is_some_and(|n| n.ends_with(SEGMENT_SUFFIX));
        if is_free {
            fs::remove_file(&path).map_err(io_err(&path))?;
        }
    }
    Ok(())
}

/// Whether the filesystem holding `dir` has at least `bytes` available to this process
/// (false when that cannot be told).
#[allow(unsafe_code)]
fn has_room(dir: &Path, bytes: u64) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c_path` is a NUL-terminated string that outlives the call, and `stat` is
    // a plain struct the call fills in; it is read only when the call succeeded.
    let stat = unsafe {
        let mut stat: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c_path.as_ptr(), &mut stat) != 0 {
            return false;
        }
        stat
    };
    // Both fields are narrower than u64 on some 32-bit targets.
    #[allow(clippy::useless_conversion)]
    let available = u64::from(stat.f_bavail).saturating_mul(u64::from(stat.f_frsize));
    available >= bytes
}

fn create_segment(path: &Path) -> Result<File> {
    // A leftover from a roll that failed before the directory sync holds no records.
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io_err(path))
}

fn sync_dir(dir: &Path) -> Result<()> {
    crate::disk::sync_dir(dir).map_err(io_err(dir))
}

fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err(&path))?;
    // A lock can be held for a moment by no one who uses the log: a child process
    // forked by another thread inherits every descriptor, this one included, until it
    // runs exec (close-on-exec closes it only then), and a holder that just dropped its
    // log may still be closing. So a refusal is reported only after a short grace.
    let deadline = std::time::Instant::now() + LOCK_GRACE;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(fs::TryLockError::WouldBlock) => return Err(LogError::Locked { path }),
            Err(fs::TryLockError::Error(e)) => return Err(LogError::Io { path, source: e }),
        }
    }
}

/// How long [`lock_dir`] waits for a held lock before it reports [`LogError::Locked`].
const LOCK_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_log_can_start_at_a_later_seq() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = SegmentLog::open(dir.path(), LogOptions::default()).unwrap();
        log.start_at(41).unwrap();
        assert_eq!(log.append(b"a").unwrap(), 41);
        log.sync().unwrap();
        assert!(log.start_at(100).is_err());
        drop(log);
        let log = SegmentLog::open(dir.path(), LogOptions::default()).unwrap();
        assert_eq!((log.first_seq(), log.last_seq()), (41, 41));
        let got: Vec<_> = log.read_from(0).unwrap().map(|r| r.unwrap().0).collect();
        assert_eq!(got, vec![41]);
    }
    use proptest::prelude::*;

    fn opts(segment_bytes: u64) -> LogOptions {
        LogOptions {
            segment_bytes,
            max_record: 4096,
            recycle_segments: 0,
        }
    }

    fn payload(seq: u64, len: usize) -> Vec<u8> {
        (0..len).map(|i| (seq as usize * 31 + i) as u8).collect()
    }

    fn read_all(log: &SegmentLog, from: u64) -> Vec<(u64, Vec<u8>)> {
        log.read_from(from)
            .unwrap()
            .collect::<Result<Vec<_>>>()
            .unwrap()
    }

    fn recycling(segment_bytes: u64) -> LogOptions {
        LogOptions {
            recycle_segments: 2,
            ..opts(segment_bytes)
        }
    }

    fn free_files(dir: &Path) -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with(".seg.free"))
            .collect();
        found.sort();
        found
    }

    fn inode(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(path).unwrap().ino()
    }

    /// A writer on a log that reuses its removed segments, a reader right behind it and
    /// removal of what was read: records of changing sizes, so a reused segment's older
    /// records never line up with the new ones. The reader reads every record once, in
    /// order, never an older byte of a reused file; removed segments are written again.
    #[test]
    fn a_log_that_reuses_its_segments_reads_back_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = SegmentLog::open(dir.path(), recycling(2048)).unwrap();
        let mut reader = log.read_from(0).unwrap();
        let mut inodes = std::collections::HashSet::new();
        let (mut read, mut reused) = (0u64, 0);
        for seq in 1..=3000u64 {
            let len = (seq * 37 % 300) as usize;
            assert_eq!(log.append(&payload(seq, len)).unwrap(), seq);
            if seq % 7 == 0 {
                for rec in reader.by_ref() {
                    let (got, bytes) = rec.unwrap();
                    read += 1;
                    assert_eq!(got, read);
                    assert_eq!(bytes, payload(got, (got * 37 % 300) as usize));
                }
                assert_eq!(read, seq);
                log.truncate_front(read).unwrap();
                assert!(free_files(dir.path()).len() <= 2);
                let active = last_segment(&log);
                if !inodes.insert(inode(&active)) {
                    reused += 1;
                }
            }
        }
        assert!(reused > 100, "segments were written again: {reused}");
        // Sealed segments end at their last record; only the active one may hold more.
        for seg in &log.segments().unwrap()[..log.segments().unwrap().len() - 1] {
            assert_eq!(fs::metadata(&seg.path).unwrap().len(), seg.bytes);
        }
        drop(reader);
        drop(log);
        let log = SegmentLog::open(dir.path(), recycling(2048)).unwrap();
        assert_eq!(log.last_seq(), 3000);
        assert!(free_files(dir.path()).is_empty(), "kept files go on open");
    }

    /// A reused segment left active (the writer stopped: a crash) holds the older
    /// records after the new ones. Opening cuts them as a torn tail: they carry seqs
    /// from before the segment's first, so they are never taken for records written
    /// after damage, whether they line up with the new records or not.
    #[test]
    fn opening_cuts_what_a_reused_segment_held_before() {
        for (new_len, old_len) in [(100, 100), (100, 57), (10, 300)] {
            let dir = tempfile::tempdir().unwrap();
            // Four of the older records per segment.
            let opts = recycling(4 * (16 + old_len as u64));
            let mut log = SegmentLog::open(dir.path(), opts).unwrap();
            for seq in 1..=4 {
                log.append(&payload(seq, old_len)).unwrap();
            }
            log.seal().unwrap();
            log.append(&payload(5, old_len)).unwrap();
            log.truncate_front(4).unwrap();
            assert_eq!(free_files(dir.path()).len(), 1, "kept for reuse");
            // Fill the active segment; the next one is the reused file.
            let mut seq = 6;
            while log.segments().unwrap().len() < 2 {
                log.append(&payload(seq, old_len)).unwrap();
                seq += 1;
            }
            assert!(free_files(dir.path()).is_empty(), "reused");
            let reused = last_segment(&log);
            let before = fs::metadata(&reused).unwrap().len();
            log.append(&payload(seq, new_len)).unwrap();
            log.sync().unwrap();
            let last = seq;
            // The reused segment: the record that rolled into it, the new one, then what
            // the file held before.
            let written = (16 + old_len + 16 + new_len) as u64;
            assert!(before > written);
            assert_eq!(fs::metadata(&reused).unwrap().len(), before);
            drop(log);
            let log = SegmentLog::open(dir.path(), opts).unwrap();
            assert_eq!(log.last_seq(), last, "new {new_len} over old {old_len}");
            assert_eq!(fs::metadata(&reused).unwrap().len(), written);
            let all = read_all(&log, 0);
            assert_eq!(all.last().unwrap(), &(last, payload(last, new_len)));
        }
    }

    /// Seqs 1..=6 in segments of three, the first removed and kept for reuse; a reader
    /// from seq 4.
    fn first_segment_kept(dir: &Path) -> (SegmentLog, Reader) {
        let mut log = SegmentLog::open(dir, recycling(3 * 116)).unwrap();
        for seq in 1..=6 {
            log.append(&payload(seq, 100)).unwrap();
        }
        log.truncate_front(3).unwrap();
        assert_eq!(free_files(dir).len(), 1);
        let reader = log.read_from(4).unwrap();
        (log, reader)
    }

    /// A reader made before a reused segment is announced, and one in it, never read
    /// past the writer: the older records there are not reported as damage.
    #[test]
    fn a_reader_at_the_end_of_a_reused_segment_waits_for_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, mut reader) = first_segment_kept(dir.path());
        for want in 4..=6 {
            assert_eq!(reader.next().unwrap().unwrap().0, want);
        }
        // Seqs 7.. go into the reused file of seqs 1..=3, record for record.
        for seq in 7..=8 {
            log.append(&payload(seq, 100)).unwrap();
            assert_eq!(reader.next().unwrap().unwrap(), (seq, payload(seq, 100)));
            assert!(reader.next().is_none(), "nothing more after seq {seq}");
        }
        log.append(&payload(9, 100)).unwrap();
        assert_eq!(reader.next().unwrap().unwrap().0, 9);
        assert!(reader.next().is_none());
    }

    /// A reader that finds the next segment between the moment its reused file is
    /// renamed into place and the moment the writer announces it (a roll halfway) reads
    /// nothing of it yet: all it holds is older records.
    #[test]
    fn a_reader_reads_nothing_of_a_reused_segment_not_yet_announced() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, mut reader) = first_segment_kept(dir.path());
        assert_eq!(reader.by_ref().count(), 3);
        // The roll to seq 7, stopped after the rename.
        log.sync().unwrap();
        let next = segment_path(dir.path(), 7);
        let _file = log.reuse_or_create(&next).unwrap();
        let len = fs::metadata(&next).unwrap().len();
        assert_eq!(len, 3 * 116, "the reused file, older records and all");
        assert!(reader.next().is_none(), "nothing to read yet");
        assert!(reader.next().is_none());
    }

    #[test]
    fn room_on_the_filesystem_is_told() {
        let dir = tempfile::tempdir().unwrap();
        assert!(has_room(dir.path(), 1));
        assert!(!has_room(dir.path(), u64::MAX));
        assert!(!has_room(&dir.path().join("missing"), 1));
        let no_space = crate::disk::is_no_space;
        assert!(no_space(&io::Error::from_raw_os_error(libc::ENOSPC)));
        assert!(no_space(&io::Error::from_raw_os_error(libc::EDQUOT)));
        assert!(!no_space(&io::Error::from_raw_os_error(libc::EIO)));
    }

    /// On a log that reuses segments, dropping read pages is left out (a reused segment
    /// is written into them); the records read are the same.
    #[test]
    fn a_reader_of_a_recycling_log_keeps_its_pages() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = SegmentLog::open(dir.path(), recycling(3 * 116)).unwrap();
        for seq in 1..=5 {
            log.append(&payload(seq, 100)).unwrap();
        }
        let mut reader = log.read_from(0).unwrap();
        reader.drop_behind();
        assert!(!reader.drop_behind);
        assert_eq!(reader.count(), 5);
    }

    #[test]
    fn a_reader_that_drops_what_it_read_reads_the_same_records() {
        let dir = tempfile::tempdir().unwrap();
        // Segments of 20 MiB, records of 1 MiB: drops within segments and at their ends.
        let mut log = SegmentLog::open(
            dir.path(),
            LogOptions {
                segment_bytes: 20 << 20,
                max_record: 2 << 20,
                recycle_segments: 0,
            },
        )
        .unwrap();
        for seq in 1..=50u64 {
            log.append(&payload(seq, 1 << 20)).unwrap();
        }
        log.sync().unwrap();
        let mut r = log.read_from(3).unwrap();
        r.drop_behind();
        let got: Vec<(u64, Vec<u8>)> = r.by_ref().collect::<Result<_>>().unwrap();
        assert_eq!(got, read_all(&log, 3));
        // It goes on with what is appended later.
        log.append(b"late").unwrap();
        log.sync().unwrap();
        assert_eq!(r.next().unwrap().unwrap(), (51, b"late".to_vec()));
    }

    /// 100-byte payloads: 116-byte records, three per 348-byte segment.
    fn three_per_segment(dir: &Path, n: u64) -> SegmentLog {
        let mut log = SegmentLog::open(dir, opts(3 * 116)).unwrap();
        for seq in 1..=n {
            assert_eq!(log.append(&payload(seq, 100)).unwrap(), seq);
        }
        log.sync().unwrap();
        log
    }

    fn last_segment(log: &SegmentLog) -> PathBuf {
        log.segments().unwrap().last().unwrap().path.clone()
    }

    #[test]
    fn empty_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = SegmentLog::open(dir.path(), LogOptions::default()).unwrap();
        assert_eq!(
            (log.first_seq(), log.last_seq(), log.size_bytes()),
            (1, 0, 0)
        );
        assert!(read_all(&log, 1).is_empty());
        assert!(matches!(log.read_from(2), Err(LogError::BeyondEnd { .. })));
        drop(log);
        let log = SegmentLog::open(dir.path(), LogOptions::default()).unwrap();
        assert_eq!((log.first_seq(), log.last_seq()), (1, 0));
        log.verify().unwrap();
    }

    #[test]
    fn second_open_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _log = SegmentLog::open(dir.path(), LogOptions::default()).unwrap();
        assert!(matches!(
            SegmentLog::open(dir.path(), LogOptions::default()),
            Err(LogError::Locked { .. })
        ));
    }

    #[test]
    fn append_and_read_across_rolls_then_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = SegmentLog::open(dir.path(), opts(1000)).unwrap();
        for seq in 1..=50 {
            assert_eq!(log.append(&payload(seq, seq as usize * 7)).unwrap(), seq);
        }
        log.sync().unwrap();
        assert!(log.segments().unwrap().len() > 5);
        assert_eq!(
            log.size_bytes(),
            log.segments().unwrap().iter().map(|s| s.bytes).sum::<u64>()
        );
        assert!(log.segments().unwrap().iter().all(|s| s.bytes <= 1000));
        let check = |log: &SegmentLog| {
            let all = read_all(log, 1);
            assert_eq!(all.len(), 50);
            for (seq, data) in all {
                assert_eq!(data, payload(seq, seq as usize * 7));
            }
            assert_eq!(read_all(log, 37)[0].0, 37);
            assert_eq!(read_all(log, 37).len(), 14);
        };
        check(&log);
        let size = log.size_bytes();
        drop(log);
        let mut log = SegmentLog::open(dir.path(), opts(1000)).unwrap();
        assert_eq!(
            (log.first_seq(), log.last_seq(), log.size_bytes()),
            (1, 50, size)
        );
        check(&log);
        assert_eq!(log.append(b"next").unwrap(), 51);
    }

    #[test]
    fn reader_sees_records_appended_later() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = SegmentLog::open(dir.path(), opts(300)).unwrap();
        log.append(b"one").unwrap();
        let mut reader = log.read_from(1).unwrap();
        assert_eq!(reader.next().unwrap().unwrap(), (1, b"one".to_vec()));
        assert!(reader.next().is_none());
        for seq in 2..=30 {
            log.append(&payload(seq, 50)).unwrap();
        }
        let rest: Vec<_> = reader.by_ref().collect::<Result<_>>().unwrap();
        assert_eq!(rest.len(), 29);
        assert_eq!(rest.last().unwrap(), &(30, payload(30, 50)));
        log.append(b"later").unwrap();
        assert_eq!(reader.next().unwrap().unwrap(), (31, b"later".to_vec()));
    }

    /// Open file descriptors of this process that point at a deleted file under `dir`.
    fn deleted_fds(dir: &Path) -> usize {
        fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
            .filter(|t| t.starts_with(dir) && t.to_string_lossy().ends_with("(deleted)"))
            .count()
    }

    #[test]
    fn a_reader_at_the_end_keeps_no_removed_segment_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = three_per_segment(dir.path(), 6); // segments 1 and 4
        let mut reader = log.read_from(1).unwrap();
        assert_eq!(reader.by_ref().count(), 6);
        // A reader that stopped on the last record it wanted lets go when told to.
        let mut caught_up = log.read_from(1).unwrap();
        assert_eq!(caught_up.by_ref().take(6).count(), 6);
        caught_up.release();
        // The log rolls, then every segment but the active one is removed.
        log.append(&payload(7, 100)).unwrap();
        log.sync().unwrap();
        log.truncate_front(6).unwrap();
        assert_eq!(log.first_seq(), 7);
        assert_eq!(
            deleted_fds(dir.path()),
            0,
            "the reader holds no removed segment while it waits"
        );
        // And both go on in the segment that follows.
        assert_eq!(reader.next().unwrap().unwrap(), (7, payload(7, 100)));
        assert_eq!(caught_up.next().unwrap().unwrap(), (7, payload(7, 100)));
        assert!(reader.next().is_none());
    }

    fn torn_tail(damage: impl FnOnce(&Path, u64), expect_last: u64) {
        let dir = tempfile::tempdir().unwrap();
        let log = three_per_segment(dir.path(), 8); // segments 1, 4, 7 (7 and 8)
        let path = last_segment(&log);
        let good = log.segments().unwrap().last().unwrap().bytes;
        drop(log);
        damage(&path, good);
        let mut log = SegmentLog::open(dir.path(), opts(3 * 116)).unwrap();
        assert_eq!(log.last_seq(), expect_last);
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            (expect_last - 6) * 116,
            "file cut back to the last good record"
        );
        assert_eq!(log.append(&payload(99, 100)).unwrap(), expect_last + 1);
        let all = read_all(&log, 1);
        assert_eq!(all.len() as u64, expect_last + 1);
        assert_eq!(all.last().unwrap().1, payload(99, 100));
        drop(log);
        let log = SegmentLog::open(dir.path(), opts(3 * 116)).unwrap();
        assert_eq!(log.last_seq(), expect_last + 1);
    }

    #[test]
    fn torn_tail_cut_mid_record() {
        torn_tail(
            |path, good| {
                let f = OpenOptions::new().write(true).open(path).unwrap();
                f.set_len(good - 40).unwrap();
            },
            7,
        );
    }

    #[test]
    fn torn_tail_cut_mid_header() {
        torn_tail(
            |path, good| {
                let f = OpenOptions::new().write(true).open(path).unwrap();
                f.set_len(good - 116 + 5).unwrap();
            },
            7,
        );
    }

    #[test]
    fn torn_tail_garbage_appended() {
        torn_tail(
            |path, _| {
                let mut f = OpenOptions::new().append(true).open(path).unwrap();
                f.write_all(&[0xAB; 37]).unwrap();
            },
            8,
        );
    }

    #[test]
    fn torn_tail_zeros_appended() {
        torn_tail(
            |path, _| {
                let mut f = OpenOptions::new().append(true).open(path).unwrap();
                f.write_all(&[0; 4096]).unwrap();
            },
            8,
        );
    }

    #[test]
    fn torn_tail_flipped_byte_in_last_record() {
        torn_tail(
            |path, good| {
                let mut data = fs::read(path).unwrap();
                data[good as usize - 10] ^= 0x01;
                fs::write(path, data).unwrap();
            },
            7,
        );
    }

    #[test]
    fn torn_tail_flipped_seq_in_last_record() {
        torn_tail(
            |path, good| {
                let mut data = fs::read(path).unwrap();
                data[good as usize - 116 + 8] ^= 0x01;
                fs::write(path, data).unwrap();
            },
            7,
        );
    }

    /// 20 records of 116 bytes in one segment, then `damage` applied to the file.
    fn damaged_active(damage: impl FnOnce(&mut Vec<u8>)) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let log = {
            let mut log = SegmentLog::open(dir.path(), opts(1 << 20)).unwrap();
            for seq in 1..=20 {
                log.append(&payload(seq, 100)).unwrap();
            }
            log.sync().unwrap();
            log
        };
        let path = last_segment(&log);
        drop(log);
        let mut data = fs::read(&path).unwrap();
        damage(&mut data);
        fs::write(&path, data).unwrap();
        (dir, path)
    }

    fn expect_mid_log(dir: &Path, want: (u64, u64, u64)) {
        let before: Vec<u8> = fs::read(segment_path(dir, 1)).unwrap();
        let err = SegmentLog::open(dir, opts(1 << 20)).unwrap_err();
        match &err {
            LogError::DamagedMidLog {
                offset,
                damaged_seq,
                valid_seq,
                ..
            } => assert_eq!((*offset, *damaged_seq, *valid_seq), want, "{err}"),
            other => panic!("unexpected {other:?}"),
        }
        let text = err.to_string();
        assert!(text.contains("00000000000000000001.seg") && text.contains("not a torn tail"));
        assert_eq!(
            fs::read(segment_path(dir, 1)).unwrap(),
            before,
            "nothing was cut"
        );
    }

    #[test]
    fn damage_followed_by_valid_records_is_corruption_not_a_torn_tail() {
        // 16 bytes flipped in the payload of seq 10 (offset 9 * 116).
        let (dir, _) = damaged_active(|d| {
            d[9 * 116 + 40..9 * 116 + 56]
                .iter_mut()
                .for_each(|b| *b ^= 0xFF)
        });
        expect_mid_log(dir.path(), (9 * 116, 10, 11));
        // A page of zeros over records 5 to 7.
        let (dir, _) =
            damaged_active(|d| d[4 * 116 + 20..7 * 116 - 3].iter_mut().for_each(|b| *b = 0));
        expect_mid_log(dir.path(), (4 * 116, 5, 8));
        // A length field changed: the records after it are still found at their offsets.
        let (dir, _) = damaged_active(|d| d[3 * 116] = 7);
        expect_mid_log(dir.path(), (3 * 116, 4, 5));
        // A valid record whose seq skips ahead: records are missing.
        let (dir, path) = damaged_active(|_| {});
        let mut data = fs::read(&path).unwrap();
        data.truncate(20 * 116);
        data.extend_from_slice(&encode(25, &payload(25, 100)));
        fs::write(&path, data).unwrap();
        expect_mid_log(dir.path(), (20 * 116, 21, 25));
    }

    #[test]
    fn damage_in_the_last_record_is_still_a_torn_tail() {
        let (dir, path) = damaged_active(|d| {
            let n = d.len();
            d[n - 30..n - 14].iter_mut().for_each(|b| *b ^= 0xFF);
        });
        let log = SegmentLog::open(dir.path(), opts(1 << 20)).unwrap();
        assert_eq!(log.last_seq(), 19);
        assert_eq!(fs::metadata(path).unwrap().len(), 19 * 116);
    }

    #[test]
    fn setting_aside_keeps_the_damaged_part_and_the_log_goes_on() {
        let (dir, path) = damaged_active(|d| d[9 * 116 + 40] ^= 0xFF);
        let original = fs::read(&path).unwrap();
        let (mut log, aside) = open_setting_aside(dir.path(), opts(1 << 20)).unwrap();
        let aside = aside.expect("damage was set aside");
        assert_eq!(
            (aside.damaged_seq, aside.valid_seq, aside.offset),
            (10, 11, 9 * 116)
        );
        assert_eq!(aside.damage, Damage::BadChecksum);
        assert_eq!(log.last_seq(), 9);
        let side = fs::read(&aside.file).unwrap();
        assert_eq!(
            side,
            original[9 * 116..],
            "every byte from the damage on is kept"
        );
        assert!(aside.file.to_string_lossy().ends_with(".1044.damaged"));
        assert_eq!(log.append(b"again").unwrap(), 10);
        log.sync().unwrap();
        drop(log);
        // Reopening finds nothing to set aside, and the side file is not a segment.
        let (log, aside) = open_setting_aside(dir.path(), opts(1 << 20)).unwrap();
        assert!(aside.is_none());
        assert_eq!(read_all(&log, 1).len(), 10);
    }

    fn lost_marker(seq: u64, lost: &Lost) -> Vec<u8> {
        format!("lost {seq} of {}..{}", lost.first_seq, lost.last_seq).into_bytes()
    }

    #[test]
    fn salvage_keeps_every_valid_record_and_marks_the_lost_ones() {
        let (dir, path) = damaged_active(|d| {
            d[4 * 116 + 20..7 * 116 - 3].iter_mut().for_each(|b| *b = 0); // seqs 5..=7
            d[15 * 116 + 50] ^= 1; // seq 16
            let n = d.len();
            d.truncate(n - 30); // a torn tail: seq 20
        });
        let original = fs::read(&path).unwrap();
        let lost = salvage(dir.path(), opts(1 << 20), lost_marker).unwrap();
        let runs: Vec<_> = lost
            .iter()
            .map(|l| (l.first_seq, l.last_seq, l.offset))
            .collect();
        assert_eq!(runs, vec![(5, 7, 4 * 116), (16, 16, 15 * 116)]);
        let mut kept = path.as_os_str().to_owned();
        kept.push(".salvaged");
        assert_eq!(fs::read(PathBuf::from(kept)).unwrap(), original);
        let log = SegmentLog::open(dir.path(), opts(1 << 20)).unwrap();
        let all = read_all(&log, 1);
        assert_eq!(all.len(), 19, "seq 20 was a torn tail");
        for (seq, data) in all {
            match seq {
                5..=7 => assert_eq!(data, format!("lost {seq} of 5..7").into_bytes()),
                16 => assert_eq!(data, b"lost 16 of 16..16"),
                _ => assert_eq!(data, payload(seq, 100), "seq {seq}"),
            }
        }
        // Nothing left to salvage.
        drop(log);
        assert!(salvage(dir.path(), opts(1 << 20), lost_marker)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn salvage_repairs_a_sealed_segment_up_to_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let log = three_per_segment(dir.path(), 8);
        let sealed = log.segments().unwrap()[1].path.clone(); // seqs 4..=6
        drop(log);
        let mut data = fs::read(&sealed).unwrap();
        data[116 + 50] ^= 0xFF; // seq 5
        data.truncate(2 * 116 + 10); // and seq 6 cut short
        fs::write(&sealed, data).unwrap();
        let lost = salvage(dir.path(), opts(3 * 116), lost_marker).unwrap();
        let runs: Vec<_> = lost.iter().map(|l| (l.first_seq, l.last_seq)).collect();
        assert_eq!(runs, vec![(5, 6)]);
        let log = SegmentLog::open(dir.path(), opts(3 * 116)).unwrap();
        log.verify().unwrap();
        let seqs: Vec<u64> = read_all(&log, 1).into_iter().map(|(s, _)| s).collect();
        assert_eq!(seqs, (1..=8).collect::<Vec<_>>());
    }

    /// Found by fuzzing (fuzz/fuzz_targets/segment.rs): a record with a valid checksum
    /// but seq 0 where seq 1 belongs, then garbage. Salvage dropped it but wrote nothing
    /// back (no run was lost), so the log still refused to open. (Opening now cuts such a
    /// record as a torn tail, as it does a reused segment's older records.)
    #[test]
    fn salvage_rewrites_a_segment_when_it_only_dropped_a_stale_record() {
        let dir = tempfile::tempdir().unwrap();
        let segment = [
            0x00, 0x00, 0x00, 0x00, 0x5d, 0xb5, 0x60, 0x2b, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00,
            0x00, 0x00, 0x29, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x2f, 0x00, 0x00, 0x00, 0x00,
        ];
        assert_eq!(&segment[..16], encode(0, b"").as_slice());
        fs::write(segment_path(dir.path(), 1), segment).unwrap();
        salvage(dir.path(), opts(1 << 20), lost_marker).unwrap();
        let log = SegmentLog::open(dir.path(), opts(1 << 20)).unwrap();
        assert_eq!(read_all(&log, 0), vec![]);
    }

    /// Found by fuzzing (fuzz/fuzz_targets/segment.rs; this is its input reduced): damaged
    /// bytes followed by the very record the seq count expects. No seq was lost, so salvage
    /// wrote nothing back, and the log still refused to open.
    #[test]
    fn salvage_rewrites_a_segment_when_it_only_skipped_damaged_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = encode(1, b"one");
        data.extend(b"0000");
        data.extend(encode(2, b"two"));
        data.extend(encode(3, b"three"));
        fs::write(segment_path(dir.path(), 1), data).unwrap();
        assert!(SegmentLog::open(dir.path(), opts(1 << 20)).is_err());
        assert!(salvage(dir.path(), opts(1 << 20), lost_marker)
            .unwrap()
            .is_empty());
        let log = SegmentLog::open(dir.path(), opts(1 << 20)).unwrap();
        let seqs: Vec<u64> = read_all(&log, 0).into_iter().map(|(s, _)| s).collect();
        assert_eq!(seqs, [1, 2, 3]);
    }

    /// A record with a valid checksum whose seq is far ahead of what the segment can hold
    /// is dropped, not taken as the end of a run of lost records: markers for 2^40 seqs
    /// would never be written.
    #[test]
    fn salvage_drops_a_record_with_an_impossible_seq() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = encode(1, b"one");
        data.extend(encode(1 << 40, b"far"));
        data.extend(encode(2, b"two"));
        fs::write(segment_path(dir.path(), 1), data).unwrap();
        salvage(dir.path(), opts(1 << 20), lost_marker).unwrap();
        let log = SegmentLog::open(dir.path(), opts(1 << 20)).unwrap();
        assert_eq!(
            read_all(&log, 0),
            vec![(1, b"one".to_vec()), (2, b"two".to_vec())]
        );
    }

    /// Found by fuzzing (fuzz/fuzz_targets/segment.rs): segment 1 holds seqs 1 and 2 but
    /// the next segment is named 2. Salvage kept seq 2 in both, so the salvaged log failed
    /// to read at the second segment; the sealed one now ends where the next one starts.
    #[test]
    fn salvage_cuts_a_sealed_segment_that_overlaps_the_next_one() {
        let hex = |s: &str| -> Vec<u8> {
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect()
        };
        let first = hex(concat!(
            "0102380100006435d5a101000000000000e658650000080000000a01400000060000007075626c",
            "6963060000006f7264657273640300000002000000696414000000ffffffff06000000626967696e",
            "74010100040000006e6f746519000000ffffffff040000007465787400020003000000646f63da0e",
            "0000ffffffff050000006a736f6e6200030001e502000048d874b3160000004002cde2dcca020004",
            "0140000003000000020100000031021400000074616209686572652c206c696e650a746865726500",
            "05014000000101030000000201000000310000030000000201000000310206000000c3a920e29c93",
            "0106014000000103000000020100000031000007010100000001400000080160d874b31600000003",
            "0000006170700b0000007b2268656c6c6f223a317d0248d874b31600000078d874b3160000004002",
            "cde2dcca020038000000f368d425020000000000000001000000000000000001000000080000d974",
            "b3160000000f000000726f7574792e6865617274626561740a00000031373333323830303030fd00",
            "00",
        ));
        let second = hex(concat!(
            "0039f92aab0300000000000000010000000000000000050000000a01400000060000007075626c69",
            "63060000006f7264657273640300000002000000696414000000ffffffff06000000626967696e74",
            "010100040000006e6f746519000000ffffffff040000007465787400020003000000646f63da0e00",
            "00ffffffff050000006a736f6e620003000901400000db74b316010000000000737478d80000",
        ));
        let dir = tempfile::tempdir().unwrap();
        fs::write(segment_path(dir.path(), 1), &first).unwrap();
        fs::write(segment_path(dir.path(), 2), &second).unwrap();
        let opts = LogOptions {
            segment_bytes: 4096,
            max_record: 1024,
            recycle_segments: 0,
        };
        salvage(dir.path(), opts, lost_marker).unwrap();
        let log = SegmentLog::open(dir.path(), opts).unwrap();
        // Segment 1 keeps seq 1 (seq 2 is the next segment's), whose only record is torn.
        let seqs: Vec<u64> = read_all(&log, 0).into_iter().map(|(s, _)| s).collect();
        assert_eq!(seqs, [1]);
    }

    #[test]
    fn corruption_in_sealed_segment_names_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let log = three_per_segment(dir.path(), 8);
        let sealed = log.segments().unwrap()[1].path.clone(); // seqs 4..=6
        drop(log);
        let mut data = fs::read(&sealed).unwrap();
        data[116 + 50] ^= 0xFF; // payload of seq 5, at offset 116
        fs::write(&sealed, data).unwrap();
        let log = SegmentLog::open(dir.path(), opts(3 * 116)).unwrap();
        assert_eq!(log.last_seq(), 8, "sealed segments are not truncated");
        let mut reader = log.read_from(1).unwrap();
        for seq in 1..=4 {
            assert_eq!(reader.next().unwrap().unwrap().0, seq);
        }
        let err = reader.next().unwrap().unwrap_err();
        match &err {
            LogError::Corrupt {
                path,
                offset,
                damage,
            } => {
                assert_eq!(path, &sealed);
                assert_eq!(*offset, 116);
                assert_eq!(*damage, Damage::BadChecksum);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("00000000000000000004.seg"));
        assert!(err.to_string().contains("offset 116"));
        assert!(reader.next().is_none());
        assert!(matches!(log.verify(), Err(LogError::Corrupt { .. })));
        assert!(matches!(
            log.read_from(7).unwrap().next().unwrap(),
            Ok((7, _))
        ));
    }

    #[test]
    fn truncated_sealed_segment_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let log = three_per_segment(dir.path(), 8);
        let sealed = log.segments().unwrap()[0].path.clone();
        drop(log);
        let f = OpenOptions::new().write(true).open(&sealed).unwrap();
        f.set_len(116 * 2 + 20).unwrap();
        let log = SegmentLog::open(dir.path(), opts(3 * 116)).unwrap();
        let err = log.verify().unwrap_err();
        assert!(
            matches!(&err, LogError::Corrupt { path, offset: 232, damage: Damage::Short } if path == &sealed),
            "{err:?}"
        );
    }

    #[test]
    fn missing_segment_is_a_gap() {
        let dir = tempfile::tempdir().unwrap();
        let log = three_per_segment(dir.path(), 8);
        let middle = log.segments().unwrap()[1].path.clone();
        drop(log);
        fs::remove_file(&middle).unwrap();
        let log = SegmentLog::open(dir.path(), opts(3 * 116)).unwrap();
        let err = log.verify().unwrap_err();
        assert!(
            matches!(
                err,
                LogError::Corrupt {
                    damage: Damage::SeqMismatch {
                        expected: 4,
                        found: 7
                    },
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn truncate_front_deletes_only_covered_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = three_per_segment(dir.path(), 10); // segments 1, 4, 7, 10
        let firsts = |log: &SegmentLog| -> Vec<u64> {
            log.segments()
                .unwrap()
                .iter()
                .map(|s| s.first_seq)
                .collect()
        };
        assert_eq!(firsts(&log), [1, 4, 7, 10]);
        log.truncate_front(5).unwrap();
        assert_eq!(firsts(&log), [4, 7, 10]);
        assert_eq!(log.first_seq(), 4);
        assert!(!segment_path(dir.path(), 1).exists());
        assert!(matches!(
            log.read_from(3),
            Err(LogError::Truncated {
                requested: 3,
                first: 4
            })
        ));
        assert_eq!(read_all(&log, 5).len(), 6);
        log.truncate_front(6).unwrap();
        assert_eq!(firsts(&log), [7, 10]);
        log.truncate_front(1000).unwrap();
        assert_eq!(firsts(&log), [10], "the active segment stays");
        assert_eq!(read_all(&log, 10), [(10, payload(10, 100))]);
        assert_eq!(log.size_bytes(), 116);
        log.append(b"x").unwrap();
        drop(log);
        let log = SegmentLog::open(dir.path(), opts(3 * 116)).unwrap();
        assert_eq!((log.first_seq(), log.last_seq()), (10, 11));
        assert_eq!(read_all(&log, 0).len(), 2);
    }

    #[test]
    fn max_record_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = SegmentLog::open(
            dir.path(),
            LogOptions {
                segment_bytes: 64,
                max_record: 100,
                recycle_segments: 0,
            },
        )
        .unwrap();
        assert!(matches!(
            log.append(&[0; 101]),
            Err(LogError::TooLarge { len: 101, max: 100 })
        ));
        assert_eq!(log.last_seq(), 0);
        // A record larger than segment_bytes still fits, alone in its segment.
        assert_eq!(log.append(&[1; 100]).unwrap(), 1);
        assert_eq!(log.append(&[2; 100]).unwrap(), 2);
        assert_eq!(log.segments().unwrap().len(), 2);
        assert_eq!(read_all(&log, 2), [(2, vec![2; 100])]);
    }

    #[test]
    fn foreign_segment_name_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("7.seg"), b"").unwrap();
        assert!(matches!(
            SegmentLog::open(dir.path(), LogOptions::default()),
            Err(LogError::BadName { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn everything_appended_reads_back(sizes in proptest::collection::vec(0usize..1500, 0..60)) {
            let dir = tempfile::tempdir().unwrap();
            let o = LogOptions { segment_bytes: 2048, max_record: 1500, recycle_segments: 0 };
            let mut log = SegmentLog::open(dir.path(), o).unwrap();
            let expected: Vec<(u64, Vec<u8>)> = sizes
                .iter()
                .enumerate()
                .map(|(i, &len)| (i as u64 + 1, payload(i as u64 + 1, len)))
                .collect();
            for (seq, data) in &expected {
                prop_assert_eq!(log.append(data).unwrap(), *seq);
            }
            log.sync().unwrap();
            prop_assert_eq!(&read_all(&log, 1), &expected);
            drop(log);
            let log = SegmentLog::open(dir.path(), o).unwrap();
            prop_assert_eq!(log.last_seq(), sizes.len() as u64);
            prop_assert_eq!(&read_all(&log, 1), &expected);
            let mid = sizes.len() as u64 / 2 + 1;
            prop_assert_eq!(&read_all(&log, mid)[..], &expected[mid as usize - 1..]);
        }

        /// A log that reuses its segments, a reader following its writer at random
        /// moments, removals of what was read: every record reads back once and in
        /// order, and again after the log is opened anew (older bytes of reused files
        /// cut, never read).
        #[test]
        fn a_recycling_log_reads_back_after_removals_and_a_reopen(
            ops in proptest::collection::vec((0usize..700, 0u8..4), 1..200)
        ) {
            let dir = tempfile::tempdir().unwrap();
            let o = LogOptions { segment_bytes: 1024, max_record: 1500, recycle_segments: 2 };
            let mut log = SegmentLog::open(dir.path(), o).unwrap();
            let mut reader = log.read_from(0).unwrap();
            let mut read = 0u64;
            let len_of = |seq: u64| ops[seq as usize - 1].0;
            let check = |reader: &mut Reader, read: &mut u64| -> std::result::Result<(), TestCaseError> {
                for rec in reader.by_ref() {
                    let (seq, bytes) = rec.unwrap();
                    *read += 1;
                    prop_assert_eq!(seq, *read);
                    prop_assert_eq!(bytes, payload(seq, len_of(seq)));
                }
                Ok(())
            };
            for (i, &(len, op)) in ops.iter().enumerate() {
                let seq = i as u64 + 1;
                prop_assert_eq!(log.append(&payload(seq, len)).unwrap(), seq);
                match op {
                    0 => check(&mut reader, &mut read)?,
                    1 => {
                        check(&mut reader, &mut read)?;
                        prop_assert_eq!(read, seq);
                        log.truncate_front(read).unwrap();
                    }
                    _ => {}
                }
            }
            check(&mut reader, &mut read)?;
            prop_assert_eq!(read, ops.len() as u64);
            let first = log.first_seq();
            drop(reader);
            drop(log);
            let log = SegmentLog::open(dir.path(), o).unwrap();
            prop_assert_eq!(log.last_seq(), ops.len() as u64);
            let all = read_all(&log, first);
            prop_assert_eq!(all.len() as u64, ops.len() as u64 - first + 1);
            for (seq, bytes) in all {
                prop_assert_eq!(bytes, payload(seq, len_of(seq)));
            }
        }
    }
}
