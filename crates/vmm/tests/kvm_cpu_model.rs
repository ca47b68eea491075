//! KVM tier: the CPU model travels with a snapshot. MSRs KVM refuses, CPUID bits the host lacks
//! and a TSC frequency it cannot give fail the restore with a clear error instead of running
//! the guest on something else than it saw.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use vmm::persist::state::VmState;
use vmm::snapshot::read_state;
use vmm::{Backing, MicroVm, RestoreMode, RestoreOptions, SnapshotKind, VmConfig};

const T: Duration = Duration::from_secs(60);

fn snapshot(tag: &str) -> PathBuf {
    let root = std::env::temp_dir().join(format!("forkvm-cpu-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let cfg = VmConfig { mem_size: 32 << 20, backing: Backing::Anon, ..Default::default() };
    let vm = MicroVm::boot(cfg).unwrap_or_else(|e| panic!("cannot boot the test guest: {e} (/dev/kvm needed)"));
    vm.wait_for("forkvm-test-guest ready", T).unwrap();
    vm.pause().unwrap();
    vm.snapshot(&root, SnapshotKind::Full).unwrap();
    root
}

fn rewrite(dir: &Path, f: impl FnOnce(&mut VmState)) {
    let mut s = read_state(dir).unwrap();
    f(&mut s);
    std::fs::write(dir.join("state"), s.to_bytes().unwrap()).unwrap();
}

fn restore_err(dir: &Path) -> String {
    match MicroVm::restore(dir, RestoreMode::Cow, RestoreOptions::default()) {
        Ok(_) => panic!("the restore must be refused"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn cpuid_and_tsc_frequency_are_saved() {
    let dir = snapshot("saved");
    let s = read_state(&dir).unwrap();
    let leaf1 = s.vcpus[0].cpuid.iter().find(|e| e.function == 1).expect("CPUID leaf 1 saved");
    assert_ne!(leaf1.ecx & (1 << 31), 0, "the hypervisor bit the guest saw");
    assert!(s.vcpus[0].tsc_khz.is_some_and(|k| k > 0), "TSC frequency saved: {:?}", s.vcpus[0].tsc_khz);
    let r = MicroVm::restore(&dir, RestoreMode::Cow, RestoreOptions::default()).unwrap();
    assert_eq!(r.command("ping", T).unwrap(), "pong");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_msr_kvm_refuses_fails_the_restore() {
    let dir = snapshot("msr");
    rewrite(&dir, |s| {
        let mut e = s.vcpus[0].msrs[0];
        e.index = 0x4000_7fff; // not an MSR KVM knows
        s.vcpus[0].msrs.push(e);
    });
    let e = restore_err(&dir);
    assert!(e.contains("KVM_SET_MSRS") && e.contains("0x40007fff"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_host_without_the_guests_cpu_features_is_refused() {
    let dir = snapshot("cpuid");
    rewrite(&dir, |s| {
        let leaf7 = s.vcpus[0].cpuid.iter_mut().find(|e| e.function == 7 && e.index == 0).expect("leaf 7");
        leaf7.ebx = u32::MAX;
    });
    let e = restore_err(&dir);
    assert!(e.contains("cannot run vCPU 0") && e.contains("leaf 0x7"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_host_without_the_guests_tsc_frequency_is_refused() {
    let dir = snapshot("tsc");
    for khz in [1, u32::MAX] {
        rewrite(&dir, |s| s.vcpus[0].tsc_khz = Some(khz));
        let e = restore_err(&dir);
        assert!(e.contains("TSC frequency") && e.contains(&format!("{khz} kHz")), "{e}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
