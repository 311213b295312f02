//! relay-outer's configuration file: YAML, unknown keys rejected, every default a named
//! constant, every semantic error naming its field.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use routy_ops::config_file::{self, AdminSpec, ConfigError};
use routy_ops::units::{resolve_path as resolve, Dur};
use routy_tunnel::cidr::Cidr;
use routy_tunnel::control::KeepaliveSpec;
use serde::Deserialize;

use crate::cdc::sink::clickhouse::{self, ClickHouseConfig};
use crate::cdc::sink::kafka::{self, KafkaConfig, KafkaTls, Sasl};
use crate::cdc::sink::nats::{self, NatsAuth, NatsConfig, NatsTls, Per};
use crate::cdc::sink::pg::PgSinkConfig;
use crate::cdc::sink::webhook::{self, Auth, OnRejected, WebhookConfig};
use crate::cdc::sink::{Filter, SinkConfig, SinkKind, KINDS};

/// Default bound on a tunnel's TLS handshake plus Hello.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = routy_tunnel::handshake::HANDSHAKE_TIMEOUT;
/// Default bound on relay-inner reaching the service for a new client.
pub const DEFAULT_OPEN_TIMEOUT: Duration = Duration::from_secs(15);
/// Default client connections per listener.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default address of the admin HTTP endpoint: loopback only.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9464";
/// Default time open streams get to finish on SIGTERM.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Default time the CDC store keeps records (once every sink has applied them).
pub const DEFAULT_CDC_RETENTION: Duration = Duration::from_secs(168 * 3600);
/// Default first retry delay of a sink.
pub const DEFAULT_SINK_RETRY_INITIAL: Duration = Duration::from_millis(100);
/// Default largest retry delay of a sink.
pub const DEFAULT_SINK_RETRY_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    tunnel: RawTunnel,
    #[serde(default)]
    listeners: Vec<RawListener>,
    shutdown_grace: Option<Dur>,
    admin: Option<AdminSpec>,
    threads: Option<usize>,
    cdc: Option<RawCdc>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCdc {
    dir: Option<PathBuf>,
    retention: Option<Dur>,
    segment_bytes: Option<routy_ops::units::Size>,
    #[serde(default)]
    sinks: Vec<RawSink>,
    consumers: Option<RawConsumers>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConsumers {
    listen: String,
    tls: Option<RawCertKey>,
    #[serde(default)]
    tokens: Vec<RawToken>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertKey {
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    name: String,
    token_file: PathBuf,
    sources: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSink {
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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    initial: Option<Dur>,
    max: Option<Dur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTunnel {
    listen: String,
    tls: RawTls,
    keepalive: Option<KeepaliveSpec>,
    handshake_timeout: Option<Dur>,
    max_streams_per_session: Option<usize>,
    quic: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: String,
    bind: String,
    tunnel: String,
    service: String,
    allow: Option<Vec<String>>,
    max_connections: Option<usize>,
    open_timeout: Option<Dur>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The tunnel acceptor.
    pub tunnel: TunnelConfig,
    /// Client-facing listeners.
    pub listeners: Vec<ListenerConfig>,
    /// Time open streams get to finish on SIGTERM.
    pub shutdown_grace: Duration,
    /// Address of the admin HTTP endpoint (/metrics, /healthz, /readyz, /status).
    pub admin_listen: std::net::SocketAddr,
    /// Data-path threads: each TLS tunnel connection, and the streams spliced over it,
    /// runs on one (see `routy_tunnel::lanes`).
    pub threads: usize,
    /// Change data capture: the store and its sinks; `None` when not configured.
    pub cdc: Option<CdcConfig>,
}

/// The `cdc` section: where received change logs are stored and where they go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CdcConfig {
    /// Root of the store: each source's log is in `<dir>/<tunnel>/<source>/`.
    pub dir: PathBuf,
    /// Records are removed once every sink applied them and they are older than this.
    pub retention: Duration,
    /// Size of the store's segment files (retention removes whole segments).
    pub segment_bytes: u64,
    /// Sinks, each of one kind.
    pub sinks: Vec<SinkConfig>,
    /// The consumer endpoint (Server-Sent Events and pages), if configured.
    pub consumers: Option<ConsumersConfig>,
}

/// `cdc.consumers`: the HTTP endpoint consumers read change logs from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumersConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Certificate and key for HTTPS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Who may read what.
    pub tokens: Vec<TokenSpec>,
}

/// One consumer token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSpec {
    /// Its name (logs, metrics).
    pub name: String,
    /// File holding the token (16 characters or more).
    pub token_file: PathBuf,
    /// Sources (`tunnel/source`, or `*` for all) it may read.
    pub sources: Vec<String>,
}

impl CdcConfig {
    /// The sources (`tunnel/source`) some sink reads, sorted, each once.
    pub fn sources(&self) -> Vec<String> {
        let mut v: Vec<String> = self.sinks.iter().map(|s| s.source.clone()).collect();
        v.sort();
        v.dedup();
        v
    }
}

/// Where and how inner relays connect.
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    /// Address of the tunnel port.
    pub listen: SocketAddr,
    /// relay-outer's certificate chain.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// CA (bundle) that signs inner relays' client certificates.
    pub client_ca: PathBuf,
    /// Keepalive of every session.
    pub keepalive: routy_tunnel::control::Keepalive,
    /// Bound on TLS handshake plus Hello.
    pub handshake_timeout: Duration,
    /// Streams one session may carry at once.
    pub max_streams_per_session: usize,
    /// Also accept QUIC tunnel connections on the same port over UDP.
    pub quic: bool,
}

/// One client-facing port spliced to a service inside.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Name for logs.
    pub name: String,
    /// Address to bind.
    pub bind: SocketAddr,
    /// Tunnel (client certificate CN) whose sessions serve it.
    pub tunnel: String,
    /// Service name asked of relay-inner.
    pub service: String,
    /// Source blocks allowed; empty means any.
    pub allow: Vec<Cidr>,
    /// Client connections at once.
    pub max_connections: usize,
    /// Bound on relay-inner reaching the service.
    pub open_timeout: Duration,
}

pub(crate) fn socket_addr(s: &str, field: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        format!(
            "{field}: {s:?} is not an address with a port, like \"0.0.0.0:7443\" or \"[::]:7443\""
        )
    })
}

impl Config {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        config_file::load(path, Self::validate)
    }

    fn validate(raw: RawConfig, base: &Path) -> Result<Config, String> {
        let admin_listen = AdminSpec::resolve(raw.admin.as_ref(), DEFAULT_ADMIN_LISTEN)?;
        let t = raw.tunnel;
        let tunnel = TunnelConfig {
            listen: socket_addr(&t.listen, "tunnel.listen")?,
            cert: resolve(base, &t.tls.cert),
            key: resolve(base, &t.tls.key),
            client_ca: resolve(base, &t.tls.client_ca),
            keepalive: KeepaliveSpec::resolve(t.keepalive.as_ref(), "tunnel.keepalive")?,
            handshake_timeout: t
                .handshake_timeout
                .map_or(DEFAULT_HANDSHAKE_TIMEOUT, |d| d.0),
            max_streams_per_session: routy_tunnel::session::streams_limit(
                t.max_streams_per_session,
                "tunnel.max_streams_per_session",
            )?,
            quic: t.quic.unwrap_or(true),
        };
        let mut names = HashSet::new();
        let mut binds = HashSet::new();
        let mut listeners = Vec::new();
        for (i, l) in raw.listeners.into_iter().enumerate() {
            let f = format!("listeners[{i}]");
            if l.name.is_empty() || !names.insert(l.name.clone()) {
                return Err(format!("{f}.name: {:?} is empty or used twice", l.name));
            }
            let bind = socket_addr(&l.bind, &format!("{f}.bind"))?;
            if !binds.insert(bind) || bind == tunnel.listen {
                return Err(format!(
                    "{f}.bind: {bind} is already used by another listener or the tunnel"
                ));
            }
            crate::certs::validate_tunnel_name(&l.tunnel)
                .map_err(|e| format!("{f}.tunnel: {e}"))?;
            if l.service.is_empty() || l.service.len() > 255 {
                return Err(format!("{f}.service: must be 1 to 255 characters"));
            }
            let mut allow = Vec::new();
            for (j, a) in l.allow.unwrap_or_default().iter().enumerate() {
                allow.push(
                    a.parse::<Cidr>()
                        .map_err(|e| format!("{f}.allow[{j}]: {e}"))?,
                );
            }
            let max_connections = l.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
            if max_connections == 0 {
                return Err(format!("{f}.max_connections: must be at least 1"));
            }
            listeners.push(ListenerConfig {
                name: l.name,
                bind,
                tunnel: l.tunnel,
                service: l.service,
                allow,
                max_connections,
                open_timeout: l.open_timeout.map_or(DEFAULT_OPEN_TIMEOUT, |d| d.0),
            });
        }
        let cdc = raw.cdc.map(|c| validate_cdc(c, base)).transpose()?;
        Ok(Config {
            threads: routy_tunnel::lanes::threads(raw.threads)?,
            tunnel,
            listeners,
            shutdown_grace: raw.shutdown_grace.map_or(DEFAULT_SHUTDOWN_GRACE, |d| d.0),
            admin_listen,
            cdc,
        })
    }

    /// Loads the TLS material too, as `run` would; `check-config` uses this.
    pub fn check_tls(&self) -> Result<rustls::ServerConfig, String> {
        routy_tunnel::tls::server_config(
            &self.tunnel.cert,
            &self.tunnel.key,
            &self.tunnel.client_ca,
        )
        .map_err(|e| format!("tunnel.tls: {e}"))
    }

    /// The tunnel names some listener or CDC sink refers to: their relay-inner sessions
    /// are accepted.
    pub fn tunnels(&self) -> HashSet<String> {
        let mut t: HashSet<String> = self.listeners.iter().map(|l| l.tunnel.clone()).collect();
        if let Some(cdc) = &self.cdc {
            for s in &cdc.sinks {
                if let Some((tunnel, _)) = s.source.split_once('/') {
                    t.insert(tunnel.to_string());
                }
            }
        }
        t
    }
}

/// Whether `name` is acceptable as a sink name: 1-255 of `[A-Za-z0-9_.-]`.
pub fn valid_sink_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Checks a source name as relay-inner configures it (the part after `tunnel/`): 1-255
/// of `[A-Za-z0-9_.-]`, not starting with '.', so it is always one plain directory name.
pub fn validate_source_name(name: &str) -> Result<(), String> {
    if valid_sink_name(name) && !name.starts_with('.') {
        Ok(())
    } else {
        Err(format!(
            "source name {name:?} must be 1-255 characters of letters, digits, '-', '_', '.', \
             not starting with '.'"
        ))
    }
}

/// Checks a full source name `tunnel/source`.
pub fn validate_full_source(full: &str) -> Result<(), String> {
    let Some((tunnel, source)) = full.split_once('/') else {
        return Err(format!(
            "{full:?} is not of the form tunnel/source (like \"site-a/orders\")"
        ));
    };
    crate::certs::validate_tunnel_name(tunnel)?;
    validate_source_name(source)
}

fn validate_cdc(c: RawCdc, base: &Path) -> Result<CdcConfig, String> {
    let dir = match c.dir {
        Some(d) if !d.as_os_str().is_empty() => resolve(base, &d),
        _ => {
            return Err(
                "cdc.dir: required: the directory that holds the received change logs".into(),
            )
        }
    };
    let retention = c.retention.map_or(DEFAULT_CDC_RETENTION, |d| d.0);
    if retention.is_zero() {
        return Err("cdc.retention: must be longer than 0".into());
    }
    let segment_bytes = c
        .segment_bytes
        .map_or(routy_log::segment_log::DEFAULT_SEGMENT_BYTES, |s| s.0);
    if !(1 << 20..=1 << 30).contains(&segment_bytes) {
        return Err("cdc.segment_bytes: must be 1MiB to 1GiB".into());
    }
    let mut sinks: Vec<SinkConfig> = Vec::new();
    for (i, s) in c.sinks.into_iter().enumerate() {
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
            SinkKind::Webhook(validate_webhook(&f, &s.name, &s.source, w, &dir, base)?)
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
        sinks.push(SinkConfig {
            name: s.name,
            source: s.source,
            kind,
            filter,
            retry_initial,
            retry_max,
        });
    }
    let consumers = c
        .consumers
        .map(|k| validate_consumers(k, base))
        .transpose()?;
    Ok(CdcConfig {
        dir,
        retention,
        segment_bytes,
        sinks,
        consumers,
    })
}

fn validate_consumers(k: RawConsumers, base: &Path) -> Result<ConsumersConfig, String> {
    let f = "cdc.consumers";
    let listen: SocketAddr = k.listen.parse().map_err(|_| {
        format!(
            "{f}.listen: {:?} is not an address like \"127.0.0.1:9470\"",
            k.listen
        )
    })?;
    if k.tokens.is_empty() {
        return Err(format!(
            "{f}.tokens: at least one token (every request needs one): [{{ name, token_file, sources }}]"
        ));
    }
    let mut tokens: Vec<TokenSpec> = Vec::new();
    for (i, t) in k.tokens.into_iter().enumerate() {
        if !valid_sink_name(&t.name) {
            return Err(format!(
                "{f}.tokens[{i}].name: {:?}: 1-255 characters of letters, digits, '-', '_', '.'",
                t.name
            ));
        }
        if tokens.iter().any(|o| o.name == t.name) {
            return Err(format!("{f}.tokens[{i}].name: {:?} is used twice", t.name));
        }
        if t.sources.is_empty() {
            return Err(format!(
                "{f}.tokens[{i}].sources: name the sources it may read (tunnel/source, or \"*\")"
            ));
        }
        for s in &t.sources {
            if s != "*" {
                validate_full_source(s).map_err(|e| format!("{f}.tokens[{i}].sources: {e}"))?;
            }
        }
        tokens.push(TokenSpec {
            name: t.name,
            token_file: resolve(base, &t.token_file),
            sources: t.sources,
        });
    }
    Ok(ConsumersConfig {
        listen,
        tls: k
            .tls
            .map(|t| (resolve(base, &t.cert), resolve(base, &t.key))),
        tokens,
    })
}

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
    Ok(PgSinkConfig {
        name: name.to_string(),
        source: source.to_string(),
        dsn: pg.dsn,
        create_tables: pg.create_tables.unwrap_or(false),
        schema: pg.schema,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Config, String> {
        let raw: RawConfig = serde_saphyr::from_str(yaml).map_err(|e| e.to_string())?;
        Config::validate(raw, Path::new("/etc/routy"))
    }

    const GOOD: &str = r#"
tunnel:
  listen: "0.0.0.0:7443"
  tls: { cert: outer.crt, key: /k/outer.key, client_ca: ca.crt }
  keepalive: { interval: 1s, timeout: 3s }
listeners:
  - name: orders-pg
    bind: "127.0.0.1:15432"
    tunnel: site-a
    service: orders-pg
    allow: ["10.20.0.0/16", "::1"]
    max_connections: 8
"#;

    #[test]
    fn a_good_file_loads_with_defaults_and_resolved_paths() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.tunnel.cert, PathBuf::from("/etc/routy/outer.crt"));
        assert_eq!(c.tunnel.key, PathBuf::from("/k/outer.key"));
        assert_eq!(c.tunnel.keepalive.timeout, Duration::from_secs(3));
        assert!(c.tunnel.quic, "QUIC is on by default");
        let off = parse(&GOOD.replace("  keepalive:", "  quic: false\n  keepalive:")).unwrap();
        assert!(!off.tunnel.quic);
        assert_eq!(c.listeners[0].max_connections, 8);
        assert_eq!(c.listeners[0].open_timeout, DEFAULT_OPEN_TIMEOUT);
        assert_eq!(c.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert_eq!(c.threads, cpus, "one data-path thread per CPU by default");
        let two = parse(&format!("{GOOD}threads: 2\n")).unwrap();
        assert_eq!(two.threads, 2);
        let bad = parse(&format!("{GOOD}threads: -1\n")).unwrap_err();
        assert!(bad.contains("threads"), "{bad}");
    }

    #[test]
    fn mistakes_name_the_field() {
        let typo = GOOD.replace("max_connections", "max_conections");
        assert!(parse(&typo).unwrap_err().contains("max_conections"));
        let bad_addr = GOOD.replace("127.0.0.1:15432", "localhost");
        assert!(parse(&bad_addr).unwrap_err().contains("listeners[0].bind"));
        let bad_cidr = GOOD.replace("10.20.0.0/16", "10.20.0.0/40");
        assert!(parse(&bad_cidr)
            .unwrap_err()
            .contains("listeners[0].allow[0]"));
        let bad_ka = GOOD.replace("timeout: 3s", "timeout: 1s");
        assert!(parse(&bad_ka)
            .unwrap_err()
            .contains("tunnel.keepalive.timeout"));
        let bad_dur = GOOD.replace("interval: 1s", "interval: 1 fortnight");
        assert!(parse(&bad_dur).unwrap_err().contains("unknown unit"));
        let bad_tunnel = GOOD.replace("tunnel: site-a", "tunnel: Site_A");
        assert!(parse(&bad_tunnel)
            .unwrap_err()
            .contains("listeners[0].tunnel"));
        let top = format!("{GOOD}\nextra: 1\n");
        assert!(parse(&top).unwrap_err().contains("extra"));
    }

    const CDC: &str = r#"
cdc:
  dir: store
  sinks:
    - name: replica
      source: site-b/orders
      postgres: { dsn: "host=db dbname=orders user=routy", create_tables: true, schema: mirror }
      retry: { initial: 50ms, max: 5s }
    - name: second
      source: site-a/orders
      postgres: { dsn: "host=db2" }
"#;

    #[test]
    fn cdc_section_loads_with_defaults() {
        let c = parse(&format!("{GOOD}{CDC}")).unwrap();
        let cdc = c.cdc.clone().unwrap();
        assert_eq!(cdc.dir, PathBuf::from("/etc/routy/store"));
        assert_eq!(cdc.retention, DEFAULT_CDC_RETENTION);
        assert_eq!(cdc.sinks.len(), 2);
        let s = &cdc.sinks[0];
        assert_eq!(s.name, "replica");
        assert_eq!(s.source, "site-b/orders");
        let SinkKind::Postgres(p) = &s.kind else {
            panic!("{:?}", s.kind)
        };
        assert!(p.create_tables);
        assert_eq!(p.schema.as_deref(), Some("mirror"));
        assert_eq!(s.retry_initial, Duration::from_millis(50));
        assert_eq!(s.retry_max, Duration::from_secs(5));
        assert!(s.filter.is_empty());
        let d = &cdc.sinks[1];
        let SinkKind::Postgres(p) = &d.kind else {
            panic!("{:?}", d.kind)
        };
        assert!(!p.create_tables);
        assert_eq!(p.schema, None);
        assert_eq!(d.retry_initial, DEFAULT_SINK_RETRY_INITIAL);
        assert_eq!(d.retry_max, DEFAULT_SINK_RETRY_MAX);
        assert_eq!(cdc.sources(), vec!["site-a/orders", "site-b/orders"]);
        // A tunnel only a sink reads from counts as configured.
        assert!(c.tunnels().contains("site-b"));
        assert!(c.tunnels().contains("site-a"));
        assert!(parse(GOOD).unwrap().cdc.is_none());
        let minimal = parse(&format!(
            "{GOOD}cdc:\n  dir: /var/lib/routy\n  retention: 1h\n"
        ))
        .unwrap();
        let m = minimal.cdc.unwrap();
        assert_eq!(m.retention, Duration::from_secs(3600));
        assert!(m.sinks.is_empty());
    }

    const HOOK: &str = r#"
    - name: hook
      source: site-a/orders
      tables: [public.orders, sales.items]
      ops: [insert, update]
      webhook:
        url: "https://hooks.example.com/routy"
        headers: { X-Team: data }
        bearer_token_file: token
        hmac_secret_file: /s/hmac
        timeout: 5s
        batch: { max_events: 10, max_bytes: 64KiB, max_delay: 1s }
        on_rejected: dead_letter
"#;

    #[test]
    fn a_webhook_sink_with_filters_loads() {
        let c = parse(&format!("{GOOD}{CDC}{HOOK}")).unwrap();
        let cdc = c.cdc.unwrap();
        let h = &cdc.sinks[2];
        assert_eq!(
            h.filter.tables,
            Some(vec!["public.orders".to_string(), "sales.items".to_string()])
        );
        assert_eq!(h.filter.ops, Some([true, true, false, false]));
        let SinkKind::Webhook(w) = &h.kind else {
            panic!("{:?}", h.kind)
        };
        assert_eq!(w.url, "https://hooks.example.com/routy");
        assert_eq!(w.headers, vec![("X-Team".to_string(), "data".to_string())]);
        assert_eq!(
            w.auth,
            Some(Auth::Bearer(PathBuf::from("/etc/routy/token")))
        );
        assert_eq!(w.hmac_secret_file, Some(PathBuf::from("/s/hmac")));
        assert_eq!(w.timeout, Duration::from_secs(5));
        assert_eq!((w.max_events, w.max_bytes), (10, 64 * 1024));
        assert_eq!(w.max_delay, Duration::from_secs(1));
        assert_eq!(w.on_rejected, OnRejected::DeadLetter);
        assert_eq!(
            w.dead_letter_dir,
            PathBuf::from("/etc/routy/store/_dead-letter")
        );
        let plain = parse(&format!(
            "{GOOD}{CDC}    - {{ name: h2, source: site-a/orders, webhook: {{ url: \"http://127.0.0.1:9/x\" }} }}\n"
        ))
        .unwrap();
        let SinkKind::Webhook(w) = &plain.cdc.unwrap().sinks[2].kind else {
            panic!()
        };
        assert_eq!(w.auth, None);
        assert_eq!(w.on_rejected, OnRejected::Stop);
        assert_eq!(w.max_events, webhook::DEFAULT_MAX_EVENTS);
    }

    #[test]
    fn a_sink_needs_exactly_one_kind() {
        let two = format!("{GOOD}{CDC}").replace(
            "postgres: { dsn: \"host=db2\" }",
            "postgres: { dsn: \"host=db2\" }\n      webhook: { url: \"http://h/\" }",
        );
        let e = parse(&two).unwrap_err();
        assert!(
            e.contains("cdc.sinks[1]")
                && e.contains("\"second\"")
                && e.contains("postgres and webhook"),
            "{e}"
        );
        let none = format!("{GOOD}{CDC}").replace("      postgres: { dsn: \"host=db2\" }\n", "");
        let e = parse(&none).unwrap_err();
        assert!(e.contains("\"second\"") && e.contains("none"), "{e}");
        let unknown =
            format!("{GOOD}{CDC}").replace("postgres: { dsn: \"host=db2\" }", "kinesis: {}");
        assert!(parse(&unknown).unwrap_err().contains("kinesis"));
    }

    const WAREHOUSE: &str = r#"
    - name: wh
      source: site-a/orders
      clickhouse:
        url: "http://clickhouse:8123"
        database: analytics
        user: routy
        password_file: ch.password
        timeout: 5s
        batch: { max_rows: 5000, max_bytes: 8MiB, max_delay: 200ms }
    - name: js
      source: site-a/orders
      nats:
        url: "nats://n1:4222, nats://n2:4222"
        token_file: nats.token
        tls: { ca: ca.crt }
        stream: ORDERS
        subject_prefix: acme.cdc
        message: transaction
        batch: { max_messages: 100, max_delay: 5ms }
"#;
    const KAFKA: &str = r#"
    - name: log
      source: site-a/orders
      kafka:
        brokers: ["k1:9092", "k2:9093"]
        topic_prefix: cdc
        sasl: { mechanism: SCRAM-SHA-512, username: routy, password_file: k.pw }
        partitions: 6
        properties: { compression.type: lz4 }
"#;

    #[test]
    fn warehouse_and_stream_sinks_load() {
        let c = parse(&format!("{GOOD}{CDC}{WAREHOUSE}")).unwrap();
        let cdc = c.cdc.unwrap();
        let SinkKind::ClickHouse(ch) = &cdc.sinks[2].kind else {
            panic!("{:?}", cdc.sinks[2].kind)
        };
        assert_eq!(ch.url, "http://clickhouse:8123");
        assert_eq!(
            (ch.database.as_str(), ch.user.as_str()),
            ("analytics", "routy")
        );
        assert_eq!(
            ch.password_file,
            Some(PathBuf::from("/etc/routy/ch.password"))
        );
        assert!(ch.create_tables);
        assert_eq!((ch.max_rows, ch.max_bytes), (5000, 8 << 20));
        assert_eq!(ch.max_delay, Duration::from_millis(200));
        let SinkKind::Nats(n) = &cdc.sinks[3].kind else {
            panic!("{:?}", cdc.sinks[3].kind)
        };
        assert_eq!(n.url, "nats://n1:4222,nats://n2:4222");
        assert_eq!(
            n.auth,
            Some(NatsAuth::Token(PathBuf::from("/etc/routy/nats.token")))
        );
        assert_eq!(
            n.tls.as_ref().and_then(|t| t.ca.clone()),
            Some(PathBuf::from("/etc/routy/ca.crt"))
        );
        assert_eq!(
            (n.stream.as_str(), n.subject_prefix.as_str()),
            ("ORDERS", "acme.cdc")
        );
        assert_eq!(n.per, Per::Transaction);
        assert_eq!(n.max_messages, 100);
        let k = parse(&format!("{GOOD}{CDC}{KAFKA}"));
        if kafka::BUILT {
            let cdc = k.unwrap().cdc.unwrap();
            let SinkKind::Kafka(k) = &cdc.sinks[2].kind else {
                panic!("{:?}", cdc.sinks[2].kind)
            };
            assert_eq!(k.brokers, ["k1:9092", "k2:9093"]);
            assert_eq!(k.partitions, 6);
            assert_eq!(
                k.sasl.as_ref().map(|s| s.mechanism.as_str()),
                Some("SCRAM-SHA-512")
            );
            assert_eq!(
                k.properties,
                [("compression.type".to_string(), "lz4".to_string())]
            );
        } else {
            let e = k.unwrap_err();
            assert!(
                e.contains("cdc.sinks[2].kafka") && e.contains("built without the Kafka sink"),
                "{e}"
            );
        }
    }

    #[test]
    fn warehouse_and_stream_mistakes_name_the_field() {
        let base = format!("{GOOD}{CDC}{WAREHOUSE}");
        let mut cases = vec![
            (
                base.replace("http://clickhouse:8123", "clickhouse:8123"),
                "cdc.sinks[2].clickhouse.url",
            ),
            (
                base.replace("http://clickhouse:8123", "http://ch:8123/?database=x"),
                "cdc.sinks[2].clickhouse.url",
            ),
            (
                base.replace("database: analytics", "database: \"\""),
                "cdc.sinks[2].clickhouse.database",
            ),
            (
                base.replace("max_rows: 5000", "max_rows: 0"),
                "cdc.sinks[2].clickhouse.batch.max_rows",
            ),
            (
                base.replace("max_rows: 5000", "max_events: 5000"),
                "max_events",
            ),
            (
                base.replace("password_file: ch.password", "pasword_file: ch.password"),
                "pasword_file",
            ),
            (
                base.replace("nats://n1:4222", "http://n1:4222"),
                "cdc.sinks[3].nats.url",
            ),
            (
                base.replace(
                    "token_file: nats.token",
                    "token_file: t\n        credentials_file: c",
                ),
                "cdc.sinks[3].nats",
            ),
            (
                base.replace("stream: ORDERS", "stream: ORD.ERS"),
                "cdc.sinks[3].nats.stream",
            ),
            (
                base.replace("subject_prefix: acme.cdc", "subject_prefix: acme.*"),
                "cdc.sinks[3].nats.subject_prefix",
            ),
            (
                base.replace("subject_prefix: acme.cdc", "subject_prefix: acme..cdc"),
                "cdc.sinks[3].nats.subject_prefix",
            ),
            (
                base.replace("message: transaction", "message: batch"),
                "cdc.sinks[3].nats.message",
            ),
            (
                base.replace("tls: { ca: ca.crt }", "tls: { cert: c.crt }"),
                "cdc.sinks[3].nats.tls",
            ),
            (
                base.replace("max_messages: 100", "max_messages: 0"),
                "cdc.sinks[3].nats.batch.max_messages",
            ),
        ];
        if kafka::BUILT {
            let k = format!("{GOOD}{CDC}{KAFKA}");
            cases.extend([
                (
                    k.replace("\"k2:9093\"", "\"k2\""),
                    "cdc.sinks[2].kafka.brokers",
                ),
                (
                    k.replace("brokers: [\"k1:9092\", \"k2:9093\"]", "brokers: []"),
                    "cdc.sinks[2].kafka.brokers",
                ),
                (
                    k.replace("topic_prefix: cdc", "topic_prefix: \"c d\""),
                    "cdc.sinks[2].kafka.topic_prefix",
                ),
                (
                    k.replace("partitions: 6", "partitions: 6\n        acks: 1"),
                    "cdc.sinks[2].kafka.acks",
                ),
                (
                    k.replace("partitions: 6", "partitions: 0"),
                    "cdc.sinks[2].kafka.partitions",
                ),
                (
                    k.replace("SCRAM-SHA-512", "GSSAPI"),
                    "cdc.sinks[2].kafka.sasl.mechanism",
                ),
                (
                    k.replace("compression.type: lz4", "acks: \"1\""),
                    "cdc.sinks[2].kafka.properties",
                ),
            ]);
        }
        for (yaml, field) in cases {
            let err = parse(&yaml).unwrap_err();
            assert!(err.contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn cdc_mistakes_name_the_field() {
        let full = format!("{GOOD}{CDC}");
        let cases = [
            (full.replace("  dir: store\n", ""), "cdc.dir"),
            (
                full.replace("name: second", "name: replica"),
                "cdc.sinks[1].name",
            ),
            (
                full.replace("name: second", "name: \"a b\""),
                "cdc.sinks[1].name",
            ),
            (
                full.replace("site-b/orders", "site-b"),
                "cdc.sinks[0].source",
            ),
            (
                full.replace("site-b/orders", "Site_B/orders"),
                "cdc.sinks[0].source",
            ),
            (
                full.replace("site-b/orders", "site-b/../x"),
                "cdc.sinks[0].source",
            ),
            (
                full.replace("site-b/orders", "site-b/.hidden"),
                "cdc.sinks[0].source",
            ),
            (
                full.replace("site-a/orders", "site-a/"),
                "cdc.sinks[1].source",
            ),
            (
                full.replace("dsn: \"host=db2\"", "dsn: \"\""),
                "cdc.sinks[1].postgres.dsn",
            ),
            (
                full.replace("initial: 50ms", "initial: 10s"),
                "cdc.sinks[0].retry.max",
            ),
            (
                full.replace("initial: 50ms", "initial: 0ms"),
                "cdc.sinks[0].retry.initial",
            ),
            (
                full.replace("schema: mirror", "schema: \"\""),
                "cdc.sinks[0].postgres.schema",
            ),
            (
                full.replace("      postgres: { dsn: \"host=db2\" }\n", ""),
                "cdc.sinks[1]",
            ),
            (
                full.replace("create_tables", "create_table"),
                "create_table",
            ),
            (
                full.replace("  sinks:", "  retention: 0s\n  sinks:"),
                "cdc.retention",
            ),
            (full.replace("  sinks:", "  extra: 1\n  sinks:"), "extra"),
            (full.replace("retry: {", "retry: { jitter: 1s,"), "jitter"),
            (
                format!("{full}{HOOK}").replace("sales.items", "items"),
                "cdc.sinks[2].tables",
            ),
            (
                format!("{full}{HOOK}").replace("update]", "upsert]"),
                "cdc.sinks[2].ops",
            ),
            (
                format!("{full}{HOOK}").replace("https://hooks", "ftp://hooks"),
                "cdc.sinks[2].webhook.url",
            ),
            (
                format!("{full}{HOOK}").replace("X-Team", "X Team"),
                "cdc.sinks[2].webhook.headers",
            ),
            (
                format!("{full}{HOOK}").replace("X-Team", "Authorization"),
                "cdc.sinks[2].webhook.headers",
            ),
            (
                format!("{full}{HOOK}").replace("dead_letter", "skip"),
                "cdc.sinks[2].webhook.on_rejected",
            ),
            (
                format!("{full}{HOOK}").replace("max_events: 10", "max_events: 0"),
                "cdc.sinks[2].webhook.batch.max_events",
            ),
            (
                format!("{full}{HOOK}").replace("timeout: 5s", "timeout: 0s"),
                "cdc.sinks[2].webhook.timeout",
            ),
            (
                format!("{full}{HOOK}").replace(
                    "bearer_token_file: token",
                    "bearer_token_file: token\n        basic: { user: u, password_file: p }",
                ),
                "cdc.sinks[2].webhook",
            ),
            (
                format!("{full}{HOOK}").replace("max_delay: 1s", "max_wait: 1s"),
                "max_wait",
            ),
        ];
        for (yaml, field) in cases {
            let err = parse(&yaml).unwrap_err();
            assert!(err.contains(field), "{field}: {err}");
        }
    }
}
