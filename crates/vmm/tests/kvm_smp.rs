//! KVM tier: a 2-vCPU VM (the test guest runs on vCPU 0; vCPU 1 waits for a SIPI as an AP does)
//! snapshots, restores and forks with every vCPU's state, and its vsock device's state comes
//! along in the snapshot.
//!
//! `harness = false` (see Cargo.toml): fork() refuses while threads it does not know run (see
//! `vmm::quiesce`), and libtest's own main thread is one; here main() is the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use vmm::snapshot::read_state;
use vmm::{Backing, MicroVm, RestoreMode, RestoreOptions, SnapshotKind, VmConfig};

const T: Duration = Duration::from_secs(60);

fn boot2() -> MicroVm {
    let cfg = VmConfig { mem_size: 64 << 20, vcpus: 2, backing: Backing::Anon, ..Default::default() };
    let vm =
        MicroVm::boot(cfg).unwrap_or_else(|e| panic!("cannot boot the test guest: {e} (a usable /dev/kvm is needed)"));
    vm.wait_for("forkvm-test-guest ready", T).expect("guest ready line");
    vm
}

fn main() {
    two_vcpu_vm_snapshots_restores_and_forks();
    println!("test two_vcpu_vm_snapshots_restores_and_forks ... ok");
}

fn two_vcpu_vm_snapshots_restores_and_forks() {
    let dir = std::env::temp_dir().join(format!("forkvm-smp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let vm = boot2();
    assert_eq!(vm.vcpu_count(), 2);
    vm.command("touch 0x400000 1 0x33", T).unwrap();
    vm.pause().unwrap();
    vm.snapshot(&dir, SnapshotKind::Full).unwrap();
    vm.resume().unwrap();
    let st = read_state(&dir).unwrap();
    assert_eq!(st.vcpus.len(), 2);
    assert!(st.devices.vsock.is_some(), "the snapshot holds the vsock device");
    let r = MicroVm::restore(&dir, RestoreMode::Cow, RestoreOptions::default()).unwrap();
    assert_eq!(r.vcpu_count(), 2);
    assert_eq!(r.command("ping", T).unwrap(), "pong");
    let sum = test_guest::sum_bytes(&[0x33; 4096]);
    assert_eq!(r.command("sum 0x400000 1", T).unwrap(), format!("sum {sum:016x}"));
    // Save -> restore -> save: the device state is what was restored.
    r.pause().unwrap();
    let again = r.save_state().unwrap();
    assert_eq!(again.devices, st.devices);
    r.resume().unwrap();
    assert_eq!(r.command("ping", T).unwrap(), "pong");
    // Only the forked VM may run while it forks (the others' vCPUs would not be parked).
    drop(r);
    let (kids, _) = vm.fork(1).unwrap();
    for mut k in kids {
        assert_eq!(k.command("ping", T).unwrap(), "pong");
        assert_eq!(k.command("sum 0x400000 1", T).unwrap(), format!("sum {sum:016x}"));
        assert_eq!(k.stop().unwrap(), 0);
    }
    assert_eq!(vm.command("ping", T).unwrap(), "pong");
    std::fs::remove_dir_all(&dir).unwrap();
}
