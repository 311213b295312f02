//! Bandwidth limits: a byte rate shared by every stream of a listener, a service or a
//! tunnel endpoint, in one direction.
//!
//! A [`Limit`] hands out time, not tokens: each read that passed `n` bytes reserves
//! `n / rate` seconds on the limit's clock, starting where the previous reservation
//! ended (or now, if the limit has been idle, less a burst allowance), and the reader
//! then waits until its reservation's start before reading again. Reservations are
//! served in the order they are made, so streams that share a limit share it evenly,
//! and the rate can change at any time (a reload): the next reservation uses it.
//! [`Throttled`] puts limits on a reader; writes pass through, and TCP's own flow
//! control slows the sender down.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// How much a limit that was idle may let through at once: this much time's worth of
/// bytes.
const BURST: Duration = Duration::from_millis(50);
/// Largest read under a limit: this much time's worth of bytes (at least 1 KiB, at most
/// 64 KiB), so streams take turns in small steps.
const STEP: Duration = Duration::from_millis(20);

/// A byte rate in one direction, shared by the streams it covers.
#[derive(Debug)]
pub struct Limit {
    /// Bytes per second; 0: no limit.
    rate: AtomicU64,
    /// End of the last reservation.
    next_free: Mutex<Option<Instant>>,
    /// Time readers spent waiting, in microseconds.
    waited_us: AtomicU64,
    /// Gauge of the rate and counter of the waits, when registered.
    metrics: Option<(metrics::Gauge, metrics::Counter)>,
}

impl Limit {
    /// A limit of `rate` bytes per second (0: none).
    pub fn new(rate: u64) -> Self {
        Limit {
            rate: AtomicU64::new(rate),
            next_free: Mutex::new(None),
            waited_us: AtomicU64::new(0),
            metrics: None,
        }
    }

    /// A limit reported as `routy_bandwidth_limit_bytes_per_second` and
    /// `routy_bandwidth_throttled_microseconds_total` with these labels (plus `direction`).
    pub fn registered(
        rate: u64,
        labels: &[(&'static str, String)],
        direction: &'static str,
    ) -> Self {
        let mut l: Vec<metrics::Label> = labels
            .iter()
            .map(|(k, v)| metrics::Label::new(*k, v.clone()))
            .collect();
        l.push(metrics::Label::new("direction", direction));
        let gauge = metrics::gauge!(routy_ops::metrics::BANDWIDTH_LIMIT, l.clone());
        let counter = metrics::counter!(routy_ops::metrics::BANDWIDTH_THROTTLED, l);
        gauge.set(rate as f64);
        Limit {
            metrics: Some((gauge, counter)),
            ..Limit::new(rate)
        }
    }

    /// Changes the rate (0: none); streams running under the limit follow from their
    /// next read.
    pub fn set_rate(&self, rate: u64) {
        self.rate.store(rate, Ordering::Relaxed);
        if let Some((g, _)) = &self.metrics {
            g.set(rate as f64);
        }
    }

    /// Books `n` bytes about to be sent and waits until they may go (for a writer that
    /// sends in batches, such as CDC shipping).
    pub async fn pace(&self, n: usize) {
        if let Some(at) = self.reserve(n) {
            tokio::time::sleep_until(at).await;
        }
    }

    /// The rate in bytes per second (0: none).
    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// Seconds readers have waited under this limit.
    pub fn waited(&self) -> Duration {
        Duration::from_micros(self.waited_us.load(Ordering::Relaxed))
    }

    /// The largest read to make now under this limit.
    fn step(&self) -> usize {
        match self.rate() {
            0 => usize::MAX,
            r => ((r as f64 * STEP.as_secs_f64()) as usize).clamp(1024, 64 * 1024),
        }
    }

    /// Accounts `n` bytes that passed; returns when the next read may start (`None`:
    /// at once).
    fn reserve(&self, n: usize) -> Option<Instant> {
        let rate = self.rate();
        if rate == 0 || n == 0 {
            return None;
        }
        let now = Instant::now();
        let cost = Duration::from_secs_f64(n as f64 / rate as f64);
        let mut next = self.next_free.lock().unwrap_or_else(|p| p.into_inner());
        let floor = now.checked_sub(BURST).unwrap_or(now);
        let start = next.map_or(floor, |t| t.max(floor));
        let end = start + cost;
        *next = Some(end);
        // The reader paid for these bytes; it may read again once the clock has
        // caught up with the end of its reservation, less the burst allowance.
        let at = end.checked_sub(BURST).unwrap_or(end);
        (at > now).then(|| {
            let wait = at - now;
            self.waited_us
                .fetch_add(wait.as_micros() as u64, Ordering::Relaxed);
            if let Some((_, c)) = &self.metrics {
                c.increment(wait.as_micros() as u64);
            }
            at
        })
    }
}

/// A reader under zero or more limits (a listener's and a tunnel's, say): it reads at
/// most a step of bytes at a time and waits for the latest of the limits' reservations
/// before the next read. Writes pass straight through.
pub struct Throttled<T> {
    inner: T,
    limits: Vec<Arc<Limit>>,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl<T> Throttled<T> {
    /// `inner` under `limits` (none: it passes straight through).
    pub fn new(inner: T, limits: Vec<Arc<Limit>>) -> Self {
        Throttled {
            inner,
            limits,
            sleep: None,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Throttled<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.limits.is_empty() {
            return Pin::new(&mut this.inner).poll_read(cx, out);
        }
        if let Some(s) = this.sleep.as_mut() {
            ready!(s.as_mut().poll(cx));
            this.sleep = None;
        }
        let step = this
            .limits
            .iter()
            .map(|l| l.step())
            .min()
            .unwrap_or(usize::MAX);
        let n = if out.remaining() > step {
            // Read into the first `step` bytes of the free space only (initialized
            // first, so `advance` may count them; a splice's buffers are already).
            let n = {
                let mut part = ReadBuf::new(out.initialize_unfilled_to(step));
                ready!(Pin::new(&mut this.inner).poll_read(cx, &mut part))?;
                part.filled().len()
            };
            out.advance(n);
            n
        } else {
            let before = out.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, out))?;
            out.filled().len() - before
        };
        let at = this.limits.iter().filter_map(|l| l.reserve(n)).max();
        if let Some(at) = at {
            this.sleep = Some(Box::pin(tokio::time::sleep_until(at)));
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Throttled<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Parses a rate such as `20MiB/s`, `500KB/s` or `1048576/s` (bytes per second; `0/s`:
/// no limit).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let Some(size) = t.strip_suffix("/s") else {
        return Err(format!(
            "{s:?} is not a rate: bytes per second with a unit, e.g. \"20MiB/s\" or \"500KB/s\""
        ));
    };
    routy_ops::units::parse_size(size.trim()).map_err(|e| format!("{s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    proptest::proptest! {
        #[test]
        fn any_rate_text_parses_or_says_why(s in ".{0,40}") {
            if let Err(e) = parse_rate(&s) {
                proptest::prop_assert!(!e.is_empty());
            }
        }
    }

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("20MiB/s").unwrap(), 20 << 20);
        assert_eq!(parse_rate(" 500KB/s ").unwrap(), 500_000);
        assert_eq!(parse_rate("0/s").unwrap(), 0);
        assert!(parse_rate("20MiB").is_err());
        assert!(parse_rate("fast/s").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn one_reader_gets_the_rate() {
        let limit = Arc::new(Limit::new(1 << 20));
        let data = vec![7u8; 4 << 20];
        let mut r = Throttled::new(&data[..], vec![limit.clone()]);
        let t = Instant::now();
        let mut sink = Vec::new();
        r.read_to_end(&mut sink).await.unwrap();
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(sink.len(), data.len());
        assert!(
            (3.8..=4.1).contains(&secs),
            "4 MiB at 1 MiB/s took {secs} s"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn readers_share_a_limit_evenly_and_follow_a_new_rate() {
        let limit = Arc::new(Limit::new(1 << 20));
        let reader = |limit: Arc<Limit>| {
            tokio::spawn(async move {
                let data = vec![1u8; 64 << 20];
                let mut r = Throttled::new(&data[..], vec![limit]);
                let mut buf = vec![0u8; 64 * 1024];
                let mut got = 0usize;
                let until = Instant::now() + Duration::from_secs(4);
                while Instant::now() < until {
                    got += r.read(&mut buf).await.unwrap();
                }
                got
            })
        };
        let (a, b) = (reader(limit.clone()), reader(limit.clone()));
        let (a, b) = (a.await.unwrap() as f64, b.await.unwrap() as f64);
        let total = (a + b) / 4.0 / (1 << 20) as f64;
        assert!((0.95..=1.1).contains(&total), "together {total} MiB/s");
        assert!((a / b - 1.0).abs() < 0.1, "shares {a} and {b}");
        assert!(limit.waited() > Duration::from_secs(3));

        limit.set_rate(4 << 20);
        let c = reader(limit.clone()).await.unwrap() as f64 / 4.0 / (1 << 20) as f64;
        assert!((3.8..=4.3).contains(&c), "after the change {c} MiB/s");
        limit.set_rate(0);
        let t = Instant::now();
        let data = vec![1u8; 64 << 20];
        let mut r = Throttled::new(&data[..], vec![limit.clone()]);
        let mut sink = Vec::new();
        r.read_to_end(&mut sink).await.unwrap();
        assert!(
            t.elapsed() < Duration::from_millis(100),
            "no limit: no wait"
        );
    }
}
