//! The CDC forwarder at run time: per source a spool, the source task that fills it,
//! and one shipper per relay-outer endpoint that empties it.

use std::sync::{Arc, Mutex};

use crate::config::{CdcConfig, SourceConfig};
use routy_ops::drain::Drain;
use routy_tunnel::session::SessionWatch;
use shipper::{ShipStatus, Shipper};
use source::SourceStatus;
use spool::Spool;
use tracing::{debug, info};

pub mod replication;
pub mod shipper;
pub mod source;
pub mod spool;

/// relay-inner's CDC metrics with their help texts.
pub const METRICS: &[(&str, &str)] = &[
    (source::RETAINED_WAL_BYTES, "WAL the source keeps for the slot (current WAL position minus the slot's restart_lsn), bytes; read on a connection of its own every status_interval, also while the source is failing."),
    (source::SLOT_CHECKED, "When the slot's retained WAL was last read from the source, Unix seconds; stops moving while the source cannot be reached (the retained WAL gauge then keeps its last value)."),
    (source::CONFIRMED_LSN, "Position confirmed to the source (durable in the spool), as a number."),
    (source::EVENTS_TOTAL, "Change events read from the source, by kind."),
    (source::TRANSACTIONS_TOTAL, "Source transactions spooled."),
    (source::SNAPSHOT_ROWS_TOTAL, "Rows copied by the initial snapshot, by table."),
    (source::HEARTBEATS_TOTAL, "Heartbeat messages emitted on the source while its published tables were idle."),
    (source::stream::RESYNC_ROWS_TOTAL, "Rows copied by resyncs, by table."),
    (source::stream::RESYNC_CHUNKS_TOTAL, "Resync chunks done, by table."),
    (source::STOPPED, "1 while the source has stopped on a fatal error (or was not started: its spool is corrupt) and waits for an operator."),
    (source::ERRORS_TOTAL, "Source failures, by reason (fatal; transient; receive_timeout: nothing heard from the source within receive_timeout)."),
    (spool::SPOOL_FULL_WAITS, "Times reading from the source paused because the spool was full."),
    (SPOOL_BYTES, "Bytes in the spool on disk."),
    (spool::SPOOL_MAX_BYTES, "The spool's max_bytes: reading from the source pauses when the spool holds this much."),
    (shipper::BATCHES_SENT, "Batches sent to relay-outer."),
    (shipper::RECORDS_SENT, "Records sent to relay-outer (resends included)."),
    (shipper::ACKED_SEQ, "Highest seq relay-outer acknowledged as durable in its store."),
    (shipper::UNACKED_RECORDS, "Records durable in the spool that relay-outer has not acknowledged yet."),
    (shipper::SHIP_ERRORS, "Shipping streams that failed, by reason."),
];

/// Why a resync request was refused.
#[derive(Debug, thiserror::Error)]
pub enum ResyncRefused {
    /// No such source, or the source does not forward the table.
    #[error("{0}")]
    Unknown(String),
    /// The source is not running.
    #[error("{0}")]
    NotRunning(String),
}

/// Gauge: bytes in each source's spool.
pub const SPOOL_BYTES: &str = "routy_cdc_spool_bytes";

/// One source at run time.
struct SourceRt {
    /// The configuration as started (tables and filters change by reload: `current`).
    cfg: SourceConfig,
    /// The configuration the running task has.
    current: Mutex<SourceConfig>,
    spool: Arc<Spool>,
    status: Arc<SourceStatus>,
    ships: Mutex<Vec<Arc<ShipStatus>>>,
    /// Stops the running task (for a reload that restarts it).
    task: Mutex<Option<(Drain, tokio::task::JoinHandle<()>)>>,
}

impl SourceRt {
    fn current(&self) -> SourceConfig {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Starts the source task with `cfg`; it stops on `drain` or on its own stop.
    fn spawn(&self, cfg: SourceConfig, drain: &Drain) {
        let stop = Drain::new();
        let (spool, status) = (self.spool.clone(), self.status.clone());
        info!(source = %cfg.name, slot = %cfg.slot, tables = ?cfg.tables, "CDC source starting");
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = cfg.clone();
        let (own, all) = (stop.clone(), drain.clone());
        let task = tokio::spawn(async move {
            let name = cfg.name.clone();
            let both = Drain::new();
            let b = both.clone();
            // Stops on relay-inner's drain or on this source's own stop (a reload).
            tokio::spawn(async move {
                tokio::select! {
                    _ = own.stopping() => {}
                    _ = all.stopping() => {}
                }
                b.stop();
            });
            // The source logs its own fatal error with what to do.
            if let Err(e) = source::run(cfg, spool, both, status).await {
                debug!(source = %name, "CDC source task ended: {e}");
            }
        });
        *self.task.lock().unwrap_or_else(|p| p.into_inner()) = Some((stop, task));
    }
}

/// Every source of the forwarder.
pub struct Cdc {
    cfg: CdcConfig,
    sources: Vec<SourceRt>,
    /// Sources not started because their spool is corrupt: (name, why and what to do).
    refused: Vec<(String, String)>,
}

impl Cdc {
    /// Opens every source's spool (failing if one cannot be opened) and starts the
    /// sources.
    pub fn start(cfg: &CdcConfig, drain: &Drain) -> anyhow::Result<Arc<Cdc>> {
        routy_ops::metrics::describe(METRICS);
        let mut sources = Vec::new();
        let mut refused = Vec::new();
        for s in &cfg.sources {
            let dir = cfg.spool_dir.join(&s.name);
            let spool = match Spool::open(&dir, cfg.spool_max_bytes) {
                Ok(spool) => spool,
                // Corruption stops this source only: the tunnel and the other sources go on.
                Err(e @ spool::SpoolError::Damaged { .. }) => {
                    tracing::error!(source = %s.name, spool = %dir.display(), error = %e,
                        "CDC source not started: its spool is corrupt");
                    metrics::counter!(source::ERRORS_TOTAL, "source" => s.name.clone(), "reason" => "spool_corrupt")
                        .increment(1);
                    metrics::gauge!(source::STOPPED, "source" => s.name.clone()).set(1.0);
                    refused.push((s.name.clone(), e.to_string()));
                    continue;
                }
                Err(e) => {
                    anyhow::bail!("cdc source {}: spool {}: {e}", s.name, dir.display())
                }
            };
            sources.push(SourceRt {
                cfg: s.clone(),
                current: Mutex::new(s.clone()),
                spool,
                status: Arc::new(SourceStatus::default()),
                ships: Mutex::new(Vec::new()),
                task: Mutex::new(None),
            });
        }
        for s in &sources {
            s.spawn(s.cfg.clone(), drain);
        }
        let cdc = Arc::new(Cdc {
            cfg: cfg.clone(),
            sources,
            refused,
        });
        let (weak, stop) = (Arc::downgrade(&cdc), drain.clone());
        tokio::spawn(async move {
            loop {
                let Some(cdc) = weak.upgrade() else { return };
                for s in &cdc.sources {
                    metrics::gauge!(SPOOL_BYTES, "source" => s.cfg.name.clone())
                        .set(s.spool.size_bytes() as f64);
                }
                drop(cdc);
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
                    _ = stop.stopping() => return,
                }
            }
        });
        Ok(cdc)
    }

    /// Sets the endpoints whose acknowledgement lets the spools remove records.
    pub fn set_endpoints(&self, keys: &[String]) {
        for s in &self.sources {
            s.spool.set_endpoints(keys.iter().cloned());
        }
    }

    /// Starts one shipper per source for a new endpoint.
    pub fn attach(
        &self,
        key: &str,
        connections: Vec<SessionWatch>,
        drain: &Drain,
        stop: &Drain,
        bandwidth: Option<Arc<routy_tunnel::throttle::Limit>>,
    ) {
        let session = any_live_session(connections, stop.clone());
        for s in &self.sources {
            let status = Arc::new(ShipStatus::new(key));
            {
                let mut ships = s.ships.lock().unwrap_or_else(|p| p.into_inner());
                ships.retain(|st| st.endpoint != key);
                ships.push(status.clone());
            }
            let shipper = Shipper {
                source: s.cfg.name.clone(),
                endpoint: key.to_owned(),
                spool: s.spool.clone(),
                session: session.clone(),
                batch_max_bytes: self.cfg.batch_max_bytes,
                batch_max_delay: self.cfg.batch_max_delay,
                ack_timeout: self.cfg.batch_ack_timeout,
                drain: drain.clone(),
                stop: stop.clone(),
                status,
                bandwidth: bandwidth.clone(),
            };
            tokio::spawn(shipper.run());
        }
    }

    /// Forgets a removed endpoint's shippers (they stop with its `stop`).
    pub fn detach(&self, key: &str) {
        for s in &self.sources {
            s.ships
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|st| st.endpoint != key);
        }
    }

    /// Asks source `source` to copy `table` again while it streams (a resync).
    pub fn request_resync(&self, source: &str, table: &str) -> Result<(), ResyncRefused> {
        let Some(s) = self.sources.iter().find(|s| s.cfg.name == source) else {
            if self.refused.iter().any(|(n, _)| n == source) {
                return Err(ResyncRefused::NotRunning(format!(
                    "source {source} is not running (its spool is damaged)"
                )));
            }
            let known: Vec<&str> = self.sources.iter().map(|s| s.cfg.name.as_str()).collect();
            return Err(ResyncRefused::Unknown(format!(
                "no cdc source named {source:?} (sources: {known:?})"
            )));
        };
        let tables = s.current().tables;
        if !tables.iter().any(|t| t == table) {
            return Err(ResyncRefused::Unknown(format!(
                "source {source} does not forward table {table:?} (postgres.tables: {tables:?})"
            )));
        }
        if s.status.phase() == "failed" {
            return Err(ResyncRefused::NotRunning(format!(
                "source {source} has stopped: {}",
                s.status.last_error().unwrap_or_default()
            )));
        }
        info!(source, table, "resync requested through the admin endpoint");
        s.status.request_resync(table);
        Ok(())
    }

    /// Whether `new` differs from the running configuration only in what a reload can
    /// apply: the sources' tables, filters, masks and resync chunk size (each changed
    /// source restarts; a table added is copied by a resync, then streamed).
    pub fn reloadable(&self, new: &CdcConfig) -> Result<(), String> {
        let fixed = |c: &CdcConfig| {
            let mut c = c.clone();
            for s in &mut c.sources {
                s.tables.clear();
                s.filters.clear();
                s.mask_key_file = None;
                s.resync_chunk_rows = 0;
            }
            c
        };
        if fixed(&self.cfg) != fixed(new) {
            return Err(
                "the cdc section changed beyond the sources' tables, filters and resync_chunk_rows: \
                 that needs a restart (sources, spool and shipping are set up at start)"
                    .into(),
            );
        }
        Ok(())
    }

    /// Restarts each source whose tables, filters or resync chunk size changed in `new`
    /// (checked with [`Cdc::reloadable`] first); returns the sources restarted.
    pub fn reload(self: &Arc<Self>, new: &CdcConfig, drain: &Drain) -> Vec<String> {
        let mut restarted = Vec::new();
        for (i, s) in self.sources.iter().enumerate() {
            let Some(n) = new.sources.iter().find(|n| n.name == s.cfg.name) else {
                continue;
            };
            if *n == s.current() {
                continue;
            }
            *s.current.lock().unwrap_or_else(|p| p.into_inner()) = n.clone();
            let old = s.task.lock().unwrap_or_else(|p| p.into_inner()).take();
            restarted.push(n.name.clone());
            let (cdc, n, drain) = (self.clone(), n.clone(), drain.clone());
            // The old task stops (it syncs and confirms) and ends before the new one
            // starts: one task at a time writes the spool and uses the slot.
            tokio::spawn(async move {
                if let Some((stop, task)) = old {
                    stop.stop();
                    let _ = task.await;
                }
                if !drain.is_stopping() {
                    cdc.sources[i].spawn(n, &drain);
                }
            });
        }
        restarted
    }

    /// `/status` view.
    pub fn to_json(&self) -> serde_json::Value {
        let sources: Vec<_> = self
            .sources
            .iter()
            .map(|s| {
                let ships: Vec<_> = s
                    .ships
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .map(|st| st.to_json())
                    .collect();
                serde_json::json!({
                    "name": s.cfg.name,
                    "slot": s.cfg.slot,
                    "publication": s.cfg.publication,
                    "tables": s.current().tables,
                    "source": s.status.to_json(),
                    "spool": {
                        "dir": s.spool.dir(),
                        "bytes": s.spool.size_bytes(),
                        "first_seq": s.spool.first_seq(),
                        "durable_seq": s.spool.synced_seq(),
                        "acked_seq": s.spool.acked_seq(),
                        "durable_lsn": relay_proto::cdc::format_lsn(s.spool.durable_lsn()),
                    },
                    "shipping": ships,
                })
            })
            .collect();
        let refused: Vec<_> = self
            .refused
            .iter()
            .map(|(name, error)| serde_json::json!({ "name": name, "error": error }))
            .collect();
        serde_json::json!({ "sources": sources, "refused": refused })
    }
}

/// `relay-inner cdc salvage`: prints what was replaced.
pub fn source_salvage(cfg: &CdcConfig, name: &str) -> anyhow::Result<String> {
    let dir = cfg.spool_dir.join(name);
    let lost = Spool::salvage(&dir, cfg.spool_max_bytes)
        .map_err(|e| anyhow::anyhow!("salvaging the spool {}: {e}", dir.display()))?;
    if lost.is_empty() {
        return Ok(format!(
            "the spool of source {name} ({}) has no damaged record followed by valid ones; nothing changed",
            dir.display()
        ));
    }
    let mut out = format!("salvaged the spool of source {name} ({}):\n", dir.display());
    for l in &lost {
        out.push_str(&format!("  {l}\n"));
    }
    out.push_str(
        "every valid record was kept and will be shipped; the changes the unreadable records held \
         are lost from the source: copy the tables they touched again",
    );
    Ok(out)
}

/// `relay-inner cdc drop-slot`.
pub async fn source_drop_slot(cfg: &SourceConfig, dir: &std::path::Path) -> anyhow::Result<String> {
    source::drop_slot(cfg, dir)
        .await
        .map_err(anyhow::Error::msg)
}

/// Watches the live sessions of an endpoint's connections and publishes one of them (the
/// first live one, kept while it lives), so shipping goes on while any connection is up.
fn any_live_session(connections: Vec<SessionWatch>, stop: Drain) -> SessionWatch {
    let mut watches = connections;
    if watches.len() == 1 {
        return watches.remove(0);
    }
    let (tx, rx) =
        tokio::sync::watch::channel::<Option<routy_tunnel::session::SessionHandle>>(None);
    tokio::spawn(async move {
        loop {
            let current_alive = tx.borrow().as_ref().is_some_and(|s| !s.is_closed());
            if !current_alive {
                let live = watches
                    .iter_mut()
                    .find_map(|w| w.borrow_and_update().clone().filter(|s| !s.is_closed()));
                tx.send_replace(live);
            }
            let changes = watches.iter_mut().map(|w| Box::pin(w.changed()));
            tokio::select! {
                (r, _, _) = futures::future::select_all(changes) => if r.is_err() { return },
                _ = stop.stopping() => return,
            }
        }
    });
    rx
}
