//! Throwaway PostgreSQL clusters (primary or streaming standby), optionally in a netns.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::{free_port, is_root, netns_cmd, run_timeout, sys, tail};

/// Timeout for one psql invocation (the connect itself is bounded by PGCONNECT_TIMEOUT=10).
const PSQL_TIMEOUT: Duration = Duration::from_secs(120);
/// Timeout for initdb, pg_ctl and pg_basebackup.
const TOOL_TIMEOUT: Duration = Duration::from_secs(180);

/// The PostgreSQL bin directory: `$ROUTY_PG_BIN_DIR`, else the highest /usr/lib/postgresql/*/bin.
pub fn pg_bin_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(d) = std::env::var_os("ROUTY_PG_BIN_DIR") {
            if !d.is_empty() {
                return PathBuf::from(d);
            }
        }
        let mut best: Option<(Vec<u32>, PathBuf)> = None;
        if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Ok(version) = name
                    .split('.')
                    .map(str::parse::<u32>)
                    .collect::<Result<Vec<u32>, _>>()
                else {
                    continue;
                };
                let bin = e.path().join("bin");
                if bin.join("postgres").is_file() && best.as_ref().is_none_or(|(v, _)| version > *v)
                {
                    best = Some((version, bin));
                }
            }
        }
        best.map(|(_, p)| p).unwrap_or_else(|| {
            panic!("no PostgreSQL found under /usr/lib/postgresql/*/bin (set ROUTY_PG_BIN_DIR)")
        })
    })
    .clone()
}

/// Path of a PostgreSQL program (`psql`, `pgbench`, …) in [`pg_bin_dir`].
pub fn pg_bin(name: &str) -> PathBuf {
    pg_bin_dir().join(name)
}

/// Runs SQL with psql against any host:port (user and db `postgres`); Ok(stdout) or Err(stderr).
pub fn psql_at(host: &str, port: u16, sql: &str) -> Result<String, String> {
    run_psql(None, host, port, sql)
}

/// Like [`psql_at`] but runs psql inside network namespace `ns`.
pub fn psql_in(ns: &str, host: &str, port: u16, sql: &str) -> Result<String, String> {
    run_psql(Some(ns), host, port, sql)
}

fn run_psql(ns: Option<&str>, host: &str, port: u16, sql: &str) -> Result<String, String> {
    let mut cmd = match ns {
        Some(ns) => netns_cmd(ns, pg_bin("psql")),
        None => Command::new(pg_bin("psql")),
    };
    cmd.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h", host])
        .arg("-p")
        .arg(port.to_string())
        .args(["-U", "postgres", "-d", "postgres", "-f", "-"])
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGSERVICE")
        .env_remove("PGOPTIONS");
    let out = run_timeout(&mut cmd, Some(sql.as_bytes()), PSQL_TIMEOUT)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status.success() {
        Ok(stdout.trim_end_matches('\n').to_string())
    } else {
        Err(format!(
            "psql -h {host} -p {port} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            if stdout.is_empty() {
                String::new()
            } else {
                format!("\nstdout: {stdout}")
            }
        ))
    }
}

/// Options for [`Pg::start`] and [`Pg::standby_with`].
#[derive(Debug, Clone)]
pub struct PgOpts {
    /// `listen_addresses` (default "127.0.0.1").
    pub listen: String,
    /// TCP port (default: [`free_port`]).
    pub port: u16,
    /// Network namespace to run the server in (via `ip netns exec`).
    pub netns: Option<String>,
    /// Extra pg_hba.conf lines, placed before the default trust lines so they take precedence.
    pub extra_hba: Vec<String>,
    /// Extra postgresql.conf lines (e.g. "wal_sender_timeout = 5s").
    pub extra_conf: Vec<String>,
}

impl PgOpts {
    /// A server in `pair`'s inside namespace, listening on the inside address.
    pub fn inside(pair: &crate::NetPair) -> PgOpts {
        PgOpts {
            listen: pair.inside_ip().to_string(),
            netns: Some(pair.inside_ns().to_string()),
            ..PgOpts::default()
        }
    }
}

impl Default for PgOpts {
    fn default() -> Self {
        PgOpts {
            listen: "127.0.0.1".into(),
            port: free_port(),
            netns: None,
            extra_hba: Vec::new(),
            extra_conf: Vec::new(),
        }
    }
}

/// A throwaway PostgreSQL cluster; stopped (immediate) and deleted on drop.
pub struct Pg {
    dir: Option<tempfile::TempDir>,
    data: PathBuf,
    sock: PathBuf,
    log: PathBuf,
    host: String,
    port: u16,
    netns: Option<String>,
}

impl Pg {
    /// Initialises and starts a fresh primary cluster.
    pub fn start(opts: PgOpts) -> Pg {
        let mut pg = Pg::prepare(&opts);
        pg.tool("initdb", pg_bin("initdb"), |c| {
            c.arg("-D")
                .arg(&pg.data)
                .args(["-A", "trust", "-U", "postgres", "-E", "UTF8"])
                .args(["--locale=C", "--no-sync"]);
        })
        .unwrap_or_else(|e| panic!("initdb: {e}"));
        pg.append_conf(&base_conf());
        pg.configure(&opts);
        pg.start_server();
        pg
    }

    /// Clones a primary with `pg_basebackup -R -X stream` and starts it as a hot standby on loopback.
    pub fn standby(primary_host: &str, primary_port: u16) -> Pg {
        Pg::standby_with(primary_host, primary_port, PgOpts::default())
    }

    /// Like [`Pg::standby`] with explicit options (listen address, port, netns, hba, conf).
    pub fn standby_with(primary_host: &str, primary_port: u16, opts: PgOpts) -> Pg {
        let mut pg = Pg::prepare(&opts);
        pg.tool("pg_basebackup", pg_bin("pg_basebackup"), |c| {
            c.args(["-h", primary_host, "-p", &primary_port.to_string()])
                .args(["-U", "postgres", "-D"])
                .arg(&pg.data)
                .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"]);
        })
        .unwrap_or_else(|e| panic!("pg_basebackup from {primary_host}:{primary_port}: {e}"));
        // postgresql.conf came from the primary, so the "at least the primary's" settings
        // (max_connections, max_wal_senders, …) already match; only override what is per
        // instance (configure appends, and later lines win).
        pg.append_conf("hot_standby = on\n");
        pg.configure(&opts);
        pg.start_server();
        pg
    }

    /// Creates the temp dir layout (owned by `postgres` when root).
    fn prepare(opts: &PgOpts) -> Pg {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = tempfile::Builder::new()
            .prefix(&format!("routy-pg{n}-"))
            .tempdir()
            .expect("create pg temp dir");
        let root = dir.path().to_path_buf();
        let sock = root.join("sock");
        std::fs::create_dir(&sock).expect("create socket dir");
        if is_root() {
            let (uid, gid) = postgres_ids();
            for p in [&root, &sock] {
                std::os::unix::fs::chown(p, Some(uid), Some(gid))
                    .unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
            }
        }
        Pg {
            data: root.join("data"),
            log: root.join("postgres.log"),
            sock,
            dir: Some(dir),
            host: opts.listen.clone(),
            port: opts.port,
            netns: opts.netns.clone(),
        }
    }

    /// Writes the per-instance settings and pg_hba.conf.
    fn configure(&mut self, opts: &PgOpts) {
        let mut conf = String::new();
        for line in &opts.extra_conf {
            conf.push_str(line);
            conf.push('\n');
        }
        conf.push_str(&format!(
            "listen_addresses = '{}'\nport = {}\nunix_socket_directories = '{}'\n",
            opts.listen,
            opts.port,
            self.sock.display()
        ));
        self.append_conf(&conf);
        let mut hba = String::new();
        for line in &opts.extra_hba {
            hba.push_str(line);
            hba.push('\n');
        }
        hba.push_str(
            "local all all trust\n\
             local replication all trust\n\
             host all all 127.0.0.1/32 trust\n\
             host replication all 127.0.0.1/32 trust\n\
             host all all 198.18.0.0/15 trust\n\
             host replication all 198.18.0.0/15 trust\n\
             host all all ::1/128 trust\n\
             host replication all ::1/128 trust\n",
        );
        std::fs::write(self.data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
    }

    fn append_conf(&self, text: &str) {
        let mut f = OpenOptions::new()
            .append(true)
            .open(self.data.join("postgresql.conf"))
            .expect("open postgresql.conf");
        f.write_all(format!("\n# routy-e2e\n{text}").as_bytes())
            .expect("write postgresql.conf");
    }

    fn start_server(&mut self) {
        let (data, log) = (self.data.clone(), self.log.clone());
        let res = self.tool("pg_ctl start", pg_bin("pg_ctl"), |c| {
            c.arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t", "120", "start"]);
        });
        if let Err(e) = res {
            panic!(
                "pg_ctl start (port {}): {e}\nserver log:\n{}",
                self.port,
                tail(&self.log(), 60)
            );
        }
    }

    /// Runs a PostgreSQL tool (in the netns, as `postgres` when root), output to a file.
    fn tool(
        &self,
        what: &str,
        program: PathBuf,
        args: impl FnOnce(&mut Command),
    ) -> Result<(), String> {
        let mut cmd = match &self.netns {
            Some(ns) => netns_cmd(
                ns,
                if is_root() {
                    std::ffi::OsStr::new("runuser")
                } else {
                    program.as_os_str()
                },
            ),
            None if is_root() => Command::new("runuser"),
            None => Command::new(&program),
        };
        if is_root() {
            cmd.args(["-u", "postgres", "--"]).arg(&program);
        }
        args(&mut cmd);
        self.run_tool(what, cmd, TOOL_TIMEOUT)
    }

    /// Runs `cmd` with stdout+stderr to a file (children may keep pipes open otherwise).
    fn run_tool(&self, what: &str, mut cmd: Command, timeout: Duration) -> Result<(), String> {
        let root = self.root();
        let out_path = root.join(format!("{}.out", what.replace(' ', "_")));
        let out = File::create(&out_path).map_err(|e| format!("create {out_path:?}: {e}"))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        cmd.current_dir(root)
            .env_remove("PGDATA")
            .env_remove("PGHOST")
            .env_remove("PGPORT")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("spawn {:?}: {e}", cmd.get_program()))?;
        let start = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
                break st;
            }
            if start.elapsed() >= timeout {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{what} timed out after {timeout:?}; output:\n{}",
                    std::fs::read_to_string(&out_path).unwrap_or_default()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if status.success() {
            Ok(())
        } else {
            Err(format!(
                "{what} failed ({status}); output:\n{}",
                std::fs::read_to_string(&out_path).unwrap_or_default()
            ))
        }
    }

    fn root(&self) -> &Path {
        self.dir.as_ref().expect("pg dir").path()
    }

    /// The TCP port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The listen address (as given in [`PgOpts::listen`]).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The network namespace the server runs in, if any.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// The PostgreSQL bin directory (same as [`pg_bin_dir`]).
    pub fn bin_dir(&self) -> PathBuf {
        pg_bin_dir()
    }

    /// Path of a PostgreSQL program (same as the free function [`pg_bin`]).
    pub fn pg_bin(name: &str) -> PathBuf {
        pg_bin(name)
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The unix socket directory.
    pub fn socket_dir(&self) -> &Path {
        &self.sock
    }

    /// A libpq connection string for user and db `postgres`.
    pub fn conninfo(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres",
            self.host, self.port
        )
    }

    /// The server log contents so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Runs SQL with psql (inside the netns if any); panics with stderr on failure.
    pub fn psql(&self, sql: &str) -> String {
        self.try_psql(sql)
            .unwrap_or_else(|e| panic!("psql on port {}: {e}\nSQL: {sql}", self.port))
    }

    /// Runs SQL with psql (inside the netns if any); Err(stderr) on failure.
    pub fn try_psql(&self, sql: &str) -> Result<String, String> {
        run_psql(self.netns.as_deref(), &self.host, self.port, sql)
    }

    /// Stops the server with `-m immediate`; panics if pg_ctl fails.
    pub fn stop(&mut self) {
        self.stop_inner()
            .unwrap_or_else(|e| panic!("pg_ctl stop (port {}): {e}", self.port));
    }

    fn stop_inner(&self) -> Result<(), String> {
        // pg_ctl stop only signals the pid in postmaster.pid, so it needs no netns; running
        // it outside keeps teardown working after the namespace is gone.
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(pg_bin("pg_ctl"));
            c
        } else {
            Command::new(pg_bin("pg_ctl"))
        };
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "-t", "60", "stop"]);
        self.run_tool("pg_ctl stop", cmd, Duration::from_secs(90))
    }

    /// Stops the server (immediate, ignoring "not running") and starts it again.
    pub fn restart(&mut self) {
        if self.postmaster_pid().is_some() {
            let _ = self.stop_inner();
        }
        self.start_server();
    }

    /// The postmaster pid from postmaster.pid, if the file exists.
    pub fn postmaster_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        if self.postmaster_pid().is_some() && self.stop_inner().is_err() {
            // pg_ctl failed: SIGKILL the postmaster, if that pid is still our postmaster
            // (its command line names our data directory; the pid may have been reused).
            if let Some(pid) = self.postmaster_pid() {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let data = self.data.to_string_lossy();
                if String::from_utf8_lossy(&cmdline).contains(data.as_ref()) {
                    sys::kill(pid, libc::SIGKILL);
                }
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "----- last lines of postgres log (port {}) -----\n{}\n----- end of postgres log -----",
                self.port,
                tail(&self.log(), 60)
            );
        }
        if let Some(dir) = self.dir.take() {
            if std::env::var_os("ROUTY_KEEP_LOGS").is_some() {
                eprintln!(
                    "postgres (port {}) kept in {}",
                    self.port,
                    dir.keep().display()
                );
            }
        }
    }
}

/// The base postgresql.conf settings shared by every cluster (inherited by standbys).
fn base_conf() -> String {
    "wal_level = logical\n\
     max_wal_senders = 20\n\
     max_replication_slots = 20\n\
     max_connections = 200\n\
     fsync = off\n\
     shared_buffers = 128MB\n\
     hot_standby = on\n"
        .to_string()
}

/// uid and gid of the `postgres` user.
fn postgres_ids() -> (u32, u32) {
    static IDS: OnceLock<(u32, u32)> = OnceLock::new();
    *IDS.get_or_init(|| {
        let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
        for line in passwd.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() >= 4 && f[0] == "postgres" {
                if let (Ok(u), Ok(g)) = (f[2].parse(), f[3].parse()) {
                    return (u, g);
                }
            }
        }
        panic!("no `postgres` user in /etc/passwd (needed to run PostgreSQL as root)")
    })
}

fn sh(args: &[&str], dir: &Path) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes TLS files for a PostgreSQL server in `dir`: `ca.crt`, a server certificate
/// `server.crt`/`server.key` for 127.0.0.1 and localhost signed by it, and an unrelated
/// `other.crt`; readable by the server (owned by `postgres` when run as root, key 0600).
pub fn make_pg_certs(dir: &Path) {
    if is_root() {
        sh(&["chmod", "0755", "."], dir);
    }
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for ca in ["ca", "other"] {
        let mut a = vec!["openssl", "req", "-x509"];
        a.extend(ec);
        let (key, crt, subj) = (
            format!("{ca}.key"),
            format!("{ca}.crt"),
            format!("/CN=test {ca}"),
        );
        a.extend(["-keyout", &key, "-out", &crt, "-days", "2", "-subj", &subj]);
        sh(&a, dir);
    }
    let mut a = vec!["openssl", "req"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    sh(&a, dir);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    sh(
        &[
            "openssl",
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
        dir,
    );
    if is_root() {
        sh(&["chown", "-R", "postgres:postgres", "."], dir);
    }
    sh(&["chmod", "0600", "server.key"], dir);
}
