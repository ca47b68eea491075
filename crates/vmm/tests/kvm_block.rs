//! virtio-blk in a real KVM VM (the test guest, which has no virtio driver: a fake driver on
//! the host drives the VM's device through its registers and the VM's own memory). Proves the
//! disk follows the VM through snapshot, restore and fork, copy-on-write.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod virtio_driver;

use std::path::Path;
use std::sync::Arc;

use virtio_driver::*;
use vmm::devices::mmio::MmioDevice;
use vmm::devices::virtio::block::request::{S_OK, T_IN, T_OUT};
use vmm::devices::virtio::block::DiskConfig;
use vmm::{MicroVm, RestoreMode, RestoreOptions, SnapshotKind, VmConfig};
use vmm_sys_util::eventfd::EventFd;

/// Rings and buffers live at 128 MiB, far from the test guest.
const AREA: u64 = 128 << 20;

fn attach(vm: &MicroVm) -> Driver {
    let dev: Arc<dyn MmioDevice> = vm.block().expect("the VM has a disk").clone();
    Driver::attach(dev, vm.memory().clone(), EventFd::new(libc::EFD_NONBLOCK).unwrap(), 1, AREA)
}

fn io(d: &mut Driver, kind: u32, sector: u64, data: &[u8]) -> (u8, Vec<u8>) {
    let h = d.alloc(16);
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&kind.to_le_bytes());
    hdr[8..16].copy_from_slice(&sector.to_le_bytes());
    assert!(d.mem.write(h, &hdr));
    let buf = d.alloc(data.len() as u64);
    assert!(d.mem.write(buf, data));
    let st = d.alloc(1);
    d.chain(0, &[(h, 16, false), (buf, data.len() as u32, kind == T_IN), (st, 1, true)]);
    d.notify(0);
    d.next_used(0);
    let mut s = [0u8];
    let mut out = vec![0u8; data.len()];
    assert!(d.mem.read(st, &mut s) && d.mem.read(buf, &mut out));
    (s[0], out)
}

fn read(d: &mut Driver, sector: u64) -> Vec<u8> {
    let (s, out) = io(d, T_IN, sector, &[0u8; 4096]);
    assert_eq!(s, S_OK);
    out
}

fn write(d: &mut Driver, sector: u64, byte: u8) {
    assert_eq!(io(d, T_OUT, sector, &[byte; 4096]).0, S_OK);
}

fn boot(dir: &Path) -> MicroVm {
    let img = dir.join("base.img");
    std::fs::write(&img, vec![0x11u8; 8 << 20]).unwrap();
    let disk = DiskConfig { path: img, read_only: false, scratch: Some(dir.to_path_buf()) };
    let vm = MicroVm::boot(VmConfig { disk: Some(disk), ..Default::default() })
        .unwrap_or_else(|e| panic!("cannot boot the test guest: {e} (a usable /dev/kvm is needed)"));
    vm.wait_for(test_guest::READY_LINE, std::time::Duration::from_secs(30)).unwrap();
    vm
}

#[test]
fn the_disk_follows_snapshot_restore_and_fork_copy_on_write() {
    let dir = tmp("kvm-blk");
    let vm = boot(&dir);
    let mut d = attach(&vm);
    d.init(2, vmm::devices::virtio::block::device::F_FLUSH);
    write(&mut d, 0, b'A');

    // Snapshot: the disk as of the pause is linked into the snapshot directory.
    let snap = dir.join("snap");
    vm.pause().unwrap();
    vm.snapshot(&snap, SnapshotKind::Full).unwrap();
    let at_snapshot = d.rebind(vm.block().unwrap().clone(), vm.memory().clone());
    vm.resume().unwrap();
    let layers: Vec<_> = std::fs::read_dir(&snap).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(layers.iter().filter(|n| n.to_string_lossy().ends_with(".layer")).count(), 1, "{layers:?}");
    write(&mut d, 0, b'B');

    let opts = RestoreOptions { paused: true, ..Default::default() };
    let restored = MicroVm::restore(&snap, RestoreMode::Cow, opts).unwrap();
    let mut r = at_snapshot.rebind(restored.block().unwrap().clone(), restored.memory().clone());
    assert_eq!(read(&mut r, 0), vec![b'A'; 4096], "the restore sees the disk as of the snapshot");
    write(&mut r, 16, b'R');
    assert_eq!(read(&mut d, 16), vec![0x11; 4096], "the restored VM's writes are its own");
    drop(restored);

    // Fork: the child writes a block; the parent never sees it.
    let (forked, _) = vm
        .fork_with(
            1,
            |_| Ok(((), ())),
            |_, (), parent, state| {
                let child = match parent.build_fork_child(state, None) {
                    Ok(c) => c,
                    Err(_) => return 10,
                };
                let mut c = d.rebind(child.block().unwrap().clone(), child.memory().clone());
                if read(&mut c, 0) != vec![b'B'; 4096] {
                    return 11;
                }
                write(&mut c, 8, b'C');
                if read(&mut c, 8) != vec![b'C'; 4096] {
                    return 12;
                }
                0
            },
        )
        .unwrap();
    let (pid, ()) = forked[0];
    let mut status = 0;
    // SAFETY: waiting for our own child with a valid status pointer.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "fork child failed: status {status:#x}");
    assert_eq!(read(&mut d, 8), vec![0x11; 4096], "the child's write is absent from the parent's disk");
    write(&mut d, 24, b'P');
    assert_eq!(read(&mut d, 0), vec![b'B'; 4096]);
    assert!(vm.block().unwrap().state().disk.layers() >= 2);
}

/// Regression (found by tools/e2e/l2-netdisk.sh): a hibernation whose disk has written layers
/// linked them into the hibernation directory, then replaced that directory with a fresh one
/// holding only state and record, so the wake could not open its disk layers.
#[test]
fn a_written_disk_survives_hibernate_and_wake() {
    let dir = tmp("kvm-blk-hib");
    let vm = boot(&dir);
    let mut d = attach(&vm);
    d.init(2, vmm::devices::virtio::block::device::F_FLUSH);
    write(&mut d, 0, b'H');
    let (hib, store) = (dir.join("hib"), dir.join("store"));
    vm.pause().unwrap();
    vm.hibernate(&hib, &store, &vmm::HibernateOptions::default()).unwrap();
    let mut saved = d.rebind(vm.block().unwrap().clone(), vm.memory().clone());
    drop(vm);
    for round in 0..2u8 {
        let (w, h) =
            MicroVm::wake(&hib, &store, vmm::WakeOptions::default()).unwrap_or_else(|e| panic!("wake {round}: {e}"));
        let mut d = saved.rebind(w.block().unwrap().clone(), w.memory().clone());
        assert_eq!(read(&mut d, 0), vec![b'H'; 4096], "wake {round}: the written block is back");
        if round == 1 {
            assert_eq!(read(&mut d, 8), vec![b'W'; 4096], "the second wake sees the first wake's write");
        }
        write(&mut d, 8, b'W');
        // Hibernating again into the same directory keeps the layers the new state still uses.
        w.pause().unwrap();
        w.hibernate(&hib, &store, &vmm::HibernateOptions::default()).unwrap();
        saved = d.rebind(w.block().unwrap().clone(), w.memory().clone());
        drop(w);
        drop(h);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
