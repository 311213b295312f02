//! Proxy settings from the configuration and the environment (`routy_tunnel::proxy`): the
//! proxy URL, a credentials file's text, and `NO_PROXY` lists. The input is split at its
//! first NUL into two strings (URL or list, then credentials text or host name).
use routy_tunnel::proxy::{no_proxy_covers, Proxy};

/// Runs one input.
pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (first, second) = text.split_once('\0').unwrap_or((text, ""));
    if let Ok(proxy) = Proxy::parse(first) {
        // Shown without the password, and what is shown parses back to the same place.
        let shown = proxy.to_string();
        if let Some((_, pass)) = &proxy.auth {
            assert!(pass.is_empty() || !format!("{proxy:?}").contains(&format!(":{pass}@")));
        }
        let again = Proxy::parse(&shown);
        if proxy.auth.is_none() {
            assert_eq!(again.as_ref().ok(), Some(&proxy), "{shown}");
        }
        let _ = proxy.with_credentials_text(second);
    }
    let _ = no_proxy_covers(first, second);
    // The environment: the URL as HTTPS_PROXY, the second string as NO_PROXY.
    let env = |k: &str| match k {
        "HTTPS_PROXY" => Some(first.to_owned()),
        "NO_PROXY" => Some(second.to_owned()),
        _ => None,
    };
    let _ = routy_tunnel::proxy::from_env("relay-outer.example", &env);
}
