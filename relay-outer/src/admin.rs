//! The admin endpoint: the console (`/`), `/metrics`, `/healthz`, `/readyz`, `/status`,
//! `/v1/history` (the console's charts), and the actions: sinks
//! (`/v1/sinks/{name}/pause|resume|replay`), sessions (`/v1/sessions/{id}/drain`) and
//! `/v1/reload`. Who may do what is [`routy_ops::admin`]'s (tokens and roles).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use routy_ops::history::{Chart, History, Read};
use routy_ops::http::{json, text};
use serde_json::json;

use crate::cdc::manage::ManageError;
use crate::server::OuterRelay;

/// The console's charts.
const CHARTS: &[Chart] = &[
    Chart {
        id: "listener_throughput",
        title: "Throughput per listener",
        unit: "bytes/s",
        metric: routy_ops::metrics::STREAM_BYTES,
        by: "listener",
        read: Read::Rate,
    },
    Chart {
        id: "tunnel_throughput",
        title: "Throughput per tunnel",
        unit: "bytes/s",
        metric: routy_ops::metrics::STREAM_BYTES,
        by: "tunnel",
        read: Read::Rate,
    },
    Chart {
        id: "session_throughput",
        title: "Throughput per session",
        unit: "bytes/s",
        metric: "",
        by: "",
        read: Read::GivenRate,
    },
    Chart {
        id: "listener_clients",
        title: "Clients per listener",
        unit: "count",
        metric: "",
        by: "",
        read: Read::Given,
    },
    Chart {
        id: "sink_lag_seconds",
        title: "CDC lag per sink",
        unit: "seconds",
        metric: "",
        by: "",
        read: Read::Given,
    },
    Chart {
        id: "sink_lag_records",
        title: "CDC records behind per sink",
        unit: "records",
        metric: crate::cdc::sink::LAG_RECORDS,
        by: "sink",
        read: Read::Gauge,
    },
    Chart {
        id: "store_bytes",
        title: "CDC store per source",
        unit: "bytes",
        metric: crate::cdc::STORE_BYTES,
        by: "source",
        read: Read::Gauge,
    },
];

/// A session's series in the throughput chart: its tunnel and id.
fn session_series(s: &crate::tunnel::registry::SessionEntry) -> String {
    format!("{} #{}", s.tunnel, s.id)
}

/// Values of the charts the metrics do not have.
fn given(relay: &OuterRelay) -> Vec<(&'static str, String, f64)> {
    let mut out: Vec<(&'static str, String, f64)> = relay
        .listeners()
        .values()
        .map(|r| {
            let l = r.current();
            (
                "listener_clients",
                l.cfg.name.clone(),
                l.slots.in_use() as f64,
            )
        })
        .collect();
    for s in relay.registry.all().iter() {
        out.push((
            "session_throughput",
            session_series(s),
            s.bytes.load(std::sync::atomic::Ordering::Relaxed) as f64,
        ));
    }
    if let Some(cdc) = &relay.cdc {
        for s in cdc.sinks_json().as_array().into_iter().flatten() {
            if let (Some(name), Some(lag)) = (s["name"].as_str(), s["lag_seconds"].as_f64()) {
                out.push(("sink_lag_seconds", name.to_string(), lag));
            }
        }
    }
    out
}

/// The admin endpoint's routes.
pub fn router(relay: Arc<OuterRelay>, prom: PrometheusHandle) -> Router {
    let access = relay.admin_access.clone();
    let history = History::new(CHARTS.to_vec(), vec![routy_ops::metrics::LISTENER_REFUSED]);
    {
        let relay = relay.clone();
        history.spawn(prom.clone(), Box::new(move || given(&relay)));
    }
    let h = history.clone();
    let r = routy_ops::console::router()
        .route(
            "/metrics",
            get(move || async move { routy_ops::http::prometheus(prom.render()) }),
        )
        .route(
            "/v1/history",
            get(move || async move { json(StatusCode::OK, &h.to_json()) }),
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
        get(move || async move { json(StatusCode::OK, &status(&rr, &history)) }),
    );
    let rr = relay.clone();
    let r = r.route(
        "/v1/reload",
        post(move || async move {
            let relay = rr.clone();
            routy_ops::admin::reload_answer(async move { relay.reload().await }).await
        }),
    );
    let rr = relay.clone();
    let r = r.route(
        "/v1/sessions/{id}/drain",
        post(move |Path(id): Path<String>| async move { drain(&rr, &id) }),
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
            "not found: try /, /metrics, /healthz, /readyz, /status, /v1/history, /v1/sinks\n",
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

/// `POST /v1/sessions/{id}/drain`: GoAway to that session's relay-inner, which dials a
/// new one; the session closes once its client streams are done (at most
/// `shutdown_grace`).
fn drain(relay: &OuterRelay, id: &str) -> Response {
    let Ok(id) = id.parse::<u64>() else {
        return json(
            StatusCode::BAD_REQUEST,
            &json!({ "error": format!("{id:?} is not a session id (see /status sessions[].id)") }),
        );
    };
    let Some(s) = relay.registry.find(id) else {
        return json(
            StatusCode::NOT_FOUND,
            &json!({ "error": format!("no live session {id}") }),
        );
    };
    let grace = relay.config().shutdown_grace;
    if s.drain(grace) {
        json(
            StatusCode::ACCEPTED,
            &json!({ "session": id, "tunnel": s.tunnel, "node": s.node, "draining": true,
                     "open_streams": s.load.load(std::sync::atomic::Ordering::Relaxed),
                     "grace_seconds": grace.as_secs_f64() }),
        )
    } else {
        json(
            StatusCode::CONFLICT,
            &json!({ "error": format!("session {id} is draining already") }),
        )
    }
}

/// Clients `listener` refused, by reason (as of the last sample).
fn refused(history: &History, listener: &str) -> serde_json::Value {
    let mut by_reason = serde_json::Map::new();
    for (labels, n) in history.last(routy_ops::metrics::LISTENER_REFUSED) {
        let label = |k: &str| labels.iter().find(|(l, _)| l == k).map(|(_, v)| v.as_str());
        if label("listener") == Some(listener) {
            if let Some(reason) = label("reason") {
                by_reason.insert(reason.to_string(), json!(n));
            }
        }
    }
    serde_json::Value::Object(by_reason)
}

fn status(relay: &OuterRelay, history: &History) -> serde_json::Value {
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
                "bytes_per_second": history.latest("session_throughput", &session_series(s)),
                "tunnel_bytes_per_second": history.latest("tunnel_throughput", &s.tunnel),
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
                "bytes_per_second": history.latest("listener_throughput", &l.cfg.name),
                "refused": refused(history, &l.cfg.name),
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
