//! The yamux stall under symmetric back-pressure (rust-yamux #227) must not happen to
//! us: many streams saturated in both directions at once over a TCP connection with small
//! socket buffers, for long enough that yamux's own 10 s pings fire several times. Any
//! stream that stops moving for 20 s fails the test.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use routy_tunnel::lanes;
use routy_tunnel::session::{self, Role, Stream};
use socket2::{Domain, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const STREAMS: usize = 16;
const RUN_FOR: Duration = Duration::from_secs(25);
const STALL: Duration = Duration::from_secs(20);

fn small_socket() -> Socket {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.set_send_buffer_size(64 * 1024).unwrap();
    s.set_recv_buffer_size(64 * 1024).unwrap();
    s
}

async fn tcp_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
    let l = small_socket();
    l.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    l.listen(1).unwrap();
    let addr = l.local_addr().unwrap().as_socket().unwrap();
    l.set_nonblocking(true).unwrap();
    let listener = tokio::net::TcpListener::from_std(l.into()).unwrap();
    let c = small_socket();
    c.set_nonblocking(true).unwrap();
    let _ = c.connect(&addr.into());
    let client = tokio::net::TcpStream::from_std(c.into()).unwrap();
    let (server, _) = listener.accept().await.unwrap();
    client.writable().await.unwrap();
    (client, server)
}

/// Writes and reads bulk on one stream until told to stop; counts bytes read.
async fn pump(stream: Stream, progress: Arc<AtomicU64>, until: Instant) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        let chunk = vec![0x5au8; 32 * 1024];
        while Instant::now() < until {
            if wr.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = wr.shutdown().await;
    });
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match rd.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                progress.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
    let _ = writer.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_streams_saturated_both_ways_never_stall() {
    let (a, b) = tcp_pair().await;
    let client = session::yamux(a, Role::Client);
    let mut server = session::yamux(b, Role::Server);
    let until = Instant::now() + RUN_FOR;
    let counters = counters();

    let mut tasks = Vec::new();
    for i in 0..STREAMS {
        let s = client.handle.open().await.unwrap();
        tasks.push(tokio::spawn(pump(s, counters[i].clone(), until)));
        let s = server.incoming.recv().await.unwrap();
        tasks.push(tokio::spawn(pump(s, counters[STREAMS + i].clone(), until)));
    }
    watch(&counters, until).await;
    for t in tasks {
        tokio::time::timeout(STALL, t)
            .await
            .expect("stream did not finish")
            .unwrap();
    }
    report(&counters);
}

/// The same in the relays' layout: each end of the session, with its driver and all its
/// streams, on its own data-path thread, a single-threaded runtime (`lanes`).
#[test]
fn on_data_path_threads_too() {
    lanes::init(2, "saturation").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (a, b) = tcp_pair().await;
        let (a, b) = (a.into_std().unwrap(), b.into_std().unwrap());
        let until = Instant::now() + RUN_FOR;
        let counters = counters();
        let ends = [(a, Role::Client), (b, Role::Server)].map(|(sock, role)| {
            let counters = counters.clone();
            lanes::spawn_connection(async move {
                let lane = lanes::current().expect("on a lane");
                let sock = tokio::net::TcpStream::from_std(sock).unwrap();
                let mut session = session::yamux(sock, role);
                let mut tasks = Vec::new();
                for i in 0..STREAMS {
                    let s = match role {
                        Role::Client => session.handle.open().await.unwrap(),
                        Role::Server => session.incoming.recv().await.unwrap(),
                    };
                    let c = counters[i + if role == Role::Server { STREAMS } else { 0 }].clone();
                    tasks.push(tokio::spawn(pump(s, c, until)));
                }
                tokio::time::sleep_until(until.into()).await;
                for t in tasks {
                    tokio::time::timeout(STALL, t)
                        .await
                        .expect("stream did not finish")
                        .unwrap();
                }
                lane.index()
            })
        });
        watch(&counters, until).await;
        let mut on = Vec::new();
        for end in ends {
            on.push(tokio::time::timeout(STALL * 2, end).await.unwrap().unwrap());
        }
        assert_ne!(on[0], on[1], "each end on its own data-path thread");
        report(&counters);
    });
}

fn counters() -> Vec<Arc<AtomicU64>> {
    (0..STREAMS * 2).map(|_| Arc::default()).collect()
}

/// Fails as soon as any stream end has read nothing for [`STALL`], until `until`.
async fn watch(counters: &[Arc<AtomicU64>], until: Instant) {
    let mut last: Vec<(u64, Instant)> = vec![(0, Instant::now()); counters.len()];
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(500)).await;
        for (i, c) in counters.iter().enumerate() {
            let now = c.load(Ordering::Relaxed);
            if now != last[i].0 {
                last[i] = (now, Instant::now());
            }
            assert!(
                last[i].1.elapsed() < STALL,
                "stream end {i} stalled at {now} bytes for {:?}",
                last[i].1.elapsed()
            );
        }
    }
}

fn report(counters: &[Arc<AtomicU64>]) {
    let total: u64 = counters.iter().map(|c| c.load(Ordering::Relaxed)).sum();
    assert!(total > 0);
    eprintln!("moved {} MiB in total", total >> 20);
}
