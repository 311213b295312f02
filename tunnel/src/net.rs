//! Socket options on the tunnel and data sockets, and the read-ahead under the tunnel's TLS.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpStream;

use crate::control::Keepalive;

/// Sets what every tunnel socket needs: no Nagle delay, TCP keepalive probes so a NAT
/// keeps the mapping, and a cap on TCP's retransmission backoff so the tunnel resends
/// within [`Keepalive::rto_max`] once a link outage ends (see [`cap_rto`]).
///
/// Deliberately no TCP_USER_TIMEOUT: the control stream's keepalive decides when a peer
/// is dead (see [`crate::control`]), and the kernel's timer could only end sessions the
/// keepalive would keep. It also misfires: while the local link is down a send fails at
/// once and TCP retries with its zero-window probe timer, whose start time is not always
/// cleared when the data then goes out; a later outage is then measured from that old
/// start and the socket fails with ETIMEDOUT within a fraction of a second. Measured on
/// Linux 6.18 with two sockets across a veth pair, the link down 3 s and up 3 s: with a
/// user timeout of 8 s the socket failed 2.3 s into the second outage, with 16 s 0.3 s
/// into the fourth; without one it survived every flap (the tunnel with
/// `timeout: 6s` died on the second to sixth flap, see `tests/tests/flaps.rs`).
pub fn tune_tunnel_socket(s: &TcpStream, ka: Keepalive) {
    let sock = SockRef::from(s);
    let probes = TcpKeepalive::new()
        .with_time(ka.interval)
        .with_interval(ka.interval)
        .with_retries(3);
    if let Err(e) = s.set_nodelay(true) {
        tracing::debug!(error = %e, "TCP_NODELAY not set");
    }
    if let Err(e) = sock.set_tcp_keepalive(&probes) {
        tracing::debug!(error = %e, "TCP keepalive not set");
    }
    if let Err(e) = cap_rto(s, ka.rto_max()) {
        tracing::debug!(error = %e, "TCP_RTO_MAX_MS not set (Linux 6.15 or later has it)");
    }
}

/// Linux's TCP_RTO_MAX_MS socket option (6.15 and later), not yet in `libc`.
#[cfg(target_os = "linux")]
const TCP_RTO_MAX_MS: libc::c_int = 44;

/// Caps TCP's retransmission timeout at `max` (the kernel takes 1 s to 120 s; 120 s is
/// its default).
///
/// TCP doubles the timeout on every retransmission that goes unanswered, so after an
/// outage of n seconds the next attempt can come about n seconds after the link is back,
/// with the control stream's Pings stuck behind it. Measured across a veth pair with
/// every packet dropped for 7 s: the first resend after the drop ended came more than
/// 4 s later without a cap, and 0.9 s later with a cap of 1 s. The cap also scales
/// TCP's own give-up time (15 retransmissions, `tcp_retries2`): measured 15 s at a cap
/// of 1 s (about 39 s at 3 s by the kernel's formula, 924 s uncapped);
/// [`Keepalive::rto_max`] keeps it well past the keepalive timeout.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn cap_rto(s: &TcpStream, max: Duration) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let ms = libc::c_int::try_from(max.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: the descriptor is the open socket `s` borrows; the option value is a
    // c_int that lives across the call, and its size is passed with it.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            TCP_RTO_MAX_MS,
            (&ms as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn cap_rto(_: &TcpStream, _: Duration) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// Sets TCP_NODELAY on a data socket (client or service side).
pub fn tune_data_socket(s: &TcpStream) {
    if let Err(e) = s.set_nodelay(true) {
        tracing::debug!(error = %e, "TCP_NODELAY not set");
    }
}

/// Bytes [`ReadAhead`] asks the socket for at once.
pub const READ_AHEAD: usize = 64 * 1024;

/// A socket whose small reads are served from one large read.
///
/// rustls asks its socket for at most 4 KiB at a time, so a 16 KiB TLS record cost four
/// `recvfrom` calls; under the tunnel's TLS this reads up to [`READ_AHEAD`] bytes per
/// call and hands them out from memory. Writes pass straight through.
#[derive(Debug)]
pub struct ReadAhead<T> {
    inner: T,
    buf: Box<[u8]>,
    pos: usize,
    len: usize,
}

impl<T> ReadAhead<T> {
    /// Wraps `inner`.
    pub fn new(inner: T) -> Self {
        ReadAhead {
            inner,
            buf: vec![0u8; READ_AHEAD].into_boxed_slice(),
            pos: 0,
            len: 0,
        }
    }

    /// The wrapped socket; bytes read ahead and not yet handed out are dropped.
    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos == this.len {
            if out.remaining() >= this.buf.len() {
                // A read at least as large as ours: no point copying twice.
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            let mut rb = ReadBuf::new(&mut this.buf);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            this.pos = 0;
            this.len = rb.filled().len();
        }
        let n = (this.len - this.pos).min(out.remaining());
        out.put_slice(&this.buf[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

/// Implements `tokio::io::AsyncWrite` for a wrapper `$ty<T>` (one type parameter) by
/// passing every call to its field `$field`: for adapters that change only how a stream
/// is read.
#[macro_export]
macro_rules! delegate_async_write {
    ($ty:ident, $field:ident) => {
        impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $ty<T> {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().$field).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().$field).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.$field.is_write_vectored()
            }

            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().$field).poll_flush(cx)
            }

            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().$field).poll_shutdown(cx)
            }
        }
    };
}

delegate_async_write!(ReadAhead, inner);

/// Default listen backlog of the tunnel port and the listeners: the kernel caps it at
/// `net.core.somaxconn` (4096 on current kernels).
pub const DEFAULT_BACKLOG: u32 = 4096;

/// A TCP listener on `addr` with `backlog` connections queued for accept at most (the
/// kernel caps it at `net.core.somaxconn`); `SO_REUSEADDR` as tokio's `bind` sets it.
/// Call from inside a tokio runtime.
pub fn listen(addr: std::net::SocketAddr, backlog: u32) -> io::Result<tokio::net::TcpListener> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    tokio::net::TcpListener::from_std(sock.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn small_reads_see_every_byte_in_order_and_writes_pass_through() {
        let (a, mut b) = tokio::io::duplex(256 * 1024);
        let mut ra = ReadAhead::new(a);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let expect = data.clone();
        let writer = tokio::spawn(async move {
            b.write_all(&data).await.unwrap();
            let mut back = [0u8; 5];
            b.read_exact(&mut back).await.unwrap();
            assert_eq!(&back, b"hello");
            drop(b);
        });
        let mut got = Vec::new();
        let mut small = [0u8; 4096];
        let mut big = vec![0u8; READ_AHEAD * 2];
        let mut turn = 0;
        while got.len() < expect.len() {
            turn += 1;
            let n = if turn % 3 == 0 {
                ra.read(&mut big).await.unwrap()
            } else {
                ra.read(&mut small[..(turn % 4096) + 1]).await.unwrap()
            };
            assert!(n > 0);
            got.extend_from_slice(if turn % 3 == 0 {
                &big[..n]
            } else {
                &small[..n]
            });
        }
        assert_eq!(got, expect);
        ra.write_all(b"hello").await.unwrap();
        writer.await.unwrap();
        assert_eq!(ra.read(&mut small).await.unwrap(), 0);
    }
}
