//! The ordinary (non-replication) connection: server checks, tables, publication, slot
//! state, relation schemas from the catalog, type names, heartbeats.

use relay_proto::cdc::{Column, Relation};
use tokio::task::JoinHandle;
use tokio_postgres::Client;

use super::shape::{Pushdown, TableInfo};
use super::SourceError;
use crate::cdc::replication::{self, ReplicationConfig};
use crate::config::SourceConfig;

/// A configured table, resolved on the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Table {
    /// `schema.table` as configured.
    pub(crate) name: String,
    pub(crate) schema: String,
    pub(crate) table: String,
    /// Relation OID (what pgoutput's relation ids are).
    pub(crate) oid: u32,
}

/// One row of `pg_attribute`, as [`resolve_attnums`] needs it.
#[derive(Debug, Clone)]
pub(crate) struct CatalogColumn {
    pub(crate) attnum: u16,
    pub(crate) name: String,
    pub(crate) type_oid: u32,
    pub(crate) type_modifier: i32,
    pub(crate) dropped: bool,
    pub(crate) generated: bool,
}

/// The `attnum` of each of `rel`'s columns, from the catalog as it is now (`catalog`,
/// every column, in attnum order); 0 where it cannot be told.
///
/// pgoutput sends no attnums, and the catalog may already be newer than the relation
/// (relay-inner reads it when the relation arrives, and further DDL may have run since).
/// A column still there under its name and type is found by them. Then each run of
/// columns not found between two that were (pgoutput lists columns in attnum order) is
/// matched by position to the catalog's columns between those two that no other column
/// took, when they are exactly as many and none is generated or of another type: that
/// finds a column renamed since, or dropped since.
pub(crate) fn resolve_attnums(rel: &Relation, catalog: &[CatalogColumn]) -> Vec<u16> {
    let live = |c: &CatalogColumn| !c.dropped && !c.generated;
    let mut out: Vec<u16> = rel
        .columns
        .iter()
        .map(|c| {
            catalog
                .iter()
                .find(|k| {
                    live(k)
                        && k.name == c.name
                        && k.type_oid == c.type_oid
                        && k.type_modifier == c.type_modifier
                })
                .map_or(0, |k| k.attnum)
        })
        .collect();
    let taken: Vec<u16> = out.iter().copied().filter(|&n| n != 0).collect();
    let mut i = 0;
    while i < out.len() {
        if out[i] != 0 {
            i += 1;
            continue;
        }
        let start = i;
        while i < out.len() && out[i] == 0 {
            i += 1;
        }
        let lo = if start == 0 { 0 } else { out[start - 1] };
        let hi = out.get(i).copied().unwrap_or(u16::MAX);
        let cands: Vec<&CatalogColumn> = catalog
            .iter()
            .filter(|k| k.attnum > lo && k.attnum < hi && !taken.contains(&k.attnum))
            .collect();
        if cands.len() != i - start {
            continue;
        }
        let fits = cands.iter().zip(&rel.columns[start..i]).all(|(k, c)| {
            !k.generated
                && (k.dropped || (k.type_oid == c.type_oid && k.type_modifier == c.type_modifier))
        });
        if fits {
            for (j, k) in cands.iter().enumerate() {
                out[start + j] = k.attnum;
            }
        }
    }
    out
}

#[cfg(test)]
mod attnum_tests {
    use super::*;
    use relay_proto::cdc::Column;

    fn col(name: &str, oid: u32) -> Column {
        Column {
            name: name.into(),
            type_oid: oid,
            type_modifier: -1,
            type_name: String::new(),
            key: false,
            attnum: 0,
        }
    }

    fn cat(attnum: u16, name: &str, oid: u32, dropped: bool) -> CatalogColumn {
        CatalogColumn {
            attnum,
            name: name.into(),
            type_oid: if dropped { 0 } else { oid },
            type_modifier: -1,
            dropped,
            generated: false,
        }
    }

    fn rel(cols: Vec<Column>) -> Relation {
        Relation {
            id: 1,
            schema: "public".into(),
            name: "t".into(),
            replica_identity: b'd',
            columns: cols,
        }
    }

    #[test]
    fn columns_changed_since_are_found_by_position() {
        // The relation still says a, b, c; since then a was renamed to a2 and c dropped,
        // and d added.
        let r = rel(vec![
            col("id", 23),
            col("a", 25),
            col("b", 25),
            col("c", 25),
        ]);
        let now = vec![
            cat(1, "id", 23, false),
            cat(2, "a2", 25, false),
            cat(3, "b", 25, false),
            cat(4, "........pg.dropped.4........", 0, true),
            cat(5, "d", 25, false),
        ];
        // a: the one candidate between id and b. c: two candidates after b (the
        // dropped column and the new one): not told.
        assert_eq!(resolve_attnums(&r, &now), vec![1, 2, 3, 0]);
        // Without d, c is the dropped column.
        assert_eq!(resolve_attnums(&r, &now[..4]), vec![1, 2, 3, 4]);
        // A candidate of another type is not taken.
        let other = vec![
            cat(1, "id", 23, false),
            cat(2, "a2", 23, false),
            cat(3, "b", 25, false),
        ];
        assert_eq!(
            resolve_attnums(&rel(r.columns[..3].to_vec()), &other),
            vec![1, 0, 3]
        );
        // A column dropped long ago between two found ones makes it ambiguous.
        let old_drop = vec![
            cat(1, "id", 23, false),
            cat(2, "........pg.dropped.2........", 0, true),
            cat(3, "a2", 25, false),
            cat(4, "b", 25, false),
        ];
        assert_eq!(
            resolve_attnums(&rel(r.columns[..3].to_vec()), &old_drop),
            vec![1, 0, 4]
        );
    }
}

/// `SELECT` of `rel`'s columns from table `t`, with the conditions `conds` (ANDed).
pub(crate) fn select_sql(t: &Table, rel: &Relation, conds: &[String]) -> String {
    let cols: Vec<String> = rel.columns.iter().map(|c| ident(&c.name)).collect();
    format!(
        "SELECT {} FROM {}.{}{}",
        cols.join(", "),
        ident(&t.schema),
        ident(&t.table),
        if conds.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conds.join(" AND "))
        }
    )
}

/// Quotes an SQL identifier.
pub(crate) fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// An ordinary connection; its driver task ends with it.
pub(crate) struct Db {
    pub(crate) client: Client,
    task: JoinHandle<()>,
    server_version: i32,
}

impl Drop for Db {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A row of `pg_replication_slots`.
#[derive(Debug, Clone)]
pub(crate) struct SlotInfo {
    pub(crate) plugin: Option<String>,
    pub(crate) slot_type: String,
    pub(crate) database: Option<String>,
    pub(crate) active_pid: Option<i32>,
    pub(crate) wal_status: String,
    pub(crate) confirmed_flush_lsn: u64,
    pub(crate) retained_wal_bytes: Option<u64>,
}

impl SlotInfo {
    /// Whether the slot can be used by this source; a lost slot is fatal.
    pub(crate) fn check(
        &self,
        cfg: &SourceConfig,
        rcfg: &ReplicationConfig,
    ) -> Result<(), SourceError> {
        if self.wal_status == "lost" {
            return Err(lost_slot(cfg));
        }
        if self.slot_type != "logical" || self.plugin.as_deref() != Some("pgoutput") {
            return Err(SourceError::Fatal(format!(
                "replication slot {} exists but is not a logical pgoutput slot (type {}, plugin {}): choose another postgres.slot or drop it",
                cfg.slot,
                self.slot_type,
                self.plugin.as_deref().unwrap_or("none")
            )));
        }
        if self.database.as_deref() != Some(rcfg.dbname.as_str()) {
            return Err(SourceError::Fatal(format!(
                "replication slot {} belongs to database {} but the DSN names {}: choose another postgres.slot",
                cfg.slot,
                self.database.as_deref().unwrap_or("?"),
                rcfg.dbname
            )));
        }
        if let Some(pid) = self.active_pid {
            // Often our own previous walsender that has not noticed the broken connection yet.
            return Err(SourceError::Transient(format!(
                "replication slot {} is in use by server process {pid} (another relay-inner, or a previous connection not yet closed)",
                cfg.slot
            )));
        }
        Ok(())
    }
}

/// The error for an invalidated slot.
pub(crate) fn lost_slot(cfg: &SourceConfig) -> SourceError {
    SourceError::Fatal(format!(
        "replication slot {slot} of source {name} was invalidated by PostgreSQL (wal_status = 'lost'): \
         the WAL it needed was removed because the slot held more than max_slot_wal_keep_size, \
         so changes since it last advanced are gone and streaming cannot continue. \
         To recover: run `relay-inner cdc drop-slot --source {name}`, then restart relay-inner: \
         it creates a new slot and copies the tables again (snapshot: initial). \
         To prevent it: raise max_slot_wal_keep_size on the source, or keep relay-inner and its spool from falling behind.",
        slot = cfg.slot,
        name = cfg.name
    ))
}

impl Db {
    pub(crate) async fn connect(rcfg: &ReplicationConfig) -> Result<Db, SourceError> {
        let (config, tls) = rcfg.tokio_postgres().map_err(SourceError::Fatal)?;
        // tokio-postgres's own connect_timeout covers the TCP connect only: TLS, startup
        // and authentication get the same deadline here (like the replication connection),
        // and so does the first query below.
        let limit = rcfg.connect_timeout;
        let late = || {
            SourceError::Transient(format!(
                "connecting to {}:{}: no answer within {limit:?} (connect_timeout)",
                rcfg.host, rcfg.port
            ))
        };
        let (client, conn) = tokio::time::timeout(limit, config.connect(tls))
            .await
            .map_err(|_| late())?
            .map_err(|e| {
                let e = SourceError::from(e);
                let text = format!("connecting to {}:{}: {e}", rcfg.host, rcfg.port);
                if e.is_fatal() {
                    SourceError::Fatal(text)
                } else {
                    SourceError::Transient(text)
                }
            })?;
        let task = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "source query connection ended");
            }
        });
        let mut db = Db {
            client,
            task,
            server_version: 0,
        };
        let v: String =
            tokio::time::timeout(limit, db.client.query_one("SHOW server_version_num", &[]))
                .await
                .map_err(|_| late())??
                .get(0);
        db.server_version = v.parse().unwrap_or(0);
        Ok(db)
    }

    /// `wal_level = logical` and a UTF8 database.
    pub(crate) async fn check_server(&self) -> Result<(), SourceError> {
        let wal_level: String = self.client.query_one("SHOW wal_level", &[]).await?.get(0);
        if wal_level != "logical" {
            return Err(SourceError::Fatal(format!(
                "the source has wal_level = {wal_level}; logical decoding needs wal_level = logical \
                 (ALTER SYSTEM SET wal_level = logical, then restart PostgreSQL)"
            )));
        }
        let enc: String = self
            .client
            .query_one("SHOW server_encoding", &[])
            .await?
            .get(0);
        if enc != "UTF8" {
            return Err(SourceError::Fatal(format!(
                "the source database's encoding is {enc}; CDC values are carried as UTF-8 text, so only UTF8 databases are supported"
            )));
        }
        Ok(())
    }

    /// Looks up every configured table; a missing one is fatal.
    pub(crate) async fn resolve_tables(&self, names: &[String]) -> Result<Vec<Table>, SourceError> {
        let mut out = Vec::new();
        let mut missing = Vec::new();
        for name in names {
            let (schema, table) = name.split_once('.').unwrap_or(("public", name));
            let row = self
                .client
                .query_opt(
                    "SELECT c.oid, c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = $1 AND c.relname = $2",
                    &[&schema, &table],
                )
                .await?;
            match row {
                None => missing.push(name.clone()),
                Some(r) => {
                    let kind: String = r.get(1);
                    if kind != "r" && kind != "p" {
                        return Err(SourceError::Fatal(format!(
                            "{name} is not a table (relkind {kind}); only tables can be published"
                        )));
                    }
                    out.push(Table {
                        name: name.clone(),
                        schema: schema.to_string(),
                        table: table.to_string(),
                        oid: r.get(0),
                    });
                }
            }
        }
        if !missing.is_empty() {
            return Err(SourceError::Fatal(format!(
                "configured table(s) {} do not exist on the source: create them or remove them from postgres.tables",
                missing.join(", ")
            )));
        }
        Ok(out)
    }

    /// Creates the publication for the tables, or adds the ones it lacks.
    pub(crate) async fn ensure_publication(
        &self,
        publication: &str,
        tables: &[Table],
    ) -> Result<(), SourceError> {
        let list = |ts: &[&Table]| {
            ts.iter()
                .map(|t| format!("{}.{}", ident(&t.schema), ident(&t.table)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let pub_row = self
            .client
            .query_opt(
                "SELECT puballtables, pubinsert AND pubupdate AND pubdelete AND pubtruncate FROM pg_publication WHERE pubname = $1",
                &[&publication],
            )
            .await?;
        let perm = |e: tokio_postgres::Error| {
            let e = SourceError::from(e);
            SourceError::Fatal(format!(
                "cannot create or change publication {publication}: {e} \
                 (the role needs to own the tables, or create the publication yourself: CREATE PUBLICATION {publication} FOR TABLE ...)"
            ))
        };
        match pub_row {
            None => {
                let all: Vec<&Table> = tables.iter().collect();
                let sql = format!(
                    "CREATE PUBLICATION {} FOR TABLE {}",
                    ident(publication),
                    list(&all)
                );
                self.client.batch_execute(&sql).await.map_err(perm)?;
                tracing::info!(publication, tables = %list(&all), "created the publication");
            }
            Some(r) => {
                let all_tables: bool = r.get(0);
                let all_ops: bool = r.get(1);
                if !all_ops {
                    tracing::warn!(publication, "publication does not publish every operation (insert, update, delete, truncate): some changes will not be captured");
                }
                if all_tables {
                    return Ok(());
                }
                let rows = self
                    .client
                    .query(
                        "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
                        &[&publication],
                    )
                    .await?;
                let have: Vec<(String, String)> =
                    rows.iter().map(|r| (r.get(0), r.get(1))).collect();
                let missing: Vec<&Table> = tables
                    .iter()
                    .filter(|t| !have.contains(&(t.schema.clone(), t.table.clone())))
                    .collect();
                if !missing.is_empty() {
                    let sql = format!(
                        "ALTER PUBLICATION {} ADD TABLE {}",
                        ident(publication),
                        list(&missing)
                    );
                    self.client.batch_execute(&sql).await.map_err(perm)?;
                    tracing::info!(publication, tables = %list(&missing), "added tables to the publication");
                }
            }
        }
        Ok(())
    }

    /// Whether `schema.name` is in the publication.
    async fn in_publication(
        &self,
        publication: &str,
        schema: &str,
        name: &str,
    ) -> Result<bool, SourceError> {
        Ok(self
            .client
            .query_opt(
                "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
                &[&publication, &schema, &name],
            )
            .await?
            .is_some())
    }

    /// Takes `table` (`schema.table`) out of the publication, if it is in it.
    pub(crate) async fn drop_from_publication(
        &self,
        publication: &str,
        table: &str,
    ) -> Result<(), SourceError> {
        let Some((schema, name)) = table.split_once('.') else {
            return Ok(());
        };
        let present = self.in_publication(publication, schema, name).await?;
        if present {
            self.client
                .batch_execute(&format!(
                    "ALTER PUBLICATION {} DROP TABLE {}.{}",
                    ident(publication),
                    ident(schema),
                    ident(name)
                ))
                .await?;
            tracing::info!(
                publication,
                table,
                "took a table no longer configured out of the publication"
            );
        }
        Ok(())
    }

    /// The server's version number (`server_version_num`).
    pub(crate) fn server_version(&self) -> i32 {
        self.server_version
    }

    /// The table's replica identity, columns (not generated) and replica identity
    /// columns, for planning its filter.
    pub(crate) async fn table_info(&self, t: &Table) -> Result<TableInfo, SourceError> {
        let rows = self
            .client
            .query(
                "SELECT c.relreplident::text, a.attname::text, \
                   COALESCE(a.attnum = ANY(i.indkey), false) \
                 FROM pg_class c \
                 JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
                 LEFT JOIN pg_index i ON i.indrelid = c.oid AND \
                   CASE c.relreplident WHEN 'd' THEN i.indisprimary WHEN 'i' THEN i.indisreplident ELSE false END \
                 WHERE c.oid = $1 ORDER BY a.attnum",
                &[&t.oid],
            )
            .await?;
        let replident = rows.first().map_or(b'd', |r| {
            r.get::<_, String>(0).bytes().next().unwrap_or(b'd')
        });
        Ok(TableInfo {
            replident,
            columns: rows.iter().map(|r| r.get(1)).collect(),
            keys: if replident == b'f' || replident == b'n' {
                Vec::new()
            } else {
                rows.iter()
                    .filter(|r| r.get::<_, bool>(2))
                    .map(|r| r.get(1))
                    .collect()
            },
        })
    }

    /// Puts `push` (a column list and row filter) on the table in the publication: the
    /// table is dropped from it and added back with them, in one transaction, so from that
    /// commit on the walsender sends only what they let through.
    pub(crate) async fn set_pushdown(
        &self,
        publication: &str,
        t: &Table,
        push: &Pushdown,
    ) -> Result<(), SourceError> {
        let name = format!("{}.{}", ident(&t.schema), ident(&t.table));
        let cols = push.columns.as_ref().map_or(String::new(), |c| {
            format!(
                " ({})",
                c.iter().map(|c| ident(c)).collect::<Vec<_>>().join(", ")
            )
        });
        let filter = push
            .where_
            .as_ref()
            .map_or(String::new(), |w| format!(" WHERE ({w})"));
        let present = self
            .in_publication(publication, &t.schema, &t.table)
            .await?;
        let p = ident(publication);
        let sql = format!(
            "BEGIN; {}ALTER PUBLICATION {p} ADD TABLE {name}{cols}{filter}; COMMIT",
            if present {
                format!("ALTER PUBLICATION {p} DROP TABLE {name}; ")
            } else {
                String::new()
            }
        );
        if let Err(e) = self.client.batch_execute(&sql).await {
            let _ = self.client.batch_execute("ROLLBACK").await;
            let e = SourceError::from(e);
            return Err(SourceError::Fatal(format!(
                "cannot put the filter of {} into publication {publication}: {e}",
                t.name
            )));
        }
        tracing::info!(publication, table = %t.name, columns = ?push.columns, filter = ?push.where_,
            "set the table's column list and row filter in the publication");
        Ok(())
    }

    /// Logs a warning for each table whose updates/deletes fail while published.
    pub(crate) async fn warn_replica_identity(&self, tables: &[Table]) {
        for t in tables {
            let row = self
                .client
                .query_one(
                    "SELECT c.relreplident::text, \
                       EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND \
                         CASE c.relreplident WHEN 'd' THEN i.indisprimary WHEN 'i' THEN i.indisreplident ELSE false END) \
                     FROM pg_class c WHERE c.oid = $1",
                    &[&t.oid],
                )
                .await;
            if let Ok(r) = row {
                let ident: String = r.get(0);
                let has_key: bool = r.get(1);
                if ident != "f" && !has_key {
                    tracing::warn!(table = %t.name,
                        "table has no primary key (or replica identity index) and REPLICA IDENTITY is not FULL: \
                         while it is published, UPDATE and DELETE on it fail on the source. \
                         Add a primary key or run ALTER TABLE {} REPLICA IDENTITY FULL", t.name);
                }
            }
        }
    }

    /// The slot's row in `pg_replication_slots`.
    pub(crate) async fn slot_info(&self, slot: &str) -> Result<Option<SlotInfo>, SourceError> {
        let row = self
            .client
            .query_opt(
                "SELECT plugin::text, slot_type, database::text, active_pid, COALESCE(wal_status, ''), \
                   COALESCE(confirmed_flush_lsn::text, '0/0'), \
                   CASE WHEN restart_lsn IS NULL THEN NULL ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8 END \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await?;
        let Some(r) = row else { return Ok(None) };
        let confirmed: String = r.get(5);
        let retained: Option<i64> = r.get(6);
        Ok(Some(SlotInfo {
            plugin: r.get(0),
            slot_type: r.get(1),
            database: r.get(2),
            active_pid: r.get(3),
            wal_status: r.get(4),
            confirmed_flush_lsn: replication::parse_lsn(&confirmed).unwrap_or(0),
            retained_wal_bytes: retained.map(|v| v.max(0) as u64),
        }))
    }

    pub(crate) async fn drop_slot(&self, slot: &str) -> Result<(), SourceError> {
        self.client
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await?;
        Ok(())
    }

    /// The `attnum` of each of `rel`'s columns (see [`resolve_attnums`]).
    pub(crate) async fn attnums(&self, rel: &Relation) -> Result<Vec<u16>, SourceError> {
        let rows = self
            .client
            .query(
                "SELECT attnum, attname::text, atttypid, atttypmod, attisdropped, attgenerated <> '' \
                 FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 ORDER BY attnum",
                &[&rel.id],
            )
            .await?;
        let catalog: Vec<CatalogColumn> = rows
            .iter()
            .filter_map(|r| {
                Some(CatalogColumn {
                    attnum: u16::try_from(r.get::<_, i16>(0)).ok()?,
                    name: r.get(1),
                    type_oid: r.get(2),
                    type_modifier: r.get(3),
                    dropped: r.get(4),
                    generated: r.get(5),
                })
            })
            .collect();
        Ok(resolve_attnums(rel, &catalog))
    }

    /// The relation as pgoutput would describe it, from the catalog (inside the current
    /// snapshot): published columns in attnum order without dropped or generated ones, key
    /// flags from the replica identity.
    pub(crate) async fn relation(
        &self,
        t: &Table,
        publication: &str,
    ) -> Result<Relation, SourceError> {
        let rows = self
            .client
            .query(
                "SELECT n.nspname::text, c.relname::text, c.relreplident::text, a.attname::text, a.atttypid, a.atttypmod, \
                   format_type(a.atttypid, a.atttypmod), \
                   c.relreplident = 'f' OR COALESCE(a.attnum = ANY(i.indkey), false), a.attnum \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
                 LEFT JOIN pg_index i ON i.indrelid = c.oid AND \
                   CASE c.relreplident WHEN 'd' THEN i.indisprimary WHEN 'i' THEN i.indisreplident ELSE false END \
                 WHERE c.oid = $1 ORDER BY a.attnum",
                &[&t.oid],
            )
            .await?;
        let Some(first) = rows.first() else {
            return Err(SourceError::Fatal(format!(
                "table {} (oid {}) has no columns or vanished during the copy",
                t.name, t.oid
            )));
        };
        // PostgreSQL 15 publications may list columns: only those are published.
        let published: Option<Vec<String>> = if self.server_version >= 150000 {
            self.client
                .query_opt(
                    "SELECT attnames::text[] FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
                    &[&publication, &t.schema, &t.table],
                )
                .await?
                .and_then(|r| r.get::<_, Option<Vec<String>>>(0))
        } else {
            None
        };
        let ri: String = first.get(2);
        let mut rel = Relation {
            id: t.oid,
            schema: first.get(0),
            name: first.get(1),
            replica_identity: ri.bytes().next().unwrap_or(b'd'),
            columns: Vec::new(),
        };
        for r in &rows {
            let name: String = r.get(3);
            if published.as_ref().is_some_and(|p| !p.contains(&name)) {
                continue;
            }
            rel.columns.push(Column {
                name,
                type_oid: r.get(4),
                type_modifier: r.get(5),
                type_name: r.get(6),
                key: r.get(7),
                attnum: u16::try_from(r.get::<_, i16>(8)).unwrap_or(0),
            });
        }
        Ok(rel)
    }

    /// `format_type(oid, typmod)`.
    pub(crate) async fn format_type(&self, oid: u32, typmod: i32) -> Result<String, SourceError> {
        let row = self
            .client
            .query_one("SELECT format_type($1, $2)", &[&oid, &typmod])
            .await?;
        Ok(row.get::<_, Option<String>>(0).unwrap_or_default())
    }

    /// Emits the heartbeat message (non-transactional).
    pub(crate) async fn heartbeat(&self) -> Result<(), SourceError> {
        let now = relay_proto::cdc::format_unix_micros(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros() as i64)
                .unwrap_or(0),
        );
        self.client
            .execute(
                "SELECT pg_logical_emit_message(false, $1::text, $2::text)",
                &[&relay_proto::cdc::HEARTBEAT_PREFIX, &now],
            )
            .await?;
        Ok(())
    }
}
