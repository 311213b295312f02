//! End to end over the WebSocket transport, on loopback:
//!
//! 1. Three inner relays on one relay-outer tunnel port at once: raw TLS, a WebSocket
//!    under its own TLS (`wss://`, the default URL), and a plain `ws://` WebSocket (the
//!    tunnel's mutual TLS inside it either way). SQL goes through each; relay-outer's
//!    `/status` shows each session's transport.
//! 2. What is not a tunnel gets a clear answer: an HTTP request without the tunnel's
//!    subprotocol gets 400 saying why; a WebSocket whose inner TLS has no client
//!    certificate is refused at the TLS handshake; both are counted.
//! 3. Behind nginx terminating the client's TLS (`wss://` to nginx, plain WebSocket on
//!    to relay-outer): the tunnel's own mutual TLS inside still authenticates it.
//!
//! Through an HTTP CONNECT proxy, with CDC: `tests/proxy.rs`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use routy_e2e::relays::{inner_yaml, outer_yaml, ListenerSpec, Pki, Relay, READY};
use routy_e2e::{free_port, psql_at, Pg, PgOpts};

const KA: (&str, &str) = ("500ms", "5s");

/// relay-outer with one listener per tunnel (`site-a`, `site-b`, `site-c`), and the
/// listeners' ports.
fn outer(pki: &Pki, tunnel_port: u16) -> (Relay, Vec<u16>) {
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let listeners: Vec<ListenerSpec> = ["site-a", "site-b", "site-c"]
        .iter()
        .zip(&ports)
        .map(|(t, p)| ListenerSpec::new(&format!("pg-{t}"), &format!("127.0.0.1:{p}"), t, "pg"))
        .collect();
    let oy = outer_yaml(pki, &format!("127.0.0.1:{tunnel_port}"), KA, &listeners, "");
    (Relay::outer(&oy, None), ports)
}

fn inner(pki: &Pki, tunnel: &str, tunnel_port: u16, pg: &Pg, extra: &str, entry: &str) -> Relay {
    let y = inner_yaml(
        pki,
        tunnel,
        &[(format!("127.0.0.1:{tunnel_port}"), "localhost")],
        &[("pg", format!("127.0.0.1:{}", pg.port()))],
        KA,
        extra,
    );
    let y = y.replacen(
        "server_name: \"localhost\" }",
        &format!("server_name: \"localhost\"{entry} }}"),
        1,
    );
    Relay::inner(tunnel, &y, None)
}

#[test]
fn raw_tls_and_websocket_inner_relays_share_one_tunnel_port() {
    let pg = Pg::start(PgOpts::default());
    pg.psql("CREATE TABLE w (id int PRIMARY KEY, v text); INSERT INTO w VALUES (1, 'one');");
    let pki = Pki::new(&["localhost", "127.0.0.1"]);
    for t in ["site-a", "site-b", "site-c"] {
        pki.issue(t);
    }
    let tunnel_port = free_port();
    let (outer, ports) = outer(&pki, tunnel_port);
    let _a = inner(&pki, "site-a", tunnel_port, &pg, "", "");
    let b = inner(
        &pki,
        "site-b",
        tunnel_port,
        &pg,
        "transport: websocket\n",
        "",
    );
    let _c = inner(
        &pki,
        "site-c",
        tunnel_port,
        &pg,
        "transport: websocket\n",
        &format!(", websocket_url: \"ws://127.0.0.1:{tunnel_port}/tunnels/c\""),
    );
    outer.wait_count("tunnel up", 3, READY);
    for port in &ports {
        assert_eq!(
            psql_at("127.0.0.1", *port, "SELECT v FROM w WHERE id = 1").unwrap(),
            "one",
            "SQL through the listener on {port}"
        );
    }
    let st = outer.status();
    let mut transports: Vec<(String, String)> = st["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["tunnel"].as_str().unwrap().to_string(),
                s["transport"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    transports.sort();
    assert_eq!(
        transports,
        [
            ("site-a".to_string(), "tls".to_string()),
            ("site-b".to_string(), "websocket".to_string()),
            ("site-c".to_string(), "websocket".to_string()),
        ]
    );
    let ep = &b.status()["outer"][0];
    assert_eq!(ep["session"]["transport"], "websocket", "{ep}");
    // A bulk copy both ways through a WebSocket session.
    pg.psql("CREATE TABLE big AS SELECT g AS id, repeat(md5(g::text), 8) AS pad FROM generate_series(1, 20000) g");
    let sum = |port: u16| {
        psql_at(
            "127.0.0.1",
            port,
            "SELECT md5(string_agg(pad, '' ORDER BY id)) FROM big",
        )
        .unwrap()
    };
    assert_eq!(sum(ports[1]), sum(ports[0]));
    assert_eq!(sum(ports[2]), sum(ports[0]));
}

#[test]
fn what_is_not_a_websocket_tunnel_is_refused_with_why() {
    let pki = Pki::new(&["localhost", "127.0.0.1"]);
    pki.issue("site-a");
    let tunnel_port = free_port();
    let (outer, _) = outer(&pki, tunnel_port);

    // An HTTP request that is not the tunnel's upgrade.
    let mut t = TcpStream::connect(("127.0.0.1", tunnel_port)).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    t.write_all(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .unwrap();
    let mut answer = String::new();
    let _ = t.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.contains("subprotocol routy-tunnel-1 required"),
        "{answer}"
    );
    outer.wait_metric(
        "routy_handshake_failures_total",
        &[("reason", "websocket")],
        Duration::from_secs(10),
        |v| v >= 1.0,
    );
    outer
        .proc
        .wait_for_log("WebSocket upgrade failed", Duration::from_secs(10));

    // A plain GET for a page: not an upgrade either.
    let mut t = TcpStream::connect(("127.0.0.1", tunnel_port)).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    t.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = t.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    // A WebSocket tunnel whose relay-inner has no certificate of this CA: the inner
    // TLS refuses it.
    let other = Pki::new(&["localhost"]);
    other.issue("site-a");
    let pg = Pg::start(PgOpts::default());
    let y = inner_yaml(
        &other,
        "site-a",
        &[(format!("127.0.0.1:{tunnel_port}"), "localhost")],
        &[("pg", format!("127.0.0.1:{}", pg.port()))],
        KA,
        "transport: websocket\n",
    );
    // It trusts relay-outer's CA (for the wss:// layer and the tunnel's TLS), but its own
    // certificate is of another CA.
    let y = y.replace(
        &other.path("ca.crt").display().to_string(),
        &pki.path("ca.crt").display().to_string(),
    );
    let stranger = Relay::start("relay-inner", "stranger", &y, None);
    outer.wait_metric(
        "routy_handshake_failures_total",
        &[("reason", "tls")],
        Duration::from_secs(20),
        |v| v >= 1.0,
    );
    stranger.proc.wait_for_log(
        "relay-outer rejected the TLS session",
        Duration::from_secs(20),
    );
    assert_eq!(outer.sessions_up(), 0);
}

#[test]
fn behind_a_tls_terminating_reverse_proxy_the_tunnels_own_mtls_still_decides() {
    let nginx = ["/usr/sbin/nginx", "/sbin/nginx"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("nginx is missing: run tests/install-deps");
    let pg = Pg::start(PgOpts::default());
    pg.psql("CREATE TABLE w (id int PRIMARY KEY, v text); INSERT INTO w VALUES (1, 'via nginx');");
    let pki = Pki::new(&["localhost", "127.0.0.1"]);
    pki.issue("site-a");
    let tunnel_port = free_port();
    let (outer, ports) = outer(&pki, tunnel_port);
    // nginx terminates the client's TLS with its own certificate (here one of the same
    // CA, for the name localhost) and passes the upgrade on to relay-outer as plain
    // HTTP: relay-outer sees a ws:// WebSocket, with the tunnel's TLS inside.
    let dir = routy_e2e::tempdir();
    let lb_port = free_port();
    let d = dir.path().display();
    let conf = dir.path().join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nmaster_process off;\nerror_log stderr info;\npid {d}/nginx.pid;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n access_log {d}/access.log;\n client_body_temp_path {d}/body;\n\
             proxy_temp_path {d}/proxy;\n fastcgi_temp_path {d}/fastcgi;\n uwsgi_temp_path {d}/uwsgi;\n\
             scgi_temp_path {d}/scgi;\n\
             server {{\n  listen 127.0.0.1:{lb_port} ssl;\n  ssl_certificate {};\n  ssl_certificate_key {};\n\
             location /routy {{\n   proxy_pass http://127.0.0.1:{tunnel_port};\n   proxy_http_version 1.1;\n\
             proxy_set_header Upgrade $http_upgrade;\n   proxy_set_header Connection \"upgrade\";\n\
             proxy_read_timeout 1h;\n   proxy_send_timeout 1h;\n  }}\n }}\n}}\n",
            pki.path("outer.crt").display(),
            pki.path("outer.key").display(),
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(nginx);
    cmd.arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(dir.path())
        .args(["-e", "stderr"]);
    let _lb = routy_e2e::Proc::spawn("nginx", cmd);
    routy_e2e::try_wait_until(Duration::from_secs(20), "nginx listens", || {
        TcpStream::connect(("127.0.0.1", lb_port)).is_ok()
    })
    .unwrap();
    let inner = inner(
        &pki,
        "site-a",
        tunnel_port,
        &pg,
        "transport: websocket\n",
        &format!(", websocket_url: \"wss://localhost:{lb_port}/routy\""),
    );
    outer.wait_count("tunnel up", 1, READY);
    assert_eq!(
        psql_at("127.0.0.1", ports[0], "SELECT v FROM w").unwrap(),
        "via nginx"
    );
    let st = outer.status();
    assert_eq!(st["sessions"][0]["tunnel"], "site-a", "{st}");
    assert_eq!(st["sessions"][0]["transport"], "websocket", "{st}");
    // nginx logs the upgraded request when it ends.
    drop(inner);
    let log = dir.path().join("access.log");
    routy_e2e::try_wait_until(Duration::from_secs(20), "nginx logged the upgrade", || {
        std::fs::read_to_string(&log).is_ok_and(|a| a.contains("\"GET /routy HTTP/1.1\" 101"))
    })
    .unwrap();
}
