//! Bad input on every port, end to end on loopback: garbage and wrong identities on the
//! tunnel port, malformed frames from an impostor relay-inner, hostile streams from an
//! impostor relay-outer, garbage through a listener. Each case must be refused with a
//! logged reason, must harm nothing else (the real tunnel keeps serving SQL), and must
//! not panic either relay.

use std::net::SocketAddr;
use std::time::Duration;

use relay_proto::frame::{ErrorCode, Frame, Hello};
use routy_e2e::fake::{self, Ending, FakeInner, FakeOuter, STEP};
use routy_e2e::relays::{inner_yaml, Pki, Relay, Tunnel};
use routy_e2e::{psql_at, Pg, PgOpts};
use routy_ops::metrics as m;
use routy_tunnel::control::Keepalive;
use routy_tunnel::handshake::PROTOCOL_VERSION;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KA: (&str, &str) = ("500ms", "3s");
/// How long a relay gets to log what a test waits for.
const LOG: Duration = Duration::from_secs(30);

/// The legitimate tunnel (PostgreSQL, both relays, listener `pg` for `site-a`) that must
/// keep working whatever else arrives.
struct Setup(Tunnel);

impl std::ops::Deref for Setup {
    type Target = Tunnel;
    fn deref(&self) -> &Tunnel {
        &self.0
    }
}

impl Setup {
    fn new() -> Setup {
        let s = Setup(Tunnel::start(KA, ""));
        s.assert_sql_works("before any bad input");
        s
    }

    fn tunnel_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.tunnel_port))
    }

    fn listen_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.listen_port))
    }

    /// SQL through relay-outer's listener, i.e. through the real tunnel.
    fn assert_sql_works(&self, when: &str) {
        match psql_at("127.0.0.1", self.listen_port, "SELECT 40 + 2") {
            Ok(out) => assert_eq!(out, "42", "SQL through the tunnel {when}: wrong answer"),
            Err(e) => panic!(
                "SQL through the tunnel failed {when}: {e}\n--- relay-outer ---\n{}\n--- relay-inner ---\n{}",
                tail(&self.outer),
                tail(&self.inner)
            ),
        }
    }

    /// The legitimate session was never torn down and no other session registered.
    fn assert_one_undisturbed_session(&self) {
        assert_eq!(
            self.outer.metric(m::SESSION_CONNECTS, &[]),
            1.0,
            "relay-outer registered a session other than the real relay-inner's:\n{}",
            tail(&self.outer)
        );
        assert_eq!(
            self.outer.metric(m::SESSION_DISCONNECTS, &[]),
            0.0,
            "relay-outer lost the real tunnel:\n{}",
            tail(&self.outer)
        );
        assert_eq!(
            self.inner.metric(m::SESSION_CONNECTS, &[]),
            1.0,
            "the real relay-inner had to reconnect:\n{}",
            tail(&self.inner)
        );
    }
}

fn inner_cfg(pki: &Pki, tunnel: &str, tunnel_port: u16, pg: &Pg) -> String {
    Tunnel::inner_cfg(pki, tunnel, tunnel_port, pg, KA, "")
}

fn tail(r: &Relay) -> String {
    let log = r.proc.log();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// Lines of `r`'s log that contain `needle`, in order.
fn lines_with(r: &Relay, needle: &str) -> Vec<String> {
    r.proc
        .log()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

/// The `n`-th (1-based) log line of `r` containing `needle`, waiting for it.
fn nth_line(r: &Relay, needle: &str, n: usize) -> String {
    r.wait_count(needle, n, LOG);
    let line = lines_with(r, needle)
        .into_iter()
        .nth(n - 1)
        .expect("counted line");
    eprintln!("{}: {line}", r.proc.name());
    line
}

fn assert_no_panics(relays: &[&Relay]) {
    for r in relays {
        assert!(
            !r.proc.log().contains("panicked"),
            "{} panicked:\n{}",
            r.proc.name(),
            r.proc.log()
        );
    }
}

/// The peer closed the connection (cleanly or not), having sent at most `max_bytes`
/// (a TLS alert, say) first.
fn assert_ended(what: &str, ending: &Ending, max_bytes: usize) {
    assert!(
        ending.ended() && ending.bytes() <= max_bytes,
        "{what}: expected the peer to close the connection (after at most {max_bytes} bytes), \
         got {ending:?}"
    );
}

/// Room for a TLS alert record or two.
const ALERT: usize = 64;

#[test]
fn non_tls_bytes_on_the_tunnel_port_are_refused() {
    let s = Setup::new();
    let seed = fake::seed();
    eprintln!("noise seed {seed}");
    let rt = fake::runtime();

    // An HTTP request that is not the tunnel's WebSocket upgrade: a 400 saying what the
    // port is, then the connection closed.
    let answer = rt.block_on(async {
        let mut tcp = tokio::net::TcpStream::connect(s.tunnel_addr())
            .await
            .unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: routy\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(STEP, tcp.read_to_end(&mut answer)).await;
        String::from_utf8_lossy(&answer).into_owned()
    });
    assert!(
        answer.starts_with("HTTP/1.1 400") && answer.contains("this is a Routy tunnel port"),
        "HTTP request on the tunnel port: {answer:?}"
    );
    let line = nth_line(&s.outer, "WebSocket upgrade failed", 1);
    assert!(line.contains("reason="), "no reason logged: {line}");

    // 64 KiB of noise, then EOF.
    let ending = rt.block_on(async {
        let mut tcp = tokio::net::TcpStream::connect(s.tunnel_addr())
            .await
            .unwrap();
        // relay-outer may give up (and reset) before reading everything.
        let _ = tcp.write_all(&fake::noise(seed, 64 * 1024)).await;
        let _ = tcp.shutdown().await;
        fake::read_until_end(&mut tcp, STEP).await
    });
    assert_ended("64 KiB of noise on the tunnel port", &ending, ALERT);
    nth_line(&s.outer, "TLS handshake failed", 1);

    s.assert_sql_works("after garbage on the tunnel port");
    s.assert_one_undisturbed_session();
    assert_no_panics(&[&s.outer, &s.inner]);
}

#[test]
fn tls_without_a_client_certificate_is_refused() {
    let s = Setup::new();
    let rt = fake::runtime();
    let outcome = rt.block_on(async {
        match fake::tls_without_client_cert(s.tunnel_addr(), &s.pki, "localhost").await {
            Err(e) => format!("TLS handshake failed on the client side: {e}"),
            Ok(mut tls) => {
                // TLS 1.3: the client may finish before the server has judged its (empty)
                // certificate; the refusal then arrives as an alert or a close.
                let _ = tls.write_all(b"\0\0\0\0").await;
                let _ = tls.flush().await;
                let ending = fake::read_until_end(&mut tls, STEP).await;
                assert_ended("TLS without a client certificate", &ending, 0);
                format!("connection ended: {ending:?}")
            }
        }
    });
    eprintln!("{outcome}");
    let line = nth_line(&s.outer, "TLS handshake failed", 1);
    assert!(
        line.to_lowercase().contains("certificate"),
        "relay-outer's reason should say the client certificate is missing: {line}"
    );
    s.assert_sql_works("after a client without certificate");
    s.assert_one_undisturbed_session();
    assert_no_panics(&[&s.outer, &s.inner]);
}

/// Starts a real relay-inner whose "site-a" certificate comes from another CA; it
/// trusts the real relay-outer (so it is the client certificate, not the server's,
/// that fails).
fn start_foreign_ca_inner(s: &Setup) -> (Pki, Relay) {
    let other = Pki::new(&["localhost", "127.0.0.1"]);
    other.issue("site-a");
    let yaml = inner_cfg(&other, "site-a", s.tunnel_port, &s.pg).replace(
        &other.path("ca.crt").display().to_string(),
        &s.pki.path("ca.crt").display().to_string(),
    );
    assert!(yaml.contains(&s.pki.path("ca.crt").display().to_string()));
    let rogue = Relay::start("relay-inner", "rogue-inner", &yaml, None);
    (other, rogue)
}

#[test]
fn a_client_certificate_from_another_ca_is_refused() {
    let s = Setup::new();
    let (_other, rogue) = start_foreign_ca_inner(&s);

    // It keeps retrying, and is refused every time.
    rogue.wait_count("relay-outer refused this relay", 3, LOG);
    s.outer.wait_count("TLS handshake failed", 3, LOG);
    let line = nth_line(&s.outer, "TLS handshake failed", 1);
    assert!(
        line.to_lowercase().contains("certificate"),
        "relay-outer's reason should name the certificate problem: {line}"
    );
    assert_eq!(
        rogue.count("tunnel up"),
        0,
        "a certificate from another CA got a tunnel:\n{}",
        tail(&rogue)
    );

    s.assert_sql_works("while a relay-inner with a foreign certificate retries");
    s.assert_one_undisturbed_session();
    assert_no_panics(&[&s.outer, &s.inner, &rogue]);
}

/// The operator of a relay-inner whose certificate relay-outer rejects must be able to
/// tell from relay-inner's log that the certificate is the problem.
#[test]
fn a_rejected_client_certificate_is_named_in_relay_inners_log() {
    let s = Setup::new();
    let (_other, rogue) = start_foreign_ca_inner(&s);
    let line = nth_line(&rogue, "relay-outer refused this relay", 1);
    s.outer.wait_count("TLS handshake failed", 1, LOG);
    let l = line.to_lowercase();
    assert!(
        l.contains("alert") && l.contains("certificate"),
        "relay-outer rejected relay-inner's client certificate (its log says {:?}); \
         relay-inner must say the TLS session was rejected and point at the certificate, \
         but it logs {line:?}",
        lines_with(&s.outer, "TLS handshake failed")[0]
    );
    assert_no_panics(&[&s.outer, &s.inner, &rogue]);
}

#[test]
fn a_valid_certificate_for_an_unconfigured_tunnel_is_refused() {
    let s = Setup::new();
    s.pki.issue("site-z");
    let z = Relay::start(
        "relay-inner",
        "site-z-inner",
        &inner_cfg(&s.pki, "site-z", s.tunnel_port, &s.pg),
        None,
    );

    let outer_line = nth_line(&s.outer, "not configured", 1);
    assert!(
        outer_line.contains("site-z"),
        "relay-outer should name the tunnel: {outer_line}"
    );
    // relay-inner is told why, logs it, and keeps retrying.
    z.wait_count("relay-outer refused this relay", 2, LOG);
    let inner_line = nth_line(&z, "relay-outer refused this relay", 1);
    assert!(
        inner_line.contains("not configured") && inner_line.contains("unknown_tunnel"),
        "relay-inner should log relay-outer's reason: {inner_line}"
    );
    assert_eq!(
        z.count("tunnel up"),
        0,
        "an unconfigured tunnel came up:\n{}",
        tail(&z)
    );

    s.assert_sql_works("while an unconfigured tunnel retries");
    s.assert_one_undisturbed_session();
    assert_no_panics(&[&s.outer, &s.inner, &z]);
}

#[test]
fn malformed_frames_on_the_control_stream_close_only_that_connection() {
    let s = Setup::new();
    let rt = fake::runtime();
    let mut ping = Vec::new();
    Frame::Ping { seq: 1, micros: 1 }.encode(&mut ping).unwrap();
    let mut future_hello = Vec::new();
    Frame::Hello(Hello {
        protocol: PROTOCOL_VERSION + 98,
        node: "impostor".into(),
        services: vec!["pg".into()],
        features: vec![],
    })
    .encode(&mut future_hello)
    .unwrap();

    struct Case {
        what: &'static str,
        bytes: Vec<u8>,
        /// Close the control stream after the bytes.
        eof: bool,
        /// What relay-outer's logged reason must say (lower case).
        reason: &'static str,
        /// The Error frame relay-outer must answer with, if the bytes were a frame.
        answer: Option<(ErrorCode, &'static str)>,
    }
    let case = |what, bytes, eof, reason| Case {
        what,
        bytes,
        eof,
        reason,
        answer: None,
    };
    let cases = [
        case(
            "length prefix 0xFFFFFFFF",
            vec![0xff; 4],
            false,
            "exceeds the maximum",
        ),
        case(
            "unknown frame kind",
            vec![0, 0, 0, 2, 1, 200],
            false,
            "unknown frame kind 200",
        ),
        case(
            "unsupported encoding version",
            vec![0, 0, 0, 2, 9, 7],
            false,
            "version 9 is not supported",
        ),
        case(
            "length shorter than the header",
            vec![0, 0, 0, 1, 1],
            false,
            "shorter than its header",
        ),
        case(
            "garbage then EOF",
            [&[0u8, 0, 0, 64][..], b"garbage"].concat(),
            true,
            "eof",
        ),
        Case {
            answer: Some((ErrorCode::Protocol, "expected Hello, got Ping")),
            ..case(
                "a Ping instead of Hello",
                ping,
                false,
                "unexpected ping frame",
            )
        },
        Case {
            answer: Some((ErrorCode::VersionMismatch, "relay-inner sent 99")),
            ..case(
                "a Hello of protocol version 99",
                future_hello,
                false,
                "version mismatch",
            )
        },
    ];

    for (i, c) in cases.iter().enumerate() {
        let what = c.what;
        let (answer, closed) = rt.block_on(async {
            let mut f = FakeInner::connect(s.tunnel_addr(), &s.pki, "site-a", "localhost").await;
            f.write_raw(&c.bytes).await;
            if c.eof {
                let _ = f.ctrl.shutdown().await;
            }
            let answer = match c.answer {
                Some(_) => Some(routy_tunnel::codec::read_frame(&mut f.ctrl, STEP).await),
                None => None,
            };
            (answer, f.closed_within(STEP).await)
        });
        assert!(
            closed,
            "{what}: relay-outer did not close the connection\n{}",
            tail(&s.outer)
        );
        let line = nth_line(&s.outer, "tunnel handshake failed", i + 1);
        assert!(
            line.to_lowercase().contains(c.reason),
            "{what}: relay-outer's reason should contain {:?}: {line}",
            c.reason
        );
        // Whether the refusal frame reaches the peer is checked (many times over) in
        // `handshake_refusals_reach_the_peer`; here the frame, if it came, must be right.
        if let (Some((code, text)), Some(Ok(answer))) = (c.answer, answer) {
            match answer {
                Frame::Error { code: got, message } => {
                    assert_eq!(got, code, "{what}: {message}");
                    assert!(message.contains(text), "{what}: {message}");
                }
                other => panic!("{what}: expected an Error frame ({code}), got {other:?}"),
            }
        }
        s.assert_sql_works(&format!("after {what} on a control stream"));
    }

    assert_eq!(
        s.outer.count("tunnel handshake failed"),
        cases.len(),
        "one logged refusal per bad connection"
    );
    s.assert_one_undisturbed_session();
    let up = lines_with(&s.outer, "tunnel up");
    assert!(
        up[0].contains("sessions=1"),
        "site-a should have one session: {up:?}"
    );
    assert_no_panics(&[&s.outer, &s.inner]);
}

/// relay-outer refuses a Hello of another protocol version, or another frame instead of
/// a Hello, with an Error frame before it closes the connection, so that relay-inner can
/// log why ("a version mismatch is a clear error on both sides"). Tried many times:
/// the frame must arrive every time.
#[test]
fn handshake_refusals_reach_the_peer() {
    // Each refused connection lingers until the fake closes (it waits to see the close).
    const TRIES: usize = 5;
    let s = Setup::new();
    let rt = fake::runtime();
    let mut future_hello = Vec::new();
    Frame::Hello(Hello {
        protocol: PROTOCOL_VERSION + 98,
        node: "impostor".into(),
        services: vec!["pg".into()],
        features: vec![],
    })
    .encode(&mut future_hello)
    .unwrap();
    let mut ping = Vec::new();
    Frame::Ping { seq: 1, micros: 1 }.encode(&mut ping).unwrap();
    let cases = [
        (
            "a Hello of protocol version 99",
            future_hello,
            ErrorCode::VersionMismatch,
        ),
        ("a Ping instead of Hello", ping, ErrorCode::Protocol),
    ];

    let mut report = Vec::new();
    let mut all_told = true;
    for (what, bytes, code) in &cases {
        let mut told = 0;
        let mut lost = Vec::new();
        for _ in 0..TRIES {
            let answer = rt.block_on(async {
                let mut f =
                    FakeInner::connect(s.tunnel_addr(), &s.pki, "site-a", "localhost").await;
                f.write_raw(bytes).await;
                let answer = routy_tunnel::codec::read_frame(&mut f.ctrl, STEP).await;
                assert!(
                    f.closed_within(STEP).await,
                    "{what}: relay-outer did not close the connection"
                );
                answer
            });
            match answer {
                Ok(Frame::Error { code: got, .. }) if got == *code => told += 1,
                other => lost.push(format!("{other:?}")),
            }
        }
        lost.dedup();
        all_told &= told == TRIES;
        report.push(format!(
            "{what}: Error({code}) received {told}/{TRIES} times; otherwise {lost:?}"
        ));
    }
    s.outer
        .wait_count("tunnel handshake failed", cases.len() * TRIES, LOG);
    assert!(
        all_told,
        "relay-outer logs \"tunnel handshake failed\" but its refusal frame was lost \
         (it must reach the peer before the connection is cut):\n{}",
        report.join("\n")
    );
    s.assert_sql_works("after the refused handshakes");
    s.assert_one_undisturbed_session();
    assert_no_panics(&[&s.outer, &s.inner]);
}

#[test]
fn hostile_streams_from_relay_outer_are_refused_and_the_session_survives() {
    let pg = Pg::start(PgOpts::default());
    let pki = Pki::new(&["localhost", "127.0.0.1"]);
    pki.issue("site-a");
    let rt = fake::runtime();
    let fake_outer = rt.block_on(FakeOuter::bind(&pki));
    let yaml = inner_yaml(
        &pki,
        "site-a",
        &[(fake_outer.addr().to_string(), "localhost")],
        &[("pg", format!("127.0.0.1:{}", pg.port()))],
        KA,
        "",
    );
    let inner = Relay::start("relay-inner", "relay-inner", &yaml, None);
    let ka = Keepalive {
        interval: Duration::from_millis(500),
        timeout: Duration::from_secs(10),
    };
    let sess = rt.block_on(fake_outer.accept("site-a", ka));
    inner.wait_count("tunnel up", 1, LOG);
    assert_eq!(sess.hello.services, vec!["pg".to_string()]);
    let seed = fake::seed();
    eprintln!("noise seed {seed}");

    // (a) Garbage instead of an Open: refused, only that stream closed.
    let ending = rt.block_on(async {
        let mut s = sess.open_raw(&fake::noise(seed, 1024)).await;
        fake::read_until_end(&mut s, STEP).await
    });
    assert_ended("garbage on a data stream", &ending, 0);
    let line = nth_line(&inner, "stream refused", 1);
    assert!(line.contains("no valid Open frame"), "{line}");

    // A well-formed frame that is not an Open: refused with a Protocol error.
    let answer = rt.block_on(async {
        let mut ping = Vec::new();
        Frame::Ping { seq: 1, micros: 1 }.encode(&mut ping).unwrap();
        let mut s = sess.open_raw(&ping).await;
        routy_tunnel::codec::read_frame(&mut s, STEP).await
    });
    match answer {
        Ok(Frame::Error { code, message }) => {
            assert_eq!(code, ErrorCode::Protocol, "{message}");
            assert!(message.contains("expected Open"), "{message}");
        }
        other => panic!("a Ping as a stream head: expected an Error frame, got {other:?}"),
    }
    nth_line(&inner, "stream refused", 2);

    // (b) Services relay-inner does not list, including addresses: refused, nothing
    // dialed. A listener stands at the address asked for, to prove it.
    let bait = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    bait.set_nonblocking(true).unwrap();
    let bait_addr = bait.local_addr().unwrap().to_string();
    let unknown = [
        bait_addr.as_str(),
        "127.0.0.1:22",
        "../etc",
        "",
        "pg ",
        "PG",
    ];
    for service in unknown {
        let (mut st, answer) = rt.block_on(sess.open_service(service));
        match answer {
            Frame::Error { code, message } => {
                assert_eq!(
                    code,
                    ErrorCode::UnknownService,
                    "Open {service:?}: {message}"
                );
                assert!(
                    message.contains(&format!("{service:?}")),
                    "the refusal should name the service {service:?}: {message}"
                );
            }
            other => panic!(
                "Open for unlisted service {service:?} was not refused: {other:?} \
                 (relay-outer could make relay-inner dial what its config does not list)"
            ),
        }
        let ending = rt.block_on(fake::read_until_end(&mut st, STEP));
        assert_ended(&format!("stream after refusing {service:?}"), &ending, 0);
    }
    assert_eq!(
        inner.count("stream refused: unknown service"),
        unknown.len(),
        "one logged refusal per unknown service"
    );
    match bait.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => {
            panic!("relay-inner dialed {bait_addr}, which its config does not list: {other:?}")
        }
    }

    // (c) An oversized frame (length prefix one past the maximum, and a body that long).
    let big = relay_proto::frame::MAX_FRAME_LEN + 1;
    let mut oversized = (big as u32).to_be_bytes().to_vec();
    oversized.extend_from_slice(&[1, 6]);
    oversized.resize(4 + big, b'x');
    let ending = rt.block_on(async {
        let mut s = sess.open_raw(&oversized).await;
        fake::read_until_end(&mut s, STEP).await
    });
    assert_ended("oversized frame on a data stream", &ending, 0);
    let refused = 2 + unknown.len() + 1;
    let line = nth_line(&inner, "stream refused", refused);
    assert!(line.contains("exceeds the maximum"), "{line}");

    // (d) The session survived: a valid Open for the listed service reaches PostgreSQL.
    let reply = rt.block_on(async {
        let (mut st, answer) = sess.open_service("pg").await;
        assert_eq!(answer, Frame::OpenOk, "Open for the listed service");
        // SSLRequest; PostgreSQL without SSL answers a single 'N'.
        st.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
            .await
            .unwrap();
        st.flush().await.unwrap();
        let mut b = [0u8; 1];
        tokio::time::timeout(STEP, st.read_exact(&mut b))
            .await
            .expect("PostgreSQL's answer to SSLRequest timed out")
            .expect("reading PostgreSQL's answer to SSLRequest");
        let _ = st.shutdown().await;
        b[0]
    });
    assert_eq!(
        reply, b'N',
        "PostgreSQL's answer to SSLRequest through the stream"
    );
    inner.wait_count("stream open", 1, LOG);

    assert!(sess.alive(), "the session died:\n{}", tail(&inner));
    assert_eq!(
        inner.count("tunnel up"),
        1,
        "relay-inner reconnected:\n{}",
        tail(&inner)
    );
    assert_eq!(
        inner.count("tunnel down"),
        0,
        "relay-inner lost the session:\n{}",
        tail(&inner)
    );
    assert_eq!(
        inner.count("stream refused"),
        refused,
        "exactly the bad streams were refused"
    );
    assert_no_panics(&[&inner]);
}

#[test]
fn garbage_on_a_listener_port_reaches_the_service_and_harms_nothing() {
    let s = Setup::new();
    let seed = fake::seed();
    eprintln!("noise seed {seed}");
    let mut noise = fake::noise(seed, 64 * 1024);
    // PostgreSQL reads a startup packet's length first and refuses one outside 8..=10004
    // bytes (from 17 on, a first byte 0x16 is taken for a TLS handshake instead). The rare
    // noise that starts like that gets an implausible length, so PostgreSQL's answer is
    // known.
    let len = u32::from_be_bytes([noise[0], noise[1], noise[2], noise[3]]);
    if noise[0] == 0x16 || (8..=10_004).contains(&len) {
        noise[..4].copy_from_slice(&[0xff; 4]);
    }
    let rt = fake::runtime();
    let (client, ending) = rt.block_on(async {
        let mut tcp = tokio::net::TcpStream::connect(s.listen_addr())
            .await
            .unwrap();
        let client = tcp.local_addr().unwrap();
        // PostgreSQL gives up early; it may reset before everything is written.
        let _ = tcp.write_all(&noise).await;
        let _ = tcp.shutdown().await;
        (client, fake::read_until_end(&mut tcp, STEP).await)
    });
    // PostgreSQL may answer with an error message before closing, so some bytes are
    // fine; what matters is that the connection ends.
    assert!(
        ending.ended(),
        "the client connection was never closed: {ending:?}"
    );
    // Both relays log the end of exactly this client's stream.
    let this_client = format!("client={client}");
    let ends = ["stream closed", "stream ended with an error"];
    for r in [&s.outer, &s.inner] {
        let line = wait_line(r, |l| {
            l.contains(&this_client) && ends.iter().any(|e| l.contains(e))
        });
        eprintln!("{}: {line}", r.proc.name());
    }
    let pg_log = s.pg.log();
    assert!(
        pg_log.contains("invalid length of startup packet"),
        "the noise should have reached PostgreSQL, which rejects it:\n{pg_log}"
    );
    s.assert_sql_works("after garbage on the listener port");
    s.assert_one_undisturbed_session();
    assert_no_panics(&[&s.outer, &s.inner]);
}

/// Waits until a line of `r`'s log satisfies `pred`; returns it.
fn wait_line(r: &Relay, pred: impl Fn(&str) -> bool) -> String {
    let mut found = None;
    let ok = routy_e2e::try_wait_until(LOG, "a matching log line", || {
        found = r.proc.log().lines().find(|l| pred(l)).map(str::to_owned);
        found.is_some()
    });
    if let Err(e) = ok {
        panic!("{}: {e}\n{}", r.proc.name(), tail(r));
    }
    found.expect("found")
}

#[test]
fn a_flood_of_garbage_is_counted_but_not_logged_line_by_line() {
    let s = Setup::new();
    let rt = fake::runtime();
    let before = s.outer.count("TLS handshake failed");
    // 60 connections of garbage: each fails the TLS handshake (reason "tls").
    rt.block_on(async {
        for _ in 0..60 {
            let mut tcp = tokio::net::TcpStream::connect(s.tunnel_addr())
                .await
                .unwrap();
            let _ = tcp
                .write_all(&[0x16, 0x03, 0x01, 0x00, 0x01, 0xff, 0xff])
                .await;
            let _ = fake::read_until_end(&mut tcp, STEP).await;
        }
    });
    s.outer.wait_metric(
        "routy_handshake_failures_total",
        &[("reason", "tls")],
        LOG,
        |v| v >= 60.0,
    );
    s.outer.wait_count("no longer logged one by one", 1, LOG);
    let logged = s.outer.count("TLS handshake failed") - before;
    assert!(
        (1..=10).contains(&logged),
        "{logged} refusals logged one by one out of 60 (at most 10 a window)"
    );
    s.assert_sql_works("after the flood");
    assert_no_panics(&[&s.outer, &s.inner]);
}

/// Raises this process's open-file limit to `n` (at most the hard limit).
fn raise_nofile(n: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max.min(n);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[test]
fn two_thousand_connections_at_once_are_all_accepted_and_an_address_that_keeps_failing_is_throttled(
) {
    let _load = routy_e2e::load_test();
    let s = Setup::new();
    raise_nofile(8192);
    let rt = fake::runtime();
    let addr = s.tunnel_addr();
    let before = s
        .outer
        .metric("routy_handshake_failures_total", &[("reason", "tls")]);
    // 2000 connections opened at once, each sending a byte that is not TLS: relay-outer
    // must accept every one (its listen backlog queues the burst) and refuse it.
    let connected = rt.block_on(async move {
        let tasks: Vec<_> = (0..2000)
            .map(|_| {
                tokio::spawn(async move {
                    let mut tcp = tokio::time::timeout(
                        Duration::from_secs(10),
                        tokio::net::TcpStream::connect(addr),
                    )
                    .await
                    .ok()?
                    .ok()?;
                    tcp.write_all(b"\x00\x00\x00\x00\x00").await.ok()?;
                    let _ = fake::read_until_end(&mut tcp, STEP).await;
                    Some(())
                })
            })
            .collect();
        let mut n = 0;
        for t in tasks {
            if let Ok(Some(())) = t.await {
                n += 1;
            }
        }
        n
    });
    assert_eq!(
        connected, 2000,
        "connections that got through and were answered"
    );
    // Each failed the TLS handshake, or (past tunnel.failed_handshake_limit, 100 per
    // 10 s from one address) was closed at accept.
    routy_e2e::wait_until(LOG, "2000 refusals counted", || {
        s.outer
            .metric("routy_handshake_failures_total", &[("reason", "tls")])
            + s.outer
                .metric("routy_handshake_failures_total", &[("reason", "throttled")])
            - before
            >= 2000.0
    });
    let throttled = s
        .outer
        .metric("routy_handshake_failures_total", &[("reason", "throttled")]);
    assert!(throttled >= 1000.0, "{throttled} closed at accept");
    s.assert_sql_works("after 2000 connections at once");
    assert_no_panics(&[&s.outer, &s.inner]);
}

/// The issue-17 slowloris case: 200 slow clients (each reopened as soon as it is closed)
/// on each relay's admin endpoint, while a fresh client polls `/readyz` every 100 ms:
/// every poll is answered 200 within 1 s, and the tunnel keeps serving.
#[test]
fn admin_endpoints_stay_ready_under_200_slow_clients() {
    let _load = routy_e2e::load_test();
    let s = Setup::new();
    raise_nofile(8192);
    let rt = fake::runtime();
    for relay in [&s.outer, &s.inner] {
        let addr = SocketAddr::from(([127, 0, 0, 1], relay.admin_port.expect("admin port")));
        let (opened, polls) = rt.block_on(async move {
            let until = tokio::time::Instant::now() + Duration::from_secs(8);
            let loris = tokio::spawn(routy_e2e::slow::slowloris(
                addr,
                200,
                Duration::from_millis(500),
                until,
            ));
            // Let the slow clients take every place first.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let polls = routy_e2e::slow::poll(
                addr,
                "/readyz",
                Duration::from_millis(100),
                Duration::from_secs(1),
                until,
            )
            .await;
            (loris.await.unwrap(), polls)
        });
        eprintln!(
            "{}: {} polls, worst {:?}, {} failures; slow clients opened {opened} connections",
            relay.proc.name(),
            polls.times.len(),
            polls.worst(),
            polls.failures.len()
        );
        assert!(
            polls.failures.is_empty(),
            "{}: /readyz polls failed under slow clients: {:?}",
            relay.proc.name(),
            polls.failures
        );
        assert!(polls.times.len() >= 40, "{} polls", polls.times.len());
        assert!(
            opened > 200,
            "slow clients were closed to make room ({opened} opened)"
        );
        let made_room = relay.metric(
            m::HTTP_SHED,
            &[("endpoint", "admin"), ("reason", "made_room")],
        );
        assert!(made_room >= 1.0, "made_room counted: {made_room}");
    }
    s.assert_sql_works("after the slow clients");
    s.assert_one_undisturbed_session();
    assert_no_panics(&[&s.outer, &s.inner]);
}

/// A WebSocket upgrade whose request head never ends is closed at the handshake
/// deadline, counted, and harms nothing.
#[test]
fn a_half_sent_websocket_upgrade_is_closed_at_the_handshake_deadline() {
    let s = Setup::new();
    let rt = fake::runtime();
    let before = s
        .outer
        .metric(m::HANDSHAKE_FAILURES, &[("reason", "tls_timeout")]);
    let addr = s.tunnel_addr();
    let (ending, took) = rt.block_on(async move {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /routy HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\n")
            .await
            .unwrap();
        let t = std::time::Instant::now();
        // The handshake timeout is 10 s by default.
        let ending = fake::read_until_end(&mut tcp, Duration::from_secs(20)).await;
        (ending, t.elapsed())
    });
    assert_ended("a half-sent upgrade", &ending, 0);
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(15),
        "closed after {took:?}"
    );
    s.outer.wait_metric(
        m::HANDSHAKE_FAILURES,
        &[("reason", "tls_timeout")],
        LOG,
        |v| v > before,
    );
    s.outer.wait_count("WebSocket upgrade timed out", 1, LOG);
    s.assert_sql_works("after a half-sent upgrade");
    assert_no_panics(&[&s.outer, &s.inner]);
}
