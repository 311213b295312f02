//! The admin endpoint: `/metrics`, `/healthz`, `/readyz`, `/status`, and the sink
//! management API (`/v1/sinks`, `/v1/sinks/{name}/pause|resume|replay`).
//!
//! The endpoint listens on loopback by default: anyone who can reach it can pause or
//! replay a sink (authentication comes with the console).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use routy_ops::http::{json, text};
use serde_json::json;

use crate::cdc::manage::ManageError;
use crate::server::OuterRelay;

/// The admin endpoint's routes.
pub fn router(relay: Arc<OuterRelay>, prom: PrometheusHandle) -> Router {
    let access = relay.admin_access.clone();
    let r = routy_ops::console::router()
        .route(
            "/metrics",
            get(move || async move { routy_ops::http::prometheus(prom.render()) }),
        )
        .route("/healthz", get(|| async { text(StatusCode::OK, "ok\n") }));
    let rr = relay.clone();
    let r = r.route(
        "/readyz",
        get(move || async move {
            // Ready once the tunnel port and every listener are bound, which `start`
            // guarantees before this endpoint exists; not ready while shutting down.
            if rr.drain.is_stopping() {
                text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }),
    );
    let rr = relay.clone();
    let r = r.route(
        "/status",
        get(move || async move { json(StatusCode::OK, &status(&rr)) }),
    );
    let rr = relay.clone();
    let r = r.route(
        "/v1/sinks",
        get(move || async move {
            match &rr.cdc {
                Some(c) => json(StatusCode::OK, &c.sinks_json()),
                None => json(StatusCode::OK, &json!([])),
            }
        }),
    );
    let rr = relay.clone();
    let r = r.route(
        "/v1/sinks/{name}/pause",
        post(move |Path(name): Path<String>| async move { pause(&rr, &name, true) }),
    );
    let rr = relay.clone();
    let r = r.route(
        "/v1/sinks/{name}/resume",
        post(move |Path(name): Path<String>| async move { pause(&rr, &name, false) }),
    );
    let r = r.route(
        "/v1/sinks/{name}/replay",
        post(
            move |Path(name): Path<String>, Query(q): Query<HashMap<String, String>>| async move {
                replay(&relay, &name, &q).await
            },
        ),
    );
    let r = r.fallback(|| async {
        text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz, /readyz, /status, /v1/sinks\n",
        )
    });
    access.guard(routy_ops::http::with_deadline(
        r,
        routy_ops::http::DEFAULT_DEADLINE,
    ))
}

fn manage_error(e: ManageError) -> Response {
    let status = match e {
        ManageError::UnknownSink(_) => StatusCode::NOT_FOUND,
        ManageError::Gone { .. } => StatusCode::GONE,
        ManageError::Bad(_) => StatusCode::BAD_REQUEST,
        ManageError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    json(status, &json!({ "error": e.to_string() }))
}

fn pause(relay: &OuterRelay, name: &str, paused: bool) -> Response {
    let Some(cdc) = &relay.cdc else {
        return manage_error(ManageError::UnknownSink(name.to_string()));
    };
    match cdc.set_paused(name, paused) {
        Ok(()) => json(StatusCode::OK, &json!({ "sink": name, "paused": paused })),
        Err(e) => manage_error(e),
    }
}

async fn replay(relay: &OuterRelay, name: &str, q: &HashMap<String, String>) -> Response {
    let Some(cdc) = &relay.cdc else {
        return manage_error(ManageError::UnknownSink(name.to_string()));
    };
    let from = match q.get("from").map(|s| s.parse()) {
        None => None,
        Some(Ok(p)) => Some(p),
        Some(Err(e)) => return manage_error(ManageError::Bad(format!("from: {e}"))),
    };
    let since = match q.get("since") {
        None => None,
        Some(s) => match relay_proto::cdc::parse_time(s) {
            Some(t) => Some(t),
            None => {
                return manage_error(ManageError::Bad(format!(
                    "since: {s:?} is not a time like 2026-11-22T07:00:00Z"
                )))
            }
        },
    };
    match cdc.replay(name, from, since).await {
        Ok(to) => json(
            StatusCode::ACCEPTED,
            &crate::cdc::manage::replay_json(name, to),
        ),
        Err(e) => manage_error(e),
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
