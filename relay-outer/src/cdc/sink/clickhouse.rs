//! The ClickHouse sink: row changes as versioned rows in `ReplacingMergeTree` tables,
//! over ClickHouse's HTTP interface.
//!
//! Every source table becomes a table in `database` (`public.orders` → `orders`, another
//! schema's `s.t` → `s_t`) with the source's columns (types in [`types`]) and two more:
//! `_routy_version UInt64`, which grows with the source's commit order (the change's
//! [`Position`]: `seq × 2^24 + event index`), and `_routy_deleted UInt8`. The engine is
//! `ReplacingMergeTree(_routy_version, _routy_deleted) ORDER BY (key columns)`: inserts and
//! updates write the new row, deletes write the key with `_routy_deleted = 1`, a key
//! change writes both. `SELECT ... FROM t FINAL` shows exactly the source's rows; a batch
//! delivered twice collapses, since its rows carry the same versions.
//!
//! **Unchanged TOAST values** (a large value an update did not touch, which the source
//! does not send) are carried from the row's previous version: from an earlier change of
//! the same row in the batch, or read from the table (`FINAL`) before the rows are
//! inserted. They never become NULL. A row the target does not have (it was never copied)
//! is written without them and counted in `routy_cdc_sink_missing_rows_total`.
//!
//! **TRUNCATE** (and the start of a table's initial copy) empties the table with
//! `TRUNCATE TABLE`, after every change before it was inserted.
//!
//! **Position**: after a batch's inserts were all acknowledged, the sink writes where it
//! goes on to `database._routy_sink_offsets` (one row per sink, `ReplacingMergeTree`), and
//! reads it from there on connect: a restarted relay-outer resumes from it, and what it
//! re-sends collapses by version.
//!
//! **Inserts**: `INSERT INTO t FORMAT JSONEachRow`, up to [`CHUNK_ROWS`] rows per insert,
//! sent as soon as they are read (up to [`MAX_INFLIGHT`] at a time) while the batch goes
//! on; a batch commits when all of its inserts were acknowledged.

mod ddl;
pub mod http;
pub mod types;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use relay_proto::cdc::{Event, Relation, Relations, SnapshotPhase, Value};
use tokio::task::JoinSet;

use super::{
    BatchInfo, BatchLimits, Durability, Flow, Position, SchemaChange, Sink, SinkError, Split,
};
use http::{ChError, Client};
use types::{ident, json_str, literal, map_type, write_value, ColType};

/// Default changes per batch (the position is written once per batch).
pub const DEFAULT_MAX_ROWS: usize = 100_000;
/// Default bytes of row data per batch.
pub const DEFAULT_MAX_BYTES: usize = 64 << 20;
/// Default time a batch waits for more changes once the store is read to its end.
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(1);
/// Default bound on one request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Rows per `INSERT` at most.
pub const CHUNK_ROWS: usize = 25_000;
/// Row bytes per `INSERT` at most.
const CHUNK_BYTES: usize = 16 << 20;
/// Inserts in flight at most.
pub const MAX_INFLIGHT: usize = 4;
/// The table holding each sink's position.
pub const OFFSETS_TABLE: &str = "_routy_sink_offsets";
/// The version column.
pub const VERSION_COL: &str = "_routy_version";
/// The deleted flag column.
pub const DELETED_COL: &str = "_routy_deleted";

/// One ClickHouse sink, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClickHouseConfig {
    /// Sink name.
    pub name: String,
    /// `tunnel/source`.
    pub source: String,
    /// `http://` or `https://` URL of the HTTP interface.
    pub url: String,
    /// Database the tables live in.
    pub database: String,
    /// User name.
    pub user: String,
    /// File holding the password.
    pub password_file: Option<PathBuf>,
    /// CA certificate(s) to trust for `https://` instead of the system's roots.
    pub ca: Option<PathBuf>,
    /// Create missing tables and columns.
    pub create_tables: bool,
    /// Bound on one request.
    pub timeout: Duration,
    /// Changes per batch at most.
    pub max_rows: usize,
    /// Row bytes per batch at most.
    pub max_bytes: usize,
    /// Time a batch waits for more changes.
    pub max_delay: Duration,
}

/// One source column in the target.
#[derive(Debug)]
struct Col {
    /// `"name":` as JSON.
    prefix: Vec<u8>,
    /// Its name, quoted for SQL.
    sql: String,
    ty: ColType,
}

/// A source table and its target table.
#[derive(Debug)]
struct Table {
    /// The relation as last seen.
    rel: Relation,
    /// `` `db`.`name` ``.
    target: String,
    cols: Vec<Col>,
    /// Indices of the key columns.
    keys: Vec<usize>,
    /// `INSERT INTO ... FORMAT JSONEachRow`.
    insert: String,
}

/// One row to insert.
#[derive(Debug)]
struct Row {
    vals: Vec<Value>,
    version: u64,
    deleted: bool,
    /// The key to find unchanged TOAST values by (set while some are missing).
    lookup: Option<Vec<Value>>,
    /// Unchanged values found: column index and the value as JSON.
    raw: Vec<(usize, Vec<u8>)>,
}

impl Row {
    fn missing(&self) -> impl Iterator<Item = usize> + '_ {
        self.vals.iter().enumerate().filter_map(|(i, v)| {
            (matches!(v, Value::Unchanged) && !self.raw.iter().any(|(c, _)| *c == i)).then_some(i)
        })
    }
}

/// Rows of one table not sent yet.
#[derive(Debug, Default)]
struct Chunk {
    rows: Vec<Row>,
    bytes: usize,
    /// Rows with unchanged values still to find.
    unresolved: usize,
    /// Store seq of its first row.
    seq: u64,
}

/// The ClickHouse sink.
pub struct ClickHouseSink {
    cfg: ClickHouseConfig,
    client: Option<Client>,
    /// Tables by target name, and their pending rows.
    tables: Vec<Arc<Table>>,
    pending: Vec<Chunk>,
    /// Relation id to index in `tables`.
    by_rel: HashMap<u32, usize>,
    /// Columns of target tables seen in this session (name → type).
    known: HashMap<String, HashMap<String, String>>,
    inflight: JoinSet<Result<(), SinkError>>,
    /// Bytes written in the open batch.
    batch_bytes: usize,
    /// The offsets row's last version.
    offset_version: u64,
    /// Store seq being written.
    seq: u64,
}

impl std::fmt::Debug for ClickHouseSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickHouseSink")
            .field("name", &self.cfg.name)
            .field("url", &self.cfg.url)
            .finish()
    }
}

/// The target table name of a source table.
pub fn target_name(schema: &str, table: &str) -> String {
    if schema == "public" {
        table.to_string()
    } else {
        format!("{schema}_{table}")
    }
}

/// The version of the change at `at`.
pub fn version(at: Position) -> u64 {
    (at.seq << 24) | u64::from(at.idx & 0xff_ffff)
}

impl ClickHouseSink {
    /// A sink that connects on the runner's first session.
    pub fn new(cfg: ClickHouseConfig) -> ClickHouseSink {
        ClickHouseSink {
            cfg,
            client: None,
            tables: Vec::new(),
            pending: Vec::new(),
            by_rel: HashMap::new(),
            known: HashMap::new(),
            inflight: JoinSet::new(),
            batch_bytes: 0,
            offset_version: 0,
            seq: 0,
        }
    }

    fn db(&self) -> String {
        ident(&self.cfg.database)
    }

    fn client(&self) -> Result<&Client, SinkError> {
        self.client
            .as_ref()
            .ok_or_else(|| SinkError::new("connection", self.seq, "ClickHouse: not connected"))
    }

    async fn query(&self, sql: &str) -> Result<bytes::Bytes, SinkError> {
        let seq = self.seq;
        self.client()?
            .query(sql)
            .await
            .map_err(|e: ChError| e.into_sink(seq))
    }

    fn setup(&self) -> Result<Client, SinkError> {
        let http =
            super::webhook::http_client(self.cfg.ca.as_deref(), self.cfg.timeout, "ClickHouse")
                .map_err(|e| SinkError::new("config", 0, e))?;
        let key = match &self.cfg.password_file {
            None => None,
            Some(p) => Some(super::webhook::read_secret(p)?),
        };
        Ok(Client::new(
            http,
            &self.cfg.url,
            &self.cfg.user,
            key,
            self.cfg.timeout,
        ))
    }

    /// Reads the position stored in the offsets table (creating the table).
    async fn load_position(&mut self) -> Result<Position, SinkError> {
        let db = self.db();
        if self.cfg.create_tables {
            self.query(&format!("CREATE DATABASE IF NOT EXISTS {db}"))
                .await?;
        }
        self.query(&format!(
            "CREATE TABLE IF NOT EXISTS {db}.{} (sink String, source String, seq UInt64, event UInt32, \
             updated_at DateTime64(6, 'UTC'), {VERSION_COL} UInt64) \
             ENGINE = ReplacingMergeTree({VERSION_COL}) ORDER BY sink",
            ident(OFFSETS_TABLE)
        ))
        .await?;
        let out = self
            .query(&format!(
                "SELECT source, seq, event, {VERSION_COL} FROM {db}.{} FINAL WHERE sink = {} FORMAT TabSeparated",
                ident(OFFSETS_TABLE),
                literal(&self.cfg.name)
            ))
            .await?;
        let rows = http::tsv_rows(&out);
        let Some(row) = rows.first() else {
            return Ok(Position::START);
        };
        let field = |i: usize| -> String {
            row.get(i)
                .and_then(|f| f.as_ref())
                .map(|f| String::from_utf8_lossy(f).into_owned())
                .unwrap_or_default()
        };
        let bad = || {
            SinkError::new(
                "position",
                0,
                format!(
                    "{}.{OFFSETS_TABLE}: the row of sink {:?} is malformed",
                    self.cfg.database, self.cfg.name
                ),
            )
        };
        let source = field(0);
        if source != self.cfg.source {
            return Err(SinkError::new(
                "config",
                0,
                format!(
                    "{}.{OFFSETS_TABLE}: sink {:?} holds the position of source {source:?}, not {:?}; \
                     delete that row to start this sink over",
                    self.cfg.database, self.cfg.name, self.cfg.source
                ),
            ));
        }
        let seq: u64 = field(1).parse().map_err(|_| bad())?;
        let idx: u32 = field(2).parse().map_err(|_| bad())?;
        self.offset_version = field(3).parse().map_err(|_| bad())?;
        Ok(Position::new(seq, idx))
    }

    async fn save_position(&mut self, pos: Position) -> Result<(), SinkError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let v = now.max(self.offset_version + 1);
        let mut row = Vec::new();
        row.extend_from_slice(b"{\"sink\":");
        json_str(&mut row, self.cfg.name.as_bytes());
        row.extend_from_slice(b",\"source\":");
        json_str(&mut row, self.cfg.source.as_bytes());
        row.extend_from_slice(
            format!(
                ",\"seq\":{},\"event\":{},\"updated_at\":{},\"{VERSION_COL}\":{v}}}\n",
                pos.seq,
                pos.idx,
                // DateTime64 takes seconds with a fraction.
                format_args!("{}.{:06}", now / 1_000_000, now % 1_000_000)
            )
            .as_bytes(),
        );
        let stmt = format!(
            "INSERT INTO {}.{} FORMAT JSONEachRow",
            self.db(),
            ident(OFFSETS_TABLE)
        );
        let seq = self.seq;
        self.client()?
            .insert(&stmt, row)
            .await
            .map_err(|e| e.into_sink(seq))?;
        self.offset_version = v;
        Ok(())
    }

    /// Columns of a target table (empty: it does not exist).
    async fn columns(&mut self, name: &str) -> Result<HashMap<String, String>, SinkError> {
        if let Some(c) = self.known.get(name) {
            return Ok(c.clone());
        }
        let out = self
            .query(&format!(
                "SELECT name, type FROM system.columns WHERE database = {} AND table = {} FORMAT TabSeparated",
                literal(&self.cfg.database),
                literal(name)
            ))
            .await?;
        let cols: HashMap<String, String> = http::tsv_rows(&out)
            .into_iter()
            .filter_map(|r| {
                let n = r.first()?.as_ref()?;
                let t = r.get(1)?.as_ref()?;
                Some((
                    String::from_utf8_lossy(n).into_owned(),
                    String::from_utf8_lossy(t).into_owned(),
                ))
            })
            .collect();
        if !cols.is_empty() {
            self.known.insert(name.to_string(), cols.clone());
        }
        Ok(cols)
    }

    /// Makes the target table of `r` ready (created, columns added) and its plan current.
    async fn relation(&mut self, r: &Relation) -> Result<(), Flow> {
        if let Some(&i) = self.by_rel.get(&r.id) {
            if self.tables[i].rel == *r {
                return Ok(());
            }
        }
        let seq = self.seq;
        let refuse = |msg: String| SinkError {
            rejected: true,
            ..SinkError::new("schema", seq, msg)
        };
        if !r.has_key() {
            return Err(refuse(format!(
                "table {} has no replica identity key (REPLICA IDENTITY NOTHING, or DEFAULT without a primary key): \
                 its rows cannot be versioned in ClickHouse; give it a primary key or leave it out with the sink's `tables`",
                r.qualified()
            ))
            .into());
        }
        let name = target_name(&r.schema, &r.name);
        let full = r.replica_identity == b'f';
        let types: Vec<ColType> = r.columns.iter().map(|c| map_type(&c.type_name)).collect();
        let mut have = self.columns(&name).await?;
        if have.is_empty() {
            if !self.cfg.create_tables {
                return Err(refuse(format!(
                    "table {}.{name} (for {}) does not exist in ClickHouse and create_tables is off",
                    self.cfg.database,
                    r.qualified()
                ))
                .into());
            }
            let mut cols: Vec<String> = r
                .columns
                .iter()
                .zip(&types)
                .map(|(c, t)| format!("{} {}", ident(&c.name), t.ddl(c.key && !full)))
                .collect();
            cols.push(format!("{VERSION_COL} UInt64"));
            cols.push(format!("{DELETED_COL} UInt8"));
            let keys: Vec<String> = r
                .columns
                .iter()
                .filter(|c| c.key)
                .map(|c| ident(&c.name))
                .collect();
            self.query(&format!(
                "CREATE TABLE IF NOT EXISTS {}.{} ({}) ENGINE = ReplacingMergeTree({VERSION_COL}, {DELETED_COL}) \
                 ORDER BY ({}){}",
                self.db(),
                ident(&name),
                cols.join(", "),
                keys.join(", "),
                if full { " SETTINGS allow_nullable_key = 1" } else { "" }
            ))
            .await?;
            tracing::info!(sink = %self.cfg.name, table = %r.qualified(), target = %format!("{}.{name}", self.cfg.database),
                "created the target table");
            self.known.remove(&name);
            have = self.columns(&name).await?;
        }
        for (c, t) in r.columns.iter().zip(&types) {
            if have.contains_key(&c.name) {
                continue;
            }
            if !self.cfg.create_tables || c.key {
                return Err(refuse(format!(
                    "table {}.{name} has no column {:?} (of {}){}",
                    self.cfg.database,
                    c.name,
                    r.qualified(),
                    if c.key {
                        ": a key column cannot be added to a ClickHouse table's sorting key"
                    } else {
                        " and create_tables is off"
                    }
                ))
                .into());
            }
            self.query(&format!(
                "ALTER TABLE {}.{} ADD COLUMN IF NOT EXISTS {} {}",
                self.db(),
                ident(&name),
                ident(&c.name),
                t.ddl(false)
            ))
            .await?;
            tracing::info!(sink = %self.cfg.name, table = %r.qualified(), column = %c.name, "added a column to the target table");
            self.known.remove(&name);
        }
        let target = format!("{}.{}", self.db(), ident(&name));
        let table = Arc::new(Table {
            rel: r.clone(),
            insert: format!("INSERT INTO {target} FORMAT JSONEachRow"),
            target,
            cols: r
                .columns
                .iter()
                .zip(types)
                .map(|(c, ty)| {
                    let mut prefix = Vec::new();
                    json_str(&mut prefix, c.name.as_bytes());
                    prefix.push(b':');
                    Col {
                        prefix,
                        sql: ident(&c.name),
                        ty,
                    }
                })
                .collect(),
            keys: r
                .columns
                .iter()
                .enumerate()
                .filter_map(|(i, c)| c.key.then_some(i))
                .collect(),
        });
        // Rows already read for this target were read with the old columns: send them
        // before the plan changes.
        let same = self
            .tables
            .iter()
            .position(|t| t.target == table.target || t.rel.id == r.id);
        let i = match same {
            Some(i) => {
                self.dispatch(i).await?;
                self.tables[i] = table;
                i
            }
            None => {
                self.tables.push(table);
                self.pending.push(Chunk::default());
                self.tables.len() - 1
            }
        };
        self.by_rel.retain(|_, v| *v != i);
        self.by_rel.insert(r.id, i);
        Ok(())
    }

    fn table_of(&self, rel: u32) -> Result<usize, SinkError> {
        self.by_rel.get(&rel).copied().ok_or_else(|| {
            SinkError::new(
                "schema",
                self.seq,
                format!("a change of relation {rel}, whose schema was not seen"),
            )
        })
    }

    async fn push(&mut self, t: usize, row: Row) -> Result<(), Flow> {
        let bytes = 16
            + row
                .vals
                .iter()
                .map(|v| match v {
                    Value::Text(s) => s.len() + 8,
                    _ => 8,
                })
                .sum::<usize>();
        let c = &mut self.pending[t];
        if c.rows.is_empty() {
            c.seq = self.seq;
        }
        if row.lookup.is_some() {
            c.unresolved += 1;
        }
        c.rows.push(row);
        c.bytes += bytes;
        self.batch_bytes += bytes;
        if c.rows.len() >= CHUNK_ROWS || c.bytes >= CHUNK_BYTES {
            self.dispatch(t).await?;
        }
        Ok(())
    }

    /// Sends the pending rows of table `t` (after finding their unchanged values).
    async fn dispatch(&mut self, t: usize) -> Result<(), Flow> {
        let mut chunk = std::mem::take(&mut self.pending[t]);
        if chunk.rows.is_empty() {
            return Ok(());
        }
        let table = self.tables[t].clone();
        if chunk.unresolved > 0 {
            // The previous versions of these rows must be in the table before reading
            // them.
            self.drain().await?;
            self.resolve(&table, &mut chunk.rows).await?;
        }
        while self.inflight.len() >= MAX_INFLIGHT {
            self.join_one().await?;
        }
        let client = self.client()?.clone();
        let seq = chunk.seq;
        self.inflight.spawn(async move {
            let mut body = Vec::with_capacity(chunk.bytes + chunk.rows.len() * 48);
            for row in &chunk.rows {
                write_row(&mut body, &table, row).map_err(|e| SinkError {
                    rejected: true,
                    ..SinkError::new("rejected", seq, format!("{}: {e}", table.rel.qualified()))
                })?;
            }
            client.insert(&table.insert, body).await.map_err(|e| {
                let mut e = e.into_sink(seq);
                e.msg = format!("inserting into {}: {}", table.target, e.msg);
                e
            })
        });
        Ok(())
    }

    async fn join_one(&mut self) -> Result<(), Flow> {
        match self.inflight.join_next().await {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(e.into()),
            Some(Err(e)) => {
                Err(SinkError::new("clickhouse", self.seq, format!("insert task: {e}")).into())
            }
        }
    }

    /// Waits for every insert in flight; the first failure is returned.
    async fn drain(&mut self) -> Result<(), Flow> {
        let mut first = None;
        while !self.inflight.is_empty() {
            if let Err(e) = self.join_one().await {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    async fn flush_all(&mut self) -> Result<(), Flow> {
        for t in 0..self.tables.len() {
            self.dispatch(t).await?;
        }
        Ok(())
    }

    /// Fills unchanged TOAST values: from the table for rows whose previous version is
    /// not among `rows`, then from the previous version in `rows`.
    async fn resolve(&mut self, table: &Table, rows: &mut [Row]) -> Result<(), Flow> {
        let key_json = |vals: &[Value]| -> Vec<u8> {
            let mut k = Vec::new();
            for &i in &table.keys {
                let v = match vals.get(i) {
                    Some(Value::Text(s)) => Some(s.as_str()),
                    _ => None,
                };
                // A key that does not convert matches nothing.
                let _ = write_value(&mut k, &table.cols[i].ty, v);
                k.push(b',');
            }
            k
        };
        // Pass 1: rows whose previous version is in the table.
        let mut seen: HashSet<Vec<u8>> = HashSet::new();
        let mut need: Vec<(usize, Vec<u8>)> = Vec::new();
        let mut cols: Vec<usize> = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            if let Some(l) = &row.lookup {
                let k = key_json(l);
                if !seen.contains(&k) {
                    for c in row.missing() {
                        if !cols.contains(&c) {
                            cols.push(c);
                        }
                    }
                    need.push((i, k));
                }
            }
            seen.insert(key_json(&row.vals));
        }
        let mut missing = 0u64;
        if !need.is_empty() {
            cols.sort_unstable();
            let found = self.fetch(table, &need, &cols).await?;
            for (i, k) in &need {
                let Some(vals) = found.get(k) else {
                    continue;
                };
                let want: Vec<usize> = rows[*i].missing().collect();
                for c in want {
                    if let Some(pos) = cols.iter().position(|x| *x == c) {
                        rows[*i].raw.push((c, vals[pos].clone()));
                    }
                }
            }
        }
        // Pass 2: in order, from the latest earlier version of the row.
        let mut latest: HashMap<Vec<u8>, usize> = HashMap::new();
        for i in 0..rows.len() {
            if let Some(l) = rows[i].lookup.clone() {
                let want: Vec<usize> = rows[i].missing().collect();
                if !want.is_empty() {
                    match latest.get(&key_json(&l)) {
                        Some(&j) => {
                            for c in want {
                                let from = &rows[j];
                                let copy = match from.vals.get(c) {
                                    Some(Value::Unchanged) => from
                                        .raw
                                        .iter()
                                        .find(|(x, _)| *x == c)
                                        .map(|(_, r)| Err(r.clone())),
                                    Some(v) => Some(Ok(v.clone())),
                                    None => None,
                                };
                                match copy {
                                    Some(Ok(v)) => rows[i].vals[c] = v,
                                    Some(Err(raw)) => rows[i].raw.push((c, raw)),
                                    None => {}
                                }
                            }
                        }
                        None => missing += 1,
                    }
                }
                rows[i].lookup = None;
            }
            latest.insert(key_json(&rows[i].vals), i);
        }
        if missing > 0 {
            tracing::warn!(sink = %self.cfg.name, table = %table.rel.qualified(), rows = missing,
                "updates with unchanged TOAST values found no earlier version of their row in ClickHouse; \
                 those columns were left at their defaults");
            metrics::counter!(super::pg::MISSING_ROWS, "sink" => self.cfg.name.clone(), "kind" => "clickhouse")
                .increment(missing);
        }
        Ok(())
    }

    /// The current values of columns `cols` of the rows with the keys in `need`, as JSON,
    /// by key.
    async fn fetch(
        &mut self,
        table: &Table,
        need: &[(usize, Vec<u8>)],
        cols: &[usize],
    ) -> Result<HashMap<Vec<u8>, Vec<Vec<u8>>>, Flow> {
        let mut keys: Vec<&Vec<u8>> = need.iter().map(|(_, k)| k).collect();
        keys.sort_unstable();
        keys.dedup();
        let structure: Vec<String> = std::iter::once("_i UInt32".to_string())
            .chain(table.keys.iter().map(|&i| {
                format!(
                    "{} {}",
                    table.cols[i].sql,
                    table.cols[i].ty.ddl(table.rel.replica_identity != b'f')
                )
            }))
            .collect();
        let mut data = Vec::new();
        for (n, k) in keys.iter().enumerate() {
            data.extend_from_slice(format!("{{\"_i\":{n}").as_bytes());
            // `k` is the key values as JSON, each followed by a comma.
            let mut parts = split_json_values(k);
            for &i in &table.keys {
                data.push(b',');
                data.extend_from_slice(&table.cols[i].prefix);
                data.extend_from_slice(parts.next().unwrap_or(b"null"));
            }
            data.extend_from_slice(b"}\n");
        }
        let input = format!(
            "format(JSONEachRow, {}, {})",
            literal(&structure.join(", ")),
            literal(&String::from_utf8_lossy(&data))
        );
        let key_list: Vec<&str> = table
            .keys
            .iter()
            .map(|&i| table.cols[i].sql.as_str())
            .collect();
        let keys_sql = key_list.join(", ");
        let on: Vec<String> = key_list.iter().map(|k| format!("r.{k} = t.{k}")).collect();
        let exprs: Vec<String> = cols
            .iter()
            .map(|&c| {
                let col = &table.cols[c];
                if col.ty.base == "String" {
                    format!("t.{}", col.sql)
                } else {
                    format!("toJSONString(t.{})", col.sql)
                }
            })
            .collect();
        let sel_cols: Vec<&str> = cols.iter().map(|&c| table.cols[c].sql.as_str()).collect();
        let sql = format!(
            "SELECT r._i, {} FROM {input} AS r INNER JOIN (SELECT {keys_sql}, {} FROM {} FINAL WHERE ({keys_sql}) IN \
             (SELECT {keys_sql} FROM {input})) AS t ON {} FORMAT TabSeparated",
            exprs.join(", "),
            sel_cols.join(", "),
            table.target,
            on.join(" AND ")
        );
        let out = self.query(&sql).await?;
        let mut found = HashMap::new();
        for row in http::tsv_rows(&out) {
            let Some(n) = row
                .first()
                .and_then(|f| f.as_ref())
                .and_then(|f| std::str::from_utf8(f).ok()?.parse::<usize>().ok())
            else {
                continue;
            };
            let Some(k) = keys.get(n) else { continue };
            let vals = cols
                .iter()
                .enumerate()
                .map(|(j, &c)| {
                    let f = row.get(j + 1).cloned().flatten();
                    match (f, table.cols[c].ty.base == "String") {
                        (None, _) => b"null".to_vec(),
                        (Some(raw), true) => {
                            let mut v = Vec::new();
                            json_str(&mut v, &raw);
                            v
                        }
                        (Some(json), false) => json,
                    }
                })
                .collect();
            found.insert((*k).clone(), vals);
        }
        Ok(found)
    }

    async fn truncate(&mut self, rels: &[u32]) -> Result<(), Flow> {
        self.flush_all().await?;
        self.drain().await?;
        for rel in rels {
            let t = self.table_of(*rel)?;
            let target = self.tables[t].target.clone();
            self.query(&format!("TRUNCATE TABLE IF EXISTS {target}"))
                .await?;
        }
        Ok(())
    }

    /// Ends the open batch's inserts: waits for those in flight (so none lands after a
    /// later retry) and drops what was not sent.
    async fn settle(&mut self) {
        let wait = self.cfg.timeout + Duration::from_secs(1);
        let _ = tokio::time::timeout(wait, async {
            while self.inflight.join_next().await.is_some() {}
        })
        .await;
        self.inflight.abort_all();
        for c in &mut self.pending {
            *c = Chunk::default();
        }
        self.batch_bytes = 0;
    }
}

/// Splits `a,b,c,` (JSON values each followed by a comma, as the key encoding writes
/// them) into the values.
fn split_json_values(k: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut parts = Vec::new();
    let (mut depth, mut in_str, mut esc, mut start) = (0i32, false, false, 0usize);
    for (i, &b) in k.iter().enumerate() {
        if in_str {
            match (esc, b) {
                (true, _) => esc = false,
                (false, b'\\') => esc = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => depth += 1,
            b']' | b'}' => depth -= 1,
            b',' if depth == 0 => {
                parts.push(&k[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.into_iter()
}

/// One row as a JSON object line.
fn write_row(out: &mut Vec<u8>, table: &Table, row: &Row) -> Result<(), types::BadValue> {
    out.push(b'{');
    let mut first = true;
    for (i, col) in table.cols.iter().enumerate() {
        if row.deleted && !table.keys.contains(&i) {
            continue;
        }
        let v = row.vals.get(i).unwrap_or(&Value::Null);
        let raw = match v {
            Value::Unchanged => match row.raw.iter().find(|(c, _)| *c == i) {
                Some((_, r)) => Some(r),
                // Not found anywhere: leave the column to its default.
                None => continue,
            },
            _ => None,
        };
        if !first {
            out.push(b',');
        }
        first = false;
        out.extend_from_slice(&col.prefix);
        match (raw, v) {
            (Some(r), _) => out.extend_from_slice(r),
            (None, Value::Text(s)) => write_value(out, &col.ty, Some(s)).map_err(|e| {
                types::BadValue(format!("column {:?}: {}", col_name(table, i), e.0))
            })?,
            (None, _) => write_value(out, &col.ty, None)?,
        }
    }
    if !first {
        out.push(b',');
    }
    out.extend_from_slice(
        format!(
            "\"{VERSION_COL}\":{},\"{DELETED_COL}\":{}}}\n",
            row.version,
            u8::from(row.deleted)
        )
        .as_bytes(),
    );
    Ok(())
}

fn col_name(table: &Table, i: usize) -> &str {
    table.rel.columns.get(i).map_or("?", |c| c.name.as_str())
}

impl Sink for ClickHouseSink {
    fn kind(&self) -> &'static str {
        "clickhouse"
    }

    fn durability(&self) -> Durability {
        Durability::Versioned
    }

    fn limits(&self) -> BatchLimits {
        BatchLimits {
            max_records: usize::MAX,
            max_events: self.cfg.max_rows,
            max_bytes: self.cfg.max_bytes,
            max_delay: self.cfg.max_delay,
            split: Split::FromBegin,
        }
    }

    async fn connect(&mut self) -> Result<Option<Position>, Flow> {
        self.settle().await;
        self.tables.clear();
        self.pending.clear();
        self.by_rel.clear();
        self.known.clear();
        self.client = Some(self.setup()?);
        Ok(Some(self.load_position().await?))
    }

    async fn begin(&mut self, _from: Position) -> Result<(), Flow> {
        self.batch_bytes = 0;
        Ok(())
    }

    async fn write(&mut self, at: Position, ev: Event, _rels: &Relations) -> Result<(), Flow> {
        self.seq = at.seq;
        if at.idx > 0xff_ffff {
            return Err(SinkError::new(
                "version",
                at.seq,
                format!("event {at}: more than 2^24 events in one record"),
            )
            .into());
        }
        let version = version(at);
        match ev {
            Event::Relation(r) => self.relation(&r).await?,
            Event::Rows { .. } => {
                return Err(SinkError::new(
                    "store",
                    at.seq,
                    format!("event {at}: copy rows reached the ClickHouse sink as a block (only sinks that take blocks get them)"),
                )
                .into())
            }
            Event::Insert { rel, new } => {
                let t = self.table_of(rel)?;
                self.push(
                    t,
                    Row {
                        vals: new,
                        version,
                        deleted: false,
                        lookup: None,
                        raw: Vec::new(),
                    },
                )
                .await?;
            }
            Event::Update { rel, old, mut new } => {
                let t = self.table_of(rel)?;
                let table = self.tables[t].clone();
                let key_of = |vals: &[Value]| -> Vec<Value> {
                    table
                        .keys
                        .iter()
                        .map(|&i| vals.get(i).cloned().unwrap_or(Value::Null))
                        .collect()
                };
                let mut lookup = None;
                if new.iter().any(|v| matches!(v, Value::Unchanged)) {
                    match &old {
                        Some(o) if !o.key_only => {
                            for (n, o) in new.iter_mut().zip(&o.values) {
                                if matches!(n, Value::Unchanged) {
                                    *n = o.clone();
                                }
                            }
                        }
                        Some(o) => lookup = Some(o.values.clone()),
                        None => {
                            let mut k = vec![Value::Null; new.len()];
                            for &i in &table.keys {
                                if let Some(v) = new.get(i) {
                                    k[i] = v.clone();
                                }
                            }
                            lookup = Some(k);
                        }
                    }
                }
                let moved = old
                    .as_ref()
                    .filter(|o| key_of(&o.values) != key_of(&new))
                    .map(|o| o.values.clone());
                self.push(
                    t,
                    Row {
                        vals: new,
                        version,
                        deleted: false,
                        lookup,
                        raw: Vec::new(),
                    },
                )
                .await?;
                if let Some(old) = moved {
                    self.push(
                        t,
                        Row {
                            vals: old,
                            version,
                            deleted: true,
                            lookup: None,
                            raw: Vec::new(),
                        },
                    )
                    .await?;
                }
            }
            Event::Delete { rel, old } => {
                let t = self.table_of(rel)?;
                self.push(
                    t,
                    Row {
                        vals: old.values,
                        version,
                        deleted: true,
                        lookup: None,
                        raw: Vec::new(),
                    },
                )
                .await?;
            }
            Event::Truncate { rels, .. } => self.truncate(&rels).await?,
            Event::Chunk { rel, lo, hi, keys } => {
                let t = self.table_of(rel)?;
                self.chunk_end(t, version, lo, hi, keys).await?
            }
            Event::Snapshot {
                rel,
                phase: SnapshotPhase::Start,
                ..
            } => self.truncate(&[rel]).await?,
            Event::Begin { .. }
            | Event::Commit { .. }
            | Event::Message { .. }
            | Event::Snapshot { .. } => {}
        }
        Ok(())
    }

    fn pending_bytes(&self) -> usize {
        self.batch_bytes
    }

    async fn commit(&mut self, batch: &BatchInfo) -> Result<(), Flow> {
        self.seq = batch.last_seq;
        self.flush_all().await?;
        self.drain().await?;
        self.save_position(batch.next).await?;
        self.batch_bytes = 0;
        Ok(())
    }

    async fn abort(&mut self) {
        self.settle().await;
    }

    async fn fail(&mut self, e: SinkError) -> SinkError {
        self.settle().await;
        if e.reason == "config" || e.reason == "auth" {
            self.client = None;
        }
        e
    }

    async fn idle(&mut self, in_batch: bool) -> Result<(), Flow> {
        if in_batch {
            // Surface a failed insert now rather than at the commit.
            while let Some(r) = self.inflight.try_join_next() {
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(e.into()),
                    Err(e) => {
                        return Err(SinkError::new(
                            "clickhouse",
                            self.seq,
                            format!("insert task: {e}"),
                        )
                        .into())
                    }
                }
            }
        }
        Ok(())
    }

    async fn schema(&mut self, at: Position, change: &SchemaChange) -> Result<(), Flow> {
        self.schema_change(at.seq, change).await
    }

    async fn set_position(&mut self, pos: Position) -> Result<(), Flow> {
        self.save_position(pos).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
