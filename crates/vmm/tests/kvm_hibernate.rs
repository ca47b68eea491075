//! KVM tier: hibernate the test guest into the chunk store and wake it lazily through the
//! userfaultfd page server, on this machine's /dev/kvm.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{boot, sum_of, T};
use vmm::{ExitReason, HibernateOptions, MicroVm, WakeOptions};

fn tmpdir(name: &str) -> PathBuf {
    common::tmpdir("hib", name)
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

#[test]
fn second_wake_prefetches_the_recorded_working_set() {
    let root = tmpdir("wset");
    let (dir, store) = (root.join("vm"), root.join("store"));
    let mut vm = boot(64 << 20);
    vm.command("touch 0x800000 64 0x31", T).unwrap();
    let sum = sum_of(&vm, 0x800000, 64);
    hibernate(&vm, &dir, &store);
    vm.stop();
    drop(vm);

    // First wake: records what the guest touches.
    let (w, h) = MicroVm::wake(&dir, &store, WakeOptions::default()).unwrap();
    assert!(h.report().recording && h.report().prefetch_bytes == 0, "{:?}", h.report());
    assert_eq!(w.command("count", T).unwrap(), "count 1");
    assert_eq!(sum_of(&w, 0x800000, 64), sum);
    let recorded = h.save_working_set().unwrap();
    assert!(recorded >= 64 * 4096, "the working set holds the summed pages: {recorded}");
    drop(w);
    drop(h);
    assert!(dir.join(vmm::hibernate::WSET_FILE).exists());

    // Second wake: prefetches it, and the guest still continues from the hibernation.
    let (w, mut h) = MicroVm::wake(&dir, &store, WakeOptions::default()).unwrap();
    assert!(!h.report().recording && h.report().prefetch_bytes == recorded, "{:?}", h.report());
    let took = h.wait_working_set().expect("prefetch finishes");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert_eq!(w.command("count", T).unwrap(), "count 1");
    assert_eq!(sum_of(&w, 0x800000, 64), sum);
    let st = h.stats();
    assert!(st.pages_prefetched >= 64, "{st:?}");
    assert!(st.faults < 10, "the working set was prefetched, few faults remain: {st:?}");
    // Fetching the rest makes the VM independent of the store.
    h.fetch_all().unwrap();
    assert_eq!(h.stats().resident_pages, h.stats().total_pages);
    drop(w);
    drop(h);
    std::fs::remove_dir_all(&root).unwrap();
}

/// Distinct content in every page of [gpa, gpa + pages * 4 KiB), the same for every VM.
fn fill_distinct(vm: &MicroVm, gpa: u64, pages: u64) {
    for p in 0..pages {
        let mut page = vec![0u8; 4096];
        for (i, b) in page.iter_mut().enumerate() {
            *b = (p.wrapping_mul(31) as usize + i * 7) as u8 ^ (p >> 3) as u8;
        }
        page[..8].copy_from_slice(&p.to_le_bytes());
        assert!(vm.memory().write(gpa + p * 4096, &page));
    }
}

#[test]
fn identical_memory_of_two_vms_is_stored_once() {
    let root = tmpdir("dedup");
    let store = root.join("store");
    let a = boot(32 << 20);
    let b = boot(32 << 20);
    for vm in [&a, &b] {
        vm.pause().unwrap();
        fill_distinct(vm, 0x600000, 1024);
        vm.resume().unwrap();
    }
    let ra = hibernate(&a, &root.join("a"), &store);
    let rb = hibernate(&b, &root.join("b"), &store);
    assert!(ra.pages_unique >= 1024, "{ra:?}");
    assert!(rb.pages_unique <= 8, "only the pages where the two VMs differ are new: {rb:?}");
    assert!(rb.pages_dedup >= 1024 && rb.bytes_stored < ra.bytes_stored / 50, "{rb:?}");
    drop((a, b));
    // Both wake from the shared chunks.
    for name in ["a", "b"] {
        let (w, h) = MicroVm::wake(&root.join(name), &store, WakeOptions::default()).unwrap();
        assert_eq!(w.command("count", T).unwrap(), "count 1");
        let mut page = [0u8; 8];
        w.pause().unwrap();
        assert!(w.memory().read(0x600000 + 1000 * 4096, &mut page));
        assert_eq!(u64::from_le_bytes(page), 1000);
        drop(w);
        drop(h);
    }
    std::fs::remove_dir_all(&root).unwrap();
}

/// Flips bytes of the stored chunk that holds guest page `gpa` of the hibernation in `dir`.
fn corrupt_chunk_of(dir: &Path, store: &Path, gpa: u64) {
    use std::os::unix::fs::FileExt;
    let record = vmm::hibernate::read_record(dir).unwrap();
    let st = vmm::hibernate::chunkstore::Store::open_readonly(store).unwrap();
    let m = st.manifest(&record.image).unwrap();
    let hash = match m.page(gpa / 4096).unwrap() {
        vmm::hibernate::chunkstore::PageRef::Chunk(h) => *h,
        vmm::hibernate::chunkstore::PageRef::Zero => panic!("page {gpa:#x} is a zero page"),
    };
    let e = st.chunk_entry(&hash).unwrap();
    let pack = std::fs::OpenOptions::new().read(true).write(true).open(store.join("pack")).unwrap();
    let mut b = vec![0u8; e.stored_len as usize];
    pack.read_exact_at(&mut b, e.offset).unwrap();
    for x in b.iter_mut() {
        *x ^= 0xa5;
    }
    pack.write_all_at(&b, e.offset).unwrap();
}

fn expect_error_exit(vm: &MicroVm, what: &str) -> String {
    match vm.wait_exit(Some(Duration::from_secs(20))) {
        Some(ExitReason::Error(msg)) => msg,
        other => panic!("{what}: expected the VM to fail, got {other:?}"),
    }
}

#[test]
fn corrupt_chunk_fails_the_vm_not_the_process() {
    let root = tmpdir("corrupt");
    let (dir, store) = (root.join("vm"), root.join("store"));
    let vm = boot(32 << 20);
    vm.command("touch 0x400000 4 0x5c", T).unwrap();
    hibernate(&vm, &dir, &store);
    drop(vm);
    corrupt_chunk_of(&dir, &store, 0x400000);
    let (w, h) = MicroVm::wake(&dir, &store, WakeOptions::default()).unwrap();
    assert_eq!(w.command("ping", T).unwrap(), "pong", "untouched pages are fine");
    let r = w.command("sum 0x400000 4", Duration::from_secs(5));
    assert!(r.is_err(), "the guest must not answer from a corrupt page: {r:?}");
    let msg = expect_error_exit(&w, "guest read a corrupt page");
    assert!(msg.contains("could not be served") && msg.contains("corrupt"), "{msg}");
    let st = h.stats();
    assert!(st.source_errors > 0 && st.pages_poisoned > 0 && st.error.is_some(), "{st:?}");
    drop(w);
    drop(h);

    // A corrupt page the restore itself needs fails the wake.
    let vm = boot(32 << 20);
    let dir2 = root.join("vm2");
    hibernate(&vm, &dir2, &store);
    drop(vm);
    corrupt_chunk_of(&dir2, &store, 0x6000);
    let err = MicroVm::wake(&dir2, &store, WakeOptions::default()).unwrap_err().to_string();
    assert!(err.contains("cannot be served") && err.contains("corrupt"), "{err}");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_dead_page_server_fails_the_vm_instead_of_hanging() {
    let root = tmpdir("dead");
    let (dir, store) = (root.join("vm"), root.join("store"));
    let vm = boot(32 << 20);
    vm.command("touch 0x400000 16 0x11", T).unwrap();
    hibernate(&vm, &dir, &store);
    drop(vm);
    let (w, h) = MicroVm::wake(&dir, &store, WakeOptions::default()).unwrap();
    assert_eq!(w.command("ping", T).unwrap(), "pong");
    // The server goes away while the VM runs: the VM stops with an error (and unserved pages
    // are poisoned, not zero).
    drop(h);
    assert!(w.command("sum 0x400000 16", Duration::from_secs(5)).is_err());
    let msg = expect_error_exit(&w, "guest read memory after its page server stopped");
    assert!(msg.contains("could not be served"), "{msg}");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn bad_hibernations_are_rejected_with_clear_errors() {
    let root = tmpdir("bad");
    let store = root.join("store");
    let wake = |dir: &Path, store: &Path, opts: WakeOptions| MicroVm::wake(dir, store, opts).unwrap_err().to_string();
    // Not hibernated at all.
    std::fs::create_dir_all(root.join("empty")).unwrap();
    let e = wake(&root.join("empty"), &store, WakeOptions::default());
    assert!(e.contains("not a hibernated VM"), "{e}");

    let small = boot(16 << 20);
    let big = boot(32 << 20);
    hibernate(&small, &root.join("small"), &store);
    hibernate(&big, &root.join("big"), &store);
    drop((small, big));

    // Missing store.
    let e = wake(&root.join("big"), &root.join("no-such-store"), WakeOptions::default());
    assert!(e.contains("no-such-store"), "{e}");
    // Wrong size asked for.
    let e = wake(&root.join("big"), &store, WakeOptions { expect_mem: Some(16 << 20), ..Default::default() });
    assert!(e.contains("32 MiB guest, not 16 MiB"), "{e}");
    // The state file of a VM with another memory size.
    let mixed = root.join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    std::fs::copy(root.join("big").join("hibernation"), mixed.join("hibernation")).unwrap();
    std::fs::copy(root.join("small").join("state"), mixed.join("state")).unwrap();
    let e = wake(&mixed, &store, WakeOptions::default());
    assert!(e.contains("does not belong"), "{e}");
    // A truncated record.
    let rec = std::fs::read(root.join("big").join("hibernation")).unwrap();
    std::fs::write(mixed.join("hibernation"), &rec[..rec.len() / 2]).unwrap();
    let e = wake(&mixed, &store, WakeOptions::default());
    assert!(e.contains("hibernation record"), "{e}");
    // The store's image was replaced by one of another size.
    let name = vmm::hibernate::read_record(&root.join("big")).unwrap().image;
    let other = boot(16 << 20);
    let opts = HibernateOptions { image: Some(name), ..Default::default() };
    other.hibernate(&root.join("other"), &store, &opts).unwrap();
    drop(other);
    let e = wake(&root.join("big"), &store, WakeOptions::default());
    assert!(e.contains("the hibernated guest has"), "{e}");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_woken_vm_hibernates_again_without_being_fully_resident() {
    let root = tmpdir("again");
    let (dir, store) = (root.join("vm"), root.join("store"));
    let vm = boot(32 << 20);
    vm.command("touch 0x500000 32 0x42", T).unwrap();
    let sum = sum_of(&vm, 0x500000, 32);
    assert_eq!(vm.command("count", T).unwrap(), "count 1");
    let first = hibernate(&vm, &dir, &store).image;
    drop(vm);
    let (w, h) = MicroVm::wake(&dir, &store, WakeOptions::default()).unwrap();
    assert_eq!(w.command("count", T).unwrap(), "count 2");
    assert!(h.stats().resident_pages < h.stats().total_pages);
    // Unserved pages are read through the page server while storing.
    let rep = hibernate(&w, &dir, &store);
    assert!(rep.pages_unique < 64, "almost everything is already in the store: {rep:?}");
    drop(w);
    drop(h);
    let images = vmm::hibernate::chunkstore::Store::open_readonly(&store).unwrap().list_images().unwrap();
    assert_eq!(images, vec![rep.image.clone()], "the replaced image {first} is dropped");
    let (w, h) = MicroVm::wake(&dir, &store, WakeOptions::default()).unwrap();
    assert_eq!(w.command("count", T).unwrap(), "count 3");
    assert_eq!(sum_of(&w, 0x500000, 32), sum);
    assert_eq!(w.command("gen", T).unwrap(), "gen 3");
    drop(w);
    drop(h);
    std::fs::remove_dir_all(&root).unwrap();
}

const CHILD_ENV: &str = "FORKVM_HIBERNATE_TEST_CHILD";

/// Hibernates a VM, then runs itself again as a child process (with CHILD_ENV naming the
/// hibernation) which wakes it. Both roles do real work; neither returns early.
#[test]
fn another_process_wakes_the_vm() {
    if let Ok(paths) = std::env::var(CHILD_ENV) {
        let (dir, store) = paths.split_once('\n').unwrap();
        let (w, _h) = MicroVm::wake(Path::new(dir), Path::new(store), WakeOptions::default()).unwrap();
        assert_eq!(w.command("count", T).unwrap(), "count 2");
        println!("child-woke {}", sum_of(&w, 0x400000, 8));
        return;
    }
    let root = tmpdir("xproc");
    let (dir, store) = (root.join("vm"), root.join("store"));
    let vm = boot(32 << 20);
    vm.command("touch 0x400000 8 0x3c", T).unwrap();
    vm.command("count", T).unwrap();
    let sum = sum_of(&vm, 0x400000, 8);
    hibernate(&vm, &dir, &store);
    drop(vm);
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["another_process_wakes_the_vm", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{}\n{}", dir.display(), store.display()))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("child-woke {sum}")), "{stdout}");
    std::fs::remove_dir_all(&root).unwrap();
}

/// A fork child does not inherit the page server: forking a lazily woken VM is refused until all
/// of its memory is in, and then the child sees all of it.
#[test]
fn fork_of_a_woken_vm_waits_for_all_memory() {
    let root = tmpdir("fork");
    let (dir, store) = (root.join("vm"), root.join("store"));
    let vm = boot(64 << 20);
    vm.command("touch 0x500000 8 0x31", T).unwrap();
    let sum = sum_of(&vm, 0x500000, 8);
    hibernate(&vm, &dir, &store);
    drop(vm);
    let (w, h) = MicroVm::wake(&dir, &store, WakeOptions { prefetch: false, ..Default::default() }).unwrap();
    let e = w.fork(1).unwrap_err().to_string();
    assert!(e.contains("served lazily"), "{e}");
    h.fetch_all().unwrap();
    let (mut kids, _) = w.fork(1).unwrap();
    assert_eq!(kids[0].command("sum 0x500000 8", T).unwrap(), sum);
    for k in kids {
        k.stop().unwrap();
    }
    drop(w);
    drop(h);
    std::fs::remove_dir_all(&root).unwrap();
}
