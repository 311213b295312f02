//! PostgreSQL types to ClickHouse types, and text-format values to `JSONEachRow` fields.
//!
//! The mapping (by the column's type as the source names it, `format_type`):
//!
//! | PostgreSQL | ClickHouse |
//! |---|---|
//! | `smallint`, `integer`, `bigint` | `Int16`, `Int32`, `Int64` |
//! | `real`, `double precision` | `Float32`, `Float64` (NaN and ±Infinity kept) |
//! | `numeric(p,s)`, p ≤ 76 | `Decimal(p,s)` |
//! | `numeric` without precision | `String` (the exact text; `toDecimal256OrNull(x, s)` to compute) |
//! | `boolean` | `Bool` |
//! | `uuid` | `UUID` |
//! | `date` | `Date32` |
//! | `timestamp with time zone`, `timestamp` | `DateTime64(6, 'UTC')` (converted to UTC) |
//! | `bytea` | `String` (the raw bytes) |
//! | `json`, `jsonb`, `text`, `varchar`, `char`, every other type | `String` (the text) |
//! | `T[]` of a type above | `Array(Nullable(T))` (one-dimensional) |
//!
//! Columns are `Nullable` but for the key columns of a table with a primary key (or
//! replica identity index), which cannot be NULL on the source. Dates and times outside
//! ClickHouse's range (before 1900-01-01, after 2299-12-31, `-infinity`, `infinity`, BC)
//! are written as the range's ends.

use std::io::Write as _;

/// How one column's values are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conv {
    /// Quoted text (numbers, decimals, uuids, strings: ClickHouse parses quoted numbers).
    Text,
    /// `t`/`f` to `true`/`false`.
    Bool,
    /// PostgreSQL bytea text (`\x...` or escape format) to raw bytes.
    Bytea,
    /// A timestamp (with or without time zone) to `YYYY-MM-DD hh:mm:ss.ffffff` in UTC.
    Timestamp,
    /// A date to `YYYY-MM-DD`.
    Date,
}

/// A column's ClickHouse type and how its values are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColType {
    /// The type without `Nullable`, e.g. `Decimal(12, 2)`, `Array(Nullable(Int32))`.
    pub base: String,
    /// Element (or scalar) conversion.
    pub conv: Conv,
    /// A one-dimensional array of `conv` values.
    pub array: bool,
}

impl ColType {
    /// The column type in `CREATE TABLE`: `Nullable(base)` unless `not_null` (arrays are
    /// never `Nullable`: a NULL array is written as `[]`).
    pub fn ddl(&self, not_null: bool) -> String {
        if not_null || self.array {
            self.base.clone()
        } else {
            format!("Nullable({})", self.base)
        }
    }
}

/// The ClickHouse type for a PostgreSQL type name.
pub fn map_type(pg: &str) -> ColType {
    let pg = pg.trim();
    if let Some(elem) = pg.strip_suffix("[]") {
        let (base, conv) = scalar(elem);
        return ColType {
            base: format!("Array(Nullable({base}))"),
            conv,
            array: true,
        };
    }
    let (base, conv) = scalar(pg);
    ColType {
        base,
        conv,
        array: false,
    }
}

fn scalar(pg: &str) -> (String, Conv) {
    let s = |t: &str| (t.to_string(), Conv::Text);
    match pg {
        "smallint" | "int2" => s("Int16"),
        "integer" | "int" | "int4" => s("Int32"),
        "bigint" | "int8" => s("Int64"),
        "real" | "float4" => s("Float32"),
        "double precision" | "float8" => s("Float64"),
        "boolean" | "bool" => ("Bool".into(), Conv::Bool),
        "uuid" => s("UUID"),
        "date" => ("Date32".into(), Conv::Date),
        "bytea" => ("String".into(), Conv::Bytea),
        _ if pg.starts_with("timestamp") => ("DateTime64(6, 'UTC')".into(), Conv::Timestamp),
        _ => {
            if let Some(args) = pg
                .strip_prefix("numeric(")
                .and_then(|r| r.strip_suffix(')'))
            {
                let mut it = args.split(',').map(|x| x.trim().parse::<u32>());
                if let (Some(Ok(p)), scale, None) = (it.next(), it.next(), it.next()) {
                    let sc = match scale {
                        None => Some(0),
                        Some(Ok(sc)) => Some(sc),
                        Some(Err(_)) => None,
                    };
                    if let Some(sc) = sc.filter(|sc| (1..=76).contains(&p) && *sc <= p) {
                        return (format!("Decimal({p}, {sc})"), Conv::Text);
                    }
                }
            }
            s("String")
        }
    }
}

/// A value that cannot be written as its column's type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadValue(pub String);

impl std::fmt::Display for BadValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub use super::super::message::json_str;

/// Appends one non-NULL value of `conv` (a scalar, or an array element).
pub fn write_scalar(out: &mut Vec<u8>, conv: Conv, text: &str) -> Result<(), BadValue> {
    match conv {
        Conv::Text => json_str(out, text.as_bytes()),
        Conv::Bool => match text {
            "t" | "true" => out.extend_from_slice(b"true"),
            "f" | "false" => out.extend_from_slice(b"false"),
            _ => return Err(BadValue(format!("{text:?} is not a boolean"))),
        },
        Conv::Bytea => json_str(out, &bytea(text)?),
        Conv::Timestamp => {
            out.push(b'"');
            timestamp(out, text)?;
            out.push(b'"');
        }
        Conv::Date => {
            out.push(b'"');
            date(out, text)?;
            out.push(b'"');
        }
    }
    Ok(())
}

/// Appends a column's value: `null`, a scalar, or an array.
pub fn write_value(out: &mut Vec<u8>, ty: &ColType, text: Option<&str>) -> Result<(), BadValue> {
    match text {
        None if ty.array => out.extend_from_slice(b"[]"),
        None => out.extend_from_slice(b"null"),
        Some(t) if ty.array => {
            let elems = parse_array(t)?;
            out.push(b'[');
            for (i, e) in elems.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                match e {
                    None => out.extend_from_slice(b"null"),
                    Some(v) => write_scalar(out, ty.conv, v)?,
                }
            }
            out.push(b']');
        }
        Some(t) => write_scalar(out, ty.conv, t)?,
    }
    Ok(())
}

/// bytea's text forms: `\x` + hex, or the escape format (`\\`, `\ooo`, other bytes as is).
pub fn bytea(text: &str) -> Result<Vec<u8>, BadValue> {
    let b = text.as_bytes();
    if let Some(hex) = b.strip_prefix(b"\\x") {
        if hex.len() % 2 != 0 {
            return Err(BadValue("bytea hex of odd length".into()));
        }
        let nib = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        };
        return hex
            .chunks(2)
            .map(|p| match (nib(p[0]), nib(p[1])) {
                (Some(h), Some(l)) => Ok(h << 4 | l),
                _ => Err(BadValue("bytea hex with a non-hex digit".into())),
            })
            .collect();
    }
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            out.push(b[i]);
            i += 1;
        } else if b.get(i + 1) == Some(&b'\\') {
            out.push(b'\\');
            i += 2;
        } else {
            let oct = b
                .get(i + 1..i + 4)
                .filter(|o| o.iter().all(|c| (b'0'..=b'7').contains(c)));
            let Some(o) = oct else {
                return Err(BadValue("bytea escape format: a lone backslash".into()));
            };
            let v =
                u32::from(o[0] - b'0') * 64 + u32::from(o[1] - b'0') * 8 + u32::from(o[2] - b'0');
            out.push(u8::try_from(v).map_err(|_| BadValue("bytea octal escape over 255".into()))?);
            i += 4;
        }
    }
    Ok(out)
}

/// Smallest and largest `Date32`/`DateTime64` ClickHouse holds.
const MIN_DATE: &str = "1900-01-01";
const MAX_DATE: &str = "2299-12-31";
const MIN_TS: &str = "1900-01-01 00:00:00.000000";
const MAX_TS: &str = "2299-12-31 23:59:59.999999";

/// `YYYY-MM-DD` from PostgreSQL's ISO date text (clamped to ClickHouse's range).
fn date(out: &mut Vec<u8>, text: &str) -> Result<(), BadValue> {
    let bad = || BadValue(format!("{text:?} is not an ISO date"));
    match text {
        "infinity" => {
            out.extend_from_slice(MAX_DATE.as_bytes());
            return Ok(());
        }
        "-infinity" => {
            out.extend_from_slice(MIN_DATE.as_bytes());
            return Ok(());
        }
        _ => {}
    }
    let (d, bc) = match text.strip_suffix(" BC") {
        Some(d) => (d, true),
        None => (text, false),
    };
    let (y, m, dd) = ymd(d).ok_or_else(bad)?;
    if bc || y < 1900 {
        out.extend_from_slice(MIN_DATE.as_bytes());
    } else if y > 2299 {
        out.extend_from_slice(MAX_DATE.as_bytes());
    } else {
        let _ = write!(out, "{y:04}-{m:02}-{dd:02}");
    }
    Ok(())
}

fn ymd(d: &str) -> Option<(i32, u8, u8)> {
    let mut it = d.splitn(3, '-');
    let y: i32 = it.next()?.parse().ok()?;
    let m: u8 = it.next()?.parse().ok()?;
    let dd: u8 = it.next()?.parse().ok()?;
    ((1..=12).contains(&m) && (1..=31).contains(&dd) && y >= 0).then_some((y, m, dd))
}

/// `YYYY-MM-DD hh:mm:ss.ffffff` in UTC from PostgreSQL's ISO timestamp text (with an
/// offset like `+00`, `-07`, `+05:30`, `+00:19:32` for `timestamptz`; none for
/// `timestamp`, read as UTC), clamped to ClickHouse's range.
pub fn timestamp(out: &mut Vec<u8>, text: &str) -> Result<(), BadValue> {
    let bad = || BadValue(format!("{text:?} is not an ISO timestamp"));
    match text {
        "infinity" => {
            out.extend_from_slice(MAX_TS.as_bytes());
            return Ok(());
        }
        "-infinity" => {
            out.extend_from_slice(MIN_TS.as_bytes());
            return Ok(());
        }
        _ => {}
    }
    let (t, bc) = match text.strip_suffix(" BC") {
        Some(t) => (t, true),
        None => (text, false),
    };
    let (d, rest) = t.split_once(' ').ok_or_else(bad)?;
    let (y, mo, dd) = ymd(d).ok_or_else(bad)?;
    if bc || y < 1899 {
        out.extend_from_slice(MIN_TS.as_bytes());
        return Ok(());
    }
    if y > 2300 {
        out.extend_from_slice(MAX_TS.as_bytes());
        return Ok(());
    }
    // hh:mm:ss[.ffffff][(+|-)hh[:mm[:ss]]]
    let off_at = rest.find(['+', '-']);
    let (clock, off) = match off_at {
        Some(i) => (&rest[..i], Some(&rest[i..])),
        None => (rest, None),
    };
    let (hms, frac) = match clock.split_once('.') {
        Some((a, f)) => (a, f),
        None => (clock, ""),
    };
    if frac.len() > 6 || !frac.bytes().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    let mut p = hms.split(':').map(|x| x.parse::<u32>());
    let (Some(Ok(h)), Some(Ok(mi)), Some(Ok(s)), None) = (p.next(), p.next(), p.next(), p.next())
    else {
        return Err(bad());
    };
    if h > 24 || mi > 59 || s > 60 {
        return Err(bad());
    }
    let micros: i64 = format!("{frac:0<6}").parse().unwrap_or(0);
    let offset_secs: i64 = match off {
        None => 0,
        Some(o) => {
            let sign = if o.starts_with('-') { -1 } else { 1 };
            let mut parts = o[1..].split(':').map(|x| x.parse::<i64>());
            let oh = parts.next().and_then(Result::ok).ok_or_else(bad)?;
            let om = parts.next().transpose().map_err(|_| bad())?.unwrap_or(0);
            let os = parts.next().transpose().map_err(|_| bad())?.unwrap_or(0);
            sign * (oh * 3600 + om * 60 + os)
        }
    };
    let month = time::Month::try_from(mo).map_err(|_| bad())?;
    let date = time::Date::from_calendar_date(y, month, dd).map_err(|_| bad())?;
    let local = date.midnight().assume_utc()
        + time::Duration::seconds(i64::from(h) * 3600 + i64::from(mi) * 60 + i64::from(s))
        + time::Duration::microseconds(micros);
    let utc = local - time::Duration::seconds(offset_secs);
    if utc.year() < 1900 {
        out.extend_from_slice(MIN_TS.as_bytes());
    } else if utc.year() > 2299 {
        out.extend_from_slice(MAX_TS.as_bytes());
    } else {
        let _ = write!(
            out,
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}",
            utc.year(),
            u8::from(utc.month()),
            utc.day(),
            utc.hour(),
            utc.minute(),
            utc.second(),
            utc.microsecond()
        );
    }
    Ok(())
}

/// The elements of a one-dimensional PostgreSQL array literal (`{1,NULL,"a b"}`, with an
/// optional `[lo:hi]=` bounds prefix); `None` for NULL.
pub fn parse_array(text: &str) -> Result<Vec<Option<String>>, BadValue> {
    let bad = |why: &str| BadValue(format!("array {:?}: {why}", short(text)));
    let mut s = text.trim();
    if s.starts_with('[') {
        let eq = s.find('=').ok_or_else(|| bad("bounds without '='"))?;
        s = &s[eq + 1..];
    }
    let body = s
        .strip_prefix('{')
        .and_then(|r| r.strip_suffix('}'))
        .ok_or_else(|| bad("not in braces"))?;
    let b = body.as_bytes();
    let mut out = Vec::new();
    if body.trim().is_empty() {
        return Ok(out);
    }
    let mut i = 0;
    loop {
        while i < b.len() && b[i] == b' ' {
            i += 1;
        }
        if i < b.len() && b[i] == b'{' {
            return Err(bad("multi-dimensional arrays are not supported"));
        }
        let mut v = Vec::new();
        let quoted = i < b.len() && b[i] == b'"';
        if quoted {
            i += 1;
            loop {
                match b.get(i) {
                    None => return Err(bad("unterminated quote")),
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') => {
                        let c = *b.get(i + 1).ok_or_else(|| bad("trailing backslash"))?;
                        v.push(c);
                        i += 2;
                    }
                    Some(&c) => {
                        v.push(c);
                        i += 1;
                    }
                }
            }
            while i < b.len() && b[i] == b' ' {
                i += 1;
            }
        } else {
            while i < b.len() && b[i] != b',' {
                if b[i] == b'\\' {
                    i += 1;
                }
                if let Some(&c) = b.get(i) {
                    v.push(c);
                }
                i += 1;
            }
            while v.last() == Some(&b' ') {
                v.pop();
            }
        }
        let v = String::from_utf8(v).map_err(|_| bad("not UTF-8"))?;
        out.push(if !quoted && v.eq_ignore_ascii_case("NULL") {
            None
        } else {
            Some(v)
        });
        match b.get(i) {
            None => break,
            Some(b',') => i += 1,
            Some(_) => return Err(bad("junk after an element")),
        }
    }
    Ok(out)
}

fn short(s: &str) -> &str {
    let mut end = s.len().min(60);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A ClickHouse identifier in backquotes.
pub fn ident(name: &str) -> String {
    let mut s = String::with_capacity(name.len() + 2);
    s.push('`');
    for c in name.chars() {
        match c {
            '`' => s.push_str("\\`"),
            '\\' => s.push_str("\\\\"),
            _ => s.push(c),
        }
    }
    s.push('`');
    s
}

/// A ClickHouse string literal in single quotes.
pub fn literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\'' => out.push_str("\\'"),
            '\\' => out.push_str("\\\\"),
            _ => out.push(c),
        }
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(ty: &str, v: Option<&str>) -> Result<String, BadValue> {
        let mut out = Vec::new();
        write_value(&mut out, &map_type(ty), v)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    #[test]
    fn types_map_as_documented() {
        let t = |pg: &str| map_type(pg).ddl(false);
        assert_eq!(t("smallint"), "Nullable(Int16)");
        assert_eq!(t("integer"), "Nullable(Int32)");
        assert_eq!(map_type("bigint").ddl(true), "Int64");
        assert_eq!(t("numeric(12,2)"), "Nullable(Decimal(12, 2))");
        assert_eq!(t("numeric(5)"), "Nullable(Decimal(5, 0))");
        assert_eq!(t("numeric(100,2)"), "Nullable(String)");
        assert_eq!(t("numeric"), "Nullable(String)");
        assert_eq!(
            t("timestamp with time zone"),
            "Nullable(DateTime64(6, 'UTC'))"
        );
        assert_eq!(
            t("timestamp(3) without time zone"),
            "Nullable(DateTime64(6, 'UTC'))"
        );
        assert_eq!(t("date"), "Nullable(Date32)");
        assert_eq!(t("boolean"), "Nullable(Bool)");
        assert_eq!(t("uuid"), "Nullable(UUID)");
        assert_eq!(t("jsonb"), "Nullable(String)");
        assert_eq!(t("integer[]"), "Array(Nullable(Int32))");
        assert_eq!(t("text[]"), "Array(Nullable(String))");
        assert_eq!(t("interval"), "Nullable(String)");
    }

    #[test]
    fn values_are_written_for_json_each_row() {
        assert_eq!(w("integer", Some("-5")).unwrap(), "\"-5\"");
        assert_eq!(w("integer", None).unwrap(), "null");
        assert_eq!(w("boolean", Some("t")).unwrap(), "true");
        assert!(w("boolean", Some("maybe")).is_err());
        assert_eq!(
            w("text", Some("a\"b\\c\nd\u{1}é")).unwrap(),
            "\"a\\\"b\\\\c\\nd\\u0001é\""
        );
        assert_eq!(
            w("bytea", Some("\\x41ff00")).unwrap(),
            "\"A\u{fffd}\\u0000\""
        );
        assert_eq!(bytea("a\\\\b\\101").unwrap(), b"a\\bA");
        assert!(bytea("\\x4").is_err());
        assert!(bytea("a\\9").is_err());
        assert_eq!(
            w("integer[]", Some("{1,NULL,3}")).unwrap(),
            "[\"1\",null,\"3\"]"
        );
        assert_eq!(w("integer[]", None).unwrap(), "[]");
        assert_eq!(
            w("text[]", Some("{a,\"b c\",\"d,e\",\"NULL\",\"q\\\"x\"}")).unwrap(),
            "[\"a\",\"b c\",\"d,e\",\"NULL\",\"q\\\"x\"]"
        );
        assert_eq!(w("boolean[]", Some("[0:1]={t,f}")).unwrap(), "[true,false]");
        assert!(w("integer[]", Some("{{1,2},{3,4}}")).is_err());
        assert!(w("integer[]", Some("{1,2")).is_err());
        assert_eq!(w("integer[]", Some("{}")).unwrap(), "[]");
    }

    #[test]
    fn timestamps_go_to_utc_and_stay_in_range() {
        let ts = |s: &str| {
            let mut out = Vec::new();
            timestamp(&mut out, s).map(|_| String::from_utf8(out).unwrap())
        };
        assert_eq!(
            ts("2024-02-29 12:34:56.789+00").unwrap(),
            "2024-02-29 12:34:56.789000"
        );
        assert_eq!(
            ts("2024-06-01 12:00:00.5-07").unwrap(),
            "2024-06-01 19:00:00.500000"
        );
        assert_eq!(
            ts("2024-01-01 00:10:00+05:30").unwrap(),
            "2023-12-31 18:40:00.000000"
        );
        assert_eq!(ts("1900-01-01 00:00:00+00:19:32").unwrap(), MIN_TS);
        assert_eq!(
            ts("2024-01-01 00:00:00.123456").unwrap(),
            "2024-01-01 00:00:00.123456"
        );
        assert_eq!(ts("infinity").unwrap(), MAX_TS);
        assert_eq!(ts("-infinity").unwrap(), MIN_TS);
        assert_eq!(ts("0044-03-15 12:00:00+00 BC").unwrap(), MIN_TS);
        assert_eq!(ts("12024-01-01 00:00:00+00").unwrap(), MAX_TS);
        assert!(ts("yesterday").is_err());
        assert!(ts("2024-13-01 00:00:00+00").is_err());
        assert!(ts("2024-01-01 00:00:00.1234567+00").is_err());
        let d = |s: &str| {
            let mut out = Vec::new();
            date(&mut out, s).map(|_| String::from_utf8(out).unwrap())
        };
        assert_eq!(d("2024-02-29").unwrap(), "2024-02-29");
        assert_eq!(d("1850-01-01").unwrap(), MIN_DATE);
        assert_eq!(d("infinity").unwrap(), MAX_DATE);
        assert!(d("02/29/2024").is_err());
    }

    #[test]
    fn identifiers_and_literals_are_quoted() {
        assert_eq!(ident("a`b"), "`a\\`b`");
        assert_eq!(literal("it's"), "'it\\'s'");
    }
}
