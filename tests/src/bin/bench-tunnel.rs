//! Tunnel benchmark: Routy next to a direct connection, `ssh -R` and rathole, measured in
//! one run with the competitors interleaved (each measurement is taken for every path in
//! turn before the next one starts), so drift hits all alike. Starts everything itself on
//! loopback: a PostgreSQL, a bench server (bulk sink, bulk source, echo), the relays
//! (release binaries next to this one), sshd with its own keys, rathole if present.
//! Needs root (PostgreSQL via runuser, sshd, raising RLIMIT_NOFILE).
//!
//! ```sh
//! cargo build --release --workspace --bins
//! target/release/bench-tunnel [--quick] [--out docs/bench] [--install-rathole]
//! ```
//!
//! For profiling one thing at a time: `--paths tls,ssh` keeps only the paths whose name
//! contains one of the words (direct always runs), `--rows bulk1_up,pg16` only those rows
//! (keys: mem conn bulk1_up bulk1_down bulk8_up bulk8_down pg1 pg16), `--secs N`
//! stretches each bulk and new-connection measurement to N seconds; the relay PIDs are
//! printed so `perf record -p` can attach. `--baseline DIR` adds a "Routy TLS baseline"
//! path run from the relay binaries in DIR (a copy of an earlier build), so a change is
//! measured against what it replaces in the same run.
//!
//! The last column, two socat forwarders in series over plain TCP, is a reference rather
//! than a competitor: the cost of the two extra loopback hops alone, which bounds what
//! any encrypted tunnel can reach here.
//!
//! Prints one Markdown table; with `--out DIR` writes `DIR/tunnel.md`, `DIR/tunnel.json`
//! and (with python3 + matplotlib, via `bench/chart.py`) `DIR/tunnel.png`.
//! rathole is used when it is on PATH or named by `$ROUTY_RATHOLE`; `--install-rathole`
//! runs `cargo install rathole --root /tmp/rathole` first if needed. `--help` lists the
//! options and environment variables.

#[path = "bench_tunnel/load.rs"]
mod load;
#[path = "bench_tunnel/paths.rs"]
mod paths;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use load::Dir;
use paths::{Path, Targets};

struct Args {
    quick: bool,
    out: Option<PathBuf>,
    install_rathole: bool,
    paths: Option<Vec<String>>,
    rows: Option<Vec<String>>,
    secs: Option<u64>,
    baseline: Option<PathBuf>,
}

const USAGE: &str = "\
Usage: bench-tunnel [--quick] [--out DIR] [--install-rathole] [--paths W,..] [--rows KEY,..]
                    [--secs N] [--baseline DIR]

Tunnel benchmark: Routy next to a direct connection, ssh -R, rathole and two socat
forwarders in series (plain TCP, a reference), measured in one run with the paths
interleaved. Starts everything itself on loopback: a PostgreSQL, a bench server, the
relays (next to this binary), sshd with its own keys, rathole if present. Installs
openssh-server/openssh-client and socat with apt-get when they are missing. Prints one
Markdown table.

Needs root: PostgreSQL runs as the postgres user, sshd, raising RLIMIT_NOFILE.
Build first: cargo build --release --workspace --bins

Options:
  --quick            shorter measurements and fewer idle streams
  --out DIR          also write DIR/tunnel.md, DIR/tunnel.json and (python3 with
                     matplotlib, via bench/chart.py) DIR/tunnel.png
  --install-rathole  cargo install rathole --root /tmp/rathole when it is not found
  --paths W,..       only the paths whose name contains one of the words, e.g.
                     --paths tls,ssh (direct always runs; names: Routy TLS, Routy QUIC,
                     Routy WebSocket, Routy TLS via HTTP proxy, ssh -R, rathole, 2x socat,
                     plain TCP)
  --rows KEY,..      only these rows: mem conn bulk1_up bulk1_down bulk8_up bulk8_down
                     pg1 pg16
  --secs N           each bulk and new-connection measurement (and pgbench) takes N s
  --baseline DIR     add a \"Routy TLS baseline\" path run from the relay binaries in DIR
                     (an earlier build), measured against this one in the same run
  -h, --help         print this text and exit
  (--serve, as the first argument, is internal: the bench server this binary starts)

Environment:
  ROUTY_RATHOLE     the rathole binary (default: rathole on PATH)
  ROUTY_BIN_DIR     directory of relay-outer and relay-inner (default: this binary's)
  ROUTY_PG_BIN_DIR  PostgreSQL bin directory (default: the highest
                    /usr/lib/postgresql/*/bin)
  ROUTY_KEEP_LOGS   when set, keep the PostgreSQL directory and the process logs
";

/// The path of `--baseline DIR`: Routy over TLS from another build, side by side with this
/// one in the same run (an A/B comparison that machine noise does not swamp).
const BASELINE: &str = "Routy TLS baseline";

fn list(v: Option<String>, what: &str) -> Result<Vec<String>, String> {
    let v = v.ok_or_else(|| format!("{what} needs a value"))?;
    Ok(v.split(',')
        .map(|w| w.trim().to_lowercase())
        .filter(|w| !w.is_empty())
        .collect())
}

impl Args {
    fn wants_path(&self, name: &str) -> bool {
        let name = name.to_lowercase();
        self.paths
            .as_ref()
            .is_none_or(|ws| ws.iter().any(|w| name.contains(w.as_str())))
    }

    fn wants_row(&self, key: &str) -> bool {
        self.rows
            .as_ref()
            .is_none_or(|ks| ks.iter().any(|k| k == key))
    }
}

/// The arguments, or `None` for `--help`; an error names the bad argument.
fn parse(mut it: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut a = Args {
        quick: false,
        out: None,
        install_rathole: false,
        paths: None,
        rows: None,
        secs: None,
        baseline: None,
    };
    while let Some(k) = it.next() {
        match k.as_str() {
            "-h" | "--help" => return Ok(None),
            "--quick" => a.quick = true,
            "--install-rathole" => a.install_rathole = true,
            "--out" => a.out = Some(it.next().ok_or("--out needs a value (--out DIR)")?.into()),
            "--baseline" => {
                let dir = it
                    .next()
                    .ok_or("--baseline needs a value (--baseline DIR)")?;
                a.baseline = Some(dir.into());
            }
            "--paths" => a.paths = Some(list(it.next(), "--paths")?),
            "--rows" => a.rows = Some(list(it.next(), "--rows")?),
            "--secs" => {
                let v = it.next().ok_or("--secs needs a value (--secs N)")?;
                let n = v.parse().map_err(|_| format!("--secs {v}: not a number"))?;
                a.secs = Some(n);
            }
            _ => return Err(format!("unknown argument {k}")),
        }
    }
    Ok(Some(a))
}

/// The arguments of this run (see [`routy_e2e::args_or_exit`]).
fn args() -> Args {
    routy_e2e::args_or_exit("bench-tunnel", USAGE, parse)
}

/// Settings for one run.
struct Plan {
    bulk: Duration,
    warm: Duration,
    pgbench_secs: u32,
    conn_secs: Duration,
    conn_threads: usize,
    idle_streams: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                bulk: Duration::from_secs(2),
                warm: Duration::from_millis(500),
                pgbench_secs: 3,
                conn_secs: Duration::from_secs(2),
                conn_threads: 4,
                idle_streams: 2_000,
            }
        } else {
            Plan {
                bulk: Duration::from_secs(5),
                warm: Duration::from_secs(1),
                pgbench_secs: 10,
                conn_secs: Duration::from_secs(5),
                conn_threads: 4,
                idle_streams: 10_000,
            }
        }
    }
}

/// Raises RLIMIT_NOFILE (soft and, as root, hard) to `want`; returns the soft limit now set.
/// Children (relays, sshd, rathole) inherit it.
#[allow(unsafe_code)]
fn raise_nofile(want: u64) -> u64 {
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass; no other preconditions.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur) };
    let new = libc::rlimit {
        rlim_cur: want,
        rlim_max: want.max(cur.rlim_max),
    };
    // SAFETY: setrlimit only reads the struct; failure is reported by the return value.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } == 0 {
        return want;
    }
    let fallback = libc::rlimit {
        rlim_cur: cur.rlim_max,
        rlim_max: cur.rlim_max,
    };
    // SAFETY: as above.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &fallback) };
    cur.rlim_max
}

/// One measured row: a value per path (None: not measured or failed).
struct Row {
    key: &'static str,
    label: String,
    unit: &'static str,
    values: Vec<Option<f64>>,
    /// Whether a ratio to direct makes sense (not for memory).
    ratio: bool,
}

fn fmt_num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn fmt_ratio(r: f64) -> String {
    if r >= 0.1 {
        format!("{r:.2}x")
    } else {
        format!("{r:.3}x")
    }
}

fn cmd_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            let s = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&s).trim().to_string()
        })
        .unwrap_or_default()
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--serve") {
        load::serve_forever();
    }
    let a = args();
    let mut plan = Plan::new(a.quick);
    if let Some(n) = a.secs {
        plan.bulk = Duration::from_secs(n);
        plan.conn_secs = Duration::from_secs(n);
        plan.pgbench_secs = n.try_into().unwrap_or(u32::MAX);
    }
    let started = Instant::now();
    let mut notes: Vec<String> = Vec::new();

    let nofile = raise_nofile(65_536);
    let mut idle_n = plan.idle_streams;
    if (nofile as usize) < idle_n + 1024 {
        idle_n = (nofile as usize).saturating_sub(1024);
        notes.push(format!(
            "RLIMIT_NOFILE could only be raised to {nofile}: {idle_n} idle streams instead of {}.",
            plan.idle_streams
        ));
    }

    eprintln!("starting PostgreSQL and the bench server");
    let pg = routy_e2e::Pg::start(routy_e2e::PgOpts::default());
    let init = routy_e2e::run_timeout(
        Command::new(routy_e2e::pg_bin("pgbench"))
            .args([
                "-i",
                "-s",
                "10",
                "-q",
                "-h",
                "127.0.0.1",
                "-p",
                &pg.port().to_string(),
            ])
            .args(["-U", "postgres", "postgres"]),
        None,
        Duration::from_secs(600),
    )
    .expect("pgbench -i");
    assert!(
        init.status.success(),
        "pgbench -i failed: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    let (server, bench_port) = load::start_server();
    let targets = Targets {
        bench: bench_port,
        pg: pg.port(),
    };

    let pki = routy_e2e::relays::Pki::new(&["localhost", "127.0.0.1"]);
    pki.issue("site-a");

    let mut all: Vec<Path> = vec![paths::direct(&targets)];
    if a.wants_path("Routy TLS") {
        eprintln!("starting Routy over TLS");
        match paths::routy("Routy TLS", &pki, &targets, None, None) {
            Ok(p) => all.push(p),
            Err(e) => notes.push(format!("Routy over TLS could not be started: {e}")),
        }
    }
    if let Some(dir) = &a.baseline {
        eprintln!("starting Routy over TLS from {}", dir.display());
        match paths::routy(BASELINE, &pki, &targets, None, Some(dir)) {
            Ok(p) => all.push(p),
            Err(e) => notes.push(format!("{BASELINE} could not be started: {e}")),
        }
        notes.push(format!("{BASELINE}: relay binaries from {}", dir.display()));
    }
    if a.wants_path("Routy QUIC") {
        match paths::routy_accepts_transport(&pki, &targets, "quic") {
            (true, _) => {
                eprintln!("starting Routy over QUIC");
                match paths::routy("Routy QUIC", &pki, &targets, Some("quic"), None) {
                    Ok(p) => all.push(p),
                    Err(e) => {
                        notes.push(format!("Routy over QUIC skipped: it did not come up: {e}"))
                    }
                }
            }
            (false, why) => notes.push(format!(
                "Routy over QUIC skipped: relay-inner check-config refuses `transport: quic` ({}).",
                why.lines().last().unwrap_or("").trim()
            )),
        }
    }
    if a.wants_path("Routy WebSocket") {
        eprintln!("starting Routy over a WebSocket (wss://)");
        match paths::routy("Routy WebSocket", &pki, &targets, Some("websocket"), None) {
            Ok(p) => all.push(p),
            Err(e) => notes.push(format!("Routy over a WebSocket skipped: {e}")),
        }
    }
    if a.wants_path("Routy TLS via HTTP proxy") {
        eprintln!("starting Routy over TLS through tinyproxy (HTTP CONNECT)");
        match paths::routy_via("Routy TLS via HTTP proxy", &pki, &targets, None, true, None) {
            Ok(p) => all.push(p),
            Err(e) => notes.push(format!("Routy through an HTTP proxy skipped: {e}")),
        }
    }
    if a.wants_path("ssh -R") {
        eprintln!("starting sshd and ssh -R");
        match paths::ssh(&targets) {
            Ok(p) => all.push(p),
            Err(e) => notes.push(format!("ssh -R skipped: {e}")),
        }
    }
    let mut rathole_version = None;
    if a.wants_path("rathole") {
        match paths::find_rathole(a.install_rathole) {
            Ok(exe) => {
                eprintln!("starting rathole ({})", exe.display());
                rathole_version = Some(paths::rathole_version(&exe));
                match paths::rathole(&exe, &pki, &targets) {
                    Ok(p) => all.push(p),
                    Err(e) => notes.push(format!("rathole skipped: {e}")),
                }
            }
            Err(e) => notes.push(format!("rathole skipped: {e}")),
        }
    }
    if a.wants_path("2x socat, plain TCP") {
        eprintln!("starting the socat chain (reference: plain TCP, no TLS)");
        match paths::socat_chain(&targets) {
            Ok(p) => all.push(p),
            Err(e) => notes.push(format!("socat reference skipped: {e}")),
        }
    }
    for p in &all {
        if !p.procs.is_empty() {
            eprintln!("{}: pids {:?}", p.name, p.procs);
        }
    }
    let names: Vec<String> = all.iter().map(|p| p.name.clone()).collect();
    eprintln!("paths: {}", names.join(", "));

    let mut rows: Vec<Row> = Vec::new();
    let pause = || std::thread::sleep(Duration::from_millis(700));

    // Memory first, on processes that have not yet carried bulk traffic (freed buffers
    // kept by the allocator would otherwise hide what idle streams cost).
    if a.wants_row("mem") {
        let mut values = Vec::new();
        for p in &all {
            let Some(base) = p.rss_kib() else {
                values.push(None);
                continue;
            };
            eprintln!("memory: {} ({idle_n} idle streams)", p.name);
            let (open, failed) = load::open_idle(p.bench_port, idle_n, 8);
            std::thread::sleep(Duration::from_secs(2));
            let after = p.rss_kib().unwrap_or(0);
            let n = open.len();
            drop(open);
            if failed > 0 {
                notes.push(format!(
                    "memory, {}: {failed} of {idle_n} idle streams failed to open; per-stream figure over the {n} that did.",
                    p.name
                ));
            }
            values.push((n > 0).then(|| after.saturating_sub(base) as f64 / n as f64));
            eprintln!("  base {} KiB, with streams {} KiB", base, after);
            std::thread::sleep(Duration::from_secs(2));
        }
        rows.push(Row {
            key: "mem",
            label: format!("memory per idle stream ({idle_n} open), all relay processes"),
            unit: "KiB",
            values,
            ratio: false,
        });
    }

    // New connections per second.
    if a.wants_row("conn") {
        let mut values = Vec::new();
        for p in &all {
            eprintln!("new connections: {}", p.name);
            let (rate, failed) = load::conn_rate(p.bench_port, plan.conn_threads, plan.conn_secs);
            if failed > 0 {
                notes.push(format!(
                    "new connections, {}: {failed} attempts failed.",
                    p.name
                ));
            }
            values.push((rate > 0.0).then_some(rate));
            pause();
        }
        rows.push(Row {
            key: "conn",
            label: format!(
                "new connections/s, 1 round trip each ({} client threads)",
                plan.conn_threads
            ),
            unit: "conn/s",
            values,
            ratio: true,
        });
    }

    // Bulk throughput.
    for (streams, dir, key) in [
        (1, Dir::Up, "bulk1_up"),
        (1, Dir::Down, "bulk1_down"),
        (8, Dir::Up, "bulk8_up"),
        (8, Dir::Down, "bulk8_down"),
    ] {
        if !a.wants_row(key) {
            continue;
        }
        let mut values = Vec::new();
        for p in &all {
            eprintln!("bulk {streams} {dir:?}: {}", p.name);
            match load::bulk(p.bench_port, streams, dir, plan.warm, plan.bulk) {
                Ok(bps) => values.push(Some(bps / 1e6)),
                Err(e) => {
                    notes.push(format!("bulk {streams} {dir:?}, {}: {e}", p.name));
                    values.push(None);
                }
            }
            pause();
        }
        let what = match dir {
            Dir::Up => "client → service",
            Dir::Down => "service → client",
        };
        rows.push(Row {
            key,
            label: format!(
                "bulk, {streams} stream{}, {what}",
                if streams > 1 { "s (total)" } else { "" }
            ),
            unit: "MB/s",
            values,
            ratio: true,
        });
    }

    // pgbench -S.
    for (clients, key) in [(1u32, "pg1"), (16u32, "pg16")] {
        if !a.wants_row(key) {
            continue;
        }
        let mut values = Vec::new();
        for p in &all {
            eprintln!("pgbench -S -c {clients}: {}", p.name);
            match load::pgbench(p.pg_port, clients, plan.pgbench_secs) {
                Ok(tps) => values.push(Some(tps)),
                Err(e) => {
                    notes.push(format!("pgbench -c {clients}, {}: {e}", p.name));
                    values.push(None);
                }
            }
            pause();
        }
        rows.push(Row {
            key,
            label: format!(
                "pgbench -S, {clients} client{}",
                if clients > 1 { "s" } else { "" }
            ),
            unit: "tps",
            values,
            ratio: true,
        });
    }

    // Table rows in reading order (memory was measured first).
    let order = [
        "bulk1_up",
        "bulk1_down",
        "bulk8_up",
        "bulk8_down",
        "pg1",
        "pg16",
        "conn",
        "mem",
    ];
    rows.sort_by_key(|r| order.iter().position(|k| *k == r.key).unwrap_or(99));

    let md = render(
        &a,
        &plan,
        idle_n,
        &names,
        &rows,
        &notes,
        rathole_version.as_deref(),
        started,
    );
    println!("{md}");

    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir).expect("create --out dir");
        let json = to_json(&names, &rows, a.quick);
        let json_path = dir.join("tunnel.json");
        std::fs::write(&json_path, serde_json::to_string_pretty(&json).unwrap())
            .expect("write tunnel.json");
        let png = dir.join("tunnel.png");
        let mut md = md;
        match chart(&json_path, &png) {
            Ok(()) => {
                md.push_str("\n![Ratios to direct](tunnel.png)\n");
                eprintln!("wrote {}", png.display());
            }
            Err(e) => {
                let note = format!("\nNo chart: {e}\n");
                eprintln!("{note}");
                md.push_str(&note);
            }
        }
        std::fs::write(dir.join("tunnel.md"), &md).expect("write tunnel.md");
        eprintln!("wrote {}", dir.join("tunnel.md").display());
    }
    drop(all);
    drop(server);
    drop(pg);
}

/// A short name for a row, for the one-line comparisons.
fn short(key: &str) -> &str {
    match key {
        "bulk1_up" => "bulk 1 up",
        "bulk1_down" => "bulk 1 down",
        "bulk8_up" => "bulk 8 up",
        "bulk8_down" => "bulk 8 down",
        "pg1" => "pgbench c1",
        "pg16" => "pgbench c16",
        "conn" => "new conn/s",
        _ => key,
    }
}

fn value(names: &[String], rows: &[Row], key: &str, path: &str) -> Option<f64> {
    let i = names.iter().position(|n| n == path)?;
    rows.iter()
        .find(|r| r.key == key)?
        .values
        .get(i)
        .copied()
        .flatten()
}

#[allow(clippy::too_many_arguments)]
fn render(
    a: &Args,
    plan: &Plan,
    idle_n: usize,
    names: &[String],
    rows: &[Row],
    notes: &[String],
    rathole_version: Option<&str>,
    started: Instant,
) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## Tunnel benchmark{}\n",
        if a.quick { " (--quick)" } else { "" }
    );
    let _ = writeln!(
        md,
        "Loopback, {} CPUs, Linux {}, {}. One run; paths interleaved per measurement. \
         Each cell: absolute figure (ratio to direct). Bulk {} s per figure after {:.1} s warm-up; \
         pgbench -T {}; new connections over {} s; memory: VmRSS of the path's processes \
         (relay-outer + relay-inner; sshd + ssh; rathole server + client) with {idle_n} idle \
         streams open, minus before, per stream.\n",
        cmd_line("nproc", &[]),
        cmd_line("uname", &["-r"]),
        cmd_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        plan.bulk.as_secs(),
        plan.warm.as_secs_f64(),
        plan.pgbench_secs,
        plan.conn_secs.as_secs(),
    );
    let _ = write!(md, "| | ");
    let _ = writeln!(md, "{} |", names.join(" | "));
    let _ = writeln!(md, "|---|{}", "---:|".repeat(names.len()));
    for r in rows {
        let direct = r.values.first().copied().flatten();
        let _ = write!(md, "| {} ({}) |", r.label, r.unit);
        for (i, v) in r.values.iter().enumerate() {
            let cell = match v {
                None => "—".to_string(),
                Some(v) if i == 0 || !r.ratio => fmt_num(*v),
                Some(v) => match direct {
                    Some(d) if d > 0.0 => format!("{} ({})", fmt_num(*v), fmt_ratio(v / d)),
                    _ => fmt_num(*v),
                },
            };
            let _ = write!(md, " {cell} |");
        }
        md.push('\n');
    }

    // Routy's other ways out, against Routy over TLS in this run.
    let others: Vec<usize> = ["Routy WebSocket", "Routy TLS via HTTP proxy"]
        .iter()
        .filter_map(|n| names.iter().position(|x| x == n))
        .collect();
    if let (Some(tls), false) = (
        names.iter().position(|x| x == "Routy TLS"),
        others.is_empty(),
    ) {
        let _ = writeln!(
            md,
            "\n### Routy's other ways out against Routy TLS (ratios in this run)\n"
        );
        let _ = write!(md, "| |");
        for &i in &others {
            let _ = write!(md, " {} |", names[i]);
        }
        let _ = writeln!(md, "\n|---|{}", "---:|".repeat(others.len()));
        for r in rows.iter().filter(|r| r.ratio) {
            let _ = write!(md, "| {} |", r.label);
            for &i in &others {
                let cell = match (
                    r.values.get(i).copied().flatten(),
                    r.values.get(tls).copied().flatten(),
                ) {
                    (Some(v), Some(t)) if t > 0.0 => fmt_ratio(v / t),
                    _ => "—".into(),
                };
                let _ = write!(md, " {cell} |");
            }
            md.push('\n');
        }
    }

    // Targets of issue 5, for each Routy column.
    let routys: Vec<&String> = names.iter().filter(|n| n.starts_with("Routy")).collect();
    let has = |n: &str| names.iter().any(|x| x == n);
    if !routys.is_empty() {
        let _ = writeln!(md, "\n### Targets (ratios in this run)\n");
        let _ = write!(md, "| target |");
        for r in &routys {
            let _ = write!(md, " {r} |");
        }
        let _ = writeln!(md, "\n|---|{}", "---|".repeat(routys.len()));
        type Check<'a> = (&'a str, Vec<(&'a str, &'a str)>, f64, bool);
        // (label, [(row key, versus path)], threshold, lower-is-better)
        let mut checks: Vec<Check> = vec![];
        if has("ssh -R") {
            checks.push((
                "bulk 1 stream ≥ 2x ssh -R (up / down)",
                vec![("bulk1_up", "ssh -R"), ("bulk1_down", "ssh -R")],
                2.0,
                false,
            ));
            checks.push((
                "bulk 8 streams ≥ 3x ssh -R (up / down)",
                vec![("bulk8_up", "ssh -R"), ("bulk8_down", "ssh -R")],
                3.0,
                false,
            ));
            checks.push((
                "pgbench -S -c16 ≥ 1.5x ssh -R",
                vec![("pg16", "ssh -R")],
                1.5,
                false,
            ));
        }
        if has("rathole") {
            checks.push((
                "pgbench -S -c16 ≥ 1.2x rathole",
                vec![("pg16", "rathole")],
                1.2,
                false,
            ));
        }
        checks.push((
            "pgbench -S -c16 ≥ 0.6x direct",
            vec![("pg16", "direct")],
            0.6,
            false,
        ));
        checks.push((
            "new connections/s ≥ 0.5x direct",
            vec![("conn", "direct")],
            0.5,
            false,
        ));
        checks.push((
            "≤ 16 KiB per idle stream, both relays",
            vec![("mem", "")],
            16.0,
            true,
        ));
        for (label, parts, threshold, lower) in checks {
            let _ = write!(md, "| {label} |");
            for r in &routys {
                let mut shown = Vec::new();
                let mut met = true;
                for (key, vs) in &parts {
                    let x = value(names, rows, key, r);
                    let q = if vs.is_empty() {
                        x
                    } else {
                        match (x, value(names, rows, key, vs)) {
                            (Some(x), Some(y)) if y > 0.0 => Some(x / y),
                            _ => None,
                        }
                    };
                    match q {
                        Some(q) => {
                            shown.push(if vs.is_empty() {
                                format!("{} KiB", fmt_num(q))
                            } else {
                                fmt_ratio(q)
                            });
                            met &= if lower {
                                q <= threshold
                            } else {
                                q >= threshold
                            };
                        }
                        None => {
                            shown.push("—".into());
                            met = false;
                        }
                    }
                }
                let _ = write!(
                    md,
                    " {} {} |",
                    shown.join(" / "),
                    if met { "met" } else { "**not met**" }
                );
            }
            md.push('\n');
        }
        // Every row against the competitors, for reading at a glance.
        for vs in ["ssh -R", "rathole", "2x socat, plain TCP"] {
            if !has(vs) {
                continue;
            }
            for r in &routys {
                let parts: Vec<String> = rows
                    .iter()
                    .filter(|row| row.ratio)
                    .filter_map(|row| {
                        let x = value(names, rows, row.key, r)?;
                        let y = value(names, rows, row.key, vs)?;
                        (y > 0.0).then(|| format!("{} {}", short(row.key), fmt_ratio(x / y)))
                    })
                    .collect();
                let _ = writeln!(md, "\n{r} / {vs}: {}", parts.join(", "));
            }
        }
    }

    let _ = writeln!(md, "\n### Notes\n");
    let _ = writeln!(md, "- Versions: {}", paths::ssh_version());
    if let Some(v) = rathole_version {
        let _ = writeln!(md, "- rathole: {v}");
    }
    let _ = writeln!(
        md,
        "- Memory was measured first, on processes that had carried no bulk traffic yet; \
         bulk is counted by the client (bytes written or read) after a warm-up; \"up\" is client → service (through the \
         tunnel from relay-outer to relay-inner), \"down\" the reverse."
    );
    if names.iter().any(|n| n == "2x socat, plain TCP") {
        let _ = writeln!(
            md,
            "- \"2x socat, plain TCP\" is a reference, not a competitor: two socat forwarders \
             in series, no encryption, no multiplexing, one process per connection. It is what \
             the two extra loopback hops of any relay pair cost on their own; no memory figure \
             (a process per connection)."
        );
    }
    for n in notes {
        let _ = writeln!(md, "- {n}");
    }
    let _ = writeln!(md, "- Run took {:.0} s.", started.elapsed().as_secs_f64());
    md
}

fn to_json(names: &[String], rows: &[Row], quick: bool) -> serde_json::Value {
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let direct = r.values.first().copied().flatten();
            serde_json::json!({
                "key": r.key,
                "label": r.label,
                "unit": r.unit,
                "ratio_to_direct": r.ratio,
                "values": names.iter().zip(&r.values).map(|(n, v)| (n.clone(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
                "ratios": names.iter().zip(&r.values).map(|(n, v)| {
                    let q = match (r.ratio, v, direct) {
                        (true, Some(v), Some(d)) if d > 0.0 => Some(v / d),
                        _ => None,
                    };
                    (n.clone(), serde_json::json!(q))
                }).collect::<serde_json::Map<_, _>>(),
            })
        })
        .collect();
    serde_json::json!({ "quick": quick, "paths": names, "rows": rows })
}

/// Renders the PNG with `bench/chart.py` (python3 + matplotlib; installs matplotlib with
/// pip if it is missing).
fn chart(json: &std::path::Path, png: &std::path::Path) -> Result<(), String> {
    let script = [
        PathBuf::from("bench/chart.py"),
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/chart.py"),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .unwrap_or_else(|| PathBuf::from("bench/chart.py"));
    if !script.is_file() {
        return Err(format!("{} not found", script.display()));
    }
    let has_mpl = || {
        Command::new("python3")
            .args(["-c", "import matplotlib"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if !has_mpl() {
        eprintln!("matplotlib missing: python3 -m pip install matplotlib");
        let _ = routy_e2e::run_timeout(
            Command::new("python3").args(["-m", "pip", "install", "-q", "matplotlib"]),
            None,
            Duration::from_secs(600),
        );
        if !has_mpl() {
            return Err(
                "python3 with matplotlib is not available and could not be installed".into(),
            );
        }
    }
    let out = routy_e2e::run_timeout(
        Command::new("python3").arg(&script).arg(json).arg(png),
        None,
        Duration::from_secs(120),
    )?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "chart.py failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
