//! The part of ClickHouse's HTTP interface the sink uses: statements in a POST body,
//! `INSERT ... FORMAT` with the statement in the `query` parameter and the rows in the
//! body, the user and password in `X-ClickHouse-User` / `X-ClickHouse-Key`, errors as
//! a non-200 status with `Code: N. DB::Exception: ...` (and `X-ClickHouse-Exception-Code`).

use std::time::Duration;

use super::super::SinkError;

/// A failed request.
#[derive(Debug, Clone)]
pub struct ChError {
    /// HTTP status, when an answer came.
    pub status: Option<u16>,
    /// ClickHouse's exception code, when it said one.
    pub code: Option<u32>,
    /// What happened.
    pub msg: String,
}

/// Exception codes that mean the data or the statement is refused for good: retrying
/// the same batch cannot help (type mismatches, unparsable values, missing columns,
/// syntax).
const REFUSING: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT
    16,  // NO_SUCH_COLUMN_IN_TABLE
    26,  // CANNOT_PARSE_QUOTED_STRING
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    38,  // CANNOT_PARSE_DATE
    41,  // CANNOT_PARSE_DATETIME
    53,  // TYPE_MISMATCH
    62,  // SYNTAX_ERROR
    69,  // ARGUMENT_OUT_OF_BOUND
    70,  // CANNOT_CONVERT_TYPE
    72,  // CANNOT_PARSE_NUMBER
    117, // INCORRECT_DATA
    131, // TOO_LARGE_STRING_SIZE
    376, // CANNOT_PARSE_UUID
    407, // DECIMAL_OVERFLOW
    467, // CANNOT_PARSE_BOOL
];

impl ChError {
    /// Whether retrying the same request cannot help.
    pub fn refusing(&self) -> bool {
        self.code.is_some_and(|c| REFUSING.contains(&c))
    }

    /// As a sink failure at `seq`.
    pub fn into_sink(self, seq: u64) -> SinkError {
        let reason = match (self.status, self.code) {
            (None, _) => "connection",
            (_, Some(516 | 192 | 193 | 194 | 195 | 497)) => "auth",
            _ if self.refusing() => "rejected",
            _ => "clickhouse",
        };
        SinkError {
            rejected: self.refusing(),
            code: self.code.map(|c| c.to_string()),
            ..SinkError::new(reason, seq, self.msg)
        }
    }
}

/// A ClickHouse HTTP endpoint.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    /// `http(s)://host:port/` (with the path the operator gave).
    url: String,
    user: String,
    key: Option<String>,
    timeout: Duration,
}

impl Client {
    /// A client for `url` with these credentials.
    pub fn new(
        http: reqwest::Client,
        url: &str,
        user: &str,
        key: Option<String>,
        timeout: Duration,
    ) -> Client {
        let mut url = url.to_string();
        if !url.ends_with('/') {
            url.push('/');
        }
        Client {
            http,
            url,
            user: user.to_string(),
            key,
            timeout,
        }
    }

    /// Runs `sql` (in the body) and returns the answer's bytes.
    pub async fn query(&self, sql: &str) -> Result<bytes::Bytes, ChError> {
        self.send(self.http.post(&self.url).body(sql.to_string()))
            .await
    }

    /// Runs `statement` (`INSERT ... FORMAT F`) with `data` as its input.
    pub async fn insert(&self, statement: &str, data: Vec<u8>) -> Result<(), ChError> {
        let url = format!("{}?query={}", self.url, percent_encode(statement));
        let req = self.http.post(url).body(data);
        self.send(req).await.map(|_| ())
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<bytes::Bytes, ChError> {
        let mut req = req.header("x-clickhouse-user", &self.user);
        if let Some(k) = &self.key {
            req = req.header("x-clickhouse-key", k);
        }
        let resp = req.send().await.map_err(|e| ChError {
            status: None,
            code: None,
            msg: if e.is_timeout() {
                format!(
                    "ClickHouse at {}: no answer within {:?}",
                    self.url, self.timeout
                )
            } else {
                format!(
                    "ClickHouse at {}: {}",
                    self.url,
                    routy_pg::tls::error_chain(&e)
                )
            },
        })?;
        let status = resp.status();
        let header_code = resp
            .headers()
            .get("x-clickhouse-exception-code")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u32>().ok());
        let body = resp.bytes().await.map_err(|e| ChError {
            status: Some(status.as_u16()),
            code: None,
            msg: format!(
                "ClickHouse at {}: reading the answer: {}",
                self.url,
                routy_pg::tls::error_chain(&e)
            ),
        })?;
        if status.is_success() {
            return Ok(body);
        }
        let text = String::from_utf8_lossy(&body[..body.len().min(1024)])
            .trim()
            .replace(['\n', '\r'], " ");
        Err(ChError {
            status: Some(status.as_u16()),
            code: header_code.or_else(|| exception_code(&text)),
            msg: format!("ClickHouse: HTTP {}: {text}", status.as_u16()),
        })
    }
}

pub use routy_ops::admin_client::percent_encode;

/// The `N` of `Code: N.` in an exception text.
pub fn exception_code(text: &str) -> Option<u32> {
    let rest = &text[text.find("Code: ")? + 6..];
    let end = rest.find(|c: char| !c.is_ascii_digit())?;
    rest[..end].parse().ok()
}

/// Splits TabSeparated output into rows of unescaped fields (`None` for `\N`).
pub fn tsv_rows(data: &[u8]) -> Vec<Vec<Option<Vec<u8>>>> {
    let mut rows = Vec::new();
    for line in data.split(|b| *b == b'\n') {
        if line.is_empty() {
            continue;
        }
        rows.push(line.split(|b| *b == b'\t').map(tsv_field).collect());
    }
    rows
}

fn tsv_field(f: &[u8]) -> Option<Vec<u8>> {
    if f == b"\\N" {
        return None;
    }
    let mut out = Vec::with_capacity(f.len());
    let mut i = 0;
    while i < f.len() {
        if f[i] == b'\\' && i + 1 < f.len() {
            out.push(match f[i + 1] {
                b'n' => b'\n',
                b't' => b'\t',
                b'r' => b'\r',
                b'0' => 0,
                b'b' => 8,
                b'f' => 12,
                b'a' => 7,
                b'v' => 11,
                b'e' => 27,
                c => c,
            });
            i += 2;
        } else {
            out.push(f[i]);
            i += 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exception_codes_and_tsv_are_read() {
        assert_eq!(
            exception_code("Code: 60. DB::Exception: Unknown table"),
            Some(60)
        );
        assert_eq!(exception_code("oops"), None);
        assert_eq!(
            percent_encode("INSERT INTO `d`.`t` FORMAT x"),
            "INSERT%20INTO%20%60d%60.%60t%60%20FORMAT%20x"
        );
        let rows = tsv_rows(b"1\ta\\tb\\\\c\t\\N\n2\t\\n\t\n");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0][1].as_deref(), Some(&b"a\tb\\c"[..]));
        assert_eq!(rows[0][2], None);
        assert_eq!(rows[1][1].as_deref(), Some(&b"\n"[..]));
        assert_eq!(rows[1][2].as_deref(), Some(&b""[..]));
        let e = ChError {
            status: Some(500),
            code: Some(27),
            msg: "x".into(),
        };
        assert!(e.refusing());
        let s = e.into_sink(4);
        assert!(s.rejected && s.reason == "rejected");
    }
}
