//! The socket adapter under the yamux connection: a write buffer and a kill switch.
//!
//! yamux stops reading its socket while a frame it wants to write cannot be written; if
//! both ends block on writes at once they never read again (rust-yamux #227:
//! reproduced here with 16 bulk streams both ways over 64 KiB socket buffers, stalled for
//! good in 2 of 5 runs). Here writes always land in a buffer that each
//! `poll_flush` drains as far as the socket takes it, so the connection task keeps reading.
//! The buffer's cap exceeds everything the peer's windows allow in flight, so in practice
//! `poll_write` never waits.
//!
//! A failed socket write is not reported at once: the peer may have sent a reason before
//! it closed (a TLS alert saying our certificate was refused), and yamux, which writes
//! before it reads, would otherwise only ever see "broken pipe". So the write error is
//! held, later writes are dropped, and the read side reports the peer's reason or, once
//! there is nothing left to read, the write error.
//!
//! The kill switch turns every later read or write into an error, which makes yamux close
//! every stream of the connection at once: this is how a dead session is torn down.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::task::AtomicWaker;
use tokio::io::ReadBuf;

/// Shared switch that aborts a [`BufferedIo`] from outside its task; it also counts the
/// polls of the task that owns the connection (see [`KillSwitch::next_round`]).
#[derive(Debug, Default)]
pub struct KillSwitch {
    killed: AtomicBool,
    waker: AtomicWaker,
    round: AtomicU64,
}

impl KillSwitch {
    /// Called by the task that owns the connection at the start of each poll. While
    /// several streams are busy, a flush asked for during one poll is carried out in the
    /// next one, so the frames of every stream that became ready in between leave in one
    /// socket write (yamux flushes after each frame). See [`Batching`].
    pub fn next_round(&self) {
        self.round.fetch_add(1, Ordering::Relaxed);
    }

    fn round(&self) -> u64 {
        self.round.load(Ordering::Relaxed)
    }

    /// Aborts the connection: its task wakes up and sees an error on its socket.
    pub fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        self.waker.wake();
    }

    /// Whether [`KillSwitch::kill`] was called.
    pub fn is_killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }
}

/// Size of one buffer chunk.
const CHUNK: usize = 64 * 1024;

/// Empty chunks kept for reuse after a burst (1 MiB), so a busy connection does not
/// allocate, fault in and free pages over and over.
const FREE_MAX: usize = 16;

/// Chunks handed to one vectored write.
const MAX_SLICES: usize = 32;

/// Buffered bytes from which a flush is carried out at once instead of in the next round.
const FLUSH_NOW: usize = 256 * 1024;

/// What a flush request should do (see [`Batching`]).
#[derive(Debug, PartialEq, Eq)]
enum FlushNow {
    /// Write now.
    Now,
    /// Put off to the next round (wake the task for it).
    Later,
    /// Already put off in this round.
    Wait,
}

/// Decides whether a flush is written now or in the driver's next round.
///
/// Putting a flush off costs one trip through the scheduler, which is pure latency when
/// one stream talks alone (a single `pgbench` client: 0.62x -> 0.53x direct when every
/// flush was put off). So it is done only while it pays: batching turns on when one round
/// asks for a second flush after data was written (several streams' frames in one poll),
/// and off when a put-off flush gained nothing by waiting.
#[derive(Debug, Default)]
struct Batching {
    on: bool,
    /// The round in which a flush was put off, and the bytes buffered then.
    deferred: Option<(u64, usize)>,
    /// The round in which bytes were last written.
    wrote_in: u64,
}

impl Batching {
    fn on_flush(&mut self, round: u64, pending: usize, big: bool) -> FlushNow {
        match self.deferred {
            Some((r, _)) if r == round && !big => return FlushNow::Wait,
            Some((_, then)) => {
                // Waiting paid if more frames joined the write.
                self.on = pending > then;
                self.deferred = None;
            }
            None => {
                if self.wrote_in == round {
                    // A second flush with new data in one round: streams are busy at once.
                    self.on = true;
                }
                if self.on && !big {
                    self.deferred = Some((round, pending));
                    return FlushNow::Later;
                }
            }
        }
        self.wrote_in = round;
        FlushNow::Now
    }
}

/// A tokio socket seen as a futures-io socket with a non-blocking write buffer.
///
/// The buffer is a queue of fixed 64 KiB chunks: appending never moves what is already
/// buffered, and draining hands the chunks to one vectored write (rustls cuts full-size
/// records across chunk boundaries, so small frames are not sealed one by one).
pub struct BufferedIo<T> {
    inner: T,
    chunks: VecDeque<Box<[u8]>>,
    /// Offset of the first unwritten byte in the front chunk.
    head: usize,
    /// Bytes used in the back chunk.
    tail: usize,
    /// Bytes buffered and not yet written.
    len: usize,
    free: Vec<Box<[u8]>>,
    cap: usize,
    kill: Arc<KillSwitch>,
    write_err: Option<io::Error>,
    batch: Batching,
}

impl<T> BufferedIo<T> {
    /// Wraps `inner`; `cap` bounds the buffered bytes.
    pub fn new(inner: T, cap: usize, kill: Arc<KillSwitch>) -> Self {
        BufferedIo {
            inner,
            chunks: VecDeque::new(),
            head: 0,
            tail: 0,
            len: 0,
            free: Vec::new(),
            cap,
            kill,
            write_err: None,
            batch: Batching::default(),
        }
    }

    fn pending(&self) -> usize {
        self.len
    }

    /// Appends `data` behind what is buffered.
    fn append(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.chunks.is_empty() || self.tail == CHUNK {
                let chunk = self
                    .free
                    .pop()
                    .unwrap_or_else(|| vec![0u8; CHUNK].into_boxed_slice());
                self.chunks.push_back(chunk);
                self.tail = 0;
                if self.chunks.len() == 1 {
                    self.head = 0;
                }
            }
            let Some(back) = self.chunks.back_mut() else {
                return;
            };
            let n = data.len().min(CHUNK - self.tail);
            back[self.tail..self.tail + n].copy_from_slice(&data[..n]);
            self.tail += n;
            self.len += n;
            data = &data[n..];
        }
    }

    /// Drops `n` written bytes from the front.
    fn consume(&mut self, mut n: usize) {
        self.len -= n.min(self.len);
        while n > 0 {
            let end = if self.chunks.len() == 1 {
                self.tail
            } else {
                CHUNK
            };
            let k = n.min(end - self.head);
            self.head += k;
            n -= k;
            if self.head == end {
                let Some(chunk) = self.chunks.pop_front() else {
                    break;
                };
                if self.free.len() < FREE_MAX {
                    self.free.push(chunk);
                }
                self.head = 0;
                if self.chunks.is_empty() {
                    self.tail = 0;
                }
            }
        }
    }

    fn take_write_err(&mut self) -> io::Error {
        let e = self
            .write_err
            .take()
            .unwrap_or_else(|| io::ErrorKind::BrokenPipe.into());
        // Keep failing after the first report.
        self.write_err = Some(io::Error::new(e.kind(), e.to_string()));
        e
    }

    fn check_kill(&self, cx: &mut Context<'_>) -> io::Result<()> {
        self.kill.waker.register(cx.waker());
        if self.kill.is_killed() {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "session closed locally",
            ));
        }
        Ok(())
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> BufferedIo<T> {
    /// Writes buffered bytes until the buffer is empty or the socket would block.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.len > 0 && self.write_err.is_none() {
            let last = self.chunks.len() - 1;
            let mut slices = [io::IoSlice::new(&[]); MAX_SLICES];
            let mut k = 0;
            for (i, chunk) in self.chunks.iter().enumerate().take(MAX_SLICES) {
                let from = if i == 0 { self.head } else { 0 };
                let to = if i == last { self.tail } else { CHUNK };
                slices[k] = io::IoSlice::new(&chunk[from..to]);
                k += 1;
            }
            match Pin::new(&mut self.inner).poll_write_vectored(cx, &slices[..k]) {
                Poll::Ready(Ok(0)) => self.write_err = Some(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => self.consume(n),
                Poll::Ready(Err(e)) => self.write_err = Some(e),
                Poll::Pending => return Poll::Pending,
            }
        }
        if self.write_err.is_some() {
            // Nothing will be written any more: let the buffer go.
            self.consume(self.len);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: tokio::io::AsyncRead + Unpin> futures::io::AsyncRead for BufferedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_kill(cx)?;
        let mut rb = ReadBuf::new(out);
        match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) if rb.filled().is_empty() && this.write_err.is_some() => {
                Poll::Ready(Err(this.take_write_err()))
            }
            Poll::Ready(Ok(())) => Poll::Ready(Ok(rb.filled().len())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending if this.write_err.is_some() => Poll::Ready(Err(this.take_write_err())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> futures::io::AsyncWrite for BufferedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_kill(cx)?;
        if this.write_err.is_some() {
            // The socket is broken; the read side reports why. Drop what is written.
            return Poll::Ready(Ok(data.len()));
        }
        if this.pending() >= this.cap {
            // Over the cap: only now does a write wait for the socket.
            match this.drain(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending if this.pending() >= this.cap => return Poll::Pending,
                Poll::Pending => {}
            }
        }
        let room = this.cap.saturating_sub(this.pending());
        let n = data.len().min(room);
        this.append(&data[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_kill(cx)?;
        // Round 0: no task counts rounds (see `next_round`), so nothing is put off.
        let round = this.kill.round();
        if round > 0 && this.pending() > 0 && this.write_err.is_none() {
            let pending = this.pending();
            match this.batch.on_flush(round, pending, pending >= FLUSH_NOW) {
                FlushNow::Later => {
                    // The task is woken for the next round, after the other tasks.
                    cx.waker().wake_by_ref();
                    return Poll::Ready(Ok(()));
                }
                FlushNow::Wait => return Poll::Ready(Ok(())),
                FlushNow::Now => {}
            }
        }
        match this.drain(cx) {
            Poll::Ready(Ok(())) if this.write_err.is_some() => Poll::Ready(Ok(())),
            Poll::Ready(Ok(())) => match Pin::new(&mut this.inner).poll_flush(cx) {
                Poll::Ready(Err(e)) => {
                    this.write_err = Some(e);
                    Poll::Ready(Ok(()))
                }
                other => other,
            },
            other => other,
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_kill(cx)?;
        match this.drain(cx) {
            Poll::Ready(Ok(())) if this.write_err.is_some() => Poll::Ready(Ok(())),
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_shutdown(cx),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn flushes_are_put_off_only_while_several_streams_are_busy() {
        let mut b = Batching::default();
        // One stream alone: one flush per round, always written at once.
        for round in 1..10 {
            assert_eq!(b.on_flush(round, 100, false), FlushNow::Now);
        }
        // Two frames in one round: the second flush is put off to the next round.
        assert_eq!(b.on_flush(10, 100, false), FlushNow::Now);
        assert_eq!(b.on_flush(10, 200, false), FlushNow::Later);
        assert_eq!(b.on_flush(10, 300, false), FlushNow::Wait);
        // More data joined while waiting: written now, and batching stays on.
        assert_eq!(b.on_flush(11, 900, false), FlushNow::Now);
        assert_eq!(b.on_flush(12, 100, false), FlushNow::Later);
        // Nothing joined: written, and batching turns off.
        assert_eq!(b.on_flush(13, 100, false), FlushNow::Now);
        assert_eq!(b.on_flush(14, 100, false), FlushNow::Now);
        // A big buffer is never held back.
        assert_eq!(b.on_flush(14, 100, false), FlushNow::Later);
        assert_eq!(b.on_flush(14, 1 << 20, true), FlushNow::Now);
    }

    #[tokio::test]
    async fn writes_do_not_wait_for_a_full_socket() {
        // A 64-byte pipe nobody reads: 10 KiB of writes still complete.
        let (a, _b) = tokio::io::duplex(64);
        let mut io = BufferedIo::new(a, 1 << 20, Arc::default());
        for _ in 0..10 {
            io.write_all(&[7u8; 1024]).await.unwrap();
        }
        assert_eq!(io.pending(), 10 * 1024);
        // Flushing moves what the pipe takes and then waits for the reader.
        let r = tokio::time::timeout(std::time::Duration::from_millis(50), io.flush()).await;
        assert!(r.is_err());
        assert_eq!(io.pending(), 10 * 1024 - 64);
    }

    #[tokio::test]
    async fn everything_arrives_in_order_and_kill_aborts() {
        let (a, mut b) = tokio::io::duplex(100);
        let kill = Arc::new(KillSwitch::default());
        let mut io = BufferedIo::new(a, 1 << 20, kill.clone());
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let expect = data.clone();
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; expect.len()];
            tokio::io::AsyncReadExt::read_exact(&mut b, &mut got)
                .await
                .unwrap();
            assert_eq!(got, expect);
        });
        io.write_all(&data).await.unwrap();
        io.flush().await.unwrap();
        reader.await.unwrap();
        kill.kill();
        let err = io.read(&mut [0u8; 4]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
    }

    #[tokio::test]
    async fn a_failed_write_is_reported_by_the_read_side_after_the_peers_last_words() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut io = BufferedIo::new(a, 1 << 20, Arc::default());
        tokio::io::AsyncWriteExt::write_all(&mut b, b"last words")
            .await
            .unwrap();
        drop(b);
        // The write "succeeds" (the error is held) ...
        io.write_all(b"hello").await.unwrap();
        io.flush().await.unwrap();
        // ... the peer's last bytes are still delivered, then the write error.
        let mut buf = [0u8; 32];
        let n = io.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"last words");
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }
}
