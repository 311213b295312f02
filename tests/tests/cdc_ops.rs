//! End-to-end CDC operations: a full spool, heartbeats and the metrics and status an
//! operator watches, `cdc drop-slot` followed by a fresh copy, a source that cannot start
//! (missing table) beside a working tunnel, and config mistakes `check-config` names.

use std::process::Command;
use std::time::Duration;

use routy_e2e::cdc::{CdcRig, RigOpts, CATCH_UP, SINK, SOURCE};
use routy_e2e::relays::{
    check_config, inner_yaml, metric_sample, outer_yaml, ListenerSpec, Pki, Relay,
};
use routy_e2e::{bin, psql_at, require_root, run_timeout, try_wait_until};

/// How long a condition that needs no catching up may take.
const SHORT: Duration = Duration::from_secs(30);

/// Relay `r`'s metrics now ("" while its admin endpoint does not answer).
fn metrics_of(r: &Relay) -> String {
    r.try_admin_get("/metrics").unwrap_or_default()
}

/// Sum of every series of metric `name` in Prometheus text, None if there is none.
fn metric(text: &str, name: &str) -> Option<f64> {
    metric_sample(text, name, &[])
}

/// Panics with the relay's log tail unless `f` becomes true within `timeout`.
fn wait_or_log(r: &Relay, timeout: Duration, what: &str, f: impl FnMut() -> bool) {
    if let Err(e) = try_wait_until(timeout, what, f) {
        let log = r.proc.log();
        let lines: Vec<&str> = log.lines().collect();
        panic!(
            "{e}\n--- {} log ---\n{}",
            r.proc.name(),
            lines[lines.len().saturating_sub(60)..].join("\n")
        );
    }
}

/// Heartbeat and slot checks every second so positions move quickly in the tests.
const FAST_SOURCE: &str = "      heartbeat: 1s\n      status_interval: 1s\n";

/// With relay-outer away and a 1 MiB spool, several MB of changes fill the spool:
/// reading pauses (the slot stays behind), nothing is dropped, and once relay-outer is
/// back everything arrives and the slot catches up with the source's WAL.
#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn spool_full_pauses_reading_and_loses_nothing() {
    require_root();
    let mut rig = CdcRig::start(RigOpts {
        setup_sql: "CREATE TABLE public.big (id int PRIMARY KEY, v text NOT NULL);".into(),
        tables: vec!["public.big".into()],
        source_extra: FAST_SOURCE.into(),
        spool_max: "1MiB".into(),
        ..RigOpts::default()
    });
    rig.wait_shipping();
    rig.wait_in_sync(&["public.big"], CATCH_UP);
    rig.kill_outer();
    // 20 000 rows of ~300 bytes in four transactions: about 6 MB of changes.
    for k in 0..4 {
        rig.source.psql(&format!(
            "INSERT INTO public.big SELECT g, repeat(md5(g::text), 9) || g \
             FROM generate_series({} , {}) g;",
            k * 5000 + 1,
            (k + 1) * 5000
        ));
    }
    let end = rig.wal_end();
    let inner = rig.inner();
    wait_or_log(
        inner,
        CATCH_UP,
        "routy_cdc_spool_full_waits_total > 0",
        || metric(&metrics_of(inner), "routy_cdc_spool_full_waits_total").unwrap_or(0.0) > 0.0,
    );
    // Reading paused: the slot cannot have confirmed what does not fit in the spool.
    let paused_at = rig.confirmed_flush();
    assert!(
        paused_at < end,
        "the slot confirmed {paused_at:X} although the spool is full and the WAL ends at {end:X}"
    );
    // The spool stays near its bound (one record of at most ~256 KiB may go past it).
    let st = inner.try_status();
    let bytes = st["cdc"]["sources"][0]["spool"]["bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("no spool bytes in /status: {st}"));
    assert!(
        bytes <= 2 << 20,
        "spool holds {bytes} bytes with max_bytes 1MiB"
    );

    rig.start_outer();
    rig.wait_in_sync(&["public.big"], CATCH_UP);
    assert_eq!(rig.target.psql("SELECT count(*) FROM public.big"), "20000");
    try_wait_until(SHORT, "the slot confirms the whole WAL", || {
        rig.confirmed_flush() >= end
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}: slot at {:X}, WAL end {end:X}\n{}",
            rig.confirmed_flush(),
            rig.inner().proc.log()
        )
    });
}

/// An idle published table: heartbeats are emitted and counted, retained WAL is a
/// metric, and both relays' /status and /metrics show the source, store and sink.
#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn heartbeat_and_retained_wal_are_reported() {
    require_root();
    let rig = CdcRig::start(RigOpts {
        setup_sql: "CREATE TABLE public.t (id int PRIMARY KEY); INSERT INTO public.t VALUES (1);"
            .into(),
        tables: vec!["public.t".into()],
        source_extra: FAST_SOURCE.into(),
        ..RigOpts::default()
    });
    rig.wait_shipping();
    rig.wait_in_sync(&["public.t"], CATCH_UP);
    let (inner, outer) = (rig.inner(), rig.outer());

    wait_or_log(
        inner,
        SHORT,
        "heartbeats counted and retained WAL reported",
        || {
            let m = metrics_of(inner);
            metric(&m, "routy_cdc_source_heartbeats_total").unwrap_or(0.0) > 0.0
                && metric(&m, "routy_cdc_source_retained_wal_bytes").is_some()
        },
    );
    let m = metrics_of(inner);
    assert!(
        m.contains("routy_cdc_source_heartbeats_total{source=\"main\"}"),
        "heartbeats carry the source label:\n{m}"
    );
    let checked = metric(&m, "routy_cdc_source_slot_checked_timestamp_seconds").unwrap_or(0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - checked).abs() < 60.0,
        "the slot was read recently: {checked} at {now}\n{m}"
    );

    wait_or_log(
        inner,
        SHORT,
        "relay-inner /status: source streaming",
        || inner.try_status()["cdc"]["sources"][0]["source"]["phase"] == "streaming",
    );
    let st = inner.try_status();
    let src = &st["cdc"]["sources"][0];
    assert_eq!(src["name"], "main", "{st}");
    assert_eq!(src["slot"], "routy_main", "{st}");
    assert_eq!(src["publication"], "routy_main", "{st}");
    assert!(src["source"]["last_error"].is_null(), "{st}");
    assert!(src["source"]["retained_wal_bytes"].is_u64(), "{st}");
    assert!(src["source"]["slot_checked_seconds_ago"].is_f64(), "{st}");
    assert!(src["spool"]["durable_seq"].is_u64(), "{st}");

    wait_or_log(
        outer,
        SHORT,
        "relay-outer /status: store connected, sink up",
        || {
            let st = outer.try_status();
            let s = &st["cdc"]["sources"][SOURCE];
            s["connected"] == true && s["sinks"][SINK]["up"] == true
        },
    );
    let st = outer.try_status();
    let s = &st["cdc"]["sources"][SOURCE];
    assert!(s["last_seq"].as_u64().unwrap_or(0) > 0, "{st}");
    assert!(s["sinks"][SINK]["applied_seq"].is_u64(), "{st}");
    assert!(s["sinks"][SINK]["last_error"].is_null(), "{st}");

    wait_or_log(
        outer,
        SHORT,
        "relay-outer /metrics: routy_cdc_sink_applied_seq",
        || metric(&metrics_of(outer), "routy_cdc_sink_applied_seq").unwrap_or(0.0) > 0.0,
    );
}

/// `relay-inner cdc drop-slot` with relay-inner stopped drops the slot and says so; an
/// unknown source is refused with the known names; the next start creates a new slot,
/// copies every table again and the target ends identical, also for changes made while
/// no slot existed.
#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn drop_slot_command_and_a_fresh_copy() {
    require_root();
    let mut rig = CdcRig::start(RigOpts {
        setup_sql: "CREATE TABLE public.t (id int PRIMARY KEY, v text);
                    INSERT INTO public.t SELECT g, 'v' || g FROM generate_series(1, 1000) g;"
            .into(),
        tables: vec!["public.t".into()],
        ..RigOpts::default()
    });
    rig.wait_in_sync(&["public.t"], CATCH_UP);

    let drop_slot = |config: &std::path::Path, source: &str| {
        let mut cmd = Command::new(bin("relay-inner"));
        cmd.args(["cdc", "drop-slot", "--config"])
            .arg(config)
            .args(["--source", source]);
        let out = run_timeout(&mut cmd, None, SHORT).expect("cdc drop-slot");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    // Refused while relay-inner streams from the slot.
    let (ok, text) = drop_slot(&rig.inner().config, "main");
    assert!(!ok, "drop-slot must refuse a slot in use: {text}");
    assert!(
        text.contains("in use") && text.contains("stop relay-inner"),
        "{text}"
    );
    assert_eq!(
        rig.source
            .psql("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'routy_main'"),
        "1"
    );

    let mut stopped = rig.inner.take().expect("relay-inner running");
    stopped.proc.term();
    let st = stopped.proc.wait_exit(SHORT);
    assert!(
        st.is_some_and(|s| s.success()),
        "relay-inner did not exit cleanly on SIGTERM: {st:?}\n{}",
        stopped.proc.log()
    );
    // The walsender serving it goes away right after.
    try_wait_until(SHORT, "slot inactive", || {
        rig.source
            .psql("SELECT active FROM pg_replication_slots WHERE slot_name = 'routy_main'")
            == "f"
    })
    .unwrap();

    let config = stopped.config.clone();
    let drop_slot = |source: &str| drop_slot(&config, source);
    let (ok, text) = drop_slot("nope");
    assert!(!ok, "an unknown source must fail: {text}");
    assert!(
        text.contains("no cdc source named \"nope\"") && text.contains("main"),
        "the message names the source and the known ones: {text}"
    );
    let (ok, text) = drop_slot("main");
    assert!(ok, "drop-slot failed: {text}");
    assert!(
        text.contains("dropped replication slot routy_main")
            && text.contains("copies every table again"),
        "{text}"
    );
    assert_eq!(
        rig.source
            .psql("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'routy_main'"),
        "0",
        "the slot is gone"
    );
    let (ok, again) = drop_slot("main");
    assert!(ok, "a second drop-slot is harmless: {again}");
    assert!(again.contains("does not exist"), "{again}");
    drop(stopped);

    // Changes while no slot exists: only a new copy can bring them over.
    rig.source.psql(
        "DELETE FROM public.t WHERE id <= 100;
         UPDATE public.t SET v = 'changed' WHERE id % 7 = 0;
         INSERT INTO public.t SELECT g, 'new' FROM generate_series(2001, 2500) g;",
    );
    rig.start_inner();
    let inner = rig.inner();
    wait_or_log(
        inner,
        CATCH_UP,
        "relay-inner creates the slot again",
        || inner.count("created the replication slot") > 0,
    );
    rig.wait_in_sync(&["public.t"], CATCH_UP);
    // And it streams from the new slot.
    rig.source
        .psql("INSERT INTO public.t VALUES (5000, 'after'); DELETE FROM public.t WHERE id = 2001;");
    rig.wait_in_sync(&["public.t"], CATCH_UP);
    assert!(
        rig.outer().count("initial copy starts") >= 2,
        "the sink emptied the table for each copy:\n{}",
        rig.outer().proc.log()
    );
}

/// A source naming a table that does not exist stops with an error naming it; the
/// tunnel and its services keep working.
#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn a_missing_table_is_a_clear_error() {
    require_root();
    let mut rig = CdcRig::start(RigOpts {
        setup_sql: "CREATE TABLE public.t (id int PRIMARY KEY);".into(),
        tables: vec!["public.t".into(), "public.nope".into()],
        ..RigOpts::default()
    });
    let inner = rig.inner();
    let st = inner.wait_status("the source stops", SHORT, |st| {
        st["cdc"]["sources"][0]["source"]["phase"] == "failed"
    });
    let error = st["cdc"]["sources"][0]["source"]["last_error"]
        .as_str()
        .unwrap_or_default();
    assert!(
        error.contains("public.nope") && error.contains("do not exist"),
        "the error names the missing table: {st}"
    );
    assert!(
        !error.contains("public.t,"),
        "the error names only the missing table: {st}"
    );
    assert_eq!(
        inner.metric("routy_cdc_source_errors_total", &[("reason", "fatal")]),
        1.0,
        "the fatal error is counted once"
    );
    // Nothing was created on the source for the failed source.
    assert_eq!(
        rig.source
            .psql("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'routy_main'"),
        "0"
    );
    // The tunnel is unaffected.
    assert_eq!(
        psql_at("127.0.0.1", rig.listen_port, "SELECT 1").expect("psql through the tunnel"),
        "1"
    );
    let st = rig.inner.as_mut().unwrap().proc.try_status();
    assert!(st.is_none(), "relay-inner exited: {st:?}");
}

const KA: (&str, &str) = ("5s", "15s");

fn assert_fails(which: &str, yaml: &str, needles: &[&str]) {
    let (ok, text) = check_config(which, yaml);
    assert!(!ok, "{which} check-config accepted:\n{yaml}\n{text}");
    eprintln!("{which} check-config: {}", text.trim_end());
    for n in needles {
        assert!(
            text.contains(n),
            "{which} check-config message lacks {n:?}:\n{text}"
        );
    }
}

/// `check-config` refuses CDC mistakes with a message naming the field.
#[test]
fn bad_cdc_config_is_rejected_with_the_field() {
    let pki = Pki::new(&["localhost"]);
    pki.issue("site-a");
    let spool = pki.dir().join("spool");
    let source = "    - name: main\n      postgres:\n        dsn: \"host=127.0.0.1 user=postgres\"\n        tables: [public.orders]\n";
    let inner = |sources: &str| {
        inner_yaml(
            &pki,
            "site-a",
            &[("127.0.0.1:7443".to_string(), "localhost")],
            &[("pg", "127.0.0.1:5432".to_string())],
            KA,
            &format!(
                "cdc:\n  spool: {{ dir: {}, max_bytes: 1MiB }}\n  sources:\n{sources}",
                spool.display()
            ),
        )
    };
    let good = inner(source);
    let (ok, text) = check_config("relay-inner", &good);
    assert!(ok, "{good}\n{text}");
    assert!(text.contains("1 cdc source(s)"), "{text}");

    assert_fails(
        "relay-inner",
        &inner(&source.replace("tables:", "tabels:")),
        &[
            "tabels",
            "line 14",
            "expected one of dsn, slot, publication, tables",
        ],
    );
    assert_fails(
        "relay-inner",
        &inner(&source.replace("public.orders", "orders")),
        &["cdc.sources[0].postgres.tables[0]", "orders"],
    );
    assert_fails(
        "relay-inner",
        &inner(&source.replace("public.orders", "public.orders; drop table x")),
        &["cdc.sources[0].postgres.tables[0]"],
    );
    assert_fails(
        "relay-inner",
        &inner(&format!("{source}{source}")),
        &["cdc.sources[1].name", "main"],
    );

    let store = pki.dir().join("store");
    let outer = |sink_source: &str| {
        outer_yaml(
            &pki,
            "127.0.0.1:7443",
            KA,
            &[ListenerSpec::new("pg", "127.0.0.1:15432", "site-a", "pg")],
            &format!(
                "cdc:\n  dir: {}\n  sinks:\n    - name: replica\n      source: {sink_source}\n      postgres: {{ dsn: \"host=127.0.0.1 user=postgres\" }}\n",
                store.display()
            ),
        )
    };
    let good = outer("site-a/main");
    let (ok, text) = check_config("relay-outer", &good);
    assert!(ok, "{good}\n{text}");
    assert_fails(
        "relay-outer",
        &outer("main"),
        &["cdc.sinks[0].source", "tunnel/source"],
    );
    // Exactly one kind key per sink, and the entry is named.
    let two = good.replace(
        "      postgres: {",
        "      webhook: { url: \"http://127.0.0.1:9/\" }\n      postgres: {",
    );
    assert_fails(
        "relay-outer",
        &two,
        &["cdc.sinks[0]", "\"replica\"", "postgres and webhook"],
    );
    let none = good.replace(
        "      postgres: { dsn: \"host=127.0.0.1 user=postgres\" }\n",
        "",
    );
    assert_fails(
        "relay-outer",
        &none,
        &[
            "cdc.sinks[0]",
            "\"replica\"",
            "exactly one kind key",
            "none",
        ],
    );
    let hook = good.replace(
        "      postgres: { dsn: \"host=127.0.0.1 user=postgres\" }\n",
        "      webhook: { url: \"http://127.0.0.1:9/\", on_rejected: skip }\n",
    );
    assert_fails(
        "relay-outer",
        &hook,
        &["cdc.sinks[0].webhook.on_rejected", "dead_letter"],
    );
    // A consumer token file that is missing is named by check-config.
    let consumers = good.replace(
        "  sinks:\n",
        &format!(
            "  consumers:\n    listen: \"127.0.0.1:9470\"\n    tokens: [{{ name: app, token_file: {}/missing, sources: [site-a/main] }}]\n  sinks:\n",
            pki.dir().display()
        ),
    );
    assert_fails(
        "relay-outer",
        &consumers,
        &["cdc.consumers.tokens (app)", "missing"],
    );
}

/// A peer with a valid certificate opens CDC streams and sends garbage: a stream of
/// noise, a bad source name, a huge length prefix, a batch with a malformed record.
/// relay-outer refuses each with a reason, stores nothing of it, and the real pipeline
/// goes on.
#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn garbage_on_cdc_streams_is_refused_and_harms_nothing() {
    use relay_proto::cdc::ShipMessage;
    use relay_proto::frame::{Frame, Hello};
    use routy_e2e::fake::{self, FakeInner, STEP};
    use routy_tunnel::codec::{read_frame, write_frame};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    require_root();
    let rig = CdcRig::start(RigOpts {
        setup_sql: "CREATE TABLE public.t (id int PRIMARY KEY, v text);".into(),
        tables: vec!["public.t".into()],
        ..RigOpts::default()
    });
    rig.wait_shipping();
    let rt = fake::runtime();
    rt.block_on(async {
        let mut f = FakeInner::connect(rig.tunnel_addr, &rig.pki, "site-a", "localhost").await;
        let hello = Hello {
            protocol: routy_tunnel::handshake::PROTOCOL_VERSION,
            node: "impostor".into(),
            services: vec![],
            features: vec![],
        };
        routy_tunnel::handshake::client(&mut f.ctrl, hello, STEP)
            .await
            .expect("handshake");

        // 1. Noise instead of a first frame: the stream is refused and closed.
        let mut s = f.session.open().await.unwrap();
        let _ = s.write_all(&fake::noise(fake::seed(), 8 * 1024)).await;
        let _ = s.flush().await;
        let mut sink = Vec::new();
        let r = tokio::time::timeout(STEP, s.read_to_end(&mut sink)).await;
        assert!(r.is_ok(), "a noise stream must be closed");

        // 2. A source name that tries to leave its tunnel's directory.
        let mut s = f.session.open().await.unwrap();
        let open = Frame::CdcOpen {
            source: "../site-b".into(),
            first_seq: 1,
            last_seq: 0,
            spool_id: 1,
        };
        write_frame(&mut s, &open, STEP).await.unwrap();
        match read_frame(&mut s, STEP).await {
            Ok(Frame::Error { message, .. }) => assert!(message.contains("site-b"), "{message}"),
            other => panic!("expected an Error frame, got {other:?}"),
        }

        // 3. A valid open, then a batch whose record is garbage: refused, nothing stored.
        let mut s = f.session.open().await.unwrap();
        let open = Frame::CdcOpen {
            source: "impostor".into(),
            first_seq: 1,
            last_seq: 1,
            spool_id: 1,
        };
        write_frame(&mut s, &open, STEP).await.unwrap();
        assert!(matches!(
            read_frame(&mut s, STEP).await,
            Ok(Frame::CdcReady { next_seq: 1 })
        ));
        let bad = ShipMessage::Batch {
            first_seq: 1,
            records: vec![b"not a record".to_vec()],
        };
        routy_tunnel::ship::write(&mut s, &bad).await.unwrap();
        match tokio::time::timeout(STEP, routy_tunnel::ship::read(&mut s)).await {
            Ok(Ok(Some(ShipMessage::Error { message }))) => {
                assert!(message.contains("malformed"), "{message}")
            }
            other => panic!("expected a shipping Error, got {other:?}"),
        }

        // 4. A length prefix of 4 GiB: refused without allocating it.
        let mut s = f.session.open().await.unwrap();
        let open = Frame::CdcOpen {
            source: "impostor".into(),
            first_seq: 1,
            last_seq: 1,
            spool_id: 1,
        };
        write_frame(&mut s, &open, STEP).await.unwrap();
        assert!(matches!(
            read_frame(&mut s, STEP).await,
            Ok(Frame::CdcReady { .. })
        ));
        s.write_all(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3])
            .await
            .unwrap();
        s.flush().await.unwrap();
        match tokio::time::timeout(STEP, routy_tunnel::ship::read(&mut s)).await {
            Ok(Ok(Some(ShipMessage::Error { message }))) => {
                assert!(message.contains("exceeds"), "{message}")
            }
            other => panic!("expected a shipping Error, got {other:?}"),
        }
        f.session.kill();
    });

    // relay-outer logged the reasons, stored nothing for the impostor, and still runs the
    // real pipeline.
    let log = rig.outer().proc.log();
    assert!(log.contains("malformed"), "relay-outer should log why");
    rig.source
        .psql("INSERT INTO public.t SELECT g, 'after' FROM generate_series(1, 100) g");
    rig.wait_in_sync(&["public.t"], CATCH_UP);
    assert!(
        rig.tail("site-a/impostor").trim().is_empty(),
        "nothing may be stored for the impostor"
    );
}

/// With `connections: 3` CDC ships over one of the three live connections.
#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn cdc_ships_over_several_connections() {
    require_root();
    let rig = CdcRig::start(RigOpts {
        setup_sql: "CREATE TABLE public.t (id int PRIMARY KEY, v text);".into(),
        tables: vec!["public.t".into()],
        inner_extra: "connections: 3\n".into(),
        ..RigOpts::default()
    });
    rig.inner().wait_sessions_up(3, SHORT);
    rig.wait_shipping();
    rig.source
        .psql("INSERT INTO public.t SELECT g, 'a' FROM generate_series(1, 1000) g");
    rig.wait_in_sync(&["public.t"], CATCH_UP);
    let st = rig.inner().try_status();
    let conns = st["outer"].as_array().map_or(0, |a| a.len());
    assert_eq!(conns, 3, "{st}");
}

/// The sink reaches a target that requires TLS: with `sslmode=verify-full` and the right
/// CA it applies over an encrypted connection; with a CA that did not sign the target's
/// certificate it applies nothing and says why, and keeps the changes in the store.
#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn sink_to_a_tls_target_follows_sslmode() {
    require_root();
    let certs = routy_e2e::tempdir();
    routy_e2e::make_pg_certs(certs.path());
    let file = |f: &str| certs.path().join(f).display().to_string();
    let target_conf = vec![
        "ssl = on".to_string(),
        format!("ssl_cert_file = '{}'", file("server.crt")),
        format!("ssl_key_file = '{}'", file("server.key")),
    ];
    let opts = |root: &str| RigOpts {
        setup_sql: "CREATE TABLE public.t (id int PRIMARY KEY, v text);".into(),
        tables: vec!["public.t".into()],
        target_conf: target_conf.clone(),
        sink_dsn_extra: format!(" sslmode=verify-full sslrootcert={}", file(root)),
        ..RigOpts::default()
    };

    let rig = CdcRig::start(opts("ca.crt"));
    rig.source
        .psql("INSERT INTO public.t SELECT g, 'tls' FROM generate_series(1, 500) g");
    rig.wait_in_sync(&["public.t"], CATCH_UP);
    // The sink's own connection (psql here connects over TCP too, and prefers TLS).
    let encrypted = rig.target.psql(&format!(
        "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'routy sink {SINK}'"
    ));
    assert_eq!(
        encrypted, "t",
        "the sink's connection is not encrypted ({encrypted:?})"
    );
    drop(rig);

    let rig = CdcRig::start(opts("other.crt"));
    rig.source
        .psql("INSERT INTO public.t SELECT g, 'tls' FROM generate_series(1, 10) g");
    rig.outer()
        .wait_count("UnknownIssuer", 1, Duration::from_secs(60));
    assert_eq!(
        rig.target
            .psql("SELECT count(*) FROM pg_tables WHERE tablename = 't'"),
        "0",
        "nothing may be applied over an unverified connection"
    );
    let stored = rig.tail(SOURCE);
    assert_eq!(
        stored.matches("\"event\":\"insert\"").count(),
        10,
        "the changes wait in the store:\n{stored}"
    );
}
