//! PostgreSQL connection strings, the one parser both relays use: libpq's `key=value`
//! form (`host=db port=5432 user=rep password='it\'s'`) and its URL form
//! (`postgresql://rep:secret@db:5432/app?sslmode=verify-full`).
//!
//! [`parse`] turns either form into the same ordered list of options; what a caller may
//! do with them is the caller's business: relay-inner's replication client accepts the
//! options its own protocol code understands ([`Dsn::check_only`]), the PostgreSQL sink
//! hands everything but the TLS options to tokio-postgres ([`Dsn::tokio_postgres`]).
//! `sslmode` and `sslrootcert` are read here for both ([`Dsn::sslmode`],
//! [`Dsn::sslrootcert`]), because tokio-postgres does not implement `sslrootcert`.

use std::path::PathBuf;
use std::str::FromStr;

use crate::tls::SslMode;

/// A connection string that could not be read. The message names the option, never a
/// password's value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("connection string: {0}")]
pub struct DsnError(pub String);

fn err(msg: impl Into<String>) -> DsnError {
    DsnError(msg.into())
}

/// A parsed connection string: its options in the order written (the last of a repeated
/// key wins, as in libpq).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Dsn {
    pairs: Vec<(String, String)>,
}

impl std::fmt::Debug for Dsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut m = f.debug_map();
        for (k, v) in &self.pairs {
            m.entry(k, if k == "password" { &"***" } else { v });
        }
        m.finish()
    }
}

impl FromStr for Dsn {
    type Err = DsnError;
    fn from_str(s: &str) -> Result<Dsn, DsnError> {
        parse(s)
    }
}

/// Parses a connection string in either form.
pub fn parse(s: &str) -> Result<Dsn, DsnError> {
    let t = s.trim();
    let pairs = match t
        .strip_prefix("postgresql://")
        .or_else(|| t.strip_prefix("postgres://"))
    {
        Some(rest) => parse_url(rest)?,
        None => parse_key_values(s)?,
    };
    Ok(Dsn { pairs })
}

impl Dsn {
    /// The value of `key` (the last one written), if any.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Every option, in the order written.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Fails naming the first option not in `known`.
    pub fn check_only(&self, known: &[&str]) -> Result<(), DsnError> {
        match self
            .pairs
            .iter()
            .find(|(k, _)| !known.contains(&k.as_str()))
        {
            Some((k, _)) => Err(err(format!("unknown connection option \"{k}\""))),
            None => Ok(()),
        }
    }

    /// libpq's `sslmode` (default `prefer`).
    pub fn sslmode(&self) -> Result<SslMode, DsnError> {
        self.get("sslmode")
            .map_or(Ok(SslMode::default()), SslMode::parse)
            .map_err(err)
    }

    /// libpq's `sslrootcert`.
    pub fn sslrootcert(&self) -> Option<PathBuf> {
        self.get("sslrootcert").map(PathBuf::from)
    }

    /// The options as a tokio-postgres configuration, without `sslmode`/`sslrootcert`
    /// (see [`crate::tls`]; the caller sets the mode on the result).
    pub fn tokio_postgres(&self) -> Result<tokio_postgres::Config, DsnError> {
        let kv = self
            .pairs
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "sslmode" | "sslrootcert"))
            .map(|(k, v)| format!("{k}={}", quote(v)))
            .collect::<Vec<_>>()
            .join(" ");
        tokio_postgres::Config::from_str(&kv).map_err(|e| err(e.to_string()))
    }
}

/// A value quoted for the `key=value` form.
fn quote(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('\'');
    for c in v.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// `key = value` pairs separated by white space; values bare or single-quoted, with
/// backslash escapes in both.
fn parse_key_values(s: &str) -> Result<Vec<(String, String)>, DsnError> {
    let mut pairs = Vec::new();
    let mut chars = s.chars().peekable();
    let skip_ws = |chars: &mut std::iter::Peekable<std::str::Chars<'_>>| {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
    };
    loop {
        skip_ws(&mut chars);
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        skip_ws(&mut chars);
        if chars.next() != Some('=') {
            return Err(err(format!("missing \"=\" after \"{key}\"")));
        }
        skip_ws(&mut chars);
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err(err(format!("unterminated quoted value for \"{key}\""))),
                    Some('\'') => break,
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => {
                            return Err(err(format!("unterminated quoted value for \"{key}\"")))
                        }
                    },
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    match chars.next() {
                        Some(e) => value.push(e),
                        None => {
                            return Err(err(format!("trailing backslash in value for \"{key}\"")))
                        }
                    }
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

/// The part of a URL after `postgresql://`:
/// `[user[:password]@][host[:port][,host[:port]...]][/dbname][?key=value&...]`.
fn parse_url(rest: &str) -> Result<Vec<(String, String)>, DsnError> {
    let mut pairs = Vec::new();
    let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = match main.find('/') {
        Some(i) => (&main[..i], Some(&main[i + 1..])),
        None => (main, None),
    };
    let hostspec = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if !user.is_empty() {
                pairs.push(("user".into(), decode("user", user)?));
            }
            if let Some(p) = password {
                pairs.push(("password".into(), decode("password", p)?));
            }
            hosts
        }
        None => authority,
    };
    if !hostspec.is_empty() {
        let (mut hosts, mut ports) = (Vec::new(), Vec::new());
        for one in hostspec.split(',') {
            let (host, port) = if let Some(v6) = one.strip_prefix('[') {
                let (h, after) = v6
                    .split_once(']')
                    .ok_or_else(|| err(format!("unclosed \"[\" in host \"{one}\"")))?;
                match after.strip_prefix(':') {
                    Some(p) => (h, p),
                    None if after.is_empty() => (h, ""),
                    None => return Err(err(format!("bad host \"{one}\""))),
                }
            } else {
                one.split_once(':').unwrap_or((one, ""))
            };
            if !port.is_empty() && port.parse::<u16>().is_err() {
                return Err(err(format!("invalid port \"{port}\"")));
            }
            hosts.push(decode("host", host)?);
            ports.push(port.to_string());
        }
        pairs.push(("host".into(), hosts.join(",")));
        if ports.iter().any(|p| !p.is_empty()) {
            pairs.push(("port".into(), ports.join(",")));
        }
    }
    if let Some(db) = path.filter(|p| !p.is_empty()) {
        pairs.push(("dbname".into(), decode("dbname", db)?));
    }
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = decode("option name", k)?;
        let v = decode(&k, v)?;
        pairs.push((k, v));
    }
    Ok(pairs)
}

/// Decodes `%XX` escapes; a `%` not followed by two hex digits, or bytes that are not
/// UTF-8 once decoded, are an error naming `what` (never the value: it may be a password).
fn decode(what: &str, s: &str) -> Result<String, DsnError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = |c: u8| (c as char).to_digit(16);
            match (
                b.get(i + 1).and_then(|c| hex(*c)),
                b.get(i + 2).and_then(|c| hex(*c)),
            ) {
                (Some(h), Some(l)) => out.push((h * 16 + l) as u8),
                _ => {
                    return Err(err(format!(
                        "{what}: bad percent escape (a % needs two hex digits)"
                    )))
                }
            }
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| err(format!("{what}: not UTF-8 once percent-decoded")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(s: &str) -> Vec<(String, String)> {
        parse(s)
            .unwrap()
            .pairs()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn kv(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn key_value_form() {
        assert_eq!(
            pairs("host=db port = 6543 user=rep password='it\\'s a \\\\secret' dbname=app"),
            kv(&[
                ("host", "db"),
                ("port", "6543"),
                ("user", "rep"),
                ("password", "it's a \\secret"),
                ("dbname", "app")
            ])
        );
        assert_eq!(pairs("a=b\\ c"), kv(&[("a", "b c")]));
        for bad in ["user=u password='open", "user", "user=u x", "a=b\\"] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.starts_with("connection string: "), "{bad}: {e}");
        }
    }

    #[test]
    fn url_form() {
        assert_eq!(
            pairs("postgresql://rep:p%40ss@db.example:6543/app?sslmode=verify-full&sslrootcert=%2Fa%20%C3%A9"),
            kv(&[
                ("user", "rep"),
                ("password", "p@ss"),
                ("host", "db.example"),
                ("port", "6543"),
                ("dbname", "app"),
                ("sslmode", "verify-full"),
                ("sslrootcert", "/a é")
            ])
        );
        assert_eq!(
            pairs("postgres://[::1]:5,h2/db"),
            kv(&[("host", "::1,h2"), ("port", "5,"), ("dbname", "db")])
        );
        assert_eq!(pairs("postgres://"), kv(&[]));
        for bad in [
            "postgres://h/db?sslrootcert=%",
            "postgres://h/db?sslrootcert=a%2",
            "postgres://h/db?sslrootcert=%zz",
            "postgres://h/db?sslrootcert=%é1",
            "postgres://h/db?sslmode=%FF",
            "postgres://h:99999/db",
            "postgres://[::1/db",
            "postgres://u:%zz@h/db",
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.starts_with("connection string: "), "{bad}: {e}");
        }
        // A bad escape in a password is reported without the password.
        let e = parse("postgres://u:s3cr%zz@h/db").unwrap_err().to_string();
        assert!(!e.contains("s3cr"), "{e}");
    }

    #[test]
    fn both_forms_give_the_same_options_and_tls() {
        let a = parse("host=h port=5 user=u dbname=d sslmode=require").unwrap();
        let b = parse("postgresql://u@h:5/d?sslmode=require").unwrap();
        for k in ["host", "port", "user", "dbname", "sslmode"] {
            assert_eq!(a.get(k), b.get(k), "{k}");
        }
        assert_eq!(b.sslmode().unwrap(), SslMode::Require);
        assert!(parse("sslmode=bogus").unwrap().sslmode().is_err());
        assert_eq!(b.sslrootcert(), None);
        let c = b.tokio_postgres().unwrap();
        assert_eq!(c.get_user(), Some("u"));
        assert_eq!(c.get_dbname(), Some("d"));
        assert_eq!(c.get_ports(), &[5]);
    }

    #[test]
    fn tokio_postgres_keeps_quoting_and_drops_tls_keys() {
        let d = parse("postgresql://u:it's%20a%5Cpw@h/db?sslrootcert=/x&application_name=a%20b")
            .unwrap();
        let c = d.tokio_postgres().unwrap();
        assert_eq!(c.get_password(), Some(&b"it's a\\pw"[..]));
        assert_eq!(c.get_application_name(), Some("a b"));
        assert!(parse("bogus=1").unwrap().tokio_postgres().is_err());
    }

    #[test]
    fn check_only_names_the_unknown_option() {
        let d = parse("user=u bogus=1").unwrap();
        assert_eq!(
            d.check_only(&["user"]).unwrap_err().to_string(),
            "connection string: unknown connection option \"bogus\""
        );
        assert!(d.check_only(&["user", "bogus"]).is_ok());
    }

    #[test]
    fn debug_hides_the_password() {
        let d = parse("user=u password=hunter2").unwrap();
        assert!(!format!("{d:?}").contains("hunter2"));
    }
}
