//! The load side: a server behind every path (bulk sink, bulk source, echo) and the
//! clients that measure through a path (bulk streams, new connections, idle streams,
//! pgbench).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Size of one bulk read or write.
const CHUNK: usize = 256 * 1024;
/// Zeros the server writes on bulk-download connections.
static ZEROS: [u8; CHUNK] = [0; CHUNK];

/// First byte a client sends: what the server does with the connection.
pub const MODE_UPLOAD: u8 = b'U';
/// The server writes zeros until the client goes away.
pub const MODE_DOWNLOAD: u8 = b'D';
/// Any other first byte: the server echoes it and everything after it.
pub const MODE_ECHO: u8 = b'E';

/// Runs the bench server on a free loopback port until the process is killed, after
/// printing `bench server port N` on stdout. It runs in a process of its own so that the
/// idle streams' server ends do not count against the benchmark process's open-file limit.
pub fn serve_forever() -> ! {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind bench server");
    let port = std_listener.local_addr().expect("local_addr").port();
    std_listener.set_nonblocking(true).expect("nonblocking");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("server runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(std_listener).expect("tokio listener");
        println!("bench server port {port}");
        let _ = std::io::stdout().flush();
        loop {
            match listener.accept().await {
                Ok((s, _)) => {
                    tokio::spawn(serve(s));
                }
                Err(e) => {
                    // Out of fds or similar: back off instead of spinning.
                    eprintln!("bench server: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
}

/// Starts `serve_forever` in a child process (this executable with `--serve`); returns
/// the guard and the port.
pub fn start_server() -> (routy_e2e::Proc, u16) {
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = Command::new(exe);
    cmd.arg("--serve");
    let p = routy_e2e::Proc::spawn("bench-server", cmd);
    p.wait_for_log("bench server port ", Duration::from_secs(10));
    let port = p
        .log()
        .lines()
        .find_map(|l| l.strip_prefix("bench server port ")?.trim().parse().ok())
        .expect("bench server port");
    (p, port)
}

async fn serve(mut s: tokio::net::TcpStream) {
    let _ = s.set_nodelay(true);
    let mut first = [0u8; 1];
    match s.read(&mut first).await {
        Ok(1) => {}
        _ => return,
    }
    match first[0] {
        MODE_UPLOAD => {
            let mut buf = vec![0u8; CHUNK];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        }
        MODE_DOWNLOAD => while s.write_all(&ZEROS).await.is_ok() {},
        b => {
            if s.write_all(&[b]).await.is_err() {
                return;
            }
            let mut buf = [0u8; 512];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
}

fn connect(port: u16, timeout: Duration) -> std::io::Result<TcpStream> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// One round trip on a fresh connection: true when the echo came back.
pub fn round_trip(port: u16) -> bool {
    let Ok(mut s) = connect(port, Duration::from_secs(5)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut b = [0u8; 1];
    s.write_all(&[MODE_ECHO]).is_ok() && s.read_exact(&mut b).is_ok() && b[0] == MODE_ECHO
}

/// Waits until a round trip through `port` works; false after `timeout`.
pub fn wait_ready(port: u16, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if round_trip(port) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Direction of a bulk measurement.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Dir {
    /// Client to service (the client writes).
    Up,
    /// Service to client (the client reads).
    Down,
}

/// Bulk throughput through `port` with `streams` parallel connections, in bytes/s,
/// counted by the client (written or read) over `dur` after `warm`: once the pipe is
/// full, what is in flight is about the same at both ends of the window.
pub fn bulk(
    port: u16,
    streams: usize,
    dir: Dir,
    warm: Duration,
    dur: Duration,
) -> Result<f64, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let moved = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for _ in 0..streams {
        let mut s = connect(port, Duration::from_secs(10)).map_err(|e| format!("connect: {e}"))?;
        let (stop, moved) = (stop.clone(), moved.clone());
        threads.push(std::thread::spawn(move || {
            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
            let _ = s.set_write_timeout(Some(Duration::from_millis(500)));
            let mode = if dir == Dir::Up {
                MODE_UPLOAD
            } else {
                MODE_DOWNLOAD
            };
            if s.write_all(&[mode]).is_err() {
                return;
            }
            let mut buf = vec![0u8; CHUNK];
            while !stop.load(Ordering::Relaxed) {
                let r = match dir {
                    Dir::Up => s.write(&buf),
                    Dir::Down => s.read(&mut buf),
                };
                match r {
                    Ok(0) => break,
                    Ok(n) => {
                        moved.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock
                                | std::io::ErrorKind::TimedOut
                                | std::io::ErrorKind::Interrupted
                        ) => {}
                    Err(_) => break,
                }
            }
            let _ = s.shutdown(std::net::Shutdown::Both);
        }));
    }
    let count = || moved.load(Ordering::Relaxed);
    std::thread::sleep(warm);
    let (c0, t0) = (count(), Instant::now());
    std::thread::sleep(dur);
    let (c1, t1) = (count(), Instant::now());
    stop.store(true, Ordering::Relaxed);
    let alive = threads.iter().filter(|t| !t.is_finished()).count();
    for t in threads {
        let _ = t.join();
    }
    if c1 == c0 {
        return Err("no bytes moved".into());
    }
    if alive < streams {
        eprintln!(
            "  warning: {} of {streams} streams ended early",
            streams - alive
        );
    }
    Ok((c1 - c0) as f64 / (t1 - t0).as_secs_f64())
}

/// New connections per second through `port` from `threads` client threads over `dur`,
/// each connecting, doing one 1-byte round trip and closing. Returns (rate, failures).
pub fn conn_rate(port: u16, threads: usize, dur: Duration) -> (f64, u64) {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + dur;
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (ok, failed) = (ok.clone(), failed.clone());
            std::thread::spawn(move || {
                while Instant::now() < deadline {
                    if round_trip(port) {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    let secs = start.elapsed().as_secs_f64();
    (
        ok.load(Ordering::Relaxed) as f64 / secs,
        failed.load(Ordering::Relaxed),
    )
}

/// Opens `n` connections through `port` from `threads` threads, each doing one round
/// trip and then staying open (idle). Returns the open ones and the number that failed.
pub fn open_idle(port: u16, n: usize, threads: usize) -> (Vec<TcpStream>, usize) {
    let per = n.div_ceil(threads);
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let count = per.min(n.saturating_sub(i * per));
            std::thread::spawn(move || {
                let mut open = Vec::with_capacity(count);
                let mut failed = 0;
                for _ in 0..count {
                    let s = connect(port, Duration::from_secs(10)).and_then(|mut s| {
                        s.set_read_timeout(Some(Duration::from_secs(10)))?;
                        s.write_all(&[MODE_ECHO])?;
                        let mut b = [0u8; 1];
                        s.read_exact(&mut b)?;
                        Ok(s)
                    });
                    match s {
                        Ok(s) => open.push(s),
                        Err(_) => failed += 1,
                    }
                }
                (open, failed)
            })
        })
        .collect();
    let mut all = Vec::with_capacity(n);
    let mut failed = 0;
    for h in handles {
        if let Ok((open, f)) = h.join() {
            all.extend(open);
            failed += f;
        }
    }
    (all, failed)
}

/// `pgbench -S -c N -j N -T secs -n` through `port`; transactions per second.
pub fn pgbench(port: u16, clients: u32, secs: u32) -> Result<f64, String> {
    let mut cmd = Command::new(routy_e2e::pg_bin("pgbench"));
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args([
            "-S",
            "-n",
            "-c",
            &clients.to_string(),
            "-j",
            &clients.to_string(),
        ])
        .args(["-T", &secs.to_string(), "postgres"])
        .env("PGCONNECT_TIMEOUT", "10");
    let out = routy_e2e::run_timeout(&mut cmd, None, Duration::from_secs(secs as u64 + 120))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "pgbench failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    text.lines()
        .find_map(|l| {
            let rest = l.trim().strip_prefix("tps = ")?;
            rest.split_whitespace().next()?.parse::<f64>().ok()
        })
        .ok_or_else(|| format!("no tps in pgbench output: {text}"))
}

/// Resident memory of `pid` in KiB (VmRSS), 0 when the process is gone.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:")?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0)
}

/// `pid` and all its descendants (from the parent pids in /proc/*/stat).
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
                continue;
            };
            // Fields after the parenthesised name: state, ppid, ...
            let Some(i) = stat.rfind(')') else { continue };
            let mut f = stat[i + 1..].split_whitespace();
            let _state = f.next();
            if let Some(Ok(ppid)) = f.next().map(str::parse::<u32>) {
                parent_of.push((p, ppid));
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let cur = tree[i];
        for (p, pp) in &parent_of {
            if *pp == cur && !tree.contains(p) {
                tree.push(*p);
            }
        }
        i += 1;
    }
    tree
}
