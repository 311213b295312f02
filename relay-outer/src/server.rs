//! relay-outer at run time: the tunnel port, the listeners, and the reload that changes
//! them without dropping what the change does not touch.
//!
//! A reload reads and validates the whole file (TLS material included) and binds every
//! new listener address before anything changes; if any of that fails the old
//! configuration stays in force. Then: new connections on the tunnel port get the new TLS
//! material, keepalive and tunnel list; listeners are added, removed, rebound or given
//! their new allowlist, limit, tunnel or service; sessions of tunnels that no listener
//! (or CDC sink) uses any more are closed. Established streams keep running. The `cdc`
//! section is set up at start only: a reload that changes it is rejected.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use routy_ops::config_file::restart_needed;
use routy_ops::drain::Drain;
use routy_ops::metrics as m;
use tracing::{info, warn};

use crate::cdc::Cdc;
use crate::config::Config;
use crate::listen::{Listener, Running};
use crate::tunnel::registry::Registry;
use crate::tunnel::{Settings, TunnelServer};

/// The running relay.
pub struct OuterRelay {
    path: PathBuf,
    tunnel: Arc<TunnelServer>,
    tunnel_addr: SocketAddr,
    /// The QUIC side of the tunnel port, when `tunnel.quic` is on.
    quic: Option<quinn::Endpoint>,
    listeners: Mutex<HashMap<String, Arc<Running>>>,
    config: Mutex<Config>,
    reload_lock: tokio::sync::Mutex<()>,
    /// Live sessions.
    pub registry: Arc<Registry>,
    /// Shutdown signal and in-flight streams.
    pub drain: Drain,
    /// When the relay started.
    pub started: Instant,
    /// CDC stores and sinks; `None` without a `cdc` section.
    pub cdc: Option<Arc<Cdc>>,
    /// Who may use the admin endpoint (tokens follow reloads).
    pub admin_access: Arc<routy_ops::admin::Access>,
}

/// Puts `tunnel.max_bandwidth` in force (streams already running follow).
fn set_tunnel_bandwidth(cfg: &Config) {
    for l in crate::listen::tunnel_bandwidth().iter() {
        l.set_rate(cfg.tunnel.max_bandwidth);
    }
}

fn settings(cfg: &Config, tls: rustls::ServerConfig) -> anyhow::Result<Settings> {
    let quic = if cfg.tunnel.quic {
        Some(
            routy_tunnel::quic::server_config(tls.clone(), cfg.tunnel.keepalive)
                .context("tunnel.quic")?,
        )
    } else {
        None
    };
    let websocket = if cfg.tunnel.websocket {
        Some(Arc::new(
            routy_tunnel::tls::websocket_server_config(&cfg.tunnel.cert, &cfg.tunnel.key)
                .context("tunnel.tls (for WebSocket over TLS)")?,
        ))
    } else {
        None
    };
    Ok(Settings {
        cfg: cfg.tunnel.clone(),
        websocket,
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
        quic,
        tunnels: cfg.tunnels(),
    })
}

impl OuterRelay {
    /// Binds the tunnel port and every listener, then starts serving.
    pub async fn start(
        path: PathBuf,
        cfg: Config,
        tls: rustls::ServerConfig,
    ) -> anyhow::Result<Arc<Self>> {
        routy_tunnel::expiry::watch(cfg.cert_files());
        routy_ops::give_back::spawn();
        let drain = Drain::new();
        let registry = Arc::new(Registry::default());
        let tunnel_sock = routy_tunnel::net::listen(cfg.tunnel.listen, cfg.tunnel.backlog)
            .with_context(|| format!("tunnel.listen: cannot bind {}", cfg.tunnel.listen))?;
        let tunnel_addr = tunnel_sock.local_addr().unwrap_or(cfg.tunnel.listen);
        let tunnel_settings = settings(&cfg, tls)?;
        // QUIC on the same port number, over UDP. One endpoint (one socket, one driver)
        // carries every QUIC connection: it and its sessions live on data-path thread 0,
        // where the listeners accept too (see routy_tunnel::lanes).
        let lane0 = routy_tunnel::lanes::get(0);
        let quic = match &tunnel_settings.quic {
            Some(q) => {
                let _on = lane0.as_ref().map(|l| l.enter());
                Some(
                    routy_tunnel::quic::server_endpoint_with(tunnel_addr, q.clone()).with_context(
                        || format!("tunnel.quic: cannot listen on UDP {tunnel_addr}"),
                    )?,
                )
            }
            None => None,
        };
        let mut sockets = Vec::new();
        for l in &cfg.listeners {
            let sock = routy_tunnel::net::listen(l.bind, l.backlog)
                .with_context(|| format!("listener {}: cannot bind {}", l.name, l.bind))?;
            sockets.push((l.clone(), sock));
        }
        registry.set_max_streams(cfg.tunnel.max_streams_per_session);
        let cdc = match &cfg.cdc {
            Some(c) => Some(Cdc::start(c.clone(), drain.clone()).await?),
            None => None,
        };
        set_tunnel_bandwidth(&cfg);
        let tunnel = Arc::new(TunnelServer::new(
            tunnel_settings,
            registry.clone(),
            drain.clone(),
            cdc.clone(),
        ));
        info!(listen = %tunnel_addr, quic = quic.is_some(), "tunnel port ready");
        tokio::spawn(tunnel.clone().serve(tunnel_sock));
        if let Some(ep) = &quic {
            let serve = tunnel.clone().serve_quic(ep.clone());
            match &lane0 {
                Some(lane) => drop(lane.spawn(serve)),
                None => drop(tokio::spawn(serve)),
            }
        }
        let mut listeners = HashMap::new();
        for (l, sock) in sockets {
            info!(listener = %l.name, bind = %l.bind, tunnel = %l.tunnel, service = %l.service, "listener ready");
            let listener = Listener::new(l.clone(), registry.clone(), drain.clone(), None);
            listeners.insert(l.name.clone(), Running::start(listener, sock));
        }
        let admin_access = routy_ops::admin::Access::new(&cfg.admin);
        Ok(Arc::new(OuterRelay {
            admin_access,
            path,
            tunnel,
            tunnel_addr,
            quic,
            listeners: Mutex::new(listeners),
            config: Mutex::new(cfg),
            reload_lock: tokio::sync::Mutex::new(()),
            registry,
            drain,
            started: Instant::now(),
            cdc,
        }))
    }

    /// The configuration in force.
    pub fn config(&self) -> Config {
        self.config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The running listeners by name.
    pub fn listeners(&self) -> HashMap<String, Arc<Running>> {
        self.listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The bound tunnel port.
    pub fn tunnel_addr(&self) -> SocketAddr {
        self.tunnel_addr
    }

    /// Re-reads the config file and applies it; on any error the old one stays.
    pub async fn reload(&self) -> Result<String, String> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let res = self.try_reload().await;
        if res.is_ok() {
            let cfg = self.config();
            routy_tunnel::expiry::watch(cfg.cert_files());
            self.admin_access.update(&cfg.admin);
        }
        let result = if res.is_ok() { "ok" } else { "error" };
        metrics::counter!(m::CONFIG_RELOADS, "result" => result).increment(1);
        res
    }

    async fn try_reload(&self) -> Result<String, String> {
        let new = Config::load(&self.path).map_err(|e| e.to_string())?;
        let tls = new.check_tls()?;
        // Sessions whose client certificate the revocation lists now name are closed
        // below: a revocation takes effect at the reload, not at the next reconnect.
        let revoked = routy_tunnel::tls::revoked(&new.tunnel.trust.crls, &new.tunnel.client_ca)
            .map_err(|e| format!("tunnel.tls.crl: {e}"))?;
        let old = self.config();
        restart_needed("tunnel.listen", &old.tunnel.listen, &new.tunnel.listen)?;
        restart_needed("tunnel.quic", &old.tunnel.quic, &new.tunnel.quic)?;
        let new_settings = settings(&new, tls).map_err(|e| format!("{e:#}"))?;
        old.admin.reloadable(&new.admin)?;
        restart_needed("threads", &old.threads, &new.threads)?;
        // Consumer tokens are read again; anything else in the cdc section needs a
        // restart.
        let without_tokens = |c: &Option<crate::config::CdcConfig>| {
            c.clone().map(|mut c| {
                if let Some(k) = c.consumers.as_mut() {
                    k.tokens.clear();
                }
                c
            })
        };
        if without_tokens(&new.cdc) != without_tokens(&old.cdc) {
            return Err(
                "the cdc section changed: that needs a restart (stores, sinks and the consumer endpoint are set up at start; only consumer tokens are reloaded)"
                    .to_string(),
            );
        }
        if let (Some(cdc), Some(c)) = (&self.cdc, &new.cdc) {
            cdc.reload_tokens(c)?;
        }
        let running = self.listeners();
        // Bind what is new or moved before changing anything.
        let mut fresh = HashMap::new();
        for l in &new.listeners {
            let same_socket = running.contains_key(&l.name)
                && old
                    .listeners
                    .iter()
                    .any(|o| o.name == l.name && o.bind == l.bind);
            if same_socket {
                continue;
            }
            // (A listener moved to an address another one frees in the same reload fails
            // here, before anything changed: do such a swap in two reloads.)
            let sock = routy_tunnel::net::listen(l.bind, l.backlog)
                .map_err(|e| format!("listener {}: cannot bind {}: {e}", l.name, l.bind))?;
            fresh.insert(l.name.clone(), sock);
        }

        if let (Some(ep), Some(q)) = (&self.quic, &new_settings.quic) {
            ep.set_server_config(Some(q.clone()));
        }
        self.tunnel.update(new_settings);
        set_tunnel_bandwidth(&new);
        self.registry
            .set_max_streams(new.tunnel.max_streams_per_session);
        let mut added = Vec::new();
        let mut changed = Vec::new();
        let mut removed = Vec::new();
        {
            let mut map = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
            let keep: std::collections::HashSet<&str> =
                new.listeners.iter().map(|l| l.name.as_str()).collect();
            map.retain(|name, r| {
                let stays = keep.contains(name.as_str()) && !fresh.contains_key(name);
                if !stays {
                    r.stop();
                    if !keep.contains(name.as_str()) {
                        removed.push(name.clone());
                    }
                }
                stays
            });
            for l in &new.listeners {
                if let Some(sock) = fresh.remove(&l.name) {
                    let prev = old.listeners.iter().any(|o| o.name == l.name);
                    let listener =
                        Listener::new(l.clone(), self.registry.clone(), self.drain.clone(), None);
                    map.insert(l.name.clone(), Running::start(listener, sock));
                    if prev { &mut changed } else { &mut added }.push(l.name.clone());
                } else if let Some(r) = map.get(&l.name) {
                    let cur = r.current();
                    if !same_listener(&cur.cfg, l) {
                        r.update(Listener::new(
                            l.clone(),
                            self.registry.clone(),
                            self.drain.clone(),
                            Some(&cur),
                        ));
                        changed.push(l.name.clone());
                    }
                }
            }
        }
        // Sessions of tunnels no listener uses any more serve nothing: close them, and
        // their relay-inner is refused with a reason when it reconnects.
        let tunnels = new.tunnels();
        for s in self.registry.all() {
            if !tunnels.contains(&s.tunnel) {
                warn!(tunnel = %s.tunnel, session = s.id, "closing session: its tunnel is no longer configured");
                s.handle.kill();
            } else if s.cert.as_ref().is_some_and(|c| revoked.contains(c)) {
                warn!(tunnel = %s.tunnel, session = s.id, "closing session: its certificate is revoked (tunnel.tls.crl)");
                s.handle.kill();
            }
        }
        *self.config.lock().unwrap_or_else(|p| p.into_inner()) = new;
        Ok(format!(
            "added {added:?}, changed {changed:?}, removed {removed:?}"
        ))
    }
}

fn same_listener(a: &crate::config::ListenerConfig, b: &crate::config::ListenerConfig) -> bool {
    a.bind == b.bind
        && a.tunnel == b.tunnel
        && a.service == b.service
        && a.allow == b.allow
        && a.max_connections == b.max_connections
        && a.max_bandwidth == b.max_bandwidth
        && a.open_timeout == b.open_timeout
}
