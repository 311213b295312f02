//! The console in a real headless browser (Debian's chromium, driven through
//! chromedriver's WebDriver protocol): relay-outer's page with admin tokens loads without
//! console errors, asks for a token, shows the connected tunnel and the sink's lag, follows
//! a client that connects through a listener, and the replay action is refused without a
//! token (401, a request from the page) and with a read token (403, the button) and works
//! end to end with an admin token (the sink delivers again, the audit line names the
//! token); relay-inner's page, without
//! tokens on loopback, shows its endpoint and CDC source. The browser is
//! [`routy_e2e::browser`]. `ROUTY_CONSOLE_SCREENSHOT=FILE`
//! keeps a picture of relay-outer's page (the README's).

use std::path::Path;
use std::time::{Duration, Instant};

use routy_e2e::browser::Browser;
use routy_e2e::cdc::{CdcRig, RigOpts, SINK};
use routy_e2e::{free_port, require_root, try_wait_until};
use serde_json::{json, Value};

const TABLE: &str = "public.t";
const READ: &str = "console-read-token-000000001";
const ADMIN: &str = "console-admin-token-00000002";
const SOON: Duration = Duration::from_secs(20);

/// [`routy_e2e::browser::Browser`] driven from this synchronous test.
struct Page {
    rt: tokio::runtime::Runtime,
    b: Option<Browser>,
}

impl Page {
    fn start() -> Page {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let b = rt.block_on(Browser::start()).expect("a browser");
        Page { rt, b: Some(b) }
    }

    fn b(&self) -> &Browser {
        self.b.as_ref().expect("browser")
    }

    fn goto(&self, url: &str) {
        self.rt.block_on(self.b().goto(url)).unwrap();
    }

    /// Runs `script` (a function body; `arguments` as usual) in the page.
    fn js(&self, script: &str, args: Value) -> Value {
        let args = args.as_array().cloned().unwrap_or_default();
        self.rt
            .block_on(self.b().execute(script, &args))
            .unwrap_or_else(|e| panic!("{script}: {e}"))
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
        self.rt
            .block_on(async {
                let el = self.b().find(css).await?;
                self.b().click(&el).await
            })
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    fn type_into(&self, css: &str, text: &str) {
        self.rt
            .block_on(async {
                let el = self.b().find(css).await?;
                self.b().type_into(&el, text).await
            })
            .unwrap_or_else(|e| panic!("type into {css}: {e}"));
    }

    /// The text of the open dialog (`confirm`, `prompt`), waiting for one to open.
    fn dialog(&self) -> String {
        self.rt.block_on(self.b().alert_text()).expect("a dialog")
    }

    fn accept(&self) {
        self.rt.block_on(self.b().accept_alert()).unwrap();
    }

    /// Browser console entries at level SEVERE or WARNING since the last call.
    fn console_problems(&self) -> Vec<String> {
        self.rt.block_on(self.b().console_errors()).unwrap()
    }

    fn screenshot(&self, path: &Path) {
        self.rt.block_on(self.b().screenshot(path)).unwrap();
        let png = std::fs::read(path).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        if let Some(b) = self.b.take() {
            let _ = self.rt.block_on(b.quit());
        }
    }
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
    let b = Page::start();
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
    let status = b.js(
        "return fetch(arguments[0], {method: 'POST'}).then(r => r.status, e => String(e));",
        json!([format!("v1/sinks/{SINK}/replay")]),
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
    let value = |b: &Page| {
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
