//! Running Routy in production, end to end on loopback with the real binaries and a real
//! PostgreSQL: the admin endpoint (metrics that move while a stream runs, health,
//! readiness, status), reload by SIGHUP (listeners added, removed and tightened while
//! pgbench runs; invalid configs rejected whole; certificate rotation), a connection
//! flood against `max_connections`, tunnel identities serving only their own listeners,
//! the systemd readiness and watchdog notifications, and two relay-outer endpoints with
//! one of them killed.
//!
//! Every relay gets an admin endpoint on a loopback port chosen here, so a rewritten
//! config for a reload keeps the same `admin.listen` (changing it needs a restart).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use routy_e2e::relays::{inner_yaml, metric, outer_yaml, ListenerSpec, Pki, Relay, READY};
use routy_e2e::{bin, free_port, pg_bin, psql_at, run_timeout, try_wait_until, wait_until};
use routy_e2e::{Pg, PgOpts, Proc};

/// Keepalive of both relays: Ping every 500 ms, dead after 3 s of silence.
const KA: (&str, &str) = ("500ms", "3s");
/// Generous bound on something that normally takes well under a second.
const SOON: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------
// Helpers: configs, admin HTTP, Prometheus text, reloads.
// ---------------------------------------------------------------------------------------

/// Top-level YAML shared by every relay config here: a short shutdown grace and a fixed
/// admin endpoint (the `admin:` line in this exact form is what `Relay` reads its
/// `admin_port` from).
fn common(admin_port: u16) -> String {
    format!("shutdown_grace: 2s\nadmin: {{ listen: \"127.0.0.1:{admin_port}\" }}\n")
}

/// relay-outer's config: tunnel port `tport`, these listeners, admin on `admin_port`.
fn outer_cfg(pki: &Pki, tport: u16, listeners: &[ListenerSpec], admin_port: u16) -> String {
    outer_yaml(
        pki,
        &format!("127.0.0.1:{tport}"),
        KA,
        listeners,
        &common(admin_port),
    )
}

/// relay-inner's config for `tunnel`, dialing relay-outer at each of `tports` (server name
/// `localhost`) and exposing `services`.
fn inner_cfg(
    pki: &Pki,
    tunnel: &str,
    tports: &[u16],
    services: &[(&str, String)],
    admin_port: u16,
) -> String {
    let outers: Vec<(String, &str)> = tports
        .iter()
        .map(|p| (format!("127.0.0.1:{p}"), "localhost"))
        .collect();
    inner_yaml(pki, tunnel, &outers, services, KA, &common(admin_port))
}

/// The one service most tests expose: `pg`, the test's PostgreSQL.
fn pg_service(pg: &Pg) -> Vec<(&'static str, String)> {
    vec![("pg", format!("127.0.0.1:{}", pg.port()))]
}

/// A listener on a fresh loopback port; returns it and its port.
fn listener(name: &str, tunnel: &str, service: &str, extra: &str) -> (ListenerSpec, u16) {
    let port = free_port();
    let mut l = ListenerSpec::new(name, &format!("127.0.0.1:{port}"), tunnel, service);
    l.extra = extra.to_string();
    (l, port)
}

/// SQL through a relay-outer listener on 127.0.0.1.
fn sql(port: u16, q: &str) -> Result<String, String> {
    psql_at("127.0.0.1", port, q)
}

/// Runs `q` through `port` in a thread; the handle yields psql's result.
fn sql_thread(port: u16, q: &str) -> JoinHandle<Result<String, String>> {
    let q = q.to_string();
    std::thread::spawn(move || sql(port, &q))
}

/// Number of backends of `pg` running a query that starts with `prefix`.
fn running(pg: &Pg, prefix: &str) -> usize {
    pg.try_psql(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '{prefix}%' AND pid <> pg_backend_pid()"
    ))
    .ok()
    .and_then(|n| n.parse().ok())
    .unwrap_or(0)
}

/// One HTTP/1.1 GET to 127.0.0.1:`port`; (status, body) or an error.
fn try_http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("send GET {path}: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| format!("read the answer to GET {path}: {e}"))?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("GET {path}: no end of headers in {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("GET {path}: bad status line in {head:?}"))?;
    Ok((status, body.to_string()))
}

/// GET on a relay's admin endpoint; panics if the request itself fails.
fn get(r: &Relay, path: &str) -> (u16, String) {
    let port = r.admin_port.expect("the relay has an admin endpoint");
    try_http_get(port, path).unwrap_or_else(|e| panic!("{}: admin GET {path}: {e}", r.proc.name()))
}

/// The relay's `/metrics` page (asserting 200).
fn scrape(r: &Relay) -> String {
    let (status, body) = get(r, "/metrics");
    assert_eq!(status, 200, "{}: /metrics: {body}", r.proc.name());
    body
}

/// Streams relay-inner `r` has opened to its services so far.
fn streams_opened(r: &Relay) -> f64 {
    r.metric("routy_streams_opened_total", &[])
}

/// Configuration reloads of `r` with `result` ("ok" or "error") so far.
fn reloads(r: &Relay, result: &str) -> f64 {
    r.metric("routy_config_reloads_total", &[("result", result)])
}

/// The log text of `r` from its `n`-th (1-based) line containing `needle` up to the next
/// log line (a reason may span lines).
fn nth_entry(r: &Relay, needle: &str, n: usize) -> String {
    let log = r.proc.log();
    let start = log
        .match_indices(needle)
        .nth(n - 1)
        .map(|(i, _)| i)
        .unwrap_or_else(|| panic!("{}: no {n}. `{needle}` in:\n{log}", r.proc.name()));
    let from = log[..start].rfind('\n').map_or(0, |i| i + 1);
    // Log lines start with a timestamp ("2025-…"): the entry ends before the next one.
    let end = log[start..].find("\n20").map_or(log.len(), |i| start + i);
    log[from..end].to_string()
}

/// Writes `yaml` (if given) to the relay's config file, sends SIGHUP and waits for the
/// `n`-th reload verdict `outcome` ("configuration reloaded" or "configuration reload
/// rejected"); returns that log entry.
fn reload(r: &mut Relay, yaml: Option<&str>, outcome: &str) -> String {
    let n = r.count(outcome) + 1;
    if let Some(y) = yaml {
        std::fs::write(&r.config, y).expect("rewrite config");
    }
    r.proc.signal(libc::SIGHUP);
    r.wait_count(outcome, n, SOON);
    let entry = nth_entry(r, outcome, n);
    eprintln!("{}: {entry}", r.proc.name());
    entry
}

/// Whether a TCP connect to 127.0.0.1:`port` is refused (nothing listening).
fn connection_refused(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    matches!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused
    )
}

fn assert_no_tunnel_down(relays: &[&Relay]) {
    for r in relays {
        assert_eq!(
            r.sessions_down(None),
            0,
            "{} lost its session:\n{}",
            r.proc.name(),
            r.proc.log()
        );
    }
}

/// The first certificate of a PEM file, DER.
fn cert_der(path: &Path) -> Vec<u8> {
    routy_tunnel::tls::load_certs(path).expect("load certificate")[0]
        .as_ref()
        .to_vec()
}

/// Runs `relay-outer certs ARGS`, asserting success.
fn certs(args: &[&str], dir: &Path) {
    let mut cmd = Command::new(bin("relay-outer"));
    cmd.arg("certs")
        .arg(args[0])
        .arg("--dir")
        .arg(dir)
        .args(&args[1..]);
    let out = run_timeout(&mut cmd, None, Duration::from_secs(30)).expect("relay-outer certs");
    assert!(
        out.status.success(),
        "certs {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The certificate relay-outer serves on its tunnel port now (DER): a TLS 1.3 handshake
/// as tunnel `site-a` of `pki`, verifying the server as `localhost`.
fn served_cert(tport: u16, pki: &Pki) -> Vec<u8> {
    let cfg = routy_tunnel::tls::client_config(
        &pki.path("site-a.crt"),
        &pki.path("site-a.key"),
        &pki.path("ca.crt"),
    )
    .expect("client TLS config");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("server name");
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).expect("TLS client");
    let mut tcp = TcpStream::connect(("127.0.0.1", tport)).expect("connect to the tunnel port");
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)
            .expect("TLS handshake with relay-outer");
    }
    conn.peer_certificates().expect("relay-outer's certificate")[0]
        .as_ref()
        .to_vec()
}

/// Initialises pgbench's tables directly in PostgreSQL (not through a relay).
fn pgbench_init(pg: &Pg) {
    let mut cmd = Command::new(pg_bin("pgbench"));
    cmd.args(["-i", "-s", "1", "-q", "-h", "127.0.0.1", "-p"])
        .arg(pg.port().to_string())
        .args(["-U", "postgres", "postgres"]);
    let out = run_timeout(&mut cmd, None, Duration::from_secs(120)).expect("pgbench -i");
    assert!(
        out.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------
// 1. Metrics move while a long stream runs; health, readiness and status pages.
// ---------------------------------------------------------------------------------------

#[test]
fn metrics_move_while_a_long_stream_runs() {
    let pg = Pg::start(PgOpts::default());
    let pki = Pki::new(&["localhost"]);
    pki.issue("site-a");
    let tport = free_port();
    let (l, lport) = listener("pg", "site-a", "pg", "");
    let outer = Relay::outer(&outer_cfg(&pki, tport, &[l], free_port()), None);
    let inner = Relay::inner(
        "relay-inner",
        &inner_cfg(&pki, "site-a", &[tport], &pg_service(&pg), free_port()),
        None,
    );
    outer.wait_sessions_up(1, SOON);

    // Health and readiness on both, and an unknown page.
    for r in [&outer, &inner] {
        assert_eq!(get(r, "/healthz").0, 200, "{} /healthz", r.proc.name());
        let (status, body) = get(r, "/readyz");
        assert_eq!(status, 200, "{} /readyz: {body}", r.proc.name());
        let (status, body) = get(r, "/no-such-page");
        assert_eq!(status, 404, "{} unknown path: {body}", r.proc.name());
    }

    // One long stream: 100 rows of 100 kB, one every 100 ms, so about 10 MB over 10 s.
    let long = sql_thread(
        lport,
        "COPY (SELECT g, pg_sleep(0.1), repeat('x', 100000) FROM generate_series(1, 100) g) TO STDOUT",
    );
    let to_client = |r: &Relay, labels: &[(&str, &str)]| {
        let mut want = labels.to_vec();
        want.push(("direction", "to_client"));
        r.metric("routy_stream_bytes_total", &want)
    };
    let outer_labels = [("listener", "pg"), ("tunnel", "site-a"), ("service", "pg")];
    wait_until(SOON, "the first bytes of the stream are counted", || {
        to_client(&outer, &outer_labels) > 0.0
    });
    // Three scrapes a second apart while the same stream runs: the counter grows at each.
    let mut seen = vec![to_client(&outer, &outer_labels)];
    for _ in 0..2 {
        std::thread::sleep(Duration::from_secs(1));
        seen.push(to_client(&outer, &outer_labels));
    }
    assert!(
        !long.is_finished(),
        "the stream ended before the scrapes were done; make it longer"
    );
    assert!(
        seen.windows(2).all(|w| w[1] > w[0]),
        "relay-outer's to_client byte counter did not grow between scrapes while the stream ran: {seen:?}"
    );
    let metrics = scrape(&outer);
    assert_eq!(
        metric(
            &metrics,
            "routy_streams_opened_total",
            &[("listener", "pg")]
        ),
        1.0,
        "the growth above must come from one stream:\n{metrics}"
    );
    assert_eq!(
        metric(&metrics, "routy_streams_active", &[("listener", "pg")]),
        1.0,
        "{metrics}"
    );
    let inner_bytes = to_client(&inner, &[("service", "pg")]);
    assert!(
        inner_bytes > 0.0,
        "relay-inner counts no bytes for service pg while the stream runs:\n{}",
        scrape(&inner)
    );
    // Status pages while the stream runs.
    let (status, body) = get(&outer, "/status");
    assert_eq!(status, 200, "{body}");
    for needle in [
        "\"role\":\"relay-outer\"",
        "\"tunnel\":\"site-a\"",
        "\"name\":\"pg\"",
        &format!("\"bind\":\"127.0.0.1:{lport}\""),
        "\"tunnel_up\":true",
        "\"open_streams\":1",
    ] {
        assert!(
            body.contains(needle),
            "relay-outer /status lacks {needle}: {body}"
        );
    }
    let (status, body) = get(&inner, "/status");
    assert_eq!(status, 200, "{body}");
    for needle in [
        "\"role\":\"relay-inner\"",
        &format!("\"addr\":\"127.0.0.1:{tport}\""),
        "\"up\":true",
        "\"tunnel\":\"site-a\"",
        "\"open_streams\":1",
    ] {
        assert!(
            body.contains(needle),
            "relay-inner /status lacks {needle}: {body}"
        );
    }

    // Sessions and keepalive round trips (a Ping every 500 ms).
    assert_eq!(
        outer.metric("routy_sessions_up", &[("tunnel", "site-a")]),
        1.0
    );
    let outer_ep = format!("127.0.0.1:{tport}");
    assert_eq!(
        inner.metric("routy_sessions_up", &[("outer", &outer_ep)]),
        1.0
    );
    outer.wait_metric(
        "routy_keepalive_rtt_seconds_count",
        &[("tunnel", "site-a")],
        SOON,
        // relay-outer measures keepalive round trips
        |v| v > 0.0,
    );
    inner.wait_metric(
        "routy_keepalive_rtt_seconds_count",
        &[("outer", &outer_ep)],
        SOON,
        // relay-inner measures keepalive round trips
        |v| v > 0.0,
    );

    let out = long
        .join()
        .expect("psql thread")
        .expect("the long COPY finishes");
    assert_eq!(out.lines().count(), 100);
    // After the end both relays have counted at least the payload.
    let total = to_client(&outer, &outer_labels);
    assert!(total >= 10_000_000.0, "relay-outer counted {total} bytes");
    inner.wait_metric(
        "routy_stream_bytes_total",
        &[("service", "pg"), ("direction", "to_client")],
        SOON,
        // relay-inner counted the whole payload
        |v| v >= 10_000_000.0,
    );
    assert!(
        seen[2] < total,
        "counted before the end: {seen:?} < {total}"
    );
}

// ---------------------------------------------------------------------------------------
// 2. Reload while pgbench runs through an untouched listener.
// ---------------------------------------------------------------------------------------

#[test]
fn reload_adds_removes_and_tightens_while_pgbench_runs() {
    let pg = Pg::start(PgOpts::default());
    pgbench_init(&pg);
    let pki = Pki::new(&["localhost"]);
    pki.issue("site-a");
    let (tport, admin) = (free_port(), free_port());
    let (untouched, a_port) = listener("untouched", "site-a", "pg", "");
    let (removed, b_port) = listener("removed", "site-a", "pg", "");
    let (tightened, c_port) = listener("tightened", "site-a", "pg", "");
    let (added, d_port) = listener("added", "site-a", "pg", "");
    let mut outer = Relay::outer(
        &outer_cfg(
            &pki,
            tport,
            &[untouched.clone(), removed, tightened.clone()],
            admin,
        ),
        None,
    );
    let inner = Relay::inner(
        "relay-inner",
        &inner_cfg(&pki, "site-a", &[tport], &pg_service(&pg), free_port()),
        None,
    );
    for p in [a_port, b_port, c_port] {
        assert_eq!(
            sql(p, "SELECT 1").unwrap(),
            "1",
            "listener on {p} before the reload"
        );
    }
    assert!(connection_refused(d_port), "the new port is not bound yet");
    let opened_before = streams_opened(&inner);

    // pgbench through the untouched listener: 4 connections held for 8 s.
    let port = a_port.to_string();
    let bench = std::thread::spawn(move || {
        let mut cmd = Command::new(pg_bin("pgbench"));
        cmd.args([
            "-S",
            "-c",
            "4",
            "-j",
            "2",
            "-T",
            "8",
            "-h",
            "127.0.0.1",
            "-p",
        ])
        .arg(&port)
        .args(["-U", "postgres", "postgres"]);
        run_timeout(&mut cmd, None, Duration::from_secs(120))
    });
    wait_until(SOON, "pgbench's 4 connections are spliced", || {
        streams_opened(&inner) >= opened_before + 4.0
    });

    // The new config: `removed` gone, `added` new, `tightened` allows only 10.0.0.0/8.
    let mut tight = tightened;
    tight.extra = "    allow: [\"10.0.0.0/8\"]\n".into();
    let summary = reload(
        &mut outer,
        Some(&outer_cfg(&pki, tport, &[untouched, tight, added], admin)),
        "configuration reloaded",
    );
    assert!(
        summary.contains("added") && summary.contains("removed"),
        "{summary}"
    );
    assert!(
        !bench.is_finished(),
        "pgbench ended before the reload was done"
    );

    // The added listener serves SQL.
    assert_eq!(sql(d_port, "SELECT 'added'").unwrap(), "added");
    // The removed listener's port is closed.
    wait_until(SOON, "the removed listener's port is closed", || {
        connection_refused(b_port)
    });
    // The tightened listener refuses 127.0.0.1 at accept.
    let err = sql(c_port, "SELECT 1").expect_err("127.0.0.1 is not in 10.0.0.0/8");
    eprintln!("tightened listener: {err}");
    outer
        .proc
        .wait_for_log("client refused: source address not allowed", SOON);
    let metrics = scrape(&outer);
    assert_eq!(
        metric(
            &metrics,
            "routy_listener_refused_total",
            &[("listener", "tightened"), ("reason", "not_allowed")]
        ),
        // One per refusal logged (psql may try more than once).
        outer.count("client refused: source address not allowed") as f64,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "routy_config_reloads_total", &[("result", "ok")]),
        1.0,
        "{metrics}"
    );
    let (_, status) = get(&outer, "/status");
    assert!(status.contains("\"name\":\"added\""), "{status}");
    assert!(!status.contains("\"name\":\"removed\""), "{status}");

    // pgbench through the untouched listener ran on without a single error.
    let out = bench.join().expect("pgbench thread").expect("pgbench ran");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(out.status.success(), "pgbench failed: {text}");
    assert!(text.contains("number of failed transactions: 0"), "{text}");
    assert!(!text.contains("aborted"), "{text}");
    assert_no_tunnel_down(&[&outer, &inner]);
    assert_eq!(reloads(&outer, "error"), 0.0);
}

// ---------------------------------------------------------------------------------------
// 3. An invalid reload is rejected whole; the old config stays in force.
// ---------------------------------------------------------------------------------------

#[test]
fn invalid_reload_keeps_the_old_config() {
    let pg = Pg::start(PgOpts::default());
    let pki = Pki::new(&["localhost"]);
    pki.issue("site-a");
    let (tport, admin, inner_admin) = (free_port(), free_port(), free_port());
    let (l, lport) = listener("pg", "site-a", "pg", "");
    // Every rejected config also adds listener `new`: rejected whole means not bound.
    let (n, nport) = listener("new", "site-a", "pg", "");
    let good = outer_cfg(&pki, tport, std::slice::from_ref(&l), admin);
    let mut outer = Relay::outer(&good, None);
    let mut inner = Relay::inner(
        "relay-inner",
        &inner_cfg(&pki, "site-a", &[tport], &pg_service(&pg), inner_admin),
        None,
    );
    assert_eq!(sql(lport, "SELECT 1").unwrap(), "1");

    let with_new = outer_cfg(&pki, tport, &[l.clone(), n.clone()], admin);
    let crt = pki.path("outer.crt").display().to_string();
    let cases = [
        (
            "an unknown key",
            with_new.replace("  keepalive:", "  keepalive_typo: 1s\n  keepalive:"),
            "keepalive_typo",
        ),
        (
            "a missing TLS certificate",
            with_new.replace(&crt, "/nonexistent/routy/renewed-outer.crt"),
            "/nonexistent/routy/renewed-outer.crt",
        ),
        (
            "a moved tunnel port",
            with_new.replace(
                &format!("listen: \"127.0.0.1:{tport}\""),
                &format!("listen: \"127.0.0.1:{}\"", free_port()),
            ),
            "needs a restart",
        ),
        (
            // The default is one per CPU, never 0.
            "changed data-path threads",
            format!("{with_new}threads: 0\n"),
            "threads changed",
        ),
    ];
    for (i, (what, yaml, needle)) in cases.iter().enumerate() {
        assert_ne!(yaml, &with_new, "{what}: the test's edit did not apply");
        let entry = reload(&mut outer, Some(yaml), "configuration reload rejected");
        assert!(
            entry.contains(needle),
            "{what}: the rejection does not name {needle:?}: {entry}"
        );
        // The old config is in force: its listener works, the new one was not bound.
        assert_eq!(
            sql(lport, "SELECT 2").as_deref(),
            Ok("2"),
            "{what}: the old listener"
        );
        assert!(
            connection_refused(nport),
            "{what}: the listener added by a rejected config was bound"
        );
        assert_eq!(
            outer.metric("routy_config_reloads_total", &[("result", "error")]),
            (i + 1) as f64,
            "{what}"
        );
    }
    assert_eq!(reloads(&outer, "ok"), 0.0);
    // A valid reload afterwards still works (and adds `new`).
    reload(&mut outer, Some(&with_new), "configuration reloaded");
    assert_eq!(sql(nport, "SELECT 3").unwrap(), "3");
    assert_eq!(
        outer.metric("routy_config_reloads_total", &[("result", "ok")]),
        1.0
    );

    // relay-inner: an unknown key in a config that would also rename service pg.
    let bad_inner = inner_cfg(
        &pki,
        "site-a",
        &[tport],
        &[("pg-renamed", format!("127.0.0.1:{}", pg.port()))],
        inner_admin,
    ) + "colour: blue\n";
    let entry = reload(
        &mut inner,
        Some(&bad_inner),
        "configuration reload rejected",
    );
    assert!(
        entry.contains("colour"),
        "the rejection does not name the key: {entry}"
    );
    assert_eq!(
        sql(lport, "SELECT 'old services still served'").as_deref(),
        Ok("old services still served")
    );
    assert_eq!(
        inner.metric("routy_config_reloads_total", &[("result", "error")]),
        1.0
    );
    // relay-inner: changing the data-path threads needs a restart.
    let threads =
        inner_cfg(&pki, "site-a", &[tport], &pg_service(&pg), inner_admin) + "threads: 0\n";
    let entry = reload(&mut inner, Some(&threads), "configuration reload rejected");
    assert!(
        entry.contains("threads changed") && entry.contains("needs a restart"),
        "{entry}"
    );
    assert_eq!(
        sql(lport, "SELECT 'still served'").as_deref(),
        Ok("still served")
    );
    assert_eq!(reloads(&inner, "ok"), 0.0);
    assert_no_tunnel_down(&[&outer, &inner]);
}

// ---------------------------------------------------------------------------------------
// 4. Certificate rotation by reload, on both relays.
// ---------------------------------------------------------------------------------------

#[test]
fn certificate_rotation_by_reload() {
    let pg = Pg::start(PgOpts::default());
    let pki = Pki::new(&["localhost"]);
    pki.issue("site-a");
    let (tport, admin, inner_admin) = (free_port(), free_port(), free_port());
    let (l, lport) = listener("pg", "site-a", "pg", "");
    let outer_yaml_v1 = outer_cfg(&pki, tport, std::slice::from_ref(&l), admin);
    let mut outer = Relay::outer(&outer_yaml_v1, None);
    let mut inner = Relay::inner(
        "relay-inner",
        &inner_cfg(&pki, "site-a", &[tport], &pg_service(&pg), inner_admin),
        None,
    );
    assert_eq!(sql(lport, "SELECT 1").unwrap(), "1");
    let old_cert = cert_der(&pki.path("outer.crt"));
    assert_eq!(served_cert(tport, &pki), old_cert);

    // --- relay-outer's certificate, renewed in place as an operator would ---
    // A query spans the whole rotation: the established session must carry it through.
    let held = sql_thread(lport, "SELECT pg_sleep(3); SELECT 'held'");
    wait_until(SOON, "the held query runs", || {
        running(&pg, "SELECT pg_sleep(3)") == 1
    });
    // The renewed certificate also names `renewed.test`, which the old one does not: a
    // relay-inner that verifies that name can only connect if the renewed one is served.
    certs(
        &[
            "renew-outer",
            "--server-name",
            "localhost",
            "--server-name",
            "renewed.test",
        ],
        pki.dir(),
    );
    let new_cert = cert_der(&pki.path("outer.crt"));
    assert_ne!(new_cert, old_cert, "renew-outer wrote the same certificate");
    // Nothing changes before the reload: the files are read at start and on SIGHUP only.
    assert_eq!(
        served_cert(tport, &pki),
        old_cert,
        "relay-outer switched certificates without a reload"
    );
    reload(&mut outer, None, "configuration reloaded");
    // New connections get the renewed certificate…
    assert_eq!(
        served_cert(tport, &pki),
        new_cert,
        "relay-outer still serves the old certificate after the reload"
    );
    // …so a new relay-inner verifying `renewed.test` connects and is served.
    let renewed_name = inner_cfg(&pki, "site-a", &[tport], &pg_service(&pg), free_port()).replace(
        "server_name: \"localhost\"",
        "server_name: \"renewed.test\"",
    );
    assert!(renewed_name.contains("renewed.test"));
    let inner2 = Relay::inner("relay-inner-renewed-name", &renewed_name, None);
    outer.wait_metric("routy_sessions_up", &[("tunnel", "site-a")], SOON, |v| {
        v == 2.0
    });
    // …while the established session and its stream were not touched.
    assert_eq!(
        held.join()
            .unwrap()
            .map(|s| s.trim().to_string())
            .as_deref(),
        Ok("held")
    );
    assert_no_tunnel_down(&[&outer, &inner, &inner2]);
    assert_eq!(sql(lport, "SELECT 2").unwrap(), "2");

    // --- relay-inner's client certificate, from a new CA, into new files ---
    // The new CA lets the test tell the certificates apart: the restarted relay-outer
    // below trusts only the new CA, so a relay-inner still presenting the old
    // certificate (inner2, never reloaded) is refused, and the reloaded one connects
    // only because it re-read its files.
    let pki2 = Pki::new(&["localhost"]);
    pki2.issue("site-a");
    let rotated = inner_cfg(&pki, "site-a", &[tport], &pg_service(&pg), inner_admin)
        .replace(
            &pki.path("site-a.crt").display().to_string(),
            &pki2.path("site-a.crt").display().to_string(),
        )
        .replace(
            &pki.path("site-a.key").display().to_string(),
            &pki2.path("site-a.key").display().to_string(),
        );
    assert!(rotated.contains(&pki2.path("site-a.key").display().to_string()));
    reload(&mut inner, Some(&rotated), "configuration reloaded");
    // The reload alone leaves the running session alone.
    assert_eq!(sql(lport, "SELECT 3").unwrap(), "3");
    assert_no_tunnel_down(&[&outer, &inner]);

    // Force a reconnect: relay-outer dies and a new one starts on the same ports,
    // trusting only the new CA for client certificates.
    outer.proc.kill9();
    inner.wait_sessions_down(1, SOON);
    let new_ca = outer_yaml_v1.replace(
        &format!("client_ca: {}", pki.path("ca.crt").display()),
        &format!("client_ca: {}", pki2.path("ca.crt").display()),
    );
    assert_ne!(new_ca, outer_yaml_v1);
    let outer = Relay::outer(&new_ca, None);
    // The reloaded relay-inner is back, with the new certificate.
    inner.wait_sessions_up(2, Duration::from_secs(30));
    wait_until(SOON, "SQL through the restarted relay-outer", || {
        sql(lport, "SELECT 4").as_deref() == Ok("4")
    });
    // The one still holding the old certificate is refused by the new trust.
    outer.wait_metric("routy_handshake_failures_total", &[], SOON, |v| v >= 1.0);
    assert_eq!(
        outer.metric("routy_sessions_up", &[("tunnel", "site-a")]),
        1.0,
        "only the relay-inner with the new certificate may have a session"
    );
}

// ---------------------------------------------------------------------------------------
// 5. A connection flood stops at max_connections.
// ---------------------------------------------------------------------------------------

#[test]
fn connection_flood_stops_at_the_limit() {
    let pg = Pg::start(PgOpts::default());
    let pki = Pki::new(&["localhost"]);
    pki.issue("site-a");
    let tport = free_port();
    let (flooded, l_port) = listener("flooded", "site-a", "pg", "    max_connections: 10\n");
    // The other listener uses its own service name (same database), so relay-inner's
    // per-service gauges tell the two apart.
    let (other, m_port) = listener("other", "site-a", "pg-other", "");
    let outer = Relay::outer(
        &outer_cfg(&pki, tport, &[flooded, other], free_port()),
        None,
    );
    let target = format!("127.0.0.1:{}", pg.port());
    let inner = Relay::inner(
        "relay-inner",
        &inner_cfg(
            &pki,
            "site-a",
            &[tport],
            &[("pg", target.clone()), ("pg-other", target)],
            free_port(),
        ),
        None,
    );
    // An existing stream on the other listener, running across the flood.
    let long = sql_thread(m_port, "SELECT pg_sleep(4); SELECT 'survived'");
    wait_until(SOON, "the long query runs", || {
        running(&pg, "SELECT pg_sleep(4)") == 1
    });

    // 200 connections to the flooded listener, held open.
    let addr = SocketAddr::from(([127, 0, 0, 1], l_port));
    let flood: Vec<TcpStream> = (0..200)
        .map(|i| {
            TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("flood connection {i}: {e}"))
        })
        .collect();
    let refused = outer.wait_metric(
        "routy_listener_refused_total",
        &[("listener", "flooded"), ("reason", "over_limit")],
        SOON,
        // the clients over the limit are refused
        |v| v >= 190.0,
    );
    assert_eq!(
        refused, 190.0,
        "exactly the connections over the limit are refused"
    );
    inner.wait_metric(
        "routy_streams_active",
        &[("service", "pg")],
        SOON,
        // the 10 admitted clients are spliced
        |v| v == 10.0,
    );
    // Clients see it: at most 10 connections stay open, the rest were closed at once.
    let mut open = 0;
    for s in &flood {
        s.set_nonblocking(true).expect("nonblocking");
        let mut b = [0u8; 16];
        match (&*s).read(&mut b) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => open += 1,
            _ => {} // EOF or reset: closed by relay-outer
        }
    }
    assert!(
        open <= 10,
        "{open} flood connections are still open (limit 10)"
    );
    assert!(200 - open >= 150, "only {} were closed", 200 - open);
    let (_, status) = get(&outer, "/status");
    assert!(
        status.contains("\"connections\":10,\"max_connections\":10"),
        "{status}"
    );

    // Meanwhile the other listener serves, and its running stream goes on.
    assert_eq!(sql(m_port, "SELECT 'other'").unwrap(), "other");
    assert_eq!(
        long.join()
            .unwrap()
            .map(|s| s.trim().to_string())
            .as_deref(),
        Ok("survived")
    );
    assert!(
        inner.metric("routy_streams_active", &[("service", "pg")]) <= 10.0,
        "more than 10 streams spliced for the flooded listener"
    );

    // The flood goes away; the flooded listener serves again.
    drop(flood);
    wait_until(
        Duration::from_secs(30),
        "the flooded listener works again",
        || sql(l_port, "SELECT 'back'").as_deref() == Ok("back"),
    );
    assert_no_tunnel_down(&[&outer, &inner]);
}

// ---------------------------------------------------------------------------------------
// 6. A tunnel identity serves only its own listeners.
// ---------------------------------------------------------------------------------------

#[test]
fn tunnel_identity_serves_only_its_listeners() {
    let pg = Pg::start(PgOpts::default());
    let pki = Pki::new(&["localhost"]);
    pki.issue("site-a");
    pki.issue("site-b");
    let tport = free_port();
    let (la, la_port) = listener("la", "site-a", "pg", "");
    let (lb, lb_port) = listener("lb", "site-b", "pg", "");
    let outer = Relay::outer(&outer_cfg(&pki, tport, &[la, lb], free_port()), None);
    // Only site-b's relay-inner runs, and it exposes a service named pg too.
    let inner_b = Relay::inner(
        "relay-inner-b",
        &inner_cfg(&pki, "site-b", &[tport], &pg_service(&pg), free_port()),
        None,
    );
    assert_eq!(sql(lb_port, "SELECT 'b'").unwrap(), "b");
    let b_streams = streams_opened(&inner_b);
    assert_eq!(b_streams, 1.0);

    // site-a's listener is refused: site-b's session never gets its clients.
    let err = sql(la_port, "SELECT 'a'").expect_err("no site-a session");
    eprintln!("la without site-a: {err}");
    outer
        .proc
        .wait_for_log("client refused: tunnel is down", SOON);
    assert_eq!(
        outer.metric(
            "routy_listener_refused_total",
            &[("listener", "la"), ("reason", "no_session")]
        ),
        // One per refusal logged (psql may try more than once).
        outer.count("client refused: tunnel is down") as f64
    );
    assert_eq!(
        streams_opened(&inner_b),
        b_streams,
        "site-b's relay-inner received a client of site-a's listener"
    );

    // site-a's relay-inner arrives: its listener works, through it.
    let inner_a = Relay::inner(
        "relay-inner-a",
        &inner_cfg(&pki, "site-a", &[tport], &pg_service(&pg), free_port()),
        None,
    );
    outer.wait_sessions_up(2, SOON);
    assert_eq!(sql(la_port, "SELECT 'a'").unwrap(), "a");
    assert_eq!(streams_opened(&inner_a), 1.0);
    assert_eq!(sql(lb_port, "SELECT 'b2'").unwrap(), "b2");
    assert_eq!(streams_opened(&inner_a), 1.0, "lb's client went to site-a");
    assert_eq!(streams_opened(&inner_b), b_streams + 1.0);
}

// ---------------------------------------------------------------------------------------
// 7. systemd notifications: readiness, watchdog, reload, stop.
// ---------------------------------------------------------------------------------------

/// A notify socket like systemd's, at a path in a temp dir.
struct NotifySocket {
    sock: UnixDatagram,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn new() -> NotifySocket {
        let dir = routy_e2e::tempdir();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("read timeout");
        NotifySocket {
            sock,
            path,
            _dir: dir,
        }
    }

    /// Notices received within `wait`.
    fn collect(&self, wait: Duration) -> Vec<String> {
        let start = Instant::now();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while start.elapsed() < wait {
            if let Ok(n) = self.sock.recv(&mut buf) {
                seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        seen
    }

    /// Notices up to and including the first equal to `want`; panics after `wait`.
    fn until(&self, want: &str, wait: Duration, who: &Proc) -> Vec<String> {
        let start = Instant::now();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while start.elapsed() < wait {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let notice = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = notice == want;
                seen.push(notice);
                if done {
                    return seen;
                }
            }
        }
        panic!(
            "{}: no {want:?} within {wait:?}; got {seen:?}\nlog:\n{}",
            who.name(),
            who.log()
        );
    }
}

/// Starts `which run --config FILE` with `yaml`, the notify socket and a 400 ms watchdog.
fn start_notified(which: &str, yaml: &str, dir: &Path, notify: &NotifySocket) -> Proc {
    let config = dir.join(format!("{which}.yaml"));
    std::fs::write(&config, yaml).expect("write config");
    let mut cmd = Command::new(bin(which));
    cmd.arg("run")
        .arg("--config")
        .arg(&config)
        .args(["--log-level", "info,relay_outer=debug,relay_inner=debug"])
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", "400000")
        .env_remove("WATCHDOG_PID");
    Proc::spawn(which, cmd)
}

/// After READY=1: watchdog pings, RELOADING=1 then READY=1 on SIGHUP, STOPPING=1 and
/// exit 0 on SIGTERM.
fn check_notifications(p: &mut Proc, notify: &NotifySocket) {
    // WATCHDOG_USEC=400000: a ping every 200 ms.
    let pings = notify
        .collect(Duration::from_secs(2))
        .iter()
        .filter(|n| *n == "WATCHDOG=1")
        .count();
    assert!(
        pings >= 3,
        "{}: only {pings} watchdog pings in 2 s",
        p.name()
    );
    p.signal(libc::SIGHUP);
    let seen = notify.until("READY=1", SOON, p);
    assert!(
        seen.iter().any(|n| n == "RELOADING=1"),
        "{}: no RELOADING=1 before READY=1 on SIGHUP: {seen:?}",
        p.name()
    );
    p.wait_for_log("configuration reloaded", SOON);
    p.term();
    notify.until("STOPPING=1", SOON, p);
    let status = p.wait_exit(SOON).expect("exits after SIGTERM");
    assert!(status.success(), "{}: {status:?}\n{}", p.name(), p.log());
}

#[test]
fn systemd_notifications() {
    let pki = Pki::new(&["localhost"]);
    pki.issue("site-a");
    let dir = routy_e2e::tempdir();
    let (tport, outer_admin, inner_admin) = (free_port(), free_port(), free_port());
    let (l, lport) = listener("pg", "site-a", "pg", "");
    let outer_notify = NotifySocket::new();
    let mut outer = start_notified(
        "relay-outer",
        &outer_cfg(&pki, tport, &[l], outer_admin),
        dir.path(),
        &outer_notify,
    );
    outer_notify.until("READY=1", READY, &outer);
    // Ready means ready: the listener and the admin endpoint answer at once.
    TcpStream::connect(("127.0.0.1", lport)).expect("listener bound at READY=1");
    assert_eq!(
        try_http_get(outer_admin, "/readyz").map(|r| r.0),
        Ok(200),
        "relay-outer /readyz at READY=1"
    );

    // relay-inner, connected to it (the service behind it is not needed here).
    let inner_notify = NotifySocket::new();
    let mut inner = start_notified(
        "relay-inner",
        &inner_cfg(
            &pki,
            "site-a",
            &[tport],
            &[("pg", format!("127.0.0.1:{}", free_port()))],
            inner_admin,
        ),
        dir.path(),
        &inner_notify,
    );
    inner_notify.until("READY=1", READY, &inner);
    assert_eq!(
        try_http_get(inner_admin, "/healthz").map(|r| r.0),
        Ok(200),
        "relay-inner /healthz at READY=1"
    );
    inner.wait_for_log("tunnel up", READY);
    check_notifications(&mut inner, &inner_notify);
    check_notifications(&mut outer, &outer_notify);
}

// ---------------------------------------------------------------------------------------
// 8. Two relay-outer endpoints, one killed.
// ---------------------------------------------------------------------------------------

#[test]
fn two_outer_endpoints_one_killed() {
    let pg = Pg::start(PgOpts::default());
    let pki = Pki::new(&["localhost"]);
    pki.issue("site-a");
    let (t1, t2) = (free_port(), free_port());
    let (l1, p1) = listener("pg", "site-a", "pg", "");
    let (l2, p2) = listener("pg", "site-a", "pg", "");
    let mut outer1 = Relay::outer(&outer_cfg(&pki, t1, &[l1], free_port()), None);
    let outer2 = Relay::outer(&outer_cfg(&pki, t2, &[l2], free_port()), None);
    let inner = Relay::inner(
        "relay-inner",
        &inner_cfg(&pki, "site-a", &[t1, t2], &pg_service(&pg), free_port()),
        None,
    );
    let (ep1, ep2) = (format!("127.0.0.1:{t1}"), format!("127.0.0.1:{t2}"));
    inner.wait_sessions_up(2, SOON);
    wait_until(SOON, "relay-inner /readyz is 200 with both up", || {
        get(&inner, "/readyz").0 == 200
    });
    let (_, status) = get(&inner, "/status");
    assert_eq!(status.matches("\"up\":true").count(), 2, "{status}");
    assert!(status.contains(&ep1) && status.contains(&ep2), "{status}");
    assert_eq!(sql(p1, "SELECT 1").unwrap(), "1");
    assert_eq!(sql(p2, "SELECT 2").unwrap(), "2");

    // A query through the survivor spans the kill.
    let held = sql_thread(p2, "SELECT pg_sleep(3); SELECT 'held'");
    wait_until(SOON, "the held query runs", || {
        running(&pg, "SELECT pg_sleep(3)") == 1
    });
    outer1.proc.kill9();

    let mut last = (0, String::new());
    let res = try_wait_until(SOON, "relay-inner /readyz turns 503", || {
        last = get(&inner, "/readyz");
        last.0 == 503
    });
    if let Err(e) = res {
        panic!("{e}; last answer {last:?}");
    }
    assert!(
        last.1.contains(&ep1) && !last.1.contains(&ep2),
        "/readyz must name the dead endpoint only: {last:?}"
    );
    let metrics = scrape(&inner);
    assert_eq!(
        metric(&metrics, "routy_sessions_up", &[("outer", &ep1)]),
        0.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "routy_sessions_up", &[("outer", &ep2)]),
        1.0,
        "{metrics}"
    );
    let (_, status) = get(&inner, "/status");
    assert_eq!(status.matches("\"up\":true").count(), 1, "{status}");
    assert_eq!(status.matches("\"up\":false").count(), 1, "{status}");

    // The survivor keeps serving.
    assert_eq!(
        held.join()
            .unwrap()
            .map(|s| s.trim().to_string())
            .as_deref(),
        Ok("held")
    );
    for i in 0..3 {
        assert_eq!(sql(p2, &format!("SELECT {i}")).unwrap(), i.to_string());
    }
    assert_eq!(outer2.sessions_down(None), 0);
    assert!(
        sql(p1, "SELECT 1").is_err(),
        "the killed relay-outer answered"
    );
}

/// relay-inner's reload adds and removes relay-outer endpoints and replaces its service
/// table; the session that stays is not touched.
#[test]
fn relay_inner_reload_changes_endpoints_and_services() {
    let pg = Pg::start(PgOpts::default());
    let pki = Pki::new(&["localhost"]);
    pki.issue("site-a");
    let (t1, t2) = (free_port(), free_port());
    let (l1, p1) = listener("pg", "site-a", "pg", "");
    let (l2, p2) = listener("pg", "site-a", "pg", "");
    let outer1 = Relay::outer(&outer_cfg(&pki, t1, &[l1], free_port()), None);
    let outer2 = Relay::outer(&outer_cfg(&pki, t2, &[l2], free_port()), None);
    let admin = free_port();
    let mut inner = Relay::inner(
        "relay-inner",
        &inner_cfg(&pki, "site-a", &[t1], &pg_service(&pg), admin),
        None,
    );
    assert_eq!(sql(p1, "SELECT 1").unwrap(), "1");
    // Not yet an endpoint of relay-inner: relay-outer 2 has no session.
    assert!(sql(p2, "SELECT 1").is_err());

    // Add endpoint 2 while a query runs through endpoint 1.
    let held = sql_thread(p1, "SELECT pg_sleep(2); SELECT 'held'");
    wait_until(SOON, "the held query runs", || {
        running(&pg, "SELECT pg_sleep(2)") == 1
    });
    reload(
        &mut inner,
        Some(&inner_cfg(
            &pki,
            "site-a",
            &[t1, t2],
            &pg_service(&pg),
            admin,
        )),
        "configuration reloaded",
    );
    outer2.wait_sessions_up(1, SOON);
    wait_until(SOON, "SQL through relay-outer 2", || {
        sql(p2, "SELECT 2").as_deref() == Ok("2")
    });
    assert_eq!(held.join().unwrap().unwrap().trim(), "held");
    assert_no_tunnel_down(&[&outer1]);

    // Remove endpoint 1 and rename the service: endpoint 1's session is closed, and the
    // old name is refused on endpoint 2 while the new one is served.
    let renamed = vec![("pg2", format!("127.0.0.1:{}", pg.port()))];
    reload(
        &mut inner,
        Some(&inner_cfg(&pki, "site-a", &[t2], &renamed, admin)),
        "configuration reloaded",
    );
    outer1.wait_sessions_down(1, SOON);
    assert!(sql(p1, "SELECT 1").is_err());
    assert!(
        sql(p2, "SELECT 1").is_err(),
        "service pg is gone from relay-inner"
    );
    inner.wait_metric(
        "routy_streams_failed_total",
        &[("reason", "unknown_service")],
        SOON,
        |v| v >= 1.0,
    );
    let (_, status) = get(&inner, "/status");
    assert!(
        status.contains("pg2") && !status.contains(&format!("127.0.0.1:{t1}")),
        "{status}"
    );
    assert_no_tunnel_down(&[&outer2]);
}

/// A reload that leaves a tunnel without listeners closes its sessions, and the relay-inner
/// that reconnects is refused with the reason.
#[test]
fn reload_closes_sessions_of_a_tunnel_no_listener_uses() {
    let pg = Pg::start(PgOpts::default());
    let pki = Pki::new(&["localhost"]);
    pki.issue("site-a");
    let tport = free_port();
    let admin = free_port();
    let (la, pa) = listener("a", "site-a", "pg", "");
    let mut outer = Relay::outer(&outer_cfg(&pki, tport, &[la], admin), None);
    let inner = Relay::inner(
        "relay-inner",
        &inner_cfg(&pki, "site-a", &[tport], &pg_service(&pg), free_port()),
        None,
    );
    assert_eq!(sql(pa, "SELECT 1").unwrap(), "1");
    let (lb, _) = listener("b", "site-b", "pg", "");
    reload(
        &mut outer,
        Some(&outer_cfg(&pki, tport, &[lb], admin)),
        "configuration reloaded",
    );
    outer.wait_sessions_down(1, SOON);
    inner.wait_sessions_down(1, SOON);
    inner.wait_metric(
        "routy_handshake_failures_total",
        &[("reason", "refused")],
        SOON,
        |v| v >= 1.0,
    );
    let st = inner.status();
    assert!(
        st["outer"][0]["last_error"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("not configured")),
        "relay-inner's /status should say why it is refused: {st}"
    );
    assert!(connection_refused(pa), "listener a was removed");
}
