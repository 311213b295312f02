//! A multiplexed tunnel session: open a stream, accept a stream.
//!
//! This is the seam between the relays and the transport. Two transports sit behind the
//! same [`SessionHandle`] and [`Stream`]: yamux over TLS over TCP, driven by one task per
//! connection ([`yamux`]), and QUIC, where each stream is a quinn bidirectional stream
//! ([`quic`]).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::poll_fn;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};

use crate::control::ControlEnd;
use crate::lanes::{self, LaneRef};
use crate::wbuf::{BufferedIo, KillSwitch};

/// yamux's initial per-stream receive window (its protocol default); every stream is
/// guaranteed at least this much.
pub const STREAM_WINDOW: usize = 256 * 1024;

/// What a connection's streams may grow their receive windows by, together, beyond
/// [`STREAM_WINDOW`] each. yamux doubles a stream's window when the sender used half of
/// it within two round trips, up to twice the bandwidth-delay product, and only while
/// this budget lasts. Without it windows stay at 256 KiB, which capped one bulk stream
/// at 0.16-0.19x direct in `bench-tunnel` (2 cores, loopback; the round trip under load
/// is a few hundred microseconds); with it, 0.23-0.27x. 256 MiB lets about twenty streams
/// fill a 1 Gbit/s, 100 ms path at once.
pub const WINDOW_GROWTH: usize = 256 * 1024 * 1024;

/// Streams a session can hold at once (yamux's own bound; our limits sit below it).
pub const MAX_STREAMS: usize = 16 * 1024;

/// Which end of the session this is (the dialer is the client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// relay-inner: dialed the connection.
    Client,
    /// relay-outer: accepted the connection.
    Server,
}

/// Why a stream could not be opened.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SessionError {
    /// The session is gone.
    #[error("session closed")]
    Closed,
    /// The transport refused to open a stream.
    #[error("cannot open stream: {0}")]
    Open(String),
}

/// One multiplexed stream, a bidirectional byte pipe with half-close.
pub struct Stream {
    inner: StreamIo,
    _guard: StreamGuard,
}

enum StreamIo {
    Yamux(Compat<yamux::Stream>),
    Quic {
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        /// `finish()` was called: a second shutdown is a no-op, as on yamux.
        finished: bool,
    },
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream").finish_non_exhaustive()
    }
}

/// Counts the session's open streams for as long as it lives.
struct StreamGuard(Arc<AtomicUsize>);

impl StreamGuard {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        StreamGuard(count.clone())
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.inner {
            StreamIo::Yamux(s) => Pin::new(s).poll_read(cx, buf),
            StreamIo::Quic { recv, .. } => Pin::new(recv).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.inner {
            StreamIo::Yamux(s) => Pin::new(s).poll_write(cx, buf),
            StreamIo::Quic { send, .. } => {
                tokio::io::AsyncWrite::poll_write(Pin::new(send), cx, buf)
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.inner {
            StreamIo::Yamux(s) => Pin::new(s).poll_flush(cx),
            StreamIo::Quic { send, .. } => tokio::io::AsyncWrite::poll_flush(Pin::new(send), cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.inner {
            StreamIo::Yamux(s) => Pin::new(s).poll_shutdown(cx),
            // Half-close: FIN on our send side; the receive side stays open.
            StreamIo::Quic { send, finished, .. } => {
                if !*finished {
                    *finished = true;
                    send.finish().map_err(io::Error::from)?;
                }
                Poll::Ready(Ok(()))
            }
        }
    }
}

type OpenReply = oneshot::Sender<Result<Stream, SessionError>>;

/// What carries the session.
#[derive(Clone)]
enum Transport {
    /// yamux over TLS: the driver task serves opens; the kill switch cuts the socket.
    Yamux {
        open_tx: mpsc::Sender<OpenReply>,
        kill: Arc<KillSwitch>,
        /// `tls`, or `websocket` for TLS inside a WebSocket.
        label: &'static str,
    },
    /// A QUIC connection: quinn is already multiplexed and clonable.
    Quic(quinn::Connection),
}

/// A cheap, clonable handle on a live session.
#[derive(Clone)]
pub struct SessionHandle {
    transport: Transport,
    closed: watch::Receiver<bool>,
    streams: Arc<AtomicUsize>,
    ended: EndedSlot,
    /// The lane the session was started on (see [`crate::lanes`]).
    lane: Option<LaneRef>,
}

impl std::fmt::Debug for SessionHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionHandle")
            .field("transport", &self.transport())
            .field("streams", &self.open_streams())
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl SessionHandle {
    /// Opens a new outbound stream. (On QUIC the peer learns of it with the first
    /// bytes written, which is always a frame.)
    pub async fn open(&self) -> Result<Stream, SessionError> {
        match &self.transport {
            Transport::Yamux { open_tx, .. } => {
                let (tx, rx) = oneshot::channel();
                open_tx.send(tx).await.map_err(|_| SessionError::Closed)?;
                rx.await.map_err(|_| SessionError::Closed)?
            }
            Transport::Quic(conn) => {
                let (send, recv) = conn.open_bi().await.map_err(|_| SessionError::Closed)?;
                Ok(Stream {
                    inner: StreamIo::Quic {
                        send,
                        recv,
                        finished: false,
                    },
                    _guard: StreamGuard::new(&self.streams),
                })
            }
        }
    }

    /// The lane the session runs on, if it was started on one: streams spliced over it
    /// run best there.
    pub fn lane(&self) -> Option<&LaneRef> {
        self.lane.as_ref()
    }

    /// Tears the session down now: every stream on it ends.
    pub fn kill(&self) {
        match &self.transport {
            Transport::Yamux { kill, .. } => kill.kill(),
            Transport::Quic(conn) => conn.close(QUIC_CLOSE_CODE, b"session closed"),
        }
    }

    /// Which transport carries the session: `"tls"` (yamux over TLS) or `"quic"`.
    pub fn transport(&self) -> &'static str {
        match self.transport {
            Transport::Yamux { label, .. } => label,
            Transport::Quic(_) => "quic",
        }
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Resolves once the session has ended.
    pub async fn closed(&self) {
        let mut rx = self.closed.clone();
        // An error means the driver is gone, which also means closed.
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Why the connection ended, if it ended with an error (a TLS alert from the peer,
    /// a reset, a local kill).
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.ended
            .lock()
            .ok()
            .and_then(|r| r.as_ref().map(|e| e.reason.clone()))
    }

    /// Why the session ended, given how its control loop ended. When the connection
    /// under the session failed (TCP or QUIC gave up on the peer, a reset), the control
    /// stream merely closed or failed with it: then the connection's failure is the
    /// reason, not "peer closed the control stream".
    pub async fn end_reason(&self, end: ControlEnd) -> ControlEnd {
        if !matches!(end, ControlEnd::PeerClosed | ControlEnd::Failed(_)) {
            return end;
        }
        // The connection's task records its error just before it reports the end; the
        // control stream can see the close first.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), self.closed()).await;
        let failure = self
            .ended
            .lock()
            .ok()
            .and_then(|e| e.as_ref().and_then(|e| e.failure.clone()));
        failure.unwrap_or(end)
    }

    /// Closes `stream` after what was written to it, waits up to `linger` for the peer
    /// to end the session (it does once it has read a refusal), then kills it. This is
    /// how a refusal frame reaches the peer instead of dying in a buffer.
    pub async fn close_after(&self, stream: &mut Stream, linger: std::time::Duration) {
        let _ = tokio::time::timeout(linger, tokio::io::AsyncWriteExt::shutdown(stream)).await;
        let _ = tokio::time::timeout(linger, self.closed()).await;
        self.kill();
    }

    /// Streams open on this session now, both directions.
    pub fn open_streams(&self) -> usize {
        self.streams.load(Ordering::Relaxed)
    }
}

/// A new session: the handle, and the streams the peer opens.
pub struct Session {
    /// Opens streams and controls the session.
    pub handle: SessionHandle,
    /// Streams opened by the peer, in order.
    pub incoming: mpsc::UnboundedReceiver<Stream>,
}

/// Starts a yamux session over an established (TLS) connection.
pub fn yamux<T>(io: T, role: Role) -> Session
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    yamux_as(io, role, "tls")
}

/// [`yamux`] for a session whose transport is called `label` (`websocket`: the TLS
/// runs inside a WebSocket).
pub fn yamux_as<T>(io: T, role: Role, label: &'static str) -> Session
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Frames stay at yamux's 16 KiB split: 64 KiB frames measured no faster.
    let mut cfg = yamux::Config::default();
    cfg.set_max_connection_receive_window(Some(STREAM_WINDOW * MAX_STREAMS + WINDOW_GROWTH));
    cfg.set_max_num_streams(MAX_STREAMS);
    let kill = Arc::new(KillSwitch::default());
    // At least everything the peer's windows let it have in flight, plus headroom for
    // window updates and pings.
    let cap = STREAM_WINDOW * MAX_STREAMS + WINDOW_GROWTH + (1 << 20);
    let io = BufferedIo::new(io, cap, kill.clone());
    let mode = match role {
        Role::Client => yamux::Mode::Client,
        Role::Server => yamux::Mode::Server,
    };
    let conn = yamux::Connection::new(io, cfg, mode);
    let (open_tx, open_rx) = mpsc::channel(256);
    let (in_tx, in_rx) = mpsc::unbounded_channel();
    let (closed_tx, closed_rx) = watch::channel(false);
    let streams = Arc::new(AtomicUsize::new(0));
    let ended = EndedSlot::default();
    tokio::spawn(drive(
        conn,
        kill.clone(),
        open_rx,
        in_tx,
        closed_tx,
        streams.clone(),
        ended.clone(),
    ));
    Session {
        handle: SessionHandle {
            transport: Transport::Yamux {
                open_tx,
                kill,
                label,
            },
            closed: closed_rx,
            streams,
            ended,
            lane: lanes::current(),
        },
        incoming: in_rx,
    }
}

/// Why the connection under a session ended with an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReason {
    /// The error as the transport put it.
    pub text: String,
    /// The peer's TLS refused this end: a TLS alert over TCP, a CRYPTO_ERROR close over
    /// QUIC. Under TLS 1.3 this is how a server's verdict on a client certificate
    /// arrives, after the client's handshake has finished.
    pub tls_refused: bool,
}

/// How the connection under a session ended, when it ended with an error.
#[derive(Debug, Clone)]
struct Ended {
    /// Why.
    reason: CloseReason,
    /// What it means for the session when the connection failed; `None` when it was
    /// closed by either end.
    failure: Option<ControlEnd>,
}

type EndedSlot = Arc<std::sync::Mutex<Option<Ended>>>;

/// What TCP's ETIMEDOUT means here: the kernel retransmitted (or probed) as often as it
/// will without an acknowledgement (the tunnel socket has no TCP_USER_TIMEOUT, see
/// [`crate::net::tune_tunnel_socket`]).
const TCP_GAVE_UP: &str = "no acknowledgement from the peer through all of TCP's retransmissions";

/// What an I/O error under the yamux connection means for the session. A broken pipe is
/// left out: it is what writing after the peer closed looks like.
fn io_failure(e: &io::Error) -> Option<ControlEnd> {
    use io::ErrorKind as K;
    match e.kind() {
        // An unreachable host or network is what TCP reports instead of ETIMEDOUT when
        // ICMP said so while it retried (on an established connection it is no reason
        // to stop earlier).
        K::TimedOut | K::HostUnreachable | K::NetworkUnreachable => {
            Some(ControlEnd::ConnectionTimedOut {
                limit: TCP_GAVE_UP,
                error: e.to_string(),
            })
        }
        K::ConnectionReset => Some(ControlEnd::ConnectionFailed(e.to_string())),
        _ => None,
    }
}

/// What the end of a QUIC connection means for the session.
fn quic_failure(e: &quinn::ConnectionError) -> Option<ControlEnd> {
    use quinn::ConnectionError as E;
    match e {
        E::TimedOut => Some(ControlEnd::ConnectionTimedOut {
            limit: "nothing from the peer within the QUIC idle timeout",
            error: e.to_string(),
        }),
        E::Reset | E::TransportError(_) | E::VersionMismatch | E::CidsExhausted => {
            Some(ControlEnd::ConnectionFailed(e.to_string()))
        }
        E::ConnectionClosed(_) | E::ApplicationClosed(_) | E::LocallyClosed => None,
    }
}

/// Application error code of a QUIC connection closed by [`SessionHandle::kill`].
pub const QUIC_CLOSE_CODE: quinn::VarInt = quinn::VarInt::from_u32(0);

/// Starts a session over an established QUIC connection. One task accepts the streams
/// the peer opens, in order, and records why the connection ended.
pub fn quic(conn: quinn::Connection) -> Session {
    let (in_tx, in_rx) = mpsc::unbounded_channel();
    let (closed_tx, closed_rx) = watch::channel(false);
    let streams = Arc::new(AtomicUsize::new(0));
    let ended = EndedSlot::default();
    {
        let (conn, streams, ended) = (conn.clone(), streams.clone(), ended.clone());
        tokio::spawn(async move {
            let e = loop {
                match conn.accept_bi().await {
                    Ok((send, recv)) => {
                        let s = Stream {
                            inner: StreamIo::Quic {
                                send,
                                recv,
                                finished: false,
                            },
                            _guard: StreamGuard::new(&streams),
                        };
                        // Nobody listening any more: the stream is dropped (stopped).
                        let _ = in_tx.send(s);
                    }
                    Err(e) => break e,
                }
            };
            tracing::debug!(error = %e, "QUIC tunnel connection ended");
            if let Ok(mut r) = ended.lock() {
                *r = Some(Ended {
                    reason: CloseReason {
                        text: e.to_string(),
                        tls_refused: crate::quic::tls_refused(&e),
                    },
                    failure: quic_failure(&e),
                });
            }
            let _ = closed_tx.send(true);
        });
    }
    Session {
        handle: SessionHandle {
            transport: Transport::Quic(conn),
            closed: closed_rx,
            streams,
            ended,
            lane: lanes::current(),
        },
        incoming: in_rx,
    }
}

/// The one task that owns the yamux connection: serves open requests, hands out
/// inbound streams, and runs until the connection ends.
async fn drive<T>(
    mut conn: yamux::Connection<T>,
    rounds: Arc<KillSwitch>,
    mut open_rx: mpsc::Receiver<OpenReply>,
    in_tx: mpsc::UnboundedSender<Stream>,
    closed_tx: watch::Sender<bool>,
    streams: Arc<AtomicUsize>,
    ended: EndedSlot,
) where
    T: futures::io::AsyncRead + futures::io::AsyncWrite + Unpin,
{
    let mut pending_open: Option<OpenReply> = None;
    let mut requests_open = true;
    let result = poll_fn(|cx| {
        rounds.next_round();
        loop {
            if pending_open.is_none() && requests_open {
                match open_rx.poll_recv(cx) {
                    Poll::Ready(Some(reply)) => pending_open = Some(reply),
                    Poll::Ready(None) => requests_open = false,
                    Poll::Pending => {}
                }
            }
            let Some(reply) = pending_open.take() else {
                break;
            };
            if reply.is_closed() {
                continue;
            }
            match conn.poll_new_outbound(cx) {
                Poll::Ready(Ok(s)) => {
                    let _ = reply.send(Ok(Stream {
                        inner: StreamIo::Yamux(s.compat()),
                        _guard: StreamGuard::new(&streams),
                    }));
                }
                Poll::Ready(Err(e)) => {
                    let _ = reply.send(Err(SessionError::Open(e.to_string())));
                }
                Poll::Pending => {
                    pending_open = Some(reply);
                    break;
                }
            }
        }
        loop {
            match conn.poll_next_inbound(cx) {
                Poll::Ready(Some(Ok(s))) => {
                    let s = Stream {
                        inner: StreamIo::Yamux(s.compat()),
                        _guard: StreamGuard::new(&streams),
                    };
                    // Nobody listening any more: the stream is dropped, which resets it.
                    let _ = in_tx.send(s);
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "tunnel connection ended");
        // A kill from our side also ends in an error; that is no failure.
        // yamux reports a failed read as a decode error.
        let io = match &e {
            yamux::ConnectionError::Io(io)
            | yamux::ConnectionError::Decode(yamux::FrameDecodeError::Io(io)) => Some(io),
            _ => None,
        };
        let failure = io.filter(|_| !rounds.is_killed()).and_then(io_failure);
        if let Ok(mut r) = ended.lock() {
            *r = Some(Ended {
                reason: CloseReason {
                    text: e.to_string(),
                    tls_refused: io.is_some_and(crate::tls::alert_received),
                },
                failure,
            });
        }
    }
    let _ = closed_tx.send(true);
    if let Some(reply) = pending_open {
        let _ = reply.send(Err(SessionError::Closed));
    }
    open_rx.close();
    while let Ok(reply) = open_rx.try_recv() {
        let _ = reply.send(Err(SessionError::Closed));
    }
}

/// Test steps both transports share (yamux here, QUIC in `quic.rs`).
/// Where a relay publishes its live session (or `None` between sessions) for the parts
/// that open streams over whichever session is up (relay-inner's CDC shippers).
pub type SessionWatch = tokio::sync::watch::Receiver<Option<SessionHandle>>;

/// Default bound on streams one session carries at once (both relays).
pub const DEFAULT_MAX_STREAMS_PER_SESSION: usize = 4096;

/// A streams-per-session limit from the file, or the default; errors name `field`.
pub fn streams_limit(value: Option<usize>, field: &str) -> Result<usize, String> {
    let max = MAX_STREAMS;
    match value {
        None => Ok(DEFAULT_MAX_STREAMS_PER_SESSION),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(n) => Err(format!("{field}: {n} is outside 1..={max}")),
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Echoes every stream that arrives on `incoming`, after the peer's FIN.
    pub fn echo(mut incoming: mpsc::UnboundedReceiver<Stream>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            while let Some(mut s) = incoming.recv().await {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    s.read_to_end(&mut buf).await.unwrap();
                    s.write_all(&buf).await.unwrap();
                    s.shutdown().await.unwrap();
                });
            }
        })
    }

    /// Opens a stream on `h`, sends 100 000 + `i` bytes of `i`, half-closes (twice: the
    /// second is harmless) and checks that the echo brings all of it back.
    pub async fn echo_round_trip(h: SessionHandle, i: u8) {
        let mut s = h.open().await.unwrap();
        let data = vec![i; 100_000 + i as usize];
        s.write_all(&data).await.unwrap();
        s.shutdown().await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, data);
    }

    /// Kills `h` with a stream open on it: the stream ends instead of hanging, and new
    /// opens fail.
    pub async fn kill_ends_streams(h: &SessionHandle) {
        let mut idle = h.open().await.unwrap();
        idle.write_all(b"x").await.unwrap();
        assert_eq!(h.open_streams(), 1);
        h.kill();
        h.closed().await;
        assert!(h.is_closed());
        let mut buf = [0u8; 8];
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), idle.read(&mut buf)).await;
        assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?}");
        assert!(h.open().await.is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn streams_both_ways_with_half_close_and_kill() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let client = yamux(a, Role::Client);
        let server = yamux(b, Role::Server);
        let echo = testing::echo(server.incoming);
        let tasks: Vec<_> = (0..20u8)
            .map(|i| tokio::spawn(testing::echo_round_trip(client.handle.clone(), i)))
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        testing::kill_ends_streams(&client.handle).await;
        echo.abort();
    }

    /// A socket whose reads and writes all fail with `errno` once `broken` is set, as a
    /// TCP socket does once the kernel gave up on the peer.
    struct Breakable {
        inner: tokio::io::DuplexStream,
        broken: Arc<std::sync::atomic::AtomicBool>,
        errno: i32,
    }

    impl Breakable {
        fn check(&self) -> io::Result<()> {
            if self.broken.load(Ordering::SeqCst) {
                Err(io::Error::from_raw_os_error(self.errno))
            } else {
                Ok(())
            }
        }
    }

    impl AsyncRead for Breakable {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            self.check()?;
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Breakable {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.check()?;
            Pin::new(&mut self.inner).poll_write(cx, buf)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.check()?;
            Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// Both ends of a yamux session (the client's socket breakable with `errno`) with
    /// their control loops running; keepalive every 20 ms, timeout far away.
    async fn controlled(
        errno: i32,
    ) -> (
        Arc<std::sync::atomic::AtomicBool>,
        [(SessionHandle, tokio::task::JoinHandle<ControlEnd>); 2],
    ) {
        use crate::control::{self, Keepalive};
        let (a, b) = tokio::io::duplex(64 * 1024);
        let broken = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let client = yamux(
            Breakable {
                inner: a,
                broken: broken.clone(),
                errno,
            },
            Role::Client,
        );
        let mut server = yamux(b, Role::Server);
        let ka = Keepalive {
            interval: std::time::Duration::from_millis(20),
            timeout: std::time::Duration::from_secs(30),
        };
        let run = |s: Stream| {
            let (cmd_tx, cmd_rx) = mpsc::channel(1);
            let (ev_tx, _ev_rx) = mpsc::unbounded_channel();
            tokio::spawn(async move {
                let end = control::run(s, ka, cmd_rx, ev_tx).await;
                drop(cmd_tx);
                end
            })
        };
        let c = run(client.handle.open().await.unwrap());
        let s = run(server.incoming.recv().await.unwrap());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!c.is_finished() && !s.is_finished());
        (broken, [(client.handle, c), (server.handle, s)])
    }

    #[tokio::test]
    async fn a_connection_that_timed_out_is_the_reason_not_the_closed_control_stream() {
        let (broken, [(client, c), _server]) = controlled(libc::ETIMEDOUT).await;
        broken.store(true, Ordering::SeqCst);
        let end = tokio::time::timeout(std::time::Duration::from_secs(5), c)
            .await
            .expect("the control loop noticed the broken connection")
            .unwrap();
        // What the control loop alone saw: its stream closed or failed.
        assert!(
            matches!(end, ControlEnd::PeerClosed | ControlEnd::Failed(_)),
            "{end:?}"
        );
        let end = client.end_reason(end).await;
        assert_eq!(end.label(), "connection_timeout");
        let text = end.to_string();
        assert!(
            text.starts_with(
                "tunnel connection timed out (no acknowledgement from the peer through all of \
                 TCP's retransmissions): "
            ) && text.contains("os error 110"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_reset_connection_is_named_and_a_closed_one_is_not_a_failure() {
        let (broken, [(client, c), (server, s)]) = controlled(libc::ECONNRESET).await;
        broken.store(true, Ordering::SeqCst);
        let end = client.end_reason(c.await.unwrap()).await;
        assert_eq!(end.label(), "connection_failed", "{end}");
        assert!(end.to_string().contains("os error 104"), "{end}");
        // The other end only saw the connection close: that is the peer closing.
        let end = server.end_reason(s.await.unwrap()).await;
        assert_eq!(end, ControlEnd::PeerClosed);

        // A session we kill ourselves is no failure either, on both ends.
        let (_, [(client, c), (server, s)]) = controlled(libc::ETIMEDOUT).await;
        client.kill();
        for (h, t) in [(client, c), (server, s)] {
            let end = h.end_reason(t.await.unwrap()).await;
            assert_eq!(end, ControlEnd::PeerClosed);
        }
    }

    #[test]
    fn quic_ends_are_told_apart() {
        use quinn::ConnectionError as E;
        let end = quic_failure(&E::TimedOut).expect("a timeout is a failure");
        assert_eq!(
            end.to_string(),
            "tunnel connection timed out (nothing from the peer within the QUIC idle timeout): timed out"
        );
        assert_eq!(
            quic_failure(&E::Reset).map(|e| e.label()),
            Some("connection_failed")
        );
        assert_eq!(quic_failure(&E::LocallyClosed), None);
    }
}
