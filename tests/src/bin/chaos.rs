//! The chaos runner's command line (see `routy_e2e::chaos`): faults drawn from a seed
//! while the CDC pipeline and a listener carry load; prints a table of faults and
//! outcomes and exits 1 when a promise was broken. Needs root, like the tests.
//!
//! ```sh
//! cargo build --release --workspace --bins
//! target/release/chaos [--seed N] [--secs 1800] [--faults kill_inner,link_flap,...] [--out FILE]
//! ```

use std::time::Duration;

use routy_e2e::chaos::{run, ChaosOpts, FAULTS};

const USAGE: &str =
    "usage: chaos [--seed N] [--secs S] [--faults NAME,NAME...] [--catch-up-secs S] [--out FILE]";

fn main() {
    let mut opts = ChaosOpts {
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
        duration: Duration::from_secs(120),
        faults: Vec::new(),
        catch_up: Duration::from_secs(300),
    };
    let mut out = None;
    let mut it = std::env::args().skip(1);
    let fail = |msg: String| -> ! {
        eprintln!("{msg}\n{USAGE}\nfaults: {}", FAULTS.join(", "));
        std::process::exit(2)
    };
    while let Some(k) = it.next() {
        if k == "--help" || k == "-h" {
            println!("{USAGE}\nfaults: {}", FAULTS.join(", "));
            return;
        }
        let v = it
            .next()
            .unwrap_or_else(|| fail(format!("{k} needs a value")));
        let num = |v: &str| {
            v.parse::<u64>()
                .unwrap_or_else(|_| fail(format!("{k}: {v:?} is not a number")))
        };
        match k.as_str() {
            "--seed" => opts.seed = num(&v),
            "--secs" => opts.duration = Duration::from_secs(num(&v)),
            "--catch-up-secs" => opts.catch_up = Duration::from_secs(num(&v)),
            "--faults" => opts.faults = v.split(',').map(|s| s.trim().to_string()).collect(),
            "--out" => out = Some(v),
            _ => fail(format!("unknown argument {k}")),
        }
    }
    if let Some(bad) = opts.faults.iter().find(|f| !FAULTS.contains(&f.as_str())) {
        fail(format!("unknown fault {bad}"));
    }
    eprintln!("chaos: seed {} for {:?}", opts.seed, opts.duration);
    let report = run(&opts);
    let md = report.markdown();
    println!("{md}");
    if let Some(path) = out {
        std::fs::write(&path, &md).unwrap_or_else(|e| fail(format!("write {path}: {e}")));
    }
    if !report.passed() {
        eprintln!("chaos: FAILED; run again with --seed {}", report.seed);
        std::process::exit(1);
    }
}
