//! Change data capture on relay-outer: the store that receives each source's log through
//! the tunnel, and the sinks that apply it.
//!
//! [`Cdc`] is the running part: one [`Source`] (a [`Store`] and who ships into it) per
//! `tunnel/source`, opened at start for every source a sink reads and on the first
//! shipping stream for the others; the sinks; and a retention task per store.

pub mod changes;
pub mod consumers;
pub mod manage;
pub mod receiver;
pub mod sink;
pub mod sinks_cli;
pub mod store;
pub mod tail;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use routy_ops::drain::Drain;
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::config::CdcConfig;
use store::{Store, StoreError};

/// Gauge: seq of the newest durable record in a source's store, by `source`.
pub const STORE_LAST_SEQ: &str = "routy_cdc_store_last_seq";
/// Gauge: seq of the oldest record a source's store still holds, by `source`.
pub const STORE_FIRST_SEQ: &str = "routy_cdc_store_first_seq";
/// Gauge: bytes of a source's store on disk, by `source`.
pub const STORE_BYTES: &str = "routy_cdc_store_bytes";
/// Counter: batches received from relay-inner and made durable, by `source`.
pub const BATCHES_RECEIVED: &str = "routy_cdc_batches_received_total";
/// Counter: new records stored, by `source`.
pub const RECORDS_RECEIVED: &str = "routy_cdc_records_received_total";
/// Counter: records received again (resent after a reconnect) and dropped, by `source`.
pub const RECORDS_DUPLICATE: &str = "routy_cdc_records_duplicate_total";
/// Gauge: 1 while the store holds damage set aside at open that relay-inner has not
/// sent again (its sinks wait there), by `source`.
pub const STORE_DAMAGED: &str = "routy_cdc_store_damaged";
/// Counter: shipping streams ended by an error, by `source` and `reason`.
pub const SHIP_ERRORS: &str = "routy_cdc_ship_errors_total";
/// Gauge: 1 while a shipping stream feeds the source's store, by `source`.
pub const SHIP_CONNECTED: &str = "routy_cdc_ship_connected";

/// Every CDC metric of relay-outer with its help text.
pub const METRICS: &[(&str, &str)] = &[
    (
        STORE_LAST_SEQ,
        "Seq of the newest durable record in a source's store.",
    ),
    (
        STORE_FIRST_SEQ,
        "Seq of the oldest record a source's store holds.",
    ),
    (STORE_BYTES, "Bytes of a source's store on disk."),
    (
        STORE_DAMAGED,
        "1 while damaged records set aside at start wait to be sent again (the sinks wait there).",
    ),
    (
        BATCHES_RECEIVED,
        "CDC batches received from relay-inner and made durable.",
    ),
    (RECORDS_RECEIVED, "New CDC records stored."),
    (
        RECORDS_DUPLICATE,
        "CDC records received again after a reconnect and dropped.",
    ),
    (
        SHIP_ERRORS,
        "CDC shipping streams ended by an error, by reason.",
    ),
    (
        SHIP_CONNECTED,
        "1 while a shipping stream feeds the source's store.",
    ),
];

/// Describes the metrics above to the installed recorder.
pub fn describe_metrics() {
    routy_ops::metrics::describe(METRICS);
    routy_ops::metrics::describe(sink::METRICS);
    routy_ops::metrics::describe(consumers::METRICS);
}

/// How often retention runs (it also runs once when a store opens).
pub const RETENTION_INTERVAL: Duration = Duration::from_secs(60);

/// One source's store and the shipping stream in charge of it.
pub struct Source {
    /// `tunnel/source`.
    pub name: String,
    /// Its log.
    pub store: Arc<Store>,
    /// Id of the shipping stream feeding the store now, if any. A newer stream replaces
    /// an older one (which sees the change and ends).
    current: watch::Sender<Option<u64>>,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source").field("name", &self.name).finish()
    }
}

impl Source {
    fn new(store: Arc<Store>) -> Self {
        // Exported from the start, so that a store nothing ships to is seen (and alerted on).
        metrics::gauge!(SHIP_CONNECTED, "source" => store.name.clone()).set(0.0);
        Source {
            name: store.name.clone(),
            store,
            current: watch::channel(None).0,
        }
    }

    /// Makes stream `id` the one in charge; returns what to watch for being replaced.
    pub fn claim(&self, id: u64) -> watch::Receiver<Option<u64>> {
        let prev = self.current.send_replace(Some(id));
        if let Some(prev) = prev {
            info!(source = %self.name, old = prev, new = id, "a new shipping stream replaces the previous one");
        }
        metrics::gauge!(SHIP_CONNECTED, "source" => self.name.clone()).set(1.0);
        self.current.subscribe()
    }

    /// Stream `id` ended; clears it if it is still the one in charge.
    pub fn release(&self, id: u64) {
        let cleared = self.current.send_if_modified(|c| {
            if *c == Some(id) {
                *c = None;
                true
            } else {
                false
            }
        });
        if cleared {
            metrics::gauge!(SHIP_CONNECTED, "source" => self.name.clone()).set(0.0);
        }
    }

    /// Whether a shipping stream feeds the store now.
    pub fn connected(&self) -> bool {
        self.current.borrow().is_some()
    }

    /// Updates the store's gauges.
    pub fn publish_gauges(&self) {
        let label = [("source", self.name.clone())];
        metrics::gauge!(STORE_LAST_SEQ, &label).set(self.store.synced_seq() as f64);
        metrics::gauge!(STORE_FIRST_SEQ, &label).set(self.store.first_seq() as f64);
        metrics::gauge!(STORE_BYTES, &label).set(self.store.size_bytes() as f64);
        metrics::gauge!(STORE_DAMAGED, &label).set(if self.store.damage().is_some() {
            1.0
        } else {
            0.0
        });
    }
}

/// CDC at run time.
pub struct Cdc {
    /// The `cdc` section in force (changes need a restart).
    pub cfg: CdcConfig,
    sources: Mutex<HashMap<String, Arc<Source>>>,
    opening: tokio::sync::Mutex<()>,
    drain: Drain,
    next_stream: AtomicU64,
    sinks: Mutex<Vec<(String, JoinHandle<()>)>>,
    sink_status: Mutex<HashMap<String, Arc<sink::SinkStatus>>>,
    consumers: Mutex<Option<Arc<consumers::Consumers>>>,
}

impl std::fmt::Debug for Cdc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cdc").field("dir", &self.cfg.dir).finish()
    }
}

impl Cdc {
    /// Opens the store of every source a sink reads and starts the sinks; they stop on
    /// `drain`.
    pub async fn start(cfg: CdcConfig, drain: Drain) -> anyhow::Result<Arc<Cdc>> {
        std::fs::create_dir_all(&cfg.dir)
            .with_context(|| format!("cdc.dir: cannot create {}", cfg.dir.display()))?;
        let cdc = Arc::new(Cdc {
            cfg: cfg.clone(),
            sources: Mutex::new(HashMap::new()),
            opening: tokio::sync::Mutex::new(()),
            drain: drain.clone(),
            next_stream: AtomicU64::new(0),
            sinks: Mutex::new(Vec::new()),
            sink_status: Mutex::new(HashMap::new()),
            consumers: Mutex::new(None),
        });
        for name in cfg.sources() {
            cdc.source(&name).await.with_context(|| {
                format!(
                    "cdc.dir: cannot open the store of {name} in {}",
                    cfg.dir.display()
                )
            })?;
        }
        let mut handles = Vec::new();
        for sink in &cfg.sinks {
            let src = cdc
                .get(&sink.source)
                .context("store of a sink's source was not opened")?;
            // Until the sink says how far it got, retention keeps everything.
            src.store.register_reader(&sink.name);
            info!(sink = %sink.name, kind = sink.kind.key(), source = %sink.source, "sink starting");
            let (status, h) = sink::spawn(sink, &cfg.dir, src.store.clone(), drain.clone());
            cdc.sink_status
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(sink.name.clone(), status);
            handles.push((sink.name.clone(), h));
        }
        *cdc.sinks.lock().unwrap_or_else(|p| p.into_inner()) = handles;
        if let Some(k) = &cfg.consumers {
            let c = consumers::Consumers::start(cdc.clone(), k, drain.clone()).await?;
            *cdc.consumers.lock().unwrap_or_else(|p| p.into_inner()) = Some(c);
        }
        Ok(cdc)
    }

    /// A reload: the consumer tokens are read again (the rest of the cdc section needs a
    /// restart). Returns how many tokens are in force.
    pub fn reload_tokens(&self, cfg: &CdcConfig) -> Result<usize, String> {
        let running = self
            .consumers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match (running, &cfg.consumers) {
            (Some(c), Some(k)) => c.reload_tokens(&k.tokens),
            _ => Ok(0),
        }
    }

    /// The status and controls of the sink `name`, if configured.
    pub fn sink(&self, name: &str) -> Option<Arc<sink::SinkStatus>> {
        self.sink_status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// The source if its store is open.
    pub fn get(&self, name: &str) -> Option<Arc<Source>> {
        self.sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// Every open source, by name.
    pub fn sources(&self) -> Vec<Arc<Source>> {
        let mut v: Vec<_> = self
            .sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The source `name` (`tunnel/source`, already validated), opening its store (and
    /// starting its retention) on first use. One store per source per process.
    pub async fn source(self: &Arc<Self>, name: &str) -> Result<Arc<Source>, StoreError> {
        if let Some(s) = self.get(name) {
            return Ok(s);
        }
        let _one = self.opening.lock().await;
        if let Some(s) = self.get(name) {
            return Ok(s);
        }
        let (root, n, seg) = (
            self.cfg.dir.clone(),
            name.to_string(),
            self.cfg.segment_bytes,
        );
        let store = tokio::task::spawn_blocking(move || Store::open_with(&root, &n, seg))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))??;
        let src = Arc::new(Source::new(store));
        info!(source = %name, dir = %src.store.dir().display(), first_seq = src.store.first_seq(),
            last_seq = src.store.synced_seq(), "CDC store open");
        src.publish_gauges();
        self.sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), src.clone());
        tokio::spawn(retention_loop(
            src.clone(),
            self.cfg.retention,
            self.drain.clone(),
        ));
        Ok(src)
    }

    /// A fresh shipping-stream id.
    pub fn next_stream_id(&self) -> u64 {
        self.next_stream.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The shutdown signal.
    pub fn drain(&self) -> &Drain {
        &self.drain
    }

    /// Waits up to `grace` for the sinks to stop (after the drain was stopped), then
    /// aborts the rest.
    pub async fn wait_stopped(&self, grace: Duration) {
        let sinks = std::mem::take(&mut *self.sinks.lock().unwrap_or_else(|p| p.into_inner()));
        let deadline = tokio::time::Instant::now() + grace;
        for (name, mut h) in sinks {
            if tokio::time::timeout_at(deadline, &mut h).await.is_err() {
                warn!(sink = %name, "sink did not stop within the grace period; aborting it");
                h.abort();
            }
        }
    }

    /// The `cdc` object of `/status`.
    pub fn status(&self) -> serde_json::Value {
        let mut sources = serde_json::Map::new();
        for s in self.sources() {
            let sinks: serde_json::Map<String, serde_json::Value> = self
                .cfg
                .sinks
                .iter()
                .filter(|k| k.source == s.name)
                .map(|k| (k.name.clone(), self.sink_json(k, &s)))
                .collect();
            sources.insert(
                s.name.clone(),
                json!({
                    "first_seq": s.store.first_seq(),
                    "last_seq": s.store.synced_seq(),
                    "bytes": s.store.size_bytes(),
                    "connected": s.connected(),
                    "spool_id": s.store.spool_id().map(|id| format!("{id:016x}")),
                    "error": s.store.failure(),
                    "damage": s.store.damage(),
                    "sinks": sinks,
                }),
            );
        }
        json!({
            "dir": self.cfg.dir.display().to_string(),
            "retention_seconds": self.cfg.retention.as_secs_f64(),
            "sources": sources,
        })
    }
}

impl Cdc {
    /// One sink in `/status` and `cdc sinks`.
    fn sink_json(&self, k: &sink::SinkConfig, s: &Source) -> serde_json::Value {
        let st = self.sink(&k.name).map(|st| st.view());
        let applied = s.store.reader_position(&k.name);
        let lag = s.store.synced_seq().saturating_sub(applied.unwrap_or(0));
        let now_us = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        // Seconds behind: since the source committed the last transaction delivered,
        // while records wait; 0 when caught up.
        let lag_seconds = match (&st, lag) {
            (_, 0) => Some(0.0),
            (Some(v), _) => v.last_commit_us.map(|us| (now_us - us).max(0) as f64 / 1e6),
            _ => None,
        };
        json!({
            "kind": k.kind.key(),
            "source": k.source,
            "durability": k.kind.durability().as_str(),
            "applied_seq": applied,
            "position": st.as_ref().map(|v| v.position.clone()),
            "lag_records": lag,
            "lag_seconds": lag_seconds,
            "state": st.as_ref().map(|v| v.state),
            "up": st.as_ref().map(|v| v.up),
            "paused": self.sink(&k.name).map(|s| s.paused()),
            "replay_pending": st.as_ref().and_then(|v| v.replay_pending.clone()),
            "last_error": st.and_then(|v| v.last_error),
            // The sink cannot go past what the store lacks.
            "blocked_by": s.store.damage(),
        })
    }
}

/// Removes what retention allows now: whole segments whose records every sink applied
/// (every durable record when the source has no sink) and that are older than
/// `retention`. Returns the store's first seq after it.
pub fn apply_retention(store: &Store, retention: Duration) -> Result<u64, StoreError> {
    let upto = store
        .min_reader_position()
        .unwrap_or_else(|| store.synced_seq())
        .min(store.synced_seq());
    let cutoff = SystemTime::now()
        .checked_sub(retention)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    store.remove_before(upto, cutoff)
}

async fn retention_loop(src: Arc<Source>, retention: Duration, drain: Drain) {
    loop {
        let s = src.clone();
        let before = src.store.first_seq();
        match tokio::task::spawn_blocking(move || apply_retention(&s.store, retention)).await {
            Ok(Ok(first)) if first != before => {
                info!(source = %src.name, first_seq = first, "retention removed old records")
            }
            Ok(Ok(_)) => debug!(source = %src.name, "retention: nothing to remove"),
            Ok(Err(e)) => warn!(source = %src.name, error = %e, "retention failed"),
            Err(e) => warn!(source = %src.name, error = %e, "retention task failed"),
        }
        src.publish_gauges();
        tokio::select! {
            _ = drain.stopping() => return,
            _ = tokio::time::sleep(RETENTION_INTERVAL) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_proto::cdc::{Event, Record};

    #[test]
    fn ship_connected_is_exported_from_the_start() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let metrics = recorder.handle();
        let _local = metrics::set_default_local_recorder(&recorder);
        let dir = tempfile::tempdir().unwrap();
        let source = Source::new(Store::open(dir.path(), "t/s").unwrap());
        let value = || {
            let text = metrics.render();
            text.lines()
                .find_map(|l| l.strip_prefix("routy_cdc_ship_connected{source=\"t/s\"} "))
                .map(str::to_owned)
        };
        assert_eq!(value().as_deref(), Some("0"));
        let _watch = source.claim(7);
        assert_eq!(value().as_deref(), Some("1"));
        source.release(7);
        assert_eq!(value().as_deref(), Some("0"));
    }

    fn rec(i: u64) -> Vec<u8> {
        Record {
            lsn: i,
            events: vec![Event::Message {
                transactional: false,
                lsn: i,
                prefix: "t".into(),
                content: vec![0; 64],
            }],
        }
        .encode()
    }

    #[tokio::test]
    async fn sources_open_once_and_retention_respects_sinks() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = CdcConfig {
            dir: dir.path().join("store"),
            retention: Duration::from_secs(3600),
            segment_bytes: routy_log::segment_log::DEFAULT_SEGMENT_BYTES,
            sinks: vec![],
            consumers: None,
        };
        let cdc = Cdc::start(cfg, Drain::new()).await.unwrap();
        let a = cdc.source("t/a").await.unwrap();
        let b = cdc.source("t/a").await.unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(cdc.sources().len(), 1);
        // Stream replacement.
        let rx1 = a.claim(1);
        assert!(a.connected());
        let _rx2 = a.claim(2);
        assert!(rx1.has_changed().unwrap());
        a.release(1);
        assert!(
            a.connected(),
            "releasing a replaced stream keeps the newer one"
        );
        a.release(2);
        assert!(!a.connected());
        // Retention: nothing old enough yet.
        a.store.append(1, vec![rec(1), rec(2)]).await.unwrap();
        assert_eq!(
            apply_retention(&a.store, Duration::from_secs(3600)).unwrap(),
            1
        );
        let st = cdc.status();
        assert_eq!(st["sources"]["t/a"]["last_seq"], 2);
        assert_eq!(st["sources"]["t/a"]["connected"], false);
        assert!(st["sources"]["t/a"]["error"].is_null());
        assert!(st["sources"]["t/a"]["spool_id"].is_null());
        assert!(st["sources"]["t/a"]["bytes"].as_u64().unwrap() > 0);
    }

    #[test]
    fn retention_keeps_what_a_sink_has_not_applied() {
        let dir = tempfile::tempdir().unwrap();
        // Small segments: one record each (a record is 16 + ~90 bytes).
        let store = store::Store::open_with(dir.path(), "t/a", 100).unwrap();
        let recs: Vec<_> = (1..=6).map(rec).collect();
        store.append_batch(1, &recs).unwrap();
        assert_eq!(store.first_seq(), 1);
        // Nothing is older than an hour.
        assert_eq!(
            apply_retention(&store, Duration::from_secs(3600)).unwrap(),
            1
        );
        // A sink that has applied nothing holds everything back.
        store.register_reader("replica");
        store.register_reader("replica");
        assert_eq!(store.min_reader_position(), Some(0));
        assert_eq!(apply_retention(&store, Duration::ZERO).unwrap(), 1);
        store.set_reader_position("replica", 3);
        store.register_reader("lagging");
        store.set_reader_position("lagging", 2);
        assert_eq!(store.reader_position("replica"), Some(3));
        assert_eq!(apply_retention(&store, Duration::ZERO).unwrap(), 3);
        store.set_reader_position("lagging", 6);
        // The newest segment (the one being written) always stays.
        let first = apply_retention(&store, Duration::ZERO).unwrap();
        // "replica" holds seq 4 on (it applied through 3).
        assert_eq!(first, 4);
        assert_eq!(store.first_seq(), first);
        let seqs: Vec<u64> = store.reader(0).unwrap().map(|r| r.unwrap().0).collect();
        assert_eq!(*seqs.last().unwrap(), 6);
        assert_eq!(seqs[0], first);
    }

    #[test]
    fn retention_without_sinks_follows_the_durable_end() {
        let dir = tempfile::tempdir().unwrap();
        let store = store::Store::open_with(dir.path(), "t/a", 100).unwrap();
        let recs: Vec<_> = (1..=4).map(rec).collect();
        store.append_batch(1, &recs).unwrap();
        assert_eq!(store.min_reader_position(), None);
        assert!(apply_retention(&store, Duration::ZERO).unwrap() > 1);
        assert_eq!(store.synced_seq(), 4);
    }
}
