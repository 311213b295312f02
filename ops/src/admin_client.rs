//! A small HTTP/1.1 client for the commands that talk to a running relay's plain-HTTP
//! admin endpoint on this machine (`relay-inner cdc resync`): one request, the status and
//! the body.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a command waits for the relay's answer.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// The address to reach an endpoint listening on `listen` from this machine (an
/// unspecified address becomes loopback).
pub fn local(mut listen: SocketAddr) -> SocketAddr {
    if listen.ip().is_unspecified() {
        listen.set_ip(if listen.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    listen
}

/// Sends `method path` (no body) to `addr`; returns the status code and the body.
pub async fn request(addr: SocketAddr, method: &str, path: &str) -> Result<(u16, String), String> {
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot reach the admin endpoint at {addr}: {e} (is the relay running with this configuration?)"))?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("admin endpoint {addr}: {e}"))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)
            .await
            .map_err(|e| format!("admin endpoint {addr}: {e}"))?;
        Ok::<_, String>(buf)
    };
    let buf = tokio::time::timeout(TIMEOUT, io)
        .await
        .map_err(|_| format!("the admin endpoint at {addr} did not answer within {TIMEOUT:?}"))??;
    parse(&buf).ok_or_else(|| {
        format!("the admin endpoint at {addr} sent something that is not an HTTP answer")
    })
}

/// `s` for a URL's path or query: unreserved characters as they are, the rest as `%XX`.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3 / 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Status and body of a whole HTTP/1.1 answer (`Content-Length`, chunked, or to the end).
fn parse(buf: &[u8]) -> Option<(u16, String)> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..head_end]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let mut chunked = false;
    let mut len = None;
    for l in lines {
        let (k, v) = l.split_once(':')?;
        match k.trim().to_ascii_lowercase().as_str() {
            "transfer-encoding" => chunked = v.trim().eq_ignore_ascii_case("chunked"),
            "content-length" => len = v.trim().parse::<usize>().ok(),
            _ => {}
        }
    }
    let mut body = &buf[head_end + 4..];
    let out = if chunked {
        let mut out = Vec::new();
        loop {
            let nl = body.windows(2).position(|w| w == b"\r\n")?;
            let n =
                usize::from_str_radix(std::str::from_utf8(&body[..nl]).ok()?.trim(), 16).ok()?;
            body = &body[nl + 2..];
            if n == 0 {
                break;
            }
            out.extend_from_slice(body.get(..n)?);
            body = body.get(n + 2..)?;
        }
        out
    } else {
        match len {
            Some(n) => body.get(..n)?.to_vec(),
            None => body.to_vec(),
        }
    };
    Some((status, String::from_utf8_lossy(&out).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse_whole_or_not_at_all() {
        assert_eq!(
            parse(b"HTTP/1.1 202 Accepted\r\ncontent-length: 2\r\n\r\n{}"),
            Some((202, "{}".into()))
        );
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"),
            Some((200, "abcde".into()))
        );
        assert_eq!(
            parse(b"HTTP/1.1 404 Not Found\r\n\r\nnope"),
            Some((404, "nope".into()))
        );
        assert_eq!(parse(b"garbage"), None);
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nab"),
            None
        );
        assert_eq!(
            parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
            None
        );
    }
}
