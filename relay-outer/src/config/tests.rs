use super::*;
use crate::cdc::sink::kafka;
use crate::cdc::sink::nats::{NatsAuth, Per};
use crate::cdc::sink::webhook::{self, Auth, OnRejected};
use crate::cdc::sink::SinkKind;

fn parse(yaml: &str) -> Result<Config, String> {
    let raw: RawConfig = serde_saphyr::from_str(yaml).map_err(|e| e.to_string())?;
    Config::validate(raw, Path::new("/etc/routy"))
}

const GOOD: &str = r#"
tunnel:
  listen: "0.0.0.0:7443"
  tls: { cert: outer.crt, key: /k/outer.key, client_ca: ca.crt }
  keepalive: { interval: 1s, timeout: 3s }
listeners:
  - name: orders-pg
    bind: "127.0.0.1:15432"
    tunnel: site-a
    service: orders-pg
    allow: ["10.20.0.0/16", "::1"]
    max_connections: 8
"#;

#[test]
fn a_good_file_loads_with_defaults_and_resolved_paths() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.tunnel.cert, PathBuf::from("/etc/routy/outer.crt"));
    assert_eq!(c.tunnel.key, PathBuf::from("/k/outer.key"));
    assert_eq!(c.tunnel.keepalive.timeout, Duration::from_secs(3));
    assert!(c.tunnel.quic, "QUIC is on by default");
    let off = parse(&GOOD.replace("  keepalive:", "  quic: false\n  keepalive:")).unwrap();
    assert!(!off.tunnel.quic);
    assert_eq!(c.listeners[0].max_connections, 8);
    assert_eq!(c.listeners[0].open_timeout, DEFAULT_OPEN_TIMEOUT);
    assert_eq!(c.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert_eq!(c.threads, cpus, "one data-path thread per CPU by default");
    let two = parse(&format!("{GOOD}threads: 2\n")).unwrap();
    assert_eq!(two.threads, 2);
    let bad = parse(&format!("{GOOD}threads: -1\n")).unwrap_err();
    assert!(bad.contains("threads"), "{bad}");
}

#[test]
fn websocket_and_bandwidth_settings() {
    let c = parse(GOOD).unwrap();
    assert!(c.tunnel.websocket, "WebSocket is on by default");
    assert_eq!(c.listeners[0].max_bandwidth, 0, "no limit by default");
    let off = parse(&GOOD.replace("  keepalive:", "  websocket: false\n  keepalive:")).unwrap();
    assert!(!off.tunnel.websocket);
    let limited = format!("{GOOD}    max_bandwidth: 20MiB/s\n");
    assert_eq!(
        parse(&limited).unwrap().listeners[0].max_bandwidth,
        20 << 20
    );
    let e = parse(&format!("{GOOD}    max_bandwidth: 20MiB\n")).unwrap_err();
    assert!(
        e.contains("listeners[0].max_bandwidth") && e.contains("not a rate"),
        "{e}"
    );
}

#[test]
fn mistakes_name_the_field() {
    let typo = GOOD.replace("max_connections", "max_conections");
    assert!(parse(&typo).unwrap_err().contains("max_conections"));
    let bad_addr = GOOD.replace("127.0.0.1:15432", "localhost");
    assert!(parse(&bad_addr).unwrap_err().contains("listeners[0].bind"));
    let bad_cidr = GOOD.replace("10.20.0.0/16", "10.20.0.0/40");
    assert!(parse(&bad_cidr)
        .unwrap_err()
        .contains("listeners[0].allow[0]"));
    let bad_ka = GOOD.replace("timeout: 3s", "timeout: 1s");
    assert!(parse(&bad_ka)
        .unwrap_err()
        .contains("tunnel.keepalive.timeout"));
    let bad_dur = GOOD.replace("interval: 1s", "interval: 1 fortnight");
    assert!(parse(&bad_dur).unwrap_err().contains("unknown unit"));
    let bad_tunnel = GOOD.replace("tunnel: site-a", "tunnel: Site_A");
    assert!(parse(&bad_tunnel)
        .unwrap_err()
        .contains("listeners[0].tunnel"));
    let top = format!("{GOOD}\nextra: 1\n");
    assert!(parse(&top).unwrap_err().contains("extra"));
}

const CDC: &str = r#"
cdc:
  dir: store
  sinks:
    - name: replica
      source: site-b/orders
      postgres: { dsn: "host=db dbname=orders user=routy", create_tables: true, schema: mirror }
      retry: { initial: 50ms, max: 5s }
    - name: second
      source: site-a/orders
      postgres: { dsn: "host=db2", transaction_chunk_rows: 50000 }
"#;

#[test]
fn cdc_section_loads_with_defaults() {
    let c = parse(&format!("{GOOD}{CDC}")).unwrap();
    let cdc = c.cdc.clone().unwrap();
    assert_eq!(cdc.dir, PathBuf::from("/etc/routy/store"));
    assert_eq!(cdc.retention, DEFAULT_CDC_RETENTION);
    assert_eq!(cdc.sinks.len(), 2);
    let s = &cdc.sinks[0];
    assert_eq!(s.name, "replica");
    assert_eq!(s.source, "site-b/orders");
    let SinkKind::Postgres(p) = &s.kind else {
        panic!("{:?}", s.kind)
    };
    assert!(p.create_tables);
    assert_eq!(p.schema.as_deref(), Some("mirror"));
    assert_eq!(s.retry_initial, Duration::from_millis(50));
    assert_eq!(s.retry_max, Duration::from_secs(5));
    assert!(s.filter.is_empty());
    let d = &cdc.sinks[1];
    let SinkKind::Postgres(p) = &d.kind else {
        panic!("{:?}", d.kind)
    };
    assert!(!p.create_tables);
    assert_eq!(p.schema, None);
    assert_eq!(p.transaction_chunk_rows, Some(50_000));
    assert_eq!(d.retry_initial, DEFAULT_SINK_RETRY_INITIAL);
    assert_eq!(d.retry_max, DEFAULT_SINK_RETRY_MAX);
    assert_eq!(cdc.sources(), vec!["site-a/orders", "site-b/orders"]);
    // A tunnel only a sink reads from counts as configured.
    assert!(c.tunnels().contains("site-b"));
    assert!(c.tunnels().contains("site-a"));
    assert!(parse(GOOD).unwrap().cdc.is_none());
    let minimal = parse(&format!(
        "{GOOD}cdc:\n  dir: /var/lib/routy\n  retention: 1h\n"
    ))
    .unwrap();
    let m = minimal.cdc.unwrap();
    assert_eq!(m.retention, Duration::from_secs(3600));
    assert!(m.sinks.is_empty());
}

const HOOK: &str = r#"
    - name: hook
      source: site-a/orders
      tables: [public.orders, sales.items]
      ops: [insert, update]
      webhook:
        url: "https://hooks.example.com/routy"
        headers: { X-Team: data }
        bearer_token_file: token
        hmac_secret_file: /s/hmac
        timeout: 5s
        batch: { max_events: 10, max_bytes: 64KiB, max_delay: 1s }
        on_rejected: dead_letter
"#;

#[test]
fn a_webhook_sink_with_filters_loads() {
    let c = parse(&format!("{GOOD}{CDC}{HOOK}")).unwrap();
    let cdc = c.cdc.unwrap();
    let h = &cdc.sinks[2];
    assert_eq!(
        h.filter.tables,
        Some(vec!["public.orders".to_string(), "sales.items".to_string()])
    );
    assert_eq!(h.filter.ops, Some([true, true, false, false]));
    let SinkKind::Webhook(w) = &h.kind else {
        panic!("{:?}", h.kind)
    };
    assert_eq!(w.url, "https://hooks.example.com/routy");
    assert_eq!(w.headers, vec![("X-Team".to_string(), "data".to_string())]);
    assert_eq!(
        w.auth,
        Some(Auth::Bearer(PathBuf::from("/etc/routy/token")))
    );
    assert_eq!(w.hmac_secret_file, Some(PathBuf::from("/s/hmac")));
    assert_eq!(w.timeout, Duration::from_secs(5));
    assert_eq!((w.max_events, w.max_bytes), (10, 64 * 1024));
    assert_eq!(w.max_delay, Duration::from_secs(1));
    assert_eq!(w.on_rejected, OnRejected::DeadLetter);
    assert_eq!(
        w.dead_letter_dir,
        PathBuf::from("/etc/routy/store/_dead-letter")
    );
    let plain = parse(&format!(
            "{GOOD}{CDC}    - {{ name: h2, source: site-a/orders, webhook: {{ url: \"http://127.0.0.1:9/x\" }} }}\n"
        ))
        .unwrap();
    let SinkKind::Webhook(w) = &plain.cdc.unwrap().sinks[2].kind else {
        panic!()
    };
    assert_eq!(w.auth, None);
    assert_eq!(w.on_rejected, OnRejected::Stop);
    assert_eq!(w.max_events, webhook::DEFAULT_MAX_EVENTS);
}

#[test]
fn a_sink_needs_exactly_one_kind() {
    let two = format!("{GOOD}{CDC}").replace(
        "postgres: { dsn: \"host=db2\", transaction_chunk_rows: 50000 }",
        "postgres: { dsn: \"host=db2\", transaction_chunk_rows: 50000 }\n      webhook: { url: \"http://h/\" }",
    );
    let e = parse(&two).unwrap_err();
    assert!(
        e.contains("cdc.sinks[1]")
            && e.contains("\"second\"")
            && e.contains("postgres and webhook"),
        "{e}"
    );
    let none = format!("{GOOD}{CDC}").replace(
        "      postgres: { dsn: \"host=db2\", transaction_chunk_rows: 50000 }\n",
        "",
    );
    let e = parse(&none).unwrap_err();
    assert!(e.contains("\"second\"") && e.contains("none"), "{e}");
    let unknown = format!("{GOOD}{CDC}").replace(
        "postgres: { dsn: \"host=db2\", transaction_chunk_rows: 50000 }",
        "kinesis: {}",
    );
    assert!(parse(&unknown).unwrap_err().contains("kinesis"));
}

const WAREHOUSE: &str = r#"
    - name: wh
      source: site-a/orders
      clickhouse:
        url: "http://clickhouse:8123"
        database: analytics
        user: routy
        password_file: ch.password
        timeout: 5s
        batch: { max_rows: 5000, max_bytes: 8MiB, max_delay: 200ms }
    - name: js
      source: site-a/orders
      nats:
        url: "nats://n1:4222, nats://n2:4222"
        token_file: nats.token
        tls: { ca: ca.crt }
        stream: ORDERS
        subject_prefix: acme.cdc
        message: transaction
        batch: { max_messages: 100, max_delay: 5ms }
"#;
const KAFKA: &str = r#"
    - name: log
      source: site-a/orders
      kafka:
        brokers: ["k1:9092", "k2:9093"]
        topic_prefix: cdc
        sasl: { mechanism: SCRAM-SHA-512, username: routy, password_file: k.pw }
        partitions: 6
        properties: { compression.type: lz4 }
"#;

#[test]
fn warehouse_and_stream_sinks_load() {
    let c = parse(&format!("{GOOD}{CDC}{WAREHOUSE}")).unwrap();
    let cdc = c.cdc.unwrap();
    let SinkKind::ClickHouse(ch) = &cdc.sinks[2].kind else {
        panic!("{:?}", cdc.sinks[2].kind)
    };
    assert_eq!(ch.url, "http://clickhouse:8123");
    assert_eq!(
        (ch.database.as_str(), ch.user.as_str()),
        ("analytics", "routy")
    );
    assert_eq!(
        ch.password_file,
        Some(PathBuf::from("/etc/routy/ch.password"))
    );
    assert!(ch.create_tables);
    assert_eq!((ch.max_rows, ch.max_bytes), (5000, 8 << 20));
    assert_eq!(ch.max_delay, Duration::from_millis(200));
    let SinkKind::Nats(n) = &cdc.sinks[3].kind else {
        panic!("{:?}", cdc.sinks[3].kind)
    };
    assert_eq!(n.url, "nats://n1:4222,nats://n2:4222");
    assert_eq!(
        n.auth,
        Some(NatsAuth::Token(PathBuf::from("/etc/routy/nats.token")))
    );
    assert_eq!(
        n.tls.as_ref().and_then(|t| t.ca.clone()),
        Some(PathBuf::from("/etc/routy/ca.crt"))
    );
    assert_eq!(
        (n.stream.as_str(), n.subject_prefix.as_str()),
        ("ORDERS", "acme.cdc")
    );
    assert_eq!(n.per, Per::Transaction);
    assert_eq!(n.max_messages, 100);
    let k = parse(&format!("{GOOD}{CDC}{KAFKA}"));
    if kafka::BUILT {
        let cdc = k.unwrap().cdc.unwrap();
        let SinkKind::Kafka(k) = &cdc.sinks[2].kind else {
            panic!("{:?}", cdc.sinks[2].kind)
        };
        assert_eq!(k.brokers, ["k1:9092", "k2:9093"]);
        assert_eq!(k.partitions, 6);
        assert_eq!(
            k.sasl.as_ref().map(|s| s.mechanism.as_str()),
            Some("SCRAM-SHA-512")
        );
        assert_eq!(
            k.properties,
            [("compression.type".to_string(), "lz4".to_string())]
        );
    } else {
        let e = k.unwrap_err();
        assert!(
            e.contains("cdc.sinks[2].kafka") && e.contains("built without the Kafka sink"),
            "{e}"
        );
    }
}

#[test]
fn warehouse_and_stream_mistakes_name_the_field() {
    let base = format!("{GOOD}{CDC}{WAREHOUSE}");
    let mut cases = vec![
        (
            base.replace("http://clickhouse:8123", "clickhouse:8123"),
            "cdc.sinks[2].clickhouse.url",
        ),
        (
            base.replace("http://clickhouse:8123", "http://ch:8123/?database=x"),
            "cdc.sinks[2].clickhouse.url",
        ),
        (
            base.replace("database: analytics", "database: \"\""),
            "cdc.sinks[2].clickhouse.database",
        ),
        (
            base.replace("max_rows: 5000", "max_rows: 0"),
            "cdc.sinks[2].clickhouse.batch.max_rows",
        ),
        (
            base.replace("max_rows: 5000", "max_events: 5000"),
            "max_events",
        ),
        (
            base.replace("password_file: ch.password", "pasword_file: ch.password"),
            "pasword_file",
        ),
        (
            base.replace("nats://n1:4222", "http://n1:4222"),
            "cdc.sinks[3].nats.url",
        ),
        (
            base.replace(
                "token_file: nats.token",
                "token_file: t\n        credentials_file: c",
            ),
            "cdc.sinks[3].nats",
        ),
        (
            base.replace("stream: ORDERS", "stream: ORD.ERS"),
            "cdc.sinks[3].nats.stream",
        ),
        (
            base.replace("subject_prefix: acme.cdc", "subject_prefix: acme.*"),
            "cdc.sinks[3].nats.subject_prefix",
        ),
        (
            base.replace("subject_prefix: acme.cdc", "subject_prefix: acme..cdc"),
            "cdc.sinks[3].nats.subject_prefix",
        ),
        (
            base.replace("message: transaction", "message: batch"),
            "cdc.sinks[3].nats.message",
        ),
        (
            base.replace("tls: { ca: ca.crt }", "tls: { cert: c.crt }"),
            "cdc.sinks[3].nats.tls",
        ),
        (
            base.replace("max_messages: 100", "max_messages: 0"),
            "cdc.sinks[3].nats.batch.max_messages",
        ),
    ];
    if kafka::BUILT {
        let k = format!("{GOOD}{CDC}{KAFKA}");
        cases.extend([
            (
                k.replace("\"k2:9093\"", "\"k2\""),
                "cdc.sinks[2].kafka.brokers",
            ),
            (
                k.replace("brokers: [\"k1:9092\", \"k2:9093\"]", "brokers: []"),
                "cdc.sinks[2].kafka.brokers",
            ),
            (
                k.replace("topic_prefix: cdc", "topic_prefix: \"c d\""),
                "cdc.sinks[2].kafka.topic_prefix",
            ),
            (
                k.replace("partitions: 6", "partitions: 6\n        acks: 1"),
                "cdc.sinks[2].kafka.acks",
            ),
            (
                k.replace("partitions: 6", "partitions: 0"),
                "cdc.sinks[2].kafka.partitions",
            ),
            (
                k.replace("SCRAM-SHA-512", "GSSAPI"),
                "cdc.sinks[2].kafka.sasl.mechanism",
            ),
            (
                k.replace("compression.type: lz4", "acks: \"1\""),
                "cdc.sinks[2].kafka.properties",
            ),
        ]);
    }
    for (yaml, field) in cases {
        let err = parse(&yaml).unwrap_err();
        assert!(err.contains(field), "{field}: {err}");
    }
}

#[test]
fn cdc_mistakes_name_the_field() {
    let full = format!("{GOOD}{CDC}");
    let cases = [
        (full.replace("  dir: store\n", ""), "cdc.dir"),
        (
            full.replace("name: second", "name: replica"),
            "cdc.sinks[1].name",
        ),
        (
            full.replace("name: second", "name: \"a b\""),
            "cdc.sinks[1].name",
        ),
        (
            full.replace("site-b/orders", "site-b"),
            "cdc.sinks[0].source",
        ),
        (
            full.replace("site-b/orders", "Site_B/orders"),
            "cdc.sinks[0].source",
        ),
        (
            full.replace("site-b/orders", "site-b/../x"),
            "cdc.sinks[0].source",
        ),
        (
            full.replace("site-b/orders", "site-b/.hidden"),
            "cdc.sinks[0].source",
        ),
        (
            full.replace("site-a/orders", "site-a/"),
            "cdc.sinks[1].source",
        ),
        (
            full.replace("dsn: \"host=db2\"", "dsn: \"\""),
            "cdc.sinks[1].postgres.dsn",
        ),
        (
            full.replace("initial: 50ms", "initial: 10s"),
            "cdc.sinks[0].retry.max",
        ),
        (
            full.replace("initial: 50ms", "initial: 0ms"),
            "cdc.sinks[0].retry.initial",
        ),
        (
            full.replace("schema: mirror", "schema: \"\""),
            "cdc.sinks[0].postgres.schema",
        ),
        (
            full.replace(
                "      postgres: { dsn: \"host=db2\", transaction_chunk_rows: 50000 }\n",
                "",
            ),
            "cdc.sinks[1]",
        ),
        (
            full.replace("create_tables", "create_table"),
            "create_table",
        ),
        (
            full.replace("transaction_chunk_rows: 50000", "transaction_chunk_rows: 0"),
            "cdc.sinks[1].postgres.transaction_chunk_rows: 0 must be 1 to",
        ),
        (
            full.replace("  sinks:", "  retention: 0s\n  sinks:"),
            "cdc.retention",
        ),
        (full.replace("  sinks:", "  extra: 1\n  sinks:"), "extra"),
        (full.replace("retry: {", "retry: { jitter: 1s,"), "jitter"),
        (
            format!("{full}{HOOK}").replace("sales.items", "items"),
            "cdc.sinks[2].tables",
        ),
        (
            format!("{full}{HOOK}").replace("update]", "upsert]"),
            "cdc.sinks[2].ops",
        ),
        (
            format!("{full}{HOOK}").replace("https://hooks", "ftp://hooks"),
            "cdc.sinks[2].webhook.url",
        ),
        (
            format!("{full}{HOOK}").replace("X-Team", "X Team"),
            "cdc.sinks[2].webhook.headers",
        ),
        (
            format!("{full}{HOOK}").replace("X-Team", "Authorization"),
            "cdc.sinks[2].webhook.headers",
        ),
        (
            format!("{full}{HOOK}").replace("dead_letter", "skip"),
            "cdc.sinks[2].webhook.on_rejected",
        ),
        (
            format!("{full}{HOOK}").replace("max_events: 10", "max_events: 0"),
            "cdc.sinks[2].webhook.batch.max_events",
        ),
        (
            format!("{full}{HOOK}").replace("timeout: 5s", "timeout: 0s"),
            "cdc.sinks[2].webhook.timeout",
        ),
        (
            format!("{full}{HOOK}").replace(
                "bearer_token_file: token",
                "bearer_token_file: token\n        basic: { user: u, password_file: p }",
            ),
            "cdc.sinks[2].webhook",
        ),
        (
            format!("{full}{HOOK}").replace("max_delay: 1s", "max_wait: 1s"),
            "max_wait",
        ),
    ];
    for (yaml, field) in cases {
        let err = parse(&yaml).unwrap_err();
        assert!(err.contains(field), "{field}: {err}");
    }
}

#[test]
fn certificate_rules_and_the_handshake_limit_load() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.tunnel.trust, routy_tunnel::tls::Trust::default());
    assert_eq!(
        c.tunnel.failed_handshake_limit,
        DEFAULT_FAILED_HANDSHAKE_LIMIT
    );
    let one = parse(&GOOD.replace(
        "client_ca: ca.crt }",
        "client_ca: ca.crt, crl: crl.pem, max_intermediates: 1 }\n  failed_handshake_limit: 0",
    ))
    .unwrap();
    assert_eq!(
        one.tunnel.trust.crls,
        vec![PathBuf::from("/etc/routy/crl.pem")]
    );
    assert_eq!(one.tunnel.trust.max_intermediates, 1);
    assert_eq!(one.tunnel.failed_handshake_limit, 0);
    let two = parse(&GOOD.replace(
        "client_ca: ca.crt }",
        "client_ca: ca.crt, crl: [a.pem, /x/b.pem] }",
    ))
    .unwrap();
    assert_eq!(
        two.tunnel.trust.crls,
        vec![PathBuf::from("/etc/routy/a.pem"), PathBuf::from("/x/b.pem")]
    );
    let e = parse(&GOOD.replace("client_ca: ca.crt }", "client_ca: ca.crt, crls: a.pem }"))
        .unwrap_err();
    assert!(e.contains("crls"), "{e}");
}
