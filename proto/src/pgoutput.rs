//! A total decoder for PostgreSQL's logical replication protocol as written by `pgoutput`
//! (protocol versions 1 and 2; message layouts in the PostgreSQL docs, "Logical Replication
//! Message Formats").
//!
//! [`decode`] takes the payload of one XLogData message (after the `w` header) and returns
//! a [`Message`] or a [`DecodeError`] naming the field that was wrong; it never panics and
//! never allocates more than the remaining input could hold, whatever the bytes.
//!
//! Scope: the v2 *streaming* messages (Stream Start/Stop/Commit/Abort, used only when the
//! slot is started with `streaming 'on'`) are rejected with [`DecodeError::Streaming`]:
//! inside a streamed transaction every message carries an extra xid, which a stateless
//! decoder cannot tell apart from a plain one. The reader does not ask for streaming.
//!
//! Column values are kept as the raw bytes the server sent (text values are in the server
//! encoding), and an unchanged TOAST value stays [`Value::UnchangedToast`], never NULL.

pub use crate::lsn::Lsn;

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Start of a transaction (`B`).
    Begin(Begin),
    /// End of a transaction (`C`).
    Commit(Commit),
    /// The transaction came from another node (`O`).
    Origin(Origin),
    /// A table's schema, sent before its first change in a session and after it changes (`R`).
    Relation(Relation),
    /// A data type's name, sent before a relation using a non-built-in type (`Y`).
    Type(Type),
    /// A row was inserted (`I`).
    Insert(Insert),
    /// A row was updated (`U`).
    Update(Update),
    /// A row was deleted (`D`).
    Delete(Delete),
    /// One or more tables were truncated (`T`).
    Truncate(Truncate),
    /// A logical decoding message from `pg_logical_emit_message` (`M`).
    Message(LogicalMessage),
}

/// Begin: the transaction's final LSN, commit time and xid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the transaction's commit record.
    pub final_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01 00:00:00 UTC.
    pub commit_time: i64,
    /// Transaction id.
    pub xid: u32,
}

/// Commit: where the transaction ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// Flags (currently unused by PostgreSQL, always 0).
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// LSN just past the commit record: the position to confirm once this is durable.
    pub end_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01 00:00:00 UTC.
    pub commit_time: i64,
}

/// Origin: the replication origin the transaction came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// LSN of the commit on the origin server.
    pub lsn: Lsn,
    /// Origin name.
    pub name: String,
}

/// Which columns identify a row in old-tuple data (`REPLICA IDENTITY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// The primary key (`d`).
    Default,
    /// Nothing: updates and deletes carry no old row (`n`).
    Nothing,
    /// All columns (`f`).
    Full,
    /// The columns of a chosen unique index (`i`).
    Index,
}

/// A relation's schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Relation OID, referenced by the row messages.
    pub rel_id: u32,
    /// Schema name (empty for `pg_catalog`).
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// Replica identity setting.
    pub replica_identity: ReplicaIdentity,
    /// Published columns, in the order tuple data carries them.
    pub columns: Vec<Column>,
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Flags; bit 1 means the column is part of the key ([`Column::is_key`]).
    pub flags: u8,
    /// Column name.
    pub name: String,
    /// OID of the column's data type.
    pub type_oid: u32,
    /// Type modifier (`atttypmod`), -1 when none.
    pub type_modifier: i32,
}

impl Column {
    /// Whether the column is part of the replica identity key.
    pub fn is_key(&self) -> bool {
        self.flags & 1 != 0
    }
}

/// Type: the name of a data type used by a following relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Type {
    /// Type OID.
    pub type_oid: u32,
    /// Schema name (empty for `pg_catalog`).
    pub namespace: String,
    /// Type name.
    pub name: String,
}

/// A row's column values, in the relation's column order.
pub type TupleData = Vec<Value>;

/// One column value in a [`TupleData`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// SQL NULL (`n`).
    Null,
    /// An unchanged TOAST value that was not sent: keep the old one (`u`).
    UnchangedToast,
    /// The value in text format, in the server encoding (`t`).
    Text(Vec<u8>),
    /// The value in binary format (`b`, only with the `binary` option).
    Binary(Vec<u8>),
}

/// Insert: a new row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    /// OID of the relation.
    pub rel_id: u32,
    /// The new row.
    pub new: TupleData,
}

/// Update: a changed row, with the old key or row when the replica identity sends one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// OID of the relation.
    pub rel_id: u32,
    /// The old key columns (`K`), sent when the key changed.
    pub key: Option<TupleData>,
    /// The whole old row (`O`), sent with `REPLICA IDENTITY FULL`.
    pub old: Option<TupleData>,
    /// The new row.
    pub new: TupleData,
}

/// Which old data a [`Delete`] carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldKind {
    /// Only the key columns are set, the others are NULL (`K`).
    Key,
    /// The whole old row (`O`, `REPLICA IDENTITY FULL`).
    Old,
}

/// Delete: a removed row, identified by its key or whole old row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    /// OID of the relation.
    pub rel_id: u32,
    /// Whether [`Delete::key_or_old`] is the key or the whole old row.
    pub which: OldKind,
    /// The old key or old row.
    pub key_or_old: TupleData,
}

/// TRUNCATE options as sent by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TruncateOptions(pub u8);

impl TruncateOptions {
    /// `TRUNCATE ... CASCADE`.
    pub fn cascade(self) -> bool {
        self.0 & 1 != 0
    }

    /// `TRUNCATE ... RESTART IDENTITY`.
    pub fn restart_identity(self) -> bool {
        self.0 & 2 != 0
    }
}

/// Truncate: the listed relations were emptied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    /// CASCADE / RESTART IDENTITY.
    pub options: TruncateOptions,
    /// OIDs of the truncated relations.
    pub rel_ids: Vec<u32>,
}

/// A logical decoding message (`pg_logical_emit_message`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalMessage {
    /// Sent inside its transaction (true) or immediately (false).
    pub transactional: bool,
    /// LSN of the message.
    pub lsn: Lsn,
    /// Prefix given by the emitter, to tell applications apart.
    pub prefix: String,
    /// The message's content.
    pub content: Vec<u8>,
}

/// Why a payload is not a valid pgoutput message; every variant names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The payload was empty.
    #[error("empty pgoutput message")]
    Empty,
    /// The first byte is not a known message tag.
    #[error("unknown pgoutput message tag 0x{0:02x}")]
    UnknownTag(u8),
    /// A protocol v2 streaming message, which this decoder does not accept.
    #[error(
        "pgoutput streaming message {0:?} is not supported: start replication without the 'streaming' option"
    )]
    Streaming(char),
    /// The payload ended inside a field.
    #[error("truncated {field}: needs {need} bytes, {have} left")]
    Truncated {
        /// The field being read.
        field: &'static str,
        /// Bytes the field needs.
        need: usize,
        /// Bytes that were left.
        have: usize,
    },
    /// A string ran to the end of the payload without its NUL terminator.
    #[error("{field}: string has no NUL terminator")]
    Unterminated {
        /// The field being read.
        field: &'static str,
    },
    /// A string was not UTF-8.
    #[error("{field}: string is not UTF-8")]
    NotUtf8 {
        /// The field being read.
        field: &'static str,
    },
    /// A one-byte code had a value the protocol does not define.
    #[error("{field}: unexpected value 0x{value:02x}")]
    BadValue {
        /// The field being read.
        field: &'static str,
        /// The byte found.
        value: u8,
    },
    /// A length field was negative.
    #[error("{field}: negative length {len}")]
    NegativeLength {
        /// The field being read.
        field: &'static str,
        /// The length found.
        len: i32,
    },
    /// A count promised more items than the remaining bytes could hold.
    #[error("{field}: count {count} cannot fit in the {remaining} bytes left")]
    CountTooLarge {
        /// The field being read.
        field: &'static str,
        /// The count found.
        count: u64,
        /// Bytes that were left.
        remaining: usize,
    },
    /// Bytes were left over after the message.
    #[error("{count} trailing bytes after {message} message")]
    TrailingBytes {
        /// The message that was decoded.
        message: &'static str,
        /// How many bytes were left.
        count: usize,
    },
}

/// Decodes one pgoutput message: the payload of one XLogData message.
pub fn decode(buf: &[u8]) -> Result<Message, DecodeError> {
    let (&tag, rest) = buf.split_first().ok_or(DecodeError::Empty)?;
    let mut r = Reader { buf: rest };
    let (msg, name) = match tag {
        b'B' => (Message::Begin(begin(&mut r)?), "Begin"),
        b'C' => (Message::Commit(commit(&mut r)?), "Commit"),
        b'O' => (Message::Origin(origin(&mut r)?), "Origin"),
        b'R' => (Message::Relation(relation(&mut r)?), "Relation"),
        b'Y' => (Message::Type(type_msg(&mut r)?), "Type"),
        b'I' => (Message::Insert(insert(&mut r)?), "Insert"),
        b'U' => (Message::Update(update(&mut r)?), "Update"),
        b'D' => (Message::Delete(delete(&mut r)?), "Delete"),
        b'T' => (Message::Truncate(truncate(&mut r)?), "Truncate"),
        b'M' => (Message::Message(logical_message(&mut r)?), "Message"),
        b'S' | b'E' | b'c' | b'A' => return Err(DecodeError::Streaming(char::from(tag))),
        other => return Err(DecodeError::UnknownTag(other)),
    };
    if !r.buf.is_empty() {
        return Err(DecodeError::TrailingBytes {
            message: name,
            count: r.buf.len(),
        });
    }
    Ok(msg)
}

fn begin(r: &mut Reader<'_>) -> Result<Begin, DecodeError> {
    Ok(Begin {
        final_lsn: r.lsn("Begin.final_lsn")?,
        commit_time: r.i64("Begin.commit_time")?,
        xid: r.u32("Begin.xid")?,
    })
}

fn commit(r: &mut Reader<'_>) -> Result<Commit, DecodeError> {
    Ok(Commit {
        flags: r.u8("Commit.flags")?,
        commit_lsn: r.lsn("Commit.commit_lsn")?,
        end_lsn: r.lsn("Commit.end_lsn")?,
        commit_time: r.i64("Commit.commit_time")?,
    })
}

fn origin(r: &mut Reader<'_>) -> Result<Origin, DecodeError> {
    Ok(Origin {
        lsn: r.lsn("Origin.lsn")?,
        name: r.string("Origin.name")?,
    })
}

/// Smallest encoding of one relation column: flags, empty name + NUL, type OID, typmod.
const MIN_COLUMN_BYTES: usize = 1 + 1 + 4 + 4;

fn relation(r: &mut Reader<'_>) -> Result<Relation, DecodeError> {
    let rel_id = r.u32("Relation.rel_id")?;
    let namespace = r.string("Relation.namespace")?;
    let name = r.string("Relation.name")?;
    let replica_identity = match r.u8("Relation.replica_identity")? {
        b'd' => ReplicaIdentity::Default,
        b'n' => ReplicaIdentity::Nothing,
        b'f' => ReplicaIdentity::Full,
        b'i' => ReplicaIdentity::Index,
        value => {
            return Err(DecodeError::BadValue {
                field: "Relation.replica_identity",
                value,
            })
        }
    };
    let count = r.u16("Relation.column_count")?;
    let mut columns = r.vec_for(
        usize::from(count),
        MIN_COLUMN_BYTES,
        "Relation.column_count",
    )?;
    for _ in 0..count {
        columns.push(Column {
            flags: r.u8("Relation.column.flags")?,
            name: r.string("Relation.column.name")?,
            type_oid: r.u32("Relation.column.type_oid")?,
            type_modifier: r.i32("Relation.column.type_modifier")?,
        });
    }
    Ok(Relation {
        rel_id,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

fn type_msg(r: &mut Reader<'_>) -> Result<Type, DecodeError> {
    Ok(Type {
        type_oid: r.u32("Type.type_oid")?,
        namespace: r.string("Type.namespace")?,
        name: r.string("Type.name")?,
    })
}

fn insert(r: &mut Reader<'_>) -> Result<Insert, DecodeError> {
    let rel_id = r.u32("Insert.rel_id")?;
    r.expect(b'N', "Insert.new_marker")?;
    Ok(Insert {
        rel_id,
        new: r.tuple("Insert.new")?,
    })
}

fn update(r: &mut Reader<'_>) -> Result<Update, DecodeError> {
    let rel_id = r.u32("Update.rel_id")?;
    let (mut key, mut old) = (None, None);
    match r.u8("Update.marker")? {
        b'K' => {
            key = Some(r.tuple("Update.key")?);
            r.expect(b'N', "Update.new_marker")?;
        }
        b'O' => {
            old = Some(r.tuple("Update.old")?);
            r.expect(b'N', "Update.new_marker")?;
        }
        b'N' => {}
        value => {
            return Err(DecodeError::BadValue {
                field: "Update.marker",
                value,
            })
        }
    }
    Ok(Update {
        rel_id,
        key,
        old,
        new: r.tuple("Update.new")?,
    })
}

fn delete(r: &mut Reader<'_>) -> Result<Delete, DecodeError> {
    let rel_id = r.u32("Delete.rel_id")?;
    let which = match r.u8("Delete.marker")? {
        b'K' => OldKind::Key,
        b'O' => OldKind::Old,
        value => {
            return Err(DecodeError::BadValue {
                field: "Delete.marker",
                value,
            })
        }
    };
    Ok(Delete {
        rel_id,
        which,
        key_or_old: r.tuple("Delete.key_or_old")?,
    })
}

fn truncate(r: &mut Reader<'_>) -> Result<Truncate, DecodeError> {
    let count = r.u32("Truncate.relation_count")?;
    let options = TruncateOptions(r.u8("Truncate.options")?);
    let count = usize::try_from(count).unwrap_or(usize::MAX);
    let mut rel_ids = r.vec_for(count, 4, "Truncate.relation_count")?;
    for _ in 0..count {
        rel_ids.push(r.u32("Truncate.rel_id")?);
    }
    Ok(Truncate { options, rel_ids })
}

fn logical_message(r: &mut Reader<'_>) -> Result<LogicalMessage, DecodeError> {
    let transactional = match r.u8("Message.flags")? {
        0 => false,
        1 => true,
        value => {
            return Err(DecodeError::BadValue {
                field: "Message.flags",
                value,
            })
        }
    };
    let lsn = r.lsn("Message.lsn")?;
    let prefix = r.string("Message.prefix")?;
    let content = r.sized_bytes("Message.content")?.to_vec();
    Ok(LogicalMessage {
        transactional,
        lsn,
        prefix,
        content,
    })
}

/// A cursor over the payload; every read names its field for the error.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated {
                field,
                need: n,
                have: self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array(field)?))
    }

    fn i64(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array(field)?))
    }

    fn lsn(&mut self, field: &'static str) -> Result<Lsn, DecodeError> {
        Ok(Lsn(u64::from_be_bytes(self.array(field)?)))
    }

    fn expect(&mut self, want: u8, field: &'static str) -> Result<(), DecodeError> {
        match self.u8(field)? {
            v if v == want => Ok(()),
            value => Err(DecodeError::BadValue { field, value }),
        }
    }

    /// A NUL-terminated UTF-8 string.
    fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::Unterminated { field })?;
        let bytes = self.take(end + 1, field)?;
        let s = std::str::from_utf8(&bytes[..end]).map_err(|_| DecodeError::NotUtf8 { field })?;
        Ok(s.to_string())
    }

    /// An Int32 length followed by that many bytes.
    fn sized_bytes(&mut self, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = self.i32(field)?;
        let len = usize::try_from(len).map_err(|_| DecodeError::NegativeLength { field, len })?;
        self.take(len, field)
    }

    /// An empty Vec for `count` items of at least `min_bytes` each, refusing counts the
    /// remaining input cannot hold (so a forged count never causes a huge allocation).
    fn vec_for<T>(
        &self,
        count: usize,
        min_bytes: usize,
        field: &'static str,
    ) -> Result<Vec<T>, DecodeError> {
        if count.saturating_mul(min_bytes) > self.buf.len() {
            return Err(DecodeError::CountTooLarge {
                field,
                count: count as u64,
                remaining: self.buf.len(),
            });
        }
        Ok(Vec::with_capacity(count))
    }

    /// TupleData: Int16 column count, then per column a kind byte and maybe a value.
    fn tuple(&mut self, field: &'static str) -> Result<TupleData, DecodeError> {
        let count = self.u16(field)?;
        let mut values = self.vec_for(usize::from(count), 1, field)?;
        for _ in 0..count {
            values.push(match self.u8(field)? {
                b'n' => Value::Null,
                b'u' => Value::UnchangedToast,
                b't' => Value::Text(self.sized_bytes(field)?.to_vec()),
                b'b' => Value::Binary(self.sized_bytes(field)?.to_vec()),
                value => return Err(DecodeError::BadValue { field, value }),
            });
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A small pgoutput encoder, the mirror of the decoder, to build samples.
    fn encode(msg: &Message) -> Vec<u8> {
        let mut b = Vec::new();
        fn s(b: &mut Vec<u8>, v: &str) {
            b.extend_from_slice(v.as_bytes());
            b.push(0);
        }
        fn tuple(b: &mut Vec<u8>, t: &TupleData) {
            b.extend_from_slice(&(t.len() as u16).to_be_bytes());
            for v in t {
                match v {
                    Value::Null => b.push(b'n'),
                    Value::UnchangedToast => b.push(b'u'),
                    Value::Text(x) | Value::Binary(x) => {
                        b.push(if matches!(v, Value::Text(_)) {
                            b't'
                        } else {
                            b'b'
                        });
                        b.extend_from_slice(&(x.len() as i32).to_be_bytes());
                        b.extend_from_slice(x);
                    }
                }
            }
        }
        match msg {
            Message::Begin(m) => {
                b.push(b'B');
                b.extend_from_slice(&m.final_lsn.0.to_be_bytes());
                b.extend_from_slice(&m.commit_time.to_be_bytes());
                b.extend_from_slice(&m.xid.to_be_bytes());
            }
            Message::Commit(m) => {
                b.push(b'C');
                b.push(m.flags);
                b.extend_from_slice(&m.commit_lsn.0.to_be_bytes());
                b.extend_from_slice(&m.end_lsn.0.to_be_bytes());
                b.extend_from_slice(&m.commit_time.to_be_bytes());
            }
            Message::Origin(m) => {
                b.push(b'O');
                b.extend_from_slice(&m.lsn.0.to_be_bytes());
                s(&mut b, &m.name);
            }
            Message::Relation(m) => {
                b.push(b'R');
                b.extend_from_slice(&m.rel_id.to_be_bytes());
                s(&mut b, &m.namespace);
                s(&mut b, &m.name);
                b.push(match m.replica_identity {
                    ReplicaIdentity::Default => b'd',
                    ReplicaIdentity::Nothing => b'n',
                    ReplicaIdentity::Full => b'f',
                    ReplicaIdentity::Index => b'i',
                });
                b.extend_from_slice(&(m.columns.len() as u16).to_be_bytes());
                for c in &m.columns {
                    b.push(c.flags);
                    s(&mut b, &c.name);
                    b.extend_from_slice(&c.type_oid.to_be_bytes());
                    b.extend_from_slice(&c.type_modifier.to_be_bytes());
                }
            }
            Message::Type(m) => {
                b.push(b'Y');
                b.extend_from_slice(&m.type_oid.to_be_bytes());
                s(&mut b, &m.namespace);
                s(&mut b, &m.name);
            }
            Message::Insert(m) => {
                b.push(b'I');
                b.extend_from_slice(&m.rel_id.to_be_bytes());
                b.push(b'N');
                tuple(&mut b, &m.new);
            }
            Message::Update(m) => {
                b.push(b'U');
                b.extend_from_slice(&m.rel_id.to_be_bytes());
                if let Some(k) = &m.key {
                    b.push(b'K');
                    tuple(&mut b, k);
                }
                if let Some(o) = &m.old {
                    b.push(b'O');
                    tuple(&mut b, o);
                }
                b.push(b'N');
                tuple(&mut b, &m.new);
            }
            Message::Delete(m) => {
                b.push(b'D');
                b.extend_from_slice(&m.rel_id.to_be_bytes());
                b.push(match m.which {
                    OldKind::Key => b'K',
                    OldKind::Old => b'O',
                });
                tuple(&mut b, &m.key_or_old);
            }
            Message::Truncate(m) => {
                b.push(b'T');
                b.extend_from_slice(&(m.rel_ids.len() as u32).to_be_bytes());
                b.push(m.options.0);
                for r in &m.rel_ids {
                    b.extend_from_slice(&r.to_be_bytes());
                }
            }
            Message::Message(m) => {
                b.push(b'M');
                b.push(u8::from(m.transactional));
                b.extend_from_slice(&m.lsn.0.to_be_bytes());
                s(&mut b, &m.prefix);
                b.extend_from_slice(&(m.content.len() as i32).to_be_bytes());
                b.extend_from_slice(&m.content);
            }
        }
        b
    }

    fn text(s: &str) -> Value {
        Value::Text(s.as_bytes().to_vec())
    }

    fn samples() -> Vec<Message> {
        vec![
            Message::Begin(Begin {
                final_lsn: Lsn(0x16_B374_D848),
                commit_time: 757_000_000_123_456,
                xid: 4_000_000_000,
            }),
            Message::Commit(Commit {
                flags: 0,
                commit_lsn: Lsn(0x16_B374_D848),
                end_lsn: Lsn(0x16_B374_D878),
                commit_time: -5,
            }),
            Message::Origin(Origin {
                lsn: Lsn(7),
                name: "pg_16395".into(),
            }),
            Message::Relation(Relation {
                rel_id: 16_384,
                namespace: "public".into(),
                name: "Bestellungen_ü".into(),
                replica_identity: ReplicaIdentity::Default,
                columns: vec![
                    Column {
                        flags: 1,
                        name: "id".into(),
                        type_oid: 23,
                        type_modifier: -1,
                    },
                    Column {
                        flags: 0,
                        name: "amount".into(),
                        type_oid: 1700,
                        type_modifier: 655_366,
                    },
                ],
            }),
            Message::Relation(Relation {
                rel_id: 1,
                namespace: String::new(),
                name: "t".into(),
                replica_identity: ReplicaIdentity::Full,
                columns: vec![],
            }),
            Message::Type(Type {
                type_oid: 16_500,
                namespace: "public".into(),
                name: "mood".into(),
            }),
            Message::Insert(Insert {
                rel_id: 16_384,
                new: vec![
                    text("1"),
                    Value::Null,
                    Value::Binary(vec![0, 1, 2]),
                    text(""),
                ],
            }),
            Message::Update(Update {
                rel_id: 16_384,
                key: None,
                old: None,
                new: vec![text("1"), Value::UnchangedToast],
            }),
            Message::Update(Update {
                rel_id: 16_384,
                key: Some(vec![text("1"), Value::Null]),
                old: None,
                new: vec![text("2"), text("x")],
            }),
            Message::Update(Update {
                rel_id: 16_384,
                key: None,
                old: Some(vec![text("1"), text("a")]),
                new: vec![text("1"), text("b")],
            }),
            Message::Delete(Delete {
                rel_id: 16_384,
                which: OldKind::Key,
                key_or_old: vec![text("1"), Value::Null],
            }),
            Message::Delete(Delete {
                rel_id: 16_384,
                which: OldKind::Old,
                key_or_old: vec![text("1"), text("a")],
            }),
            Message::Truncate(Truncate {
                options: TruncateOptions(3),
                rel_ids: vec![16_384, 16_390],
            }),
            Message::Message(LogicalMessage {
                transactional: true,
                lsn: Lsn(0x1_0000_0000),
                prefix: "routy".into(),
                content: b"hello\0world".to_vec(),
            }),
            Message::Message(LogicalMessage {
                transactional: false,
                lsn: Lsn(1),
                prefix: String::new(),
                content: vec![],
            }),
        ]
    }

    #[test]
    fn every_message_kind_round_trips() {
        for m in samples() {
            assert_eq!(decode(&encode(&m)), Ok(m.clone()), "{m:?}");
        }
    }

    #[test]
    fn known_bytes_decode_to_expected_values() {
        // Hand-written, not from the encoder: Begin and an Insert of (42, NULL, 'é', toast).
        let mut begin = vec![b'B'];
        begin.extend_from_slice(&[0, 0, 0, 0x16, 0xB3, 0x74, 0xD8, 0x48]);
        begin.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 10]);
        begin.extend_from_slice(&[0, 0, 2, 0]);
        assert_eq!(
            decode(&begin),
            Ok(Message::Begin(Begin {
                final_lsn: "16/B374D848".parse().unwrap(),
                commit_time: 10,
                xid: 512,
            }))
        );
        let insert = [
            b'I', 0, 0, 0x40, 0, b'N', 0, 4, b't', 0, 0, 0, 2, b'4', b'2', b'n', b't', 0, 0, 0, 2,
            0xC3, 0xA9, b'u',
        ];
        assert_eq!(
            decode(&insert),
            Ok(Message::Insert(Insert {
                rel_id: 0x4000,
                new: vec![text("42"), Value::Null, text("é"), Value::UnchangedToast],
            }))
        );
    }

    #[test]
    fn truncation_at_every_byte_is_an_error() {
        for m in samples() {
            let bytes = encode(&m);
            for cut in 0..bytes.len() {
                assert!(decode(&bytes[..cut]).is_err(), "{m:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn malformed_inputs_name_the_problem() {
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
        assert_eq!(decode(b"Z"), Err(DecodeError::UnknownTag(b'Z')));
        for tag in [b'S', b'E', b'c', b'A'] {
            assert_eq!(decode(&[tag]), Err(DecodeError::Streaming(char::from(tag))));
        }
        // Origin name without its NUL.
        let mut b = vec![b'O'];
        b.extend_from_slice(&[0; 8]);
        b.extend_from_slice(b"abc");
        assert_eq!(
            decode(&b),
            Err(DecodeError::Unterminated {
                field: "Origin.name"
            })
        );
        // Origin name that is not UTF-8.
        let mut b = vec![b'O'];
        b.extend_from_slice(&[0; 8]);
        b.extend_from_slice(&[0xFF, 0xFE, 0]);
        assert_eq!(
            decode(&b),
            Err(DecodeError::NotUtf8 {
                field: "Origin.name"
            })
        );
        // Trailing bytes.
        let mut b = encode(&samples()[0]);
        b.push(0);
        assert_eq!(
            decode(&b),
            Err(DecodeError::TrailingBytes {
                message: "Begin",
                count: 1
            })
        );
        // A huge relation count with nothing behind it: refused before allocating.
        let mut b = vec![b'T'];
        b.extend_from_slice(&u32::MAX.to_be_bytes());
        b.push(0);
        assert!(matches!(
            decode(&b),
            Err(DecodeError::CountTooLarge {
                field: "Truncate.relation_count",
                ..
            })
        ));
        // A column count larger than the rest of the tuple.
        let b = [b'I', 0, 0, 0, 1, b'N', 0xFF, 0xFF, b'n'];
        assert!(matches!(
            decode(&b),
            Err(DecodeError::CountTooLarge {
                field: "Insert.new",
                ..
            })
        ));
        // A negative text length.
        let b = [b'I', 0, 0, 0, 1, b'N', 0, 1, b't', 0xFF, 0xFF, 0xFF, 0xFF];
        assert_eq!(
            decode(&b),
            Err(DecodeError::NegativeLength {
                field: "Insert.new",
                len: -1
            })
        );
        // Unknown column kind, replica identity, delete marker.
        let b = [b'I', 0, 0, 0, 1, b'N', 0, 1, b'x'];
        assert_eq!(
            decode(&b),
            Err(DecodeError::BadValue {
                field: "Insert.new",
                value: b'x'
            })
        );
        let b = [b'R', 0, 0, 0, 1, 0, b't', 0, b'q', 0, 0];
        assert_eq!(
            decode(&b),
            Err(DecodeError::BadValue {
                field: "Relation.replica_identity",
                value: b'q'
            })
        );
        let b = [b'D', 0, 0, 0, 1, b'N', 0, 0];
        assert_eq!(
            decode(&b),
            Err(DecodeError::BadValue {
                field: "Delete.marker",
                value: b'N'
            })
        );
        // Errors read as sentences naming the field.
        let e = decode(&[b'B', 0, 0]).unwrap_err().to_string();
        assert!(e.contains("Begin.final_lsn"), "{e}");
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn random_bytes_after_a_valid_tag_never_panic(
            tag in proptest::sample::select(b"BCORYIUDTMSEcA".to_vec()),
            rest in proptest::collection::vec(any::<u8>(), 0..128),
        ) {
            let mut b = vec![tag];
            b.extend_from_slice(&rest);
            let _ = decode(&b);
        }

        #[test]
        fn mutated_valid_messages_never_panic(
            which in 0usize..15,
            edits in proptest::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 1..6),
        ) {
            let all = samples();
            let mut b = encode(&all[which % all.len()]);
            for (pos, byte, op) in edits {
                let pos = if b.is_empty() { 0 } else { pos % (b.len() + 1) };
                match op {
                    0 if pos < b.len() => b[pos] = byte,
                    1 => b.insert(pos, byte),
                    _ if pos < b.len() => { b.remove(pos); }
                    _ => {}
                }
            }
            let _ = decode(&b);
        }

        #[test]
        fn lsn_text_round_trips(v in any::<u64>()) {
            prop_assert_eq!(Lsn(v).to_string().parse::<Lsn>(), Ok(Lsn(v)));
        }
    }
}
