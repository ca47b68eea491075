//! KVM tier: snapshots that cannot lose data. A diff never replaces its own base, memory images
//! are tied to their state and base by hashes that restore checks, and skipping that check is an
//! explicit option.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};

use common::{boot, flip, sum_of, T};
use vmm::{MicroVm, RestoreMode, RestoreOptions, SnapshotKind};

fn tmpdir(name: &str) -> PathBuf {
    common::fresh_dir("safe", name)
}

fn restore(dir: &Path, mode: RestoreMode) -> Result<MicroVm, vmm::Error> {
    MicroVm::restore(dir, mode, RestoreOptions { track_dirty: true, ..Default::default() })
}

fn snap(vm: &MicroVm, dir: &Path, kind: SnapshotKind) -> Result<vmm::SnapshotReport, vmm::Error> {
    vm.pause().unwrap();
    let r = vm.snapshot(dir, kind);
    vm.resume().unwrap();
    r
}

#[test]
fn diff_into_its_base_directory_is_refused() {
    let root = tmpdir("diffself");
    let base = root.join("base");
    let vm = boot(64 << 20);
    vm.command("touch 0x400000 4 0x21", T).unwrap();
    let sum = sum_of(&vm, 0x400000, 4);
    snap(&vm, &base, SnapshotKind::Full).unwrap();
    vm.command("touch 0x400000 4 0x22", T).unwrap();
    let e = snap(&vm, &base, SnapshotKind::Diff).expect_err("a diff into its own base must be refused");
    assert!(e.to_string().contains("base"), "{e}");
    // Also through another spelling of the same directory.
    let e = snap(&vm, &root.join("./base/"), SnapshotKind::Diff).expect_err("same directory, other spelling");
    assert!(e.to_string().contains("base"), "{e}");
    let r = restore(&base, RestoreMode::Cow).unwrap();
    assert_eq!(sum_of(&r, 0x400000, 4), sum, "the base is intact");
    // A diff elsewhere still works and holds the change.
    let sum2 = sum_of(&vm, 0x400000, 4);
    snap(&vm, &root.join("diff"), SnapshotKind::Diff).unwrap();
    assert_eq!(sum_of(&restore(&root.join("diff"), RestoreMode::Eager).unwrap(), 0x400000, 4), sum2);
    std::fs::remove_dir_all(&root).unwrap();
}

fn sum_of_zero_page() -> String {
    format!("sum {:016x}", test_guest::sum_bytes(&[0u8; 4096]))
}

/// Why restoring `dir` in `mode` was refused: by the restore itself, or (a copy-on-write restore
/// checks the image block by block as it is brought in) by stopping the VM with an error before
/// the guest could see a byte that does not match.
fn refusal(dir: &Path, mode: RestoreMode) -> String {
    match restore(dir, mode) {
        Err(e) => e.to_string(),
        Ok(vm) => {
            assert_eq!(mode, RestoreMode::Cow, "an eager restore checks everything before it returns");
            vm.wait_memory_checked();
            let why = vm.wait_exit(Some(T)).expect("a VM restored from a corrupt image must stop");
            format!("{why:?}")
        }
    }
}

#[test]
fn flipped_memory_bytes_are_refused_unless_verification_is_skipped() {
    let root = tmpdir("flip");
    let dir = root.join("s");
    let vm = boot(64 << 20);
    vm.command("touch 0x400000 4 0x31", T).unwrap();
    snap(&vm, &dir, SnapshotKind::Full).unwrap();
    let mem = dir.join("memory");
    // A flipped byte in a data page, and a byte written into a hole.
    for at in [0x400000 + 4096 + 7, 0x2000000] {
        let good = std::fs::read(&mem).unwrap();
        flip(&mem, at);
        for mode in [RestoreMode::Cow, RestoreMode::Eager] {
            if at == 0x2000000 && mode == RestoreMode::Cow {
                // Checked block by block, a block recorded as zeros is served as zeros: the
                // guest sees exactly the snapshot.
                let r = restore(&dir, mode).unwrap();
                assert_eq!(r.command("sum 0x2000000 1", T).unwrap(), sum_of_zero_page());
                r.wait_memory_checked();
                assert_eq!(r.command("ping", T).unwrap(), "pong");
                continue;
            }
            let e = refusal(&dir, mode);
            assert!(e.contains("does not match"), "{mode:?} at {at:#x}: {e}");
        }
        // The fast path is explicit.
        let opts = RestoreOptions { skip_verify: true, ..Default::default() };
        let r = MicroVm::restore(&dir, RestoreMode::Cow, opts).unwrap();
        assert_eq!(r.command("ping", T).unwrap(), "pong");
        drop(r);
        std::fs::write(&mem, &good).unwrap();
    }
    let r = restore(&dir, RestoreMode::Cow).unwrap();
    r.wait_memory_checked();
    assert_eq!(r.command("ping", T).unwrap(), "pong");
    drop(r);
    // A verified image that changes afterwards is verified again, not trusted from before.
    flip(&mem, 0x400000 + 9);
    let e = refusal(&dir, RestoreMode::Cow);
    assert!(e.contains("does not match"), "{e}");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn mismatched_state_and_memory_are_refused() {
    let root = tmpdir("pair");
    let (a, b) = (root.join("a"), root.join("b"));
    let vm = boot(64 << 20);
    vm.command("touch 0x400000 4 0x41", T).unwrap();
    snap(&vm, &a, SnapshotKind::Full).unwrap();
    vm.command("touch 0x400000 4 0x42", T).unwrap();
    snap(&vm, &b, SnapshotKind::Full).unwrap();
    std::fs::copy(b.join("memory"), a.join("memory")).unwrap();
    let e = refusal(&a, RestoreMode::Cow);
    assert!(e.contains("does not match"), "{e}");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_diff_whose_base_was_replaced_is_refused() {
    let root = tmpdir("rebase");
    let (base, diff) = (root.join("base"), root.join("diff"));
    let vm = boot(64 << 20);
    vm.command("touch 0x400000 4 0x51", T).unwrap();
    snap(&vm, &base, SnapshotKind::Full).unwrap();
    vm.command("touch 0x500000 4 0x52", T).unwrap();
    snap(&vm, &diff, SnapshotKind::Diff).unwrap();
    assert!(restore(&diff, RestoreMode::Cow).is_ok());
    // Another VM's snapshot now sits where the base was.
    let other = boot(64 << 20);
    other.command("touch 0x400000 4 0x53", T).unwrap();
    snap(&other, &base, SnapshotKind::Full).unwrap();
    let e = restore(&diff, RestoreMode::Cow).expect_err("the diff's base was replaced");
    assert!(e.to_string().contains("base"), "{e}");
    std::fs::remove_dir_all(&root).unwrap();
}
