//! relay-inner at run time: one dialer per relay-outer endpoint, the service table, and
//! the reload that changes them without dropping what the change does not touch.
//!
//! A reload reads and validates the whole file (TLS material included); if that fails
//! the old configuration stays in force. Then: the service table is replaced (streams
//! already spliced go on; new Opens see the new table), new connections use the new
//! certificates, keepalive and backoff, dialers of removed endpoints stop and close their
//! session, and added endpoints get a dialer.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use routy_ops::config_file::restart_needed;
use routy_ops::drain::Drain;
use routy_ops::metrics as m;
use tracing::info;

use crate::tunnel::dialer::{Current, Dialer};
use crate::tunnel::endpoint::EndpointStatus;
use crate::tunnel::services::{ServiceTable, Services};
use relay_inner::cdc::Cdc;
use relay_inner::config::{Config, OuterEndpoint};

/// The running dialers of one endpoint: `connections` sessions, one dialer each.
struct Running {
    stop: Drain,
    statuses: Vec<Arc<EndpointStatus>>,
}

/// The running relay.
pub struct InnerRelay {
    path: PathBuf,
    current: Arc<RwLock<Arc<Current>>>,
    services: Arc<Services>,
    dialers: Mutex<Vec<(String, Running)>>,
    reload_lock: tokio::sync::Mutex<()>,
    /// The CDC forwarder, when configured.
    pub cdc: Option<Arc<Cdc>>,
    /// Shutdown signal and in-flight streams.
    pub drain: Drain,
    /// When the relay started.
    pub started: Instant,
    /// Who may use the admin endpoint (tokens follow reloads).
    pub admin_access: Arc<routy_ops::admin::Access>,
}

fn key(e: &OuterEndpoint) -> String {
    format!("{} ({})", e.addr, e.server_name.to_str())
}

fn current(cfg: Config, tls: rustls::ClientConfig) -> Result<Arc<Current>, String> {
    let quic = routy_tunnel::quic::client_config(tls.clone(), cfg.keepalive)
        .map_err(|e| format!("tls: {e}"))?;
    Ok(Arc::new(Current {
        cfg: Arc::new(cfg),
        connector: tokio_rustls::TlsConnector::from(Arc::new(tls)),
        quic,
    }))
}

impl InnerRelay {
    /// Starts a dialer for every endpoint, and the CDC forwarder.
    pub fn start(
        path: PathBuf,
        cfg: Config,
        tls: rustls::ClientConfig,
    ) -> anyhow::Result<Arc<Self>> {
        routy_tunnel::expiry::watch(cfg.cert_files());
        routy_ops::give_back::spawn();
        let drain = Drain::new();
        let cdc = match &cfg.cdc {
            Some(c) => {
                let cdc = Cdc::start(c, &drain)?;
                let keys: Vec<String> = cfg.outer.iter().map(key).collect();
                cdc.set_endpoints(&keys);
                Some(cdc)
            }
            None => None,
        };
        let services = Arc::new(Services::new(
            ServiceTable::new(&cfg.node, &cfg.services),
            drain.clone(),
        ));
        let endpoints = cfg.outer.clone();
        let admin_access = routy_ops::admin::Access::new(&cfg.admin);
        let relay = Arc::new(InnerRelay {
            admin_access,
            path,
            current: Arc::new(RwLock::new(
                current(cfg, tls).map_err(|e| anyhow::anyhow!(e))?,
            )),
            services,
            dialers: Mutex::new(Vec::new()),
            reload_lock: tokio::sync::Mutex::new(()),
            cdc,
            drain,
            started: Instant::now(),
        });
        for e in endpoints {
            relay.spawn_dialer(e);
        }
        Ok(relay)
    }

    /// Starts `connections` dialers for an endpoint (each keeps its own session; new
    /// streams from relay-outer spread over them). The CDC shippers use any live one.
    fn spawn_dialer(&self, endpoint: OuterEndpoint) {
        let n = self.config().connections;
        let stop = Drain::new();
        let k = key(&endpoint);
        let mut statuses = Vec::with_capacity(n);
        let bandwidth = EndpointStatus::bandwidth_limits(&endpoint.addr, endpoint.max_bandwidth);
        // Exported from the start at 0, so an endpoint never reached shows as down.
        metrics::gauge!(m::SESSIONS_UP, "outer" => endpoint.addr.clone()).increment(0.0);
        for i in 0..n {
            let status = Arc::new(EndpointStatus::new(&endpoint.addr, bandwidth.clone()));
            status.set_connection(i, n);
            let d = Dialer {
                current: self.current.clone(),
                endpoint: endpoint.clone(),
                services: self.services.clone(),
                drain: self.drain.clone(),
                stop: stop.clone(),
                status: status.clone(),
            };
            routy_tunnel::lanes::spawn_connection(d.run());
            statuses.push(status);
        }
        if let Some(cdc) = &self.cdc {
            let sessions = statuses.iter().map(|s| s.session()).collect();
            // Shipping goes toward relay-outer: the endpoint's to_client limit.
            cdc.attach(&k, sessions, &self.drain, &stop, Some(bandwidth[1].clone()));
        }
        self.lock_dialers().push((k, Running { stop, statuses }));
    }

    fn lock_dialers(&self) -> std::sync::MutexGuard<'_, Vec<(String, Running)>> {
        self.dialers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .cfg
            .clone()
    }

    /// Every connection's status, grouped by endpoint.
    pub fn endpoints(&self) -> Vec<Vec<Arc<EndpointStatus>>> {
        self.lock_dialers()
            .iter()
            .map(|(_, r)| r.statuses.clone())
            .collect()
    }

    /// Re-reads the config file and applies it; on any error the old one stays.
    pub async fn reload(&self) -> Result<String, String> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let res = self.try_reload();
        if res.is_ok() {
            let cfg = self.config();
            routy_tunnel::expiry::watch(cfg.cert_files());
            self.admin_access.update(&cfg.admin);
        }
        let result = if res.is_ok() { "ok" } else { "error" };
        metrics::counter!(m::CONFIG_RELOADS, "result" => result).increment(1);
        res
    }

    fn try_reload(&self) -> Result<String, String> {
        let new = Config::load(&self.path).map_err(|e| e.to_string())?;
        let tls = new.check_tls()?;
        let new_connections = new.connections;
        let old = self.config();
        old.admin.reloadable(&new.admin)?;
        restart_needed("threads", &old.threads, &new.threads)?;
        let cdc_reload = match (&old.cdc, &new.cdc, &self.cdc) {
            (a, b, _) if a == b => None,
            (Some(_), Some(b), Some(cdc)) => {
                cdc.reloadable(b)?;
                Some(b.clone())
            }
            _ => {
                return Err(
                    "the cdc section changed: that needs a restart (sources, spool and shipping are set up at start)"
                        .into(),
                )
            }
        };
        self.services
            .replace(ServiceTable::new(&new.node, &new.services));
        let wanted: HashMap<String, OuterEndpoint> =
            new.outer.iter().map(|e| (key(e), e.clone())).collect();
        let services: Vec<String> = new.services.keys().cloned().collect();
        let fresh = current(new, tls)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        let mut removed = Vec::new();
        let resize = new_connections != old.connections;
        self.lock_dialers().retain(|(k, r)| {
            // A changed `connections` replaces every endpoint's sessions.
            let keep = wanted.contains_key(k) && !resize;
            if !keep {
                r.stop.stop();
                removed.push(k.clone());
            } else if let (Some(e), Some(s)) = (wanted.get(k), r.statuses.first()) {
                // Streams already running follow a changed max_bandwidth.
                s.set_bandwidth(e.max_bandwidth);
            }
            keep
        });
        if let Some(cdc) = &self.cdc {
            for k in &removed {
                cdc.detach(k);
            }
            let keys: Vec<String> = wanted.keys().cloned().collect();
            cdc.set_endpoints(&keys);
        }
        let have: Vec<String> = self.lock_dialers().iter().map(|(k, _)| k.clone()).collect();
        let mut added = Vec::new();
        for (k, e) in wanted {
            if !have.contains(&k) {
                added.push(k);
                self.spawn_dialer(e);
            }
        }
        let old_services: Vec<&String> = old.services.keys().collect();
        info!(?old_services, new_services = ?services, "service table replaced");
        let mut restarted = Vec::new();
        if let (Some(c), Some(cdc)) = (cdc_reload, &self.cdc) {
            restarted = cdc.reload(&c, &self.drain);
            info!(sources = ?restarted, "CDC sources restarted with their new tables and filters");
        }
        Ok(format!(
            "services {services:?}; endpoints added {added:?}, removed {removed:?}; cdc sources restarted {restarted:?}"
        ))
    }
}
