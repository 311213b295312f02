//! A small WebDriver (W3C) client for Debian's `chromium` driven by `chromedriver`: enough
//! to load a page, find and click things, type, answer `alert`/`confirm`/`prompt`, run
//! scripts, read the browser console and take a screenshot.
//!
//! [`Browser::start`] runs chromedriver on a free loopback port in its own process group
//! with `HOME` and the browser profile in a throwaway directory; dropping the [`Browser`]
//! SIGKILLs every live process of that group, and any left holding that directory in its
//! command line: chromium's crash handler (`chrome_crashpad_handler`) daemonizes out of
//! the group (its own session, parent init), but its `--database` is under `HOME`. (It
//! would exit by itself soon after chromium; `--disable-crashpad-for-testing`, which keeps
//! it from starting, makes chromium 156 hang or skip navigations: not an option.)
//! A test process killed outright (SIGKILL, or Ctrl-C: the signal goes to the terminal's
//! process group, not chromedriver's) runs no Drop: find what it left with
//! `pgrep -f routy-browser-`.
//!
//! Console: chromedriver 156 serves the browser log at `POST /session/{id}/se/log`
//! (`{"type": "browser"}`), each call returning the entries since the previous one.
//! `console.error` and `console.warn` come as SEVERE and WARNING (source `console-api`),
//! uncaught exceptions and unhandled promise rejections as SEVERE (`javascript`), and
//! a failed request, for an asset or by `fetch`, as SEVERE (`network`:
//! "URL - Failed to load resource: the server responded with a status of 404 (…)").
//! Chromium asks for `/favicon.ico` by itself: a page without
//! `<link rel="icon" href="data:,">` gets a 404 entry for it once its server says 404.
//!
//! Every request to chromedriver has a deadline ([`COMMAND_TIMEOUT`]), page loads and
//! scripts too (the session's timeouts), and every wait takes one.

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{sys, tail, Proc};

/// Bound on starting chromedriver and the browser session.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on one request to chromedriver (above the session's page-load and script timeouts).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(40);
/// The session's page-load and script timeouts (WebDriver's defaults are 300 s and 30 s).
pub const PAGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default bound of the waits without an explicit timeout (the dialog methods).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(10);
/// Interval between two polls of a wait.
const POLL: Duration = Duration::from_millis(50);
/// The window size (`--window-size`). Headless chromium keeps room for its toolbar: the
/// viewport, and so a screenshot, is 1280 × 757.
pub const WINDOW: (u32, u32) = (1280, 900);
/// The key under which WebDriver sends an element reference.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// What failed: the command, and WebDriver's error code when chromedriver answered one.
pub struct Error {
    /// The command or step that failed, e.g. `POST /element` or `start chromedriver`.
    pub command: String,
    /// WebDriver's error code (`no such element`, `no such alert`, `timeout`, …), if any.
    pub code: Option<String>,
    /// What went wrong.
    pub message: String,
}

impl Error {
    fn new(command: impl Into<String>, message: impl Into<String>) -> Error {
        Error {
            command: command.into(),
            code: None,
            message: message.into(),
        }
    }

    /// True when chromedriver answered this WebDriver error code.
    pub fn is(&self, code: &str) -> bool {
        self.code.as_deref() == Some(code)
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.code {
            Some(code) => write!(f, "browser: {}: {code}: {}", self.command, self.message),
            None => write!(f, "browser: {}: {}", self.command, self.message),
        }
    }
}

// Debug as Display, so that `unwrap()` and `?` in a test print a readable line.
impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for Error {}

/// The result of a browser command.
pub type Result<T> = std::result::Result<T, Error>;

/// An element of the current page, found by a CSS selector.
#[derive(Clone, Debug)]
pub struct Element {
    id: String,
    css: String,
}

impl Element {
    /// The selector it was found by (for messages).
    pub fn css(&self) -> &str {
        &self.css
    }
}

/// An element as a script argument (`arguments[i]` is then the DOM element).
impl From<&Element> for Value {
    fn from(e: &Element) -> Value {
        json!({ ELEMENT_KEY: e.id })
    }
}

/// One entry of the browser's log.
#[derive(Clone, Debug)]
pub struct LogEntry {
    /// `SEVERE`, `WARNING`, `INFO` or `DEBUG` (`console.error` is SEVERE, `console.warn`
    /// WARNING, `console.log` INFO).
    pub level: String,
    /// `console-api`, `javascript` (uncaught errors), `network` (failed requests), …
    pub source: String,
    /// The text, prefixed with the script's URL and line or the failed request's URL.
    pub message: String,
}

impl LogEntry {
    /// SEVERE or WARNING.
    pub fn is_problem(&self) -> bool {
        self.level == "SEVERE" || self.level == "WARNING"
    }

    /// The URL of a failed request (an entry from source `network`).
    pub fn failed_url(&self) -> Option<&str> {
        if self.source != "network" {
            return None;
        }
        self.message.split(" - ").next()
    }
}

/// The browser log collected so far, and how far each reader has read it.
#[derive(Default)]
struct Console {
    entries: Vec<LogEntry>,
    errors_read: usize,
    requests_read: usize,
}

/// chromedriver with one headless chromium session; both killed when dropped.
pub struct Browser {
    http: reqwest::Client,
    base: String,
    session: String,
    console: Mutex<Console>,
    driver: Proc,
    dir: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver and a headless chromium session (within [`START_TIMEOUT`]).
    pub async fn start() -> Result<Browser> {
        let started = Instant::now();
        let driver_bin = crate::which("chromedriver").ok_or_else(|| {
            Error::new(
                "start",
                "chromedriver not found in PATH: run tests/install-deps (Debian package chromium-driver)",
            )
        })?;
        if crate::which("chromium").is_none() {
            return Err(Error::new(
                "start",
                "chromium not found in PATH: run tests/install-deps (Debian package chromium)",
            ));
        }
        let dir = tempfile::Builder::new()
            .prefix("routy-browser-")
            .tempdir()
            .map_err(|e| Error::new("start", format!("create a temporary directory: {e}")))?;
        let home = dir.path().join("home");
        let profile = dir.path().join("profile");
        for d in [&home, &profile] {
            std::fs::create_dir(d)
                .map_err(|e| Error::new("start", format!("create {}: {e}", d.display())))?;
        }
        let port = crate::free_port();
        let mut cmd = Command::new(&driver_bin);
        cmd.arg(format!("--port={port}"))
            // Chromium writes under $HOME (and the XDG directories) besides the profile.
            .env("HOME", &home)
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("XDG_CACHE_HOME");
        // Its own process group: Drop kills chromedriver and every browser process it
        // started in one sweep.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let driver = Proc::spawn("chromedriver", cmd);
        let http = client()?;
        let mut b = Browser {
            http,
            base: format!("http://127.0.0.1:{port}"),
            session: String::new(),
            console: Mutex::default(),
            driver,
            dir,
        };
        b.wait_driver_ready(started).await?;

        let (w, h) = WINDOW;
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "pageLoadStrategy": "normal",
            // A dialog nobody expected fails the next command and stays open, rather
            // than being dismissed behind the test's back.
            "unhandledPromptBehavior": "ignore",
            "timeouts": {
                "pageLoad": PAGE_TIMEOUT.as_millis() as u64,
                "script": PAGE_TIMEOUT.as_millis() as u64,
                "implicit": 0,
            },
            "goog:chromeOptions": {
                "args": [
                    "--headless=new",
                    // Root cannot use chromium's sandbox.
                    "--no-sandbox",
                    "--disable-gpu",
                    format!("--window-size={w},{h}"),
                    // Docker's /dev/shm is 64 MB: too little for chromium.
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let left = START_TIMEOUT.saturating_sub(started.elapsed());
        let v = b
            .request(reqwest::Method::POST, "/session", Some(caps), left)
            .await
            .map_err(|mut e| {
                e.command = "create a browser session".into();
                if e.message.contains("cannot find Chrome binary") {
                    e.message
                        .push_str(" (chromium missing? run tests/install-deps)");
                }
                e.message.push_str(&format!(
                    "; chromedriver log:\n{}",
                    tail(&b.driver.log(), 30)
                ));
                e
            })?;
        b.session = v["sessionId"]
            .as_str()
            .ok_or_else(|| Error::new("create a browser session", format!("no sessionId in {v}")))?
            .to_string();
        Ok(b)
    }

    /// Polls chromedriver's `/status` until it says ready, it exits or the start times out.
    async fn wait_driver_ready(&mut self, started: Instant) -> Result<()> {
        loop {
            let answer = self
                .request(
                    reqwest::Method::GET,
                    "/status",
                    None,
                    Duration::from_secs(2),
                )
                .await;
            let exited = self.driver.try_status();
            match answer {
                Ok(v) if v["ready"] == true => return Ok(()),
                _ if exited.is_some() => {
                    return Err(Error::new(
                        "start chromedriver",
                        format!(
                            "it exited ({}); its log:\n{}",
                            exited.map(|s| s.to_string()).unwrap_or_default(),
                            tail(&self.driver.log(), 30)
                        ),
                    ));
                }
                last if started.elapsed() >= START_TIMEOUT => {
                    return Err(Error::new(
                        "start chromedriver",
                        format!(
                            "not ready within {START_TIMEOUT:?} on {} (last answer: {}); its log:\n{}",
                            self.base,
                            match last {
                                Ok(v) => v.to_string(),
                                Err(e) => e.to_string(),
                            },
                            tail(&self.driver.log(), 30)
                        ),
                    ));
                }
                _ => tokio::time::sleep(POLL).await,
            }
        }
    }

    /// One HTTP request to chromedriver: the answer's `value`, or the error it names.
    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        timeout: Duration,
    ) -> Result<Value> {
        let what = format!("{method} {}", command_name(path));
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .timeout(timeout);
        if let Some(body) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string());
        }
        let resp = req
            .send()
            .await
            .map_err(|e| Error::new(&what, format!("no answer from chromedriver: {e}")))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| Error::new(&what, format!("reading the answer: {e}")))?;
        let mut v: Value = serde_json::from_slice(&bytes).map_err(|e| {
            Error::new(
                &what,
                format!(
                    "HTTP {status}, not JSON ({e}): {}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(500)])
                ),
            )
        })?;
        let value = v["value"].take();
        if let Some(code) = value["error"].as_str() {
            return Err(Error {
                command: what,
                code: Some(code.to_string()),
                message: value["message"]
                    .as_str()
                    .unwrap_or_default()
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string(),
            });
        }
        if !status.is_success() {
            return Err(Error::new(&what, format!("HTTP {status}: {value}")));
        }
        Ok(value)
    }

    /// A command of this session (`path` after `/session/{id}`).
    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value> {
        let path = format!("/session/{}{path}", self.session);
        self.request(method, &path, body, COMMAND_TIMEOUT).await
    }

    async fn get(&self, path: &str) -> Result<Value> {
        self.cmd(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> Result<Value> {
        self.cmd(reqwest::Method::POST, path, Some(body)).await
    }

    /// Loads `url` and waits until the page has loaded (at most [`PAGE_TIMEOUT`]).
    pub async fn goto(&self, url: &str) -> Result<()> {
        self.post("/url", json!({ "url": url })).await.map(drop)
    }

    /// The URL of the current page.
    pub async fn url(&self) -> Result<String> {
        Ok(self
            .get("/url")
            .await?
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    /// The title of the current page.
    pub async fn title(&self) -> Result<String> {
        Ok(self
            .get("/title")
            .await?
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    /// The first element matching `css`, now (error code `no such element` if none).
    pub async fn find(&self, css: &str) -> Result<Element> {
        let v = self
            .post("/element", json!({"using": "css selector", "value": css}))
            .await
            .map_err(|mut e| {
                e.command = format!("find {css:?}");
                e
            })?;
        element(v, css)
    }

    /// Every element matching `css`, now (possibly none).
    pub async fn find_all(&self, css: &str) -> Result<Vec<Element>> {
        let v = self
            .post("/elements", json!({"using": "css selector", "value": css}))
            .await?;
        match v {
            Value::Array(a) => a.into_iter().map(|e| element(e, css)).collect(),
            other => Err(Error::new(
                format!("find all {css:?}"),
                format!("not a list: {other}"),
            )),
        }
    }

    /// Polls until an element matches `css`; the first one, or an error after `timeout`.
    pub async fn wait_for(&self, css: &str, timeout: Duration) -> Result<Element> {
        let start = Instant::now();
        loop {
            match self.find(css).await {
                Ok(e) => return Ok(e),
                Err(e) if !e.is("no such element") => return Err(e),
                Err(_) if start.elapsed() >= timeout => {
                    let url = self.url().await.unwrap_or_default();
                    return Err(Error::new(
                        format!("wait for {css:?}"),
                        format!("no such element within {timeout:?} on {url}"),
                    ));
                }
                Err(_) => tokio::time::sleep(POLL).await,
            }
        }
    }

    /// Polls until the JavaScript expression `js` is truthy in the page; an error after
    /// `timeout` names the last value or exception (an exception counts as false).
    pub async fn wait_until(&self, js: &str, timeout: Duration) -> Result<()> {
        let script = format!("return !!({js});");
        let start = Instant::now();
        loop {
            let last = match self.execute(&script, &[]).await {
                Ok(Value::Bool(true)) => return Ok(()),
                Ok(v) => v.to_string(),
                // A dialog stays open until someone answers it: waiting cannot help.
                Err(e) if e.is("unexpected alert open") => return Err(e),
                Err(e) => e.to_string(),
            };
            if start.elapsed() >= timeout {
                return Err(Error::new(
                    format!("wait until {js}"),
                    format!("still not true after {timeout:?} (last: {last})"),
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The element's rendered text (as the user sees it, whitespace collapsed).
    pub async fn text(&self, el: &Element) -> Result<String> {
        let v = self.get(&format!("/element/{}/text", el.id)).await?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    /// The element's attribute `name` (for `value`, `checked` and the like, the current
    /// property as WebDriver's Get Element Attribute gives it); None when absent.
    pub async fn attr(&self, el: &Element, name: &str) -> Result<Option<String>> {
        let v = self
            .get(&format!("/element/{}/attribute/{name}", el.id))
            .await?;
        Ok(match v {
            Value::Null => None,
            Value::String(s) => Some(s),
            other => Some(other.to_string()),
        })
    }

    /// The element's DOM property `name` (`value`, `checked`, `disabled`, …) as JSON.
    pub async fn prop(&self, el: &Element, name: &str) -> Result<Value> {
        self.get(&format!("/element/{}/property/{name}", el.id))
            .await
    }

    /// Clicks the element (scrolled into view; an error if something covers it).
    pub async fn click(&self, el: &Element) -> Result<()> {
        self.post(&format!("/element/{}/click", el.id), json!({}))
            .await
            .map(drop)
            .map_err(|mut e| {
                e.command = format!("click {:?}", el.css);
                e
            })
    }

    /// Clears the input or textarea and types `text` into it (key events, as a user).
    pub async fn type_into(&self, el: &Element, text: &str) -> Result<()> {
        self.post(&format!("/element/{}/clear", el.id), json!({}))
            .await?;
        self.post(
            &format!("/element/{}/value", el.id),
            json!({ "text": text }),
        )
        .await
        .map(drop)
    }

    /// Runs `js`, a function body (`arguments[i]` are `args`; pass an [`Element`] with
    /// `Value::from(&el)`), and returns what it returns. A returned promise is awaited.
    pub async fn execute(&self, js: &str, args: &[Value]) -> Result<Value> {
        self.post("/execute/sync", json!({"script": js, "args": args}))
            .await
    }

    /// True when an `alert`, `confirm` or `prompt` is open now.
    pub async fn alert_open(&self) -> Result<bool> {
        match self.get("/alert/text").await {
            Ok(_) => Ok(true),
            Err(e) if e.is("no such alert") => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits (at most [`DEFAULT_WAIT`]) for a dialog and returns its message.
    pub async fn alert_text(&self) -> Result<String> {
        let start = Instant::now();
        loop {
            match self.get("/alert/text").await {
                Ok(v) => return Ok(v.as_str().unwrap_or_default().to_string()),
                Err(e) if !e.is("no such alert") => return Err(e),
                Err(_) if start.elapsed() >= DEFAULT_WAIT => {
                    return Err(Error::new(
                        "wait for a dialog",
                        format!("no alert, confirm or prompt opened within {DEFAULT_WAIT:?}"),
                    ));
                }
                Err(_) => tokio::time::sleep(POLL).await,
            }
        }
    }

    /// Waits for a dialog and presses OK (`confirm` returns true, `prompt` its text).
    pub async fn accept_alert(&self) -> Result<()> {
        self.alert_text().await?;
        self.post("/alert/accept", json!({})).await.map(drop)
    }

    /// Waits for a dialog and presses Cancel (`confirm` returns false, `prompt` null).
    pub async fn dismiss_alert(&self) -> Result<()> {
        self.alert_text().await?;
        self.post("/alert/dismiss", json!({})).await.map(drop)
    }

    /// Waits for a `prompt` and types `text` into it (then [`Browser::accept_alert`]).
    pub async fn send_alert_text(&self, text: &str) -> Result<()> {
        self.alert_text().await?;
        self.post("/alert/text", json!({ "text": text }))
            .await
            .map(drop)
    }

    /// Fetches the log entries chromedriver collected since the last fetch.
    async fn fetch_console(&self) -> Result<()> {
        let v = self
            .post("/se/log", json!({"type": "browser"}))
            .await
            .map_err(|mut e| {
                e.message
                    .push_str(" (the browser log at POST /se/log, served by chromedriver 156)");
                e
            })?;
        let Value::Array(list) = v else {
            return Err(Error::new("POST /se/log", format!("not a list: {v}")));
        };
        let field = |e: &Value, k: &str| e[k].as_str().unwrap_or_default().to_string();
        let new = list.iter().map(|e| LogEntry {
            level: field(e, "level"),
            source: field(e, "source"),
            message: field(e, "message"),
        });
        lock(&self.console).entries.extend(new);
        Ok(())
    }

    /// Every browser log entry of this session so far, every level.
    pub async fn console_log(&self) -> Result<Vec<LogEntry>> {
        self.fetch_console().await?;
        Ok(lock(&self.console).entries.clone())
    }

    /// The messages of the SEVERE and WARNING log entries since the previous call (since
    /// the session started for the first): `console.error`/`console.warn`, uncaught
    /// exceptions and rejections, failed requests.
    pub async fn console_errors(&self) -> Result<Vec<String>> {
        self.fetch_console().await?;
        let mut c = lock(&self.console);
        let new: Vec<String> = c.entries[c.errors_read..]
            .iter()
            .filter(|e| e.is_problem())
            .map(|e| e.message.clone())
            .collect();
        c.errors_read = c.entries.len();
        Ok(new)
    }

    /// The URLs of the requests that failed (an HTTP error status, or no answer) since the
    /// previous call (since the session started for the first).
    pub async fn failed_requests(&self) -> Result<Vec<String>> {
        self.fetch_console().await?;
        let mut c = lock(&self.console);
        let new: Vec<String> = c.entries[c.requests_read..]
            .iter()
            .filter_map(|e| e.failed_url().map(str::to_string))
            .collect();
        c.requests_read = c.entries.len();
        Ok(new)
    }

    /// A PNG of the viewport.
    pub async fn screenshot_png(&self) -> Result<Vec<u8>> {
        let v = self.get("/screenshot").await?;
        let png = base64_decode(v.as_str().unwrap_or_default())
            .ok_or_else(|| Error::new("GET /screenshot", "not base64"))?;
        if !png.starts_with(b"\x89PNG\r\n\x1a\n") {
            return Err(Error::new("GET /screenshot", "not a PNG"));
        }
        Ok(png)
    }

    /// Writes a PNG of the viewport to `path`.
    pub async fn screenshot(&self, path: &Path) -> Result<()> {
        let png = self.screenshot_png().await?;
        std::fs::write(path, png)
            .map_err(|e| Error::new("screenshot", format!("write {}: {e}", path.display())))
    }

    /// Ends the session politely (chromium exits), then kills what is left as Drop does.
    pub async fn quit(self) -> Result<()> {
        let path = format!("/session/{}", self.session);
        self.request(
            reqwest::Method::DELETE,
            &path,
            None,
            Duration::from_secs(10),
        )
        .await
        .map(drop)
        // Drop kills chromedriver and anything left of the browser.
    }

    /// The process group of chromedriver and the browser (chromedriver's pid).
    pub fn process_group(&self) -> u32 {
        self.driver.pid()
    }

    /// The throwaway directory holding the browser profile and `HOME`: every browser
    /// process has it in its command line.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// chromedriver's output so far (chromium's own logging lands there too).
    pub fn driver_log(&self) -> String {
        self.driver.log()
    }

    /// The live (not zombie) processes of this browser: in its process group, or with its
    /// directory in their command line.
    pub fn processes(&self) -> Vec<u32> {
        live_processes(self.process_group(), self.dir.path())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let c = lock(&self.console);
            let lines: Vec<String> = c
                .entries
                .iter()
                .map(|e| format!("{} {}: {}", e.level, e.source, e.message))
                .collect();
            eprintln!(
                "----- browser console as last read ({} entries) -----\n{}\n----- end of browser console -----",
                lines.len(),
                tail(&lines.join("\n"), 40)
            );
        }
        // SIGKILL until nothing of ours lives: a process forked during a sweep is caught
        // by the next one. Zombies are left to their parent (or init) to reap.
        let pgid = self.process_group();
        let start = Instant::now();
        loop {
            let pids = live_processes(pgid, self.dir.path());
            if pids.is_empty() {
                break;
            }
            if start.elapsed() > Duration::from_secs(5) {
                eprintln!("browser: processes {pids:?} survived SIGKILL for 5 s");
                break;
            }
            for pid in pids {
                sys::kill(pid, libc::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // The `driver` field's own Drop then reaps chromedriver.
    }
}

/// The live (not zombie) processes in process group `pgid` or with `dir` in their
/// command line, from /proc.
pub fn live_processes(pgid: u32, dir: &Path) -> Vec<u32> {
    let marker = dir.as_os_str().as_encoded_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After the parenthesised command name: state, ppid, pgrp, …
        let mut f = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .unwrap_or_default()
            .split_whitespace();
        let state = f.next().unwrap_or("Z");
        let group = f.nth(1).and_then(|g| g.parse::<u32>().ok());
        if state == "Z" || state == "X" {
            continue;
        }
        let ours = group == Some(pgid)
            || std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| !marker.is_empty() && c.windows(marker.len()).any(|w| w == marker));
        if ours {
            pids.push(pid);
        }
    }
    pids
}

/// The HTTP client for chromedriver: plain HTTP on loopback, no proxy. reqwest is built
/// here with rustls but no crypto provider, so it gets one (and no roots) explicitly.
fn client() -> Result<reqwest::Client> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::new("HTTP client", e.to_string()))?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| Error::new("HTTP client", e.to_string()))
}

/// An element reference from a WebDriver answer.
fn element(v: Value, css: &str) -> Result<Element> {
    match v[ELEMENT_KEY].as_str() {
        Some(id) => Ok(Element {
            id: id.to_string(),
            css: css.to_string(),
        }),
        None => Err(Error::new(
            format!("find {css:?}"),
            format!("no element reference in {v}"),
        )),
    }
}

/// A command's path without the session and element ids, for messages.
fn command_name(path: &str) -> String {
    let parts: Vec<&str> = path.split('/').collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < parts.len() {
        out.push(parts[i]);
        if matches!(parts[i], "session" | "element") && i + 1 < parts.len() {
            // Skip the id (but keep `/session` and `/element` of a find).
            i += 1;
        }
        i += 1;
    }
    let s = out.join("/");
    let s = s.strip_prefix("/session").unwrap_or(&s);
    if s.is_empty() {
        "/session".to_string()
    } else {
        s.to_string()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Decodes standard base64 (padding optional, whitespace ignored); None if malformed.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' | b'\r' | b'\n' | b' ' => continue,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_browser_can_be_shared_between_tasks() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Browser>();
        send_sync::<Element>();
    }

    #[test]
    fn base64_decodes_with_and_without_padding() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbG8").unwrap(), b"hello");
        assert_eq!(base64_decode("aGk=\n").unwrap(), b"hi");
        assert_eq!(base64_decode("iVBORw0KGgo=").unwrap(), b"\x89PNG\r\n\x1a\n");
        assert!(base64_decode("a*b").is_none());
    }

    #[test]
    fn command_names_leave_out_ids() {
        assert_eq!(command_name("/session"), "/session");
        assert_eq!(command_name("/status"), "/status");
        assert_eq!(command_name("/session/abc/element"), "/element");
        assert_eq!(
            command_name("/session/abc/element/e1/click"),
            "/element/click"
        );
        assert_eq!(command_name("/session/abc"), "/session");
    }

    #[test]
    fn a_network_entry_names_the_failed_url() {
        let e = LogEntry {
            level: "SEVERE".into(),
            source: "network".into(),
            message: "http://127.0.0.1:1/x.css - Failed to load resource: the server \
                      responded with a status of 404 (Not Found)"
                .into(),
        };
        assert_eq!(e.failed_url(), Some("http://127.0.0.1:1/x.css"));
        assert!(e.is_problem());
    }
}
