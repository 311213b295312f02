//! Helpers for the sinks' tests: hand-made records in a store, a sink runner to start
//! and stop, waiting for a position.

use std::sync::Arc;
use std::time::{Duration, Instant};

use relay_proto::cdc::{Column, Event, Record, Relation, Value};
use routy_ops::drain::Drain;

use super::{spawn, Filter, SinkConfig, SinkKind, SinkStatus};
use crate::cdc::store::Store;

pub(crate) fn t(s: &str) -> Value {
    Value::Text(s.to_string())
}

pub(crate) fn rel(id: u32, name: &str, identity: u8, cols: &[(&str, &str, bool)]) -> Relation {
    Relation {
        id,
        schema: "public".into(),
        name: name.into(),
        replica_identity: identity,
        columns: cols
            .iter()
            .map(|(n, ty, key)| Column {
                name: n.to_string(),
                type_oid: 0,
                type_modifier: -1,
                type_name: ty.to_string(),
                key: *key,
                attnum: 0,
            })
            .collect(),
    }
}

pub(crate) fn begin(xid: u32) -> Event {
    Event::Begin {
        xid,
        commit_lsn: xid as u64 * 100,
        commit_time: 0,
    }
}

pub(crate) fn commit(xid: u32) -> Event {
    Event::Commit {
        commit_lsn: xid as u64 * 100,
        end_lsn: xid as u64 * 100 + 8,
        commit_time: 800_000_000_000_000,
    }
}

/// One transaction in one record: relations, then the events.
pub(crate) fn txn(xid: u32, rels: &[&Relation], events: Vec<Event>) -> Record {
    let mut ev = vec![begin(xid)];
    ev.extend(rels.iter().map(|r| Event::Relation((*r).clone())));
    ev.extend(events);
    ev.push(commit(xid));
    Record {
        lsn: xid as u64 * 100 + 8,
        events: ev,
    }
}

pub(crate) fn ins(rel: u32, vals: &[Option<&str>]) -> Event {
    Event::Insert {
        rel,
        new: vals.iter().map(|v| v.map_or(Value::Null, t)).collect(),
    }
}

pub(crate) struct Harness {
    _dir: tempfile::TempDir,
    pub(crate) store: Arc<Store>,
    pub(crate) next: u64,
}

impl Harness {
    pub(crate) fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "t/s").unwrap();
        Harness {
            _dir: dir,
            store,
            next: 1,
        }
    }

    pub(crate) async fn push(&mut self, recs: Vec<Record>) -> u64 {
        let n = recs.len() as u64;
        let enc = recs.iter().map(Record::encode).collect();
        self.store.append(self.next, enc).await.unwrap();
        self.next += n;
        self.next - 1
    }
}

pub(crate) struct Running {
    pub(crate) stop: Drain,
    pub(crate) status: Arc<SinkStatus>,
    pub(crate) task: tokio::task::JoinHandle<()>,
}

impl Running {
    pub(crate) async fn stop(self) {
        self.stop.stop();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("sink stops")
            .unwrap();
    }
}

/// Starts a runner for a sink of `kind` named `name` on `store` (fast retries; no
/// position file directory: at-least-once sinks need [`start_in`]).
pub(crate) fn start_kind(name: &str, kind: SinkKind, store: &Arc<Store>) -> Running {
    start_in(name, kind, store, std::path::Path::new("/nonexistent"))
}

/// [`start_kind`] with a store root for position files.
pub(crate) fn start_in(
    name: &str,
    kind: SinkKind,
    store: &Arc<Store>,
    root: &std::path::Path,
) -> Running {
    let stop = Drain::new();
    let sink = SinkConfig {
        name: name.to_string(),
        source: "t/s".into(),
        kind,
        filter: Filter::default(),
        retry_initial: Duration::from_millis(50),
        retry_max: Duration::from_millis(400),
    };
    let (status, task) = spawn(&sink, root, store.clone(), stop.clone());
    Running { stop, status, task }
}

pub(crate) async fn wait_applied(status: &SinkStatus, seq: u64) {
    let t0 = Instant::now();
    while status.applied_seq() < seq {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "sink stuck at {} (want {seq}); last error: {:?}",
            status.applied_seq(),
            status.last_error()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the sink reports an error; returns it.
pub(crate) async fn wait_error(status: &SinkStatus) -> String {
    let t0 = Instant::now();
    loop {
        if let Some(e) = status.last_error() {
            return e;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no error: {:?}",
            status.view()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the sink stopped (a refused batch); returns its last error.
pub(crate) async fn wait_stopped(status: &SinkStatus) -> String {
    let t0 = Instant::now();
    while status.state() != super::State::Stopped {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "sink did not stop: {:?}",
            status.view()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    status.last_error().unwrap_or_default()
}
