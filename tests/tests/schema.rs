//! End-to-end schema changes: while writes go on, the source renames, adds, drops and
//! widens columns, drops a column and adds another of the same type in one statement,
//! and changes a table's key; the sinks follow (PostgreSQL and ClickHouse change the
//! target table, NATS messages carry the new names) and at the end the target holds the
//! source's rows. A narrowing stops the PostgreSQL sink, with an error that names the
//! table and the change, until the operator altered the target and resumed it.

use std::time::Duration;

use routy_e2e::cdc::{CdcRig, RigOpts, CATCH_UP, SINK, SOURCE};
use routy_e2e::clickhouse::ClickHouse;
use routy_e2e::nats::NatsServer;
use routy_e2e::{require_root, try_wait_until};

const SETUP: &str = "\
CREATE TABLE public.t (id int PRIMARY KEY, a text, b varchar(10), c text, v int);\
INSERT INTO public.t SELECT g, 'a' || g, 'b' || (g % 100), 'c' || g, 0 FROM generate_series(1, 2000) g;\
CREATE TABLE public.k (id int PRIMARY KEY, g int NOT NULL);\
INSERT INTO public.k SELECT g, 1 FROM generate_series(1, 100) g;\
CREATE TABLE public.m (step int PRIMARY KEY);";

/// Writes on `t` all along: upserts of `v` on random ids.
const LOAD: &str = "\\set id random(1, 3000)\n\
INSERT INTO public.t (id, v) VALUES (:id, 1) ON CONFLICT (id) DO UPDATE SET v = t.v + 1;\n\
\\sleep 5 ms\n";

fn opts(extra_sinks: String) -> RigOpts {
    RigOpts {
        setup_sql: SETUP.into(),
        tables: vec!["public.t".into(), "public.k".into(), "public.m".into()],
        source_extra: "      heartbeat: 1s\n      status_interval: 1s\n".into(),
        extra_sinks,
        ..RigOpts::default()
    }
}

/// Runs `sql` on the source, then marks step `n` and waits until the PostgreSQL sink has
/// applied it: each change reaches relay-inner before the next one is made.
fn step(rig: &CdcRig, n: u32, sql: &str) {
    rig.source
        .psql(&format!("{sql}; INSERT INTO public.m VALUES ({n})"));
    wait_step(rig, n, sql);
}

/// Waits until the PostgreSQL sink has applied step `n`.
fn wait_step(rig: &CdcRig, n: u32, sql: &str) {
    try_wait_until(CATCH_UP, &format!("step {n} applied: {sql}"), || {
        rig.target
            .try_psql(&format!("SELECT count(*) FROM public.m WHERE step = {n}"))
            .is_ok_and(|s| s.trim() == "1")
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}; sink status {}\n{}",
            sink_status(rig),
            routy_e2e::log_tail(&rig.outer().proc.log(), 40)
        )
    });
}

fn sink_status(rig: &CdcRig) -> serde_json::Value {
    rig.outer().status()["cdc"]["sources"][SOURCE]["sinks"][SINK].clone()
}

/// `t` as `id,a2,b,d,v,f` lines (the columns the source has at the end).
const T_ROWS: &str =
    "SELECT coalesce(string_agg(concat_ws(',', id, coalesce(a2, '-'), coalesce(b, '-'), \
    coalesce(d, '-'), v, coalesce(f, '-')), E'\\n' ORDER BY id), '') FROM public.t";
const K_ROWS: &str =
    "SELECT coalesce(string_agg(id || ',' || g, E'\\n' ORDER BY id, g), '') FROM public.k";

fn wait_rows(rig: &CdcRig, what: &str, sql: &str) {
    let want = rig.source.psql(sql);
    let res = try_wait_until(CATCH_UP, what, || {
        rig.target.try_psql(sql).is_ok_and(|got| got == want)
    });
    if let Err(e) = res {
        let got = rig.target.try_psql(sql).unwrap_or_else(|e| e);
        let (g, w): (Vec<&str>, Vec<&str>) = (got.lines().collect(), want.lines().collect());
        let missing: Vec<_> = w.iter().filter(|l| !g.contains(l)).take(5).collect();
        let extra: Vec<_> = g.iter().filter(|l| !w.contains(l)).take(5).collect();
        panic!(
            "{e}: missing {missing:?}, extra {extra:?}; sink {}",
            sink_status(rig)
        );
    }
}

/// The schema changes, with writes that use each new shape, then the writes stop.
fn change_schema(rig: &mut CdcRig) {
    let load = rig.pgbench(LOAD, 2, 15);
    step(
        rig,
        1,
        "ALTER TABLE public.t RENAME COLUMN a TO a2; UPDATE public.t SET a2 = 'r' || id WHERE id <= 50",
    );
    step(
        rig,
        2,
        "ALTER TABLE public.t ADD COLUMN d text; UPDATE public.t SET d = 'd' || id WHERE id <= 20",
    );
    step(
        rig,
        3,
        "ALTER TABLE public.t DROP COLUMN c; UPDATE public.t SET a2 = 'x' || id WHERE id BETWEEN 51 AND 60",
    );
    step(
        rig,
        4,
        "ALTER TABLE public.t ALTER COLUMN b TYPE text; UPDATE public.t SET b = repeat('z', 30) WHERE id <= 10",
    );
    step(
        rig,
        5,
        "ALTER TABLE public.t ALTER COLUMN v TYPE bigint; UPDATE public.t SET v = 5000000000 + id WHERE id <= 5",
    );
    step(
        rig,
        6,
        "ALTER TABLE public.t ADD COLUMN e text; UPDATE public.t SET e = 'e' || id WHERE id <= 30",
    );
    // The last column dropped and one of the same type added in its place: a drop and an
    // add, never a rename (e's values must not move into f). Done while relay-inner is
    // down, after a write under the old definition: started again, relay-inner gets
    // that relation (with e) when the catalog already has e dropped and f added, and
    // cannot number e itself; the sink keeps the number it knew (a CI failure before:
    // "no column numbers"; an autovacuum resending the relation does the same).
    rig.kill_inner();
    rig.source
        .psql("UPDATE public.t SET v = v + 1 WHERE id = 1");
    let drop_add = "ALTER TABLE public.t DROP COLUMN e, ADD COLUMN f text; UPDATE public.t SET f = 'f' || id WHERE id <= 40";
    rig.source
        .psql(&format!("{drop_add}; INSERT INTO public.m VALUES (7)"));
    rig.start_inner();
    wait_step(rig, 7, drop_add);
    step(
        rig,
        8,
        "ALTER TABLE public.k DROP CONSTRAINT k_pkey, ADD PRIMARY KEY (g, id); \
         INSERT INTO public.k SELECT g, 2 FROM generate_series(1, 50) g; \
         UPDATE public.k SET g = 3 WHERE id <= 10 AND g = 1; DELETE FROM public.k WHERE id > 90",
    );
    let out = load.finish();
    assert!(out.contains("number of failed transactions: 0"), "{out}");
}

#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn postgres_and_nats_follow_schema_changes_while_writes_go_on() {
    require_root();
    let nats = NatsServer::start();
    let sink = format!(
        "    - name: stream\n      source: {SOURCE}\n      tables: [public.t]\n      nats:\n        url: \"{}\"\n        stream: CDC\n        subject_prefix: cdc\n        batch: {{ max_messages: 200, max_delay: 20ms }}\n",
        nats.url()
    );
    let mut rig = CdcRig::start(opts(sink));
    rig.wait_in_sync(&["public.t", "public.k"], CATCH_UP);
    change_schema(&mut rig);
    wait_rows(&rig, "t identical on the columns the source has", T_ROWS);
    wait_rows(&rig, "k identical under its new key", K_ROWS);

    // The target's definition followed: renamed, widened, the new key; the dropped
    // columns kept (c with its values, e with the values it had, never moved into f).
    let cols = rig.target.psql(
        "SELECT string_agg(attname || ' ' || format_type(atttypid, atttypmod), ', ' ORDER BY attnum) \
         FROM pg_attribute WHERE attrelid = 'public.t'::regclass AND attnum > 0 AND NOT attisdropped",
    );
    assert_eq!(
        cols, "id integer, a2 text, b text, c text, v bigint, d text, e text, f text",
        "target columns"
    );
    assert_eq!(
        rig.target
            .psql("SELECT count(*) FROM public.t WHERE e LIKE 'e%' AND f IS DISTINCT FROM 'f' || id AND id <= 30"),
        "0",
        "f got e's values"
    );
    assert_eq!(
        rig.target
            .psql("SELECT count(e) || ',' || count(f) || ',' || count(c) FROM public.t"),
        "30,40,2000"
    );
    let pk = rig.target.psql(
        "SELECT string_agg(a.attname, ',' ORDER BY k.ord) FROM pg_constraint c \
         JOIN LATERAL unnest(c.conkey) WITH ORDINALITY k(n, ord) ON true \
         JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n \
         WHERE c.conrelid = 'public.k'::regclass AND c.contype = 'p'",
    );
    assert_eq!(pk, "id,g", "the target's key follows the source's");

    // NATS messages carry the new names from the rename on.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let events: Vec<serde_json::Value> = rt
        .block_on(nats.read_stream("CDC"))
        .iter()
        .map(|m| serde_json::from_slice(&m.payload).expect("JSON body"))
        .collect();
    let renamed: std::collections::HashSet<&str> = events
        .iter()
        .filter(|e| e["new"]["a2"].as_str().is_some_and(|v| v.starts_with('r')))
        .filter_map(|e| e["new"]["id"].as_str())
        .collect();
    assert_eq!(renamed.len(), 50, "updates after the rename name column a2");
    assert!(
        !events
            .iter()
            .any(|e| e["new"]["a"].as_str().is_some_and(|v| v.starts_with('r'))),
        "a value written after the rename came under the old name"
    );

    // A narrowing stops the PostgreSQL sink; the log is held; the operator alters the
    // target and resumes.
    rig.source.psql(
        "UPDATE public.t SET v = id WHERE v > 2000000000; \
         ALTER TABLE public.t ALTER COLUMN v TYPE integer; \
         INSERT INTO public.t (id, v) VALUES (900001, 1)",
    );
    let st = rig
        .outer()
        .wait_status("the sink stops on the narrowing", CATCH_UP, |st| {
            st["cdc"]["sources"][SOURCE]["sinks"][SINK]["state"] == "stopped"
        });
    let err = st["cdc"]["sources"][SOURCE]["sinks"][SINK]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    for want in [
        "public.t",
        "column v",
        "narrowing",
        "cdc resume --sink replica",
    ] {
        assert!(err.contains(want), "{want:?} not in {err}");
    }
    rig.source
        .psql("INSERT INTO public.t (id, v) VALUES (900002, 2)");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        rig.target
            .psql("SELECT count(*) FROM public.t WHERE id >= 900000"),
        "0",
        "nothing passes a stopped sink"
    );
    rig.target
        .psql("ALTER TABLE public.t ALTER COLUMN v TYPE integer");
    let (ok, said) = rig.outer_cdc(&["resume", "--sink", SINK]);
    assert!(ok, "{said}");
    wait_rows(&rig, "t identical after the resume", T_ROWS);
    assert_eq!(
        rig.outer().metric(
            "routy_cdc_sink_errors_total",
            &[("sink", SINK), ("reason", "schema")]
        ),
        2.0,
        "the refusal, then once more a transaction at a time"
    );
}

#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn clickhouse_follows_renames_and_widenings_and_stops_on_a_new_key() {
    require_root();
    let ch = ClickHouse::start();
    let sink = format!(
        "    - name: warehouse\n      source: {SOURCE}\n      retry: {{ initial: 50ms, max: 500ms }}\n      clickhouse:\n        url: \"{}\"\n        database: analytics\n        batch: {{ max_rows: 500, max_delay: 50ms }}\n",
        ch.url()
    );
    let rig = CdcRig::start(opts(sink));
    rig.wait_in_sync(&["public.t", "public.k"], CATCH_UP);
    // Everything but the key change (the last step), which ClickHouse refuses.
    let load = rig.pgbench(LOAD, 2, 15);
    for (n, sql) in [
        "ALTER TABLE public.t RENAME COLUMN a TO a2; UPDATE public.t SET a2 = 'r' || id WHERE id <= 50",
        "ALTER TABLE public.t ADD COLUMN d text; UPDATE public.t SET d = 'd' || id WHERE id <= 20",
        "ALTER TABLE public.t DROP COLUMN c; UPDATE public.t SET a2 = 'x' || id WHERE id BETWEEN 51 AND 60",
        "ALTER TABLE public.t ALTER COLUMN b TYPE text; UPDATE public.t SET b = repeat('z', 30) WHERE id <= 10",
        "ALTER TABLE public.t ALTER COLUMN v TYPE bigint; UPDATE public.t SET v = 5000000000 + id WHERE id <= 5",
        "ALTER TABLE public.t ADD COLUMN e text; UPDATE public.t SET e = 'e' || id WHERE id <= 30",
        "ALTER TABLE public.t DROP COLUMN e, ADD COLUMN f text; UPDATE public.t SET f = 'f' || id WHERE id <= 40",
    ]
    .iter()
    .enumerate()
    {
        step(&rig, n as u32 + 1, sql);
    }
    let out = load.finish();
    assert!(out.contains("number of failed transactions: 0"), "{out}");
    wait_rows(&rig, "t identical in PostgreSQL", T_ROWS);
    let want = rig.source.psql(T_ROWS);
    let query =
        "SELECT concat_ws(',', toString(id), ifNull(a2, '-'), ifNull(b, '-'), ifNull(d, '-'), \
                 toString(v), ifNull(f, '-')) FROM analytics.t FINAL ORDER BY id FORMAT TSVRaw";
    try_wait_until(CATCH_UP, "ClickHouse holds the source's rows", || {
        ch.try_query(query)
            .is_ok_and(|got| got.trim_end() == want.trim_end())
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {}",
            rig.outer().status()["cdc"]["sources"][SOURCE]["sinks"]["warehouse"]
        )
    });
    let cols = ch.query(
        "SELECT arrayStringConcat(groupArray(concat(name, ' ', type)), ', ') FROM \
         (SELECT name, type FROM system.columns WHERE database = 'analytics' AND table = 't' \
          ORDER BY position)",
    );
    for want in [
        "a2 Nullable(String)",
        "b Nullable(String)",
        "v Nullable(Int64)",
        "c Nullable(String)",
        "e Nullable(String)",
        "f Nullable(String)",
    ] {
        assert!(cols.contains(want), "{want:?} not in {cols}");
    }
    assert!(!cols.contains("a Nullable"), "{cols}");

    // A new key: ClickHouse cannot re-sort a table; the sink stops and says so.
    rig.source.psql(
        "ALTER TABLE public.k DROP CONSTRAINT k_pkey, ADD PRIMARY KEY (g, id); \
         INSERT INTO public.k VALUES (1, 2)",
    );
    let st = rig
        .outer()
        .wait_status("the ClickHouse sink stops on the key", CATCH_UP, |st| {
            st["cdc"]["sources"][SOURCE]["sinks"]["warehouse"]["state"] == "stopped"
        });
    let err = st["cdc"]["sources"][SOURCE]["sinks"]["warehouse"]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    for want in [
        "public.k",
        "key changed",
        "sorting key",
        "cdc resume --sink warehouse",
    ] {
        assert!(err.contains(want), "{want:?} not in {err}");
    }
    // The operator drops the table; resumed, the sink makes it with the new key and
    // goes on (the rows before are the table's copy's business).
    ch.query("DROP TABLE analytics.k");
    let (ok, said) = rig.outer_cdc(&["resume", "--sink", "warehouse"]);
    assert!(ok, "{said}");
    rig.source.psql("INSERT INTO public.k VALUES (2, 2)");
    try_wait_until(CATCH_UP, "the new table gets the new rows", || {
        ch.try_query("SELECT count() FROM analytics.k FINAL WHERE g = 2")
            .is_ok_and(|n| n.trim() == "2")
    })
    .unwrap_or_else(|e| panic!("{e}: {}", rig.outer().status()));
    let key = ch
        .query("SELECT sorting_key FROM system.tables WHERE database = 'analytics' AND name = 'k'");
    assert_eq!(key.trim(), "id, g");
}
