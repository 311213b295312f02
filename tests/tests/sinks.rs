//! End-to-end sinks beside the PostgreSQL one: the webhook sink against a receiver that
//! fails and refuses, relay-outer killed under it; two sinks on one source; pausing;
//! replay from a time for a webhook and for the PostgreSQL target.

use std::time::{Duration, Instant};

use routy_e2e::cdc::{CdcRig, RigOpts, CATCH_UP};
use routy_e2e::hooks::{Mode, Receiver};
use routy_e2e::{require_root, try_wait_until};

const TABLE: &str = "public.t";
/// Rows per source transaction.
const TX_ROWS: u64 = 20;

fn opts(extra_sinks: String) -> RigOpts {
    RigOpts {
        setup_sql:
            "CREATE TABLE public.t (id bigint PRIMARY KEY, tx int NOT NULL, v text NOT NULL);"
                .into(),
        tables: vec![TABLE.into()],
        source_extra: "      heartbeat: 1s\n      status_interval: 1s\n".into(),
        extra_sinks,
        ..RigOpts::default()
    }
}

/// A webhook sink entry for the rig's sink list.
fn hook(name: &str, url: &str, extra: &str) -> String {
    format!(
        "    - name: {name}\n      source: site-a/main\n      retry: {{ initial: 50ms, max: 500ms }}\n      webhook:\n        url: \"{url}\"\n        timeout: 5s\n        batch: {{ max_events: 50, max_delay: 20ms }}\n{extra}"
    )
}

fn insert_txs(rig: &CdcRig, from: u64, to: u64) {
    rig.insert_txs(TABLE, from, to, TX_ROWS, "md5(g::text)");
}

/// Waits until the receiver holds an insert of every row the source holds.
fn wait_received_all(rig: &CdcRig, r: &Receiver, what: &str) {
    let want = rig.source_ids(TABLE);
    let res = try_wait_until(CATCH_UP, what, || r.inserted_ids(TABLE) == want);
    if let Err(e) = res {
        let got = r.inserted_ids(TABLE);
        let missing: Vec<_> = want.difference(&got).take(10).collect();
        panic!(
            "{e}: {} of {} rows received, missing e.g. {missing:?}\n--- relay-outer ---\n{}",
            got.len(),
            want.len(),
            rig.outer
                .as_ref()
                .map(|o| routy_e2e::log_tail(&o.proc.log(), 60))
                .unwrap_or_default()
        );
    }
}

#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn a_faulty_receiver_gets_every_change_with_repeats_only_under_their_ids() {
    require_root();
    let recv = Receiver::start(Mode::Faulty(0.33), Some("s3cret"));
    let dir = routy_e2e::tempdir();
    let secret = dir.path().join("hmac");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let sinks = hook(
        "hook",
        &recv.url(),
        &format!("        hmac_secret_file: {}\n", secret.display()),
    );
    let mut rig = CdcRig::start(opts(sinks));
    rig.wait_shipping();
    // The source takes writes all along; relay-outer is killed (SIGKILL) twice.
    let t0 = Instant::now();
    let mut next = 0;
    for round in 0..3 {
        for _ in 0..10 {
            insert_txs(&rig, next, next + 2);
            next += 2;
            std::thread::sleep(Duration::from_millis(50));
        }
        if round < 2 {
            rig.kill_outer();
            insert_txs(&rig, next, next + 5);
            next += 5;
            rig.start_outer();
        }
    }
    assert!(t0.elapsed() < Duration::from_secs(120));
    wait_received_all(&rig, &recv, "the receiver holds every change");
    rig.wait_in_sync(&[TABLE], CATCH_UP);
    recv.seen(|s| {
        assert!(s.faults > 0, "faults were injected: {s:?}");
        assert!(
            s.conflicts.is_empty(),
            "a change came again under another id: {:?}",
            s.conflicts
        );
        assert_eq!(s.signed_bad, 0, "every request is signed right");
        assert!(s.signed_ok > 0);
        let h = &s.last_headers;
        assert!(
            h.contains_key("idempotency-key")
                && h.contains_key("routy-first-position")
                && h.get("routy-source").map(String::as_str) == Some("site-a/main"),
            "{h:?}"
        );
        eprintln!(
            "requests {} faults {} repeats {} events {}",
            s.requests,
            s.faults,
            s.repeats,
            s.events.len()
        );
    });
    // Transactions arrive whole: every begin has its commit, in order of ids.
    recv.seen(|s| {
        let mut open = false;
        for e in s.events.values() {
            match e["event"].as_str() {
                Some("begin") => {
                    assert!(!open, "a begin inside a transaction at {}", e["id"]);
                    open = true;
                }
                Some("commit") => {
                    assert!(open, "a commit without its begin at {}", e["id"]);
                    open = false;
                }
                Some("insert") => assert!(open, "an insert outside a transaction at {}", e["id"]),
                _ => {}
            }
        }
    });
    let (ok, sinks) = rig.outer_cdc(&["sinks"]);
    assert!(ok, "{sinks}");
    assert!(
        sinks.contains("hook") && sinks.contains("webhook") && sinks.contains("replica"),
        "{sinks}"
    );
}

#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn a_refused_batch_stops_the_sink_or_goes_to_the_dead_letter_file() {
    require_root();
    let stopper = Receiver::start(Mode::Refuse(400), None);
    let dlq = Receiver::start(Mode::Refuse(422), None);
    let sinks = format!(
        "{}{}",
        hook("stopper", &stopper.url(), ""),
        hook("dlq", &dlq.url(), "        on_rejected: dead_letter\n")
    );
    let rig = CdcRig::start(opts(sinks));
    rig.wait_shipping();
    insert_txs(&rig, 0, 3);
    // The stopping sink stops with the target's answer; the others go on.
    let outer = rig.outer();
    outer.wait_status("the sink stops", CATCH_UP, |st| {
        st["cdc"]["sources"]["site-a/main"]["sinks"]["stopper"]["state"] == "stopped"
    });
    let (ok, listed) = rig.outer_cdc(&["sinks"]);
    assert!(ok, "{listed}");
    let line = listed
        .lines()
        .find(|l| l.starts_with("stopper"))
        .unwrap_or_else(|| panic!("{listed}"));
    assert!(
        line.contains("stopped") && line.contains("HTTP 400") && line.contains("bad payload"),
        "{listed}"
    );
    assert!(
        outer.metric(
            "routy_cdc_sink_errors_total",
            &[("sink", "stopper"), ("reason", "rejected")]
        ) >= 1.0
    );
    let dead = rig.store_dir.join("_dead-letter/dlq.jsonl");
    // The refused batches are in the file, with the target's answer (the first holds
    // the initial copy's markers, later ones the inserts).
    let letters = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&dead)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a dead letter is JSON"))
            .collect()
    };
    try_wait_until(CATCH_UP, "the inserts in the dead-letter file", || {
        letters().iter().any(|l| {
            l["batch"]["events"]
                .as_array()
                .is_some_and(|a| a.iter().any(|e| e["event"] == "insert"))
        })
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", letters()));
    assert!(
        letters()
            .iter()
            .all(|l| l["status"] == 422 && l["answer"] == "bad payload"),
        "{:?}",
        letters()
    );
    outer.wait_metric(
        "routy_cdc_sink_dead_letter_batches_total",
        &[("sink", "dlq")],
        CATCH_UP,
        |v| v >= 1.0,
    );
    // Later changes reach the dead-letter sink's receiver once it accepts again.
    dlq.set_mode(Mode::Accept);
    insert_txs(&rig, 3, 6);
    let later: std::collections::BTreeSet<i64> =
        ((3 * TX_ROWS + 1) as i64..=(6 * TX_ROWS) as i64).collect();
    try_wait_until(CATCH_UP, "later changes arrive", || {
        later.is_subset(&dlq.inserted_ids(TABLE))
    })
    .unwrap();
    // The stopped sink delivered nothing and holds its position; the PostgreSQL sink
    // kept up all along.
    assert!(stopper.inserted_ids(TABLE).is_empty());
    rig.wait_in_sync(&[TABLE], CATCH_UP);
    // Moving the stopped sink on (a replay to the end) starts it again.
    stopper.set_mode(Mode::Accept);
    let (ok, said) = rig.outer_cdc(&["replay", "--sink", "stopper", "--from", "1"]);
    assert!(ok, "{said}");
    wait_received_all(&rig, &stopper, "the stopped sink delivers after a replay");
}

#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn pause_holds_a_sink_and_replay_since_a_time_delivers_again() {
    require_root();
    let recv = Receiver::start(Mode::Accept, None);
    let rig = CdcRig::start(opts(hook("hook", &recv.url(), "")));
    rig.wait_shipping();
    insert_txs(&rig, 0, 5);
    wait_received_all(&rig, &recv, "the first transactions arrive");
    rig.wait_in_sync(&[TABLE], CATCH_UP);
    // A time between the two halves, taken from the source's clock.
    std::thread::sleep(Duration::from_millis(1100));
    let since = rig
        .source
        .psql("SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
        .trim()
        .to_string();
    std::thread::sleep(Duration::from_millis(100));

    // Paused: nothing is delivered; resumed: everything is.
    let (ok, said) = rig.outer_cdc(&["pause", "--sink", "hook"]);
    assert!(ok, "{said}");
    let outer = rig.outer();
    outer.wait_status("the sink pauses", CATCH_UP, |st| {
        st["cdc"]["sources"]["site-a/main"]["sinks"]["hook"]["state"] == "paused"
    });
    insert_txs(&rig, 5, 10);
    rig.wait_in_sync(&[TABLE], CATCH_UP);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(recv.inserted_ids(TABLE).len() as u64, 5 * TX_ROWS);
    assert_eq!(
        outer.metric("routy_cdc_sink_paused", &[("sink", "hook")]),
        1.0
    );
    let (ok, said) = rig.outer_cdc(&["resume", "--sink", "hook"]);
    assert!(ok, "{said}");
    wait_received_all(&rig, &recv, "the paused sink catches up");

    // Replay since the time: the receiver gets everything committed after it again,
    // and nothing before.
    let before = recv.seen(|s| s.repeats);
    let (ok, said) = rig.outer_cdc(&["replay", "--sink", "hook", "--since", &since]);
    assert!(ok, "{said}");
    let want = 5 * TX_ROWS + 10; // the rows of txs 5..10, plus their begins and commits
    try_wait_until(CATCH_UP, "the replayed changes arrive", || {
        recv.seen(|s| s.repeats) - before >= want
    })
    .unwrap_or_else(|e| {
        let log = outer.proc.log();
        let sinks: Vec<&str> = log.lines().filter(|l| l.contains("sink")).collect();
        panic!(
            "{e}: {} repeats\n{}",
            recv.seen(|s| s.repeats) - before,
            sinks[sinks.len().saturating_sub(40)..].join("\n")
        )
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        recv.seen(|s| s.repeats) - before,
        want,
        "exactly what came after {since} is delivered again"
    );

    // The PostgreSQL sink replays too: its offset row moves back, it applies again,
    // and the target ends identical to the source.
    let rows_before = outer.metric("routy_cdc_sink_rows_total", &[("sink", "replica")]);
    let (ok, said) = rig.outer_cdc(&["replay", "--sink", "replica", "--since", &since]);
    assert!(ok, "{said}");
    outer.wait_metric(
        "routy_cdc_sink_rows_total",
        &[("sink", "replica")],
        CATCH_UP,
        |v| v >= rows_before + (5 * TX_ROWS) as f64,
    );
    rig.wait_in_sync(&[TABLE], CATCH_UP);

    // Bad requests are refused with a reason.
    let (ok, said) = rig.outer_cdc(&["replay", "--sink", "nope", "--from", "1"]);
    assert!(!ok && said.contains("no sink named \"nope\""), "{said}");
    let (ok, said) = rig.outer_cdc(&["replay", "--sink", "hook", "--from", "x.1"]);
    assert!(!ok && said.contains("not a position"), "{said}");
    let (ok, said) = rig.outer_cdc(&["replay", "--sink", "hook", "--from", "999999"]);
    assert!(!ok && said.contains("past the end"), "{said}");
}

#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn a_sink_failing_for_a_while_holds_back_no_other_and_catches_up() {
    require_root();
    let recv = Receiver::start(Mode::Refuse(503), None);
    let rig = CdcRig::start(opts(hook("hook", &recv.url(), "")));
    rig.wait_shipping();
    let outer = rig.outer();
    // For 25 s (dozens of retries: 50 ms doubling to 500 ms) the receiver answers 503 while
    // the source takes writes: the PostgreSQL sink keeps up all along; the webhook sink
    // retries with backoff.
    let t0 = Instant::now();
    let mut next = 0;
    while t0.elapsed() < Duration::from_secs(25) {
        insert_txs(&rig, next, next + 5);
        next += 5;
        rig.wait_in_sync(&[TABLE], Duration::from_secs(20));
        std::thread::sleep(Duration::from_secs(3));
    }
    let st = outer.status();
    let hook_st = &st["cdc"]["sources"]["site-a/main"]["sinks"]["hook"];
    assert!(
        hook_st["state"] == "retrying" || hook_st["state"] == "starting",
        "{hook_st}"
    );
    assert!(
        hook_st["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("HTTP 503")),
        "{hook_st}"
    );
    assert!(
        hook_st["lag_records"].as_u64().unwrap_or(0) > 0,
        "{hook_st}"
    );
    assert!(recv.inserted_ids(TABLE).is_empty());
    assert!(
        outer.metric(
            "routy_cdc_sink_errors_total",
            &[("sink", "hook"), ("reason", "http_status")]
        ) >= 3.0
    );
    // The receiver comes back: the webhook sink catches up with everything.
    recv.set_mode(Mode::Accept);
    wait_received_all(&rig, &recv, "the failing sink catches up");
    outer.wait_status("the sink is running", CATCH_UP, |st| {
        st["cdc"]["sources"]["site-a/main"]["sinks"]["hook"]["state"] == "running"
            && st["cdc"]["sources"]["site-a/main"]["sinks"]["hook"]["lag_records"] == 0
    });
}

#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn filters_and_https_for_webhooks_and_consumers() {
    require_root();
    // The receiver and the consumer endpoint serve HTTPS with a certificate of a CA
    // the relay is told to trust.
    let web = routy_e2e::relays::Pki::new(&["localhost", "127.0.0.1"]);
    let tls = routy_e2e::hooks::server_tls(&web.path("outer.crt"), &web.path("outer.key"));
    let recv = Receiver::start_tls(Mode::Accept, None, Some(tls));
    let dir = routy_e2e::tempdir();
    let token = dir.path().join("token");
    std::fs::write(&token, "https-consumer-token-0123\n").unwrap();
    let port = routy_e2e::free_port();
    let sinks = format!(
        "    - name: hook\n      source: site-a/main\n      tables: [public.t]\n      ops: [insert, delete]\n      webhook: {{ url: \"{}\", ca: {} }}\n",
        recv.https_url(),
        web.path("ca.crt").display()
    );
    let consumers = format!(
        "  consumers:\n    listen: \"127.0.0.1:{port}\"\n    tls: {{ cert: {}, key: {} }}\n    tokens: [{{ name: app, token_file: {}, sources: [site-a/main] }}]\n",
        web.path("outer.crt").display(),
        web.path("outer.key").display(),
        token.display()
    );
    let rig = CdcRig::start(RigOpts {
        setup_sql:
            "CREATE TABLE public.t (id bigint PRIMARY KEY, tx int NOT NULL, v text NOT NULL);
                    CREATE TABLE public.u (id bigint PRIMARY KEY, v text NOT NULL);"
                .into(),
        tables: vec![TABLE.into(), "public.u".into()],
        extra_sinks: sinks,
        outer_cdc_extra: consumers,
        ..RigOpts::default()
    });
    rig.wait_shipping();
    rig.source.psql(
        "INSERT INTO public.t VALUES (1, 0, 'a'), (2, 0, 'b');
         INSERT INTO public.u VALUES (1, 'x');
         UPDATE public.t SET v = 'c' WHERE id = 2;
         BEGIN; INSERT INTO public.u VALUES (2, 'y'); DELETE FROM public.t WHERE id = 1; COMMIT;
         INSERT INTO public.t VALUES (3, 1, 'z');",
    );
    rig.wait_in_sync(&[TABLE, "public.u"], CATCH_UP);
    // The webhook got only public.t's inserts and deletes, in whole transactions; the
    // transactions left empty (public.u alone, the update) are left out.
    try_wait_until(CATCH_UP, "the filtered changes arrive over https", || {
        recv.inserted_ids(TABLE).contains(&3)
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", recv.seen(|s| s.requests)));
    let kinds: Vec<(String, String)> = recv.seen(|s| {
        s.events
            .values()
            .map(|e| {
                (
                    e["event"].as_str().unwrap_or("").to_string(),
                    e["table"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    });
    let changes: Vec<&(String, String)> = kinds
        .iter()
        .filter(|(k, _)| k != "begin" && k != "commit")
        .filter(|(k, _)| !k.starts_with("snapshot"))
        .collect();
    assert!(
        changes.iter().all(|(_, t)| t == "public.t"),
        "only public.t: {kinds:?}"
    );
    let ops: Vec<&str> = changes.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(ops, ["insert", "insert", "delete", "insert"], "{kinds:?}");
    let begins = kinds.iter().filter(|(k, _)| k == "begin").count();
    assert_eq!(
        begins, 3,
        "three transactions touch public.t by insert or delete: {kinds:?}"
    );
    // The consumer endpoint over https, with the CA: both tables.
    let (status, page) = routy_e2e::consumer::page_trusting(
        &format!("https://localhost:{port}/v1/sources/site-a/main/changes"),
        "https-consumer-token-0123",
        Some(&web.path("ca.crt")),
    );
    assert_eq!(status, 200, "{page}");
    let tables: std::collections::BTreeSet<&str> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["table"].as_str())
        .collect();
    assert!(
        tables.contains("public.t") && tables.contains("public.u"),
        "{page}"
    );
}
