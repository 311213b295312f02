//! End to end over the WebSocket transport, on loopback:
//!
//! 1. Three inner relays on one relay-outer tunnel port at once: raw TLS, a WebSocket
//!    under its own TLS (`wss://`, the default URL), and a plain `ws://` WebSocket (the
//!    tunnel's mutual TLS inside it either way). SQL goes through each; relay-outer's
//!    `/status` shows each session's transport.
//! 2. What is not a tunnel gets a clear answer: an HTTP request without the tunnel's
//!    subprotocol gets 400 saying why; a WebSocket whose inner TLS has no client
//!    certificate is refused at the TLS handshake; both are counted.
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
