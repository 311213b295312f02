//! The admin endpoint's safety with the real binaries: bearer tokens with read and admin
//! roles (no token 401, a read token 403 on an action, an admin token 200, the audit line
//! with the token's name), `/healthz`, `/readyz` and the console's page open, `/metrics`
//! opened by `public_metrics` through a reload, a non-loopback address refused without
//! tokens; HTTPS with client certificates; and the drain action handing a live session
//! over to a new one while a client's query runs on.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use routy_e2e::relays::{
    admin_request, check_config, outer_yaml, ListenerSpec, Pki, Relay, Tunnel,
};
use routy_e2e::{free_port, try_wait_until};

const KA: (&str, &str) = ("500ms", "3s");
const SOON: Duration = Duration::from_secs(30);
const READ: &str = "read-token-for-the-test-000001";
const ADMIN: &str = "admin-token-for-the-test-00002";

/// Token files for a `viewer` (read) and an `ops` (admin) token in `dir`; the `tokens:`
/// flow list naming them.
fn tokens(dir: &Path) -> String {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(dir.join("read.token"), format!("{READ}\n")).unwrap();
    std::fs::write(dir.join("admin.token"), ADMIN).unwrap();
    for f in ["read.token", "admin.token"] {
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    format!(
        "[ {{ name: viewer, token_file: {}, role: read }}, {{ name: ops, token_file: {}, role: admin }} ]",
        dir.join("read.token").display(),
        dir.join("admin.token").display()
    )
}

fn outer_with_admin(pki: &Pki, admin: &str) -> String {
    let l = ListenerSpec::new("pg", &format!("127.0.0.1:{}", free_port()), "site-a", "pg");
    outer_yaml(
        pki,
        &format!("127.0.0.1:{}", free_port()),
        KA,
        &[l],
        &format!("shutdown_grace: 2s\nadmin: {admin}\n"),
    )
}

/// relay-outer with its admin endpoint on HTTPS (the PKI's `outer.crt`), the tokens of
/// [`tokens`], and with `client_ca` client certificates of the PKI's CA required; started,
/// with the endpoint's port.
fn outer_over_https(pki: &Pki, client_ca: bool) -> (Relay, u16) {
    let port = free_port();
    let ca = if client_ca {
        format!(", client_ca: {}", pki.path("ca.crt").display())
    } else {
        String::new()
    };
    let admin = format!(
        "{{ listen: \"127.0.0.1:{port}\", tokens: {}, tls: {{ cert: {}, key: {}{ca} }} }}",
        tokens(pki.dir()),
        pki.path("outer.crt").display(),
        pki.path("outer.key").display(),
    );
    let outer = Relay::outer(&outer_with_admin(pki, &admin), None);
    outer
        .proc
        .wait_for_log("console at https://127.0.0.1", SOON);
    (outer, port)
}

#[test]
fn tokens_roles_audit_and_an_open_metrics_page_by_reload() {
    let pki = Pki::new(&["localhost", "127.0.0.1"]);
    let port = free_port();
    let admin = format!(
        "{{ listen: \"127.0.0.1:{port}\", tokens: {} }}",
        tokens(pki.dir())
    );
    let outer = Relay::outer(&outer_with_admin(&pki, &admin), None);
    let call = |method: &str, path: &str, token: Option<&str>| {
        admin_request(port, method, path, token).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    };
    // Open: probes and the console's page (no data in it).
    assert_eq!(call("GET", "/healthz", None).0, 200);
    assert_eq!(call("GET", "/readyz", None).0, 200);
    let (status, page) = call("GET", "/", None);
    assert_eq!(status, 200);
    assert!(
        page.contains("<html") || page.contains("<!doctype"),
        "{page}"
    );
    // Data needs a token; a wrong one is no better than none.
    for path in ["/status", "/metrics", "/v1/history", "/v1/sinks"] {
        let (status, body) = call("GET", path, None);
        assert_eq!(status, 401, "{path}: {body}");
        assert!(body.contains("Bearer"), "{body}");
        assert_eq!(call("GET", path, Some("not-a-token-at-all-0000")).0, 401);
    }
    let (status, body) = call("GET", "/status", Some(READ));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"role\":\"relay-outer\""), "{body}");
    assert_eq!(call("GET", "/metrics", Some(READ)).0, 200);
    // Actions: none 401, read 403, admin 200; never on GET.
    assert_eq!(call("POST", "/v1/reload", None).0, 401);
    let (status, body) = call("POST", "/v1/reload", Some(READ));
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("viewer may only read"), "{body}");
    let (status, body) = call("POST", "/v1/reload", Some(ADMIN));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("reloaded"), "{body}");
    assert_eq!(call("GET", "/v1/reload", Some(ADMIN)).0, 405);
    // The audit lines: who, what, and the answer.
    let log = outer.proc.log();
    let audit: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("audit: admin action"))
        .collect();
    assert!(
        audit.iter().any(|l| l.contains("token=ops")
            && l.contains("path=/v1/reload")
            && l.contains("status=200")
            && l.contains("role=admin")),
        "{audit:#?}"
    );
    assert!(
        audit
            .iter()
            .any(|l| l.contains("token=viewer") && l.contains("status=403")),
        "{audit:#?}"
    );
    assert!(
        audit
            .iter()
            .any(|l| l.contains("token=-") && l.contains("status=401")),
        "{audit:#?}"
    );
    // Reads are not audited.
    assert!(!audit.iter().any(|l| l.contains("/status")), "{audit:#?}");

    // `public_metrics` by a reload (through the endpoint): Prometheus needs no token,
    // everything else still does.
    let y = std::fs::read_to_string(&outer.config).unwrap();
    std::fs::write(
        &outer.config,
        y.replace("tokens: [", "public_metrics: true, tokens: ["),
    )
    .unwrap();
    let (status, body) = call("POST", "/v1/reload", Some(ADMIN));
    assert_eq!(status, 200, "{body}");
    assert_eq!(call("GET", "/metrics", None).0, 200);
    assert_eq!(call("GET", "/status", None).0, 401);
    // A reload that breaks the config is refused whole, with the reason.
    std::fs::write(pki.dir().join("read.token"), "short").unwrap();
    let (status, body) = call("POST", "/v1/reload", Some(ADMIN));
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("admin.tokens[0].token_file"), "{body}");
    assert_eq!(call("GET", "/status", Some(READ)).0, 200, "old tokens kept");
}

#[test]
fn a_reachable_endpoint_without_tokens_is_a_config_error() {
    let pki = Pki::new(&["localhost"]);
    let y = outer_with_admin(&pki, &format!("{{ listen: \"0.0.0.0:{}\" }}", free_port()));
    let (ok, out) = check_config("relay-outer", &y);
    assert!(!ok, "{out}");
    assert!(
        out.contains("is reachable from other machines: set admin.tokens"),
        "{out}"
    );
    let bad_role = outer_with_admin(
        &pki,
        &format!(
            "{{ listen: \"127.0.0.1:{}\", tokens: [ {{ name: a, token_file: x, role: root }} ] }}",
            free_port()
        ),
    );
    let (ok, out) = check_config("relay-outer", &bad_role);
    assert!(!ok && out.contains("root"), "{out}");
}

/// A TLS client of the admin endpoint, with `client` (certificate, key) when given.
fn tls_get(
    port: u16,
    pki: &Pki,
    client: Option<(&str, &str)>,
    path: &str,
    token: &str,
) -> Result<String, String> {
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for c in routy_tunnel::tls::load_certs(&pki.path("ca.crt")).unwrap() {
        roots.add(c).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let cfg = match client {
        None => b.with_no_client_auth(),
        Some((cert, key)) => b
            .with_client_auth_cert(
                routy_tunnel::tls::load_certs(&pki.path(cert)).unwrap(),
                routy_tunnel::tls::load_key(&pki.path(key)).unwrap(),
            )
            .unwrap(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        let mut s = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        s.write_all(
            format!(
                "GET {path} HTTP/1.0\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .map_err(|e| format!("write: {e}"))?;
        let mut out = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        match r {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if out.is_empty() => return Err(format!("read: {e}")),
            Ok(Err(_)) => {}
            Err(_) => return Err("timed out".into()),
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    })
}

#[test]
fn https_with_client_certificates() {
    let pki = Pki::new(&["localhost", "127.0.0.1"]);
    pki.issue("site-a");
    let (_outer, port) = outer_over_https(&pki, true);
    let ok = tls_get(
        port,
        &pki,
        Some(("site-a.crt", "site-a.key")),
        "/status",
        READ,
    )
    .unwrap();
    assert!(ok.starts_with("HTTP/1.0 200"), "{ok}");
    let no_token = tls_get(
        port,
        &pki,
        Some(("site-a.crt", "site-a.key")),
        "/status",
        "x",
    )
    .unwrap();
    assert!(no_token.starts_with("HTTP/1.0 401"), "{no_token}");
    // Without a client certificate the handshake (or the first read) fails: no answer.
    match tls_get(port, &pki, None, "/status", READ) {
        Ok(text) => assert!(!text.contains("HTTP/1."), "{text}"),
        Err(e) => assert!(!e.is_empty()),
    }
    // Plain HTTP on the HTTPS port gets nothing either.
    assert!(admin_request(port, "GET", "/healthz", None).map_or(true, |(s, _)| s != 200));
    // The certificate's expiry is watched like the tunnel's.
    let metrics = tls_get(
        port,
        &pki,
        Some(("site-a.crt", "site-a.key")),
        "/metrics",
        READ,
    )
    .unwrap();
    assert!(
        metrics.contains("routy_certificate_expiry_timestamp_seconds{key=\"admin.tls.cert\""),
        "{metrics}"
    );
}

#[test]
fn drain_hands_the_session_over_and_the_running_query_finishes() {
    let t = Tunnel::start(KA, "");
    assert_eq!(t.sql("SELECT 1").unwrap(), "1");
    let old: u64 = t.outer.status()["sessions"][0]["id"].as_u64().unwrap();
    // A client receiving rows for a few seconds: /status gives the session's own bytes/s
    // (sampled every 5 s), beside its tunnel's.
    let port = t.listen_port;
    let rows = std::thread::spawn(move || {
        routy_e2e::psql_at(
            "127.0.0.1",
            port,
            "SELECT pg_sleep(0.01), repeat('x', 4000) FROM generate_series(1, 900)",
        )
    });
    let seen = try_wait_until(Duration::from_secs(20), "the session's bytes/s", || {
        let s = &t.outer.status()["sessions"][0];
        s["bytes_per_second"].as_f64().is_some_and(|b| b > 0.0)
            && s["tunnel_bytes_per_second"]
                .as_f64()
                .is_some_and(|b| b > 0.0)
    });
    assert!(rows.join().unwrap().is_ok());
    seen.unwrap();
    // A client in the middle of a query through the tunnel.
    let port = t.listen_port;
    let running =
        std::thread::spawn(move || routy_e2e::psql_at("127.0.0.1", port, "SELECT pg_sleep(2), 7"));
    std::thread::sleep(Duration::from_millis(500));
    let admin = t.outer.admin_port.unwrap();
    let (status, body) =
        admin_request(admin, "POST", &format!("/v1/sessions/{old}/drain"), None).unwrap();
    assert_eq!(status, 202, "{body}");
    assert!(body.contains("\"draining\":true"), "{body}");
    let (status, body) =
        admin_request(admin, "POST", &format!("/v1/sessions/{old}/drain"), None).unwrap();
    assert_eq!(status, 409, "{body}");
    assert_eq!(
        admin_request(admin, "POST", "/v1/sessions/999999/drain", None)
            .unwrap()
            .0,
        404
    );
    assert_eq!(
        admin_request(admin, "POST", "/v1/sessions/abc/drain", None)
            .unwrap()
            .0,
        400
    );
    // relay-inner dials a new session at once; new clients go there.
    t.inner
        .wait_count("a new session took over from the drained one", 1, SOON);
    let deadline = Instant::now() + SOON;
    loop {
        let s = t.outer.status();
        let ids: Vec<u64> = s["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| s["id"].as_u64())
            .collect();
        if ids.len() == 1 && ids[0] != old {
            break;
        }
        assert!(Instant::now() < deadline, "sessions: {ids:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(t.sql("SELECT 2").unwrap(), "2");
    // The query that was running when the drain began finished on the old session.
    let out = running.join().unwrap().expect("the running query");
    assert!(out.ends_with("|7"), "{out}");
    assert!(
        t.outer
            .proc
            .log()
            .contains("draining the session: GoAway sent"),
        "outer log"
    );
}

/// The commands' client (`relay-outer cdc ...`, `relay-inner cdc resync`): the
/// configuration's admin token, and over HTTPS exactly the configured certificate.
#[test]
fn the_commands_client_sends_the_token_and_pins_the_certificate() {
    let pki = Pki::new(&["localhost", "127.0.0.1"]);
    let (outer, port) = outer_over_https(&pki, false);
    use routy_ops::admin::{AdminSpec, Role, TlsSpec, TokenSpec};
    let spec = AdminSpec {
        listen: Some(format!("127.0.0.1:{port}")),
        tokens: vec![TokenSpec {
            name: "ops".into(),
            token_file: pki.path("admin.token"),
            role: Role::Admin,
        }],
        public_metrics: false,
        tls: Some(TlsSpec {
            cert: pki.path("outer.crt"),
            key: pki.path("outer.key"),
            client_ca: None,
        }),
    };
    let settings =
        routy_ops::admin::AdminSettings::resolve(Some(&spec), "127.0.0.1:1", pki.dir()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (status, body) = rt
        .block_on(routy_ops::admin_client::request(
            &settings,
            "POST",
            "/v1/reload",
        ))
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        outer.proc.log().contains("token=ops"),
        "the admin token was sent"
    );
    // Another certificate in the file: the client refuses to talk.
    let other = Pki::new(&["localhost"]);
    let mut pinned_wrong = settings.clone();
    if let Some(t) = pinned_wrong.tls.as_mut() {
        t.cert = other.path("outer.crt");
    }
    let err = rt
        .block_on(routy_ops::admin_client::request(
            &pinned_wrong,
            "GET",
            "/status",
        ))
        .unwrap_err();
    assert!(err.contains("not the one in admin.tls.cert"), "{err}");
}
