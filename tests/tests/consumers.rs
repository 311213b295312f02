//! End-to-end consumers: Server-Sent Events resumed by `Last-Event-ID` across a
//! disconnect and a relay-outer restart, tokens (401/403/404), a stalled consumer that
//! holds back no one, and the page API through a 100 000-row history and past retention.

use std::collections::BTreeSet;
use std::io::Write;
use std::time::Duration;

use routy_e2e::cdc::{CdcRig, RigOpts, CATCH_UP};
use routy_e2e::consumer::{page, sse, Event};
use routy_e2e::{free_port, require_root, try_wait_until};

const TABLE: &str = "public.t";
const TOKEN: &str = "consumer-token-0123456789";
const OTHER: &str = "other-token-0123456789abc";
const ALL: &str = "all-sources-token-0123456789";

struct Setup {
    rig: CdcRig,
    port: u16,
    _dir: tempfile::TempDir,
}

fn setup(retention: &str, segment: &str) -> Setup {
    let dir = routy_e2e::tempdir();
    let file = |name: &str, token: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, format!("{token}\n")).unwrap();
        p.display().to_string()
    };
    let (a, b, c) = (file("a", TOKEN), file("b", OTHER), file("c", ALL));
    let port = free_port();
    let consumers = format!(
        "  segment_bytes: {segment}\n  consumers:\n    listen: \"127.0.0.1:{port}\"\n    tokens:\n      - {{ name: app, token_file: {a}, sources: [site-a/main] }}\n      - {{ name: other, token_file: {b}, sources: [site-b/x] }}\n      - {{ name: ops, token_file: {c}, sources: [\"*\"] }}\n"
    );
    let rig = CdcRig::start(RigOpts {
        setup_sql:
            "CREATE TABLE public.t (id bigint PRIMARY KEY, tx int NOT NULL, v text NOT NULL);"
                .into(),
        tables: vec![TABLE.into()],
        source_extra: "      heartbeat: 1s\n      status_interval: 1s\n".into(),
        outer_cdc_extra: consumers,
        retention: retention.into(),
        ..RigOpts::default()
    });
    rig.wait_shipping();
    // Rows inserted before the slot exists would arrive in the initial copy, without
    // their transactions' begin and commit.
    rig.wait_streaming();
    Setup {
        rig,
        port,
        _dir: dir,
    }
}

fn url(port: u16, path: &str) -> String {
    format!("http://127.0.0.1:{port}/v1/sources/{path}")
}

fn insert_ids(events: &[Event]) -> Vec<i64> {
    events
        .iter()
        .filter(|e| e.data["event"] == "insert")
        .filter_map(|e| e.data["new"]["id"].as_str()?.parse().ok())
        .collect()
}

/// Reads the stream, resuming with the last id after each (short) connection, until
/// every row of the source arrived.
fn read_all(s: &Setup, got: &mut Vec<Event>, per_connection: usize) {
    let want = s.rig.source_ids(TABLE);
    let u = url(s.port, "site-a/main/events");
    let r = try_wait_until(CATCH_UP, "every change by SSE", || {
        let last = got.last().map(|e| e.id.clone());
        let from_start = last.is_none();
        let target = if from_start {
            format!("{u}?from=1")
        } else {
            u.clone()
        };
        let (status, evs) = sse(
            &target,
            Some(TOKEN),
            last.as_deref(),
            per_connection,
            Duration::from_secs(2),
        );
        if status == 200 {
            got.extend(evs);
        }
        insert_ids(got).into_iter().collect::<BTreeSet<_>>() == want
    });
    r.unwrap_or_else(|e| panic!("{e}: {} events", got.len()));
}

#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn sse_resumes_by_last_event_id_across_disconnects_and_a_restart() {
    require_root();
    let mut s = setup("1h", "64MiB");
    s.rig.insert_txs(TABLE, 0, 20, 10, "md5(g::text)");
    let mut got = Vec::new();
    // Short connections: 37 events each, then a reconnect with Last-Event-ID.
    read_all(&s, &mut got, 37);
    s.rig.kill_outer();
    s.rig.insert_txs(TABLE, 20, 30, 10, "md5(g::text)");
    s.rig.start_outer();
    read_all(&s, &mut got, 1000);
    // In order, no gap, no repeat: ids strictly grow, each row once, whole transactions.
    let pos: Vec<(u64, u32)> = got.iter().map(Event::pos).collect();
    assert!(pos.windows(2).all(|w| w[0] < w[1]), "ids grow strictly");
    let ids = insert_ids(&got);
    let unique: BTreeSet<i64> = ids.iter().copied().collect();
    assert_eq!(ids.len(), unique.len(), "no row twice");
    assert_eq!(unique, s.rig.source_ids(TABLE));
    let begins = got.iter().filter(|e| e.data["event"] == "begin").count();
    let commits = got.iter().filter(|e| e.data["event"] == "commit").count();
    assert_eq!((begins, commits), (30, 30));
    assert!(got.iter().all(|e| e.data["event"] != "relation"));
    // A table filter: only that table's changes (none here for another table).
    let (status, evs) = sse(
        &format!(
            "{}?from=1&tables=public.other",
            url(s.port, "site-a/main/events")
        ),
        Some(TOKEN),
        None,
        10,
        Duration::from_millis(500),
    );
    assert_eq!(status, 200);
    assert!(evs.is_empty(), "{evs:?}");
}

#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn tokens_decide_who_reads_what_and_are_reloaded() {
    require_root();
    let mut s = setup("1h", "64MiB");
    // An idle stream gets a heartbeat comment every 15 s (read beside the rest).
    let idle = url(s.port, "site-a/main/events");
    let heartbeat = std::thread::spawn(move || {
        routy_e2e::consumer::sse_raw(&idle, TOKEN, Duration::from_secs(25))
    });
    s.rig.insert_txs(TABLE, 0, 2, 5, "'x'");
    let u = url(s.port, "site-a/main/changes");
    let short = Duration::from_millis(300);
    assert_eq!(
        sse(&url(s.port, "site-a/main/events"), None, None, 1, short).0,
        401
    );
    assert_eq!(page(&u, "wrong-token-0123456789").0, 401);
    assert_eq!(page(&u, OTHER).0, 403);
    assert_eq!(page(&url(s.port, "site-a/nope/changes"), ALL).0, 404);
    assert_eq!(page(&format!("{u}?after=x"), TOKEN).0, 400);
    assert_eq!(page(&format!("{u}?limit=0"), TOKEN).0, 400);
    try_wait_until(CATCH_UP, "a page of the first rows", || {
        let (status, v) = page(&u, TOKEN);
        status == 200 && v["events"].as_array().is_some_and(|a| a.len() >= 14)
    })
    .unwrap();
    // The live end by default: only what comes after connecting.
    let live = url(s.port, "site-a/main/events");
    let reader =
        std::thread::spawn(move || sse(&live, Some(ALL), None, 7, Duration::from_secs(20)));
    std::thread::sleep(Duration::from_millis(700));
    s.rig.insert_txs(TABLE, 2, 3, 5, "'y'");
    let (status, evs) = reader.join().unwrap();
    assert_eq!(status, 200);
    assert_eq!(insert_ids(&evs), vec![11, 12, 13, 14, 15], "{evs:?}");
    // A rotated token works after a reload (SIGHUP); the old one no longer does.
    let cfg = std::fs::read_to_string(&s.rig.outer().config).unwrap();
    let a_file = cfg
        .lines()
        .find(|l| l.contains("name: app"))
        .and_then(|l| l.split("token_file: ").nth(1))
        .and_then(|r| r.split(',').next())
        .unwrap()
        .to_string();
    let mut f = std::fs::File::create(&a_file).unwrap();
    writeln!(f, "rotated-token-0123456789").unwrap();
    drop(f);
    s.rig.outer.as_mut().unwrap().proc.signal(libc::SIGHUP);
    try_wait_until(Duration::from_secs(20), "the new token is in force", || {
        page(&u, "rotated-token-0123456789").0 == 200
    })
    .unwrap();
    assert_eq!(page(&u, TOKEN).0, 401);
    let raw = heartbeat.join().unwrap();
    assert!(raw.contains(": heartbeat\n\n"), "{raw:?}");
    assert!(raw.starts_with("retry: "), "{raw:?}");
}

#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn a_stalled_consumer_is_dropped_and_holds_back_no_one() {
    require_root();
    let s = setup("1h", "64MiB");
    // A consumer that asks for the stream and never reads.
    let mut stalled = std::net::TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    write!(
        stalled,
        "GET /v1/sources/site-a/main/events?from=1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    // Much more than its buffer and the sockets' buffers hold.
    for part in 0..10 {
        s.rig.insert_txs(
            TABLE,
            part * 50,
            (part + 1) * 50,
            200,
            "repeat(md5(g::text), 3)",
        );
    }
    let outer = s.rig.outer();
    outer.wait_metric(
        "routy_cdc_consumers_dropped_total",
        &[("reason", "slow")],
        CATCH_UP,
        |v| v >= 1.0,
    );
    // The PostgreSQL sink kept up, and another consumer reads everything.
    s.rig.wait_in_sync(&[TABLE], CATCH_UP);
    let mut got = Vec::new();
    read_all(&s, &mut got, 100_000);
    assert_eq!(insert_ids(&got).len(), 100_000);
    drop(stalled);
}

#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn pages_walk_a_100k_row_history_without_a_gap_and_410_past_retention() {
    require_root();
    let mut s = setup("1s", "1MiB");
    s.rig.insert_txs(TABLE, 0, 100, 1000, "md5(g::text)");
    s.rig.wait_in_sync(&[TABLE], CATCH_UP);
    let base = url(s.port, "site-a/main/changes");
    let mut after: Option<String> = None;
    let mut ids = Vec::new();
    let mut last_pos = (0u64, 0u32);
    let mut pages = 0;
    loop {
        let u = match &after {
            None => format!("{base}?limit=5000"),
            Some(a) => format!("{base}?limit=5000&after={a}"),
        };
        let (status, v) = page(&u, TOKEN);
        assert_eq!(status, 200, "{v}");
        let events = v["events"].as_array().cloned().unwrap_or_default();
        if events.is_empty() {
            break;
        }
        for e in &events {
            let id = e["id"].as_str().unwrap();
            let (a, b) = id.split_once('.').unwrap();
            let p = (a.parse().unwrap(), b.parse().unwrap());
            assert!(p > last_pos, "ids grow: {p:?} after {last_pos:?}");
            last_pos = p;
            if e["event"] == "insert" {
                ids.push(e["new"]["id"].as_str().unwrap().parse::<i64>().unwrap());
            }
        }
        assert_eq!(v["next"], events.last().unwrap()["id"]);
        after = v["next"].as_str().map(str::to_string);
        pages += 1;
        assert!(pages < 100, "paging ends");
    }
    assert_eq!(ids.len(), 100_000);
    let unique: BTreeSet<i64> = ids.iter().copied().collect();
    assert_eq!(unique, s.rig.source_ids(TABLE));
    // Retention (1s, 1 MiB segments) removes what every sink applied once it is old:
    // restart relay-outer (retention runs when a store opens), then the oldest positions
    // are gone.
    std::thread::sleep(Duration::from_millis(1500));
    s.rig.kill_outer();
    s.rig.start_outer();
    s.rig.wait_shipping();
    let gone = format!("{base}?after=1.0");
    let r = try_wait_until(CATCH_UP, "410 for a removed position", || {
        page(&gone, TOKEN).0 == 410
    });
    r.unwrap_or_else(|e| panic!("{e}: {:?}", page(&gone, TOKEN)));
    let (_, v) = page(&gone, TOKEN);
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("oldest position held")),
        "{v}"
    );
}
