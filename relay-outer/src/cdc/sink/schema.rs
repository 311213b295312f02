//! Schema changes, the same for every sink kind: the runner compares each table's
//! relation in the stream with the one the sink last committed and hands the sink what
//! changed ([`SchemaChange`]) before the first event that uses the new definition.
//!
//! Columns are matched by their `attnum` (relay-inner reads it from the catalog; it
//! survives a rename and is never reused), else by name. So a rename is told from a
//! dropped column plus a new one; when the stream cannot tell (no attnums: records from
//! an older relay-inner, or a later DDL had already changed the column when relay-inner
//! read the catalog), the change is refused with an error that names it, and the sink
//! stops until an operator has made the target match and resumes it. A relation sent
//! again unchanged but with a column unnumbered keeps the number the sink knew
//! ([`keep_numbers`]).
//!
//! What the sink last committed is kept per sink in `cdc.dir/_sinks/NAME.schema.json`
//! (written after the batch that changed it was committed). A relation older than the
//! one known (a replay from before a change) is not a change: its columns are renamed
//! to the names they have now, by attnum, so old events land in today's columns.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use relay_proto::cdc::{Column, Relation};
use serde::{Deserialize, Serialize};

/// One change to one table's definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaChange {
    /// `schema.table` on the source.
    pub table: String,
    /// The source schema of the table.
    pub schema: String,
    /// The table's name.
    pub name: String,
    /// What changed.
    pub kind: Change,
    /// An operator resumed the sink after it stopped on this table: the target was made
    /// to match, so what cannot be applied automatically is left as the target has it.
    pub accepted: bool,
}

/// What changed in a table's definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A new column.
    Add(Column),
    /// The source dropped the column (the sinks keep it in the target).
    Drop(String),
    /// The column was renamed.
    Rename {
        /// Old name.
        from: String,
        /// New name.
        to: String,
    },
    /// The column's type changed.
    Type {
        /// The column as it was.
        from: Column,
        /// The column as it is.
        to: Column,
        /// Every value of the old type fits the new one (int to bigint, varchar(n) to
        /// text, …).
        widening: bool,
    },
    /// The key changed (columns, by their new names; empty: no key).
    Key {
        /// The old key.
        from: Vec<String>,
        /// The new key.
        to: Vec<String>,
    },
}

impl std::fmt::Display for SchemaChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = &self.table;
        match &self.kind {
            Change::Add(c) => write!(f, "{t}: column {} {} added", c.name, c.type_name),
            Change::Drop(c) => write!(f, "{t}: column {c} dropped"),
            Change::Rename { from, to } => write!(f, "{t}: column {from} renamed to {to}"),
            Change::Type { from, to, widening } => write!(
                f,
                "{t}: column {} changed type from {} to {} ({})",
                to.name,
                from.type_name,
                to.type_name,
                if *widening { "widening" } else { "narrowing" }
            ),
            Change::Key { from, to } => write!(
                f,
                "{t}: key changed from ({}) to ({})",
                from.join(", "),
                to.join(", ")
            ),
        }
    }
}

/// The columns of `rel` that form its key, as sinks apply rows by it (none for
/// `REPLICA IDENTITY FULL` or NOTHING).
fn key_of(rel: &Relation) -> Vec<String> {
    if rel.replica_identity == b'f' || rel.replica_identity == b'n' {
        return Vec::new();
    }
    rel.columns
        .iter()
        .filter(|c| c.key)
        .map(|c| c.name.clone())
        .collect()
}

/// What changed from `old` to `new` (the same table), or why that cannot be told.
pub fn diff(old: &Relation, new: &Relation) -> Result<Vec<Change>, String> {
    let same_table = old.id == new.id;
    // new column index → old column index
    let mut matched: Vec<Option<usize>> = vec![None; new.columns.len()];
    let mut used = vec![false; old.columns.len()];
    if same_table {
        for (i, c) in new.columns.iter().enumerate() {
            if c.attnum == 0 {
                continue;
            }
            if let Some(j) = old.columns.iter().position(|o| o.attnum == c.attnum) {
                if !used[j] {
                    matched[i] = Some(j);
                    used[j] = true;
                }
            }
        }
    }
    for (i, c) in new.columns.iter().enumerate() {
        if matched[i].is_some() {
            continue;
        }
        let j = old.columns.iter().enumerate().position(|(j, o)| {
            !used[j]
                && o.name == c.name
                // Both numbered and different: a dropped column and a new one that took
                // its name.
                && !(same_table && o.attnum != 0 && c.attnum != 0)
        });
        if let Some(j) = j {
            matched[i] = Some(j);
            used[j] = true;
        }
    }
    let gone: Vec<usize> = (0..old.columns.len()).filter(|&j| !used[j]).collect();
    let new_cols: Vec<usize> = (0..new.columns.len())
        .filter(|&i| matched[i].is_none())
        .collect();
    let numbered = |c: &Column| same_table && c.attnum != 0;
    // Columns gone and columns new: without numbers on all of them, a rename cannot be
    // told from a drop and an add.
    let told = gone.iter().all(|&j| numbered(&old.columns[j]))
        && new_cols.iter().all(|&i| numbered(&new.columns[i]));
    if !gone.is_empty() && !new_cols.is_empty() && !told {
        let names = |cols: &[Column], idx: &[usize]| {
            idx.iter()
                .map(|&k| cols[k].name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(format!(
            "column(s) {} are gone and column(s) {} are new, and the stream does not say \
             whether that is a rename or a drop and an add (no column numbers)",
            names(&old.columns, &gone),
            names(&new.columns, &new_cols),
        ));
    }
    let mut out = Vec::new();
    for (i, m) in matched.iter().enumerate() {
        let to = &new.columns[i];
        let Some(j) = *m else {
            continue;
        };
        let from = &old.columns[j];
        if from.name != to.name {
            out.push(Change::Rename {
                from: from.name.clone(),
                to: to.name.clone(),
            });
        }
        if from.type_oid != to.type_oid || from.type_modifier != to.type_modifier {
            out.push(Change::Type {
                from: from.clone(),
                to: to.clone(),
                widening: widening(&from.type_name, &to.type_name),
            });
        }
    }
    for &j in &gone {
        out.push(Change::Drop(old.columns[j].name.clone()));
    }
    for &i in &new_cols {
        out.push(Change::Add(new.columns[i].clone()));
    }
    // The old key under the columns' new names.
    let renamed = |name: &str| -> String {
        matched
            .iter()
            .enumerate()
            .find(|(_, m)| m.is_some_and(|j| old.columns[j].name == name))
            .map_or(name.to_string(), |(i, _)| new.columns[i].name.clone())
    };
    let old_key: Vec<String> = key_of(old).iter().map(|k| renamed(k)).collect();
    let new_key = key_of(new);
    if old_key != new_key {
        out.push(Change::Key {
            from: old_key,
            to: new_key,
        });
    }
    Ok(out)
}

/// Gives `new`'s unnumbered columns the numbers their namesakes have in `old` (the same
/// table, as the sink knows it), as [`diff`] matched them by name.
///
/// pgoutput sends a table's relation again after any invalidation of it (an autovacuum
/// on a busy table is enough, and every reconnect), as the table was at that point of
/// the WAL; relay-inner numbers the columns from the catalog as it is when the relation
/// arrives, and when later DDL has dropped a column and added another after it, it
/// cannot tell which of the two the relation's column is and leaves it unnumbered.
/// Known without its number, the column's next change would then be refused as
/// ambiguous; the number the sink already had for it is the right one.
pub fn keep_numbers(old: &Relation, new: &mut Relation) {
    if old.id != new.id {
        return;
    }
    for i in 0..new.columns.len() {
        if new.columns[i].attnum != 0 {
            continue;
        }
        let found = old.columns.iter().find(|o| {
            o.attnum != 0
                && o.name == new.columns[i].name
                && !new.columns.iter().any(|c| c.attnum == o.attnum)
        });
        if let Some(o) = found {
            new.columns[i].attnum = o.attnum;
        }
    }
}

/// Renames `rel`'s columns (a relation older than `known`, read again by a replay) to
/// the names they have in `known`, by attnum.
pub fn map_names(known: &Relation, rel: &mut Relation) {
    if known.id != rel.id {
        return;
    }
    for c in rel.columns.iter_mut().filter(|c| c.attnum != 0) {
        if let Some(k) = known.columns.iter().find(|k| k.attnum == c.attnum) {
            c.name.clone_from(&k.name);
        }
    }
}

/// A type as `format_type` writes it: its name, its modifiers, its array depth.
fn parse_type(t: &str) -> (String, Vec<u32>, usize) {
    let mut s = t.trim();
    let mut dims = 0;
    while let Some(r) = s.strip_suffix("[]") {
        s = r.trim_end();
        dims += 1;
    }
    let (name, mods) = match (s.find('('), s.find(')')) {
        (Some(a), Some(b)) if a < b => {
            let mods = s[a + 1..b]
                .split(',')
                .filter_map(|m| m.trim().parse().ok())
                .collect();
            (format!("{}{}", s[..a].trim_end(), &s[b + 1..]), mods)
        }
        _ => (s.to_string(), Vec::new()),
    };
    (name, mods, dims)
}

/// Whether every value of type `from` is a value of type `to` (both as `format_type`
/// writes them): the widenings a sink applies without asking.
pub fn widening(from: &str, to: &str) -> bool {
    let (fname, fmods, fdims) = parse_type(from);
    let (tname, tmods, tdims) = parse_type(to);
    if fdims != tdims {
        return false;
    }
    if fname == tname && fmods == tmods {
        return true;
    }
    // Digits an integer type needs in a numeric.
    let int_digits = |n: &str| match n {
        "smallint" => Some(5),
        "integer" => Some(10),
        "bigint" => Some(19),
        _ => None,
    };
    let rank = |n: &str| match n {
        "smallint" => 1,
        "integer" => 2,
        "bigint" => 3,
        _ => 0,
    };
    match (fname.as_str(), tname.as_str()) {
        (f, t) if rank(f) > 0 && rank(t) > 0 => rank(f) <= rank(t),
        (f, "numeric") if int_digits(f).is_some() => match tmods.as_slice() {
            [] => true,
            [p] => *p >= int_digits(f).unwrap_or(u32::MAX),
            [p, s] => p.saturating_sub(*s) >= int_digits(f).unwrap_or(u32::MAX),
            _ => false,
        },
        ("numeric", "numeric") => match (fmods.as_slice(), tmods.as_slice()) {
            (_, []) => true,
            ([p], [p2]) => p2 >= p,
            ([p], [p2, s2]) => p2.saturating_sub(*s2) >= *p,
            ([p, s], [p2]) => *s == 0 && p2 >= p,
            ([p, s], [p2, s2]) => s2 >= s && p2.saturating_sub(*s2) >= p.saturating_sub(*s),
            _ => false,
        },
        ("real", "double precision") => true,
        ("character varying", "text") | ("character", "text") => true,
        ("character varying", "character varying") => match (fmods.as_slice(), tmods.as_slice()) {
            (_, []) => true,
            ([n], [m]) => m >= n,
            _ => false,
        },
        (
            "timestamp without time zone" | "timestamp with time zone" | "time without time zone",
            _,
        ) if fname == tname => match (fmods.as_slice(), tmods.as_slice()) {
            (_, []) => true,
            ([n], [m]) => m >= n,
            _ => false,
        },
        _ => false,
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct FileColumn {
    name: String,
    type_oid: u32,
    type_modifier: i32,
    #[serde(rename = "type")]
    type_name: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    key: bool,
    #[serde(default)]
    attnum: u16,
}

#[derive(Debug, Serialize, Deserialize)]
struct FileTable {
    /// Store seq of the record the definition was first committed from.
    seq: u64,
    rel: u32,
    replica_identity: String,
    columns: Vec<FileColumn>,
}

#[derive(Debug, Serialize, Deserialize)]
struct File {
    sink: String,
    source: String,
    tables: BTreeMap<String, FileTable>,
}

/// What a sink has committed of each table's definition, and the file it is kept in.
#[derive(Debug, Clone, Default)]
pub struct Known {
    path: Option<PathBuf>,
    sink: String,
    source: String,
    /// `schema.table` → (seq it was seen at, relation).
    tables: HashMap<String, (u64, Relation)>,
}

impl Known {
    /// The file of sink `sink` under the store root `root` (`_sinks/NAME.schema.json`).
    pub fn path(root: &Path, sink: &str) -> PathBuf {
        root.join("_sinks").join(format!("{sink}.schema.json"))
    }

    /// Loads the definitions sink `sink` committed; empty when there is no file, or it
    /// belongs to another source (the name was reused). An unreadable file is an error.
    pub fn load(path: Option<PathBuf>, sink: &str, source: &str) -> Result<Known, String> {
        let mut k = Known {
            path: path.clone(),
            sink: sink.to_string(),
            source: source.to_string(),
            tables: HashMap::new(),
        };
        let Some(path) = path else {
            return Ok(k);
        };
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(k),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let f: File = serde_json::from_slice(&text).map_err(|e| {
            format!(
                "{}: {e} (remove the file: the sink then takes the target's tables as they are)",
                path.display()
            )
        })?;
        if f.source != source {
            return Ok(k);
        }
        for (name, t) in f.tables {
            let (schema, table) = name.split_once('.').unwrap_or(("", &name));
            let rel = Relation {
                id: t.rel,
                schema: schema.to_string(),
                name: table.to_string(),
                replica_identity: t.replica_identity.bytes().next().unwrap_or(b'd'),
                columns: t
                    .columns
                    .into_iter()
                    .map(|c| Column {
                        name: c.name,
                        type_oid: c.type_oid,
                        type_modifier: c.type_modifier,
                        type_name: c.type_name,
                        key: c.key,
                        attnum: c.attnum,
                    })
                    .collect(),
            };
            k.tables.insert(name, (t.seq, rel));
        }
        Ok(k)
    }

    /// The definition committed for `table`, with the seq it came at.
    pub fn get(&self, table: &str) -> Option<&(u64, Relation)> {
        self.tables.get(table)
    }

    /// Takes `rel` (seen at `seq`) as `table`'s definition.
    pub fn set(&mut self, seq: u64, rel: Relation) {
        self.tables.insert(rel.qualified(), (seq, rel));
    }

    /// Writes the file atomically (nothing without a path).
    pub fn save(&self) -> Result<(), String> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let f = File {
            sink: self.sink.clone(),
            source: self.source.clone(),
            tables: self
                .tables
                .iter()
                .map(|(name, (seq, r))| {
                    (
                        name.clone(),
                        FileTable {
                            seq: *seq,
                            rel: r.id,
                            replica_identity: (r.replica_identity as char).to_string(),
                            columns: r
                                .columns
                                .iter()
                                .map(|c| FileColumn {
                                    name: c.name.clone(),
                                    type_oid: c.type_oid,
                                    type_modifier: c.type_modifier,
                                    type_name: c.type_name.clone(),
                                    key: c.key,
                                    attnum: c.attnum,
                                })
                                .collect(),
                        },
                    )
                })
                .collect(),
        };
        let body = serde_json::to_vec_pretty(&f).map_err(|e| e.to_string())?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        routy_log::disk::write_atomic(path, &body).map_err(|e| format!("{}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, ty: &str, attnum: u16, key: bool) -> Column {
        let oid = match ty {
            "integer" => 23,
            "bigint" => 20,
            "text" => 25,
            _ => 1043,
        };
        Column {
            name: name.into(),
            type_oid: oid,
            type_modifier: if ty.starts_with("character varying(") {
                ty[18..ty.len() - 1].parse::<i32>().unwrap() + 4
            } else {
                -1
            },
            type_name: ty.into(),
            key,
            attnum,
        }
    }

    fn rel(cols: Vec<Column>) -> Relation {
        Relation {
            id: 77,
            schema: "public".into(),
            name: "t".into(),
            replica_identity: b'd',
            columns: cols,
        }
    }

    #[test]
    fn renames_adds_drops_types_and_keys_are_told_apart() {
        let old = rel(vec![
            col("id", "integer", 1, true),
            col("a", "text", 2, false),
            col("b", "character varying(10)", 3, false),
            col("c", "text", 4, false),
        ]);
        // a renamed to a2, b widened, c dropped, d added, id widened.
        let new = rel(vec![
            col("id", "bigint", 1, true),
            col("a2", "text", 2, false),
            col("b", "text", 3, false),
            col("d", "text", 5, false),
        ]);
        let ch = diff(&old, &new).unwrap();
        assert!(ch.contains(&Change::Rename {
            from: "a".into(),
            to: "a2".into()
        }));
        assert!(ch.contains(&Change::Drop("c".into())));
        assert_eq!(
            ch.iter()
                .filter(|c| matches!(c, Change::Type { widening: true, .. }))
                .count(),
            2,
            "{ch:?}"
        );
        assert!(ch
            .iter()
            .any(|c| matches!(c, Change::Add(col) if col.name == "d")));
        assert!(
            !ch.iter().any(|c| matches!(c, Change::Key { .. })),
            "{ch:?}"
        );

        // The last column dropped and a new one of the same type in its place: with
        // numbers a drop and an add, never a rename.
        let new = rel(vec![
            col("id", "integer", 1, true),
            col("a", "text", 2, false),
            col("b", "character varying(10)", 3, false),
            col("e", "text", 5, false),
        ]);
        let ch = diff(&old, &new).unwrap();
        assert_eq!(ch.len(), 2, "{ch:?}");
        assert!(ch.contains(&Change::Drop("c".into())));

        // Without numbers that is ambiguous, and refused.
        let strip = |mut r: Relation| {
            r.columns.iter_mut().for_each(|c| c.attnum = 0);
            r
        };
        let err = diff(&strip(old.clone()), &strip(new)).unwrap_err();
        assert!(
            err.contains("c are gone") && err.contains("e are new"),
            "{err}"
        );
        // Without numbers, an added column alone is clear.
        let mut more = strip(old.clone());
        more.columns.push(col("z", "text", 0, false));
        assert_eq!(diff(&strip(old.clone()), &more).unwrap().len(), 1);
    }

    #[test]
    fn a_resent_relation_keeps_the_numbers_the_sink_knew() {
        let known = rel(vec![
            col("id", "integer", 1, true),
            col("d", "text", 6, false),
            col("e", "text", 7, false),
        ]);
        // Sent again after e was dropped and f added (relay-inner could not number e).
        let mut resent = rel(vec![
            col("id", "integer", 1, true),
            col("d", "text", 6, false),
            col("e", "text", 0, false),
        ]);
        assert_eq!(diff(&known, &resent).unwrap(), Vec::new());
        keep_numbers(&known, &mut resent);
        assert_eq!(resent, known);
        // Then the change itself is told: e dropped, f added.
        let next = rel(vec![
            col("id", "integer", 1, true),
            col("d", "text", 6, false),
            col("f", "text", 8, false),
        ]);
        let ch = diff(&resent, &next).unwrap();
        assert_eq!(ch.len(), 2, "{ch:?}");
        assert!(ch.contains(&Change::Drop("e".into())), "{ch:?}");
        // A number already used in the relation is not given twice; another table's
        // numbers are not taken.
        let mut taken = rel(vec![
            col("id", "integer", 1, true),
            col("e", "text", 0, false),
            col("x", "text", 7, false),
        ]);
        keep_numbers(&known, &mut taken);
        assert_eq!(taken.columns[1].attnum, 0);
        let mut other = rel(vec![col("e", "text", 0, false)]);
        other.id = 78;
        keep_numbers(&known, &mut other);
        assert_eq!(other.columns[0].attnum, 0);
    }

    #[test]
    fn key_changes_and_narrowing_are_reported() {
        let old = rel(vec![
            col("id", "bigint", 1, true),
            col("a", "text", 2, false),
        ]);
        let new = rel(vec![
            col("id", "integer", 1, true),
            col("a", "text", 2, true),
        ]);
        let ch = diff(&old, &new).unwrap();
        assert!(ch.contains(&Change::Key {
            from: vec!["id".into()],
            to: vec!["id".into(), "a".into()]
        }));
        assert!(ch.iter().any(|c| matches!(
            c,
            Change::Type {
                widening: false,
                ..
            }
        )));
        // A renamed key column is not a key change.
        let new = rel(vec![
            col("ident", "bigint", 1, true),
            col("a", "text", 2, false),
        ]);
        let ch = diff(&old, &new).unwrap();
        assert_eq!(
            ch,
            vec![Change::Rename {
                from: "id".into(),
                to: "ident".into()
            }]
        );
    }

    #[test]
    fn widenings() {
        for (a, b) in [
            ("integer", "bigint"),
            ("smallint", "integer"),
            ("character varying(10)", "text"),
            ("character varying(10)", "character varying(20)"),
            ("character varying(10)", "character varying"),
            ("numeric(10,2)", "numeric(12,2)"),
            ("numeric(10,2)", "numeric"),
            ("integer", "numeric(12,0)"),
            ("real", "double precision"),
            ("integer[]", "bigint[]"),
            ("timestamp(3) with time zone", "timestamp with time zone"),
        ] {
            assert!(widening(a, b), "{a} -> {b}");
        }
        for (a, b) in [
            ("bigint", "integer"),
            ("text", "character varying(10)"),
            ("character varying(20)", "character varying(10)"),
            ("numeric(12,2)", "numeric(10,2)"),
            ("numeric(10,2)", "numeric(10,4)"),
            ("integer", "text"),
            ("text", "integer"),
            ("integer[]", "bigint"),
            ("bigint", "numeric(10,0)"),
        ] {
            assert!(!widening(a, b), "{a} -> {b}");
        }
    }

    #[test]
    fn replayed_relations_take_todays_names() {
        let today = rel(vec![
            col("id", "integer", 1, true),
            col("b", "text", 2, false),
        ]);
        let mut old = rel(vec![
            col("id", "integer", 1, true),
            col("a", "text", 2, false),
        ]);
        map_names(&today, &mut old);
        assert_eq!(old.columns[1].name, "b");
    }

    #[test]
    fn the_file_round_trips_and_belongs_to_its_source() {
        let dir = tempfile::tempdir().unwrap();
        let path = Known::path(dir.path(), "pg");
        let mut k = Known::load(Some(path.clone()), "pg", "site/db").unwrap();
        assert!(k.get("public.t").is_none());
        let r = rel(vec![
            col("id", "integer", 1, true),
            col("a", "text", 2, false),
        ]);
        k.set(42, r.clone());
        k.save().unwrap();
        let k2 = Known::load(Some(path.clone()), "pg", "site/db").unwrap();
        assert_eq!(k2.get("public.t"), Some(&(42, r)));
        assert!(Known::load(Some(path.clone()), "pg", "other/db")
            .unwrap()
            .get("public.t")
            .is_none());
        std::fs::write(&path, b"{nope").unwrap();
        let err = Known::load(Some(path), "pg", "site/db").unwrap_err();
        assert!(err.contains("remove the file"), "{err}");
    }
}
