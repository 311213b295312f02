//! `cdc.sources[].postgres.tables`: each entry a `schema.table` name, or a map with the
//! name and what of the table may leave the source: `columns` or `exclude_columns`, a
//! row filter `where`, and `mask` (per column: `hash`, `null` or a literal).

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

/// How a column's values are replaced before they reach the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mask {
    /// A keyed hash (HMAC-SHA256 with the source's `mask_key_file`, hex): equal values
    /// give equal hashes, so they stay joinable, and cannot be read back.
    Hash,
    /// NULL.
    Null,
    /// This text instead of every non-NULL value.
    Literal(String),
}

impl Mask {
    /// The value written as text in place of a non-NULL value (`hash` needs the key).
    pub fn is_hash(&self) -> bool {
        matches!(self, Mask::Hash)
    }
}

/// What of a table may leave the source.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TableFilter {
    /// Only these columns (None: every column).
    pub columns: Option<Vec<String>>,
    /// Every column but these.
    pub exclude_columns: Vec<String>,
    /// Only rows for which this SQL expression is true.
    pub where_: Option<String>,
    /// Columns whose values are replaced.
    pub mask: BTreeMap<String, Mask>,
}

impl TableFilter {
    /// Whether anything is filtered.
    pub fn is_empty(&self) -> bool {
        self.columns.is_none()
            && self.exclude_columns.is_empty()
            && self.where_.is_none()
            && self.mask.is_empty()
    }

    /// Whether column `name` may leave the source.
    pub fn keeps(&self, name: &str) -> bool {
        self.columns
            .as_ref()
            .is_none_or(|c| c.iter().any(|c| c == name))
            && !self.exclude_columns.iter().any(|c| c == name)
    }
}

/// One entry as written.
#[derive(Debug)]
pub(super) enum RawTable {
    Name(String),
    Spec(RawTableSpec),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTableSpec {
    pub(super) name: String,
    pub(super) columns: Option<Vec<String>>,
    pub(super) exclude_columns: Option<Vec<String>>,
    #[serde(rename = "where")]
    pub(super) where_: Option<String>,
    pub(super) mask: Option<BTreeMap<String, Option<String>>>,
}

impl<'de> Deserialize<'de> for RawTable {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<RawTable, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawTable;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a table name (schema.table) or a map with name and filters")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawTable, E> {
                Ok(RawTable::Name(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, m: A) -> Result<RawTable, A::Error> {
                RawTableSpec::deserialize(de::value::MapAccessDeserializer::new(m))
                    .map(RawTable::Spec)
            }
        }
        d.deserialize_any(V)
    }
}

fn plain_ident(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 63
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
}

/// Whether `expr` may be put inside `WHERE (...)`: parentheses balanced and no `;`
/// outside quotes (it goes into the publication and into the copy's query).
fn valid_where(expr: &str) -> bool {
    let mut depth = 0i32;
    let mut quote: Option<char> = None;
    for c in expr.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '\'' | '"') => quote = Some(c),
            (None, '(') => depth += 1,
            (None, ')') => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            (None, ';') => return false,
            _ => {}
        }
    }
    depth == 0 && quote.is_none() && !expr.trim().is_empty() && !expr.contains('\0')
}

/// The identifiers an SQL expression mentions (unquoted ones lowercased, quoted ones as
/// written); string literals are skipped. Used to tell which columns a row filter reads.
pub fn identifiers(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = expr.chars().peekable();
    while let Some(c) = it.next() {
        match c {
            '\'' => {
                for d in it.by_ref() {
                    if d == '\'' {
                        break;
                    }
                }
            }
            '"' => {
                let mut s = String::new();
                for d in it.by_ref() {
                    if d == '"' {
                        break;
                    }
                    s.push(d);
                }
                out.push(s);
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let mut s = c.to_ascii_lowercase().to_string();
                while let Some(&d) = it.peek() {
                    if d.is_ascii_alphanumeric() || d == '_' || d == '$' {
                        s.push(d.to_ascii_lowercase());
                        it.next();
                    } else {
                        break;
                    }
                }
                out.push(s);
            }
            c if c.is_ascii_digit() => {
                while it
                    .peek()
                    .is_some_and(|d| d.is_ascii_alphanumeric() || *d == '.')
                {
                    it.next();
                }
            }
            _ => {}
        }
    }
    out
}

/// Checks one entry (`f`: its field path); returns its name and filter.
pub(super) fn validate(f: &str, t: RawTable) -> Result<(String, TableFilter), String> {
    let (name, spec) = match t {
        RawTable::Name(n) => (n, None),
        RawTable::Spec(s) => (s.name.clone(), Some(s)),
    };
    let ok = name
        .split_once('.')
        .is_some_and(|(a, b)| plain_ident(a) && plain_ident(b));
    if !ok {
        return Err(format!(
            "{f}: {name:?} is not schema.table (plain identifiers)"
        ));
    }
    let Some(s) = spec else {
        return Ok((name, TableFilter::default()));
    };
    let mut filter = TableFilter::default();
    let names = |key: &str, list: &[String]| -> Result<(), String> {
        if list.is_empty() {
            return Err(format!("{f}.{key}: empty"));
        }
        for (i, c) in list.iter().enumerate() {
            if c.is_empty() || c.len() > 63 || c.contains('\0') {
                return Err(format!("{f}.{key}[{i}]: {c:?} is not a column name"));
            }
            if list[..i].contains(c) {
                return Err(format!("{f}.{key}[{i}]: {c:?} is listed twice"));
            }
        }
        Ok(())
    };
    match (s.columns, s.exclude_columns) {
        (Some(_), Some(_)) => {
            return Err(format!("{f}: give columns or exclude_columns, not both"))
        }
        (Some(c), None) => {
            names("columns", &c)?;
            filter.columns = Some(c);
        }
        (None, Some(x)) => {
            names("exclude_columns", &x)?;
            filter.exclude_columns = x;
        }
        (None, None) => {}
    }
    if let Some(w) = s.where_ {
        if !valid_where(&w) {
            return Err(format!(
                "{f}.where: {w:?} is not one SQL expression (unbalanced parentheses or quotes, or a ';')"
            ));
        }
        filter.where_ = Some(w.trim().to_string());
    }
    for (col, m) in s.mask.unwrap_or_default() {
        if col.is_empty() || col.len() > 63 {
            return Err(format!("{f}.mask: {col:?} is not a column name"));
        }
        if !filter.keeps(&col) {
            return Err(format!(
                "{f}.mask.{col}: the column is not sent at all (columns / exclude_columns)"
            ));
        }
        let mask = match m.as_deref() {
            None | Some("null") => Mask::Null,
            Some("hash") => Mask::Hash,
            Some(lit) => Mask::Literal(lit.to_string()),
        };
        filter.mask.insert(col, mask);
    }
    Ok((name, filter))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_skip_literals_and_numbers() {
        assert_eq!(
            identifiers("region = 'eu' AND \"Tier\" IN (1, 2) OR lower(name) <> 'x''y'"),
            vec!["region", "and", "Tier", "in", "or", "lower", "name"]
        );
    }

    #[test]
    fn where_must_be_one_expression() {
        assert!(valid_where("region = 'eu'"));
        assert!(valid_where("(a > 1) AND b = ';'"));
        assert!(!valid_where("a = 1; DROP TABLE x"));
        assert!(!valid_where("a = (1"));
        assert!(!valid_where("a = 1) OR (true"));
        assert!(!valid_where("a = 'x"));
        assert!(!valid_where("  "));
    }
}
