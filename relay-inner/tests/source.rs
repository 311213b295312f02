//! The CDC source against a real PostgreSQL: snapshot and stream meet exactly, a copy
//! resumes at its table, events (TOAST, TRUNCATE, messages, non-ASCII), slot and
//! publication lifecycle, lost slot, heartbeat, source restart, TLS, a stalled walsender.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use relay_inner::cdc::replication::parse_lsn;
use relay_inner::cdc::source::{self, SourceError, SourceStatus, TestHooks};
use relay_inner::cdc::spool::Spool;
use relay_inner::config::{SnapshotMode, SourceConfig};
use relay_proto::cdc::{Event, Record, Relations, SnapshotPhase, Value};
use routy_e2e::{Pg, PgOpts};
use routy_log::segment_log::Reader;
use routy_ops::drain::Drain;
use tokio::task::JoinHandle;

/// A temporary directory, removed on drop.
struct TmpDir(PathBuf);

impl TmpDir {
    fn new(tag: &str) -> TmpDir {
        let p = std::env::temp_dir().join(format!(
            "routy-source-{tag}-{}-{:x}",
            std::process::id(),
            rand_u64()
        ));
        std::fs::create_dir_all(&p).unwrap();
        TmpDir(p)
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish()
}

fn source_cfg(dsn: &str, name: &str, tables: &[&str]) -> SourceConfig {
    SourceConfig {
        name: name.into(),
        dsn: dsn.into(),
        slot: format!("routy_{name}"),
        publication: format!("routy_{name}"),
        tables: tables.iter().map(|t| t.to_string()).collect(),
        filters: Default::default(),
        mask_key_file: None,
        snapshot: SnapshotMode::Initial,
        heartbeat: Duration::ZERO,
        status_interval: Duration::from_secs(1),
        receive_timeout: relay_inner::config::DEFAULT_RECEIVE_TIMEOUT,
        resync_chunk_rows: relay_inner::config::DEFAULT_RESYNC_CHUNK_ROWS,
        snapshot_parallelism: relay_inner::config::DEFAULT_SNAPSHOT_PARALLELISM,
        snapshot_chunk_rows: relay_inner::config::DEFAULT_SNAPSHOT_CHUNK_ROWS,
    }
}

/// One running source.
struct Running {
    stop: Drain,
    status: Arc<SourceStatus>,
    task: JoinHandle<Result<(), SourceError>>,
}

fn start(cfg: &SourceConfig, spool: &Arc<Spool>, hooks: TestHooks) -> Running {
    let stop = Drain::new();
    let status = Arc::new(SourceStatus::default());
    let task = tokio::spawn(source::run_with_hooks(
        cfg.clone(),
        spool.clone(),
        stop.clone(),
        status.clone(),
        hooks,
    ));
    Running { stop, status, task }
}

impl Running {
    async fn stop(self) -> Result<(), SourceError> {
        self.stop.stop();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("source stops within 30 s")
            .unwrap()
    }

    async fn wait_phase(&self, phase: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.status.phase() != phase {
            assert!(
                !self.task.is_finished(),
                "source ended early; status {}",
                self.status.to_json()
            );
            assert!(
                Instant::now() < deadline,
                "no phase {phase} within 60 s: {}",
                self.status.to_json()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Applies spooled records like a sink would, failing on a duplicate insert.
struct Model {
    rels: Relations,
    /// table → key → row (column name → value)
    tables: HashMap<String, BTreeMap<i64, BTreeMap<String, Value>>>,
    pending: Option<Vec<Event>>,
    events: Vec<Event>,
    records: Vec<Record>,
    reader: Reader,
    /// Tables whose copy was a snapshot (`Start`): there, a change to a row the model does
    /// not have is an error. Elsewhere (a resync) it is what a sink does: nothing, and
    /// the resync's chunks bring the row.
    strict: std::collections::HashSet<String>,
}

impl Model {
    fn new(spool: &Spool) -> Model {
        Model {
            rels: Relations::default(),
            tables: HashMap::new(),
            strict: Default::default(),
            pending: None,
            events: Vec::new(),
            records: Vec::new(),
            reader: spool.reader(1).unwrap(),
        }
    }

    fn poll(&mut self) {
        while let Some(r) = self.reader.next() {
            let (_, payload) = r.unwrap();
            let rec = Record::decode(&payload).unwrap();
            for ev in &rec.events {
                self.events.push(ev.clone());
                match ev {
                    Event::Begin { .. } => self.pending = Some(Vec::new()),
                    Event::Commit { .. } => {
                        for e in self.pending.take().expect("commit without begin") {
                            self.apply(&e);
                        }
                    }
                    e => match &mut self.pending {
                        Some(p) => p.push(e.clone()),
                        None => self.apply(e),
                    },
                }
            }
            self.records.push(rec);
        }
    }

    fn row(&self, rel: u32, vals: &[Value]) -> (String, i64, BTreeMap<String, Value>) {
        let r = self.rels.get(rel).expect("relation before use");
        let mut key = None;
        let mut row = BTreeMap::new();
        for (c, v) in r.columns.iter().zip(vals) {
            if c.key && key.is_none() {
                if let Value::Text(t) = v {
                    key = Some(t.parse::<i64>().unwrap());
                }
            }
            row.insert(c.name.clone(), v.clone());
        }
        (r.qualified(), key.expect("key value"), row)
    }

    fn apply(&mut self, ev: &Event) {
        self.rels.observe(ev);
        match ev {
            Event::Snapshot {
                rel,
                phase: SnapshotPhase::Start,
                ..
            } => {
                let t = self.rels.get(*rel).unwrap().qualified();
                self.strict.insert(t.clone());
                self.tables.insert(t, BTreeMap::new());
            }
            Event::Insert { rel, new } => {
                let (t, k, row) = self.row(*rel, new);
                let prev = self.tables.entry(t.clone()).or_default().insert(k, row);
                assert!(
                    prev.is_none() || !self.strict.contains(&t),
                    "duplicate insert of {t} id {k}"
                );
            }
            Event::Chunk { rel, lo, hi, keys } => {
                let t = self.rels.get(*rel).unwrap().qualified();
                let num = |v: &[Value]| match v.first() {
                    Some(Value::Text(s)) => s.parse::<i64>().unwrap(),
                    _ => panic!("a key without a value"),
                };
                let (lo, hi) = (lo.as_deref().map(num), hi.as_deref().map(num));
                let keep: std::collections::HashSet<i64> = keys.iter().map(|k| num(k)).collect();
                self.tables.entry(t).or_default().retain(|k, _| {
                    lo.is_some_and(|lo| *k <= lo)
                        || hi.is_some_and(|hi| *k > hi)
                        || keep.contains(k)
                });
            }
            Event::Update { rel, old, new } => {
                let (t, k, mut row) = self.row(*rel, new);
                let old_k = old.as_ref().map_or(k, |o| self.row(*rel, &o.values).1);
                let strict = self.strict.contains(&t);
                let table = self.tables.entry(t.clone()).or_default();
                let Some(prev) = table.remove(&old_k) else {
                    assert!(!strict, "update of missing {t} id {old_k}");
                    return;
                };
                for (c, v) in row.iter_mut() {
                    if *v == Value::Unchanged {
                        *v = prev[c].clone();
                    }
                }
                table.insert(k, row);
            }
            Event::Delete { rel, old } => {
                let (t, k, _) = self.row(*rel, &old.values);
                let gone = self.tables.entry(t.clone()).or_default().remove(&k);
                assert!(
                    gone.is_some() || !self.strict.contains(&t),
                    "delete of missing {t} id {k}"
                );
            }
            Event::Truncate { rels, .. } => {
                for r in rels {
                    let t = self.rels.get(*r).unwrap().qualified();
                    self.tables.insert(t, BTreeMap::new());
                }
            }
            _ => {}
        }
    }

    /// `id:v` lines of a table, like [`pg_rows`].
    fn rows(&self, table: &str) -> Vec<String> {
        self.tables
            .get(table)
            .map(|t| {
                t.iter()
                    .map(|(k, row)| {
                        format!(
                            "{k}:{}",
                            match &row["v"] {
                                Value::Text(s) => s.clone(),
                                Value::Null => "NULL".into(),
                                Value::Unchanged => "UNCHANGED".into(),
                            }
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn wait_for(&mut self, what: &str, mut cond: impl FnMut(&Model) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.poll();
            if cond(self) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_matches(&mut self, pg: &Pg, table: &str) {
        let want = pg_rows(pg, table);
        self.wait_for(&format!("{table} to match the source"), |m| {
            m.rows(table) == want
        })
        .await;
    }
}

fn pg_rows(pg: &Pg, table: &str) -> Vec<String> {
    pg.psql(&format!(
        "SELECT id || ':' || coalesce(v, 'NULL') FROM {table} ORDER BY id"
    ))
    .lines()
    .map(str::to_string)
    .filter(|l| !l.is_empty())
    .collect()
}

fn slot_lsn(pg: &Pg, slot: &str) -> u64 {
    let s = pg.psql(&format!(
        "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{slot}'"
    ));
    parse_lsn(s.trim()).unwrap_or(0)
}

fn logical_pg(extra: &[&str]) -> Pg {
    let mut conf = vec!["wal_level = logical".to_string()];
    conf.extend(extra.iter().map(|s| s.to_string()));
    Pg::start(PgOpts {
        extra_conf: conf,
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_and_stream_meet_exactly_with_every_event_kind() {
    let pg = logical_pg(&[]);
    pg.psql(
        "CREATE TABLE a (id int PRIMARY KEY, v text);
         CREATE TABLE b (id int PRIMARY KEY, v text, big text, n int);
         CREATE TABLE c (id int PRIMARY KEY, v text);
         INSERT INTO a SELECT g, 'row ' || g FROM generate_series(1, 20000) g;
         INSERT INTO b VALUES (1, 'grüße 🎉 ñ', (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 500) g), 0);
         INSERT INTO c SELECT g, 'c' || g FROM generate_series(1, 10) g;",
    );
    let dir = TmpDir::new("meet");
    let spool = Spool::open(&dir.0, 1 << 30).unwrap();
    let mut cfg = source_cfg(
        &pg.conninfo(),
        "meet",
        &["public.a", "public.b", "public.c"],
    );
    cfg.heartbeat = Duration::from_secs(1);
    // Writes race the copy: some land before the slot, some during the copy, some after.
    let conninfo = (pg.host().to_string(), pg.port());
    let writer = tokio::task::spawn_blocking(move || {
        for i in 0..40 {
            routy_e2e::psql_at(
                &conninfo.0,
                conninfo.1,
                &format!(
                    "INSERT INTO a VALUES ({id}, 'during'); UPDATE a SET v = 'upd {i}' WHERE id = {i} + 1; DELETE FROM a WHERE id = 20000 - {i};",
                    id = 100000 + i
                ),
            )
            .unwrap();
            std::thread::sleep(Duration::from_millis(25));
        }
    });
    let run = start(&cfg, &spool, TestHooks::default());
    writer.await.unwrap();
    run.wait_phase("streaming").await;

    // Created: the publication for the tables, the slot.
    assert_eq!(
        pg.psql("SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_publication_tables WHERE pubname = 'routy_meet'"),
        "a,b,c"
    );
    assert_eq!(
        pg.psql("SELECT plugin FROM pg_replication_slots WHERE slot_name = 'routy_meet'"),
        "pgoutput"
    );

    pg.psql(
        "UPDATE b SET n = n + 1 WHERE id = 1;
         INSERT INTO b VALUES (2, 'ascii', 'small', 0);
         TRUNCATE c;
         BEGIN; INSERT INTO a VALUES (200000, 'in txn'); SELECT pg_logical_emit_message(true, 'app', 'tx message'); COMMIT;
         SELECT pg_logical_emit_message(false, 'app', 'loose message');",
    );
    let mut m = Model::new(&spool);
    m.wait_matches(&pg, "public.a").await;
    m.wait_for("the loose message", |m| {
        m.events.iter().any(|e| {
            matches!(
                e,
                Event::Message {
                    transactional: false,
                    ..
                }
            )
        })
    })
    .await;
    m.wait_matches(&pg, "public.b").await;
    assert!(m.rows("public.c").is_empty());

    // Every table copied exactly once, records well formed.
    let starts = m
        .events
        .iter()
        .filter(|e| {
            matches!(
                e,
                Event::Snapshot {
                    phase: SnapshotPhase::Start,
                    ..
                }
            )
        })
        .count();
    assert_eq!(starts, 3);
    let mut seen_rel = std::collections::HashSet::new();
    for rec in &m.records {
        seen_rel.clear();
        assert!(rec.encode().len() <= 8 << 20, "record above 8 MiB");
        for (i, e) in rec.events.iter().enumerate() {
            match e {
                Event::Relation(r) => {
                    seen_rel.insert(r.id);
                }
                Event::Insert { rel, .. }
                | Event::Update { rel, .. }
                | Event::Delete { rel, .. } => {
                    assert!(
                        seen_rel.contains(rel),
                        "row event before its relation in {rec:?}"
                    )
                }
                Event::Commit { end_lsn, .. } => {
                    assert_eq!(i, rec.events.len() - 1, "commit ends its record");
                    assert_eq!(rec.lsn, *end_lsn);
                }
                _ => {}
            }
        }
    }
    // Big copy cut into records of about 256 KiB.
    assert!(m.records.len() > 5, "{} records", m.records.len());

    // Relation schema: names, types, key.
    let rel_b = m
        .events
        .iter()
        .find_map(|e| match e {
            Event::Relation(r) if r.name == "b" => Some(r.clone()),
            _ => None,
        })
        .unwrap();
    let cols: Vec<_> = rel_b
        .columns
        .iter()
        .map(|c| (c.name.as_str(), c.type_name.as_str(), c.key))
        .collect();
    assert_eq!(
        cols,
        [
            ("id", "integer", true),
            ("v", "text", false),
            ("big", "text", false),
            ("n", "integer", false)
        ]
    );
    // TOAST: the untouched big value is marked unchanged, not NULL.
    assert!(m.events.iter().any(|e| matches!(e,
        Event::Update { rel, new, .. } if *rel == rel_b.id && new[2] == Value::Unchanged && new[3] == Value::Text("1".into()))));
    // Non-ASCII text intact, in the copy.
    assert!(m.rows("public.b").contains(&"1:grüße 🎉 ñ".to_string()));
    // TRUNCATE and messages are events; heartbeats are not spooled.
    assert!(m.events.iter().any(|e| matches!(e, Event::Truncate { .. })));
    assert!(m.events.iter().any(|e| matches!(e,
        Event::Message { transactional: true, prefix, content, .. } if prefix == "app" && content == b"tx message")));
    assert!(!m.events.iter().any(|e| matches!(e,
        Event::Message { prefix, .. } if prefix == relay_proto::cdc::HEARTBEAT_PREFIX)));

    // Heartbeat: the published tables are idle, other tables are written; the slot keeps up.
    pg.psql("CREATE TABLE other (x int); INSERT INTO other SELECT generate_series(1, 1000);");
    let target = parse_lsn(pg.psql("SELECT pg_current_wal_lsn()").trim()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while slot_lsn(&pg, "routy_meet") < target {
        assert!(
            Instant::now() < deadline,
            "slot stayed at {:X} below {target:X}",
            slot_lsn(&pg, "routy_meet")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let j = run.status.to_json();
    assert_eq!(j["phase"], "streaming");
    assert!(j["retained_wal_bytes"].is_u64(), "{j}");
    assert!(j["wal_status"].is_string(), "{j}");
    run.stop().await.unwrap();

    // drop-slot: the slot goes, the snapshot state is reset.
    let msg = source::drop_slot(&cfg, &dir.0).await.unwrap();
    assert!(msg.contains("dropped replication slot routy_meet"), "{msg}");
    assert_eq!(
        pg.psql("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'routy_meet'"),
        "0"
    );
    let state = std::fs::read_to_string(dir.0.join("source-state.json")).unwrap();
    assert!(!state.contains("\"done\""), "{state}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_during_the_copy_keeps_copied_tables_and_resyncs_the_rest() {
    let pg = logical_pg(&[]);
    pg.psql(
        "CREATE TABLE t1 (id int PRIMARY KEY, v text);
         CREATE TABLE t2 (id int PRIMARY KEY, v text);
         CREATE TABLE t3 (id int PRIMARY KEY, v text);
         INSERT INTO t1 SELECT g, 'one' FROM generate_series(1, 500) g;
         INSERT INTO t2 SELECT g, 'two' FROM generate_series(1, 500) g;
         INSERT INTO t3 SELECT g, 'three' FROM generate_series(1, 500) g;",
    );
    let dir = TmpDir::new("resume");
    let cfg = source_cfg(
        &pg.conninfo(),
        "resume",
        &["public.t1", "public.t2", "public.t3"],
    );
    {
        let spool = Spool::open(&dir.0, 1 << 30).unwrap();
        let run = start(
            &cfg,
            &spool,
            TestHooks {
                stop_after_tables: Some(1),
            },
        );
        tokio::time::timeout(Duration::from_secs(60), run.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
    let state = std::fs::read_to_string(dir.0.join("source-state.json")).unwrap();
    assert!(
        state.contains("public.t1") && !state.contains("public.t2"),
        "{state}"
    );
    // Changes between the first snapshot and the resumed one: streamed from the slot, and
    // for t2/t3 also in the new copy; they must arrive once.
    pg.psql(
        "UPDATE t1 SET v = 'one changed' WHERE id = 1;
         INSERT INTO t2 VALUES (1000, 'two before P2');
         DELETE FROM t2 WHERE id = 2;
         INSERT INTO t3 VALUES (1000, 'three before P2');
         UPDATE t3 SET v = 'three changed' WHERE id = 3;",
    );
    let spool = Spool::open(&dir.0, 1 << 30).unwrap();
    let run = start(&cfg, &spool, TestHooks::default());
    run.wait_phase("streaming").await;
    pg.psql(
        "INSERT INTO t2 VALUES (2000, 'two after'); UPDATE t1 SET v = 'one after' WHERE id = 2;
         UPDATE t2 SET v = 'two after' WHERE id = 1000;",
    );
    let mut m = Model::new(&spool);
    for t in ["public.t1", "public.t2", "public.t3"] {
        m.wait_matches(&pg, t).await;
    }
    // t1 was copied in the slot's snapshot; t2 and t3, cut off by the stop, are copied
    // by a resync while the stream goes on.
    let phases = |want: SnapshotPhase| -> usize {
        m.events
            .iter()
            .filter(|e| matches!(e, Event::Snapshot { phase, .. } if *phase == want))
            .count()
    };
    assert_eq!(phases(SnapshotPhase::Start), 1, "t1 copied once");
    assert_eq!(phases(SnapshotPhase::Resync), 2, "t2 and t3 by a resync");
    run.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_restart_reconnects_without_loss_or_duplicate() {
    let mut pg = logical_pg(&[]);
    pg.psql("CREATE TABLE r (id int PRIMARY KEY, v text); INSERT INTO r VALUES (0, 'zero');");
    let dir = TmpDir::new("restart");
    let spool = Spool::open(&dir.0, 1 << 30).unwrap();
    let cfg = source_cfg(&pg.conninfo(), "restart", &["public.r"]);
    let run = start(&cfg, &spool, TestHooks::default());
    run.wait_phase("streaming").await;
    for i in 1..=50 {
        pg.psql(&format!("INSERT INTO r VALUES ({i}, 'before')"));
    }
    pg.restart();
    for i in 51..=100 {
        pg.psql(&format!(
            "INSERT INTO r VALUES ({i}, 'after'); UPDATE r SET v = 'u' WHERE id = {}",
            i - 50
        ));
    }
    let mut m = Model::new(&spool);
    m.wait_matches(&pg, "public.r").await;
    run.wait_phase("streaming").await;
    assert!(run.status.last_error().is_none() || run.status.phase() == "streaming");
    run.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_slot_stops_the_source_with_instructions() {
    let pg = logical_pg(&[
        "max_slot_wal_keep_size = 1MB",
        "max_wal_size = 32MB",
        "min_wal_size = 32MB",
    ]);
    pg.psql("CREATE TABLE l (id int PRIMARY KEY, v text); INSERT INTO l VALUES (1, 'x');");
    let dir = TmpDir::new("lost");
    let spool = Spool::open(&dir.0, 1 << 30).unwrap();
    let cfg = source_cfg(&pg.conninfo(), "lost", &["public.l"]);
    let run = start(&cfg, &spool, TestHooks::default());
    run.wait_phase("streaming").await;
    run.stop().await.unwrap();
    // Not reading: WAL piles up beyond max_slot_wal_keep_size and is removed.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let st =
            pg.psql("SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'routy_lost'");
        if st == "lost" {
            break;
        }
        assert!(Instant::now() < deadline, "slot not lost: {st}");
        pg.psql(
            "INSERT INTO l SELECT g, repeat('y', 500) FROM generate_series(1000, 5000) g ON CONFLICT DO NOTHING;
             DELETE FROM l WHERE id >= 1000; SELECT pg_switch_wal(); CHECKPOINT;",
        );
    }
    let run = start(&cfg, &spool, TestHooks::default());
    let res = tokio::time::timeout(Duration::from_secs(60), run.task)
        .await
        .unwrap()
        .unwrap();
    let err = res.expect_err("a lost slot is fatal");
    assert!(err.is_fatal());
    let text = err.to_string();
    for want in [
        "invalidated",
        "relay-inner cdc drop-slot --source lost",
        "max_slot_wal_keep_size",
    ] {
        assert!(text.contains(want), "{want:?} missing in: {text}");
    }
    assert_eq!(run.status.phase(), "failed");
    // The way out works.
    source::drop_slot(&cfg, &dir.0).await.unwrap();
    let run = start(&cfg, &spool, TestHooks::default());
    run.wait_phase("streaming").await;
    run.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_source_follows_sslmode() {
    let certs = TmpDir::new("certs");
    routy_e2e::make_pg_certs(&certs.0);
    let pg = logical_pg(&[
        "ssl = on",
        &format!("ssl_cert_file = '{}'", certs.0.join("server.crt").display()),
        &format!("ssl_key_file = '{}'", certs.0.join("server.key").display()),
    ]);
    pg.psql("CREATE TABLE s (id int PRIMARY KEY, v text); INSERT INTO s VALUES (1, 'secret');");
    let ca = certs.0.join("ca.crt");
    let other = certs.0.join("other.crt");
    for (i, (mode, root, ok)) in [
        ("verify-full", Some(&ca), true),
        ("require", None, true),
        ("verify-ca", Some(&other), false),
        ("verify-full", Some(&other), false),
    ]
    .into_iter()
    .enumerate()
    {
        let dsn = format!(
            "{} sslmode={mode}{}",
            pg.conninfo(),
            root.map(|r| format!(" sslrootcert={}", r.display()))
                .unwrap_or_default()
        );
        let dir = TmpDir::new("tls");
        let spool = Spool::open(&dir.0, 1 << 30).unwrap();
        let name = format!("tls{i}");
        let cfg = source_cfg(&dsn, &name, &["public.s"]);
        let run = start(&cfg, &spool, TestHooks::default());
        if ok {
            run.wait_phase("streaming").await;
            let encrypted = pg.psql(
                "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'routy' AND s.ssl",
            );
            assert!(
                encrypted.parse::<u32>().unwrap() >= 2,
                "{mode}: {encrypted} TLS connections"
            );
            let mut m = Model::new(&spool);
            m.wait_matches(&pg, "public.s").await;
        } else {
            let deadline = Instant::now() + Duration::from_secs(30);
            let err = loop {
                if let Some(e) = run.status.last_error() {
                    break e;
                }
                assert!(Instant::now() < deadline, "{mode}: no error reported");
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            assert!(
                err.contains("TLS handshake") && err.contains("UnknownIssuer"),
                "{mode}: {err}"
            );
            assert_ne!(run.status.phase(), "streaming");
        }
        run.stop().await.unwrap();
        if ok {
            source::drop_slot(&cfg, &dir.0).await.unwrap();
        }
    }
}

/// The walsender serving the slot (`pg_replication_slots.active_pid`), once there is one.
async fn walsender_pid(pg: &Pg, slot: &str) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pid = pg.psql(&format!(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ));
        if let Ok(pid) = pid.parse() {
            return pid;
        }
        assert!(Instant::now() < deadline, "slot {slot} has no walsender");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A process stopped with SIGSTOP; continued (SIGCONT) on drop, also when the test fails,
/// so the cluster can be shut down.
struct Stopped(u32);

impl Stopped {
    fn new(pid: u32) -> Stopped {
        signal(pid, "STOP");
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        signal(self.0, "CONT");
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

/// The walsender serving the source stops (SIGSTOP): relay-inner notices within about
/// `receive_timeout`, keeps reporting the WAL the slot really retains while it cannot
/// stream, and once the walsender runs again it streams on a new connection with no change
/// lost. Before that, an idle but healthy server that never sends keepalives on its own
/// (`wal_sender_timeout = 0`) is not mistaken for a dead one: relay-inner asks for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_walsender_is_noticed_and_replaced_without_loss() {
    let pg = logical_pg(&["wal_sender_timeout = 0"]);
    pg.psql(
        "CREATE TABLE w (id int PRIMARY KEY, v text); INSERT INTO w VALUES (0, 'zero');
         CREATE TABLE bulk (id int, pad text);",
    );
    let dir = TmpDir::new("stall");
    let spool = Spool::open(&dir.0, 1 << 30).unwrap();
    let mut cfg = source_cfg(&pg.conninfo(), "stall", &["public.w"]);
    let timeout = Duration::from_secs(3);
    cfg.receive_timeout = timeout;
    let run = start(&cfg, &spool, TestHooks::default());
    run.wait_phase("streaming").await;
    pg.psql("INSERT INTO w SELECT g, 'before' FROM generate_series(1, 100) g;");
    let mut m = Model::new(&spool);
    m.wait_matches(&pg, "public.w").await;

    // Idle and healthy for well over the timeout: the same walsender, no error.
    let first = walsender_pid(&pg, "routy_stall").await;
    tokio::time::sleep(timeout * 3).await;
    assert_eq!(run.status.phase(), "streaming", "{}", run.status.to_json());
    assert_eq!(run.status.last_error(), None, "idle is not dead");
    assert_eq!(walsender_pid(&pg, "routy_stall").await, first);

    // Stalled: noticed within about the timeout.
    let seen = run.status.recent_errors().len();
    assert!(
        seen < relay_inner::cdc::source::RECENT_ERRORS - 2,
        "{seen} errors before"
    );
    let stopped = Stopped::new(first);
    let stalled_at = Instant::now();
    pg.psql("INSERT INTO w SELECT g, 'during' FROM generate_series(101, 200) g;");
    // The stall's error, also when the retry's (the stopped walsender still holds the
    // slot) already replaced it as the last one.
    let err = loop {
        if let Some(e) = run.status.recent_errors().get(seen) {
            break e.clone();
        }
        assert!(
            stalled_at.elapsed() < timeout * 4,
            "stall not noticed after {:?}: {}",
            stalled_at.elapsed(),
            run.status.to_json()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let noticed = stalled_at.elapsed();
    eprintln!("stall noticed after {noticed:?}: {err}");
    // Silence counts from the last message, which came at most half the timeout before
    // the stop (the keepalive relay-inner asked for while idle).
    assert!(
        noticed >= timeout / 2 && noticed <= timeout + Duration::from_secs(2),
        "noticed after {noticed:?} with receive_timeout {timeout:?}: {err}"
    );
    assert!(
        err.contains("no message from PostgreSQL") && err.contains("receive_timeout"),
        "{err}"
    );

    // While it cannot stream (the stopped walsender still holds the slot), the retained
    // WAL is the slot's real one: write several MB of WAL and see it reported.
    let restart = parse_lsn(
        pg.psql("SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = 'routy_stall'")
            .trim(),
    )
    .unwrap();
    pg.psql(
        "INSERT INTO bulk SELECT g, repeat(md5(g::text), 30) FROM generate_series(1, 12000) g;",
    );
    let written = parse_lsn(pg.psql("SELECT pg_current_wal_lsn()").trim()).unwrap() - restart;
    assert!(written > 8 << 20, "only {written} bytes of WAL written");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = run.status.retained_wal_bytes().unwrap_or(0);
        if r >= written {
            eprintln!("retained WAL reported while stalled: {r} bytes");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "retained WAL reported as {r} bytes, the slot holds at least {written}: {}",
            run.status.to_json()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_ne!(run.status.phase(), "streaming");

    // The walsender runs again, finds its client gone and exits; relay-inner streams on a
    // new one and nothing is lost.
    drop(stopped);
    let resumed = Instant::now();
    pg.psql("INSERT INTO w SELECT g, 'after' FROM generate_series(201, 300) g; UPDATE w SET v = 'u' WHERE id <= 150;");
    run.wait_phase("streaming").await;
    eprintln!("streaming again {:?} after SIGCONT", resumed.elapsed());
    let second = walsender_pid(&pg, "routy_stall").await;
    assert_ne!(second, first, "a new walsender serves the slot");
    m.wait_matches(&pg, "public.w").await;
    run.stop().await.unwrap();
}

/// A full spool pauses reading, so the slot's WAL grows: the retained-WAL gauge reports it
/// meanwhile (it was read only between messages of the stream, so it stayed at its value
/// from before the pause), and the pause is not taken for a stalled server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_wal_is_reported_while_a_full_spool_pauses_reading() {
    let pg = logical_pg(&[]);
    pg.psql("CREATE TABLE f (id int PRIMARY KEY, v text); CREATE TABLE bulk (id int, pad text);");
    let dir = TmpDir::new("full");
    // 1 MiB segments; nothing is removed until the endpoint acknowledges.
    let spool = Spool::open(&dir.0, 1 << 20).unwrap();
    spool.set_endpoints(["outer".to_string()]);
    let mut cfg = source_cfg(&pg.conninfo(), "full", &["public.f"]);
    let timeout = Duration::from_secs(3);
    cfg.receive_timeout = timeout;
    let run = start(&cfg, &spool, TestHooks::default());
    run.wait_phase("streaming").await;

    // About 4 MiB of changes: the spool fills up and reading pauses.
    pg.psql("INSERT INTO f SELECT g, repeat(md5(g::text), 12) FROM generate_series(1, 10000) g;");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let size = spool.size_bytes();
        if size > 1 << 20 && size == last {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "spool did not fill: {size} bytes"
        );
        last = size;
    }
    let full_at = Instant::now();

    pg.psql(
        "INSERT INTO bulk SELECT g, repeat(md5(g::text), 30) FROM generate_series(1, 12000) g;",
    );
    let slot_holds: u64 = pg
        .psql("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8 FROM pg_replication_slots WHERE slot_name = 'routy_full'")
        .parse()
        .unwrap();
    assert!(
        slot_holds > 12 << 20,
        "the slot holds only {slot_holds} bytes"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = run.status.retained_wal_bytes().unwrap_or(0);
        if r >= slot_holds {
            eprintln!("retained WAL reported while the spool is full: {r} bytes");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "retained WAL reported as {r} bytes, the slot holds at least {slot_holds}: {}",
            run.status.to_json()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Paused for longer than the receive timeout: not a stalled server.
    tokio::time::sleep((timeout * 2).saturating_sub(full_at.elapsed())).await;
    assert_eq!(run.status.phase(), "streaming", "{}", run.status.to_json());
    assert_eq!(run.status.last_error(), None);

    // Acknowledged as read: reading resumes and every row arrives once.
    let want = pg_rows(&pg, "public.f");
    let mut m = Model::new(&spool);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        m.poll();
        spool.ack("outer", m.records.len() as u64).unwrap();
        if m.rows("public.f") == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} rows arrived: {}",
            m.rows("public.f").len(),
            want.len(),
            run.status.to_json()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(run.status.last_error(), None);
    run.stop().await.unwrap();
}
