//! NATS for the tests: Debian's `nats-server` with JetStream on 127.0.0.1, its store in a
//! directory that outlives restarts; and a reader that replays a stream's messages.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::Proc;

/// The `nats-server` binary (Debian installs it in /usr/sbin).
pub fn server_bin() -> PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin"] {
        let p = PathBuf::from(dir).join("nats-server");
        if p.exists() {
            return p;
        }
    }
    panic!("nats-server not found: run tests/install-deps (Debian package nats-server)");
}

/// A JetStream server.
pub struct NatsServer {
    /// Its client port on 127.0.0.1.
    pub port: u16,
    dir: tempfile::TempDir,
    token: Option<String>,
    /// `--tls` arguments, when it speaks TLS.
    tls: Vec<String>,
    proc: Option<Proc>,
}

/// One message read back from a stream.
#[derive(Debug, Clone)]
pub struct StreamMsg {
    /// Its subject.
    pub subject: String,
    /// Its headers (name, value).
    pub headers: Vec<(String, String)>,
    /// Its body.
    pub payload: Vec<u8>,
}

impl StreamMsg {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl NatsServer {
    /// Starts a server without authentication.
    pub fn start() -> NatsServer {
        Self::start_with(None)
    }

    /// Starts a server that wants this token (`--auth`).
    pub fn start_with(token: Option<&str>) -> NatsServer {
        let dir = tempfile::Builder::new()
            .prefix("routy-nats-")
            .tempdir()
            .expect("NATS store dir");
        let mut s = NatsServer {
            port: crate::free_port(),
            dir,
            token: token.map(str::to_string),
            tls: Vec::new(),
            proc: None,
        };
        s.launch();
        s
    }

    /// Starts a server that speaks only TLS with this certificate and key, and with
    /// `client_ca` verifies client certificates.
    pub fn start_tls(cert: &Path, key: &Path, client_ca: Option<&Path>) -> NatsServer {
        let dir = tempfile::Builder::new()
            .prefix("routy-nats-")
            .tempdir()
            .expect("NATS store dir");
        let mut tls = vec![
            "--tls".to_string(),
            "--tlscert".to_string(),
            cert.display().to_string(),
            "--tlskey".to_string(),
            key.display().to_string(),
        ];
        if let Some(ca) = client_ca {
            tls.extend([
                "--tlsverify".to_string(),
                "--tlscacert".to_string(),
                ca.display().to_string(),
            ]);
        }
        let mut s = NatsServer {
            port: crate::free_port(),
            dir,
            token: None,
            tls,
            proc: None,
        };
        s.launch();
        s
    }

    fn launch(&mut self) {
        let mut cmd = Command::new(server_bin());
        cmd.args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string()])
            .arg("-sd")
            .arg(self.dir.path().join("js"));
        if let Some(t) = &self.token {
            cmd.args(["--auth", t]);
        }
        cmd.args(&self.tls);
        let p = Proc::spawn("nats-server", cmd);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !p.log().contains("Server is ready") {
            assert!(
                Instant::now() < deadline,
                "nats-server did not start: {}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.proc = Some(p);
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL) and starts it again on the same store and port.
    pub fn restart(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
        self.launch();
    }

    /// Its process id (0 while stopped).
    pub fn pid(&self) -> u32 {
        self.proc.as_ref().map_or(0, |p| p.pid())
    }

    /// The server's log.
    pub fn log(&self) -> String {
        self.proc.as_ref().map(|p| p.log()).unwrap_or_default()
    }

    async fn client(&self) -> async_nats::Client {
        let mut opts = async_nats::ConnectOptions::new();
        if let Some(t) = &self.token {
            opts = opts.token(t.clone());
        }
        opts.connect(self.url()).await.expect("connect to NATS")
    }

    /// Every message of `stream`, in order (empty when the stream does not exist).
    pub async fn read_stream(&self, stream: &str) -> Vec<StreamMsg> {
        use async_nats::jetstream::consumer::pull::OrderedConfig;
        use futures_util::StreamExt;
        let js = async_nats::jetstream::new(self.client().await);
        let Ok(mut s) = js.get_stream(stream).await else {
            return Vec::new();
        };
        let last = s.info().await.expect("stream info").state.last_sequence;
        let mut out = Vec::new();
        if last == 0 {
            return out;
        }
        let consumer = s
            .create_consumer(OrderedConfig::default())
            .await
            .expect("ordered consumer");
        let mut msgs = consumer.messages().await.expect("messages");
        let deadline = Instant::now() + Duration::from_secs(60);
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(10), msgs.next()).await {
            let m = m.expect("message");
            let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
            let headers = m
                .headers
                .as_ref()
                .map(|h| {
                    h.iter()
                        .flat_map(|(k, vs)| {
                            vs.iter()
                                .map(move |v| (k.to_string(), v.as_str().to_string()))
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(StreamMsg {
                subject: m.subject.to_string(),
                headers,
                payload: m.payload.to_vec(),
            });
            if seq >= last || Instant::now() > deadline {
                break;
            }
        }
        out
    }

    /// Creates `stream` taking `subjects` (for tests of an existing stream).
    pub async fn create_stream(&self, stream: &str, subjects: &[&str]) {
        let js = async_nats::jetstream::new(self.client().await);
        js.create_stream(async_nats::jetstream::stream::Config {
            name: stream.to_string(),
            subjects: subjects.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await
        .expect("create stream");
    }

    /// The stream's configured duplicate window.
    pub async fn duplicate_window(&self, stream: &str) -> Duration {
        let js = async_nats::jetstream::new(self.client().await);
        let mut s = js.get_stream(stream).await.expect("stream");
        s.info().await.expect("info").config.duplicate_window
    }
}
