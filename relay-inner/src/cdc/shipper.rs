//! The shipper: sends one source's durable spool records to one relay-outer over a
//! stream of the tunnel session, and turns relay-outer's acknowledgements into spool
//! removals.
//!
//! Protocol (see `relay_proto::cdc`): relay-inner opens a stream and sends
//! `Frame::CdcOpen {source, first_seq, last_seq}`; relay-outer answers
//! `Frame::CdcReady {next_seq}` (it already holds everything below) or `Frame::Error`.
//! Then numbered batches go up and `Ack {seq}` comes back once a batch is fsynced in the
//! store. After any loss of the stream or session the shipper starts over with a new
//! CdcOpen, so what was not acknowledged is sent again and relay-outer drops what it
//! already has.
//!
//! Batching: when nothing is in flight a batch leaves at once (low latency); while a batch
//! is unacknowledged the next one fills until that acknowledgement arrives, the batch
//! reaches `batch_max_bytes`, or `batch_max_delay` passes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use relay_proto::cdc::ShipMessage;
use relay_proto::frame::{ErrorCode, Frame};
use routy_log::disk::blocking;
use routy_ops::drain::Drain;
use routy_tunnel::codec;
use routy_tunnel::session::SessionHandle;
use tokio::io::{AsyncWriteExt, ReadHalf};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::cdc::spool::Spool;
use routy_ops::backoff::Backoff;

/// Bound on unacknowledged bytes in flight per stream.
pub const MAX_IN_FLIGHT: usize = 16 << 20;
/// Bound on opening the stream and on relay-outer's answer to CdcOpen.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound on closing our side of a shipping stream that ended.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Counter: batches sent, by `source`.
pub const BATCHES_SENT: &str = "routy_cdc_batches_sent_total";
/// Counter: records sent (resends included), by `source`.
pub const RECORDS_SENT: &str = "routy_cdc_records_sent_total";
/// Gauge: highest seq relay-outer acknowledged, by `source` and `outer`.
pub const ACKED_SEQ: &str = "routy_cdc_acked_seq";
/// Gauge: records durable in the spool but not yet acknowledged, by `source` and `outer`.
pub const UNACKED_RECORDS: &str = "routy_cdc_unacked_records";
/// Counter: shipping streams that ended with an error, by `source` and `reason`.
pub const SHIP_ERRORS: &str = "routy_cdc_ship_errors_total";

/// What a shipper is doing, for `/status`.
#[derive(Debug, Default)]
pub struct ShipStatus {
    /// relay-outer endpoint.
    pub endpoint: String,
    connected: AtomicBool,
    acked: AtomicU64,
    sent: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl ShipStatus {
    /// A shipper's status for `endpoint`.
    pub fn new(endpoint: &str) -> Self {
        ShipStatus {
            endpoint: endpoint.to_owned(),
            ..Default::default()
        }
    }

    /// As JSON.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "outer": self.endpoint,
            "connected": self.connected.load(Ordering::Relaxed),
            "acked_seq": self.acked.load(Ordering::Relaxed),
            "sent_seq": self.sent.load(Ordering::Relaxed),
            "last_error": *self.last_error.lock().unwrap_or_else(|p| p.into_inner()),
        })
    }

    fn error(&self, e: &str) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_owned());
    }
}

/// One source's shipper to one relay-outer.
pub struct Shipper {
    /// Source name.
    pub source: String,
    /// Endpoint key (the spool's acknowledgement slot).
    pub endpoint: String,
    /// The source's spool.
    pub spool: Arc<Spool>,
    /// The endpoint's live session, when there is one.
    pub session: watch::Receiver<Option<SessionHandle>>,
    /// Largest batch.
    pub batch_max_bytes: usize,
    /// Longest fill wait while a batch is in flight.
    pub batch_max_delay: Duration,
    /// Longest wait for an acknowledgement while batches are in flight: past it the
    /// stream is taken for hung (relay-outer stopped reading it) and reopened.
    pub ack_timeout: Duration,
    /// Process shutdown.
    pub drain: Drain,
    /// This endpoint's removal.
    pub stop: Drain,
    /// Status.
    pub status: Arc<ShipStatus>,
    /// The endpoint's `max_bandwidth` toward relay-outer, which shipping counts against.
    pub bandwidth: Option<Arc<routy_tunnel::throttle::Limit>>,
}

enum End {
    /// Stop for good.
    Stop,
    /// The stream or session failed; try again after a pause.
    Retry(ShipError),
    /// The acknowledgement reader ended; its result says why (only inside
    /// [`Shipper::ship`]).
    AcksEnded,
}

/// Why a shipping stream ended; the kind is the `reason` label of
/// `routy_cdc_ship_errors_total`.
#[derive(Debug, thiserror::Error)]
enum ShipError {
    /// relay-outer answered the stream's opening with an error.
    #[error("relay-outer refused the CDC stream ({code}): {message}")]
    Refused { code: ErrorCode, message: String },
    /// relay-outer ended an open stream with an error (its store refused a batch).
    #[error("relay-outer ended the stream: {0}")]
    Ended(String),
    /// The local spool failed, or disagrees with relay-outer's store.
    #[error("{0}")]
    Spool(String),
    /// The stream or the session under it failed, or relay-outer stopped answering.
    #[error("{0}")]
    Stream(String),
}

impl ShipError {
    fn reason(&self) -> &'static str {
        match self {
            ShipError::Refused { .. } | ShipError::Ended(_) => "refused",
            ShipError::Spool(_) => "spool",
            ShipError::Stream(_) => "stream",
        }
    }
}

fn stream_err(e: impl Into<String>) -> End {
    End::Retry(ShipError::Stream(e.into()))
}

fn spool_err(e: impl Into<String>) -> End {
    End::Retry(ShipError::Spool(e.into()))
}

impl Shipper {
    /// Runs until shutdown or the endpoint's removal.
    pub async fn run(mut self) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(15));
        loop {
            let Some(session) = self.wait_session().await else {
                return;
            };
            let started = std::time::Instant::now();
            let e = match self.ship(&session).await {
                End::Stop => return,
                End::Retry(e) => e,
                // `ship` turns this into the reader's reason before it returns.
                End::AcksEnded => ShipError::Stream("the acknowledgement reader ended".into()),
            };
            self.status.connected.store(false, Ordering::Relaxed);
            if !session.is_closed() {
                warn!(source = %self.source, outer = %self.endpoint, error = %e, "CDC shipping stream failed; retrying");
                metrics::counter!(SHIP_ERRORS, "source" => self.source.clone(), "reason" => e.reason()).increment(1);
                self.status.error(&e.to_string());
            } else {
                debug!(source = %self.source, error = %e, "CDC shipping ended with the session");
            }
            if started.elapsed() > Duration::from_secs(30) {
                backoff.reset();
            }
            let pause = backoff.next_delay();
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.drain.stopping() => return,
                _ = self.stop.stopping() => return,
            }
        }
    }

    async fn wait_session(&mut self) -> Option<SessionHandle> {
        // Deliberately unbounded: this waits for the dialer to bring a session up (it has
        // its own deadlines and backoff), or for shutdown; no network I/O happens here.
        loop {
            if let Some(s) = self.session.borrow_and_update().clone() {
                if !s.is_closed() {
                    return Some(s);
                }
            }
            tokio::select! {
                r = self.session.changed() => if r.is_err() { return None },
                _ = self.drain.stopping() => return None,
                _ = self.stop.stopping() => return None,
            }
        }
    }

    async fn ship(&self, session: &SessionHandle) -> End {
        // Opening waits for the session's driver (yamux) or for stream credit from the
        // peer (QUIC): a session that stopped moving must not hold the shipper forever.
        let mut stream = match tokio::time::timeout(OPEN_TIMEOUT, session.open()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return stream_err(format!("open stream: {e}")),
            Err(_) => {
                return stream_err(format!(
                    "open stream: the session gave no stream within {OPEN_TIMEOUT:?}"
                ))
            }
        };
        let open = Frame::CdcOpen {
            source: self.source.clone(),
            first_seq: self.spool.first_seq(),
            last_seq: self.spool.synced_seq(),
            spool_id: self.spool.id(),
        };
        if let Err(e) = codec::write_frame(&mut stream, &open, OPEN_TIMEOUT).await {
            return stream_err(format!("send CdcOpen: {e}"));
        }
        let next = match codec::read_frame(&mut stream, OPEN_TIMEOUT).await {
            Ok(Frame::CdcReady { next_seq }) => next_seq,
            Ok(Frame::Error { code, message }) => {
                return End::Retry(ShipError::Refused { code, message })
            }
            Ok(f) => {
                return stream_err(format!("unexpected {} instead of CdcReady", f.kind_name()))
            }
            Err(e) => return stream_err(format!("waiting for CdcReady: {e}")),
        };
        let have = self.spool.synced_seq();
        if next > have + 1 {
            return spool_err(format!(
                "relay-outer's store says it holds records up to seq {} but this spool ends at \
                 seq {have}; refusing to acknowledge records it cannot have",
                next - 1
            ));
        }
        if next > 1 {
            // relay-outer holds everything below `next`.
            if let Err(e) = self.spool.ack(&self.endpoint, next - 1) {
                return spool_err(format!("spool: {e}"));
            }
        }
        self.status.connected.store(true, Ordering::Relaxed);
        self.status.error_clear();
        info!(source = %self.source, outer = %self.endpoint, next_seq = next, "CDC shipping stream up");
        let (rd, mut wr) = tokio::io::split(stream);
        let (acked_tx, mut acked_rx) = watch::channel(next.saturating_sub(1));
        // Highest seq sent on this stream: an ack beyond it is a protocol error.
        let sent = Arc::new(AtomicU64::new(next.saturating_sub(1)));
        let acks = tokio::spawn(read_acks(
            rd,
            self.spool.clone(),
            self.endpoint.clone(),
            self.source.clone(),
            acked_tx,
            self.status.clone(),
            sent.clone(),
        ));
        let r = match self.send_loop(&mut wr, next, &mut acked_rx, &sent).await {
            End::AcksEnded => match acks.await {
                Ok(why) => End::Retry(why),
                Err(e) => stream_err(format!("acknowledgement reader failed: {e}")),
            },
            r => {
                acks.abort();
                r
            }
        };
        // Flushing the FIN may wait for window credit from a peer that stopped reading.
        let _ = tokio::time::timeout(SHUTDOWN_TIMEOUT, wr.shutdown()).await;
        r
    }

    async fn send_loop<W: tokio::io::AsyncWrite + Unpin>(
        &self,
        wr: &mut W,
        next: u64,
        acked: &mut watch::Receiver<u64>,
        sent: &AtomicU64,
    ) -> End {
        let mut synced = self.spool.subscribe();
        // The pages read stay cached: the spool writes its next segments into the files
        // of acknowledged ones (see `Spool`'s log options).
        let mut reader = match self.spool.reader(next) {
            Ok(r) => r,
            Err(e) => return spool_err(format!("spool read from {next}: {e}")),
        };
        let mut next_seq = next;
        // Last time an acknowledgement arrived or nothing was in flight.
        let mut progress = tokio::time::Instant::now();
        // A record read ahead of the durable seq, held until it is durable.
        let mut held: Option<(u64, Vec<u8>)> = None;
        // Sizes of batches in flight: (last seq, bytes).
        let mut in_flight: std::collections::VecDeque<(u64, usize)> = Default::default();
        let labels = [("source", self.source.clone())];
        loop {
            // Forget acknowledged batches.
            let a = *acked.borrow();
            if a == u64::MAX {
                return End::AcksEnded;
            }
            while in_flight.front().is_some_and(|(last, _)| *last <= a) {
                in_flight.pop_front();
                progress = tokio::time::Instant::now();
            }
            if in_flight.is_empty() {
                progress = tokio::time::Instant::now();
            }
            let hung = progress + self.ack_timeout;
            if tokio::time::Instant::now() >= hung {
                return stream_err(self.hung_error());
            }
            let flying: usize = in_flight.iter().map(|(_, b)| b).sum();
            let durable = *synced.borrow_and_update();
            let mut batch: Vec<Vec<u8>> = Vec::new();
            let mut bytes = 0usize;
            let first = next_seq;
            if flying < MAX_IN_FLIGHT && durable >= next_seq {
                let deadline = tokio::time::Instant::now()
                    + if in_flight.is_empty() {
                        Duration::ZERO
                    } else {
                        self.batch_max_delay
                    };
                loop {
                    let durable = *synced.borrow_and_update();
                    // One blocking section for the whole fill, not one per record.
                    let max = self.batch_max_bytes;
                    let filled = blocking(|| {
                        while bytes < max && next_seq <= durable {
                            let rec = match held.take() {
                                Some(r) => r,
                                None => match reader.next() {
                                    Some(r) => r.map_err(|e| format!("spool read: {e}"))?,
                                    None => break,
                                },
                            };
                            let (seq, payload) = rec;
                            if seq > durable {
                                held = Some((seq, payload));
                                break;
                            }
                            if seq != next_seq {
                                return Err(format!(
                                    "spool returned seq {seq}, expected {next_seq}"
                                ));
                            }
                            bytes += payload.len() + 4;
                            batch.push(payload);
                            next_seq += 1;
                        }
                        if next_seq > durable {
                            // Caught up: hold no segment that acknowledgements may remove
                            // (a full disk gets its space back only then).
                            reader.release();
                        }
                        Ok(())
                    });
                    if let Err(e) = filled {
                        return spool_err(e);
                    }
                    if bytes >= self.batch_max_bytes || tokio::time::Instant::now() >= deadline {
                        break;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep_until(deadline) => {}
                        r = synced.changed() => if r.is_err() { return End::Stop },
                        // An acknowledgement: the stream has room again, send what we have.
                        _ = acked.changed() => break,
                    }
                }
            }
            if !batch.is_empty() {
                let n = batch.len() as u64;
                let msg = ShipMessage::Batch {
                    first_seq: first,
                    records: batch,
                };
                if let Some(limit) = &self.bandwidth {
                    tokio::select! {
                        _ = limit.pace(bytes) => {}
                        _ = self.stop.stopping() => return End::Stop,
                        _ = self.drain.stopping() => return End::Stop,
                    }
                }
                // Before the write: relay-outer may acknowledge before the write returns.
                sent.store(next_seq - 1, Ordering::Release);
                let write = routy_tunnel::ship::write(wr, &msg);
                tokio::pin!(write);
                // The write may wait for window credit that never comes once relay-outer
                // stopped reading (after refusing a batch, say): watch for the end of the
                // stream, and for a peer that acknowledges nothing for `ack_timeout` while
                // it holds batches (each acknowledgement starts the wait again).
                let mut deadline = if in_flight.is_empty() {
                    tokio::time::Instant::now() + self.ack_timeout
                } else {
                    hung
                };
                loop {
                    tokio::select! {
                        r = &mut write => match r {
                            Ok(()) => break,
                            Err(e) => return stream_err(format!("send batch: {e}")),
                        },
                        r = acked.changed() => {
                            if r.is_err() || *acked.borrow() == u64::MAX {
                                return End::AcksEnded;
                            }
                            deadline = tokio::time::Instant::now() + self.ack_timeout;
                        }
                        _ = tokio::time::sleep_until(deadline) => return stream_err(self.hung_error()),
                        _ = self.drain.stopping() => return End::Stop,
                        _ = self.stop.stopping() => return End::Stop,
                    }
                }
                in_flight.push_back((next_seq - 1, bytes));
                self.status.sent.store(next_seq - 1, Ordering::Relaxed);
                metrics::counter!(BATCHES_SENT, &labels).increment(1);
                metrics::counter!(RECORDS_SENT, &labels).increment(n);
                continue;
            }
            let wait_hung = async {
                if in_flight.is_empty() {
                    std::future::pending::<()>().await
                } else {
                    tokio::time::sleep_until(hung).await
                }
            };
            tokio::select! {
                r = synced.changed() => if r.is_err() { return End::Stop },
                r = acked.changed() => if r.is_err() {
                    return stream_err("relay-outer closed the stream");
                },
                _ = wait_hung => return stream_err(self.hung_error()),
                _ = self.drain.stopping() => return End::Stop,
                _ = self.stop.stopping() => return End::Stop,
            }
        }
    }
}

impl Shipper {
    fn hung_error(&self) -> String {
        format!(
            "no acknowledgement from relay-outer within {:?} (cdc.batch.ack_timeout) while batches \
             were in flight; reopening the shipping stream",
            self.ack_timeout
        )
    }
}

impl ShipStatus {
    fn error_clear(&self) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

async fn read_acks(
    mut rd: ReadHalf<routy_tunnel::session::Stream>,
    spool: Arc<Spool>,
    endpoint: String,
    source: String,
    acked: watch::Sender<u64>,
    status: Arc<ShipStatus>,
    sent: Arc<AtomicU64>,
) -> ShipError {
    let labels = [("source", source.clone()), ("outer", endpoint.clone())];
    let why = loop {
        // No deadline here on purpose: an idle stream (nothing to ship) is silent. While
        // batches are in flight send_loop gives up after `ack_timeout` and aborts this
        // task; a dead tunnel is found by the session's keepalive, which ends the stream.
        match routy_tunnel::ship::read(&mut rd).await {
            Ok(Some(ShipMessage::Ack { seq })) => {
                let upto = sent.load(Ordering::Acquire);
                if seq > upto {
                    break ShipError::Stream(format!(
                        "relay-outer acknowledged seq {seq} beyond the {upto} sent; closing the stream"
                    ));
                }
                if let Err(e) = spool.ack(&endpoint, seq) {
                    warn!(source = %source, error = %e, "spool: removing acknowledged segments failed");
                }
                status.acked.store(seq, Ordering::Relaxed);
                metrics::gauge!(ACKED_SEQ, &labels).set(seq as f64);
                metrics::gauge!(UNACKED_RECORDS, &labels)
                    .set(spool.synced_seq().saturating_sub(seq) as f64);
                acked.send_replace(seq);
            }
            Ok(Some(ShipMessage::Error { message })) => break ShipError::Ended(message),
            Ok(Some(other)) => {
                break ShipError::Stream(format!(
                    "relay-outer sent {other:?} on the shipping stream; closing it"
                ))
            }
            Ok(None) => break ShipError::Stream("relay-outer closed the stream".into()),
            Err(e) => break ShipError::Stream(format!("shipping stream read failed: {e}")),
        }
    };
    // Tells the sender the stream is gone; it takes `why` from this task.
    acked.send_replace(u64::MAX);
    why
}
