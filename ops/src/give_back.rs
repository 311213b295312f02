//! Memory back after a burst. A flood of connections (idle ones at the tunnel port,
//! handshakes, clients over a listener's limit) or many streams buffering for slow
//! readers make the allocator's arenas grow; when they end, glibc keeps most of those
//! pages, free but resident, because they are not at the top of an arena (measured: 5000
//! idle connections, then 200 slow readers, left relay-outer at 183-361 MB after they
//! were gone). A task looks every 5 s at how much the allocator holds free
//! ([`crate::malloc::free_held`]) and gives it back to the kernel
//! ([`crate::malloc::release_free`]) once it exceeds 64 MiB.

use std::time::Duration;

/// How often the task looks.
const CHECK: Duration = Duration::from_secs(5);

/// Free memory held by the allocator that is worth giving back: above what the data path
/// keeps free on purpose (up to [`crate::malloc::TRIM_THRESHOLD`] per arena) on a busy
/// relay, so that a bulk transfer is not made to fault its buffers in again every 5 s.
const WORTH: usize = 64 << 20;

/// Starts the task on the current tokio runtime (none: nothing to do).
pub fn spawn() {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    rt.spawn(async {
        let mut tick = tokio::time::interval(CHECK);
        loop {
            tick.tick().await;
            match crate::malloc::free_held() {
                Some(free) if free >= WORTH => {
                    crate::malloc::release_free();
                    tracing::debug!(
                        free_mb = free >> 20,
                        "free memory held by the allocator given back"
                    );
                }
                Some(_) => {}
                None => return,
            }
        }
    });
}
