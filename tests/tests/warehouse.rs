//! End-to-end sinks into warehouses and streams: ClickHouse (and the stream sinks), each
//! under the seam's fault test: continuous writes on the source (inserts, updates that
//! leave a TOASTed column untouched, deletes, a TRUNCATE), relay-outer killed with
//! SIGKILL twice and the target restarted once; at the end the target's current state
//! equals the source row for row.

use std::time::{Duration, Instant};

use routy_e2e::cdc::{CdcRig, RigOpts, CATCH_UP};
use routy_e2e::clickhouse::ClickHouse;
use routy_e2e::kafka::{read_topic, Tansu};
use routy_e2e::nats::NatsServer;
use routy_e2e::{require_root, try_wait_until};

const TABLE: &str = "public.t";
/// Rows per source transaction.
const TX_ROWS: u64 = 20;

fn opts(extra_sinks: String) -> RigOpts {
    RigOpts {
        // `doc` is stored out of line, uncompressed: an update that does not touch it
        // sends it as an unchanged TOAST value.
        setup_sql: "CREATE TABLE public.t (id bigint PRIMARY KEY, tx int NOT NULL, v text NOT NULL, doc text);\
                    ALTER TABLE public.t ALTER COLUMN doc SET STORAGE EXTERNAL;"
            .into(),
        tables: vec![TABLE.into()],
        source_extra: "      heartbeat: 1s\n      status_interval: 1s\n".into(),
        extra_sinks,
        ..RigOpts::default()
    }
}

/// Source transactions `from..to`: each inserts `TX_ROWS` rows with a 3.2 kB `doc`, then
/// updates `v` of some rows of the transaction before it (leaving `doc` untouched) and
/// deletes others.
fn write_txs(rig: &CdcRig, from: u64, to: u64) {
    rig.insert_txs(
        TABLE,
        from,
        to,
        TX_ROWS,
        "md5(g::text), repeat(md5(g::text), 100)",
    );
    let mut sql = String::new();
    for tx in from..to {
        let prev = tx.saturating_sub(1);
        sql.push_str(&format!(
            "BEGIN; UPDATE {TABLE} SET v = 'u' || v WHERE tx = {prev} AND id % 3 = 0; \
             DELETE FROM {TABLE} WHERE tx = {prev} AND id % 5 = 0; COMMIT;\n"
        ));
    }
    rig.source.psql(&sql);
}

/// Writes all along while relay-outer is killed twice and `restart_target` runs once;
/// a TRUNCATE early on.
fn faulty_run(rig: &mut CdcRig, mut restart_target: impl FnMut()) {
    let t0 = Instant::now();
    let mut next = 0;
    write_txs(rig, next, next + 5);
    next += 5;
    rig.source.psql(&format!("TRUNCATE {TABLE}"));
    for round in 0..4 {
        for _ in 0..8 {
            write_txs(rig, next, next + 2);
            next += 2;
            std::thread::sleep(Duration::from_millis(50));
        }
        match round {
            0 | 2 => {
                rig.kill_outer();
                write_txs(rig, next, next + 3);
                next += 3;
                rig.start_outer();
            }
            1 => restart_target(),
            _ => {}
        }
    }
    assert!(t0.elapsed() < Duration::from_secs(180));
}

/// The source's rows as `id,tx,v,md5(doc)` lines.
fn source_rows(rig: &CdcRig) -> String {
    rig.source.psql(&format!(
        "SELECT coalesce(string_agg(id || ',' || tx || ',' || v || ',' || coalesce(md5(doc), '-'), E'\\n' ORDER BY id), '') FROM {TABLE}"
    ))
}

/// The source's rows as `id,tx,v,doc` lines (doc `-` when NULL).
fn source_rows_full(rig: &CdcRig) -> String {
    rig.source.psql(&format!(
        "SELECT coalesce(string_agg(id || ',' || tx || ',' || v || ',' || coalesce(doc, '-'), E'\\n' ORDER BY id), '') FROM {TABLE}"
    ))
}

/// Applies change events (`cdc tail` shape) in order to rows by id; what the table holds
/// at the end as `id,tx,v,doc` lines.
fn replay_changes<'a>(events: impl Iterator<Item = &'a serde_json::Value>) -> String {
    use std::collections::BTreeMap;
    let mut rows: BTreeMap<i64, serde_json::Map<String, serde_json::Value>> = BTreeMap::new();
    let id_of = |v: &serde_json::Value| -> i64 {
        v["id"].as_str().and_then(|s| s.parse().ok()).expect("id")
    };
    for e in events {
        match e["event"].as_str() {
            Some("insert") | Some("update") => {
                let new = e["new"].as_object().expect("new").clone();
                if let Some(old) = e.get("old").filter(|o| o.is_object()) {
                    rows.remove(&id_of(old));
                }
                let id = id_of(&e["new"]);
                let mut row = rows.remove(&id).unwrap_or_default();
                for (k, v) in new {
                    // An unchanged TOAST value keeps what the row had.
                    if v.get("unchanged_toast").is_none() {
                        row.insert(k, v);
                    }
                }
                rows.insert(id, row);
            }
            Some("delete") => {
                rows.remove(&id_of(&e["old"]));
            }
            Some("truncate") => rows.clear(),
            _ => {}
        }
    }
    let text =
        |v: Option<&serde_json::Value>| v.and_then(|v| v.as_str()).unwrap_or("-").to_string();
    rows.iter()
        .map(|(id, r)| {
            format!(
                "{id},{},{},{}",
                text(r.get("tx")),
                text(r.get("v")),
                text(r.get("doc"))
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Panics with a short difference between two line lists.
fn assert_same_rows(what: &str, got: &str, want: &str) {
    if got.trim_end() == want.trim_end() {
        return;
    }
    let (g, w): (Vec<&str>, Vec<&str>) = (got.lines().collect(), want.lines().collect());
    let short = |l: &&str| l.chars().take(80).collect::<String>();
    let missing: Vec<_> = w
        .iter()
        .filter(|l| !g.contains(l))
        .take(5)
        .map(short)
        .collect();
    let extra: Vec<_> = g
        .iter()
        .filter(|l| !w.contains(l))
        .take(5)
        .map(short)
        .collect();
    panic!(
        "{what}: {} rows, the source {}; missing or different e.g. {missing:?}, extra e.g. {extra:?}",
        g.len(),
        w.len()
    );
}

fn ch_sink(name: &str, ch: &ClickHouse) -> String {
    format!(
        "    - name: {name}\n      source: site-a/main\n      retry: {{ initial: 50ms, max: 500ms }}\n      clickhouse:\n        url: \"{}\"\n        database: analytics\n        timeout: 10s\n        batch: {{ max_rows: 500, max_delay: 50ms }}\n",
        ch.url()
    )
}

#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn clickhouse_holds_the_source_rows_through_kills_and_a_restart() {
    require_root();
    let mut ch = ClickHouse::start();
    let mut rig = CdcRig::start(opts(ch_sink("warehouse", &ch)));
    rig.wait_shipping();
    faulty_run(&mut rig, || ch.restart());
    rig.wait_in_sync(&[TABLE], CATCH_UP);
    let want = source_rows(&rig);
    let query = "SELECT concat(toString(id), ',', toString(tx), ',', v, ',', \
                 if(isNull(doc), '-', lower(hex(MD5(assumeNotNull(doc)))))) \
                 FROM analytics.t FINAL ORDER BY id FORMAT TSVRaw";
    let res = try_wait_until(CATCH_UP, "ClickHouse holds the source's rows", || {
        ch.try_query(query)
            .is_ok_and(|got| got.trim_end() == want.trim_end())
    });
    if let Err(e) = res {
        let got = ch.try_query(query).unwrap_or_else(|e| e);
        let (g, w): (Vec<&str>, Vec<&str>) = (got.lines().collect(), want.lines().collect());
        let diff: Vec<_> = w.iter().filter(|l| !g.contains(l)).take(5).collect();
        panic!(
            "{e}: {} rows in ClickHouse, {} on the source; missing or different e.g. {diff:?}\n--- relay-outer ---\n{}",
            g.len(),
            w.len(),
            rig.outer
                .as_ref()
                .map(|o| routy_e2e::log_tail(&o.proc.log(), 60))
                .unwrap_or_default()
        );
    }
    // Untouched TOAST values were carried: every updated row still has its doc.
    let updated = ch.query(
        "SELECT count(), countIf(isNull(doc) OR length(doc) != 3200) FROM analytics.t FINAL WHERE startsWith(v, 'u')",
    );
    let (n, bad) = updated.split_once('\t').unwrap();
    assert!(n.parse::<u64>().unwrap() > 0, "{updated}");
    assert_eq!(bad, "0", "updated rows lost their doc");
    // Every version the table received more than once collapsed: one row per key.
    assert_eq!(
        ch.query("SELECT count() = uniqExact(id) FROM analytics.t FINAL"),
        "1"
    );
    let raw = ch.query("SELECT count() FROM analytics.t");
    let fin = ch.query("SELECT count() FROM analytics.t FINAL");
    eprintln!("clickhouse: {raw} rows stored, {fin} current");
    let (ok, sinks) = rig.outer_cdc(&["sinks"]);
    assert!(ok, "{sinks}");
    assert!(
        sinks.contains("warehouse") && sinks.contains("clickhouse"),
        "{sinks}"
    );
}

fn nats_sink(name: &str, server: &NatsServer) -> String {
    format!(
        "    - name: {name}\n      source: site-a/main\n      retry: {{ initial: 50ms, max: 500ms }}\n      nats:\n        url: \"{}\"\n        stream: CDC\n        subject_prefix: cdc\n        timeout: 2s\n        batch: {{ max_messages: 200, max_delay: 20ms }}\n",
        server.url()
    )
}

#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn nats_stream_replays_into_the_source_rows_through_kills_and_a_restart() {
    require_root();
    let mut server = NatsServer::start();
    let mut rig = CdcRig::start(opts(nats_sink("stream", &server)));
    rig.wait_shipping();
    faulty_run(&mut rig, || server.restart());
    rig.wait_in_sync(&[TABLE], CATCH_UP);
    let want = source_rows_full(&rig);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut got = String::new();
    let mut msgs = Vec::new();
    let res = try_wait_until(
        CATCH_UP,
        "the NATS stream replays into the source's rows",
        || {
            msgs = rt.block_on(server.read_stream("CDC"));
            let events: Vec<serde_json::Value> = msgs
                .iter()
                .map(|m| serde_json::from_slice(&m.payload).expect("JSON body"))
                .collect();
            got = replay_changes(events.iter());
            got.trim_end() == want.trim_end()
        },
    );
    if res.is_err() {
        assert_same_rows("NATS replayed", &got, &want);
    }
    // Every change is in the stream once: re-sends were dropped by their message id.
    let mut ids: Vec<&str> = msgs
        .iter()
        .filter_map(|m| m.header("Nats-Msg-Id"))
        .collect();
    let n = ids.len();
    assert_eq!(n, msgs.len(), "every message has an id");
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), n, "a change is in the stream twice");
    eprintln!(
        "nats: {n} messages; repeats the stream dropped since the last relay-outer start: {}",
        rig.outer()
            .metric("routy_cdc_sink_duplicates_total", &[("sink", "stream")])
    );
}

fn kafka_sink(name: &str, broker: &Tansu) -> String {
    format!(
        "    - name: {name}\n      source: site-a/main\n      retry: {{ initial: 50ms, max: 500ms }}\n      kafka:\n        brokers: [\"{}\"]\n        topic_prefix: cdc\n        partitions: 3\n        timeout: 2s\n        batch: {{ max_messages: 200, max_delay: 20ms }}\n",
        broker.broker()
    )
}

/// `SEQ.INDEX` as a pair, to compare.
fn position(p: &str) -> (u64, u32) {
    let (s, i) = p.split_once('.').unwrap_or((p, "0"));
    (s.parse().unwrap_or(0), i.parse().unwrap_or(0))
}

#[test]
#[cfg_attr(
    any(routy_e2e_skip, not(feature = "kafka")),
    ignore = "end-to-end: needs root, ROUTY_E2E=1 and the feature kafka; run tests/run"
)]
fn kafka_topic_replays_into_the_source_rows_through_kills_and_an_outage() {
    require_root();
    let broker = Tansu::start();
    let mut rig = CdcRig::start(opts(kafka_sink("log", &broker)));
    rig.wait_shipping();
    // Tansu keeps its data in memory: the broker is made unreachable for a while
    // (stopped, then continued) rather than restarted.
    faulty_run(&mut rig, || broker.pause(Duration::from_secs(4)));
    rig.wait_in_sync(&[TABLE], CATCH_UP);
    let want = source_rows_full(&rig);
    let mut got = String::new();
    let mut dropped = 0;
    let res = try_wait_until(
        CATCH_UP,
        "the Kafka topic replays into the source's rows",
        || {
            let msgs = read_topic(&broker.broker(), "cdc.public.t", Duration::from_secs(2));
            // Per partition in offset order (a row's changes are all in one), dropping a
            // message whose position is not past the last one applied (a re-send).
            let mut lines: Vec<(i64, String)> = Vec::new();
            dropped = 0;
            let parts: std::collections::BTreeSet<i32> = msgs.iter().map(|m| m.partition).collect();
            for p in parts {
                let mut ms: Vec<_> = msgs.iter().filter(|m| m.partition == p).collect();
                ms.sort_by_key(|m| m.offset);
                let mut last = None;
                let mut events = Vec::new();
                for m in ms {
                    let pos = position(&m.header("routy-position").expect("routy-position"));
                    if last.is_some_and(|l| pos <= l) {
                        dropped += 1;
                        continue;
                    }
                    last = Some(pos);
                    events.push(
                        serde_json::from_slice::<serde_json::Value>(&m.payload).expect("JSON"),
                    );
                }
                for l in replay_changes(events.iter())
                    .lines()
                    .filter(|l| !l.is_empty())
                {
                    let id = l
                        .split(',')
                        .next()
                        .and_then(|x| x.parse().ok())
                        .unwrap_or(0);
                    lines.push((id, l.to_string()));
                }
            }
            lines.sort();
            got = lines
                .into_iter()
                .map(|(_, l)| l)
                .collect::<Vec<_>>()
                .join("\n");
            got.trim_end() == want.trim_end()
        },
    );
    if res.is_err() {
        assert_same_rows("Kafka replayed", &got, &want);
    }
    eprintln!("kafka: re-sent messages dropped by their position: {dropped}");
}
