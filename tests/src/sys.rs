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

/// Moves the calling thread into the network namespace `ns` (a file such as
/// `/run/netns/NAME`). Sockets the thread creates afterwards belong to that namespace
/// for their whole life, whichever thread uses them.
pub(crate) fn enter_netns(ns: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: `ns` is an open file for the duration of the call; setns changes only the
    // calling thread's network namespace and touches no memory of ours.
    let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
