//! Idle streams must be cheap (issue 5: 10 000 idle streams, at most 16 KiB resident per
//! stream across both relays). A spliced stream that is idle holds no copy buffer: the
//! splice takes one from a shared pool only while a read can fill it.
//!
//! The `#[ignore]`d tests measure resident memory and print bytes per stream:
//! `cargo test -p routy-tunnel --release --test idle_memory -- --ignored --nocapture --test-threads 1`

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use routy_tunnel::session::{self, Role};
use routy_tunnel::splice::{pool_stats, splice, ByteCounters, PoolStats, POOL_MAX};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

fn noop_counters() -> Arc<ByteCounters> {
    Arc::new(ByteCounters {
        to_service: metrics::Counter::noop(),
        to_client: metrics::Counter::noop(),
        also: None,
    })
}

/// Resident memory of this process, bytes.
fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib * 1024
}

/// Bytes sent each way on every stream before it goes idle: two full copy buffers, so
/// every page of a buffer that stays with a stream would be resident.
const PAYLOAD: usize = 32 * 1024;

/// Streams held through both relays. The apps' ends are Unix socket pairs (their buffers
/// live in the kernel, not in this process), four descriptors per stream, so the count
/// stays below the usual descriptor limit; `ROUTY_IDLE_STREAMS` overrides it.
fn relay_streams() -> usize {
    std::env::var("ROUTY_IDLE_STREAMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4_000)
}

/// Sends `PAYLOAD` bytes each way between two ends, concurrently.
async fn exchange<A, B>(a: &mut A, b: &mut B)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let data = vec![0x42u8; PAYLOAD];
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let mut got_a = vec![0u8; PAYLOAD];
    let mut got_b = vec![0u8; PAYLOAD];
    let (r1, r2, r3, r4) = tokio::join!(
        aw.write_all(&data),
        bw.write_all(&data),
        ar.read_exact(&mut got_a),
        br.read_exact(&mut got_b),
    );
    r1.unwrap();
    r2.unwrap();
    r3.unwrap();
    r4.unwrap();
    assert_eq!(got_a, data);
    assert_eq!(got_b, data);
}

/// The two relays in one process: relay-outer opens a yamux stream and splices a client
/// socket onto it; relay-inner accepts it and splices it onto a service socket.
struct Relays {
    outer: session::SessionHandle,
    inner_incoming: tokio::sync::mpsc::UnboundedReceiver<session::Stream>,
    splices: Vec<tokio::task::JoinHandle<std::io::Result<routy_tunnel::splice::Moved>>>,
}

impl Relays {
    fn new() -> Self {
        let (a, b) = tokio::io::duplex(1 << 20);
        let outer = session::yamux(a, Role::Server);
        let inner = session::yamux(b, Role::Client);
        Relays {
            outer: outer.handle,
            inner_incoming: inner.incoming,
            splices: Vec::new(),
        }
    }

    /// A stream through both relays that has carried `PAYLOAD` each way; returns the
    /// apps' ends (client, service).
    async fn stream(&mut self) -> (UnixStream, UnixStream) {
        let (mut client_app, client_end) = UnixStream::pair().unwrap();
        let (service_end, mut service_app) = UnixStream::pair().unwrap();
        let out = self.outer.open().await.unwrap();
        self.splices
            .push(tokio::spawn(splice(client_end, out, noop_counters())));
        // The first bytes carry the stream's header to the inner relay.
        client_app.write_all(b"hi").await.unwrap();
        let inn = self.inner_incoming.recv().await.unwrap();
        self.splices
            .push(tokio::spawn(splice(inn, service_end, noop_counters())));
        let mut b = [0u8; 2];
        service_app.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"hi");
        exchange(&mut client_app, &mut service_app).await;
        (client_app, service_app)
    }
}

async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// The pool counters are process-wide: tests here run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits until no buffer is checked out (a splice gives its buffer back in the same poll
/// that finds its reader empty, which may come just after the app has seen the bytes).
async fn until_none_checked_out() -> PoolStats {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let st = pool_stats();
        if st.checked_out == 0 || tokio::time::Instant::now() > deadline {
            return st;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_splices_hold_no_buffers() {
    let _serial = SERIAL.lock().await;
    const N: usize = 2_000;
    let start = pool_stats();
    let mut held = Vec::with_capacity(N);
    for i in 0..N {
        let (mut client_app, client_end) = tokio::io::duplex(64 * 1024);
        let (service_end, mut service_app) = tokio::io::duplex(64 * 1024);
        let splice = tokio::spawn(splice(client_end, service_end, noop_counters()));
        // Both directions carry data once, then go idle.
        let data = vec![i as u8; 40_000];
        let mut got = vec![0u8; data.len()];
        client_app.write_all(&data).await.unwrap();
        service_app.read_exact(&mut got).await.unwrap();
        assert_eq!(got, data);
        service_app.write_all(&data).await.unwrap();
        client_app.read_exact(&mut got).await.unwrap();
        assert_eq!(got, data);
        held.push((client_app, service_app, splice));
    }
    let st = until_none_checked_out().await;
    assert_eq!(st.checked_out, 0, "idle splices hold buffers: {st:?}");
    // The buffers went round: a handful were ever allocated for 2000 streams.
    let allocated = st.allocated - start.allocated;
    assert!(
        allocated <= 32,
        "{allocated} buffers allocated for {N} streams"
    );
    assert!(st.pooled <= POOL_MAX + 64, "{st:?}");

    // Every stream still works after idling, and half-close still ends each splice.
    for (mut client_app, mut service_app, splice) in held {
        client_app.write_all(b"again").await.unwrap();
        client_app.shutdown().await.unwrap();
        let mut got = Vec::new();
        service_app.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"again");
        service_app.shutdown().await.unwrap();
        let mut rest = Vec::new();
        client_app.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        let moved = splice.await.unwrap().unwrap();
        assert_eq!(moved.to_service, 40_005);
        assert_eq!(moved.to_client, 40_000);
    }
    assert_eq!(until_none_checked_out().await.checked_out, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_reuses_the_same_buffers() {
    let _serial = SERIAL.lock().await;
    let start = pool_stats();
    let (mut client_app, client_end) = tokio::io::duplex(8 * 1024);
    let (service_end, mut service_app) = tokio::io::duplex(8 * 1024);
    let splice = tokio::spawn(splice(client_end, service_end, noop_counters()));
    const TOTAL: usize = 64 << 20;
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 32 * 1024];
        for _ in 0..TOTAL / chunk.len() {
            client_app.write_all(&chunk).await.unwrap();
        }
        client_app.shutdown().await.unwrap();
        client_app
    });
    let mut n = 0usize;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let k = service_app.read(&mut buf).await.unwrap();
        if k == 0 {
            break;
        }
        assert!(buf[..k].iter().all(|b| *b == 7));
        n += k;
    }
    assert_eq!(n, TOTAL);
    let _client_app = writer.await.unwrap();
    service_app.shutdown().await.unwrap();
    drop(service_app);
    let moved = splice.await.unwrap().unwrap();
    assert_eq!(moved.to_service, TOTAL as u64);
    let st = until_none_checked_out().await;
    assert_eq!(st.checked_out, 0);
    // Thousands of chunks, a few buffers: nothing is allocated per chunk.
    let allocated = st.allocated - start.allocated;
    assert!(allocated <= 8, "{allocated} buffers allocated for 64 MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: prints resident bytes per idle stream"]
async fn measure_idle_yamux_streams() {
    const N: usize = 10_000;
    let (a, b) = tokio::io::duplex(1 << 20);
    let outer = session::yamux(a, Role::Server);
    let mut inner = session::yamux(b, Role::Client);
    settle().await;
    let before = rss();
    let mut held = Vec::with_capacity(2 * N);
    for _ in 0..N {
        let mut s = outer.handle.open().await.unwrap();
        s.write_all(b"hi").await.unwrap();
        let mut t = inner.incoming.recv().await.unwrap();
        let mut buf = [0u8; 2];
        t.read_exact(&mut buf).await.unwrap();
        exchange(&mut s, &mut t).await;
        // Read once more, finding nothing, as a splice does: yamux frees a stream's last
        // received chunk only on the read after it was drained, so an end that stops
        // reading right after the data keeps up to one frame (16 KiB) of it.
        for end in [&mut s, &mut t] {
            let mut one = [0u8; 1];
            assert!(end.read(&mut one).now_or_never().is_none());
        }
        held.push(s);
        held.push(t);
    }
    settle().await;
    let after = rss();
    println!(
        "yamux only: {N} idle stream pairs after {PAYLOAD} bytes each way and a read that \
         found nothing: \
         {} bytes resident per stream (both ends)",
        after.saturating_sub(before) / N as u64
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: prints resident bytes per idle stream"]
async fn measure_idle_streams_through_both_relays() {
    let n = relay_streams();
    let mut relays = Relays::new();
    settle().await;
    let before = rss();
    let mut apps = Vec::with_capacity(n);
    for _ in 0..n {
        apps.push(relays.stream().await);
    }
    settle().await;
    let after = rss();
    println!(
        "through both relays (yamux + a splice on each side): {n} idle streams after \
         {PAYLOAD} bytes each way: {} bytes resident per stream",
        after.saturating_sub(before) / n as u64
    );
    drop(apps);
}
