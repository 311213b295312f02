//! Memory of the relays through one large source transaction: for each size, one
//! `INSERT ... SELECT generate_series` of that many rows goes through the whole CDC
//! pipeline into the target while the relays' resident memory is sampled; then the
//! pipeline idles and the memory left is read. Starts everything itself on loopback
//! (needs root, like the tests).
//!
//! ```sh
//! cargo build --release --workspace --bins
//! target/release/cdc-memory [--rows 200000,2000000,10000000] [--idle-secs 20] [--out FILE]
//! ```
//!
//! Prints a Markdown table (MB = 10^6 bytes); with `--out FILE` also writes it there.

use std::time::{Duration, Instant};

use routy_e2e::cdc::{CdcRig, RigOpts};
use routy_e2e::{proc_memory, try_wait_until};

const USAGE: &str = "usage: cdc-memory [--rows N[,N...]] [--idle-secs S] [--out FILE]";

struct Args {
    rows: Vec<u64>,
    idle: Duration,
    out: Option<String>,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        rows: vec![200_000, 2_000_000, 10_000_000],
        idle: Duration::from_secs(20),
        out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "--help" || k == "-h" {
            return Err(USAGE.into());
        }
        let v = it
            .next()
            .ok_or_else(|| format!("{k} needs a value\n{USAGE}"))?;
        match k.as_str() {
            "--rows" => {
                a.rows = v
                    .split(',')
                    .map(|n| n.trim().parse::<u64>())
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("--rows {v}: {e}"))?
            }
            "--idle-secs" => {
                a.idle = Duration::from_secs(v.parse().map_err(|e| format!("--idle-secs: {e}"))?)
            }
            "--out" => a.out = Some(v),
            _ => return Err(format!("unknown argument {k}\n{USAGE}")),
        }
    }
    Ok(a)
}

fn mb(b: u64) -> String {
    format!("{:.0}", b as f64 / 1e6)
}

struct Row {
    rows: u64,
    secs: f64,
    outer_before: u64,
    outer_peak: u64,
    outer_idle: u64,
    inner_peak: u64,
    inner_idle: u64,
}

fn one(rows: u64, idle: Duration) -> Row {
    let rig = CdcRig::start(RigOpts {
        setup_sql: "CREATE TABLE public.big (id bigint PRIMARY KEY, v text NOT NULL);".into(),
        tables: vec!["public.big".into()],
        spool_max: "64GiB".into(),
        ..RigOpts::default()
    });
    rig.wait_shipping();
    let (outer, inner) = (rig.outer().proc.pid(), rig.inner().proc.pid());
    std::thread::sleep(Duration::from_secs(2));
    let outer_before = proc_memory(outer).0;
    let started = Instant::now();
    // psql without the tests' two-minute limit: 20 million rows take longer.
    let st = std::process::Command::new(routy_e2e::pg_bin("psql"))
        .args(["-X", "-q", "-h", "127.0.0.1", "-p", &rig.source.port().to_string()])
        .args(["-U", "postgres", "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-c"])
        .arg(format!(
            "INSERT INTO public.big SELECT g, md5(g::text) || md5((g + 1)::text) FROM generate_series(1, {rows}) g"
        ))
        .status()
        .expect("psql");
    assert!(st.success(), "the large transaction failed");
    try_wait_until(
        Duration::from_secs(1800),
        "the target has every row",
        || {
            rig.target
                .try_psql("SELECT count(*) FROM public.big")
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                == Some(rows)
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let secs = started.elapsed().as_secs_f64();
    let (_, outer_peak) = proc_memory(outer);
    let (_, inner_peak) = proc_memory(inner);
    std::thread::sleep(idle);
    Row {
        rows,
        secs,
        outer_before,
        outer_peak,
        outer_idle: proc_memory(outer).0,
        inner_peak,
        inner_idle: proc_memory(inner).0,
    }
}

fn main() {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let mut out = format!(
        "| rows in one transaction | through in | relay-outer before | relay-outer peak | relay-outer after {}s idle | relay-inner peak | relay-inner after idle |\n| --- | --- | --- | --- | --- | --- | --- |\n",
        a.idle.as_secs()
    );
    for n in &a.rows {
        let r = one(*n, a.idle);
        out.push_str(&format!(
            "| {} | {:.1} s | {} MB | {} MB | {} MB | {} MB | {} MB |\n",
            r.rows,
            r.secs,
            mb(r.outer_before),
            mb(r.outer_peak),
            mb(r.outer_idle),
            mb(r.inner_peak),
            mb(r.inner_idle)
        ));
        eprint!("{out}");
    }
    println!("{out}");
    if let Some(path) = a.out {
        std::fs::write(&path, &out).unwrap_or_else(|e| panic!("write {path}: {e}"));
    }
}
