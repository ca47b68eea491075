//! Private files and directories: explicit modes (directories 0700, files 0600) whatever the
//! umask, created without following symlinks (`O_NOFOLLOW | O_EXCL`), replaced atomically
//! (temporary name, fsync, rename, fsync of the directory). Snapshots, hibernations and the chunk
//! store all create their files through here.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Mode of every directory we create.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file we create.
pub const FILE_MODE: u32 = 0o600;

fn fchmod(f: &File, mode: u32) -> std::io::Result<()> {
    f.set_permissions(std::fs::Permissions::from_mode(mode))
}

/// Opens an existing directory without following a symlink at its last component.
pub fn open_dir_nofollow(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path)
}

/// Creates a new file (never an existing one, never through a symlink) with mode 0600.
pub fn create_file(path: &Path) -> std::io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    fchmod(&f, FILE_MODE)?;
    Ok(f)
}

/// Opens `path` for appending, creating it 0600 if missing; never follows a symlink.
pub fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Creates a new directory with mode 0700 (an existing path, symlink or not, is an error).
pub fn create_dir(path: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new().mode(DIR_MODE).create(path)?;
    fchmod(&open_dir_nofollow(path)?, DIR_MODE)
}

/// Makes sure `path` is a directory of ours: creates it (and missing parents) 0700, or checks
/// that the existing one is a real directory (not a symlink) and sets it to 0700.
pub fn ensure_dir(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a directory (or is a symlink)", path.display()),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new().mode(DIR_MODE).recursive(true).create(path)?;
        }
        Err(e) => return Err(e),
    }
    fchmod(&open_dir_nofollow(path)?, DIR_MODE)
}

/// fsyncs a directory, so renames and new names in it are durable.
pub fn sync_dir(path: &Path) -> std::io::Result<()> {
    open_dir_nofollow(path)?.sync_all()
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh name beside `path`: `.<name>.tmp-<pid>-<n>`, for files and directories that are
/// renamed into place once complete.
pub fn temp_beside(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

/// Writes `bytes` to `path` atomically: a new 0600 temporary file, fsync, rename, fsync of the
/// directory. Readers see the old content or the new, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = temp_beside(path);
    let done = (|| {
        let mut f = create_file(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let from = std::ffi::CString::new(from.as_os_str().as_bytes())?;
    let to = std::ffi::CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: both paths are valid NUL-terminated strings that outlive the call.
    let rc = unsafe { libc::renameat2(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Puts the complete directory `tmp` at `target` in one atomic step: renamed into place if
/// `target` does not exist, else exchanged with it (RENAME_EXCHANGE) and the old one removed.
/// A crash at any point leaves the old directory or the new one at `target`, never a mix.
pub fn replace_dir(tmp: &Path, target: &Path) -> std::io::Result<()> {
    let parent = target.parent().unwrap_or(Path::new("."));
    match renameat2(tmp, target, libc::RENAME_NOREPLACE) {
        Ok(()) => return sync_dir(parent),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) || e.raw_os_error() == Some(libc::ENOTEMPTY) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return replace_dir_in_two_steps(tmp, target),
        Err(e) => return Err(e),
    }
    match renameat2(tmp, target, libc::RENAME_EXCHANGE) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return replace_dir_in_two_steps(tmp, target),
        r => r?,
    }
    sync_dir(parent)?;
    // `tmp` now holds the old directory.
    std::fs::remove_dir_all(tmp)
}

/// [`replace_dir`] on a file system without renameat2 flags: the old directory is moved aside
/// first (a crash then leaves it beside the target, under a temporary name, never mixed).
fn replace_dir_in_two_steps(tmp: &Path, target: &Path) -> std::io::Result<()> {
    let parent = target.parent().unwrap_or(Path::new("."));
    let old = temp_beside(target);
    let moved = match std::fs::rename(target, &old) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    };
    std::fs::rename(tmp, target)?;
    sync_dir(parent)?;
    if moved {
        std::fs::remove_dir_all(&old)?;
    }
    Ok(())
}

/// Removes temporary files and directories beside `path` (see [`temp_beside`]) left by
/// processes that no longer exist.
pub fn remove_stale_temps(path: &Path) {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else { return };
    let prefix = format!(".{}.tmp-", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = n.strip_prefix(&prefix).and_then(|r| r.split('-').next()) else { continue };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let p = e.path();
            let _ = if e.file_type().is_ok_and(|t| t.is_dir()) {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("chunkstore-private-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn modes_ignore_the_umask_and_symlinks_are_not_followed() {
        let d = scratch("modes");
        // SAFETY: umask only changes this process's file creation mask.
        let old = unsafe { libc::umask(0) };
        create_dir(&d.join("sub")).unwrap();
        ensure_dir(&d.join("a/b")).unwrap();
        write_atomic(&d.join("f"), b"x").unwrap();
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        for (p, mode) in [("sub", DIR_MODE), ("a/b", DIR_MODE), ("f", FILE_MODE)] {
            assert_eq!(std::fs::metadata(d.join(p)).unwrap().mode() & 0o777, mode, "{p}");
        }
        let victim = d.join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, d.join("link")).unwrap();
        assert!(create_file(&d.join("link")).is_err());
        assert!(ensure_dir(&d.join("link")).is_err());
        std::os::unix::fs::symlink(&d, d.join("dirlink")).unwrap();
        assert!(ensure_dir(&d.join("dirlink")).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn replace_dir_swaps_whole_directories() {
        let d = scratch("replace");
        let (a, b) = (d.join("a"), d.join("b"));
        create_dir(&a).unwrap();
        std::fs::write(a.join("x"), b"1").unwrap();
        replace_dir(&a, &b).unwrap();
        assert_eq!(std::fs::read(b.join("x")).unwrap(), b"1");
        create_dir(&a).unwrap();
        std::fs::write(a.join("y"), b"2").unwrap();
        replace_dir(&a, &b).unwrap();
        assert!(!a.exists() && !b.join("x").exists());
        assert_eq!(std::fs::read(b.join("y")).unwrap(), b"2");
        // Leftovers of a dead process go; ours and other names stay.
        let dead = d.join(".b.tmp-999999999-0");
        let mine = temp_beside(&b);
        for p in [&dead, &mine, &d.join(".c.tmp-999999999-0")] {
            create_dir(p).unwrap();
        }
        replace_dir_in_two_steps(&mine, &b).unwrap();
        create_dir(&mine).unwrap();
        remove_stale_temps(&b);
        assert!(!dead.exists() && mine.exists() && d.join(".c.tmp-999999999-0").exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_store_is_private_and_refuses_planted_symlinks() {
        let d = scratch("store");
        let store = d.join("store");
        // SAFETY: umask only changes this process's file creation mask.
        let old = unsafe { libc::umask(0) };
        let st = crate::Store::open_or_create(&store, crate::StoreConfig::default());
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let st = st.unwrap();
        st.put_image("img", &vec![7u8; 8192]).unwrap();
        drop(st);
        for e in walk(&store) {
            let m = std::fs::symlink_metadata(&e).unwrap();
            let want = if m.is_dir() { DIR_MODE } else { FILE_MODE };
            assert_eq!(m.mode() & 0o777, want, "{}", e.display());
        }
        // A symlink planted where the pack goes is never followed.
        let other = d.join("other");
        std::fs::create_dir(&other).unwrap();
        let victim = d.join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, other.join("pack")).unwrap();
        assert!(crate::Store::open_or_create(&other, crate::StoreConfig::default()).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        std::fs::remove_dir_all(&d).unwrap();
    }

    fn walk(p: &Path) -> Vec<PathBuf> {
        let mut out = vec![p.to_path_buf()];
        if p.is_dir() {
            for e in std::fs::read_dir(p).unwrap() {
                out.extend(walk(&e.unwrap().path()));
            }
        }
        out
    }
}
