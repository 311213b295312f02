//! First-copy benchmark: one large table copied by `snapshot: initial` through Routy
//! (relay-inner's parallel ranges, the spool, the TLS tunnel, relay-outer's store and the
//! PostgreSQL sink) next to `pg_dump -t TABLE | psql` between the same two clusters, in
//! the same run. Starts everything itself on loopback (needs root, like the tests).
//!
//! ```sh
//! cargo build --release --workspace --bins
//! target/release/bench-copy [--rows 2000000] [--parallelism 4] [--out FILE]
//! ```
//!
//! Prints a Markdown table; with `--out FILE` also writes it there.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use routy_e2e::cdc::{CdcRig, RigOpts};
use routy_e2e::{pg_bin, try_wait_until};

const USAGE: &str = "\
Usage: bench-copy [--rows N] [--parallelism N] [--relay-tmpfs SIZE] [--out FILE]

First-copy benchmark: a table of N rows (about 250 bytes each) copied by Routy's
snapshot: initial (parallel ranges, spool, TLS tunnel, store, PostgreSQL sink) next to
pg_dump -t TABLE | psql between the same two clusters, in the same run; rows/s and MB/s
from start to the last row committed in the target. Needs root (PostgreSQL runs as the
postgres user). Build first: cargo build --release --workspace --bins

Options:
  --rows N         rows in the table (default 2000000)
  --parallelism N  relay-inner's snapshot_parallelism (default 4)
  --relay-tmpfs SIZE
                   put the spool and the store on tmpfs filesystems of SIZE each
                   (e.g. 8g), as if the relays had disks of their own: here both
                   databases and both relays share one disk
  --out FILE       also write the Markdown table to FILE
  -h, --help       print this text and exit
";

struct Args {
    rows: u64,
    parallelism: u32,
    relay_tmpfs: Option<String>,
    out: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        rows: 2_000_000,
        parallelism: 4,
        relay_tmpfs: None,
        out: None,
    };
    let mut it = std::env::args().skip(1);
    let fail = |m: String| -> ! {
        eprintln!("bench-copy: {m}\n\n{USAGE}");
        std::process::exit(2)
    };
    while let Some(k) = it.next() {
        match k.as_str() {
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0)
            }
            "--rows" | "--parallelism" | "--relay-tmpfs" | "--out" => {
                let v = it
                    .next()
                    .unwrap_or_else(|| fail(format!("{k} needs a value")));
                match k.as_str() {
                    "--rows" => {
                        a.rows = v
                            .parse()
                            .unwrap_or_else(|_| fail(format!("--rows: {v:?} is not a number")))
                    }
                    "--parallelism" => {
                        a.parallelism = v.parse().unwrap_or_else(|_| {
                            fail(format!("--parallelism: {v:?} is not a number"))
                        })
                    }
                    "--relay-tmpfs" => a.relay_tmpfs = Some(v),
                    _ => a.out = Some(v),
                }
            }
            _ => fail(format!("unknown argument {k:?}")),
        }
    }
    a
}

/// One `psql` kept open for polling the target.
struct Probe {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl Probe {
    fn open(port: u16) -> Probe {
        let mut child = Command::new(pg_bin("psql"))
            .args([
                "-X",
                "-q",
                "-t",
                "-A",
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .args(["-U", "postgres", "-d", "postgres"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("psql");
        let stdin = child.stdin.take().expect("psql stdin");
        let out = std::io::BufReader::new(child.stdout.take().expect("psql stdout"));
        Probe { child, stdin, out }
    }

    /// One query's one-line answer.
    fn query(&mut self, sql: &str) -> String {
        use std::io::{BufRead, Write};
        writeln!(self.stdin, "{sql}").expect("write to psql");
        self.stdin.flush().expect("flush psql");
        let mut line = String::new();
        self.out.read_line(&mut line).expect("read psql");
        line.trim().to_string()
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const TABLE_SQL: &str =
    "CREATE TABLE public.big (id bigint PRIMARY KEY, n int NOT NULL, t timestamptz NOT NULL, pad text NOT NULL);";

fn main() {
    let a = args();
    if !routy_e2e::is_root() {
        eprintln!("bench-copy runs PostgreSQL as the postgres user: run it as root");
        std::process::exit(2);
    }
    eprintln!("loading {} rows", a.rows);
    let rig = CdcRig::start(RigOpts {
        setup_sql: format!(
            "{TABLE_SQL} INSERT INTO public.big SELECT g, g % 1000, now() - g * interval '1 second', \
             repeat(md5(g::text), 7) FROM generate_series(1, {}) g; CHECKPOINT;",
            a.rows
        ),
        tables: vec!["public.big".into()],
        source_extra: format!("      snapshot_parallelism: {}\n", a.parallelism),
        spool_tmpfs: a.relay_tmpfs.clone(),
        store_tmpfs: a.relay_tmpfs.clone(),
        ..RigOpts::default()
    });
    // The rig starts the relays once the table is loaded: the copy starts now. The end:
    // the target's table has its primary key, which the sink adds in the transaction
    // after the copy's last row (asked on one open connection: a count(*) every 50 ms
    // from a new psql each time took a good part of a core from the copy it measured).
    let t = Instant::now();
    let pids = [&rig.inner, &rig.outer].map(|r| r.as_ref().map_or(0, |r| r.proc.pid()));
    let cpu0 = pids.map(routy_e2e::cpu_times);
    let mut probe = Probe::open(rig.target.port());
    try_wait_until(Duration::from_secs(3600), "Routy copied the table", || {
        probe.query(
            "SELECT count(*) FROM pg_index WHERE indrelid = to_regclass('public.big') AND indisprimary;",
        ) == "1"
    })
    .unwrap();
    let routy = t.elapsed().as_secs_f64();
    // The relays' CPU through the copy, user and system (the kernel's share: their
    // writes into the page cache, sockets, fsyncs).
    let cpu = [0, 1].map(|i| {
        let (user, system) = routy_e2e::cpu_times(pids[i]);
        (user - cpu0[i].0, system - cpu0[i].1)
    });
    assert_eq!(
        rig.target.psql("SELECT count(*) FROM public.big"),
        a.rows.to_string(),
        "the target has every row once its key is there"
    );
    let bytes: f64 = rig
        .source
        .psql("SELECT pg_relation_size('public.big')")
        .parse()
        .unwrap_or(0.0);
    eprintln!("Routy: {routy:.1} s; now pg_dump -t public.big | psql");
    rig.target.psql("CREATE DATABASE dumped");
    let t = Instant::now();
    let mut dump = Command::new(pg_bin("pg_dump"))
        .args(["-h", "127.0.0.1", "-p", &rig.source.port().to_string()])
        .args(["-U", "postgres", "-t", "public.big", "postgres"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("pg_dump");
    let st = Command::new(pg_bin("psql"))
        .args([
            "-X",
            "-q",
            "-h",
            "127.0.0.1",
            "-p",
            &rig.target.port().to_string(),
        ])
        .args(["-U", "postgres", "-d", "dumped", "-v", "ON_ERROR_STOP=1"])
        .stdin(dump.stdout.take().expect("pg_dump stdout"))
        .stdout(Stdio::null())
        .status()
        .expect("psql");
    assert!(
        st.success() && dump.wait().expect("pg_dump").success(),
        "pg_dump | psql failed"
    );
    let dumped = t.elapsed().as_secs_f64();
    let row = |what: &str, secs: f64| {
        format!(
            "| {what} | {secs:.1} | {:.0} | {:.1} | {:.2}x |\n",
            a.rows as f64 / secs,
            bytes / 1e6 / secs,
            dumped / secs
        )
    };
    let table = format!(
        "First copy of {} rows ({:.0} MB in the source's heap), 2 cores, loopback\n\n\
         | path | seconds | rows/s | MB/s | speed vs pg_dump \\| psql |\n| --- | --- | --- | --- | --- |\n{}{}",
        a.rows,
        bytes / 1e6,
        row(
            &format!(
                "Routy snapshot: initial (snapshot_parallelism {}, through spool, TLS tunnel, store, PostgreSQL sink{})",
                a.parallelism,
                if a.relay_tmpfs.is_some() {
                    "; spool and store on tmpfs"
                } else {
                    ""
                }
            ),
            routy
        ),
        row("pg_dump -t public.big | psql (direct)", dumped),
    );
    let table = format!(
        "{table}\nCPU through Routy's copy: relay-inner {:.1} s user + {:.1} s system, \
         relay-outer {:.1} s user + {:.1} s system\n",
        cpu[0].0, cpu[0].1, cpu[1].0, cpu[1].1
    );
    print!("{table}");
    if let Some(f) = a.out {
        std::fs::write(&f, &table).expect("write --out");
    }
}
