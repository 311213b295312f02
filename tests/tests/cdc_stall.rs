//! A source database that stops answering (issue 12, "Errors and deadlines"): its walsender
//! or the backend running the initial COPY is stopped with SIGSTOP. relay-inner notices
//! within its `receive_timeout` (routy_cdc_source_errors_total{reason="receive_timeout"}
//! and its log say so), reconnects once the process runs again (SIGCONT), and the target
//! ends up with exactly the source's rows: nothing lost, nothing doubled.

use std::process::Command;
use std::time::{Duration, Instant};

use routy_e2e::cdc::{CdcRig, RigOpts, CATCH_UP};
use routy_e2e::relays::Relay;
use routy_e2e::{log_tail, require_root, try_wait_until};

/// `receive_timeout` of the rig's source.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(3);
/// Slack on top of it for noticing (the metric is read every 200 ms, relay-inner's timers
/// fire on a loaded machine).
const NOTICE_SLACK: Duration = Duration::from_secs(5);
/// The same for a stalled COPY, which relay-inner notices once it has appended what was
/// already on its way, through a spool whose disk is full most of the time.
const COPY_SLACK: Duration = Duration::from_secs(40);
/// Rows per source transaction.
const TX_ROWS: u64 = 100;
const TABLE: &str = "public.t";

/// Processes stopped with SIGSTOP, continued (SIGCONT) when dropped, so that no test,
/// passing or failing, leaves a PostgreSQL process stopped (its cluster could not stop).
struct Stopped(Vec<i32>);

impl Stopped {
    fn new(pids: Vec<i32>) -> Stopped {
        assert!(!pids.is_empty(), "no process to stop");
        for &p in &pids {
            signal(p, "STOP");
        }
        Stopped(pids)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        for &p in &self.0 {
            signal(p, "CONT");
        }
    }
}

fn signal(pid: i32, sig: &str) {
    assert!(pid > 0, "pid {pid}");
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
    assert!(
        st.as_ref().is_ok_and(|s| s.success()),
        "kill -{sig} {pid}: {st:?}"
    );
}

/// Inserts transactions `from..to`, `TX_ROWS` rows each (ids are unique across them).
fn insert_txs(rig: &CdcRig, from: u64, to: u64) {
    rig.insert_txs("public.t", from, to, TX_ROWS, "md5(g::text)");
}

/// routy_cdc_source_errors_total{reason="receive_timeout"} of relay-inner (0 when absent).
fn receive_timeouts(r: &Relay) -> f64 {
    r.metric(
        "routy_cdc_source_errors_total",
        &[("reason", "receive_timeout")],
    )
}

/// Waits until relay-inner counted a receive timeout more than `before`, at most `limit`
/// after `since` (else panics with its log), and checks that its log says why it
/// dropped the stalled `what` (one of `why`).
fn assert_noticed(
    rig: &CdcRig,
    before: f64,
    since: Instant,
    limit: Duration,
    what: &str,
    why: &[&str],
) {
    let r = try_wait_until(limit, "relay-inner counts a receive timeout", || {
        receive_timeouts(rig.inner()) > before
    });
    if let Err(e) = r {
        panic!("{e}\n{}", log_tail(&rig.inner().proc.log(), 60));
    }
    eprintln!(
        "receive timeout counted {:?} after SIGSTOP of {what}",
        since.elapsed()
    );
    let log = rig.inner().proc.log();
    assert!(
        why.iter().any(|w| log.contains(w)),
        "relay-inner says why it drops the {what}:\n{}",
        log_tail(&log, 40)
    );
}

fn pids(rig: &CdcRig, sql: &str) -> Vec<i32> {
    rig.source
        .try_psql(sql)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// The source's walsender stops answering while streaming: relay-inner drops the
/// connection within `receive_timeout`, keeps trying while the stopped walsender still
/// holds the slot, streams again once it runs, and the target gets every row once.
#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn a_stalled_walsender_is_noticed_and_streaming_resumes() {
    require_root();
    let rig = CdcRig::start(RigOpts {
        setup_sql:
            "CREATE TABLE public.t (id bigint PRIMARY KEY, tx int NOT NULL, v text NOT NULL);"
                .into(),
        tables: vec![TABLE.into()],
        source_extra: "      heartbeat: 1s\n      status_interval: 1s\n      receive_timeout: 3s\n"
            .into(),
        ..RigOpts::default()
    });
    rig.wait_shipping();
    rig.wait_streaming();
    // Before.
    insert_txs(&rig, 0, 5);
    rig.wait_in_sync(&[TABLE], CATCH_UP);
    let before = receive_timeouts(rig.inner());

    let walsender = pids(
        &rig,
        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'routy_main' AND active_pid IS NOT NULL",
    );
    assert_eq!(walsender.len(), 1, "the slot's walsender: {walsender:?}");
    let stopped_at = Instant::now();
    let stopped = Stopped::new(walsender.clone());
    // During: committed on the source while its walsender is stopped.
    insert_txs(&rig, 5, 10);
    assert_noticed(
        &rig,
        before,
        stopped_at,
        RECEIVE_TIMEOUT + NOTICE_SLACK,
        &format!("walsender {walsender:?}"),
        &["no message from PostgreSQL on the replication connection"],
    );
    // More while it is still stopped (and holds the slot: relay-inner retries meanwhile).
    insert_txs(&rig, 10, 12);
    std::thread::sleep(Duration::from_secs(2));
    let st: serde_json::Value = rig.inner().status();
    let src = &st["cdc"]["sources"][0]["source"];
    assert_ne!(
        src["phase"], "streaming",
        "not streaming while stalled: {st}"
    );
    assert!(src["last_error"].is_string(), "the error is shown: {st}");
    drop(stopped);

    // After.
    insert_txs(&rig, 12, 15);
    rig.wait_in_sync(&[TABLE], CATCH_UP);
    let n = rig.target.psql("SELECT count(*) FROM public.t");
    assert_eq!(
        n,
        (15 * TX_ROWS).to_string(),
        "every row once on the target"
    );
    let per_tx = rig.target.psql(
        "SELECT count(*) FROM (SELECT tx FROM public.t GROUP BY tx HAVING count(*) <> 100) x",
    );
    assert_eq!(per_tx, "0", "every transaction whole on the target");
    // Streaming again, from a new walsender.
    let r = try_wait_until(CATCH_UP, "a new walsender streams", || {
        let now = pids(
            &rig,
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'routy_main' AND active_pid IS NOT NULL",
        );
        now.len() == 1 && now != walsender
    });
    r.unwrap_or_else(|e| panic!("{e}\n{}", log_tail(&rig.inner().proc.log(), 40)));
    let log = rig.inner().proc.log();
    rig.assert_source_running();
    assert!(
        log.matches("streaming changes").count() >= 2,
        "streamed again after the stall:\n{}",
        log_tail(&log, 40)
    );
}

/// The backends running the initial COPY stop answering: a copy has no total deadline
/// (a large table takes as long as it takes) but an idle one, so relay-inner drops it
/// within `receive_timeout`, copies what the copy had not (it went in key order, its
/// progress kept per chunk) by a resync, chunk by chunk while streaming, and the target
/// ends up with every row once.
#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn a_stalled_copy_is_noticed_and_the_copy_starts_over() {
    require_root();
    let rig = CdcRig::start(RigOpts {
        setup_sql: "CREATE TABLE public.t (id bigint PRIMARY KEY, tx int NOT NULL, v text NOT NULL);
            INSERT INTO public.t SELECT g, 0, repeat(md5(g::text), 10) FROM generate_series(1, 200000) g;"
            .into(),
        tables: vec![TABLE.into()],
        // Chunks of 5000 rows: the copy's progress is kept per chunk.
        source_extra: "      heartbeat: 1s\n      status_interval: 1s\n      receive_timeout: 3s\n      snapshot_chunk_rows: 5000\n"
            .into(),
        // A spool disk of 3 MB: the copy and the resync that continues it pause on the
        // full disk again and again (this once wedged the spool: acknowledgements that
        // arrived before the active segment was sealed never removed it).
        spool_tmpfs: Some("3m".into()),
        ..RigOpts::default()
    });
    let before = receive_timeouts(rig.inner());
    let copying =
        // Active, or in the snapshot's transaction between two chunks (the query shown is
        // the last one).
        "SELECT pid FROM pg_stat_activity WHERE query LIKE 'COPY (SELECT %'";
    let mut backend = Vec::new();
    let r = try_wait_until(CATCH_UP, "the initial COPY runs", || {
        backend = pids(&rig, copying);
        !backend.is_empty()
    });
    r.unwrap_or_else(|e| panic!("{e}\n{}", log_tail(&rig.inner().proc.log(), 40)));
    // The same connections copy chunk after chunk: stop them once some chunks are done.
    let r = try_wait_until(CATCH_UP, "chunks of the copy are done", || {
        rig.inner()
            .metric("routy_cdc_source_snapshot_rows_total", &[("table", TABLE)])
            >= 15_000.0
    });
    r.unwrap_or_else(|e| panic!("{e}\n{}", log_tail(&rig.inner().proc.log(), 40)));
    // Every copying connection by now (they join the snapshot one after another).
    backend = pids(&rig, copying);
    let stopped_at = Instant::now();
    let stopped = Stopped::new(backend.clone());
    // Written while the copy is stalled: streamed after the copy (its snapshot is older).
    rig.source.psql(
        "INSERT INTO public.t SELECT g, 1, md5(g::text) FROM generate_series(300001, 300100) g",
    );
    // Only time spent waiting for the server counts, not the pauses on the full spool
    // while relay-inner works through what the kernel had buffered before the stop: allow
    // for those.
    assert_noticed(
        &rig,
        before,
        stopped_at,
        RECEIVE_TIMEOUT + COPY_SLACK,
        &format!("COPY backend {backend:?}"),
        // In the middle of a chunk, or starting the next one.
        &[
            "copying public.t: no data from PostgreSQL for 3s",
            "PostgreSQL did not answer within 3s on the query connection while starting the COPY",
        ],
    );
    drop(stopped);
    rig.source.psql(
        "INSERT INTO public.t SELECT g, 2, md5(g::text) FROM generate_series(300101, 300200) g",
    );
    rig.wait_in_sync(&[TABLE], CATCH_UP);
    assert_eq!(rig.target.psql("SELECT count(*) FROM public.t"), "200200");
    rig.assert_source_running();
    let resynced = rig
        .inner()
        .metric("routy_cdc_source_resync_rows_total", &[("table", TABLE)]);
    // Only the ranges the copy had not done: it was copied in key order, each chunk's
    // progress kept (the 100 rows written during the stall are among them).
    assert!(
        (100.0..190_000.0).contains(&resynced),
        "the copy went on by a resync from where it got ({resynced} rows resynced):\n{}",
        log_tail(&rig.inner().proc.log(), 40)
    );
}
