//! Data-path threads ("lanes").
//!
//! Each lane is an OS thread running a single-threaded tokio runtime. A tunnel connection
//! lives on one lane from its handshake to its end: the session driver, and every stream
//! spliced over it, so the bytes of a stream move between the client socket, the yamux
//! driver and the TLS socket without ever waking another thread. relay-outer's listeners
//! accept on lane 0, where the first session goes too. The relay's main runtime keeps
//! the rest (admin endpoint, reloads, CDC).
//!
//! Measured with `bench-tunnel` (2 cores, loopback, Routy TLS against direct, short
//! interleaved runs): new connections/s 0.45-0.48x with everything on tokio's
//! work-stealing runtime, 0.53-0.58x on lanes; 8 bulk streams 0.13x and 0.15-0.17x;
//! `pgbench -S -c16` swings too much run to run to call (0.34-0.46x and 0.43-0.53x).
//! Tasks that hand each frame to each other (a splice and the driver) paid a futex wake
//! and a cross-CPU switch whenever the work-stealing scheduler had put them on
//! different workers; here they never do. Several `connections` to relay-outer are
//! spread over the lanes, so their crypto runs on several cores.
//!
//! Without [`init`] (tests, tools) there are no lanes and everything runs where it is
//! spawned.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::runtime::Handle;
use tokio::task::JoinHandle;

static LANES: OnceLock<Vec<Lane>> = OnceLock::new();

thread_local! {
    /// The index of the lane this thread runs, if it is one.
    static HERE: Cell<Option<usize>> = const { Cell::new(None) };
}

struct Lane {
    handle: Handle,
    /// Connections living on the lane now.
    load: Arc<AtomicUsize>,
}

/// A lane: where a session and its streams run.
#[derive(Clone, Debug)]
pub struct LaneRef {
    index: usize,
    handle: Handle,
}

impl LaneRef {
    /// The lane's number, from 0.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Whether the calling thread is this lane.
    pub fn is_here(&self) -> bool {
        HERE.with(|h| h.get()) == Some(self.index)
    }

    /// Makes the lane the calling thread's runtime context until the guard drops: what
    /// is spawned or registered meanwhile (a quinn endpoint's socket and driver, say)
    /// lives on the lane.
    pub fn enter(&self) -> tokio::runtime::EnterGuard<'_> {
        self.handle.enter()
    }

    /// Spawns a task on the lane.
    pub fn spawn<F>(&self, f: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(f)
    }
}

/// Starts `n` lanes, named `{name}-lane-{i}` (`n == 0`: none; everything stays on the
/// main runtime). Only the first call counts.
pub fn init(n: usize, name: &str) -> std::io::Result<()> {
    if n == 0 || LANES.get().is_some() {
        return Ok(());
    }
    let mut lanes = Vec::with_capacity(n);
    for index in 0..n {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        std::thread::Builder::new()
            .name(format!("{name}-lane-{index}"))
            .spawn(move || {
                HERE.with(|h| h.set(Some(index)));
                rt.block_on(std::future::pending::<()>());
            })?;
        lanes.push(Lane {
            handle,
            load: Arc::new(AtomicUsize::new(0)),
        });
    }
    let _ = LANES.set(lanes);
    Ok(())
}

/// The lanes started, 0 without [`init`].
pub fn count() -> usize {
    LANES.get().map_or(0, Vec::len)
}

/// Lane `index`, if it was started.
pub fn get(index: usize) -> Option<LaneRef> {
    let lane = LANES.get()?.get(index)?;
    Some(LaneRef {
        index,
        handle: lane.handle.clone(),
    })
}

/// The lane the calling thread runs, if it is one.
pub fn current() -> Option<LaneRef> {
    get(HERE.with(|h| h.get())?)
}

/// A TCP socket on its way to the task that serves it: still registered with the calling
/// thread's runtime, or taken off it to be registered on another lane's.
#[derive(Debug)]
pub enum MovingTcp {
    /// Stays where it is registered.
    Here(tokio::net::TcpStream),
    /// Registered again by [`MovingTcp::arrive`], on the runtime that calls it.
    Away(std::net::TcpStream),
}

impl MovingTcp {
    /// For a task on `lane`: the socket stays registered when that is the calling thread
    /// (or there is no lane), and is taken off this runtime otherwise.
    pub fn to(tcp: tokio::net::TcpStream, lane: Option<&LaneRef>) -> std::io::Result<Self> {
        match lane {
            Some(lane) if !lane.is_here() => Self::away(tcp),
            _ => Ok(MovingTcp::Here(tcp)),
        }
    }

    /// For a task on another runtime (whichever lane [`spawn_connection`] picks).
    pub fn away(tcp: tokio::net::TcpStream) -> std::io::Result<Self> {
        tcp.into_std().map(MovingTcp::Away)
    }

    /// The socket, registered with the runtime of the calling task.
    pub fn arrive(self) -> std::io::Result<tokio::net::TcpStream> {
        match self {
            MovingTcp::Here(tcp) => Ok(tcp),
            MovingTcp::Away(std) => tokio::net::TcpStream::from_std(std),
        }
    }
}

/// Spawns a connection's task on the lane with the fewest connections (on the caller's
/// runtime when there are no lanes). The lane counts it until the task ends.
pub fn spawn_connection<F>(f: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let Some(lanes) = LANES.get().filter(|l| !l.is_empty()) else {
        return tokio::spawn(f);
    };
    let lane = lanes
        .iter()
        .min_by_key(|l| l.load.load(Ordering::Relaxed))
        .unwrap_or(&lanes[0]);
    let load = lane.load.clone();
    load.fetch_add(1, Ordering::Relaxed);
    lane.handle.spawn(async move {
        struct Count(Arc<AtomicUsize>);
        impl Drop for Count {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let _count = Count(load);
        f.await
    })
}

/// Most data-path threads (`threads`).
pub const MAX_THREADS: usize = 256;

/// The `threads` setting: data-path threads ([`crate::lanes`]), by default one per CPU;
/// 0 runs tunnel connections on the main runtime with everything else.
pub fn threads(value: Option<usize>) -> Result<usize, String> {
    match value {
        None => Ok(std::thread::available_parallelism().map_or(1, |n| n.get())),
        Some(n) if n <= MAX_THREADS => Ok(n),
        Some(n) => Err(format!("threads: {n} is outside 0..={MAX_THREADS}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_spread_over_lanes_and_run_there() {
        init(2, "test").unwrap();
        assert_eq!(count(), 2);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            assert!(current().is_none());
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let mut tasks = Vec::new();
            for _ in 0..4 {
                let mut rx = stop_rx.clone();
                tasks.push(spawn_connection(async move {
                    let lane = current().expect("runs on a lane");
                    assert!(lane.is_here());
                    let _ = rx.wait_for(|s| *s).await;
                    lane.index
                }));
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            stop_tx.send(true).unwrap();
            let mut on = [0; 2];
            for t in tasks {
                on[t.await.unwrap()] += 1;
            }
            assert_eq!(on, [2, 2], "least-loaded lane first");

            // A socket accepted here is served on a lane.
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let mut c = tokio::net::TcpStream::connect(l.local_addr().unwrap())
                .await
                .unwrap();
            let (s, _) = l.accept().await.unwrap();
            let lane = get(1).unwrap();
            let moving = MovingTcp::to(s, Some(&lane)).unwrap();
            assert!(matches!(moving, MovingTcp::Away(_)));
            let echo = lane.spawn(async move {
                let mut s = moving.arrive().unwrap();
                let mut b = [0u8; 4];
                s.read_exact(&mut b).await.unwrap();
                s.write_all(&b).await.unwrap();
                current().unwrap().index()
            });
            c.write_all(b"ping").await.unwrap();
            let mut b = [0u8; 4];
            c.read_exact(&mut b).await.unwrap();
            assert_eq!(&b, b"ping");
            assert_eq!(echo.await.unwrap(), 1);
            let here = c;
            assert!(matches!(
                MovingTcp::to(here, None).unwrap(),
                MovingTcp::Here(_)
            ));
        });
    }
}
