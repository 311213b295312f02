//! What the stream sinks (NATS, Kafka) put in a message about one change: the event in
//! `relay-outer cdc tail`'s shape, its `id` (the position) and its transaction's commit.

use std::io::Write as _;

use relay_proto::cdc::{
    event_json, format_lsn, format_pg_time, Event, OldRow, Relation, Relations, Value,
};

use super::Position;

/// A transaction's commit LSN and time, formatted once for all its changes.
#[derive(Debug, Clone, Default)]
pub struct Commit {
    /// `X/Y`.
    pub lsn: String,
    /// RFC 3339 with microseconds.
    pub time: String,
}

impl Commit {
    /// From a `Begin`'s commit LSN and time.
    pub fn new(lsn: u64, time: i64) -> Commit {
        Commit {
            lsn: format_lsn(lsn),
            time: format_pg_time(time),
        }
    }
}

/// Appends `s` JSON-escaped (without quotes); bytes of 0x80 and above as they are.
pub fn escape_into(out: &mut Vec<u8>, s: &[u8]) {
    let mut start = 0;
    for (i, &b) in s.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&s[start..i]);
        if esc.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.extend_from_slice(esc);
        }
        start = i + 1;
    }
    out.extend_from_slice(&s[start..]);
}

/// Appends `"s"` JSON-escaped.
pub fn json_str(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    escape_into(out, s);
    out.push(b'"');
}

fn write_values(out: &mut Vec<u8>, rel: &Relation, vals: &[Value], key_only: bool) {
    out.push(b'{');
    let mut first = true;
    for (i, v) in vals.iter().enumerate() {
        let col = rel.columns.get(i);
        if key_only && col.is_some_and(|c| !c.key) {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        match col {
            Some(c) => json_str(out, c.name.as_bytes()),
            None => {
                let _ = write!(out, "\"col{}\"", i + 1);
            }
        }
        out.push(b':');
        match v {
            Value::Text(s) => json_str(out, s.as_bytes()),
            Value::Unchanged if !key_only => out.extend_from_slice(b"{\"unchanged_toast\":true}"),
            _ => out.extend_from_slice(b"null"),
        }
    }
    out.push(b'}');
}

fn write_old(out: &mut Vec<u8>, rel: &Relation, old: &OldRow) {
    write_values(out, rel, &old.values, old.key_only);
}

/// Appends the change at `at` as one JSON object: the fields of [`change_json`] (row
/// changes written directly, with columns in table order; other events through
/// [`change_json`]).
pub fn write_change(
    out: &mut Vec<u8>,
    at: Position,
    ev: &Event,
    rels: &Relations,
    commit: Option<&Commit>,
) {
    let (rel, kind) = match ev {
        Event::Insert { rel, .. } | Event::Update { rel, .. } | Event::Delete { rel, .. } => {
            (rels.get(*rel), ev.kind())
        }
        _ => (None, ""),
    };
    let Some(rel) = rel else {
        let v = change_json(at, ev, rels, commit);
        serde_json::to_writer(out, &v).expect("JSON into a Vec");
        return;
    };
    let _ = write!(out, "{{\"id\":\"{at}\",\"event\":\"{kind}\",\"table\":\"");
    escape_into(out, rel.schema.as_bytes());
    out.push(b'.');
    escape_into(out, rel.name.as_bytes());
    out.push(b'"');
    if let Some(c) = commit {
        out.extend_from_slice(b",\"commit_lsn\":\"");
        out.extend_from_slice(c.lsn.as_bytes());
        out.extend_from_slice(b"\",\"commit_time\":\"");
        out.extend_from_slice(c.time.as_bytes());
        out.push(b'"');
    }
    let _ = write!(out, ",\"seq\":{}", at.seq);
    match ev {
        Event::Insert { new, .. } => {
            out.extend_from_slice(b",\"new\":");
            write_values(out, rel, new, false);
        }
        Event::Update { new, old, .. } => {
            out.extend_from_slice(b",\"new\":");
            write_values(out, rel, new, false);
            if let Some(o) = old {
                out.extend_from_slice(b",\"old\":");
                write_old(out, rel, o);
            }
        }
        Event::Delete { old, .. } => {
            out.extend_from_slice(b",\"old\":");
            write_old(out, rel, old);
        }
        _ => {}
    }
    out.push(b'}');
}

/// Appends the row's key columns as a JSON object (`{"id":"42"}`), from `vals` (the
/// Kafka sink's message key).
#[cfg_attr(not(feature = "kafka"), allow(dead_code))]
pub fn write_key(out: &mut Vec<u8>, rel: &Relation, vals: &[Value]) {
    write_values(out, rel, vals, true);
}

/// The change at `at` as a JSON object; `commit` is its transaction's commit LSN and
/// time when known.
pub fn change_json(
    at: Position,
    ev: &Event,
    rels: &Relations,
    commit: Option<&Commit>,
) -> serde_json::Value {
    let mut v = event_json(at.seq, ev, rels);
    v["id"] = at.to_string().into();
    if let Some(c) = commit {
        v["commit_lsn"] = c.lsn.clone().into();
        v["commit_time"] = c.time.clone().into();
    }
    v
}

/// The message about one table of a change that is about several (a TRUNCATE): the
/// change with `table` set to that table.
pub fn table_change(
    at: Position,
    ev: &Event,
    rels: &Relations,
    commit: Option<&Commit>,
    rel: &Relation,
) -> Vec<u8> {
    let mut v = change_json(at, ev, rels, commit);
    v["table"] = rel.qualified().into();
    serde_json::to_vec(&v).expect("JSON into a Vec")
}

/// The relations a change is about: one, or each table of a TRUNCATE; none for events
/// that are not changes.
pub fn tables_of(ev: &Event) -> Vec<u32> {
    match ev {
        Event::Insert { rel, .. }
        | Event::Update { rel, .. }
        | Event::Delete { rel, .. }
        | Event::Snapshot { rel, .. }
        | Event::Chunk { rel, .. } => vec![*rel],
        Event::Truncate { rels, .. } => rels.clone(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_proto::cdc::Column;

    #[test]
    fn written_changes_equal_the_tail_shape() {
        let col = |n: &str, key: bool| Column {
            name: n.into(),
            type_oid: 0,
            type_modifier: -1,
            type_name: "text".into(),
            key,
            attnum: 0,
        };
        let rel = Relation {
            id: 7,
            schema: "pub\"lic".into(),
            name: "t\n1".into(),
            replica_identity: b'd',
            columns: vec![col("id", true), col("b", false), col("a", false)],
        };
        let mut rels = Relations::default();
        rels.observe(&Event::Relation(rel.clone()));
        let t = |s: &str| Value::Text(s.into());
        let events = [
            Event::Insert {
                rel: 7,
                new: vec![t("1"), t("x\u{1}\"é"), Value::Null],
            },
            Event::Update {
                rel: 7,
                old: Some(OldRow {
                    key_only: true,
                    values: vec![t("0"), Value::Null, Value::Null],
                }),
                new: vec![t("1"), Value::Unchanged, t("z")],
            },
            Event::Update {
                rel: 7,
                old: None,
                new: vec![t("1"), t("b"), t("c")],
            },
            Event::Delete {
                rel: 7,
                old: OldRow {
                    key_only: false,
                    values: vec![t("1"), Value::Unchanged, Value::Null],
                },
            },
            Event::Truncate {
                rels: vec![7],
                cascade: true,
                restart_identity: false,
            },
        ];
        let commit = Commit::new(0x1_0000_0010, 812_345_678_901_234);
        assert_eq!(commit.lsn, "1/10");
        for ev in &events {
            let at = Position::new(42, 3);
            let mut out = Vec::new();
            write_change(&mut out, at, ev, &rels, Some(&commit));
            let got: serde_json::Value = serde_json::from_slice(&out).unwrap();
            let want = change_json(at, ev, &rels, Some(&commit));
            assert_eq!(got, want, "{}", String::from_utf8_lossy(&out));
        }
        let mut k = Vec::new();
        write_key(&mut k, &rel, &[t("9"), t("x"), t("y")]);
        assert_eq!(k, br#"{"id":"9"}"#);
    }
}
