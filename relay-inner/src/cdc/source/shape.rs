//! Filters inside the network: what of each table may leave the source.
//!
//! A table's `columns` / `exclude_columns` and `where` go into the publication (PostgreSQL
//! 15 column lists and row filters) when PostgreSQL allows it without refusing the
//! application's own writes: a column list must keep the replica identity's columns, and a
//! row filter may read only those, or any column under `REPLICA IDENTITY FULL`.
//! Excluded data then never leaves the database server. What the publication cannot do
//! (excluding columns of a `REPLICA IDENTITY FULL` table) and every `mask` is done here,
//! in relay-inner, on each relation and row before the spool: nothing excluded or
//! unmasked reaches the spool, the tunnel, the store or a sink. A row filter the
//! publication cannot take (it reads a column outside the replica identity) is refused
//! at start with what to do: PostgreSQL would otherwise refuse the source's UPDATEs.

use std::collections::{BTreeMap, HashMap};

use relay_proto::cdc::{Relation, Value};

use super::SourceError;
use crate::config::{identifiers, Mask, SourceConfig, TableFilter};

/// A session's filters: what relay-inner does to rows, and each table's row filter (for
/// its copy).
#[derive(Debug, Clone, Default)]
pub(crate) struct Filters {
    /// Masks and exclusions.
    pub(crate) shaper: Shaper,
    /// `schema.table` → row filter.
    pub(crate) wheres: HashMap<String, String>,
}

/// What the catalog says of a table, for planning its filter.
#[derive(Debug, Clone)]
pub(crate) struct TableInfo {
    /// `relreplident`: `d`, `i`, `f` or `n`.
    pub(crate) replident: u8,
    /// Its columns (not dropped, not generated), in order.
    pub(crate) columns: Vec<String>,
    /// The replica identity's columns (none for FULL and NOTHING).
    pub(crate) keys: Vec<String>,
}

/// What goes into the publication for one table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Pushdown {
    /// The column list (None: every column).
    pub(crate) columns: Option<Vec<String>>,
    /// The row filter.
    pub(crate) where_: Option<String>,
}

impl Pushdown {
    /// A text that changes when the pushed filter does (kept in the state file).
    pub(crate) fn fingerprint(&self) -> String {
        format!(
            "columns={};where={}",
            self.columns
                .as_ref()
                .map_or("*".to_string(), |c| c.join(",")),
            self.where_.as_deref().unwrap_or("")
        )
    }
}

/// What relay-inner does to one table's rows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Local {
    /// Columns dropped here (the publication could not).
    pub(crate) exclude: Vec<String>,
    /// Masked columns.
    pub(crate) mask: BTreeMap<String, Mask>,
}

/// Splits a table's filter into what the publication does and what relay-inner does, or
/// refuses it with what to do.
pub(crate) fn plan(
    name: &str,
    filter: &TableFilter,
    info: &TableInfo,
    server_version: i32,
) -> Result<(Pushdown, Local), SourceError> {
    let fatal = |m: String| SourceError::Fatal(format!("postgres.tables entry {name}: {m}"));
    let mut named: Vec<(&str, &str)> = Vec::new();
    if let Some(c) = &filter.columns {
        named.extend(c.iter().map(|c| ("columns", c.as_str())));
    }
    named.extend(
        filter
            .exclude_columns
            .iter()
            .map(|c| ("exclude_columns", c.as_str())),
    );
    named.extend(filter.mask.keys().map(|c| ("mask", c.as_str())));
    for (key, c) in named {
        if !info.columns.iter().any(|x| x == c) {
            return Err(fatal(format!(
                "{key} names column {c:?}, which the table does not have (it has {})",
                info.columns.join(", ")
            )));
        }
    }
    let kept: Vec<String> = info
        .columns
        .iter()
        .filter(|c| filter.keeps(c))
        .cloned()
        .collect();
    if kept.is_empty() {
        return Err(fatal("no column is left to send".into()));
    }
    for k in &info.keys {
        if !kept.contains(k) {
            return Err(fatal(format!(
                "key column {k} must be sent (the sinks apply updates and deletes by it)"
            )));
        }
        match filter.mask.get(k) {
            Some(Mask::Null) | Some(Mask::Literal(_)) => {
                return Err(fatal(format!(
                "key column {k} can only be masked with hash (null or a literal would merge rows)"
            )))
            }
            _ => {}
        }
    }
    let full = info.replident == b'f';
    let mut push = Pushdown::default();
    let mut local = Local {
        mask: filter.mask.clone(),
        ..Local::default()
    };
    if kept.len() < info.columns.len() {
        if full || server_version < 150000 {
            // PostgreSQL wants every replica identity column in a column list; under FULL
            // that is every column: drop them here.
            local.exclude = info
                .columns
                .iter()
                .filter(|c| !kept.contains(c))
                .cloned()
                .collect();
        } else {
            push.columns = Some(kept.clone());
        }
    }
    if let Some(w) = &filter.where_ {
        if server_version < 150000 {
            return Err(fatal(
                "where needs PostgreSQL 15 or later (publication row filters)".into(),
            ));
        }
        let lower: Vec<String> = info.columns.iter().map(|c| c.to_lowercase()).collect();
        let read: Vec<String> = identifiers(w)
            .into_iter()
            .filter_map(|id| {
                info.columns
                    .iter()
                    .zip(&lower)
                    .find(|(c, l)| **c == id || **l == id)
                    .map(|(c, _)| c.clone())
            })
            .collect();
        if !full && info.replident != b'n' {
            if let Some(c) = read.iter().find(|c| !info.keys.contains(c)) {
                return Err(fatal(format!(
                    "where reads column {c}, which is not part of the table's replica identity ({}): \
                     PostgreSQL would then refuse UPDATE and DELETE on the table. Set \
                     ALTER TABLE {name} REPLICA IDENTITY FULL on the source, or filter on key columns only",
                    if info.keys.is_empty() { "none".to_string() } else { info.keys.join(", ") }
                )));
            }
        }
        push.where_ = Some(w.clone());
    }
    Ok((push, local))
}

/// What relay-inner does to the rows of one relation (built from its [`Local`]).
#[derive(Debug, Clone)]
pub(crate) struct RelPlan {
    /// Per source column: kept, and its mask.
    cols: Vec<(bool, Option<Mask>)>,
}

/// The masks and exclusions of one source, with the hash key.
#[derive(Clone, Default)]
pub(crate) struct Shaper {
    tables: HashMap<String, Local>,
    /// The `hash` masks' key, made once (not per value).
    key: Option<ring::hmac::Key>,
}

impl std::fmt::Debug for Shaper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shaper")
            .field("tables", &self.tables)
            .finish()
    }
}

impl Shaper {
    /// The shaper of `cfg` with `local` per table (tables with nothing to do left out).
    pub(crate) fn new(
        cfg: &SourceConfig,
        local: HashMap<String, Local>,
    ) -> Result<Shaper, SourceError> {
        let key = match &cfg.mask_key_file {
            Some(p) if local.values().any(|l| l.mask.values().any(Mask::is_hash)) => {
                let k = std::fs::read(p).map_err(|e| {
                    SourceError::Fatal(format!("postgres.mask_key_file: {}: {e}", p.display()))
                })?;
                let k = k.trim_ascii().to_vec();
                if k.len() < 16 {
                    return Err(SourceError::Fatal(format!(
                        "postgres.mask_key_file: {}: the key must be at least 16 bytes",
                        p.display()
                    )));
                }
                Some(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &k))
            }
            _ => None,
        };
        Ok(Shaper {
            tables: local
                .into_iter()
                .filter(|(_, l)| *l != Local::default())
                .collect(),
            key,
        })
    }

    /// The masks of `table`, if any.
    pub(crate) fn masks(&self, table: &str) -> Option<&BTreeMap<String, Mask>> {
        self.tables.get(table).map(|l| &l.mask)
    }

    /// What to do to `rel`'s rows, and the relation as it leaves relay-inner; None when
    /// nothing is done to the table.
    pub(crate) fn plan(&self, rel: &Relation) -> Option<(RelPlan, Relation)> {
        let local = self.tables.get(&rel.qualified())?;
        let mut out = rel.clone();
        out.columns.clear();
        let mut cols = Vec::with_capacity(rel.columns.len());
        for c in &rel.columns {
            let keep = !local.exclude.contains(&c.name);
            let mask = local.mask.get(&c.name).cloned();
            if keep {
                let mut c = c.clone();
                if matches!(mask, Some(Mask::Hash) | Some(Mask::Literal(_))) {
                    // The values are text now.
                    c.type_oid = 25;
                    c.type_modifier = -1;
                    c.type_name = "text".into();
                }
                out.columns.push(c);
            }
            cols.push((keep, mask));
        }
        Some((RelPlan { cols }, out))
    }

    /// `vals` (a row of the relation `plan` was made for) as it leaves relay-inner.
    pub(crate) fn apply(&self, plan: &RelPlan, vals: Vec<Value>) -> Vec<Value> {
        let mut out = Vec::with_capacity(vals.len());
        for (v, (keep, mask)) in vals.into_iter().zip(&plan.cols) {
            if !keep {
                continue;
            }
            out.push(match (mask, v) {
                (_, Value::Unchanged) => Value::Unchanged,
                (None, v) => v,
                (Some(Mask::Null), _) => Value::Null,
                (Some(_), Value::Null) => Value::Null,
                (Some(Mask::Literal(l)), _) => Value::Text(l.clone()),
                (Some(Mask::Hash), Value::Text(t)) => Value::Text(self.hash(&t)),
            });
        }
        out
    }

    /// HMAC-SHA256 of `value` under the key, as hex.
    fn hash(&self, value: &str) -> String {
        use std::fmt::Write as _;
        // A hash mask makes the shaper read the key (Shaper::new): it is there.
        let Some(key) = &self.key else {
            return String::new();
        };
        let tag = ring::hmac::sign(key, value.as_bytes());
        let mut s = String::with_capacity(64);
        for b in tag.as_ref() {
            let _ = write!(s, "{b:02x}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_proto::cdc::Column;

    fn info(replident: u8) -> TableInfo {
        TableInfo {
            replident,
            columns: vec!["id".into(), "region".into(), "email".into(), "notes".into()],
            keys: if replident == b'd' {
                vec!["id".into()]
            } else {
                Vec::new()
            },
        }
    }

    fn filter(yaml_like: impl FnOnce(&mut TableFilter)) -> TableFilter {
        let mut f = TableFilter::default();
        yaml_like(&mut f);
        f
    }

    #[test]
    fn what_the_publication_can_take_goes_there() {
        let f = filter(|f| {
            f.exclude_columns = vec!["notes".into()];
            f.where_ = Some("id > 10".into());
        });
        let (push, local) = plan("public.c", &f, &info(b'd'), 150000).unwrap();
        assert_eq!(
            push.columns,
            Some(vec!["id".into(), "region".into(), "email".into()])
        );
        assert_eq!(push.where_.as_deref(), Some("id > 10"));
        assert!(local.exclude.is_empty());
        // Under FULL the column list cannot leave anything out: relay-inner drops it.
        let f = filter(|f| {
            f.exclude_columns = vec!["notes".into()];
            f.where_ = Some("region = 'eu'".into());
        });
        let (push, local) = plan("public.c", &f, &info(b'f'), 150000).unwrap();
        assert_eq!(push.columns, None);
        assert_eq!(local.exclude, vec!["notes".to_string()]);
        assert!(push.where_.is_some());
    }

    #[test]
    fn filters_postgres_would_refuse_writes_for_are_refused() {
        let f = filter(|f| f.where_ = Some("Region = 'eu'".into()));
        let e = plan("public.c", &f, &info(b'd'), 150000)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("column region") && e.contains("REPLICA IDENTITY FULL"),
            "{e}"
        );
        let f = filter(|f| f.columns = Some(vec!["region".into()]));
        let e = plan("public.c", &f, &info(b'd'), 150000)
            .unwrap_err()
            .to_string();
        assert!(e.contains("key column id must be sent"), "{e}");
        let f = filter(|f| {
            f.mask.insert("id".into(), Mask::Null);
        });
        assert!(plan("public.c", &f, &info(b'd'), 150000).is_err());
        let f = filter(|f| f.exclude_columns = vec!["nope".into()]);
        let e = plan("public.c", &f, &info(b'd'), 150000)
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"nope\""), "{e}");
    }

    #[test]
    fn masks_and_exclusions_shape_relations_and_rows() {
        let col = |n: &str| Column {
            name: n.into(),
            type_oid: 23,
            type_modifier: -1,
            type_name: "integer".into(),
            key: n == "id",
            attnum: 0,
        };
        let rel = Relation {
            id: 1,
            schema: "public".into(),
            name: "c".into(),
            replica_identity: b'd',
            columns: ["id", "region", "email", "notes"].map(col).to_vec(),
        };
        let mut local = Local::default();
        local.exclude.push("notes".into());
        local.mask.insert("email".into(), Mask::Hash);
        local
            .mask
            .insert("region".into(), Mask::Literal("x".into()));
        let sh = Shaper {
            tables: [("public.c".to_string(), local)].into(),
            key: Some(ring::hmac::Key::new(
                ring::hmac::HMAC_SHA256,
                b"0123456789abcdef",
            )),
        };
        let (p, out) = sh.plan(&rel).unwrap();
        assert_eq!(out.columns.len(), 3);
        assert_eq!(out.columns[2].type_name, "text");
        let t = |s: &str| Value::Text(s.into());
        let a = sh.apply(&p, vec![t("1"), t("eu"), t("a@b"), t("secret")]);
        let b = sh.apply(&p, vec![t("2"), Value::Null, t("a@b"), Value::Unchanged]);
        assert_eq!(a[1], t("x"));
        assert_eq!(b[1], Value::Null);
        assert_eq!(a[2], b[2], "equal values hash alike");
        assert!(matches!(&a[2], Value::Text(h) if h.len() == 64 && !h.contains("a@b")));
        assert_eq!(a.len(), 3);
        let other = Relation {
            name: "d".into(),
            ..rel
        };
        assert!(sh.plan(&other).is_none());
    }
}
