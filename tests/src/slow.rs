//! Slow and flooding clients for the attack tests and the flood benchmark: slowloris
//! HTTP clients that are reopened as soon as they are closed, and a poller that times
//! each answer.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Keeps `n` slowloris connections open to `addr` until `until`: each sends the start of
/// a request head and then one more header byte every `every`, and is opened again as
/// soon as the server closes it. Returns how many times connections were opened in all.
pub async fn slowloris(addr: SocketAddr, n: usize, every: Duration, until: Instant) -> u64 {
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        tasks.push(tokio::spawn(async move {
            let mut opened = 0u64;
            while Instant::now() < until {
                let Ok(Ok(mut s)) =
                    tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await
                else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                opened += 1;
                let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ").await;
                let mut b = [0u8; 256];
                while Instant::now() < until {
                    // Wait `every` (or for the server to close), then trickle one byte.
                    match tokio::time::timeout(every, s.read(&mut b)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => break,
                        Ok(Ok(_)) => {}
                        Err(_) => {
                            let byte = [b'a' + (i % 26) as u8];
                            if s.write_all(&byte).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            }
            opened
        }));
    }
    let mut opened = 0;
    for t in tasks {
        opened += t.await.unwrap_or(0);
    }
    opened
}

/// What [`poll`] saw.
#[derive(Debug, Default)]
pub struct Polls {
    /// Time to each whole answer, in order.
    pub times: Vec<Duration>,
    /// The status lines of answers that were not 200, and failures to connect or read.
    pub failures: Vec<String>,
}

impl Polls {
    /// The slowest answer.
    pub fn worst(&self) -> Duration {
        self.times.iter().copied().max().unwrap_or_default()
    }
}

/// Sends `GET path` to `addr` on a fresh connection every `every` until `until`, each
/// with `limit` to be answered.
pub async fn poll(
    addr: SocketAddr,
    path: &str,
    every: Duration,
    limit: Duration,
    until: Instant,
) -> Polls {
    let mut out = Polls::default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: routy\r\nConnection: close\r\n\r\n");
    while Instant::now() < until {
        let t = Instant::now();
        let answer = tokio::time::timeout(limit, async {
            let mut s = TcpStream::connect(addr).await?;
            s.write_all(req.as_bytes()).await?;
            let mut body = Vec::new();
            s.read_to_end(&mut body).await?;
            Ok::<_, std::io::Error>(body)
        })
        .await;
        match answer {
            Ok(Ok(body)) => {
                let head = String::from_utf8_lossy(&body[..body.len().min(40)]).into_owned();
                if head.starts_with("HTTP/1.1 200") {
                    out.times.push(t.elapsed());
                } else {
                    out.failures.push(format!("answered {head:?}"));
                }
            }
            Ok(Err(e)) => out.failures.push(format!("{e}")),
            Err(_) => out.failures.push(format!("no answer within {limit:?}")),
        }
        tokio::time::sleep_until(t + every).await;
    }
    out
}
