//! The tunnel inside a WebSocket, for networks that pass only HTTP: an HTTP/1.1
//! `Upgrade` (plain, or under a TLS layer of its own for `wss://`), then binary messages
//! that carry the tunnel's ordinary byte stream. The tunnel's mutual TLS runs inside
//! that stream exactly as over TCP, so a proxy or load balancer that terminates the
//! outer layer sees only the inner TLS records, and relay-outer authenticates relay-inner
//! by its client certificate as on every other transport.
//!
//! [`WsIo`] turns a WebSocket into `AsyncRead + AsyncWrite`; [`connect`] and [`accept`]
//! run the upgrade.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest, Bytes, Message};
use tokio_tungstenite::WebSocketStream;

/// The WebSocket subprotocol a tunnel asks for and relay-outer requires.
pub const SUBPROTOCOL: &str = "routy-tunnel-1";

/// Largest message or frame accepted: what one write sends at most, with room.
const MAX_MESSAGE: usize = 1 << 20;
/// Largest message one write sends.
const WRITE_CHUNK: usize = 256 * 1024;

fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
        .write_buffer_size(0)
}

/// A WebSocket as a byte stream: each write is one binary message; reads hand out the
/// bytes of binary messages in order. Ping and pong are answered by the WebSocket
/// itself; a text message is an error; a close is the end of the stream.
pub struct WsIo<S> {
    ws: WebSocketStream<S>,
    pending: Bytes,
}

impl<S> std::fmt::Debug for WsIo<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsIo")
            .field("pending", &self.pending.len())
            .finish()
    }
}

fn io_error(e: tungstenite::Error) -> io::Error {
    match e {
        tungstenite::Error::Io(e) => e,
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            io::Error::new(io::ErrorKind::BrokenPipe, "the WebSocket is closed")
        }
        other => io::Error::new(io::ErrorKind::InvalidData, format!("WebSocket: {other}")),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(out.remaining());
                out.put_slice(&this.pending.split_to(n));
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Ok(Message::Binary(b))) => this.pending = b,
                Some(Ok(Message::Close(_))) => return Poll::Ready(Ok(())),
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "WebSocket: a text message where the tunnel sends binary ones",
                    )))
                }
                Some(Err(
                    tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed,
                )) => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(io_error)?;
        let n = buf.len().min(WRITE_CHUNK);
        Pin::new(&mut this.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
            .map_err(io_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_flush(cx)
            .map_err(io_error)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.get_mut().ws).poll_close(cx)) {
            Ok(())
            | Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                Poll::Ready(Ok(()))
            }
            Err(e) => Poll::Ready(Err(io_error(e))),
        }
    }
}

/// Upgrades `io` to a WebSocket at `url` (`ws://host:port/path` or `wss://…`; for `wss`
/// the caller has put TLS under `io` already), asking for [`SUBPROTOCOL`].
pub async fn connect<S>(io: S, url: &str, timeout: Duration) -> Result<WsIo<S>, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut req = url
        .into_client_request()
        .map_err(|e| format!("WebSocket URL {url:?}: {e}"))?;
    let h = req.headers_mut();
    h.insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(SUBPROTOCOL),
    );
    h.insert(
        "User-Agent",
        HeaderValue::from_static(concat!("routy/", env!("CARGO_PKG_VERSION"))),
    );
    let upgrade = tokio_tungstenite::client_async_with_config(req, io, Some(config()));
    match tokio::time::timeout(timeout, upgrade).await {
        Err(_) => Err(format!(
            "WebSocket upgrade at {url}: no answer within {timeout:?}"
        )),
        Ok(Err(tungstenite::Error::Http(resp))) => {
            let body = resp
                .body()
                .as_deref()
                .map(|b| {
                    String::from_utf8_lossy(&b[..b.len().min(200)])
                        .trim()
                        .to_string()
                })
                .unwrap_or_default();
            Err(format!(
                "WebSocket upgrade at {url} refused: HTTP {}{}",
                resp.status(),
                if body.is_empty() {
                    String::new()
                } else {
                    format!(": {body}")
                }
            ))
        }
        // tungstenite checks that the server agreed to the subprotocol asked for.
        Ok(Err(tungstenite::Error::Protocol(
            tungstenite::error::ProtocolError::SecWebSocketSubProtocolError(_),
        ))) => Err(format!(
            "WebSocket upgrade at {url}: the server did not agree to subprotocol \
             {SUBPROTOCOL} (is it relay-outer's tunnel port?)"
        )),
        Ok(Err(e)) => Err(format!("WebSocket upgrade at {url}: {e}")),
        Ok(Ok((ws, _))) => Ok(WsIo {
            ws,
            pending: Bytes::new(),
        }),
    }
}

/// Largest HTTP request head accepted before the upgrade.
const MAX_HEAD: usize = 16 * 1024;

/// A stream whose first bytes were read already: they are handed out again first.
pub struct Rewind<S> {
    head: Bytes,
    io: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.head.is_empty() {
            let n = this.head.len().min(out.remaining());
            out.put_slice(&this.head.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, out)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Whether an HTTP request head asks for a WebSocket upgrade.
fn asks_upgrade(head: &[u8]) -> bool {
    String::from_utf8_lossy(head).lines().skip(1).any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("upgrade") && v.trim().eq_ignore_ascii_case("websocket")
        })
    })
}

/// Accepts a WebSocket upgrade on `io` (any path). A request that is not an upgrade, or
/// one without [`SUBPROTOCOL`], gets a 400 with a body saying why.
pub async fn accept<S>(mut io: S) -> Result<WsIo<Rewind<S>>, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_HEAD {
            return Err(format!("the request head is over {MAX_HEAD} bytes"));
        }
        let n = io
            .read(&mut chunk)
            .await
            .map_err(|e| format!("reading the request: {e}"))?;
        if n == 0 {
            return Err("the connection closed before the request was complete".into());
        }
        head.extend_from_slice(&chunk[..n]);
    }
    if !asks_upgrade(&head) {
        let line: String = String::from_utf8_lossy(&head)
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(100)
            .collect();
        let body = format!(
            "this is a Routy tunnel port: only the tunnel's WebSocket upgrade \
             (subprotocol {SUBPROTOCOL}) is served here\n"
        );
        let answer = format!(
            "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = io.write_all(answer.as_bytes()).await;
        let _ = io.shutdown().await;
        return Err(format!("not a WebSocket upgrade: {line:?}"));
    }
    let io = Rewind {
        head: Bytes::from(head),
        io,
    };
    // The callback's type is tungstenite's.
    #[allow(clippy::result_large_err)]
    let check = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        let asks = req
            .headers()
            .get_all("Sec-WebSocket-Protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|p| p.trim() == SUBPROTOCOL);
        if !asks {
            let mut e = ErrorResponse::new(Some(format!(
                "this is a Routy tunnel port: WebSocket subprotocol {SUBPROTOCOL} required\n"
            )));
            *e.status_mut() = StatusCode::BAD_REQUEST;
            return Err(e);
        }
        resp.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(SUBPROTOCOL),
        );
        Ok(resp)
    };
    let ws = tokio_tungstenite::accept_hdr_async_with_config(io, check, Some(config()))
        .await
        .map_err(|e| format!("WebSocket upgrade: {e}"))?;
    Ok(WsIo {
        ws,
        pending: Bytes::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bytes_go_both_ways_and_a_close_is_the_end() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut s = accept(b).await.unwrap();
            let mut got = vec![0u8; 300_000];
            s.read_exact(&mut got).await.unwrap();
            s.write_all(&got).await.unwrap();
            s.flush().await.unwrap();
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await.unwrap();
            rest.len()
        });
        let mut c = connect(a, "ws://relay.example:7443/routy", Duration::from_secs(5))
            .await
            .unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        c.write_all(&data).await.unwrap();
        c.flush().await.unwrap();
        let mut back = vec![0u8; data.len()];
        c.read_exact(&mut back).await.unwrap();
        assert_eq!(back, data);
        c.shutdown().await.unwrap();
        assert_eq!(server.await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_server_that_is_not_relay_outer_is_named() {
        // A WebSocket server that agrees to no subprotocol.
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server =
            tokio::spawn(async move { tokio_tungstenite::accept_async(b).await.map(|_| ()) });
        let e = connect(a, "ws://x/", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            e.contains("did not agree to subprotocol routy-tunnel-1"),
            "{e}"
        );
        let _ = server.await;
        // One that never answers.
        let (a, _b) = tokio::io::duplex(1024);
        let e = connect(a, "ws://x/", Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(e.contains("no answer within"), "{e}");
        // One that answers a plain HTTP error.
        let (a, b) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut b = b;
            let mut buf = [0u8; 1024];
            let _ = b.read(&mut buf).await;
            let _ = b
                .write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 3\r\n\r\nno\n")
                .await;
        });
        let e = connect(a, "ws://x/", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(e.contains("refused: HTTP 403"), "{e}");
    }

    #[tokio::test]
    async fn an_upgrade_without_the_subprotocol_is_refused_with_why() {
        let (mut a, b) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move { accept(b).await.map(|_| ()) });
        a.write_all(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .unwrap();
        let mut answer = Vec::new();
        let _ = a.read_to_end(&mut answer).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(
            answer.contains("subprotocol routy-tunnel-1 required"),
            "{answer}"
        );
        assert!(server.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn a_text_message_is_an_error_and_garbage_is_refused() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut s = accept(b).await.unwrap();
            let mut buf = [0u8; 16];
            s.read(&mut buf).await
        });
        let mut c = connect(a, "ws://x/", Duration::from_secs(5)).await.unwrap();
        use futures::SinkExt;
        c.ws.send(Message::text("hello")).await.unwrap();
        let e = server.await.unwrap().unwrap_err();
        assert!(e.to_string().contains("text message"), "{e}");

        let (mut a, b) = tokio::io::duplex(1024);
        let server = tokio::spawn(async move { accept(b).await.map(|_| ()) });
        a.write_all(b"\x16\x03\x01garbage\r\n\r\n").await.unwrap();
        assert!(server.await.unwrap().is_err());
    }
}
