//! relay-inner's admin endpoint: the console, `/metrics`, `/healthz`, `/readyz`,
//! `/status` and `/v1/history`, read from the running relay (tunnel endpoints, services, CDC). It sits above the tunnel and
//! CDC modules and is the only place that joins their views.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::Response;
use std::collections::HashMap;

use axum::extract::{Path, Query};
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use routy_ops::history::{Chart, History, Read};
use routy_ops::http::{json, text};

use crate::relay::InnerRelay;

/// The console's charts.
const CHARTS: &[Chart] = &[
    Chart {
        id: "service_throughput",
        title: "Throughput per service",
        unit: "bytes/s",
        metric: routy_ops::metrics::STREAM_BYTES,
        by: "service",
        read: Read::Rate,
    },
    Chart {
        id: "retained_wal",
        title: "Retained WAL per source",
        unit: "bytes",
        metric: relay_inner::cdc::source::RETAINED_WAL_BYTES,
        by: "source",
        read: Read::Gauge,
    },
    Chart {
        id: "spool_bytes",
        title: "Spool per source",
        unit: "bytes",
        metric: relay_inner::cdc::SPOOL_BYTES,
        by: "source",
        read: Read::Gauge,
    },
    Chart {
        id: "unacked_records",
        title: "Records not yet stored by relay-outer",
        unit: "records",
        metric: relay_inner::cdc::shipper::UNACKED_RECORDS,
        by: "source",
        read: Read::Gauge,
    },
];

/// The admin endpoint's routes: the console (`/`), `/metrics`, `/healthz`, `/readyz`,
/// `/status`, `/v1/history`, and the actions `/v1/cdc/sources/{name}/resync` and
/// `/v1/reload`.
pub fn router(relay: Arc<InnerRelay>, prom: PrometheusHandle) -> Router {
    let access = relay.admin_access.clone();
    let history = History::new(CHARTS.to_vec(), Vec::new());
    history.spawn(prom.clone(), Box::new(Vec::new));
    let reload_relay = relay.clone();
    let r = routy_ops::console::router()
        .route(
            "/metrics",
            get(move || async move { routy_ops::http::prometheus(prom.render()) }),
        )
        .route(
            "/v1/history",
            get(move || async move { json(StatusCode::OK, &history.to_json()) }),
        )
        .route(
            "/v1/reload",
            post(move || async move {
                let relay = reload_relay.clone();
                routy_ops::admin::reload_answer(async move { relay.reload().await }).await
            }),
        )
        .route("/healthz", get(|| async { text(StatusCode::OK, "ok\n") }));
    let ready = relay.clone();
    let resync_relay = relay.clone();
    let r = r
        .route(
            "/readyz",
            get(move || async move { page(&ready, "/readyz") }),
        )
        .route(
            "/status",
            get(move || {
                let relay = relay.clone();
                async move { page(&relay, "/status") }
            }),
        )
        .route(
            "/v1/cdc/sources/{name}/resync",
            post(
                move |Path(name): Path<String>, Query(q): Query<HashMap<String, String>>| async move {
                    resync(&resync_relay, &name, q.get("table").map(String::as_str))
                },
            ),
        )
        .fallback(|| async {
            text(
                StatusCode::NOT_FOUND,
                "not found: try /, /metrics, /healthz, /readyz, /status, /v1/history, POST /v1/reload, POST /v1/cdc/sources/NAME/resync?table=T\n",
            )
        });
    access.guard(routy_ops::http::with_deadline(
        r,
        routy_ops::http::DEFAULT_DEADLINE,
    ))
}

/// `POST /v1/cdc/sources/{name}/resync?table=schema.table`.
fn resync(relay: &InnerRelay, source: &str, table: Option<&str>) -> Response {
    let Some(table) = table.filter(|t| !t.is_empty()) else {
        return json(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({"error": "give the table: ?table=schema.table"}),
        );
    };
    let Some(cdc) = &relay.cdc else {
        return json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "this relay-inner has no cdc section"}),
        );
    };
    match cdc.request_resync(source, table) {
        Ok(()) => json(
            StatusCode::ACCEPTED,
            &serde_json::json!({"source": source, "table": table, "resync": "requested"}),
        ),
        Err(e) => {
            let status = match e {
                relay_inner::cdc::ResyncRefused::Unknown(_) => StatusCode::NOT_FOUND,
                relay_inner::cdc::ResyncRefused::NotRunning(_) => StatusCode::CONFLICT,
            };
            json(status, &serde_json::json!({"error": e.to_string()}))
        }
    }
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
