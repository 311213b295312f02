//! The `cdc.sinks` entries of relay-outer's configuration: one kind key each
//! (`postgres`, `webhook`, `clickhouse`, `nats`, `kafka`), its keys, and the checks that
//! name the field a mistake is in.

use std::path::{Path, PathBuf};

use routy_ops::units::{resolve_path as resolve, Dur};
use serde::Deserialize;

use super::{
    valid_sink_name, validate_full_source, DEFAULT_SINK_RETRY_INITIAL, DEFAULT_SINK_RETRY_MAX,
};
use crate::cdc::sink::clickhouse::{self, ClickHouseConfig};
use crate::cdc::sink::kafka::{self, KafkaConfig, KafkaTls, Sasl};
use crate::cdc::sink::nats::{self, NatsAuth, NatsConfig, NatsTls, Per};
use crate::cdc::sink::pg::PgSinkConfig;
use crate::cdc::sink::webhook::{self, Auth, OnRejected, WebhookConfig};
use crate::cdc::sink::{Filter, SinkConfig, SinkKind, KINDS};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSink {
    name: String,
    source: String,
    postgres: Option<RawPgSink>,
    webhook: Option<RawWebhook>,
    clickhouse: Option<RawClickHouse>,
    nats: Option<RawNats>,
    kafka: Option<RawKafka>,
    tables: Option<Vec<String>>,
    ops: Option<Vec<String>>,
    retry: Option<RawRetry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    url: String,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    bearer_token_file: Option<PathBuf>,
    basic: Option<RawBasic>,
    hmac_secret_file: Option<PathBuf>,
    ca: Option<PathBuf>,
    timeout: Option<Dur>,
    batch: Option<RawBatch>,
    on_rejected: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClickHouse {
    url: String,
    database: Option<String>,
    user: Option<String>,
    password_file: Option<PathBuf>,
    ca: Option<PathBuf>,
    create_tables: Option<bool>,
    timeout: Option<Dur>,
    batch: Option<RawRowBatch>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNats {
    url: String,
    credentials_file: Option<PathBuf>,
    token_file: Option<PathBuf>,
    tls: Option<RawNatsTls>,
    stream: String,
    subject_prefix: String,
    message: Option<String>,
    create_stream: Option<bool>,
    timeout: Option<Dur>,
    batch: Option<RawMsgBatch>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKafka {
    brokers: Vec<String>,
    topic_prefix: String,
    tls: Option<RawNatsTls>,
    sasl: Option<RawSasl>,
    acks: Option<String>,
    create_topics: Option<bool>,
    partitions: Option<i32>,
    timeout: Option<Dur>,
    batch: Option<RawMsgBatch>,
    #[serde(default)]
    properties: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSasl {
    mechanism: String,
    username: String,
    password_file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNatsTls {
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMsgBatch {
    max_messages: Option<usize>,
    max_delay: Option<Dur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRowBatch {
    max_rows: Option<usize>,
    max_bytes: Option<routy_ops::units::Size>,
    max_delay: Option<Dur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBasic {
    user: String,
    password_file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBatch {
    max_events: Option<usize>,
    max_bytes: Option<routy_ops::units::Size>,
    max_delay: Option<Dur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPgSink {
    dsn: String,
    create_tables: Option<bool>,
    schema: Option<String>,
    transaction_chunk_rows: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    initial: Option<Dur>,
    max: Option<Dur>,
}

/// One entry of `cdc.sinks` (`i`: its index), checked against the sinks before it.
pub(super) fn validate_sink(
    i: usize,
    s: RawSink,
    sinks: &[SinkConfig],
    dir: &Path,
    base: &Path,
) -> Result<SinkConfig, String> {
    let f = format!("cdc.sinks[{i}]");
    if !valid_sink_name(&s.name) {
        return Err(format!(
            "{f}.name: {:?}: sink names are 1-255 characters of letters, digits, '-', '_', '.'",
            s.name
        ));
    }
    if sinks.iter().any(|o| o.name == s.name) {
        return Err(format!("{f}.name: {:?} is used twice", s.name));
    }
    validate_full_source(&s.source).map_err(|e| format!("{f}.source: {e}"))?;
    let given: Vec<&str> = [
        ("postgres", s.postgres.is_some()),
        ("webhook", s.webhook.is_some()),
        ("clickhouse", s.clickhouse.is_some()),
        ("nats", s.nats.is_some()),
        ("kafka", s.kafka.is_some()),
    ]
    .iter()
    .filter(|(_, set)| *set)
    .map(|(k, _)| *k)
    .collect();
    if given.len() != 1 {
        return Err(format!(
            "{f} (sink {:?}): a sink has exactly one kind key ({}); this one has {}",
            s.name,
            KINDS.join(", "),
            if given.is_empty() {
                "none".to_string()
            } else {
                given.join(" and ")
            }
        ));
    }
    let kind = if let Some(pg) = s.postgres {
        SinkKind::Postgres(validate_pg_sink(&f, &s.name, &s.source, pg)?)
    } else if let Some(w) = s.webhook {
        SinkKind::Webhook(validate_webhook(&f, &s.name, &s.source, w, dir, base)?)
    } else if let Some(c) = s.clickhouse {
        SinkKind::ClickHouse(validate_clickhouse(&f, &s.name, &s.source, c, base)?)
    } else if let Some(n) = s.nats {
        SinkKind::Nats(validate_nats(&f, &s.name, &s.source, n, base)?)
    } else {
        let k = s.kafka.expect("one kind key checked");
        SinkKind::Kafka(validate_kafka(&f, &s.name, &s.source, k, base)?)
    };
    let mut filter = Filter::default();
    if let Some(tables) = s.tables {
        for t in &tables {
            let ok = t
                .split_once('.')
                .is_some_and(|(a, b)| !a.is_empty() && !b.is_empty());
            if !ok {
                return Err(format!(
                    "{f}.tables: {t:?} is not schema.table (like \"public.orders\")"
                ));
            }
        }
        if tables.is_empty() {
            return Err(format!(
                "{f}.tables: empty (leave the key out for every table)"
            ));
        }
        filter.tables = Some(tables);
    }
    if let Some(ops) = s.ops {
        if ops.is_empty() {
            return Err(format!("{f}.ops: empty (leave the key out for every op)"));
        }
        filter.ops = Some(Filter::parse_ops(&ops).map_err(|e| format!("{f}.ops: {e}"))?);
    }
    let retry = s.retry.as_ref();
    let retry_initial = retry
        .and_then(|r| r.initial)
        .map_or(DEFAULT_SINK_RETRY_INITIAL, |d| d.0);
    let retry_max = retry
        .and_then(|r| r.max)
        .map_or(DEFAULT_SINK_RETRY_MAX.max(retry_initial), |d| d.0);
    if retry_initial.is_zero() {
        return Err(format!("{f}.retry.initial: must be longer than 0"));
    }
    if retry_max < retry_initial {
        return Err(format!(
            "{f}.retry.max: {retry_max:?} is shorter than retry.initial {retry_initial:?}"
        ));
    }
    Ok(SinkConfig {
        name: s.name,
        source: s.source,
        kind,
        filter,
        retry_initial,
        retry_max,
    })
}

/// Largest `transaction_chunk_rows`.
const MAX_TRANSACTION_CHUNK_ROWS: u64 = 100_000_000;

fn validate_pg_sink(
    f: &str,
    name: &str,
    source: &str,
    pg: RawPgSink,
) -> Result<PgSinkConfig, String> {
    if pg.dsn.trim().is_empty() || pg.dsn.contains('\0') {
        return Err(format!(
            "{f}.postgres.dsn: must be a non-empty connection string"
        ));
    }
    if let Some(schema) = &pg.schema {
        if schema.is_empty() || schema.len() > 63 || schema.contains('\0') {
            return Err(format!(
                "{f}.postgres.schema: {schema:?} must be 1-63 characters"
            ));
        }
    }
    let transaction_chunk_rows = match pg.transaction_chunk_rows {
        None => None,
        Some(n @ 1..=MAX_TRANSACTION_CHUNK_ROWS) => Some(n as usize),
        Some(n) => {
            return Err(format!(
            "{f}.postgres.transaction_chunk_rows: {n} must be 1 to {MAX_TRANSACTION_CHUNK_ROWS} \
                 (leave it out to apply each source transaction as one target transaction)"
        ))
        }
    };
    Ok(PgSinkConfig {
        name: name.to_string(),
        source: source.to_string(),
        dsn: pg.dsn,
        create_tables: pg.create_tables.unwrap_or(false),
        schema: pg.schema,
        transaction_chunk_rows,
    })
}

/// An `http://` or `https://` URL with a host, or why not.
fn http_url(url: &str) -> Option<&str> {
    let url = url.trim();
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    (!host.is_empty() && !host.contains(char::is_whitespace)).then_some(url)
}

fn validate_clickhouse(
    f: &str,
    name: &str,
    source: &str,
    c: RawClickHouse,
    base: &Path,
) -> Result<ClickHouseConfig, String> {
    let Some(url) = http_url(&c.url).filter(|u| !u.contains(['?', '#'])) else {
        return Err(format!(
            "{f}.clickhouse.url: {:?} is not an http:// or https:// URL with a host (and no query), like http://clickhouse:8123",
            c.url
        ));
    };
    let word = |key: &str, v: &str| -> Result<(), String> {
        if v.is_empty() || v.len() > 255 || v.chars().any(|c| c.is_control()) {
            return Err(format!(
                "{f}.clickhouse.{key}: {v:?} must be 1-255 characters without control characters"
            ));
        }
        Ok(())
    };
    let database = c.database.unwrap_or_else(|| "default".into());
    word("database", &database)?;
    let user = c.user.unwrap_or_else(|| "default".into());
    word("user", &user)?;
    let timeout = c.timeout.map_or(clickhouse::DEFAULT_TIMEOUT, |d| d.0);
    if timeout.is_zero() {
        return Err(format!("{f}.clickhouse.timeout: must be longer than 0"));
    }
    let b = c.batch.as_ref();
    let max_rows = b
        .and_then(|b| b.max_rows)
        .unwrap_or(clickhouse::DEFAULT_MAX_ROWS);
    if max_rows == 0 {
        return Err(format!("{f}.clickhouse.batch.max_rows: must be at least 1"));
    }
    let max_bytes = b
        .and_then(|b| b.max_bytes)
        .map_or(clickhouse::DEFAULT_MAX_BYTES, |s| s.0 as usize);
    if max_bytes == 0 {
        return Err(format!(
            "{f}.clickhouse.batch.max_bytes: must be at least 1"
        ));
    }
    let max_delay = b
        .and_then(|b| b.max_delay)
        .map_or(clickhouse::DEFAULT_MAX_DELAY, |d| d.0);
    Ok(ClickHouseConfig {
        name: name.to_string(),
        source: source.to_string(),
        url: url.to_string(),
        database,
        user,
        password_file: c.password_file.map(|p| resolve(base, &p)),
        ca: c.ca.map(|p| resolve(base, &p)),
        create_tables: c.create_tables.unwrap_or(true),
        timeout,
        max_rows,
        max_bytes,
        max_delay,
    })
}

/// A NATS subject of literal tokens (no wildcards, no empty tokens).
fn valid_subject(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|t| {
            !t.is_empty()
                && t != "*"
                && t != ">"
                && !t.chars().any(|c| c.is_whitespace() || c.is_control())
        })
}

fn validate_nats(
    f: &str,
    name: &str,
    source: &str,
    n: RawNats,
    base: &Path,
) -> Result<NatsConfig, String> {
    let urls: Vec<&str> = n.url.split(',').map(str::trim).collect();
    for u in &urls {
        let ok = ["nats://", "tls://"].iter().any(|p| {
            u.strip_prefix(p)
                .is_some_and(|h| !h.is_empty() && !h.contains(['/', ' ']))
        });
        if !ok {
            return Err(format!(
                "{f}.nats.url: {u:?} is not a nats://host:port or tls://host:port URL (several: comma-separated)"
            ));
        }
    }
    let auth = match (n.credentials_file, n.token_file) {
        (Some(_), Some(_)) => {
            return Err(format!(
                "{f}.nats: credentials_file and token_file exclude each other"
            ))
        }
        (Some(c), None) => Some(NatsAuth::Credentials(resolve(base, &c))),
        (None, Some(t)) => Some(NatsAuth::Token(resolve(base, &t))),
        (None, None) => None,
    };
    let tls = match n.tls {
        None => None,
        Some(t) => {
            if t.cert.is_some() != t.key.is_some() {
                return Err(format!("{f}.nats.tls: cert and key go together"));
            }
            Some(NatsTls {
                ca: t.ca.map(|p| resolve(base, &p)),
                cert: t.cert.map(|p| resolve(base, &p)),
                key: t.key.map(|p| resolve(base, &p)),
            })
        }
    };
    let stream_ok = !n.stream.is_empty()
        && n.stream.len() <= 255
        && !n.stream.chars().any(|c| {
            matches!(c, '.' | '*' | '>' | '/' | '\\') || c.is_whitespace() || c.is_control()
        });
    if !stream_ok {
        return Err(format!(
            "{f}.nats.stream: {:?} is not a stream name (no '.', '*', '>', '/', '\\' or spaces)",
            n.stream
        ));
    }
    if !valid_subject(&n.subject_prefix) {
        return Err(format!(
            "{f}.nats.subject_prefix: {:?} is not a subject of literal tokens (like \"cdc\" or \"acme.cdc\")",
            n.subject_prefix
        ));
    }
    let per = match n.message.as_deref() {
        None | Some("change") => Per::Change,
        Some("transaction") => Per::Transaction,
        Some(other) => {
            return Err(format!(
                "{f}.nats.message: {other:?}: one of change, transaction"
            ))
        }
    };
    let timeout = n.timeout.map_or(nats::DEFAULT_TIMEOUT, |d| d.0);
    if timeout.is_zero() {
        return Err(format!("{f}.nats.timeout: must be longer than 0"));
    }
    let b = n.batch.as_ref();
    let max_messages = b
        .and_then(|b| b.max_messages)
        .unwrap_or(nats::DEFAULT_MAX_MESSAGES);
    if max_messages == 0 {
        return Err(format!("{f}.nats.batch.max_messages: must be at least 1"));
    }
    Ok(NatsConfig {
        name: name.to_string(),
        source: source.to_string(),
        url: urls.join(","),
        auth,
        tls,
        stream: n.stream,
        subject_prefix: n.subject_prefix,
        per,
        create_stream: n.create_stream.unwrap_or(true),
        timeout,
        max_messages,
        max_delay: b
            .and_then(|b| b.max_delay)
            .map_or(nats::DEFAULT_MAX_DELAY, |d| d.0),
    })
}

fn validate_kafka(
    f: &str,
    name: &str,
    source: &str,
    k: RawKafka,
    base: &Path,
) -> Result<KafkaConfig, String> {
    if !kafka::BUILT {
        return Err(format!(
            "{f}.kafka: this relay-outer was built without the Kafka sink; build it with `cargo build --release --features relay-outer/kafka` (needs make, a C compiler, libssl-dev and zlib1g-dev)"
        ));
    }
    if k.brokers.is_empty() {
        return Err(format!("{f}.kafka.brokers: give at least one host:port"));
    }
    for b in &k.brokers {
        let ok = b.rsplit_once(':').is_some_and(|(h, p)| {
            !h.is_empty() && !h.contains([' ', ',', '/']) && p.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !ok {
            return Err(format!("{f}.kafka.brokers: {b:?} is not host:port"));
        }
    }
    let prefix_ok = !k.topic_prefix.is_empty()
        && k.topic_prefix.len() <= 200
        && k.topic_prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-');
    if !prefix_ok {
        return Err(format!(
            "{f}.kafka.topic_prefix: {:?} must be 1-200 of letters, digits, '.', '_', '-'",
            k.topic_prefix
        ));
    }
    match k.acks.as_deref() {
        None | Some("all") | Some("-1") => {}
        Some(other) => {
            return Err(format!(
                "{f}.kafka.acks: {other:?}: only `all` (the idempotent producer needs every in-sync replica's ack)"
            ))
        }
    }
    let tls = match k.tls {
        None => None,
        Some(t) => {
            if t.cert.is_some() != t.key.is_some() {
                return Err(format!("{f}.kafka.tls: cert and key go together"));
            }
            Some(KafkaTls {
                ca: t.ca.map(|p| resolve(base, &p)),
                cert: t.cert.map(|p| resolve(base, &p)),
                key: t.key.map(|p| resolve(base, &p)),
            })
        }
    };
    let sasl = match k.sasl {
        None => None,
        Some(s) => {
            if !["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"].contains(&s.mechanism.as_str()) {
                return Err(format!(
                    "{f}.kafka.sasl.mechanism: {:?}: one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512",
                    s.mechanism
                ));
            }
            if s.username.is_empty() {
                return Err(format!("{f}.kafka.sasl.username: must not be empty"));
            }
            Some(Sasl {
                mechanism: s.mechanism,
                username: s.username,
                password_file: resolve(base, &s.password_file),
            })
        }
    };
    let partitions = k.partitions.unwrap_or(1);
    if partitions < 1 {
        return Err(format!("{f}.kafka.partitions: must be at least 1"));
    }
    let timeout = k.timeout.map_or(kafka::DEFAULT_TIMEOUT, |d| d.0);
    if timeout < std::time::Duration::from_millis(10) {
        return Err(format!("{f}.kafka.timeout: must be at least 10ms"));
    }
    for key in k.properties.keys() {
        if kafka::OWN_PROPERTIES.contains(&key.as_str()) {
            return Err(format!(
                "{f}.kafka.properties: {key:?} is set by the sink (use brokers, tls, sasl, timeout)"
            ));
        }
    }
    let b = k.batch.as_ref();
    let max_messages = b
        .and_then(|b| b.max_messages)
        .unwrap_or(kafka::DEFAULT_MAX_MESSAGES);
    if max_messages == 0 {
        return Err(format!("{f}.kafka.batch.max_messages: must be at least 1"));
    }
    Ok(KafkaConfig {
        name: name.to_string(),
        source: source.to_string(),
        brokers: k.brokers,
        topic_prefix: k.topic_prefix,
        tls,
        sasl,
        create_topics: k.create_topics.unwrap_or(true),
        partitions,
        timeout,
        max_messages,
        max_delay: b
            .and_then(|b| b.max_delay)
            .map_or(kafka::DEFAULT_MAX_DELAY, |d| d.0),
        properties: k.properties.into_iter().collect(),
    })
}

fn validate_webhook(
    f: &str,
    name: &str,
    source: &str,
    w: RawWebhook,
    dir: &Path,
    base: &Path,
) -> Result<WebhookConfig, String> {
    let url = w.url.trim();
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    let host = rest.map(|r| r.split(['/', '?', '#']).next().unwrap_or(""));
    if host.is_none_or(|h| h.is_empty() || h.contains(char::is_whitespace)) {
        return Err(format!(
            "{f}.webhook.url: {url:?} is not an http:// or https:// URL with a host"
        ));
    }
    let mut headers = Vec::new();
    for (k, v) in w.headers {
        let ok_name = !k.is_empty()
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !ok_name {
            return Err(format!("{f}.webhook.headers: {k:?} is not a header name"));
        }
        if v.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
            return Err(format!(
                "{f}.webhook.headers.{k}: the value has a line break"
            ));
        }
        if k.eq_ignore_ascii_case("authorization") || k.to_ascii_lowercase().starts_with("routy-") {
            return Err(format!(
                "{f}.webhook.headers: {k:?} is set by the sink (use bearer_token_file or basic for authorization)"
            ));
        }
        headers.push((k, v));
    }
    let auth = match (w.bearer_token_file, w.basic) {
        (Some(_), Some(_)) => {
            return Err(format!(
                "{f}.webhook: bearer_token_file and basic exclude each other"
            ))
        }
        (Some(t), None) => Some(Auth::Bearer(resolve(base, &t))),
        (None, Some(b)) => {
            if b.user.is_empty() || b.user.contains(':') {
                return Err(format!(
                    "{f}.webhook.basic.user: must be non-empty without ':'"
                ));
            }
            Some(Auth::Basic {
                user: b.user,
                password_file: resolve(base, &b.password_file),
            })
        }
        (None, None) => None,
    };
    let timeout = w.timeout.map_or(webhook::DEFAULT_TIMEOUT, |d| d.0);
    if timeout.is_zero() {
        return Err(format!("{f}.webhook.timeout: must be longer than 0"));
    }
    let b = w.batch.as_ref();
    let max_events = b
        .and_then(|b| b.max_events)
        .unwrap_or(webhook::DEFAULT_MAX_EVENTS);
    if max_events == 0 {
        return Err(format!("{f}.webhook.batch.max_events: must be at least 1"));
    }
    let max_bytes = b
        .and_then(|b| b.max_bytes)
        .map_or(webhook::DEFAULT_MAX_BYTES, |s| s.0 as usize);
    if max_bytes == 0 {
        return Err(format!("{f}.webhook.batch.max_bytes: must be at least 1"));
    }
    let max_delay = b
        .and_then(|b| b.max_delay)
        .map_or(webhook::DEFAULT_MAX_DELAY, |d| d.0);
    let on_rejected = match w.on_rejected.as_deref() {
        None | Some("stop") => OnRejected::Stop,
        Some("dead_letter") => OnRejected::DeadLetter,
        Some(other) => {
            return Err(format!(
                "{f}.webhook.on_rejected: {other:?}: one of stop, dead_letter"
            ))
        }
    };
    Ok(WebhookConfig {
        name: name.to_string(),
        source: source.to_string(),
        url: url.to_string(),
        headers,
        auth,
        hmac_secret_file: w.hmac_secret_file.map(|p| resolve(base, &p)),
        ca: w.ca.map(|p| resolve(base, &p)),
        timeout,
        max_events,
        max_bytes,
        max_delay,
        on_rejected,
        dead_letter_dir: dir.join("_dead-letter"),
    })
}
