//! The chaos runner: both relays, a source and a target PostgreSQL (relay-inner and the
//! source in one network namespace, relay-outer and the target in another) under
//! continuous mixed writes and client queries through a listener, while faults are
//! injected one after another in an order drawn from a seed. At the end every published
//! table is compared between source and target, no transaction may have been applied
//! twice and no client query answered wrongly.
//!
//! Faults: SIGKILL and SIGSTOP/SIGCONT of either relay, SIGHUP (reload) of either, a link
//! flap, a source and a target restart, the walsender stopped (SIGSTOP), a full spool and
//! a full store filesystem (each on a small tmpfs, filled by a file that is removed
//! again), and a large source transaction. Packet loss and delay (netem) are not among
//! them: the `sch_netem` qdisc is not available on these machines ("Specified qdisc kind
//! is unknown").
//!
//! Faults are dealt as shuffled decks (every kind once, in a random order, then again).
//! The same seed gives the same faults with the same durations in the same order; the
//! timing of the load around them is not reproducible, so a seed that fails is worth
//! running again a few times.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::cdc::{CdcRig, RigOpts};
use crate::{netns_cmd, pg_bin, psql_in, try_wait_until};

/// What to run.
#[derive(Debug, Clone)]
pub struct ChaosOpts {
    /// Seed of the fault sequence.
    pub seed: u64,
    /// How long faults are injected.
    pub duration: Duration,
    /// Fault kinds to draw from (names as in [`FAULTS`]); empty: all.
    pub faults: Vec<String>,
    /// How long the pipeline may take to catch up at the end.
    pub catch_up: Duration,
}

/// Every fault kind, by name.
pub const FAULTS: &[&str] = &[
    "kill_inner",
    "kill_outer",
    "stop_inner",
    "stop_outer",
    "reload_inner",
    "reload_outer",
    "link_flap",
    "restart_source",
    "restart_target",
    "stop_walsender",
    "full_spool",
    "full_store",
    "big_transaction",
];

/// What a run found.
#[derive(Debug, Default)]
pub struct ChaosReport {
    /// The seed.
    pub seed: u64,
    /// Faults injected, by kind.
    pub injected: BTreeMap<&'static str, u32>,
    /// Source transactions committed by the writers.
    pub transactions: u64,
    /// Client queries through the listener: answered right, failed (refused or cut
    /// during a fault), answered wrongly.
    pub queries_ok: u64,
    /// Queries that failed.
    pub queries_failed: u64,
    /// Queries answered wrongly (must be 0).
    pub queries_wrong: u64,
    /// Seconds from the end of the faults until source and target were identical, or
    /// `None` when they never were.
    pub caught_up_secs: Option<f64>,
    /// Tables that differ at the end (must be empty).
    pub differing: Vec<String>,
    /// Audit rows applied twice on the target (must be 0).
    pub duplicates: u64,
    /// Largest resident memory seen, bytes, (relay-inner, relay-outer).
    pub max_rss: (u64, u64),
    /// Most open file descriptors seen, (relay-inner, relay-outer).
    pub max_fds: (u64, u64),
    /// Wall time of the whole run.
    pub wall: Duration,
}

impl ChaosReport {
    /// Whether the run kept every promise.
    pub fn passed(&self) -> bool {
        self.caught_up_secs.is_some()
            && self.differing.is_empty()
            && self.duplicates == 0
            && self.queries_wrong == 0
    }

    /// The report as Markdown.
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "chaos run, seed {}: {}\n\n| fault | injected |\n| --- | ---: |\n",
            self.seed,
            if self.passed() { "PASSED" } else { "FAILED" }
        );
        for (k, n) in &self.injected {
            s.push_str(&format!("| {k} | {n} |\n"));
        }
        s.push_str(&format!(
            "\n| outcome | |\n| --- | --- |\n\
             | source transactions committed | {} |\n\
             | client queries through the listener: right / failed during faults / wrong | {} / {} / {} |\n\
             | source and target identical after the faults | {} |\n\
             | tables differing | {} |\n\
             | transactions applied twice | {} |\n\
             | peak RSS relay-inner / relay-outer | {:.0} MB / {:.0} MB |\n\
             | peak open fds relay-inner / relay-outer | {} / {} |\n\
             | wall time | {:.0} s |\n",
            self.transactions,
            self.queries_ok,
            self.queries_failed,
            self.queries_wrong,
            self.caught_up_secs
                .map_or("never".to_string(), |s| format!("in {s:.1} s")),
            if self.differing.is_empty() {
                "none".to_string()
            } else {
                self.differing.join(", ")
            },
            self.duplicates,
            self.max_rss.0 as f64 / 1e6,
            self.max_rss.1 as f64 / 1e6,
            self.max_fds.0,
            self.max_fds.1,
            self.wall.as_secs_f64()
        ));
        s
    }
}

/// SplitMix64: a small, seedable generator (no dependency, same sequence everywhere).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }
}

const SETUP: &str = "
CREATE TABLE public.acct (id int PRIMARY KEY, balance bigint NOT NULL, note text, big text);
ALTER TABLE public.acct ALTER COLUMN big SET STORAGE EXTERNAL;
INSERT INTO public.acct SELECT g, 0, 'init', repeat(md5(g::text), 200) FROM generate_series(1, 500) g;
CREATE TABLE public.audit (txn bigint, at timestamptz, note text);
ALTER TABLE public.audit REPLICA IDENTITY FULL;
CREATE TABLE public.item (id bigserial PRIMARY KEY, v text NOT NULL);
CREATE TABLE public.bulk (id bigint PRIMARY KEY, v text NOT NULL);
CREATE TABLE public.kv (k int PRIMARY KEY, v text NOT NULL);
INSERT INTO public.kv SELECT g, 'v' || (g * 7919)::text FROM generate_series(1, 1000) g;
";

const TABLES: [&str; 4] = ["public.acct", "public.audit", "public.item", "public.bulk"];

/// One transaction: money moves between two accounts (updates that leave the TOASTed
/// `big` column alone), one audit row (no key: a repeat shows), an item inserted and
/// an older one deleted.
const SCRIPT: &str = "
\\set a random(1, 500)
\\set b random(1, 500)
BEGIN;
UPDATE public.acct SET balance = balance - 1, note = 'out' WHERE id = :a;
UPDATE public.acct SET balance = balance + 1, note = 'in' WHERE id = :b;
INSERT INTO public.audit VALUES (txid_current(), now(), :a || '->' || :b);
INSERT INTO public.item (v) VALUES (md5(random()::text));
DELETE FROM public.item WHERE id = (SELECT min(id) FROM public.item) AND (SELECT count(*) FROM public.item) > 200;
COMMIT;
";

/// Runs `opts` and returns what it found; panics only when the rig cannot start.
pub fn run(opts: &ChaosOpts) -> ChaosReport {
    let started = Instant::now();
    let kinds: Vec<&'static str> = if opts.faults.is_empty() {
        FAULTS.to_vec()
    } else {
        FAULTS
            .iter()
            .copied()
            .filter(|f| opts.faults.iter().any(|w| w == f))
            .collect()
    };
    assert!(
        !kinds.is_empty(),
        "no known fault in {:?}; known: {FAULTS:?}",
        opts.faults
    );
    let mut rig = CdcRig::start(RigOpts {
        netns: true,
        setup_sql: SETUP.into(),
        tables: TABLES.iter().map(|s| s.to_string()).collect(),
        source_extra: "      heartbeat: 1s\n      receive_timeout: 5s\n".into(),
        spool_max: "1GiB".into(),
        spool_tmpfs: Some("64m".into()),
        store_tmpfs: Some("64m".into()),
        retention: "30s".into(),
        ..RigOpts::default()
    });
    rig.wait_shipping();
    rig.wait_in_sync(&TABLES, crate::cdc::CATCH_UP);

    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    let writer = spawn_writer(&rig, stop.clone(), committed.clone());
    let queries = Arc::new(Queries::default());
    let client = spawn_client(&rig, stop.clone(), queries.clone());
    let mut report = ChaosReport {
        seed: opts.seed,
        ..ChaosReport::default()
    };
    let mut rng = Rng(opts.seed);
    let mut samples = Sampler::default();
    let end = Instant::now() + opts.duration;
    // Faults come as shuffled decks of every kind, so a short run still meets each.
    let mut deck: Vec<&'static str> = Vec::new();
    while Instant::now() < end {
        if deck.is_empty() {
            deck = kinds.clone();
            for i in (1..deck.len()).rev() {
                let j = rng.range(0, i as u64) as usize;
                deck.swap(i, j);
            }
        }
        let kind = deck.pop().expect("refilled above");
        eprintln!("chaos: {:>6.1}s {kind}", started.elapsed().as_secs_f64());
        inject(&mut rig, kind, &mut rng);
        *report.injected.entry(kind).or_default() += 1;
        samples.sample(&rig);
        let pause = rng.millis(500, 3000);
        let until = Instant::now() + pause;
        while Instant::now() < until {
            std::thread::sleep(Duration::from_millis(250));
        }
        samples.sample(&rig);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = writer.join();
    let _ = client.join();
    report.transactions = committed.load(Ordering::Relaxed);
    report.queries_ok = queries.ok.load(Ordering::Relaxed);
    report.queries_failed = queries.failed.load(Ordering::Relaxed);
    report.queries_wrong = queries.wrong.load(Ordering::Relaxed);

    let faults_over = Instant::now();
    let synced = try_wait_until(opts.catch_up, "source and target identical", || {
        samples.sample(&rig);
        rig.in_sync(&TABLES)
    });
    report.caught_up_secs = synced.is_ok().then(|| faults_over.elapsed().as_secs_f64());
    for t in TABLES {
        if CdcRig::digest(&rig.source, t) != CdcRig::digest(&rig.target, t) {
            report.differing.push(t.to_string());
        }
    }
    report.duplicates = rig
        .target
        .try_psql(
            "SELECT count(*) FROM (SELECT txn FROM public.audit GROUP BY txn HAVING count(*) > 1) d",
        )
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(u64::MAX);
    report.max_rss = samples.rss;
    report.max_fds = samples.fds;
    report.wall = started.elapsed();
    if !report.passed() {
        for r in [&rig.inner, &rig.outer].into_iter().flatten() {
            eprintln!(
                "--- {} log ---\n{}",
                r.proc.name(),
                crate::log_tail(&r.proc.log(), 80)
            );
        }
    }
    report
}

/// Injects one fault and heals it before returning.
fn inject(rig: &mut CdcRig, kind: &str, rng: &mut Rng) {
    match kind {
        "kill_inner" => {
            rig.kill_inner();
            std::thread::sleep(rng.millis(0, 2000));
            rig.start_inner();
        }
        "kill_outer" => {
            rig.kill_outer();
            std::thread::sleep(rng.millis(0, 2000));
            rig.start_outer();
        }
        "stop_inner" | "stop_outer" => {
            let held = rng.millis(500, 6000);
            let relay = if kind == "stop_inner" {
                rig.inner.as_mut()
            } else {
                rig.outer.as_mut()
            };
            if let Some(r) = relay {
                r.proc.signal(libc::SIGSTOP);
                std::thread::sleep(held);
                r.proc.signal(libc::SIGCONT);
            }
        }
        "reload_inner" | "reload_outer" => {
            let relay = if kind == "reload_inner" {
                rig.inner.as_mut()
            } else {
                rig.outer.as_mut()
            };
            if let Some(r) = relay {
                r.proc.signal(libc::SIGHUP);
            }
        }
        "link_flap" => {
            let down = rng.millis(500, 3500);
            if let Some(pair) = rig.pair.as_ref() {
                pair.link_down();
                std::thread::sleep(down);
                pair.link_up();
            }
        }
        "restart_source" => rig.source.restart(),
        "restart_target" => rig.target.restart(),
        "stop_walsender" => {
            let held = rng.millis(1000, 8000);
            let pids = rig
                .source
                .try_psql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'walsender'")
                .unwrap_or_default();
            let pids: Vec<i32> = pids.lines().filter_map(|l| l.trim().parse().ok()).collect();
            for &p in &pids {
                signal(p, libc::SIGSTOP);
            }
            std::thread::sleep(held);
            for &p in &pids {
                signal(p, libc::SIGCONT);
            }
        }
        "full_spool" | "full_store" => {
            let held = rng.millis(1000, 6000);
            let dir = if kind == "full_spool" {
                rig.spool_dir.clone()
            } else {
                rig.store_dir.clone()
            };
            let filler = fill(&dir);
            std::thread::sleep(held);
            let _ = std::fs::remove_file(filler);
        }
        "big_transaction" => {
            let rows = rng.range(20_000, 100_000);
            let base: u64 = rig
                .source
                .try_psql("SELECT coalesce(max(id), 0) FROM public.bulk")
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            let _ = rig.source.try_psql(&format!(
                "INSERT INTO public.bulk SELECT g, md5(g::text) FROM generate_series({}, {}) g",
                base + 1,
                base + rows
            ));
        }
        other => panic!("unknown fault {other}"),
    }
}

fn signal(pid: i32, sig: i32) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// Fills the filesystem of `dir` with a file; returns its path.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("chaos-filler");
    if let Ok(mut f) = std::fs::File::create(&path) {
        // Bounded: the tmpfs is 64 MiB. Then the last bytes too: freeing space must not
        // need any.
        for size in [1 << 20, 4096, 1] {
            let chunk = vec![0u8; size];
            for _ in 0..(64 << 20) / size {
                if f.write_all(&chunk).is_err() {
                    break;
                }
            }
        }
    }
    path
}

#[derive(Default)]
struct Queries {
    ok: AtomicU64,
    failed: AtomicU64,
    wrong: AtomicU64,
}

/// Runs the write load on the source until `stop`, starting pgbench again whenever its
/// clients died (a source restart).
fn spawn_writer(rig: &CdcRig, stop: Arc<AtomicBool>, committed: Arc<AtomicU64>) -> JoinHandle<()> {
    let pair = rig.pair.as_ref().expect("chaos runs in namespaces");
    let (ns, ip, port) = (
        pair.inside_ns().to_string(),
        pair.inside_ip().to_string(),
        rig.source.port(),
    );
    let dir = crate::tempdir();
    let script = dir.path().join("chaos.sql");
    std::fs::write(&script, SCRIPT).expect("write the pgbench script");
    std::thread::spawn(move || {
        let _dir = dir;
        while !stop.load(Ordering::Relaxed) {
            let mut cmd = netns_cmd(&ns, pg_bin("pgbench"));
            cmd.args(["-n", "-h", &ip, "-p", &port.to_string(), "-U", "postgres"])
                .args(["-c", "2", "-T", "3", "-f"])
                .arg(&script)
                .arg("postgres");
            match crate::run_timeout(&mut cmd, None, Duration::from_secs(60)) {
                Ok(out) => {
                    let text = String::from_utf8_lossy(&out.stdout);
                    let n = text
                        .lines()
                        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
                        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                        .unwrap_or(0);
                    committed.fetch_add(n, Ordering::Relaxed);
                    if n == 0 {
                        std::thread::sleep(Duration::from_millis(500));
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    })
}

/// Queries `public.kv` through the listener (a new connection each time) until `stop`,
/// checking each answer.
fn spawn_client(rig: &CdcRig, stop: Arc<AtomicBool>, q: Arc<Queries>) -> JoinHandle<()> {
    let pair = rig.pair.as_ref().expect("chaos runs in namespaces");
    let (ns, ip, port) = (
        pair.outside_ns().to_string(),
        pair.outside_ip().to_string(),
        rig.listen_port,
    );
    std::thread::spawn(move || {
        let mut k = 0u64;
        while !stop.load(Ordering::Relaxed) {
            k = k % 1000 + 1;
            match psql_in(
                &ns,
                &ip,
                port,
                &format!("SELECT v FROM public.kv WHERE k = {k}"),
            ) {
                Ok(v) => {
                    let want = format!("v{}", k * 7919);
                    if v.trim() == want {
                        q.ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        eprintln!("chaos: WRONG answer for k={k}: {v:?}, want {want}");
                        q.wrong.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(_) => {
                    q.failed.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    })
}

/// Peak memory and file descriptors of the relays.
#[derive(Default)]
struct Sampler {
    rss: (u64, u64),
    fds: (u64, u64),
}

impl Sampler {
    fn sample(&mut self, rig: &CdcRig) {
        if let Some(r) = rig.inner.as_ref() {
            let (rss, fds) = proc_usage(r.proc.pid());
            self.rss.0 = self.rss.0.max(rss);
            self.fds.0 = self.fds.0.max(fds);
        }
        if let Some(r) = rig.outer.as_ref() {
            let (rss, fds) = proc_usage(r.proc.pid());
            self.rss.1 = self.rss.1.max(rss);
            self.fds.1 = self.fds.1.max(fds);
        }
    }
}

/// (resident bytes, open file descriptors) of a process.
fn proc_usage(pid: u32) -> (u64, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    (crate::proc_memory(pid).0, fds)
}
