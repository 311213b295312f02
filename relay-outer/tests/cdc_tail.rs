//! `relay-outer cdc tail` and `check-config` with a `cdc` section, through the binary.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use relay_proto::cdc::{Event, Record, Value};
use routy_log::segment_log::{LogOptions, SegmentLog};

const BIN: &str = env!("CARGO_BIN_EXE_relay-outer");

/// A transaction committed `secs` seconds after 2000-01-01T00:00:00Z, inserting `i`
/// into a table whose relation the record does not carry (printed by its id).
fn txn(i: u64, secs: i64) -> Vec<u8> {
    Record {
        lsn: i * 16,
        events: vec![
            Event::Begin {
                xid: i as u32,
                commit_lsn: i * 16 - 8,
                commit_time: secs * 1_000_000,
            },
            Event::Insert {
                rel: 42,
                new: vec![Value::Text(i.to_string())],
            },
            Event::Commit {
                commit_lsn: i * 16 - 8,
                end_lsn: i * 16,
                commit_time: secs * 1_000_000,
            },
        ],
    }
    .encode()
}

fn store(root: &Path, n: u64) -> SegmentLog {
    let mut log = SegmentLog::open(root.join("site-a/orders"), LogOptions::default()).unwrap();
    for i in 1..=n {
        log.append(&txn(i, i as i64 * 10)).unwrap();
    }
    log.sync().unwrap();
    log
}

fn tail(args: &[&str]) -> (bool, Vec<serde_json::Value>, String) {
    let out = Command::new(BIN)
        .args(["cdc", "tail"])
        .args(args)
        .output()
        .unwrap();
    let lines = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (
        out.status.success(),
        lines,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn tail_prints_json_lines_while_the_store_is_held_open() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let mut log = store(&root, 3);
    let r = root.to_str().unwrap();

    let (ok, lines, err) = tail(&["--dir", r, "--source", "site-a/orders"]);
    assert!(ok, "{err}");
    assert_eq!(lines.len(), 9);
    assert_eq!(lines[0]["event"], "begin");
    assert_eq!(lines[1]["event"], "insert");
    assert_eq!(lines[1]["table"], 42);
    assert_eq!(lines[1]["new"]["col1"], "1");
    assert_eq!(lines[8]["seq"], 3);

    let (_, lines, _) = tail(&["--dir", r, "--source", "site-a/orders", "--from", "3"]);
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["seq"], 3);

    let (_, lines, _) = tail(&[
        "--dir",
        r,
        "--source",
        "site-a/orders",
        "--since",
        "2000-01-01T00:00:15Z",
        "--limit",
        "2",
    ]);
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["seq"], 2);
    assert_eq!(lines[0]["commit_time"], "2000-01-01T00:00:20.000000Z");

    // --follow prints what arrives later.
    let mut child = Command::new(BIN)
        .args([
            "cdc",
            "tail",
            "--dir",
            r,
            "--source",
            "site-a/orders",
            "--follow",
        ])
        .args(["--from", "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    for _ in 0..3 {
        line.clear();
        out.read_line(&mut line).unwrap();
    }
    assert!(line.contains("\"commit\""), "{line}");
    std::thread::sleep(Duration::from_millis(300));
    log.append(&txn(4, 40)).unwrap();
    log.sync().unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["seq"], 4);
    assert_eq!(v["event"], "begin");
    child.kill().unwrap();
    let _ = child.wait();
}

#[test]
fn tail_errors_are_clear_and_exit_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    drop(store(&root, 1));
    let r = root.to_str().unwrap();
    let (ok, _, err) = tail(&["--dir", r, "--source", "site-a/nope"]);
    assert!(!ok);
    assert!(err.contains("known sources: site-a/orders"), "{err}");
    let (ok, _, err) = tail(&[
        "--dir",
        r,
        "--source",
        "site-a/orders",
        "--since",
        "yesterday",
    ]);
    assert!(!ok);
    assert!(err.contains("--since"), "{err}");

    // A damaged record: file and offset.
    let seg = root.join("site-a/orders").join(format!("{:020}.seg", 1));
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[20] ^= 0xff;
    std::fs::write(&seg, bytes).unwrap();
    let (ok, _, err) = tail(&["--dir", r, "--source", "site-a/orders"]);
    assert!(!ok);
    assert!(
        err.contains("00000000000000000001.seg") && err.contains("offset 0"),
        "{err}"
    );
}

#[test]
fn config_names_the_store_for_tail_and_check_config_lists_sinks() {
    let dir = tempfile::tempdir().unwrap();
    let ok = Command::new(BIN)
        .args(["certs", "init", "--dir"])
        .arg(dir.path())
        .args(["--server-name", "localhost"])
        .output()
        .unwrap();
    assert!(ok.status.success());
    drop(store(&dir.path().join("store"), 2));
    let cfg = dir.path().join("outer.yaml");
    std::fs::write(
        &cfg,
        r#"
tunnel:
  listen: "127.0.0.1:0"
  tls: { cert: outer.crt, key: outer.key, client_ca: ca.crt }
cdc:
  dir: store
  retention: 24h
  sinks:
    - name: replica
      source: site-a/orders
      postgres: { dsn: "host=127.0.0.1 dbname=x user=y", create_tables: true }
"#,
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("1 sink(s): replica (postgres) <- site-a/orders"),
        "{text}"
    );

    let (ok, lines, err) = tail(&[
        "--config",
        cfg.to_str().unwrap(),
        "--source",
        "site-a/orders",
    ]);
    assert!(ok, "{err}");
    assert_eq!(lines.len(), 6);

    // A sink field mistake is named.
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("site-a/orders", "site-a"),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cdc.sinks[0].source"));
}
