//! The only place where `unsafe` libc calls are allowed.
#![allow(unsafe_code)]

/// Effective user id of this process.
pub(crate) fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Sends `sig` to process `pid`; returns false when the call failed (e.g. no such process).
pub(crate) fn kill(pid: u32, sig: i32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        // Never signal a process group or every process by accident.
        return false;
    }
    // SAFETY: kill has no memory-safety preconditions; pid > 0 targets a single process.
    unsafe { libc::kill(pid, sig) == 0 }
}
