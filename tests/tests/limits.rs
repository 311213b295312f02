//! Streams-per-session limits on both relays: the stream over the limit is refused with
//! a logged reason, the ones under it and the session itself are untouched.

use std::time::Duration;

use routy_e2e::relays::{inner_yaml, outer_yaml, ListenerSpec, Pki, Relay};
use routy_e2e::{free_port, psql_at, wait_until, Pg, PgOpts};
use routy_ops::metrics as m;

const KA: (&str, &str) = ("500ms", "3s");

/// PostgreSQL, both relays, the PKI (kept alive: it holds the certificates) and the listener port.
fn setup(outer_extra: &str, inner_extra: &str) -> (Pg, Pki, Relay, Relay, u16) {
    let pg = Pg::start(PgOpts::default());
    let pki = Pki::new(&["localhost"]);
    pki.issue("site-a");
    let (tport, lport) = (free_port(), free_port());
    let l = ListenerSpec::new("pg", &format!("127.0.0.1:{lport}"), "site-a", "pg");
    let mut oy = outer_yaml(&pki, &format!("127.0.0.1:{tport}"), KA, &[l], "");
    oy = oy.replace("  keepalive:", &format!("{outer_extra}  keepalive:"));
    let outer = Relay::outer(&oy, None);
    let iy = inner_yaml(
        &pki,
        "site-a",
        &[(format!("127.0.0.1:{tport}"), "localhost")],
        &[("pg", format!("127.0.0.1:{}", pg.port()))],
        KA,
        inner_extra,
    );
    let inner = Relay::inner("relay-inner", &iy, None);
    (pg, pki, outer, inner, lport)
}

fn hold(port: u16) -> std::thread::JoinHandle<Result<String, String>> {
    std::thread::spawn(move || psql_at("127.0.0.1", port, "SELECT pg_sleep(3); SELECT 'held'"))
}

fn sleepers(pg: &Pg) -> usize {
    pg.try_psql("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(3)%'")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn relay_outer_caps_streams_per_session() {
    let (pg, _pki, outer, _inner, lport) = setup("  max_streams_per_session: 2\n", "");
    let held: Vec<_> = (0..2).map(|_| hold(lport)).collect();
    wait_until(Duration::from_secs(15), "two streams held", || {
        sleepers(&pg) == 2
    });
    assert!(psql_at("127.0.0.1", lport, "SELECT 1").is_err());
    outer.wait_metric(
        m::LISTENER_REFUSED,
        &[("listener", "pg"), ("reason", "over_limit")],
        Duration::from_secs(5),
        |n| n == 1.0,
    );
    assert!(
        outer.proc.log().contains("at max_streams_per_session"),
        "relay-outer should say why it refused the client:\n{}",
        outer.proc.log()
    );
    for h in held {
        assert_eq!(h.join().unwrap().unwrap().trim(), "held");
    }
    wait_until(Duration::from_secs(10), "a slot is free again", || {
        psql_at("127.0.0.1", lport, "SELECT 2").as_deref() == Ok("2")
    });
    assert_eq!(outer.metric(m::SESSION_DISCONNECTS, &[]), 0.0);
}

#[test]
fn relay_inner_caps_streams_per_session() {
    let (pg, _pki, outer, inner, lport) = setup("", "max_streams_per_session: 1\n");
    let held = hold(lport);
    wait_until(Duration::from_secs(15), "one stream held", || {
        sleepers(&pg) == 1
    });
    assert!(psql_at("127.0.0.1", lport, "SELECT 1").is_err());
    inner.wait_metric(
        m::STREAMS_FAILED,
        &[("reason", "over_limit")],
        Duration::from_secs(5),
        |n| n == 1.0,
    );
    outer.wait_metric(
        m::STREAMS_FAILED,
        &[("listener", "pg"), ("reason", "over_limit")],
        Duration::from_secs(5),
        |n| n == 1.0,
    );
    assert!(
        inner
            .proc
            .log()
            .contains("stream refused: session is at max_streams_per_session"),
        "relay-inner should say why it refused the stream:\n{}",
        inner.proc.log()
    );
    assert_eq!(held.join().unwrap().unwrap().trim(), "held");
    wait_until(Duration::from_secs(10), "works again", || {
        psql_at("127.0.0.1", lport, "SELECT 3").as_deref() == Ok("3")
    });
    assert_eq!(outer.metric(m::SESSION_DISCONNECTS, &[]), 0.0);
}

#[test]
fn lowering_max_connections_by_reload_counts_the_clients_already_in() {
    let (pg, _pki, outer, _inner, lport) = setup("", "");
    let yaml = std::fs::read_to_string(&outer.config).unwrap();
    let with_limit = |n: usize| {
        yaml.replace(
            "    service: pg\n",
            &format!("    service: pg\n    max_connections: {n}\n"),
        )
    };
    std::fs::write(&outer.config, with_limit(3)).unwrap();
    let mut outer = outer;
    outer.proc.signal(libc::SIGHUP);
    let reloads = |n: f64| move |v: f64| v == n;
    let ok = [("result", "ok")];
    outer.wait_metric(
        m::CONFIG_RELOADS,
        &ok,
        Duration::from_secs(10),
        reloads(1.0),
    );
    let held: Vec<_> = (0..2).map(|_| hold(lport)).collect();
    wait_until(Duration::from_secs(15), "two clients in", || {
        sleepers(&pg) == 2
    });
    // Two are in; the limit drops to two: a third client must be refused, not admitted
    // by a counter that forgot the two.
    std::fs::write(&outer.config, with_limit(2)).unwrap();
    outer.proc.signal(libc::SIGHUP);
    outer.wait_metric(
        m::CONFIG_RELOADS,
        &ok,
        Duration::from_secs(10),
        reloads(2.0),
    );
    assert!(psql_at("127.0.0.1", lport, "SELECT 1").is_err());
    outer.wait_metric(
        m::LISTENER_REFUSED,
        &[("listener", "pg"), ("reason", "over_limit")],
        Duration::from_secs(5),
        |n| n == 1.0,
    );
    for h in held {
        assert_eq!(h.join().unwrap().unwrap().trim(), "held");
    }
    wait_until(Duration::from_secs(10), "room again", || {
        psql_at("127.0.0.1", lport, "SELECT 4").as_deref() == Ok("4")
    });
}
