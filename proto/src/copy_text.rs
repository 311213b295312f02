//! PostgreSQL's `COPY ... TO STDOUT` text format, one line at a time: how relay-inner's
//! initial copy reads a table.

use crate::cdc::Value;

/// Parses one line of `COPY … TO STDOUT` text format (without its newline).
pub fn parse_copy_line(line: &[u8]) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    for field in line.split(|&b| b == b'\t') {
        if field == b"\\N" {
            out.push(Value::Null);
            continue;
        }
        if !field.contains(&b'\\') {
            // Nothing escaped (most values): the field as it is.
            out.push(Value::Text(
                std::str::from_utf8(field)
                    .map_err(|_| "COPY value is not UTF-8".to_string())?
                    .to_owned(),
            ));
            continue;
        }
        let mut v = Vec::with_capacity(field.len());
        let mut i = 0;
        while i < field.len() {
            let b = field[i];
            i += 1;
            if b != b'\\' {
                v.push(b);
                continue;
            }
            let Some(&e) = field.get(i) else {
                return Err("COPY line ends in a backslash".into());
            };
            i += 1;
            match e {
                b'b' => v.push(8),
                b'f' => v.push(12),
                b'n' => v.push(b'\n'),
                b'r' => v.push(b'\r'),
                b't' => v.push(b'\t'),
                b'v' => v.push(11),
                b'0'..=b'7' => {
                    let mut n = u32::from(e - b'0');
                    for _ in 0..2 {
                        match field.get(i) {
                            Some(&d @ b'0'..=b'7') => {
                                n = n * 8 + u32::from(d - b'0');
                                i += 1;
                            }
                            _ => break,
                        }
                    }
                    v.push(n as u8);
                }
                b'x' if field.get(i).is_some_and(u8::is_ascii_hexdigit) => {
                    let mut n = 0u32;
                    for _ in 0..2 {
                        match field.get(i) {
                            Some(&d) if d.is_ascii_hexdigit() => {
                                n = n * 16 + (d as char).to_digit(16).unwrap_or(0);
                                i += 1;
                            }
                            _ => break,
                        }
                    }
                    v.push(n as u8);
                }
                other => v.push(other),
            }
        }
        out.push(Value::Text(
            String::from_utf8(v).map_err(|_| "COPY value is not UTF-8".to_string())?,
        ));
    }
    Ok(out)
}

/// Calls `f` with the values of each of the `rows` lines of `data` (each ending in
/// `\n`, with `ncols` fields): how a block of copy rows is read back as rows.
pub fn each_copy_row(
    data: &[u8],
    rows: u32,
    ncols: usize,
    mut f: impl FnMut(Vec<Value>),
) -> Result<(), &'static str> {
    let mut n = 0u32;
    for line in lines(data)? {
        n = n.checked_add(1).ok_or(TOO_MANY)?;
        if n > rows {
            return Err(TOO_MANY);
        }
        let values = if ncols == 0 && line.is_empty() {
            Vec::new()
        } else {
            parse_copy_line(line).map_err(|_| BAD_ROW)?
        };
        if values.len() != ncols {
            return Err(WRONG_WIDTH);
        }
        f(values);
    }
    if n != rows {
        return Err(TOO_FEW);
    }
    Ok(())
}

/// Checks what [`each_copy_row`] would read without building values: `rows` lines of
/// `ncols` fields, UTF-8 once unescaped. One pass over the block for newlines, tabs
/// and backslashes (a line parsed whole only when it holds an octal or hex escape).
pub fn check_copy_rows(data: &[u8], rows: u32, ncols: usize) -> Result<(), &'static str> {
    // Escapes other than octal and hex ones give ASCII, so valid UTF-8 stays valid; bytes
    // that are not (octal or hex escapes may still make them so) are parsed whole.
    if std::str::from_utf8(data).is_err() {
        return each_copy_row(data, rows, ncols, |_| {});
    }
    if data.last().is_some_and(|&b| b != b'\n') {
        return Err(NO_NEWLINE);
    }
    let mut n = 0u32;
    let mut fields = 1usize;
    let mut line_start = 0;
    let mut numeric = false;
    // Just past the character a backslash escapes.
    let mut escaped_upto = 0;
    for at in memchr::memchr3_iter(b'\n', b'\t', b'\\', data) {
        if at < escaped_upto {
            continue;
        }
        match data[at] {
            b'\t' => fields += 1,
            b'\\' => {
                match data.get(at + 1) {
                    // A field may not end in a backslash (tabs and newlines split first).
                    None | Some(b'\t' | b'\n') => return Err(BAD_ROW),
                    Some(b'0'..=b'7' | b'x') => numeric = true,
                    Some(_) => {}
                }
                escaped_upto = at + 2;
            }
            _ => {
                let line = &data[line_start..at];
                n = n.checked_add(1).ok_or(TOO_MANY)?;
                if n > rows {
                    return Err(TOO_MANY);
                }
                let width = if ncols == 0 && line.is_empty() {
                    0
                } else {
                    fields
                };
                if width != ncols {
                    return Err(WRONG_WIDTH);
                }
                if numeric {
                    parse_copy_line(line).map_err(|_| BAD_ROW)?;
                }
                fields = 1;
                numeric = false;
                line_start = at + 1;
            }
        }
    }
    if n != rows {
        return Err(TOO_FEW);
    }
    Ok(())
}

const TOO_MANY: &str = "copy rows: more lines than the block says";
const TOO_FEW: &str = "copy rows: fewer lines than the block says";
const BAD_ROW: &str = "copy rows: a line is not COPY text of UTF-8 values";
const NO_NEWLINE: &str = "copy rows: the last line does not end in a newline";
const WRONG_WIDTH: &str = "copy rows: a line's values do not match its relation's columns";

/// The `\n`-terminated lines of `data`, without their newlines.
fn lines(data: &[u8]) -> Result<impl Iterator<Item = &[u8]>, &'static str> {
    let body = match data.split_last() {
        None => data,
        Some((b'\n', body)) => body,
        Some(_) => return Err(NO_NEWLINE),
    };
    // An empty block has no lines (splitting "" would give one empty line).
    let skip = usize::from(data.is_empty());
    Ok(body.split(|&b| b == b'\n').skip(skip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_lines_parse() {
        let t = |s: &str| Value::Text(s.into());
        assert_eq!(
            parse_copy_line(b"1\t\\N\ta\\tb\\nc\\\\d\t\\101\\x41z\tgr\xc3\xbc\xc3\x9f").unwrap(),
            vec![t("1"), Value::Null, t("a\tb\nc\\d"), t("AAz"), t("grüß")]
        );
        assert_eq!(parse_copy_line(b"").unwrap(), vec![t("")]);
        assert!(parse_copy_line(b"a\\").is_err());
        assert!(parse_copy_line(b"\xff").is_err());
    }

    proptest::proptest! {
        /// The quick check and the parse agree on every block (of bytes that matter
        /// to the format).
        #[test]
        fn the_check_agrees_with_the_parse(
            data in proptest::collection::vec(proptest::sample::select(
                vec![b'a', b'\t', b'\\', b'n', b'N', b'0', b'2', b'7', b'x', b'b', b'c', b'f', b'\n', 0xc3, 0xbc, 0xff]), 0..40),
            rows in 0u32..5,
            ncols in 0usize..4,
        ) {
            let parsed = each_copy_row(&data, rows, ncols, |_| {}).is_ok();
            proptest::prop_assert_eq!(check_copy_rows(&data, rows, ncols).is_ok(), parsed, "{:?}", data);
        }
    }
}
