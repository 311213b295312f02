//! Small pieces of durable file handling shared by the spool, the store and the CDC
//! source's state file, and a way to run disk work from async code.

use std::io::{self, Write};
use std::path::Path;

/// Replaces `path` with `contents` atomically and durably: a temporary file next to it,
/// fsync, rename over `path`, fsync of the directory. A crash leaves the old or the new
/// contents, never a mix.
pub fn write_atomic(path: &Path, contents: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Like [`write_atomic`], for a small file whose length never changes, and that works on
/// a full disk: when the atomic replacement fails for want of space, the existing file is
/// overwritten in place (same length, so no block is allocated; a write this small lies in
/// one sector) and fsynced. Fails if the file does not exist yet with that length.
pub fn write_small_even_when_full(path: &Path, contents: &[u8]) -> io::Result<()> {
    match write_atomic(path, contents) {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
            ) =>
        {
            let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
            tmp_name.push(".tmp");
            let _ = std::fs::remove_file(path.with_file_name(tmp_name));
            let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
            if f.metadata()?.len() != contents.len() as u64 {
                return Err(e);
            }
            f.write_all(contents)?;
            f.sync_all()
        }
        other => other,
    }
}

/// Runs blocking file I/O from async code without stalling the other tasks of a
/// multi-threaded runtime (`block_in_place`); inline on a current-thread runtime (tests)
/// or outside a runtime.
pub fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("STATE");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("STATE")]);
    }
}
