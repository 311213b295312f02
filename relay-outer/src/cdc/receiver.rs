//! The receiving end of a CDC shipping stream: a stream relay-inner opens on its tunnel
//! session, headed by `CdcOpen`, then batches one way and acks the other.
//!
//! The source written to is `<tunnel>/<source>`, the tunnel being the session's
//! authenticated identity, so one inner relay can never write into another tunnel's
//! store. An ack is sent only once the batch is fsynced in the store. Anything malformed
//! ends this stream with a logged reason (and an Error frame when the stream still
//! works), stores nothing of the bad batch, and touches nothing else.

use std::sync::Arc;
use std::time::Duration;

use relay_proto::cdc::ShipMessage;
use relay_proto::frame::{ErrorCode, Frame};
use routy_tunnel::codec::{read_frame, write_frame, CodecError};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::store::StoreError;
use super::{Cdc, BATCHES_RECEIVED, RECORDS_DUPLICATE, RECORDS_RECEIVED, SHIP_ERRORS};

/// Bound on writing an answer (CdcReady, Ack, Error) into the stream.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Bound on writing a refusal before the stream is dropped.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(5);

fn ship_error(source: &str, reason: &'static str) {
    metrics::counter!(SHIP_ERRORS, "source" => source.to_string(), "reason" => reason).increment(1);
}

async fn refuse<S>(stream: &mut S, code: ErrorCode, message: String)
where
    S: AsyncWrite + Unpin,
{
    let frame = Frame::Error { code, message };
    if write_frame(stream, &frame, REFUSAL_TIMEOUT).await.is_ok() {
        let _ = tokio::time::timeout(REFUSAL_TIMEOUT, stream.shutdown()).await;
    }
}

/// Ends a stream after `CdcReady`: the reason travels as a shipping message, which is
/// what relay-inner reads at that point.
async fn refuse_ship<S>(stream: &mut S, message: String)
where
    S: AsyncWrite + Unpin,
{
    let msg = ShipMessage::Error { message };
    if tokio::time::timeout(REFUSAL_TIMEOUT, routy_tunnel::ship::write(stream, &msg))
        .await
        .is_ok_and(|r| r.is_ok())
    {
        let _ = tokio::time::timeout(REFUSAL_TIMEOUT, stream.shutdown()).await;
    }
}

/// Serves one stream opened by relay-inner on a session of `tunnel`. `cdc` is `None`
/// when this relay-outer has no `cdc` section. Returns when the stream ends.
pub async fn serve<S>(cdc: Option<Arc<Cdc>>, tunnel: &str, mut stream: S, first_frame: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let label = format!("{tunnel}/?");
    let open = match read_frame(&mut stream, first_frame).await {
        Ok(f) => f,
        Err(CodecError::Closed) => {
            debug!("stream opened by relay-inner closed before its first frame");
            return;
        }
        Err(e) => {
            ship_error(&label, "handshake");
            warn!(reason = %e, "stream opened by relay-inner refused: no valid first frame");
            if !matches!(e, CodecError::Io(_)) {
                refuse(
                    &mut stream,
                    ErrorCode::Protocol,
                    format!("expected CdcOpen: {e}"),
                )
                .await;
            }
            return;
        }
    };
    let Frame::CdcOpen {
        source,
        first_seq,
        last_seq,
        spool_id,
    } = open
    else {
        ship_error(&label, "handshake");
        let msg = format!(
            "a stream opened by relay-inner must start with CdcOpen, not {}",
            open.kind_name()
        );
        warn!("stream opened by relay-inner refused: {msg}");
        refuse(&mut stream, ErrorCode::Protocol, msg).await;
        return;
    };
    let Some(cdc) = cdc else {
        ship_error(&label, "not_configured");
        let msg = format!(
            "CDC is not configured on this relay-outer (no cdc section): cannot receive source {source:?}"
        );
        warn!("shipping stream refused: {msg}");
        refuse(&mut stream, ErrorCode::UnknownService, msg).await;
        return;
    };
    if let Err(e) = crate::config::validate_source_name(&source) {
        ship_error(&label, "bad_source");
        warn!("shipping stream refused: {e}");
        refuse(&mut stream, ErrorCode::Protocol, e).await;
        return;
    }
    let name = format!("{tunnel}/{source}");
    let src = match cdc.source(&name).await {
        Ok(s) => s,
        Err(e) => {
            ship_error(&name, "store");
            warn!(source = %name, error = %e, "shipping stream refused: cannot open the store");
            refuse(
                &mut stream,
                ErrorCode::Protocol,
                format!("relay-outer cannot open the store of {name}: {e}"),
            )
            .await;
            return;
        }
    };
    let id = cdc.next_stream_id();
    let mut replaced = src.claim(id);
    let store = src.store.clone();
    let next = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.accept_stream(spool_id, first_seq, last_seq))
            .await
            .unwrap_or_else(|e| Err(StoreError::Task(e.to_string())))
    };
    let next_seq = match next {
        Ok(n) => n,
        Err(e) => {
            ship_error(&name, reason_of(&e));
            warn!(source = %name, first_seq, last_seq, spool_id = format_args!("{spool_id:016x}"), error = %e, "shipping stream refused");
            refuse(&mut stream, ErrorCode::Protocol, e.to_string()).await;
            src.release(id);
            return;
        }
    };
    if let Err(e) = write_frame(&mut stream, &Frame::CdcReady { next_seq }, WRITE_TIMEOUT).await {
        ship_error(&name, "write");
        warn!(source = %name, error = %e, "shipping stream lost before CdcReady");
        src.release(id);
        return;
    }
    info!(source = %name, stream = id, spool_id = format_args!("{spool_id:016x}"), spool_first = first_seq, spool_last = last_seq, next_seq, "shipping stream open");

    // One task reads the next batch while the previous one is being fsynced.
    let (rd, mut wr) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<std::io::Result<Option<ShipMessage>>>(1);
    let reader = tokio::spawn(async move {
        let mut rd = rd;
        loop {
            // No deadline on purpose: a shipping stream with nothing to ship is silent. A
            // dead tunnel is found by the session's keepalive, which ends the stream, and
            // relay-inner reopens a stream whose batches go unacknowledged (ack_timeout).
            let m = routy_tunnel::ship::read(&mut rd).await;
            let last = !matches!(m, Ok(Some(ShipMessage::Batch { .. })));
            if tx.send(m).await.is_err() || last {
                return;
            }
        }
    });
    let label = [("source", name.clone())];
    let stop = cdc.drain().clone();
    let end: String = loop {
        let msg = tokio::select! {
            _ = async { let _ = replaced.wait_for(|c| *c != Some(id)).await; } => {
                refuse_ship(&mut wr, "replaced by a newer shipping stream for the same source".into()).await;
                break "replaced by a newer shipping stream".into();
            }
            _ = stop.stopping() => {
                refuse_ship(&mut wr, "relay-outer is shutting down".into()).await;
                break "relay-outer is shutting down".into();
            }
            m = rx.recv() => m,
        };
        let (first, records) = match msg {
            None | Some(Ok(None)) => break "closed by relay-inner".into(),
            Some(Err(e)) => {
                let reason = if e.kind() == std::io::ErrorKind::InvalidData {
                    "malformed"
                } else {
                    "read"
                };
                ship_error(&name, reason);
                warn!(source = %name, error = %e, "shipping stream failed");
                if reason == "malformed" {
                    refuse_ship(&mut wr, format!("malformed shipping message: {e}")).await;
                }
                break format!("error: {e}");
            }
            Some(Ok(Some(ShipMessage::Ack { .. } | ShipMessage::Error { .. }))) => {
                ship_error(&name, "malformed");
                let msg = "relay-inner sent an Ack or Error; only batches travel this way";
                warn!(source = %name, "shipping stream failed: {msg}");
                refuse_ship(&mut wr, msg.into()).await;
                break msg.into();
            }
            Some(Ok(Some(ShipMessage::Batch { first_seq, records }))) => (first_seq, records),
        };
        let n = records.len();
        match store.append_counted(first, records).await {
            Ok(a) => {
                metrics::counter!(BATCHES_RECEIVED, &label).increment(1);
                metrics::counter!(RECORDS_RECEIVED, &label).increment(a.new as u64);
                metrics::counter!(RECORDS_DUPLICATE, &label).increment((n - a.new) as u64);
                src.publish_gauges();
                debug!(source = %name, first_seq = first, records = n, new = a.new, synced = a.synced, "batch stored");
                let ack = ShipMessage::Ack { seq: a.synced };
                match tokio::time::timeout(WRITE_TIMEOUT, routy_tunnel::ship::write(&mut wr, &ack))
                    .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        ship_error(&name, "write");
                        break format!("cannot write the ack: {e}");
                    }
                    Err(_) => {
                        ship_error(&name, "write");
                        break format!("ack not written within {WRITE_TIMEOUT:?}");
                    }
                }
            }
            Err(e) => {
                ship_error(&name, reason_of(&e));
                // A write that failed part-way may have stored (and made durable) the
                // records before it; they count on the next CdcOpen.
                src.publish_gauges();
                warn!(source = %name, first_seq = first, records = n, synced = store.synced_seq(), error = %e, "batch refused; the store holds up to the durable seq only");
                refuse_ship(&mut wr, e.to_string()).await;
                break format!("batch refused: {e}");
            }
        }
    };
    reader.abort();
    src.release(id);
    info!(source = %name, stream = id, reason = %end, last_seq = store.synced_seq(), "shipping stream closed");
}

fn reason_of(e: &StoreError) -> &'static str {
    match e {
        StoreError::Gap(_) => "gap",
        StoreError::BadRecord { .. } => "bad_record",
        StoreError::SpoolMismatch(_) => "spool_mismatch",
        StoreError::Log(_)
        | StoreError::Task(_)
        | StoreError::File { .. }
        | StoreError::Failed { .. } => "store",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CdcConfig;
    use relay_proto::cdc::{Event, Record};
    use relay_proto::frame::Hello;
    use routy_ops::drain::Drain;
    use tokio::io::{AsyncReadExt, DuplexStream};

    const T: Duration = Duration::from_secs(5);

    fn rec(i: u64) -> Vec<u8> {
        Record {
            lsn: i,
            events: vec![Event::Message {
                transactional: false,
                lsn: i,
                prefix: "t".into(),
                content: vec![1, 2, 3],
            }],
        }
        .encode()
    }

    async fn cdc(dir: &std::path::Path) -> Arc<Cdc> {
        let cfg = CdcConfig {
            dir: dir.to_path_buf(),
            retention: Duration::from_secs(3600),
            segment_bytes: routy_log::segment_log::DEFAULT_SEGMENT_BYTES,
            sinks: vec![],
            consumers: None,
        };
        Cdc::start(cfg, Drain::new()).await.unwrap()
    }

    /// Starts the receiver on one end of a pipe; returns the other end and its task.
    fn connect(cdc: Option<Arc<Cdc>>, tunnel: &str) -> (DuplexStream, tokio::task::JoinHandle<()>) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let tunnel = tunnel.to_string();
        let task = tokio::spawn(async move { serve(cdc, &tunnel, b, T).await });
        (a, task)
    }

    async fn open(s: &mut DuplexStream, source: &str, first: u64, last: u64) -> Frame {
        open_spool(s, source, first, last, 7).await
    }

    async fn open_spool(
        s: &mut DuplexStream,
        source: &str,
        first: u64,
        last: u64,
        spool_id: u64,
    ) -> Frame {
        let f = Frame::CdcOpen {
            source: source.into(),
            first_seq: first,
            last_seq: last,
            spool_id,
        };
        write_frame(s, &f, T).await.unwrap();
        read_frame(s, T).await.unwrap()
    }

    async fn batch(s: &mut DuplexStream, first_seq: u64, records: Vec<Vec<u8>>) -> ShipMessage {
        routy_tunnel::ship::write(s, &ShipMessage::Batch { first_seq, records })
            .await
            .unwrap();
        routy_tunnel::ship::read(s).await.unwrap().unwrap()
    }

    fn expect_error(f: Frame, needle: &str) {
        match f {
            Frame::Error { message, .. } => {
                assert!(message.contains(needle), "{message:?} lacks {needle:?}")
            }
            other => panic!("expected an Error frame, got {other:?}"),
        }
    }

    /// After CdcReady the refusal is a shipping message.
    async fn expect_ship_error<S: tokio::io::AsyncRead + Unpin>(s: &mut S, needle: &str) {
        match routy_tunnel::ship::read(s).await.unwrap() {
            Some(ShipMessage::Error { message }) => {
                assert!(message.contains(needle), "{message:?} lacks {needle:?}")
            }
            other => panic!("expected a shipping Error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn batches_are_stored_and_acked_and_resends_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let cdc = cdc(dir.path()).await;
        let (mut s, task) = connect(Some(cdc.clone()), "site-a");
        assert_eq!(
            open(&mut s, "orders", 1, 3).await,
            Frame::CdcReady { next_seq: 1 }
        );
        assert_eq!(
            batch(&mut s, 1, vec![rec(1), rec(2)]).await,
            ShipMessage::Ack { seq: 2 }
        );
        let src = cdc
            .get("site-a/orders")
            .expect("store under the tunnel's name");
        assert!(src.connected());
        assert_eq!(
            batch(&mut s, 2, vec![rec(2), rec(3)]).await,
            ShipMessage::Ack { seq: 3 }
        );
        drop(s);
        task.await.unwrap();
        assert!(!src.connected());
        assert_eq!(src.store.synced_seq(), 3);

        // A reconnect resends from its oldest unacked record.
        let (mut s, task) = connect(Some(cdc.clone()), "site-a");
        assert_eq!(
            open(&mut s, "orders", 2, 4).await,
            Frame::CdcReady { next_seq: 4 }
        );
        assert_eq!(
            batch(&mut s, 3, vec![rec(3), rec(4)]).await,
            ShipMessage::Ack { seq: 4 }
        );
        drop(s);
        task.await.unwrap();
        let seqs: Vec<u64> = src.store.reader(0).unwrap().map(|r| r.unwrap().0).collect();
        assert_eq!(seqs, vec![1, 2, 3, 4]);
        // Another tunnel's source of the same name is another store.
        let (mut s, _task) = connect(Some(cdc.clone()), "site-b");
        assert_eq!(
            open(&mut s, "orders", 1, 0).await,
            Frame::CdcReady { next_seq: 1 }
        );
        assert_eq!(cdc.get("site-b/orders").unwrap().store.synced_seq(), 0);
    }

    #[tokio::test]
    async fn wrong_first_frames_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cdc = cdc(dir.path()).await;
        // Not CdcOpen.
        let (mut s, task) = connect(Some(cdc.clone()), "site-a");
        let hello = Frame::Hello(Hello {
            protocol: 1,
            node: "n".into(),
            services: vec![],
            features: vec![],
        });
        write_frame(&mut s, &hello, T).await.unwrap();
        expect_error(
            read_frame(&mut s, T).await.unwrap(),
            "must start with CdcOpen",
        );
        task.await.unwrap();
        // Garbage.
        let (mut s, task) = connect(Some(cdc.clone()), "site-a");
        s.write_all(&[0, 0, 0, 3, 9, 9, 9]).await.unwrap();
        expect_error(read_frame(&mut s, T).await.unwrap(), "expected CdcOpen");
        task.await.unwrap();
        // A source name that would leave the tunnel's directory.
        for bad in ["../site-b/orders", "a/b", "..", ".x", ""] {
            let (mut s, task) = connect(Some(cdc.clone()), "site-a");
            expect_error(open(&mut s, bad, 1, 1).await, "source name");
            task.await.unwrap();
        }
        assert!(cdc.sources().is_empty());
        // No cdc section.
        let (mut s, task) = connect(None, "site-a");
        expect_error(open(&mut s, "orders", 1, 1).await, "not configured");
        task.await.unwrap();
    }

    #[tokio::test]
    async fn first_frame_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let cdc = cdc(dir.path()).await;
        let (mut a, b) = tokio::io::duplex(1024);
        let task =
            tokio::spawn(
                async move { serve(Some(cdc), "site-a", b, Duration::from_millis(100)).await },
            );
        expect_error(read_frame(&mut a, T).await.unwrap(), "expected CdcOpen");
        task.await.unwrap();
    }

    #[tokio::test]
    async fn gaps_bad_records_and_garbage_end_the_stream() {
        let dir = tempfile::tempdir().unwrap();
        let cdc = cdc(dir.path()).await;
        let (mut s, task) = connect(Some(cdc.clone()), "site-a");
        open(&mut s, "orders", 1, 5).await;
        batch(&mut s, 1, vec![rec(1), rec(2)]).await;
        // A batch that skips seq 3.
        routy_tunnel::ship::write(
            &mut s,
            &ShipMessage::Batch {
                first_seq: 4,
                records: vec![rec(4)],
            },
        )
        .await
        .unwrap();
        expect_ship_error(&mut s, "expects 3").await;
        task.await.unwrap();

        // A bad record in the middle of a batch: nothing of the batch is stored.
        let (mut s, task) = connect(Some(cdc.clone()), "site-a");
        assert_eq!(
            open(&mut s, "orders", 1, 5).await,
            Frame::CdcReady { next_seq: 3 }
        );
        routy_tunnel::ship::write(
            &mut s,
            &ShipMessage::Batch {
                first_seq: 3,
                records: vec![rec(3), b"garbage".to_vec(), rec(5)],
            },
        )
        .await
        .unwrap();
        expect_ship_error(&mut s, "record 4").await;
        task.await.unwrap();
        let store = cdc.get("site-a/orders").unwrap().store.clone();
        assert_eq!(store.synced_seq(), 2);
        assert_eq!(store.reader(0).unwrap().count(), 2);

        // Garbage after the handshake.
        let (mut s, task) = connect(Some(cdc.clone()), "site-a");
        open(&mut s, "orders", 1, 5).await;
        s.write_all(&[0, 0, 0, 2, 77, 1]).await.unwrap();
        expect_ship_error(&mut s, "malformed").await;
        task.await.unwrap();
        // An Ack from relay-inner.
        let (mut s, task) = connect(Some(cdc.clone()), "site-a");
        open(&mut s, "orders", 1, 5).await;
        routy_tunnel::ship::write(&mut s, &ShipMessage::Ack { seq: 1 })
            .await
            .unwrap();
        expect_ship_error(&mut s, "Ack").await;
        task.await.unwrap();
        // A spool that was reset below what the store holds.
        let (mut s, task) = connect(Some(cdc.clone()), "site-a");
        expect_error(open(&mut s, "orders", 1, 1).await, "reset");
        task.await.unwrap();
        // A spool whose older records never reached the store.
        let (mut s, task) = connect(Some(cdc.clone()), "site-a");
        expect_error(open(&mut s, "orders", 10, 12).await, "removed");
        task.await.unwrap();
        assert_eq!(store.synced_seq(), 2);
    }

    #[tokio::test]
    async fn a_newer_stream_replaces_the_older() {
        let dir = tempfile::tempdir().unwrap();
        let cdc = cdc(dir.path()).await;
        let (mut old, old_task) = connect(Some(cdc.clone()), "site-a");
        open(&mut old, "orders", 1, 2).await;
        batch(&mut old, 1, vec![rec(1)]).await;
        let (mut new, _new_task) = connect(Some(cdc.clone()), "site-a");
        assert_eq!(
            open(&mut new, "orders", 1, 2).await,
            Frame::CdcReady { next_seq: 2 }
        );
        expect_ship_error(&mut old, "replaced").await;
        old_task.await.unwrap();
        let mut rest = Vec::new();
        let _ = old.read_to_end(&mut rest).await;
        assert!(cdc.get("site-a/orders").unwrap().connected());
        assert_eq!(
            batch(&mut new, 2, vec![rec(2)]).await,
            ShipMessage::Ack { seq: 2 }
        );
    }

    #[tokio::test]
    async fn a_stream_from_another_spool_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = CdcConfig {
            dir: dir.path().to_path_buf(),
            retention: Duration::from_secs(3600),
            segment_bytes: routy_log::segment_log::DEFAULT_SEGMENT_BYTES,
            sinks: vec![],
            consumers: None,
        };
        let drain = Drain::new();
        let cdc = Cdc::start(cfg.clone(), drain.clone()).await.unwrap();
        let (mut s, task) = connect(Some(cdc.clone()), "site-a");
        assert_eq!(
            open(&mut s, "orders", 1, 2).await,
            Frame::CdcReady { next_seq: 1 }
        );
        batch(&mut s, 1, vec![rec(1), rec(2)]).await;
        drop(s);
        task.await.unwrap();
        // A reset spool (or a second relay-inner with a source of the same name).
        let (mut s, task) = connect(Some(cdc.clone()), "site-a");
        expect_error(
            open_spool(&mut s, "orders", 1, 0, 0x99).await,
            "the store of site-a/orders holds records of spool 0000000000000007 but \
             relay-inner's spool is 0000000000000099",
        );
        task.await.unwrap();
        let src = cdc.get("site-a/orders").unwrap();
        assert!(!src.connected());
        assert_eq!(src.store.synced_seq(), 2);
        // Another tunnel's source of the same name has a store (and a spool) of its own.
        let (mut s, _task) = connect(Some(cdc.clone()), "site-b");
        assert_eq!(
            open_spool(&mut s, "orders", 1, 0, 0x99).await,
            Frame::CdcReady { next_seq: 1 }
        );
        // The remembered spool survives a restart of relay-outer.
        drop(s);
        drop(src);
        drop(cdc);
        drain.stop();
        let cdc2 = {
            // The first Cdc's stores close once its tasks (retention) have stopped.
            let mut tries = 0;
            loop {
                let c = Cdc::start(cfg.clone(), Drain::new()).await.unwrap();
                match c.source("site-a/orders").await {
                    Ok(_) => break c,
                    Err(_) if tries < 50 => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        };
        let (mut s, task) = connect(Some(cdc2.clone()), "site-a");
        expect_error(
            open_spool(&mut s, "orders", 1, 2, 0x99).await,
            "spool 0000000000000007",
        );
        task.await.unwrap();
        let (mut s, _task) = connect(Some(cdc2.clone()), "site-a");
        assert_eq!(
            open(&mut s, "orders", 1, 3).await,
            Frame::CdcReady { next_seq: 3 }
        );
        assert_eq!(
            cdc2.status()["sources"]["site-a/orders"]["spool_id"],
            "0000000000000007"
        );
    }

    #[tokio::test]
    async fn a_store_that_hit_an_io_error_refuses_batches_and_streams() {
        let dir = tempfile::tempdir().unwrap();
        let cdc = cdc(dir.path()).await;
        let (mut s, task) = connect(Some(cdc.clone()), "site-a");
        open(&mut s, "orders", 1, 4).await;
        assert_eq!(
            batch(&mut s, 1, vec![rec(1)]).await,
            ShipMessage::Ack { seq: 1 }
        );
        let store = cdc.get("site-a/orders").unwrap().store.clone();
        store
            .faults
            .sync
            .store(true, std::sync::atomic::Ordering::Relaxed);
        routy_tunnel::ship::write(
            &mut s,
            &ShipMessage::Batch {
                first_seq: 2,
                records: vec![rec(2), rec(3)],
            },
        )
        .await
        .unwrap();
        expect_ship_error(&mut s, "relay-outer is restarted").await;
        task.await.unwrap();
        assert_eq!(store.synced_seq(), 1);
        // The records appended but not durable are not counted: the stream is refused.
        let (mut s, task) = connect(Some(cdc.clone()), "site-a");
        expect_error(open(&mut s, "orders", 1, 4).await, "hit an I/O error");
        task.await.unwrap();
        assert!(cdc.status()["sources"]["site-a/orders"]["error"]
            .as_str()
            .unwrap()
            .contains("injected fsync failure"));
    }

    #[tokio::test]
    async fn a_failed_write_part_way_acks_nothing_but_counts_what_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let cdc = cdc(dir.path()).await;
        let (mut s, task) = connect(Some(cdc.clone()), "site-a");
        open(&mut s, "orders", 1, 4).await;
        let store = cdc.get("site-a/orders").unwrap().store.clone();
        store
            .faults
            .append_at
            .store(3, std::sync::atomic::Ordering::Relaxed);
        routy_tunnel::ship::write(
            &mut s,
            &ShipMessage::Batch {
                first_seq: 1,
                records: vec![rec(1), rec(2), rec(3), rec(4)],
            },
        )
        .await
        .unwrap();
        expect_ship_error(&mut s, "injected append failure").await;
        task.await.unwrap();
        assert_eq!(store.synced_seq(), 2);
        store
            .faults
            .append_at
            .store(0, std::sync::atomic::Ordering::Relaxed);
        let (mut s, _task) = connect(Some(cdc.clone()), "site-a");
        assert_eq!(
            open(&mut s, "orders", 1, 4).await,
            Frame::CdcReady { next_seq: 3 }
        );
        assert_eq!(
            batch(&mut s, 3, vec![rec(3), rec(4)]).await,
            ShipMessage::Ack { seq: 4 }
        );
    }
}
