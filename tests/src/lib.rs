//! Test harness for Routy's end-to-end suites: child-process guards, throwaway
//! PostgreSQL clusters and network-namespace pairs with a one-way firewall.
//!
//! Everything here cleans up after itself in `Drop`, also when a test panics, and prints
//! the tail of the relevant logs when it is dropped during a panic.

// `unsafe` is denied everywhere except the tiny `sys` module that wraps libc calls
// (`forbid` would not allow that local exception).
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod browser;
pub mod cdc;
pub mod chaos;
pub mod clickhouse;
pub mod consumer;
pub mod fake;
pub mod hooks;
pub mod kafka;
pub mod nats;
mod net;
mod pg;
mod proc;
pub mod relays;
pub mod slow;
mod sys;

pub use net::{in_netns, netns_cmd, NetPair};
pub use pg::{make_pg_certs, pg_bin, pg_bin_dir, psql_at, psql_in, Pg, PgOpts};
pub use proc::Proc;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Locates a workspace binary next to the running test executable (or in `$ROUTY_BIN_DIR`).
pub fn bin(name: &str) -> PathBuf {
    let dir = match std::env::var_os("ROUTY_BIN_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => {
            let exe = std::env::current_exe().expect("current_exe");
            let mut dir = exe
                .parent()
                .expect("test executable has a parent directory")
                .to_path_buf();
            if dir.ends_with("deps") {
                dir.pop();
            }
            dir
        }
    };
    let path = dir.join(name);
    if !path.is_file() {
        panic!(
            "binary `{name}` not found at {}; build it first: cargo build --workspace --bins \
             (same profile and CARGO_TARGET_DIR as the tests, or set ROUTY_BIN_DIR)",
            path.display()
        );
    }
    path
}

/// CPU time (user + system) process `pid` has used, in seconds (0 if unknown).
pub fn cpu_seconds(pid: u32) -> f64 {
    let (user, system) = cpu_times(pid);
    user + system
}

/// User and system CPU time process `pid` has used, in seconds (0 if unknown).
pub fn cpu_times(pid: u32) -> (f64, f64) {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return (0.0, 0.0);
    };
    // Fields after the command (which may hold spaces) in parentheses.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return (0.0, 0.0);
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after ")".
    (ticks(11) / 100.0, ticks(12) / 100.0)
}

/// The program `name` on `PATH` (or in /usr/bin, for a `PATH` without it), if it is there.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Returns a port on 127.0.0.1 that was free just now (TCP and UDP) and not handed out
/// before by this process.
///
/// It comes from below the kernel's ephemeral range (`ip_local_port_range`), never from
/// it: a port from that range stays free only until some outgoing connection takes it as
/// its source port, and with every suite in one process a test that opens thousands of
/// connections (a flood, slow clients) would take the port another test is about to
/// listen on.
pub fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let given = GIVEN.get_or_init(|| Mutex::new(HashSet::new()));
    let (low, high) = (10_000u32, ephemeral_low().min(65_536));
    let free = |port: u16| {
        std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
    };
    if high > low + 1000 {
        // Start where another test process (tests/run runs one binary at a time, but a
        // developer may run two) is unlikely to be.
        let _ = NEXT.compare_exchange(
            0,
            std::process::id() * 7919,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        for _ in 0..(high - low) {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let port = (low + n % (high - low)) as u16;
            let mut given = given.lock().unwrap_or_else(|e| e.into_inner());
            if !given.contains(&port) && free(port) {
                given.insert(port);
                return port;
            }
        }
    }
    // No room below the ephemeral range: any port the kernel gives.
    for _ in 0..1000 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        let mut given = given.lock().unwrap_or_else(|e| e.into_inner());
        if given.insert(port) {
            return port;
        }
    }
    panic!("free_port: could not find a port not handed out before");
}

/// The first port of the kernel's ephemeral range (`ip_local_port_range`), read once.
fn ephemeral_low() -> u32 {
    static LOW: OnceLock<u32> = OnceLock::new();
    *LOW.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(32768)
    })
}

/// Held by the tests that load the machine or measure under load (bandwidth through
/// iperf3, thousands of connections, slow clients): with every suite in one test binary,
/// two of them never run at the same time (each still runs beside lighter tests).
pub fn load_test() -> std::sync::MutexGuard<'static, ()> {
    static LOAD: Mutex<()> = Mutex::new(());
    LOAD.lock().unwrap_or_else(|e| e.into_inner())
}

/// Polls `f` every 50 ms until it returns true; panics mentioning `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, f: impl FnMut() -> bool) {
    if let Err(e) = try_wait_until(timeout, what, f) {
        panic!("{e}");
    }
}

/// Polls `f` every 50 ms until it returns true; returns an error mentioning `what` after `timeout`.
pub fn try_wait_until(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> bool,
) -> Result<(), String> {
    let start = Instant::now();
    loop {
        if f() {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(format!("timed out after {timeout:?} waiting for: {what}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Creates a fresh temporary directory (removed when the guard is dropped).
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("routy-e2e-")
        .tempdir()
        .expect("create temp dir")
}

/// True when running with effective uid 0.
pub fn is_root() -> bool {
    sys::euid() == 0
}

/// Panics unless running with effective uid 0: the first line of every end-to-end test
/// that needs root. Such tests carry
/// `#[cfg_attr(routy_e2e_skip, ignore = "...")]` (see `build.rs`), so they are listed as
/// ignored unless `ROUTY_E2E=1`; once asked for, they run or fail, never pass unrun.
#[track_caller]
pub fn require_root() {
    assert!(
        is_root(),
        "this end-to-end test needs root (run tests/run as root)"
    );
}

/// Runs `cmd` with piped stdout/stderr (and `stdin` fed if given), killing it after `timeout`.
pub fn run_timeout(
    cmd: &mut Command,
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<Output, String> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("spawn {:?}: {e}", cmd.get_program()))?;
    let writer = match (stdin, child.stdin.take()) {
        (Some(data), Some(mut pipe)) => {
            let data = data.to_vec();
            Some(std::thread::spawn(move || {
                let _ = pipe.write_all(&data);
            }))
        }
        _ => None,
    };
    let mut out_pipe = child.stdout.take().expect("stdout piped");
    let mut err_pipe = child.stderr.take().expect("stderr piped");
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out_pipe.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err_pipe.read_to_end(&mut buf);
        buf
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if start.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("wait for {:?}: {e}", cmd.get_program())),
        }
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None => Err(format!(
            "{:?} {:?} timed out after {timeout:?}; stdout: {}; stderr: {}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        )),
    }
}

/// (resident, peak resident) memory of a process in bytes, from `/proc/PID/status`
/// (`VmRSS`, `VmHWM`); zeros once it is gone.
pub fn proc_memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The last `n` lines of a relay's log without its keepalive lines (one a second).
pub fn log_tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().filter(|l| !l.contains("keepalive")).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}

/// The parsed command line of a benchmark binary: `parse` gets the arguments after the
/// program name and returns them, `None` for `--help`, or an error naming the bad one.
/// `--help` prints `usage` and exits 0; an error prints it after the error and exits 2.
pub fn args_or_exit<A>(
    name: &str,
    usage: &str,
    parse: impl FnOnce(std::iter::Skip<std::env::Args>) -> Result<Option<A>, String>,
) -> A {
    match parse(std::env::args().skip(1)) {
        Ok(Some(a)) => a,
        Ok(None) => {
            print!("{usage}");
            std::process::exit(0);
        }
        Err(e) => {
            eprint!("{name}: {e}\n\n{usage}");
            std::process::exit(2);
        }
    }
}

#[cfg(test)]
mod free_port_tests {
    #[test]
    fn ports_are_below_the_ephemeral_range_free_and_never_handed_out_twice() {
        let low = super::ephemeral_low();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let p = super::free_port();
            assert!(seen.insert(p), "{p} handed out twice");
            if low > 11_000 {
                assert!(
                    (10_000..low).contains(&u32::from(p)),
                    "{p} is not below {low}"
                );
            }
            std::net::TcpListener::bind(("127.0.0.1", p)).expect("the port is free");
        }
    }
}
