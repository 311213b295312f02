//! What the stream sinks (NATS, Kafka) put in a message about one change: the event in
//! `relay-outer cdc tail`'s shape, its `id` (the position) and its transaction's commit.

use relay_proto::cdc::{event_json, format_lsn, format_pg_time, Event, Relations};

use super::Position;

/// The change at `at` as a JSON object; `commit` is its transaction's commit LSN and
/// time when known.
pub fn change_json(
    at: Position,
    ev: &Event,
    rels: &Relations,
    commit: Option<(u64, i64)>,
) -> serde_json::Value {
    let mut v = event_json(at.seq, ev, rels);
    v["id"] = at.to_string().into();
    if let Some((lsn, time)) = commit {
        v["commit_lsn"] = format_lsn(lsn).into();
        v["commit_time"] = format_pg_time(time).into();
    }
    v
}

/// The relations a change is about: one, or each table of a TRUNCATE; none for events
/// that are not changes.
pub fn tables_of(ev: &Event) -> Vec<u32> {
    match ev {
        Event::Insert { rel, .. }
        | Event::Update { rel, .. }
        | Event::Delete { rel, .. }
        | Event::Snapshot { rel, .. } => vec![*rel],
        Event::Truncate { rels, .. } => rels.clone(),
        _ => Vec::new(),
    }
}
