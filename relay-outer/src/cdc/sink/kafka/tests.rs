//! The Kafka sink against a real Kafka-protocol broker (Tansu), fed with hand-made
//! records.

use std::time::Duration;

use relay_proto::cdc::{Event, OldRow, Value};
use routy_e2e::kafka::{read_topic, Tansu};

use super::KafkaConfig;
use crate::cdc::sink::testkit::*;
use crate::cdc::sink::{SinkKind, State};

fn cfg(name: &str, broker: &Tansu) -> KafkaConfig {
    KafkaConfig {
        name: name.into(),
        source: "t/s".into(),
        brokers: vec![broker.broker()],
        topic_prefix: "cdc".into(),
        tls: None,
        sasl: None,
        create_topics: true,
        partitions: 2,
        timeout: Duration::from_secs(10),
        max_messages: super::DEFAULT_MAX_MESSAGES,
        max_delay: Duration::from_millis(10),
        properties: Vec::new(),
    }
}

struct Started {
    run: Running,
    _root: tempfile::TempDir,
}

fn start(cfg: KafkaConfig, h: &Harness) -> Started {
    let root = tempfile::tempdir().unwrap();
    let run = start_in(
        &cfg.name.clone(),
        SinkKind::Kafka(cfg),
        &h.store,
        root.path(),
    );
    Started { run, _root: root }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_go_to_a_topic_per_table_keyed_by_row() {
    let broker = Tansu::start();
    let mut h = Harness::new();
    let r = rel(
        1,
        "orders",
        b'd',
        &[("id", "integer", true), ("note", "text", false)],
    );
    let mut events = Vec::new();
    for i in 1..=20 {
        events.push(ins(1, &[Some(&i.to_string()), Some("a")]));
    }
    events.push(Event::Update {
        rel: 1,
        old: None,
        new: vec![t("3"), Value::Unchanged],
    });
    events.push(Event::Delete {
        rel: 1,
        old: OldRow {
            key_only: true,
            values: vec![t("4"), Value::Null],
        },
    });
    events.push(Event::Truncate {
        rels: vec![1],
        cascade: false,
        restart_identity: false,
    });
    let last = h.push(vec![txn(1, &[&r], events)]).await;
    let s = start(cfg("k", &broker), &h);
    wait_applied(&s.run.status, last).await;
    let b = broker.broker();
    let msgs = tokio::task::spawn_blocking(move || {
        read_topic(&b, "cdc.public.orders", Duration::from_secs(3))
    })
    .await
    .unwrap();
    // 20 inserts, an update, a delete, and the TRUNCATE once in each of the 2 partitions.
    let parts: Vec<i32> = msgs.iter().map(|m| m.partition).collect();
    assert_eq!(msgs.len(), 24, "partitions of the messages: {parts:?}");
    let body = |m: &routy_e2e::kafka::TopicMsg| -> serde_json::Value {
        serde_json::from_slice(&m.payload).unwrap()
    };
    // A row's changes are in one partition, in order, under its key.
    let row3: Vec<_> = msgs
        .iter()
        .filter(|m| m.key.as_deref() == Some(&br#"{"id":"3"}"#[..]))
        .collect();
    assert_eq!(row3.len(), 2);
    assert_eq!(row3[0].partition, row3[1].partition);
    assert!(row3[0].offset < row3[1].offset);
    assert_eq!(body(row3[0])["event"], "insert");
    assert_eq!(body(row3[1])["event"], "update");
    assert_eq!(body(row3[1])["new"]["note"]["unchanged_toast"], true);
    assert_eq!(row3[1].header("routy-op").as_deref(), Some("update"));
    assert_eq!(row3[1].header("routy-source").as_deref(), Some("t/s"));
    let pos = row3[1].header("routy-position").unwrap();
    assert_eq!(body(row3[1])["id"], pos.as_str());
    let truncates: Vec<i32> = msgs
        .iter()
        .filter(|m| body(m)["event"] == "truncate")
        .map(|m| m.partition)
        .collect();
    assert_eq!(truncates.len(), 2);
    assert_ne!(truncates[0], truncates[1]);
    // The last message of each partition is its TRUNCATE.
    for p in [0, 1] {
        let last = msgs
            .iter()
            .filter(|m| m.partition == p)
            .max_by_key(|m| m.offset);
        assert_eq!(body(last.unwrap())["event"], "truncate");
    }
    s.run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_retried_and_nothing_is_lost() {
    let broker = Tansu::start();
    let mut h = Harness::new();
    let r = rel(1, "t", b'd', &[("id", "integer", true)]);
    let first = h
        .push(vec![txn(1, &[&r], vec![ins(1, &[Some("1")])])])
        .await;
    let mut c = cfg("down", &broker);
    c.timeout = Duration::from_secs(1);
    c.partitions = 1;
    let s = start(c.clone(), &h);
    wait_applied(&s.run.status, first).await;
    // The broker stops answering; changes keep coming; it comes back.
    let mut recs = Vec::new();
    for i in 2..=50 {
        recs.push(txn(i, &[&r], vec![ins(1, &[Some(&i.to_string())])]));
    }
    let last = h.push(recs).await;
    broker.pause(Duration::from_secs(3));
    wait_applied(&s.run.status, last).await;
    assert!(
        s.run.status.last_error().is_some(),
        "the outage was noticed: {:?}",
        s.run.status.view()
    );
    assert_eq!(s.run.status.state(), State::Running);
    s.run.stop().await;
    let b = broker.broker();
    let msgs =
        tokio::task::spawn_blocking(move || read_topic(&b, "cdc.public.t", Duration::from_secs(3)))
            .await
            .unwrap();
    let mut ids: Vec<i64> = msgs
        .iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            v["new"]["id"].as_str().unwrap().parse().unwrap()
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids, (1..=50).collect::<Vec<_>>(), "every change arrived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_topic_with_create_topics_off_is_a_clear_error() {
    let broker = Tansu::start();
    let mut h = Harness::new();
    let r = rel(1, "nowhere", b'd', &[("id", "integer", true)]);
    h.push(vec![txn(1, &[&r], vec![ins(1, &[Some("1")])])])
        .await;
    let mut c = cfg("nocreate", &broker);
    c.create_topics = false;
    let s = start(c, &h);
    let err = wait_error(&s.run.status).await;
    assert!(
        err.contains("cdc.public.nowhere does not exist (create_topics is off)"),
        "{err}"
    );
    s.run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_brokers() {
    // Tansu 0.6 speaks no TLS: stunnel terminates it in front of the broker.
    let pki = tempfile::tempdir().unwrap();
    crate::certs::init(pki.path(), &["127.0.0.1".to_string()], false).unwrap();
    let p = |f: &str| pki.path().join(f);
    let broker = Tansu::start_tls(&p("outer.crt"), &p("outer.key"));
    let mut h = Harness::new();
    let r = rel(1, "secure", b'd', &[("id", "integer", true)]);
    let last = h
        .push(vec![txn(1, &[&r], vec![ins(1, &[Some("1")])])])
        .await;
    let mut c = cfg("tls", &broker);
    c.tls = Some(super::KafkaTls {
        ca: Some(p("ca.crt")),
        cert: None,
        key: None,
    });
    let s = start(c.clone(), &h);
    wait_applied(&s.run.status, last).await;
    s.run.stop().await;
    // Plaintext to the TLS port: an error that says Kafka, nothing committed.
    c.name = "plain".into();
    c.tls = None;
    c.timeout = Duration::from_secs(2);
    let s = start(c, &h);
    let err = wait_error(&s.run.status).await;
    assert!(err.contains("Kafka"), "{err}");
    assert_eq!(s.run.status.applied_seq(), 0);
    s.run.stop().await;
}
