//! Small pieces of durable file handling shared by the spool, the store and the CDC
//! source's state file, and a way to run disk work from async code.

use std::io::{self, Write};
use std::path::Path;

/// Replaces `path` with `contents` atomically and durably: a temporary file next to it,
/// fsync, rename over `path`, fsync of the directory. A crash leaves the old or the new
/// contents, never a mix.
pub fn write_atomic(path: &Path, contents: &[u8]) -> io::Result<()> {
    write_atomic_with(path, contents, None)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// [`write_atomic`] without the directory fsync (for a caller that writes several files
/// and syncs their directory once, with [`sync_dir`]), and with the file's permission
/// bits set to exactly `mode` when given (whatever the umask). The temporary file is
/// removed when a step fails.
pub fn write_atomic_with(path: &Path, contents: &[u8], mode: Option<u32>) -> io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let write = || -> io::Result<()> {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        if let Some(mode) = mode {
            opts.mode(mode);
        }
        let mut f = opts.open(&tmp)?;
        if let Some(mode) = mode {
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().inspect_err(|_| {
        // Best effort: the original error is the one worth reporting.
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Fsyncs a directory, so the entries created, renamed or removed in it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    std::fs::File::open(dir)?.sync_all()
}

/// Like [`write_atomic`], for a small file whose length never changes, and that works on
/// a full disk: when the atomic replacement fails for want of space, the existing file is
/// overwritten in place (same length, so no block is allocated; a write this small lies in
/// one sector) and fsynced. Fails if the file does not exist yet with that length.
pub fn write_small_even_when_full(path: &Path, contents: &[u8]) -> io::Result<()> {
    match write_atomic(path, contents) {
        Err(e) if is_no_space(&e) => {
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

/// Whether an I/O error means the filesystem (or the user's quota) is full.
pub fn is_no_space(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
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

    #[test]
    fn sets_the_mode_exactly() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key.pem");
        write_atomic_with(&p, b"k", Some(0o600)).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A failed write leaves neither the file nor a temporary behind.
        let missing = dir.path().join("no/such/dir/x");
        assert!(write_atomic_with(&missing, b"x", None).is_err());
        assert!(sync_dir(&dir.path().join("absent")).is_err());
    }
}
