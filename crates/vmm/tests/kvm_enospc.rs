//! Fault injection (KVM tier): the disk fills up at each write of a snapshot, a diff snapshot and
//! a hibernation. Every attempt must fail with a clear "No space left on device" error, leave the
//! previous good snapshot or hibernation restorable to exactly its memory, and lose no dirty
//! page; once space is back the same operation succeeds with the new memory.
//!
//! A small tmpfs is mounted for each test (root is needed: a missing permission is a failure that
//! says so, not a skip); a filler file leaves exactly K bytes free, K stepping through the sizes
//! the operation writes, so every write of it meets ENOSPC once.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use vmm::{HibernateOptions, MicroVm, RestoreMode, RestoreOptions, SnapshotKind, VmConfig, WakeOptions};

const T: Duration = Duration::from_secs(60);

/// A tmpfs mounted for one test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn new(tag: &str, size: &str) -> Self {
        let p = std::env::temp_dir().join(format!("forkvm-enospc-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        let opts = format!("size={size},mode=0700");
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", &opts, "tmpfs"]).arg(&p).output();
        let out = out.expect("cannot run mount(8)");
        assert!(
            out.status.success(),
            "cannot mount a tmpfs at {} (this test needs root or CAP_SYS_ADMIN): {}",
            p.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(p)
    }

    fn free(&self) -> u64 {
        let c = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: statvfs writes into the struct we pass; the path is a valid C string.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
        s.f_bavail * s.f_frsize
    }

    /// Fills the file system so that `left` bytes stay free.
    fn leave_free(&self, left: u64) {
        let filler = self.0.join("filler");
        let _ = std::fs::remove_file(&filler);
        let len = self.free().saturating_sub(left);
        let f = std::fs::File::create(&filler).unwrap();
        if len > 0 {
            // SAFETY: fallocate on a file we just created.
            let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len as i64) };
            assert_eq!(rc, 0, "fallocate filler: {}", std::io::Error::last_os_error());
        }
    }

    fn unfill(&self) {
        let _ = std::fs::remove_file(self.0.join("filler"));
    }

    /// Names in the mount other than `keep` and the filler: leftovers of failed attempts.
    fn strays(&self, keep: &[&str]) -> Vec<String> {
        std::fs::read_dir(&self.0)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n != "filler" && !keep.contains(&n.as_str()))
            .collect()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn boot() -> MicroVm {
    let cfg = VmConfig { mem_size: 64 << 20, track_dirty: true, ..Default::default() };
    let vm =
        MicroVm::boot(cfg).unwrap_or_else(|e| panic!("cannot boot the test guest: {e} (a usable /dev/kvm is needed)"));
    vm.wait_for("forkvm-test-guest ready", T).unwrap();
    vm
}

fn sum(vm: &MicroVm) -> String {
    vm.command("sum 0x400000 128", T).unwrap()
}

fn restore_sum(dir: &Path) -> Result<String, String> {
    let mut r = MicroVm::restore(dir, RestoreMode::Eager, RestoreOptions::default()).map_err(|e| e.to_string())?;
    let s = sum(&r);
    r.stop();
    Ok(s)
}

fn wake_sum(dir: &Path, store: &Path) -> Result<String, String> {
    let (mut r, h) = MicroVm::wake(dir, store, WakeOptions::default()).map_err(|e| e.to_string())?;
    let s = sum(&r);
    r.stop();
    drop(h);
    Ok(s)
}

fn is_enospc(msg: &str) -> bool {
    msg.contains("No space left on device") || msg.contains("os error 28")
}

/// Steps the free space up from 0 until `attempt` succeeds; after each failure runs `check`.
/// Returns the number of failed attempts.
fn step_until_ok(
    fs: &Tmpfs,
    step: u64,
    mut attempt: impl FnMut() -> Result<(), String>,
    mut check: impl FnMut(&str),
) -> u64 {
    let mut failures = 0;
    for k in 0.. {
        let left = k * step;
        assert!(left <= 8 << 20, "still failing with {left} bytes free");
        fs.leave_free(left);
        match attempt() {
            Ok(()) => break,
            Err(e) => {
                assert!(is_enospc(&e), "with {left} bytes free: not a clear disk-full error: {e}");
                failures += 1;
                fs.unfill();
                check(&e);
            }
        }
    }
    fs.unfill();
    failures
}

#[test]
fn disk_full_at_each_write_of_a_snapshot_keeps_the_previous_one_and_every_dirty_page() {
    let fs = Tmpfs::new("snap", "16M");
    let vm = boot();
    vm.command("touch 0x400000 128 0x11", T).unwrap();
    let sum1 = sum(&vm);
    vm.pause().unwrap();
    let snap = fs.0.join("snap");
    vm.snapshot(&snap, SnapshotKind::Full).unwrap();
    vm.resume().unwrap();
    vm.command("touch 0x400000 128 0x22", T).unwrap();
    let sum2 = sum(&vm);

    // A full snapshot over the old one.
    vm.pause().unwrap();
    let failed = step_until_ok(
        &fs,
        32 << 10,
        || vm.snapshot(&snap, SnapshotKind::Full).map(drop).map_err(|e| e.to_string()),
        |e| {
            assert_eq!(restore_sum(&snap).as_deref(), Ok(sum1.as_str()), "previous snapshot lost after: {e}");
            assert!(fs.strays(&["snap"]).is_empty(), "leftovers after a failed snapshot: {:?}", fs.strays(&["snap"]));
        },
    );
    println!("full snapshot: {failed} attempts failed with ENOSPC before one fit");
    assert!(failed >= 3, "the disk was never full enough to test anything");
    assert_eq!(restore_sum(&snap).unwrap(), sum2);

    // A diff snapshot after failed attempts still holds every page dirtied since its base.
    vm.resume().unwrap();
    vm.command("touch 0x400000 64 0x33", T).unwrap();
    let sum3 = sum(&vm);
    vm.pause().unwrap();
    let diff = fs.0.join("diff");
    let failed = step_until_ok(
        &fs,
        16 << 10,
        || vm.snapshot(&diff, SnapshotKind::Diff).map(drop).map_err(|e| e.to_string()),
        |e| {
            assert_eq!(restore_sum(&snap).as_deref(), Ok(sum2.as_str()), "base lost after: {e}");
            assert!(!diff.join("state").exists(), "a failed diff left a state behind");
        },
    );
    println!("diff snapshot: {failed} attempts failed with ENOSPC before one fit");
    assert_eq!(restore_sum(&diff).unwrap(), sum3, "a failed diff consumed dirty pages");
    assert_eq!(restore_sum(&snap).unwrap(), sum2);
}

#[test]
fn disk_full_at_each_write_of_a_hibernation_keeps_the_previous_one() {
    let fs = Tmpfs::new("hib", "24M");
    let (dir, store) = (fs.0.join("hib"), fs.0.join("store"));
    let vm = boot();
    vm.command("touch 0x400000 128 0x44", T).unwrap();
    let sum1 = sum(&vm);
    vm.hibernate(&dir, &store, &HibernateOptions::default()).unwrap();
    vm.resume().unwrap();
    vm.command("touch 0x400000 128 0x55", T).unwrap();
    let sum2 = sum(&vm);
    vm.pause().unwrap();
    let failed = step_until_ok(
        &fs,
        4 << 10,
        || vm.hibernate(&dir, &store, &HibernateOptions::default()).map(drop).map_err(|e| e.to_string()),
        |e| {
            assert_eq!(wake_sum(&dir, &store).as_deref(), Ok(sum1.as_str()), "previous hibernation lost after: {e}");
            let st = vmm::hibernate::chunkstore::Store::open_readonly(&store).unwrap();
            let rep = st.verify().unwrap();
            assert!(rep.is_ok(), "store damaged after: {e}: {:?}", rep.problems);
        },
    );
    println!("hibernate: {failed} attempts failed with ENOSPC before one fit");
    assert!(failed >= 1, "the disk was never full enough to test anything");
    assert_eq!(wake_sum(&dir, &store).unwrap(), sum2);
}
