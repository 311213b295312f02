//! CDC benchmark: end-to-end rows per second and commit-to-apply latency through Routy,
//! each next to what `pg_recvlogical` reads from the same source in the same run (the
//! decoding ceiling); in the same run, the webhook sink's delivery rate to a local
//! receiver next to the PostgreSQL sink's, Server-Sent Events fan-out to 1 and to
//! `--fanout` consumers, and a consumer's commit-to-event latency; then each sink alone
//! reading the whole backlog from the store (the PostgreSQL sink again, ClickHouse, NATS
//! JetStream per change and per transaction, and Kafka in a build with the feature
//! `kafka`), with the CPU time relay-outer and the target's server used. Starts
//! everything itself on loopback (needs root, like the tests, and the test servers
//! `tests/install-deps` installs).
//!
//! ```sh
//! cargo build --release --workspace --bins --features relay-outer/kafka,routy-e2e/kafka
//! target/release/bench-cdc [--rows 200000] [--txn-rows 100] [--rate 500] [--secs 20]
//! ```
//!
//! Prints a Markdown table; with `--out FILE` also writes it there. `--help` lists the
//! options and environment variables.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use routy_e2e::cdc::{CdcRig, RigOpts};
use routy_e2e::{pg_bin, try_wait_until};

struct Args {
    rows: u64,
    txn_rows: u64,
    rate: u32,
    secs: u32,
    fanout: u32,
    out: Option<String>,
}

const USAGE: &str = "\
Usage: bench-cdc [--rows N] [--txn-rows N] [--rate TPS] [--secs N] [--fanout N] [--out FILE]

CDC benchmark: end-to-end rows per second and commit-to-apply latency through Routy,
each next to what pg_recvlogical reads from the same source in the same run (the
decoding ceiling). In the same run: the webhook sink's delivery rate to a local
receiver next to the PostgreSQL sink's, Server-Sent Events fan-out to 1 and to N
consumers, an SSE consumer's commit-to-event latency, and each sink alone reading the
backlog from the store (PostgreSQL, ClickHouse, NATS JetStream, Kafka). Starts
everything itself on loopback: a source and a target PostgreSQL, relay-inner,
relay-outer, and the sinks' test servers (chdb, nats-server, Tansu). Prints a Markdown
table.

Needs root: PostgreSQL runs as the postgres user.
Build first: cargo build --release --workspace --bins --features relay-outer/kafka,routy-e2e/kafka
(without the features, the Kafka sink is left out of the run).

Options:
  --rows N        rows written while relay-inner is stopped, then read by Routy end to
                  end and by pg_recvlogical (throughput; default 200000)
  --txn-rows N    rows per transaction in that backlog (default 100)
  --rate TPS      transactions per second of the latency run (pgbench -R; default 500)
  --secs N        length of the latency run in seconds (default 20)
  --fanout N      Server-Sent Events consumers reading the backlog at once (default 50)
  --out FILE      also write the Markdown table to FILE
  -h, --help      print this text and exit

Environment:
  ROUTY_BIN_DIR     directory of relay-outer and relay-inner (default: this binary's)
  ROUTY_PG_BIN_DIR  PostgreSQL bin directory (default: the highest
                    /usr/lib/postgresql/*/bin)
  ROUTY_KEEP_LOGS   when set, keep the PostgreSQL directories and relay logs
";

/// The arguments, or `None` for `--help`; an error names the bad argument.
fn parse(mut it: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut a = Args {
        rows: 200_000,
        txn_rows: 100,
        rate: 500,
        secs: 20,
        fanout: 50,
        out: None,
    };
    fn num<T: std::str::FromStr>(k: &str, v: Option<String>, what: &str) -> Result<T, String> {
        let v = v.ok_or_else(|| format!("{k} needs a value ({k} {what})"))?;
        match v.parse() {
            Ok(n) => Ok(n),
            Err(_) => Err(format!("{k} {v}: not a number ({k} {what})")),
        }
    }
    while let Some(k) = it.next() {
        match k.as_str() {
            "-h" | "--help" => return Ok(None),
            "--rows" => a.rows = num(&k, it.next(), "N")?,
            "--txn-rows" => a.txn_rows = num(&k, it.next(), "N")?,
            "--rate" => a.rate = num(&k, it.next(), "TPS")?,
            "--secs" => a.secs = num(&k, it.next(), "N")?,
            "--fanout" => a.fanout = num(&k, it.next(), "N")?,
            "--out" => a.out = Some(it.next().ok_or("--out needs a value (--out FILE)")?),
            _ => return Err(format!("unknown argument {k}")),
        }
    }
    for (name, v) in [
        ("--rows", a.rows),
        ("--txn-rows", a.txn_rows),
        ("--rate", a.rate.into()),
        ("--secs", a.secs.into()),
        ("--fanout", a.fanout.into()),
    ] {
        if v == 0 {
            return Err(format!("{name} must be at least 1"));
        }
    }
    Ok(Some(a))
}

/// The arguments of this run (see [`routy_e2e::args_or_exit`]).
fn args() -> Args {
    routy_e2e::args_or_exit("bench-cdc", USAGE, parse)
}

const SETUP: &str = "
CREATE TABLE public.bench (id bigint PRIMARY KEY, v text NOT NULL);
CREATE TABLE public.lat (id bigserial PRIMARY KEY, v text NOT NULL,
    created_us bigint NOT NULL DEFAULT (extract(epoch from clock_timestamp()) * 1000000)::bigint);
";

/// The consumer endpoint's token in the benchmark.
const TOKEN: &str = "bench-token-0123456789abcdef";

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

fn recvlogical(rig: &CdcRig, slot: &str) -> Command {
    let mut c = Command::new(pg_bin("pg_recvlogical"));
    c.args(["-h", "127.0.0.1", "-p", &rig.source.port().to_string()])
        .args(["-U", "postgres", "-d", "postgres", "--slot", slot]);
    c
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The sinks measured alone: (name, kind as the table shows it). Kafka only in a build
/// with the feature `kafka` (`--features relay-outer/kafka,routy-e2e/kafka`).
const ALONE: &[(&str, &str)] = if cfg!(feature = "kafka") {
    &[
        ("warehouse", "ClickHouse sink"),
        ("stream", "NATS JetStream sink, a message per change"),
        (
            "stream-tx",
            "NATS JetStream sink, a message per transaction",
        ),
        ("log", "Kafka sink"),
    ]
} else {
    &[
        ("warehouse", "ClickHouse sink"),
        ("stream", "NATS JetStream sink, a message per change"),
        (
            "stream-tx",
            "NATS JetStream sink, a message per transaction",
        ),
    ]
};

/// The targets of [`ALONE`].
struct Targets {
    ch: routy_e2e::clickhouse::ClickHouse,
    nats: routy_e2e::nats::NatsServer,
    kafka: Option<routy_e2e::kafka::Tansu>,
}

/// The `cdc.sinks` entries of [`ALONE`]. ClickHouse's `max_delay` is 50 ms (its default,
/// 1 s, would add up to a second at the end of the backlog, which is not throughput).
fn alone_sinks(t: &Targets) -> String {
    let mut s = format!(
        "    - name: warehouse\n      source: site-a/main\n      tables: [public.bench]\n      clickhouse: {{ url: \"{}\", database: bench, batch: {{ max_delay: 50ms }} }}\n\
         \x20   - name: stream\n      source: site-a/main\n      tables: [public.bench]\n      nats: {{ url: \"{}\", stream: BENCH, subject_prefix: bench }}\n\
         \x20   - name: stream-tx\n      source: site-a/main\n      tables: [public.bench]\n      nats: {{ url: \"{}\", stream: BENCHTX, subject_prefix: benchtx, message: transaction }}\n",
        t.ch.url(),
        t.nats.url(),
        t.nats.url()
    );
    if let Some(k) = &t.kafka {
        s.push_str(&format!(
            "    - name: log\n      source: site-a/main\n      tables: [public.bench]\n      kafka: {{ brokers: [\"{}\"], topic_prefix: bench }}\n",
            k.broker()
        ));
    }
    s
}

/// Sink `name`'s applied seq, from `cdc sinks --json`.
fn applied_seq(rig: &CdcRig, name: &str) -> u64 {
    let (ok, out) = rig.outer_cdc(&["sinks", "--json"]);
    assert!(ok, "cdc sinks: {out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("cdc sinks --json");
    v.as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == name))
        .and_then(|s| s["applied_seq"].as_u64())
        .unwrap_or(0)
}

/// What one sink took alone.
struct Alone {
    secs: f64,
    /// CPU seconds relay-outer used meanwhile.
    outer_cpu: f64,
    /// CPU seconds the target's server process used (None: not one process).
    target_cpu: Option<f64>,
}

/// Seconds sink `name` takes to deliver the store up to `end_seq` on its own: resumed
/// (it was paused), or moved to the start (`replay`); with the CPU time relay-outer and
/// the target (`target_pid`) used meanwhile.
fn sink_alone(
    rig: &CdcRig,
    name: &str,
    end_seq: u64,
    replay: bool,
    target_pid: Option<u32>,
) -> Alone {
    let outer_pid = rig.outer().proc.pid();
    let cpu0 = routy_e2e::cpu_seconds(outer_pid);
    let tcpu0 = target_pid.map(routy_e2e::cpu_seconds);
    let t = Instant::now();
    let (ok, out) = if replay {
        rig.outer_cdc(&["replay", "--sink", name, "--from", "0"])
    } else {
        rig.outer_cdc(&["resume", "--sink", name])
    };
    assert!(ok, "{name}: {out}");
    if replay {
        // The replay takes effect between batches: wait until it did.
        try_wait_until(Duration::from_secs(60), "the replay started", || {
            applied_seq(rig, name) < end_seq
        })
        .expect("replay");
    }
    try_wait_until(
        Duration::from_secs(900),
        &format!("sink {name} delivered the store"),
        || applied_seq(rig, name) >= end_seq,
    )
    .expect("catch up");
    let secs = t.elapsed().as_secs_f64();
    let outer_cpu = routy_e2e::cpu_seconds(outer_pid) - cpu0;
    let target_cpu = target_pid
        .zip(tcpu0)
        .map(|(p, c0)| routy_e2e::cpu_seconds(p) - c0);
    eprintln!("  {name}: {secs:.1} s, relay-outer CPU {outer_cpu:.1} s, target CPU {target_cpu:?}");
    Alone {
        secs,
        outer_cpu,
        target_cpu,
    }
}

fn main() {
    let a = args();
    if !routy_e2e::is_root() {
        eprintln!("bench-cdc runs PostgreSQL as the postgres user: run it as root");
        std::process::exit(2);
    }
    // A webhook sink to a local receiver beside the PostgreSQL sink, and the consumer
    // endpoint.
    let hooks = routy_e2e::hooks::Receiver::counting();
    let consumer_port = routy_e2e::free_port();
    let token_dir = routy_e2e::tempdir();
    let token_file = token_dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("token file");
    // The warehouse and stream sinks, paused until each reads the store alone.
    let targets = Targets {
        ch: routy_e2e::clickhouse::ClickHouse::start(),
        nats: routy_e2e::nats::NatsServer::start(),
        kafka: cfg!(feature = "kafka").then(routy_e2e::kafka::Tansu::start),
    };
    let mut rig = CdcRig::start(RigOpts {
        extra_sinks: format!(
            "    - name: hook\n      source: site-a/main\n      tables: [public.bench]\n      webhook: {{ url: \"{}\" }}\n\
             {}",
            hooks.url(),
            alone_sinks(&targets),
        ),
        outer_cdc_extra: format!(
            "  consumers:\n    listen: \"127.0.0.1:{consumer_port}\"\n    tokens: [{{ name: bench, token_file: {}, sources: [\"*\"] }}]\n",
            token_file.display()
        ),
        setup_sql: SETUP.into(),
        tables: vec!["public.bench".into(), "public.lat".into()],
        source_conf: vec!["fsync = on".into(), "synchronous_commit = on".into()],
        target_conf: vec!["fsync = on".into(), "synchronous_commit = on".into()],
        // The latency table on the target records when each row was applied.
        target_setup_sql: "CREATE TABLE public.lat (id bigint PRIMARY KEY, v text NOT NULL, created_us bigint NOT NULL,
             applied_us bigint NOT NULL DEFAULT (extract(epoch from clock_timestamp()) * 1000000)::bigint);"
            .into(),
        ..RigOpts::default()
    });
    rig.wait_shipping();
    rig.wait_in_sync(&["public.bench"], Duration::from_secs(60));

    // --- throughput: a backlog of small rows, read by Routy end to end and by pg_recvlogical.
    eprintln!(
        "throughput: writing {} rows in transactions of {} while relay-inner is stopped",
        a.rows, a.txn_rows
    );
    rig.kill_inner();
    rig.source
        .psql("SELECT pg_create_logical_replication_slot('bench_recv', 'pgoutput')");
    let mut sql = String::new();
    let mut id = 1;
    while id <= a.rows {
        let last = (id + a.txn_rows - 1).min(a.rows);
        sql.push_str(&format!(
            "INSERT INTO public.bench SELECT g, 'row ' || g FROM generate_series({id}, {last}) g;\n"
        ));
        id = last + 1;
    }
    let dir = routy_e2e::tempdir();
    let file = dir.path().join("load.sql");
    std::fs::write(&file, sql).expect("write load");
    let st = Command::new(pg_bin("psql"))
        .args([
            "-X",
            "-q",
            "-h",
            "127.0.0.1",
            "-p",
            &rig.source.port().to_string(),
        ])
        .args([
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
            "-f",
        ])
        .arg(&file)
        .status()
        .expect("psql");
    assert!(st.success(), "load failed");
    let end = rig.source.psql("SELECT pg_current_wal_lsn()::text");

    let t = Instant::now();
    let st = recvlogical(&rig, "bench_recv")
        .args([
            "--start",
            "--no-loop",
            "-f",
            "/dev/null",
            "--endpos",
            end.trim(),
        ])
        .args([
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=routy_main",
        ])
        .status()
        .expect("pg_recvlogical");
    let recv_secs = t.elapsed().as_secs_f64();
    assert!(st.success(), "pg_recvlogical failed");
    rig.source
        .psql("SELECT pg_drop_replication_slot('bench_recv')");

    for (name, _) in ALONE {
        let (ok, out) = rig.outer_cdc(&["pause", "--sink", name]);
        assert!(ok, "pause {name}: {out}");
    }
    let t = Instant::now();
    rig.start_inner();
    let want = a.rows.to_string();
    // Both sinks read the same store at once; each one's time is when it had every row.
    let (mut pg_done, mut hook_done) = (None, None);
    try_wait_until(
        Duration::from_secs(900),
        "both sinks have every row",
        || {
            if pg_done.is_none()
                && rig
                    .target
                    .try_psql("SELECT count(*) FROM public.bench")
                    .is_ok_and(|c| c == want)
            {
                pg_done = Some(t.elapsed().as_secs_f64());
            }
            if hook_done.is_none() && hooks.seen(|s| s.inserts_counted) >= a.rows {
                hook_done = Some(t.elapsed().as_secs_f64());
            }
            pg_done.is_some() && hook_done.is_some()
        },
    )
    .expect("catch up");
    let routy_secs = pg_done.expect("set");
    let hook_secs = hook_done.expect("set");
    rig.wait_in_sync(&["public.bench"], Duration::from_secs(60));

    // --- each sink alone reading the whole backlog from the store: the PostgreSQL sink
    // again (a replay from the start: upserts of the rows it has), then each paused one.
    let end_seq = applied_seq(&rig, "replica");
    eprintln!("sinks alone: the store to seq {end_seq}");
    let pg_alone = sink_alone(&rig, "replica", end_seq, true, None);
    let mut alone = Vec::new();
    for (name, kind) in ALONE {
        let pid = match *name {
            "warehouse" => Some(targets.ch.pid()),
            "stream" | "stream-tx" => Some(targets.nats.pid()),
            _ => targets.kafka.as_ref().map(|k| k.pid()),
        };
        alone.push((kind, sink_alone(&rig, name, end_seq, false, pid)));
    }
    let ch_rows = targets.ch.query("SELECT count() FROM bench.bench FINAL");
    assert_eq!(ch_rows, want, "ClickHouse holds every row");

    // --- SSE fan-out: the backlog (rows plus a begin and a commit per transaction) read
    // from the store by 1, then by N consumers at once.
    let sse_url = format!(
        "http://127.0.0.1:{consumer_port}/v1/sources/site-a/main/events?from=1&tables=public.bench"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let fan = |n: u32| -> (u64, f64) {
        rt.block_on(async {
            let t = Instant::now();
            let tasks: Vec<_> = (0..n)
                .map(|_| {
                    tokio::spawn(routy_e2e::consumer::sse_count(
                        sse_url.clone(),
                        TOKEN.to_string(),
                        a.rows,
                        Duration::from_secs(600),
                    ))
                })
                .collect();
            let mut events = 0;
            for task in tasks {
                events += task.await.expect("consumer").0;
            }
            (events, t.elapsed().as_secs_f64())
        })
    };
    eprintln!("SSE fan-out: 1 consumer, then {}", a.fanout);
    let (ev1, secs1) = fan(1);
    let (evn, secsn) = fan(a.fanout);

    // --- latency at a steady rate: pgbench inserts, the target stamps the apply time;
    // pg_recvlogical (test_decoding) on its own slot timestamps each row as it arrives.
    eprintln!("latency: {} tx/s for {} s", a.rate, a.secs);
    rig.source
        .psql("SELECT pg_create_logical_replication_slot('bench_lat', 'test_decoding')");
    let arrivals: Arc<Mutex<Vec<f64>>> = Arc::default();
    let mut recv = recvlogical(&rig, "bench_lat")
        .args(["--start", "-f", "-", "-F", "1", "-o", "include-xids=0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("pg_recvlogical");
    let out = recv.stdout.take().expect("stdout");
    let reader = {
        let arrivals = arrivals.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if !line.starts_with("table public.lat: INSERT") {
                    continue;
                }
                let at = now_us();
                if let Some(v) = line
                    .split("created_us[bigint]:")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                    .and_then(|v| v.parse::<i64>().ok())
                {
                    arrivals.lock().unwrap().push((at - v) as f64 / 1000.0);
                }
            }
        })
    };
    let sse_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sse_lat = rt.spawn(routy_e2e::consumer::sse_latency(
        format!("http://127.0.0.1:{consumer_port}/v1/sources/site-a/main/events?tables=public.lat"),
        TOKEN.to_string(),
        sse_stop.clone(),
    ));
    std::thread::sleep(Duration::from_millis(300));
    let st = Command::new(pg_bin("pgbench"))
        .args([
            "-n",
            "-h",
            "127.0.0.1",
            "-p",
            &rig.source.port().to_string(),
            "-U",
            "postgres",
        ])
        .args([
            "-c",
            "2",
            "-R",
            &a.rate.to_string(),
            "-T",
            &a.secs.to_string(),
            "-f",
        ])
        .arg({
            let f = dir.path().join("lat.sql");
            std::fs::write(&f, "INSERT INTO public.lat (v) VALUES ('x');\n").unwrap();
            f
        })
        .arg("postgres")
        .stdout(Stdio::null())
        .status()
        .expect("pgbench");
    assert!(st.success(), "pgbench failed");
    let n = rig.source.psql("SELECT count(*) FROM public.lat");
    try_wait_until(Duration::from_secs(120), "latency rows applied", || {
        rig.target
            .try_psql("SELECT count(*) FROM public.lat")
            .is_ok_and(|c| c == n)
    })
    .expect("latency rows applied");
    std::thread::sleep(Duration::from_secs(1));
    sse_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut sl = rt.block_on(sse_lat).expect("SSE latency reader");
    sl.sort_by(|x, y| x.partial_cmp(y).unwrap());
    let _ = recv.kill();
    let _ = recv.wait();
    let _ = reader.join();
    rig.source
        .psql("SELECT pg_drop_replication_slot('bench_lat')");
    let lat: Vec<f64> = rig
        .target
        .psql(
            "SELECT ((applied_us - created_us) / 1000.0)::text FROM public.lat ORDER BY 1::float8",
        )
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let mut lat = lat;
    lat.sort_by(|x, y| x.partial_cmp(y).unwrap());
    let mut rl = arrivals.lock().unwrap().clone();
    rl.sort_by(|x, y| x.partial_cmp(y).unwrap());

    let rows = a.rows as f64;
    let table = format!(
        "| measure | Routy end to end (source commit -> target commit) | pg_recvlogical (decoding ceiling) | ratio |\n\
         | --- | --- | --- | --- |\n\
         | backlog of {} rows in {}-row transactions: rows/s | {:.0} ({:.1} s) | {:.0} ({:.1} s) | {:.2}x |\n\
         | latency at {} tx/s, median | {:.1} ms | {:.1} ms | |\n\
         | latency at {} tx/s, p99 | {:.1} ms | {:.1} ms | |\n\
         | rows measured for latency | {} | {} | |\n",
        a.rows,
        a.txn_rows,
        rows / routy_secs,
        routy_secs,
        rows / recv_secs,
        recv_secs,
        recv_secs / routy_secs,
        a.rate,
        percentile(&lat, 0.5),
        percentile(&rl, 0.5),
        a.rate,
        percentile(&lat, 0.99),
        percentile(&rl, 0.99),
        lat.len(),
        rl.len(),
    );
    let consumers = format!(
        "\n| measure | webhook sink (local receiver) | PostgreSQL sink (same run) | ratio |\n\
         | --- | --- | --- | --- |\n\
         | backlog of {} rows, both sinks reading the store at once: rows/s | {:.0} ({:.1} s) | {:.0} ({:.1} s) | {:.2}x |\n\
         \n| measure | Server-Sent Events |\n\
         | --- | --- |\n\
         | backlog read by 1 consumer: events/s | {:.0} ({} events, {:.1} s) |\n\
         | backlog read by {} consumers at once: events/s, all together | {:.0} ({} events, {:.1} s) |\n\
         | latency at {} tx/s (source commit to event received), median | {:.1} ms |\n\
         | latency at {} tx/s, p99 | {:.1} ms |\n\
         | events measured for latency | {} |\n",
        a.rows,
        rows / hook_secs,
        hook_secs,
        rows / routy_secs,
        routy_secs,
        routy_secs / hook_secs,
        ev1 as f64 / secs1,
        ev1,
        secs1,
        a.fanout,
        evn as f64 / secsn,
        evn,
        secsn,
        a.rate,
        percentile(&sl, 0.5),
        a.rate,
        percentile(&sl, 0.99),
        sl.len(),
    );
    let mut sinks = format!(
        "\n| measure | PostgreSQL sink |{}\n| --- | --- |{}\n\
         | backlog of {} rows, each sink alone reading it from the store: rows/s | {:.0} ({:.1} s) |",
        ALONE.iter().map(|(_, k)| format!(" {k} |")).collect::<String>(),
        " --- |".repeat(ALONE.len()),
        a.rows,
        rows / pg_alone.secs,
        pg_alone.secs,
    );
    for (_, x) in &alone {
        sinks.push_str(&format!(" {:.0} ({:.1} s) |", rows / x.secs, x.secs));
    }
    sinks.push_str("\n| ratio to the PostgreSQL sink | 1.00x |");
    for (_, x) in &alone {
        sinks.push_str(&format!(" {:.2}x |", pg_alone.secs / x.secs));
    }
    sinks.push_str(&format!(
        "\n| CPU seconds: relay-outer / the target's server | {:.1} / (several processes) |",
        pg_alone.outer_cpu
    ));
    for (_, x) in &alone {
        sinks.push_str(&format!(
            " {:.1} / {} |",
            x.outer_cpu,
            x.target_cpu.map_or("-".to_string(), |c| format!("{c:.1}"))
        ));
    }
    sinks.push('\n');
    let table = format!("{table}{consumers}{sinks}");
    println!("{table}");
    if let Some(f) = a.out {
        std::fs::write(&f, &table).expect("write --out");
    }
}
