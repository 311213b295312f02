//! Memory back after an attack. A flood of connections (idle ones at the tunnel port,
//! handshakes, clients over a listener's limit) makes the allocator's arenas grow by
//! the state of every connection in flight; when they end, glibc keeps most of those
//! pages, free but resident, because they are not at the top of an arena (measured:
//! 5000 idle connections left relay-outer at hundreds of MB after they were gone). So
//! refusals are noted, and once they have stopped for a check interval after some came,
//! free memory is given back to the kernel once (`malloc_trim`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How often the relay looks whether refusals stopped.
const CHECK: Duration = Duration::from_secs(5);

static REFUSALS: AtomicU64 = AtomicU64::new(0);

/// Notes a refused connection.
pub fn note() {
    REFUSALS.fetch_add(1, Ordering::Relaxed);
}

/// Starts the watch (on the current tokio runtime).
pub fn spawn() {
    tokio::spawn(async {
        let mut tick = tokio::time::interval(CHECK);
        let mut seen = 0;
        let mut since_trim = false;
        loop {
            tick.tick().await;
            let now = REFUSALS.load(Ordering::Relaxed);
            if now != seen {
                seen = now;
                since_trim = true;
            } else if since_trim {
                since_trim = false;
                routy_ops::malloc::release_free();
                tracing::debug!(refusals = now, "refusals stopped: free memory given back");
            }
        }
    });
}
