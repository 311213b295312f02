//! The sink against real PostgreSQL targets, fed with hand-made records.

use std::sync::Arc;
use std::time::{Duration, Instant};

use relay_proto::cdc::{Event, OldRow, Record, SnapshotPhase, Value};
use routy_e2e::{Pg, PgOpts};

use super::PgSinkConfig;
use crate::cdc::sink::testkit::*;
use crate::cdc::sink::SinkKind;
use crate::cdc::store::Store;

fn dsn_cfg(dsn: &str) -> PgSinkConfig {
    PgSinkConfig {
        name: "s".into(),
        source: "t/s".into(),
        dsn: dsn.into(),
        create_tables: true,
        schema: None,
        transaction_chunk_rows: None,
    }
}

fn cfg(name: &str, pg: &Pg) -> PgSinkConfig {
    PgSinkConfig {
        name: name.into(),
        source: "t/s".into(),
        dsn: pg.conninfo(),
        create_tables: true,
        schema: None,
        transaction_chunk_rows: None,
    }
}

fn start(cfg: PgSinkConfig, store: &Arc<Store>) -> Running {
    // A transactional sink keeps no position file: the root is never written.
    start_kind(&cfg.name.clone(), SinkKind::Postgres(cfg), store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applies_rows_by_key_and_creates_tables() {
    let pg = Pg::start(PgOpts::default());
    let mut h = Harness::new();
    let acc = rel(
        1,
        "acc",
        b'd',
        &[
            ("id", "integer", true),
            ("name", "text", false),
            ("n", "bigint", false),
        ],
    );
    let two = rel(
        2,
        "Two \"keys\"",
        b'd',
        &[
            ("a", "integer", true),
            ("b", "text", true),
            ("v", "text", false),
        ],
    );
    let last = h
        .push(vec![
            txn(
                1,
                &[&acc, &two],
                vec![
                    ins(1, &[Some("1"), Some("one"), Some("10")]),
                    ins(1, &[Some("2"), Some("two"), Some("20")]),
                    ins(1, &[Some("3"), Some("three"), None]),
                    ins(2, &[Some("1"), Some("x"), Some("v1")]),
                    ins(2, &[Some("1"), Some("y"), Some("v2")]),
                ],
            ),
            txn(
                2,
                &[&acc, &two],
                vec![
                    Event::Update {
                        rel: 1,
                        old: None,
                        new: vec![t("1"), t("uno"), t("11")],
                    },
                    // Key change: old key given.
                    Event::Update {
                        rel: 1,
                        old: Some(OldRow {
                            key_only: true,
                            values: vec![t("2"), Value::Null, Value::Null],
                        }),
                        new: vec![t("22"), t("two"), t("20")],
                    },
                    Event::Delete {
                        rel: 1,
                        old: OldRow {
                            key_only: true,
                            values: vec![t("3"), Value::Null, Value::Null],
                        },
                    },
                    Event::Update {
                        rel: 2,
                        old: None,
                        new: vec![t("1"), t("y"), t("v2b")],
                    },
                    Event::Delete {
                        rel: 2,
                        old: OldRow {
                            key_only: true,
                            values: vec![t("1"), t("x"), Value::Null],
                        },
                    },
                    // The same key inserted twice in one transaction (upsert, batch split).
                    ins(1, &[Some("5"), Some("five"), None]),
                    ins(1, &[Some("5"), Some("FIVE"), Some("55")]),
                ],
            ),
        ])
        .await;
    let s = start(cfg("main", &pg), &h.store);
    wait_applied(&s.status, last).await;
    assert_eq!(
        pg.psql("SELECT id, name, n FROM public.acc ORDER BY id"),
        "1|uno|11\n5|FIVE|55\n22|two|20"
    );
    assert_eq!(
        pg.psql("SELECT a, b, v FROM public.\"Two \"\"keys\"\"\" ORDER BY b"),
        "1|y|v2b"
    );
    // The primary keys came from the relation.
    assert_eq!(
        pg.psql(
            "SELECT string_agg(a.attname, ',' ORDER BY a.attname) FROM pg_index i \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indisprimary AND i.indrelid = '\"Two \"\"keys\"\"\"'::regclass"
        ),
        "a,b"
    );
    assert_eq!(
        pg.psql("SELECT seq, lsn, source FROM _routy.sink_offsets WHERE sink = 'main'"),
        format!("{last}|0/{:X}|t/s", 2 * 100 + 8)
    );
    // Truncate of a known table.
    let last = h
        .push(vec![txn(
            3,
            &[&acc],
            vec![Event::Truncate {
                rels: vec![1],
                cascade: false,
                restart_identity: true,
            }],
        )])
        .await;
    wait_applied(&s.status, last).await;
    assert_eq!(pg.psql("SELECT count(*) FROM public.acc"), "0");
    assert!(s.status.up());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_override_and_existing_tables() {
    let pg = Pg::start(PgOpts::default());
    let mut h = Harness::new();
    let r = rel(
        1,
        "items",
        b'i',
        &[("id", "bigint", true), ("v", "", false)],
    );
    let last = h
        .push(vec![txn(
            1,
            &[&r],
            vec![ins(1, &[Some("7"), Some("seven")])],
        )])
        .await;
    let mut c = cfg("ovr", &pg);
    c.schema = Some("Copy".into());
    let s = start(c, &h.store);
    wait_applied(&s.status, last).await;
    assert_eq!(pg.psql("SELECT id, v FROM \"Copy\".items"), "7|seven");
    // Unknown type became text.
    assert_eq!(
        pg.psql("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = '\"Copy\".items'::regclass AND attname = 'v'"),
        "text"
    );
    s.stop().await;
    // Without create_tables a missing table is an error that is retried, not skipped.
    let mut c = cfg("strict", &pg);
    c.create_tables = false;
    let s = start(c, &h.store);
    let t0 = Instant::now();
    while s.status.last_error().is_none() {
        assert!(t0.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let err = s.status.last_error().unwrap();
    assert!(err.contains("public.items does not exist"), "{err}");
    assert_eq!(s.status.applied_seq(), 0);
    // Create it (with an extra column) and the sink catches up.
    pg.psql("CREATE TABLE public.items (id bigint PRIMARY KEY, v text, extra int DEFAULT 3)");
    wait_applied(&s.status, last).await;
    assert_eq!(
        pg.psql("SELECT id, v, extra FROM public.items"),
        "7|seven|3"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn types_round_trip_as_text() {
    let pg = Pg::start(PgOpts::default());
    let mut h = Harness::new();
    let cols: &[(&str, &str, Option<&str>)] = &[
        ("i2", "smallint", Some("-32768")),
        ("i4", "integer", Some("2147483647")),
        ("i8", "bigint", Some("-9223372036854775808")),
        ("num", "numeric(12,2)", Some("1234567890.12")),
        ("txt", "text", Some("héllo wörld ✓ 'quoted' \"dq\" \\ back")),
        ("bin", "bytea", Some("\\x00ff10")),
        ("js", "json", Some("{\"b\": 1,  \"a\": [1, 2]}")),
        ("jsb", "jsonb", Some("{\"a\": [1, 2], \"b\": 1}")),
        ("ia", "integer[]", Some("{1,2,NULL,4}")),
        ("ta", "text[]", Some("{a,\"b c\",\"d,e\"}")),
        ("u", "uuid", Some("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")),
        (
            "ts",
            "timestamp with time zone",
            Some("2024-02-29 12:34:56.789+00"),
        ),
        ("d", "date", Some("2024-02-29")),
        ("b", "boolean", Some("true")),
        ("nul", "text", None),
        ("f8", "double precision", Some("0.1")),
        ("iv", "interval", Some("1 day 02:03:04")),
    ];
    let mut spec: Vec<(&str, &str, bool)> = vec![("id", "integer", true)];
    spec.extend(cols.iter().map(|(n, ty, _)| (*n, *ty, false)));
    let r = rel(1, "types", b'd', &spec);
    let mut vals = vec![Some("1")];
    vals.extend(cols.iter().map(|c| c.2));
    let last = h.push(vec![txn(1, &[&r], vec![ins(1, &vals)])]).await;
    let s = start(cfg("types", &pg), &h.store);
    wait_applied(&s.status, last).await;
    pg.psql("SET TimeZone = 'UTC'");
    for (name, _, want) in cols {
        let got = pg.psql(&format!(
            "SET TimeZone = 'UTC'; SELECT coalesce({name}::text, '<null>') FROM public.types"
        ));
        assert_eq!(got, want.unwrap_or("<null>"), "column {name}");
    }
    // Updates and deletes through the same types (the row matched by key).
    let last = h
        .push(vec![txn(
            2,
            &[&r],
            vec![Event::Delete {
                rel: 1,
                old: OldRow {
                    key_only: true,
                    values: {
                        let mut v = vec![t("1")];
                        v.extend(cols.iter().map(|_| Value::Null));
                        v
                    },
                },
            }],
        )])
        .await;
    wait_applied(&s.status, last).await;
    assert_eq!(pg.psql("SELECT count(*) FROM public.types"), "0");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toast_keeps_the_old_value() {
    let pg = Pg::start(PgOpts::default());
    let mut h = Harness::new();
    let r = rel(
        1,
        "docs",
        b'd',
        &[
            ("id", "integer", true),
            ("body", "text", false),
            ("n", "integer", false),
        ],
    );
    let big = "x".repeat(100_000);
    h.push(vec![txn(
        1,
        &[&r],
        vec![ins(1, &[Some("1"), Some(&big), Some("1")])],
    )])
    .await;
    let last = h
        .push(vec![txn(
            2,
            &[&r],
            vec![Event::Update {
                rel: 1,
                old: None,
                new: vec![t("1"), Value::Unchanged, t("2")],
            }],
        )])
        .await;
    let s = start(cfg("toast", &pg), &h.store);
    wait_applied(&s.status, last).await;
    assert_eq!(
        pg.psql("SELECT length(body), n FROM public.docs"),
        "100000|2"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_identity_without_key_changes_one_row() {
    let pg = Pg::start(PgOpts::default());
    let mut h = Harness::new();
    // REPLICA IDENTITY FULL marks every column as key; still applied by old values.
    let r = rel(
        1,
        "dups",
        b'f',
        &[
            ("a", "integer", true),
            ("b", "text", true),
            ("j", "json", true),
        ],
    );
    let row = [Some("1"), None, Some("{\"k\": 1}")];
    let old = OldRow {
        key_only: false,
        values: vec![t("1"), Value::Null, t("{\"k\": 1}")],
    };
    let last = h
        .push(vec![
            txn(1, &[&r], vec![ins(1, &row), ins(1, &row), ins(1, &row)]),
            txn(
                2,
                &[&r],
                vec![
                    Event::Update {
                        rel: 1,
                        old: Some(old.clone()),
                        new: vec![t("2"), t("b"), t("{\"k\": 2}")],
                    },
                    Event::Delete {
                        rel: 1,
                        old: old.clone(),
                    },
                    // Nothing matches: counted, skipped.
                    Event::Delete {
                        rel: 1,
                        old: OldRow {
                            key_only: false,
                            values: vec![t("9"), Value::Null, Value::Null],
                        },
                    },
                ],
            ),
        ])
        .await;
    let s = start(cfg("full", &pg), &h.store);
    wait_applied(&s.status, last).await;
    assert_eq!(
        pg.psql("SELECT a, coalesce(b, '-'), j::text FROM public.dups ORDER BY a"),
        "1|-|{\"k\": 1}\n2|b|{\"k\": 2}"
    );
    // No primary key was made from the "key" flags of a FULL identity.
    assert_eq!(
        pg.psql("SELECT count(*) FROM pg_index WHERE indrelid = 'public.dups'::regclass"),
        "0"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_transaction_is_discarded() {
    let pg = Pg::start(PgOpts::default());
    let mut h = Harness::new();
    let r = rel(
        1,
        "log",
        b'n',
        &[("xid", "integer", false), ("what", "text", false)],
    );
    let last = h
        .push(vec![
            txn(1, &[&r], vec![ins(1, &[Some("1"), Some("ok")])]),
            // Transaction 2 starts, spans a record, and is cut off.
            Record {
                lsn: 0,
                events: vec![
                    begin(2),
                    Event::Relation(r.clone()),
                    ins(1, &[Some("2"), Some("partial")]),
                ],
            },
            Record {
                lsn: 0,
                events: vec![
                    Event::Relation(r.clone()),
                    ins(1, &[Some("2"), Some("partial")]),
                ],
            },
            // It comes again whole.
            txn(
                2,
                &[&r],
                vec![
                    ins(1, &[Some("2"), Some("whole")]),
                    ins(1, &[Some("2"), Some("whole")]),
                ],
            ),
            txn(3, &[&r], vec![ins(1, &[Some("3"), Some("ok")])]),
        ])
        .await;
    let s = start(cfg("cut", &pg), &h.store);
    wait_applied(&s.status, last).await;
    assert_eq!(
        pg.psql("SELECT xid, what, count(*) FROM public.log GROUP BY 1, 2 ORDER BY 1"),
        "1|ok|1\n2|whole|2\n3|ok|1"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_after_a_cut_off_transaction_is_kept() {
    // relay-inner stopped inside a large transaction (partial records spooled); after its
    // restart it copies a newly added table and then sends the transaction again whole.
    let pg = Pg::start(PgOpts::default());
    let mut h = Harness::new();
    let log = rel(
        1,
        "log",
        b'n',
        &[("xid", "integer", false), ("what", "text", false)],
    );
    let fresh = rel(
        2,
        "fresh",
        b'd',
        &[("id", "integer", true), ("v", "text", false)],
    );
    let partial = |first: bool| {
        let mut events = if first { vec![begin(2)] } else { vec![] };
        events.push(Event::Relation(log.clone()));
        events.push(ins(1, &[Some("2"), Some("partial")]));
        Record { lsn: 0, events }
    };
    let snap = |phase, value| Record {
        lsn: 0,
        events: vec![
            Event::Relation(fresh.clone()),
            Event::Snapshot {
                rel: 2,
                phase,
                value,
            },
        ],
    };
    let last = h
        .push(vec![
            txn(1, &[&log], vec![ins(1, &[Some("1"), Some("ok")])]),
            partial(true),
            partial(false),
            snap(SnapshotPhase::Start, 0),
            Record {
                lsn: 0,
                events: vec![
                    Event::Relation(fresh.clone()),
                    ins(2, &[Some("1"), Some("a")]),
                    ins(2, &[Some("2"), Some("b")]),
                ],
            },
            snap(SnapshotPhase::Done, 2),
            // A non-transactional message after another cut-off start is kept too.
            partial(true),
            Record {
                lsn: 0,
                events: vec![Event::Message {
                    transactional: false,
                    lsn: 150,
                    prefix: "app".into(),
                    content: b"hi".to_vec(),
                }],
            },
            txn(
                2,
                &[&log, &fresh],
                vec![
                    ins(1, &[Some("2"), Some("whole")]),
                    ins(2, &[Some("3"), Some("c")]),
                ],
            ),
            txn(3, &[&log], vec![ins(1, &[Some("3"), Some("ok")])]),
        ])
        .await;
    let s = start(cfg("cutsnap", &pg), &h.store);
    wait_applied(&s.status, last).await;
    assert_eq!(
        pg.psql("SELECT xid, what, count(*) FROM public.log GROUP BY 1, 2 ORDER BY 1"),
        "1|ok|1\n2|whole|1\n3|ok|1"
    );
    assert_eq!(
        pg.psql("SELECT string_agg(id || '=' || v, ',' ORDER BY id) FROM public.fresh"),
        "1=a,2=b,3=c"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_without_its_start_is_reported() {
    let pg = Pg::start(PgOpts::default());
    let mut h = Harness::new();
    // The store joined the stream at seq 5 (records 1..4 were removed from the spool).
    assert_eq!(h.store.next_seq_for(5, 6).unwrap(), 5);
    h.next = 5;
    let r = rel(1, "late", b'd', &[("id", "integer", true)]);
    let last = h
        .push(vec![
            txn(1, &[&r], vec![ins(1, &[Some("1")])]),
            txn(2, &[&r], vec![ins(1, &[Some("2")])]),
        ])
        .await;
    let s = start(cfg("gap", &pg), &h.store);
    wait_applied(&s.status, last).await;
    assert_eq!(pg.psql("SELECT count(*) FROM public.late"), "2");
    let err = s.status.last_error().expect("the gap is reported");
    assert!(
        err.contains("records 1..4 are no longer in the store"),
        "{err}"
    );
    assert!(err.contains("cdc drop-slot"), "{err}");
    s.stop().await;
    // With a position, a restart reports nothing.
    let s = start(cfg("gap", &pg), &h.store);
    wait_applied(&s.status, last).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(s.status.last_error(), None);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_name_holding_another_sources_position_is_refused() {
    let pg = Pg::start(PgOpts::default());
    let mut h = Harness::new();
    let r = rel(1, "owned", b'd', &[("id", "integer", true)]);
    let last = h
        .push(vec![txn(1, &[&r], vec![ins(1, &[Some("1")])])])
        .await;
    let s = start(cfg("named", &pg), &h.store);
    wait_applied(&s.status, last).await;
    s.stop().await;
    // The same sink name re-pointed at another source.
    let mut c = cfg("named", &pg);
    c.source = "t/other".into();
    let s = start(c, &h.store);
    let t0 = Instant::now();
    while s.status.last_error().is_none() {
        assert!(t0.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let err = s.status.last_error().unwrap();
    assert!(
        err.contains("sink name named already holds the position of source t/s"),
        "{err}"
    );
    assert!(err.contains("_routy.sink_offsets"), "{err}");
    assert_eq!(s.status.applied_seq(), 0);
    s.stop().await;
    assert_eq!(
        pg.psql("SELECT seq, source FROM _routy.sink_offsets WHERE sink = 'named'"),
        format!("{last}|t/s")
    );
    // A row without a position yet is simply taken over.
    pg.psql("INSERT INTO _routy.sink_offsets (sink, seq, source) VALUES ('fresh', 0, 't/gone')");
    let s = start(cfg("fresh", &pg), &h.store);
    wait_applied(&s.status, last).await;
    s.stop().await;
    assert_eq!(
        pg.psql("SELECT seq, source FROM _routy.sink_offsets WHERE sink = 'fresh'"),
        format!("{last}|t/s")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_across_crashes() {
    let pg = Pg::start(PgOpts::default());
    let mut h = Harness::new();
    let r = rel(
        1,
        "log",
        b'n',
        &[("xid", "integer", false), ("i", "integer", false)],
    );
    // 300 transactions of 3 rows each, some spanning two records.
    let mut recs = Vec::new();
    for x in 1..=300u32 {
        let rows: Vec<Event> = (0..3)
            .map(|i| ins(1, &[Some(&x.to_string()), Some(&i.to_string())]))
            .collect();
        if x % 3 == 0 {
            recs.push(Record {
                lsn: 0,
                events: vec![begin(x), Event::Relation(r.clone()), rows[0].clone()],
            });
            let mut ev = vec![Event::Relation(r.clone())];
            ev.extend(rows[1..].iter().cloned());
            ev.push(commit(x));
            recs.push(Record {
                lsn: x as u64,
                events: ev,
            });
        } else {
            recs.push(txn(x, &[&r], rows));
        }
    }
    let mut last = 0;
    for chunk in recs.chunks(20) {
        last = h.push(chunk.to_vec()).await;
    }
    // Start and kill the sink repeatedly (dropping its task mid-stream), then stop it.
    for round in 0..6 {
        let s = start(cfg("once", &pg), &h.store);
        tokio::time::sleep(Duration::from_millis(150 + round * 40)).await;
        s.task.abort();
        let _ = s.task.await;
    }
    let s = start(cfg("once", &pg), &h.store);
    wait_applied(&s.status, last).await;
    s.stop().await;
    assert_eq!(
        pg.psql("SELECT count(*), count(DISTINCT (xid, i)), min(xid), max(xid) FROM public.log"),
        "900|900|1|300"
    );
    assert_eq!(
        pg.psql("SELECT seq FROM _routy.sink_offsets WHERE sink = 'once'"),
        last.to_string()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_down_then_back() {
    let mut pg = Pg::start(PgOpts::default());
    let mut h = Harness::new();
    let r = rel(
        1,
        "kv",
        b'd',
        &[("k", "integer", true), ("v", "text", false)],
    );
    let first = h
        .push(vec![txn(1, &[&r], vec![ins(1, &[Some("1"), Some("a")])])])
        .await;
    let s = start(cfg("down", &pg), &h.store);
    wait_applied(&s.status, first).await;
    pg.stop();
    let last = h
        .push(vec![txn(2, &[&r], vec![ins(1, &[Some("2"), Some("b")])])])
        .await;
    let t0 = Instant::now();
    while s.status.last_error().is_none() || s.status.up() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no error while the target is down"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("while down: {:?}", s.status.view());
    pg.restart();
    wait_applied(&s.status, last).await;
    assert!(s.status.up());
    assert_eq!(
        pg.psql("SELECT string_agg(v, ',' ORDER BY k) FROM public.kv"),
        "a,b"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_sink_holds_back_no_other() {
    let pg_a = Pg::start(PgOpts::default());
    let pg_b = Pg::start(PgOpts::default());
    let mut h = Harness::new();
    pg_a.psql("CREATE TABLE public.kv (k integer PRIMARY KEY, v integer CHECK (v < 100))");
    let r = rel(
        1,
        "kv",
        b'd',
        &[("k", "integer", true), ("v", "integer", false)],
    );
    let mut recs = Vec::new();
    for x in 1..=50u32 {
        recs.push(txn(
            x,
            &[&r],
            vec![ins(1, &[Some(&x.to_string()), Some(&(x * 3).to_string())])],
        ));
    }
    let last = h.push(recs).await;
    let a = start(cfg("a", &pg_a), &h.store);
    let b = start(cfg("b", &pg_b), &h.store);
    wait_applied(&b.status, last).await;
    // Under load the first failure may be another one (a slow connect); wait for the
    // constraint error itself.
    let t0 = Instant::now();
    while !a.status.last_error().is_some_and(|e| e.contains("23514")) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no constraint error: {:?}",
            a.status.last_error()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(a.status.applied_seq() < last);
    // On retry, sink a applies everything before the bad row and stops there.
    wait_applied(&a.status, 33).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(a.status.applied_seq(), 33);
    // It keeps failing: between retries it is down (it may be up for a moment while it
    // reconnects, so wait for that).
    let t0 = Instant::now();
    while a.status.up() {
        assert!(t0.elapsed() < Duration::from_secs(30), "sink a stays up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(pg_a.psql("SELECT max(k) FROM public.kv"), "33");
    pg_a.psql("ALTER TABLE public.kv DROP CONSTRAINT kv_v_check");
    wait_applied(&a.status, last).await;
    assert_eq!(
        pg_a.psql("SELECT count(*), sum(v) FROM public.kv"),
        "50|3825"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_copy_and_a_big_transaction() {
    let pg = Pg::start(PgOpts::default());
    let mut h = Harness::new();
    let r = rel(
        1,
        "big",
        b'd',
        &[
            ("id", "bigint", true),
            ("name", "text", false),
            ("amount", "numeric(12,2)", false),
            ("at", "timestamp with time zone", false),
        ],
    );
    const ROWS: u32 = 100_000;
    const PER_RECORD: u32 = 500;
    let row = |i: u32| {
        ins(
            1,
            &[
                Some(&i.to_string()),
                Some(&format!("name {i}")),
                Some(&format!("{}.{:02}", i, i % 100)),
                Some("2024-01-01 00:00:00+00"),
            ],
        )
    };
    // An initial copy of 10 000 rows (outside transactions), with a stale row to clear.
    pg.psql("CREATE TABLE public.big (id bigint PRIMARY KEY, name text, amount numeric(12,2), at timestamptz)");
    pg.psql("INSERT INTO public.big VALUES (-1, 'stale', 0, now())");
    let mut recs = vec![Record {
        lsn: 0,
        events: vec![
            Event::Relation(r.clone()),
            Event::Snapshot {
                rel: 1,
                phase: SnapshotPhase::Start,
                value: 0,
            },
        ],
    }];
    for c in 0..20 {
        let mut ev = vec![Event::Relation(r.clone())];
        ev.extend((0..PER_RECORD).map(|i| row(c * PER_RECORD + i)));
        recs.push(Record { lsn: 0, events: ev });
    }
    recs.push(Record {
        lsn: 0,
        events: vec![
            Event::Relation(r.clone()),
            Event::Snapshot {
                rel: 1,
                phase: SnapshotPhase::Done,
                value: 10_000,
            },
        ],
    });
    let snap_last = h.push(recs).await;
    let t0 = Instant::now();
    let s = start(cfg("big", &pg), &h.store);
    wait_applied(&s.status, snap_last).await;
    let el = t0.elapsed();
    eprintln!(
        "initial copy: 10000 rows in {el:?} ({:.0} rows/s)",
        10_000.0 / el.as_secs_f64()
    );
    assert_eq!(
        pg.psql("SELECT count(*), min(id) FROM public.big"),
        "10000|0"
    );
    // One transaction of 100 000 rows over 200 records (ids overlap the copy: upserts).
    let mut recs = Vec::new();
    for c in 0..ROWS / PER_RECORD {
        let mut ev = vec![];
        if c == 0 {
            ev.push(begin(7));
        }
        ev.push(Event::Relation(r.clone()));
        ev.extend((0..PER_RECORD).map(|i| row(c * PER_RECORD + i)));
        if c == ROWS / PER_RECORD - 1 {
            ev.push(commit(7));
        }
        recs.push(Record { lsn: 0, events: ev });
    }
    let t0 = Instant::now();
    let last = h.push(recs).await;
    wait_applied(&s.status, last).await;
    let el = t0.elapsed();
    eprintln!(
        "one transaction of {ROWS} rows: applied in {el:?} ({:.0} rows/s)",
        ROWS as f64 / el.as_secs_f64()
    );
    let cents: u64 = (0..ROWS as u64).map(|i| i * 100 + i % 100).sum();
    assert_eq!(
        pg.psql("SELECT count(*), sum(amount) FROM public.big"),
        format!("{ROWS}|{}.{:02}", cents / 100, cents % 100)
    );
    s.stop().await;
}

#[test]
fn the_target_dsn_is_read_in_either_form() {
    use routy_pg::tls::SslMode;
    for dsn in [
        "host=h port=5 user=u dbname=d sslmode=require password='x y\\'z'",
        "postgresql://u:x%20y'z@h:5/d?sslmode=require",
    ] {
        let c = dsn_cfg(dsn);
        let (pc, _tls) = super::target_config(&c).unwrap();
        assert_eq!(pc.get_user(), Some("u"), "{dsn}");
        assert_eq!(pc.get_dbname(), Some("d"));
        assert_eq!(pc.get_ports(), &[5]);
        assert_eq!(pc.get_password(), Some(&b"x y'z"[..]));
        assert_eq!(pc.get_application_name(), Some("routy sink s"));
        assert_eq!(
            routy_pg::dsn::parse(dsn).unwrap().sslmode().unwrap(),
            SslMode::Require
        );
    }
    for bad in ["host=h sslmode=bogus", "postgres://h/db?sslrootcert=%zz"] {
        let c = dsn_cfg(bad);
        let e = super::target_config(&c).unwrap_err();
        assert!(e.contains("connection string"), "{bad}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_running_one_sink_apply_each_transaction_once() {
    let pg = Pg::start(PgOpts::default());
    let mut h = Harness::new();
    let r = rel(1, "log", b'n', &[("xid", "integer", false)]);
    let a = start(cfg("twin", &pg), &h.store);
    let b = start(cfg("twin", &pg), &h.store);
    let mut last = 0;
    for x in 1..=200u32 {
        last = h
            .push(vec![txn(x, &[&r], vec![ins(1, &[Some(&x.to_string())])])])
            .await;
        if x % 20 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let t0 = Instant::now();
    while pg.psql("SELECT seq FROM _routy.sink_offsets WHERE sink = 'twin'") != last.to_string() {
        assert!(t0.elapsed() < Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.stop().await;
    b.stop().await;
    assert_eq!(
        pg.psql("SELECT count(*), count(DISTINCT xid) FROM public.log"),
        "200|200"
    );
}

/// A source transaction of 1000 rows in 10 records: with `transaction_chunk_rows` the
/// target shows its applied part and the offset row points inside it before the commit
/// has arrived; a restart resumes after the last part, and every row is there once.
/// Without the key, nothing shows until the commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_transaction_is_applied_in_chunks_when_configured() {
    let pg = Pg::start(PgOpts::default());
    let mut h = Harness::new();
    let r = rel(
        1,
        "big",
        b'd',
        &[("id", "bigint", true), ("v", "text", false)],
    );
    let recs: Vec<Record> = (0..10u32)
        .map(|k| {
            let mut events = Vec::new();
            if k == 0 {
                events.push(begin(9));
            }
            // Every record describes the tables it uses.
            events.push(Event::Relation(r.clone()));
            for n in k * 100..(k + 1) * 100 {
                events.push(ins(1, &[Some(&n.to_string()), Some("x")]));
            }
            if k == 9 {
                events.push(commit(9));
            }
            Record {
                lsn: if k == 9 { 908 } else { 0 },
                events,
            }
        })
        .collect();
    let mid = h.push(recs[..6].to_vec()).await;
    let mut c = cfg("chunked", &pg);
    c.transaction_chunk_rows = Some(250);
    let s = start(c.clone(), &h.store);
    let t0 = Instant::now();
    // Parts end at a record's end once 250 rows are in: after records 3 and 6.
    // The offset row holds the last seq applied.
    let at_6 = "SELECT count(*) FROM _routy.sink_offsets WHERE sink = 'chunked' AND seq = 6";
    while pg.psql("SELECT to_regclass('_routy.sink_offsets') IS NOT NULL") != "t"
        || pg.psql(at_6) != "1"
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{:?}",
            s.status.view()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(mid, 6);
    assert_eq!(pg.psql("SELECT count(*) FROM public.big"), "600");
    s.stop().await;
    let whole = cfg("whole", &pg);
    let mut whole = whole;
    whole.schema = Some("w".into());
    let w = start(whole.clone(), &h.store);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        pg.psql("SELECT count(*) FROM pg_tables WHERE schemaname = 'w' AND tablename = 'big'"),
        "0",
        "one target transaction: nothing before the commit"
    );
    let last = h.push(recs[6..].to_vec()).await;
    wait_applied(&w.status, last).await;
    assert_eq!(pg.psql("SELECT count(*) FROM w.big"), "1000");
    w.stop().await;
    let s = start(c, &h.store);
    wait_applied(&s.status, last).await;
    assert_eq!(
        pg.psql("SELECT count(*), count(DISTINCT id), min(id), max(id) FROM public.big"),
        "1000|1000|0|999"
    );
    assert_eq!(
        pg.psql("SELECT seq, lsn FROM _routy.sink_offsets WHERE sink = 'chunked'"),
        "10|0/38C"
    );
    s.stop().await;
}

/// An initial copy the target refuses in the middle of its open COPY (a row breaks a
/// constraint, after several pieces were handed over): the error names the table, the
/// whole batch is rolled back, and once the target is fixed the copy goes in whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_refused_midway_is_rolled_back_and_applied_once_fixed() {
    let pg = Pg::start(PgOpts::default());
    let mut h = Harness::new();
    let r = rel(
        1,
        "copied",
        b'd',
        &[("id", "bigint", true), ("pad", "text", false)],
    );
    pg.psql("CREATE TABLE public.copied (id bigint PRIMARY KEY, pad text CHECK (pad <> 'bad'))");
    let snap = |phase, value| Event::Snapshot {
        rel: 1,
        phase,
        value,
    };
    // 20 000 rows of about 70 bytes: several 256 KiB pieces before the bad row.
    let mut recs = vec![Record {
        lsn: 0,
        events: vec![Event::Relation(r.clone()), snap(SnapshotPhase::Start, 0)],
    }];
    for c in 0..20u32 {
        let mut ev = vec![Event::Relation(r.clone())];
        for i in c * 1000..(c + 1) * 1000 {
            let pad = if i == 19_990 {
                "bad".to_string()
            } else {
                format!("{i:064}")
            };
            ev.push(ins(1, &[Some(&i.to_string()), Some(&pad)]));
        }
        recs.push(Record { lsn: 0, events: ev });
    }
    recs.push(Record {
        lsn: 0,
        events: vec![
            Event::Relation(r.clone()),
            snap(SnapshotPhase::Done, 20_000),
        ],
    });
    let last = h.push(recs).await;
    let s = start(cfg("copy", &pg), &h.store);
    let err = wait_error(&s.status).await;
    assert!(
        err.contains("rows into public.copied") && err.contains("copied_pad_check"),
        "{err}"
    );
    // The sink keeps retrying (with backoff), and a retry may commit the records before
    // the refused one. Whenever it is looked at, in one snapshot of the target, the table
    // holds exactly the rows of the records up to the committed position: never a part
    // of a refused attempt, never the refused record.
    for _ in 0..5 {
        let seen = pg.psql(
            "SELECT (SELECT count(*) FROM public.copied), \
             coalesce((SELECT seq FROM _routy.sink_offsets WHERE sink = 'copy'), 0)",
        );
        let (rows, seq) = seen.split_once('|').expect("two columns");
        let (rows, seq): (u64, u64) = (rows.parse().unwrap(), seq.parse().unwrap());
        assert!(seq < last - 1, "the refused record is not applied: {seen}");
        assert_eq!(rows, 1000 * seq.saturating_sub(1), "rows|seq = {seen}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pg.psql("ALTER TABLE public.copied DROP CONSTRAINT copied_pad_check");
    wait_applied(&s.status, last).await;
    assert_eq!(
        pg.psql("SELECT count(*), count(DISTINCT id), count(*) FILTER (WHERE pad = 'bad') FROM public.copied"),
        "20000|20000|1"
    );
    s.stop().await;
}

/// A table the sink creates for its initial copy gets its primary key once the copy's
/// rows are in (built once, not kept up to date row by row); a copy cut off by a restart
/// of the sink gets the key before the first row that needs it (the rows after a restart
/// are upserts), and the key then holds rows to one per id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_created_for_its_copy_gets_its_key_after_the_rows() {
    let pg = Pg::start(PgOpts::default());
    let mut h = Harness::new();
    let rels: Vec<_> = [(1, "fresh"), (2, "cut")]
        .iter()
        .map(|&(id, name)| {
            rel(
                id,
                name,
                b'd',
                &[("id", "bigint", true), ("pad", "text", false)],
            )
        })
        .collect();
    let snap = |rel, phase, value| Event::Snapshot { rel, phase, value };
    // Blocks of COPY text as relay-inner carries a copy's rows (a tab escaped, every
    // tenth pad NULL).
    let rows = |r: &relay_proto::cdc::Relation, from: u32, to: u32| {
        let mut data = Vec::new();
        for i in from..to {
            if i % 10 == 0 {
                data.extend_from_slice(format!("{i}\t\\N\n").as_bytes());
            } else {
                data.extend_from_slice(format!("{i}\trow\\t{i}\n").as_bytes());
            }
        }
        Record {
            lsn: 0,
            events: vec![
                Event::Relation(r.clone()),
                Event::Rows {
                    rel: r.id,
                    rows: to - from,
                    data,
                },
            ],
        }
    };
    let marker = |r: &relay_proto::cdc::Relation, phase, value| Record {
        lsn: 0,
        events: vec![Event::Relation(r.clone()), snap(r.id, phase, value)],
    };
    let has_key = |t: &str| {
        pg.psql(&format!(
            "SELECT count(*) FILTER (WHERE indisprimary) FROM pg_index WHERE indrelid = 'public.{t}'::regclass"
        ))
    };
    // fresh: copied whole; cut: half of its copy, then the sink stops.
    let mut recs = vec![marker(&rels[0], SnapshotPhase::Start, 0)];
    recs.extend((0..4).map(|c| rows(&rels[0], c * 500, (c + 1) * 500)));
    recs.push(marker(&rels[0], SnapshotPhase::Done, 2000));
    recs.push(marker(&rels[1], SnapshotPhase::Start, 0));
    recs.extend((0..2).map(|c| rows(&rels[1], c * 500, (c + 1) * 500)));
    let half = h.push(recs).await;
    let c = cfg("keys", &pg);
    let s = start(c.clone(), &h.store);
    wait_applied(&s.status, half).await;
    s.stop().await;
    assert_eq!(pg.psql("SELECT count(*) FROM public.fresh"), "2000");
    assert_eq!(
        has_key("fresh"),
        "1",
        "the key is built when the copy is done"
    );
    assert_eq!(pg.psql("SELECT count(*) FROM public.cut"), "1000");
    assert_eq!(has_key("cut"), "0", "no key while the copy runs");
    // The rest of cut's copy after the restart (the first 500 rows again: upserts), then
    // a transaction that inserts an id both tables already have.
    let mut recs: Vec<Record> = (1..4)
        .map(|c| rows(&rels[1], c * 500, (c + 1) * 500))
        .collect();
    recs.push(marker(&rels[1], SnapshotPhase::Done, 2000));
    let mut tx = Record {
        lsn: 0,
        events: vec![
            begin(9),
            Event::Relation(rels[0].clone()),
            ins(1, &[Some("7"), Some("row\t7")]),
        ],
    };
    tx.events.push(Event::Relation(rels[1].clone()));
    tx.events.push(ins(2, &[Some("7"), Some("seven")]));
    tx.events.push(commit(9));
    recs.push(tx);
    let last = h.push(recs).await;
    let s = start(c, &h.store);
    wait_applied(&s.status, last).await;
    s.stop().await;
    assert_eq!(has_key("cut"), "1", "the key is built before the upserts");
    assert_eq!(
        pg.psql("SELECT count(*), count(DISTINCT id), min(id), max(id) FROM public.cut"),
        "2000|2000|0|1999"
    );
    assert_eq!(pg.psql("SELECT pad FROM public.cut WHERE id = 7"), "seven");
    for t in ["fresh", "cut"] {
        assert_eq!(
            pg.psql(&format!(
                "SELECT count(*), count(DISTINCT id), count(*) FILTER (WHERE pad IS NULL), \
                 count(*) FILTER (WHERE pad = 'row' || chr(9) || id) FROM public.{t}"
            )),
            if t == "cut" {
                "2000|2000|200|1799"
            } else {
                "2000|2000|200|1800"
            },
            "{t}"
        );
    }
}
