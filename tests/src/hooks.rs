//! A webhook receiver written for the tests: a small HTTP/1.1 server on loopback that
//! records what the webhook sink delivers, checks each request's HMAC signature, and on
//! demand fails requests the ways real endpoints do (500, 429 with `Retry-After`, a
//! connection dropped after the body arrived, so the sink cannot know it was
//! delivered) or refuses them (a 4xx).

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How the receiver answers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// 200 to everything.
    Accept,
    /// Fails about this share of requests at random (500, 429 with `Retry-After: 1`, or
    /// a dropped connection after reading the body), 200 to the rest.
    Faulty(f64),
    /// This status to everything.
    Refuse(u16),
}

/// What the receiver saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// Every event by id, as first received.
    pub events: BTreeMap<(u64, u32), serde_json::Value>,
    /// Events received again (same id).
    pub repeats: u64,
    /// Row changes seen under two different ids: (table, op, row JSON) → ids. A repeat
    /// without the same idempotency key would show up here.
    pub conflicts: Vec<String>,
    /// Requests whose body parsed.
    pub requests: u64,
    /// Requests answered 2xx.
    pub delivered: u64,
    /// Faults injected.
    pub faults: u64,
    /// Signatures that verified, and those that did not (or were missing).
    pub signed_ok: u64,
    /// See `signed_ok`.
    pub signed_bad: u64,
    /// The headers of the last request (lowercase names).
    pub last_headers: HashMap<String, String>,
    /// Insert events counted (every one, repeats included) when the receiver only
    /// counts ([`Receiver::counting`]).
    pub inserts_counted: u64,
    /// Only count inserts, keep nothing (for benchmarks).
    count_only: bool,
    /// Row key → id of the first event that carried it.
    keys: HashMap<String, (u64, u32)>,
}

/// The running receiver.
pub struct Receiver {
    /// Its port on 127.0.0.1.
    pub port: u16,
    seen: Arc<Mutex<Seen>>,
    mode: Arc<Mutex<Mode>>,
    stop: Arc<AtomicBool>,
}

impl Receiver {
    /// Starts a receiver; `secret` is the HMAC key requests must be signed with.
    pub fn start(mode: Mode, secret: Option<&str>) -> Receiver {
        Receiver::start_tls(mode, secret, None)
    }

    /// Starts a receiver serving HTTPS with `tls` (when given).
    pub fn start_tls(
        mode: Mode,
        secret: Option<&str>,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Receiver {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind receiver");
        let port = l.local_addr().expect("addr").port();
        l.set_nonblocking(true).expect("nonblocking");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mode = Arc::new(Mutex::new(mode));
        let stop = Arc::new(AtomicBool::new(false));
        let key = secret.map(|s| ring::hmac::Key::new(ring::hmac::HMAC_SHA256, s.as_bytes()));
        let (s2, m2, st2) = (seen.clone(), mode.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st2.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((c, _)) => {
                        let (s, m, k) = (s2.clone(), m2.clone(), key.clone());
                        let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
                        let _ = c.set_nonblocking(false);
                        match &tls {
                            None => {
                                std::thread::spawn(move || serve(c, &s, &m, k.as_ref()));
                            }
                            Some(cfg) => {
                                let Ok(conn) = rustls::ServerConnection::new(cfg.clone()) else {
                                    continue;
                                };
                                let stream = rustls::StreamOwned::new(conn, c);
                                std::thread::spawn(move || serve(stream, &s, &m, k.as_ref()));
                            }
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Receiver {
            port,
            seen,
            mode,
            stop,
        }
    }

    /// A receiver that answers 200 and only counts insert events (a benchmark's sink).
    pub fn counting() -> Receiver {
        let r = Receiver::start(Mode::Accept, None);
        r.seen.lock().unwrap().count_only = true;
        r
    }

    /// `http://127.0.0.1:PORT/hook`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    /// `https://localhost:PORT/hook` (for a receiver started with TLS).
    pub fn https_url(&self) -> String {
        format!("https://localhost:{}/hook", self.port)
    }

    /// Changes how it answers from now on.
    pub fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    /// Looks at what it saw.
    pub fn seen<R>(&self, f: impl FnOnce(&Seen) -> R) -> R {
        f(&self.seen.lock().unwrap())
    }

    /// The `new.id` values of the insert events into `table`, each once.
    pub fn inserted_ids(&self, table: &str) -> std::collections::BTreeSet<i64> {
        self.seen(|s| {
            s.events
                .values()
                .filter(|e| e["event"] == "insert" && e["table"] == table)
                .filter_map(|e| e["new"]["id"].as_str().and_then(|v| v.parse().ok()))
                .collect()
        })
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Serves one connection: requests until the client closes or a fault drops it.
fn serve<S: Read + Write>(
    c: S,
    seen: &Mutex<Seen>,
    mode: &Mutex<Mode>,
    key: Option<&ring::hmac::Key>,
) {
    let mut r = BufReader::new(c);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let m = *mode.lock().unwrap();
        let fault = match m {
            Mode::Faulty(p) if rand::random::<f64>() < p => Some(rand::random::<u8>() % 3),
            _ => None,
        };
        // What arrived counts as received unless the answer says otherwise (a dropped
        // connection: received, but the sender cannot know).
        let record = matches!(m, Mode::Accept) || matches!(fault, None | Some(2));
        {
            let mut s = seen.lock().unwrap();
            s.requests += 1;
            s.last_headers = headers.clone();
            if let Some(k) = key {
                if verify(k, &headers, &body) {
                    s.signed_ok += 1;
                } else {
                    s.signed_bad += 1;
                }
            }
            if fault.is_some() {
                s.faults += 1;
            }
            if record && !matches!(m, Mode::Refuse(_)) {
                take(&mut s, &body);
            }
        }
        let answer: &[u8] = match (m, fault) {
            (Mode::Refuse(code), _) => {
                let text = format!(
                    "HTTP/1.1 {code} Refused\r\nContent-Length: 11\r\nContent-Type: text/plain\r\n\r\nbad payload"
                );
                let _ = r.get_mut().write_all(text.as_bytes());
                let _ = r.get_mut().flush();
                continue;
            }
            (_, Some(0)) => b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\noops",
            (_, Some(1)) => {
                b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: 4\r\n\r\nslow"
            }
            (_, Some(_)) => return, // dropped after reading the body
            _ => {
                seen.lock().unwrap().delivered += 1;
                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
            }
        };
        if r.get_mut().write_all(answer).is_err() || r.get_mut().flush().is_err() {
            return;
        }
    }
}

fn take(s: &mut Seen, body: &[u8]) {
    if s.count_only {
        let text = String::from_utf8_lossy(body);
        s.inserts_counted += text.matches("\"event\":\"insert\"").count() as u64;
        return;
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return;
    };
    for e in v["events"].as_array().cloned().unwrap_or_default() {
        let Some(id) = e["id"].as_str().and_then(parse_id) else {
            continue;
        };
        if s.events.contains_key(&id) {
            s.repeats += 1;
            continue;
        }
        if matches!(e["event"].as_str(), Some("insert" | "update" | "delete")) {
            let key = format!("{}|{}|{}|{}", e["table"], e["event"], e["new"], e["old"]);
            if let Some(prev) = s.keys.insert(key.clone(), id) {
                s.conflicts.push(format!(
                    "{key} came as {}.{} and {}.{}",
                    prev.0, prev.1, id.0, id.1
                ));
            }
        }
        s.events.insert(id, e);
    }
}

fn parse_id(s: &str) -> Option<(u64, u32)> {
    let (a, b) = s.split_once('.')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// A server configuration from a PEM certificate chain and key (for
/// [`Receiver::start_tls`]).
pub fn server_tls(cert: &std::path::Path, key: &std::path::Path) -> Arc<rustls::ServerConfig> {
    let certs = routy_tunnel::tls::load_certs(cert).expect("certificate");
    let key = routy_tunnel::tls::load_key(key).expect("key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server config"),
    )
}

/// Checks `Routy-Signature: t=T,v1=HEX` against HMAC-SHA256(secret, "T." + body), the
/// way the README tells receivers to.
pub fn verify(key: &ring::hmac::Key, headers: &HashMap<String, String>, body: &[u8]) -> bool {
    let Some(sig) = headers.get("routy-signature") else {
        return false;
    };
    let mut t = None;
    let mut v1 = None;
    for part in sig.split(',') {
        match part.split_once('=') {
            Some(("t", x)) => t = Some(x.to_string()),
            Some(("v1", x)) => v1 = Some(x.to_string()),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    let Some(tag) = (0..v1.len() / 2)
        .map(|i| u8::from_str_radix(v1.get(2 * i..2 * i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()
    else {
        return false;
    };
    let mut msg = t.into_bytes();
    msg.push(b'.');
    msg.extend_from_slice(body);
    ring::hmac::verify(key, &msg, &tag).is_ok()
}
