//! Writes a segment log the way relay-inner's spool is written during a first copy
//! (records of 256 KiB, an fdatasync every 8 MiB, segments of 64 MiB removed as soon as
//! they are read), with new segment files and with reused ones
//! ([`LogOptions::recycle_segments`]), and prints wall time and CPU for each:
//!
//! ```sh
//! cargo run --release -p routy-e2e --bin bench-spool -- [--gib N] [--dir DIR]
//! ```
//!
//! The two ways alternate three times in one run (the machine's noise hits both).
use std::path::{Path, PathBuf};
use std::time::Instant;

use routy_log::segment_log::{LogOptions, SegmentLog};

const USAGE: &str = "usage: bench-spool [--gib N] [--dir DIR]
  --gib N    GiB written per run (default 2; fractions allowed)
  --dir DIR  where the log is written, removed after each run
             (default /var/tmp/routy-bench-spool)
";

struct Args {
    gib: f64,
    dir: PathBuf,
}

fn parse(mut it: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut a = Args {
        gib: 2.0,
        dir: PathBuf::from("/var/tmp/routy-bench-spool"),
    };
    while let Some(k) = it.next() {
        match k.as_str() {
            "-h" | "--help" => return Ok(None),
            "--gib" => {
                let v = it.next().ok_or("--gib needs a value (--gib N)")?;
                a.gib = match v.parse::<f64>() {
                    Ok(g) if g > 0.0 && g.is_finite() => g,
                    _ => return Err(format!("--gib {v}: not a positive number")),
                };
            }
            "--dir" => a.dir = it.next().ok_or("--dir needs a value (--dir DIR)")?.into(),
            _ => return Err(format!("unknown argument {k}")),
        }
    }
    Ok(Some(a))
}

/// Wall time, user and system CPU of this process for one run, in seconds.
fn run(dir: &Path, bytes: u64, recycle: usize) -> (f64, f64, f64) {
    let _ = std::fs::remove_dir_all(dir);
    let opts = LogOptions {
        recycle_segments: recycle,
        ..LogOptions::default()
    };
    let mut log = SegmentLog::open(dir, opts).expect("the log opens");
    let record = vec![7u8; 256 * 1024];
    let (u0, s0) = routy_e2e::cpu_times(std::process::id());
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
    let (u1, s1) = routy_e2e::cpu_times(std::process::id());
    drop(reader);
    drop(log);
    let _ = std::fs::remove_dir_all(dir);
    (wall, u1 - u0, s1 - s0)
}

fn main() {
    let a = routy_e2e::args_or_exit("bench-spool", USAGE, parse);
    let bytes = (a.gib * (1u64 << 30) as f64) as u64;
    println!("| segments | wall s | user s | system s |\n| --- | --- | --- | --- |");
    for _ in 0..3 {
        for recycle in [0, 2] {
            let (wall, user, system) = run(&a.dir, bytes, recycle);
            let how = if recycle == 0 {
                "new files"
            } else {
                "reused (2 kept)"
            };
            println!("| {how} | {wall:.2} | {user:.2} | {system:.2} |");
        }
    }
}
