//! The CDC end-to-end rig: a source PostgreSQL (wal_level=logical) with relay-inner next to
//! it, a target PostgreSQL with relay-outer next to it, both relays running the real
//! binaries with a `cdc` section, optionally split over a network-namespace pair so the
//! tunnel can be cut.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::relays::{inner_yaml, outer_yaml, ListenerSpec, Pki, Relay, READY};
use crate::{free_port, netns_cmd, pg_bin, try_wait_until, NetPair, Pg, PgOpts};

/// Options of a [`CdcRig`].
#[derive(Debug, Clone)]
pub struct RigOpts {
    /// Put source + relay-inner and target + relay-outer in two namespaces.
    pub netns: bool,
    /// SQL run on the source before relay-inner starts (tables, rows).
    pub setup_sql: String,
    /// Published tables (`schema.table`).
    pub tables: Vec<String>,
    /// SQL run on the target before relay-outer starts.
    pub target_setup_sql: String,
    /// Extra postgresql.conf lines for the target.
    pub target_conf: Vec<String>,
    /// Extra lines for the source's `cdc.sources[0]` (indented 6 spaces), e.g. `heartbeat: 1s`.
    pub source_extra: String,
    /// Extra lines for the source's `postgres` block (indented 8 spaces), e.g.
    /// `mask_key_file: /path`.
    pub pg_extra: String,
    /// Extra postgresql.conf lines for the source.
    pub source_conf: Vec<String>,
    /// Extra top-level YAML for both relays.
    pub relay_extra: String,
    /// `cdc.spool.max_bytes` on relay-inner.
    pub spool_max: String,
    /// Extra top-level YAML for relay-inner only (e.g. `connections: 2`).
    pub inner_extra: String,
    /// Extra top-level YAML for relay-outer only (e.g. an `admin:` block).
    pub outer_extra: String,
    /// Appended to the sink's DSN (e.g. ` sslmode=verify-full sslrootcert=...`).
    pub sink_dsn_extra: String,
    /// Write both DSNs (source and sink) in the URL form (`postgresql://user@host:port/db`);
    /// `sink_dsn_extra` then goes into the URL's query (`&sslmode=...`).
    pub url_dsn: bool,
    /// Put relay-inner's spool directory on a tmpfs of this size (e.g. `4m`).
    pub spool_tmpfs: Option<String>,
    /// Put relay-outer's store directory on a tmpfs of this size.
    pub store_tmpfs: Option<String>,
    /// `cdc.retention` on relay-outer.
    pub retention: String,
    /// Extra lines for relay-inner's `cdc` section (indented 2 spaces), e.g.
    /// `  batch: { ack_timeout: 1s }`.
    pub inner_cdc_extra: String,
    /// More `cdc.sinks` entries on relay-outer (list items indented 4 spaces), after
    /// the PostgreSQL sink `replica`; `{target_dsn}` stands for the target's DSN.
    pub extra_sinks: String,
    /// Extra lines for relay-outer's `cdc` section (indented 2 spaces), e.g. a
    /// `consumers:` block.
    pub outer_cdc_extra: String,
    /// Extra keys for relay-inner's `outer` entry (e.g. `proxy: "http://{out_ip}:3128"`);
    /// `{out_ip}` stands for relay-outer's address.
    pub outer_entry_extra: String,
    /// Environment variables for relay-inner (`{out_ip}` as above).
    pub inner_env: Vec<(String, String)>,
    /// Do not start relay-inner: the test calls [`CdcRig::start_inner`] (after setting up
    /// what relay-inner needs on its way out, such as a proxy).
    pub defer_inner: bool,
}

impl Default for RigOpts {
    fn default() -> Self {
        RigOpts {
            netns: false,
            setup_sql: String::new(),
            tables: Vec::new(),
            target_setup_sql: String::new(),
            sink_dsn_extra: String::new(),
            url_dsn: false,
            target_conf: Vec::new(),
            source_extra: String::new(),
            pg_extra: String::new(),
            source_conf: Vec::new(),
            relay_extra: "shutdown_grace: 2s\n".into(),
            spool_max: "1GiB".into(),
            inner_extra: String::new(),
            outer_extra: String::new(),
            spool_tmpfs: None,
            store_tmpfs: None,
            retention: "1h".into(),
            inner_cdc_extra: String::new(),
            extra_sinks: String::new(),
            outer_cdc_extra: String::new(),
            outer_entry_extra: String::new(),
            inner_env: Vec::new(),
            defer_inner: false,
        }
    }
}

/// A tmpfs mounted on a directory for a test, unmounted when dropped.
pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it) on `dir`, creating it.
    pub fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("create mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount tmpfs on {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            dir: dir.to_path_buf(),
        }
    }

    /// Changes the size (`mount -o remount,size=`), e.g. to free space.
    pub fn resize(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "remount {}: {}",
            self.dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Source, target, both relays. Fields drop in order: relays, databases, then namespaces.
pub struct CdcRig {
    /// relay-inner (None while stopped by a test).
    pub inner: Option<Relay>,
    /// relay-outer (None while stopped by a test).
    pub outer: Option<Relay>,
    /// The source database.
    pub source: Pg,
    /// The target database.
    pub target: Pg,
    /// relay-inner's config.
    pub inner_yaml: String,
    /// relay-outer's config.
    pub outer_yaml: String,
    /// relay-outer's CDC store directory.
    pub store_dir: PathBuf,
    /// relay-inner's spool directory.
    pub spool_dir: PathBuf,
    /// Listener port on relay-outer that reaches the source through the tunnel.
    pub listen_port: u16,
    /// relay-outer's tunnel address.
    pub tunnel_addr: std::net::SocketAddr,
    /// The certificates (tunnel `site-a` issued).
    pub pki: Pki,
    /// The spool's tmpfs, when asked for.
    pub spool_tmpfs: Option<Tmpfs>,
    /// The store's tmpfs, when asked for.
    pub store_tmpfs: Option<Tmpfs>,
    _dirs: tempfile::TempDir,
    /// The namespaces, when used.
    pub pair: Option<NetPair>,
    /// relay-inner's environment variables.
    inner_env: Vec<(String, String)>,
}

/// `tunnel/source` of the rig's source.
pub const SOURCE: &str = "site-a/main";
/// Sink name in relay-outer's config.
pub const SINK: &str = "replica";

impl CdcRig {
    /// Starts everything and waits until relay-inner's tunnel is up.
    pub fn start(opts: RigOpts) -> CdcRig {
        let pair = opts.netns.then(|| NetPair::new(false));
        let (in_ns, out_ns, in_ip, out_ip) = match &pair {
            Some(p) => (
                Some(p.inside_ns().to_string()),
                Some(p.outside_ns().to_string()),
                p.inside_ip().to_string(),
                p.outside_ip().to_string(),
            ),
            None => (None, None, "127.0.0.1".into(), "127.0.0.1".into()),
        };
        let mut conf = vec![
            "wal_level = logical".to_string(),
            "max_replication_slots = 10".to_string(),
            "max_wal_senders = 10".to_string(),
        ];
        conf.extend(opts.source_conf.iter().cloned());
        let source = Pg::start(PgOpts {
            listen: in_ip.clone(),
            netns: in_ns.clone(),
            extra_conf: conf,
            ..PgOpts::default()
        });
        let target = Pg::start(PgOpts {
            listen: out_ip.clone(),
            netns: out_ns.clone(),
            extra_conf: opts.target_conf.clone(),
            ..PgOpts::default()
        });
        if !opts.setup_sql.is_empty() {
            source.psql(&opts.setup_sql);
        }
        if !opts.target_setup_sql.is_empty() {
            target.psql(&opts.target_setup_sql);
        }
        let pki = Pki::new(&["localhost", &out_ip]);
        pki.issue("site-a");
        let dirs = crate::tempdir();
        let store_dir = dirs.path().join("store");
        let spool_dir = dirs.path().join("spool");
        let spool_tmpfs = opts
            .spool_tmpfs
            .as_deref()
            .map(|size| Tmpfs::mount(&spool_dir, size));
        let store_tmpfs = opts
            .store_tmpfs
            .as_deref()
            .map(|size| Tmpfs::mount(&store_dir, size));
        let tunnel_port = free_port();
        let listen_port = free_port();
        let ka = ("1s", "4s");
        let l = ListenerSpec::new("pg", &format!("{out_ip}:{listen_port}"), "site-a", "pg");
        let (sink_dsn, source_dsn) = if opts.url_dsn {
            let query = opts.sink_dsn_extra.trim().replace(' ', "&");
            (
                format!(
                    "postgresql://postgres@{out_ip}:{}/postgres?application_name=routy%20sink&{query}",
                    target.port()
                ),
                format!("postgresql://postgres@{in_ip}:{}/postgres", source.port()),
            )
        } else {
            (
                format!(
                    "host={out_ip} port={} user=postgres dbname=postgres{}",
                    target.port(),
                    opts.sink_dsn_extra
                ),
                format!(
                    "host={in_ip} port={} user=postgres dbname=postgres",
                    source.port()
                ),
            )
        };
        let outer_extra = format!(
            "{}{}cdc:\n  dir: {}\n  retention: {}\n{}  sinks:\n    - name: {SINK}\n      source: {SOURCE}\n      postgres: {{ dsn: \"{sink_dsn}\", create_tables: true }}\n      retry: {{ initial: 100ms, max: 1s }}\n{}",
            opts.relay_extra,
            opts.outer_extra,
            store_dir.display(),
            opts.retention,
            opts.outer_cdc_extra,
            opts.extra_sinks.replace("{target_dsn}", &sink_dsn),
        );
        let outer_yaml = outer_yaml(
            &pki,
            &format!("{out_ip}:{tunnel_port}"),
            ka,
            &[l],
            &outer_extra,
        );
        let tables = opts.tables.join(", ");
        let inner_extra = format!(
            "{}{}cdc:\n  spool: {{ dir: {}, max_bytes: {} }}\n{}  sources:\n    - name: main\n      postgres:\n        dsn: \"{source_dsn}\"\n        tables: [{tables}]\n{}{}",
            opts.relay_extra,
            opts.inner_extra,
            spool_dir.display(),
            opts.spool_max,
            opts.inner_cdc_extra,
            opts.pg_extra,
            opts.source_extra,
        );
        let server_name = if opts.netns {
            out_ip.as_str()
        } else {
            "localhost"
        };
        let mut inner_yaml = inner_yaml(
            &pki,
            "site-a",
            &[(format!("{out_ip}:{tunnel_port}"), server_name)],
            &[("pg", format!("{in_ip}:{}", source.port()))],
            ka,
            &inner_extra,
        );
        if !opts.outer_entry_extra.is_empty() {
            let entry_end = format!("server_name: \"{server_name}\" }}");
            let extra = opts.outer_entry_extra.replace("{out_ip}", &out_ip);
            inner_yaml = inner_yaml.replacen(
                &entry_end,
                &format!("server_name: \"{server_name}\", {extra} }}"),
                1,
            );
        }
        let inner_env: Vec<(String, String)> = opts
            .inner_env
            .iter()
            .map(|(k, v)| (k.clone(), v.replace("{out_ip}", &out_ip)))
            .collect();
        let outer = Relay::outer(&outer_yaml, out_ns.as_deref());
        let inner = (!opts.defer_inner).then(|| {
            let r = Relay::start_env(
                "relay-inner",
                "relay-inner",
                &inner_yaml,
                in_ns.as_deref(),
                &inner_env,
            );
            r.proc.wait_for_log("tunnel up", READY);
            r
        });
        CdcRig {
            inner,
            inner_env,
            outer: Some(outer),
            source,
            target,
            inner_yaml,
            outer_yaml,
            store_dir,
            spool_dir,
            listen_port,
            tunnel_addr: format!("{out_ip}:{tunnel_port}")
                .parse()
                .expect("tunnel address"),
            pki,
            spool_tmpfs,
            store_tmpfs,
            _dirs: dirs,
            pair,
        }
    }

    fn in_ns(&self) -> Option<&str> {
        self.pair.as_ref().map(|p| p.inside_ns())
    }

    fn out_ns(&self) -> Option<&str> {
        self.pair.as_ref().map(|p| p.outside_ns())
    }

    /// relay-inner, which must be running.
    pub fn inner(&self) -> &Relay {
        self.inner.as_ref().expect("relay-inner is running")
    }

    /// relay-outer, which must be running.
    pub fn outer(&self) -> &Relay {
        self.outer.as_ref().expect("relay-outer is running")
    }

    /// Starts relay-inner again (after a kill), same config and spool.
    pub fn start_inner(&mut self) {
        let r = Relay::start_env(
            "relay-inner",
            "relay-inner",
            &self.inner_yaml,
            self.in_ns().map(str::to_owned).as_deref(),
            &self.inner_env,
        );
        self.inner = Some(r);
    }

    /// Starts relay-outer again (after a kill), same config and store.
    pub fn start_outer(&mut self) {
        let r = Relay::outer(
            &self.outer_yaml,
            self.out_ns().map(str::to_owned).as_deref(),
        );
        self.outer = Some(r);
    }

    /// `kill -9` relay-inner.
    pub fn kill_inner(&mut self) {
        if let Some(mut r) = self.inner.take() {
            r.proc.kill9();
        }
    }

    /// `kill -9` relay-outer.
    pub fn kill_outer(&mut self) {
        if let Some(mut r) = self.outer.take() {
            r.proc.kill9();
        }
    }

    /// Waits until relay-inner's shipping stream to relay-outer is up; panics with its
    /// log otherwise.
    pub fn wait_shipping(&self) {
        let r = try_wait_until(CATCH_UP, "CDC shipping stream up", || {
            self.inner
                .as_ref()
                .is_some_and(|r| r.count("CDC shipping stream up") > 0)
        });
        r.unwrap_or_else(|e| panic!("{e}\n{}", self.inner().proc.log()));
    }

    /// Waits until relay-inner streams changes from its slot: with `snapshot: never`,
    /// changes committed before the slot exists are not part of the stream.
    pub fn wait_streaming(&self) {
        let r = try_wait_until(CATCH_UP, "relay-inner streaming from its slot", || {
            self.inner
                .as_ref()
                .is_some_and(|r| r.count("streaming changes") > 0)
        });
        r.unwrap_or_else(|e| panic!("{e}\n{}", self.inner().proc.log()));
    }

    /// Runs `relay-outer cdc ARGS --config <the running relay-outer's config>`; returns
    /// whether it succeeded and what it printed (stdout then stderr).
    pub fn outer_cdc(&self, args: &[&str]) -> (bool, String) {
        let mut cmd = Command::new(crate::bin("relay-outer"));
        cmd.arg("cdc")
            .args(args)
            .arg("--config")
            .arg(&self.outer().config);
        let out = crate::run_timeout(&mut cmd, None, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("relay-outer cdc {args:?}: {e}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// What `relay-outer cdc tail --source SOURCE` prints (JSON lines, the store's whole
    /// stream); panics if it fails.
    pub fn tail(&self, source: &str) -> String {
        let mut cmd = Command::new(crate::bin("relay-outer"));
        cmd.args(["cdc", "tail", "--config"])
            .arg(&self.outer().config)
            .args(["--source", source]);
        let out = crate::run_timeout(&mut cmd, None, Duration::from_secs(120)).expect("cdc tail");
        assert!(
            out.status.success(),
            "cdc tail: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A table's contents in a comparable form: row count and md5 of the sorted rows.
    pub fn digest(pg: &Pg, table: &str) -> Result<String, String> {
        pg.try_psql(&format!(
            "SELECT count(*) || ':' || coalesce(md5(string_agg(t::text, E'\\n' ORDER BY t::text)), '') FROM {table} t"
        ))
    }

    /// The first rows of `table` that differ between source and target, one per line
    /// (`-` only on the source, `+` only on the target), for a failure message.
    pub fn row_diff(&self, table: &str) -> String {
        let rows = |pg: &Pg| -> std::collections::BTreeSet<String> {
            pg.try_psql(&format!("SELECT t::text FROM {table} t"))
                .map(|s| s.lines().map(str::to_owned).collect())
                .unwrap_or_default()
        };
        let (a, b) = (rows(&self.source), rows(&self.target));
        let mut out = String::new();
        for r in a.difference(&b).take(20) {
            out.push_str(&format!("  - {r}\n"));
        }
        for r in b.difference(&a).take(20) {
            out.push_str(&format!("  + {r}\n"));
        }
        out
    }

    /// Whether every table has the same contents on source and target now.
    pub fn in_sync(&self, tables: &[&str]) -> bool {
        tables.iter().all(|t| {
            let (a, b) = (
                CdcRig::digest(&self.source, t),
                CdcRig::digest(&self.target, t),
            );
            a.is_ok() && a == b
        })
    }

    /// Waits until every table is identical on source and target; panics with both
    /// digests and the relays' logs otherwise.
    pub fn wait_in_sync(&self, tables: &[&str], timeout: Duration) {
        let r = try_wait_until(timeout, "source and target identical", || {
            self.in_sync(tables)
        });
        if let Err(e) = r {
            let mut msg = format!("{e}\n");
            for t in tables {
                msg.push_str(&format!(
                    "{t}: source {:?} target {:?}\n",
                    CdcRig::digest(&self.source, t),
                    CdcRig::digest(&self.target, t)
                ));
                msg.push_str(&self.row_diff(t));
            }
            for r in [&self.inner, &self.outer].into_iter().flatten() {
                msg.push_str(&format!(
                    "--- {} log ---\n{}\n",
                    r.proc.name(),
                    crate::log_tail(&r.proc.log(), 60)
                ));
            }
            panic!("{msg}");
        }
    }

    /// The slot's `confirmed_flush_lsn` on the source, as a number.
    pub fn confirmed_flush(&self) -> u64 {
        let s = self.source.psql(
            "SELECT coalesce(confirmed_flush_lsn::text, '0/0') FROM pg_replication_slots WHERE slot_name = 'routy_main'",
        );
        relay_proto::lsn::parse_lsn(s.trim()).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    /// The source's current WAL end (`pg_current_wal_lsn()`), as a number.
    pub fn wal_end(&self) -> u64 {
        let s = self.source.psql("SELECT pg_current_wal_lsn()::text");
        relay_proto::lsn::parse_lsn(s.trim()).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    /// Asserts that relay-inner's first CDC source never stopped on a fatal error and
    /// streams now (`/status` and `routy_cdc_source_errors_total`).
    pub fn assert_source_running(&self) {
        let inner = self.inner();
        let st = inner.wait_status("the CDC source streams", CATCH_UP, |st| {
            st["cdc"]["sources"][0]["source"]["phase"] == "streaming"
        });
        let fatal = inner.metric("routy_cdc_source_errors_total", &[("reason", "fatal")]);
        assert_eq!(fatal, 0.0, "the CDC source stopped on a fatal error: {st}");
    }

    /// Commits transactions `from..to` on the source, one statement each, into
    /// `table (id, tx, payload)`: transaction `tx` inserts ids `tx * rows + 1 ..= (tx + 1) *
    /// rows` (unique across them) with `payload` (an SQL expression of the id `g`).
    pub fn insert_txs(&self, table: &str, from: u64, to: u64, rows: u64, payload: &str) {
        let mut sql = String::new();
        for tx in from..to {
            sql.push_str(&format!(
                "INSERT INTO {table} SELECT g, {tx}, {payload} FROM generate_series({}, {}) g;\n",
                tx * rows + 1,
                (tx + 1) * rows
            ));
        }
        self.source.psql(&sql);
    }

    /// Every `id` of `table` on the source (a bigint column).
    pub fn source_ids(&self, table: &str) -> std::collections::BTreeSet<i64> {
        self.source
            .psql(&format!("SELECT string_agg(id::text, ',') FROM {table}"))
            .trim()
            .split(',')
            .filter_map(|v| v.parse().ok())
            .collect()
    }

    /// Starts pgbench against the source with `script`, `clients` clients, for `secs`.
    pub fn pgbench(&self, script: &str, clients: u32, secs: u32) -> Load {
        let dir = crate::tempdir();
        let file = dir.path().join("load.sql");
        std::fs::write(&file, script).expect("write pgbench script");
        let mut cmd = match self.in_ns() {
            Some(ns) => netns_cmd(ns, pg_bin("pgbench")),
            None => Command::new(pg_bin("pgbench")),
        };
        cmd.args(["-n", "-h"])
            .arg(match &self.pair {
                Some(p) => p.inside_ip().to_string(),
                None => "127.0.0.1".into(),
            })
            .args(["-p", &self.source.port().to_string(), "-U", "postgres"])
            .args(["-c", &clients.to_string(), "-T", &secs.to_string(), "-f"])
            .arg(&file)
            .arg("postgres")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd.spawn().expect("spawn pgbench");
        Load {
            child: Some(child),
            started: Instant::now(),
            _dir: dir,
        }
    }
}

/// A running pgbench.
pub struct Load {
    child: Option<Child>,
    started: Instant,
    _dir: tempfile::TempDir,
}

impl Load {
    /// Waits for pgbench to end and returns its output (errors included: a source restart
    /// aborts its clients, which is expected in some tests).
    pub fn finish(mut self) -> String {
        let child = self.child.take().expect("pgbench child");
        let out = child.wait_with_output().expect("pgbench wait");
        format!(
            "pgbench ran {:?} ({}):\n{}{}",
            self.started.elapsed(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// How long a rig may take to catch up in a test.
pub const CATCH_UP: Duration = Duration::from_secs(120);

/// Waits until relay-outer logged that the shipping stream is up `n` times.
pub fn wait_for(relay: &Relay, needle: &str, n: usize) {
    relay.wait_count(needle, n, READY);
}
