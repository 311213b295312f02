//! Reading the store for one sink (or consumer): records up to the durable seq, in order,
//! read on a blocking thread.

use std::collections::VecDeque;
use std::sync::Arc;

use relay_proto::cdc::Record;
use routy_log::segment_log::Reader;
use tokio::sync::watch;

use super::SinkError;
use crate::cdc::store::Store;

/// Records read per trip to the blocking pool at most.
const READ_BATCH: usize = 256;
/// Record bytes read per trip at most (at least one record): records of a large
/// transaction are up to 256 KiB each, and 256 of them held at once made a sink hold
/// 64 MiB before it applied any.
const READ_BATCH_BYTES: usize = 4 << 20;

pub struct RecordReader {
    store: Arc<Store>,
    rx: watch::Receiver<u64>,
    reader: Option<Reader>,
    /// Seq the reader starts at (0: the store's first record).
    start: u64,
    /// Seq of the last record handed out.
    last: Option<u64>,
    /// Seq of the last record read from the reader.
    read_upto: Option<u64>,
    buf: VecDeque<(u64, Vec<u8>)>,
    /// Copy rows are handed out as blocks ([`Record::decode_rows`]).
    rows: bool,
}

impl RecordReader {
    /// Reads from `start` (0: the oldest record held).
    pub fn new(store: Arc<Store>, start: u64) -> RecordReader {
        RecordReader {
            rx: store.subscribe(),
            store,
            reader: None,
            start,
            last: None,
            read_upto: None,
            buf: VecDeque::new(),
            rows: false,
        }
    }

    /// Hands copy rows out as [`relay_proto::cdc::Event::Rows`] blocks.
    pub fn with_rows(mut self, rows: bool) -> RecordReader {
        self.rows = rows;
        self
    }

    /// Newest durable seq (and marks it seen for [`RecordReader::changed`]).
    pub fn durable(&mut self) -> u64 {
        *self.rx.borrow_and_update()
    }

    /// Waits until the durable seq moves.
    pub async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// The next durable record if one is available now.
    pub async fn try_next(&mut self) -> Result<Option<(u64, Record)>, SinkError> {
        let durable = self.durable();
        if self.buf.is_empty() {
            self.fill(durable).await?;
        }
        match self.buf.front() {
            Some((seq, _)) if *seq <= durable => {}
            _ => return Ok(None),
        }
        let (seq, payload) = self.buf.pop_front().expect("front checked");
        if let Some(last) = self.last {
            if seq != last + 1 {
                return Err(SinkError::store(
                    seq,
                    format!("store returned seq {seq} after {last}"),
                ));
            }
        }
        self.last = Some(seq);
        let decode = if self.rows {
            Record::decode_rows
        } else {
            Record::decode
        };
        let rec = decode(&payload).map_err(|e| {
            SinkError::store(
                seq,
                format!("record {seq} in the store does not decode: {e}"),
            )
        })?;
        Ok(Some((seq, rec)))
    }

    async fn fill(&mut self, durable: u64) -> Result<(), SinkError> {
        // Where the reader is (or a new one starts): after the last record read.
        let next = self.read_upto.map_or(self.start, |l| l + 1);
        if durable == 0 || durable < next {
            return Ok(());
        }
        let mut reader = match self.reader.take() {
            Some(r) => r,
            None => {
                let mut r = self.store.reader(next).map_err(|e| {
                    SinkError::store(
                        next,
                        format!(
                            "cannot read the store {} from seq {next}: {e}",
                            self.store.name
                        ),
                    )
                })?;
                // What a sink read is not read again soon: keep the page cache for the
                // databases (see `Reader::drop_behind`).
                r.drop_behind();
                r
            }
        };
        let max = if next == 0 {
            READ_BATCH
        } else {
            ((durable - next + 1) as usize).min(READ_BATCH)
        };
        let (reader, out, err) = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            let mut err = None;
            let mut bytes = 0;
            while out.len() < max && bytes < READ_BATCH_BYTES {
                match reader.next() {
                    Some(Ok((seq, payload))) => {
                        let at_end = seq >= durable;
                        bytes += payload.len();
                        out.push((seq, payload));
                        if at_end {
                            // Caught up: hold no segment that retention may remove.
                            reader.release();
                            break;
                        }
                    }
                    Some(Err(e)) => {
                        err = Some(e);
                        break;
                    }
                    None => break,
                }
            }
            (reader, out, err)
        })
        .await
        .map_err(|e| SinkError::store(next, format!("store read task failed: {e}")))?;
        if let Some((seq, _)) = out.last() {
            self.read_upto = Some(*seq);
        }
        self.buf.extend(out);
        self.reader = Some(reader);
        if let Some(e) = err {
            // A reader stays finished after an error: the next fill opens a new one after
            // what was read, so the error comes back once the buffer is handed out.
            self.reader = None;
            if self.buf.is_empty() {
                return Err(SinkError::store(
                    next,
                    format!("reading the store {}: {e}", self.store.name),
                ));
            }
        }
        Ok(())
    }
}
