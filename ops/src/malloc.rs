//! glibc allocator settings for the data path.
//!
//! The data path allocates and frees a 16 KiB body for every yamux frame and keeps
//! megabytes of them in flight on a busy connection. With glibc's defaults, each lane's
//! arena gives its free top back to the kernel (`madvise(MADV_DONTNEED)`) as soon as it
//! exceeds 128 KiB, and the next burst faults the same pages in again, zeroed by the
//! kernel: measured on 8 bulk streams, relay-outer's lane took about 108 000 page faults
//! and 670 `madvise` calls a second, a fault for every 8 KiB moved. Keeping up to
//! [`TRIM_THRESHOLD`] of free memory per arena stops that churn (8 streams: no faults
//! left; one stream, whose window grows larger: about 6 000 a second, none with 64 MiB,
//! the same throughput either way); memory a burst used is still returned once more
//! than that lies free, so a relay that has gone idle keeps at most that much per thread.

/// Free bytes at the top of an arena before glibc returns them to the kernel.
pub const TRIM_THRESHOLD: usize = 8 * 1024 * 1024;

/// Allocations from which glibc maps memory of its own instead of using the arena.
/// Setting the trim threshold freezes glibc's otherwise self-adjusting mmap threshold, so
/// it is set too, above every buffer the data path allocates.
pub const MMAP_THRESHOLD: usize = 4 * 1024 * 1024;

/// Applies the settings above; call once at start, before the runtimes start threads.
/// A no-op where the C library is not glibc.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; it is called before other
        // threads exist, and a refused value (return 0) leaves the default in place.
        let ok = unsafe {
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int) == 1
                && libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) == 1
        };
        if !ok {
            tracing::debug!("mallopt refused the allocator settings; glibc defaults stay");
        }
    }
}

/// Gives free memory back to the kernel (`malloc_trim(0)`): every arena's free pages,
/// not only the free top [`TRIM_THRESHOLD`] covers. Call when a burst is over (a sink
/// that applied a large transaction and caught up), not on the data path: it walks and
/// locks each arena. A no-op where the C library is not glibc.
pub fn release_free() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only returns free memory to the kernel; it is thread-safe
        // (it takes each arena's lock) and touches no memory in use.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// Bytes the allocator holds free in its arenas (`mallinfo2().fordblks`): memory that
/// [`release_free`] could give back. `None` where the C library is not glibc.
pub fn free_held() -> Option<usize> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's statistics (it takes each arena's
        // lock) and returns them by value.
        let info = unsafe { libc::mallinfo2() };
        Some(info.fordblks)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}
