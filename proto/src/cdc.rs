//! The change-event model both relays agree on, its binary record encoding, and the
//! framing of the shipping stream.
//!
//! A **record** is what one spool/store entry holds: a short list of [`Event`]s plus the
//! source position it covers. relay-inner cuts records so that
//!
//! * a record never holds the end of one transaction and the start of the next: a record
//!   that holds a `Commit` ends with it, so "everything up to record N is applied" is
//!   always a transaction boundary for a sink;
//! * every record carries the [`Relation`] of each table its row events use, before the
//!   first use, so any record can be read on its own (`cdc tail --from`, a sink replayed
//!   from a point in time) without the history before it.
//!
//! A transaction can be cut off: when relay-inner stops in the middle of a large one, the
//! records it already spooled stay, and after the restart the transaction is read again
//! whole. So a reader that meets a `Begin`, a `Snapshot` event or a non-transactional
//! `Message` while a transaction is open discards the open one: its complete copy
//! follows.
//!
//! Values travel in PostgreSQL's text format (what pgoutput and `COPY` produce), which
//! every type has and every type can be read back from. An unchanged TOAST value is
//! [`Value::Unchanged`], never NULL.
//!
//! Record encoding (little-endian): `version u8 | lsn u64 | count u32 | events`, each event
//! a tag byte and its fields; strings and byte strings are `u32 length | bytes`. A block
//! of copy rows ([`Event::Rows`]) is `rel u32 | rows u32 | bytes` of `COPY` text lines;
//! it takes `rows` positions.
//! Decoding is total: any bytes give a record or a [`CdcError`], never a panic.

use std::collections::HashMap;
use std::fmt;

pub use crate::lsn::{format_lsn, parse_lsn};

/// Version byte at the head of every encoded record.
pub const RECORD_VERSION: u8 = 1;

/// PostgreSQL's epoch (2000-01-01T00:00:00Z) in Unix seconds.
pub const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;

/// Prefix of the logical messages relay-inner emits as a heartbeat.
pub const HEARTBEAT_PREFIX: &str = "routy.heartbeat";

/// One column value, in PostgreSQL's text format.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// A TOASTed value the source did not send because it did not change: keep the old one.
    Unchanged,
    /// The value's text representation.
    Text(String),
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// OID of the column's type on the source.
    pub type_oid: u32,
    /// Type modifier (`atttypmod`), -1 when none.
    pub type_modifier: i32,
    /// The type as SQL (`format_type`), e.g. `numeric(12,2)`, `text[]`; empty if unknown.
    pub type_name: String,
    /// Part of the replica identity key.
    pub key: bool,
    /// The column's number in its table on the source (`attnum`); 0 when unknown. It
    /// survives a rename and is never reused, so it tells a renamed column from a
    /// dropped one and a new one.
    pub attnum: u16,
}

/// A table's schema as the source publishes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Relation OID on the source; row events refer to it.
    pub id: u32,
    /// Schema name.
    pub schema: String,
    /// Table name.
    pub name: String,
    /// `REPLICA IDENTITY`: `d` default (primary key), `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    /// Published columns, in the order row events carry their values.
    pub columns: Vec<Column>,
}

impl Relation {
    /// `schema.name`, as configured and as `cdc tail` prints it.
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// Whether any column is marked as part of the key.
    pub fn has_key(&self) -> bool {
        self.columns.iter().any(|c| c.key)
    }

    /// The indexes of the key columns, in column order.
    pub fn key_indexes(&self) -> Vec<usize> {
        self.columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.key)
            .map(|(i, _)| i)
            .collect()
    }
}

/// The old row an update or delete carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OldRow {
    /// Only the key columns are meaningful (the others are NULL); otherwise the whole
    /// old row (`REPLICA IDENTITY FULL`).
    pub key_only: bool,
    /// Values in column order.
    pub values: Vec<Value>,
}

/// Which phase of a table's initial copy a snapshot event marks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotPhase {
    /// The copy of the table starts: the target table is emptied and refilled.
    Start,
    /// Every row of the table was copied.
    Done,
    /// A copy of the table again while the stream goes on (a resync, a table added to the
    /// source, a chunked initial copy): rows follow as inserts, chunk by chunk, each chunk
    /// closed by an [`Event::Chunk`]; the target is not emptied.
    Resync,
}

/// One change event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A transaction starts.
    Begin {
        /// Transaction id on the source.
        xid: u32,
        /// LSN of its commit record.
        commit_lsn: u64,
        /// Commit time, microseconds since 2000-01-01 UTC.
        commit_time: i64,
    },
    /// The transaction ends; the position to resume after is `end_lsn`.
    Commit {
        /// LSN of the commit record.
        commit_lsn: u64,
        /// LSN just past the commit record.
        end_lsn: u64,
        /// Commit time, microseconds since 2000-01-01 UTC.
        commit_time: i64,
    },
    /// A table's schema; precedes its row events in the same record.
    Relation(Relation),
    /// A row was inserted (also: a row of an initial copy).
    Insert {
        /// Relation id.
        rel: u32,
        /// The new row.
        new: Vec<Value>,
    },
    /// A row was updated.
    Update {
        /// Relation id.
        rel: u32,
        /// The old key (when it changed) or whole old row (`REPLICA IDENTITY FULL`).
        old: Option<OldRow>,
        /// The new row; unchanged TOAST values are [`Value::Unchanged`].
        new: Vec<Value>,
    },
    /// A row was deleted.
    Delete {
        /// Relation id.
        rel: u32,
        /// Its key or whole old row.
        old: OldRow,
    },
    /// Tables were truncated.
    Truncate {
        /// Relation ids.
        rels: Vec<u32>,
        /// `CASCADE`.
        cascade: bool,
        /// `RESTART IDENTITY`.
        restart_identity: bool,
    },
    /// A logical decoding message (`pg_logical_emit_message`).
    Message {
        /// Part of its transaction (true) or emitted on its own.
        transactional: bool,
        /// LSN of the message.
        lsn: u64,
        /// The emitter's prefix.
        prefix: String,
        /// Payload.
        content: Vec<u8>,
    },
    /// A chunk of a resync is complete: of the table's rows whose key is above `lo`
    /// (`None`: from the first) and at most `hi` (`None`: to the last), the source has
    /// exactly those whose key is in `keys` (each the key columns' values, in column
    /// order); a sink that keeps rows deletes the others. Outside transactions.
    Chunk {
        /// Relation id.
        rel: u32,
        /// The key the chunk starts after.
        lo: Option<Vec<Value>>,
        /// The last key the chunk covers.
        hi: Option<Vec<Value>>,
        /// The keys the source has in the range.
        keys: Vec<Vec<Value>>,
    },
    /// Rows of a table's initial copy or resync as the source's `COPY` wrote them
    /// (PostgreSQL's text format, one `\n`-terminated line of the relation's columns
    /// per row), carried unparsed from the source to a sink that hands them to a `COPY`
    /// of its own. It stands for `rows` [`Event::Insert`]s and takes their `rows`
    /// positions in its record. Only [`Record::decode_rows`] hands it out;
    /// [`Record::decode`] gives the inserts.
    Rows {
        /// Relation id.
        rel: u32,
        /// Lines in `data`.
        rows: u32,
        /// The lines.
        data: Vec<u8>,
    },
    /// A table's initial copy starts or ends; rows in between are `Insert`s (or `Rows`).
    Snapshot {
        /// Relation id.
        rel: u32,
        /// Start or done.
        phase: SnapshotPhase,
        /// Start: the LSN of the snapshot the copy reads; Done: rows copied.
        value: u64,
    },
}

impl Event {
    /// Positions the event takes in its record: `rows` for [`Event::Rows`], else 1.
    pub fn positions(&self) -> u64 {
        match self {
            Event::Rows { rows, .. } => u64::from(*rows),
            _ => 1,
        }
    }

    /// Short lowercase name, as `cdc tail` prints it.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Begin { .. } => "begin",
            Event::Commit { .. } => "commit",
            Event::Relation(_) => "relation",
            Event::Insert { .. } | Event::Rows { .. } => "insert",
            Event::Update { .. } => "update",
            Event::Delete { .. } => "delete",
            Event::Truncate { .. } => "truncate",
            Event::Message { .. } => "message",
            Event::Snapshot {
                phase: SnapshotPhase::Start,
                ..
            } => "snapshot_start",
            Event::Snapshot {
                phase: SnapshotPhase::Done,
                ..
            } => "snapshot_done",
            Event::Snapshot {
                phase: SnapshotPhase::Resync,
                ..
            } => "resync_start",
            Event::Chunk { .. } => "resync_chunk",
        }
    }
}

/// One spool/store entry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    /// Source position covered once this record is durable: the `end_lsn` of the commit
    /// it ends with, or 0 when it ends no transaction.
    pub lsn: u64,
    /// Events in source order.
    pub events: Vec<Event>,
}

/// Why bytes could not be decoded (or a record not encoded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CdcError {
    /// The record starts with an unknown version byte.
    #[error("record encoding version {0} is not supported (this side reads {RECORD_VERSION})")]
    UnsupportedVersion(u8),
    /// The bytes ended inside a field.
    #[error("record truncated while reading {0}")]
    Truncated(&'static str),
    /// An event tag this version does not know.
    #[error("unknown event tag {0}")]
    UnknownTag(u8),
    /// A value tag this version does not know.
    #[error("unknown value tag {0}")]
    UnknownValueTag(u8),
    /// A string is not UTF-8.
    #[error("field {0} is not valid UTF-8")]
    BadUtf8(&'static str),
    /// Bytes were left after the last event.
    #[error("{0} unexpected bytes after the record")]
    TrailingBytes(usize),
    /// A length field is larger than the bytes that remain.
    #[error("field {0} claims more bytes than the record holds")]
    BadLength(&'static str),
    /// A shipping message exceeds [`MAX_SHIP_MESSAGE`].
    #[error("shipping message of {0} bytes exceeds the maximum of {MAX_SHIP_MESSAGE}")]
    TooLarge(usize),
    /// A shipping message is malformed.
    #[error("malformed shipping message: {0}")]
    Malformed(&'static str),
}

const TAG_BEGIN: u8 = 1;
const TAG_COMMIT: u8 = 2;
const TAG_RELATION: u8 = 3;
const TAG_INSERT: u8 = 4;
const TAG_UPDATE: u8 = 5;
const TAG_DELETE: u8 = 6;
const TAG_TRUNCATE: u8 = 7;
const TAG_MESSAGE: u8 = 8;
const TAG_SNAPSHOT: u8 = 9;
/// A relation whose columns carry their `attnum` (after the key flag).
const TAG_RELATION_ATTNUM: u8 = 10;
const TAG_CHUNK: u8 = 11;
const TAG_ROWS: u8 = 12;

const VAL_NULL: u8 = 0;
const VAL_UNCHANGED: u8 = 1;
const VAL_TEXT: u8 = 2;

/// Prefix of the logical message that stands in for records lost to corruption (written
/// by `cdc salvage`); its content is a JSON object (`first_seq`, `last_seq`, `file`,
/// `offset`, `damage`, `log`).
pub const LOST_PREFIX: &str = "routy.lost";

impl Record {
    /// The record that takes the place of seq `seq`, one of the unreadable seqs
    /// `first_seq..=last_seq` found in `file` at `offset` of `log` (spool or store).
    pub fn lost(seq: u64, first_seq: u64, last_seq: u64, detail: serde_json::Value) -> Record {
        let mut content = serde_json::json!({
            "seq": seq,
            "first_seq": first_seq,
            "last_seq": last_seq,
        });
        if let (Some(obj), serde_json::Value::Object(more)) = (content.as_object_mut(), detail) {
            obj.extend(more);
        }
        Record {
            lsn: 0,
            events: vec![Event::Message {
                transactional: false,
                lsn: 0,
                prefix: LOST_PREFIX.to_owned(),
                content: content.to_string().into_bytes(),
            }],
        }
    }

    /// When this record is a marker of lost records: its JSON description.
    pub fn lost_marker(&self) -> Option<serde_json::Value> {
        match self.events.as_slice() {
            [Event::Message {
                transactional: false,
                prefix,
                content,
                ..
            }] if prefix == LOST_PREFIX => serde_json::from_slice(content).ok(),
            _ => None,
        }
    }

    /// Encodes the record.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        self.encode_into(&mut out);
        out
    }

    /// Appends the encoded record to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(RECORD_VERSION);
        out.extend_from_slice(&self.lsn.to_le_bytes());
        put_u32(out, self.events.len());
        for ev in &self.events {
            encode_event(ev, out);
        }
    }

    /// Decodes a record; total. Copy rows carried as [`Event::Rows`] come out as one
    /// [`Event::Insert`] each.
    pub fn decode(buf: &[u8]) -> Result<Record, CdcError> {
        let rec = Record::decode_rows(buf)?;
        Ok(Record {
            lsn: rec.lsn,
            events: Record::expand_rows(rec.events)?,
        })
    }

    /// Decodes a record keeping copy rows as [`Event::Rows`] (checked: each holds
    /// `rows` lines that [`Record::decode`] reads as rows of its relation, described
    /// earlier in the record); total.
    pub fn decode_rows(buf: &[u8]) -> Result<Record, CdcError> {
        let mut r = Rd { buf };
        let v = r.u8("version")?;
        if v != RECORD_VERSION {
            return Err(CdcError::UnsupportedVersion(v));
        }
        let lsn = r.u64("lsn")?;
        let n = r.count("events", 2)?;
        let mut events = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            let ev = decode_event(&mut r)?;
            if let Event::Rows { rel, rows, data } = &ev {
                if *rows == 0 {
                    // Every event takes a position; a block of none would not.
                    return Err(CdcError::Malformed("an empty block of copy rows"));
                }
                crate::copy_text::check_copy_rows(data, *rows, width_of(&events, *rel)?)
                    .map_err(CdcError::Malformed)?;
            }
            events.push(ev);
        }
        if !r.buf.is_empty() {
            return Err(CdcError::TrailingBytes(r.buf.len()));
        }
        Ok(Record { lsn, events })
    }

    /// The events with each [`Event::Rows`] block read as its inserts (as
    /// [`Record::decode`] gives them).
    pub fn expand_rows(events: Vec<Event>) -> Result<Vec<Event>, CdcError> {
        let mut out = Vec::with_capacity(events.len());
        for ev in events {
            match ev {
                Event::Rows { rel, rows, data } => {
                    let ncols = width_of(&out, rel)?;
                    crate::copy_text::each_copy_row(&data, rows, ncols, |new| {
                        out.push(Event::Insert { rel, new })
                    })
                    .map_err(CdcError::Malformed)?;
                }
                ev => out.push(ev),
            }
        }
        Ok(out)
    }

    /// Whether the record ends a transaction (its last event is a commit).
    pub fn ends_transaction(&self) -> bool {
        matches!(self.events.last(), Some(Event::Commit { .. }))
    }
}

/// Columns of relation `rel` as described last among `events` (copy rows need it).
fn width_of(events: &[Event], rel: u32) -> Result<usize, CdcError> {
    events
        .iter()
        .rev()
        .find_map(|e| match e {
            Event::Relation(r) if r.id == rel => Some(r.columns.len()),
            _ => None,
        })
        .ok_or(CdcError::Malformed("copy rows before their relation"))
}

fn put_u32(out: &mut Vec<u8>, n: usize) {
    // Lengths beyond 4 GiB cannot occur: records are bounded far below by the segment log.
    out.extend_from_slice(&(n.min(u32::MAX as usize) as u32).to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_u32(out, b.len());
    out.extend_from_slice(b);
}

fn put_values(out: &mut Vec<u8>, vals: &[Value]) {
    put_u32(out, vals.len());
    for v in vals {
        match v {
            Value::Null => out.push(VAL_NULL),
            Value::Unchanged => out.push(VAL_UNCHANGED),
            Value::Text(s) => {
                out.push(VAL_TEXT);
                put_bytes(out, s.as_bytes());
            }
        }
    }
}

fn put_old(out: &mut Vec<u8>, old: &OldRow) {
    out.push(old.key_only as u8);
    put_values(out, &old.values);
}

fn encode_event(ev: &Event, out: &mut Vec<u8>) {
    match ev {
        Event::Begin {
            xid,
            commit_lsn,
            commit_time,
        } => {
            out.push(TAG_BEGIN);
            out.extend_from_slice(&xid.to_le_bytes());
            out.extend_from_slice(&commit_lsn.to_le_bytes());
            out.extend_from_slice(&commit_time.to_le_bytes());
        }
        Event::Commit {
            commit_lsn,
            end_lsn,
            commit_time,
        } => {
            out.push(TAG_COMMIT);
            out.extend_from_slice(&commit_lsn.to_le_bytes());
            out.extend_from_slice(&end_lsn.to_le_bytes());
            out.extend_from_slice(&commit_time.to_le_bytes());
        }
        Event::Relation(rel) => {
            // Written with attnums only when one is known, so a relation without them
            // stays readable by a relay-outer that predates them.
            let attnums = rel.columns.iter().any(|c| c.attnum != 0);
            out.push(if attnums {
                TAG_RELATION_ATTNUM
            } else {
                TAG_RELATION
            });
            out.extend_from_slice(&rel.id.to_le_bytes());
            put_bytes(out, rel.schema.as_bytes());
            put_bytes(out, rel.name.as_bytes());
            out.push(rel.replica_identity);
            put_u32(out, rel.columns.len());
            for c in &rel.columns {
                put_bytes(out, c.name.as_bytes());
                out.extend_from_slice(&c.type_oid.to_le_bytes());
                out.extend_from_slice(&c.type_modifier.to_le_bytes());
                put_bytes(out, c.type_name.as_bytes());
                out.push(c.key as u8);
                if attnums {
                    out.extend_from_slice(&c.attnum.to_le_bytes());
                }
            }
        }
        Event::Rows { rel, rows, data } => {
            out.push(TAG_ROWS);
            out.extend_from_slice(&rel.to_le_bytes());
            out.extend_from_slice(&rows.to_le_bytes());
            put_bytes(out, data);
        }
        Event::Insert { rel, new } => {
            out.push(TAG_INSERT);
            out.extend_from_slice(&rel.to_le_bytes());
            put_values(out, new);
        }
        Event::Update { rel, old, new } => {
            out.push(TAG_UPDATE);
            out.extend_from_slice(&rel.to_le_bytes());
            match old {
                None => out.push(0),
                Some(o) => {
                    out.push(1);
                    put_old(out, o);
                }
            }
            put_values(out, new);
        }
        Event::Delete { rel, old } => {
            out.push(TAG_DELETE);
            out.extend_from_slice(&rel.to_le_bytes());
            put_old(out, old);
        }
        Event::Truncate {
            rels,
            cascade,
            restart_identity,
        } => {
            out.push(TAG_TRUNCATE);
            out.push((*cascade as u8) | ((*restart_identity as u8) << 1));
            put_u32(out, rels.len());
            for r in rels {
                out.extend_from_slice(&r.to_le_bytes());
            }
        }
        Event::Message {
            transactional,
            lsn,
            prefix,
            content,
        } => {
            out.push(TAG_MESSAGE);
            out.push(*transactional as u8);
            out.extend_from_slice(&lsn.to_le_bytes());
            put_bytes(out, prefix.as_bytes());
            put_bytes(out, content);
        }
        Event::Snapshot { rel, phase, value } => {
            out.push(TAG_SNAPSHOT);
            out.extend_from_slice(&rel.to_le_bytes());
            out.push(match phase {
                SnapshotPhase::Start => 0,
                SnapshotPhase::Done => 1,
                SnapshotPhase::Resync => 2,
            });
            out.extend_from_slice(&value.to_le_bytes());
        }
        Event::Chunk { rel, lo, hi, keys } => {
            out.push(TAG_CHUNK);
            out.extend_from_slice(&rel.to_le_bytes());
            for bound in [lo, hi] {
                match bound {
                    None => out.push(0),
                    Some(v) => {
                        out.push(1);
                        put_values(out, v);
                    }
                }
            }
            put_u32(out, keys.len());
            for k in keys {
                put_values(out, k);
            }
        }
    }
}

struct Rd<'a> {
    buf: &'a [u8],
}

impl<'a> Rd<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], CdcError> {
        if self.buf.len() < n {
            return Err(CdcError::Truncated(field));
        }
        let (h, t) = self.buf.split_at(n);
        self.buf = t;
        Ok(h)
    }
    fn u8(&mut self, f: &'static str) -> Result<u8, CdcError> {
        Ok(self.take(1, f)?[0])
    }
    fn bool(&mut self, f: &'static str) -> Result<bool, CdcError> {
        Ok(self.u8(f)? != 0)
    }
    fn u16(&mut self, f: &'static str) -> Result<u16, CdcError> {
        let b = self.take(2, f)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, f: &'static str) -> Result<u32, CdcError> {
        let b = self.take(4, f)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn i32(&mut self, f: &'static str) -> Result<i32, CdcError> {
        Ok(self.u32(f)? as i32)
    }
    fn u64(&mut self, f: &'static str) -> Result<u64, CdcError> {
        let b = self.take(8, f)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn i64(&mut self, f: &'static str) -> Result<i64, CdcError> {
        Ok(self.u64(f)? as i64)
    }
    /// A count of items each at least `min_item` bytes long, checked against what remains
    /// so a forged count cannot make us reserve gigabytes.
    fn count(&mut self, f: &'static str, min_item: usize) -> Result<usize, CdcError> {
        let n = self.u32(f)? as usize;
        if n.saturating_mul(min_item.max(1)) > self.buf.len() {
            return Err(CdcError::BadLength(f));
        }
        Ok(n)
    }
    fn bytes(&mut self, f: &'static str) -> Result<&'a [u8], CdcError> {
        let n = self.u32(f)? as usize;
        if n > self.buf.len() {
            return Err(CdcError::BadLength(f));
        }
        self.take(n, f)
    }
    fn string(&mut self, f: &'static str) -> Result<String, CdcError> {
        let b = self.bytes(f)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| CdcError::BadUtf8(f))
    }
    fn values(&mut self) -> Result<Vec<Value>, CdcError> {
        let n = self.count("values", 1)?;
        if n > MAX_COLUMNS {
            return Err(CdcError::BadLength("values"));
        }
        let mut vals = Vec::with_capacity(n);
        for _ in 0..n {
            vals.push(match self.u8("value")? {
                VAL_NULL => Value::Null,
                VAL_UNCHANGED => Value::Unchanged,
                VAL_TEXT => Value::Text(self.string("value")?),
                t => return Err(CdcError::UnknownValueTag(t)),
            });
        }
        Ok(vals)
    }
    fn old(&mut self) -> Result<OldRow, CdcError> {
        Ok(OldRow {
            key_only: self.bool("old.key_only")?,
            values: self.values()?,
        })
    }
}

fn decode_event(r: &mut Rd<'_>) -> Result<Event, CdcError> {
    Ok(match r.u8("tag")? {
        TAG_BEGIN => Event::Begin {
            xid: r.u32("xid")?,
            commit_lsn: r.u64("commit_lsn")?,
            commit_time: r.i64("commit_time")?,
        },
        TAG_COMMIT => Event::Commit {
            commit_lsn: r.u64("commit_lsn")?,
            end_lsn: r.u64("end_lsn")?,
            commit_time: r.i64("commit_time")?,
        },
        tag @ (TAG_RELATION | TAG_RELATION_ATTNUM) => {
            let id = r.u32("rel")?;
            let schema = r.string("schema")?;
            let name = r.string("name")?;
            let replica_identity = r.u8("replica_identity")?;
            let n = r.count("columns", 17)?;
            if n > MAX_COLUMNS {
                return Err(CdcError::BadLength("columns"));
            }
            let mut columns = Vec::with_capacity(n);
            for _ in 0..n {
                columns.push(Column {
                    name: r.string("column.name")?,
                    type_oid: r.u32("column.type_oid")?,
                    type_modifier: r.i32("column.type_modifier")?,
                    type_name: r.string("column.type_name")?,
                    key: r.bool("column.key")?,
                    attnum: if tag == TAG_RELATION_ATTNUM {
                        r.u16("column.attnum")?
                    } else {
                        0
                    },
                });
            }
            Event::Relation(Relation {
                id,
                schema,
                name,
                replica_identity,
                columns,
            })
        }
        TAG_ROWS => Event::Rows {
            rel: r.u32("rel")?,
            rows: r.u32("rows.count")?,
            data: r.bytes("rows.data")?.to_vec(),
        },
        TAG_INSERT => Event::Insert {
            rel: r.u32("rel")?,
            new: r.values()?,
        },
        TAG_UPDATE => {
            let rel = r.u32("rel")?;
            let old = if r.bool("update.has_old")? {
                Some(r.old()?)
            } else {
                None
            };
            Event::Update {
                rel,
                old,
                new: r.values()?,
            }
        }
        TAG_DELETE => Event::Delete {
            rel: r.u32("rel")?,
            old: r.old()?,
        },
        TAG_TRUNCATE => {
            let flags = r.u8("truncate.flags")?;
            let n = r.count("truncate.rels", 4)?;
            let mut rels = Vec::with_capacity(n);
            for _ in 0..n {
                rels.push(r.u32("truncate.rel")?);
            }
            Event::Truncate {
                rels,
                cascade: flags & 1 != 0,
                restart_identity: flags & 2 != 0,
            }
        }
        TAG_MESSAGE => Event::Message {
            transactional: r.bool("message.transactional")?,
            lsn: r.u64("message.lsn")?,
            prefix: r.string("message.prefix")?,
            content: r.bytes("message.content")?.to_vec(),
        },
        TAG_SNAPSHOT => {
            let rel = r.u32("rel")?;
            let phase = match r.u8("snapshot.phase")? {
                0 => SnapshotPhase::Start,
                1 => SnapshotPhase::Done,
                2 => SnapshotPhase::Resync,
                _ => return Err(CdcError::Malformed("snapshot phase")),
            };
            Event::Snapshot {
                rel,
                phase,
                value: r.u64("snapshot.value")?,
            }
        }
        TAG_CHUNK => {
            let rel = r.u32("rel")?;
            let bound = |r: &mut Rd<'_>| -> Result<Option<Vec<Value>>, CdcError> {
                Ok(match r.u8("chunk.bound")? {
                    0 => None,
                    1 => Some(r.values()?),
                    _ => return Err(CdcError::Malformed("chunk bound")),
                })
            };
            let lo = bound(r)?;
            let hi = bound(r)?;
            let n = r.count("chunk.keys", 4)?;
            let mut keys = Vec::with_capacity(n);
            for _ in 0..n {
                keys.push(r.values()?);
            }
            Event::Chunk { rel, lo, hi, keys }
        }
        t => return Err(CdcError::UnknownTag(t)),
    })
}

/// A PostgreSQL timestamp (microseconds since 2000-01-01 UTC) as RFC 3339 UTC.
pub fn format_pg_time(micros: i64) -> String {
    let unix_micros = micros.saturating_add(PG_EPOCH_UNIX_SECS.saturating_mul(1_000_000));
    format_unix_micros(unix_micros)
}

/// Unix microseconds as RFC 3339 UTC with microseconds (`2026-11-22T07:01:02.123456Z`);
/// times outside years 1-9999 are written as the nearest end of that range.
pub fn format_unix_micros(unix_micros: i64) -> String {
    use time::{OffsetDateTime, PrimitiveDateTime};
    let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_micros) * 1000)
        .unwrap_or_else(|_| {
            let end = if unix_micros < 0 {
                PrimitiveDateTime::MIN
            } else {
                PrimitiveDateTime::MAX
            };
            end.assume_utc()
        });
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

/// Parses an RFC 3339 time (`YYYY-MM-DDTHH:MM:SS[.ffffff](Z|+HH:MM|-HH:MM)`), also with
/// a space for the `T` and without an offset (then UTC), into Unix microseconds.
pub fn parse_time(s: &str) -> Option<i64> {
    let s = s.trim();
    let mut t = s.to_string();
    if t.as_bytes().get(10) == Some(&b' ') {
        t.replace_range(10..11, "T");
    }
    // Without `Z` or an offset after the seconds (and fraction), the time is UTC.
    let tail = t.get(19..)?;
    let frac = tail
        .strip_prefix('.')
        .map_or(0, |f| 1 + f.bytes().take_while(u8::is_ascii_digit).count());
    if tail.len() == frac {
        t.push('Z');
    }
    let dt =
        time::OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(dt.unix_timestamp_nanos().div_euclid(1000)).ok()
}

/// Tracks the relations seen so far, to print or apply row events by name.
#[derive(Debug, Default, Clone)]
pub struct Relations {
    map: HashMap<u32, Relation>,
}

impl Relations {
    /// Remembers the relations an event defines.
    pub fn observe(&mut self, ev: &Event) {
        if let Event::Relation(r) = ev {
            self.map.insert(r.id, r.clone());
        }
    }

    /// The relation with that id, if seen.
    pub fn get(&self, id: u32) -> Option<&Relation> {
        self.map.get(&id)
    }
}

fn values_json(rel: Option<&Relation>, vals: &[Value]) -> serde_json::Value {
    let mut obj = serde_json::Map::new();
    for (i, v) in vals.iter().enumerate() {
        let name = rel
            .and_then(|r| r.columns.get(i))
            .map_or_else(|| format!("col{}", i + 1), |c| c.name.clone());
        let jv = match v {
            Value::Null => serde_json::Value::Null,
            Value::Unchanged => serde_json::json!({ "unchanged_toast": true }),
            Value::Text(s) => serde_json::Value::String(s.clone()),
        };
        obj.insert(name, jv);
    }
    serde_json::Value::Object(obj)
}

fn old_json(rel: Option<&Relation>, old: &OldRow) -> serde_json::Value {
    if !old.key_only {
        return values_json(rel, &old.values);
    }
    // Key only: print just the key columns.
    let mut obj = serde_json::Map::new();
    for (i, v) in old.values.iter().enumerate() {
        let col = rel.and_then(|r| r.columns.get(i));
        if col.is_some_and(|c| !c.key) {
            continue;
        }
        let name = col.map_or_else(|| format!("col{}", i + 1), |c| c.name.clone());
        let jv = match v {
            Value::Text(s) => serde_json::Value::String(s.clone()),
            _ => serde_json::Value::Null,
        };
        obj.insert(name, jv);
    }
    serde_json::Value::Object(obj)
}

fn table_name(rels: &Relations, id: u32) -> serde_json::Value {
    rels.get(id)
        .map_or_else(|| serde_json::json!(id), |r| r.qualified().into())
}

/// One event as a JSON object for `cdc tail`; `rels` resolves relation ids to names.
pub fn event_json(seq: u64, ev: &Event, rels: &Relations) -> serde_json::Value {
    use serde_json::json;
    let mut v = match ev {
        Event::Begin {
            xid,
            commit_lsn,
            commit_time,
        } => {
            json!({"xid": xid, "commit_lsn": format_lsn(*commit_lsn), "commit_time": format_pg_time(*commit_time)})
        }
        Event::Commit {
            commit_lsn,
            end_lsn,
            commit_time,
        } => {
            json!({"commit_lsn": format_lsn(*commit_lsn), "end_lsn": format_lsn(*end_lsn), "commit_time": format_pg_time(*commit_time)})
        }
        Event::Relation(r) => json!({
            "table": r.qualified(),
            "replica_identity": (r.replica_identity as char).to_string(),
            "columns": r.columns.iter().map(|c| json!({"name": c.name, "type": c.type_name, "type_oid": c.type_oid, "key": c.key})).collect::<Vec<_>>(),
        }),
        Event::Insert { rel, new } => {
            json!({"table": table_name(rels, *rel), "new": values_json(rels.get(*rel), new)})
        }
        // Decoded for `cdc tail` as inserts; only a count if one is passed as it is.
        Event::Rows { rel, rows, .. } => json!({"table": table_name(rels, *rel), "rows": rows}),
        Event::Update { rel, old, new } => {
            let mut o =
                json!({"table": table_name(rels, *rel), "new": values_json(rels.get(*rel), new)});
            if let Some(old) = old {
                o["old"] = old_json(rels.get(*rel), old);
            }
            o
        }
        Event::Delete { rel, old } => {
            json!({"table": table_name(rels, *rel), "old": old_json(rels.get(*rel), old)})
        }
        Event::Truncate {
            rels: ids,
            cascade,
            restart_identity,
        } => json!({
            "tables": ids.iter().map(|id| table_name(rels, *id)).collect::<Vec<_>>(),
            "cascade": cascade, "restart_identity": restart_identity,
        }),
        Event::Message {
            transactional,
            lsn,
            prefix,
            content,
        } => json!({
            "transactional": transactional, "lsn": format_lsn(*lsn), "prefix": prefix,
            "content": String::from_utf8_lossy(content),
        }),
        Event::Snapshot { rel, phase, value } => match phase {
            SnapshotPhase::Start => {
                json!({"table": table_name(rels, *rel), "snapshot_lsn": format_lsn(*value)})
            }
            SnapshotPhase::Done => json!({"table": table_name(rels, *rel), "rows": value}),
            SnapshotPhase::Resync => json!({"table": table_name(rels, *rel)}),
        },
        Event::Chunk { rel, lo, hi, keys } => {
            // Keys as arrays of the key columns' values (text), in column order.
            let key = |v: &[Value]| {
                v.iter()
                    .map(|x| match x {
                        Value::Text(t) => serde_json::Value::String(t.clone()),
                        _ => serde_json::Value::Null,
                    })
                    .collect::<Vec<_>>()
            };
            json!({
                "table": table_name(rels, *rel),
                "after": lo.as_deref().map(key),
                "through": hi.as_deref().map(key),
                "keys": keys.iter().map(|k| key(k)).collect::<Vec<_>>(),
            })
        }
    };
    v["seq"] = seq.into();
    v["event"] = ev.kind().into();
    v
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("NULL"),
            Value::Unchanged => f.write_str("(unchanged toast)"),
            Value::Text(s) => f.write_str(s),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The shipping stream.
//
// relay-inner opens a tunnel stream and sends `Frame::CdcOpen` (the control-frame codec);
// relay-outer answers `Frame::CdcReady { next_seq }` or `Frame::Error`. After that both
// sides speak [`ShipMessage`]s: `len u32 BE | kind u8 | body`.
// ---------------------------------------------------------------------------------------

/// Largest shipping message: a batch of records, which holds at least one record of up
/// to the segment log's 256 MiB bound.
pub const MAX_SHIP_MESSAGE: usize = 320 * 1024 * 1024;

/// Most columns a row may have (PostgreSQL's own limit is 1664 in a result, 1600 in a
/// table): bounds what a forged count can make a reader allocate.
pub const MAX_COLUMNS: usize = 1664;

const SHIP_BATCH: u8 = 1;
const SHIP_ACK: u8 = 2;
const SHIP_ERROR: u8 = 3;

/// A message on the shipping stream after the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShipMessage {
    /// relay-inner → relay-outer: consecutive records starting at `first_seq`.
    Batch {
        /// Seq of the first record.
        first_seq: u64,
        /// Encoded records (the spool's payloads, unchanged).
        records: Vec<Vec<u8>>,
    },
    /// relay-outer → relay-inner: every record up to `seq` is durable in the store.
    Ack {
        /// Highest durable seq.
        seq: u64,
    },
    /// relay-outer → relay-inner: the stream ends because of this (a refused batch, a
    /// newer stream for the same source, shutdown).
    Error {
        /// Why, for relay-inner's log.
        message: String,
    },
}

impl ShipMessage {
    /// Encodes the message with its length prefix.
    pub fn encode(&self) -> Result<Vec<u8>, CdcError> {
        let mut out = vec![0u8; 4];
        match self {
            ShipMessage::Batch { first_seq, records } => {
                out.push(SHIP_BATCH);
                out.extend_from_slice(&first_seq.to_le_bytes());
                put_u32(&mut out, records.len());
                for r in records {
                    put_bytes(&mut out, r);
                }
            }
            ShipMessage::Ack { seq } => {
                out.push(SHIP_ACK);
                out.extend_from_slice(&seq.to_le_bytes());
            }
            ShipMessage::Error { message } => {
                out.push(SHIP_ERROR);
                put_bytes(&mut out, message.as_bytes());
            }
        }
        let len = out.len() - 4;
        if len > MAX_SHIP_MESSAGE {
            return Err(CdcError::TooLarge(len));
        }
        out[..4].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(out)
    }

    /// Decodes a body (after the length prefix); total.
    pub fn decode_body(body: &[u8]) -> Result<ShipMessage, CdcError> {
        let mut r = Rd { buf: body };
        let msg = match r.u8("kind")? {
            SHIP_BATCH => {
                let first_seq = r.u64("first_seq")?;
                let n = r.count("records", 4)?;
                let mut records = Vec::with_capacity(n);
                for _ in 0..n {
                    records.push(r.bytes("record")?.to_vec());
                }
                ShipMessage::Batch { first_seq, records }
            }
            SHIP_ACK => ShipMessage::Ack { seq: r.u64("seq")? },
            SHIP_ERROR => ShipMessage::Error {
                message: r.string("error.message")?,
            },
            _ => return Err(CdcError::Malformed("unknown kind")),
        };
        if !r.buf.is_empty() {
            return Err(CdcError::TrailingBytes(r.buf.len()));
        }
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Record {
        let rel = Relation {
            id: 16384,
            schema: "public".into(),
            name: "orders".into(),
            replica_identity: b'd',
            columns: vec![
                Column {
                    name: "id".into(),
                    type_oid: 23,
                    type_modifier: -1,
                    type_name: "integer".into(),
                    key: true,
                    attnum: 0,
                },
                Column {
                    name: "note".into(),
                    type_oid: 25,
                    type_modifier: -1,
                    type_name: "text".into(),
                    key: false,
                    attnum: 0,
                },
            ],
        };
        Record {
            lsn: 0x1_0000_0040,
            events: vec![
                Event::Begin {
                    xid: 7,
                    commit_lsn: 0x1_0000_0010,
                    commit_time: 1,
                },
                Event::Relation(rel),
                Event::Insert {
                    rel: 16384,
                    new: vec![Value::Text("1".into()), Value::Text("héllo".into())],
                },
                Event::Update {
                    rel: 16384,
                    old: Some(OldRow {
                        key_only: true,
                        values: vec![Value::Text("1".into()), Value::Null],
                    }),
                    new: vec![Value::Text("2".into()), Value::Unchanged],
                },
                Event::Delete {
                    rel: 16384,
                    old: OldRow {
                        key_only: true,
                        values: vec![Value::Text("2".into()), Value::Null],
                    },
                },
                Event::Truncate {
                    rels: vec![16384, 5],
                    cascade: true,
                    restart_identity: false,
                },
                Event::Message {
                    transactional: true,
                    lsn: 9,
                    prefix: "p".into(),
                    content: vec![0, 1, 2],
                },
                Event::Snapshot {
                    rel: 16384,
                    phase: SnapshotPhase::Done,
                    value: 3,
                },
                Event::Commit {
                    commit_lsn: 0x1_0000_0010,
                    end_lsn: 0x1_0000_0040,
                    commit_time: 1,
                },
            ],
        }
    }

    /// Copy rows carried unparsed: `decode` reads them as inserts (escapes undone, NULLs
    /// kept), `decode_rows` keeps the block, and a block that does not match its relation
    /// or its count is refused either way.
    #[test]
    fn copy_rows_decode_as_inserts_or_as_they_are() {
        let rel = match &sample().events[1] {
            Event::Relation(r) => r.clone(),
            _ => unreachable!("sample's second event is its relation"),
        };
        let rec = |rows: u32, data: &[u8]| Record {
            lsn: 0,
            events: vec![
                Event::Relation(rel.clone()),
                Event::Rows {
                    rel: rel.id,
                    rows,
                    data: data.to_vec(),
                },
                Event::Snapshot {
                    rel: rel.id,
                    phase: SnapshotPhase::Done,
                    value: 3,
                },
            ],
        };
        let data = b"1\ta\\tb\n2\t\\N\n3\tgr\xc3\xbc\\101\n";
        let enc = rec(3, data).encode();
        let t = |s: &str| Value::Text(s.into());
        let back = Record::decode(&enc).unwrap();
        assert_eq!(back.events.len(), 5);
        assert_eq!(
            back.events[1..4],
            [
                Event::Insert {
                    rel: rel.id,
                    new: vec![t("1"), t("a\tb")]
                },
                Event::Insert {
                    rel: rel.id,
                    new: vec![t("2"), Value::Null]
                },
                Event::Insert {
                    rel: rel.id,
                    new: vec![t("3"), t("grüA")]
                },
            ]
        );
        let positions = |r: &Record| r.events.iter().map(Event::positions).sum::<u64>();
        assert_eq!(positions(&back), 5);
        let raw = Record::decode_rows(&enc).unwrap();
        assert_eq!(raw, rec(3, data));
        assert_eq!(positions(&raw), 5);
        for (rows, bad) in [
            (0, &b""[..]),
            (2, &data[..]),
            (4, &data[..]),
            (3, &data[..data.len() - 1]),
            (1, &b"1\ta\tb\n"[..]),
            (1, &b"1\n"[..]),
            (1, &b"1\t\xff\n"[..]),
            (1, &b"1\t\\377\n"[..]),
            (1, &b"1\ta\\\n"[..]),
        ] {
            let enc = rec(rows, bad).encode();
            assert!(Record::decode(&enc).is_err(), "{rows} {bad:?}");
            assert!(Record::decode_rows(&enc).is_err(), "{rows} {bad:?}");
        }
        let orphan = Record {
            lsn: 0,
            events: vec![Event::Rows {
                rel: 1,
                rows: 1,
                data: b"1\ta\n".to_vec(),
            }],
        }
        .encode();
        assert_eq!(
            Record::decode_rows(&orphan),
            Err(CdcError::Malformed("copy rows before their relation"))
        );
        for n in 0..enc.len() {
            assert!(Record::decode_rows(&enc[..n]).is_err());
        }
    }

    #[test]
    fn record_round_trips() {
        let r = sample();
        let enc = r.encode();
        assert_eq!(Record::decode(&enc).unwrap(), r);
        assert!(r.ends_transaction());
        // Every strict prefix is an error, not a panic.
        for n in 0..enc.len() {
            assert!(Record::decode(&enc[..n]).is_err());
        }
    }

    #[test]
    fn column_numbers_round_trip_and_records_without_them_still_read() {
        let plain = sample();
        let plain_len = plain.encode().len();
        let mut numbered = sample();
        for ev in &mut numbered.events {
            if let Event::Relation(r) = ev {
                r.columns[0].attnum = 1;
                r.columns[1].attnum = 3;
            }
        }
        let bytes = numbered.encode();
        // Unnumbered relations keep the old encoding; numbered ones add 2 bytes a column.
        assert_eq!(bytes.len(), plain_len + 4);
        let back = Record::decode(&bytes).unwrap();
        assert_eq!(back, numbered);
        // Cut inside a column number: an error, not a panic.
        let tail = bytes.len() - 1;
        for cut in 1..tail {
            let _ = Record::decode(&bytes[..cut]);
        }
    }

    #[test]
    fn resync_events_round_trip() {
        let t = |s: &str| Value::Text(s.into());
        let rec = Record {
            lsn: 0,
            events: vec![
                Event::Snapshot {
                    rel: 7,
                    phase: SnapshotPhase::Resync,
                    value: 0,
                },
                Event::Chunk {
                    rel: 7,
                    lo: None,
                    hi: Some(vec![t("10"), t("b")]),
                    keys: vec![vec![t("1"), t("a")], vec![t("10"), t("b")]],
                },
                Event::Chunk {
                    rel: 7,
                    lo: Some(vec![t("10"), t("b")]),
                    hi: None,
                    keys: Vec::new(),
                },
            ],
        };
        let enc = rec.encode();
        assert_eq!(Record::decode(&enc).unwrap(), rec);
        for n in 0..enc.len() {
            assert!(Record::decode(&enc[..n]).is_err());
        }
        let j = event_json(3, &rec.events[1], &Relations::default());
        assert_eq!(j["event"], "resync_chunk");
        assert_eq!(j["through"], serde_json::json!(["10", "b"]));
        assert_eq!(j["keys"][0], serde_json::json!(["1", "a"]));
    }

    #[test]
    fn json_names_tables_and_columns() {
        let r = sample();
        let mut rels = Relations::default();
        let lines: Vec<_> = r
            .events
            .iter()
            .map(|e| {
                rels.observe(e);
                event_json(5, e, &rels)
            })
            .collect();
        assert_eq!(lines[2]["table"], "public.orders");
        assert_eq!(lines[2]["new"]["note"], "héllo");
        assert_eq!(lines[3]["new"]["note"]["unchanged_toast"], true);
        assert_eq!(lines[3]["old"], serde_json::json!({"id": "1"}));
        assert_eq!(lines[0]["commit_time"], "2000-01-01T00:00:00.000001Z");
        assert_eq!(lines[0]["seq"], 5);
    }

    #[test]
    fn times_parse_and_format() {
        let t = parse_time("2026-11-22T07:01:02.5Z").unwrap();
        assert_eq!(format_unix_micros(t), "2026-11-22T07:01:02.500000Z");
        assert_eq!(
            parse_time("2026-11-22 08:01:02+01:00").unwrap(),
            t - 500_000
        );
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_time("1970-01-01 00:00:01"), Some(1_000_000));
        assert_eq!(format_unix_micros(i64::MAX), "9999-12-31T23:59:59.999999Z");
        assert_eq!(format_unix_micros(-1), "1969-12-31T23:59:59.999999Z");
        for bad in [
            "",
            "2026-13-01T00:00:00Z",
            "2026-11-22T07:01:02x",
            "garbage-garbage-xx",
            "2026-02-30T00:00:00Z",
            "2026-11-22T07:01:02.Z",
        ] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
        assert_eq!(parse_lsn("16/B374D848"), Ok(0x16_B374_D848));
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
    }

    #[test]
    fn ship_messages_round_trip() {
        for m in [
            ShipMessage::Batch {
                first_seq: 3,
                records: vec![sample().encode(), vec![]],
            },
            ShipMessage::Ack { seq: 99 },
            ShipMessage::Error {
                message: "gap".into(),
            },
        ] {
            let enc = m.encode().unwrap();
            assert_eq!(ShipMessage::decode_body(&enc[4..]).unwrap(), m);
        }
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Record::decode(&bytes);
            let _ = ShipMessage::decode_body(&bytes);
        }

        #[test]
        fn corrupted_records_never_panic(pos in 0usize..4096, byte in any::<u8>()) {
            let mut enc = sample().encode();
            let i = pos % enc.len();
            enc[i] = byte;
            let _ = Record::decode(&enc);
        }

        #[test]
        fn times_round_trip(us in -62_135_596_800_000_000i64..253_402_300_800_000_000i64) {
            prop_assert_eq!(parse_time(&format_unix_micros(us)), Some(us));
        }
    }
}
