//! `relay-outer cdc tail`: prints a source's stored change log as JSON lines, one per
//! event. It reads the store's files without locking them, so it works while relay-outer
//! runs (and appends) or not.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use relay_proto::cdc::{event_json, Event, Record, Relations, PG_EPOCH_UNIX_SECS};
use routy_log::segment_log::{self, LogError};

use super::store::MAX_RECORD;

/// How often `--follow` looks for new records.
pub const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// What to print.
#[derive(Debug, Clone)]
pub struct TailOptions {
    /// Root of the store (`cdc.dir`).
    pub root: PathBuf,
    /// `tunnel/source`.
    pub source: String,
    /// Start at this seq (default: the oldest record held).
    pub from: Option<u64>,
    /// Start at the first record whose transaction committed at or after this time
    /// (Unix microseconds).
    pub since: Option<i64>,
    /// Keep waiting for new records at the end of the log.
    pub follow: bool,
    /// Stop after printing this many events.
    pub limit: Option<u64>,
    /// How often `follow` polls.
    pub poll: Duration,
}

/// The sources whose logs are under `root` (`tunnel/source`, sorted).
pub fn known_sources(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(tunnels) = std::fs::read_dir(root) else {
        return out;
    };
    for t in tunnels.flatten() {
        let Ok(sources) = std::fs::read_dir(t.path()) else {
            continue;
        };
        for s in sources.flatten() {
            if has_segments(&s.path()) {
                out.push(format!(
                    "{}/{}",
                    t.file_name().to_string_lossy(),
                    s.file_name().to_string_lossy()
                ));
            }
        }
    }
    out.sort();
    out
}

fn has_segments(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|d| {
        d.flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".seg"))
    })
}

fn begins_at_or_after(rec: &Record, since_unix_micros: i64) -> bool {
    rec.events.iter().any(|e| match e {
        Event::Begin { commit_time, .. } => {
            commit_time.saturating_add(PG_EPOCH_UNIX_SECS * 1_000_000) >= since_unix_micros
        }
        _ => false,
    })
}

/// Prints events to `out` until the end of the log (or, with `follow`, until `stop`
/// says so); returns how many were printed. A damaged record is an error naming the file
/// and offset. A closed `out` (a pipe into `head`) ends the tail quietly.
pub fn tail(
    opts: &TailOptions,
    out: &mut dyn Write,
    stop: &dyn Fn() -> bool,
) -> anyhow::Result<u64> {
    crate::config::validate_full_source(&opts.source).map_err(|e| anyhow!("--source: {e}"))?;
    let dir = opts.root.join(&opts.source);
    if !has_segments(&dir) {
        let known = known_sources(&opts.root);
        bail!(
            "--source: no store of {:?} under {}; known sources: {}",
            opts.source,
            opts.root.display(),
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        );
    }
    let mut reader = segment_log::read_dir(&dir, opts.from.unwrap_or(0), MAX_RECORD)
        .map_err(|e| match e {
            LogError::Truncated { requested, first } => anyhow!(
                "--from {requested}: that record was already removed from {}; the store starts at seq {first}",
                opts.source
            ),
            e => anyhow!(e),
        })?;
    let mut rels = Relations::default();
    let mut started = opts.since.is_none();
    let mut printed = 0u64;
    let limit = opts.limit.unwrap_or(u64::MAX);
    if limit == 0 {
        return Ok(0);
    }
    let res: std::io::Result<()> = (|| loop {
        match reader.next() {
            Some(Ok((seq, payload))) => {
                let rec = Record::decode(&payload).map_err(|e| {
                    std::io::Error::other(format!(
                        "record seq {seq} in {} does not decode: {e}",
                        dir.display()
                    ))
                })?;
                if !started {
                    started = opts.since.is_some_and(|t| begins_at_or_after(&rec, t));
                }
                for ev in &rec.events {
                    rels.observe(ev);
                    if !started {
                        continue;
                    }
                    let line = event_json(seq, ev, &rels);
                    writeln!(out, "{line}")?;
                    printed += 1;
                    if printed >= limit {
                        return out.flush();
                    }
                }
            }
            Some(Err(e)) => return Err(std::io::Error::other(e.to_string())),
            None => {
                out.flush()?;
                if !opts.follow || stop() {
                    return Ok(());
                }
                std::thread::sleep(opts.poll);
            }
        }
    })();
    match res {
        Ok(()) => Ok(printed),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(printed),
        Err(e) => Err(anyhow!(e)).with_context(|| format!("cdc tail {}", opts.source)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdc::store::Store;
    use relay_proto::cdc::{Column, Relation, Value};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    fn txn(i: i64) -> Vec<u8> {
        let rel = Relation {
            id: 7,
            schema: "public".into(),
            name: "orders".into(),
            replica_identity: b'd',
            columns: vec![Column {
                name: "id".into(),
                type_oid: 23,
                type_modifier: -1,
                type_name: "integer".into(),
                key: true,
                attnum: 0,
            }],
        };
        let t = i * 1_000_000;
        Record {
            lsn: i as u64 * 100,
            events: vec![
                Event::Begin {
                    xid: i as u32,
                    commit_lsn: i as u64 * 100 - 8,
                    commit_time: t,
                },
                Event::Relation(rel),
                Event::Insert {
                    rel: 7,
                    new: vec![Value::Text(i.to_string())],
                },
                Event::Commit {
                    commit_lsn: i as u64 * 100 - 8,
                    end_lsn: i as u64 * 100,
                    commit_time: t,
                },
            ],
        }
        .encode()
    }

    fn opts(root: &Path) -> TailOptions {
        TailOptions {
            root: root.to_path_buf(),
            source: "site-a/orders".into(),
            from: None,
            since: None,
            follow: false,
            limit: None,
            poll: Duration::from_millis(10),
        }
    }

    fn lines(o: &TailOptions) -> Vec<serde_json::Value> {
        let mut buf = Vec::new();
        tail(o, &mut buf, &|| true).unwrap();
        String::from_utf8(buf)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn prints_json_lines_from_a_seq_a_time_and_up_to_a_limit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "site-a/orders").unwrap();
        store.append_batch(1, &[txn(1), txn(2), txn(3)]).unwrap();
        // While the store is open (and locked) by "relay-outer".
        let all = lines(&opts(dir.path()));
        assert_eq!(all.len(), 12);
        assert_eq!(all[0]["event"], "begin");
        assert_eq!(all[0]["seq"], 1);
        assert_eq!(all[2]["event"], "insert");
        assert_eq!(all[2]["table"], "public.orders");
        assert_eq!(all[2]["new"]["id"], "1");
        assert_eq!(all[11]["event"], "commit");
        assert_eq!(all[11]["seq"], 3);

        let from = lines(&TailOptions {
            from: Some(2),
            ..opts(dir.path())
        });
        assert_eq!(from.len(), 8);
        assert_eq!(from[0]["seq"], 2);
        assert_eq!(
            from[2]["table"], "public.orders",
            "relations resolve mid-log"
        );

        // 2000-01-01T00:00:02Z is commit time 2 s after PostgreSQL's epoch.
        let since = relay_proto::cdc::parse_time("2000-01-01T00:00:01.5Z").unwrap();
        let s = lines(&TailOptions {
            since: Some(since),
            ..opts(dir.path())
        });
        assert_eq!(s[0]["seq"], 2);
        assert_eq!(s[0]["commit_time"], "2000-01-01T00:00:02.000000Z");
        let none = lines(&TailOptions {
            since: Some(since + 10_000_000),
            ..opts(dir.path())
        });
        assert!(none.is_empty());

        let lim = lines(&TailOptions {
            limit: Some(5),
            ..opts(dir.path())
        });
        assert_eq!(lim.len(), 5);
        assert_eq!(lim[4]["seq"], 2);
    }

    #[test]
    fn unknown_sources_and_removed_seqs_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let _a = Store::open(dir.path(), "site-a/orders").unwrap();
        let _b = Store::open(dir.path(), "site-b/billing").unwrap();
        let e = tail(
            &TailOptions {
                source: "site-a/nope".into(),
                ..opts(dir.path())
            },
            &mut Vec::new(),
            &|| true,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("site-a/orders, site-b/billing"), "{e}");
        let e = tail(
            &TailOptions {
                source: "../etc".into(),
                ..opts(dir.path())
            },
            &mut Vec::new(),
            &|| true,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--source"), "{e}");
    }

    #[test]
    fn a_damaged_record_names_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "site-a/orders").unwrap();
        store.append_batch(1, &[txn(1), txn(2)]).unwrap();
        drop(store);
        let seg = dir
            .path()
            .join("site-a/orders")
            .join(format!("{:020}.seg", 1));
        let mut bytes = std::fs::read(&seg).unwrap();
        // Flip a payload byte of the first record; the second still follows.
        bytes[20] ^= 0xff;
        std::fs::write(&seg, &bytes).unwrap();
        let mut out = Vec::new();
        let e = tail(&opts(dir.path()), &mut out, &|| true).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("00000000000000000001.seg") && msg.contains("offset 0"),
            "{msg}"
        );
    }

    #[test]
    fn follow_sees_new_records() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "site-a/orders").unwrap();
        store.append_batch(1, &[txn(1)]).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let o = TailOptions {
            follow: true,
            limit: Some(8),
            ..opts(dir.path())
        };
        let d = done.clone();
        let h = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let n = tail(&o, &mut buf, &|| d.load(Ordering::Relaxed)).unwrap();
            (n, String::from_utf8(buf).unwrap())
        });
        std::thread::sleep(Duration::from_millis(100));
        store.append_batch(2, &[txn(2)]).unwrap();
        let (n, text) = h.join().unwrap();
        done.store(true, Ordering::Relaxed);
        assert_eq!(n, 8);
        assert!(text.lines().last().unwrap().contains("\"commit\""));
    }
}
