//! The console in a real headless browser (Debian's chromium, driven through
//! chromedriver's WebDriver protocol): relay-outer's page with admin tokens loads without
//! console errors, asks for a token, shows the connected tunnel and the sink's lag, follows
//! a client that connects through a listener, and the replay action is refused without a
//! token (401, a request from the page) and with a read token (403, the button) and works
//! end to end with an admin token (the sink delivers again, the audit line names the
//! token); relay-inner's page, without
//! tokens on loopback, shows its endpoint and CDC source. `ROUTY_CONSOLE_SCREENSHOT=FILE`
//! keeps a picture of relay-outer's page (the README's).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use routy_e2e::cdc::{CdcRig, RigOpts, SINK};
use routy_e2e::{free_port, require_root, try_wait_until};
use serde_json::{json, Value};

const TABLE: &str = "public.t";
const READ: &str = "console-read-token-000000001";
const ADMIN: &str = "console-admin-token-00000002";
const SOON: Duration = Duration::from_secs(20);

/// chromedriver and one browser session; both killed when dropped.
struct Browser {
    driver: Child,
    port: u16,
    session: String,
    _profile: tempfile::TempDir,
}

/// The key under which WebDriver returns an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    fn start() -> Browser {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect(
                "chromedriver (Debian package chromium-driver; tests/install-deps installs it)",
            );
        let profile = routy_e2e::tempdir();
        let mut b = Browser {
            driver,
            port,
            session: String::new(),
            _profile: profile,
        };
        try_wait_until(SOON, "chromedriver ready", || {
            b.call("GET", "/status", None)
                .is_ok_and(|v| v["value"]["ready"] == true)
        })
        .unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,1000",
                         format!("--user-data-dir={}", b._profile.path().display())],
            },
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let v = b
            .call("POST", "/session", Some(caps))
            .expect("a browser session");
        b.session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_string();
        b
    }

    /// One WebDriver command: the answer's JSON, or the error it names.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
        let text = read_answer(&mut s)?;
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
        if v["value"]["error"].is_string() {
            return Err(format!(
                "{}: {}",
                v["value"]["error"], v["value"]["message"]
            ));
        }
        Ok(v)
    }

    fn cmd(&self, method: &str, what: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{what}", self.session);
        self.call(method, &path, body)
            .unwrap_or_else(|e| panic!("{method} {what}: {e}"))["value"]
            .take()
    }

    fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url })));
    }

    /// Runs `script` (a function body; `arguments` as usual) in the page.
    fn js(&self, script: &str, args: Value) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
    }

    /// Text of the first element matching `css` (`None` when there is none).
    fn text(&self, css: &str) -> Option<String> {
        self.js(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent.trim() : null;",
            json!([css]),
        )
        .as_str()
        .map(str::to_string)
    }

    fn wait_text(&self, css: &str, what: &str, f: impl Fn(&str) -> bool) -> String {
        let mut last = None;
        let r = try_wait_until(SOON, what, || {
            last = self.text(css);
            last.as_deref().is_some_and(&f)
        });
        r.unwrap_or_else(|e| panic!("{e}: {css} is {last:?}"));
        last.unwrap()
    }

    fn click(&self, css: &str) {
        let e = self.cmd(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        let id = e[ELEMENT].as_str().unwrap_or_else(|| panic!("{css}: {e}"));
        self.cmd("POST", &format!("/element/{id}/click"), Some(json!({})));
    }

    fn type_into(&self, css: &str, text: &str) {
        let e = self.cmd(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        let id = e[ELEMENT].as_str().unwrap_or_else(|| panic!("{css}: {e}"));
        self.cmd("POST", &format!("/element/{id}/clear"), Some(json!({})));
        self.cmd(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({ "text": text })),
        );
    }

    /// The text of the open dialog (`confirm`, `prompt`), waiting for one to open.
    fn dialog(&self) -> String {
        let mut text = String::new();
        try_wait_until(SOON, "a dialog", || {
            match self.call(
                "GET",
                &format!("/session/{}/alert/text", self.session),
                None,
            ) {
                Ok(v) => {
                    text = v["value"].as_str().unwrap_or_default().to_string();
                    true
                }
                Err(_) => false,
            }
        })
        .unwrap();
        text
    }

    fn accept(&self) {
        self.cmd("POST", "/alert/accept", Some(json!({})));
    }

    /// Browser console entries at level SEVERE or WARNING since the last call.
    fn console_problems(&self) -> Vec<String> {
        let v = self.cmd("POST", "/se/log", Some(json!({"type": "browser"})));
        v.as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["level"] == "SEVERE" || e["level"] == "WARNING")
            .map(|e| e["message"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    fn screenshot(&self, path: &Path) {
        let b64 = self.cmd("GET", "/screenshot", None);
        let png = base64_decode(b64.as_str().expect("base64 PNG"));
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.call("DELETE", &format!("/session/{}", self.session), None);
        }
        // chromedriver and the browsers it started are in its process group.
        unsafe {
            libc::kill(-(self.driver.id() as i32), libc::SIGKILL);
        }
        let _ = self.driver.wait();
    }
}

/// The body of one HTTP/1.1 answer: by `Content-Length`, chunked, or to the end
/// (chromedriver keeps the connection open after answering).
fn read_answer(s: &mut TcpStream) -> Result<String, String> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let head = head.to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            match len {
                Some(len) if body.len() >= len => return Ok(body[..len].to_string()),
                None if head.contains("transfer-encoding: chunked")
                    && body.ends_with("0\r\n\r\n") =>
                {
                    return Ok(dechunk(body))
                }
                _ => {}
            }
        }
        if n == 0 {
            return text
                .split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .ok_or_else(|| "no answer".to_string());
        }
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for v in s.bytes().filter_map(val) {
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// Browser problems other than the refusals the test provoked (Chrome logs a failed
/// request as an error).
fn unexpected(problems: Vec<String>) -> Vec<String> {
    problems
        .into_iter()
        .filter(|m| !(m.contains("status of 401") || m.contains("status of 403")))
        .collect()
}

#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn the_console_shows_the_relays_and_replays_a_sink_only_with_an_admin_token() {
    require_root();
    let dir = routy_e2e::tempdir();
    let token_file = |name: &str, token: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, token).unwrap();
        p.display().to_string()
    };
    let (read, admin) = (token_file("read", READ), token_file("admin", ADMIN));
    let admin_port = free_port();
    let mut rig = CdcRig::start(RigOpts {
        setup_sql: "CREATE TABLE public.t (id bigint PRIMARY KEY, tx int NOT NULL, v text NOT NULL);"
            .into(),
        tables: vec![TABLE.into()],
        source_extra: "      heartbeat: 1s\n      status_interval: 1s\n".into(),
        outer_extra: format!(
            "admin: {{ listen: \"127.0.0.1:{admin_port}\", tokens: [ {{ name: viewer, token_file: {read}, role: read }}, {{ name: ops, token_file: {admin}, role: admin }} ] }}\n"
        ),
        ..RigOpts::default()
    });
    rig.outer.as_mut().unwrap().admin_token = Some(ADMIN.into());
    rig.wait_shipping();
    rig.wait_streaming();
    rig.insert_txs(TABLE, 0, 5, 20, "md5(g::text)");
    rig.wait_in_sync(&[TABLE], SOON);

    let started = Instant::now();
    let b = Browser::start();
    eprintln!("browser up in {:?}", started.elapsed());
    let page = format!("http://127.0.0.1:{admin_port}/");
    b.goto(&page);
    // Tokens are required: the page asks for one, and has made no refused request.
    b.wait_text("body", "the sign-in form", |t| !t.is_empty());
    try_wait_until(SOON, "the sign-in form shown", || {
        b.js(
            "const p = document.querySelector('#signin-panel'); return !!p && !p.hidden && p.offsetParent !== null;",
            json!([]),
        ) == true
    })
    .unwrap();
    assert_eq!(
        b.console_problems(),
        Vec::<String>::new(),
        "loading the page"
    );
    // The replay from this browser without a token: refused.
    let status = b.cmd(
        "POST",
        "/execute/async",
        Some(json!({
            "script": "const done = arguments[arguments.length - 1]; \
                       fetch(arguments[0], {method: 'POST'}).then(r => done(r.status), e => done(String(e)));",
            "args": [format!("v1/sinks/{SINK}/replay")],
        })),
    );
    assert_eq!(status, 401);
    assert!(
        unexpected(b.console_problems()).is_empty(),
        "only the refusal is reported"
    );

    // A read token: the tunnel, the listener, the sink and its lag.
    b.type_into("#token", READ);
    b.click("#sign-in");
    try_wait_until(SOON, "relay-outer's page", || {
        b.js("return document.body.dataset.role || null;", json!([])) == "relay-outer"
    })
    .unwrap();
    b.wait_text("tr[data-session]", "a tunnel session", |t| {
        t.contains("site-a")
    });
    b.wait_text(
        "tr[data-listener=\"pg\"] td.tunnel-state",
        "the tunnel up",
        |t| t == "up",
    );
    let sink = format!("tr[data-sink=\"{SINK}\"]");
    b.wait_text(&format!("{sink} td.lag-records"), "the sink's lag", |t| {
        t == "0"
    });
    b.wait_text(
        &format!("{sink} td.lag-seconds"),
        "the sink's lag in time",
        |t| t.ends_with('s'),
    );
    b.wait_text(&format!("{sink} td.state"), "the sink running", |t| {
        t.contains("running")
    });
    b.wait_text("#who", "the token's name", |t| t.contains("viewer"));

    // A client connects through the listener: the page follows.
    let clients = "tr[data-listener=\"pg\"] td.clients";
    let value = |b: &Browser| {
        b.js(
            "const e = document.querySelector(arguments[0]); return e ? e.dataset.value : null;",
            json!([clients]),
        )
    };
    assert_eq!(value(&b), "0");
    let port = rig.listen_port;
    let client = std::thread::spawn(move || {
        routy_e2e::psql_at("127.0.0.1", port, "SELECT pg_sleep(6), 'held'")
    });
    try_wait_until(SOON, "the page shows the client", || value(&b) == "1").unwrap();
    assert_eq!(
        b.console_problems(),
        Vec::<String>::new(),
        "signed in, polling"
    );

    // Replay with the read token: asked, confirmed, refused (403), nothing moved.
    let rows = |rig: &CdcRig| {
        rig.outer()
            .metric("routy_cdc_sink_rows_total", &[("sink", SINK)])
    };
    let before = rows(&rig);
    let replay = format!("button[data-action=\"replay\"][data-sink=\"{SINK}\"]");
    b.click(&replay);
    let asked = b.dialog();
    assert!(
        asked.contains("Replay") || asked.contains("replay"),
        "{asked}"
    );
    b.accept(); // the time (15 minutes ago, prefilled)
    let confirm = b.dialog();
    assert!(confirm.contains(SINK), "{confirm}");
    b.accept();
    let refused = b.wait_text("#notice", "the refusal", |t| t.contains("403"));
    assert!(refused.contains("may only read"), "{refused}");

    // Signed out, and in again with an admin token: the replay is accepted.
    b.click("#sign-out");
    try_wait_until(SOON, "the sign-in form again", || {
        b.js(
            "const p = document.querySelector('#signin-panel'); return !!p && !p.hidden;",
            json!([]),
        ) == true
    })
    .unwrap();
    b.type_into("#token", ADMIN);
    b.click("#sign-in");
    b.wait_text("#who", "the admin token's name", |t| t.contains("ops"));
    b.wait_text(&format!("{sink} td.state"), "the sink again", |t| {
        !t.is_empty()
    });
    assert_eq!(rows(&rig), before, "nothing was replayed yet");
    b.click(&replay);
    b.dialog();
    b.accept();
    b.dialog();
    b.accept();
    let done = b.wait_text("#notice", "the replay accepted", |t| t.contains("202"));
    assert!(done.to_lowercase().contains("replay"), "{done}");
    try_wait_until(SOON, "the sink delivers the replayed rows", || {
        rows(&rig) >= before + 100.0
    })
    .unwrap();
    let log = rig.outer().proc.log();
    let audit = |needle: &str| {
        log.lines().any(|l| {
            l.contains("audit: admin action") && l.contains(needle) && l.contains("replay")
        })
    };
    assert!(
        audit("token=ops") && audit("status=202"),
        "audit of the replay"
    );
    assert!(
        audit("token=viewer") && audit("status=403"),
        "audit of the refusal"
    );
    assert!(
        audit("token=-") && audit("status=401"),
        "audit without a token"
    );
    assert!(
        !log.lines().any(|l| l.contains("audit: admin action")
            && l.contains("token=viewer")
            && l.contains("status=202")),
        "the read token moved nothing"
    );
    rig.wait_in_sync(&[TABLE], SOON);
    assert_eq!(
        unexpected(b.console_problems()),
        Vec::<String>::new(),
        "console errors besides the refusals"
    );
    let out = client.join().unwrap().expect("the held client");
    assert!(out.ends_with("held"), "{out}");
    try_wait_until(SOON, "the client gone from the page", || value(&b) == "0").unwrap();
    if let Ok(path) = std::env::var("ROUTY_CONSOLE_SCREENSHOT") {
        // Let the charts gather a few points first.
        std::thread::sleep(Duration::from_secs(12));
        b.screenshot(Path::new(&path));
    } else {
        b.screenshot(&dir.path().join("outer.png"));
    }

    // relay-inner's page: no tokens, on loopback.
    let inner_port = rig.inner().admin_port.unwrap();
    b.goto(&format!("http://127.0.0.1:{inner_port}/"));
    try_wait_until(SOON, "relay-inner's page", || {
        b.js("return document.body.dataset.role || null;", json!([])) == "relay-inner"
    })
    .unwrap();
    b.wait_text("tr[data-endpoint]", "the relay-outer endpoint", |t| {
        t.contains("up") || t.contains("connected")
    });
    b.wait_text("tr[data-source=\"main\"]", "the CDC source", |t| {
        t.contains("routy_main")
    });
    assert_eq!(
        b.console_problems(),
        Vec::<String>::new(),
        "relay-inner's page"
    );
    eprintln!("browser part took {:?}", started.elapsed());
}
