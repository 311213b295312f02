//! ClickHouse for the tests: the engine embedded in the `chdb` Python package (a current
//! release), behind `tests/clickhouse-front.py`, a small HTTP front that speaks the part
//! of ClickHouse's HTTP interface the sink uses and hands every query to the engine
//! unchanged. `tests/install-deps` puts chdb into a virtual environment
//! ([`venv_python`]).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::Proc;

/// The Python of the tests' virtual environment: `$ROUTY_TEST_VENV/bin/python3`, by
/// default `~/.cache/routy-tests/venv` (as `tests/install-deps` makes it).
pub fn venv_python() -> PathBuf {
    let venv = std::env::var_os("ROUTY_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            Path::new(&home).join(".cache/routy-tests/venv")
        });
    venv.join("bin/python3")
}

fn front_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clickhouse-front.py")
}

/// A ClickHouse engine behind an HTTP front on 127.0.0.1, its data in a directory that
/// outlives restarts of the front.
pub struct ClickHouse {
    /// Its HTTP port.
    pub port: u16,
    dir: tempfile::TempDir,
    password_file: Option<PathBuf>,
    proc: Option<Proc>,
}

impl ClickHouse {
    /// Starts a front over an empty data directory.
    pub fn start() -> ClickHouse {
        Self::start_with(None)
    }

    /// Starts a front that wants this password for user `default`.
    pub fn start_with(password: Option<&str>) -> ClickHouse {
        let dir = tempfile::Builder::new()
            .prefix("routy-clickhouse-")
            .tempdir()
            .expect("ClickHouse data dir");
        let password_file = password.map(|p| {
            let f = dir.path().join("password");
            std::fs::write(&f, format!("{p}\n")).expect("password file");
            f
        });
        let mut ch = ClickHouse {
            port: crate::free_port(),
            dir,
            password_file,
            proc: None,
        };
        ch.launch();
        ch
    }

    fn launch(&mut self) {
        let python = venv_python();
        let ok = Command::new(&python)
            .args(["-c", "import chdb"])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            ok,
            "{} cannot import chdb: run tests/install-deps (it makes that virtual environment), \
             or point ROUTY_TEST_VENV at one with chdb installed",
            python.display()
        );
        let mut cmd = Command::new(&python);
        cmd.arg(front_script())
            .arg("--dir")
            .arg(self.dir.path().join("data"))
            .args(["--port", &self.port.to_string()]);
        if let Some(f) = &self.password_file {
            cmd.arg("--password-file").arg(f);
        }
        let p = Proc::spawn("clickhouse-front", cmd);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !p.log().contains("listening on") {
            assert!(
                Instant::now() < deadline,
                "the ClickHouse front did not start: {}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.proc = Some(p);
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Kills the front (SIGKILL) and starts it again on the same data and port.
    pub fn restart(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
        self.launch();
    }

    /// Stops the front (SIGKILL); [`ClickHouse::restart`] brings it back.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    /// Runs `sql` and returns the answer (TabSeparated unless the query says otherwise),
    /// or the error text.
    pub fn try_query(&self, sql: &str) -> Result<String, String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port))
            .map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(60))).ok();
        let mut req = format!(
            "POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\nConnection: close\r\n",
            sql.len()
        );
        if let Some(f) = &self.password_file {
            let pw = std::fs::read_to_string(f).unwrap_or_default();
            req.push_str(&format!("X-ClickHouse-Key: {}\r\n", pw.trim_end()));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
        s.write_all(sql.as_bytes()).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        if head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200") {
            Ok(body.to_string())
        } else {
            Err(body.trim().to_string())
        }
    }

    /// Runs `sql`; panics on an error. The answer without its trailing newline.
    pub fn query(&self, sql: &str) -> String {
        match self.try_query(sql) {
            Ok(s) => s.trim_end_matches('\n').to_string(),
            Err(e) => panic!("ClickHouse query {sql:?} failed: {e}"),
        }
    }

    /// Its process id (0 while stopped).
    pub fn pid(&self) -> u32 {
        self.proc.as_ref().map_or(0, |p| p.pid())
    }

    /// The front's log.
    pub fn log(&self) -> String {
        self.proc.as_ref().map(|p| p.log()).unwrap_or_default()
    }
}
