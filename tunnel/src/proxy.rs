//! Getting out through a forward proxy: HTTP `CONNECT` and SOCKS5 (RFC 1928, with the
//! username/password method of RFC 1929), and the proxy settings of the environment
//! (`HTTPS_PROXY`, `ALL_PROXY`, `NO_PROXY`).
//!
//! [`connect`] returns a TCP stream on which the proxy has opened the way to the target;
//! the caller runs its TLS over it, so the proxy sees only the target's host and port.
//! The parsing of what a proxy answers is kept in pure functions ([`parse_connect_answer`],
//! [`socks_reply_meaning`]) that never panic on any input.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::cidr::Cidr;

/// Largest HTTP answer header accepted from a proxy.
pub const MAX_ANSWER_BYTES: usize = 16 * 1024;

/// Kind of proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// HTTP `CONNECT`.
    Http,
    /// SOCKS5; the proxy resolves the target's name.
    Socks5,
}

/// A forward proxy to dial through.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    /// HTTP CONNECT or SOCKS5.
    pub scheme: Scheme,
    /// The proxy's host name or address.
    pub host: String,
    /// The proxy's port.
    pub port: u16,
    /// Username and password, if the proxy wants them.
    pub auth: Option<(String, String)>,
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the password.
        write!(f, "Proxy({self})")
    }
}

/// The proxy as a URL without its password (`http://user@proxy:3128`): for logs,
/// `/status` and metric labels.
impl fmt::Display for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.scheme {
            Scheme::Http => "http",
            Scheme::Socks5 => "socks5",
        };
        write!(f, "{scheme}://")?;
        if let Some((user, _)) = &self.auth {
            write!(f, "{}@", percent_encode(user))?;
        }
        write!(f, "{}", host_port(&self.host, self.port))
    }
}

/// `host:port`, with brackets around an IPv6 address.
fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

impl Proxy {
    /// Parses `http://[user:pass@]host[:port]` or `socks5://[user:pass@]host[:port]`
    /// (`socks5h://` is taken as `socks5://`: names are always resolved by the proxy).
    /// Without a port, HTTP uses 80 and SOCKS5 1080. User and password may be
    /// percent-encoded.
    pub fn parse(url: &str) -> Result<Proxy, String> {
        let url = url.trim();
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            format!(
                "{:?} is not a proxy URL (http://host:port or socks5://host:port)",
                redact(url)
            )
        })?;
        let (scheme, default_port) =
            match scheme.to_ascii_lowercase().as_str() {
                "http" => (Scheme::Http, 80),
                "socks5" | "socks5h" => (Scheme::Socks5, 1080),
                "https" => return Err(
                    "https:// proxies (TLS to the proxy itself) are not supported: use http:// \
                     (the tunnel's own TLS still runs end to end through it) or socks5://"
                        .into(),
                ),
                other => {
                    return Err(format!(
                "proxy scheme {other:?} is not supported: use http:// (HTTP CONNECT) or socks5://"
            ))
                }
            };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') || rest.contains('?') || rest.contains('#') {
            return Err(format!(
                "{:?}: a proxy URL has no path, only scheme://[user:password@]host:port",
                redact(url)
            ));
        }
        let (auth, hostport) = match rest.rsplit_once('@') {
            Some((userinfo, hp)) => {
                let (user, pass) = userinfo.split_once(':').ok_or_else(|| {
                    format!(
                        "{:?}: credentials in a proxy URL are user:password",
                        redact(url)
                    )
                })?;
                (Some((percent_decode(user)?, percent_decode(pass)?)), hp)
            }
            None => (None, rest),
        };
        let (host, port) = split_host_port(hostport, default_port)
            .ok_or_else(|| format!("{:?}: bad host or port", redact(url)))?;
        if let Some((user, pass)) = &auth {
            check_credentials(scheme, user, pass)?;
        }
        Ok(Proxy {
            scheme,
            host,
            port,
            auth,
        })
    }

    /// Sets the credentials (from a file): `user:password` on the first line.
    pub fn with_credentials_text(mut self, text: &str) -> Result<Proxy, String> {
        let line = text.lines().next().unwrap_or("").trim_end_matches('\r');
        let (user, pass) = line
            .split_once(':')
            .ok_or("the first line must be user:password")?;
        check_credentials(self.scheme, user, pass)?;
        self.auth = Some((user.to_owned(), pass.to_owned()));
        Ok(self)
    }
}

fn check_credentials(scheme: Scheme, user: &str, pass: &str) -> Result<(), String> {
    if user.is_empty() {
        return Err("the proxy username is empty".into());
    }
    if scheme == Scheme::Socks5 && (user.len() > 255 || pass.len() > 255) {
        return Err("SOCKS5 usernames and passwords are at most 255 bytes".into());
    }
    if user.contains(['\r', '\n']) || pass.contains(['\r', '\n']) {
        return Err("the proxy credentials contain a line break".into());
    }
    Ok(())
}

/// The URL with its password replaced by `***`, for error messages.
pub fn redact(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, rest)), Some(_)) => {
            let (userinfo, hp) = rest.rsplit_once('@').unwrap_or(("", rest));
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{hp}")
        }
        _ => url.to_owned(),
    }
}

fn split_host_port(s: &str, default_port: u16) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default_port,
            None => return None,
        };
        (h.to_owned(), port)
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), p.parse().ok()?),
            None => (s.to_owned(), default_port),
        }
    };
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':');
    if host.is_empty() || port == 0 || !host.chars().all(ok_char) {
        return None;
    }
    Some((host, port))
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("bad percent-encoding in the proxy credentials")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the proxy credentials are not UTF-8".into())
}

fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Where a proxy setting came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The configuration file.
    Config,
    /// This environment variable.
    Env(&'static str),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Config => f.write_str("config"),
            Source::Env(v) => f.write_str(v),
        }
    }
}

/// The variables looked at for a proxy, in order; the first one set and not empty wins.
pub const PROXY_VARS: &[&str] = &["https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"];
/// The variables listing hosts reached without the proxy, in order.
pub const NO_PROXY_VARS: &[&str] = &["no_proxy", "NO_PROXY"];

/// The proxy the environment (through `env`, e.g. `std::env::var`) names for a connection
/// to `host`: `None` when no variable is set or `NO_PROXY` covers the host.
pub fn from_env(
    host: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<(Proxy, Source)>, String> {
    let set = |v: &str| env(v).filter(|s| !s.trim().is_empty());
    let Some((var, url)) = PROXY_VARS.iter().find_map(|v| set(v).map(|u| (*v, u))) else {
        return Ok(None);
    };
    if let Some(list) = NO_PROXY_VARS.iter().find_map(|v| set(v)) {
        if no_proxy_covers(&list, host) {
            return Ok(None);
        }
    }
    let proxy = Proxy::parse(&url).map_err(|e| format!("environment variable {var}: {e}"))?;
    Ok(Some((proxy, Source::Env(var))))
}

/// Whether a `NO_PROXY` list (comma- or space-separated: `*`, host names matching
/// themselves and their subdomains, with or without a leading dot, IP addresses, CIDR
/// ranges; a `:port` suffix is ignored) covers `host`.
pub fn no_proxy_covers(list: &str, host: &str) -> bool {
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    let ip: Option<IpAddr> = host.parse().ok();
    list.split([',', ' '])
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .any(|entry| {
            if entry == "*" {
                return true;
            }
            let entry = entry.to_ascii_lowercase();
            if let (Some(ip), Ok(c)) = (ip, entry.parse::<Cidr>()) {
                return c.contains(ip);
            }
            // Strip a port, but not from a bare IPv6 address.
            let name = match entry.parse::<IpAddr>() {
                Ok(_) => entry.as_str(),
                Err(_) => {
                    let e = entry.trim_start_matches('[');
                    match e.split_once(']') {
                        Some((h, _)) => h,
                        None => e.rsplit_once(':').map_or(e, |(h, _)| h),
                    }
                }
            };
            if let (Some(ip), Ok(e)) = (ip, name.parse::<IpAddr>()) {
                return ip == e;
            }
            if name.parse::<IpAddr>().is_ok() {
                return false;
            }
            let name = name.trim_start_matches("*.").trim_start_matches('.');
            !name.is_empty() && (host == name || host.ends_with(&format!(".{name}")))
        })
}

/// What went wrong on the way through a proxy.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The proxy itself cannot be reached.
    #[error("cannot reach the proxy {proxy}: {source}")]
    Unreachable {
        /// The proxy (without password).
        proxy: String,
        /// The connect error.
        source: std::io::Error,
    },
    /// The proxy answered, and said no.
    #[error("the proxy {proxy} refused the connection to {target}: {answer}")]
    Refused {
        /// The proxy (without password).
        proxy: String,
        /// The target asked for.
        target: String,
        /// What the proxy said (its status line, its `Proxy-Authenticate`, or the SOCKS
        /// reply's meaning).
        answer: String,
        /// Metric label: `auth` (HTTP 407 or 401, a SOCKS5 credentials failure), `forbidden`
        /// (HTTP 403, SOCKS5 "not allowed by ruleset") or `refused`.
        reason: &'static str,
    },
    /// The proxy's answer is not the protocol, or the connection broke.
    #[error("proxy {proxy}: {detail}")]
    Protocol {
        /// The proxy (without password).
        proxy: String,
        /// What was wrong.
        detail: String,
    },
}

impl ProxyError {
    /// Metric label: `connect`, `auth`, `forbidden`, `refused` or `protocol`.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::Unreachable { .. } => "connect",
            ProxyError::Refused { reason, .. } => reason,
            ProxyError::Protocol { .. } => "protocol",
        }
    }
}

/// Opens a TCP connection to `host:port` through `proxy`. Bounded by `timeout` as a
/// whole (connecting to the proxy and its answer).
pub async fn connect(
    proxy: &Proxy,
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<TcpStream, ProxyError> {
    let name = proxy.to_string();
    let proto = |detail: String| ProxyError::Protocol {
        proxy: name.clone(),
        detail,
    };
    let work = async {
        let mut tcp = TcpStream::connect((proxy.host.as_str(), proxy.port))
            .await
            .map_err(|source| ProxyError::Unreachable {
                proxy: name.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        match proxy.scheme {
            Scheme::Http => http_connect(&mut tcp, proxy, &name, host, port).await?,
            Scheme::Socks5 => socks5_connect(&mut tcp, proxy, &name, host, port).await?,
        }
        Ok(tcp)
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(proto(format!("no answer within {timeout:?}"))),
    }
}

async fn http_connect(
    tcp: &mut TcpStream,
    proxy: &Proxy,
    name: &str,
    host: &str,
    port: u16,
) -> Result<(), ProxyError> {
    let target = host_port(host, port);
    let mut req = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: routy/{}\r\n",
        env!("CARGO_PKG_VERSION")
    );
    if let Some((user, pass)) = &proxy.auth {
        req.push_str(&format!(
            "Proxy-Authorization: {}\r\n",
            routy_ops::http::basic_auth(user, pass)
        ));
    }
    req.push_str("\r\n");
    let io = |e: std::io::Error| ProxyError::Protocol {
        proxy: name.to_owned(),
        detail: format!("sending CONNECT: {e}"),
    };
    tcp.write_all(req.as_bytes()).await.map_err(io)?;
    let head = read_answer_head(tcp)
        .await
        .map_err(|e| ProxyError::Protocol {
            proxy: name.to_owned(),
            detail: format!("reading its answer to CONNECT: {e}"),
        })?;
    match parse_connect_answer(&head) {
        Ok(ConnectAnswer::Open) => Ok(()),
        Ok(ConnectAnswer::Refused { answer, reason }) => Err(ProxyError::Refused {
            proxy: name.to_owned(),
            target,
            answer,
            reason,
        }),
        Err(detail) => Err(ProxyError::Protocol {
            proxy: name.to_owned(),
            detail,
        }),
    }
}

/// Reads an HTTP answer's head up to and including the blank line, one byte at a time:
/// nothing after it may be consumed (it belongs to the TLS that follows).
async fn read_answer_head(r: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && !head.ends_with(b"\n\n") {
        if head.len() >= MAX_ANSWER_BYTES {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("the answer's head is over {MAX_ANSWER_BYTES} bytes"),
            ));
        }
        let n = match r.read(&mut byte).await {
            Ok(n) => n,
            // A proxy that closes with our request unread resets the connection.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                if head.is_empty() {
                    "the proxy closed the connection without answering".to_string()
                } else {
                    format!(
                        "the proxy closed the connection mid-answer: {:?}",
                        String::from_utf8_lossy(&head)
                    )
                },
            ));
        }
        head.push(byte[0]);
    }
    Ok(head)
}

/// A proxy's answer to `CONNECT`.
#[derive(Debug, PartialEq, Eq)]
pub enum ConnectAnswer {
    /// 2xx: the tunnel is open.
    Open,
    /// Any other status.
    Refused {
        /// The status line, and the `Proxy-Authenticate` header for a 407.
        answer: String,
        /// `auth` (407, or 401), `forbidden` (403) or `refused`.
        reason: &'static str,
    },
}

/// Parses the head of a proxy's answer to `CONNECT`; an error says why it is not HTTP.
pub fn parse_connect_answer(head: &[u8]) -> Result<ConnectAnswer, String> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split('\n').map(|l| l.trim_end_matches('\r'));
    let status = lines.next().unwrap_or("");
    let shown: String = status.chars().take(200).collect();
    let mut parts = status.splitn(3, ' ');
    let (version, code) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if !version.starts_with("HTTP/1.") {
        return Err(format!("its answer is not HTTP: {shown:?}"));
    }
    let code: u16 = match code.parse() {
        Ok(c) if (100..=599).contains(&c) => c,
        _ => return Err(format!("its answer has no status code: {shown:?}")),
    };
    if (200..300).contains(&code) {
        return Ok(ConnectAnswer::Open);
    }
    let mut answer = shown;
    if code == 407 {
        if let Some(h) = lines.find(|l| {
            l.get(..19)
                .is_some_and(|p| p.eq_ignore_ascii_case("proxy-authenticate:"))
        }) {
            let h: String = h.chars().take(200).collect();
            answer.push_str(&format!(" ({h})"));
        }
    }
    let reason = match code {
        // tinyproxy answers wrong credentials with a 401.
        401 | 407 => "auth",
        403 => "forbidden",
        _ => "refused",
    };
    Ok(ConnectAnswer::Refused { answer, reason })
}

async fn socks5_connect(
    tcp: &mut TcpStream,
    proxy: &Proxy,
    name: &str,
    host: &str,
    port: u16,
) -> Result<(), ProxyError> {
    let target = host_port(host, port);
    let proto = |detail: String| ProxyError::Protocol {
        proxy: name.to_owned(),
        detail,
    };
    let refused = |answer: String, reason: &'static str| ProxyError::Refused {
        proxy: name.to_owned(),
        target: target.clone(),
        answer,
        reason,
    };
    let io = |what: &'static str| {
        move |e: std::io::Error| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                proto(format!(
                    "{what}: the proxy closed the connection mid-answer"
                ))
            } else {
                proto(format!("{what}: {e}"))
            }
        }
    };
    // Greeting: no authentication, and username/password when we have credentials.
    let greeting: &[u8] = if proxy.auth.is_some() {
        &[5, 2, 0, 2]
    } else {
        &[5, 1, 0]
    };
    tcp.write_all(greeting).await.map_err(io("greeting"))?;
    let mut choice = [0u8; 2];
    tcp.read_exact(&mut choice)
        .await
        .map_err(io("reading the method it chose"))?;
    if choice[0] != 5 {
        return Err(proto(format!(
            "not a SOCKS5 server (its answer starts with byte {:#04x})",
            choice[0]
        )));
    }
    match (choice[1], &proxy.auth) {
        (0, _) => {}
        (2, Some((user, pass))) => {
            let mut m = vec![1, user.len() as u8];
            m.extend_from_slice(user.as_bytes());
            m.push(pass.len() as u8);
            m.extend_from_slice(pass.as_bytes());
            tcp.write_all(&m).await.map_err(io("sending credentials"))?;
            let mut st = [0u8; 2];
            tcp.read_exact(&mut st)
                .await
                .map_err(io("reading its answer to the credentials"))?;
            if st[1] != 0 {
                return Err(refused(
                    format!("username/password rejected (status {})", st[1]),
                    "auth",
                ));
            }
        }
        (0xff, None) => {
            return Err(refused(
                "no acceptable authentication method: the proxy wants credentials".into(),
                "auth",
            ))
        }
        (0xff, Some(_)) => {
            return Err(refused(
                "no acceptable authentication method (neither none nor username/password)".into(),
                "auth",
            ))
        }
        (m, _) => {
            return Err(proto(format!(
                "it chose authentication method {m:#04x}, which was not offered"
            )))
        }
    }
    // CONNECT, by name unless the target is an address: the proxy resolves it.
    let mut req = vec![5, 1, 0];
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => {
            req.push(1);
            req.extend_from_slice(&a.octets());
        }
        Ok(IpAddr::V6(a)) => {
            req.push(4);
            req.extend_from_slice(&a.octets());
        }
        Err(_) => {
            let n = u8::try_from(host.len())
                .map_err(|_| proto(format!("host name {host:?} is over 255 bytes")))?;
            req.push(3);
            req.push(n);
            req.extend_from_slice(host.as_bytes());
        }
    }
    req.extend_from_slice(&port.to_be_bytes());
    tcp.write_all(&req).await.map_err(io("sending CONNECT"))?;
    let mut head = [0u8; 4];
    tcp.read_exact(&mut head)
        .await
        .map_err(io("reading its answer to CONNECT"))?;
    if head[0] != 5 {
        return Err(proto(format!(
            "its answer to CONNECT starts with byte {:#04x}, not 5",
            head[0]
        )));
    }
    if head[1] != 0 {
        let (meaning, reason) = socks_reply_meaning(head[1]);
        return Err(refused(format!("{meaning} (reply {})", head[1]), reason));
    }
    // The bound address, which we do not need but must read past.
    let rest = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        3 => {
            let mut n = [0u8; 1];
            tcp.read_exact(&mut n)
                .await
                .map_err(io("reading the bound address"))?;
            n[0] as usize + 2
        }
        t => return Err(proto(format!("unknown address type {t} in its answer"))),
    };
    let mut skip = vec![0u8; rest];
    tcp.read_exact(&mut skip)
        .await
        .map_err(io("reading the bound address"))?;
    Ok(())
}

/// What a SOCKS5 reply code means, and its metric label.
pub fn socks_reply_meaning(code: u8) -> (&'static str, &'static str) {
    match code {
        0 => ("succeeded", "refused"),
        1 => ("general SOCKS server failure", "refused"),
        2 => ("connection not allowed by ruleset", "forbidden"),
        3 => ("network unreachable", "refused"),
        4 => ("host unreachable", "refused"),
        5 => ("connection refused by the target", "refused"),
        6 => ("TTL expired", "refused"),
        7 => ("command not supported", "refused"),
        8 => ("address type not supported", "refused"),
        _ => ("unknown SOCKS5 reply code", "refused"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls_parse_with_defaults_and_credentials() {
        let p = Proxy::parse("http://proxy.corp:3128").unwrap();
        assert_eq!(
            (p.scheme, p.host.as_str(), p.port),
            (Scheme::Http, "proxy.corp", 3128)
        );
        assert_eq!(p.auth, None);
        let p = Proxy::parse("HTTP://u%40x:p%3As@10.0.0.1/").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("10.0.0.1", 80));
        assert_eq!(p.auth, Some(("u@x".into(), "p:s".into())));
        assert_eq!(p.to_string(), "http://u%40x@10.0.0.1:80");
        assert!(
            !format!("{p:?}").contains("p:s"),
            "Debug never shows the password"
        );
        let p = Proxy::parse("socks5h://[::1]").unwrap();
        assert_eq!(
            (p.scheme, p.host.as_str(), p.port),
            (Scheme::Socks5, "::1", 1080)
        );
        assert_eq!(p.to_string(), "socks5://[::1]:1080");
        for bad in [
            "proxy:3128",
            "https://p:3128",
            "ftp://p:21",
            "http://p:0",
            "http://p:x",
            "http://p:3128/path",
            "http://user@p:3128",
            "http://:pw@p:3128",
            "http://",
            "http://a b:1",
            "http://u:%zz@p:1",
        ] {
            let e = Proxy::parse(bad).unwrap_err();
            assert!(!e.is_empty(), "{bad}");
        }
        // The password never appears in an error.
        let e = Proxy::parse("http://u:secret@p:3128/x").unwrap_err();
        assert!(!e.contains("secret"), "{e}");
    }

    #[test]
    fn credentials_from_a_file_need_user_and_password() {
        let p = Proxy::parse("socks5://p:1080").unwrap();
        let p = p.with_credentials_text("alice:pa:ss\nignored\n").unwrap();
        assert_eq!(p.auth, Some(("alice".into(), "pa:ss".into())));
        assert!(Proxy::parse("http://p:1")
            .unwrap()
            .with_credentials_text("alice\n")
            .is_err());
        assert!(Proxy::parse("http://p:1")
            .unwrap()
            .with_credentials_text(":pw")
            .is_err());
        let long = format!("u:{}", "x".repeat(300));
        assert!(Proxy::parse("socks5://p:1")
            .unwrap()
            .with_credentials_text(&long)
            .is_err());
    }

    #[test]
    fn environment_order_and_no_proxy() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let e = env(&[("HTTPS_PROXY", "http://a:1"), ("ALL_PROXY", "socks5://b:2")]);
        let (p, src) = from_env("relay.example.com", &e).unwrap().unwrap();
        assert_eq!((p.host.as_str(), src), ("a", Source::Env("HTTPS_PROXY")));
        let e = env(&[("https_proxy", " "), ("ALL_PROXY", "socks5://b:2")]);
        let (p, src) = from_env("relay.example.com", &e).unwrap().unwrap();
        assert_eq!((p.scheme, src), (Scheme::Socks5, Source::Env("ALL_PROXY")));
        assert!(from_env("x", &env(&[])).unwrap().is_none());
        let e = env(&[
            ("HTTPS_PROXY", "http://a:1"),
            ("NO_PROXY", "example.com, 10.0.0.0/8"),
        ]);
        assert!(from_env("relay.example.com", &e).unwrap().is_none());
        assert!(from_env("10.1.2.3", &e).unwrap().is_none());
        assert!(from_env("11.1.2.3", &e).unwrap().is_some());
        assert!(from_env("notexample.com", &e).unwrap().is_some());
        let e = env(&[("HTTPS_PROXY", "gopher://a")]);
        let err = from_env("x", &e).unwrap_err();
        assert!(err.contains("HTTPS_PROXY"), "{err}");
    }

    #[test]
    fn no_proxy_entries() {
        assert!(no_proxy_covers("*", "anything"));
        assert!(no_proxy_covers(".corp.example", "relay.corp.example"));
        assert!(no_proxy_covers("*.corp.example", "relay.corp.example"));
        assert!(no_proxy_covers("corp.example:443", "corp.example"));
        assert!(no_proxy_covers("Relay.Example", "relay.example"));
        assert!(!no_proxy_covers("corp.example", "corp.example.org"));
        assert!(no_proxy_covers("localhost,127.0.0.1,::1", "::1"));
        assert!(no_proxy_covers("[::1]:7443", "[::1]"));
        assert!(no_proxy_covers("fd00::/8", "fd12::1"));
        assert!(!no_proxy_covers("192.168.0.0/16", "10.0.0.1"));
        assert!(!no_proxy_covers("192.168.0.0/16", "host.example"));
        assert!(!no_proxy_covers("", "host"));
        assert!(!no_proxy_covers(" , ,", "host"));
    }

    #[test]
    fn connect_answers() {
        assert_eq!(
            parse_connect_answer(b"HTTP/1.1 200 Connection established\r\n\r\n"),
            Ok(ConnectAnswer::Open)
        );
        assert_eq!(
            parse_connect_answer(b"HTTP/1.0 200\r\n\r\n"),
            Ok(ConnectAnswer::Open)
        );
        let a = parse_connect_answer(
            b"HTTP/1.0 407 Proxy Authentication Required\r\nServer: x\r\nProxy-Authenticate: Basic realm=\"corp\"\r\n\r\n",
        )
        .unwrap();
        assert_eq!(
            a,
            ConnectAnswer::Refused {
                answer: "HTTP/1.0 407 Proxy Authentication Required (Proxy-Authenticate: Basic realm=\"corp\")".into(),
                reason: "auth"
            }
        );
        assert!(matches!(
            parse_connect_answer(b"HTTP/1.1 403 Forbidden\r\n\r\n"),
            Ok(ConnectAnswer::Refused {
                reason: "forbidden",
                ..
            })
        ));
        assert!(matches!(
            parse_connect_answer(b"HTTP/1.1 502 Bad Gateway\r\n\r\n"),
            Ok(ConnectAnswer::Refused {
                reason: "refused",
                ..
            })
        ));
        // Multi-byte characters where a header name would end never panic.
        let odd = "HTTP/1.1 407 No\r\nProxy-Authenticaté: x\r\nProxy-Authentic\u{e9}\u{e9}\u{e9}: y\r\n\r\n";
        assert!(matches!(
            parse_connect_answer(odd.as_bytes()),
            Ok(ConnectAnswer::Refused { reason: "auth", .. })
        ));
        assert!(parse_connect_answer(b"HTTP/1.1 407 \xff\xfe\xfd\r\n\xe2\x82\r\n\r\n").is_ok());
        for bad in [
            &b"SSH-2.0-OpenSSH\r\n\r\n"[..],
            b"HTTP/1.1 abc\r\n\r\n",
            b"",
            b"\xff\xfe\r\n\r\n",
            b"HTTP/1.1 99 x\r\n\r\n",
        ] {
            assert!(parse_connect_answer(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn redaction_hides_the_password_only() {
        assert_eq!(redact("http://u:pw@h:1"), "http://u:***@h:1");
        assert_eq!(redact("http://h:1"), "http://h:1");
    }

    proptest::proptest! {
        /// What a proxy answers, and what a config or the environment says, never makes
        /// the parsers panic; a parsed URL shows no password.
        #[test]
        fn parsers_never_panic(
            answer in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
            url in ".{0,80}",
            list in ".{0,80}",
            host in ".{0,40}",
        ) {
            let _ = parse_connect_answer(&answer);
            let mut head = b"HTTP/1.1 407 x\r\n".to_vec();
            head.extend_from_slice(&answer);
            let _ = parse_connect_answer(&head);
            let _ = Proxy::parse(&url);
            let _ = redact(&url);
            let _ = no_proxy_covers(&list, &host);
            let env = |k: &str| (k == "HTTPS_PROXY").then(|| url.clone());
            let _ = from_env(&host, &env);
            let _ = socks_reply_meaning(answer.first().copied().unwrap_or(0));
        }
    }

    proptest::proptest! {
        /// A proxy URL with credentials parses them back, percent-encoded or not, and
        /// never shows the password.
        #[test]
        fn credentials_parse_and_never_show(
            user in "[a-z]{1,8}",
            pass in "[A-Z@:/%]{4,12}",
            socks in proptest::bool::ANY,
        ) {
            let enc: String = pass.bytes().map(|b| format!("%{b:02X}")).collect();
            let scheme = if socks { "socks5" } else { "http" };
            let p = Proxy::parse(&format!("{scheme}://{user}:{enc}@proxy.corp:3128")).unwrap();
            proptest::prop_assert_eq!(p.auth.clone(), Some((user.clone(), pass.clone())));
            let shown = format!("{p} {p:?} {}", redact(&format!("http://{user}:{enc}@h:1")));
            proptest::prop_assert!(!shown.contains(&pass) && !shown.contains(&enc), "{}", shown);
        }
    }

    /// A scripted SOCKS5 server on loopback: what it reads is checked, what it writes is fixed.
    async fn socks_server(script: Vec<(Vec<u8>, Vec<u8>)>) -> u16 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            for (expect, answer) in script {
                let mut got = vec![0u8; expect.len()];
                s.read_exact(&mut got).await.unwrap();
                assert_eq!(got, expect);
                s.write_all(&answer).await.unwrap();
            }
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
        });
        port
    }

    #[tokio::test]
    async fn socks5_with_credentials_asks_by_name() {
        let mut connect = vec![5, 1, 0, 3, 7];
        connect.extend_from_slice(b"relay.x");
        connect.extend_from_slice(&7443u16.to_be_bytes());
        let port = socks_server(vec![
            (vec![5, 2, 0, 2], vec![5, 2]),
            (vec![1, 1, b'u', 2, b'p', b'w'], vec![1, 0]),
            (connect, vec![5, 0, 0, 1, 127, 0, 0, 1, 0, 80]),
        ])
        .await;
        let p = Proxy::parse(&format!("socks5://u:pw@127.0.0.1:{port}")).unwrap();
        connect_ok(&p, "relay.x", 7443).await;
    }

    async fn connect_ok(p: &Proxy, host: &str, port: u16) {
        if let Err(e) = super::connect(p, host, port, Duration::from_secs(5)).await {
            panic!("{e}");
        }
    }

    #[tokio::test]
    async fn socks5_refusals_are_named() {
        let port = socks_server(vec![(vec![5, 1, 0], vec![5, 0xff])]).await;
        let p = Proxy::parse(&format!("socks5://127.0.0.1:{port}")).unwrap();
        let e = super::connect(&p, "10.0.0.1", 5432, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "auth", "{e}");
        assert!(e.to_string().contains("wants credentials"), "{e}");

        let port = socks_server(vec![
            (vec![5, 1, 0], vec![5, 0]),
            (
                vec![5, 1, 0, 1, 10, 0, 0, 1, 0x15, 0x38],
                vec![5, 2, 0, 1, 0, 0, 0, 0, 0, 0],
            ),
        ])
        .await;
        let p = Proxy::parse(&format!("socks5://127.0.0.1:{port}")).unwrap();
        let e = super::connect(&p, "10.0.0.1", 5432, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "forbidden", "{e}");
        assert!(
            e.to_string().contains("not allowed by ruleset (reply 2)"),
            "{e}"
        );

        let port = socks_server(vec![(vec![5, 1, 0], b"HTTP/1.1 400 Bad\r\n\r\n".to_vec())]).await;
        let p = Proxy::parse(&format!("socks5://127.0.0.1:{port}")).unwrap();
        let e = super::connect(&p, "h", 1, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "protocol", "{e}");
    }

    /// A SOCKS5 server that accepts the greeting, reads the connect request, sends only
    /// the start of its reply and then closes (`close`) or stalls.
    async fn socks_server_cut_short(close: bool) -> u16 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut greeting = [0u8; 3];
            s.read_exact(&mut greeting).await.unwrap();
            s.write_all(&[5, 0]).await.unwrap();
            let mut request = [0u8; 10];
            s.read_exact(&mut request).await.unwrap();
            s.write_all(&[5, 0, 0]).await.unwrap();
            if !close {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        });
        port
    }

    #[tokio::test]
    async fn a_socks5_proxy_that_stops_mid_answer_is_named() {
        for close in [true, false] {
            let port = socks_server_cut_short(close).await;
            let p = Proxy::parse(&format!("socks5://127.0.0.1:{port}")).unwrap();
            let started = std::time::Instant::now();
            let e = super::connect(&p, "10.0.0.1", 5432, Duration::from_millis(500))
                .await
                .unwrap_err();
            assert_eq!(e.reason(), "protocol", "close={close}: {e}");
            let said = e.to_string();
            assert!(
                said.contains(if close {
                    "closed the connection mid-answer"
                } else {
                    "no answer within"
                }),
                "{said}"
            );
            assert!(started.elapsed() < Duration::from_secs(5), "close={close}");
            eprintln!("close={close}: {e}");
        }
    }

    #[tokio::test]
    async fn an_http_proxy_that_says_nothing_times_out_and_one_that_closes_is_named() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let held = tokio::spawn(async move {
            let (a, _) = l.accept().await.unwrap();
            let (b, _) = l.accept().await.unwrap();
            drop(b);
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(a);
        });
        let p = Proxy::parse(&format!("http://127.0.0.1:{port}")).unwrap();
        let e = super::connect(&p, "h", 1, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no answer within"), "{e}");
        let e = super::connect(&p, "h", 1, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("without answering"), "{e}");
        held.abort();
        let _ = held.await;
        let e = super::connect(&p, "h", 1, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "connect", "{e}");
    }
}
