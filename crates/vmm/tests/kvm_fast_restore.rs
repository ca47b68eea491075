//! KVM tier: restore and snapshot paths that must stay fast and must not inflate host memory:
//! a shared-file (memfd) VM snapshotted onto another file system copies only the memfd's data.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::{boot_with as boot, flip, T};
use vmm::{Backing, MicroVm, RestoreMode, RestoreOptions, SnapshotKind};

fn tmpdir(base: &Path, name: &str) -> PathBuf {
    let d = base.join(format!("forkvm-fastrestore-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Bytes the file system allocated for an open file.
fn allocated(f: &std::fs::File) -> u64 {
    f.metadata().unwrap().blocks() * 512
}

fn dev_of(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().dev()
}

/// A 1 GiB shared-file guest with 8 MiB of data, snapshotted onto a file system other than its
/// memfd's (the file cannot be linked): the memfd must not grow (its holes are never read through
/// the mapping) and the image must be sparse. Snapshotted beside the memfd (linked), hashing the
/// image must not fill the holes either.
#[test]
fn shared_snapshot_elsewhere_copies_only_data_extents() {
    let shm = PathBuf::from(std::env::var("FORKVM_SHM_DIR").unwrap_or_else(|_| "/dev/shm".into()));
    let other = std::env::temp_dir();
    assert_ne!(
        dev_of(&shm),
        dev_of(&other),
        "this test needs TMPDIR ({}) on another file system than FORKVM_SHM_DIR ({})",
        other.display(),
        shm.display()
    );
    let vm = boot(1 << 30, Backing::SharedFile);
    assert!(vm.memory().fill(32 << 20, 8 << 20, 0x5a));
    let sum = vm.command("sum 0x2000000 2048", T).unwrap();
    vm.pause().unwrap();
    let memfd = vm.memory().file().unwrap().try_clone().unwrap();
    let before = allocated(&memfd);
    assert!(before < 64 << 20, "the fresh guest already has {before} bytes allocated");

    let dir = tmpdir(&other, "copied");
    let rep = vm.snapshot(&dir, SnapshotKind::Full).unwrap();
    assert!(!rep.linked, "{} is on another file system: the memory cannot be linked", dir.display());
    let grown = allocated(&memfd).saturating_sub(before);
    assert!(grown <= 1 << 20, "snapshotting grew the guest's memfd by {grown} bytes (holes were read)");
    let image = std::fs::File::open(dir.join("memory")).unwrap();
    assert_eq!(image.metadata().unwrap().len(), 1 << 30);
    assert!(allocated(&image) <= before + (1 << 20), "the image is not sparse: {} bytes", allocated(&image));
    assert!(rep.memory_disk_bytes <= before + (1 << 20));

    // Frozen now: later writes are private copies. A second snapshot must write them and the
    // file's data, still without reading the memfd's holes.
    vm.resume().unwrap();
    assert!(vm.memory().fill(48 << 20, 1 << 20, 0x77));
    let sum2 = vm.command("sum 0x3000000 256", T).unwrap();
    vm.pause().unwrap();
    let frozen_dir = tmpdir(&shm, "frozen");
    vm.snapshot(&frozen_dir, SnapshotKind::Full).unwrap();
    let grown = allocated(&memfd).saturating_sub(before);
    assert!(grown <= 1 << 20, "the snapshot of frozen memory grew the memfd by {grown} bytes");
    let image = std::fs::File::open(frozen_dir.join("memory")).unwrap();
    assert!(allocated(&image) <= before + (2 << 20), "the image is not sparse: {} bytes", allocated(&image));
    drop(vm);

    for (d, mode) in [(&dir, RestoreMode::Eager), (&dir, RestoreMode::Cow), (&frozen_dir, RestoreMode::Eager)] {
        let r = MicroVm::restore(d, mode, RestoreOptions::default()).unwrap();
        assert_eq!(r.command("sum 0x2000000 2048", T).unwrap(), sum, "{mode:?} restore of {}", d.display());
        assert_eq!(r.command("ping", T).unwrap(), "pong");
        if d == &frozen_dir {
            assert_eq!(r.command("sum 0x3000000 256", T).unwrap(), sum2);
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&frozen_dir).unwrap();
}

/// Snapshotted beside its memfd, the file is linked in; hashing it must not fill its holes.
#[test]
fn shared_snapshot_linked_does_not_fill_holes() {
    let shm = PathBuf::from(std::env::var("FORKVM_SHM_DIR").unwrap_or_else(|_| "/dev/shm".into()));
    let vm = boot(1 << 30, Backing::SharedFile);
    assert!(vm.memory().fill(32 << 20, 4 << 20, 0x3c));
    let sum = vm.command("sum 0x2000000 1024", T).unwrap();
    vm.pause().unwrap();
    let memfd = vm.memory().file().unwrap().try_clone().unwrap();
    let before = allocated(&memfd);
    let dir = tmpdir(&shm, "linked");
    let rep = vm.snapshot(&dir, SnapshotKind::Full).unwrap();
    assert!(rep.linked, "{} is beside the memfd: the memory file is linked", dir.display());
    let grown = allocated(&memfd).saturating_sub(before);
    assert!(grown <= 1 << 20, "the linked snapshot grew the memfd by {grown} bytes (holes were read)");
    drop(vm);
    let r = MicroVm::restore(&dir, RestoreMode::Cow, RestoreOptions::default()).unwrap();
    assert_eq!(r.command("sum 0x2000000 1024", T).unwrap(), sum);
    drop(r);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A 256 MiB guest with 8 MiB of data at 32 MiB, snapshotted (full) into a new directory.
fn snapshot_with_data(name: &str) -> (PathBuf, String) {
    let vm = boot(256 << 20, Backing::Anon);
    assert!(vm.memory().fill(32 << 20, 8 << 20, 0x6b));
    let sum = vm.command("sum 0x2000000 2048", T).unwrap();
    vm.pause().unwrap();
    let dir = tmpdir(&std::env::temp_dir(), name);
    vm.snapshot(&dir, SnapshotKind::Full).unwrap();
    (dir, sum)
}

/// A copy-on-write restore checks each 2 MiB block of the image as it is brought in (against
/// the block hashes beside the image, tied to the state's image hash) instead of hashing the
/// whole image first; the rest comes in the background, and fork waits for it.
#[test]
fn cow_restore_checks_blocks_as_they_come_in() {
    let (dir, sum) = snapshot_with_data("lazy");
    assert_eq!(std::fs::metadata(dir.join("memory.blocks")).unwrap().len(), 128 * 32);
    vmm::restore::forget_checked_images();
    let mut r = MicroVm::restore(&dir, RestoreMode::Cow, RestoreOptions::default()).unwrap();
    assert_eq!(r.command("sum 0x2000000 2048", T).unwrap(), sum);
    let (mut kids, _) = r.fork(1).unwrap();
    assert_eq!(kids[0].command("sum 0x2000000 2048", T).unwrap(), sum);
    for k in kids.drain(..) {
        assert_eq!(k.stop().unwrap(), 0);
    }
    r.wait_memory_checked();
    assert_eq!(r.command("ping", T).unwrap(), "pong");
    assert!(r.stop().is_some());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A corrupt block the restore itself needs (the generation page's) fails the restore; one the
/// guest has not touched stops the VM with an error when it is checked, before its pages exist.
#[test]
fn cow_restore_never_runs_on_a_corrupt_block() {
    let (dir, _) = snapshot_with_data("corrupt");
    let mem = dir.join("memory");
    flip(&mem, 0x1ff000 + 17);
    vmm::restore::forget_checked_images();
    let e = MicroVm::restore(&dir, RestoreMode::Cow, RestoreOptions::default()).map(drop).unwrap_err();
    assert!(e.to_string().contains("does not match"), "{e}");
    flip(&mem, 0x1ff000 + 17);

    flip(&mem, (36 << 20) + 5);
    let r = MicroVm::restore(&dir, RestoreMode::Cow, RestoreOptions::default()).unwrap();
    r.wait_memory_checked();
    let why = r.wait_exit(Some(T)).expect("the VM must stop on the corrupt block");
    assert!(format!("{why:?}").contains("does not match"), "{why:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The block hashes are untrusted too: a list that does not hash to the state's image hash is
/// ignored and the whole image is checked first (a corrupt image with a list rewritten to match
/// it is still refused).
#[test]
fn tampered_block_hashes_fall_back_to_the_whole_image_hash() {
    let (dir, sum) = snapshot_with_data("tampered");
    let blocks = dir.join("memory.blocks");
    let good = std::fs::read(&blocks).unwrap();
    std::fs::write(&blocks, vec![7u8; good.len()]).unwrap();
    vmm::restore::forget_checked_images();
    let r = MicroVm::restore(&dir, RestoreMode::Cow, RestoreOptions::default()).unwrap();
    assert_eq!(r.command("sum 0x2000000 2048", T).unwrap(), sum);
    drop(r);

    let mem = dir.join("memory");
    flip(&mem, (34 << 20) + 3);
    let mut list = good.clone();
    let block = {
        use std::os::unix::fs::FileExt;
        let mut b = vec![0u8; 2 << 20];
        std::fs::File::open(&mem).unwrap().read_exact_at(&mut b, 34 << 20).unwrap();
        blake3::hash(&b)
    };
    list[17 * 32..18 * 32].copy_from_slice(block.as_bytes());
    std::fs::write(&blocks, &list).unwrap();
    for mode in [RestoreMode::Cow, RestoreMode::Eager] {
        vmm::restore::forget_checked_images();
        let e = MicroVm::restore(&dir, mode, RestoreOptions::default()).map(drop).unwrap_err();
        assert!(e.to_string().contains("does not match"), "{mode:?}: {e}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A fork of a copy-on-write restore whose image is still being checked waits for the check, even
/// while another thread waits for it too (it was refused, saying "woken from hibernation").
#[test]
fn fork_waits_for_the_check_while_another_thread_waits_too() {
    let (dir, sum) = snapshot_with_data("fork-wait");
    vmm::restore::forget_checked_images();
    let mut r = MicroVm::restore(&dir, RestoreMode::Cow, RestoreOptions::default()).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let (mut kids, _) = std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            tx.send(()).unwrap();
            r.wait_memory_checked();
        });
        rx.recv().unwrap();
        let forked = r.fork(1);
        waiter.join().unwrap();
        forked
    })
    .unwrap_or_else(|e| panic!("fork refused: {e}"));
    assert_eq!(kids[0].command("sum 0x2000000 2048", T).unwrap(), sum);
    for k in kids.drain(..) {
        assert_eq!(k.stop().unwrap(), 0);
    }
    assert!(r.stop().is_some());
    std::fs::remove_dir_all(&dir).unwrap();
}
