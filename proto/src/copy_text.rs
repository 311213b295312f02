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
}
