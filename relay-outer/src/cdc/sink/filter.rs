//! Per-sink filters: `tables: [schema.table, ...]` and `ops: [insert, update, delete,
//! truncate]`. Transactions stay whole: a filter drops changes, never a transaction's
//! begin or commit, so a sink still commits between source transactions.

use relay_proto::cdc::{Event, Relations};

/// Which changes a sink gets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// `schema.table` names; `None`: every table.
    pub tables: Option<Vec<String>>,
    /// Allowed ops in the order insert, update, delete, truncate; `None`: all.
    pub ops: Option<[bool; 4]>,
}

/// The op names `ops:` accepts.
pub const OPS: [&str; 4] = ["insert", "update", "delete", "truncate"];

impl Filter {
    /// Parses an `ops` list; the error names the unknown op.
    pub fn parse_ops(list: &[String]) -> Result<[bool; 4], String> {
        let mut out = [false; 4];
        for op in list {
            match OPS.iter().position(|o| o == op) {
                Some(i) => out[i] = true,
                None => {
                    return Err(format!(
                        "{op:?} is not an op (one of insert, update, delete, truncate)"
                    ))
                }
            }
        }
        Ok(out)
    }

    /// Whether anything is filtered at all.
    pub fn is_empty(&self) -> bool {
        self.tables.is_none() && self.ops.is_none()
    }

    /// Whether the sink gets the changes of table `rel`.
    pub fn passes(&self, rel: &relay_proto::cdc::Relation) -> bool {
        self.tables
            .as_ref()
            .is_none_or(|list| list.iter().any(|t| names(t, &rel.schema, &rel.name)))
    }

    fn table_ok(&self, rels: &Relations, rel: u32) -> bool {
        match &self.tables {
            None => true,
            // A relation not seen yet cannot be named: the sink reports it.
            Some(list) => rels
                .get(rel)
                .is_none_or(|r| list.iter().any(|t| names(t, &r.schema, &r.name))),
        }
    }

    fn op_ok(&self, op: usize) -> bool {
        self.ops.is_none_or(|o| o[op])
    }

    /// What of `ev` the sink gets: `None` drops it; a truncate keeps only the tables the
    /// filter passes.
    pub fn apply(&self, ev: Event, rels: &Relations) -> Option<Event> {
        if self.is_empty() {
            return Some(ev);
        }
        let keep = match &ev {
            Event::Relation(r) => self.table_ok(rels, r.id),
            Event::Insert { rel, .. } | Event::Rows { rel, .. } => {
                self.op_ok(0) && self.table_ok(rels, *rel)
            }
            Event::Update { rel, .. } => self.op_ok(1) && self.table_ok(rels, *rel),
            Event::Delete { rel, .. } => self.op_ok(2) && self.table_ok(rels, *rel),
            Event::Snapshot { rel, .. } => self.op_ok(0) && self.table_ok(rels, *rel),
            // A resync chunk's end deletes what the source no longer has.
            Event::Chunk { rel, .. } => self.op_ok(2) && self.table_ok(rels, *rel),
            Event::Truncate {
                rels: ids,
                cascade,
                restart_identity,
            } => {
                if !self.op_ok(3) {
                    return None;
                }
                let ids: Vec<u32> = ids
                    .iter()
                    .copied()
                    .filter(|id| self.table_ok(rels, *id))
                    .collect();
                if ids.is_empty() {
                    return None;
                }
                return Some(Event::Truncate {
                    rels: ids,
                    cascade: *cascade,
                    restart_identity: *restart_identity,
                });
            }
            Event::Begin { .. } | Event::Commit { .. } | Event::Message { .. } => true,
        };
        keep.then_some(ev)
    }
}

/// Whether `qualified` is `schema.name`.
fn names(qualified: &str, schema: &str, name: &str) -> bool {
    qualified.len() == schema.len() + 1 + name.len()
        && qualified.starts_with(schema)
        && qualified.ends_with(name)
        && qualified.as_bytes()[schema.len()] == b'.'
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_proto::cdc::{Column, Relation, Value};

    fn rel(id: u32, name: &str) -> Relation {
        Relation {
            id,
            schema: "public".into(),
            name: name.into(),
            replica_identity: b'd',
            columns: vec![Column {
                name: "id".into(),
                type_oid: 23,
                type_modifier: -1,
                type_name: "int4".into(),
                key: true,
                attnum: 0,
            }],
        }
    }

    #[test]
    fn tables_and_ops_filter_changes_not_transactions() {
        let mut rels = Relations::default();
        rels.observe(&Event::Relation(rel(1, "a")));
        rels.observe(&Event::Relation(rel(2, "b")));
        let f = Filter {
            tables: Some(vec!["public.a".into()]),
            ops: Some(Filter::parse_ops(&["insert".into(), "truncate".into()]).unwrap()),
        };
        let ins = |rel| Event::Insert {
            rel,
            new: vec![Value::Text("1".into())],
        };
        assert!(f.apply(ins(1), &rels).is_some());
        assert!(f.apply(ins(2), &rels).is_none());
        let del = Event::Delete {
            rel: 1,
            old: relay_proto::cdc::OldRow {
                key_only: true,
                values: vec![Value::Text("1".into())],
            },
        };
        assert!(f.apply(del, &rels).is_none());
        let begin = Event::Begin {
            xid: 1,
            commit_lsn: 1,
            commit_time: 0,
        };
        assert!(f.apply(begin, &rels).is_some());
        let t = Event::Truncate {
            rels: vec![1, 2],
            cascade: false,
            restart_identity: false,
        };
        match f.apply(t, &rels) {
            Some(Event::Truncate { rels, .. }) => assert_eq!(rels, vec![1]),
            other => panic!("{other:?}"),
        }
        assert!(f.apply(Event::Relation(rel(2, "b")), &rels).is_none());
        let e = Filter::parse_ops(&["upsert".into()]).unwrap_err();
        assert!(e.contains("upsert"), "{e}");
        assert!(Filter::default().apply(ins(2), &rels).is_some());
    }
}
