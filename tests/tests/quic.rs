//! End to end over the QUIC transport (issue 5):
//!
//! 1. `transport: quic`: psql through the tunnel; both relays say the session is QUIC.
//! 2. `transport: auto` with UDP blocked (nftables in the inside namespace of a
//!    `NetPair`): falls back to TLS and works; once UDP is let through again it moves
//!    to QUIC, the TLS session drains and closes, and SQL keeps working.
//! 3. A client certificate from another CA over QUIC is refused, with a clear log line
//!    on both sides.

use std::time::Duration;

use routy_e2e::relays::{inner_yaml, outer_yaml, ListenerSpec, Pki, Relay, Tunnel, READY};
use routy_e2e::{free_port, netns_cmd, psql_in, require_root, run_timeout, NetPair, Pg, PgOpts};

const KA: (&str, &str) = ("500ms", "5s");

/// `/status` of a relay's admin endpoint (on 127.0.0.1 of namespace `ns`, if given).
fn status(relay: &Relay, ns: Option<&str>) -> serde_json::Value {
    let port = relay.admin_port.expect("admin port");
    let url = format!("http://127.0.0.1:{port}/status");
    // python3 is the harness's HTTP client inside namespaces (see .ci/run).
    let mut cmd = match ns {
        Some(ns) => netns_cmd(ns, "python3"),
        None => std::process::Command::new("python3"),
    };
    cmd.args([
        "-c",
        "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())",
        &url,
    ]);
    let out = run_timeout(&mut cmd, None, Duration::from_secs(10)).expect("python3");
    assert!(
        out.status.success(),
        "GET {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "/status is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn psql_through_a_quic_tunnel() {
    let pg = Pg::start(PgOpts::default());
    let pki = Pki::new(&["localhost", "127.0.0.1"]);
    pki.issue("site-a");
    let tunnel_port = free_port();
    let listen_port = free_port();
    let l = ListenerSpec::new("pg", &format!("127.0.0.1:{listen_port}"), "site-a", "pg");
    let outer = Relay::outer(
        &outer_yaml(&pki, &format!("127.0.0.1:{tunnel_port}"), KA, &[l], ""),
        None,
    );
    let iy = Tunnel::inner_cfg(&pki, "site-a", tunnel_port, &pg, KA, "transport: quic\n");
    let inner = Relay::inner("relay-inner", &iy, None);
    outer.wait_count("tunnel up", 1, READY);
    let v = status(&inner, None);
    assert_eq!(v["outer"][0]["session"]["transport"], "quic", "{v}");
    pg.psql("CREATE TABLE q (id int PRIMARY KEY, v text); INSERT INTO q VALUES (1, 'over quic');");
    let out = routy_e2e::psql_at("127.0.0.1", listen_port, "SELECT v FROM q WHERE id = 1").unwrap();
    assert_eq!(out, "over quic");
    // A bigger result, and several clients at once.
    let big = routy_e2e::psql_at(
        "127.0.0.1",
        listen_port,
        "SELECT sum(length(repeat('x', g))) FROM generate_series(1, 2000) g",
    )
    .unwrap();
    assert_eq!(big, "2001000");
    let clients: Vec<_> = (0..8)
        .map(|i| {
            std::thread::spawn(move || {
                routy_e2e::psql_at("127.0.0.1", listen_port, &format!("SELECT {i} * 2")).unwrap()
            })
        })
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        assert_eq!(c.join().unwrap(), (i * 2).to_string());
    }
    let s = status(&outer, None);
    assert_eq!(s["sessions"][0]["transport"], "quic", "{s}");
    let s = status(&inner, None);
    assert_eq!(s["outer"][0]["session"]["transport"], "quic", "{s}");
}

fn nft_inside(pair: &NetPair, args: &[&str]) {
    let mut cmd = pair.cmd_inside("nft");
    cmd.args(args);
    let out = run_timeout(&mut cmd, None, Duration::from_secs(10)).expect("nft");
    assert!(
        out.status.success(),
        "nft {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn auto_falls_back_to_tls_when_udp_is_blocked_and_moves_to_quic_when_it_is_not() {
    require_root();
    let pair = NetPair::new(true);
    let (inside_ns, outside_ns) = (pair.inside_ns(), pair.outside_ns());
    let outside_ip = pair.outside_ip();
    let tunnel_port = free_port();
    // UDP to the tunnel port is dropped on the way out of the inside namespace (only
    // there: the root namespace's firewall is never touched).
    pair.load_nft(&format!(
        "table inet routy_udp {{\n chain output {{\n  type filter hook output priority 0;\n  udp dport {tunnel_port} drop\n }}\n}}\n"
    ));
    let pg = Pg::start(PgOpts::inside(&pair));
    let pki = Pki::new(&[outside_ip]);
    pki.issue("site-a");
    let listen_port = free_port();
    let (outer, inner) = Relay::across(
        &pair,
        &pki,
        (tunnel_port, listen_port, pg.port()),
        KA,
        "shutdown_grace: 5s\ntransport: auto\nquic_retry: 2s\n",
    );
    outer.wait_count("tunnel up", 1, READY);
    let log = inner.proc.log();
    assert!(
        log.contains("falling back to TLS"),
        "relay-inner should say it fell back to TLS:\n{log}"
    );
    let v = status(&outer, Some(outside_ns));
    assert_eq!(v["sessions"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["sessions"][0]["transport"], "tls", "{v}");
    pg.psql("CREATE TABLE a (id int PRIMARY KEY, v text); INSERT INTO a VALUES (1, 'fallback');");
    assert_eq!(
        psql_in(outside_ns, outside_ip, listen_port, "SELECT v FROM a").unwrap(),
        "fallback"
    );
    // Still blocked: the retries fail quietly and the TLS session stays.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(inner.count("moved to QUIC"), 0);
    assert_eq!(
        psql_in(
            outside_ns,
            outside_ip,
            listen_port,
            "SELECT count(*) FROM a"
        )
        .unwrap(),
        "1"
    );

    // Unblock UDP: within a retry or two the connection moves to QUIC.
    nft_inside(&pair, &["delete", "table", "inet", "routy_udp"]);
    inner.wait_count("moved to QUIC", 1, Duration::from_secs(30));
    outer.wait_count("tunnel up", 2, READY);
    // The TLS session was told to drain, then closed once idle.
    inner.wait_count(
        "TLS session closed after the move to QUIC",
        1,
        Duration::from_secs(30),
    );
    outer.wait_count("tunnel down", 1, Duration::from_secs(30));
    assert_eq!(
        psql_in(outside_ns, outside_ip, listen_port, "SELECT v FROM a").unwrap(),
        "fallback"
    );
    let s = status(&outer, Some(outside_ns));
    let sessions = s["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1, "{s}");
    assert_eq!(sessions[0]["transport"], "quic", "{s}");
    let v = status(&inner, Some(inside_ns));
    assert_eq!(v["outer"][0]["session"]["transport"], "quic", "{v}");
    drop(inner);
    drop(outer);
    drop(pg);
    drop(pair);
}

#[test]
fn a_wrong_client_certificate_over_quic_is_refused_with_a_clear_log_on_both_sides() {
    let pg = Pg::start(PgOpts::default());
    let pki = Pki::new(&["localhost", "127.0.0.1"]);
    // A second, unrelated CA issues relay-inner's certificate.
    let other = Pki::new(&["localhost"]);
    other.issue("site-a");
    let tunnel_port = free_port();
    let listen_port = free_port();
    let l = ListenerSpec::new("pg", &format!("127.0.0.1:{listen_port}"), "site-a", "pg");
    let outer = Relay::outer(
        &outer_yaml(&pki, &format!("127.0.0.1:{tunnel_port}"), KA, &[l], ""),
        None,
    );
    let mut iy = inner_yaml(
        &other,
        "site-a",
        &[(format!("127.0.0.1:{tunnel_port}"), "localhost")],
        &[("pg", format!("127.0.0.1:{}", pg.port()))],
        KA,
        "transport: quic\n",
    );
    // It trusts the real relay-outer's CA, but its own certificate is from the other one.
    iy = iy.replace(
        &format!("ca: {}", other.path("ca.crt").display()),
        &format!("ca: {}", pki.path("ca.crt").display()),
    );
    let inner = Relay::start("relay-inner", "relay-inner", &iy, None);
    outer
        .proc
        .wait_for_log("tunnel connection refused: QUIC handshake failed", READY);
    inner
        .proc
        .wait_for_log("relay-outer rejected the TLS session", READY);
    let o = outer.proc.log();
    let line = o
        .lines()
        .find(|l| l.contains("QUIC handshake failed"))
        .unwrap();
    assert!(line.contains("certificate"), "{line}");
    let i = inner.proc.log();
    let line = i
        .lines()
        .find(|l| l.contains("relay-outer rejected the TLS session"))
        .unwrap();
    assert!(line.contains("tunnel.tls.client_ca"), "{line}");
    assert_eq!(inner.count("tunnel up"), 0);
}
