//! relay-inner's configuration file: YAML, unknown keys rejected, every default a named
//! constant, every semantic error naming its field.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use routy_ops::admin::{AdminSettings, AdminSpec};
use routy_ops::config_file::{self, ConfigError};
use routy_ops::units::{resolve_path, Dur, Size};
use routy_tunnel::control::{Keepalive, KeepaliveSpec};
pub use routy_tunnel::proxy::{Proxy, Source as ProxySource};
use serde::Deserialize;

mod tables;
pub use tables::{identifiers, Mask, TableFilter};

/// Default first reconnect delay ceiling.
pub const DEFAULT_RECONNECT_INITIAL: Duration = Duration::from_millis(100);
/// Default largest reconnect delay.
pub const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(30);
/// Default time a session must stay up before the backoff starts over.
pub const DEFAULT_RECONNECT_RESET_AFTER: Duration = Duration::from_secs(60);
/// Default bound on dialing a service's target.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default address of the admin HTTP endpoint: loopback only.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9465";
/// Default time open streams get to finish on SIGTERM.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Default interval at which `transport: auto` on the TLS fallback tries QUIC again.
pub const DEFAULT_QUIC_RETRY: Duration = Duration::from_secs(60);
/// Default bound on TCP connect, TLS handshake and Hello to relay-outer.
pub const DEFAULT_DIAL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node: Option<String>,
    outer: Vec<RawOuter>,
    tls: RawTls,
    reconnect: Option<RawReconnect>,
    keepalive: Option<KeepaliveSpec>,
    #[serde(default)]
    services: BTreeMap<String, RawService>,
    shutdown_grace: Option<Dur>,
    admin: Option<AdminSpec>,
    dial_timeout: Option<Dur>,
    max_streams_per_session: Option<usize>,
    transport: Option<String>,
    quic_retry: Option<Dur>,
    connections: Option<usize>,
    threads: Option<usize>,
    cdc: Option<RawCdc>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCdc {
    spool: RawSpool,
    batch: Option<RawBatch>,
    #[serde(default)]
    sources: Vec<RawSource>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpool {
    dir: PathBuf,
    max_bytes: Option<Size>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBatch {
    max_bytes: Option<Size>,
    max_delay: Option<Dur>,
    ack_timeout: Option<Dur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    name: String,
    postgres: RawPgSource,
    snapshot: Option<String>,
    heartbeat: Option<Dur>,
    status_interval: Option<Dur>,
    receive_timeout: Option<Dur>,
    resync_chunk_rows: Option<usize>,
    snapshot_parallelism: Option<usize>,
    snapshot_chunk_rows: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPgSource {
    dsn: String,
    slot: Option<String>,
    publication: Option<String>,
    tables: Vec<tables::RawTable>,
    mask_key_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOuter {
    addr: String,
    server_name: Option<String>,
    proxy: Option<String>,
    proxy_credentials_file: Option<PathBuf>,
    websocket_url: Option<String>,
    websocket_ca: Option<PathBuf>,
    max_bandwidth: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    crl: Option<routy_ops::config_file::OneOrMany<PathBuf>>,
    max_intermediates: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReconnect {
    initial: Option<Dur>,
    max: Option<Dur>,
    reset_after: Option<Dur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    target: String,
    connect_timeout: Option<Dur>,
    max_bandwidth: Option<String>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// This relay's name in relay-outer's logs.
    pub node: String,
    /// relay-outer endpoints; a session is kept to each.
    pub outer: Vec<OuterEndpoint>,
    /// Client certificate chain.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// CA (bundle) that signs relay-outer's certificate.
    pub ca: PathBuf,
    /// Chain rules and revocation lists for relay-outer's certificate (`tls.crl`,
    /// `tls.max_intermediates`).
    pub trust: routy_tunnel::tls::Trust,
    /// Reconnect backoff.
    pub reconnect: Reconnect,
    /// Keepalive of every session.
    pub keepalive: Keepalive,
    /// The only targets relay-inner dials, by service name.
    pub services: BTreeMap<String, Service>,
    /// Time open streams get to finish on SIGTERM.
    pub shutdown_grace: Duration,
    /// The admin endpoint (`admin:`): address, tokens, `public_metrics`, TLS.
    pub admin: AdminSettings,
    /// Bound on connecting to relay-outer (TCP, TLS, Hello).
    pub dial_timeout: Duration,
    /// Streams relay-outer may open on one session at once.
    pub max_streams_per_session: usize,
    /// How sessions reach relay-outer.
    pub transport: Transport,
    /// With `transport: auto`, how often a session on the TLS fallback tries QUIC again.
    pub quic_retry: Duration,
    /// Tunnel connections (sessions) kept to each relay-outer endpoint.
    pub connections: usize,
    /// Data-path threads: each tunnel connection, and the streams spliced over it, runs
    /// on one (see `routy_tunnel::lanes`).
    pub threads: usize,
    /// Change data capture, when configured.
    pub cdc: Option<CdcConfig>,
}

/// Most tunnel connections per relay-outer endpoint.
pub const MAX_CONNECTIONS: usize = 64;

/// How relay-inner reaches relay-outer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TLS over TCP with yamux (passes every firewall that allows outbound TCP).
    Tls,
    /// QUIC over UDP.
    Quic,
    /// QUIC when UDP gets through, TLS otherwise; keeps trying QUIC in the background.
    Auto,
    /// The TLS tunnel inside a WebSocket (HTTP/1.1 Upgrade), for networks that pass only
    /// HTTP.
    WebSocket,
}

/// Default bound on the spool's size on disk.
pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 10 << 30;
/// Default largest shipping batch.
pub const DEFAULT_BATCH_MAX_BYTES: usize = 1 << 20;
/// Default longest wait to fill a batch.
pub const DEFAULT_BATCH_MAX_DELAY: Duration = Duration::from_millis(20);
/// Default longest wait for relay-outer's acknowledgement while batches are in flight,
/// before the shipping stream is reopened.
pub const DEFAULT_BATCH_ACK_TIMEOUT: Duration = Duration::from_secs(60);
/// Default heartbeat interval for idle published tables.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(30);
/// Default interval of standby status updates to the source.
pub const DEFAULT_STATUS_INTERVAL: Duration = Duration::from_secs(10);
/// Default silence on the replication connection after which it is taken for dead, like
/// PostgreSQL's own `wal_receiver_timeout`.
pub const DEFAULT_RECEIVE_TIMEOUT: Duration = Duration::from_secs(60);
/// Shortest `receive_timeout` accepted (other than 0, which disables it).
pub const MIN_RECEIVE_TIMEOUT: Duration = Duration::from_secs(1);

/// The CDC forwarder's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CdcConfig {
    /// Spool directory; each source has a subdirectory named after it.
    pub spool_dir: PathBuf,
    /// Bound on each source's spool on disk: reading pauses there.
    pub spool_max_bytes: u64,
    /// Largest shipping batch in bytes.
    pub batch_max_bytes: usize,
    /// Longest wait to fill a batch.
    pub batch_max_delay: Duration,
    /// Longest wait for an acknowledgement while batches are in flight.
    pub batch_ack_timeout: Duration,
    /// Sources to read.
    pub sources: Vec<SourceConfig>,
}

/// Whether a source copies its tables before streaming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotMode {
    /// Copy every table inside the slot's exported snapshot, then stream.
    Initial,
    /// Stream only.
    Never,
}

/// One PostgreSQL source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceConfig {
    /// Name; relay-outer knows the source as `<tunnel>/<name>`.
    pub name: String,
    /// libpq-style connection string.
    pub dsn: String,
    /// Logical replication slot (created when missing).
    pub slot: String,
    /// Publication (created when missing, for `tables`).
    pub publication: String,
    /// Published tables, `schema.table`.
    pub tables: Vec<String>,
    /// What of a table may leave the source, for tables with a filter.
    pub filters: BTreeMap<String, TableFilter>,
    /// The secret key of `hash` masks.
    pub mask_key_file: Option<PathBuf>,
    /// Initial copy or not.
    pub snapshot: SnapshotMode,
    /// Emit a heartbeat message when nothing was decoded for this long (0: never).
    pub heartbeat: Duration,
    /// Standby status update interval.
    pub status_interval: Duration,
    /// Nothing received on the replication connection for this long: it is dead, drop it
    /// and reconnect; after half of it a keepalive is requested (0: never).
    pub receive_timeout: Duration,
    /// Rows a resync reads per chunk.
    pub resync_chunk_rows: usize,
    /// Connections that copy one large table at once in the initial snapshot.
    pub snapshot_parallelism: usize,
    /// Rows per chunk of an initial copy in key order (its progress is kept per chunk).
    pub snapshot_chunk_rows: usize,
}

/// Default connections per large table in the initial copy.
pub const DEFAULT_SNAPSHOT_PARALLELISM: usize = 4;

/// Default rows a resync reads per chunk.
pub const DEFAULT_RESYNC_CHUNK_ROWS: usize = 10_000;
/// Default `snapshot_chunk_rows`.
pub const DEFAULT_SNAPSHOT_CHUNK_ROWS: usize = 50_000;

/// One relay-outer to keep a session with.
#[derive(Debug, Clone)]
pub struct OuterEndpoint {
    /// `host:port` to dial.
    pub addr: String,
    /// The host connected to (without brackets): `addr`'s, or the WebSocket URL's.
    pub host: String,
    /// The port connected to.
    pub port: u16,
    /// Name relay-outer's certificate must carry.
    pub server_name: rustls::pki_types::ServerName<'static>,
    /// The proxy to dial through, from `proxy` or the environment.
    pub proxy: Option<ProxyUse>,
    /// With `transport: websocket`, where the WebSocket goes.
    pub websocket: Option<WebSocketTarget>,
    /// Bytes per second in each direction over all streams of this endpoint (0: none).
    pub max_bandwidth: u64,
}

/// The WebSocket an endpoint's tunnel runs in (`transport: websocket`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebSocketTarget {
    /// `ws://host:port/path` or `wss://…`.
    pub url: String,
    /// `wss://`: TLS under the WebSocket.
    pub tls: bool,
    /// Host of the URL.
    pub host: String,
    /// Port of the URL (80 or 443 when it names none).
    pub port: u16,
    /// CA (bundle) the `wss://` server's certificate is checked against.
    pub ca: PathBuf,
    /// Name that certificate must carry.
    pub server_name: rustls::pki_types::ServerName<'static>,
}

/// Path of the default WebSocket URL, `wss://ADDR/routy` (`ADDR`: `outer[].addr`).
pub const DEFAULT_WEBSOCKET_PATH: &str = "/routy";

/// Parses `ws://host[:port][/path]` or `wss://…`.
fn websocket_url(url: &str) -> Result<(bool, String, u16), String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("wss://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("ws://") {
        (false, r)
    } else {
        return Err(format!("{url:?} is not a ws:// or wss:// URL"));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        return Err(format!("{url:?}: no credentials in the WebSocket URL"));
    }
    let default_port = if tls { 443 } else { 80 };
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (h, after) = bracketed
            .split_once(']')
            .ok_or_else(|| format!("{url:?}: bad IPv6 address"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| format!("{url:?}: bad port"))?,
            None => default_port,
        };
        (h.to_owned(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (
                h.to_owned(),
                p.parse().map_err(|_| format!("{url:?}: bad port"))?,
            ),
            None => (authority.to_owned(), default_port),
        }
    };
    if host.is_empty() || port == 0 {
        return Err(format!("{url:?}: no host or port"));
    }
    Ok((tls, host, port))
}

/// A proxy an endpoint is dialed through, and where the setting came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyUse {
    /// The proxy.
    pub proxy: Proxy,
    /// `config` or the environment variable.
    pub from: ProxySource,
}

/// `outer[].proxy` (or the environment) for one endpoint; `env` looks variables up.
fn outer_proxy(
    f: &str,
    o: &RawOuter,
    host: &str,
    base: &Path,
    transport: Transport,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<ProxyUse>, String> {
    let from_config = match o.proxy.as_deref().map(str::trim) {
        Some("none") => {
            if o.proxy_credentials_file.is_some() {
                return Err(format!(
                    "{f}.proxy_credentials_file: set, but proxy is none"
                ));
            }
            return Ok(None);
        }
        Some(url) => {
            let p = Proxy::parse(url).map_err(|e| format!("{f}.proxy: {e}"))?;
            if transport == Transport::Quic {
                return Err(format!(
                    "{f}.proxy: QUIC (transport: quic) cannot go through an HTTP or SOCKS5 proxy; \
                     use transport: tls, or auto (which then uses TLS through the proxy)"
                ));
            }
            Some(ProxyUse {
                proxy: p,
                from: ProxySource::Config,
            })
        }
        None => None,
    };
    let found = match from_config {
        Some(p) => Some(p),
        // The environment's proxies are for TCP: QUIC goes direct.
        None if transport == Transport::Quic => None,
        None => routy_tunnel::proxy::from_env(host, env)
            .map_err(|e| {
                format!("{f}: {e} (set {f}.proxy: none to dial without the environment's proxy)")
            })?
            .map(|(proxy, from)| ProxyUse { proxy, from }),
    };
    let (Some(mut found), Some(file)) = (found.clone(), &o.proxy_credentials_file) else {
        return Ok(found);
    };
    let path = resolve_path(base, file);
    if found.proxy.auth.is_some() {
        return Err(format!(
            "{f}.proxy_credentials_file: the proxy URL ({}) has credentials already; give them in one place",
            found.from
        ));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "{f}.proxy_credentials_file: cannot read {}: {e}",
            path.display()
        )
    })?;
    found.proxy = found
        .proxy
        .with_credentials_text(&text)
        .map_err(|e| format!("{f}.proxy_credentials_file {}: {e}", path.display()))?;
    Ok(Some(found))
}

/// Reconnect backoff settings.
#[derive(Debug, Clone, Copy)]
pub struct Reconnect {
    /// First delay ceiling.
    pub initial: Duration,
    /// Largest delay.
    pub max: Duration,
    /// A session up this long resets the backoff.
    pub reset_after: Duration,
}

/// A service relay-inner exposes.
#[derive(Debug, Clone)]
pub struct Service {
    /// `host:port` to dial.
    pub target: String,
    /// Bound on the dial.
    pub connect_timeout: Duration,
    /// Bytes per second in each direction, shared by the service's streams (0: none).
    pub max_bandwidth: u64,
}

/// A `max_bandwidth` value: bytes per second, 0 when absent.
fn bandwidth(v: Option<&str>, field: &str) -> Result<u64, String> {
    v.map(routy_tunnel::throttle::parse_rate)
        .transpose()
        .map_err(|e| format!("{field}: {e}"))
        .map(|r| r.unwrap_or(0))
}

fn host_port(s: &str, field: &str) -> Result<(String, u16), String> {
    let bad = || {
        format!(
            "{field}: {s:?} is not host:port (e.g. \"relay.example.com:7443\" or \"[::1]:7443\")"
        )
    };
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

/// Whether `name` is acceptable as a service name.
pub fn valid_service_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Config {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        config_file::load(path, Self::validate)
    }

    fn validate(raw: RawConfig, base: &Path) -> Result<Config, String> {
        let admin = AdminSettings::resolve(raw.admin.as_ref(), DEFAULT_ADMIN_LISTEN, base)?;
        if raw.outer.is_empty() {
            return Err("outer: list at least one relay-outer endpoint".into());
        }
        let transport = match raw.transport.as_deref() {
            None | Some("tls") => Transport::Tls,
            Some("quic") => Transport::Quic,
            Some("auto") => Transport::Auto,
            Some("websocket") => Transport::WebSocket,
            Some(o) => {
                return Err(format!(
                    "transport: {o:?} is not one of: tls, quic, auto, websocket"
                ))
            }
        };
        let env = |k: &str| std::env::var(k).ok();
        let mut outer = Vec::new();
        for (i, o) in raw.outer.into_iter().enumerate() {
            let f = format!("outer[{i}]");
            let (host, port) = host_port(&o.addr, &format!("{f}.addr"))?;
            let name = o.server_name.clone().unwrap_or_else(|| host.clone());
            let server_name =
                rustls::pki_types::ServerName::try_from(name.clone()).map_err(|_| {
                    format!("{f}.server_name: {name:?} is not a DNS name or IP address")
                })?;
            let websocket = match (transport, &o.websocket_url) {
                (Transport::WebSocket, url) => {
                    let url = url
                        .clone()
                        .unwrap_or_else(|| format!("wss://{}{DEFAULT_WEBSOCKET_PATH}", o.addr));
                    let (tls, ws_host, ws_port) =
                        websocket_url(&url).map_err(|e| format!("{f}.websocket_url: {e}"))?;
                    // The certificate of relay-outer itself unless the URL names
                    // another host (a load balancer in front).
                    let ws_name = if ws_host == host {
                        name.clone()
                    } else {
                        ws_host.clone()
                    };
                    let ws_server_name = rustls::pki_types::ServerName::try_from(ws_name.clone())
                        .map_err(|_| {
                        format!("{f}.websocket_url: {ws_name:?} is not a DNS name or IP address")
                    })?;
                    let ca = o.websocket_ca.as_ref().map_or_else(
                        || resolve_path(base, &raw.tls.ca),
                        |c| resolve_path(base, c),
                    );
                    Some(WebSocketTarget {
                        url,
                        tls,
                        host: ws_host,
                        port: ws_port,
                        ca,
                        server_name: ws_server_name,
                    })
                }
                (_, Some(_)) => {
                    return Err(format!(
                        "{f}.websocket_url: set, but transport is not websocket"
                    ))
                }
                (_, None) => None,
            };
            if o.websocket_ca.is_some() && !websocket.as_ref().is_some_and(|w| w.tls) {
                return Err(format!(
                    "{f}.websocket_ca: set, but this endpoint has no wss:// WebSocket"
                ));
            }
            // Through a proxy the connection goes to the WebSocket's host.
            let (dial_host, dial_port) = match &websocket {
                Some(w) => (w.host.clone(), w.port),
                None => (host, port),
            };
            let proxy = outer_proxy(&f, &o, &dial_host, base, transport, &env)?;
            let (host, port) = (dial_host, dial_port);
            let max_bandwidth =
                bandwidth(o.max_bandwidth.as_deref(), &format!("{f}.max_bandwidth"))?;
            outer.push(OuterEndpoint {
                max_bandwidth,
                addr: o.addr,
                host,
                port,
                server_name,
                proxy,
                websocket,
            });
        }
        let r = raw.reconnect;
        let reconnect = Reconnect {
            initial: r
                .as_ref()
                .and_then(|r| r.initial)
                .map_or(DEFAULT_RECONNECT_INITIAL, |d| d.0),
            max: r
                .as_ref()
                .and_then(|r| r.max)
                .map_or(DEFAULT_RECONNECT_MAX, |d| d.0),
            reset_after: r
                .as_ref()
                .and_then(|r| r.reset_after)
                .map_or(DEFAULT_RECONNECT_RESET_AFTER, |d| d.0),
        };
        if reconnect.initial.is_zero() || reconnect.max < reconnect.initial {
            return Err("reconnect: initial must be above zero and max at least initial".into());
        }
        let mut services = BTreeMap::new();
        for (name, s) in raw.services {
            let f = format!("services.{name}");
            if !valid_service_name(&name) {
                return Err(format!(
                    "{f}: service names are 1-255 characters of letters, digits, '-', '_', '.'"
                ));
            }
            host_port(&s.target, &format!("{f}.target"))?;
            services.insert(
                name,
                Service {
                    target: s.target,
                    connect_timeout: s.connect_timeout.map_or(DEFAULT_CONNECT_TIMEOUT, |d| d.0),
                    max_bandwidth: bandwidth(
                        s.max_bandwidth.as_deref(),
                        &format!("{f}.max_bandwidth"),
                    )?,
                },
            );
        }
        let node = match raw.node {
            Some(n) if !n.is_empty() && n.len() <= 255 => n,
            Some(_) => return Err("node: must be 1 to 255 characters".into()),
            None => hostname(),
        };
        let quic_retry = raw.quic_retry.map_or(DEFAULT_QUIC_RETRY, |d| d.0);
        if quic_retry.is_zero() {
            return Err("quic_retry: must be above zero".into());
        }
        let connections = raw.connections.unwrap_or(1);
        if !(1..=MAX_CONNECTIONS).contains(&connections) {
            return Err(format!(
                "connections: {connections} is out of range 1-{MAX_CONNECTIONS}"
            ));
        }
        let cdc = match raw.cdc {
            None => None,
            Some(c) => Some(validate_cdc(c, base)?),
        };
        Ok(Config {
            threads: routy_tunnel::lanes::threads(raw.threads)?,
            transport,
            quic_retry,
            connections,
            cdc,
            node,
            outer,
            cert: resolve_path(base, &raw.tls.cert),
            key: resolve_path(base, &raw.tls.key),
            ca: resolve_path(base, &raw.tls.ca),
            trust: routy_tunnel::tls::Trust::from_keys(
                raw.tls.max_intermediates,
                raw.tls.crl.as_ref(),
                |p| resolve_path(base, p),
            ),
            reconnect,
            keepalive: KeepaliveSpec::resolve(raw.keepalive.as_ref(), "keepalive")?,
            services,
            shutdown_grace: raw.shutdown_grace.map_or(DEFAULT_SHUTDOWN_GRACE, |d| d.0),
            admin,
            dial_timeout: raw.dial_timeout.map_or(DEFAULT_DIAL_TIMEOUT, |d| d.0),
            max_streams_per_session: routy_tunnel::session::streams_limit(
                raw.max_streams_per_session,
                "max_streams_per_session",
            )?,
        })
    }

    /// The certificate files whose expiry the relay watches, by configuration key.
    pub fn cert_files(&self) -> Vec<(&'static str, PathBuf)> {
        let mut files = vec![("tls.cert", self.cert.clone()), ("tls.ca", self.ca.clone())];
        files.extend(self.admin.cert_files());
        files
    }

    /// The admin endpoint's TLS acceptor (`admin.tls`), when configured.
    pub fn admin_tls(&self) -> Result<Option<tokio_rustls::TlsAcceptor>, String> {
        routy_tunnel::tls::admin_acceptor(&self.admin)
    }

    /// Loads the TLS material too, as `run` would; `check-config` uses this.
    pub fn check_tls(&self) -> Result<rustls::ClientConfig, String> {
        routy_tunnel::tls::client_config_with(&self.cert, &self.key, &self.ca, &self.trust)
            .map_err(|e| format!("tls: {e}"))
    }
}

/// Whether `name` is a usable PostgreSQL identifier for slots and publications
/// (lowercase letters, digits, underscore; at most 63 bytes).
fn valid_slot_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn validate_cdc(c: RawCdc, base: &Path) -> Result<CdcConfig, String> {
    let mut sources: Vec<SourceConfig> = Vec::new();
    for (i, s) in c.sources.into_iter().enumerate() {
        let f = format!("cdc.sources[{i}]");
        if !valid_service_name(&s.name) || s.name.contains('.') && s.name.starts_with('.') {
            return Err(format!(
                "{f}.name: {:?}: source names are 1-255 characters of letters, digits, '-', '_', '.'",
                s.name
            ));
        }
        if sources.iter().any(|o| o.name == s.name) {
            return Err(format!("{f}.name: {:?} is used twice", s.name));
        }
        let default_name = format!(
            "routy_{}",
            s.name.to_ascii_lowercase().replace(['-', '.'], "_")
        );
        let slot = s.postgres.slot.unwrap_or_else(|| default_name.clone());
        if !valid_slot_name(&slot) {
            return Err(format!(
                "{f}.postgres.slot: {slot:?}: use 1-63 lowercase letters, digits and '_'"
            ));
        }
        if let Some(o) = sources
            .iter()
            .find(|o| o.slot == slot && o.dsn == s.postgres.dsn)
        {
            return Err(format!(
                "{f}.postgres.slot: {slot:?} is also used by source {:?}",
                o.name
            ));
        }
        let publication = s.postgres.publication.unwrap_or(default_name);
        if !valid_slot_name(&publication) {
            return Err(format!(
                "{f}.postgres.publication: {publication:?}: use 1-63 lowercase letters, digits and '_'"
            ));
        }
        if s.postgres.dsn.trim().is_empty() {
            return Err(format!("{f}.postgres.dsn: must not be empty"));
        }
        if s.postgres.tables.is_empty() {
            return Err(format!(
                "{f}.postgres.tables: list at least one table (schema.table)"
            ));
        }
        let mut tables: Vec<String> = Vec::new();
        let mut filters = BTreeMap::new();
        for (j, t) in s.postgres.tables.into_iter().enumerate() {
            let (t, filter) = tables::validate(&format!("{f}.postgres.tables[{j}]"), t)?;
            if tables.contains(&t) {
                return Err(format!("{f}.postgres.tables[{j}]: {t:?} is listed twice"));
            }
            if !filter.is_empty() {
                filters.insert(t.clone(), filter);
            }
            tables.push(t);
        }
        let hashes = filters
            .values()
            .any(|t: &TableFilter| t.mask.values().any(Mask::is_hash));
        let mask_key_file = s.postgres.mask_key_file.map(|p| resolve_path(base, &p));
        if hashes && mask_key_file.is_none() {
            return Err(format!(
                "{f}.postgres.mask_key_file: required by a `hash` mask (a file with the secret key of the hash)"
            ));
        }
        let snapshot = match s.snapshot.as_deref() {
            None | Some("initial") => SnapshotMode::Initial,
            Some("never") => SnapshotMode::Never,
            Some(o) => return Err(format!("{f}.snapshot: {o:?} is not one of: initial, never")),
        };
        let status_interval = s.status_interval.map_or(DEFAULT_STATUS_INTERVAL, |d| d.0);
        if status_interval.is_zero() {
            return Err(format!("{f}.status_interval: must be above zero"));
        }
        let receive_timeout = s.receive_timeout.map_or(DEFAULT_RECEIVE_TIMEOUT, |d| d.0);
        if !receive_timeout.is_zero() && receive_timeout < MIN_RECEIVE_TIMEOUT {
            return Err(format!(
                "{f}.receive_timeout: {receive_timeout:?} is too short: use 0s (off) or at least {MIN_RECEIVE_TIMEOUT:?}"
            ));
        }
        let resync_chunk_rows = s.resync_chunk_rows.unwrap_or(DEFAULT_RESYNC_CHUNK_ROWS);
        if !(1..=1_000_000).contains(&resync_chunk_rows) {
            return Err(format!(
                "{f}.resync_chunk_rows: {resync_chunk_rows} is not between 1 and 1000000"
            ));
        }
        let snapshot_parallelism = s
            .snapshot_parallelism
            .unwrap_or(DEFAULT_SNAPSHOT_PARALLELISM);
        if !(1..=64).contains(&snapshot_parallelism) {
            return Err(format!(
                "{f}.snapshot_parallelism: {snapshot_parallelism} is not between 1 and 64"
            ));
        }
        let snapshot_chunk_rows = s.snapshot_chunk_rows.unwrap_or(DEFAULT_SNAPSHOT_CHUNK_ROWS);
        if !(1..=10_000_000).contains(&snapshot_chunk_rows) {
            return Err(format!(
                "{f}.snapshot_chunk_rows: {snapshot_chunk_rows} is not between 1 and 10000000"
            ));
        }
        sources.push(SourceConfig {
            name: s.name,
            dsn: s.postgres.dsn,
            slot,
            publication,
            tables,
            filters,
            mask_key_file,
            snapshot,
            heartbeat: s.heartbeat.map_or(DEFAULT_HEARTBEAT, |d| d.0),
            status_interval,
            receive_timeout,
            resync_chunk_rows,
            snapshot_parallelism,
            snapshot_chunk_rows,
        });
    }
    let b = c.batch.as_ref();
    let batch_max_bytes = b
        .and_then(|b| b.max_bytes)
        .map_or(DEFAULT_BATCH_MAX_BYTES as u64, |s| s.0);
    if !(1024..=(32 << 20)).contains(&batch_max_bytes) {
        return Err("cdc.batch.max_bytes: must be between 1KiB and 32MiB".into());
    }
    let batch_ack_timeout = b
        .and_then(|b| b.ack_timeout)
        .map_or(DEFAULT_BATCH_ACK_TIMEOUT, |d| d.0);
    if batch_ack_timeout < Duration::from_secs(1) {
        return Err("cdc.batch.ack_timeout: must be at least 1s".into());
    }
    let spool_max_bytes = c.spool.max_bytes.map_or(DEFAULT_SPOOL_MAX_BYTES, |s| s.0);
    if spool_max_bytes < (1 << 20) {
        return Err("cdc.spool.max_bytes: must be at least 1MiB".into());
    }
    Ok(CdcConfig {
        spool_dir: resolve_path(base, &c.spool.dir),
        spool_max_bytes,
        batch_max_bytes: batch_max_bytes as usize,
        batch_max_delay: b
            .and_then(|b| b.max_delay)
            .map_or(DEFAULT_BATCH_MAX_DELAY, |d| d.0),
        batch_ack_timeout,
        sources,
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "relay-inner".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Config, String> {
        let raw: RawConfig = serde_saphyr::from_str(yaml).map_err(|e| e.to_string())?;
        Config::validate(raw, Path::new("/etc/routy"))
    }

    const GOOD: &str = r#"
outer:
  - { addr: "relay.example.com:7443" }
  - { addr: "[::1]:7443", server_name: localhost }
tls: { cert: site-a.crt, key: site-a.key, ca: ca.crt }
reconnect: { initial: 50ms, max: 2s }
services:
  orders-pg: { target: "10.0.0.5:5432", connect_timeout: 2s }
  other: { target: "db.internal:5432" }
"#;

    #[test]
    fn a_good_file_loads() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.outer.len(), 2);
        assert_eq!(c.outer[0].server_name.to_str(), "relay.example.com");
        assert_eq!(c.ca, PathBuf::from("/etc/routy/ca.crt"));
        assert_eq!(c.reconnect.max, Duration::from_secs(2));
        assert_eq!(c.reconnect.reset_after, DEFAULT_RECONNECT_RESET_AFTER);
        assert_eq!(c.services["other"].connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(
            c.keepalive.interval,
            routy_tunnel::control::DEFAULT_KEEPALIVE_INTERVAL
        );
    }

    fn raw_outer(yaml: &str) -> RawOuter {
        serde_saphyr::from_str(yaml).unwrap()
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn an_outer_proxy_from_the_config() {
        let y = GOOD.replace(
            "{ addr: \"relay.example.com:7443\" }",
            "{ addr: \"relay.example.com:7443\", proxy: \"http://u:p%40ss@proxy.corp:3128\" }",
        );
        let c = parse(&y).unwrap();
        let p = c.outer[0].proxy.as_ref().unwrap();
        assert_eq!(p.proxy.to_string(), "http://u@proxy.corp:3128");
        assert_eq!(p.proxy.auth, Some(("u".into(), "p@ss".into())));
        assert_eq!(p.from, ProxySource::Config);
        assert_eq!(
            (c.outer[0].host.as_str(), c.outer[0].port),
            ("relay.example.com", 7443)
        );
        assert_eq!((c.outer[1].host.as_str(), c.outer[1].port), ("::1", 7443));

        let quic = format!("{y}transport: quic\n");
        let e = parse(&quic).unwrap_err();
        assert!(e.contains("outer[0].proxy: QUIC"), "{e}");
        let auto = format!("{y}transport: auto\n");
        assert!(parse(&auto).unwrap().outer[0].proxy.is_some());

        for (bad, want) in [
            ("proxy: \"https://p:1\"", "outer[0].proxy: https:// proxies"),
            (
                "proxy: \"p:3128\"",
                "outer[0].proxy: \"p:3128\" is not a proxy URL",
            ),
            (
                "proxy: none, proxy_credentials_file: creds",
                "outer[0].proxy_credentials_file: set, but proxy is none",
            ),
            (
                "proxy: \"http://u:pw@p:1\", proxy_credentials_file: creds",
                "has credentials already",
            ),
            (
                "proxy: \"http://p:1\", proxy_credentials_file: /nonexistent/creds",
                "cannot read /nonexistent/creds",
            ),
            ("proxi: \"http://p:1\"", "unknown field"),
        ] {
            let y = GOOD.replace(
                "{ addr: \"relay.example.com:7443\" }",
                &format!("{{ addr: \"relay.example.com:7443\", {bad} }}"),
            );
            let e = parse(&y).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn websocket_urls() {
        let y = format!("{GOOD}transport: websocket\n");
        let c = parse(&y).unwrap();
        let w = c.outer[0].websocket.as_ref().unwrap();
        assert_eq!(w.url, "wss://relay.example.com:7443/routy");
        assert!(w.tls);
        assert_eq!(
            (c.outer[0].host.as_str(), c.outer[0].port),
            ("relay.example.com", 7443)
        );
        assert_eq!(w.ca, PathBuf::from("/etc/routy/ca.crt"));
        // [::1]:7443 with server_name localhost: the certificate name is the server name.
        assert_eq!(
            c.outer[1].websocket.as_ref().unwrap().server_name.to_str(),
            "localhost"
        );
        let lb = GOOD.replace(
            "{ addr: \"relay.example.com:7443\" }",
            "{ addr: \"relay.example.com:7443\", websocket_url: \"wss://lb.example.com/t\", websocket_ca: public.pem }",
        );
        let c = parse(&format!("{lb}transport: websocket\n")).unwrap();
        let w = c.outer[0].websocket.as_ref().unwrap();
        assert_eq!(
            (w.host.as_str(), w.port, w.server_name.to_str().as_ref()),
            ("lb.example.com", 443, "lb.example.com")
        );
        assert_eq!(w.ca, PathBuf::from("/etc/routy/public.pem"));
        assert_eq!(
            (c.outer[0].host.as_str(), c.outer[0].port),
            ("lb.example.com", 443)
        );
        let e = parse(&lb).unwrap_err();
        assert!(
            e.contains("outer[0].websocket_url: set, but transport is not websocket"),
            "{e}"
        );
        for (url, want) in [
            ("http://x/", "is not a ws:// or wss:// URL"),
            ("ws://u:p@x/", "no credentials"),
            ("ws://x:0/", "no host or port"),
            ("ws://x:y/", "bad port"),
            ("ws:///", "no host or port"),
        ] {
            let y = GOOD.replace(
                "{ addr: \"relay.example.com:7443\" }",
                &format!("{{ addr: \"relay.example.com:7443\", websocket_url: \"{url}\" }}"),
            );
            let e = parse(&format!("{y}transport: websocket\n")).unwrap_err();
            assert!(e.contains(want), "{url}: {e}");
        }
        let ws_ca = GOOD.replace(
            "{ addr: \"relay.example.com:7443\" }",
            "{ addr: \"relay.example.com:7443\", websocket_url: \"ws://x/\", websocket_ca: a.pem }",
        );
        let e = parse(&format!("{ws_ca}transport: websocket\n")).unwrap_err();
        assert!(e.contains("no wss:// WebSocket"), "{e}");
    }

    #[test]
    fn bandwidth_limits() {
        let y = GOOD
            .replace(
                "{ addr: \"relay.example.com:7443\" }",
                "{ addr: \"relay.example.com:7443\", max_bandwidth: 8MiB/s }",
            )
            .replace(
                "other: { target: \"db.internal:5432\" }",
                "other: { target: \"db.internal:5432\", max_bandwidth: 500KB/s }",
            );
        let c = parse(&y).unwrap();
        assert_eq!(c.outer[0].max_bandwidth, 8 << 20);
        assert_eq!(c.outer[1].max_bandwidth, 0);
        assert_eq!(c.services["other"].max_bandwidth, 500_000);
        assert_eq!(c.services["orders-pg"].max_bandwidth, 0);
        let e = parse(&y.replace("500KB/s", "500KB")).unwrap_err();
        assert!(
            e.contains("services.other.max_bandwidth") && e.contains("not a rate"),
            "{e}"
        );
        let e = parse(&y.replace("8MiB/s", "lots/s")).unwrap_err();
        assert!(e.contains("outer[0].max_bandwidth"), "{e}");
    }

    #[test]
    fn proxy_credentials_come_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("creds"), "alice:s3cr:et\n").unwrap();
        let o = raw_outer(
            "{ addr: \"r:1\", proxy: \"socks5://p:1080\", proxy_credentials_file: creds }",
        );
        let p = outer_proxy("outer[0]", &o, "r", dir.path(), Transport::Tls, &no_env)
            .unwrap()
            .unwrap();
        assert_eq!(p.proxy.auth, Some(("alice".into(), "s3cr:et".into())));
        std::fs::write(dir.path().join("creds"), "no colon\n").unwrap();
        let e = outer_proxy("outer[0]", &o, "r", dir.path(), Transport::Tls, &no_env).unwrap_err();
        assert!(e.contains("user:password"), "{e}");
    }

    #[test]
    fn the_environment_proxy_applies_unless_none_or_quic() {
        let env = |k: &str| match k {
            "HTTPS_PROXY" => Some("http://envproxy:8080".to_string()),
            "NO_PROXY" => Some("localhost,.internal".to_string()),
            _ => None,
        };
        let base = Path::new("/etc/routy");
        let o = raw_outer("{ addr: \"relay.example.com:7443\" }");
        let p = outer_proxy(
            "outer[0]",
            &o,
            "relay.example.com",
            base,
            Transport::Auto,
            &env,
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.from, ProxySource::Env("HTTPS_PROXY"));
        assert_eq!(p.from.to_string(), "HTTPS_PROXY");
        assert!(outer_proxy(
            "outer[0]",
            &o,
            "relay.example.com",
            base,
            Transport::Quic,
            &env
        )
        .unwrap()
        .is_none());
        assert!(
            outer_proxy("outer[0]", &o, "db.internal", base, Transport::Tls, &env)
                .unwrap()
                .is_none()
        );
        let none = raw_outer("{ addr: \"relay.example.com:7443\", proxy: none }");
        assert!(outer_proxy(
            "outer[0]",
            &none,
            "relay.example.com",
            base,
            Transport::Tls,
            &env
        )
        .unwrap()
        .is_none());
        let bad = |k: &str| (k == "ALL_PROXY").then(|| "ftp://x".to_string());
        let e = outer_proxy(
            "outer[0]",
            &o,
            "relay.example.com",
            base,
            Transport::Tls,
            &bad,
        )
        .unwrap_err();
        assert!(
            e.contains("ALL_PROXY") && e.contains("outer[0].proxy: none"),
            "{e}"
        );
    }

    #[test]
    fn cdc_sources_load_with_defaults() {
        let y = format!(
            "{GOOD}cdc:\n  spool: {{ dir: spool, max_bytes: 2GiB }}\n  sources:\n    - name: orders\n      postgres: {{ dsn: \"host=db user=routy\", tables: [public.orders] }}\n"
        );
        let c = parse(&y).unwrap().cdc.unwrap();
        assert_eq!(c.spool_dir, PathBuf::from("/etc/routy/spool"));
        assert_eq!(c.spool_max_bytes, 2 << 30);
        let s = &c.sources[0];
        assert_eq!(
            (s.slot.as_str(), s.publication.as_str()),
            ("routy_orders", "routy_orders")
        );
        assert_eq!(s.snapshot, SnapshotMode::Initial);
        assert_eq!(s.heartbeat, DEFAULT_HEARTBEAT);
        assert_eq!(s.receive_timeout, DEFAULT_RECEIVE_TIMEOUT);
        for (bad, field) in [
            ("tables: [public.orders]", "tables: [orders]"),
            ("tables: [public.orders]", "tables: []"),
            ("name: orders", "name: \"a b\""),
            (
                "dsn: \"host=db user=routy\"",
                "dsn: \"host=db\", slot: Bad-Slot",
            ),
            (
                "tables: [public.orders] }",
                "tables: [public.orders], tabels: [] }",
            ),
        ] {
            let y = y.replace(bad, field);
            let e = parse(&y).unwrap_err();
            assert!(e.contains("cdc") || e.contains("tabels"), "{field}: {e}");
        }
    }

    #[test]
    fn table_entries_take_filters_and_name_their_mistakes() {
        let src = |tables: &str, extra: &str| {
            format!(
                "{GOOD}cdc:\n  spool: {{ dir: spool }}\n  sources:\n    - name: crm\n      postgres:\n        dsn: \"host=db\"\n{extra}        tables:\n{tables}"
            )
        };
        let good = "          - public.orders\n          - name: public.customers\n            exclude_columns: [notes]\n            where: \"region = 'eu'\"\n            mask: { email: hash, ssn: null, name: \"REDACTED\" }\n";
        let c = parse(&src(good, "        mask_key_file: mask.key\n")).unwrap();
        let s = &c.cdc.unwrap().sources[0];
        assert_eq!(s.tables, vec!["public.orders", "public.customers"]);
        assert_eq!(s.mask_key_file, Some(PathBuf::from("/etc/routy/mask.key")));
        let f = &s.filters["public.customers"];
        assert_eq!(f.exclude_columns, vec!["notes"]);
        assert_eq!(f.where_.as_deref(), Some("region = 'eu'"));
        assert_eq!(f.mask["email"], Mask::Hash);
        assert_eq!(f.mask["ssn"], Mask::Null);
        assert_eq!(f.mask["name"], Mask::Literal("REDACTED".into()));
        assert!(!s.filters.contains_key("public.orders"));
        for (tables, extra, want) in [
            (good, "", "postgres.mask_key_file: required"),
            ("          - name: public.c\n            colums: [a]\n", "", "colums"),
            ("          - name: public.c\n            columns: [a]\n            exclude_columns: [b]\n", "", "tables[0]: give columns or exclude_columns"),
            ("          - name: c\n", "", "tables[0]: \"c\" is not schema.table"),
            ("          - name: public.c\n            where: \"a = 1; drop table x\"\n", "", "tables[0].where"),
            ("          - name: public.c\n            exclude_columns: [a]\n            mask: { a: hash }\n", "        mask_key_file: k\n", "tables[0].mask.a: the column is not sent"),
            ("          - name: public.c\n            columns: []\n", "", "tables[0].columns: empty"),
            ("          - public.c\n          - name: public.c\n", "", "tables[1]: \"public.c\" is listed twice"),
        ] {
            let e = parse(&src(tables, extra)).unwrap_err();
            assert!(e.contains(want), "{want:?} not in {e}");
        }
    }

    #[test]
    fn receive_timeout_parses_and_typos_are_refused() {
        let src = |extra: &str| {
            format!(
                "{GOOD}cdc:\n  spool: {{ dir: spool }}\n  sources:\n    - name: orders\n      postgres: {{ dsn: \"host=db user=routy\", tables: [public.orders] }}\n{extra}"
            )
        };
        let t = |extra: &str| parse(&src(extra)).map(|c| c.cdc.unwrap().sources[0].receive_timeout);
        assert_eq!(
            t("      receive_timeout: 5s\n").unwrap(),
            Duration::from_secs(5)
        );
        assert_eq!(t("      receive_timeout: 0s\n").unwrap(), Duration::ZERO);
        let e = t("      receive_timeout: 100ms\n").unwrap_err();
        assert!(e.contains("cdc.sources[0].receive_timeout"), "{e}");
        for typo in [
            "      recieve_timeout: 5s\n",
            "      postgres_receive_timeout: 5s\n",
            "      receive_timeout: 5s\n      wal_receiver_timeout: 5s\n",
        ] {
            let e = t(typo).unwrap_err();
            assert!(e.contains("unknown field"), "{typo}: {e}");
        }
        // Not a key of the postgres block.
        let e = parse(&src("").replace(
            "tables: [public.orders] }",
            "tables: [public.orders], receive_timeout: 5s }",
        ))
        .unwrap_err();
        assert!(e.contains("receive_timeout"), "{e}");
    }

    #[test]
    fn copy_chunk_sizes_are_bounded() {
        let src = |extra: &str| {
            format!(
                "{GOOD}cdc:\n  spool: {{ dir: spool }}\n  sources:\n    - name: orders\n      postgres: {{ dsn: \"host=db user=routy\", tables: [public.orders] }}\n{extra}"
            )
        };
        let s = |extra: &str| parse(&src(extra)).map(|c| c.cdc.unwrap().sources[0].clone());
        let d = s("").unwrap();
        assert_eq!(d.snapshot_chunk_rows, DEFAULT_SNAPSHOT_CHUNK_ROWS);
        assert_eq!(d.resync_chunk_rows, DEFAULT_RESYNC_CHUNK_ROWS);
        assert_eq!(
            s("      snapshot_chunk_rows: 5000\n")
                .unwrap()
                .snapshot_chunk_rows,
            5000
        );
        for (bad, want) in [
            (
                "      snapshot_chunk_rows: 0\n",
                "cdc.sources[0].snapshot_chunk_rows: 0 is not between",
            ),
            (
                "      resync_chunk_rows: 0\n",
                "cdc.sources[0].resync_chunk_rows: 0 is not between",
            ),
            ("      snapshot_chunk_row: 10\n", "unknown field"),
        ] {
            let e = s(bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn mistakes_name_the_field() {
        let typo = GOOD.replace("connect_timeout: 2s", "conect_timeout: 2s");
        assert!(parse(&typo).unwrap_err().contains("conect_timeout"));
        let port = GOOD.replace("10.0.0.5:5432", "10.0.0.5");
        assert!(parse(&port)
            .unwrap_err()
            .contains("services.orders-pg.target"));
        let name = GOOD.replace("orders-pg:", "\"orders pg\":");
        assert!(parse(&name).unwrap_err().contains("services.orders pg"));
        let outer = GOOD.replace("relay.example.com:7443", "relay.example.com");
        assert!(parse(&outer).unwrap_err().contains("outer[0].addr"));
        let backoff = GOOD.replace("max: 2s", "max: 1ms");
        assert!(parse(&backoff).unwrap_err().contains("reconnect"));
        let t = format!("{GOOD}transport: udp\n");
        assert!(parse(&t).unwrap_err().contains("transport"));
        let c = format!("{GOOD}connections: 0\n");
        assert!(parse(&c).unwrap_err().contains("connections"));
        let ok = parse(&format!("{GOOD}transport: tls\nconnections: 4\n")).unwrap();
        assert_eq!((ok.transport, ok.connections), (Transport::Tls, 4));
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert_eq!(ok.threads, cpus, "one data-path thread per CPU by default");
        assert_eq!(parse(&format!("{GOOD}threads: 0\n")).unwrap().threads, 0);
        let t = format!("{GOOD}threads: 100000\n");
        assert!(parse(&t).unwrap_err().contains("threads: 100000"));
        assert_eq!(ok.quic_retry, DEFAULT_QUIC_RETRY);
        let q = parse(&format!("{GOOD}transport: quic\n")).unwrap();
        assert_eq!(q.transport, Transport::Quic);
        let a = parse(&format!("{GOOD}transport: auto\nquic_retry: 2s\n")).unwrap();
        assert_eq!(
            (a.transport, a.quic_retry),
            (Transport::Auto, Duration::from_secs(2))
        );
        let z = format!("{GOOD}transport: auto\nquic_retry: 0s\n");
        assert!(parse(&z).unwrap_err().contains("quic_retry"));
    }
}
