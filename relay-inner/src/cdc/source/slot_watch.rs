//! Watches the source's slot from an ordinary connection of its own, whatever the session
//! is doing: `routy_cdc_source_retained_wal_bytes` and `/status` tell the WAL the slot
//! really holds while the source reconnects, is stalled, waits on a full spool, or has
//! stopped with an error (the slot keeps holding WAL then too). It reads
//! `pg_replication_slots` every `status_interval`, each round with a deadline.
//!
//! The session's own slot checks decide things (a lost slot stops the source); this only
//! reports. When the source cannot be reached or does not answer in time, the gauge keeps
//! its last value, which is then a lower bound (the slot has not advanced since relay-inner
//! last read from it), and `routy_cdc_source_slot_checked_timestamp_seconds` stops moving:
//! alert on its age. A slot that does not exist (yet) retains nothing: 0.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use routy_ops::drain::Drain;

use super::catalog::{Db, SlotInfo};
use super::{SourceError, SourceStatus, RETAINED_WAL_BYTES, SLOT_CHECKED};
use crate::cdc::replication::ReplicationConfig;
use crate::config::SourceConfig;

/// Deadline of one round: connecting (when needed) plus the query.
pub const WATCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs until `stop`.
pub(crate) async fn run(
    cfg: SourceConfig,
    rcfg: ReplicationConfig,
    status: Arc<SourceStatus>,
    stop: Drain,
) {
    let mut db: Option<Db> = None;
    let mut failing = false;
    loop {
        let round = tokio::time::timeout(
            WATCH_TIMEOUT + rcfg.connect_timeout,
            check(&mut db, &rcfg, &cfg.slot),
        );
        let res = tokio::select! {
            r = round => r.unwrap_or_else(|_| Err(SourceError::Transient(format!(
                "no answer within {:?}", WATCH_TIMEOUT + rcfg.connect_timeout)))),
            _ = stop.stopping() => return,
        };
        match res {
            Ok(info) => {
                if failing {
                    tracing::info!(source = %cfg.name, slot = %cfg.slot,
                        "reading the slot's retained WAL from the source works again");
                    failing = false;
                }
                report(&cfg, &status, info);
            }
            Err(e) => {
                // Its state is unknown after a deadline or an error: connect again.
                db = None;
                if !failing {
                    tracing::warn!(source = %cfg.name, slot = %cfg.slot, error = %e,
                        "cannot read the slot's retained WAL from the source; \
                         routy_cdc_source_retained_wal_bytes keeps its last value until it can");
                    failing = true;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(cfg.status_interval) => {}
            _ = stop.stopping() => return,
        }
    }
}

async fn check(
    db: &mut Option<Db>,
    rcfg: &ReplicationConfig,
    slot: &str,
) -> Result<Option<SlotInfo>, SourceError> {
    let conn = match db {
        Some(c) => c,
        None => db.insert(Db::connect(rcfg).await?),
    };
    conn.slot_info(slot).await
}

fn report(cfg: &SourceConfig, status: &SourceStatus, info: Option<SlotInfo>) {
    let (wal_status, retained) = match info {
        Some(i) => (Some(i.wal_status), i.retained_wal_bytes),
        None => (None, None),
    };
    metrics::gauge!(RETAINED_WAL_BYTES, "source" => cfg.name.clone())
        .set(retained.unwrap_or(0) as f64);
    let now = SystemTime::now();
    metrics::gauge!(SLOT_CHECKED, "source" => cfg.name.clone()).set(
        now.duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64()),
    );
    status.set_slot(wal_status, retained, now);
}
