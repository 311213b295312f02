//! Optimistic open: relay-outer sends `Open` and starts passing the client's bytes at
//! once; relay-inner's answer (`OpenOk` or `Error`) is read at the head of the other
//! direction. A new stream thus costs one round trip through the tunnel, not two
//! (relay-inner reads exactly the `Open` frame, so the bytes behind it wait in the stream
//! until the service is connected; a refused stream drops them).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use relay_proto::frame::{ErrorCode, Frame, LEN_PREFIX};
use tokio::io::{AsyncRead, ReadBuf};

/// Why no `OpenOk` came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// relay-inner refused the stream.
    Refused(ErrorCode, String),
    /// Something other than an answer arrived.
    Protocol(String),
    /// No answer within the deadline, or the stream ended or failed before it.
    NoAnswer(String),
}

impl Refusal {
    /// The error reads fail with.
    fn to_error(&self) -> io::Error {
        io::Error::other(match self {
            Refusal::Refused(code, msg) => {
                format!("relay-inner refused the stream ({code}): {msg}")
            }
            Refusal::Protocol(m) | Refusal::NoAnswer(m) => m.clone(),
        })
    }

    /// The `reason` label of `routy_streams_failed_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Refused(code, _) => code.as_str(),
            Refusal::Protocol(_) => "protocol",
            Refusal::NoAnswer(_) => "no_answer",
        }
    }
}

enum State {
    /// Reading the length prefix (`got` bytes so far).
    Prefix { buf: [u8; LEN_PREFIX], got: usize },
    /// Reading the body.
    Body { buf: Vec<u8>, got: usize },
    /// `OpenOk` arrived: raw bytes from here on.
    Open,
    /// No `OpenOk`: every read fails.
    Refused(Refusal),
}

/// A tunnel stream whose reads begin with relay-inner's answer to `Open`. Writes pass
/// straight through from the start.
pub struct AwaitAnswer<S> {
    inner: S,
    state: State,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
    on_open: Option<Box<dyn FnOnce() + Send>>,
}

impl<S> AwaitAnswer<S> {
    /// Wraps `inner`; the answer must arrive within `timeout`, and `on_open` runs once
    /// when it is `OpenOk`.
    pub fn new(inner: S, timeout: Duration, on_open: Box<dyn FnOnce() + Send>) -> Self {
        AwaitAnswer {
            inner,
            state: State::Prefix {
                buf: [0; LEN_PREFIX],
                got: 0,
            },
            deadline: Box::pin(tokio::time::sleep(timeout)),
            timeout,
            on_open: Some(on_open),
        }
    }

    /// Whether `OpenOk` arrived.
    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open)
    }

    /// Why the stream was not opened, once that is known.
    pub fn refusal(&self) -> Option<&Refusal> {
        match &self.state {
            State::Refused(r) => Some(r),
            _ => None,
        }
    }

    fn refuse(&mut self, r: Refusal) -> io::Error {
        let e = r.to_error();
        self.state = State::Refused(r);
        e
    }
}

impl<S: AsyncRead + Unpin> AwaitAnswer<S> {
    /// Reads the answer; `Ready(Ok)` once `OpenOk` is through.
    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let want = match &mut self.state {
                State::Open => return Poll::Ready(Ok(())),
                State::Refused(r) => return Poll::Ready(Err(r.to_error())),
                State::Prefix { buf, got } => &mut buf[*got..],
                State::Body { buf, got } => &mut buf[*got..],
            };
            // Exactly what the frame still needs: the bytes behind it are the service's.
            let mut rb = ReadBuf::new(want);
            let n = match Pin::new(&mut self.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => rb.filled().len(),
                Poll::Ready(Err(e)) => {
                    return Poll::Ready(Err(
                        self.refuse(Refusal::NoAnswer(format!("no answer to Open: {e}")))
                    ))
                }
                Poll::Pending => {
                    if self.deadline.as_mut().poll(cx).is_ready() {
                        let msg = format!("no answer to Open within {:?}", self.timeout);
                        return Poll::Ready(Err(self.refuse(Refusal::NoAnswer(msg))));
                    }
                    return Poll::Pending;
                }
            };
            if n == 0 {
                let msg = "no answer to Open: relay-inner closed the stream".to_string();
                return Poll::Ready(Err(self.refuse(Refusal::NoAnswer(msg))));
            }
            match &mut self.state {
                State::Prefix { buf, got } => {
                    *got += n;
                    if *got == LEN_PREFIX {
                        match Frame::body_len(*buf) {
                            Ok(len) => {
                                self.state = State::Body {
                                    buf: vec![0; len],
                                    got: 0,
                                }
                            }
                            Err(e) => {
                                let msg = format!("malformed answer to Open: {e}");
                                return Poll::Ready(Err(self.refuse(Refusal::Protocol(msg))));
                            }
                        }
                    }
                }
                State::Body { buf, got } => {
                    *got += n;
                    if *got == buf.len() {
                        let r = match Frame::decode_body(buf) {
                            Ok(Frame::OpenOk) => None,
                            Ok(Frame::Error { code, message }) => {
                                Some(Refusal::Refused(code, message))
                            }
                            Ok(other) => Some(Refusal::Protocol(format!(
                                "unexpected answer to Open: {}",
                                other.kind_name()
                            ))),
                            Err(e) => {
                                Some(Refusal::Protocol(format!("malformed answer to Open: {e}")))
                            }
                        };
                        match r {
                            None => {
                                self.state = State::Open;
                                if let Some(f) = self.on_open.take() {
                                    f();
                                }
                            }
                            Some(r) => return Poll::Ready(Err(self.refuse(r))),
                        }
                    }
                }
                State::Open | State::Refused(_) => {}
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AwaitAnswer<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_answer(cx))?;
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

routy_tunnel::delegate_async_write!(AwaitAnswer, inner);

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn encoded(f: &Frame) -> Vec<u8> {
        let mut v = Vec::new();
        f.encode(&mut v).unwrap();
        v
    }

    #[tokio::test]
    async fn writes_flow_before_the_answer_and_reads_start_after_open_ok() {
        let (a, mut b) = tokio::io::duplex(1024);
        let opened = Arc::new(AtomicBool::new(false));
        let o = opened.clone();
        let mut s = AwaitAnswer::new(
            a,
            Duration::from_secs(5),
            Box::new(move || o.store(true, Ordering::SeqCst)),
        );
        s.write_all(b"early").await.unwrap();
        let mut got = [0u8; 5];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"early");
        // The answer and the service's first bytes in one write, fed one byte at a time.
        let mut answer = encoded(&Frame::OpenOk);
        answer.extend_from_slice(b"hello");
        let feeder = tokio::spawn(async move {
            for byte in answer {
                b.write_all(&[byte]).await.unwrap();
                tokio::task::yield_now().await;
            }
            b
        });
        let mut out = [0u8; 5];
        s.read_exact(&mut out).await.unwrap();
        assert_eq!(&out, b"hello");
        assert!(s.is_open() && opened.load(Ordering::SeqCst));
        drop(feeder.await.unwrap());
    }

    #[tokio::test]
    async fn an_error_answer_garbage_and_silence_are_refusals() {
        let refusal = Frame::Error {
            code: ErrorCode::UnknownService,
            message: "no such service".into(),
        };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (encoded(&refusal), "unknown_service"),
            (encoded(&Frame::Ping { seq: 1, micros: 2 }), "protocol"),
            (vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3], "protocol"),
            (Vec::new(), "no_answer"),
        ];
        for (bytes, reason) in cases {
            let (a, mut b) = tokio::io::duplex(1024);
            let mut s = AwaitAnswer::new(a, Duration::from_millis(200), Box::new(|| {}));
            b.write_all(&bytes).await.unwrap();
            if bytes.is_empty() {
                // Silence: the deadline answers.
                let mut buf = [0u8; 8];
                assert!(s.read(&mut buf).await.is_err());
                drop(b);
            } else {
                drop(b);
                let mut buf = [0u8; 8];
                assert!(s.read(&mut buf).await.is_err(), "{reason}");
            }
            assert!(!s.is_open());
            assert_eq!(s.refusal().map(Refusal::reason), Some(reason), "{bytes:?}");
        }
        // relay-inner closing the stream before answering (half an answer, then EOF).
        let (a, mut b) = tokio::io::duplex(1024);
        let mut s = AwaitAnswer::new(a, Duration::from_secs(5), Box::new(|| {}));
        b.write_all(&encoded(&Frame::OpenOk)[..2]).await.unwrap();
        drop(b);
        let err = s.read(&mut [0u8; 8]).await.unwrap_err();
        assert!(err.to_string().contains("closed the stream"), "{err}");
        assert_eq!(s.refusal().map(Refusal::reason), Some("no_answer"));
        // Later reads keep failing the same way.
        assert!(s.read(&mut [0u8; 8]).await.is_err());
    }
}
