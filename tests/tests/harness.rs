//! Self-test of the routy-e2e harness against the real tools (PostgreSQL, ip, nft, python3).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use routy_e2e::{
    free_port, pg_bin, psql_at, psql_in, require_root, run_timeout, try_wait_until, wait_until,
    NetPair, Pg, PgOpts, Proc,
};

const LONG: Duration = Duration::from_secs(60);

/// Fetches `url` with python3 inside namespace `ns`; Ok(HTTP status) or Err(output).
fn http_get_in(pair: &NetPair, ns: &str, url: &str, timeout_s: u32) -> Result<String, String> {
    let mut cmd = pair.cmd_in(ns, "python3");
    cmd.args([
        "-c",
        "import sys, urllib.request\n\
         r = urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2]))\n\
         print(r.status)",
        url,
        &timeout_s.to_string(),
    ]);
    let out = run_timeout(
        &mut cmd,
        None,
        Duration::from_secs(u64::from(timeout_s) + 60),
    )?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

#[test]
fn pg_on_loopback_roundtrip_stop_restart() {
    let mut pg = Pg::start(PgOpts::default());
    assert_eq!(pg.host(), "127.0.0.1");
    pg.psql(
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a'), (2, 'b');",
    );
    assert_eq!(pg.psql("SELECT id, v FROM t ORDER BY id"), "1|a\n2|b");
    assert_eq!(pg.psql("SHOW wal_level"), "logical");
    assert_eq!(pg.psql("SHOW max_connections"), "200");
    // The free function reaches the same server.
    assert_eq!(
        psql_at("127.0.0.1", pg.port(), "SELECT count(*) FROM t").unwrap(),
        "2"
    );
    // Errors surface as Err with psql's message.
    let err = pg.try_psql("SELECT * FROM no_such_table").unwrap_err();
    assert!(err.contains("no_such_table"), "{err}");

    pg.stop();
    assert!(psql_at("127.0.0.1", pg.port(), "SELECT 1").is_err());
    pg.restart();
    assert_eq!(pg.psql("SELECT v FROM t WHERE id = 2"), "b");
    pg.restart(); // also works while running
    assert_eq!(pg.psql("SELECT 1"), "1");
    assert!(pg.bin_dir().join("psql").is_file());
    assert!(pg_bin("pg_basebackup").is_file());
}

#[test]
fn pg_standby_follows_primary() {
    let primary = Pg::start(PgOpts::default());
    let standby = Pg::standby(primary.host(), primary.port());
    assert_ne!(primary.port(), standby.port());
    assert_eq!(standby.psql("SELECT pg_is_in_recovery()"), "t");
    primary
        .psql("CREATE TABLE r (id int PRIMARY KEY, v text); INSERT INTO r VALUES (42, 'hello');");
    wait_until(LONG, "standby sees the row inserted on the primary", || {
        standby.try_psql("SELECT v FROM r WHERE id = 42").as_deref() == Ok("hello")
    });
    // The standby is read-only.
    assert!(standby.try_psql("INSERT INTO r VALUES (43, 'x')").is_err());
}

#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn netpair_firewall_blocks_inbound_allows_outbound() {
    require_root();
    let pair = NetPair::new(true);
    assert!(Path::new("/run/netns").join(pair.inside_ns()).exists());
    assert!(Path::new("/run/netns").join(pair.outside_ns()).exists());

    // A PostgreSQL inside, listening on the inside address.
    let pg = Pg::start(PgOpts::inside(&pair));
    assert_eq!(pg.netns(), Some(pair.inside_ns()));
    // Inside to itself works (Pg::psql runs in the netns).
    pg.psql("CREATE TABLE fw (x int); INSERT INTO fw VALUES (7);");
    assert_eq!(
        psql_in(
            pair.inside_ns(),
            pair.inside_ip(),
            pg.port(),
            "SELECT x FROM fw"
        )
        .unwrap(),
        "7"
    );
    // The host (root namespace) cannot reach it at all.
    assert!(psql_at(pair.inside_ip(), pg.port(), "SELECT 1").is_err());
    // Outside to inside is dropped by the firewall (connect times out).
    let mut psql = pair.cmd_in(pair.outside_ns(), pg_bin("psql"));
    psql.args(["-X", "-A", "-t", "-h", pair.inside_ip()])
        .args([
            "-p",
            &pg.port().to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
        ])
        .args(["-c", "SELECT 1"])
        .env("PGCONNECT_TIMEOUT", "3");
    let out = run_timeout(&mut psql, None, LONG).expect("psql from outside ran");
    assert!(
        !out.status.success(),
        "outside must not connect in: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(psql_in(pair.outside_ns(), pair.inside_ip(), pg.port(), "SELECT 1").is_err());

    // A listener in the outside namespace is reachable from the inside.
    let www = routy_e2e::tempdir();
    let port = free_port();
    let mut cmd = pair.cmd_in(pair.outside_ns(), "python3");
    cmd.args(["-u", "-m", "http.server", "--bind", pair.outside_ip()])
        .arg(port.to_string())
        .current_dir(www.path());
    let server = Proc::spawn("http-outside", cmd);
    server.wait_for_log("Serving HTTP", LONG);
    let url = format!("http://{}:{port}/", pair.outside_ip());
    assert_eq!(
        http_get_in(&pair, pair.inside_ns(), &url, 20).unwrap(),
        "200"
    );

    // Cutting the link breaks it, healing it restores it.
    pair.link_down();
    assert!(http_get_in(&pair, pair.inside_ns(), &url, 3).is_err());
    pair.link_up();
    try_wait_until(LONG, "link back up", || {
        http_get_in(&pair, pair.inside_ns(), &url, 5).as_deref() == Ok("200")
    })
    .unwrap();
}

#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn netpair_without_firewall_is_open_both_ways() {
    require_root();
    let pair = NetPair::new(false);
    let pg = Pg::start(PgOpts::inside(&pair));
    // Without the firewall the outside can connect in: the failure above is the firewall's.
    assert_eq!(
        psql_in(pair.outside_ns(), pair.inside_ip(), pg.port(), "SELECT 1").unwrap(),
        "1"
    );
    // Dropping the pair first kills the server; dropping the Pg afterwards must not fail.
    let data = pg.data_dir().to_path_buf();
    drop(pair);
    drop(pg);
    assert!(!data.exists());
}

#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn netpair_cleans_up_on_panic() {
    require_root();
    let names = std::sync::Mutex::new(None);
    let res = std::panic::catch_unwind(|| {
        let pair = NetPair::new(true);
        *names.lock().unwrap() =
            Some((pair.inside_ns().to_string(), pair.outside_ns().to_string()));
        // A process left running inside must not keep anything alive.
        let mut sleeper = pair.cmd_in(pair.inside_ns(), "sleep");
        sleeper.arg("1000");
        let _p = Proc::spawn("sleeper", sleeper);
        panic!("deliberate");
    });
    assert!(res.is_err());
    let (inside, outside) = names.lock().unwrap().clone().expect("names recorded");
    assert!(
        !Path::new("/run/netns").join(&inside).exists(),
        "{inside} left behind"
    );
    assert!(
        !Path::new("/run/netns").join(&outside).exists(),
        "{outside} left behind"
    );
    let listed = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        !listed.contains(&inside) && !listed.contains(&outside),
        "{listed}"
    );
}

#[test]
fn proc_log_term_kill() {
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "echo hello from sh; echo to stderr >&2; exec sleep 1000",
    ]);
    let mut p = Proc::spawn("sh-sleeper", cmd);
    p.wait_for_log("hello from sh", LONG);
    p.wait_for_log("to stderr", LONG);
    assert!(p.is_running());
    assert!(p.pid() > 0);
    p.term();
    let st = p.wait_exit(LONG).expect("exits on SIGTERM");
    assert!(!st.success());
    assert!(!p.is_running());

    let mut p = Proc::spawn("sleeper", {
        let mut c = Command::new("sleep");
        c.arg("1000");
        c
    });
    assert!(p.wait_exit(Duration::from_millis(200)).is_none());
    p.kill9();
    assert!(!p.is_running());

    // A process that exits without printing the needle fails fast with its log.
    let mut c = Command::new("sh");
    c.args(["-c", "echo something else; exit 3"]);
    let p = Proc::spawn("quitter", c);
    let err = p.try_wait_for_log("never printed", LONG).unwrap_err();
    assert!(err.contains("something else"), "{err}");
}

#[test]
fn small_helpers() {
    let a = free_port();
    let b = free_port();
    assert_ne!(a, b);
    std::net::TcpListener::bind(("127.0.0.1", a)).expect("port is free");
    let mut n = 0;
    wait_until(LONG, "counter reaches 3", || {
        n += 1;
        n >= 3
    });
    let err = try_wait_until(Duration::from_millis(120), "never", || false).unwrap_err();
    assert!(err.contains("never"), "{err}");
    let d = routy_e2e::tempdir();
    assert!(d.path().is_dir());
}

#[test]
#[should_panic(expected = "build it first")]
fn bin_panics_helpfully_when_missing() {
    routy_e2e::bin("no-such-routy-binary");
}
