//! Schema changes on the target, inside the open target transaction (PostgreSQL's DDL is
//! transactional: a change commits with the rows that follow it and the position, or
//! not at all).
//!
//! With `create_tables` the sink keeps the target's definition in step: it renames
//! columns, widens types (`ALTER COLUMN … TYPE`), adds columns (when it next checks the
//! table) and moves the primary key to the new key. It never drops a column (the source
//! dropped it: the target keeps it, nullable, and new rows leave it NULL) and never
//! narrows a type. Without `create_tables` it changes nothing: a change the target does
//! not already match stops the sink with an error naming the table and the change.
//! Either way, what it will not do stops the sink until an operator has fixed the target
//! and runs `relay-outer cdc resume`; a narrowing the operator accepted is then left as
//! the target has it.

use super::Conn;
use crate::cdc::sink::pg::table::{quote_ident, safe_type_name};
use crate::cdc::sink::schema::{self, Change, SchemaChange};
use crate::cdc::sink::{Flow, SinkError};

/// The target's primary key columns, in key order (empty: none).
const PK_SQL: &str = "\
SELECT a.attname::text, con.conname::text FROM pg_constraint con \
JOIN pg_class c ON c.oid = con.conrelid \
JOIN pg_namespace n ON n.oid = c.relnamespace \
JOIN LATERAL unnest(con.conkey) WITH ORDINALITY k(attnum, ord) ON true \
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum \
WHERE n.nspname::text = $1 AND c.relname::text = $2 AND con.contype = 'p' \
ORDER BY k.ord";

/// Whether a unique index of the target covers exactly these columns (ON CONFLICT needs
/// one).
pub(super) const UNIQUE_SQL: &str = "\
SELECT EXISTS (SELECT 1 FROM pg_index i \
JOIN pg_class c ON c.oid = i.indrelid \
JOIN pg_namespace n ON n.oid = c.relnamespace \
WHERE n.nspname::text = $1 AND c.relname::text = $2 AND i.indisunique AND i.indpred IS NULL \
AND (SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_attribute a \
     WHERE a.attrelid = c.oid AND a.attnum = ANY(i.indkey)) = \
    (SELECT array_agg(x ORDER BY x) FROM unnest($3::text[]) x))";

impl Conn {
    /// Applies (or refuses) one change of a table's definition; see the module docs.
    pub(crate) async fn schema(&mut self, seq: u64, ch: &SchemaChange) -> Result<(), Flow> {
        self.seq = seq;
        self.flush().await?;
        self.drain().await?;
        let schema = self.cfg.schema.clone().unwrap_or_else(|| ch.schema.clone());
        let name = ch.name.clone();
        let ident = format!("{}.{}", quote_ident(&schema), quote_ident(&name));
        let cols = self.target_columns(&schema, &name).await?;
        if cols.is_empty() {
            // No target table yet: it is created from the new definition.
            return Ok(());
        }
        let manage = self.cfg.create_tables;
        let sink = self.cfg.name.clone();
        let refuse = |why: String| -> Flow {
            let mut e = SinkError::new(
                "schema",
                seq,
                format!(
                    "{ch}: {why}. The sink stops here: fix the target table {schema}.{name}, \
                     then run `relay-outer cdc resume --sink {sink}`"
                ),
            );
            e.rejected = true;
            e.into()
        };
        match &ch.kind {
            // Added when the sink checks the table against the new relation.
            Change::Add(_) => Ok(()),
            Change::Drop(c) => {
                tracing::warn!(sink = %sink, table = %ch.table, column = %c,
                    "the source dropped column {c}: the target keeps it, and rows written from now on leave it NULL");
                if manage && cols.contains_key(c) {
                    let sql = format!(
                        "ALTER TABLE {ident} ALTER COLUMN {} DROP NOT NULL",
                        quote_ident(c)
                    );
                    self.ddl(&sql, ch).await?;
                }
                Ok(())
            }
            Change::Rename { from, to } => {
                match (cols.contains_key(from), cols.contains_key(to)) {
                    // Done already (an earlier attempt committed it, or the operator).
                    (false, true) => Ok(()),
                    // Neither: the new column is added when the table is checked.
                    (false, false) => Ok(()),
                    (true, true) => Err(refuse(format!(
                        "the target has both {from} and {to}; drop or rename one"
                    ))),
                    (true, false) if manage => {
                        let sql = format!(
                            "ALTER TABLE {ident} RENAME COLUMN {} TO {}",
                            quote_ident(from),
                            quote_ident(to)
                        );
                        self.ddl(&sql, ch).await
                    }
                    (true, false) => Err(refuse(format!(
                        "the target still has column {from} (create_tables is off, so the sink \
                         does not rename it): ALTER TABLE {ident} RENAME COLUMN {} TO {}",
                        quote_ident(from),
                        quote_ident(to)
                    ))),
                }
            }
            Change::Type { to, .. } => {
                let Some((target, _)) = cols.get(&to.name) else {
                    return Ok(());
                };
                let want = to.type_name.trim();
                if target == want || ch.accepted {
                    return Ok(());
                }
                if schema::widening(target, want) {
                    if !manage || !safe_type_name(want) {
                        return Err(refuse(format!(
                            "the target column is {target}: widen it (ALTER TABLE {ident} ALTER \
                             COLUMN {} TYPE {want})",
                            quote_ident(&to.name)
                        )));
                    }
                    let c = quote_ident(&to.name);
                    let sql = format!(
                        "ALTER TABLE {ident} ALTER COLUMN {c} TYPE {want} USING {c}::{want}"
                    );
                    return self.ddl(&sql, ch).await;
                }
                if schema::widening(want, target) {
                    return Err(refuse(format!(
                        "a narrowing: the target column is {target} and the sink does not narrow \
                         columns; alter it to {want} yourself, or keep it as it is, and resume"
                    )));
                }
                Err(refuse(format!(
                    "the target column is {target}, which does not hold every {want} value; \
                     change it and resume"
                )))
            }
            Change::Key { to, .. } => {
                let rows = self
                    .client
                    .query(PK_SQL, &[&schema, &name])
                    .await
                    .map_err(|e| self.pg_err("reading the target's primary key", &e))?;
                let pk: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
                if to.is_empty() || pk == *to {
                    // No key on the source: rows are matched by every column; the
                    // target's key, if any, stays.
                    return Ok(());
                }
                if !manage {
                    let unique: bool = self
                        .client
                        .query_one(UNIQUE_SQL, &[&schema, &name, to])
                        .await
                        .map_err(|e| self.pg_err("reading the target's unique indexes", &e))?
                        .get(0);
                    if unique {
                        return Ok(());
                    }
                    return Err(refuse(format!(
                        "the target has no unique index on ({}) (create_tables is off, so the \
                         sink does not change its key)",
                        to.join(", ")
                    )));
                }
                let cols = to.iter().map(|c| quote_ident(c)).collect::<Vec<_>>();
                let mut sql = format!("ALTER TABLE {ident} ");
                if let Some(r) = rows.first() {
                    let con: String = r.get(1);
                    sql.push_str(&format!("DROP CONSTRAINT {}, ", quote_ident(&con)));
                }
                sql.push_str(&format!("ADD PRIMARY KEY ({})", cols.join(", ")));
                self.ddl(&sql, ch).await
            }
        }
    }

    /// Runs one DDL statement; its failure stops the sink with the change named.
    async fn ddl(&mut self, sql: &str, ch: &SchemaChange) -> Result<(), Flow> {
        tracing::info!(sink = %self.cfg.name, seq = self.seq, "{ch}: {sql}");
        if let Err(e) = self.client.batch_execute(sql).await {
            let mut e = self.pg_err(&format!("{ch}: {sql}"), &e);
            e.msg.push_str(&format!(
                ". The sink stops here: fix the target table (or its rows), then run \
                 `relay-outer cdc resume --sink {}`",
                self.cfg.name
            ));
            // A refusal by the target; a lost connection is retried as usual.
            e.rejected = e.code.is_some();
            return Err(e.into());
        }
        // The next event re-reads the table's columns.
        for t in self.tables.values_mut() {
            t.ready = false;
            t.stmts.clear();
        }
        Ok(())
    }
}
