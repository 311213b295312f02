//! relay-outer's configuration file: YAML, unknown keys rejected, every default a named
//! constant, every semantic error naming its field.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use routy_ops::admin::{AdminSettings, AdminSpec};
use routy_ops::config_file::{self, ConfigError};
use routy_ops::units::{resolve_path as resolve, Dur};
use routy_tunnel::cidr::Cidr;
use routy_tunnel::control::KeepaliveSpec;
use serde::Deserialize;

mod sinks;
use sinks::RawSink;

use crate::cdc::sink::SinkConfig;

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
struct RawTunnel {
    listen: String,
    tls: RawTls,
    keepalive: Option<KeepaliveSpec>,
    handshake_timeout: Option<Dur>,
    max_streams_per_session: Option<usize>,
    quic: Option<bool>,
    websocket: Option<bool>,
    max_bandwidth: Option<String>,
    backlog: Option<u32>,
    failed_handshake_limit: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
    crl: Option<routy_ops::config_file::OneOrMany<PathBuf>>,
    max_intermediates: Option<u32>,
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
    max_bandwidth: Option<String>,
    backlog: Option<u32>,
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
    /// The admin endpoint (`admin:`): address, tokens, `public_metrics`, TLS.
    pub admin: AdminSettings,
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
    /// Chain rules and revocation lists for client certificates (`tls.crl`,
    /// `tls.max_intermediates`).
    pub trust: routy_tunnel::tls::Trust,
    /// Keepalive of every session.
    pub keepalive: routy_tunnel::control::Keepalive,
    /// Bound on TLS handshake plus Hello.
    pub handshake_timeout: Duration,
    /// Streams one session may carry at once.
    pub max_streams_per_session: usize,
    /// Also accept QUIC tunnel connections on the same port over UDP.
    pub quic: bool,
    /// Also accept the tunnel inside a WebSocket (`ws://` or `wss://`) on the same port.
    pub websocket: bool,
    /// Bytes per second in each direction over every listener's clients (0: none).
    pub max_bandwidth: u64,
    /// Connections the kernel queues for accept at most.
    pub backlog: u32,
    /// Failed handshakes one address may make per 10 s before its connections are
    /// closed at accept for the rest of that window (0: no limit).
    pub failed_handshake_limit: u32,
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
    /// Bytes per second in each direction, shared by the listener's clients (0: none).
    pub max_bandwidth: u64,
    /// Connections the kernel queues for accept at most.
    pub backlog: u32,
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

/// Default of `tunnel.failed_handshake_limit`.
pub const DEFAULT_FAILED_HANDSHAKE_LIMIT: u32 = 100;

/// A listen backlog: 1 to 65535, [`routy_tunnel::net::DEFAULT_BACKLOG`] when absent.
fn backlog(v: Option<u32>, field: &str) -> Result<u32, String> {
    match v {
        None => Ok(routy_tunnel::net::DEFAULT_BACKLOG),
        Some(b) if (1..=65535).contains(&b) => Ok(b),
        Some(b) => Err(format!("{field}: {b} is out of range 1-65535")),
    }
}

impl Config {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        config_file::load(path, Self::validate)
    }

    fn validate(raw: RawConfig, base: &Path) -> Result<Config, String> {
        let admin = AdminSettings::resolve(raw.admin.as_ref(), DEFAULT_ADMIN_LISTEN, base)?;
        let t = raw.tunnel;
        let tunnel = TunnelConfig {
            listen: socket_addr(&t.listen, "tunnel.listen")?,
            cert: resolve(base, &t.tls.cert),
            key: resolve(base, &t.tls.key),
            client_ca: resolve(base, &t.tls.client_ca),
            trust: routy_tunnel::tls::Trust::from_keys(
                t.tls.max_intermediates,
                t.tls.crl.as_ref(),
                |p| resolve(base, p),
            ),
            keepalive: KeepaliveSpec::resolve(t.keepalive.as_ref(), "tunnel.keepalive")?,
            handshake_timeout: t
                .handshake_timeout
                .map_or(DEFAULT_HANDSHAKE_TIMEOUT, |d| d.0),
            max_streams_per_session: routy_tunnel::session::streams_limit(
                t.max_streams_per_session,
                "tunnel.max_streams_per_session",
            )?,
            quic: t.quic.unwrap_or(true),
            websocket: t.websocket.unwrap_or(true),
            max_bandwidth: t
                .max_bandwidth
                .as_deref()
                .map(routy_tunnel::throttle::parse_rate)
                .transpose()
                .map_err(|e| format!("tunnel.max_bandwidth: {e}"))?
                .unwrap_or(0),
            backlog: backlog(t.backlog, "tunnel.backlog")?,
            failed_handshake_limit: t
                .failed_handshake_limit
                .unwrap_or(DEFAULT_FAILED_HANDSHAKE_LIMIT),
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
                backlog: backlog(l.backlog, &format!("{f}.backlog"))?,
                max_bandwidth: l
                    .max_bandwidth
                    .as_deref()
                    .map(routy_tunnel::throttle::parse_rate)
                    .transpose()
                    .map_err(|e| format!("{f}.max_bandwidth: {e}"))?
                    .unwrap_or(0),
                open_timeout: l.open_timeout.map_or(DEFAULT_OPEN_TIMEOUT, |d| d.0),
            });
        }
        let cdc = raw.cdc.map(|c| validate_cdc(c, base)).transpose()?;
        Ok(Config {
            threads: routy_tunnel::lanes::threads(raw.threads)?,
            tunnel,
            listeners,
            shutdown_grace: raw.shutdown_grace.map_or(DEFAULT_SHUTDOWN_GRACE, |d| d.0),
            admin,
            cdc,
        })
    }

    /// The certificate files whose expiry the relay watches, by configuration key.
    pub fn cert_files(&self) -> Vec<(&'static str, PathBuf)> {
        let mut files = vec![
            ("tunnel.tls.cert", self.tunnel.cert.clone()),
            ("tunnel.tls.client_ca", self.tunnel.client_ca.clone()),
        ];
        files.extend(self.admin.cert_files());
        files
    }

    /// The admin endpoint's TLS acceptor (`admin.tls`), when configured.
    pub fn admin_tls(&self) -> Result<Option<tokio_rustls::TlsAcceptor>, String> {
        routy_tunnel::tls::admin_acceptor(&self.admin)
    }

    /// Loads the TLS material too, as `run` would; `check-config` uses this.
    pub fn check_tls(&self) -> Result<rustls::ServerConfig, String> {
        routy_tunnel::tls::server_config_with(
            &self.tunnel.cert,
            &self.tunnel.key,
            &self.tunnel.client_ca,
            &self.tunnel.trust,
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
        let sink = sinks::validate_sink(i, s, &sinks, &dir, base)?;
        sinks.push(sink);
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

#[cfg(test)]
mod tests;
