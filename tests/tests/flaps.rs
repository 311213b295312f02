//! Link flaps under load (issue 11, item 6): relay-inner in an "inside" network
//! namespace, relay-outer and the clients in an "outside" one, joined by a veth pair that
//! the test takes down and up again. The service behind relay-inner pushes a counter to
//! every client, so relay-inner's side of the tunnel always has fresh data to send, as
//! with a replication stream.
//!
//! 1. A link down for a few seconds at a time, again and again, costs nothing: the same
//!    session carries every stream throughout and each client gets every number, in
//!    order. The tunnel socket used to have TCP_USER_TIMEOUT = keepalive.timeout, and the
//!    kernel failed it with ETIMEDOUT on the second or third flap: when the local link is
//!    down a send fails at once, TCP retries with its zero-window probe timer, and that
//!    timer's start (`icsk_probes_tstamp`) is not always cleared when the data then goes
//!    out, so a later outage is measured from an earlier one.
//! 2. Packets dropped on the path (a black hole: neither host notices, TCP and QUIC see
//!    only loss and back off), again and again, cost nothing either as long as the
//!    outage plus the transport's delay in resending after it stay below the keepalive
//!    timeout, which counts from the first unanswered Ping. TCP resends within a fifth of
//!    the timeout (Linux 6.15+ caps its backoff) so over TLS 3.5 s holes pass with a 6 s
//!    timeout; quinn backs off without a limit, so over QUIC the holes are 1.5 s.
//! 3. An outage longer than keepalive.timeout ends the session on both ends within about
//!    that time, each saying so ("no keepalive answer"), ends the streams, and relay-inner
//!    reconnects once the link is back.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use routy_e2e::relays::{Pki, Relay, READY};
use routy_e2e::{free_port, in_netns, require_root, NetPair};

/// Keepalive of both relays: a Ping every second, dead after 6 s without an answer.
const KA: (&str, &str) = ("1s", "6s");
/// How long the link stays down in one flap: half the keepalive timeout.
const FLAP_DOWN: Duration = Duration::from_secs(3);
/// How long the link stays up between flaps.
const FLAP_UP: Duration = Duration::from_secs(3);
/// Flaps in the flap test.
const FLAPS: u32 = 8;
/// How long the path drops every packet in the TLS black-hole test, where TCP's backoff
/// is capped at 1.2 s (a fifth of the keepalive timeout): the first unanswered Ping is
/// answered at most 4.7 s after it was sent, inside the 6 s timeout.
const HOLE_TLS: Duration = Duration::from_millis(3500);
/// The same where the kernel has no cap (before Linux 6.15): TCP may wait about as long
/// again as the hole lasted.
const HOLE_TLS_UNCAPPED: Duration = Duration::from_millis(2500);
/// The same over QUIC, whose probes back off without a limit (measured: data again up
/// to 1.5 times the hole's length after it).
const HOLE_QUIC: Duration = Duration::from_millis(1500);
/// Black holes in a black-hole test.
const HOLES: u32 = 3;
/// Clients reading through the tunnel at once.
const CLIENTS: usize = 4;
/// The service sends the next number after this pause.
const TICK: Duration = Duration::from_millis(10);
/// A client that hears nothing for this long gives up (a stream that hangs).
const SILENCE: Duration = Duration::from_secs(30);

/// The service behind relay-inner: sends every client 0, 1, 2, ... (8 bytes each, big
/// endian), one every [`TICK`], until the connection fails or the test ends.
struct Ticker {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl Ticker {
    fn start(pair: &NetPair) -> Ticker {
        let ip = pair.inside_ip().to_string();
        let listener = in_netns(pair.inside_ns(), move || {
            TcpListener::bind((ip.as_str(), 0))
        })
        .expect("bind the ticker service inside");
        let port = listener.local_addr().expect("local_addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let stopped = stopped.clone();
                        std::thread::spawn(move || tick(conn, &stopped));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(e) => panic!("ticker accept: {e}"),
                }
            }
        });
        Ticker { port, stop }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn tick(mut conn: TcpStream, stop: &AtomicBool) {
    let _ = conn.set_nodelay(true);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) && conn.write_all(&n.to_be_bytes()).is_ok() {
        n += 1;
        std::thread::sleep(TICK);
    }
}

/// A client outside that reads the counter through relay-outer's listener and checks
/// that every number arrives, in order.
struct Reader {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<u64, String>>,
}

impl Reader {
    fn start(pair: &NetPair, port: u16) -> Reader {
        let addr = format!("{}:{port}", pair.outside_ip());
        let conn = in_netns(pair.outside_ns(), move || TcpStream::connect(addr.as_str()))
            .expect("connect to the listener from outside");
        conn.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("read timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || read_counter(conn, &stopped));
        Reader { stop, thread }
    }

    /// Stops reading; returns how many numbers arrived, or what went wrong.
    fn finish(self) -> Result<u64, String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .unwrap_or_else(|_| Err("reader panicked".into()))
    }

    /// Waits (at most `limit`) for the stream to end on its own; returns how it ended.
    fn ended_within(self, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        while !self.thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.thread.is_finished() {
            Some(match self.finish() {
                Ok(n) => format!("stopped after {n} numbers"),
                Err(e) => e,
            })
        } else {
            self.stop.store(true, Ordering::Relaxed);
            None
        }
    }
}

fn read_counter(mut conn: TcpStream, stop: &AtomicBool) -> Result<u64, String> {
    let started = Instant::now();
    let mut next = 0u64;
    let mut buf = [0u8; 8];
    let mut have = 0;
    let mut heard = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        match conn.read(&mut buf[have..]) {
            Ok(0) => {
                return Err(format!(
                    "stream closed after {next} numbers, {:?} in",
                    started.elapsed()
                ))
            }
            Ok(n) => {
                heard = Instant::now();
                have += n;
                if have == 8 {
                    have = 0;
                    let got = u64::from_be_bytes(buf);
                    if got != next {
                        return Err(format!("expected {next}, got {got}"));
                    }
                    next += 1;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if heard.elapsed() > SILENCE {
                    return Err(format!("nothing for {SILENCE:?} after {next} numbers"));
                }
            }
            Err(e) => {
                return Err(format!(
                    "read failed after {next} numbers, {:?} in: {e}",
                    started.elapsed()
                ))
            }
        }
    }
    Ok(next)
}

/// The ticker and relay-inner inside, relay-outer with listener `tick` outside. Fields
/// drop in declaration order: processes before the namespaces.
struct Setup {
    inner: Relay,
    outer: Relay,
    _ticker: Ticker,
    _pki: Pki,
    listen_port: u16,
    pair: NetPair,
}

impl Setup {
    /// With `inner_extra` in relay-inner's config (`transport: quic`).
    fn new(inner_extra: &str) -> Setup {
        let pair = NetPair::new(false);
        let ticker = Ticker::start(&pair);
        let pki = Pki::new(&[pair.outside_ip()]);
        pki.issue("site-a");
        let listen_port = free_port();
        // Relay::across names listener and service `pg`; here it is the ticker.
        let (outer, inner) = Relay::across(
            &pair,
            &pki,
            (free_port(), listen_port, ticker.port),
            KA,
            &format!("shutdown_grace: 2s\n{inner_extra}"),
        );
        outer.wait_sessions_up(1, READY);
        Setup {
            inner,
            outer,
            _ticker: ticker,
            _pki: pki,
            listen_port,
            pair,
        }
    }

    fn readers(&self, n: usize) -> Vec<Reader> {
        (0..n)
            .map(|_| Reader::start(&self.pair, self.listen_port))
            .collect()
    }

    /// Sessions that ended so far (relay-inner's, relay-outer's).
    fn downs(&self) -> (u64, u64) {
        (
            self.inner.sessions_down(None),
            self.outer.sessions_down(None),
        )
    }

    /// relay-inner's view of its endpoint (`/status`): up, and the last error.
    fn endpoint(&self) -> serde_json::Value {
        self.inner.status()["outer"][0].clone()
    }
}

/// Asserts that the one session survived and each client read every number from the
/// start, most of what the service sent in `ran`.
fn assert_nothing_lost(s: &Setup, what: &str, counts: &[Result<u64, String>], ran: Duration) {
    let (inner_down, outer_down) = s.downs();
    eprintln!("numbers each client read: {counts:?}");
    assert!(
        inner_down == 0 && outer_down == 0,
        "{what} (keepalive {KA:?}) cost the session: relay-inner saw {inner_down} end, \
         relay-outer {outer_down}; relay-inner's endpoint: {}",
        s.endpoint()
    );
    assert_eq!(s.inner.sessions_up(), 1, "relay-inner reconnected");
    assert_eq!(s.outer.sessions_up(), 1, "relay-outer saw a new session");
    // The service sends about 90 numbers a second (a 10 ms pause plus the write); what
    // it sent while the link was down arrives after, so each client has most of them.
    let least = (ran.as_secs_f64() * 50.0) as u64;
    for (i, c) in counts.iter().enumerate() {
        match c {
            Ok(n) => assert!(*n >= least, "client {i} read only {n} numbers in {ran:?}"),
            Err(e) => panic!("client {i}: {e}"),
        }
    }
}

#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn short_link_flaps_cost_no_session_and_no_stream() {
    require_root();
    outages_cost_nothing(
        &Setup::new(""),
        "flap",
        FLAPS,
        FLAP_DOWN,
        FLAP_UP,
        NetPair::link_down,
        NetPair::link_up,
    );
}

/// `n` outages of `down` each (`cut`, then `heal`), `up` apart, while the clients read:
/// the session must stay and every client must get every number.
fn outages_cost_nothing(
    s: &Setup,
    what: &str,
    n: u32,
    down: Duration,
    up: Duration,
    cut: fn(&NetPair),
    heal: fn(&NetPair),
) {
    let readers = s.readers(CLIENTS);
    std::thread::sleep(Duration::from_secs(2));
    let start = Instant::now();
    for i in 1..=n {
        cut(&s.pair);
        std::thread::sleep(down);
        heal(&s.pair);
        std::thread::sleep(up);
        let (inner_down, outer_down) = s.downs();
        eprintln!(
            "{what} {i} done after {:?}: tunnel down {} (inner) / {} (outer)",
            start.elapsed(),
            inner_down,
            outer_down
        );
        if inner_down > 0 || outer_down > 0 {
            break;
        }
    }
    let ran = start.elapsed() + Duration::from_secs(2);
    let counts: Vec<_> = readers.into_iter().map(Reader::finish).collect();
    assert_nothing_lost(s, &format!("a {what} of {down:?}"), &counts, ran);
}

/// Whether this kernel caps TCP's retransmission backoff per socket (TCP_RTO_MAX_MS,
/// Linux 6.15).
fn kernel_caps_rto() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (6, 15)
}

/// Drops every packet on the path [`HOLES`] times for `hole`, with 3 s between.
fn black_holes_cost_nothing(inner_extra: &str, hole: Duration) {
    outages_cost_nothing(
        &Setup::new(inner_extra),
        "black hole",
        HOLES,
        hole,
        Duration::from_secs(3),
        NetPair::blackhole,
        NetPair::heal_blackhole,
    );
}

#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn short_black_holes_cost_nothing_over_tls() {
    require_root();
    let hole = if kernel_caps_rto() {
        HOLE_TLS
    } else {
        HOLE_TLS_UNCAPPED
    };
    black_holes_cost_nothing("", hole);
}

#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn short_black_holes_cost_nothing_over_quic() {
    require_root();
    black_holes_cost_nothing("transport: quic\n", HOLE_QUIC);
}

#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn an_outage_longer_than_the_keepalive_timeout_ends_the_session_and_says_why() {
    require_root();
    let s = Setup::new("");
    let reader = s.readers(1).pop().expect("a reader");
    std::thread::sleep(Duration::from_secs(2));
    let cut = Instant::now();
    s.pair.link_down();
    s.inner.wait_sessions_down(1, Duration::from_secs(30));
    s.outer.wait_sessions_down(1, Duration::from_secs(30));
    let took = cut.elapsed();
    let endpoint = s.endpoint();
    eprintln!("after {took:?}: relay-inner's endpoint: {endpoint}");
    for r in [&s.inner, &s.outer] {
        assert_eq!(
            r.sessions_down(Some("keepalive_timeout")),
            1,
            "{}: the session should end on the keepalive timeout",
            r.proc.name()
        );
    }
    assert_eq!(endpoint["up"], false, "{endpoint}");
    // Dead within the keepalive timeout plus a Ping interval, and scheduling slack.
    assert!(
        took < Duration::from_secs(10),
        "took {took:?} to declare the session dead"
    );
    // The client's stream ended with the session; it does not hang.
    let ended = reader.ended_within(Duration::from_secs(5));
    eprintln!("client: {ended:?}");
    assert!(
        ended.is_some(),
        "the client's stream still hangs after the session ended"
    );
    s.pair.link_up();
    s.inner.wait_sessions_up(2, Duration::from_secs(30));
    s.outer.wait_sessions_up(2, Duration::from_secs(30));
    let again = s.readers(1).pop().expect("a reader");
    std::thread::sleep(Duration::from_secs(1));
    let n = again.finish().expect("reading through the new session");
    assert!(n > 10, "only {n} numbers through the new session");
}
