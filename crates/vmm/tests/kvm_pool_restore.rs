//! KVM tier: copy-on-write restore into a warm pool VM (made before the request): the guest
//! runs with exactly the snapshot's memory, checked as it comes in; a corrupt image stops the
//! VM with an error instead of running it on bad pages.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::PathBuf;

use common::{boot_with as boot, T};
use vmm::pool::WarmVm;
use vmm::{Backing, ExitReason, SnapshotKind};

const MEM: u64 = 128 << 20;

fn snapshot(name: &str) -> (PathBuf, String) {
    let dir = std::env::temp_dir().join(format!("forkvm-poolrestore-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let vm = boot(MEM, Backing::Anon);
    assert!(vm.memory().fill(32 << 20, 8 << 20, 0x5a));
    vm.command("touch 0x2000000 16 7", T).unwrap();
    let sum = vm.command("sum 0x2000000 2048", T).unwrap();
    vm.pause().unwrap();
    vm.snapshot(&dir, SnapshotKind::Full).unwrap();
    (dir, sum)
}

#[test]
fn pool_restore_runs_the_snapshot_memory_checked() {
    let (dir, sum) = snapshot("ok");
    let warm = WarmVm::new(MEM, 1).unwrap();
    let mut vm = warm.restore_snapshot(&dir, None).unwrap();
    assert_eq!(vm.command("ping", T).unwrap(), "pong");
    assert_eq!(vm.command("sum 0x2000000 2048", T).unwrap(), sum);
    vm.wait_memory_checked();
    assert_eq!(vm.command("sum 0x2000000 2048", T).unwrap(), sum);
    vm.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pool_restore_of_a_corrupt_image_stops_with_an_error() {
    let (dir, _) = snapshot("bad");
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(dir.join("memory")).unwrap();
        f.seek(SeekFrom::Start((32 << 20) + 4096)).unwrap();
        f.write_all(&[0xa5; 64]).unwrap();
    }
    let warm = WarmVm::new(MEM, 1).unwrap();
    match warm.restore_snapshot(&dir, None) {
        Err(e) => assert!(e.to_string().contains("memory"), "{e}"),
        Ok(vm) => {
            // The background check reads every block: it finds the corrupt one.
            vm.wait_memory_checked();
            match vm.wait_exit(Some(T)) {
                Some(ExitReason::Error(m)) => assert!(m.contains("memory"), "{m}"),
                other => panic!("a corrupt image must stop the VM with an error, got {other:?}"),
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
