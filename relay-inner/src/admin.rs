//! relay-inner's admin endpoint: `/metrics`, `/healthz`, `/readyz` and `/status`, read
//! from the running relay (tunnel endpoints, services, CDC). It sits above the tunnel and
//! CDC modules and is the only place that joins their views.

/// Answers one admin request: `/metrics`, `/healthz`, `/readyz`, `/status`.
pub fn handle(
    relay: &std::sync::Arc<crate::relay::InnerRelay>,
    prom: &metrics_exporter_prometheus::PrometheusHandle,
    path: &str,
) -> routy_ops::admin::Response {
    use routy_ops::admin::Response;
    match path {
        "/metrics" => Response::prometheus(prom.render()),
        "/healthz" => Response::text(200, "ok\n".into()),
        "/readyz" => {
            // Ready when every configured relay-outer has a live session (with
            // `connections` above 1: at least one of them).
            let down: Vec<String> = relay
                .endpoints()
                .iter()
                .filter(|conns| !conns.iter().any(|e| e.is_up()))
                .filter_map(|conns| conns.first().map(|e| e.addr.clone()))
                .collect();
            if relay.drain.is_stopping() {
                Response::text(503, "shutting down\n".into())
            } else if down.is_empty() {
                Response::text(200, "ready\n".into())
            } else {
                Response::text(503, format!("no session to: {}\n", down.join(", ")))
            }
        }
        "/status" => {
            let cfg = relay.config();
            let endpoints: Vec<_> = relay
                .endpoints()
                .iter()
                .flatten()
                .map(|e| e.to_json())
                .collect();
            let body = serde_json::json!({
                "role": "relay-inner",
                "version": env!("CARGO_PKG_VERSION"),
                "node": cfg.node,
                "threads": routy_tunnel::lanes::count(),
                "uptime_seconds": relay.started.elapsed().as_secs_f64(),
                "outer": endpoints,
                "services": cfg.services.keys().collect::<Vec<_>>(),
                "open_streams": relay.drain.active(),
                "cdc": relay.cdc.as_ref().map(|c| c.to_json()),
            });
            Response::json(200, body.to_string())
        }
        _ => Response::text(
            404,
            "not found: try /metrics, /healthz, /readyz, /status\n".into(),
        ),
    }
}
