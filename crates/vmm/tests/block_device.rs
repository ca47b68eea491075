//! virtio-blk device tests without Linux: a fake guest driver (tests/virtio_driver) sends
//! requests through the virtio-mmio registers; the disk is copy-on-write over a raw image.
//! Covers reads/writes/flush, copy-on-write clones, snapshot round trips and bad input.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod virtio_driver;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_driver::*;
use vmm::devices::virtio::block::device::{F_FLUSH, F_RO};
use vmm::devices::virtio::block::request::*;
use vmm::devices::virtio::block::{Block, CowDisk, DiskConfig};
use vmm::vstate::memory::{Backing, GuestMem};
use vmm_sys_util::eventfd::EventFd;

const MIB: u64 = 1 << 20;

struct Blk {
    d: Driver,
    dev: Arc<Block>,
}

fn image(dir: &Path, len: u64) -> PathBuf {
    let p = dir.join("base.img");
    let data: Vec<u8> = (0..len).map(|i| (i / 512) as u8 ^ 0x5a).collect();
    std::fs::write(&p, data).unwrap();
    p
}

fn expected_base(off: u64, len: usize) -> Vec<u8> {
    (off..off + len as u64).map(|i| (i / 512) as u8 ^ 0x5a).collect()
}

impl Blk {
    fn with_disk(disk: CowDisk) -> Self {
        let mem = Arc::new(GuestMem::new(16 * MIB, Backing::Anon, false).unwrap());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let cfg_features = vmm::devices::virtio::block::device::features(disk.read_only);
        let t = vmm::devices::virtio::mmio::MmioTransport::new(
            vmm::devices::virtio::block::device::DEVICE_ID,
            cfg_features,
            &vmm::devices::virtio::block::device::QUEUE_SIZES,
            vmm::devices::virtio::block::device::config_bytes(disk.size()),
            irq.try_clone().unwrap(),
        );
        let s = vmm::devices::virtio::block::BlockState { transport: t.save(), disk: disk.describe() };
        let dev = Arc::new(Block::from_parts(&s, disk, mem.clone(), irq.try_clone().unwrap()).unwrap());
        let mut d = Driver::attach(dev.clone(), mem, irq, 1, 0);
        d.init(2, F_FLUSH | F_RO);
        Blk { d, dev }
    }

    fn new(cfg: &DiskConfig) -> Self {
        Self::with_disk(CowDisk::create(cfg).unwrap())
    }

    fn request(&mut self, kind: u32, sector: u64, data: &[u8], read_len: u32) -> (u8, Vec<u8>, u32) {
        let h = self.d.alloc(16);
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        assert!(self.d.mem.write(h, &hdr));
        let mut bufs = vec![(h, 16, false)];
        let mut rbuf = None;
        if !data.is_empty() {
            let a = self.d.alloc(data.len() as u64);
            assert!(self.d.mem.write(a, data));
            bufs.push((a, data.len() as u32, false));
        }
        if read_len > 0 {
            let a = self.d.alloc(u64::from(read_len));
            rbuf = Some(a);
            bufs.push((a, read_len, true));
        }
        let st = self.d.alloc(1);
        assert!(self.d.mem.write(st, &[0xff]));
        bufs.push((st, 1, true));
        self.d.chain(0, &bufs);
        self.d.notify(0);
        let (_, used) = self.d.next_used(0);
        let mut s = [0u8];
        assert!(self.d.mem.read(st, &mut s));
        let mut out = vec![0u8; read_len as usize];
        if let Some(a) = rbuf {
            assert!(self.d.mem.read(a, &mut out));
        }
        (s[0], out, used)
    }

    fn read(&mut self, sector: u64, len: u32) -> Vec<u8> {
        let (s, data, used) = self.request(T_IN, sector, &[], len);
        assert_eq!(s, S_OK, "read of {len} at sector {sector}");
        assert_eq!(used, len + 1);
        data
    }

    fn write(&mut self, sector: u64, data: &[u8]) -> u8 {
        self.request(T_OUT, sector, data, 0).0
    }
}

fn cfg(path: &Path, dir: &Path) -> DiskConfig {
    DiskConfig { path: path.to_path_buf(), read_only: false, scratch: Some(dir.to_path_buf()) }
}

#[test]
fn reads_come_from_the_image_and_writes_stay_in_the_overlay() {
    let dir = tmp("blk-rw");
    let img = image(&dir, 4 * MIB);
    let before = std::fs::read(&img).unwrap();
    let mut b = Blk::new(&cfg(&img, &dir));
    let mut cap = [0u8; 8];
    b.d.config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 4 * MIB / 512);
    assert_eq!(b.read(3, 4096), expected_base(3 * 512, 4096));
    let data = vec![0xabu8; 8192];
    assert_eq!(b.write(8, &data), S_OK);
    assert_eq!(b.read(8, 8192), data);
    // A partial block (one sector in the middle of a block) is copied up, neighbours kept.
    assert_eq!(b.write(33, &[0x11; 512]), S_OK);
    let blk = b.read(32, 4096);
    assert_eq!(&blk[..512], &expected_base(32 * 512, 512)[..]);
    assert_eq!(&blk[512..1024], &[0x11; 512][..]);
    assert_eq!(&blk[1024..], &expected_base(34 * 512, 3072)[..]);
    assert_eq!(b.request(T_FLUSH, 0, &[], 0).0, S_OK);
    let st = b.dev.stats();
    assert_eq!((st.flushes, st.errors, st.malformed), (1, 0, 0));
    assert_eq!(std::fs::read(&img).unwrap(), before, "the base image is never written");
}

#[test]
fn flush_is_offered_and_read_only_disks_refuse_writes() {
    let dir = tmp("blk-ro");
    let img = image(&dir, MIB);
    let mut b = Blk::new(&DiskConfig { read_only: true, ..cfg(&img, &dir) });
    let f = b.d.features();
    assert_ne!(f & F_FLUSH, 0);
    assert_ne!(f & F_RO, 0);
    assert_eq!(b.write(0, &[1; 512]), S_IOERR);
    assert_eq!(b.read(0, 512), expected_base(0, 512));
    let rw = Blk::new(&cfg(&img, &dir));
    assert_eq!(rw.d.features() & F_RO, 0);
}

#[test]
fn clones_share_the_frozen_disk_and_never_see_each_others_writes() {
    let dir = tmp("blk-clone");
    let img = image(&dir, 2 * MIB);
    let mut parent = CowDisk::create(&cfg(&img, &dir)).unwrap();
    parent.write_at(&[1; 4096], 0).unwrap();
    parent.freeze().unwrap();
    let mut child = parent.clone_view(None).unwrap();
    assert_eq!(child.layers(), 1);
    child.write_at(&[2; 4096], 0).unwrap();
    child.write_at(&[2; 512], 8192).unwrap();
    parent.write_at(&[3; 4096], 4096).unwrap();
    let mut buf = vec![0u8; 12288];
    parent.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..4096], &[1; 4096][..]);
    assert_eq!(&buf[4096..8192], &[3; 4096][..]);
    assert_eq!(&buf[8192..], &expected_base(8192, 4096)[..], "the child's write is absent from the parent");
    child.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..4096], &[2; 4096][..]);
    assert_eq!(&buf[4096..8192], &expected_base(4096, 4096)[..], "the parent's later write is absent");
    assert_eq!(&buf[8192..8704], &[2; 512][..]);
    // A clone of an unfrozen disk is refused; freezing with nothing written adds no layer.
    assert!(parent.clone_view(None).is_err());
    assert!(child.clone_view(None).is_err());
    child.freeze().unwrap();
    let mut empty = child.clone_view(None).unwrap();
    let layers = empty.layers();
    empty.freeze().unwrap();
    assert_eq!(empty.layers(), layers);
}

#[test]
fn snapshot_save_restore_save_round_trips_and_holds_the_data() {
    let dir = tmp("blk-snap");
    let snap = dir.join("snap");
    std::fs::create_dir_all(&snap).unwrap();
    let img = image(&dir, 2 * MIB);
    let mut b = Blk::new(&cfg(&img, &dir));
    assert_eq!(b.write(0, &[7; 4096]), S_OK);
    assert_eq!(b.write(100, &[8; 1024]), S_OK);
    let mut st = b.dev.save();
    st.disk = b.dev.state().disk.persist(&snap).unwrap();
    assert_eq!(st.disk.layers.len(), 1);
    assert!(snap.join(format!("disk-{}.layer", st.disk.layers[0])).exists());
    // Writes after the snapshot are not in it.
    assert_eq!(b.write(0, &[9; 512]), S_OK);
    let disk = CowDisk::open_saved(&st.disk, &snap, None).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mem = Arc::new(GuestMem::new(16 * MIB, Backing::Anon, false).unwrap());
    let restored = Block::from_parts(&st, disk, mem, irq).unwrap();
    let again = restored.save();
    assert_eq!(again, st, "save -> restore -> save gives the same state");
    let mut buf = vec![0u8; 4096];
    restored.state().disk.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, vec![7; 4096]);
    restored.state().disk.read_at(&mut buf[..1024], 100 * 512).unwrap();
    assert_eq!(&buf[..1024], &[8; 1024][..]);
    // Restoring twice gives independent disks over the same layers.
    let mut r2 = CowDisk::open_saved(&st.disk, &snap, None).unwrap();
    r2.write_at(&[4; 4096], 0).unwrap();
    restored.state().disk.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, vec![7; 4096]);
}

#[test]
fn missing_or_corrupt_disk_images_are_clear_errors() {
    let dir = tmp("blk-bad");
    let err = |p: &Path| CowDisk::create(&cfg(p, &dir)).err().unwrap();
    assert!(err(&dir.join("nope.img")).contains("cannot open disk image"), "{}", err(&dir.join("nope.img")));
    std::fs::write(dir.join("empty.img"), b"").unwrap();
    assert!(err(&dir.join("empty.img")).contains("whole number"));
    std::fs::write(dir.join("odd.img"), [0u8; 1000]).unwrap();
    assert!(err(&dir.join("odd.img")).contains("whole number"));
    assert!(err(&dir).contains("not a regular file"));
    // A snapshot whose map is corrupt, whose layer is truncated, or whose base changed.
    let img = image(&dir, MIB);
    let snap = dir.join("snap");
    std::fs::create_dir_all(&snap).unwrap();
    let mut d = CowDisk::create(&cfg(&img, &dir)).unwrap();
    d.write_at(&[1; 4096], 0).unwrap();
    let st = d.persist(&snap).unwrap();
    let id = &st.disk_id();
    let map = snap.join(format!("disk-{id}.map"));
    let good = std::fs::read(&map).unwrap();
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 3] ^= 1;
    std::fs::write(&map, &bad).unwrap();
    let e = CowDisk::open_saved(&st, &snap, None).err().unwrap();
    assert!(e.contains("disk map") && e.contains("checksum"), "{e}");
    std::fs::write(&map, &good).unwrap();
    let layer = snap.join(format!("disk-{id}.layer"));
    std::fs::OpenOptions::new().write(true).open(&layer).unwrap().set_len(4096).unwrap();
    let e = CowDisk::open_saved(&st, &snap, None).err().unwrap();
    assert!(e.contains("is 4096 bytes"), "{e}");
    let mut evil = st.clone();
    evil.layers = vec!["../../etc/passwd".into()];
    assert!(CowDisk::open_saved(&evil, &snap, None).err().unwrap().contains("invalid disk layer id"));
    std::fs::write(&img, vec![0u8; 2 * MIB as usize]).unwrap();
    let e = CowDisk::open_saved(&st, &snap, None).err().unwrap();
    assert!(e.contains("changed since the snapshot"), "{e}");
}

trait FirstId {
    fn disk_id(&self) -> String;
}
impl FirstId for vmm::devices::virtio::block::DiskState {
    fn disk_id(&self) -> String {
        self.layers[0].clone()
    }
}

#[test]
fn malformed_requests_get_errors_and_the_device_keeps_serving() {
    let dir = tmp("blk-malformed");
    let img = image(&dir, MIB);
    let mut b = Blk::new(&cfg(&img, &dir));
    // Past the end, unaligned length, unknown type.
    assert_eq!(b.request(T_IN, MIB / 512, &[], 512).0, S_IOERR);
    assert_eq!(b.request(T_IN, u64::MAX / 2, &[], 512).0, S_IOERR);
    assert_eq!(b.request(T_IN, 0, &[], 100).0, S_IOERR);
    assert_eq!(b.request(T_OUT, 0, &[1; 100], 0).0, S_IOERR);
    assert_eq!(b.request(99, 0, &[], 0).0, S_UNSUPP);
    // Data direction wrong: a read whose buffer is device-readable.
    let h = b.d.alloc(16);
    assert!(b.d.mem.write(h, &[0u8; 16]));
    let st = b.d.alloc(1);
    let data = b.d.alloc(512);
    b.d.chain(0, &[(h, 16, false), (data, 512, false), (st, 1, true)]);
    b.d.notify(0);
    b.d.next_used(0);
    let mut s = [0u8];
    b.d.mem.read(st, &mut s);
    assert_eq!(s[0], S_IOERR);
    // Buffer outside guest RAM; a header shorter than 16 bytes.
    b.d.chain(0, &[(h, 16, false), (1 << 40, 512, true), (st, 1, true)]);
    b.d.notify(0);
    b.d.next_used(0);
    b.d.mem.read(st, &mut s);
    assert_eq!(s[0], S_IOERR);
    b.d.chain(0, &[(h, 8, false), (st, 1, true)]);
    b.d.notify(0);
    b.d.next_used(0);
    b.d.mem.read(st, &mut s);
    assert_eq!(s[0], S_IOERR);
    // No status byte at all (last descriptor readable; lone descriptor; status outside RAM):
    // returned unused with length 0.
    b.d.chain(0, &[(h, 16, false), (st, 1, false)]);
    b.d.chain(0, &[(st, 1, true)]);
    b.d.chain(0, &[(h, 16, false), (1 << 40, 1, true)]);
    b.d.notify(0);
    for _ in 0..3 {
        assert_eq!(b.d.next_used(0).1, 0);
    }
    // A descriptor loop (next points at itself) ends; the device answers the next request.
    let i = (b.d.avail_idx[0] * 2) % QSIZE;
    b.d.desc(0, i, h, 16, NEXT, i);
    b.d.publish(0, i);
    b.d.notify(0);
    b.d.next_used(0);
    assert_eq!(b.dev.stats().malformed, 4);
    assert_eq!(b.read(0, 512), expected_base(0, 512));
    let mut id = [0u8; 20];
    let (s, out, _) = b.request(T_GET_ID, 0, &[], 20);
    id.copy_from_slice(&out);
    assert_eq!((s, &id[..12]), (S_OK, &b"forkvm-disk0"[..]));
}

/// A small tmpfs mounted for one test (unmounted on drop).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Self {
        use std::ffi::CString;
        std::fs::create_dir_all(dir).unwrap();
        let target = CString::new(dir.to_str().unwrap()).unwrap();
        let opts = CString::new(format!("size={size},mode=0700")).unwrap();
        // SAFETY: valid NUL-terminated strings; mounting a fresh tmpfs on our own directory.
        let rc = unsafe { libc::mount(c"tmpfs".as_ptr(), target.as_ptr(), c"tmpfs".as_ptr(), 0, opts.as_ptr().cast()) };
        assert_eq!(rc, 0, "mount tmpfs on {} (needs root): {}", dir.display(), std::io::Error::last_os_error());
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let target = std::ffi::CString::new(self.0.to_str().unwrap()).unwrap();
        // SAFETY: unmounting the tmpfs this test mounted.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

#[test]
fn a_full_host_disk_gives_ioerr_and_keeps_what_was_flushed() {
    let dir = tmp("blk-enospc");
    let img = image(&dir, 4 * MIB);
    let small = Tmpfs::mount(&dir.join("small"), "256k");
    let mut b = Blk::new(&cfg(&img, &small.0));
    assert_eq!(b.write(0, &[0x42; 8192]), S_OK);
    assert_eq!(b.request(T_FLUSH, 0, &[], 0).0, S_OK);
    // 1 MiB more cannot fit in 256 KiB: the write fails, the guest hears IOERR.
    assert_eq!(b.write(64, &vec![0x43; MIB as usize]), S_IOERR);
    assert!(b.dev.stats().errors >= 1);
    // What was flushed is intact, and blocks never written read as the image.
    assert_eq!(b.read(0, 8192), vec![0x42; 8192]);
    assert_eq!(b.read(4000, 4096), expected_base(4000 * 512, 4096));
    // Rewriting a block already held needs no new space and still works.
    assert_eq!(b.write(0, &[0x44; 4096]), S_OK);
    assert_eq!(b.request(T_FLUSH, 0, &[], 0).0, S_OK);
    assert_eq!(b.read(0, 4096), vec![0x44; 4096]);
}

#[test]
fn a_clone_leaves_layers_unsynced_and_a_snapshot_syncs_every_layer_it_links() {
    let dir = tmp("blk-sync");
    let snap = dir.join("snap");
    std::fs::create_dir_all(&snap).unwrap();
    let img = image(&dir, 2 * MIB);
    let mut parent = CowDisk::create(&cfg(&img, &dir)).unwrap();
    parent.write_at(&[1; 4096], 0).unwrap();
    parent.freeze().unwrap();
    let mut child = parent.clone_view(None).unwrap();
    assert_eq!(parent.unsynced_layers(), 1, "a clone does not fsync (the layer is an unnamed file)");
    child.write_at(&[2; 4096], 4096).unwrap();
    let st = child.persist(&snap).unwrap();
    assert_eq!(st.layers.len(), 2);
    assert_eq!(child.unsynced_layers(), 0, "every layer a snapshot names is synced before it is named");
    assert_eq!(parent.unsynced_layers(), 0, "the shared layer was synced once, for everyone");
    let restored = CowDisk::open_saved(&st, &snap, None).unwrap();
    assert_eq!(restored.unsynced_layers(), 0);
    let mut buf = vec![0u8; 8192];
    restored.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..4096], &[1; 4096][..]);
    assert_eq!(&buf[4096..], &[2; 4096][..]);
}
