//! The HTTP server of the admin endpoint and of relay-outer's consumer API: hyper 1
//! (HTTP/1.1) serving an axum [`Router`], optionally over TLS.
//!
//! Anything on the host (or, for the consumer API, the network) may connect, so the
//! server is defensive: the number of open connections is bounded (more are answered 503
//! and closed at once), a request head has a deadline and a size cap (hyper answers 431
//! to a head too large and closes a connection whose head does not arrive in time), and
//! nothing a client sends can panic the server or hold up another connection. Request
//! deadlines for ordinary pages are a tower layer ([`with_deadline`]); streaming routes
//! (Server-Sent Events) are left without one and end when the relay stops.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::drain::Drain;

/// Deadline for reading a request head, and for answering an ordinary request.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(5);

/// Largest request head (request line and headers) accepted, in bytes.
pub const MAX_HEAD_LEN: usize = 16 * 1024;

/// Most admin connections served at once; more are answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 64;

/// Pause after a failed accept (say, out of file descriptors) before accepting again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How long open connections get to finish their responses once the server stops.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Content type of the Prometheus text exposition format.
pub const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Sent without waiting to a connection over the cap before closing it.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; \
charset=utf-8\r\nContent-Length: 5\r\nConnection: close\r\n\r\nbusy\n";

/// Bounds of one server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Deadline for a request head.
    pub head_deadline: Duration,
    /// Largest request head, bytes (at least 8 KiB).
    pub max_head_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: MAX_CONNECTIONS,
            head_deadline: DEFAULT_DEADLINE,
            max_head_len: MAX_HEAD_LEN,
        }
    }
}

/// Wraps `router` so every request is answered within `deadline` (503 otherwise).
pub fn with_deadline(router: Router, deadline: Duration) -> Router {
    router.layer(tower_http::timeout::TimeoutLayer::with_status_code(
        StatusCode::SERVICE_UNAVAILABLE,
        deadline,
    ))
}

/// A plain-text answer.
pub fn text(status: StatusCode, body: impl Into<String>) -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        status,
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        body.into(),
    )
        .into_response()
}

/// A JSON answer.
pub fn json(status: StatusCode, body: &serde_json::Value) -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// A Prometheus text exposition page.
pub fn prometheus(body: String) -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        StatusCode::OK,
        [(axum::http::header::CONTENT_TYPE, PROMETHEUS)],
        body,
    )
        .into_response()
}

/// Serves `app` on `listener` over plain HTTP until `stop` says stop.
pub async fn serve(listener: TcpListener, app: Router, stop: Drain, limits: Limits) {
    serve_tls(listener, app, stop, limits, None).await;
}

/// Serves `app` on `listener` until `stop` says stop; with `tls`, every connection is
/// a TLS connection first.
pub async fn serve_tls(
    listener: TcpListener,
    app: Router,
    stop: Drain,
    limits: Limits,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let stopping = stop.stopping();
    tokio::pin!(stopping);
    loop {
        // No deadline: accepting waits for clients for as long as the relay runs.
        let accepted = tokio::select! {
            biased;
            () = &mut stopping => break,
            r = listener.accept() => r,
        };
        let (mut stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "HTTP accept failed");
                tokio::select! {
                    () = &mut stopping => break,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "too many HTTP connections, refusing one");
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(BUSY)).await;
            });
            continue;
        };
        let (app, stop, tls) = (app.clone(), stop.clone(), tls.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let _ = stream.set_nodelay(true);
            match tls {
                None => connection(stream, app, stop, limits).await,
                Some(acceptor) => {
                    match tokio::time::timeout(limits.head_deadline, acceptor.accept(stream)).await
                    {
                        Ok(Ok(s)) => connection(s, app, stop, limits).await,
                        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

/// One connection: HTTP/1.1 with keep-alive, until the client leaves or the server
/// stops (then in-flight responses get [`STOP_GRACE`]).
async fn connection<S>(stream: S, app: Router, stop: Drain, limits: Limits)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.head_deadline)
        .max_buf_size(limits.max_head_len.max(8192));
    let conn = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!("HTTP connection ended: {e}");
            }
        }
        () = stop.stopping() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(STOP_GRACE, conn).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use axum::routing::get;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpStream;
    use tokio::task::JoinHandle;

    use super::*;

    fn app() -> Router {
        let slow = get(|| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            "late"
        });
        with_deadline(
            Router::new()
                .route(
                    "/status",
                    get(|| async { json(StatusCode::OK, &serde_json::json!({"ok": true})) }),
                )
                .route("/slow", slow)
                .fallback(|| async { text(StatusCode::NOT_FOUND, "not found\n") }),
            Duration::from_millis(300),
        )
    }

    async fn start(limits: Limits) -> (SocketAddr, Drain, JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let stop = Drain::new();
        let h = tokio::spawn(serve(l, app(), stop.clone(), limits));
        (addr, stop, h)
    }

    /// Sends `request` and reads until the server closes (or 5 s pass).
    async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn pages_methods_and_garbage() {
        let (addr, _stop, _h) = start(Limits::default()).await;
        let ok = exchange(
            addr,
            b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(
            ok.contains("application/json") && ok.ends_with("{\"ok\":true}"),
            "{ok}"
        );
        let head = exchange(
            addr,
            b"HEAD /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(
            head.starts_with("HTTP/1.1 200") && !head.contains("{\"ok\""),
            "{head}"
        );
        let nf = exchange(
            addr,
            b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(nf.starts_with("HTTP/1.1 404"), "{nf}");
        let post = exchange(
            addr,
            b"POST /status HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        assert!(
            post.to_ascii_lowercase().contains("allow: get,head"),
            "{post}"
        );
        let garbage = exchange(
            addr,
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
        )
        .await;
        assert!(
            garbage.is_empty() || garbage.starts_with("HTTP/1.1 400"),
            "{garbage}"
        );
        let big = format!(
            "GET /status HTTP/1.1\r\nX-Big: {}\r\n\r\n",
            "a".repeat(MAX_HEAD_LEN + 10)
        );
        let r = exchange(addr, big.as_bytes()).await;
        assert!(r.is_empty() || r.starts_with("HTTP/1.1 431"), "{r}");
        let slow = exchange(
            addr,
            b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(slow.starts_with("HTTP/1.1 503"), "{slow}");
    }

    #[tokio::test]
    async fn silent_and_trickling_clients_are_closed_and_block_no_one() {
        let limits = Limits {
            head_deadline: Duration::from_millis(300),
            ..Limits::default()
        };
        let (addr, _stop, _h) = start(limits).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut trickle = TcpStream::connect(addr).await.unwrap();
        trickle.write_all(b"GET /sta").await.unwrap();
        let ok = exchange(
            addr,
            b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        for s in [&mut silent, &mut trickle] {
            let mut buf = Vec::new();
            let r = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut buf)).await;
            assert!(
                r.is_ok(),
                "a client without a whole head is closed after the deadline"
            );
        }
    }

    #[tokio::test]
    async fn connections_over_the_cap_get_503_and_stop_ends_the_server() {
        let limits = Limits {
            max_connections: 2,
            ..Limits::default()
        };
        let (addr, stop, h) = start(limits).await;
        let _a = TcpStream::connect(addr).await.unwrap();
        let _b = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let busy = exchange(addr, b"GET /status HTTP/1.1\r\n\r\n").await;
        assert!(busy.starts_with("HTTP/1.1 503"), "{busy}");
        stop.stop();
        tokio::time::timeout(Duration::from_secs(10), h)
            .await
            .expect("the accept loop ends")
            .unwrap();
    }
}

/// The value of an `Authorization: Basic` (or `Proxy-Authorization`) header for `user` and
/// `password`.
pub fn basic_auth(user: &str, password: &str) -> String {
    format!("Basic {}", base64(format!("{user}:{password}").as_bytes()))
}

/// Standard base64 with padding (RFC 4648).
fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

#[cfg(test)]
mod basic_auth_tests {
    #[test]
    fn base64_matches_rfc4648() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(super::base64(i.as_bytes()), o);
        }
        assert_eq!(super::basic_auth("user", "pass"), "Basic dXNlcjpwYXNz");
    }
}
