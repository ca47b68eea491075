//! Files and directories forkvm creates for itself: private whatever the umask (directories
//! 0700, files and sockets 0600) and never reached through a symlink (O_NOFOLLOW, O_EXCL).

use std::fs::{File, OpenOptions, Permissions};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::Path;

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Makes `path` a private directory of ours: created 0700 (parents too), or an existing
/// directory we own, tightened to 0700. A symlink or a directory of another user is refused.
pub fn private_dir(path: &Path) -> Result<(), String> {
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(path)
                .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        }
        Err(e) => return Err(format!("cannot create {}: {e}", path.display())),
    }
    // Opened without following a symlink: what we check is what we chmod.
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) | Some(libc::ENOTDIR) => {
                format!("{} is not a directory (a symlink?): refusing to use it", path.display())
            }
            _ => format!("cannot open {}: {e}", path.display()),
        })?;
    let meta = dir.metadata().map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
    if meta.uid() != euid() {
        return Err(format!("{} belongs to uid {}, not to us: refusing to use it", path.display(), meta.uid()));
    }
    if meta.mode() & 0o777 != 0o700 {
        dir.set_permissions(Permissions::from_mode(0o700))
            .map_err(|e| format!("cannot make {} private: {e}", path.display()))?;
    }
    Ok(())
}

fn check_file(f: &File, path: &Path) -> Result<(), String> {
    let meta = f.metadata().map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
    if !meta.file_type().is_file() || meta.uid() != euid() {
        return Err(format!("{} is not a regular file of ours: refusing to use it", path.display()));
    }
    f.set_permissions(Permissions::from_mode(0o600)).map_err(|e| format!("cannot chmod {}: {e}", path.display()))
}

fn open_err(path: &Path) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| match e.raw_os_error() {
        Some(libc::ELOOP) => format!("{} is a symlink: refusing to follow it", path.display()),
        _ => format!("cannot create {}: {e}", path.display()),
    }
}

/// Creates `path` afresh (a leftover file is replaced, a symlink is removed, never followed),
/// 0600, for writing.
pub fn create_private(path: &Path) -> Result<File, String> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => return Err(format!("{} is a directory", path.display())),
        Ok(_) => std::fs::remove_file(path).map_err(|e| format!("cannot replace {}: {e}", path.display()))?,
        Err(_) => {}
    }
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(open_err(path))?;
    check_file(&f, path)?;
    Ok(f)
}

/// Opens `path` for appending, creating it 0600; a symlink there is removed, never followed.
pub fn append_private(path: &Path) -> Result<File, String> {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        std::fs::remove_file(path).map_err(|e| format!("cannot replace {}: {e}", path.display()))?;
    }
    let f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(open_err(path))?;
    check_file(&f, path)?;
    Ok(f)
}

/// Binds a Unix socket at `path` (in a private directory of ours) and makes it 0600. bind(2)
/// never follows a symlink: an existing path fails with EADDRINUSE.
pub fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    let l = UnixListener::bind(path)?;
    // The socket is ours and its directory 0700, so nobody swaps it between bind and chmod.
    std::fs::set_permissions(path, Permissions::from_mode(0o600))?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn modes_ignore_the_umask_and_symlinks_are_not_followed() {
        let base = std::env::temp_dir().join(format!("forkvm-private-fs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        // SAFETY: umask has no preconditions; other tests of this binary create no files.
        let old = unsafe { libc::umask(0) };
        let d = base.join("a/b");
        private_dir(&d).unwrap();
        let f = d.join("f");
        drop(create_private(&f).unwrap());
        drop(append_private(&d.join("g")).unwrap());
        let s = bind_private(&d.join("s")).unwrap();
        // SAFETY: restores the caller's umask.
        unsafe { libc::umask(old) };
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&d), 0o700);
        assert_eq!(mode(&f), 0o600);
        assert_eq!(mode(&d.join("g")), 0o600);
        assert_eq!(mode(&d.join("s")), 0o600);
        drop(s);

        let victim = base.join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, d.join("link")).unwrap();
        drop(append_private(&d.join("link")).unwrap());
        std::os::unix::fs::symlink(&victim, d.join("link2")).unwrap();
        drop(create_private(&d.join("link2")).unwrap());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        std::os::unix::fs::symlink(&base, base.join("dirlink")).unwrap();
        assert!(private_dir(&base.join("dirlink")).unwrap_err().contains("symlink"));
        std::fs::remove_dir_all(&base).unwrap();
    }
}
