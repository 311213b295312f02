//! The control stream after the handshake: keepalive Ping/Pong from both ends, RTT,
//! dead-peer detection, and GoAway for a graceful drain.
//!
//! Both ends ping every `interval`; a session in which a Ping has gone unanswered for
//! `timeout` is dead. Frames are read in a task of their own so a half-written frame
//! never blocks the timer.
//!
//! The clock starts when a Ping is sent, not when the peer was last heard, so the time
//! between the last answer and a link's failure does not count against the link. An
//! outage costs no stream (they stall and go on) when it is over, and the transport has
//! sent again what it lost, within `timeout`: TCP resends within [`Keepalive::rto_max`]
//! once the link is back (Linux 6.15+; older kernels and QUIC back off without a limit
//! and may take about as long again as the outage). A peer that died is noticed
//! `timeout` after the first Ping it did not answer, so between `timeout` and
//! `timeout + interval` after it went silent. The transports' own limits sit beyond that
//! (see `net::tune_tunnel_socket`, `quic::transport_config`): the keepalive decides.

use std::collections::VecDeque;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use crate::codec::{read_frame_no_deadline, write_frame, CodecError};
use relay_proto::frame::{ErrorCode, Frame};

/// Keepalive settings of one session.
#[derive(Debug, Clone, Copy)]
pub struct Keepalive {
    /// Time between Pings.
    pub interval: Duration,
    /// How long a Ping may go unanswered before the session is dead.
    pub timeout: Duration,
}

/// Pings whose send times are kept; more are sent but not timed (only the oldest
/// unanswered one sets the deadline, and it is always kept).
const MAX_TIMED_PINGS: usize = 1024;

impl Keepalive {
    /// The cap on TCP's retransmission timeout on the tunnel socket, so the most TCP
    /// waits to resend once a link outage is over: a fifth of `timeout`, at least 1 s
    /// (the least Linux takes for TCP_RTO_MAX_MS) and at most 120 s (TCP's own maximum).
    /// A fifth leaves TCP's own give-up time (15 retransmissions, which the cap shortens)
    /// at twice `timeout` or more up to a two-minute timeout and 1.5 times up to ten
    /// minutes, so the keepalive, not TCP, decides when a session is dead.
    pub fn rto_max(&self) -> Duration {
        (self.timeout / 5).clamp(Duration::from_secs(1), Duration::from_secs(120))
    }
}

/// Default time between keepalive Pings.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// Default time a Ping may go unanswered before the session is dead.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(15);

/// The `keepalive:` block of either relay's config file.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeepaliveSpec {
    /// Time between Pings.
    pub interval: Option<routy_ops::units::Dur>,
    /// How long a Ping may go unanswered before the session is dead.
    pub timeout: Option<routy_ops::units::Dur>,
}

impl KeepaliveSpec {
    /// Applies defaults and checks the values; errors name `field`.
    pub fn resolve(spec: Option<&KeepaliveSpec>, field: &str) -> Result<Keepalive, String> {
        let spec = spec.cloned().unwrap_or_default();
        let interval = spec.interval.map_or(DEFAULT_KEEPALIVE_INTERVAL, |d| d.0);
        let timeout = spec.timeout.map_or(DEFAULT_KEEPALIVE_TIMEOUT, |d| d.0);
        if interval < Duration::from_millis(10) {
            return Err(format!("{field}.interval: must be at least 10ms"));
        }
        if timeout <= interval {
            return Err(format!(
                "{field}.timeout: must be longer than {field}.interval ({timeout:?} <= {interval:?})"
            ));
        }
        Ok(Keepalive { interval, timeout })
    }
}

/// Why the control loop ended (the session should be torn down).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlEnd {
    /// A Ping went unanswered for the keepalive timeout.
    Timeout(Duration),
    /// The peer closed the control stream.
    PeerClosed,
    /// The peer sent an Error frame.
    PeerError(String),
    /// The control stream failed or carried garbage.
    Failed(String),
    /// The transport gave up on a peer that stopped answering: TCP after all its
    /// retransmissions (ETIMEDOUT), QUIC after its idle timeout.
    ConnectionTimedOut {
        /// What the transport waited for.
        limit: &'static str,
        /// The transport's error.
        error: String,
    },
    /// The connection under the session broke (a reset, an unreachable network).
    ConnectionFailed(String),
    /// We asked to stop (shutdown finished).
    Local,
}

impl ControlEnd {
    /// Short label for the `reason` of a disconnect metric.
    pub fn label(&self) -> &'static str {
        match self {
            ControlEnd::Timeout(_) => "keepalive_timeout",
            ControlEnd::PeerClosed => "peer_closed",
            ControlEnd::PeerError(_) => "peer_error",
            ControlEnd::Failed(_) => "failed",
            ControlEnd::ConnectionTimedOut { .. } => "connection_timeout",
            ControlEnd::ConnectionFailed(_) => "connection_failed",
            ControlEnd::Local => "local",
        }
    }
}

impl std::fmt::Display for ControlEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlEnd::Timeout(d) => write!(f, "no keepalive answer within {d:?}"),
            ControlEnd::PeerClosed => f.write_str("peer closed the control stream"),
            ControlEnd::PeerError(m) => write!(f, "peer reported error: {m}"),
            ControlEnd::Failed(m) => write!(f, "control stream failed: {m}"),
            ControlEnd::ConnectionTimedOut { limit, error } => {
                write!(f, "tunnel connection timed out ({limit}): {error}")
            }
            ControlEnd::ConnectionFailed(m) => write!(f, "tunnel connection failed: {m}"),
            ControlEnd::Local => f.write_str("closed locally"),
        }
    }
}

/// What the control loop tells its owner while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlEvent {
    /// A Pong arrived; the round trip took this long.
    Rtt(Duration),
    /// The peer is draining: open no new streams on this session.
    GoAway(String),
}

/// What the owner can ask of the control loop.
#[derive(Debug)]
pub enum ControlCommand {
    /// Tell the peer we are draining.
    GoAway(String),
    /// End the loop.
    Stop,
}

fn now_micros() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// Resolves at `at`; never without one.
async fn at_or_never(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

/// Runs the control stream until the session should end.
pub async fn run<S>(
    ctrl: S,
    ka: Keepalive,
    mut commands: mpsc::Receiver<ControlCommand>,
    events: mpsc::UnboundedSender<ControlEvent>,
) -> ControlEnd
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(ctrl);
    let (frames_tx, mut frames) = mpsc::channel::<Result<Frame, CodecError>>(16);
    let reader = tokio::spawn(async move {
        loop {
            let r = read_frame_no_deadline(&mut rd).await;
            let stop = r.is_err();
            if frames_tx.send(r).await.is_err() || stop {
                break;
            }
        }
    });
    let mut ticker = tokio::time::interval(ka.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Pings not answered yet, oldest first: (seq, sent). The peer answers in order.
    let mut unanswered: VecDeque<(u64, Instant)> = VecDeque::new();
    let mut seq = 0u64;
    let end = loop {
        let deadline = unanswered.front().map(|&(_, sent)| sent + ka.timeout);
        tokio::select! {
            _ = at_or_never(deadline) => break ControlEnd::Timeout(ka.timeout),
            _ = ticker.tick() => {
                seq += 1;
                let ping = Frame::Ping { seq, micros: now_micros() };
                if unanswered.len() < MAX_TIMED_PINGS {
                    unanswered.push_back((seq, Instant::now()));
                }
                if let Err(e) = write_frame(&mut wr, &ping, ka.timeout).await {
                    break ControlEnd::Failed(e.to_string());
                }
            }
            cmd = commands.recv() => match cmd {
                Some(ControlCommand::GoAway(reason)) => {
                    if let Err(e) = write_frame(&mut wr, &Frame::GoAway { reason }, ka.timeout).await {
                        break ControlEnd::Failed(e.to_string());
                    }
                }
                Some(ControlCommand::Stop) | None => break ControlEnd::Local,
            },
            frame = frames.recv() => {
                let frame = match frame {
                    Some(Ok(f)) => f,
                    Some(Err(CodecError::Closed)) | None => break ControlEnd::PeerClosed,
                    Some(Err(e)) => break ControlEnd::Failed(e.to_string()),
                };
                match frame {
                    Frame::Ping { seq, micros } => {
                        let pong = Frame::Pong { seq, micros };
                        if let Err(e) = write_frame(&mut wr, &pong, ka.timeout).await {
                            break ControlEnd::Failed(e.to_string());
                        }
                    }
                    Frame::Pong { seq: answered, micros } => {
                        while unanswered.front().is_some_and(|&(s, _)| s <= answered) {
                            unanswered.pop_front();
                        }
                        let rtt = Duration::from_micros(now_micros().saturating_sub(micros));
                        let _ = events.send(ControlEvent::Rtt(rtt));
                    }
                    Frame::GoAway { reason } => {
                        let _ = events.send(ControlEvent::GoAway(reason));
                    }
                    Frame::Error { code, message } => {
                        break ControlEnd::PeerError(format!("{code}: {message}"));
                    }
                    other => {
                        let msg = format!("unexpected {} frame on the control stream", other.kind_name());
                        let f = Frame::Error { code: ErrorCode::Protocol, message: msg.clone() };
                        let _ = write_frame(&mut wr, &f, Duration::from_secs(1)).await;
                        break ControlEnd::Failed(msg);
                    }
                }
            }
        }
    };
    reader.abort();
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ka(ms: u64) -> Keepalive {
        Keepalive {
            interval: Duration::from_millis(ms),
            timeout: Duration::from_millis(ms * 4),
        }
    }

    #[tokio::test]
    async fn two_ends_keep_each_other_alive_and_measure_rtt() {
        let (a, b) = tokio::io::duplex(4096);
        let (_ca, ra) = mpsc::channel(1);
        let (cb_tx, rb) = mpsc::channel(1);
        let (ea, mut eva) = mpsc::unbounded_channel();
        let (eb, _evb) = mpsc::unbounded_channel();
        let ta = tokio::spawn(run(a, ka(20), ra, ea));
        let tb = tokio::spawn(run(b, ka(20), rb, eb));
        // Several timeouts' worth: still alive, RTTs reported.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!ta.is_finished() && !tb.is_finished());
        assert!(matches!(eva.try_recv(), Ok(ControlEvent::Rtt(_))));
        cb_tx
            .send(ControlCommand::GoAway("bye".into()))
            .await
            .unwrap();
        let mut saw_goaway = false;
        for _ in 0..50 {
            if let Some(ControlEvent::GoAway(r)) = eva.recv().await {
                assert_eq!(r, "bye");
                saw_goaway = true;
                break;
            }
        }
        assert!(saw_goaway);
        cb_tx.send(ControlCommand::Stop).await.unwrap();
        assert_eq!(tb.await.unwrap(), ControlEnd::Local);
        assert_eq!(ta.await.unwrap(), ControlEnd::PeerClosed);
    }

    #[tokio::test]
    async fn a_silent_peer_is_declared_dead() {
        let (a, _b) = tokio::io::duplex(4096);
        let (_c, r) = mpsc::channel(1);
        let (e, _ev) = mpsc::unbounded_channel();
        let end = run(a, ka(10), r, e).await;
        assert_eq!(end, ControlEnd::Timeout(Duration::from_millis(40)));
    }

    #[tokio::test]
    async fn a_peer_that_talks_but_never_answers_is_declared_dead() {
        // Only an answer counts: hearing the peer's own Pings says nothing about whether
        // ours get through.
        let (a, mut b) = tokio::io::duplex(64 * 1024);
        let talker = tokio::spawn(async move {
            for seq in 0.. {
                let ping = Frame::Ping { seq, micros: 0 };
                if write_frame(&mut b, &ping, Duration::from_secs(1))
                    .await
                    .is_err()
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        let (_c, r) = mpsc::channel(1);
        let (e, _ev) = mpsc::unbounded_channel();
        let end = tokio::time::timeout(Duration::from_secs(5), run(a, ka(10), r, e))
            .await
            .expect("declared dead");
        assert_eq!(end, ControlEnd::Timeout(Duration::from_millis(40)));
        talker.abort();
    }
}
