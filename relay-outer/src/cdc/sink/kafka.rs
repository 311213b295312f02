//! The Kafka sink: one topic per table, the row's key as the message key (a row's changes
//! stay in order in one partition), the change as JSON in `relay-outer cdc tail`'s shape,
//! through librdkafka's idempotent producer with `acks=all`.
//!
//! Built only with the cargo feature `kafka` (librdkafka is compiled from source: make, a
//! C compiler, OpenSSL and zlib headers); a relay-outer built without it refuses a `kafka`
//! sink in its configuration, saying so.
//!
//! Topics: `<topic_prefix>.<schema>.<table>` (characters a topic name cannot hold become
//! `_`), created when missing with `partitions` partitions (`create_topics`, the default).
//! Key: the row's key columns as a JSON object (`{"id":"42"}`; the old key for a delete).
//! Value: the change with its `id` (position) and its transaction's `commit_lsn` and
//! `commit_time`. Headers: `routy-source`, `routy-position`, `routy-op`. A TRUNCATE goes
//! to every partition of the table's topic, so each partition's reader sees it in order.
//!
//! Every message of a batch is acknowledged by all in-sync replicas before the sink's
//! position advances (at least once). librdkafka's idempotent producer keeps retries
//! inside a session from writing twice; after a crash the last batch is sent again, and a
//! reader drops a message whose `routy-position` it has seen (positions only grow).

use std::path::PathBuf;
use std::time::Duration;

#[cfg(feature = "kafka")]
mod producer;
#[cfg(all(test, feature = "kafka"))]
mod tests;

#[cfg(feature = "kafka")]
pub use producer::KafkaSink;

/// Default messages per batch (the position is written once per batch).
pub const DEFAULT_MAX_MESSAGES: usize = 20_000;
/// Default time a batch waits for more changes once the store is read to its end.
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_millis(20);
/// Default bound on connecting, on metadata and on each message's delivery.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether this build has the Kafka sink.
pub const BUILT: bool = cfg!(feature = "kafka");

/// SASL authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sasl {
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    pub mechanism: String,
    /// User name.
    pub username: String,
    /// File holding the password.
    pub password_file: PathBuf,
}

/// TLS to the brokers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KafkaTls {
    /// CA certificate(s) to trust instead of the system's roots.
    pub ca: Option<PathBuf>,
    /// Client certificate (with `key`).
    pub cert: Option<PathBuf>,
    /// The client certificate's key.
    pub key: Option<PathBuf>,
}

/// One Kafka sink, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    /// Sink name.
    pub name: String,
    /// `tunnel/source`.
    pub source: String,
    /// Bootstrap brokers, `host:port` each.
    pub brokers: Vec<String>,
    /// Topic names start with this.
    pub topic_prefix: String,
    /// TLS, when set.
    pub tls: Option<KafkaTls>,
    /// SASL, when set.
    pub sasl: Option<Sasl>,
    /// Create missing topics.
    pub create_topics: bool,
    /// Partitions of a created topic.
    pub partitions: i32,
    /// Bound on connecting, metadata and each delivery.
    pub timeout: Duration,
    /// Messages per batch at most.
    pub max_messages: usize,
    /// Time a batch waits for more changes.
    pub max_delay: Duration,
    /// More librdkafka settings (not those the sink sets itself).
    pub properties: Vec<(String, String)>,
}

/// The settings the sink sets itself (a `properties` entry may not override them).
pub const OWN_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "enable.idempotence",
    "acks",
    "security.protocol",
    "sasl.mechanism",
    "sasl.mechanisms",
    "sasl.username",
    "sasl.password",
    "ssl.ca.location",
    "ssl.certificate.location",
    "ssl.key.location",
    "message.timeout.ms",
    "max.in.flight.requests.per.connection",
    "allow.auto.create.topics",
];

#[cfg_attr(not(feature = "kafka"), allow(dead_code))]
/// `name` as a part of a topic name: characters other than letters, digits, `.`, `_` and
/// `-` become `_`.
pub fn topic_part(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg_attr(not(feature = "kafka"), allow(dead_code))]
/// The topic of `schema.table`.
pub fn topic(prefix: &str, schema: &str, table: &str) -> String {
    let mut t = format!("{prefix}.{}.{}", topic_part(schema), topic_part(table));
    t.truncate(249);
    t
}

#[cfg(test)]
mod names {
    use super::*;

    #[test]
    fn topic_names_hold_only_legal_characters() {
        assert_eq!(topic("cdc", "public", "orders"), "cdc.public.orders");
        assert_eq!(topic("cdc", "my schema", "t$1"), "cdc.my_schema.t_1");
        assert_eq!(topic("p", "s", &"x".repeat(400)).len(), 249);
    }
}
