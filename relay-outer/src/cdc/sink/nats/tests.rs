//! The NATS sink against Debian's nats-server with JetStream, fed with hand-made records.

use std::time::Duration;

use relay_proto::cdc::{Event, OldRow, Value};
use routy_e2e::nats::NatsServer;

use super::*;
use crate::cdc::sink::testkit::*;
use crate::cdc::sink::{SinkKind, State};

fn cfg(name: &str, server: &NatsServer) -> NatsConfig {
    NatsConfig {
        name: name.into(),
        source: "t/s".into(),
        url: server.url(),
        auth: None,
        tls: None,
        stream: "CDC".into(),
        subject_prefix: "cdc".into(),
        per: Per::Change,
        create_stream: true,
        timeout: Duration::from_secs(5),
        max_messages: DEFAULT_MAX_MESSAGES,
        max_delay: Duration::from_millis(10),
    }
}

struct Started {
    run: Running,
    _root: tempfile::TempDir,
}

fn start(cfg: NatsConfig, h: &Harness) -> Started {
    let root = tempfile::tempdir().unwrap();
    let run = start_in(
        &cfg.name.clone(),
        SinkKind::Nats(cfg),
        &h.store,
        root.path(),
    );
    Started { run, _root: root }
}

fn json(m: &routy_e2e::nats::StreamMsg) -> serde_json::Value {
    serde_json::from_slice(&m.payload).unwrap()
}

#[test]
fn subjects_and_stream_coverage() {
    assert_eq!(token("public"), "public");
    assert_eq!(token("my table.v2*"), "my_table_v2_");
    assert_eq!(token(""), "_");
    assert!(covers("cdc.>", "cdc"));
    assert!(covers(">", "cdc"));
    assert!(covers("*.>", "cdc"));
    assert!(covers("app.cdc.>", "app.cdc"));
    assert!(!covers("cdc.*", "cdc"));
    assert!(!covers("other.>", "cdc"));
    assert!(!covers("cdc.public.>", "cdc"));
    assert!(!covers("cdc", "cdc"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_become_messages_with_ids_and_resends_are_dropped() {
    let server = NatsServer::start();
    let mut h = Harness::new();
    let r = rel(
        1,
        "orders",
        b'd',
        &[("id", "integer", true), ("note", "text", false)],
    );
    let other = rel(2, "items", b'd', &[("id", "integer", true)]);
    let last = h
        .push(vec![
            txn(
                1,
                &[&r],
                vec![
                    ins(1, &[Some("1"), Some("a")]),
                    ins(1, &[Some("2"), Some("b")]),
                ],
            ),
            txn(
                2,
                &[&r, &other],
                vec![
                    Event::Update {
                        rel: 1,
                        old: None,
                        new: vec![t("1"), Value::Unchanged],
                    },
                    Event::Delete {
                        rel: 1,
                        old: OldRow {
                            key_only: true,
                            values: vec![t("2"), Value::Null],
                        },
                    },
                    Event::Truncate {
                        rels: vec![1, 2],
                        cascade: false,
                        restart_identity: false,
                    },
                ],
            ),
        ])
        .await;
    let s = start(cfg("n", &server), &h);
    wait_applied(&s.run.status, last).await;
    let msgs = server.read_stream("CDC").await;
    let subjects: Vec<&str> = msgs.iter().map(|m| m.subject.as_str()).collect();
    assert_eq!(
        subjects,
        [
            "cdc.public.orders",
            "cdc.public.orders",
            "cdc.public.orders",
            "cdc.public.orders",
            "cdc.public.orders",
            "cdc.public.items"
        ]
    );
    let first = json(&msgs[0]);
    assert_eq!(first["event"], "insert");
    assert_eq!(first["new"]["note"], "a");
    assert_eq!(first["table"], "public.orders");
    assert!(
        first["commit_lsn"].is_string() && first["commit_time"].is_string(),
        "{first}"
    );
    let id = first["id"].as_str().unwrap().to_string();
    assert_eq!(
        msgs[0].header("Nats-Msg-Id"),
        Some(format!("t/s/{id}").as_str())
    );
    assert_eq!(msgs[0].header("Routy-Op"), Some("insert"));
    assert_eq!(json(&msgs[2])["new"]["note"]["unchanged_toast"], true);
    assert_eq!(json(&msgs[3])["event"], "delete");
    // The TRUNCATE of two tables: one message each, the second id suffixed.
    assert_eq!(json(&msgs[5])["table"], "public.items");
    let tid = msgs[4].header("Nats-Msg-Id").unwrap().to_string();
    assert_eq!(
        msgs[5].header("Nats-Msg-Id"),
        Some(format!("{tid}/1").as_str())
    );
    assert_eq!(
        server.duplicate_window("CDC").await,
        CREATED_DUPLICATE_WINDOW
    );
    // A replay sends everything again: the stream drops the repeats by id.
    s.run.status.request_replay(Position::START);
    let t0 = std::time::Instant::now();
    while s.run.status.view().replay_pending.is_some() || s.run.status.applied_seq() < last {
        assert!(t0.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        server.read_stream("CDC").await.len(),
        6,
        "repeats were dropped"
    );
    s.run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_per_transaction_and_a_token() {
    let server = NatsServer::start_with(Some("s3cret"));
    let mut h = Harness::new();
    let r = rel(1, "orders", b'd', &[("id", "integer", true)]);
    let last = h
        .push(vec![
            txn(1, &[&r], vec![ins(1, &[Some("1")]), ins(1, &[Some("2")])]),
            txn(2, &[&r], vec![ins(1, &[Some("3")])]),
        ])
        .await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let mut c = cfg("tx", &server);
    c.per = Per::Transaction;
    c.auth = Some(NatsAuth::Token(token));
    let s = start(c, &h);
    wait_applied(&s.run.status, last).await;
    let msgs = server.read_stream("CDC").await;
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0].subject, "cdc.transactions");
    let body = json(&msgs[0]);
    assert_eq!(body["events"].as_array().unwrap().len(), 2);
    assert_eq!(body["events"][1]["new"]["id"], "2");
    assert!(body["xid"].is_u64() && body["commit_lsn"].is_string());
    assert_eq!(msgs[0].header("Routy-Op"), Some("transaction"));
    s.run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_does_not_take_the_subjects_is_a_clear_error() {
    let server = NatsServer::start();
    server.create_stream("CDC", &["other.>"]).await;
    let mut h = Harness::new();
    let r = rel(1, "orders", b'd', &[("id", "integer", true)]);
    h.push(vec![txn(1, &[&r], vec![ins(1, &[Some("1")])])])
        .await;
    let s = start(cfg("bad", &server), &h);
    let err = wait_error(&s.run.status).await;
    assert!(
        err.contains("does not take the subjects cdc.>") && err.contains("other.>"),
        "{err}"
    );
    assert!(
        matches!(s.run.status.state(), State::Retrying | State::Starting),
        "{:?}",
        s.run.status.view()
    );
    s.run.stop().await;
    // With create_stream off, a missing stream is named.
    let mut c = cfg("missing", &server);
    c.stream = "NOPE".into();
    c.create_stream = false;
    let s = start(c, &h);
    let err = wait_error(&s.run.status).await;
    assert!(err.contains("\"NOPE\" does not exist"), "{err}");
    s.run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_to_the_server() {
    let pki = tempfile::tempdir().unwrap();
    crate::certs::init(pki.path(), &["127.0.0.1".to_string()], false).unwrap();
    crate::certs::issue(pki.path(), "routy-sink", false).unwrap();
    let p = |f: &str| pki.path().join(f);
    let server = NatsServer::start_tls(&p("outer.crt"), &p("outer.key"), Some(&p("ca.crt")));
    let mut h = Harness::new();
    let r = rel(1, "orders", b'd', &[("id", "integer", true)]);
    let last = h
        .push(vec![txn(1, &[&r], vec![ins(1, &[Some("1")])])])
        .await;
    let mut c = cfg("tls", &server);
    c.tls = Some(NatsTls {
        ca: Some(p("ca.crt")),
        cert: Some(p("routy-sink.crt")),
        key: Some(p("routy-sink.key")),
    });
    let s = start(c.clone(), &h);
    wait_applied(&s.run.status, last).await;
    s.run.stop().await;
    // Without a client certificate the server refuses the sink, which says so and retries.
    c.name = "tls-anon".into();
    c.tls = Some(NatsTls {
        ca: Some(p("ca.crt")),
        cert: None,
        key: None,
    });
    let s = start(c, &h);
    let err = wait_error(&s.run.status).await;
    assert!(err.contains("NATS"), "{err}");
    assert_eq!(s.run.status.applied_seq(), 0);
    s.run.stop().await;
}
