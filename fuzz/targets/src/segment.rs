//! Segment files of the durable log under relay-inner's spool and relay-outer's store
//! (`routy_log::segment_log`), as a damaged or foreign disk may hold them: read with
//! `read_dir` (as `cdc tail` and the readers do), then opened for writing (which scans the
//! last segment and cuts a torn tail) and read again, or salvaged.
//!
//! Input: byte 0 picks what runs after `read_dir` (0 nothing, 1 open and read, 2 salvage
//! and open); bytes 1-2 (little-endian) the length of the first segment, byte 3 how far
//! after the first segment's first seq (1) the second one starts; the rest is the
//! segment files' bytes: the first segment, then the second if any bytes are left.
use std::path::{Path, PathBuf};

use routy_log::segment_log::{read_dir, salvage, LogOptions, SegmentLog};

/// Small limits, so length checks are reached with small inputs.
const OPTS: LogOptions = LogOptions {
    segment_bytes: 4096,
    max_record: 1024,
    recycle_segments: 0,
};

fn segment(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.seg"))
}

/// Reads every record from the first; the count is bounded (each record has a 16-byte
/// header), so the loop ends.
fn read_all(reader: impl Iterator<Item = routy_log::segment_log::Result<(u64, Vec<u8>)>>) {
    let mut last = 0;
    for rec in reader {
        let Ok((seq, payload)) = rec else { break };
        assert!(seq > last, "seqs go up: {seq} after {last}");
        assert!(payload.len() <= 64 * 1024);
        last = seq;
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let [mode, l0, l1, gap, files @ ..] = data else {
        return;
    };
    // A directory of its own in this thread's scratch directory, emptied per input.
    let dir = crate::scratch().join("segments");
    std::fs::create_dir_all(&dir).expect("the segment directory is made");
    let dir = dir.as_path();
    for entry in std::fs::read_dir(dir).expect("the directory lists") {
        let path = entry.expect("the directory lists").path();
        std::fs::remove_file(&path).expect("the previous input's files go");
    }
    let split = usize::from(u16::from_le_bytes([*l0, *l1])).min(files.len());
    let (first, second) = files.split_at(split);
    std::fs::write(segment(dir, 1), first).expect("a segment file is written");
    if !second.is_empty() {
        let next = 1 + u64::from(*gap);
        std::fs::write(segment(dir, next), second).expect("a segment file is written");
    }
    if let Ok(reader) = read_dir(dir, 0, OPTS.max_record) {
        read_all(reader);
    }
    match mode % 3 {
        1 => {
            if let Ok(log) = SegmentLog::open(dir, OPTS) {
                let _ = log.verify();
                if let Ok(reader) = log.read_from(0) {
                    read_all(reader);
                }
            }
        }
        2 => {
            let marker = |seq: u64, _: &routy_log::segment_log::Lost| seq.to_le_bytes().to_vec();
            if salvage(dir, OPTS, marker).is_ok() {
                // Salvaged, the log opens and reads to its end.
                let log = SegmentLog::open(dir, OPTS).expect("a salvaged log opens");
                let reader = log.read_from(0).expect("a salvaged log reads");
                for rec in reader {
                    rec.expect("every record of a salvaged log reads");
                }
            }
        }
        _ => {}
    }
}
