//! KVM tier: hibernate the test guest into the chunk store and wake it lazily through the
//! userfaultfd page server, on this machine's /dev/kvm.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use vmm::{Backing, ExitReason, HibernateOptions, MicroVm, VmConfig, WakeOptions};

const T: Duration = Duration::from_secs(60);

fn boot(mem: u64) -> MicroVm {
    let cfg = VmConfig { mem_size: mem, backing: Backing::Anon, ..Default::default() };
    let vm =
        MicroVm::boot(cfg).unwrap_or_else(|e| panic!("cannot boot the test guest: {e} (a usable /dev/kvm is needed)"));
    vm.wait_for("forkvm-test-guest ready", T).expect("guest ready line");
    vm
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("forkvm-hib-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn sum_of(vm: &MicroVm, gpa: u64, pages: u64) -> String {
    vm.command(&format!("sum {gpa:#x} {pages}"), T).unwrap()
}

fn hibernate(vm: &MicroVm, dir: &Path, store: &Path) -> vmm::HibernateReport {
    vm.hibernate(dir, store, &HibernateOptions::default()).unwrap()
}

/// The risk first: KVM_RUN on this /dev/kvm faulting on userfaultfd-registered guest memory must
/// be served by the page server.
#[test]
fn kvm_runs_on_userfaultfd_memory() {
    let root = tmpdir("basic");
    let (dir, store) = (root.join("vm"), root.join("store"));
    let mut vm = boot(64 << 20);
    vm.command("touch 0x400000 8 0x77", T).unwrap();
    assert_eq!(vm.command("count", T).unwrap(), "count 1");
    let sum = sum_of(&vm, 0x400000, 8);
    let rep = hibernate(&vm, &dir, &store);
    assert!(rep.was_running && rep.pages_zero > 0 && rep.pages_unique > 0, "{rep:?}");
    vm.stop();
    drop(vm);
    let (w, h) = MicroVm::wake(&dir, &store, WakeOptions::default()).unwrap();
    assert_eq!(w.command("count", T).unwrap(), "count 2");
    assert_eq!(sum_of(&w, 0x400000, 8), sum);
    assert_eq!(w.command("gen", T).unwrap(), "gen 2", "a wake bumps the generation");
    let st = h.stats();
    assert!(st.faults > 0 && st.pages_served > 0, "{st:?}");
    assert!(st.resident_pages < st.total_pages / 2, "memory must be served lazily: {st:?}");
    assert_eq!(w.wait_exit(Some(Duration::ZERO)), None::<ExitReason>);
    drop(w);
    drop(h);
    std::fs::remove_dir_all(&root).unwrap();
}
