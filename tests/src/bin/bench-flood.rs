//! Flood benchmark: the relays under attack, measured. A pgbench (`SELECT 1`, 4 clients)
//! runs through the tunnel while one flood at a time hits relay-outer; its average latency
//! is compared with the quiet run before, and both relays' resident memory is sampled.
//!
//! Floods: thousands of idle TCP connections at the tunnel port (reopened as relay-outer
//! closes them at its handshake timeout); TLS handshakes without a client certificate as
//! fast as a few loops can make them; a listener flooded far past its `max_connections`;
//! slow readers (a service sends, the client never reads) and slow writers (a byte every
//! 100 ms) on two more listeners; the admin endpoint under 200 slowloris clients. The run
//! ends with a quiet pgbench again and the memory after 15 s idle.
//!
//! ```sh
//! cargo build --release --workspace --bins
//! target/release/bench-flood [--secs N] [--out docs/bench]
//! ```
//!
//! Needs root (PostgreSQL runs as the postgres user). Prints one Markdown table; with
//! `--out DIR` writes `DIR/flood.md`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use routy_e2e::fake;
use routy_e2e::relays::{outer_yaml, ListenerSpec, Pki, Relay, Tunnel, READY};
use routy_e2e::{cpu_seconds, free_port, pg_bin, proc_memory, Pg, PgOpts};
use routy_ops::metrics as m;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const KA: (&str, &str) = ("5s", "15s");

struct Ports {
    tunnel: u16,
    pg: u16,
    flood: u16,
    slow_read: u16,
    slow_write: u16,
    admin: u16,
}

/// One row of the table.
struct Row {
    phase: String,
    load: String,
    latency_ms: f64,
    tps: f64,
    outer_peak: u64,
    inner_peak: u64,
    /// relay-outer's, relay-inner's and the flood's CPU use during pgbench, in cores.
    cpu: (f64, f64, f64),
    note: String,
}

fn main() {
    let mut secs = 10u64;
    let mut out: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--secs" => secs = args.next().and_then(|v| v.parse().ok()).expect("--secs N"),
            "--out" => out = args.next().map(PathBuf::from),
            _ => {
                eprintln!("usage: bench-flood [--secs N] [--out DIR]");
                std::process::exit(2);
            }
        }
    }
    routy_ops::fdlimit::raise();
    // The floods come from this process, which shares the 2 cores with the relays,
    // pgbench and PostgreSQL; a real attacker is elsewhere. Its threads run at nice 19
    // so that it takes the CPU the rest leaves (its use is reported all the same).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(|| {
            // SAFETY: setpriority on the calling thread (who = 0) only changes its nice value.
            #[allow(unsafe_code)]
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, 0, 19);
            }
        })
        .build()
        .expect("runtime");
    // The services behind relay-inner besides PostgreSQL: one that sends without end
    // (for slow readers) and one that reads and drops (for slow writers and the flood).
    let (source_port, sink_port) = rt.block_on(async {
        let source = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sink = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ports = (
            source.local_addr().unwrap().port(),
            sink.local_addr().unwrap().port(),
        );
        tokio::spawn(async move {
            while let Ok((mut s, _)) = source.accept().await {
                tokio::spawn(async move {
                    let chunk = vec![b'x'; 64 * 1024];
                    while s.write_all(&chunk).await.is_ok() {}
                });
            }
        });
        tokio::spawn(async move {
            while let Ok((mut s, _)) = sink.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                });
            }
        });
        ports
    });

    let pg = Pg::start(PgOpts::default());
    let pki = Pki::new(&["localhost", "127.0.0.1"]);
    pki.issue("site-a");
    let p = Ports {
        tunnel: free_port(),
        pg: free_port(),
        flood: free_port(),
        slow_read: free_port(),
        slow_write: free_port(),
        admin: free_port(),
    };
    let listener = |name: &str, port: u16, service: &str, max: usize| {
        let mut l = ListenerSpec::new(name, &format!("127.0.0.1:{port}"), "site-a", service);
        l.extra = format!("    max_connections: {max}\n");
        l
    };
    let oy = outer_yaml(
        &pki,
        &format!("127.0.0.1:{}", p.tunnel),
        KA,
        &[
            listener("pg", p.pg, "pg", 64),
            listener("flood", p.flood, "sink", 100),
            listener("slow-read", p.slow_read, "source", 300),
            listener("slow-write", p.slow_write, "sink", 300),
        ],
        &format!("admin: {{ listen: \"127.0.0.1:{}\" }}\n", p.admin),
    );
    let outer = Relay::outer(&oy, None);
    let iy = Tunnel::inner_cfg(&pki, "site-a", p.tunnel, &pg, KA, "")
        .replace(
            "services:\n",
            &format!(
                "services:\n  source: {{ target: \"127.0.0.1:{source_port}\" }}\n  sink: {{ target: \"127.0.0.1:{sink_port}\" }}\n"
            ),
        );
    let inner = Relay::inner("relay-inner", &iy, None);
    outer.wait_count("tunnel up", 1, READY);
    let pids = (outer.proc.pid(), inner.proc.pid());
    let tunnel_addr = SocketAddr::from(([127, 0, 0, 1], p.tunnel));
    let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let mem0 = (proc_memory(pids.0).0, proc_memory(pids.1).0);
    eprintln!(
        "relay-outer {} MB, relay-inner {} MB at start",
        mb(mem0.0),
        mb(mem0.1)
    );

    let mut rows = Vec::new();
    let quiet = measure(&rt, "quiet", "none", p.pg, secs, pids, |_| async {
        String::new()
    });
    let base = quiet.latency_ms;
    rows.push(quiet);

    rows.push(measure(
        &rt,
        "idle connections",
        "5000 TCP connections at the tunnel port, never sending; reopened when closed",
        p.pg,
        secs,
        pids,
        move |stop| async move {
            let opened = Arc::new(AtomicU64::new(0));
            let mut tasks = Vec::new();
            for _ in 0..5000 {
                let (stop, opened) = (stop.clone(), opened.clone());
                tasks.push(tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let Ok(mut s) = TcpStream::connect(tunnel_addr).await else {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        };
                        opened.fetch_add(1, Ordering::Relaxed);
                        let mut b = [0u8; 64];
                        loop {
                            if stop.load(Ordering::Relaxed) {
                                return;
                            }
                            match tokio::time::timeout(Duration::from_millis(500), s.read(&mut b))
                                .await
                            {
                                Ok(Ok(0)) | Ok(Err(_)) => break,
                                _ => {}
                            }
                        }
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
            format!("{} connections opened", opened.load(Ordering::Relaxed))
        },
    ));

    let pki_dir = pki.dir().to_path_buf();
    rows.push(measure(
        &rt,
        "TLS handshakes",
        "8 loops of TLS handshakes without a client certificate",
        p.pg,
        secs,
        pids,
        move |stop| async move {
            let done = Arc::new(AtomicU64::new(0));
            let started = Instant::now();
            let mut tasks = Vec::new();
            for _ in 0..8 {
                let (stop, done, ca) = (stop.clone(), done.clone(), pki_dir.join("ca.crt"));
                tasks.push(tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok(mut s) =
                            fake::tls_without_client_cert_ca(tunnel_addr, &ca, "localhost").await
                        {
                            let _ = fake::read_until_end(&mut s, Duration::from_secs(5)).await;
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
            let n = done.load(Ordering::Relaxed);
            format!(
                "{n} handshakes refused ({:.0}/s)",
                n as f64 / started.elapsed().as_secs_f64()
            )
        },
    ));

    let flood_addr = at(p.flood);
    rows.push(measure(
        &rt,
        "listener flood",
        "2000 clients at once on a listener with max_connections 100, reconnecting",
        p.pg,
        secs,
        pids,
        move |stop| async move {
            let tried = Arc::new(AtomicU64::new(0));
            let mut tasks = Vec::new();
            for _ in 0..2000 {
                let (stop, tried) = (stop.clone(), tried.clone());
                tasks.push(tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        tried.fetch_add(1, Ordering::Relaxed);
                        let Ok(mut s) = TcpStream::connect(flood_addr).await else {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        };
                        let _ = s.write_all(b"hello").await;
                        let mut b = [0u8; 64];
                        let _ = tokio::time::timeout(Duration::from_secs(1), s.read(&mut b)).await;
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
            format!("{} connection attempts", tried.load(Ordering::Relaxed))
        },
    ));

    let (read_addr, write_addr) = (at(p.slow_read), at(p.slow_write));
    rows.push(measure(&rt, "slow clients", "200 clients that never read a service sending without end, and 200 writing a byte every 100 ms", p.pg, secs, pids, move |stop| async move {
        let mut held = Vec::new();
        for _ in 0..200 {
            if let Ok(s) = TcpStream::connect(read_addr).await {
                held.push(s);
            }
        }
        let mut tasks = Vec::new();
        for _ in 0..200 {
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let Ok(mut s) = TcpStream::connect(write_addr).await else { return };
                while !stop.load(Ordering::Relaxed) {
                    if s.write_all(b"x").await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }));
        }
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for t in tasks {
            let _ = t.await;
        }
        format!("{} slow readers held", held.len())
    }));

    let admin = at(p.admin);
    rows.push(measure(
        &rt,
        "admin slowloris",
        "200 slowloris clients on relay-outer's admin endpoint, /readyz every 100 ms",
        p.pg,
        secs,
        pids,
        move |stop| async move {
            let until = tokio::time::Instant::now() + Duration::from_secs(secs);
            let loris = tokio::spawn(routy_e2e::slow::slowloris(
                admin,
                200,
                Duration::from_millis(500),
                until,
            ));
            let polls = routy_e2e::slow::poll(
                admin,
                "/readyz",
                Duration::from_millis(100),
                Duration::from_secs(1),
                until,
            )
            .await;
            let opened = loris.await.unwrap_or(0);
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            format!(
                "/readyz {}/{} answered, slowest {:.1} ms; {opened} slow connections",
                polls.times.len(),
                polls.times.len() + polls.failures.len(),
                polls.worst().as_secs_f64() * 1000.0
            )
        },
    ));

    rows.push(measure(
        &rt,
        "quiet again",
        "none",
        p.pg,
        secs,
        pids,
        |_| async { String::new() },
    ));
    std::thread::sleep(Duration::from_secs(15));
    let idle = (proc_memory(pids.0).0, proc_memory(pids.1).0);
    let refused = outer.metric(m::HANDSHAKE_FAILURES, &[]);
    let throttled = outer.metric(m::HANDSHAKE_FAILURES, &[("reason", "throttled")]);
    let over = outer.metric(m::LISTENER_REFUSED, &[("reason", "over_limit")]);
    let sessions = outer.metric(m::SESSION_CONNECTS, &[]);

    let mut md = String::from(
        "| phase | flood | pgbench latency (ms) | vs quiet | tps | CPU (cores): relay-outer / relay-inner / flood | relay-outer peak RSS (MB) | relay-inner peak RSS (MB) | what the flood did |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in &rows {
        md.push_str(&format!(
            "| {} | {} | {:.3} | {:.2}x | {:.0} | {:.2} / {:.2} / {:.2} | {} | {} | {} |\n",
            r.phase,
            r.load,
            r.latency_ms,
            r.latency_ms / base,
            r.tps,
            r.cpu.0,
            r.cpu.1,
            r.cpu.2,
            mb(r.outer_peak),
            mb(r.inner_peak),
            r.note
        ));
    }
    md.push_str(&format!(
        "\nMemory at start: relay-outer {} MB, relay-inner {} MB; after the floods and 15 s idle: relay-outer {} MB, relay-inner {} MB. relay-outer counted {refused:.0} refused tunnel connections ({throttled:.0} of them closed at accept by `tunnel.failed_handshake_limit`) and {over:.0} listener clients over the limit; the real tunnel connected {sessions:.0} time(s) (1: never lost).\n",
        mb(mem0.0),
        mb(mem0.1),
        mb(idle.0),
        mb(idle.1),
    ));
    println!("{md}");
    if let Some(dir) = out {
        std::fs::create_dir_all(&dir).expect("create --out");
        let head = format!(
            "# Floods\n\n`target/release/bench-flood --secs {secs}`, release build, {} cores; pgbench `SELECT 1` with 4 clients through the tunnel during each flood; the floods come from the benchmark's own process at nice 19 on the same cores.\n\n",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        std::fs::write(dir.join("flood.md"), head + &md).expect("write flood.md");
    }
}

fn mb(b: u64) -> String {
    format!("{:.0}", b as f64 / 1e6)
}

/// Runs `flood` (given a stop flag) for `secs` while pgbench runs through listener
/// `pg_port`, sampling both relays' memory.
fn measure<F, Fut>(
    rt: &tokio::runtime::Runtime,
    phase: &str,
    load: &str,
    pg_port: u16,
    secs: u64,
    pids: (u32, u32),
    flood: F,
) -> Row
where
    F: FnOnce(Arc<AtomicBool>) -> Fut,
    Fut: std::future::Future<Output = String> + Send + 'static,
{
    eprintln!("== {phase}");
    let stop = Arc::new(AtomicBool::new(false));
    let task = rt.spawn(flood(stop.clone()));
    // Let the flood build up before pgbench starts.
    std::thread::sleep(Duration::from_secs(2));
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("q.sql");
    std::fs::write(&script, "SELECT 1;\n").unwrap();
    let mut child = Command::new(pg_bin("pgbench"))
        .args([
            "-n",
            "-h",
            "127.0.0.1",
            "-p",
            &pg_port.to_string(),
            "-U",
            "postgres",
        ])
        .args(["-c", "4", "-j", "2", "-T", &secs.to_string(), "-f"])
        .arg(&script)
        .arg("postgres")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pgbench");
    let mut peak = (0u64, 0u64);
    let me = std::process::id();
    let cpu0 = (cpu_seconds(pids.0), cpu_seconds(pids.1), cpu_seconds(me));
    let t0 = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(secs + 60);
    while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        let (o, i) = (proc_memory(pids.0).0, proc_memory(pids.1).0);
        peak = (peak.0.max(o), peak.1.max(i));
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = child.wait_with_output().expect("pgbench");
    let el = t0.elapsed().as_secs_f64();
    let cpu = (
        (cpu_seconds(pids.0) - cpu0.0) / el,
        (cpu_seconds(pids.1) - cpu0.1) / el,
        (cpu_seconds(me) - cpu0.2) / el,
    );
    stop.store(true, Ordering::Relaxed);
    let note = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .map_or_else(
                |_| "flood did not stop".to_string(),
                |r| r.unwrap_or_default(),
            )
    });
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    let row = Row {
        phase: phase.to_string(),
        load: load.to_string(),
        latency_ms: field("latency average ="),
        tps: field("tps ="),
        outer_peak: peak.0,
        inner_peak: peak.1,
        cpu,
        note,
    };
    if !out.status.success() || row.latency_ms.is_nan() {
        eprintln!(
            "pgbench failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!(
        "   latency {:.3} ms, tps {:.0}, cores {:.2}/{:.2}/{:.2}, peaks {} / {} MB; {}",
        row.latency_ms,
        row.tps,
        row.cpu.0,
        row.cpu.1,
        row.cpu.2,
        mb(row.outer_peak),
        mb(row.inner_peak),
        row.note
    );
    row
}
