//! End-to-end CDC: a real source PostgreSQL, relay-inner reading its logical replication
//! stream into the spool and shipping it through the tunnel, relay-outer storing it and
//! applying it to a real target PostgreSQL. Every check compares whole tables.

use std::time::Duration;

use routy_e2e::cdc::{CdcRig, RigOpts, CATCH_UP, SOURCE};
use routy_e2e::{require_root, try_wait_until};

const TYPES_SETUP: &str = r#"
CREATE TABLE public.types (
    id bigint PRIMARY KEY,
    i2 smallint, i4 integer, i8 bigint,
    num numeric(20,6), txt text, bin bytea, js json, jsb jsonb,
    ints integer[], strs text[], u uuid, ts timestamptz, d date, b boolean,
    big text
);
ALTER TABLE public.types ALTER COLUMN big SET STORAGE EXTERNAL;
INSERT INTO public.types VALUES
 (1, 1, 2, 3, 12345.678901, 'héllo wörld ✓ 日本', '\x00ff10', '{"a": [1, 2]}', '{"b": {"c": null}}',
  '{1,2,NULL}', '{"x y","z,\"q\""}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2026-11-22 07:00:00.123456+00',
  '2026-11-22', true, repeat('toast', 100000)),
 (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
 (5, 0, 0, 0, 0, E'tab\there\nnew line\\back slash\rcr \\N', '\x5c6e', '"\\t"', '{"k": "a\tb"}',
  '{}', '{"a\\b","\\N",""}', NULL, NULL, NULL, false, E'\\');
"#;

/// Every common type survives snapshot and streaming; an unchanged TOAST value is kept.
#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn types_round_trip_through_snapshot_and_stream() {
    require_root();
    let rig = CdcRig::start(RigOpts {
        setup_sql: TYPES_SETUP.into(),
        tables: vec!["public.types".into()],
        // Both DSNs in the URL form: the source's replication client and the sink read
        // it with the same parser as the key=value form.
        url_dsn: true,
        ..RigOpts::default()
    });
    // Snapshot rows arrive.
    rig.wait_in_sync(&["public.types"], CATCH_UP);
    // Streamed changes: new rows, an update that leaves the TOASTed column alone, a
    // key change, a delete.
    rig.source.psql(
        r#"INSERT INTO public.types SELECT id + 10, i2, i4, i8, num, txt, bin, js, jsb, ints, strs, u, ts, d, b, big FROM public.types;
           UPDATE public.types SET txt = 'changed ✓', i4 = -7 WHERE id = 1;
           UPDATE public.types SET id = 100 WHERE id = 2;
           DELETE FROM public.types WHERE id = 12;
           INSERT INTO public.types (id, num, bin) VALUES (3, 'NaN', '\x');"#,
    );
    rig.wait_in_sync(&["public.types"], CATCH_UP);
    let big = rig
        .target
        .psql("SELECT length(big), txt FROM public.types WHERE id = 1");
    assert_eq!(
        big, "500000|changed ✓",
        "TOAST value kept, other column changed"
    );
}

/// One transaction of 100 000 rows, TRUNCATE, and a table without a primary key
/// (REPLICA IDENTITY FULL) with duplicate rows.
#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn big_transaction_truncate_and_table_without_key() {
    require_root();
    let rig = CdcRig::start(RigOpts {
        setup_sql: "CREATE TABLE public.big (id int PRIMARY KEY, v text);
                    CREATE TABLE public.nokey (a int, b text);
                    ALTER TABLE public.nokey REPLICA IDENTITY FULL;
                    CREATE TABLE public.gone (id int PRIMARY KEY);
                    INSERT INTO public.gone SELECT generate_series(1, 50);"
            .into(),
        tables: vec![
            "public.big".into(),
            "public.nokey".into(),
            "public.gone".into(),
        ],
        ..RigOpts::default()
    });
    rig.wait_in_sync(&["public.gone"], CATCH_UP);
    rig.source
        .psql("INSERT INTO public.big SELECT g, md5(g::text) FROM generate_series(1, 100000) g;");
    rig.source.psql(
        "INSERT INTO public.nokey VALUES (1, 'x'), (1, 'x'), (2, 'y');
         UPDATE public.nokey SET b = 'z' WHERE a = 2;
         TRUNCATE public.gone;",
    );
    rig.wait_in_sync(&["public.big", "public.nokey", "public.gone"], CATCH_UP);
    // One of the two identical rows goes; the other stays.
    rig.source.psql(
        "DELETE FROM public.nokey WHERE ctid = (SELECT min(ctid) FROM public.nokey WHERE a = 1)",
    );
    rig.wait_in_sync(&["public.nokey"], CATCH_UP);
    assert_eq!(
        rig.target
            .psql("SELECT count(*) FROM public.nokey WHERE a = 1"),
        "1"
    );
    assert_eq!(rig.target.psql("SELECT count(*) FROM public.gone"), "0");

    // `relay-outer cdc tail` prints the stream as JSON lines.
    let text = rig.tail(SOURCE);
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        *kinds
            .entry(v["event"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    assert!(
        kinds.get("insert").copied().unwrap_or(0) >= 100_053,
        "{kinds:?}"
    );
    assert!(kinds.contains_key("truncate"), "{kinds:?}");
    assert!(kinds.contains_key("snapshot_done"), "{kinds:?}");
}

const LOAD_SETUP: &str = "
CREATE TABLE public.acct (id int PRIMARY KEY, balance bigint NOT NULL, note text);
INSERT INTO public.acct SELECT g, 0, 'init' FROM generate_series(1, 1000) g;
CREATE TABLE public.audit (txn bigint, at timestamptz, note text);
ALTER TABLE public.audit REPLICA IDENTITY FULL;
";

/// Every transaction moves money and writes one audit row (no key): a transaction
/// applied twice shows up as a duplicate audit row, a lost one as a missing row.
const LOAD_SCRIPT: &str = "
\\set a random(1, 1000)
\\set b random(1, 1000)
BEGIN;
UPDATE public.acct SET balance = balance - 1, note = 'out' WHERE id = :a;
UPDATE public.acct SET balance = balance + 1, note = 'in' WHERE id = :b;
INSERT INTO public.audit VALUES (txid_current(), now(), :a || '->' || :b);
COMMIT;
";

const LOAD_TABLES: [&str; 2] = ["public.acct", "public.audit"];

/// Under continuous writes: kill -9 relay-inner, kill -9 relay-outer, cut the tunnel for
/// 20 s, restart the source PostgreSQL. Afterwards every row matches and no transaction
/// was applied twice.
#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn no_loss_no_duplicates_across_crashes_cuts_and_restarts() {
    require_root();
    let mut rig = CdcRig::start(RigOpts {
        netns: true,
        setup_sql: LOAD_SETUP.into(),
        tables: LOAD_TABLES.iter().map(|s| s.to_string()).collect(),
        source_extra: "      heartbeat: 1s\n".into(),
        ..RigOpts::default()
    });
    rig.wait_shipping();
    rig.wait_in_sync(&LOAD_TABLES, CATCH_UP);
    let audit = |rig: &CdcRig| rig.source.psql("SELECT count(*) FROM public.audit");

    // 1. kill -9 relay-inner under load.
    let load = rig.pgbench(LOAD_SCRIPT, 2, 8);
    std::thread::sleep(Duration::from_secs(3));
    rig.kill_inner();
    std::thread::sleep(Duration::from_secs(1));
    rig.start_inner();
    eprintln!("{}", load.finish());
    rig.wait_in_sync(&LOAD_TABLES, CATCH_UP);
    eprintln!("after kill -9 relay-inner: {} audit rows", audit(&rig));

    // 2. kill -9 relay-outer under load.
    let load = rig.pgbench(LOAD_SCRIPT, 2, 8);
    std::thread::sleep(Duration::from_secs(3));
    rig.kill_outer();
    std::thread::sleep(Duration::from_secs(1));
    rig.start_outer();
    eprintln!("{}", load.finish());
    rig.wait_in_sync(&LOAD_TABLES, CATCH_UP);
    eprintln!("after kill -9 relay-outer: {} audit rows", audit(&rig));

    // 3. Cut the tunnel for 20 s under load; the slot keeps advancing (the spool absorbs).
    let load = rig.pgbench(LOAD_SCRIPT, 2, 24);
    std::thread::sleep(Duration::from_secs(2));
    let pair = rig.pair.as_ref().expect("netns rig");
    pair.link_down();
    let before = rig.confirmed_flush();
    std::thread::sleep(Duration::from_secs(20));
    let after = rig.confirmed_flush();
    rig.pair.as_ref().unwrap().link_up();
    assert!(
        after > before,
        "the slot must advance while the tunnel is down: {before:X} -> {after:X}"
    );
    eprintln!("{}", load.finish());
    rig.wait_in_sync(&LOAD_TABLES, CATCH_UP);
    eprintln!("after a 20 s cut: {} audit rows", audit(&rig));

    // 4. Restart the source PostgreSQL under load (pgbench's clients die with it).
    let load = rig.pgbench(LOAD_SCRIPT, 2, 6);
    std::thread::sleep(Duration::from_secs(2));
    rig.source.restart();
    eprintln!("{}", load.finish());
    let load = rig.pgbench(LOAD_SCRIPT, 2, 3);
    eprintln!("{}", load.finish());
    rig.wait_in_sync(&LOAD_TABLES, CATCH_UP);
    let dups = rig.target.psql(
        "SELECT count(*) FROM (SELECT txn FROM public.audit GROUP BY txn HAVING count(*) > 1) d",
    );
    assert_eq!(dups, "0", "a transaction was applied twice");
    eprintln!(
        "after a source restart: {} audit rows, identical",
        audit(&rig)
    );
}

/// The slot advances while the published tables are idle (heartbeat) and while relay-outer
/// is away (the spool absorbs the changes).
#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn slot_advances_when_idle_and_while_relay_outer_is_away() {
    require_root();
    let mut rig = CdcRig::start(RigOpts {
        setup_sql: "CREATE TABLE public.t (id int PRIMARY KEY); CREATE TABLE public.other (x int);"
            .into(),
        tables: vec!["public.t".into()],
        source_extra: "      heartbeat: 1s\n      status_interval: 1s\n".into(),
        ..RigOpts::default()
    });
    rig.wait_shipping();
    // The slot exists once the source streams (shipping can come up first).
    rig.wait_streaming();
    // Idle published table, WAL written elsewhere: the heartbeat moves the slot.
    let start = rig.confirmed_flush();
    rig.source
        .psql("INSERT INTO public.other SELECT generate_series(1, 10000)");
    let wal_end = rig.wal_end();
    try_wait_until(Duration::from_secs(30), "slot passes the idle WAL", || {
        rig.confirmed_flush() >= wal_end
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}: slot at {:X}, started {start:X}, WAL end {wal_end:X}",
            rig.confirmed_flush()
        )
    });

    // relay-outer away: changes are confirmed once they are in the spool.
    rig.kill_outer();
    rig.source
        .psql("INSERT INTO public.t SELECT generate_series(1, 5000)");
    let wal_end = rig.wal_end();
    try_wait_until(
        Duration::from_secs(30),
        "slot advances without relay-outer",
        || rig.confirmed_flush() >= wal_end,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", rig.inner().proc.log()));
    rig.start_outer();
    rig.wait_in_sync(&["public.t"], CATCH_UP);
}

/// A publication may publish more than `postgres.tables` lists: one made by hand `FOR ALL
/// TABLES`, or one still holding a table removed from the config. Only listed tables
/// leave the source (and the partitions of a listed partitioned table); the others
/// never reach the spool, relay-outer's store, `cdc tail` or the target.
#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn only_configured_tables_leave_the_source() {
    require_root();
    let rig = CdcRig::start(RigOpts {
        setup_sql: "CREATE TABLE public.shown (id int PRIMARY KEY, v text);
                    CREATE TABLE public.secret (id int PRIMARY KEY, card text);
                    CREATE TABLE public.meas (id int, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
                    CREATE TABLE public.meas_2026 PARTITION OF public.meas FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
                    INSERT INTO public.secret VALUES (1, 'before');
                    CREATE PUBLICATION routy_main FOR ALL TABLES;"
            .into(),
        tables: vec!["public.shown".into(), "public.meas".into()],
        source_extra: "      snapshot: never\n".into(),
        ..RigOpts::default()
    });
    rig.wait_shipping();
    // Without a snapshot, only what commits after the slot exists is streamed.
    rig.wait_streaming();
    rig.source.psql(
        "INSERT INTO public.secret VALUES (2, '4111-1111-1111-1111');
         INSERT INTO public.shown VALUES (1, 'a');
         INSERT INTO public.meas VALUES (7, '2026-11-22');
         UPDATE public.secret SET card = 'changed';
         TRUNCATE public.secret;
         INSERT INTO public.shown VALUES (2, 'b');",
    );
    rig.wait_in_sync(&["public.shown"], CATCH_UP);
    assert_eq!(
        rig.target
            .psql("SELECT to_regclass('public.secret') IS NULL"),
        "t",
        "the unlisted table reached the target"
    );

    let text = rig.tail(SOURCE);
    assert!(
        !text.contains("secret") && !text.contains("4111"),
        "the unlisted table left the source:\n{text}"
    );
    assert!(
        text.contains("meas_2026"),
        "partition change missing:\n{text}"
    );
    let log = rig.inner().proc.log();
    assert!(
        log.contains("postgres.tables does not list") && log.contains("public.secret"),
        "{log}"
    );
}
