//! Managing the sinks of the running relay: list them, pause, resume, replay from a
//! position or a time. The admin endpoint serves these (`/v1/sinks…`), and the
//! `relay-outer cdc sinks|pause|resume|replay` commands call it.

use relay_proto::cdc::{Event, Record, PG_EPOCH_UNIX_SECS};
use serde_json::json;

use super::sink::Position;
use super::store::Store;
use super::Cdc;

/// Why a management request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManageError {
    /// No sink of that name is configured.
    #[error("no sink named {0:?} is configured")]
    UnknownSink(String),
    /// The position is older than what the store holds.
    #[error("position {asked} was removed by retention; the store of {source_name} holds seq {oldest} on (ask for {oldest}.0 or later)")]
    Gone {
        /// What was asked.
        asked: String,
        /// The sink's source.
        source_name: String,
        /// The oldest seq held.
        oldest: u64,
    },
    /// The request itself is wrong.
    #[error("{0}")]
    Bad(String),
    /// Reading the store failed.
    #[error("{0}")]
    Store(String),
}

impl Cdc {
    /// Every sink, as `cdc sinks` lists them.
    pub fn sinks_json(&self) -> serde_json::Value {
        let mut out = Vec::new();
        for k in &self.cfg.sinks {
            let Some(src) = self.get(&k.source) else {
                continue;
            };
            let mut v = self.sink_json(k, &src);
            v["name"] = k.name.clone().into();
            out.push(v);
        }
        serde_json::Value::Array(out)
    }

    /// Pauses (or resumes) sink `name`; it takes effect between batches. Resuming a sink
    /// that stopped because the target refused a batch or a schema change makes it try
    /// again (and accept the target's table as the operator left it).
    pub fn set_paused(&self, name: &str, paused: bool) -> Result<(), ManageError> {
        let st = self
            .sink(name)
            .ok_or_else(|| ManageError::UnknownSink(name.to_string()))?;
        st.set_paused(paused);
        if !paused && st.state() == super::sink::State::Stopped {
            // A sink the target refused (a batch, a schema change): the operator fixed
            // the target; try again.
            st.request_retry();
        }
        tracing::info!(sink = %name, paused, "sink {} by an operator", if paused { "paused" } else { "resumed" });
        Ok(())
    }

    /// Moves sink `name` to `from`, or to the first transaction committed at or after
    /// `since_us` (Unix microseconds); returns the position it re-delivers from.
    pub async fn replay(
        &self,
        name: &str,
        from: Option<Position>,
        since_us: Option<i64>,
    ) -> Result<Position, ManageError> {
        let cfg = self
            .cfg
            .sinks
            .iter()
            .find(|k| k.name == name)
            .ok_or_else(|| ManageError::UnknownSink(name.to_string()))?;
        let st = self
            .sink(name)
            .ok_or_else(|| ManageError::UnknownSink(name.to_string()))?;
        let src = self.get(&cfg.source).ok_or_else(|| {
            ManageError::Store(format!("the store of {} is not open", cfg.source))
        })?;
        let to = match (from, since_us) {
            (Some(p), None) => p,
            (None, Some(t)) => {
                let store = src.store.clone();
                tokio::task::spawn_blocking(move || position_since(&store, t))
                    .await
                    .map_err(|e| ManageError::Store(e.to_string()))?
                    .map_err(ManageError::Store)?
            }
            _ => {
                return Err(ManageError::Bad(
                    "give exactly one of from (a position) and since (a time)".into(),
                ))
            }
        };
        let oldest = src.store.first_seq();
        if to != Position::START && to.seq < oldest {
            return Err(ManageError::Gone {
                asked: to.to_string(),
                source_name: cfg.source.clone(),
                oldest,
            });
        }
        let end = src.store.synced_seq();
        if to.seq > end + 1 {
            return Err(ManageError::Bad(format!(
                "position {to} is past the end of the store of {} (its last record is seq {end})",
                cfg.source
            )));
        }
        tracing::info!(sink = %name, to = %to, "replay asked for");
        st.request_replay(to);
        Ok(to)
    }
}

/// The position of the first transaction in `store` committed at or after `since_us`
/// (Unix microseconds): its `begin` event. Past the end when there is none yet.
pub fn position_since(store: &Store, since_us: i64) -> Result<Position, String> {
    let end = store.synced_seq();
    let reader = store
        .reader(0)
        .map_err(|e| format!("reading the store {}: {e}", store.name))?;
    for item in reader {
        let (seq, payload) = item.map_err(|e| format!("reading the store {}: {e}", store.name))?;
        if seq > end {
            break;
        }
        let rec = Record::decode(&payload)
            .map_err(|e| format!("record {seq} of {} does not decode: {e}", store.name))?;
        for (i, ev) in rec.events.iter().enumerate() {
            if let Event::Begin { commit_time, .. } = ev {
                if commit_time.saturating_add(PG_EPOCH_UNIX_SECS * 1_000_000) >= since_us {
                    return Ok(Position::new(seq, i as u32));
                }
            }
        }
    }
    Ok(Position::after_record(end))
}

/// The JSON answer to a replay.
pub fn replay_json(sink: &str, to: Position) -> serde_json::Value {
    json!({ "sink": sink, "position": to.to_string() })
}
