//! Schema changes on a ClickHouse target. The sink renames non-key columns
//! (`RENAME COLUMN`), widens non-key columns (`MODIFY COLUMN`), adds columns (when it next
//! checks the table) and keeps columns the source dropped (they are Nullable: new rows
//! leave them NULL). It cannot change a table's sorting key: a changed key, a renamed or
//! retyped key column, and a narrowing stop the sink until an operator has fixed the
//! table (for a new key: recreated it with the new `ORDER BY`) and runs
//! `relay-outer cdc resume`.

use relay_proto::cdc::Value;

use super::types::{ident, literal, map_type, write_value};
use super::{target_name, ClickHouseSink, DELETED_COL, VERSION_COL};
use crate::cdc::sink::schema::{Change, SchemaChange};
use crate::cdc::sink::{Flow, SinkError};

impl ClickHouseSink {
    /// Applies (or refuses) one change of a table's definition.
    pub(super) async fn schema_change(&mut self, seq: u64, ch: &SchemaChange) -> Result<(), Flow> {
        self.seq = seq;
        // Rows read with the old definition go first.
        self.flush_all().await?;
        self.drain().await?;
        let name = target_name(&ch.schema, &ch.name);
        let table = format!("{}.{}", self.db(), ident(&name));
        self.known.remove(&name);
        let have = self.columns(&name).await?;
        if have.is_empty() {
            return Ok(());
        }
        let sink = self.cfg.name.clone();
        let db = self.cfg.database.clone();
        let refuse = |why: String| -> Flow {
            let mut e = SinkError::new(
                "schema",
                seq,
                format!(
                    "{ch}: {why}. The sink stops here: fix the ClickHouse table {db}.{name}, then \
                     run `relay-outer cdc resume --sink {sink}`"
                ),
            );
            e.rejected = true;
            e.into()
        };
        let sql = match &ch.kind {
            Change::Add(_) => return Ok(()),
            Change::Drop(c) => {
                tracing::warn!(sink = %sink, table = %ch.table, column = %c,
                    "the source dropped column {c}: the ClickHouse table keeps it, and rows written from now on leave it NULL");
                return Ok(());
            }
            Change::Rename { from, to } => match (have.contains_key(from), have.contains_key(to)) {
                (false, _) => return Ok(()),
                (true, true) => {
                    return Err(refuse(format!(
                        "the table has both {from} and {to}; drop or rename one"
                    )))
                }
                (true, false) if !self.cfg.create_tables => {
                    return Err(refuse(format!(
                        "the table still has column {from} and create_tables is off"
                    )))
                }
                (true, false) => format!(
                    "ALTER TABLE {table} RENAME COLUMN {} TO {}",
                    ident(from),
                    ident(to)
                ),
            },
            Change::Type { from, to, widening } => {
                let Some(target) = have.get(&to.name) else {
                    return Ok(());
                };
                let mapped = map_type(&to.type_name);
                if *target == mapped.ddl(true) || *target == mapped.ddl(false) || ch.accepted {
                    return Ok(());
                }
                if !widening {
                    return Err(refuse(format!(
                        "a narrowing or a change of kind: the table's column is {target}; change \
                         it yourself (or keep it) and resume"
                    )));
                }
                if to.key || from.key {
                    return Err(refuse(format!(
                        "{} is part of the sorting key, whose type ClickHouse does not change",
                        to.name
                    )));
                }
                if !self.cfg.create_tables {
                    return Err(refuse(format!(
                        "the table's column is {target} and create_tables is off"
                    )));
                }
                let want = mapped.ddl(false);
                format!(
                    "ALTER TABLE {table} MODIFY COLUMN {} {want}",
                    ident(&to.name)
                )
            }
            Change::Key { .. } if ch.accepted => return Ok(()),
            Change::Key { to, .. } => {
                return Err(refuse(format!(
                    "ClickHouse cannot change a table's sorting key: recreate the table with \
                     ORDER BY ({}) and its rows (or drop it and copy the source table again)",
                    to.join(", ")
                )))
            }
        };
        tracing::info!(sink = %sink, seq, "{ch}: {sql}");
        if let Err(e) = self.query(&sql).await {
            let mut e = SinkError {
                msg: format!(
                    "{ch}: {sql}: {}. The sink stops here: fix the ClickHouse table, then run \
                     `relay-outer cdc resume --sink {sink}`",
                    e.msg
                ),
                ..e
            };
            // A refusal by ClickHouse; a lost connection is retried as usual.
            e.rejected = e.rejected || e.code.is_some();
            return Err(e.into());
        }
        // The plan is made again from the new relation.
        self.known.remove(&name);
        Ok(())
    }
}

impl ClickHouseSink {
    /// A resync's chunk end: for the keys in `(lo, hi]` the target has and the source no
    /// longer has, a deleted version at `version` (one `INSERT … SELECT` in ClickHouse;
    /// keys compare in the columns' own types, String byte-wise as relay-inner ordered
    /// them).
    pub(super) async fn chunk_end(
        &mut self,
        t: usize,
        version: u64,
        lo: Option<Vec<Value>>,
        hi: Option<Vec<Value>>,
        keys: Vec<Vec<Value>>,
    ) -> Result<(), Flow> {
        // The chunk's rows go first.
        self.dispatch(t).await?;
        self.drain().await?;
        let table = self.tables[t].clone();
        if table.keys.is_empty() {
            return Ok(());
        }
        let full = table.rel.replica_identity == b'f';
        let structure: Vec<String> = table
            .keys
            .iter()
            .map(|&i| format!("{} {}", table.cols[i].sql, table.cols[i].ty.ddl(!full)))
            .collect();
        let structure = literal(&structure.join(", "));
        let seq = self.seq;
        let rows = |vals: &[Vec<Value>]| -> Result<String, SinkError> {
            let mut data = Vec::new();
            for k in vals {
                data.push(b'{');
                for (n, &i) in table.keys.iter().enumerate() {
                    if n > 0 {
                        data.push(b',');
                    }
                    data.extend_from_slice(&table.cols[i].prefix);
                    let text = match k.get(n) {
                        Some(Value::Text(s)) => Some(s.as_str()),
                        _ => None,
                    };
                    write_value(&mut data, &table.cols[i].ty, text).map_err(|e| {
                        SinkError::new(
                            "data",
                            seq,
                            format!("a resync key of {}: {e}", table.target),
                        )
                    })?;
                }
                data.extend_from_slice(b"}\n");
            }
            Ok(literal(&String::from_utf8_lossy(&data)))
        };
        let key_list: Vec<&str> = table
            .keys
            .iter()
            .map(|&i| table.cols[i].sql.as_str())
            .collect();
        let keys_sql = key_list.join(", ");
        let mut conds = Vec::new();
        for (bound, op) in [(&lo, ">"), (&hi, "<=")] {
            if let Some(b) = bound {
                conds.push(format!(
                    "({keys_sql}) {op} (SELECT {keys_sql} FROM format(JSONEachRow, {structure}, {}))",
                    rows(std::slice::from_ref(b))?
                ));
            }
        }
        if !keys.is_empty() {
            conds.push(format!(
                "({keys_sql}) NOT IN (SELECT {keys_sql} FROM format(JSONEachRow, {structure}, {}))",
                rows(&keys)?
            ));
        }
        let sql = format!(
            "INSERT INTO {} ({keys_sql}, {VERSION_COL}, {DELETED_COL}) SELECT {keys_sql}, {version}, 1 \
             FROM {} FINAL{}",
            table.target,
            table.target,
            if conds.is_empty() {
                String::new()
            } else {
                format!(" WHERE {}", conds.join(" AND "))
            }
        );
        self.query(&sql).await?;
        Ok(())
    }
}
