//! Splicing a client socket and a tunnel stream together, both directions, with
//! half-close preserved and byte counters that move while the stream runs.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Size of each direction's copy buffer, allocated once per stream.
pub const COPY_BUF: usize = 16 * 1024;

/// Where the bytes of a splice are counted as they pass: usually the
/// `routy_stream_bytes_total` counters of one listener or service.
#[derive(Debug, Clone)]
pub struct ByteCounters {
    /// Bytes from the client side (relay-outer's listener) toward the service.
    pub to_service: metrics::Counter,
    /// Bytes from the service back toward the client.
    pub to_client: metrics::Counter,
}

impl ByteCounters {
    /// The registered byte counters with these labels (plus `direction`).
    pub fn registered(labels: &[(&'static str, String)]) -> Self {
        let with = |dir: &'static str| {
            let mut l: Vec<metrics::Label> = labels
                .iter()
                .map(|(k, v)| metrics::Label::new(*k, v.clone()))
                .collect();
            l.push(metrics::Label::new("direction", dir));
            metrics::counter!(crate::metrics::STREAM_BYTES, l)
        };
        ByteCounters {
            to_service: with("to_service"),
            to_client: with("to_client"),
        }
    }
}

/// What a finished splice moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    /// Bytes toward the service.
    pub to_service: u64,
    /// Bytes toward the client.
    pub to_client: u64,
}

/// Copies `client` <-> `service` until both directions have ended. EOF on one side is
/// passed on as a shutdown of the other side's write half, and the opposite direction
/// keeps flowing. Every chunk is added to `counters` as it passes.
pub async fn splice<C, S>(client: C, service: S, counters: Arc<ByteCounters>) -> io::Result<Moved>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut client = Counted {
        inner: client,
        counter: counters.clone(),
        to_service: true,
    };
    let mut service = Counted {
        inner: service,
        counter: counters,
        to_service: false,
    };
    let (to_service, to_client) =
        tokio::io::copy_bidirectional_with_sizes(&mut client, &mut service, COPY_BUF, COPY_BUF)
            .await?;
    Ok(Moved {
        to_service,
        to_client,
    })
}

/// Counts bytes read from `inner` into one of the counters.
struct Counted<T> {
    inner: T,
    counter: Arc<ByteCounters>,
    to_service: bool,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            let c = if self.to_service {
                &self.counter.to_service
            } else {
                &self.counter.to_client
            };
            c.increment(n);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn half_close_keeps_the_other_direction_and_counts() {
        let (client_app, client_end) = tokio::io::duplex(4096);
        let (service_end, service_app) = tokio::io::duplex(4096);
        let to_client = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counters = Arc::new(ByteCounters {
            to_service: metrics::Counter::noop(),
            to_client: metrics::Counter::from_arc(to_client.clone()),
        });
        let c2 = counters.clone();
        let task = tokio::spawn(async move { splice(client_end, service_end, c2).await });

        let (mut cr, mut cw) = tokio::io::split(client_app);
        let (mut sr, mut sw) = tokio::io::split(service_app);
        cw.write_all(b"request").await.unwrap();
        cw.shutdown().await.unwrap();
        let mut got = Vec::new();
        sr.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request");
        // The client has finished sending; the service can still answer at length.
        let answer = vec![9u8; 100_000];
        let reader = tokio::spawn(async move {
            let mut back = Vec::new();
            cr.read_to_end(&mut back).await.unwrap();
            back
        });
        sw.write_all(&answer).await.unwrap();
        sw.shutdown().await.unwrap();
        assert_eq!(reader.await.unwrap(), answer);
        let moved = task.await.unwrap().unwrap();
        assert_eq!(
            moved,
            Moved {
                to_service: 7,
                to_client: 100_000
            }
        );
        assert_eq!(
            to_client.load(std::sync::atomic::Ordering::Relaxed),
            100_000
        );
    }
}
