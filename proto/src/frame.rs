//! The control frames both relays exchange, and their binary codec.
//!
//! A frame on the wire is `len: u32 BE | version: u8 | kind: u8 | body`, where `len`
//! counts everything after itself and is at most [`MAX_FRAME_LEN`]. Strings are
//! `u16 BE length | UTF-8`, lists are `u16 BE count | items`. Frames only travel on the
//! control stream and at the head of data streams; the spliced bytes after an `OpenOk`
//! are not framed.
//!
//! Decoding is total: any byte sequence gives a frame or a [`FrameError`], never a panic
//! (checked by the property tests below, which feed random and corrupted frames).

use std::fmt;

/// Version of the frame encoding, the byte after the length prefix.
pub const FRAME_VERSION: u8 = 1;

/// Hard upper bound of a frame's length field, in bytes.
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// Most entries a list in a frame may hold (services, features).
pub const MAX_LIST_LEN: usize = 1024;

/// A message of the Routy protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// First frame of relay-inner on the control stream.
    Hello(Hello),
    /// relay-outer's acceptance of a Hello.
    HelloAck(HelloAck),
    /// A refusal with a reason; the sender closes the stream or session after it.
    Error {
        /// What went wrong, machine readable.
        code: ErrorCode,
        /// What went wrong, for the log of the other side.
        message: String,
    },
    /// Keepalive probe; the peer answers with a Pong carrying the same values.
    Ping {
        /// Sequence number of this probe.
        seq: u64,
        /// Sender's monotonic clock in microseconds when sent.
        micros: u64,
    },
    /// Answer to a Ping.
    Pong {
        /// The Ping's sequence number.
        seq: u64,
        /// The Ping's timestamp, echoed.
        micros: u64,
    },
    /// Head of a data stream opened by relay-outer: connect me to this service.
    Open {
        /// Service name as relay-inner's config lists it.
        service: String,
        /// Address of the client that connected to relay-outer, for logs.
        client: String,
    },
    /// relay-inner connected to the service; raw bytes follow in both directions.
    OpenOk,
    /// The sender is shutting down: open no new streams on this session.
    GoAway {
        /// Why, for the log.
        reason: String,
    },
    /// Head of a CDC shipping stream opened by relay-inner.
    CdcOpen {
        /// The source's name in relay-inner's config.
        source: String,
        /// Seq of the oldest record relay-inner's spool still holds.
        first_seq: u64,
        /// Seq of the newest durable record in the spool (0 when none yet).
        last_seq: u64,
        /// Random id of the spool, made when it was created: a store accepts records
        /// from one spool only (a reset spool or two relay-inners shipping a source of
        /// the same name would otherwise mix their records).
        spool_id: u64,
    },
    /// relay-outer's answer to CdcOpen: send records from `next_seq` on.
    CdcReady {
        /// The next seq the store expects.
        next_seq: u64,
    },
}

/// The handshake's opening frame, sent by relay-inner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version spoken by the sender.
    pub protocol: u16,
    /// The sender's node name (hostname or configured), for logs and status.
    pub node: String,
    /// Names of the services the sender exposes.
    pub services: Vec<String>,
    /// Optional capabilities, by name.
    pub features: Vec<String>,
}

/// relay-outer's answer to a Hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloAck {
    /// Protocol version both sides will speak.
    pub protocol: u16,
    /// The tunnel name relay-outer took from the client certificate.
    pub tunnel: String,
    /// Session id assigned by relay-outer, for correlating logs.
    pub session_id: u64,
}

/// Machine-readable reason carried by [`Frame::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The peer speaks a protocol version this side does not.
    VersionMismatch,
    /// The tunnel named in the certificate is not configured here.
    UnknownTunnel,
    /// relay-inner exposes no service of that name.
    UnknownService,
    /// relay-inner could not connect to the service's target.
    ConnectFailed,
    /// The dial of the target did not finish within its timeout.
    ConnectTimeout,
    /// A limit was reached (streams per session, connections).
    OverLimit,
    /// The peer sent something this side did not expect.
    Protocol,
    /// The sender is shutting down.
    ShuttingDown,
    /// A code this version does not know.
    Other(u16),
}

impl ErrorCode {
    fn to_u16(self) -> u16 {
        match self {
            ErrorCode::VersionMismatch => 1,
            ErrorCode::UnknownTunnel => 2,
            ErrorCode::UnknownService => 3,
            ErrorCode::ConnectFailed => 4,
            ErrorCode::ConnectTimeout => 5,
            ErrorCode::OverLimit => 6,
            ErrorCode::Protocol => 7,
            ErrorCode::ShuttingDown => 8,
            ErrorCode::Other(n) => n,
        }
    }

    fn from_u16(n: u16) -> Self {
        match n {
            1 => ErrorCode::VersionMismatch,
            2 => ErrorCode::UnknownTunnel,
            3 => ErrorCode::UnknownService,
            4 => ErrorCode::ConnectFailed,
            5 => ErrorCode::ConnectTimeout,
            6 => ErrorCode::OverLimit,
            7 => ErrorCode::Protocol,
            8 => ErrorCode::ShuttingDown,
            n => ErrorCode::Other(n),
        }
    }

    /// Short snake_case name, used in logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::VersionMismatch => "version_mismatch",
            ErrorCode::UnknownTunnel => "unknown_tunnel",
            ErrorCode::UnknownService => "unknown_service",
            ErrorCode::ConnectFailed => "connect_failed",
            ErrorCode::ConnectTimeout => "connect_timeout",
            ErrorCode::OverLimit => "over_limit",
            ErrorCode::Protocol => "protocol",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Other(_) => "other",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorCode::Other(n) => write!(f, "error code {n}"),
            c => f.write_str(c.as_str()),
        }
    }
}

/// Why bytes could not be decoded into a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix exceeds [`MAX_FRAME_LEN`].
    #[error("frame of {0} bytes exceeds the maximum of {MAX_FRAME_LEN}")]
    TooLarge(usize),
    /// The length prefix is smaller than the fixed header.
    #[error("frame of {0} bytes is shorter than its header")]
    TooShort(usize),
    /// The frame encoding version is not one this side reads.
    #[error("frame encoding version {0} is not supported (this side reads {FRAME_VERSION})")]
    UnsupportedVersion(u8),
    /// The kind byte names no frame.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// The body ended before a field was complete.
    #[error("frame body truncated while reading {0}")]
    Truncated(&'static str),
    /// Bytes were left over after the last field.
    #[error("{0} unexpected bytes after the frame body")]
    TrailingBytes(usize),
    /// A string field is not UTF-8.
    #[error("field {0} is not valid UTF-8")]
    BadUtf8(&'static str),
    /// A list holds more entries than allowed.
    #[error("list {0} holds more than {MAX_LIST_LEN} entries")]
    ListTooLong(&'static str),
    /// A value would not fit its field when encoding.
    #[error("field {0} is too long to encode")]
    FieldTooLong(&'static str),
}

const KIND_HELLO: u8 = 1;
const KIND_HELLO_ACK: u8 = 2;
const KIND_ERROR: u8 = 3;
const KIND_PING: u8 = 4;
const KIND_PONG: u8 = 5;
const KIND_OPEN: u8 = 6;
const KIND_OPEN_OK: u8 = 7;
const KIND_GO_AWAY: u8 = 8;
const KIND_CDC_OPEN: u8 = 9;
const KIND_CDC_READY: u8 = 10;

/// Size of the length prefix.
pub const LEN_PREFIX: usize = 4;

impl Frame {
    /// Short name of the frame kind, for logs.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "Hello",
            Frame::HelloAck(_) => "HelloAck",
            Frame::Error { .. } => "Error",
            Frame::Ping { .. } => "Ping",
            Frame::Pong { .. } => "Pong",
            Frame::Open { .. } => "Open",
            Frame::OpenOk => "OpenOk",
            Frame::GoAway { .. } => "GoAway",
            Frame::CdcOpen { .. } => "CdcOpen",
            Frame::CdcReady { .. } => "CdcReady",
        }
    }

    /// Appends the frame, length prefix included, to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), FrameError> {
        let start = out.len();
        out.extend_from_slice(&[0; LEN_PREFIX]);
        out.push(FRAME_VERSION);
        match self {
            Frame::Hello(h) => {
                out.push(KIND_HELLO);
                out.extend_from_slice(&h.protocol.to_be_bytes());
                put_str(out, &h.node, "node")?;
                put_list(out, &h.services, "services")?;
                put_list(out, &h.features, "features")?;
            }
            Frame::HelloAck(a) => {
                out.push(KIND_HELLO_ACK);
                out.extend_from_slice(&a.protocol.to_be_bytes());
                put_str(out, &a.tunnel, "tunnel")?;
                out.extend_from_slice(&a.session_id.to_be_bytes());
            }
            Frame::Error { code, message } => {
                out.push(KIND_ERROR);
                out.extend_from_slice(&code.to_u16().to_be_bytes());
                put_str(out, message, "message")?;
            }
            Frame::Ping { seq, micros } | Frame::Pong { seq, micros } => {
                out.push(if matches!(self, Frame::Ping { .. }) {
                    KIND_PING
                } else {
                    KIND_PONG
                });
                out.extend_from_slice(&seq.to_be_bytes());
                out.extend_from_slice(&micros.to_be_bytes());
            }
            Frame::Open { service, client } => {
                out.push(KIND_OPEN);
                put_str(out, service, "service")?;
                put_str(out, client, "client")?;
            }
            Frame::OpenOk => out.push(KIND_OPEN_OK),
            Frame::GoAway { reason } => {
                out.push(KIND_GO_AWAY);
                put_str(out, reason, "reason")?;
            }
            Frame::CdcOpen {
                source,
                first_seq,
                last_seq,
                spool_id,
            } => {
                out.push(KIND_CDC_OPEN);
                put_str(out, source, "source")?;
                out.extend_from_slice(&first_seq.to_be_bytes());
                out.extend_from_slice(&last_seq.to_be_bytes());
                out.extend_from_slice(&spool_id.to_be_bytes());
            }
            Frame::CdcReady { next_seq } => {
                out.push(KIND_CDC_READY);
                out.extend_from_slice(&next_seq.to_be_bytes());
            }
        }
        let len = out.len() - start - LEN_PREFIX;
        if len > MAX_FRAME_LEN {
            out.truncate(start);
            return Err(FrameError::TooLarge(len));
        }
        out[start..start + LEN_PREFIX].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(())
    }

    /// Reads a length prefix and says how many body bytes follow, or why not.
    pub fn body_len(prefix: [u8; LEN_PREFIX]) -> Result<usize, FrameError> {
        let len = u32::from_be_bytes(prefix) as usize;
        if len > MAX_FRAME_LEN {
            return Err(FrameError::TooLarge(len));
        }
        if len < 2 {
            return Err(FrameError::TooShort(len));
        }
        Ok(len)
    }

    /// Decodes a frame body (everything after the length prefix).
    pub fn decode_body(body: &[u8]) -> Result<Frame, FrameError> {
        let mut r = Reader { buf: body };
        let version = r.u8("version")?;
        if version != FRAME_VERSION {
            return Err(FrameError::UnsupportedVersion(version));
        }
        let kind = r.u8("kind")?;
        let frame = match kind {
            KIND_HELLO => Frame::Hello(Hello {
                protocol: r.u16("protocol")?,
                node: r.string("node")?,
                services: r.list("services")?,
                features: r.list("features")?,
            }),
            KIND_HELLO_ACK => Frame::HelloAck(HelloAck {
                protocol: r.u16("protocol")?,
                tunnel: r.string("tunnel")?,
                session_id: r.u64("session_id")?,
            }),
            KIND_ERROR => Frame::Error {
                code: ErrorCode::from_u16(r.u16("code")?),
                message: r.string("message")?,
            },
            KIND_PING => Frame::Ping {
                seq: r.u64("seq")?,
                micros: r.u64("micros")?,
            },
            KIND_PONG => Frame::Pong {
                seq: r.u64("seq")?,
                micros: r.u64("micros")?,
            },
            KIND_OPEN => Frame::Open {
                service: r.string("service")?,
                client: r.string("client")?,
            },
            KIND_OPEN_OK => Frame::OpenOk,
            KIND_GO_AWAY => Frame::GoAway {
                reason: r.string("reason")?,
            },
            KIND_CDC_OPEN => Frame::CdcOpen {
                source: r.string("source")?,
                first_seq: r.u64("first_seq")?,
                last_seq: r.u64("last_seq")?,
                spool_id: r.u64("spool_id")?,
            },
            KIND_CDC_READY => Frame::CdcReady {
                next_seq: r.u64("next_seq")?,
            },
            k => return Err(FrameError::UnknownKind(k)),
        };
        if !r.buf.is_empty() {
            return Err(FrameError::TrailingBytes(r.buf.len()));
        }
        Ok(frame)
    }

    /// Decodes one whole frame, length prefix included, from the front of `buf`;
    /// returns the frame and the bytes it took, or `Ok(None)` if more bytes are needed.
    pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
        let Some(prefix) = buf.get(..LEN_PREFIX) else {
            return Ok(None);
        };
        let mut p = [0u8; LEN_PREFIX];
        p.copy_from_slice(prefix);
        let len = Frame::body_len(p)?;
        let Some(body) = buf.get(LEN_PREFIX..LEN_PREFIX + len) else {
            return Ok(None);
        };
        Ok(Some((Frame::decode_body(body)?, LEN_PREFIX + len)))
    }
}

fn put_str(out: &mut Vec<u8>, s: &str, field: &'static str) -> Result<(), FrameError> {
    let len = u16::try_from(s.len()).map_err(|_| FrameError::FieldTooLong(field))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

fn put_list(out: &mut Vec<u8>, items: &[String], field: &'static str) -> Result<(), FrameError> {
    if items.len() > MAX_LIST_LEN {
        return Err(FrameError::ListTooLong(field));
    }
    out.extend_from_slice(&(items.len() as u16).to_be_bytes());
    for item in items {
        put_str(out, item, field)?;
    }
    Ok(())
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], FrameError> {
        if self.buf.len() < n {
            return Err(FrameError::Truncated(field));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, FrameError> {
        Ok(self.take(1, field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, FrameError> {
        let b = self.take(2, field)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, FrameError> {
        let b = self.take(8, field)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn string(&mut self, field: &'static str) -> Result<String, FrameError> {
        let len = self.u16(field)? as usize;
        let bytes = self.take(len, field)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| FrameError::BadUtf8(field))
    }

    fn list(&mut self, field: &'static str) -> Result<Vec<String>, FrameError> {
        let n = self.u16(field)? as usize;
        if n > MAX_LIST_LEN {
            return Err(FrameError::ListTooLong(field));
        }
        let mut items = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            items.push(self.string(field)?);
        }
        Ok(items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Frame> {
        vec![
            Frame::Hello(Hello {
                protocol: 1,
                node: "db-host-1".into(),
                services: vec!["orders-pg".into(), "ünïcode".into()],
                features: vec![],
            }),
            Frame::HelloAck(HelloAck {
                protocol: 1,
                tunnel: "site-a".into(),
                session_id: u64::MAX,
            }),
            Frame::Error {
                code: ErrorCode::UnknownService,
                message: "no service named x".into(),
            },
            Frame::Error {
                code: ErrorCode::Other(999),
                message: String::new(),
            },
            Frame::Ping { seq: 7, micros: 1 },
            Frame::Pong {
                seq: 7,
                micros: u64::MAX,
            },
            Frame::Open {
                service: "orders-pg".into(),
                client: "10.0.0.1:5555".into(),
            },
            Frame::OpenOk,
            Frame::GoAway {
                reason: "shutdown".into(),
            },
            Frame::CdcOpen {
                source: "orders".into(),
                first_seq: 1,
                last_seq: u64::MAX,
                spool_id: 0x1234_5678_9abc_def0,
            },
            Frame::CdcReady { next_seq: 42 },
        ]
    }

    #[test]
    fn every_frame_round_trips() {
        for f in samples() {
            let mut buf = Vec::new();
            f.encode(&mut buf).unwrap();
            let (g, used) = Frame::decode(&buf).unwrap().unwrap();
            assert_eq!(f, g);
            assert_eq!(used, buf.len());
        }
    }

    #[test]
    fn partial_input_asks_for_more() {
        let mut buf = Vec::new();
        samples()[0].encode(&mut buf).unwrap();
        for cut in 0..buf.len() {
            assert_eq!(Frame::decode(&buf[..cut]).unwrap(), None, "cut at {cut}");
        }
    }

    #[test]
    fn oversized_length_is_refused_before_reading_the_body() {
        let prefix = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes();
        assert_eq!(
            Frame::decode(&prefix),
            Err(FrameError::TooLarge(MAX_FRAME_LEN + 1))
        );
        assert_eq!(
            Frame::body_len([0xff; 4]),
            Err(FrameError::TooLarge(u32::MAX as usize))
        );
    }

    #[test]
    fn encoding_an_oversized_frame_fails_cleanly() {
        let f = Frame::Hello(Hello {
            protocol: 1,
            node: "n".into(),
            services: (0..MAX_LIST_LEN).map(|_| "x".repeat(100)).collect(),
            features: vec![],
        });
        let mut buf = vec![1, 2, 3];
        assert!(matches!(f.encode(&mut buf), Err(FrameError::TooLarge(_))));
        assert_eq!(buf, vec![1, 2, 3]);
        let long = Frame::GoAway {
            reason: "x".repeat(70_000),
        };
        assert_eq!(
            long.encode(&mut Vec::new()),
            Err(FrameError::FieldTooLong("reason"))
        );
    }

    #[test]
    fn malformed_bodies_name_the_problem() {
        assert_eq!(
            Frame::decode_body(&[9, KIND_OPEN_OK]),
            Err(FrameError::UnsupportedVersion(9))
        );
        assert_eq!(
            Frame::decode_body(&[FRAME_VERSION, 200]),
            Err(FrameError::UnknownKind(200))
        );
        assert_eq!(
            Frame::decode_body(&[FRAME_VERSION, KIND_OPEN_OK, 0]),
            Err(FrameError::TrailingBytes(1))
        );
        assert_eq!(
            Frame::decode_body(&[FRAME_VERSION, KIND_OPEN, 0, 5, b'a']),
            Err(FrameError::Truncated("service"))
        );
        assert_eq!(
            Frame::decode_body(&[FRAME_VERSION, KIND_GO_AWAY, 0, 2, 0xff, 0xfe]),
            Err(FrameError::BadUtf8("reason"))
        );
        assert_eq!(Frame::body_len([0, 0, 0, 1]), Err(FrameError::TooShort(1)));
        // TLS ClientHello bytes or an HTTP request are not frames.
        assert!(Frame::decode(b"GET / HTTP/1.1\r\n\r\n").is_err());
        assert!(Frame::decode(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).is_err());
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Frame::decode(&bytes);
            let _ = Frame::decode_body(&bytes);
        }

        #[test]
        fn random_bodies_with_valid_header_never_panic(
            kind in 0u8..12,
            body in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let mut b = vec![FRAME_VERSION, kind];
            b.extend_from_slice(&body);
            let _ = Frame::decode_body(&b);
        }

        #[test]
        fn open_round_trips(service in ".{0,200}", client in ".{0,100}") {
            let f = Frame::Open { service, client };
            let mut buf = Vec::new();
            f.encode(&mut buf).unwrap();
            prop_assert_eq!(Frame::decode(&buf).unwrap().unwrap().0, f);
        }

        #[test]
        fn corrupted_frames_never_panic(idx in 0usize..64, val in any::<u8>()) {
            for f in samples() {
                let mut buf = Vec::new();
                f.encode(&mut buf).unwrap();
                let i = idx % buf.len();
                buf[i] = val;
                let _ = Frame::decode(&buf);
            }
        }
    }
}
