//! Socket options on the tunnel and data sockets.

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// Sets what every tunnel socket needs: no Nagle delay, TCP keepalive probes so a NAT
/// keeps the mapping and a dead peer is noticed by the kernel, and TCP_USER_TIMEOUT so
/// unacknowledged data fails the socket instead of retrying for many minutes.
pub fn tune_tunnel_socket(s: &TcpStream, keepalive: Duration, user_timeout: Duration) {
    let sock = SockRef::from(s);
    let ka = TcpKeepalive::new()
        .with_time(keepalive)
        .with_interval(keepalive)
        .with_retries(3);
    if let Err(e) = s.set_nodelay(true) {
        tracing::debug!(error = %e, "TCP_NODELAY not set");
    }
    if let Err(e) = sock.set_tcp_keepalive(&ka) {
        tracing::debug!(error = %e, "TCP keepalive not set");
    }
    if let Err(e) = sock.set_tcp_user_timeout(Some(user_timeout)) {
        tracing::debug!(error = %e, "TCP_USER_TIMEOUT not set");
    }
}

/// Sets TCP_NODELAY on a data socket (client or service side).
pub fn tune_data_socket(s: &TcpStream) {
    if let Err(e) = s.set_nodelay(true) {
        tracing::debug!(error = %e, "TCP_NODELAY not set");
    }
}
