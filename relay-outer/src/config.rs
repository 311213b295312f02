//! relay-outer's configuration file: YAML, unknown keys rejected, every default a named
//! constant, every semantic error naming its field.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use relay_proto::cidr::Cidr;
use relay_proto::config_file::{self, AdminSpec, ConfigError};
use relay_proto::control::KeepaliveSpec;
use relay_proto::units::{resolve_path as resolve, Dur};
use serde::Deserialize;

/// Default bound on a tunnel's TLS handshake plus Hello.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = relay_proto::handshake::HANDSHAKE_TIMEOUT;
/// Default bound on relay-inner reaching the service for a new client.
pub const DEFAULT_OPEN_TIMEOUT: Duration = Duration::from_secs(15);
/// Default client connections per listener.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default address of the admin HTTP endpoint: loopback only.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9464";
/// Default time open streams get to finish on SIGTERM.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    tunnel: RawTunnel,
    #[serde(default)]
    listeners: Vec<RawListener>,
    shutdown_grace: Option<Dur>,
    admin: Option<AdminSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTunnel {
    listen: String,
    tls: RawTls,
    keepalive: Option<KeepaliveSpec>,
    handshake_timeout: Option<Dur>,
    max_streams_per_session: Option<usize>,
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
    pub keepalive: relay_proto::control::Keepalive,
    /// Bound on TLS handshake plus Hello.
    pub handshake_timeout: Duration,
    /// Streams one session may carry at once.
    pub max_streams_per_session: usize,
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
            max_streams_per_session: config_file::streams_limit(
                t.max_streams_per_session,
                "tunnel.max_streams_per_session",
            )?,
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
        Ok(Config {
            tunnel,
            listeners,
            shutdown_grace: raw.shutdown_grace.map_or(DEFAULT_SHUTDOWN_GRACE, |d| d.0),
            admin_listen,
        })
    }

    /// Loads the TLS material too, as `run` would; `check-config` uses this.
    pub fn check_tls(&self) -> Result<rustls::ServerConfig, String> {
        relay_proto::tls::server_config(&self.tunnel.cert, &self.tunnel.key, &self.tunnel.client_ca)
            .map_err(|e| format!("tunnel.tls: {e}"))
    }

    /// The tunnel names some listener refers to.
    pub fn tunnels(&self) -> HashSet<String> {
        self.listeners.iter().map(|l| l.tunnel.clone()).collect()
    }
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
        assert_eq!(c.listeners[0].max_connections, 8);
        assert_eq!(c.listeners[0].open_timeout, DEFAULT_OPEN_TIMEOUT);
        assert_eq!(c.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
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
}
