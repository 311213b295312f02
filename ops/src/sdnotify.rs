//! The systemd notification protocol (sd_notify(3)) without libsystemd: readiness,
//! reload and stop notices, a status line, and watchdog pings.
//!
//! Outside systemd (no `NOTIFY_SOCKET`) every function is a quiet no-op, so callers never
//! need to know how the relay was started. Notices are single datagrams
//! on a Unix socket; a failure is logged at debug level and otherwise ignored, since the
//! relay works the same whether or not systemd hears about it.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::Duration;

/// Environment variable naming the socket systemd listens on for notices.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Environment variable holding the watchdog timeout in microseconds.
pub const WATCHDOG_USEC: &str = "WATCHDOG_USEC";

/// Environment variable naming the process the watchdog applies to, when set.
pub const WATCHDOG_PID: &str = "WATCHDOG_PID";

/// Longest a notice may wait for room in systemd's receive queue; the caller may be a
/// runtime thread, so a busy systemd must not hold it long.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// Sends `state` (newline-separated `KEY=value` lines) to systemd; false when not run
/// under systemd or the send failed.
pub fn notify(state: &str) -> bool {
    match std::env::var_os(NOTIFY_SOCKET) {
        Some(socket) => notify_to(&socket, state),
        None => {
            tracing::debug!(state, "{NOTIFY_SOCKET} not set, not notifying");
            false
        }
    }
}

/// Tells systemd that start-up (or a reload) is complete.
pub fn ready() {
    notify("READY=1");
}

/// Tells systemd that a configuration reload started; send [`ready`] when it is done.
///
/// `MONOTONIC_USEC=` is left out: reading CLOCK_MONOTONIC needs `clock_gettime`, which
/// this crate cannot call without `libc` and `unsafe`. `Type=notify-reload` units
/// (systemd 253 and later) require that field, so run the relays as `Type=notify` with
/// `ExecReload=kill -HUP $MAINPID` instead.
pub fn reloading() {
    notify("RELOADING=1");
}

/// Tells systemd that shutdown began.
pub fn stopping() {
    notify("STOPPING=1");
}

/// Sets the one-line status `systemctl status` shows; line breaks become spaces.
pub fn status(text: &str) {
    notify(&format!("STATUS={}", text.replace(['\r', '\n'], " ")));
}

/// How often to ping the watchdog: half of `WATCHDOG_USEC`, as sd_watchdog_enabled(3)
/// recommends; None when there is no watchdog, it is meant for another process, or the
/// variables do not parse.
pub fn watchdog_interval() -> Option<Duration> {
    watchdog_from(
        std::env::var_os(WATCHDOG_USEC).as_deref(),
        std::env::var_os(WATCHDOG_PID).as_deref(),
        std::process::id(),
    )
}

/// Pings the systemd watchdog every [`watchdog_interval`] while `health()` says the relay
/// works, so a wedged relay stops pinging and gets restarted; returns at once when there
/// is no watchdog, otherwise runs until dropped.
pub async fn watchdog_loop(health: impl Fn() -> bool + Send + 'static) {
    let Some(period) = watchdog_interval() else {
        return;
    };
    tracing::debug!(?period, "pinging the systemd watchdog");
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut healthy = true;
    loop {
        // No deadline: this waits for the timer, not the network.
        ticks.tick().await;
        let now = health();
        if now {
            notify("WATCHDOG=1");
        }
        if now != healthy {
            if now {
                tracing::info!("health check passes again, pinging the systemd watchdog");
            } else {
                tracing::warn!("health check fails, no longer pinging the systemd watchdog");
            }
            healthy = now;
        }
    }
}

/// [`notify`] with the socket address given.
fn notify_to(socket: &OsStr, state: &str) -> bool {
    match send(socket, state) {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(error = %e, ?socket, state, "systemd notification not sent");
            false
        }
    }
}

/// Sends one datagram to `socket`: an absolute path, or `@name` for an abstract socket.
fn send(socket: &OsStr, state: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    sock.set_write_timeout(Some(SEND_TIMEOUT))?;
    let sent = match socket.as_bytes() {
        [b'/', ..] => sock.send_to(state.as_bytes(), Path::new(socket))?,
        [b'@', name @ ..] => send_abstract(&sock, name, state)?,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "neither an absolute path nor an @abstract name",
            ))
        }
    };
    if sent != state.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "datagram truncated",
        ));
    }
    Ok(())
}

/// Sends to the abstract socket `name` (without its leading NUL).
#[cfg(any(target_os = "linux", target_os = "android"))]
fn send_abstract(sock: &UnixDatagram, name: &[u8], state: &str) -> io::Result<usize> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    sock.send_to_addr(state.as_bytes(), &addr)
}

/// Abstract sockets exist only on Linux.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn send_abstract(_: &UnixDatagram, _: &[u8], _: &str) -> io::Result<usize> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract sockets need Linux",
    ))
}

/// [`watchdog_interval`] from the variables' values and our pid.
fn watchdog_from(usec: Option<&OsStr>, pid: Option<&OsStr>, our_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.to_str()?.parse().ok()?;
    if usec == 0 {
        return None;
    }
    if let Some(pid) = pid {
        let pid: u32 = pid.to_str()?.parse().ok()?;
        if pid != our_pid {
            return None;
        }
    }
    // At least 1 µs: a zero period would make the interval timer panic.
    Some(Duration::from_micros((usec / 2).max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// Receives one datagram as text, or None if none arrives within `wait`.
    fn recv(sock: &UnixDatagram, wait: Duration) -> Option<String> {
        sock.set_read_timeout(Some(wait)).expect("timeout");
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    fn drain(sock: &UnixDatagram) {
        while recv(sock, Duration::from_millis(1)).is_some() {}
    }

    const WAIT: Duration = Duration::from_secs(2);

    #[test]
    fn watchdog_variables() {
        let os = |s: &'static str| Some(OsStr::new(s));
        let half_minute = Some(Duration::from_secs(15));
        assert_eq!(watchdog_from(os("30000000"), None, 42), half_minute);
        assert_eq!(watchdog_from(os("30000000"), os("42"), 42), half_minute);
        assert_eq!(watchdog_from(os("30000000"), os("43"), 42), None);
        assert_eq!(watchdog_from(os("30000000"), os("x"), 42), None);
        assert_eq!(
            watchdog_from(os("1"), None, 42),
            Some(Duration::from_micros(1))
        );
        for bad in [
            "",
            "0",
            "-5",
            "ten",
            " 100",
            "1e6",
            "99999999999999999999999",
        ] {
            assert_eq!(watchdog_from(os(bad), None, 42), None, "{bad:?}");
        }
        assert_eq!(watchdog_from(None, os("42"), 42), None);
    }

    #[test]
    fn bad_socket_addresses_fail_without_panicking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nobody-listens");
        assert!(!notify_to(missing.as_os_str(), "READY=1"));
        assert!(!notify_to(OsStr::new("relative/path"), "READY=1"));
        assert!(!notify_to(OsStr::new(""), "READY=1"));
        assert!(!notify_to(OsStr::new("vsock:2:1234"), "READY=1"));
    }

    #[test]
    fn notices_reach_a_path_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind");
        assert!(notify_to(path.as_os_str(), "READY=1\nSTATUS=up"));
        assert_eq!(recv(&sock, WAIT).as_deref(), Some("READY=1\nSTATUS=up"));
    }

    /// Everything that reads or writes the process environment, in one test so no two
    /// run at once (and no other test in this crate touches these variables).
    #[test]
    fn environment_driven() {
        let clear = || {
            for var in [NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID] {
                std::env::remove_var(var);
            }
        };
        clear();

        // Not under systemd: everything is a quiet no-op.
        assert!(!notify("READY=1"));
        ready();
        assert_eq!(watchdog_interval(), None);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(async {
            tokio::time::timeout(WAIT, watchdog_loop(|| true))
                .await
                .expect("watchdog_loop returns at once without a watchdog");
        });

        // A socket at a path.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind");
        std::env::set_var(NOTIFY_SOCKET, &path);
        ready();
        assert_eq!(recv(&sock, WAIT).as_deref(), Some("READY=1"));
        reloading();
        assert_eq!(recv(&sock, WAIT).as_deref(), Some("RELOADING=1"));
        stopping();
        assert_eq!(recv(&sock, WAIT).as_deref(), Some("STOPPING=1"));
        status("3 tunnels\nup");
        assert_eq!(recv(&sock, WAIT).as_deref(), Some("STATUS=3 tunnels up"));

        // An abstract socket.
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let name = format!("routy-sdnotify-test-{}", std::process::id());
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                .expect("abstract name");
            let abstract_sock = UnixDatagram::bind_addr(&addr).expect("bind abstract");
            std::env::set_var(NOTIFY_SOCKET, format!("@{name}"));
            ready();
            assert_eq!(recv(&abstract_sock, WAIT).as_deref(), Some("READY=1"));
            std::env::set_var(NOTIFY_SOCKET, &path);
        }

        // The watchdog variables.
        std::env::set_var(WATCHDOG_USEC, "30000000");
        assert_eq!(watchdog_interval(), Some(Duration::from_secs(15)));
        std::env::set_var(WATCHDOG_PID, std::process::id().to_string());
        assert_eq!(watchdog_interval(), Some(Duration::from_secs(15)));
        std::env::set_var(WATCHDOG_PID, (std::process::id() + 1).to_string());
        assert_eq!(watchdog_interval(), None);
        std::env::set_var(WATCHDOG_PID, "garbage");
        assert_eq!(watchdog_interval(), None);
        std::env::remove_var(WATCHDOG_PID);
        std::env::set_var(WATCHDOG_USEC, "garbage");
        assert_eq!(watchdog_interval(), None);

        // The watchdog loop pings only while healthy: every 20 ms here.
        std::env::set_var(WATCHDOG_USEC, "40000");
        let healthy = Arc::new(AtomicBool::new(true));
        let probe = healthy.clone();
        let pinger = rt.spawn(watchdog_loop(move || probe.load(Ordering::SeqCst)));
        assert_eq!(recv(&sock, WAIT).as_deref(), Some("WATCHDOG=1"));
        assert_eq!(recv(&sock, WAIT).as_deref(), Some("WATCHDOG=1"));
        healthy.store(false, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(60));
        drain(&sock);
        assert_eq!(
            recv(&sock, Duration::from_millis(200)),
            None,
            "pinged while unhealthy"
        );
        healthy.store(true, Ordering::SeqCst);
        assert_eq!(recv(&sock, WAIT).as_deref(), Some("WATCHDOG=1"));
        pinger.abort();

        clear();
        assert!(!notify("READY=1"));
    }
}
