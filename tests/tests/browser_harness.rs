//! Self-test of the browser helper (`routy_e2e::browser`) against Debian's chromium and
//! chromedriver, on two small pages served here: clicks, `confirm` accepted and
//! dismissed (the server sees the page's request only when accepted), a `prompt` answered,
//! typing, scripts, console errors and a failed asset reported, a screenshot, and no
//! chromedriver or chromium process left once the browser is dropped.

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use routy_e2e::browser::Browser;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const SOON: Duration = Duration::from_secs(10);

/// A page that logs nothing: a button asking `confirm` before it fetches `/hit`, one asking
/// `prompt`, an input echoed next to it, a list.
const CLEAN: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>harness</title><link rel="icon" href="data:,"></head>
<body>
<button id="go" data-role="send">Send</button>
<button id="ask">Ask</button>
<input id="in"> <span id="echo"></span>
<p id="out"></p>
<p id="name"></p>
<ul><li class="item">one</li><li class="item">two</li><li class="item">three</li></ul>
<script>
window.confirms = 0;
document.getElementById('go').addEventListener('click', () => {
  const ok = confirm('Send the request?');
  window.confirms += 1;
  if (ok) {
    fetch('/hit').then(r => r.text()).then(t => { document.getElementById('out').textContent = t; });
  }
});
document.getElementById('ask').addEventListener('click', () => {
  const v = prompt('Your name?', '');
  document.getElementById('name').textContent = v === null ? '(cancelled)' : 'hello ' + v;
});
document.getElementById('in').addEventListener('input', e => {
  document.getElementById('echo').textContent = e.target.value;
});
</script>
</body></html>"#;

/// A page with a deliberate `console.error` and a stylesheet that is not there (404).
const ERRORS: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>errors</title><link rel="icon" href="data:,">
<link rel="stylesheet" href="/missing.css"></head>
<body><p id="ready">errors</p>
<script>console.error('deliberate console error', 42);</script>
</body></html>"#;

/// Serves the two pages, `/hit` (answers `sent`) and 404 for anything else, one request
/// per connection; returns its port and the paths requested so far.
async fn serve() -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("local_addr").port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                // Read the request head (chromium also opens connections it never uses).
                let mut head = Vec::new();
                let mut buf = [0u8; 2048];
                let read = tokio::time::timeout(SOON, async {
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return false,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    true
                })
                .await;
                if read != Ok(true) {
                    return;
                }
                let head = String::from_utf8_lossy(&head);
                let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                log.lock().unwrap().push(path.clone());
                let (status, ctype, body) = match path.as_str() {
                    "/" => ("200 OK", "text/html; charset=utf-8", CLEAN),
                    "/errors" => ("200 OK", "text/html; charset=utf-8", ERRORS),
                    "/hit" => ("200 OK", "text/plain", "sent"),
                    _ => ("404 Not Found", "text/plain", "not found"),
                };
                let answer = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\
                     Cache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(answer.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    (port, seen)
}

/// The live (not zombie) pids `pgrep ARGS` lists.
fn pgrep_live(args: &[&str]) -> Vec<u32> {
    let out = Command::new("pgrep").args(args).output().expect("pgrep");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                let state = s
                    .rsplit_once(')')
                    .map(|(_, r)| r.trim_start())
                    .unwrap_or("");
                !state.starts_with('Z') && !state.starts_with('X')
            })
        })
        .collect()
}

/// Collects `console_errors()` until `done` holds for what came so far (or `SOON` passed).
async fn errors_until(b: &Browser, done: impl Fn(&[String]) -> bool) -> Vec<String> {
    let start = Instant::now();
    let mut all = Vec::new();
    loop {
        all.extend(b.console_errors().await.expect("console errors"));
        if done(&all) || start.elapsed() > SOON {
            return all;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs chromium and chromedriver and ROUTY_E2E=1; run tests/run"
)]
async fn the_browser_helper_clicks_answers_dialogs_reads_the_console_and_cleans_up() {
    let (port, seen) = serve().await;
    let hits = || seen.lock().unwrap().iter().filter(|p| *p == "/hit").count();
    let base = format!("http://127.0.0.1:{port}");

    let t0 = Instant::now();
    let b = Browser::start().await.expect("browser");
    let started = t0.elapsed();
    b.goto(&format!("{base}/")).await.expect("load the page");
    let go = b.wait_for("#go", SOON).await.expect("the button");
    let first_page = t0.elapsed() - started;
    println!("browser started in {started:?}, first page loaded in {first_page:?}");
    assert_eq!(b.title().await.unwrap(), "harness");
    assert_eq!(b.text(&go).await.unwrap(), "Send");
    assert_eq!(
        b.attr(&go, "data-role").await.unwrap().as_deref(),
        Some("send")
    );
    assert_eq!(b.attr(&go, "title").await.unwrap(), None);

    // Finding: all, none, and a wait that gives up.
    let items = b.find_all("li.item").await.unwrap();
    let mut texts = Vec::new();
    for i in &items {
        texts.push(b.text(i).await.unwrap());
    }
    assert_eq!(texts, ["one", "two", "three"]);
    assert!(b.find_all("#nothing").await.unwrap().is_empty());
    let e = b.find("#nothing").await.unwrap_err();
    assert!(e.is("no such element"), "{e}");
    let t = Instant::now();
    let e = b
        .wait_for("#nothing", Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(3), "{e}");
    assert!(e.to_string().contains("#nothing"), "{e}");

    // Scripts, with plain and element arguments.
    let sum = b
        .execute("return arguments[0] + arguments[1];", &[json!(2), json!(3)])
        .await
        .unwrap();
    assert_eq!(sum, json!(5));
    let id = b
        .execute("return arguments[0].id;", &[Value::from(&go)])
        .await
        .unwrap();
    assert_eq!(id, json!("go"));
    let later = b
        .execute("return new Promise(r => setTimeout(() => r(7), 50));", &[])
        .await
        .unwrap();
    assert_eq!(later, json!(7), "a returned promise is awaited");
    let e = b
        .wait_until("window.never === true", Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("window.never"), "{e}");

    // confirm accepted: the page fetches /hit and shows the answer.
    assert!(!b.alert_open().await.unwrap());
    b.click(&go).await.expect("click Send");
    assert_eq!(b.alert_text().await.unwrap(), "Send the request?");
    b.accept_alert().await.unwrap();
    b.wait_until(
        "document.getElementById('out').textContent === 'sent'",
        SOON,
    )
    .await
    .expect("the page shows the answer to its request");
    assert_eq!(hits(), 1, "requests: {:?}", seen.lock().unwrap());

    // confirm dismissed: no request. While it is open, other commands fail and leave it
    // open (unhandledPromptBehavior "ignore").
    b.click(&go).await.unwrap();
    assert_eq!(b.alert_text().await.unwrap(), "Send the request?");
    let e = b.find("#go").await.unwrap_err();
    assert!(e.is("unexpected alert open"), "{e}");
    assert!(b.alert_open().await.unwrap());
    b.dismiss_alert().await.unwrap();
    b.wait_until("window.confirms === 2", SOON).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hits(), 1, "a dismissed confirm sent a request");

    // prompt answered.
    let ask = b.find("#ask").await.unwrap();
    b.click(&ask).await.unwrap();
    assert_eq!(b.alert_text().await.unwrap(), "Your name?");
    b.send_alert_text("Ada").await.unwrap();
    b.accept_alert().await.unwrap();
    b.wait_until(
        "document.getElementById('name').textContent === 'hello Ada'",
        SOON,
    )
    .await
    .unwrap();

    // Typing replaces what was there.
    let input = b.find("#in").await.unwrap();
    b.type_into(&input, "first").await.unwrap();
    b.type_into(&input, "hello").await.unwrap();
    b.wait_until(
        "document.getElementById('echo').textContent === 'hello'",
        SOON,
    )
    .await
    .unwrap();
    assert_eq!(b.prop(&input, "value").await.unwrap(), json!("hello"));

    // The clean page logged nothing worth reporting.
    assert_eq!(b.console_errors().await.unwrap(), Vec::<String>::new());
    assert_eq!(b.failed_requests().await.unwrap(), Vec::<String>::new());

    // The second page: its console.error and its missing stylesheet.
    b.goto(&format!("{base}/errors")).await.unwrap();
    b.wait_for("#ready", SOON).await.unwrap();
    let errors = errors_until(&b, |all| {
        all.iter().any(|m| m.contains("deliberate console error"))
            && all.iter().any(|m| m.contains("/missing.css"))
    })
    .await;
    assert!(
        errors
            .iter()
            .any(|m| m.contains("deliberate console error") && m.contains("42")),
        "{errors:#?}"
    );
    assert!(
        errors
            .iter()
            .any(|m| m.contains("/missing.css") && m.contains("404")),
        "{errors:#?}"
    );
    assert_eq!(
        b.failed_requests().await.unwrap(),
        [format!("{base}/missing.css")]
    );
    assert!(b.console_errors().await.unwrap().is_empty(), "read once");
    for e in b.console_log().await.unwrap() {
        println!("console: {} {}: {}", e.level, e.source, e.message);
    }

    // A screenshot of the window's size.
    let shot = tempfile::Builder::new().suffix(".png").tempfile().unwrap();
    b.screenshot(shot.path()).await.unwrap();
    let png = std::fs::read(shot.path()).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && &png[12..16] == b"IHDR");
    let dim = |i: usize| u32::from_be_bytes(png[i..i + 4].try_into().unwrap());
    let viewport = b
        .execute("return [innerWidth, innerHeight];", &[])
        .await
        .unwrap();
    println!(
        "screenshot {}x{}, {} bytes; viewport {viewport}",
        dim(16),
        dim(20),
        png.len()
    );
    assert_eq!(dim(16), 1280);

    // Nothing is left once the browser is dropped.
    let pgid = b.process_group().to_string();
    let dir = b.dir().display().to_string();
    let before = pgrep_live(&["-g", &pgid]);
    assert!(
        before.len() > 2,
        "chromedriver and chromium run: {before:?}"
    );
    let outside: Vec<u32> = pgrep_live(&["-f", &dir])
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    println!(
        "{} processes in chromedriver's group, {} more outside it with its directory \
         (chrome_crashpad_handler)",
        before.len(),
        outside.len()
    );
    let t = Instant::now();
    drop(b);
    let mut left = (Vec::new(), Vec::new());
    let gone = routy_e2e::try_wait_until(Duration::from_secs(5), "browser processes gone", || {
        left = (pgrep_live(&["-g", &pgid]), pgrep_live(&["-f", &dir]));
        left.0.is_empty() && left.1.is_empty()
    });
    println!("browser gone {:?} after drop", t.elapsed());
    assert!(
        gone.is_ok(),
        "left in group {pgid}: {:?}; with {dir}: {:?}",
        left.0,
        left.1
    );
    println!("whole test: {:?}", t0.elapsed());
}
