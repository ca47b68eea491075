//! KVM tier: snapshot, restore (eager and copy-on-write), diff snapshots and fork-clones of the
//! test guest, on this machine's /dev/kvm.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;

use common::{boot_with as boot, sum_of, T};
use vmm::persist::state::VmState;
use vmm::snapshot::read_state;
use vmm::{Backing, MicroVm, RestoreMode, RestoreOptions, SnapshotKind};

fn tmpdir(name: &str) -> PathBuf {
    common::tmpdir("snap", name)
}

/// MSRs that move with time between two saves: the TSC.
const TIME_MSRS: [u32; 1] = [0x10];

/// State with the parts that legitimately move between two saves (time) blanked out. MSRs are
/// compared, except the time-derived ones.
fn comparable(s: &VmState) -> serde_json::Value {
    let mut v = serde_json::to_value(s).unwrap();
    v["vm"]["clock"] = serde_json::Value::Null;
    v["vm"]["pit"] = serde_json::Value::Null;
    v["generation"] = serde_json::Value::Null;
    v["memory"] = serde_json::Value::Null;
    for (i, cpu) in v["vcpus"].as_array_mut().unwrap().iter_mut().enumerate() {
        let msrs: std::collections::BTreeMap<u32, u64> =
            s.vcpus[i].msrs.iter().filter(|m| !TIME_MSRS.contains(&m.index)).map(|m| (m.index, m.data)).collect();
        cpu["msrs"] = serde_json::to_value(msrs).unwrap();
    }
    v
}

fn restore(dir: &std::path::Path, mode: RestoreMode) -> MicroVm {
    MicroVm::restore(dir, mode, RestoreOptions { track_dirty: true, ..Default::default() }).unwrap()
}

#[test]
fn snapshot_restore_eager_and_cow_continue_exactly() {
    let vm = boot(64 << 20, Backing::Anon);
    vm.command("touch 0x400000 8 0x77", T).unwrap();
    assert_eq!(vm.command("count", T).unwrap(), "count 1");
    let sum = sum_of(&vm, 0x400000, 8);
    vm.pause().unwrap();
    let dir = tmpdir("full");
    let rep = vm.snapshot(&dir, SnapshotKind::Full).unwrap();
    assert!(rep.pages_written > 0 && rep.state_bytes > 0, "{rep:?}");
    for mode in [RestoreMode::Eager, RestoreMode::Cow] {
        let r = restore(&dir, mode);
        assert_eq!(r.command("count", T).unwrap(), "count 2", "{mode:?}");
        assert_eq!(sum_of(&r, 0x400000, 8), sum, "{mode:?}");
        assert_eq!(r.command("gen", T).unwrap(), "gen 2", "restores bump the generation");
    }
    // The original continues too.
    vm.resume().unwrap();
    assert_eq!(vm.command("count", T).unwrap(), "count 2");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn snapshot_restore_snapshot_again_is_idempotent() {
    let vm = boot(32 << 20, Backing::Anon);
    vm.command("touch 0x300000 2 9", T).unwrap();
    vm.pause().unwrap();
    let d1 = tmpdir("idem1");
    vm.snapshot(&d1, SnapshotKind::Full).unwrap();
    let s1 = read_state(&d1).unwrap();
    let r = MicroVm::restore(&d1, RestoreMode::Eager, RestoreOptions { paused: true, ..Default::default() }).unwrap();
    let d2 = tmpdir("idem2");
    r.snapshot(&d2, SnapshotKind::Full).unwrap();
    let s2 = read_state(&d2).unwrap();
    let (c1, c2) = (comparable(&s1), comparable(&s2));
    assert_eq!(c1["vcpus"][0]["msrs"], c2["vcpus"][0]["msrs"], "MSRs changed across restore+snapshot");
    assert!(s1.vcpus[0].msrs.len() > TIME_MSRS.len(), "MSRs were saved");
    assert_eq!(c1, c2, "state changed across restore+snapshot");
    assert_eq!(s2.generation, s1.generation + 1);
    let m1 = std::fs::read(d1.join("memory")).unwrap();
    let m2 = std::fs::read(d2.join("memory")).unwrap();
    // Only the generation page (0x6000) may differ.
    let differing: Vec<usize> =
        (0..m1.len() / 4096).filter(|&p| m1[p * 4096..(p + 1) * 4096] != m2[p * 4096..(p + 1) * 4096]).collect();
    assert!(differing.iter().all(|&p| p == 6), "pages differ: {differing:?}");
    for d in [d1, d2] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn diff_snapshot_holds_only_what_changed() {
    let vm = boot(64 << 20, Backing::Anon);
    vm.command("touch 0x400000 16 1", T).unwrap();
    vm.pause().unwrap();
    let base = tmpdir("base");
    let full = vm.snapshot(&base, SnapshotKind::Full).unwrap();
    vm.resume().unwrap();
    vm.command("touch 0x500000 3 2", T).unwrap();
    vm.command("count", T).unwrap();
    let sum_a = sum_of(&vm, 0x400000, 16);
    let sum_b = sum_of(&vm, 0x500000, 3);
    vm.pause().unwrap();
    let diff = tmpdir("diff");
    let d = vm.snapshot(&diff, SnapshotKind::Diff).unwrap();
    assert!(d.pages_written >= 3 && d.pages_written < full.pages_written, "diff {d:?} vs full {full:?}");
    for mode in [RestoreMode::Eager, RestoreMode::Cow] {
        let r = restore(&diff, mode);
        assert_eq!(sum_of(&r, 0x400000, 16), sum_a);
        assert_eq!(sum_of(&r, 0x500000, 3), sum_b);
        assert_eq!(r.command("count", T).unwrap(), "count 2");
    }
    for d in [base, diff] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn shared_file_snapshot_writes_only_state() {
    let vm = boot(64 << 20, Backing::SharedFile);
    vm.command("touch 0x400000 4 5", T).unwrap();
    let sum = sum_of(&vm, 0x400000, 4);
    vm.pause().unwrap();
    let dir = tmpdir("shared");
    let rep = vm.snapshot(&dir, SnapshotKind::Full).unwrap();
    if rep.linked {
        assert_eq!(rep.pages_written, 0);
    }
    // The parent keeps running and writing; the snapshot must not change.
    vm.resume().unwrap();
    vm.command("touch 0x400000 4 6", T).unwrap();
    let r = restore(&dir, RestoreMode::Cow);
    assert_eq!(sum_of(&r, 0x400000, 4), sum);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn fork_children_run_independently_and_are_not_twins() {
    for backing in [Backing::Anon, Backing::SharedFile] {
        let vm = boot(64 << 20, backing);
        vm.command("touch 0x400000 2 0x11", T).unwrap();
        let (mut kids, rep) = vm.fork(2).unwrap();
        eprintln!("{backing:?}: {rep:?}");
        let mut randoms = vec![vm.command("random", T).unwrap()];
        let sum11 = test_guest::sum_bytes(&[0x11; 2 * 4096]);
        for (i, k) in kids.iter_mut().enumerate() {
            assert_eq!(k.command("ping", T).unwrap(), "pong");
            assert_eq!(k.command("gen", T).unwrap(), "gen 2");
            assert_eq!(
                k.command("sum 0x400000 2", T).unwrap(),
                format!("sum {sum11:016x}"),
                "child sees the parent's memory"
            );
            k.command(&format!("touch 0x400000 2 {}", 0x20 + i), T).unwrap();
            randoms.push(k.command("random", T).unwrap());
        }
        // Writes in one never show in another.
        assert_eq!(sum_of(&vm, 0x400000, 2), format!("sum {sum11:016x}"));
        for (i, k) in kids.iter_mut().enumerate() {
            let s = test_guest::sum_bytes(&vec![0x20 + i as u8; 2 * 4096]);
            assert_eq!(k.command("sum 0x400000 2", T).unwrap(), format!("sum {s:016x}"));
        }
        randoms.sort();
        randoms.dedup();
        assert_eq!(randoms.len(), 3, "parent and children must not share random streams: {randoms:?}");
        assert_eq!(vm.command("count", T).unwrap(), "count 1");
        for k in kids {
            assert_eq!(k.stop().unwrap(), 0);
        }
    }
}

#[test]
fn bad_snapshots_and_stopped_vms_are_rejected() {
    let vm = boot(32 << 20, Backing::Anon);
    vm.pause().unwrap();
    let dir = tmpdir("bad");
    vm.snapshot(&dir, SnapshotKind::Full).unwrap();
    // Wrong memory size.
    let e =
        MicroVm::restore(&dir, RestoreMode::Eager, RestoreOptions { expect_mem: Some(64 << 20), ..Default::default() })
            .unwrap_err();
    assert!(e.to_string().contains("32 MiB"), "{e}");
    // Corrupted state.
    let state = dir.join("state");
    let good = std::fs::read(&state).unwrap();
    let mut bad = good.clone();
    let n = bad.len() / 2;
    bad[n] ^= 1;
    std::fs::write(&state, &bad).unwrap();
    let e = MicroVm::restore(&dir, RestoreMode::Eager, RestoreOptions::default()).unwrap_err();
    assert!(e.to_string().contains("checksum"), "{e}");
    std::fs::write(&state, &good[..good.len() - 10]).unwrap();
    let e = MicroVm::restore(&dir, RestoreMode::Cow, RestoreOptions::default()).unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");
    // Missing memory file.
    std::fs::write(&state, &good).unwrap();
    std::fs::remove_file(dir.join("memory")).unwrap();
    let e = MicroVm::restore(&dir, RestoreMode::Cow, RestoreOptions::default()).unwrap_err();
    assert!(e.to_string().contains("memory"), "{e}");
    // Diff without a base on a fresh VM.
    let fresh = boot(16 << 20, Backing::Anon);
    fresh.pause().unwrap();
    assert!(fresh.snapshot(&tmpdir("nobase"), SnapshotKind::Diff).is_err());
    // The parent is unharmed by all of this.
    vm.resume().unwrap();
    assert_eq!(vm.command("ping", T).unwrap(), "pong");
    // Forking a stopped VM.
    vm.send_line("halt").unwrap();
    vm.wait_exit(Some(T)).unwrap();
    let e = vm.fork(1).unwrap_err();
    assert!(e.to_string().contains("stopped"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A VM restored paused is paused when restore returns: its state can be saved at once (the
/// idempotence test failed 'the VM must be paused to save its state' when a vCPU thread had not
/// parked yet).
#[test]
fn a_vm_restored_paused_is_paused_when_restore_returns() {
    let vm = boot(16 << 20, Backing::Anon);
    vm.pause().unwrap();
    let d = tmpdir("paused");
    vm.snapshot(&d, SnapshotKind::Full).unwrap();
    for i in 0..20 {
        let r = MicroVm::restore(&d, RestoreMode::Cow, RestoreOptions { paused: true, ..Default::default() }).unwrap();
        assert!(r.is_paused(), "restore {i} returned before its vCPUs parked");
        r.save_state().unwrap();
    }
    std::fs::remove_dir_all(&d).unwrap();
}
