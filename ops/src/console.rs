//! The operator's console: a self-contained page served at `/` of both relays' admin
//! endpoints (assets embedded in the binary).
//!
//! One page for both relays: it reads `GET /status` every 2 s and `GET /v1/history`
//! every 5 s, and `role` in the status decides what it shows (relay-outer: tunnel
//! sessions, listeners, CDC stores and sinks; relay-inner: relay-outer endpoints,
//! services, CDC sources). Charts are inline SVG drawn from the history. Actions are
//! POSTs after a `window.confirm` naming the target (`window.prompt` asks for a replay's
//! time or a resync's table).
//!
//! **Why it is built this way.** No framework, no CDN, no inline script or style: the
//! page is three small files (`console/index.html`, `app.js`, `app.css`) under a strict
//! Content-Security-Policy (`default-src 'self'`), so an injected string can never run.
//! The page renders into detached elements and then morphs the live page into them, so
//! a refresh changes text in place and a button under the pointer survives it.
//!
//! **Authentication.** The page and its assets carry no data and need no token (see
//! [`crate::admin`]). Every request for data sends `Authorization: Bearer TOKEN` when a
//! token is stored in `sessionStorage` under `routy-admin-token` (for the tab only; never
//! a cookie, so another site cannot make the browser act). A 401 shows a sign-in form;
//! the token is stored and the request retried (an action that got the 401 is sent again
//! once signed in). A 403 on an action shows the relay's `error` in the notice.
//!
//! **Stable hooks** for browser tests (CSS selectors; text as shown):
//!
//! - `body[data-role]`: `relay-outer` or `relay-inner`, once `/status` was read.
//! - `#updated`: time of the last successful `/status` (`datetime` attribute: ISO 8601).
//! - `#error-banner`: shown while `/status` fails (relay unreachable, 5xx), hidden again
//!   once it answers.
//! - `#notice`: an action's outcome, class `ok` or `error` (`pending` while it runs), the
//!   text naming the action, the HTTP status and the JSON answer (`error` when present).
//! - Sign-in: `#token` (password input), `#sign-in` (submit button), `#sign-out` (link),
//!   `#signin-panel` (shown when a token is needed), `#who` (the token's name and role).
//!   The page first asks the open `GET /v1/whoami`, so it shows the sign-in without a
//!   refused request (a browser logs every 4xx answer as a console error).
//! - relay-outer: `tr[data-session="ID"]` (`td.rtt`, `td.streams`, `td.bps`,
//!   `td.draining`); `tr[data-listener="NAME"]` with `td.clients` (text `N / MAX`,
//!   attribute `data-value="N"`), `td.tunnel-state` (text `up` or `down`), `td.bps`,
//!   `td.refused` (`span.chip[data-reason]`); `tr[data-source="NAME"]` for a store;
//!   `tr[data-sink="NAME"]` with `td.lag-records`, `td.lag-seconds`, `td.state` (text
//!   `running`, `starting`, `retrying`, `paused`, `stopped`), `td.last-error`,
//!   `td.position`.
//! - relay-inner: `tr[data-endpoint="ADDR"]` (with `td.tunnel-state`),
//!   `tr[data-service="NAME"]`, `tr[data-source="NAME"]` (with `td.phase`,
//!   `td.last-error`), and per table `tr[data-table="schema.table"][data-table-source="NAME"]`
//!   (with `td.table-state`: `forwarded`, `initial copy`, `resync waiting|copying`).
//! - Buttons: `button[data-action="pause|resume|replay"][data-sink="NAME"]` (a sink shows
//!   `resume` when paused or stopped, `pause` otherwise),
//!   `button[data-action="drain"][data-session="ID"]`,
//!   `button[data-action="resync"][data-source="NAME"]` (with `data-table` on a table's
//!   row: the prompt is prefilled), `button[data-action="reload"]`.
//! - Charts: `figure[data-chart="ID"]`, its legend `li[data-series="NAME"]`.

use axum::http::header::{self, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// The page.
const INDEX_HTML: &str = include_str!("console/index.html");
/// Its script.
const APP_JS: &str = include_str!("console/app.js");
/// Its stylesheet.
const APP_CSS: &str = include_str!("console/app.css");

/// Same-origin only; no inline script or style (the page has none); `data:` images for
/// the empty favicon; the page may not be framed, and its form posts nowhere.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; object-src 'none'; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The console's routes: `/` and its assets. They carry no data (the page reads the
/// relay's JSON with the operator's token), so they need no token.
pub fn router() -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/console/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/console/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
}

/// An embedded asset with the console's headers.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    let headers: [(HeaderName, HeaderValue); 6] = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
    ];
    (headers, body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    async fn get(path: &str) -> (StatusCode, axum::http::HeaderMap, String) {
        let res = router()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let (parts, body) = res.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
        (
            parts.status,
            parts.headers,
            String::from_utf8(bytes.to_vec()).unwrap(),
        )
    }

    #[tokio::test]
    async fn every_asset_answers_with_its_type_and_the_security_headers() {
        for (path, ty, start) in [
            ("/", "text/html; charset=utf-8", "<!doctype html>"),
            (
                "/console/app.js",
                "text/javascript; charset=utf-8",
                "// Routy",
            ),
            ("/console/app.css", "text/css; charset=utf-8", "/* Routy"),
        ] {
            let (status, h, body) = get(path).await;
            assert_eq!(status, StatusCode::OK, "{path}");
            let hv = |name: HeaderName| h.get(name).and_then(|v| v.to_str().ok());
            assert_eq!(hv(header::CONTENT_TYPE), Some(ty), "{path}");
            assert_eq!(hv(header::CACHE_CONTROL), Some("no-cache"), "{path}");
            let csp = hv(header::CONTENT_SECURITY_POLICY).unwrap_or_default();
            assert!(csp.starts_with("default-src 'self';"), "{path}: {csp}");
            assert!(!csp.contains("unsafe-"), "{path}: {csp}");
            assert_eq!(hv(header::X_CONTENT_TYPE_OPTIONS), Some("nosniff"));
            assert_eq!(hv(header::X_FRAME_OPTIONS), Some("DENY"));
            assert_eq!(hv(header::REFERRER_POLICY), Some("no-referrer"));
            assert!(body.starts_with(start), "{path}");
        }
    }

    #[tokio::test]
    async fn an_unknown_asset_is_not_the_page() {
        let res = router()
            .oneshot(
                Request::get("/console/nope.js")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::NOT_FOUND);
    }

    /// Everything the page loads is one of its own routes, and the strict CSP holds:
    /// no absolute URL, no inline script, style or event handler.
    #[tokio::test]
    async fn the_page_loads_only_its_own_assets() {
        let (_, _, html) = get("/").await;
        for asset in ["console/app.js", "console/app.css"] {
            assert!(html.contains(&format!("\"{asset}\"")), "{asset}");
            assert_eq!(get(&format!("/{asset}")).await.0, StatusCode::OK);
        }
        assert!(html.contains("<link rel=\"icon\" href=\"data:,\">"));
        assert_eq!(html.matches("<script").count(), 1);
        assert!(html.contains("<script src=\"console/app.js\" defer></script>"));
        assert!(!html.contains("<style"));
        for (name, text) in [
            ("index.html", INDEX_HTML),
            ("app.js", APP_JS),
            ("app.css", APP_CSS),
        ] {
            // The SVG namespace is a name, not a URL anything is loaded from.
            let text = text.replace("'http://www.w3.org/2000/svg'", "");
            for bad in ["http://", "https://", "//cdn", "@import", "url("] {
                assert!(!text.contains(bad), "{name} contains {bad:?}");
            }
            for bad in [" style=", " onclick=", " onload=", "javascript:"] {
                assert!(!text.contains(bad), "{name} contains {bad:?}");
            }
        }
        let total = INDEX_HTML.len() + APP_JS.len() + APP_CSS.len();
        assert!(total < 64 * 1024, "the console grew to {total} bytes");
    }

    /// The hooks the browser tests use exist in the page or its script.
    #[test]
    fn the_documented_hooks_exist() {
        for hook in [
            "id=\"notice\"",
            "id=\"token\"",
            "id=\"sign-in\"",
            "id=\"sign-out\"",
            "id=\"updated\"",
            "id=\"error-banner\"",
            "data-action=\"reload\"",
        ] {
            assert!(INDEX_HTML.contains(hook), "{hook}");
        }
        for hook in [
            "'data-role'",
            "'data-session'",
            "'data-listener'",
            "'data-sink'",
            "'data-source'",
            "'data-table'",
            "'data-endpoint'",
            "'data-chart'",
            "'clients num'",
            "'tunnel-state'",
            "'num lag-records",
            "'num lag-seconds",
            "td('state'",
            "'last-error'",
            "'routy-admin-token'",
        ] {
            assert!(APP_JS.contains(hook), "{hook}");
        }
        for action in ["pause", "resume", "replay", "drain", "resync", "reload"] {
            assert!(APP_JS.contains(&format!("case '{action}':")), "{action}");
        }
    }
}
