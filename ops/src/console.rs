//! The operator's console: a self-contained page served at `/` of both relays' admin
//! endpoints (assets embedded in the binary).

use axum::routing::get;
use axum::Router;

/// The console's routes: `/` and its assets. They carry no data (the page reads the
/// relay's JSON with the operator's token), so they need no token.
pub fn router() -> Router {
    Router::new().route(
        "/",
        get(|| async { axum::response::Html("<!doctype html><title>Routy</title>console") }),
    )
}
