//! End to end on loopback: a real PostgreSQL behind relay-inner, clients through
//! relay-outer's listener.

use std::time::Duration;

use routy_e2e::relays::{outer_yaml, ListenerSpec, Pki, Relay, Tunnel};
use routy_e2e::{free_port, psql_at, wait_until, Pg, PgOpts};
use routy_ops::metrics as m;

const KA: (&str, &str) = ("500ms", "3s");

const EXTRA: &str = "shutdown_grace: 5s\n";

/// PostgreSQL, both relays and one listener `pg` for tunnel `site-a`.
type Setup = Tunnel;

fn setup() -> Setup {
    Tunnel::start(KA, EXTRA)
}

/// relay-inner's config for tunnel `site-a` exposing `pg`.
fn inner_cfg(pki: &Pki, tunnel_port: u16, pg: &Pg) -> String {
    Tunnel::inner_cfg(pki, "site-a", tunnel_port, pg, KA, EXTRA)
}

#[test]
fn sql_through_the_tunnel() {
    let s = setup();
    s.pg.psql(
        "CREATE TABLE t (id int primary key, v text); INSERT INTO t VALUES (1, 'één'), (2, 'two');",
    );
    let out = s
        .sql("SELECT string_agg(v, ',' ORDER BY id) FROM t")
        .unwrap();
    assert_eq!(out, "één,two");
    // The database saw the connection come from relay-inner, on its own host.
    let addr = s.sql("SELECT inet_client_addr()").unwrap();
    assert_eq!(addr, "127.0.0.1");
    // Both queries were streams relay-inner spliced to the service, and relay-outer's end
    // of them is closed again.
    let pg = [("service", "pg")];
    assert_eq!(s.inner.metric(m::STREAMS_OPENED, &pg), 2.0);
    assert_eq!(s.outer.metric(m::STREAMS_OPENED, &pg), 2.0);
    s.outer
        .wait_metric(m::STREAMS_ACTIVE, &pg, Duration::from_secs(5), |n| n == 0.0);
    s.inner
        .wait_metric(m::STREAMS_ACTIVE, &pg, Duration::from_secs(5), |n| n == 0.0);
}

fn sh(script: &str) -> String {
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-ec", script]);
    let out = routy_e2e::run_timeout(&mut cmd, None, Duration::from_secs(600)).expect("sh");
    assert!(
        out.status.success(),
        "{script}\nfailed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn copy_of_100_mb_arrives_byte_identical_both_ways() {
    let s = setup();
    s.pg.psql(
        "CREATE TABLE big (id int primary key, payload text);
         INSERT INTO big SELECT i, repeat(md5(i::text), 10) || chr(10 + i % 50) || 'ü'
           FROM generate_series(1, 310000) i;
         CREATE TABLE big2 (LIKE big);",
    );
    let dir = routy_e2e::tempdir();
    let d = dir.path().display();
    let psql = routy_e2e::pg_bin("psql");
    let psql = psql.display();
    let direct = format!("{psql} -X -q -h 127.0.0.1 -p {} -U postgres", s.pg.port());
    let tunnel = format!("{psql} -X -q -h 127.0.0.1 -p {} -U postgres", s.listen_port);
    let export = "COPY (SELECT * FROM big ORDER BY id) TO STDOUT";
    sh(&format!("{direct} -c '{export}' > {d}/direct.txt"));
    sh(&format!("{tunnel} -c '{export}' > {d}/tunnel.txt"));
    let size = std::fs::metadata(dir.path().join("tunnel.txt"))
        .unwrap()
        .len();
    assert!(size >= 100_000_000, "export is only {size} bytes");
    let sums = sh(&format!(
        "cd {d} && sha256sum direct.txt tunnel.txt | cut -d' ' -f1 | uniq | wc -l"
    ));
    assert_eq!(
        sums, "1",
        "the export through the tunnel differs from the direct one"
    );

    // And upstream: COPY FROM STDIN through the tunnel, then compare in the database.
    sh(&format!(
        "{tunnel} -c 'COPY big2 FROM STDIN' < {d}/tunnel.txt"
    ));
    let diff = s.pg.psql(
        "SELECT count(*) FROM big FULL JOIN big2 USING (id)
         WHERE big.payload IS DISTINCT FROM big2.payload",
    );
    assert_eq!(diff, "0");
    assert_eq!(s.pg.psql("SELECT count(*) FROM big2"), "310000");
}

#[test]
fn pgbench_select_only_with_16_clients() {
    let s = setup();
    let pgbench = routy_e2e::pg_bin("pgbench");
    let port = s.listen_port.to_string();
    let mut init = std::process::Command::new(&pgbench);
    init.args([
        "-i",
        "-s",
        "2",
        "-q",
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-U",
        "postgres",
        "postgres",
    ]);
    let out = routy_e2e::run_timeout(&mut init, None, Duration::from_secs(300)).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut run = std::process::Command::new(&pgbench);
    run.args([
        "-S",
        "-c",
        "16",
        "-j",
        "2",
        "-T",
        "5",
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-U",
        "postgres",
        "postgres",
    ]);
    let out = routy_e2e::run_timeout(&mut run, None, Duration::from_secs(120)).unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("number of failed transactions: 0"), "{text}");
    assert!(text.contains("number of clients: 16"), "{text}");
    let processed = text
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split('/').next())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    assert!(processed > 100, "{text}");
}

#[test]
fn streaming_standby_through_the_tunnel_replays_changes() {
    let s = setup();
    s.pg.psql(
        "CREATE TABLE rep (id int primary key, v text); INSERT INTO rep VALUES (1, 'before');",
    );
    // pg_basebackup and then WAL streaming both go through relay-outer's listener.
    let standby = Pg::standby("127.0.0.1", s.listen_port);
    assert_eq!(standby.psql("SELECT v FROM rep WHERE id = 1"), "before");
    s.pg.psql("INSERT INTO rep VALUES (2, 'after the backup')");
    wait_until(
        Duration::from_secs(60),
        "standby replays the insert",
        || {
            standby
                .try_psql("SELECT v FROM rep WHERE id = 2")
                .map(|v| v == "after the backup")
                .unwrap_or(false)
        },
    );
    // The walsender on the primary serves a client that came in through relay-inner.
    let sender =
        s.pg.psql("SELECT client_addr, state FROM pg_stat_replication");
    assert_eq!(sender, "127.0.0.1|streaming");
}

/// Runs `sql` through `port` in a thread; the handle yields psql's result.
fn psql_thread(port: u16, sql: &str) -> std::thread::JoinHandle<Result<String, String>> {
    let sql = sql.to_string();
    std::thread::spawn(move || psql_at("127.0.0.1", port, &sql))
}

#[test]
fn unknown_service_is_refused_and_nothing_else_is_touched() {
    let pg = Pg::start(PgOpts::default());
    let pki = Pki::new(&["localhost"]);
    pki.issue("site-a");
    let (tport, good, bad) = (free_port(), free_port(), free_port());
    let listeners = [
        ListenerSpec::new("good", &format!("127.0.0.1:{good}"), "site-a", "pg"),
        ListenerSpec::new("bad", &format!("127.0.0.1:{bad}"), "site-a", "not-exposed"),
    ];
    let outer = Relay::outer(
        &outer_yaml(&pki, &format!("127.0.0.1:{tport}"), KA, &listeners, ""),
        None,
    );
    let inner = Relay::inner("relay-inner", &inner_cfg(&pki, tport, &pg), None);
    // A long query on the good listener while the bad one is tried.
    let long = psql_thread(good, "SELECT pg_sleep(2); SELECT 'still here'");
    inner.wait_metric(
        m::STREAMS_OPENED,
        &[("service", "pg")],
        Duration::from_secs(10),
        |n| n >= 1.0,
    );
    // relay-outer sends nothing to a client whose stream relay-inner refused: it closes
    // the connection (after reading what psql sent), and psql sees the end of the stream.
    let err = psql_at("127.0.0.1", bad, "SELECT 1").unwrap_err();
    assert!(
        err.contains("server closed the connection unexpectedly"),
        "{err}"
    );
    // Refused by relay-inner (which does not label its metrics with a name it was sent),
    // and counted by relay-outer on the listener, with relay-inner's reason in its log.
    inner.wait_metric(
        m::STREAMS_FAILED,
        &[("service", "?"), ("reason", "unknown_service")],
        Duration::from_secs(5),
        |n| n == 1.0,
    );
    outer.wait_metric(
        m::STREAMS_FAILED,
        &[("listener", "bad"), ("reason", "unknown_service")],
        Duration::from_secs(5),
        |n| n == 1.0,
    );
    assert!(
        outer
            .proc
            .log()
            .contains(r#"exposes no service named "not-exposed""#),
        "{}",
        outer.proc.log()
    );
    assert_eq!(long.join().unwrap().unwrap().trim(), "still here");
    assert_eq!(psql_at("127.0.0.1", good, "SELECT 42").unwrap(), "42");
    // Nothing else was touched: the one session lived throughout.
    assert_eq!(outer.metric(m::SESSION_DISCONNECTS, &[]), 0.0);
    assert_eq!(outer.metric(m::SESSION_CONNECTS, &[]), 1.0);
    assert_eq!(
        outer.metric(m::STREAMS_FAILED, &[("listener", "good")]),
        0.0
    );
}

#[test]
fn listener_fails_fast_while_relay_inner_is_down_and_recovers_after_restart() {
    let mut s = setup();
    assert_eq!(s.sql("SELECT 1").unwrap(), "1");
    s.inner.proc.kill9();
    s.outer
        .wait_status("the session is gone", Duration::from_secs(15), |v| {
            v["listeners"][0]["tunnel_up"] == false
        });
    // Fail fast: closed at once, not left hanging until a timeout.
    let started = std::time::Instant::now();
    let err = s.sql("SELECT 1").unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "client hung for {:?}",
        started.elapsed()
    );
    assert!(!err.contains("timeout"), "{err}");
    s.outer.wait_metric(
        m::LISTENER_REFUSED,
        &[("listener", "pg"), ("reason", "no_session")],
        Duration::from_secs(5),
        |n| n >= 1.0,
    );
    // The listener stayed bound; a new relay-inner brings it back.
    s.inner = Relay::inner(
        "relay-inner-2",
        &inner_cfg(&s.pki, s.tunnel_port, &s.pg),
        None,
    );
    wait_until(Duration::from_secs(20), "queries work again", || {
        s.sql("SELECT 2").as_deref() == Ok("2")
    });
}

#[test]
fn two_relay_inners_share_the_tunnel_and_survive_losing_one() {
    let mut s = setup();
    let second = Relay::inner(
        "relay-inner-b",
        &inner_cfg(&s.pki, s.tunnel_port, &s.pg),
        None,
    );
    s.outer
        .wait_status("two sessions", Duration::from_secs(10), |v| {
            v["sessions"].as_array().map(Vec::len) == Some(2)
        });
    // Four long queries spread over both sessions (least loaded first).
    let long: Vec<_> = (0..4)
        .map(|i| psql_thread(s.listen_port, &format!("SELECT pg_sleep(3); SELECT {i}")))
        .collect();
    let opened = |r: &Relay| r.metric(m::STREAMS_OPENED, &[("service", "pg")]) as usize;
    wait_until(Duration::from_secs(15), "all four streams open", || {
        opened(&s.inner) + opened(&second) >= 4
    });
    let (on_a, on_b) = (opened(&s.inner), opened(&second));
    assert!(
        on_a >= 1 && on_b >= 1,
        "streams not spread: a={on_a} b={on_b}"
    );
    s.inner.proc.kill9();
    let results: Vec<_> = long.into_iter().map(|h| h.join().unwrap()).collect();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(
        ok, on_b,
        "the surviving relay's streams must finish intact: {results:?}"
    );
    // New connections keep working through the survivor.
    for i in 0..5 {
        assert_eq!(s.sql(&format!("SELECT {i}")).unwrap(), i.to_string());
    }
    assert!(s.outer.metric(m::SESSION_DISCONNECTS, &[]) >= 1.0);
}

#[test]
fn sigterm_lets_open_streams_finish_and_exits_zero() {
    let mut s = setup();
    let long = psql_thread(s.listen_port, "SELECT pg_sleep(2); SELECT 'finished'");
    s.inner.wait_metric(
        m::STREAMS_OPENED,
        &[("service", "pg")],
        Duration::from_secs(10),
        |n| n >= 1.0,
    );
    s.inner.proc.term();
    // relay-outer stops sending new streams to the draining session: fail fast.
    s.outer
        .wait_status("the session is draining", Duration::from_secs(5), |v| {
            v["sessions"][0]["draining"] == true
        });
    assert!(s.sql("SELECT 1").is_err());
    assert_eq!(long.join().unwrap().unwrap().trim(), "finished");
    let status = s
        .inner
        .proc
        .wait_exit(Duration::from_secs(10))
        .expect("relay-inner exits");
    assert!(status.success(), "{status:?}");
    s.outer.proc.term();
    let status = s
        .outer
        .proc
        .wait_exit(Duration::from_secs(10))
        .expect("relay-outer exits");
    assert!(status.success(), "{status:?}");
}

#[test]
fn allowlist_and_connection_limit_refuse_at_accept_and_touch_nothing_else() {
    let pg = Pg::start(PgOpts::default());
    let pki = Pki::new(&["localhost"]);
    pki.issue("site-a");
    let (tport, open, fenced, small) = (free_port(), free_port(), free_port(), free_port());
    let mut fenced_l = ListenerSpec::new("fenced", &format!("127.0.0.1:{fenced}"), "site-a", "pg");
    fenced_l.extra = "    allow: [\"10.0.0.0/8\", \"2001:db8::/32\"]\n".into();
    let mut small_l = ListenerSpec::new("small", &format!("127.0.0.1:{small}"), "site-a", "pg");
    small_l.extra = "    max_connections: 1\n    allow: [\"127.0.0.0/8\"]\n".into();
    let listeners = [
        ListenerSpec::new("open", &format!("127.0.0.1:{open}"), "site-a", "pg"),
        fenced_l,
        small_l,
    ];
    let outer = Relay::outer(
        &outer_yaml(&pki, &format!("127.0.0.1:{tport}"), KA, &listeners, ""),
        None,
    );
    let _inner = Relay::inner("relay-inner", &inner_cfg(&pki, tport, &pg), None);

    // 127.0.0.1 is not in the allowlist: closed at accept, never reaches relay-inner.
    assert!(psql_at("127.0.0.1", fenced, "SELECT 1").is_err());
    outer.wait_metric(
        m::LISTENER_REFUSED,
        &[("listener", "fenced"), ("reason", "not_allowed")],
        Duration::from_secs(5),
        |n| n == 1.0,
    );

    // One slot: a long query holds it, a second client is refused, the open listener works.
    let long = psql_thread(small, "SELECT pg_sleep(2); SELECT 'held'");
    wait_until(Duration::from_secs(10), "the slot is taken", || {
        pg.try_psql("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(2)%'")
            .map(|n| n == "1")
            .unwrap_or(false)
    });
    assert!(psql_at("127.0.0.1", small, "SELECT 1").is_err());
    outer.wait_metric(
        m::LISTENER_REFUSED,
        &[("listener", "small"), ("reason", "over_limit")],
        Duration::from_secs(5),
        |n| n == 1.0,
    );
    assert_eq!(psql_at("127.0.0.1", open, "SELECT 7").unwrap(), "7");
    assert_eq!(long.join().unwrap().unwrap().trim(), "held");
    // The slot is free again.
    wait_until(Duration::from_secs(10), "the slot is free again", || {
        psql_at("127.0.0.1", small, "SELECT 8").as_deref() == Ok("8")
    });
}

/// `connections: 3`: relay-inner keeps three sessions to relay-outer, and concurrent
/// clients are spread over them (least loaded first).
#[test]
fn connections_spread_streams_over_several_sessions() {
    let mut s = setup();
    s.inner.proc.term();
    s.inner.proc.wait_exit(Duration::from_secs(10));
    let cfg = format!(
        "{}connections: 3\n",
        inner_cfg(&s.pki, s.tunnel_port, &s.pg)
    );
    let inner = Relay::inner("relay-inner-3", &cfg, None);
    // Three sessions came up, and the first relay-inner's is gone.
    wait_sessions(&inner, 3);
    s.outer
        .wait_status("three sessions", Duration::from_secs(30), |v| {
            v["sessions"].as_array().map(Vec::len) == Some(3)
        });
    // Three clients at once, each holding its connection: one per session.
    let port = s.listen_port;
    let clients: Vec<_> = (0..3)
        .map(|_| std::thread::spawn(move || psql_at("127.0.0.1", port, "SELECT pg_sleep(3)")))
        .collect();
    wait_until(Duration::from_secs(20), "three clients connected", || {
        s.pg.try_psql(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(3)%' AND pid <> pg_backend_pid()",
        )
        .as_deref()
            == Ok("3")
    });
    let status = s.outer.status();
    let per_session: Vec<u64> = status["sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .map(|x| x["open_streams"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(per_session, vec![1, 1, 1], "{status}");
    for c in clients {
        c.join().unwrap().unwrap();
    }
}

/// Data-path threads: relay-outer with `threads: 3` puts the three sessions of a
/// relay-inner with `connections: 3` on three different threads, and clients reach the
/// database through each; a relay-inner with `threads: 0` (everything on its main
/// runtime) works the same.
#[test]
fn sessions_spread_over_data_path_threads() {
    let mut s = setup();
    s.inner.proc.term();
    s.inner.proc.wait_exit(Duration::from_secs(10));
    s.outer.proc.term();
    s.outer.proc.wait_exit(Duration::from_secs(10));
    let outer_cfg = |threads: usize| {
        let l = ListenerSpec::new(
            "pg",
            &format!("127.0.0.1:{}", s.listen_port),
            "site-a",
            "pg",
        );
        format!(
            "{}threads: {threads}\n",
            outer_yaml(
                &s.pki,
                &format!("127.0.0.1:{}", s.tunnel_port),
                KA,
                &[l],
                ""
            )
        )
    };
    let outer = Relay::outer(&outer_cfg(3), None);
    let cfg = format!(
        "{}connections: 3\nthreads: 0\n",
        inner_cfg(&s.pki, s.tunnel_port, &s.pg)
    );
    let inner = Relay::inner("relay-inner-t0", &cfg, None);
    wait_sessions(&inner, 3);
    let status = outer.wait_status("three sessions", Duration::from_secs(30), |v| {
        v["sessions"].as_array().map(Vec::len) == Some(3)
    });
    assert_eq!(status["threads"], 3, "{status}");
    let mut threads: Vec<u64> = status["sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .map(|x| {
            x["thread"]
                .as_u64()
                .expect("each TLS session is on a thread")
        })
        .collect();
    threads.sort();
    assert_eq!(threads, vec![0, 1, 2], "{status}");
    let inner_status = inner.status();
    assert_eq!(inner_status["threads"], 0, "{inner_status}");
    // Six clients at once: every session carries streams, both ways.
    let port = s.listen_port;
    let clients: Vec<_> = (0..6)
        .map(|i| {
            std::thread::spawn(move || {
                psql_at(
                    "127.0.0.1",
                    port,
                    &format!("SELECT sum(g) + {i} FROM generate_series(1, 100000) g"),
                )
            })
        })
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        assert_eq!(
            c.join().unwrap().unwrap(),
            (5000050000u64 + i as u64).to_string()
        );
    }
    // And a relay-inner on one data-path thread for its three sessions.
    drop(inner);
    let cfg = format!(
        "{}connections: 3\nthreads: 1\n",
        inner_cfg(&s.pki, s.tunnel_port, &s.pg)
    );
    let inner = Relay::inner("relay-inner-t1", &cfg, None);
    wait_sessions(&inner, 3);
    assert_eq!(
        psql_at("127.0.0.1", port, "SELECT 41 + 1").as_deref(),
        Ok("42")
    );
    assert_eq!(inner.status()["threads"], 1);
}

/// Waits until relay-inner `r` has `n` live sessions (`/status`).
fn wait_sessions(r: &Relay, n: usize) {
    r.wait_status(
        &format!("{n} live sessions"),
        Duration::from_secs(30),
        |v| {
            v["outer"]
                .as_array()
                .map(|o| o.iter().filter(|e| e["up"] == true).count())
                == Some(n)
        },
    );
}
