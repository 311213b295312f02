//! The admin endpoint's pages: `/metrics`, `/healthz`, `/readyz`, `/status`.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use routy_ops::admin::Response;
use serde_json::json;

use crate::server::OuterRelay;

/// Answers one admin request.
pub fn handle(relay: &Arc<OuterRelay>, prom: &PrometheusHandle, path: &str) -> Response {
    match path {
        "/metrics" => Response::prometheus(prom.render()),
        "/healthz" => Response::text(200, "ok\n".into()),
        "/readyz" => {
            // Ready once the tunnel port and every listener are bound, which `start`
            // guarantees before this endpoint exists; not ready while shutting down.
            if relay.drain.is_stopping() {
                Response::text(503, "shutting down\n".into())
            } else {
                Response::text(200, "ready\n".into())
            }
        }
        "/status" => Response::json(200, status(relay).to_string()),
        _ => Response::text(
            404,
            "not found: try /metrics, /healthz, /readyz, /status\n".into(),
        ),
    }
}

fn status(relay: &OuterRelay) -> serde_json::Value {
    let sessions: Vec<_> = relay
        .registry
        .all()
        .iter()
        .map(|s| {
            json!({
                "id": s.id,
                "tunnel": s.tunnel,
                "peer": s.peer.to_string(),
                "transport": s.handle.transport(),
                "thread": s.handle.lane().map(|l| l.index()),
                "node": s.node,
                "services": s.services,
                "uptime_seconds": s.since.elapsed().as_secs_f64(),
                "rtt_seconds": s.rtt().map(|r| r.as_secs_f64()),
                "open_streams": s.load.load(std::sync::atomic::Ordering::Relaxed),
                "draining": s.draining.load(std::sync::atomic::Ordering::Relaxed),
            })
        })
        .collect();
    let mut listeners: Vec<_> = relay
        .listeners()
        .values()
        .map(|r| {
            let l = r.current();
            let in_use = l.slots.in_use();
            json!({
                "name": l.cfg.name,
                "bind": r.bind.to_string(),
                "tunnel": l.cfg.tunnel,
                "service": l.cfg.service,
                "connections": in_use,
                "max_connections": l.cfg.max_connections,
                "tunnel_up": relay.registry.all().iter().any(|s| s.tunnel == l.cfg.tunnel && s.usable()),
            })
        })
        .collect();
    listeners.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    json!({
        "role": "relay-outer",
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": relay.started.elapsed().as_secs_f64(),
        "tunnel_listen": relay.tunnel_addr().to_string(),
        "threads": routy_tunnel::lanes::count(),
        "sessions": sessions,
        "listeners": listeners,
        "open_streams": relay.drain.active(),
        "cdc": relay.cdc.as_ref().map(|c| c.status()),
    })
}
