//! relay-inner's admin endpoint: `/metrics`, `/healthz`, `/readyz` and `/status`, read
//! from the running relay (tunnel endpoints, services, CDC). It sits above the tunnel and
//! CDC modules and is the only place that joins their views.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use routy_ops::http::{json, text};

use crate::relay::InnerRelay;

/// The admin endpoint's routes: `/metrics`, `/healthz`, `/readyz`, `/status`.
pub fn router(relay: Arc<InnerRelay>, prom: PrometheusHandle) -> Router {
    let r = Router::new()
        .route(
            "/metrics",
            get(move || async move { routy_ops::http::prometheus(prom.render()) }),
        )
        .route("/healthz", get(|| async { text(StatusCode::OK, "ok\n") }));
    let ready = relay.clone();
    let r = r
        .route(
            "/readyz",
            get(move || async move { page(&ready, "/readyz") }),
        )
        .route(
            "/status",
            get(move || async move { page(&relay, "/status") }),
        )
        .fallback(|| async {
            text(
                StatusCode::NOT_FOUND,
                "not found: try /metrics, /healthz, /readyz, /status\n",
            )
        });
    routy_ops::http::with_deadline(r, routy_ops::http::DEFAULT_DEADLINE)
}

fn page(relay: &Arc<InnerRelay>, path: &str) -> Response {
    match path {
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
                text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
            } else if down.is_empty() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("no session to: {}\n", down.join(", ")),
                )
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
            json(StatusCode::OK, &body)
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}
