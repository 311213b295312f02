//! End to end across a one-way firewall: PostgreSQL and relay-inner in an "inside"
//! network namespace that drops every inbound connection, relay-outer and the clients in
//! an "outside" namespace, joined by a veth pair (see TESTING.md).
//!
//! 1. The outside cannot reach the database directly, yet reaches it through relay-outer's
//!    listener, because relay-inner dialed the tunnel out.
//! 2. Cutting the link: both relays declare the session dead within a bounded time
//!    (keepalive timeout), a client arriving meanwhile is refused at once, a query that
//!    was running through the tunnel ends with an error instead of hanging, and after the
//!    link heals relay-inner reconnects and SQL works again.

use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use routy_e2e::relays::{Pki, Relay};
use routy_e2e::{free_port, netns_cmd, pg_bin, require_root, run_timeout, try_wait_until, NetPair};
use routy_e2e::{Pg, PgOpts};
use routy_ops::metrics::LISTENER_REFUSED;

/// Keepalive of both relays: Ping every 500 ms, dead after 3 s of silence.
const KA: (&str, &str) = ("500ms", "3s");
/// Generous bound on dead-peer detection after the link is cut (timeout is 3 s).
const DETECT: Duration = Duration::from_secs(15);
/// Generous bound on relay-inner being back once the link heals (backoff max is 1 s).
const RECONNECT: Duration = Duration::from_secs(30);
/// Generous bound, from the cut, on a query in flight through the tunnel ending.
const INFLIGHT_END: Duration = Duration::from_secs(40);
/// Generous bound on a refused client's psql failing ("closed at once").
const FAIL_FAST: Duration = Duration::from_secs(10);

/// PostgreSQL and relay-inner inside, relay-outer with listener `pg` (tunnel `site-a`,
/// service `pg`) outside.
///
/// Fields drop in declaration order: the relays and PostgreSQL go before the namespaces
/// (NetPair's Drop would also kill whatever is left in them).
struct Setup {
    inner: Relay,
    outer: Relay,
    pg: Pg,
    _pki: Pki,
    listen_port: u16,
    pair: NetPair,
}

impl Setup {
    fn new() -> Setup {
        let pair = NetPair::new(true);
        let outside_ip = pair.outside_ip();
        let pg = Pg::start(PgOpts::inside(&pair));
        let pki = Pki::new(&[outside_ip]);
        pki.issue("site-a");
        let tunnel_port = free_port();
        let listen_port = free_port();
        let (outer, inner) = Relay::across(
            &pair,
            &pki,
            (tunnel_port, listen_port, pg.port()),
            KA,
            "shutdown_grace: 2s\n",
        );
        // relay-outer has registered the session too.
        outer.wait_sessions_up(1, routy_e2e::relays::READY);
        Setup {
            inner,
            outer,
            pg,
            _pki: pki,
            listen_port,
            pair,
        }
    }

    /// SQL from the outside namespace through relay-outer's listener.
    fn sql_via_relay(&self, sql: &str) -> Result<String, String> {
        psql_from(
            self.pair.outside_ns(),
            self.pair.outside_ip(),
            self.listen_port,
            sql,
            10,
        )
        .0
    }
}

/// Runs `sql` with psql inside namespace `ns` against `host:port` with a connect timeout
/// of `connect_timeout_s` seconds; returns the result (stdout, or the error with stderr)
/// and how long psql ran.
fn psql_from(
    ns: &str,
    host: &str,
    port: u16,
    sql: &str,
    connect_timeout_s: u32,
) -> (Result<String, String>, Duration) {
    let mut cmd: Command = netns_cmd(ns, pg_bin("psql"));
    cmd.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h", host])
        .arg("-p")
        .arg(port.to_string())
        .args(["-U", "postgres", "-d", "postgres", "-f", "-"])
        .env("PGCONNECT_TIMEOUT", connect_timeout_s.to_string())
        .env_remove("PGSERVICE")
        .env_remove("PGOPTIONS");
    let start = Instant::now();
    let res = match run_timeout(&mut cmd, Some(sql.as_bytes()), Duration::from_secs(120)) {
        Ok(out) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout)
            .trim_end_matches('\n')
            .to_string()),
        Ok(out) => Err(format!(
            "psql -h {host} -p {port} in {ns} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        )),
        Err(e) => Err(e),
    };
    (res, start.elapsed())
}

#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn firewall_inside_dials_out_and_outside_gets_in_only_through_the_relay() {
    require_root();
    let s = Setup::new();
    let (inside_ip, outside_ip) = (s.pair.inside_ip(), s.pair.outside_ip());
    s.pg.psql(
        "CREATE TABLE fw (id int PRIMARY KEY, v text); \
         INSERT INTO fw VALUES (1, 'behind'), (2, 'the firewall');",
    );

    // Directly, the outside cannot reach the database: the firewall drops the SYN, so
    // the connect times out.
    let (direct, took) = psql_from(
        s.pair.outside_ns(),
        inside_ip,
        s.pg.port(),
        "SELECT count(*) FROM fw",
        3,
    );
    let err = direct.expect_err("the outside reached PostgreSQL inside directly");
    // Dropped, not refused: the server is up (the inside reaches it), the firewall ate the SYN.
    assert!(
        err.contains("timeout expired"),
        "the direct connect should time out (packets dropped): {err}"
    );
    assert_eq!(s.pg.psql("SELECT count(*) FROM fw"), "2");
    eprintln!("direct connect from outside failed after {took:?}: {err}");

    // Through relay-outer's listener it can: the tunnel was dialed from the inside.
    let out = s
        .sql_via_relay("SELECT string_agg(v, ',' ORDER BY id) FROM fw")
        .unwrap();
    assert_eq!(out, "behind,the firewall");
    // Writes go through too, and the database saw relay-inner (inside) as the client.
    s.sql_via_relay("INSERT INTO fw VALUES (3, 'from outside')")
        .unwrap();
    assert_eq!(
        s.pg.psql("SELECT v FROM fw WHERE id = 3"),
        "from outside",
        "the row written through the tunnel is in the database"
    );
    assert_eq!(
        s.sql_via_relay("SELECT host(inet_client_addr())").unwrap(),
        inside_ip
    );

    // relay-outer saw the tunnel connection come from the inside address.
    let st = s.outer.status();
    let peer = st["sessions"][0]["peer"].as_str().unwrap_or_default();
    assert!(
        peer.starts_with(&format!("{inside_ip}:")),
        "relay-outer's session should come from the inside address {inside_ip}: {st}"
    );
    // And relay-inner dialed the outside address.
    let st = s.inner.status();
    assert!(
        st["outer"][0]["addr"]
            .as_str()
            .is_some_and(|a| a.starts_with(&format!("{outside_ip}:"))),
        "relay-inner's endpoint should be {outside_ip}: {st}"
    );
}

#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn cut_link_dead_peer_detection_and_reconnect() {
    require_root();
    let s = Setup::new();
    s.pg.psql(
        "CREATE TABLE cut (id int PRIMARY KEY, v text); INSERT INTO cut VALUES (1, 'before');",
    );
    assert_eq!(
        s.sql_via_relay("SELECT v FROM cut WHERE id = 1").unwrap(),
        "before"
    );
    assert_eq!(s.outer.sessions_down(None), 0);
    assert_eq!(s.inner.sessions_down(None), 0);
    assert_eq!(s.inner.sessions_up(), 1);

    // A long query through the tunnel, still running when the link goes.
    let (tx, rx) = mpsc::channel();
    {
        let (ns, host, port) = (
            s.pair.outside_ns().to_string(),
            s.pair.outside_ip().to_string(),
            s.listen_port,
        );
        std::thread::spawn(move || {
            let _ = tx.send(psql_from(&ns, &host, port, "SELECT pg_sleep(60);", 10));
        });
    }
    let running = try_wait_until(Duration::from_secs(30), "pg_sleep(60) running", || {
        s.pg.try_psql(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE query LIKE '%pg_sleep(60)%' AND state = 'active' AND pid <> pg_backend_pid()",
        )
        .as_deref()
            == Ok("1")
    });
    if let Err(e) = running {
        panic!("{e}; psql: {:?}", rx.try_recv());
    }

    // Cut the link.
    let cut = Instant::now();
    s.pair.link_down();

    // Both ends declare the session dead within a bounded time, blaming the keepalive.
    let outer_took = s.outer.wait_sessions_down(1, DETECT);
    assert_eq!(
        s.outer.sessions_down(Some("keepalive_timeout")),
        1,
        "relay-outer should blame the keepalive"
    );
    s.inner
        .wait_sessions_down(1, DETECT.saturating_sub(cut.elapsed()));
    let inner_took = cut.elapsed();
    assert_eq!(
        s.inner.sessions_down(Some("keepalive_timeout")),
        1,
        "relay-inner should blame the keepalive"
    );
    // relay-inner's /status says the tunnel is down (its last error is already that of a
    // reconnect attempt: the link is still cut).
    let st = s.inner.status();
    assert_eq!(st["outer"][0]["up"], false, "{st}");
    eprintln!("link cut: relay-outer down after {outer_took:?}, relay-inner after {inner_took:?}");

    // The listener stays bound; a client arriving now is closed at once.
    let tunnel_down = [("reason", "no_session")];
    let refused_before = s.outer.metric(LISTENER_REFUSED, &tunnel_down);
    let (res, took) = psql_from(
        s.pair.outside_ns(),
        s.pair.outside_ip(),
        s.listen_port,
        "SELECT 1",
        30,
    );
    assert!(
        res.is_err(),
        "a client got through while the link is down: {res:?}"
    );
    // The listener stays bound: the client is accepted and closed, not refused by the kernel.
    assert!(
        !res.as_ref().unwrap_err().contains("Connection refused"),
        "the listener must stay bound while the tunnel is down: {res:?}"
    );
    assert!(
        took < FAIL_FAST,
        "a client arriving while the tunnel is down must be closed at once, psql took {took:?}: {res:?}"
    );
    s.outer.wait_metric(
        LISTENER_REFUSED,
        &tunnel_down,
        Duration::from_secs(5),
        |v| v > refused_before,
    );
    eprintln!("client while down refused after {took:?}: {res:?}");

    // The query that was in flight ends with an error, it does not hang.
    let left = INFLIGHT_END.saturating_sub(cut.elapsed());
    let (res, _) = match rx.recv_timeout(left) {
        Ok(r) => r,
        Err(_) => panic!(
            "the psql session running pg_sleep(60) through the tunnel still hangs {:?} after \
             the link was cut (sessions were declared dead after {outer_took:?} / {inner_took:?})",
            cut.elapsed()
        ),
    };
    let ended = cut.elapsed();
    assert!(
        res.is_err(),
        "the query in flight through the cut link cannot have succeeded: {res:?}"
    );
    eprintln!("in-flight query ended {ended:?} after the cut: {res:?}");

    // Heal the link: relay-inner reconnects, and SQL works through the listener again.
    let healed = Instant::now();
    s.pair.link_up();
    let inner_up = s.inner.wait_sessions_up(2, RECONNECT);
    s.outer
        .wait_sessions_up(2, RECONNECT.saturating_sub(healed.elapsed()));
    let mut last = Err(String::from("not tried"));
    let back = try_wait_until(
        Duration::from_secs(30),
        "SQL through the relay after the heal",
        || {
            last = s.sql_via_relay("SELECT v FROM cut WHERE id = 1");
            last.as_deref() == Ok("before")
        },
    );
    if let Err(e) = back {
        panic!("{e}; last attempt: {last:?}");
    }
    s.sql_via_relay("INSERT INTO cut VALUES (2, 'after')")
        .unwrap();
    assert_eq!(s.pg.psql("SELECT v FROM cut WHERE id = 2"), "after");
    eprintln!(
        "link healed: relay-inner up again after {inner_up:?}, SQL back after {:?}",
        healed.elapsed()
    );
}
