//! End-to-end CDC under faults that must not lose data: a spool or store damaged in the
//! middle (corruption, not a torn tail), with the real relays, source and target.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use routy_e2e::cdc::{CdcRig, RigOpts, CATCH_UP, SOURCE};
use routy_e2e::{bin, log_tail, require_root, run_timeout, try_wait_until};

/// Rows per source transaction: small enough that each transaction is one spool record.
const TX_ROWS: u64 = 200;

const TABLE: &str = "public.t";

fn rig_opts(spool_max: &str) -> RigOpts {
    RigOpts {
        setup_sql:
            "CREATE TABLE public.t (id bigint PRIMARY KEY, tx int NOT NULL, v text NOT NULL);"
                .into(),
        tables: vec![TABLE.into()],
        source_extra: "      heartbeat: 1s\n      status_interval: 1s\n".into(),
        spool_max: spool_max.into(),
        ..RigOpts::default()
    }
}

fn rig(spool_max: &str) -> CdcRig {
    CdcRig::start(rig_opts(spool_max))
}

/// Inserts transactions `from..to`, `TX_ROWS` rows each (ids are unique across them).
fn insert_txs(rig: &CdcRig, from: u64, to: u64) {
    rig.insert_txs("public.t", from, to, TX_ROWS, "repeat(md5(g::text), 2)");
}

/// Records the sink passed as lost to corruption (cdc salvage markers).
fn lost_records(rig: &CdcRig) -> f64 {
    rig.outer().metric("routy_cdc_sink_lost_records_total", &[])
}

/// relay-inner's spool waits for space, by `reason` (`max_bytes`, `no_space`).
const SPOOL_FULL_WAITS: &str = "routy_cdc_spool_full_waits_total";

fn count(pg: &routy_e2e::Pg) -> u64 {
    pg.try_psql("SELECT count(*) FROM public.t")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The newest segment file in a segment log directory.
fn last_segment(dir: &Path) -> PathBuf {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segs.sort();
    segs.pop()
        .unwrap_or_else(|| panic!("no segment in {}", dir.display()))
}

/// (offset, seq, payload length) of every record of a segment file (format in
/// `routy_log::segment_log`: len u32, crc u32, seq u64, payload), up to the first that
/// does not fit.
fn records(file: &Path) -> Vec<(usize, u64, usize)> {
    let data = std::fs::read(file).expect("read segment");
    let mut out = Vec::new();
    let mut at = 0;
    while at + 16 <= data.len() {
        let len = u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize;
        let seq = u64::from_le_bytes(data[at + 8..at + 16].try_into().unwrap());
        if at + 16 + len > data.len() {
            break;
        }
        out.push((at, seq, len));
        at += 16 + len;
    }
    out
}

/// Flips 16 bytes in the middle of the payload of record `seq` of `file`.
fn damage_record(file: &Path, seq: u64) {
    let (at, _, len) = records(file)
        .into_iter()
        .find(|r| r.1 == seq)
        .unwrap_or_else(|| panic!("no seq {seq} in {}", file.display()));
    assert!(
        len > 40,
        "record {seq} is too small to damage in the middle"
    );
    flip16(file, at + 16 + len / 2 - 8);
}

/// The seq of the oldest record in a spool (from its segment names).
fn spool_first(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.strip_suffix(".seg")?.parse::<u64>().ok()
                })
                .min()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

/// A config file holding `yaml` (a relay's, for a command run while it is stopped).
fn config_file(yaml: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = routy_e2e::tempdir();
    let path = dir.path().join("relay.yaml");
    std::fs::write(&path, yaml).expect("write config");
    (dir, path)
}

/// Flips 16 bytes of `file` at `offset`.
fn flip16(file: &Path, offset: usize) {
    let mut data = std::fs::read(file).expect("read segment");
    assert!(offset + 16 <= data.len(), "{} is too short", file.display());
    data[offset..offset + 16]
        .iter_mut()
        .for_each(|b| *b ^= 0xA5);
    std::fs::write(file, data).expect("write segment");
}

/// Runs `relay-X cdc salvage --config F --source S`; returns its stdout.
fn salvage(which: &str, config: &Path, source: &str) -> String {
    let mut cmd = Command::new(bin(which));
    cmd.args(["cdc", "salvage", "--config"])
        .arg(config)
        .args(["--source", source]);
    let out = run_timeout(&mut cmd, None, Duration::from_secs(60)).expect("cdc salvage");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{which} cdc salvage failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// Transactions missing from the target (whole: a transaction is never half applied).
fn missing_txs(rig: &CdcRig, txs: u64) -> Vec<u64> {
    let counts = rig
        .target
        .psql("SELECT string_agg(tx || ':' || n, ',') FROM (SELECT tx, count(*) n FROM public.t GROUP BY tx) s");
    let mut have = std::collections::HashMap::new();
    for pair in counts.trim().split(',').filter(|p| !p.is_empty()) {
        let (tx, n) = pair.split_once(':').expect("tx:n");
        have.insert(tx.parse::<u64>().unwrap(), n.parse::<u64>().unwrap());
    }
    let mut missing = Vec::new();
    for tx in 0..txs {
        match have.get(&tx).copied().unwrap_or(0) {
            0 => missing.push(tx),
            TX_ROWS => {}
            n => panic!("transaction {tx} is half applied: {n} of {TX_ROWS} rows"),
        }
    }
    missing
}

/// The first repro: relay-outer away, many transactions spooled and confirmed to
/// PostgreSQL, 16 bytes flipped in the middle of the spool's last segment. relay-inner
/// used to cut everything from the damage on as a "torn tail" and resume from the slot:
/// those rows never reached the target. Now the source is refused (the tunnel still
/// serves), and `cdc salvage` brings back every valid record: only the transaction(s)
/// in the damaged record are lost, and said to be.
#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn a_spool_damaged_in_the_middle_is_refused_then_salvaged() {
    require_root();
    let mut rig = rig("1GiB");
    rig.wait_shipping();
    insert_txs(&rig, 0, 5);
    rig.wait_in_sync(&[TABLE], CATCH_UP);
    rig.kill_outer();
    insert_txs(&rig, 5, 105);
    let end = rig
        .source
        .psql("SELECT (pg_current_wal_lsn() - '0/0')::bigint")
        .trim()
        .parse::<u64>()
        .expect("wal lsn");
    try_wait_until(CATCH_UP, "the spool confirms the whole WAL", || {
        rig.confirmed_flush() >= end
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", rig.inner().proc.log()));
    rig.kill_inner();
    let seg = last_segment(&rig.spool_dir.join("main/log"));
    let len = std::fs::metadata(&seg).expect("segment").len() as usize;
    flip16(&seg, len / 2);

    rig.start_inner();
    rig.start_outer();
    let inner = rig.inner();
    // The source is refused (the tunnel goes on), with a reason that names the file,
    // the offset and the way out.
    let st = inner.wait_status("the source is refused", Duration::from_secs(30), |st| {
        st["cdc"]["refused"][0]["name"] == "main"
    });
    let why = st["cdc"]["refused"][0]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(
        why.contains("not a torn tail") && why.contains("cdc salvage") && why.contains(".seg"),
        "the refusal names file, offset and the way out: {st}"
    );
    assert_eq!(
        inner.metric(
            "routy_cdc_source_errors_total",
            &[("reason", "spool_corrupt")]
        ),
        1.0
    );
    let log = inner.proc.log();
    assert!(
        !log.contains("cutting torn tail"),
        "nothing may be cut:\n{log}"
    );
    // A resync of a refused source is refused in turn (409), saying why.
    let out = Command::new(bin("relay-inner"))
        .args(["cdc", "resync", "--config"])
        .arg(&inner.config)
        .args(["--source", "main", "--table", TABLE])
        .output()
        .expect("relay-inner cdc resync");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success() && said.contains("409") && said.contains("its spool is damaged"),
        "{said}"
    );
    // The tunnel still serves its services (once relay-inner, just started, has it up).
    try_wait_until(
        Duration::from_secs(30),
        "a query through the tunnel",
        || {
            routy_e2e::psql_at("127.0.0.1", rig.listen_port, "SELECT 41 + 1")
                .is_ok_and(|v| v.trim() == "42")
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", routy_e2e::log_tail(&rig.inner().proc.log(), 30)));
    // Nothing of the damaged spool reached the target, and nothing was confirmed twice.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(count(&rig.target), 5 * TX_ROWS);

    rig.kill_inner();
    let (_dir, inner_config) = config_file(&rig.inner_yaml);
    let said = salvage("relay-inner", &inner_config, "main");
    assert!(
        said.contains("replaced by lost-record markers") && said.contains(".salvaged"),
        "{said}"
    );
    rig.start_inner();
    // Later changes flow again.
    insert_txs(&rig, 105, 110);
    let want = 110 * TX_ROWS;
    try_wait_until(
        CATCH_UP,
        "the target has every transaction but the lost",
        || {
            let missing = missing_txs(&rig, 110);
            (1..=2).contains(&missing.len())
                && missing.iter().all(|tx| (5..105).contains(tx))
                && count(&rig.target) == want - missing.len() as u64 * TX_ROWS
                && lost_records(&rig) > 0.0
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}: target {} rows, missing {:?}\n--- relay-outer ---\n{}\n--- relay-inner ---\n{}",
            count(&rig.target),
            missing_txs(&rig, 110),
            routy_e2e::tail(&rig.outer().proc.log(), 40),
            routy_e2e::tail(&rig.inner().proc.log(), 40)
        )
    });
}

/// The second repro: relay-outer's store damaged in the middle. When relay-inner's
/// spool still holds the damaged seqs, the store sets the damaged part aside, asks for it
/// again and the target ends equal to the source. When the spool no longer holds them the
/// store stops there with the gap named (it used to cut acknowledged records as a "torn
/// tail" and then stall for good), and `relay-outer cdc salvage` puts the set-aside
/// records back with a marker in place of the damaged one.
#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn a_store_damaged_in_the_middle_is_fetched_again_or_salvaged() {
    require_root();
    // An 8 MiB spool has 1 MiB segments: acknowledged ones go quickly.
    let mut rig = rig("8MiB");
    let store = rig.store_dir.join(SOURCE);
    let spool = rig.spool_dir.join("main/log");
    rig.wait_shipping();
    insert_txs(&rig, 0, 20);
    rig.wait_in_sync(&[TABLE], CATCH_UP);

    // 1. Damage near the end of the store, which the spool still holds.
    rig.kill_outer();
    let seg = last_segment(&store);
    let last = records(&seg).last().expect("a record").1;
    let first = spool_first(&spool);
    assert!(
        first < last,
        "the spool holds seqs {first}.. and the store ends at {last}"
    );
    damage_record(&seg, last - 1);
    rig.start_outer();
    let aside = "moved from the damage on into a side file";
    rig.outer().wait_count(aside, 1, Duration::from_secs(30));
    insert_txs(&rig, 20, 25);
    rig.wait_in_sync(&[TABLE], CATCH_UP);
    rig.outer()
        .wait_count("came again from relay-inner", 1, Duration::from_secs(30));

    // 2. Damage the spool no longer holds, in records the sink has not applied (the
    //    target is stopped, so they are only in the store).
    rig.target.stop();
    let applied = records(&last_segment(&store)).last().expect("a record").1;
    insert_txs(&rig, 25, 125);
    try_wait_until(
        CATCH_UP,
        "the spool removed what the store acknowledged",
        || spool_first(&spool) > applied + 10,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", rig.inner().proc.log()));
    rig.kill_outer();
    let gone = (applied + spool_first(&spool)) / 2;
    damage_record(&last_segment(&store), gone);
    rig.start_outer();
    let outer = rig.outer();
    outer.wait_count(aside, 1, Duration::from_secs(30));
    // The sink waits on the damage, and /status names it.
    let st = outer.wait_status("the sink waits on the damage", CATCH_UP, |st| {
        st.to_string().contains("\"blocked_by\":\"seq")
    });
    assert!(
        st.to_string().contains(".damaged"),
        "/status names the damage: {st}"
    );
    assert_eq!(
        outer.metric("routy_cdc_store_damaged", &[("source", "site-a/main")]),
        1.0
    );
    // relay-outer refuses relay-inner's stream naming the gap and the way out; relay-inner's
    // /status shows it.
    let damaged = format!("found seq {gone} damaged");
    let st = rig
        .inner()
        .wait_status("relay-inner shows the refusal", CATCH_UP, |st| {
            st["cdc"]["sources"][0]["shipping"][0]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains(&damaged))
        });
    let why = st["cdc"]["sources"][0]["shipping"][0]["last_error"]
        .as_str()
        .unwrap_or_default();
    assert!(why.contains("cdc salvage"), "the way out is named: {why}");
    rig.kill_outer();
    let (_dir, outer_config) = config_file(&rig.outer_yaml);
    let said = salvage("relay-outer", &outer_config, SOURCE);
    assert!(
        said.contains("back at offset") && said.contains(&format!("seqs {gone}..={gone}")),
        "{said}"
    );
    rig.target.restart();
    rig.start_outer();
    insert_txs(&rig, 125, 130);
    try_wait_until(
        CATCH_UP,
        "the target has every transaction but the lost one",
        || {
            let missing = missing_txs(&rig, 130);
            missing.len() == 1
                && (25..125).contains(&missing[0])
                && count(&rig.target) == 129 * TX_ROWS
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}: target {} rows, missing {:?}\n--- relay-outer ---\n{}",
            count(&rig.target),
            missing_txs(&rig, 130),
            routy_e2e::tail(&rig.outer().proc.log(), 60)
        )
    });
    assert!(lost_records(&rig) > 0.0, "the sink counts what was lost");
    eprintln!("store salvage: {said}missing: {:?}", missing_txs(&rig, 130));
}

/// Inserts transactions `from..to` of `TX_ROWS` rows of about 700 bytes each (about
/// 140 KB a transaction).
fn insert_big_txs(rig: &CdcRig, from: u64, to: u64) {
    rig.insert_txs("public.t", from, to, TX_ROWS, "repeat(md5(g::text), 21)");
}

/// The fourth fault: the spool's filesystem fills up (a 4 MiB tmpfs under a
/// 1 GiB `max_bytes`) while relay-outer is away. It used to stop the source for good
/// ("No space left on device"), and every restart filled the disk again. Now reading
/// pauses as at `max_bytes`, logged once, and resumes by itself once relay-outer's
/// acknowledgements free space: everything arrives.
#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn a_full_spool_filesystem_pauses_reading_and_loses_nothing() {
    require_root();
    let mut rig = CdcRig::start(RigOpts {
        spool_tmpfs: Some("4m".into()),
        ..rig_opts("1GiB")
    });
    rig.wait_shipping();
    rig.kill_outer();
    // About 14 MB of changes into a 4 MiB filesystem.
    insert_big_txs(&rig, 0, 100);
    let inner = rig.inner();
    inner.wait_metric(SPOOL_FULL_WAITS, &[("reason", "no_space")], CATCH_UP, |v| {
        v > 0.0
    });
    // Take the last free bytes too: freeing space must not need any.
    let filler = rig.spool_dir.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).expect("filler");
        while f.write_all(&[0u8; 4096]).is_ok() {}
        while f.write_all(&[0u8; 1]).is_ok() {}
    }
    std::thread::sleep(Duration::from_secs(3));
    rig.start_outer();
    rig.wait_in_sync(&[TABLE], CATCH_UP);
    assert_eq!(count(&rig.target), 100 * TX_ROWS);
    rig.assert_source_running();
    let log = rig.inner().proc.log();
    assert_eq!(
        log.matches("spool is full").count(),
        1,
        "logged once, not per record:\n{}",
        routy_e2e::tail(&log, 40)
    );
}

/// The third fault: relay-outer's store on a full filesystem refuses a batch
/// ("No space left on device"). The shipper used to wait forever for window credit on a
/// stream relay-outer no longer read: nothing was shipped after space came back until
/// relay-inner was restarted. Now every refusal ends in a retry with backoff, and once
/// space is freed everything arrives.
#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn a_refused_batch_is_sent_again_once_the_store_has_space() {
    require_root();
    let mut rig = CdcRig::start(RigOpts {
        store_tmpfs: Some("4m".into()),
        ..rig_opts("1GiB")
    });
    rig.wait_shipping();
    rig.kill_outer();
    insert_big_txs(&rig, 0, 100);
    rig.start_outer();
    // relay-outer refuses the batch its store cannot take.
    rig.outer().wait_metric(
        "routy_cdc_ship_errors_total",
        &[("reason", "store")],
        CATCH_UP,
        |v| v > 0.0,
    );
    // relay-inner keeps trying meanwhile; then space comes back.
    std::thread::sleep(Duration::from_secs(3));
    rig.store_tmpfs
        .as_ref()
        .expect("store tmpfs")
        .resize("256m");
    rig.wait_in_sync(&[TABLE], CATCH_UP);
    assert_eq!(count(&rig.target), 100 * TX_ROWS);
    // relay-inner counted the refusals as such, and said why.
    assert!(
        rig.inner()
            .metric("routy_cdc_ship_errors_total", &[("reason", "refused")])
            > 0.0
    );
    let log = rig.inner().proc.log();
    assert!(
        log.contains("relay-outer ended the stream") && log.contains("No space left on device"),
        "relay-inner says why the stream ended:\n{}",
        routy_e2e::tail(&log, 30)
    );
}

/// The seventh fault: one large source transaction (here 500 000 rows of about
/// 330 bytes, 165 MB of changes) took relay-outer's memory up with its size: the sink
/// read 256 records ahead and kept 256 insert statements in flight, whatever their size,
/// queued while a slow target worked. Now both are bounded in bytes and the peak stays
/// far below the transaction's size.
#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn a_large_transaction_does_not_grow_relay_outer_with_its_size() {
    require_root();
    // A target that takes 50 ms per insert statement: statements queue in relay-outer
    // unless it bounds them.
    let hook = routy_e2e::hooks::Receiver::counting();
    let rig = CdcRig::start(RigOpts {
        target_setup_sql: "CREATE TABLE public.t (id bigint PRIMARY KEY, tx int NOT NULL, v text NOT NULL);
            CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(0.05); RETURN NULL; END $$;
            CREATE TRIGGER slow AFTER INSERT ON public.t FOR EACH STATEMENT EXECUTE FUNCTION slow();"
            .into(),
        // Two more sinks: a webhook, which would hold the whole transaction unless its
        // batches end inside it, and a PostgreSQL sink applying it in chunks.
        extra_sinks: format!(
            "    - name: hook\n      source: site-a/main\n      webhook:\n        url: \"{}\"\n\
             \x20   - name: chunked\n      source: site-a/main\n      postgres: {{ dsn: \"{{target_dsn}}\", \
             create_tables: true, schema: chunked, transaction_chunk_rows: 50000 }}\n",
            hook.url(),
        ),
        ..rig_opts("64GiB")
    });
    rig.wait_shipping();
    let outer = rig.outer().proc.pid();
    let inner = rig.inner().proc.pid();
    let (before, _) = routy_e2e::proc_memory(outer);
    let (inner_before, _) = routy_e2e::proc_memory(inner);
    rig.source.psql(
        "INSERT INTO public.t SELECT g, 0, repeat(md5(g::text), 10) FROM generate_series(1, 500000) g",
    );
    rig.wait_in_sync(&[TABLE], CATCH_UP);
    let r = try_wait_until(
        CATCH_UP,
        "the webhook and the chunked sink have every row",
        || {
            hook.seen(|s| s.inserts_counted) >= 500_000
                && rig.target.psql("SELECT count(*) FROM chunked.t") == "500000"
        },
    );
    r.unwrap_or_else(|e| {
        panic!(
            "{e}: webhook {} inserts\n{}",
            hook.seen(|s| s.inserts_counted),
            log_tail(&rig.outer().proc.log(), 30)
        )
    });
    let (_, peak) = routy_e2e::proc_memory(outer);
    let (_, inner_peak) = routy_e2e::proc_memory(inner);
    let grew = peak.saturating_sub(before);
    let inner_grew = inner_peak.saturating_sub(inner_before);
    eprintln!("relay-outer: {before} bytes before, peak {peak}; relay-inner: {inner_before} before, peak {inner_peak}");
    // The bounds the README documents for a transaction of any size (docs/bench/cdc-memory.md
    // measured 20 million rows): the spool and the store hold the bytes, not the memory.
    assert!(
        grew < 80_000_000,
        "relay-outer grew by {grew} bytes through one transaction of 165 MB"
    );
    assert!(
        inner_grew < 80_000_000,
        "relay-inner grew by {inner_grew} bytes through one transaction of 165 MB"
    );
    // Their batches ended inside the transaction; the other PostgreSQL sink's did not.
    let splits = |sink: &str| {
        rig.outer()
            .metric("routy_cdc_sink_split_batches_total", &[("sink", sink)])
    };
    assert!(splits("hook") >= 10.0, "{}", splits("hook"));
    assert!(splits("chunked") >= 9.0, "{}", splits("chunked"));
    assert_eq!(splits("replica"), 0.0);
}

/// A relay-outer that stops acknowledging (SIGSTOP, shorter than the keepalive timeout,
/// so the session lives) while batches are in flight: after `cdc.batch.ack_timeout` the
/// shipper reopens its stream instead of waiting on it for good, and nothing is lost.
#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn a_stream_without_acknowledgements_is_reopened() {
    require_root();
    let mut rig = CdcRig::start(RigOpts {
        inner_cdc_extra: "  batch: { ack_timeout: 1s }\n".into(),
        ..rig_opts("1GiB")
    });
    rig.wait_shipping();
    let load = rig.pgbench(
        "\\set k random(1, 1000000000)\nINSERT INTO public.t VALUES (:k, 1, 'x') ON CONFLICT (id) DO UPDATE SET tx = public.t.tx + 1;\n",
        2,
        8,
    );
    std::thread::sleep(Duration::from_secs(2));
    let outer = rig.outer.as_mut().expect("relay-outer");
    outer.proc.signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(2500));
    outer.proc.signal(libc::SIGCONT);
    eprintln!("{}", load.finish());
    rig.wait_in_sync(&[TABLE], CATCH_UP);
    let log = rig.inner().proc.log();
    assert!(
        log.contains("no acknowledgement from relay-outer within 1s"),
        "the hung stream was reopened:\n{}",
        routy_e2e::log_tail(&log, 40)
    );
}

/// The initial copy of a table larger than the spool's whole filesystem (20 MB through a
/// 3 MiB tmpfs): the copy pauses whenever the disk is full and goes on as relay-outer
/// acknowledges, and its progress file, written on a disk the spool keeps full, does not
/// stop the source.
#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn an_initial_copy_larger_than_the_spool_disk_goes_through() {
    require_root();
    let rig = CdcRig::start(RigOpts {
        setup_sql: "CREATE TABLE public.t (id bigint PRIMARY KEY, tx int NOT NULL, v text NOT NULL);
            INSERT INTO public.t SELECT g, 0, repeat(md5(g::text), 10) FROM generate_series(1, 60000) g;
            CREATE TABLE public.u (id bigint PRIMARY KEY, v text NOT NULL);
            INSERT INTO public.u SELECT g, repeat(md5(g::text), 10) FROM generate_series(1, 2000) g;"
            .into(),
        tables: vec![TABLE.into(), "public.u".into()],
        spool_tmpfs: Some("3m".into()),
        ..RigOpts::default()
    });
    rig.wait_in_sync(&[TABLE, "public.u"], CATCH_UP);
    rig.assert_source_running();
    assert!(
        rig.inner()
            .metric(SPOOL_FULL_WAITS, &[("reason", "no_space")])
            > 0.0,
        "the copy really filled the disk"
    );
}
