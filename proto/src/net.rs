//! Socket options on the tunnel and data sockets, and the read-ahead under the tunnel's TLS.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpStream;

/// Sets what every tunnel socket needs: no Nagle delay, TCP keepalive probes so a NAT
/// keeps the mapping and a dead peer is noticed by the kernel, and TCP_USER_TIMEOUT so
/// unacknowledged data fails the socket instead of retrying for many minutes.
pub fn tune_tunnel_socket(s: &TcpStream, keepalive: Duration, user_timeout: Duration) {
    let sock = SockRef::from(s);
    let ka = TcpKeepalive::new()
        .with_time(keepalive)
        .with_interval(keepalive)
        .with_retries(3);
    if let Err(e) = s.set_nodelay(true) {
        tracing::debug!(error = %e, "TCP_NODELAY not set");
    }
    if let Err(e) = sock.set_tcp_keepalive(&ka) {
        tracing::debug!(error = %e, "TCP keepalive not set");
    }
    if let Err(e) = sock.set_tcp_user_timeout(Some(user_timeout)) {
        tracing::debug!(error = %e, "TCP_USER_TIMEOUT not set");
    }
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
