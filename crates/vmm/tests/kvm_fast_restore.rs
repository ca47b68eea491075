//! KVM tier: restore and snapshot paths that must stay fast and must not inflate host memory:
//! a shared-file (memfd) VM snapshotted onto another file system copies only the memfd's data.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vmm::{Backing, MicroVm, RestoreMode, RestoreOptions, SnapshotKind, VmConfig};

const T: Duration = Duration::from_secs(60);

fn boot(mem: u64, backing: Backing) -> MicroVm {
    let cfg = VmConfig { mem_size: mem, backing, ..Default::default() };
    let vm =
        MicroVm::boot(cfg).unwrap_or_else(|e| panic!("cannot boot the test guest: {e} (a usable /dev/kvm is needed)"));
    vm.wait_for("forkvm-test-guest ready", T).expect("guest ready line");
    vm
}

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
