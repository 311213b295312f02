//! The ClickHouse sink against a real ClickHouse engine (chdb behind the tests' HTTP
//! front), fed with hand-made records.

use std::time::Duration;

use relay_proto::cdc::{Event, OldRow, Value};
use routy_e2e::clickhouse::ClickHouse;

use super::ClickHouseConfig;
use crate::cdc::sink::testkit::*;
use crate::cdc::sink::{SinkKind, State};

fn cfg(name: &str, ch: &ClickHouse) -> ClickHouseConfig {
    ClickHouseConfig {
        name: name.into(),
        source: "t/s".into(),
        url: ch.url(),
        database: "analytics".into(),
        user: "default".into(),
        password_file: None,
        ca: None,
        create_tables: true,
        timeout: Duration::from_secs(30),
        max_rows: super::DEFAULT_MAX_ROWS,
        max_bytes: super::DEFAULT_MAX_BYTES,
        max_delay: Duration::from_millis(20),
    }
}

fn start(cfg: ClickHouseConfig, h: &Harness) -> Running {
    start_kind(&cfg.name.clone(), SinkKind::ClickHouse(cfg), &h.store)
}

fn upd(rel: u32, old: Option<&[Option<&str>]>, new: &[Value]) -> Event {
    Event::Update {
        rel,
        old: old.map(|o| OldRow {
            key_only: true,
            values: o.iter().map(|v| v.map_or(Value::Null, t)).collect(),
        }),
        new: new.to_vec(),
    }
}

fn del(rel: u32, key: &str, width: usize) -> Event {
    let mut values = vec![t(key)];
    values.resize(width, Value::Null);
    Event::Delete {
        rel,
        old: OldRow {
            key_only: true,
            values,
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn types_round_trip_into_clickhouse_types() {
    let ch = ClickHouse::start();
    let mut h = Harness::new();
    // (column, PostgreSQL type, value sent, what ClickHouse shows with toString, or
    // hex() for bytea)
    let cols: &[(&str, &str, Option<&str>, &str)] = &[
        ("i2", "smallint", Some("-32768"), "-32768"),
        ("i4", "integer", Some("2147483647"), "2147483647"),
        (
            "i8",
            "bigint",
            Some("-9223372036854775808"),
            "-9223372036854775808",
        ),
        (
            "num",
            "numeric(12,2)",
            Some("1234567890.12"),
            "1234567890.12",
        ),
        ("anynum", "numeric", Some("-1e-40"), "-1e-40"),
        (
            "txt",
            "text",
            Some("héllo wörld ✓ 'quoted' \"dq\" \\ back\ttab"),
            "héllo wörld ✓ 'quoted' \"dq\" \\ back\ttab",
        ),
        ("bin", "bytea", Some("\\x00ff10"), "00FF10"),
        (
            "js",
            "json",
            Some("{\"b\": 1,  \"a\": [1, 2]}"),
            "{\"b\": 1,  \"a\": [1, 2]}",
        ),
        (
            "jsb",
            "jsonb",
            Some("{\"a\": [1, 2], \"b\": 1}"),
            "{\"a\": [1, 2], \"b\": 1}",
        ),
        ("ia", "integer[]", Some("{1,2,NULL,4}"), "[1,2,NULL,4]"),
        (
            "ta",
            "text[]",
            Some("{a,\"b c\",\"d,e\"}"),
            "['a','b c','d,e']",
        ),
        (
            "u",
            "uuid",
            Some("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        ),
        (
            "ts",
            "timestamp with time zone",
            Some("2024-02-29 12:34:56.789012+02"),
            "2024-02-29 10:34:56.789012",
        ),
        ("d", "date", Some("2024-02-29"), "2024-02-29"),
        ("b", "boolean", Some("t"), "true"),
        ("nul", "text", None, "<null>"),
        ("f8", "double precision", Some("0.1"), "0.1"),
        ("fnan", "double precision", Some("NaN"), "nan"),
        ("iv", "interval", Some("1 day 02:03:04"), "1 day 02:03:04"),
    ];
    let mut spec: Vec<(&str, &str, bool)> = vec![("id", "integer", true)];
    spec.extend(cols.iter().map(|(n, ty, _, _)| (*n, *ty, false)));
    let r = rel(1, "types", b'd', &spec);
    let mut vals = vec![Some("1")];
    vals.extend(cols.iter().map(|c| c.2));
    let last = h.push(vec![txn(1, &[&r], vec![ins(1, &vals)])]).await;
    let s = start(cfg("types", &ch), &h);
    wait_applied(&s.status, last).await;
    for (name, _, _, want) in cols {
        let expr = if *name == "bin" {
            format!("hex({name})")
        } else {
            format!("toString({name})")
        };
        let got = ch.query(&format!(
            "SELECT ifNull({expr}, '<null>') FROM analytics.types FINAL FORMAT TSVRaw"
        ));
        assert_eq!(got, *want, "column {name}");
    }
    let types = ch.query(
        "SELECT name, type FROM system.columns WHERE database = 'analytics' AND table = 'types' \
         AND name IN ('id', 'num', 'ts', 'ia', 'u') ORDER BY name",
    );
    assert_eq!(
        types,
        "ia\tArray(Nullable(Int32))\nid\tInt32\nnum\tNullable(Decimal(12, 2))\n\
         ts\tNullable(DateTime64(6, \\'UTC\\'))\nu\tNullable(UUID)"
    );
    // A delete through the same types: FINAL no longer shows the row.
    let last = h
        .push(vec![txn(2, &[&r], vec![del(1, "1", spec.len())])])
        .await;
    wait_applied(&s.status, last).await;
    assert_eq!(ch.query("SELECT count() FROM analytics.types FINAL"), "0");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toast_values_are_carried_from_the_previous_version() {
    let ch = ClickHouse::start();
    let mut h = Harness::new();
    let r = rel(
        1,
        "docs",
        b'd',
        &[
            ("id", "integer", true),
            ("body", "text", false),
            ("tags", "text[]", false),
            ("n", "integer", false),
        ],
    );
    let big = "x".repeat(100_000);
    let big_tags = format!("{{{}}}", vec!["tag"; 1000].join(","));
    let row = |id: &str, n: &str| {
        ins(
            1,
            &[
                Some(id),
                Some(big.as_str()),
                Some(big_tags.as_str()),
                Some(n),
            ],
        )
    };
    let touched = |id: &str, n: &str| vec![t(id), Value::Unchanged, Value::Unchanged, t(n)];
    let last = h
        .push(vec![txn(1, &[&r], vec![row("1", "0"), row("2", "0")])])
        .await;
    let s = start(cfg("toast", &ch), &h);
    wait_applied(&s.status, last).await;
    // Batch 2: row 1's earlier version is in ClickHouse; row 3 is inserted and updated in
    // the same batch; row 2's key changes to 20, its body unchanged.
    let last = h
        .push(vec![
            txn(2, &[&r], vec![upd(1, None, &touched("1", "1"))]),
            txn(
                3,
                &[&r],
                vec![
                    row("3", "0"),
                    upd(1, None, &touched("3", "1")),
                    upd(1, None, &touched("3", "2")),
                ],
            ),
            txn(
                4,
                &[&r],
                vec![upd(
                    1,
                    Some(&[Some("2"), None, None, None]),
                    &touched("20", "1"),
                )],
            ),
        ])
        .await;
    wait_applied(&s.status, last).await;
    let got =
        ch.query("SELECT id, length(body), length(tags), n FROM analytics.docs FINAL ORDER BY id");
    assert_eq!(
        got,
        "1\t100000\t1000\t1\n3\t100000\t1000\t2\n20\t100000\t1000\t1"
    );
    // An update of a row ClickHouse never had: the untouched columns stay at their
    // defaults (NULL), and it is counted, not invented.
    let last = h
        .push(vec![txn(5, &[&r], vec![upd(1, None, &touched("99", "1"))])])
        .await;
    wait_applied(&s.status, last).await;
    assert_eq!(
        ch.query("SELECT isNull(body), n FROM analytics.docs FINAL WHERE id = 99"),
        "1\t1"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_batches_collapse_and_a_restart_resumes_from_clickhouse() {
    let ch = ClickHouse::start();
    let mut h = Harness::new();
    let r = rel(
        1,
        "kv",
        b'd',
        &[("k", "bigint", true), ("v", "text", false)],
    );
    // A first change creates the table; then background merges are stopped, so the raw
    // rows (every version received) can be counted.
    let first = h
        .push(vec![txn(
            100,
            &[&r],
            vec![ins(1, &[Some("-1"), Some("first")])],
        )])
        .await;
    let mut c = cfg("kv", &ch);
    c.max_rows = 700; // several batches
    let s = start(c.clone(), &h);
    wait_applied(&s.status, first).await;
    ch.query("SYSTEM STOP MERGES analytics.kv");
    let mut recs = Vec::new();
    for x in 0..50u32 {
        let mut ev = Vec::new();
        for i in 0..100u32 {
            let k = (x * 100 + i).to_string();
            ev.push(ins(1, &[Some(k.as_str()), Some("a")]));
        }
        // Every transaction also updates and deletes rows of the one before.
        if x > 0 {
            let k = ((x - 1) * 100).to_string();
            ev.push(upd(1, None, &[t(&k), t("b")]));
            ev.push(del(1, &((x - 1) * 100 + 1).to_string(), 2));
        }
        recs.push(txn(x + 1, &[&r], ev));
    }
    let last = h.push(recs).await;
    wait_applied(&s.status, last).await;
    let want = "4952\t49\t4952";
    let state = "SELECT count(), countIf(v = 'b'), uniqExact(k) FROM analytics.kv FINAL";
    assert_eq!(ch.query(state), want);
    let offsets =
        ch.query("SELECT sink, source, seq, event FROM analytics._routy_sink_offsets FINAL");
    assert_eq!(offsets, format!("kv\tt/s\t{}\t0", last + 1));
    // Everything again (a replay from the start): the table holds each version twice,
    // FINAL shows the same rows. (Versions of one key in the same insert collapse as they
    // are written, so up to 98 of the 5099 rows sent are not there as rows of their own.)
    let sent = 1 + 50 * 100 + 2 * 49;
    let raw_before: u64 = ch
        .query("SELECT count() FROM analytics.kv")
        .parse()
        .unwrap();
    assert!(
        (sent - 98..=sent).contains(&raw_before),
        "{raw_before} rows"
    );
    s.status.request_replay(crate::cdc::sink::Position::START);
    let t0 = std::time::Instant::now();
    loop {
        let raw: u64 = ch
            .query("SELECT count() FROM analytics.kv")
            .parse()
            .unwrap();
        if raw >= raw_before + sent - 98 && s.status.applied_seq() >= last {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "replay did not finish: {raw} rows (before {raw_before}): {:?}",
            s.status.view()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ch.query(state), want);
    s.stop().await;
    // A new runner resumes from the position in ClickHouse: nothing is sent again.
    let raw: u64 = ch
        .query("SELECT count() FROM analytics.kv")
        .parse()
        .unwrap();
    let more = h
        .push(vec![txn(
            99,
            &[&r],
            vec![ins(1, &[Some("100000"), Some("z")])],
        )])
        .await;
    let s = start(c, &h);
    wait_applied(&s.status, more).await;
    let after: u64 = ch
        .query("SELECT count() FROM analytics.kv")
        .parse()
        .unwrap();
    assert_eq!(after, raw + 1, "only the new change was sent");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_and_an_added_column_are_applied_in_order() {
    let ch = ClickHouse::start();
    let mut h = Harness::new();
    let r1 = rel(
        1,
        "t",
        b'd',
        &[("id", "integer", true), ("a", "text", false)],
    );
    let r2 = rel(
        1,
        "t",
        b'd',
        &[
            ("id", "integer", true),
            ("a", "text", false),
            ("b", "integer", false),
        ],
    );
    let last = h
        .push(vec![
            txn(
                1,
                &[&r1],
                vec![
                    ins(1, &[Some("1"), Some("x")]),
                    ins(1, &[Some("2"), Some("x")]),
                ],
            ),
            txn(
                2,
                &[&r1],
                vec![Event::Truncate {
                    rels: vec![1],
                    cascade: false,
                    restart_identity: false,
                }],
            ),
            txn(3, &[&r1], vec![ins(1, &[Some("3"), Some("y")])]),
            txn(4, &[&r2], vec![ins(1, &[Some("4"), Some("z"), Some("7")])]),
        ])
        .await;
    let s = start(cfg("tr", &ch), &h);
    wait_applied(&s.status, last).await;
    assert_eq!(
        ch.query("SELECT id, a, b FROM analytics.t FINAL ORDER BY id"),
        "3\ty\t\\N\n4\tz\t7"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_stops_the_sink_with_the_reason() {
    let ch = ClickHouse::start();
    let mut h = Harness::new();
    let r = rel(
        1,
        "money",
        b'd',
        &[("id", "integer", true), ("amount", "numeric(5,2)", false)],
    );
    let keyless = rel(2, "loose", b'n', &[("a", "integer", false)]);
    let last = h
        .push(vec![
            txn(1, &[&r], vec![ins(1, &[Some("1"), Some("1.50")])]),
            // NaN has no Decimal form: ClickHouse refuses the row.
            txn(2, &[&r], vec![ins(1, &[Some("2"), Some("NaN")])]),
        ])
        .await;
    let s = start(cfg("refuse", &ch), &h);
    let err = wait_stopped(&s.status).await;
    assert!(
        err.contains("analytics") && err.contains("money") && err.contains("Code: "),
        "{err}"
    );
    // The good transaction before it got through; the bad one did not.
    assert_eq!(s.status.applied_seq(), last - 1);
    assert_eq!(ch.query("SELECT id FROM analytics.money FINAL"), "1");
    s.stop().await;
    // A table without a key cannot be versioned: refused with a clear error.
    let mut h = Harness::new();
    h.push(vec![txn(1, &[&keyless], vec![ins(2, &[Some("1")])])])
        .await;
    let s = start(cfg("keyless", &ch), &h);
    let err = wait_stopped(&s.status).await;
    assert!(
        err.contains("public.loose has no replica identity key"),
        "{err}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_retried_until_it_is_fixed() {
    let ch = ClickHouse::start_with(Some("s3cret"));
    let mut h = Harness::new();
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "wrong\n").unwrap();
    let r = rel(1, "p", b'd', &[("id", "integer", true)]);
    let last = h
        .push(vec![txn(1, &[&r], vec![ins(1, &[Some("1")])])])
        .await;
    let mut c = cfg("pw", &ch);
    c.password_file = Some(pw.clone());
    let s = start(c, &h);
    let err = wait_error(&s.status).await;
    assert!(
        err.contains("516") || err.contains("Authentication failed"),
        "{err}"
    );
    // Retried (between attempts, or connecting again), nothing committed.
    assert!(
        matches!(s.status.state(), State::Retrying | State::Starting),
        "{:?}",
        s.status.view()
    );
    assert_eq!(s.status.applied_seq(), 0);
    std::fs::write(&pw, "s3cret\n").unwrap();
    wait_applied(&s.status, last).await;
    assert_eq!(ch.query("SELECT count() FROM analytics.p FINAL"), "1");
    s.stop().await;
}
