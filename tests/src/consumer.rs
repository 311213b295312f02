//! A consumer of relay-outer's consumer endpoint, as a microservice would be: a
//! Server-Sent Events client that resumes with `Last-Event-ID`, and a page reader.

use std::time::{Duration, Instant};

/// One event as received: its id (`SEQ.INDEX`) and its JSON.
#[derive(Debug, Clone)]
pub struct Event {
    /// The `id:` field.
    pub id: String,
    /// The `data:` field, parsed.
    pub data: serde_json::Value,
}

impl Event {
    /// The id as (seq, index), for ordering.
    pub fn pos(&self) -> (u64, u32) {
        let (a, b) = self.id.split_once('.').expect("id is SEQ.INDEX");
        (a.parse().expect("seq"), b.parse().expect("index"))
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn client() -> reqwest::Client {
    client_trusting(None)
}

/// A client that trusts the CA certificate in `ca` (none: no CA).
fn client_trusting(ca: Option<&std::path::Path>) -> reqwest::Client {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = ca {
        for c in routy_tunnel::tls::load_certs(ca).expect("CA certificate") {
            roots.add(c).expect("a CA certificate");
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .no_proxy()
        .build()
        .expect("HTTP client")
}

/// GETs `url` with `token` (and `Last-Event-ID` when given); returns the status and,
/// for a 200, up to `max` events read within `within` (the connection is then closed).
pub fn sse(
    url: &str,
    token: Option<&str>,
    last_id: Option<&str>,
    max: usize,
    within: Duration,
) -> (u16, Vec<Event>) {
    runtime().block_on(async {
        let mut req = client().get(url).header("accept", "text/event-stream");
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(id) = last_id {
            req = req.header("last-event-id", id);
        }
        let mut resp = match req.send().await {
            Ok(r) => r,
            Err(e) => panic!("GET {url}: {e}"),
        };
        let status = resp.status().as_u16();
        if status != 200 {
            return (status, Vec::new());
        }
        let deadline = Instant::now() + within;
        let mut buf = String::new();
        let mut out = Vec::new();
        while out.len() < max {
            let left = deadline.saturating_duration_since(Instant::now());
            let chunk = match tokio::time::timeout(left, resp.chunk()).await {
                Ok(Ok(Some(c))) => c,
                _ => break,
            };
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                let (mut id, mut data) = (None, None);
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = Some(serde_json::from_str(v).expect("data is JSON"));
                    }
                }
                if let (Some(id), Some(data)) = (id, data) {
                    out.push(Event { id, data });
                    if out.len() >= max {
                        break;
                    }
                }
            }
        }
        (status, out)
    })
}

/// GETs one page; returns the status and the JSON answer.
pub fn page(url: &str, token: &str) -> (u16, serde_json::Value) {
    page_trusting(url, token, None)
}

/// [`page`] over https, trusting the CA certificate in `ca`.
pub fn page_trusting(
    url: &str,
    token: &str,
    ca: Option<&std::path::Path>,
) -> (u16, serde_json::Value) {
    runtime().block_on(async {
        let resp = client_trusting(ca)
            .get(url)
            .bearer_auth(token)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        (status, serde_json::from_str(&body).unwrap_or_default())
    })
}

/// Reads `url` as Server-Sent Events until `want` insert events arrived (or `within`
/// passed); returns the events read (all kinds) and how long it took. Counts by text,
/// without parsing, so the reader is not what is measured.
pub async fn sse_count(url: String, token: String, want: u64, within: Duration) -> (u64, Duration) {
    let t = Instant::now();
    let mut resp = match client()
        .get(&url)
        .bearer_auth(&token)
        .header("accept", "text/event-stream")
        .send()
        .await
    {
        Ok(r) if r.status().as_u16() == 200 => r,
        Ok(r) => panic!("GET {url}: {}", r.status()),
        Err(e) => panic!("GET {url}: {e}"),
    };
    let (mut events, mut inserts) = (0u64, 0u64);
    // An event may straddle two chunks: keep the tail after the last separator.
    let mut carry = String::new();
    while inserts < want {
        let left = within.saturating_sub(t.elapsed());
        let chunk = match tokio::time::timeout(left, resp.chunk()).await {
            Ok(Ok(Some(c))) => c,
            _ => break,
        };
        carry.push_str(&String::from_utf8_lossy(&chunk));
        if let Some(end) = carry.rfind("\n\n") {
            let done: String = carry.drain(..end + 2).collect();
            events += done.matches("\nid: ").count() as u64 + u64::from(done.starts_with("id: "));
            inserts += done.matches("\"event\":\"insert\"").count() as u64;
        }
    }
    (events, t.elapsed())
}

/// Reads `url` as Server-Sent Events until `stop` is set; for every insert event whose
/// row has a `created_us` column, records (arrival − created_us) in milliseconds.
pub async fn sse_latency(
    url: String,
    token: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<f64> {
    let mut resp = client()
        .get(&url)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let mut out = Vec::new();
    let mut carry = String::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let chunk = match tokio::time::timeout(Duration::from_millis(200), resp.chunk()).await {
            Ok(Ok(Some(c))) => c,
            Ok(_) => break,
            Err(_) => continue,
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        carry.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = carry.find("\n\n") {
            let block: String = carry.drain(..end + 2).collect();
            let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(data) else {
                continue;
            };
            if v["event"] != "insert" {
                continue;
            }
            if let Some(c) = v["new"]["created_us"]
                .as_str()
                .and_then(|c| c.parse::<i64>().ok())
            {
                out.push((now - c) as f64 / 1000.0);
            }
        }
    }
    out
}

/// Everything `url` sends as Server-Sent Events within `within` (comments included).
pub fn sse_raw(url: &str, token: &str, within: Duration) -> String {
    runtime().block_on(async {
        let mut resp = client()
            .get(url)
            .bearer_auth(token)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let deadline = Instant::now() + within;
        let mut out = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, resp.chunk()).await {
                Ok(Ok(Some(c))) => out.push_str(&String::from_utf8_lossy(&c)),
                _ => break,
            }
        }
        out
    })
}
