//! Writes the hand-made part of the seed corpus (`fuzz/corpus/TARGET/seed-*`): real
//! protocol values encoded by our own encoders, the request and answer of a real
//! WebSocket upgrade made by tungstenite, segment files written by the real segment log,
//! the deployed configuration files, and proxy answers as tinyproxy and squid send them.
//! The PostgreSQL part (pgoutput messages, COPY lines) comes from `fuzz/seeds-postgres`.
//!
//! Ignored by default; run it with
//! `cargo test --manifest-path fuzz/Cargo.toml --test seeds -- --ignored`, then minimise
//! with `fuzz/run --merge` (see fuzz/README.md).

use std::path::{Path, PathBuf};

use relay_proto::cdc::{Column, Event, OldRow, Record, Relation, ShipMessage, Value};
use relay_proto::frame::{ErrorCode, Frame, Hello, HelloAck};

fn corpus(target: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn seed(target: &str, name: &str, bytes: &[u8]) {
    std::fs::write(corpus(target).join(format!("seed-{name}")), bytes).unwrap();
}

fn frame(f: &Frame) -> Vec<u8> {
    let mut out = Vec::new();
    f.encode(&mut out).unwrap();
    out
}

fn hello() -> Hello {
    Hello {
        protocol: 1,
        node: "db-host-1".into(),
        services: vec!["pg".into(), "pg-replica".into()],
        features: vec!["cdc".into()],
    }
}

fn frames() -> Vec<(&'static str, Frame)> {
    vec![
        ("hello", Frame::Hello(hello())),
        (
            "hello-ack",
            Frame::HelloAck(HelloAck {
                protocol: 1,
                tunnel: "site-a".into(),
                session_id: 7,
            }),
        ),
        (
            "error",
            Frame::Error {
                code: ErrorCode::VersionMismatch,
                message: "relay-outer speaks protocol version 1, relay-inner sent 2".into(),
            },
        ),
        (
            "error-other",
            Frame::Error {
                code: ErrorCode::Other(999),
                message: String::new(),
            },
        ),
        (
            "ping",
            Frame::Ping {
                seq: 3,
                micros: 1_733_280_000_000_000,
            },
        ),
        (
            "pong",
            Frame::Pong {
                seq: 3,
                micros: 1_733_280_000_000_000,
            },
        ),
        (
            "open",
            Frame::Open {
                service: "pg".into(),
                client: "203.0.113.9:51234".into(),
            },
        ),
        ("open-ok", Frame::OpenOk),
        (
            "go-away",
            Frame::GoAway {
                reason: "shutting down".into(),
            },
        ),
        (
            "cdc-open",
            Frame::CdcOpen {
                source: "orders".into(),
                first_seq: 1,
                last_seq: 120,
                spool_id: 0x5eed,
            },
        ),
        ("cdc-ready", Frame::CdcReady { next_seq: 121 }),
    ]
}

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

fn relation() -> Relation {
    let col = |name: &str, type_oid, type_name: &str, key, attnum| Column {
        name: name.into(),
        type_oid,
        type_modifier: -1,
        type_name: type_name.into(),
        key,
        attnum,
    };
    Relation {
        id: 16_385,
        schema: "public".into(),
        name: "orders".into(),
        replica_identity: b'd',
        columns: vec![
            col("id", 20, "bigint", true, 1),
            col("note", 25, "text", false, 2),
            col("doc", 3802, "jsonb", false, 3),
        ],
    }
}

/// A transaction as the source stream turns one into records, and a snapshot's rows.
fn records() -> Vec<(&'static str, Record)> {
    let begin = Event::Begin {
        xid: 741,
        commit_lsn: 0x16_B374_D848,
        commit_time: 786_000_000_123_456,
    };
    let commit = Event::Commit {
        commit_lsn: 0x16_B374_D848,
        end_lsn: 0x16_B374_D878,
        commit_time: 786_000_000_123_456,
    };
    let txn = Record {
        lsn: 0x16_B374_D878,
        events: vec![
            Event::Relation(relation()),
            begin.clone(),
            Event::Insert {
                rel: 16_385,
                new: vec![text("1"), text("tab\there, line\nthere"), Value::Null],
            },
            Event::Update {
                rel: 16_385,
                old: Some(OldRow {
                    key_only: true,
                    values: vec![text("1"), Value::Null, Value::Null],
                }),
                new: vec![text("1"), text("é ✓"), Value::Unchanged],
            },
            Event::Delete {
                rel: 16_385,
                old: OldRow {
                    key_only: true,
                    values: vec![text("1"), Value::Null, Value::Null],
                },
            },
            Event::Truncate {
                rels: vec![16_385],
                cascade: true,
                restart_identity: false,
            },
            Event::Message {
                transactional: true,
                lsn: 0x16_B374_D860,
                prefix: "app".into(),
                content: b"{\"hello\":1}".to_vec(),
            },
            commit.clone(),
        ],
    };
    let heartbeat = Record {
        lsn: 0,
        events: vec![Event::Message {
            transactional: false,
            lsn: 0x16_B374_D900,
            prefix: relay_proto::cdc::HEARTBEAT_PREFIX.into(),
            content: b"1733280000".to_vec(),
        }],
    };
    let snapshot = Record {
        lsn: 0,
        events: vec![
            Event::Relation(relation()),
            Event::Snapshot {
                rel: 16_385,
                phase: relay_proto::cdc::SnapshotPhase::Start,
                value: 0x16_B374_0000,
            },
            Event::Rows {
                rel: 16_385,
                rows: 3,
                data: b"1\tfirst\t{\"a\": 1}\n2\t\\N\t\\N\n3\tback\\\\slash\\ttab\t[]\n".to_vec(),
            },
            Event::Chunk {
                rel: 16_385,
                lo: Some(vec![text("1")]),
                hi: None,
                keys: vec![vec![text("1")], vec![text("2")]],
            },
            Event::Snapshot {
                rel: 16_385,
                phase: relay_proto::cdc::SnapshotPhase::Done,
                value: 3,
            },
        ],
    };
    vec![
        ("transaction", txn),
        ("heartbeat", heartbeat),
        ("snapshot", snapshot),
        ("empty", Record::default()),
    ]
}

fn ship_messages() -> Vec<(&'static str, ShipMessage)> {
    vec![
        (
            "batch",
            ShipMessage::Batch {
                first_seq: 41,
                records: records().iter().map(|(_, r)| r.encode()).collect(),
            },
        ),
        ("ack", ShipMessage::Ack { seq: 44 }),
        (
            "error",
            ShipMessage::Error {
                message: "a newer stream for site-a/orders replaced this one".into(),
            },
        ),
    ]
}

#[test]
#[ignore = "writes the seed corpus into fuzz/corpus/"]
fn write_seeds() {
    for (name, f) in frames() {
        seed("frame", name, &frame(&f));
    }
    // The handshake target's first byte picks the side: even = relay-outer reading the
    // Hello, odd = relay-inner reading the answer.
    let mut server_side = vec![0];
    server_side.extend(frame(&Frame::Hello(hello())));
    seed("handshake", "hello", &server_side);
    for (name, f) in frames() {
        if matches!(f, Frame::HelloAck(_) | Frame::Error { .. }) {
            let mut client_side = vec![1];
            client_side.extend(frame(&f));
            seed("handshake", name, &client_side);
        }
    }
    for (name, r) in records() {
        seed("cdc_record", name, &r.encode());
    }
    let mut stream = Vec::new();
    for (name, m) in ship_messages() {
        let bytes = m.encode().unwrap();
        seed("ship_message", name, &bytes[4..]);
        stream.extend(bytes);
    }
    seed("ship_stream", "batch-ack-error", &stream);
    for (name, line) in [
        ("plain", &b"1\tfirst\t{\"a\": 1}"[..]),
        ("nulls", b"2\t\\N\t\\N"),
        (
            "escapes",
            b"3\tback\\\\slash\\ttab\\nnewline\\r\\b\\f\\v\\101\\x41\t[]",
        ),
    ] {
        seed("copy_line", name, line);
    }
    lsn_time();
    proxy();
    segments();
    websocket();
    configs();
}

fn lsn_time() {
    for (name, s) in [
        ("lsn", "16/B374D848"),
        ("lsn-max", "FFFFFFFF/FFFFFFFF"),
        ("time", "2024-12-04T02:30:00.123456Z"),
        ("time-offset", "2024-12-04 02:30:00+05:30"),
        ("time-utc", "2024-12-04 02:30:00"),
    ] {
        seed("lsn_time", name, s.as_bytes());
    }
}

fn proxy() {
    for (name, s) in [
        (
            "tinyproxy-200",
            "HTTP/1.0 200 Connection established\r\nProxy-agent: tinyproxy/1.11.1\r\n\r\n",
        ),
        (
            "tinyproxy-401",
            "HTTP/1.0 401 Unauthorized\r\nServer: tinyproxy/1.11.1\r\nContent-Type: text/html\r\n\
             WWW-Authenticate: Basic realm=\"tinyproxy\"\r\nConnection: close\r\n\r\n",
        ),
        (
            "squid-407",
            "HTTP/1.1 407 Proxy Authentication Required\r\nServer: squid/5.7\r\n\
             Proxy-Authenticate: Basic realm=\"Squid proxy\"\r\nContent-Length: 0\r\n\r\n",
        ),
        (
            "squid-403",
            "HTTP/1.1 403 Forbidden\r\nServer: squid/5.7\r\nX-Squid-Error: ERR_ACCESS_DENIED 0\r\n\r\n",
        ),
        ("bare-lf", "HTTP/1.1 502 Bad Gateway\n\n"),
    ] {
        seed("proxy_answer", name, s.as_bytes());
    }
    for (name, s) in [
        ("http", "http://proxy.corp:3128\0user:secret\n"),
        ("http-creds", "HTTP://u%40x:p%3As@10.0.0.1/\0"),
        ("socks", "socks5h://[::1]\0relay-outer.example"),
        (
            "no-proxy",
            ".example, 10.0.0.0/8 ,localhost\0relay-outer.example",
        ),
    ] {
        seed("proxy_url", name, s.as_bytes());
    }
}

/// Segment files written by the real segment log: the target's input is a mode byte,
/// the first segment's length (u16, little-endian), the second segment's distance from
/// seq 1, then both segments' bytes.
fn segments() {
    use routy_log::segment_log::{LogOptions, SegmentLog};
    let dir = tempfile::tempdir().unwrap();
    let opts = LogOptions {
        segment_bytes: 400,
        max_record: 1024,
        recycle_segments: 0,
    };
    let mut log = SegmentLog::open(dir.path(), opts).unwrap();
    for (_, r) in records() {
        log.append(&r.encode()).unwrap();
    }
    log.sync().unwrap();
    let segs = log.segments().unwrap();
    drop(log);
    let files: Vec<(u64, Vec<u8>)> = segs
        .iter()
        .map(|s| (s.first_seq, std::fs::read(&s.path).unwrap()))
        .collect();
    let (first, second) = (&files[0], files.get(1));
    for mode in 0..3u8 {
        let mut input = vec![mode];
        input.extend(u16::try_from(first.1.len()).unwrap().to_le_bytes());
        input.push(second.map_or(0, |s| u8::try_from(s.0 - 1).unwrap()));
        input.extend(&first.1);
        if let Some(s) = second {
            input.extend(&s.1);
        }
        seed("segment", &format!("log-mode{mode}"), &input);
        let mut torn = input.clone();
        torn.truncate(torn.len() - 5);
        seed("segment", &format!("torn-mode{mode}"), &torn);
    }
}

/// A real upgrade: tungstenite's client request as relay-outer's accept reads it
/// (side byte 0), and relay-outer's answer as relay-inner's connect reads it (side 1),
/// each followed by a binary message.
fn websocket() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Stand-ins for the first TLS records each side sends through the WebSocket.
    const FROM_OUTER: &[u8] = b"\x16\x03\x03 tls from relay-outer";
    const FROM_INNER: &[u8] = b"\x16\x03\x01 tls hello";
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (request, answer, message) = rt.block_on(async {
        // Record both directions through a pair of pipes with a tap in the middle.
        let (client, tap_c) = tokio::io::duplex(1 << 20);
        let (tap_s, server) = tokio::io::duplex(1 << 20);
        let (mut c_read, mut c_write) = tokio::io::split(tap_c);
        let (mut s_read, mut s_write) = tokio::io::split(tap_s);
        let up = tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = c_read.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                seen.extend_from_slice(&buf[..n]);
                s_write.write_all(&buf[..n]).await.unwrap();
            }
            seen
        });
        let down = tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = s_read.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                seen.extend_from_slice(&buf[..n]);
                c_write.write_all(&buf[..n]).await.unwrap();
            }
            seen
        });
        let srv = tokio::spawn(async move {
            let mut ws = routy_tunnel::websocket::accept(server).await.unwrap();
            ws.write_all(FROM_OUTER).await.unwrap();
            ws.flush().await.unwrap();
            let mut got = [0u8; FROM_INNER.len()];
            ws.read_exact(&mut got).await.unwrap();
            ws.shutdown().await.unwrap();
        });
        let mut ws = routy_tunnel::websocket::connect(
            client,
            "ws://relay-outer.example:443/routy",
            std::time::Duration::from_secs(5),
        )
        .await
        .unwrap();
        let mut got = [0u8; FROM_OUTER.len()];
        ws.read_exact(&mut got).await.unwrap();
        ws.write_all(FROM_INNER).await.unwrap();
        ws.flush().await.unwrap();
        srv.await.unwrap();
        let mut rest = Vec::new();
        let _ = ws.read_to_end(&mut rest).await;
        drop(ws);
        (up.await.unwrap(), down.await.unwrap(), got)
    });
    assert_eq!(&message[..3], b"\x16\x03\x03");
    let mut accept_side = vec![0];
    accept_side.extend(&request);
    seed("websocket", "upgrade-request", &accept_side);
    let mut connect_side = vec![1];
    connect_side.extend(&answer);
    seed("websocket", "upgrade-answer", &connect_side);
    let not_upgrade = b"\0GET /metrics HTTP/1.1\r\nHost: relay-outer\r\n\r\n";
    seed("websocket", "not-upgrade", not_upgrade);
    let refused = b"\x01HTTP/1.1 403 Forbidden\r\nContent-Length: 9\r\n\r\nforbidden";
    seed("websocket", "refused", refused);
}

/// The deployed example, and small files in the shapes relay-inner's own tests load:
/// proxies, the WebSocket transport, a CDC source.
fn configs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    seed(
        "inner_config",
        "deploy",
        &std::fs::read(root.join("deploy/relay-inner.yaml")).unwrap(),
    );
    let good = r#"outer:
  - { addr: "relay.example.com:7443", proxy: "http://u:p%40ss@proxy.corp:3128" }
  - { addr: "[::1]:7443", server_name: localhost }
tls: { cert: site-a.crt, key: site-a.key, ca: ca.crt }
reconnect: { initial: 50ms, max: 2s }
keepalive: { interval: 5s, timeout: 15s }
services:
  orders-pg: { target: "10.0.0.5:5432", connect_timeout: 2s }
  other: { target: "db.internal:5432" }
"#;
    seed("inner_config", "proxy", good.as_bytes());
    let ws = format!(
        "{}transport: websocket\n",
        good.replace(
            "proxy: \"http://u:p%40ss@proxy.corp:3128\"",
            "websocket_url: \"wss://lb.example/routy\""
        )
    );
    seed("inner_config", "websocket", ws.as_bytes());
    let cdc = format!(
        "{good}cdc:\n  spool: {{ dir: spool, max_bytes: 2GiB }}\n  sources:\n    - name: orders\n      \
         postgres: {{ dsn: \"host=db user=routy\", tables: [public.orders], slot: routy_orders }}\n"
    );
    seed("inner_config", "cdc", cdc.as_bytes());
}
