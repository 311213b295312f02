//! Writes a log the way relay-inner's spool is written during a first copy (records of
//! 256 KiB, an fdatasync every 8 MiB, segments of 64 MiB removed as soon as they are
//! read), with and without segment reuse, and prints wall time and CPU for each:
//!
//! ```sh
//! cargo run --release -p routy-log --example spool_like -- [GIB] [DIR]
//! ```
//!
//! The two ways alternate three times in one run (the machine's noise hits both).
use std::time::Instant;

use routy_log::segment_log::{LogOptions, SegmentLog};

/// User and system CPU time of this process so far, in seconds.
fn cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) / 100.0, ticks(12) / 100.0)
}

fn run(dir: &std::path::Path, bytes: u64, recycle: usize) -> (f64, f64, f64) {
    let _ = std::fs::remove_dir_all(dir);
    let opts = LogOptions {
        recycle_segments: recycle,
        ..LogOptions::default()
    };
    let mut log = SegmentLog::open(dir, opts).expect("the log opens");
    let record = vec![7u8; 256 * 1024];
    let (u0, s0) = cpu();
    let t = Instant::now();
    let mut reader = log.read_from(0).expect("a reader");
    let mut written = 0;
    while written < bytes {
        log.append(&record).expect("append");
        written += record.len() as u64;
        if written % (8 << 20) == 0 {
            log.sync().expect("sync");
            let mut last = 0;
            for rec in reader.by_ref() {
                last = rec.expect("a record reads back").0;
            }
            log.truncate_front(last).expect("removal");
        }
    }
    log.sync().expect("sync");
    let wall = t.elapsed().as_secs_f64();
    let (u1, s1) = cpu();
    drop(reader);
    drop(log);
    let _ = std::fs::remove_dir_all(dir);
    (wall, u1 - u0, s1 - s0)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let gib: f64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(2.0);
    let dir = std::path::PathBuf::from(
        args.next()
            .unwrap_or_else(|| "/var/tmp/routy-spool-like".to_string()),
    );
    let bytes = (gib * (1u64 << 30) as f64) as u64;
    println!("| segments | wall s | user s | system s |\n| --- | --- | --- | --- |");
    for _ in 0..3 {
        for recycle in [0, 2] {
            let (wall, user, system) = run(&dir, bytes, recycle);
            let how = if recycle == 0 {
                "new files"
            } else {
                "reused (2 kept)"
            };
            println!("| {how} | {wall:.2} | {user:.2} | {system:.2} |");
        }
    }
}
