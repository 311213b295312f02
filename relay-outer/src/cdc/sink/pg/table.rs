//! Target tables: what the sink knows of each relation, the target's column types, and
//! the SQL it sends (every value a text parameter cast to the target column's type).

use std::collections::HashMap;
use std::fmt::Write as _;

use relay_proto::cdc::Relation;
use tokio_postgres::Statement;

/// `"ident"` with inner double quotes doubled.
pub fn quote_ident(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Words that may follow a type's first name, as `format_type` writes the built-in
/// multi-word types (`character varying`, `double precision`, `bit varying`,
/// `timestamp(3) with time zone`, `interval day to second`). Nothing else may follow, so
/// a type cannot carry a column constraint or a default.
const TYPE_WORDS: &[&str] = &[
    "varying",
    "precision",
    "with",
    "without",
    "time",
    "zone",
    "year",
    "month",
    "day",
    "hour",
    "minute",
    "second",
    "to",
];

/// Whether a type name from the stream (the source's `format_type`, which came over the
/// tunnel) is safe to paste into CREATE TABLE: a name (`[A-Za-z_][A-Za-z0-9_]*` or a
/// double-quoted identifier with inner quotes doubled), optionally schema-qualified, with
/// an optional type modifier of plain words or numbers (`(12,2)`, `(Point,4326)`), then
/// only the words of [`TYPE_WORDS`] (each with an optional modifier), then `[]` pairs.
pub fn safe_type_name(t: &str) -> bool {
    fn word(b: &[u8], i: &mut usize) -> bool {
        let s = *i;
        if !b
            .get(s)
            .is_some_and(|c| c.is_ascii_alphabetic() || *c == b'_')
        {
            return false;
        }
        while b
            .get(*i)
            .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_')
        {
            *i += 1;
        }
        true
    }
    fn name(b: &[u8], i: &mut usize) -> bool {
        if b.get(*i) != Some(&b'"') {
            return word(b, i);
        }
        *i += 1;
        let start = *i;
        loop {
            match b.get(*i) {
                None | Some(0) => return false,
                Some(b'"') if b.get(*i + 1) == Some(&b'"') => *i += 2,
                Some(b'"') => {
                    *i += 1;
                    return *i - 1 > start;
                }
                Some(_) => *i += 1,
            }
        }
    }
    fn typmod(b: &[u8], i: &mut usize) -> bool {
        if b.get(*i) != Some(&b'(') {
            return true;
        }
        *i += 1;
        loop {
            let s = *i;
            while b
                .get(*i)
                .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_')
            {
                *i += 1;
            }
            if *i == s {
                return false;
            }
            match b.get(*i) {
                Some(b',') => {
                    *i += 1;
                    if b.get(*i) == Some(&b' ') {
                        *i += 1;
                    }
                }
                Some(b')') => {
                    *i += 1;
                    return true;
                }
                _ => return false,
            }
        }
    }
    let b = t.as_bytes();
    if b.is_empty() || b.len() > 512 {
        return false;
    }
    let mut i = 0;
    if !name(b, &mut i) {
        return false;
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if !name(b, &mut i) {
            return false;
        }
    }
    if !typmod(b, &mut i) {
        return false;
    }
    while b.get(i) == Some(&b' ') {
        i += 1;
        let s = i;
        if !word(b, &mut i) {
            return false;
        }
        let w = &t[s..i];
        if !TYPE_WORDS.iter().any(|k| k.eq_ignore_ascii_case(w)) || !typmod(b, &mut i) {
            return false;
        }
    }
    while b.get(i) == Some(&b'[') {
        if b.get(i + 1) != Some(&b']') {
            return false;
        }
        i += 2;
    }
    i == b.len()
}

/// A target column matched to a source column.
#[derive(Debug, Clone)]
pub struct TargetCol {
    /// Quoted column name.
    pub name: String,
    /// The target column's type as SQL (`format_type`), used as the cast of its parameter.
    pub ty: String,
    /// Whether the type has a default btree equality; otherwise rows are matched on the
    /// text form (`json`, geometric types, ...).
    pub has_eq: bool,
}

/// Statement cache key: the operation and the shape of the row (which columns take part).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StmtKey {
    pub op: Op,
    pub shape: Vec<u8>,
}

/// Kinds of cached statements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    InsertBatch,
    InsertRow,
    Update,
    Delete,
}

/// In a WHERE shape: column not compared.
pub const W_SKIP: u8 = 0;
/// In a WHERE shape: compared with a value.
pub const W_VALUE: u8 = 1;
/// In a WHERE shape: `IS NULL`.
pub const W_NULL: u8 = 2;

/// One source relation and its target table.
#[derive(Debug)]
pub struct Table {
    /// The relation as last seen in the stream.
    pub rel: Relation,
    /// Target schema (unquoted).
    pub schema: String,
    /// Quoted `"schema"."name"`.
    pub ident: String,
    /// `schema.name`, for logs.
    pub display: String,
    /// Rows are applied by key (replica identity default or index, with key columns).
    pub keyed: bool,
    /// Indexes of the key columns.
    pub key_idx: Vec<usize>,
    /// Target columns, in source column order; filled by `ensure_table`.
    pub cols: Vec<TargetCol>,
    /// Whether the target was checked (and created) in this session since the relation
    /// last changed.
    pub ready: bool,
    /// Prepared statements.
    pub stmts: HashMap<StmtKey, Statement>,
    /// The target has no unique index on the key yet: the sink created the table for an
    /// initial copy without its primary key, added once the copy's rows are in (an index
    /// built once is cheaper than one kept up to date row by row).
    pub key_deferred: bool,
}

impl Table {
    /// A table for `rel`, written to `schema_override` when set.
    pub fn new(rel: Relation, schema_override: Option<&str>) -> Table {
        let schema = schema_override.unwrap_or(&rel.schema).to_string();
        let ident = format!("{}.{}", quote_ident(&schema), quote_ident(&rel.name));
        let display = format!("{}.{}", schema, rel.name);
        let keyed = rel.has_key() && rel.replica_identity != b'f';
        let key_idx = if keyed {
            rel.columns
                .iter()
                .enumerate()
                .filter(|(_, c)| c.key)
                .map(|(i, _)| i)
                .collect()
        } else {
            Vec::new()
        };
        Table {
            rel,
            schema,
            ident,
            display,
            keyed,
            key_idx,
            cols: Vec::new(),
            ready: false,
            stmts: HashMap::new(),
            key_deferred: false,
        }
    }

    /// Column type for CREATE TABLE: the source's `format_type`, `text` when unknown or
    /// not a plain type name (see [`safe_type_name`]).
    fn source_type(&self, i: usize) -> &str {
        let t = self.rel.columns[i].type_name.trim();
        if safe_type_name(t) {
            t
        } else {
            "text"
        }
    }

    /// The columns among `idx` whose source type is not used as is (not a plain type
    /// name), with that type: they are created as `text`.
    pub fn replaced_types(&self, idx: &[usize]) -> Vec<(&str, &str)> {
        idx.iter()
            .map(|&i| &self.rel.columns[i])
            .filter(|c| !c.type_name.trim().is_empty() && !safe_type_name(c.type_name.trim()))
            .map(|c| (c.name.as_str(), c.type_name.as_str()))
            .collect()
    }

    /// `CREATE TABLE IF NOT EXISTS` from the relation, with its primary key unless
    /// `without_key` (see [`Table::key_deferred`]).
    pub fn create_sql(&self, without_key: bool) -> String {
        let mut s = format!("CREATE TABLE IF NOT EXISTS {} (", self.ident);
        for (i, c) in self.rel.columns.iter().enumerate() {
            if i > 0 {
                s.push_str(", ");
            }
            let _ = write!(s, "{} {}", quote_ident(&c.name), self.source_type(i));
        }
        if self.keyed && !self.key_idx.is_empty() && !without_key {
            s.push_str(", PRIMARY KEY (");
            s.push_str(&self.col_list(&self.key_idx));
            s.push(')');
        }
        s.push(')');
        s
    }

    /// `ALTER TABLE ... ADD PRIMARY KEY` on the key columns.
    pub fn add_key_sql(&self) -> String {
        format!(
            "ALTER TABLE {} ADD PRIMARY KEY ({})",
            self.ident,
            self.col_list(&self.key_idx)
        )
    }

    /// `ALTER TABLE ... ADD COLUMN IF NOT EXISTS` for source column `i`.
    pub fn add_column_sql(&self, i: usize) -> String {
        format!(
            "ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}",
            self.ident,
            quote_ident(&self.rel.columns[i].name),
            self.source_type(i)
        )
    }

    fn col_list(&self, idx: &[usize]) -> String {
        idx.iter()
            .map(|&i| quote_ident(&self.rel.columns[i].name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `ON CONFLICT (key) DO UPDATE SET` the present non-key columns (`DO NOTHING` when
    /// there are none); empty for tables without a key.
    fn on_conflict(&self, present: &[usize]) -> String {
        if !self.keyed {
            return String::new();
        }
        let set: Vec<String> = present
            .iter()
            .filter(|i| !self.key_idx.contains(i))
            .map(|&i| format!("{0} = EXCLUDED.{0}", self.cols[i].name))
            .collect();
        if set.is_empty() {
            format!(" ON CONFLICT ({}) DO NOTHING", self.col_list(&self.key_idx))
        } else {
            format!(
                " ON CONFLICT ({}) DO UPDATE SET {}",
                self.col_list(&self.key_idx),
                set.join(", ")
            )
        }
    }

    fn present(mask: &[u8]) -> Vec<usize> {
        mask.iter()
            .enumerate()
            .filter(|(_, m)| **m != 0)
            .map(|(i, _)| i)
            .collect()
    }

    /// Many rows in one statement: one `text[]` parameter per present column.
    pub fn insert_batch_sql(&self, mask: &[u8]) -> String {
        let present = Self::present(mask);
        let names: Vec<&str> = present
            .iter()
            .map(|&i| self.cols[i].name.as_str())
            .collect();
        let casts: Vec<String> = present
            .iter()
            .enumerate()
            .map(|(p, &i)| format!("u.p{}::{}", p + 1, self.cols[i].ty))
            .collect();
        let arrays: Vec<String> = (1..=present.len())
            .map(|p| format!("${p}::text[]"))
            .collect();
        let aliases: Vec<String> = (1..=present.len()).map(|p| format!("p{p}")).collect();
        format!(
            "INSERT INTO {} ({}) SELECT {} FROM unnest({}) AS u({}){}",
            self.ident,
            names.join(", "),
            casts.join(", "),
            arrays.join(", "),
            aliases.join(", "),
            self.on_conflict(&present)
        )
    }

    /// One row.
    pub fn insert_row_sql(&self, mask: &[u8]) -> String {
        let present = Self::present(mask);
        let names: Vec<&str> = present
            .iter()
            .map(|&i| self.cols[i].name.as_str())
            .collect();
        let vals: Vec<String> = present
            .iter()
            .enumerate()
            .map(|(p, &i)| format!("${}::{}", p + 1, self.cols[i].ty))
            .collect();
        format!(
            "INSERT INTO {} ({}) VALUES ({}){}",
            self.ident,
            names.join(", "),
            vals.join(", "),
            self.on_conflict(&present)
        )
    }

    /// WHERE conditions for a shape (`W_*` per column), numbering parameters from `next`.
    fn conditions(&self, shape: &[u8], next: &mut usize) -> String {
        let mut conds = Vec::new();
        for (i, w) in shape.iter().enumerate() {
            let c = &self.cols[i];
            match *w {
                W_VALUE => {
                    if c.has_eq || self.keyed {
                        conds.push(format!("{} = ${}::{}", c.name, next, c.ty));
                    } else {
                        conds.push(format!("{}::text = ${}::text", c.name, next));
                    }
                    *next += 1;
                }
                W_NULL => conds.push(format!("{} IS NULL", c.name)),
                _ => {}
            }
        }
        conds.join(" AND ")
    }

    /// The row filter: by key, or (no key) one row matching every compared old value.
    fn filter(&self, shape: &[u8], next: &mut usize) -> String {
        let conds = self.conditions(shape, next);
        if self.keyed {
            conds
        } else {
            format!(
                "ctid = (SELECT ctid FROM {} WHERE {} LIMIT 1)",
                self.ident, conds
            )
        }
    }

    /// `UPDATE`: `set` marks the columns written (parameters first, in column order),
    /// `filter` the compared columns (parameters after).
    pub fn update_sql(&self, set: &[u8], filter: &[u8]) -> String {
        let mut next = 1;
        let mut sets = Vec::new();
        for (i, s) in set.iter().enumerate() {
            if *s != 0 {
                let c = &self.cols[i];
                sets.push(format!("{} = ${}::{}", c.name, next, c.ty));
                next += 1;
            }
        }
        let filter = self.filter(filter, &mut next);
        format!(
            "UPDATE {} SET {} WHERE {}",
            self.ident,
            sets.join(", "),
            filter
        )
    }

    /// `DELETE` by a filter shape.
    pub fn delete_sql(&self, filter: &[u8]) -> String {
        let mut next = 1;
        let filter = self.filter(filter, &mut next);
        format!("DELETE FROM {} WHERE {}", self.ident, filter)
    }
}

/// Reads a target table's columns: name, `format_type`, has a btree equality.
pub const COLUMNS_SQL: &str = "\
SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), \
  EXISTS (SELECT 1 FROM pg_opclass oc JOIN pg_am am ON am.oid = oc.opcmethod \
          WHERE am.amname = 'btree' AND oc.opcdefault \
            AND oc.opcintype = CASE WHEN b.typcategory = 'A' AND b.typelem <> 0 THEN b.typelem ELSE b.oid END) \
FROM pg_class c \
JOIN pg_namespace n ON n.oid = c.relnamespace \
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
JOIN pg_type t ON t.oid = a.atttypid \
JOIN pg_type b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END \
WHERE n.nspname::text = $1 AND c.relname::text = $2 AND c.relkind IN ('r', 'p') \
ORDER BY a.attnum";

#[cfg(test)]
mod tests {
    use super::*;
    use relay_proto::cdc::Column;

    fn col(name: &str, ty: &str, key: bool) -> Column {
        Column {
            name: name.into(),
            type_oid: 0,
            type_modifier: -1,
            type_name: ty.into(),
            key,
            attnum: 0,
        }
    }

    fn table(identity: u8) -> Table {
        let mut t = Table::new(
            Relation {
                id: 1,
                schema: "pub\"lic".into(),
                name: "Orders".into(),
                replica_identity: identity,
                columns: vec![col("id", "integer", true), col("note", "", false)],
            },
            None,
        );
        t.cols = vec![
            TargetCol {
                name: quote_ident("id"),
                ty: "integer".into(),
                has_eq: true,
            },
            TargetCol {
                name: quote_ident("note"),
                ty: "json".into(),
                has_eq: false,
            },
        ];
        t
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        let t = table(b'd');
        assert_eq!(t.ident, "\"pub\"\"lic\".\"Orders\"");
        assert_eq!(
            t.create_sql(false),
            "CREATE TABLE IF NOT EXISTS \"pub\"\"lic\".\"Orders\" (\"id\" integer, \"note\" text, PRIMARY KEY (\"id\"))"
        );
    }

    #[test]
    fn type_names_are_checked_before_use() {
        for ok in [
            "integer",
            "text[]",
            "integer[][]",
            "numeric(12,2)",
            "numeric(12, 2)",
            "character varying(12)",
            "character varying(12)[]",
            "double precision",
            "bit varying",
            "bit varying(5)",
            "timestamp with time zone",
            "timestamp(3) without time zone",
            "time(6) with time zone[]",
            "interval day to second(3)",
            "\"char\"",
            "public.mood",
            "\"My Schema\".\"My \"\"Type\"\"\"",
            "\"odd; DROP TABLE x; --\"",
            "geometry(Point,4326)",
            "_int4",
        ] {
            assert!(safe_type_name(ok), "{ok}");
        }
        for bad in [
            "",
            "int); DROP TABLE x; --",
            "int); DROP TABLE x",
            "int -- comment",
            "int /* c */",
            "int;",
            "text DEFAULT pg_terminate_backend(1)",
            "integer NOT NULL",
            "integer PRIMARY KEY",
            "int REFERENCES other(id)",
            "text COLLATE \"C\"",
            "int CHECK (false)",
            "\"unterminated",
            "\"a\"\"",
            "\"\"",
            "'text'",
            "text'",
            "a.b.c",
            "numeric(12,2",
            "numeric()",
            "numeric(1,)",
            "numeric(1;2)",
            "text[",
            "text[1]",
            "text []",
            "int  with time zone",
            "int\twith time zone",
            "int\n; DROP TABLE x",
            "$$x$$",
            "U&\"d\\0061t\"",
            "int\0",
            "\"a\0b\"",
            "1int",
            " int",
        ] {
            assert!(!safe_type_name(bad), "{bad:?}");
        }
        // A hostile type becomes text in the SQL; the others are kept.
        let t = Table::new(
            Relation {
                id: 1,
                schema: "s".into(),
                name: "t".into(),
                replica_identity: b'd',
                columns: vec![
                    col("id", "int); DROP TABLE x; --", true),
                    col("n", "numeric(12,2)", false),
                ],
            },
            None,
        );
        assert_eq!(
            t.create_sql(false),
            "CREATE TABLE IF NOT EXISTS \"s\".\"t\" (\"id\" text, \"n\" numeric(12,2), PRIMARY KEY (\"id\"))"
        );
        assert_eq!(
            t.add_column_sql(0),
            "ALTER TABLE \"s\".\"t\" ADD COLUMN IF NOT EXISTS \"id\" text"
        );
        assert_eq!(
            t.replaced_types(&[0, 1]),
            vec![("id", "int); DROP TABLE x; --")]
        );
    }

    #[test]
    fn statements_cast_text_parameters() {
        let t = table(b'd');
        assert_eq!(
            t.insert_batch_sql(&[1, 1]),
            "INSERT INTO \"pub\"\"lic\".\"Orders\" (\"id\", \"note\") SELECT u.p1::integer, u.p2::json \
             FROM unnest($1::text[], $2::text[]) AS u(p1, p2) ON CONFLICT (\"id\") DO UPDATE SET \"note\" = EXCLUDED.\"note\""
        );
        assert_eq!(
            t.update_sql(&[0, 1], &[W_VALUE, W_SKIP]),
            "UPDATE \"pub\"\"lic\".\"Orders\" SET \"note\" = $1::json WHERE \"id\" = $2::integer"
        );
        let f = table(b'f');
        assert!(!f.keyed);
        assert_eq!(
            f.delete_sql(&[W_VALUE, W_NULL]),
            "DELETE FROM \"pub\"\"lic\".\"Orders\" WHERE ctid = (SELECT ctid FROM \"pub\"\"lic\".\"Orders\" \
             WHERE \"id\" = $1::integer AND \"note\" IS NULL LIMIT 1)"
        );
        assert_eq!(
            f.delete_sql(&[W_SKIP, W_VALUE]),
            "DELETE FROM \"pub\"\"lic\".\"Orders\" WHERE ctid = (SELECT ctid FROM \"pub\"\"lic\".\"Orders\" \
             WHERE \"note\"::text = $1::text LIMIT 1)"
        );
        assert_eq!(
            f.insert_row_sql(&[1, 0]),
            "INSERT INTO \"pub\"\"lic\".\"Orders\" (\"id\") VALUES ($1::integer)"
        );
    }
}
