//! KVM tier: snapshots that fail midway (a file size limit stands in for a full disk) lose
//! nothing, and snapshot and hibernation files are private whatever the umask and never written
//! through planted symlinks. The tests change process-wide limits and the umask, so they take
//! turns (one lock).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use common::{boot, sum_of, T};
use vmm::{HibernateOptions, MicroVm, RestoreMode, RestoreOptions, SnapshotKind};

static TURN: Mutex<()> = Mutex::new(());

fn tmpdir(name: &str) -> PathBuf {
    common::fresh_dir("fail", name)
}

fn restore(dir: &Path) -> MicroVm {
    MicroVm::restore(dir, RestoreMode::Eager, RestoreOptions::default()).unwrap()
}

/// Runs `f` with files limited to `limit` bytes (writes past it fail with EFBIG, as on a full disk).
fn with_file_limit<R>(limit: u64, f: impl FnOnce() -> R) -> R {
    // SAFETY: ignoring SIGXFSZ makes oversized writes fail with EFBIG instead of killing us.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write plain structs we own.
    unsafe { libc::getrlimit(libc::RLIMIT_FSIZE, &mut old) };
    let new = libc::rlimit { rlim_cur: limit, rlim_max: old.rlim_max };
    // SAFETY: as above.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &new) }, 0);
    let r = f();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &old) }, 0);
    r
}

#[test]
fn a_failed_snapshot_keeps_its_dirty_pages_for_the_next_diff() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let root = tmpdir("dirty");
    let vm = boot(64 << 20);
    vm.command("touch 0x400000 4 0x61", T).unwrap();
    vm.pause().unwrap();
    vm.snapshot(&root.join("base"), SnapshotKind::Full).unwrap();
    vm.resume().unwrap();
    vm.command("touch 0x500000 4 0x62", T).unwrap();
    let sum = sum_of(&vm, 0x500000, 4);
    vm.pause().unwrap();
    let e = with_file_limit(1 << 20, || vm.snapshot(&root.join("d1"), SnapshotKind::Diff));
    assert!(e.is_err(), "the snapshot must fail under the file size limit");
    // The next diff must still hold the pages the failed one did not persist.
    vm.snapshot(&root.join("d2"), SnapshotKind::Diff).unwrap();
    vm.resume().unwrap();
    let r = restore(&root.join("d2"));
    assert_eq!(sum_of(&r, 0x500000, 4), sum, "pages dirtied before a failed snapshot were lost");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_failed_overwrite_keeps_the_previous_snapshot() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let root = tmpdir("overwrite");
    let dir = root.join("snap");
    let vm = boot(64 << 20);
    vm.command("touch 0x400000 4 0x71", T).unwrap();
    let sum = sum_of(&vm, 0x400000, 4);
    vm.pause().unwrap();
    vm.snapshot(&dir, SnapshotKind::Full).unwrap();
    vm.resume().unwrap();
    vm.command("touch 0x400000 4 0x72", T).unwrap();
    vm.pause().unwrap();
    let e = with_file_limit(1 << 20, || vm.snapshot(&dir, SnapshotKind::Full));
    assert!(e.is_err(), "the snapshot must fail under the file size limit");
    let r = restore(&dir);
    assert_eq!(sum_of(&r, 0x400000, 4), sum, "the previous snapshot must survive a failed overwrite");
    let left: Vec<_> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("snap")], "no temporary leftovers");
    // A successful overwrite replaces it whole.
    vm.snapshot(&dir, SnapshotKind::Full).unwrap();
    vm.resume().unwrap();
    let sum2 = sum_of(&vm, 0x400000, 4);
    assert_eq!(sum_of(&restore(&dir), 0x400000, 4), sum2);
    std::fs::remove_dir_all(&root).unwrap();
}

fn modes(dir: &Path) -> Vec<(String, u32)> {
    let mut out = vec![(dir.display().to_string(), std::fs::metadata(dir).unwrap().mode() & 0o777)];
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        out.push((e.path().display().to_string(), e.metadata().unwrap().mode() & 0o777));
    }
    out
}

#[test]
fn snapshot_and_hibernation_files_are_private_and_never_follow_symlinks() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let root = tmpdir("private");
    let victim = root.join("victim");
    std::fs::write(&victim, b"keep").unwrap();
    let (snap, hib, store) = (root.join("snap"), root.join("hib"), root.join("store"));
    // Symlinks planted where temporary files used to go.
    for d in [&snap, &hib] {
        std::fs::create_dir_all(d).unwrap();
        for name in ["state.tmp", "hibernation.tmp", "memory"] {
            std::os::unix::fs::symlink(&victim, d.join(name)).unwrap();
        }
    }
    std::fs::write(snap.join("state"), b"an old state").unwrap();
    let vm = boot(32 << 20);
    vm.pause().unwrap();
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0) };
    let s = vm.snapshot(&snap, SnapshotKind::Full);
    let h = vm.hibernate(&hib, &store, &HibernateOptions::default());
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    s.unwrap();
    h.unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep", "a planted symlink was followed");
    for d in [&snap, &hib, &store] {
        for (p, m) in modes(d) {
            if std::fs::symlink_metadata(&p).unwrap().file_type().is_symlink() {
                continue;
            }
            let want = if Path::new(&p).is_dir() { 0o700 } else { 0o600 };
            assert_eq!(m, want, "{p} has mode {m:o}");
        }
    }
    // A snapshot directory that is itself a symlink is refused.
    let link = root.join("link");
    std::os::unix::fs::symlink(&snap, &link).unwrap();
    assert!(vm.snapshot(&link, SnapshotKind::Full).is_err(), "snapshot through a symlinked directory");
    std::fs::remove_dir_all(&root).unwrap();
}
