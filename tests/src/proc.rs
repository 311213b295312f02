//! A spawned child process whose output goes to a log file, killed on drop.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::{sys, tail};

/// A spawned child process guard: output in a log file, SIGKILLed and reaped on drop.
pub struct Proc {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
    log_path: PathBuf,
    dir: Option<tempfile::TempDir>,
}

impl Proc {
    /// Spawns `cmd` with stdin from /dev/null and stdout+stderr appended to a fresh log file.
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        let dir = tempfile::Builder::new()
            .prefix(&format!("routy-proc-{}-", sanitize(name)))
            .tempdir()
            .expect("create log dir");
        let log_path = dir.path().join(format!("{}.log", sanitize(name)));
        let out: File = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("create log file");
        let err = out.try_clone().expect("dup log file");
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "{name}: cannot spawn {:?} {:?}: {e}",
                cmd.get_program(),
                cmd.get_args().collect::<Vec<_>>()
            )
        });
        Proc {
            name: name.to_string(),
            child,
            status: None,
            log_path,
            dir: Some(dir),
        }
    }

    /// The name given at spawn time.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Path of the log file holding the child's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The log contents so far (lossy UTF-8).
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Kills the child with SIGKILL and reaps it (no-op if it already exited and was reaped).
    pub fn kill9(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            if let Ok(st) = self.child.wait() {
                self.status = Some(st);
            }
        }
    }

    /// Sends SIGTERM to the child (no-op once it has been reaped).
    pub fn term(&mut self) {
        self.signal(libc::SIGTERM);
    }

    /// Sends an arbitrary signal to the child (no-op once it has been reaped).
    pub fn signal(&mut self, sig: i32) {
        // While not reaped (even as a zombie) the pid cannot be reused, so this is safe.
        if self.status.is_none() {
            sys::kill(self.child.id(), sig);
        }
    }

    /// Waits up to `timeout` for the child to exit; returns its status, or None if still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(st) = self.try_status() {
                return Some(st);
            }
            if start.elapsed() >= timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// True while the child has not exited.
    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// The exit status if the child has exited (reaping it), without waiting.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.status = Some(st);
            }
        }
        self.status
    }

    /// Waits until `needle` appears in the log; panics with the log on timeout or early exit.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        if let Err(e) = self.try_wait_for_log(needle, timeout) {
            panic!("{e}");
        }
    }

    /// Waits until `needle` appears in the log; the error carries the log (timeout or exit).
    pub fn try_wait_for_log(&self, needle: &str, timeout: Duration) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if self.log().contains(needle) {
                return Ok(());
            }
            if !self.alive_no_reap() {
                // Give a final read a chance: the output may have landed just before exit.
                let log = self.log();
                if log.contains(needle) {
                    return Ok(());
                }
                return Err(format!(
                    "{}: exited before `{needle}` appeared in its log; log:\n{log}",
                    self.name
                ));
            }
            if start.elapsed() >= timeout {
                return Err(format!(
                    "{}: `{needle}` did not appear in its log within {timeout:?}; log:\n{}",
                    self.name,
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the child is alive, judged from /proc without reaping it (works with `&self`).
    fn alive_no_reap(&self) -> bool {
        if self.status.is_some() {
            return false;
        }
        match std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())) {
            // The state follows the parenthesised command name, which may itself contain ')'.
            Ok(stat) => match stat.rfind(')') {
                Some(i) => !matches!(stat[i + 1..].trim_start().chars().next(), Some('Z' | 'X')),
                None => true,
            },
            Err(_) => false,
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "----- last lines of {} (pid {}, {}) -----\n{}\n----- end of {} -----",
                self.name,
                self.child.id(),
                self.status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "status unknown".into()),
                tail(&self.log(), 60),
                self.name
            );
        }
        if std::env::var_os("ROUTY_KEEP_LOGS").is_some() {
            if let Some(dir) = self.dir.take() {
                let path = dir.keep();
                eprintln!("{}: log kept in {}", self.name, path.display());
            }
        }
    }
}

/// Makes a process name usable in a file name.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}
