//! End-to-end resync: a target that drifted from the source (rows missing, wrong, extra)
//! gets the table copied again while the source keeps writing, chunk by chunk between
//! watermarks; relay-inner is killed in the middle and goes on where it was; the target is
//! never emptied, and at the end it equals the source row for row.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use routy_e2e::cdc::{CdcRig, RigOpts, CATCH_UP};
use routy_e2e::{require_root, try_wait_until};

const TABLE: &str = "public.r";
/// Even ids 2..=60000: the target's extra rows can sit between them.
const SETUP: &str = "CREATE TABLE public.r (id int PRIMARY KEY, v text, n int);\
    INSERT INTO public.r SELECT g * 2, md5(g::text), 0 FROM generate_series(1, 30000) g;";

/// Writes on the source while the resync runs: updates, upserts (some beyond the table's
/// end) and deletes of random rows.
const LOAD: &str = "\\set a random(1, 30000) * 2\n\
UPDATE public.r SET v = md5(random()::text), n = n + 1 WHERE id = :a;\n\
\\set b random(1, 40000) * 2\n\
INSERT INTO public.r VALUES (:b, 'new', 0) ON CONFLICT (id) DO UPDATE SET n = r.n + 1;\n\
\\set c random(1, 30000) * 2\n\
DELETE FROM public.r WHERE id = :c;\n\
\\sleep 2 ms\n";

fn resync_status(rig: &CdcRig) -> serde_json::Value {
    rig.inner().status()["cdc"]["sources"][0]["source"]["resync"].clone()
}

fn resync(rig: &CdcRig, table: &str) -> (bool, String) {
    let out = std::process::Command::new(routy_e2e::bin("relay-inner"))
        .args(["cdc", "resync", "--config"])
        .arg(&rig.inner().config)
        .args(["--source", "main", "--table", table])
        .output()
        .expect("relay-inner cdc resync");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn resync_replaces_a_drifted_table_while_writes_go_on_and_resumes_after_a_kill() {
    require_root();
    let mut rig = CdcRig::start(RigOpts {
        setup_sql: SETUP.into(),
        tables: vec![TABLE.into()],
        source_extra: "      resync_chunk_rows: 100\n      heartbeat: 1s\n".into(),
        ..RigOpts::default()
    });
    rig.wait_in_sync(&[TABLE], CATCH_UP);

    // The target drifts: rows gone, rows wrong, rows the source never had (between its
    // keys and beyond its last one).
    rig.target.psql(
        "DELETE FROM public.r WHERE id % 14 = 0; \
         UPDATE public.r SET v = 'wrong' WHERE id % 22 = 0; \
         INSERT INTO public.r SELECT g * 2 + 1, 'extra', 0 FROM generate_series(1, 30000, 97) g; \
         INSERT INTO public.r VALUES (900001, 'beyond', 0), (900003, 'beyond', 0)",
    );
    assert!(!rig.in_sync(&[TABLE]));

    // Refusals name what is wrong.
    let (ok, said) = resync(&rig, "public.nope");
    assert!(!ok && said.contains("does not forward table"), "{said}");

    // The target is never empty while the table is copied again.
    let stop = Arc::new(AtomicBool::new(false));
    let least = Arc::new(AtomicI64::new(i64::MAX));
    let watcher = {
        let (stop, least) = (stop.clone(), least.clone());
        let port = rig.target.port();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) =
                    routy_e2e::psql_at("127.0.0.1", port, "SELECT count(*) FROM public.r")
                {
                    if let Ok(n) = n.trim().parse::<i64>() {
                        least.fetch_min(n, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let load = rig.pgbench(LOAD, 2, 20);
    let (ok, said) = resync(&rig, TABLE);
    assert!(ok, "{said}");
    // Some chunks in, relay-inner dies; started again, it goes on from the last chunk.
    let st = rig
        .inner()
        .wait_status("a few resync chunks done", CATCH_UP, |st| {
            st["cdc"]["sources"][0]["source"]["resync"][0]["chunks"]
                .as_u64()
                .is_some_and(|c| c >= 5)
        });
    let before = st["cdc"]["sources"][0]["source"]["resync"][0]["chunks"]
        .as_u64()
        .unwrap();
    rig.kill_inner();
    std::thread::sleep(Duration::from_millis(300));
    rig.start_inner();
    let st = rig
        .inner()
        .wait_status("the resync goes on after the restart", CATCH_UP, |st| {
            st["cdc"]["sources"][0]["source"]["resync"][0]["table"] == TABLE
                || st["cdc"]["sources"][0]["source"]["resync"]
                    .as_array()
                    .is_some_and(|a| a.is_empty())
        });
    if let Some(c) = st["cdc"]["sources"][0]["source"]["resync"][0]["chunks"].as_u64() {
        assert!(c >= before, "started over: {c} chunks after {before}");
    }
    let out = load.finish();
    assert!(out.contains("number of failed transactions: 0"), "{out}");
    try_wait_until(CATCH_UP, "the resync is done", || {
        resync_status(&rig).as_array().is_some_and(|a| a.is_empty())
    })
    .unwrap_or_else(|e| panic!("{e}: {}", resync_status(&rig)));
    rig.wait_in_sync(&[TABLE], CATCH_UP);
    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    let least = least.load(Ordering::Relaxed);
    // The source itself shrinks under the load's deletes (to about 24 000 rows); a copy
    // that emptied the table first would show (near) zero.
    assert!(least > 20_000, "the target went down to {least} rows");
    assert!(
        rig.inner()
            .metric("routy_cdc_source_resync_chunks_total", &[("table", TABLE)])
            >= 1.0
    );
}

#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn a_chunk_never_overwrites_a_commit_its_read_could_not_see_yet() {
    require_root();
    let rig = CdcRig::start(RigOpts {
        setup_sql: "CREATE TABLE public.r (id int PRIMARY KEY, v text);\
            INSERT INTO public.r SELECT g, 'old' FROM generate_series(1, 300) g;"
            .into(),
        tables: vec![TABLE.into()],
        source_extra: "      resync_chunk_rows: 100\n".into(),
        ..RigOpts::default()
    });
    rig.wait_in_sync(&[TABLE], CATCH_UP);
    // A commit that waits for a synchronous standby that never answers is in the WAL, and
    // so in the stream and on the target, but invisible on the source until the wait is
    // cancelled: the widest form of the gap between a commit's record and its visibility.
    // The relay's own transactions do not wait (synchronous_commit local).
    rig.source.psql(
        "ALTER SYSTEM SET synchronous_commit = local; \
         ALTER SYSTEM SET synchronous_standby_names = 'routy_nobody'; SELECT pg_reload_conf()",
    );
    let (host, port) = (rig.source.host().to_string(), rig.source.port());
    let late = std::thread::spawn(move || {
        routy_e2e::psql_at(
            &host,
            port,
            "SET synchronous_commit = on; UPDATE public.r SET v = 'late' WHERE id = 150",
        )
    });
    let on_target = || rig.target.psql("SELECT v FROM public.r WHERE id = 150");
    try_wait_until(CATCH_UP, "the waiting commit reached the target", || {
        on_target() == "late"
    })
    .unwrap();
    assert_eq!(
        rig.source.psql("SELECT v FROM public.r WHERE id = 150"),
        "old",
        "the commit should still be invisible on the source"
    );
    let (ok, said) = resync(&rig, TABLE);
    assert!(ok, "{said}");
    // Every chunk's snapshot misses that commit, which the stream brought already: the
    // chunks are read again, and the target keeps the newer row.
    // (A relay that let a chunk overwrite the row would get chunks done instead.)
    let chunks_done = || {
        rig.inner()
            .metric("routy_cdc_source_resync_chunks_total", &[("table", TABLE)])
    };
    try_wait_until(CATCH_UP, "chunks read again, or chunks done", || {
        resync_status(&rig)[0]["rereads"]
            .as_u64()
            .is_some_and(|n| n >= 3)
            || chunks_done() > 0.0
    })
    .unwrap_or_else(|e| panic!("{e}: {}", resync_status(&rig)));
    assert_eq!(
        (on_target().as_str(), chunks_done()),
        ("late", 0.0),
        "a chunk overwrote a newer row"
    );
    rig.source
        .psql("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE wait_event = 'SyncRep'");
    let out = late.join().unwrap();
    assert!(out.is_ok(), "{out:?}");
    rig.source.psql(
        "ALTER SYSTEM RESET synchronous_standby_names; ALTER SYSTEM RESET synchronous_commit; \
         SELECT pg_reload_conf()",
    );
    try_wait_until(CATCH_UP, "the resync is done", || {
        resync_status(&rig).as_array().is_some_and(|a| a.is_empty())
    })
    .unwrap_or_else(|e| panic!("{e}: {}", resync_status(&rig)));
    rig.wait_in_sync(&[TABLE], CATCH_UP);
    assert_eq!(on_target(), "late");
}

#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn resync_replaces_clickhouse_rows_and_tells_stream_consumers() {
    require_root();
    let ch = routy_e2e::clickhouse::ClickHouse::start();
    let nats = routy_e2e::nats::NatsServer::start();
    let sinks = format!(
        "    - name: warehouse\n      source: site-a/main\n      clickhouse:\n        url: \"{}\"\n        database: analytics\n        batch: {{ max_rows: 2000, max_delay: 50ms }}\n\
         \x20   - name: stream\n      source: site-a/main\n      nats:\n        url: \"{}\"\n        stream: CDC\n        subject_prefix: cdc\n        message: transaction\n",
        ch.url(),
        nats.url()
    );
    let rig = CdcRig::start(RigOpts {
        setup_sql: "CREATE TABLE public.r (id int PRIMARY KEY, v text, n int);\
                    INSERT INTO public.r SELECT g * 2, md5(g::text), 0 FROM generate_series(1, 3000) g;"
            .into(),
        tables: vec![TABLE.into()],
        source_extra: "      resync_chunk_rows: 250\n".into(),
        extra_sinks: sinks,
        ..RigOpts::default()
    });
    rig.wait_in_sync(&[TABLE], CATCH_UP);
    let rows = "SELECT coalesce(string_agg(id || ',' || v || ',' || n, E'\\n' ORDER BY id), '') FROM public.r";
    let ch_rows = "SELECT concat(toString(id), ',', v, ',', toString(n)) FROM analytics.r FINAL ORDER BY id FORMAT TSVRaw";
    let want = rig.source.psql(rows);
    try_wait_until(CATCH_UP, "ClickHouse has the table", || {
        ch.try_query(ch_rows)
            .is_ok_and(|g| g.trim_end() == want.trim_end())
    })
    .unwrap();
    // ClickHouse drifts (versions below any the sink writes): rows it should not have,
    // one gone, one wrong.
    ch.query("INSERT INTO analytics.r (id, v, n, _routy_version, _routy_deleted) VALUES (3, 'extra', 0, 1, 0), (99999, 'extra', 0, 1, 0)");
    ch.query("INSERT INTO analytics.r (id, v, n, _routy_version, _routy_deleted) VALUES (4, '', 0, 1, 1)");
    ch.query("INSERT INTO analytics.r (id, v, n, _routy_version, _routy_deleted) VALUES (6, 'wrong', 0, 1, 0)");
    let load = rig.pgbench(
        LOAD.replace("30000", "3000")
            .replace("40000", "4000")
            .as_str(),
        1,
        5,
    );
    let (ok, said) = resync(&rig, TABLE);
    assert!(ok, "{said}");
    let out = load.finish();
    assert!(out.contains("number of failed transactions: 0"), "{out}");
    try_wait_until(CATCH_UP, "the resync is done", || {
        resync_status(&rig).as_array().is_some_and(|a| a.is_empty())
    })
    .unwrap();
    rig.wait_in_sync(&[TABLE], CATCH_UP);
    let want = rig.source.psql(rows);
    try_wait_until(CATCH_UP, "ClickHouse equals the source again", || {
        ch.try_query(ch_rows)
            .is_ok_and(|g| g.trim_end() == want.trim_end())
    })
    .unwrap_or_else(|e| panic!("{e}: {}", rig.outer().status()));
    // Stream consumers are told too: the start, each chunk with its keys, the end.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let msgs = rt.block_on(nats.read_stream("CDC"));
    let events: Vec<serde_json::Value> = msgs
        .iter()
        .map(|m| serde_json::from_slice(&m.payload).expect("JSON body"))
        .collect();
    let kinds = |k: &str| events.iter().filter(|e| e["event"] == k).count();
    assert_eq!(kinds("resync_start"), 1);
    assert!(
        kinds("resync_chunk") >= 12,
        "{} chunks",
        kinds("resync_chunk")
    );
    let last = events
        .iter()
        .rfind(|e| e["event"] == "resync_chunk")
        .unwrap();
    assert!(
        last["through"].is_null() && last["keys"].is_array(),
        "{last}"
    );
}

#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn a_table_added_by_reload_is_copied_then_streamed_and_a_removed_one_stops() {
    require_root();
    let mut rig = CdcRig::start(RigOpts {
        setup_sql: "CREATE TABLE public.a (id int PRIMARY KEY, v int);\
                    INSERT INTO public.a SELECT g, 0 FROM generate_series(1, 500) g;\
                    CREATE TABLE public.b (id int PRIMARY KEY, v int);\
                    INSERT INTO public.b SELECT g, 0 FROM generate_series(1, 5000) g;"
            .into(),
        tables: vec!["public.a".into()],
        source_extra: "      resync_chunk_rows: 500\n".into(),
        ..RigOpts::default()
    });
    rig.wait_in_sync(&["public.a"], CATCH_UP);
    let load = rig.pgbench(
        "\\set i random(1, 6000)\n\
         INSERT INTO public.b VALUES (:i, 1) ON CONFLICT (id) DO UPDATE SET v = b.v + 1;\n\
         \\set j random(1, 500)\n\
         UPDATE public.a SET v = v + 1 WHERE id = :j;\n\\sleep 2 ms\n",
        2,
        8,
    );
    reload(
        &mut rig,
        "tables: [public.a]",
        "tables: [public.a, public.b]",
    );
    let out = load.finish();
    assert!(out.contains("number of failed transactions: 0"), "{out}");
    let rows = "SELECT coalesce(string_agg(id || '=' || v, ',' ORDER BY id), '') FROM public.b";
    if try_wait_until(CATCH_UP, "public.b identical", || {
        rig.target.try_psql(rows).ok() == rig.source.try_psql(rows).ok()
    })
    .is_err()
    {
        let (src, dst) = (rig.source.psql(rows), rig.target.psql(rows));
        let (s, d): (Vec<&str>, Vec<&str>) = (src.split(',').collect(), dst.split(',').collect());
        let missing: Vec<_> = s.iter().filter(|x| !d.contains(x)).take(10).collect();
        let extra: Vec<_> = d.iter().filter(|x| !s.contains(x)).take(10).collect();
        panic!(
            "public.b differs: source has {missing:?}, target {extra:?}\n{}",
            routy_e2e::log_tail(&rig.inner().proc.log(), 80)
        );
    }
    rig.wait_in_sync(&["public.a", "public.b"], CATCH_UP);
    assert!(
        rig.inner().metric(
            "routy_cdc_source_resync_rows_total",
            &[("table", "public.b")]
        ) > 0.0,
        "public.b was copied by a resync"
    );
    // Removed: out of the publication, its changes no longer reach the target.
    reload(
        &mut rig,
        "tables: [public.a, public.b]",
        "tables: [public.b]",
    );
    try_wait_until(CATCH_UP, "public.a leaves the publication", || {
        rig.source
            .psql("SELECT count(*) FROM pg_publication_tables WHERE pubname = 'routy_main' AND tablename = 'a'")
            == "0"
    })
    .unwrap();
    rig.source
        .psql("UPDATE public.a SET v = -1; INSERT INTO public.b VALUES (100000, 7)");
    try_wait_until(CATCH_UP, "public.b still streams", || {
        rig.target
            .try_psql("SELECT v FROM public.b WHERE id = 100000")
            .is_ok_and(|v| v == "7")
    })
    .unwrap();
    assert_eq!(
        rig.target
            .psql("SELECT count(*) FROM public.a WHERE v = -1"),
        "0",
        "a removed table's changes still arrive"
    );
}

/// Rewrites relay-inner's config (`from` → `to`) and reloads it by SIGHUP.
fn reload(rig: &mut CdcRig, from: &str, to: &str) {
    let path = rig.inner().config.clone();
    let cfg = std::fs::read_to_string(&path).unwrap();
    assert!(cfg.contains(from), "{cfg}");
    std::fs::write(&path, cfg.replace(from, to)).unwrap();
    let ok = |rig: &CdcRig| {
        rig.inner()
            .metric("routy_config_reloads_total", &[("result", "ok")])
    };
    let before = ok(rig);
    rig.inner.as_mut().unwrap().proc.signal(libc::SIGHUP);
    try_wait_until(Duration::from_secs(20), "the reload is done", || {
        ok(rig) > before
    })
    .unwrap();
}

#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn a_large_table_is_copied_in_parallel_ranges_of_one_snapshot() {
    require_root();
    // About 45 MB with a bigint key: 4 key ranges read in chunks of 20 000 rows, each
    // range on its own connection. About 26 MB with a text key: 3 ranges of pages.
    let rig = CdcRig::start(RigOpts {
        setup_sql: "CREATE TABLE public.big (id bigint PRIMARY KEY, pad text);\
                    INSERT INTO public.big SELECT g, repeat(md5(g::text), 3) FROM generate_series(1, 300000) g;\
                    CREATE TABLE public.named (k text PRIMARY KEY, pad text);\
                    INSERT INTO public.named SELECT 'k' || g, repeat(md5(g::text), 2) FROM generate_series(1, 250000) g;\
                    CREATE TABLE public.small (id int PRIMARY KEY);\
                    INSERT INTO public.small SELECT generate_series(1, 10);"
            .into(),
        tables: vec![
            "public.big".into(),
            "public.named".into(),
            "public.small".into(),
        ],
        source_extra: "      snapshot_parallelism: 4\n      snapshot_chunk_rows: 20000\n".into(),
        ..RigOpts::default()
    });
    // Writes while the copy runs: the stream meets the copy exactly.
    rig.source.psql(
        "UPDATE public.big SET pad = 'changed' WHERE id % 1000 = 0; DELETE FROM public.big WHERE id % 777 = 0;\
         UPDATE public.named SET pad = 'changed' WHERE right(k, 3) = '500'; DELETE FROM public.named WHERE right(k, 2) = '77'",
    );
    rig.wait_in_sync(&["public.big", "public.named", "public.small"], CATCH_UP);
    let inner = rig.inner();
    inner.wait_count(
        "copying the table in key order, in parallel ranges source=main table=public.big pages=",
        1,
        Duration::from_secs(1),
    );
    inner.wait_count(
        "copying the table in parallel ranges source=main table=public.named",
        1,
        Duration::from_secs(1),
    );
    let log = inner.proc.log();
    assert!(
        log.contains("table=public.big pages=") && log.contains(" ranges=4"),
        "{}",
        routy_e2e::log_tail(&log, 20)
    );
    for (t, n) in [("public.big", 300_000.0), ("public.named", 250_000.0)] {
        assert_eq!(
            inner.metric("routy_cdc_source_snapshot_rows_total", &[("table", t)]),
            n,
            "{t}"
        );
    }
    // Done: no range is left in the state file.
    let state = std::fs::read_to_string(rig.spool_dir.join("main/source-state.json")).unwrap();
    assert!(!state.contains("\"copying\""), "{state}");
}
