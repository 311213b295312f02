//! A source's change log as consumers read it: events with their ids (positions), whole
//! transactions only, filtered by table and op.
//!
//! A transaction's events are held back until its commit is in the store: one cut off by
//! a source crash (its rest never comes; the transaction is sent again whole) is dropped
//! and never seen by a consumer. A transaction larger than [`HOLD_BYTES`] is let through
//! as it arrives, so a consumer may, after such a crash, see its first part under ids
//! that are not repeated later (documented in the README).

use std::collections::VecDeque;
use std::sync::Arc;

use relay_proto::cdc::{event_json, Event, Relations};

use super::sink::reader::RecordReader;
use super::sink::{Filter, Position, SinkError};
use super::store::Store;

/// JSON bytes of an open transaction held back at most.
pub const HOLD_BYTES: usize = 16 << 20;

/// One event for a consumer: its position and its JSON (with `id`).
#[derive(Debug, Clone)]
pub struct Change {
    /// The event's position.
    pub at: Position,
    /// `cdc tail`'s shape plus `id`.
    pub json: String,
}

/// Reads a store for one consumer.
pub struct ChangeStream {
    reader: RecordReader,
    rels: Relations,
    filter: Filter,
    /// Events before this are skipped.
    start: Position,
    ready: VecDeque<Change>,
    /// The open transaction's events, held back until its commit.
    txn: Vec<Change>,
    txn_bytes: usize,
    txn_open: bool,
    /// The open transaction is too large to hold: its events pass as they come.
    txn_streaming: bool,
}

impl ChangeStream {
    /// Reads `store` from `start` (inclusive; [`Position::START`]: the oldest record).
    pub fn new(store: Arc<Store>, start: Position, filter: Filter) -> ChangeStream {
        ChangeStream {
            reader: RecordReader::new(store, start.seq),
            rels: Relations::default(),
            filter,
            start,
            ready: VecDeque::new(),
            txn: Vec::new(),
            txn_bytes: 0,
            txn_open: false,
            txn_streaming: false,
        }
    }

    /// Up to `max` events available now (none: wait with [`ChangeStream::changed`]).
    pub async fn next_batch(&mut self, max: usize) -> Result<Vec<Change>, SinkError> {
        while self.ready.len() < max {
            match self.reader.try_next().await? {
                Some((seq, rec)) => {
                    if seq < self.start.seq {
                        continue;
                    }
                    for (i, ev) in rec.events.into_iter().enumerate() {
                        self.event(Position::new(seq, i as u32), ev);
                    }
                }
                None => break,
            }
        }
        let n = self.ready.len().min(max);
        Ok(self.ready.drain(..n).collect())
    }

    /// Waits until the store has more.
    pub async fn changed(&mut self) {
        self.reader.changed().await;
    }

    fn event(&mut self, at: Position, ev: Event) {
        if let Event::Relation(_) = &ev {
            self.rels.observe(&ev);
            return;
        }
        if at < self.start {
            return;
        }
        let cuts = matches!(
            ev,
            Event::Begin { .. }
                | Event::Snapshot { .. }
                | Event::Chunk { .. }
                | Event::Message {
                    transactional: false,
                    ..
                }
        );
        if self.txn_open && cuts {
            // The open transaction was cut off by a source crash: it comes again whole.
            self.txn.clear();
            self.txn_bytes = 0;
            self.txn_open = false;
            self.txn_streaming = false;
        }
        let (begins, ends) = (
            matches!(ev, Event::Begin { .. }),
            matches!(ev, Event::Commit { .. }),
        );
        let Some(ev) = self.filter.apply(ev, &self.rels) else {
            return;
        };
        let mut v = event_json(at.seq, &ev, &self.rels);
        v["id"] = at.to_string().into();
        let change = Change {
            at,
            json: v.to_string(),
        };
        if begins {
            self.txn_open = true;
            self.txn_bytes = change.json.len();
            self.txn.push(change);
            return;
        }
        if !self.txn_open || self.txn_streaming {
            self.ready.push_back(change);
        } else {
            self.txn_bytes += change.json.len();
            self.txn.push(change);
            if self.txn_bytes > HOLD_BYTES {
                self.txn_streaming = true;
                self.ready.extend(self.txn.drain(..));
            }
        }
        if ends {
            self.txn_open = false;
            self.txn_streaming = false;
            self.txn_bytes = 0;
            // A transaction the filters left empty (begin and commit only) is left out.
            if self.txn.len() > 2 {
                self.ready.extend(self.txn.drain(..));
            }
            self.txn.clear();
        }
    }
}
