//! The HTTP server of the admin endpoint and of relay-outer's consumer API: hyper 1
//! (HTTP/1.1) serving an axum [`Router`], optionally over TLS.
//!
//! Anything on the host (or, for the consumer API, the network) may connect, so the
//! server is defensive: the number of open connections is bounded in all and per client
//! address, and a new connection over a bound takes the place of the one that has waited
//! longest for a request head ([`gate`]: slow clients cannot lock fresh ones out; only
//! when every connection is mid-request is the new one answered 503 and closed); a
//! request head has a deadline and a size cap (hyper answers 431 to a head too large and
//! closes a connection whose head does not arrive in time); and nothing a client sends
//! can panic the server or hold up another connection. Request deadlines for ordinary
//! pages, body included, are a tower layer ([`with_deadline`]); streaming routes
//! (Server-Sent Events) are left without one and end when the relay stops.

pub mod gate;

use std::time::Duration;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

use crate::drain::Drain;
use gate::{Admission, Busy, Gate, Slot};

/// Deadline for reading a request head, and for answering an ordinary request.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(5);

/// Largest request head (request line and headers) accepted, in bytes.
pub const MAX_HEAD_LEN: usize = 16 * 1024;

/// Most admin connections held at once (see [`gate`] for who keeps one when full).
pub const MAX_CONNECTIONS: usize = 64;

/// Most admin connections from one client address.
pub const MAX_PER_CLIENT: usize = 32;

/// Pause after a failed accept (say, out of file descriptors) before accepting again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How long a new connection may wait for its request head before it takes a place, when
/// every place is taken (see [`wait_for_head`]).
const LOBBY_WAIT: Duration = Duration::from_millis(100);

/// How often the lobby looks again at a connection that sent part of a head.
const LOBBY_STEP: Duration = Duration::from_millis(10);

/// Connections waiting in the lobby at once; more take a place without waiting.
const LOBBY_SEATS: usize = 1024;

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
    /// The server's name in metrics' `endpoint` label (`admin`, `consumers`).
    pub endpoint: &'static str,
    /// Connections held at once.
    pub max_connections: usize,
    /// Connections held at once from one client address.
    pub max_per_client: usize,
    /// Deadline for a request head.
    pub head_deadline: Duration,
    /// Largest request head, bytes (at least 8 KiB).
    pub max_head_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            endpoint: "admin",
            max_connections: MAX_CONNECTIONS,
            max_per_client: MAX_PER_CLIENT,
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
    let gate = Gate::new(
        limits.endpoint,
        limits.max_connections,
        limits.max_per_client,
    );
    let lobby = Arc::new(Semaphore::new(LOBBY_SEATS));
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
        let (app, stop, tls, gate, lobby) = (
            app.clone(),
            stop.clone(),
            tls.clone(),
            gate.clone(),
            lobby.clone(),
        );
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            // When every place is taken, a plain-HTTP client first waits briefly in the
            // lobby, holding no place: one whose whole request head arrives there is
            // admitted as mid-request, so a storm of slow clients cannot displace it
            // before it is answered (see the gate). Through TLS nothing can be seen yet.
            let head_arrived = tls.is_none()
                && gate.is_full_for(peer.ip())
                && match lobby.try_acquire() {
                    Ok(_seat) => wait_for_head(&stream).await,
                    Err(_) => false,
                };
            let mut ticket = match gate.admit(peer.ip(), head_arrived) {
                Admission::In { ticket, made_room } => {
                    if made_room {
                        shed(limits.endpoint, "made_room");
                    }
                    ticket
                }
                Admission::Full => {
                    tracing::debug!(%peer, "every HTTP connection is mid-request, refusing one");
                    shed(limits.endpoint, "busy");
                    let _ =
                        tokio::time::timeout(Duration::from_secs(1), stream.write_all(BUSY)).await;
                    return;
                }
            };
            let slot = ticket.slot();
            let serve = async move {
                match tls {
                    None => connection(stream, app, stop, limits, slot, peer).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(limits.head_deadline, acceptor.accept(stream))
                            .await
                        {
                            Ok(Ok(s)) => connection(s, app, stop, limits, slot, peer).await,
                            Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                        }
                    }
                }
            };
            tokio::select! {
                () = serve => {}
                () = ticket.closed() => {
                    tracing::debug!(%peer, "closed a waiting HTTP connection to make room");
                }
            }
        });
    }
}

/// Whether a whole request head (up to its blank line) arrives in `stream` within
/// [`LOBBY_WAIT`], looked at without reading it.
async fn wait_for_head(stream: &tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(LOBBY_WAIT, async {
        loop {
            match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") => return true,
                Ok(n) if n == buf.len() => return false,
                // Part of a head: peeking again would return at once, so look again soon.
                Ok(_) => tokio::time::sleep(LOBBY_STEP).await,
            }
        }
    })
    .await
    .unwrap_or(false)
}

fn shed(endpoint: &'static str, reason: &'static str) {
    metrics::counter!(crate::metrics::HTTP_SHED, "endpoint" => endpoint, "reason" => reason)
        .increment(1);
}

/// One connection: HTTP/1.1 with keep-alive, until the client leaves or the server
/// stops (then in-flight responses get [`STOP_GRACE`]).
async fn connection<S>(
    stream: S,
    app: Router,
    stop: Drain,
    limits: Limits,
    slot: Slot,
    peer: std::net::SocketAddr,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.head_deadline)
        .max_buf_size(limits.max_head_len.max(8192));
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(crate::admin::ClientAddr(peer));
            // The connection counts as mid-request until its response body has been produced.
            let busy = slot.busy();
            let app = app.clone();
            async move {
                let response = match app.oneshot(req).await {
                    Ok(r) => r,
                    Err(never) => match never {},
                };
                Ok::<_, Infallible>(response.map(|body| {
                    Body::new(Tracked {
                        body,
                        busy: Some(busy),
                    })
                }))
            }
        });
    let conn = builder.serve_connection(TokioIo::new(stream), service);
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

/// A response body that holds its connection's [`Busy`] mark until it has been
/// produced (or dropped).
struct Tracked {
    body: Body,
    busy: Option<Busy>,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let r = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(r, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.busy = None;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
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
        // Outside the deadline: a request that stays in progress for 5 s.
        .route(
            "/hold",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "held"
            }),
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
    async fn a_new_client_takes_the_place_of_the_longest_waiting_and_503_only_when_all_work() {
        let limits = Limits {
            max_connections: 2,
            ..Limits::default()
        };
        let (addr, stop, h) = start(limits).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let _silent2 = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let ok = exchange(addr, b"GET /status HTTP/1.1\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(1), silent.read_to_end(&mut buf))
            .await
            .expect("the longest-waiting connection was closed for the new one")
            .unwrap();
        // Both places mid-request: the next client is refused at once.
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /hold HTTP/1.1\r\n\r\n").await.unwrap();
            held.push(s);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let busy = exchange(addr, b"GET /status HTTP/1.1\r\n\r\n").await;
        assert!(busy.starts_with("HTTP/1.1 503"), "{busy}");
        for mut s in held {
            let mut buf = [0u8; 64];
            let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
                .await
                .expect("the held request is answered")
                .unwrap();
            assert!(
                String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
                "a request in progress is never closed for a new client"
            );
        }
        stop.stop();
        tokio::time::timeout(Duration::from_secs(10), h)
            .await
            .expect("the accept loop ends")
            .unwrap();
    }

    /// 200 slowloris clients, each reopened as soon as it is closed, against 64 places:
    /// a fresh client polling every 100 ms is answered within 1 s every time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_clients_never_lock_out_a_fresh_one() {
        let (addr, _stop, _h) = start(Limits::default()).await;
        let until = tokio::time::Instant::now() + Duration::from_secs(4);
        let mut loris = Vec::new();
        for i in 0..200u32 {
            loris.push(tokio::spawn(async move {
                let mut reopened = 0u32;
                while tokio::time::Instant::now() < until {
                    let Ok(mut s) = TcpStream::connect(addr).await else {
                        continue;
                    };
                    let _ = s.write_all(b"GET /status HTTP/1.1\r\nX-Slow: ").await;
                    // A byte every 200 ms until closed or the time is up.
                    while tokio::time::Instant::now() < until {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        if s.write_all(&[b'a' + (i % 26) as u8]).await.is_err() {
                            break;
                        }
                        let mut b = [0u8; 1];
                        if let Ok(Ok(0)) =
                            tokio::time::timeout(Duration::from_millis(1), s.read(&mut b)).await
                        {
                            break;
                        }
                    }
                    reopened += 1;
                }
                reopened
            }));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut polls = 0;
        let mut worst = Duration::ZERO;
        while tokio::time::Instant::now() + Duration::from_millis(500) < until {
            let t = std::time::Instant::now();
            let r = tokio::time::timeout(
                Duration::from_secs(1),
                exchange(addr, b"GET /status HTTP/1.1\r\nConnection: close\r\n\r\n"),
            )
            .await
            .expect("answered within 1 s");
            assert!(r.starts_with("HTTP/1.1 200"), "poll {polls}: {r}");
            worst = worst.max(t.elapsed());
            polls += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut reopened = 0;
        for l in loris {
            reopened += l.await.unwrap();
        }
        assert!(polls >= 20, "{polls} polls");
        assert!(
            reopened > 200,
            "slow clients were closed to make room ({reopened})"
        );
        eprintln!("{polls} polls, worst {worst:?}, slow clients reopened {reopened} times");
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
