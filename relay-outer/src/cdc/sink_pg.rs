//! The PostgreSQL sink: applies a source's change log from the store to a target database.

use std::sync::Arc;
use std::time::Duration;

use relay_proto::drain::Drain;

use super::store::Store;

/// One PostgreSQL sink, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgSinkConfig {
    /// Sink name (unique in the config; the key of its offset row in the target).
    pub name: String,
    /// Source it reads: `tunnel/source`.
    pub source: String,
    /// libpq-style connection string of the target.
    pub dsn: String,
    /// Create missing target schemas and tables from the relation metadata.
    pub create_tables: bool,
    /// Write every table into this schema instead of the source's schema name.
    pub schema: Option<String>,
    /// First retry delay after a failure.
    pub retry_initial: Duration,
    /// Largest retry delay.
    pub retry_max: Duration,
}

/// Runs the sink until `stop`.
pub async fn run(cfg: PgSinkConfig, store: Arc<Store>, stop: Drain) {
    let _ = (cfg, store);
    stop.stopping().await;
}
