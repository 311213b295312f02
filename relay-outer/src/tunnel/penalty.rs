//! Addresses that keep failing the tunnel handshake are shut out for a while.
//!
//! A TLS handshake costs relay-outer a key exchange and a signature; an attacker making
//! them as fast as it can (a few thousand a second on one core) takes CPU from the
//! sessions that carry traffic. A real relay-inner fails a handshake rarely (a wrong
//! certificate fails every few seconds under backoff), so an address that failed more
//! than `tunnel.failed_handshake_limit` handshakes in the current 10 s window has its
//! next connections closed at accept, before any TLS, until the window ends (counted as
//! reason `throttled`). Sessions already up from that address are untouched; a real
//! relay-inner behind the same address (a NAT shared with the attacker) may wait up to
//! one window to reconnect.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The window failed handshakes are counted in.
pub const WINDOW: Duration = Duration::from_secs(10);

/// Addresses tracked at most; past it, entries of ended windows are dropped, and if
/// that is not enough the table starts over (failing open, never growing without bound).
const MAX_ADDRESSES: usize = 65_536;

/// Failed handshakes per address in the current window.
#[derive(Debug, Default)]
pub struct Penalty {
    table: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl Penalty {
    /// Notes a failed handshake from `ip` at `now`.
    pub fn failed(&self, ip: IpAddr, now: Instant) {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if t.len() >= MAX_ADDRESSES && !t.contains_key(&ip) {
            t.retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
            if t.len() >= MAX_ADDRESSES {
                t.clear();
            }
        }
        let e = t.entry(ip).or_insert((now, 0));
        if now.duration_since(e.0) >= WINDOW {
            *e = (now, 0);
        }
        e.1 = e.1.saturating_add(1);
    }

    /// Whether a new connection from `ip` at `now` is shut out under `limit` (0: never).
    pub fn shut_out(&self, ip: IpAddr, now: Instant, limit: u32) -> bool {
        if limit == 0 {
            return false;
        }
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        t.get(&ip)
            .is_some_and(|(start, n)| now.duration_since(*start) < WINDOW && *n >= limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_over_the_limit_is_shut_out_until_its_window_ends() {
        let p = Penalty::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(!p.shut_out(a, t0, 3));
            p.failed(a, t0);
        }
        assert!(p.shut_out(a, t0 + Duration::from_secs(1), 3));
        assert!(!p.shut_out(a, t0, 0), "0: no limit");
        assert!(!p.shut_out(b, t0, 3), "other addresses are not touched");
        assert!(!p.shut_out(a, t0 + WINDOW, 3), "the window ended");
        // A new window counts from zero.
        p.failed(a, t0 + WINDOW);
        assert!(!p.shut_out(a, t0 + WINDOW, 3));
    }

    #[test]
    fn the_table_stays_bounded() {
        let p = Penalty::default();
        let t0 = Instant::now();
        for i in 0..(MAX_ADDRESSES as u32 + 10) {
            p.failed(IpAddr::from(i.to_be_bytes()), t0);
        }
        assert!(p.table.lock().unwrap().len() <= MAX_ADDRESSES);
    }
}
