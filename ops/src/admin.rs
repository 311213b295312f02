//! A tiny HTTP/1.1 server for the admin endpoints (metrics, health): GET and HEAD only,
//! one request per connection, the handler maps a path to a [`Response`].
//!
//! Why hand-rolled: the admin port serves a handful of paths to Prometheus and curl, and
//! an HTTP stack would be the largest dependency of the relays. Why so defensive: anything
//! on the host may connect, so reading the request head has a deadline and a size cap,
//! writing the response has a deadline, the number of open admin connections is bounded,
//! and nothing a client sends can panic the server or hold up another connection.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::drain::Drain;

/// Deadline for reading a request head, and separately for writing its response.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(5);

/// Largest request head (request line and headers) accepted, in bytes.
pub const MAX_HEAD_LEN: usize = 16 * 1024;

/// Most admin connections served at once; more are answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 64;

/// Longest time spent discarding what a client still sends after its response, so that
/// closing with unread bytes does not reset the connection and lose the response.
const MAX_LINGER: Duration = Duration::from_secs(1);

/// Most bytes discarded while lingering.
const MAX_LINGER_BYTES: usize = 64 * 1024;

/// Pause after a failed accept (say, out of file descriptors) before accepting again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Bytes asked of the socket per read of the request head.
const READ_CHUNK: usize = 4096;

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";
const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Sent without waiting to a connection over [`MAX_CONNECTIONS`] before closing it.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; \
charset=utf-8\r\nContent-Length: 5\r\nConnection: close\r\n\r\nbusy\n";

/// What a handler answers for a path: status, content type and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// HTTP status code (100 to 999; anything else is sent as 500).
    pub status: u16,
    /// Value of the Content-Type header.
    pub content_type: &'static str,
    /// Body, sent as is; left out (but still counted in Content-Length) for HEAD.
    pub body: String,
}

impl Response {
    /// A plain-text UTF-8 response.
    pub fn text(status: u16, body: String) -> Self {
        Response {
            status,
            content_type: TEXT,
            body,
        }
    }

    /// A JSON response; `body` must already be serialized JSON.
    pub fn json(status: u16, body: String) -> Self {
        Response {
            status,
            content_type: JSON,
            body,
        }
    }

    /// A 200 response in the Prometheus text exposition format (version 0.0.4).
    pub fn prometheus(body: String) -> Self {
        Response {
            status: 200,
            content_type: PROMETHEUS,
            body,
        }
    }
}

/// Serves admin requests on `listener` until `stop` says stop, with [`DEFAULT_DEADLINE`].
///
/// `handler` gets the request path without its query string and runs on a runtime
/// thread, so it must be quick (render from counters, no blocking I/O). Connections
/// already accepted finish on their own, bounded by their deadlines.
pub async fn serve<F>(listener: TcpListener, handler: Arc<F>, stop: Drain)
where
    F: Fn(&str) -> Response + Send + Sync + 'static,
{
    serve_with(listener, handler, stop, DEFAULT_DEADLINE).await;
}

/// [`serve`] with another deadline for reading a request head and writing its response.
pub async fn serve_with<F>(listener: TcpListener, handler: Arc<F>, stop: Drain, deadline: Duration)
where
    F: Fn(&str) -> Response + Send + Sync + 'static,
{
    serve_limited(listener, handler, stop, deadline, MAX_CONNECTIONS).await;
}

/// The accept loop, with the connection cap as a parameter for tests.
async fn serve_limited<F>(
    listener: TcpListener,
    handler: Arc<F>,
    stop: Drain,
    deadline: Duration,
    max_connections: usize,
) where
    F: Fn(&str) -> Response + Send + Sync + 'static,
{
    let permits = Arc::new(Semaphore::new(max_connections));
    let stopping = stop.stopping();
    tokio::pin!(stopping);
    loop {
        // No deadline: accepting waits for clients for as long as the relay runs.
        let accepted = tokio::select! {
            biased;
            () = &mut stopping => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::select! {
                    () = &mut stopping => break,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "too many admin connections, refusing one");
            // Best effort and without waiting: a fresh socket's send buffer has room.
            let _ = stream.try_write(BUSY);
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let _permit = permit;
            handle(stream, handler.as_ref(), deadline).await;
        });
    }
    tracing::debug!("admin server stopped accepting");
}

/// Why a request got no answer from the handler.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    /// The client closed before sending anything.
    #[error("connection closed before a request")]
    Closed,
    /// The client closed in the middle of the head.
    #[error("connection closed in the middle of the request head")]
    Truncated,
    /// The head did not end within [`MAX_HEAD_LEN`] bytes.
    #[error("request head exceeds {MAX_HEAD_LEN} bytes")]
    TooLarge,
    /// The head is not HTTP/1.x.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// Reading failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// The method of a request, as far as this server cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Get,
    Head,
    Other,
}

/// A parsed request line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RequestLine<'a> {
    method: Method,
    target: &'a str,
}

/// Serves one connection: read the head, answer, close.
async fn handle<F>(mut stream: TcpStream, handler: &F, deadline: Duration)
where
    F: Fn(&str) -> Response,
{
    let head = match tokio::time::timeout(deadline, read_head(&mut stream)).await {
        Ok(Ok(head)) => Ok(head),
        Ok(Err(RequestError::Closed)) => return,
        Ok(Err(RequestError::Io(e))) => {
            tracing::debug!(error = %e, "admin connection failed");
            return;
        }
        Ok(Err(e)) => Err(e),
        Err(_) => {
            tracing::debug!(?deadline, "admin request head not received in time");
            return;
        }
    };
    let reply = head.and_then(|h| {
        let line = parse_head(&h)?;
        Ok(match line.method {
            Method::Other => Reply::method_not_allowed(),
            method => Reply {
                response: handler(request_path(line.target)?),
                with_body: method == Method::Get,
                allow: false,
            },
        })
    });
    let reply = reply.unwrap_or_else(|e| {
        tracing::debug!(error = %e, "bad admin request");
        Reply::bad_request()
    });
    respond(&mut stream, &reply.encode(), deadline).await;
}

/// Reads until the blank line that ends a request head; rejects a malformed request
/// line as soon as it is complete rather than waiting for the rest.
async fn read_head(stream: &mut TcpStream) -> Result<Vec<u8>, RequestError> {
    let mut buf = Vec::with_capacity(1024);
    let mut line_checked = false;
    loop {
        let filled = buf.len();
        let room = MAX_HEAD_LEN - filled;
        if room == 0 {
            return Err(RequestError::TooLarge);
        }
        buf.resize(filled + room.min(READ_CHUNK), 0);
        let n = stream.read(&mut buf[filled..]).await?;
        buf.truncate(filled + n);
        if n == 0 {
            return Err(if filled == 0 {
                RequestError::Closed
            } else {
                RequestError::Truncated
            });
        }
        if !line_checked {
            if let Some(eol) = buf.iter().position(|&b| b == b'\n') {
                parse_request_line(strip_cr(&buf[..eol]))?;
                line_checked = true;
            }
        }
        if let Some(end) = head_end(&buf, filled.saturating_sub(3)) {
            buf.truncate(end);
            return Ok(buf);
        }
    }
}

/// Where the head ends (just past its blank line), searching from `from`; accepts bare
/// LF line ends as well as CRLF.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    (from..buf.len()).find_map(|i| {
        if buf[i] != b'\n' {
            return None;
        }
        match buf.get(i + 1..) {
            Some([b'\n', ..]) => Some(i + 2),
            Some([b'\r', b'\n', ..]) => Some(i + 3),
            _ => None,
        }
    })
}

/// Drops one trailing CR.
fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Checks a whole head (request line and header lines) and returns its request line.
fn parse_head(head: &[u8]) -> Result<RequestLine<'_>, RequestError> {
    let mut lines = head.split(|&b| b == b'\n').map(strip_cr);
    let line = parse_request_line(lines.next().unwrap_or_default())?;
    for header in lines.filter(|l| !l.is_empty()) {
        if header[0] == b' ' || header[0] == b'\t' {
            return Err(RequestError::Malformed("folded header line"));
        }
        let colon = header
            .iter()
            .position(|&b| b == b':')
            .ok_or(RequestError::Malformed("header line without a colon"))?;
        if colon == 0 || !header[..colon].iter().copied().all(is_tchar) {
            return Err(RequestError::Malformed("invalid header name"));
        }
        if header[colon..].iter().any(|&b| b == b'\r' || b == 0) {
            return Err(RequestError::Malformed("control byte in a header value"));
        }
    }
    Ok(line)
}

/// Parses `METHOD SP request-target SP HTTP/1.x`.
fn parse_request_line(line: &[u8]) -> Result<RequestLine<'_>, RequestError> {
    let line = std::str::from_utf8(line)
        .ok()
        .filter(|l| l.is_ascii())
        .ok_or(RequestError::Malformed("request line is not ASCII"))?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(RequestError::Malformed("request line is not three words"));
    };
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return Err(RequestError::Malformed("invalid method"));
    }
    if target.is_empty() || !target.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(RequestError::Malformed("invalid request target"));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(RequestError::Malformed("not HTTP/1.0 or HTTP/1.1"));
    }
    let method = match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        _ => Method::Other,
    };
    Ok(RequestLine { method, target })
}

/// The path of a request target (origin form `/p?q` or absolute form `http://h/p?q`),
/// without query string or fragment.
fn request_path(target: &str) -> Result<&str, RequestError> {
    let path = if target.starts_with('/') {
        target
    } else if let Some(rest) = strip_scheme(target) {
        match rest.find(['/', '?', '#']) {
            Some(i) if rest[i..].starts_with('/') => &rest[i..],
            _ => "/",
        }
    } else {
        return Err(RequestError::Malformed("request target is not a path"));
    };
    let end = path.find(['?', '#']).unwrap_or(path.len());
    Ok(&path[..end])
}

/// What follows `http://` or `https://` (any case), if the target starts with either.
fn strip_scheme(target: &str) -> Option<&str> {
    ["http://", "https://"].iter().find_map(|scheme| {
        let prefix = target.get(..scheme.len())?;
        prefix
            .eq_ignore_ascii_case(scheme)
            .then(|| &target[scheme.len()..])
    })
}

/// An RFC 9110 token character (method and header names).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A response about to be written.
struct Reply {
    response: Response,
    with_body: bool,
    allow: bool,
}

impl Reply {
    fn bad_request() -> Self {
        Reply {
            response: Response::text(400, "bad request\n".into()),
            with_body: true,
            allow: false,
        }
    }

    fn method_not_allowed() -> Self {
        Reply {
            response: Response::text(405, "method not allowed\n".into()),
            with_body: true,
            allow: true,
        }
    }

    /// The bytes on the wire: status line, headers, and the body unless HEAD.
    fn encode(&self) -> Vec<u8> {
        let r = &self.response;
        let status = if (100..=999).contains(&r.status) {
            r.status
        } else {
            500
        };
        let allow = if self.allow {
            "Allow: GET, HEAD\r\n"
        } else {
            ""
        };
        let mut out = format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}\
             Connection: close\r\n\r\n",
            reason(status),
            r.content_type,
            r.body.len(),
        )
        .into_bytes();
        if self.with_body {
            out.extend_from_slice(r.body.as_bytes());
        }
        out
    }
}

/// The reason phrase for a status code (empty when unknown, which HTTP allows).
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

/// Writes the response and half-closes within `deadline`, then discards what the client
/// still sends for a short while so the close does not turn into a reset.
async fn respond(stream: &mut TcpStream, bytes: &[u8], deadline: Duration) {
    let write = async {
        stream.write_all(bytes).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(deadline, write).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "admin response not written");
            return;
        }
        Err(_) => {
            tracing::debug!(?deadline, "admin response not written in time");
            return;
        }
    }
    let linger = async {
        let mut scratch = [0u8; 4096];
        let mut left = MAX_LINGER_BYTES;
        while left > 0 {
            match stream.read(&mut scratch).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(deadline.min(MAX_LINGER), linger).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::sync::Mutex;
    use std::time::Instant;
    use tokio::task::JoinHandle;

    const LONG: Duration = Duration::from_secs(10);

    /// Paths the handler saw, shared with the test.
    type Seen = Arc<Mutex<Vec<String>>>;

    fn handler(seen: Seen) -> Arc<impl Fn(&str) -> Response + Send + Sync + 'static> {
        Arc::new(move |path: &str| {
            seen.lock().expect("lock").push(path.to_owned());
            match path {
                "/metrics" => Response::prometheus("routy_up 1\n".into()),
                "/health" => Response::json(200, r#"{"ok":true}"#.into()),
                _ => Response::text(404, "not found\n".into()),
            }
        })
    }

    async fn start_limited(
        deadline: Duration,
        max: usize,
    ) -> (SocketAddr, Seen, Drain, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Seen::default();
        let stop = Drain::new();
        let task = tokio::spawn(serve_limited(
            listener,
            handler(seen.clone()),
            stop.clone(),
            deadline,
            max,
        ));
        (addr, seen, stop, task)
    }

    async fn start(deadline: Duration) -> (SocketAddr, Seen, Drain, JoinHandle<()>) {
        start_limited(deadline, MAX_CONNECTIONS).await
    }

    /// Sends `request`, returns everything the server sends until it closes.
    async fn exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(request).await.expect("write");
        read_all(&mut s).await
    }

    async fn read_all(s: &mut TcpStream) -> Vec<u8> {
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .expect("server closes within 5 s")
            .expect("read");
        out
    }

    /// Status code, headers (lowercased names) and body of a raw response.
    fn split(raw: &[u8]) -> (u16, Vec<(String, String)>, Vec<u8>) {
        let end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("head end")
            + 4;
        let head = std::str::from_utf8(&raw[..end]).expect("ascii head");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().expect("status line");
        assert!(status_line.starts_with("HTTP/1.1 "), "{status_line}");
        let status = status_line[9..12].parse().expect("status code");
        let headers = lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (n, v) = l.split_once(": ").expect("header");
                (n.to_ascii_lowercase(), v.to_owned())
            })
            .collect();
        (status, headers, raw[end..].to_vec())
    }

    fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    #[tokio::test]
    async fn get_returns_status_headers_and_body() {
        let (addr, seen, _stop, _task) = start(LONG).await;
        let raw = exchange(addr, b"GET /metrics?name[]=x HTTP/1.1\r\nHost: a\r\n\r\n").await;
        let (status, headers, body) = split(&raw);
        assert_eq!(status, 200);
        assert!(raw.starts_with(b"HTTP/1.1 200 OK\r\n"));
        assert_eq!(header(&headers, "content-type"), Some(PROMETHEUS));
        assert_eq!(header(&headers, "content-length"), Some("11"));
        assert_eq!(header(&headers, "connection"), Some("close"));
        assert_eq!(body, b"routy_up 1\n");
        assert_eq!(*seen.lock().expect("lock"), ["/metrics"]);

        let (status, headers, body) = split(&exchange(addr, b"GET /health HTTP/1.0\r\n\r\n").await);
        assert_eq!((status, body.as_slice()), (200, &br#"{"ok":true}"#[..]));
        assert_eq!(header(&headers, "content-type"), Some("application/json"));
    }

    #[tokio::test]
    async fn unknown_path_is_the_handlers_404() {
        let (addr, seen, _stop, _task) = start(LONG).await;
        let raw = exchange(addr, b"GET /nope HTTP/1.1\r\n\r\n").await;
        assert!(raw.starts_with(b"HTTP/1.1 404 Not Found\r\n"));
        assert_eq!(split(&raw).2, b"not found\n");
        assert_eq!(*seen.lock().expect("lock"), ["/nope"]);
    }

    #[tokio::test]
    async fn absolute_form_and_bare_lf_are_understood() {
        let (addr, seen, _stop, _task) = start(LONG).await;
        let raw = exchange(
            addr,
            b"GET http://127.0.0.1:9/metrics?x HTTP/1.1\nHost: a\n\n",
        )
        .await;
        assert_eq!(split(&raw).0, 200);
        assert_eq!(*seen.lock().expect("lock"), ["/metrics"]);
    }

    #[tokio::test]
    async fn head_has_headers_but_no_body() {
        let (addr, _seen, _stop, _task) = start(LONG).await;
        let (status, headers, body) =
            split(&exchange(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n").await);
        assert_eq!(status, 200);
        assert_eq!(header(&headers, "content-length"), Some("11"));
        assert!(body.is_empty(), "HEAD got a body: {body:?}");
    }

    #[tokio::test]
    async fn post_is_405_with_allow() {
        let (addr, seen, _stop, _task) = start(LONG).await;
        let raw = exchange(
            addr,
            b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
        )
        .await;
        let (status, headers, _) = split(&raw);
        assert_eq!(status, 405);
        assert_eq!(header(&headers, "allow"), Some("GET, HEAD"));
        assert!(seen.lock().expect("lock").is_empty());
    }

    #[tokio::test]
    async fn garbage_is_400() {
        let (addr, seen, _stop, _task) = start(LONG).await;
        // A TLS ClientHello's first bytes, then a line end.
        let raw = exchange(addr, b"\x16\x03\x01\x02\x00\x01\xfc\x03\x03garbage\r\n\r\n").await;
        assert_eq!(split(&raw).0, 400);
        // Bad header lines.
        for req in [
            &b"GET / HTTP/1.1\r\nno colon here\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Name: a\r\n\r\n",
            b"GET  /  HTTP/1.1\r\n\r\n",
            b"GET / HTTP/2.0\r\n\r\n",
            b"GET * HTTP/1.1\r\n\r\n",
        ] {
            let raw = exchange(addr, req).await;
            assert_eq!(split(&raw).0, 400, "{:?}", String::from_utf8_lossy(req));
        }
        // Garbage then a half-close, without any line end.
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"\x00\x01\x02").await.expect("write");
        s.shutdown().await.expect("shutdown");
        assert_eq!(split(&read_all(&mut s).await).0, 400);
        assert!(seen.lock().expect("lock").is_empty());
    }

    #[tokio::test]
    async fn bad_request_line_is_rejected_without_waiting_for_the_head() {
        let (addr, _seen, _stop, _task) = start(LONG).await;
        let started = Instant::now();
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"SSH-2.0-OpenSSH_9.6\r\n")
            .await
            .expect("write");
        assert_eq!(split(&read_all(&mut s).await).0, 400);
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn oversized_head_is_400() {
        let (addr, seen, _stop, _task) = start(LONG).await;
        let mut req = b"GET /metrics HTTP/1.1\r\n".to_vec();
        while req.len() <= MAX_HEAD_LEN + 4096 {
            req.extend_from_slice(b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        let mut s = TcpStream::connect(addr).await.expect("connect");
        // The server may stop reading before all of it is written.
        let _ = s.write_all(&req).await;
        assert_eq!(split(&read_all(&mut s).await).0, 400);

        // A single line longer than the cap.
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let _ = s.write_all(&vec![b'A'; MAX_HEAD_LEN + 10]).await;
        assert_eq!(split(&read_all(&mut s).await).0, 400);
        assert!(seen.lock().expect("lock").is_empty());
    }

    #[tokio::test]
    async fn silent_client_is_closed_after_the_deadline() {
        let deadline = Duration::from_millis(200);
        let (addr, _seen, _stop, _task) = start(deadline).await;
        let started = Instant::now();
        let mut s = TcpStream::connect(addr).await.expect("connect");
        assert!(read_all(&mut s).await.is_empty());
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(180), "closed after {took:?}");
    }

    #[tokio::test]
    async fn trickling_client_is_closed_after_the_deadline() {
        let deadline = Duration::from_millis(200);
        let (addr, _seen, _stop, _task) = start(deadline).await;
        let s = TcpStream::connect(addr).await.expect("connect");
        let (mut rd, mut wr) = s.into_split();
        let trickle = tokio::spawn(async move {
            let _ = wr.write_all(b"GET / HTTP/1.1\r\n").await;
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if wr.write_all(b"X-A: b\r\n").await.is_err() {
                    break;
                }
            }
        });
        let started = Instant::now();
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(1), rd.read_to_end(&mut out)).await;
        assert!(
            read.is_ok(),
            "a trickling client kept the connection past the deadline"
        );
        assert!(out.is_empty());
        assert!(started.elapsed() < Duration::from_secs(1));
        trickle.abort();
    }

    #[tokio::test]
    async fn silent_clients_do_not_block_others() {
        let (addr, _seen, _stop, _task) = start(LONG).await;
        let mut idle = Vec::new();
        for _ in 0..3 {
            idle.push(TcpStream::connect(addr).await.expect("connect"));
        }
        let raw = tokio::time::timeout(
            Duration::from_secs(2),
            exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n"),
        )
        .await
        .expect("served while others idle");
        assert_eq!(split(&raw).0, 200);
        drop(idle);
    }

    #[tokio::test]
    async fn concurrent_requests_are_all_served() {
        let (addr, seen, _stop, _task) = start(LONG).await;
        let clients: Vec<_> = (0..32)
            .map(|_| tokio::spawn(exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n")))
            .collect();
        for c in clients {
            let (status, _, body) = split(&c.await.expect("client"));
            assert_eq!((status, body.as_slice()), (200, &b"routy_up 1\n"[..]));
        }
        assert_eq!(seen.lock().expect("lock").len(), 32);
    }

    #[tokio::test]
    async fn connections_over_the_cap_get_503() {
        let (addr, _seen, _stop, _task) = start_limited(LONG, 1).await;
        let holder = TcpStream::connect(addr).await.expect("connect");
        let mut refused = TcpStream::connect(addr).await.expect("connect");
        let raw = read_all(&mut refused).await;
        assert_eq!(split(&raw).0, 503);
        drop(holder);
        // The holder's task ends once it sees the close; then requests are served again.
        let mut status = 0;
        for _ in 0..50 {
            status = split(&exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await).0;
            if status == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(status, 200);
    }

    #[tokio::test]
    async fn stop_ends_the_accept_loop() {
        let (addr, _seen, stop, task) = start(LONG).await;
        assert_eq!(
            split(&exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await).0,
            200
        );
        stop.stop();
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("serve returns after stop")
            .expect("serve did not panic");
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "listener still open"
        );
    }

    #[tokio::test]
    async fn serve_uses_the_default_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = Drain::new();
        let task = tokio::spawn(serve(listener, handler(Seen::default()), stop.clone()));
        assert_eq!(
            split(&exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await).0,
            200
        );
        stop.stop();
        task.await.expect("serve");
    }

    #[test]
    fn request_line_parsing() {
        let line = parse_request_line(b"GET /a?b HTTP/1.1").expect("valid");
        assert_eq!((line.method, line.target), (Method::Get, "/a?b"));
        assert_eq!(
            parse_request_line(b"HEAD / HTTP/1.0")
                .expect("valid")
                .method,
            Method::Head
        );
        assert_eq!(
            parse_request_line(b"DELETE / HTTP/1.1")
                .expect("valid")
                .method,
            Method::Other
        );
        assert_eq!(
            parse_request_line(b"get / HTTP/1.1").expect("valid").method,
            Method::Other
        );
        for bad in [
            &b""[..],
            b"GET",
            b"GET /",
            b"GET / HTTP/1.1 extra",
            b"GET /\x7f HTTP/1.1",
            b"G(T / HTTP/1.1",
            b"GET / HTTP/1.2",
            b"GET /\xc3\xa9 HTTP/1.1",
        ] {
            assert!(parse_request_line(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn path_extraction() {
        assert_eq!(request_path("/metrics").expect("ok"), "/metrics");
        assert_eq!(request_path("/metrics?a=b").expect("ok"), "/metrics");
        assert_eq!(request_path("/m#frag").expect("ok"), "/m");
        assert_eq!(request_path("HTTP://h:1/x/y?q").expect("ok"), "/x/y");
        assert_eq!(request_path("https://h").expect("ok"), "/");
        assert_eq!(request_path("http://h?q=/x").expect("ok"), "/");
        assert!(request_path("*").is_err());
        assert!(request_path("metrics").is_err());
    }

    #[test]
    fn head_end_detection() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nbody", 0), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\nbody", 0), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n", 0), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r", 0), None);
    }

    #[test]
    fn out_of_range_status_is_sent_as_500() {
        let reply = Reply {
            response: Response::text(7, "x".into()),
            with_body: true,
            allow: false,
        };
        assert!(reply
            .encode()
            .starts_with(b"HTTP/1.1 500 Internal Server Error\r\n"));
        let reply = Reply {
            response: Response::text(299, "".into()),
            with_body: false,
            allow: false,
        };
        assert!(reply.encode().starts_with(b"HTTP/1.1 299 \r\n"));
    }
}
