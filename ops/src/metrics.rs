//! Every metric both relays export, named in one place, and the Prometheus recorder.
//!
//! Labels: `tunnel` (client certificate name), `listener` (relay-outer listener name),
//! `service` (service name), `outer` (relay-outer endpoint, on relay-inner), `reason`,
//! `direction` (`to_service` or `to_client`), `result` (`ok` or `error`), `transport`
//! (`tls` or `quic`).

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Gauge: live tunnel sessions (`tunnel` on relay-outer, `outer` on relay-inner).
pub const SESSIONS_UP: &str = "routy_sessions_up";
/// Gauge: live tunnel sessions by `transport` (`tls`, `quic` or `websocket`).
pub const SESSION_TRANSPORT: &str = "routy_session_transport";
/// Counter: sessions established.
pub const SESSION_CONNECTS: &str = "routy_session_connects_total";
/// Counter: sessions ended, by `reason`.
pub const SESSION_DISCONNECTS: &str = "routy_session_disconnects_total";
/// Counter: tunnel connections that failed before becoming a session, by `reason`.
pub const HANDSHAKE_FAILURES: &str = "routy_handshake_failures_total";
/// Counter: streams spliced (an `OpenOk` was received or sent).
pub const STREAMS_OPENED: &str = "routy_streams_opened_total";
/// Gauge: streams being spliced now.
pub const STREAMS_ACTIVE: &str = "routy_streams_active";
/// Counter: streams that failed to open, by `reason`.
pub const STREAMS_FAILED: &str = "routy_streams_failed_total";
/// Counter: bytes spliced, by `direction`; moves while a stream runs.
pub const STREAM_BYTES: &str = "routy_stream_bytes_total";
/// Histogram: keepalive round-trip time, seconds.
pub const KEEPALIVE_RTT: &str = "routy_keepalive_rtt_seconds";
/// Histogram: time from a client's arrival (relay-outer) or an Open (relay-inner) until
/// the stream is spliced, seconds.
pub const STREAM_OPEN_LATENCY: &str = "routy_stream_open_seconds";
/// Counter: clients refused by a listener, by `reason` (`no_session`, `not_allowed`,
/// `over_limit`).
pub const LISTENER_REFUSED: &str = "routy_listener_refused_total";
/// Gauge: 1 while a session of a relay-outer listener's tunnel can take streams, 0 while
/// none can (clients are refused `no_session`), by `listener` and `tunnel`; NaN once the
/// listener is removed or moved to another tunnel (a series that matches no alert).
pub const LISTENER_TUNNEL_UP: &str = "routy_listener_tunnel_up";
/// Counter: relay-inner's tunnel connections that failed at its proxy, by `outer`, `proxy`
/// and `reason` (`connect`, `auth`, `forbidden`, `refused`, `protocol`).
pub const PROXY_FAILURES: &str = "routy_proxy_failures_total";
/// Gauge: a bandwidth limit in bytes per second (0: none), by `listener`, `service` or
/// `outer`, and `direction`.
pub const BANDWIDTH_LIMIT: &str = "routy_bandwidth_limit_bytes_per_second";
/// Counter: microseconds streams waited under a bandwidth limit, same labels.
pub const BANDWIDTH_THROTTLED: &str = "routy_bandwidth_throttled_microseconds_total";
/// Gauge: HTTP connections held, by `endpoint` (`admin`, `consumers`).
pub const HTTP_CONNECTIONS: &str = "routy_http_connections";
/// Counter: HTTP connections shed, by `endpoint` and `reason`: `made_room` (a connection
/// waiting for a request head was closed so a new one could be served) or `busy` (a new
/// connection was answered 503: every connection was mid-request).
pub const HTTP_SHED: &str = "routy_http_connections_shed_total";
/// Gauge: a certificate's `notAfter` in seconds since the epoch, by `key` (the
/// configuration key naming its file) and `subject`.
pub const CERT_EXPIRY: &str = "routy_certificate_expiry_timestamp_seconds";
/// Counter: configuration reloads, by `result`.
pub const CONFIG_RELOADS: &str = "routy_config_reloads_total";

/// Every metric with its help text, for `# HELP` lines and the README.
pub const ALL: &[(&str, &str)] = &[
    (SESSIONS_UP, "Live tunnel sessions."),
    (
        SESSION_TRANSPORT,
        "Live tunnel sessions by transport (tls, quic or websocket).",
    ),
    (SESSION_CONNECTS, "Tunnel sessions established."),
    (SESSION_DISCONNECTS, "Tunnel sessions ended, by reason."),
    (
        HANDSHAKE_FAILURES,
        "Tunnel connections that failed before becoming a session, by reason.",
    ),
    (STREAMS_OPENED, "Streams spliced."),
    (STREAMS_ACTIVE, "Streams being spliced now."),
    (STREAMS_FAILED, "Streams that failed to open, by reason."),
    (
        STREAM_BYTES,
        "Bytes spliced, by direction; counted while streams run.",
    ),
    (KEEPALIVE_RTT, "Keepalive round-trip time in seconds."),
    (STREAM_OPEN_LATENCY, "Time to open a stream in seconds."),
    (
        LISTENER_REFUSED,
        "Clients refused by a listener, by reason.",
    ),
    (
        LISTENER_TUNNEL_UP,
        "1 while a session of the listener's tunnel can take streams, 0 while none can (NaN: listener removed or moved to another tunnel).",
    ),
    (
        PROXY_FAILURES,
        "Tunnel connections that failed at the proxy on the way out, by reason.",
    ),
    (
        BANDWIDTH_LIMIT,
        "Bandwidth limit in bytes per second (0: none), by direction.",
    ),
    (
        BANDWIDTH_THROTTLED,
        "Microseconds streams waited under a bandwidth limit, by direction.",
    ),
    (
        HTTP_CONNECTIONS,
        "HTTP connections held by the admin or consumer endpoint.",
    ),
    (
        HTTP_SHED,
        "HTTP connections shed: made_room (a waiting one closed for a new one) or busy (503).",
    ),
    (
        CERT_EXPIRY,
        "A certificate's notAfter as a Unix time, by configuration key and subject.",
    ),
    (CONFIG_RELOADS, "Configuration reloads, by result."),
];

const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Installs the global Prometheus recorder and returns the handle that renders it.
/// Fails only if a recorder is already installed.
pub fn install() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
    describe(ALL);
    // Exported from the start at 0: an alert on a failed reload needs no first failure.
    for result in ["ok", "error"] {
        metrics::counter!(CONFIG_RELOADS, "result" => result).increment(0);
    }
    Ok(handle)
}

/// What a metric is. Every Routy metric name says its kind by the Prometheus naming
/// convention: counters end in `_total`, histograms in `_seconds` (except the
/// `_timestamp_seconds` gauges), everything else is a gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Observations in buckets (seconds).
    Histogram,
}

impl Kind {
    /// The kind of the metric `name`.
    pub fn of(name: &str) -> Kind {
        if name.ends_with("_total") {
            Kind::Counter
        } else if name.ends_with("_seconds") && !name.ends_with("_timestamp_seconds") {
            Kind::Histogram
        } else {
            Kind::Gauge
        }
    }

    /// The word the README's metric tables use.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Describes each `(name, help)` to the installed recorder, with its [`Kind`]. Every
/// crate that exports metrics keeps one such list and passes it here.
pub fn describe(list: &[(&'static str, &'static str)]) {
    for (name, help) in list {
        match Kind::of(name) {
            Kind::Counter => metrics::describe_counter!(*name, *help),
            Kind::Histogram => metrics::describe_histogram!(*name, metrics::Unit::Seconds, *help),
            Kind::Gauge => metrics::describe_gauge!(*name, *help),
        }
    }
}

/// Short reason label for an io error kind, for `reason` labels.
pub fn io_reason(e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => "connection_refused",
        ConnectionReset => "connection_reset",
        TimedOut => "timeout",
        NotFound => "not_found",
        _ => "io_error",
    }
}
