//! Tests against real userfaultfd (no KVM needed).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chunkstore::{PageRef, Store, StoreConfig};

use crate::anon::AnonMap;
use crate::*;

pub(crate) struct TempDir(pub PathBuf);
impl TempDir {
    pub(crate) fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "pagesrv-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        TempDir(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rng(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// Known pattern: zero pages, repeated pages, page-number-stamped pages, random.
pub(crate) fn pattern(pages: usize) -> Vec<u8> {
    let mut s = 0x1234_5678_9abc_def1u64;
    let mut v = vec![0u8; pages * 4096];
    for (i, p) in v.chunks_exact_mut(4096).enumerate() {
        match i % 7 {
            0 | 3 => {}
            1 => p.fill(0x11),
            2 => {
                for (j, b) in p.iter_mut().enumerate() {
                    *b = (i as u8).wrapping_add(j as u8);
                }
            }
            _ => {
                for b in p.iter_mut() {
                    *b = rng(&mut s) as u8;
                }
            }
        }
    }
    v
}

pub(crate) fn store_with(img: &[u8], dir: &TempDir) -> (Arc<Store>, Arc<chunkstore::Manifest>) {
    let store = Store::open_or_create(&dir.0, StoreConfig::default()).unwrap();
    let (m, _) = store.put_image("img", img).unwrap();
    (Arc::new(store), Arc::new(m))
}

fn cfg(batch: usize) -> ServerConfig {
    ServerConfig { batch, ..Default::default() }
}

/// Read every byte of the mapping from another thread and compare.
fn check_all(map: &Arc<AnonMap>, expect: &Arc<Vec<u8>>) {
    let (m, e) = (map.clone(), expect.clone());
    std::thread::spawn(move || {
        for (i, page) in e.chunks(4096).enumerate() {
            let got = &m.slice()[i * 4096..][..4096];
            assert!(got == page, "page {i} differs");
        }
    })
    .join()
    .unwrap();
}

#[test]
fn userfaultfd_is_available() {
    let f = uffd::Uffd::available_features().unwrap();
    assert_ne!(f & uffd::features::EVENT_REMOVE, 0, "EVENT_REMOVE missing");
    eprintln!("uffd features: {f:#x}");
}

#[test]
fn serves_every_byte_single_and_batched() {
    let img = Arc::new(pattern(1024));
    let d = TempDir::new("all");
    let (store, m) = store_with(&img, &d);
    for batch in [4096, 64 << 10, 256 << 10, 2 << 20] {
        let map = Arc::new(AnonMap::new(img.len()).unwrap());
        let src = Arc::new(ChunkSource::new(store.clone(), m.clone()));
        let srv = PageServer::register(vec![map.region(0)], src, cfg(batch)).unwrap();
        check_all(&map, &img);
        let st = srv.stop();
        assert_eq!(st.pages_copied + st.pages_zeroed, 1024, "{batch}: {st:?}");
        let expect_faults = 1024 / (batch / 4096) as u64;
        assert!(st.faults >= expect_faults, "{batch}: {st:?}");
        if batch == 4096 {
            assert_eq!(st.faults, 1024);
        } else {
            assert!(st.faults < 1024, "{batch}: {st:?}");
        }
        assert!(st.latency_p50.is_some());
    }
}

#[test]
fn serves_from_file_mem_and_zero_sources() {
    let img = Arc::new(pattern(256));
    let d = TempDir::new("file");
    std::fs::create_dir_all(&d.0).unwrap();
    let path = d.0.join("mem");
    std::fs::write(&path, &*img).unwrap();
    let file_src = Arc::new(FileSource::whole(std::fs::File::open(&path).unwrap()).unwrap());
    let map = Arc::new(AnonMap::new(img.len()).unwrap());
    let srv = PageServer::register(vec![map.region(0)], file_src, cfg(64 << 10)).unwrap();
    check_all(&map, &img);
    drop(srv);

    // "Fork": the child's memory is served from the parent's frozen copy.
    let parent = Arc::new(img.clone());
    // SAFETY: `parent` outlives the server (stopped below) and is not written.
    let mem_src = Arc::new(unsafe { MemSource::new(parent.as_ptr(), parent.len() as u64) });
    let child = Arc::new(AnonMap::new(img.len()).unwrap());
    let srv = PageServer::register(vec![child.region(0)], mem_src, cfg(256 << 10)).unwrap();
    check_all(&child, &img);
    srv.stop();

    let z = Arc::new(AnonMap::new(1 << 20).unwrap());
    let srv = PageServer::register(vec![z.region(0)], Arc::new(ZeroSource { len: 1 << 20 }), cfg(64 << 10)).unwrap();
    assert!(z.slice().iter().all(|&b| b == 0));
    let st = srv.stop();
    assert_eq!(st.pages_zeroed, 256);
    assert_eq!(st.pages_copied, 0);
}

#[test]
fn two_regions_with_offsets() {
    let img = Arc::new(pattern(512));
    let d = TempDir::new("regions");
    let (store, m) = store_with(&img, &d);
    let a = Arc::new(AnonMap::new(256 * 4096).unwrap());
    let b = Arc::new(AnonMap::new(256 * 4096).unwrap());
    let src = Arc::new(ChunkSource::new(store, m));
    let srv = PageServer::register(vec![a.region(0), b.region(256 * 4096)], src, cfg(64 << 10)).unwrap();
    check_all(&a, &Arc::new(img[..256 * 4096].to_vec()));
    check_all(&b, &Arc::new(img[256 * 4096..].to_vec()));
    srv.stop();
}

#[test]
fn dedup_correctness_across_images() {
    // Two images sharing most pages; serving the second gives its bytes.
    let a = pattern(512);
    let mut b = a.clone();
    for i in (0..512).step_by(9) {
        b[i * 4096 + 100] ^= 0xFF;
    }
    let d = TempDir::new("dedup");
    let store = Store::open_or_create(&d.0, StoreConfig::default()).unwrap();
    store.put_image("a", &a).unwrap();
    let (mb, st) = store.put_image("b", &b).unwrap();
    assert!(st.new_chunks <= 57, "{st:?}");
    let store = Arc::new(store);
    let map = Arc::new(AnonMap::new(b.len()).unwrap());
    let src = Arc::new(ChunkSource::new(store, Arc::new(mb)));
    let srv = PageServer::register(vec![map.region(0)], src, cfg(64 << 10)).unwrap();
    check_all(&map, &Arc::new(b));
    srv.stop();
}

#[test]
fn record_then_prefetch_working_set() {
    let img = Arc::new(pattern(2048));
    let d = TempDir::new("wset");
    let (store, m) = store_with(&img, &d);
    let touch: Vec<usize> = (0..2048).filter(|p| p % 13 == 0 || (700..760).contains(p)).collect();
    // First restore: record.
    let map = Arc::new(AnonMap::new(img.len()).unwrap());
    let src: Arc<dyn PageSource> = Arc::new(ChunkSource::new(store.clone(), m.clone()));
    let mut c = cfg(64 << 10);
    c.record = true;
    let srv = PageServer::register(vec![map.region(0)], src.clone(), c).unwrap();
    for &p in &touch {
        assert_eq!(map.read(p * 4096 + 5), img[p * 4096 + 5]);
    }
    let ws = srv.working_set();
    srv.stop();
    assert!(!ws.ranges.is_empty());
    let path = d.0.join("wset");
    ws.save(&path).unwrap();
    let ws2 = WorkingSet::load(&path).unwrap();
    assert_eq!(ws, ws2);

    // Second restore: prefetch (one thread, then two in parallel), then touch the same pages.
    for threads in [1, 2] {
        let map = Arc::new(AnonMap::new(img.len()).unwrap());
        let mut c = cfg(64 << 10);
        c.prefetch = Some(ws2.clone());
        c.prefetch_threads = threads;
        let mut srv = PageServer::register(vec![map.region(0)], src.clone(), c).unwrap();
        let t = srv.wait_prefetch();
        assert!(t.is_some());
        assert_eq!(srv.resident_pages() as u64, ws2.bytes() / 4096);
        for &p in &touch {
            assert_eq!(map.read(p * 4096 + 5), img[p * 4096 + 5]);
        }
        check_all(&map, &img);
        let st = srv.stop();
        assert_eq!(st.pages_prefetched, ws2.bytes() / 4096, "{st:?}");
        // Faults only for pages outside the working set.
        assert!(st.faults < 2048 / 16, "{st:?}");
    }

    // A corrupted working-set file is rejected.
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 2] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    assert!(WorkingSet::load(&path).is_err());
}

#[test]
fn prefetch_races_faults() {
    let img = Arc::new(pattern(4096));
    let d = TempDir::new("race");
    let (store, m) = store_with(&img, &d);
    let ws = WorkingSet { page_size: 4096, ranges: (0..4096u64).step_by(16).map(|p| (p * 4096, 65536)).collect() };
    let map = Arc::new(AnonMap::new(img.len()).unwrap());
    let mut c = cfg(64 << 10);
    c.prefetch = Some(ws);
    let srv = PageServer::register(vec![map.region(0)], Arc::new(ChunkSource::new(store, m)), c).unwrap();
    // Read backwards while the prefetcher goes forwards.
    let (mm, e) = (map.clone(), img.clone());
    std::thread::spawn(move || {
        for p in (0..4096).rev() {
            assert_eq!(mm.slice()[p * 4096..][..4096], e[p * 4096..][..4096], "page {p}");
        }
    })
    .join()
    .unwrap();
    let st = srv.stop();
    assert_eq!(st.pages_copied + st.pages_zeroed, 4096, "{st:?}");
}

fn remove_case(policy: RemovePolicy) {
    let img = Arc::new(pattern(256));
    let d = TempDir::new("remove");
    let (store, m) = store_with(&img, &d);
    let map = Arc::new(AnonMap::new(img.len()).unwrap());
    let mut c = cfg(64 << 10);
    c.remove_policy = policy;
    let srv = PageServer::register(vec![map.region(0)], Arc::new(ChunkSource::new(store, m)), c).unwrap();
    check_all(&map, &img);
    // Drop pages 16..48 (must happen off the fault thread: madvise waits
    // for the REMOVE event to be read).
    // SAFETY: range inside our mapping.
    let rc = unsafe { libc::madvise(map.ptr.wrapping_add(16 * 4096).cast(), 32 * 4096, libc::MADV_DONTNEED) };
    assert_eq!(rc, 0);
    let mut expect = (*img).clone();
    if policy == RemovePolicy::Zero {
        expect[16 * 4096..48 * 4096].fill(0);
    }
    check_all(&map, &Arc::new(expect));
    let st = srv.stop();
    assert!(st.removes >= 1, "{st:?}");
    assert!(st.faults > 4, "{st:?}");
}

#[test]
fn event_remove_zero_policy() {
    remove_case(RemovePolicy::Zero);
}

#[test]
fn event_remove_source_policy() {
    remove_case(RemovePolicy::Source);
}

/// Store an image and corrupt the chunk of page `page`; returns the store.
pub(crate) fn corrupt_store(img: &[u8], page: u64, d: &TempDir) -> (Arc<Store>, Arc<chunkstore::Manifest>) {
    use std::os::unix::fs::FileExt;
    let (store, m) = store_with(img, d);
    let PageRef::Chunk(h) = m.page(page).unwrap() else { panic!("page {page} is zero") };
    let e = store.chunk_entry(h).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(d.0.join("pack")).unwrap();
    f.write_all_at(&[0xde, 0xad, 0xbe, 0xef], e.offset + 8).unwrap();
    (store, m)
}

#[test]
fn corrupt_chunk_gives_efault_not_garbage_or_hang() {
    let img = pattern(64);
    let d = TempDir::new("corrupt");
    let bad_page = 5u64; // random content, stored raw
    let (store, m) = corrupt_store(&img, bad_page, &d);
    let map = Arc::new(AnonMap::new(img.len()).unwrap());
    let told = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let t2 = told.clone();
    let hook = crate::FailureHook(Arc::new(move |why: &str| t2.lock().unwrap().push(why.to_string())));
    let c = ServerConfig { on_failure: Some(hook), ..cfg(64 << 10) };
    let srv = PageServer::register(vec![map.region(0)], Arc::new(ChunkSource::new(store, m)), c).unwrap();
    // A kernel access into the bad page (write(2) from it) fails with EFAULT.
    let mm = map.clone();
    let h = std::thread::spawn(move || {
        let mut fds = [0i32; 2];
        // SAFETY: fds has room for two ints.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let at = mm.ptr.wrapping_add(bad_page as usize * 4096);
        // SAFETY: `at` is inside our mapping; write(2) reads 16 bytes of it.
        let n = unsafe { libc::write(fds[1], at.cast(), 16) };
        let err = std::io::Error::last_os_error();
        for fd in fds {
            // SAFETY: closing an fd we just made.
            unsafe { libc::close(fd) };
        }
        (n, err.raw_os_error())
    });
    let t0 = Instant::now();
    while !h.is_finished() {
        assert!(t0.elapsed() < Duration::from_secs(20), "reader hangs");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (n, err) = h.join().unwrap();
    assert_eq!((n, err), (-1, Some(libc::EFAULT)));
    assert!(srv.error().unwrap().contains("corrupt"), "{:?}", srv.error());
    // Good pages of the same block are still served correctly.
    assert_eq!(map.slice()[4 * 4096..5 * 4096], img[4 * 4096..5 * 4096]);
    assert_eq!(map.slice()[6 * 4096..7 * 4096], img[6 * 4096..7 * 4096]);
    let st = srv.stop();
    assert_eq!(st.pages_poisoned, 1, "{st:?}");
    assert!(st.source_errors >= 1);
    let told = told.lock().unwrap();
    assert_eq!(told.len(), 1, "the failure hook runs once per failed page: {told:?}");
    assert!(told[0].contains("cannot be served") && told[0].contains("corrupt"), "{told:?}");
}

const CHILD_ENV: &str = "PAGESRV_TEST_SIGBUS_CHILD";

/// The child of `corrupt_chunk_kills_reader_with_sigbus`: never returns.
fn sigbus_child() -> ! {
    let img = pattern(64);
    let d = TempDir::new("sigbus");
    let (store, m) = corrupt_store(&img, 5, &d);
    let map = Arc::new(AnonMap::new(img.len()).unwrap());
    let _srv = PageServer::register(vec![map.region(0)], Arc::new(ChunkSource::new(store, m)), cfg(64 << 10)).unwrap();
    let v = map.read(5 * 4096 + 100); // must die here with SIGBUS
    println!("read {v} from a corrupt page");
    std::process::exit(3);
}

/// Runs itself again as a child process (CHILD_ENV set) that reads a corrupt page and must die
/// of SIGBUS; both roles do real work.
#[test]
fn corrupt_chunk_kills_reader_with_sigbus() {
    use std::os::unix::process::ExitStatusExt;
    if std::env::var_os(CHILD_ENV).is_some() {
        sigbus_child();
    }
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["tests::corrupt_chunk_kills_reader_with_sigbus", "--exact", "--test-threads=1", "--nocapture"])
        .env(CHILD_ENV, "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("child reader hangs");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.signal(), Some(libc::SIGBUS), "{status:?}");
}

#[test]
fn firecracker_handshake_in_process() {
    use std::os::unix::net::{UnixListener, UnixStream};
    let img = Arc::new(pattern(512));
    let d = TempDir::new("fc");
    let (store, m) = store_with(&img, &d);
    let sock = d.0.join("uffd.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    // Handler side.
    let handler = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let pid = fc_wire::peer_pid(&stream);
        let (hs, uffd) = fc_wire::recv_handshake(&stream, Duration::from_secs(10)).unwrap();
        let (regions, ps) = fc::validate(&hs.mappings, 512 * 4096).unwrap();
        let c = ServerConfig { page_size: ps as usize, owner_pid: pid, ..cfg(64 << 10) };
        let srv = PageServer::start(uffd, regions, Arc::new(ChunkSource::new(store, m)), c).unwrap();
        (srv, hs.mappings)
    });
    // VMM side: two regions, the second at offset 1 MiB of the snapshot.
    let a = Arc::new(AnonMap::new(256 * 4096).unwrap());
    let b = Arc::new(AnonMap::new(256 * 4096).unwrap());
    let uffd = uffd::Uffd::new(uffd::features::EVENT_REMOVE, 0).unwrap();
    let mut maps = Vec::new();
    for (mp, off) in [(&a, 0u64), (&b, 256 * 4096)] {
        uffd.register(mp.ptr as u64, mp.len as u64).unwrap();
        maps.push(fc::GuestRegionUffdMapping {
            base_host_virt_addr: mp.ptr as u64,
            size: mp.len as u64,
            offset: off,
            page_size: 4096,
        });
    }
    let stream = UnixStream::connect(&sock).unwrap();
    fc_wire::send_handshake(&stream, &maps, uffd.as_fd()).unwrap();
    let (srv, got) = handler.join().unwrap();
    assert_eq!(got, maps);
    check_all(&a, &Arc::new(img[..256 * 4096].to_vec()));
    check_all(&b, &Arc::new(img[256 * 4096..].to_vec()));
    let st = srv.stop();
    assert_eq!(st.pages_copied + st.pages_zeroed, 512);
}

#[test]
fn bench_runs_small() {
    let out = bench_store(&BenchOpts { size_mib: 8, runs: 1, ..Default::default() });
    assert!(out.contains("compression"), "{out}");
}

#[test]
fn single_page_recording_is_exact() {
    let img = Arc::new(pattern(1024));
    let d = TempDir::new("exact");
    let (store, m) = store_with(&img, &d);
    let map = Arc::new(AnonMap::new(img.len()).unwrap());
    let mut c = cfg(4096);
    c.record = true;
    let srv = PageServer::register(vec![map.region(0)], Arc::new(ChunkSource::new(store, m)), c).unwrap();
    let touched: Vec<usize> = (0..1024).filter(|p| p % 3 != 0).collect();
    for &p in &touched {
        map.read(p * 4096);
    }
    let ws = srv.working_set();
    let st = srv.stop();
    assert_eq!(st.faults, touched.len() as u64);
    assert_eq!(ws.bytes(), touched.len() as u64 * 4096, "{:?}", &ws.ranges[..4]);
}

/// A kernel read of `len` bytes at `ptr` via write(2) into a pipe, on a
/// thread, bounded by a timeout. Returns the errno (0 on success).
fn kernel_read_with_timeout(map: &Arc<AnonMap>, offset: usize) -> i32 {
    let mm = map.clone();
    let h = std::thread::spawn(move || {
        let mut fds = [0i32; 2];
        // SAFETY: fds has room for two ints.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let at = mm.ptr.wrapping_add(offset);
        // SAFETY: `at` is inside our mapping; write(2) reads 16 bytes of it.
        let n = unsafe { libc::write(fds[1], at.cast(), 16) };
        let err = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        for fd in fds {
            // SAFETY: closing an fd we just made.
            unsafe { libc::close(fd) };
        }
        if n == 16 {
            0
        } else {
            err
        }
    });
    let t0 = Instant::now();
    while !h.is_finished() {
        assert!(t0.elapsed() < Duration::from_secs(20), "reader hangs");
        std::thread::sleep(Duration::from_millis(5));
    }
    h.join().unwrap()
}

#[derive(Debug)]
struct PanickingSource;
impl PageSource for PanickingSource {
    fn len(&self) -> u64 {
        1 << 20
    }
    fn fill(&self, _offset: u64, _buf: &mut [u8]) -> Result<()> {
        panic!("source bug (expected in this test)");
    }
}

#[test]
fn a_handler_that_dies_fails_stop() {
    let map = Arc::new(AnonMap::new(1 << 20).unwrap());
    let srv = PageServer::register(vec![map.region(0)], Arc::new(PanickingSource), cfg(64 << 10)).unwrap();
    // The faulting access fails (EFAULT for a kernel access) instead of hanging ...
    assert_eq!(kernel_read_with_timeout(&map, 8192), libc::EFAULT);
    assert!(srv.error().unwrap().contains("panicked"));
    // ... and so does every later access, even after the server is gone.
    let st = srv.stop();
    assert_eq!(st.pages_poisoned, 256);
    assert_eq!(kernel_read_with_timeout(&map, 500 * 1024), libc::EFAULT);
}

#[test]
fn poison_unserved_before_stop() {
    let img = Arc::new(pattern(64));
    let d = TempDir::new("poison");
    let (store, m) = store_with(&img, &d);
    let map = Arc::new(AnonMap::new(img.len()).unwrap());
    let srv = PageServer::register(vec![map.region(0)], Arc::new(ChunkSource::new(store, m)), cfg(4096)).unwrap();
    assert_eq!(kernel_read_with_timeout(&map, 2 * 4096), 0);
    assert_eq!(srv.poison_unserved().unwrap(), 63);
    srv.stop();
    // Served page still readable, unserved ones fail rather than read zeros.
    assert_eq!(map.slice()[2 * 4096..3 * 4096], img[2 * 4096..3 * 4096]);
    assert_eq!(kernel_read_with_timeout(&map, 10 * 4096), libc::EFAULT);
}

#[test]
fn eight_k_chunks_served_to_4k_pages() {
    let img = Arc::new(pattern(512));
    let d = TempDir::new("8k");
    let store = Store::open_or_create(&d.0, StoreConfig { page_size: 8192, ..Default::default() }).unwrap();
    let (m, _) = store.put_image("img", &img).unwrap();
    let src = Arc::new(ChunkSource::new(Arc::new(store), Arc::new(m)));
    for batch in [4096, 64 << 10] {
        let map = Arc::new(AnonMap::new(img.len()).unwrap());
        let srv = PageServer::register(vec![map.region(0)], src.clone(), cfg(batch)).unwrap();
        // Odd pages first so that later runs start at unaligned pages.
        for p in (1..512).step_by(2) {
            assert_eq!(map.read(p * 4096 + 1), img[p * 4096 + 1]);
        }
        check_all(&map, &img);
        let st = srv.stop();
        assert_eq!(st.source_errors, 0, "{st:?}");
    }
}

/// Regression: a uffd handed over in blocking mode (a VMM that did not ask for O_NONBLOCK) must
/// be served. poll(2) on a blocking userfaultfd reports POLLERR, which the fault loop took for a
/// hang-up: the server quit and the faulting thread waited forever.
#[test]
fn blocking_uffd_from_the_vmm_is_served() {
    use std::os::fd::AsRawFd;
    use std::os::unix::net::{UnixListener, UnixStream};
    let img = Arc::new(pattern(64));
    let d = TempDir::new("fcblock");
    let (store, m) = store_with(&img, &d);
    let sock = d.0.join("uffd.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let handler = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let (hs, uffd) = fc_wire::recv_handshake(&stream, Duration::from_secs(10)).unwrap();
        let (regions, _) = fc::validate(&hs.mappings, 64 * 4096).unwrap();
        PageServer::start(uffd, regions, Arc::new(ChunkSource::new(store, m)), cfg(64 << 10)).unwrap()
    });
    let map = Arc::new(AnonMap::new(img.len()).unwrap());
    let uffd = uffd::Uffd::new(uffd::features::EVENT_REMOVE, 0).unwrap();
    // SAFETY: fcntl on an fd we own; clears O_NONBLOCK like a VMM that never set it.
    unsafe { libc::fcntl(uffd.as_raw_fd(), libc::F_SETFL, 0) };
    uffd.register(map.ptr as u64, map.len as u64).unwrap();
    let maps = [fc::GuestRegionUffdMapping {
        base_host_virt_addr: map.ptr as u64,
        size: map.len as u64,
        offset: 0,
        page_size: 4096,
    }];
    let stream = UnixStream::connect(&sock).unwrap();
    fc_wire::send_handshake(&stream, &maps, uffd.as_fd()).unwrap();
    let srv = handler.join().unwrap();
    assert_eq!(kernel_read_with_timeout(&map, 3 * 4096), 0, "fault on a blocking uffd not served");
    check_all(&map, &img);
    srv.stop();
}

/// A kernel without `UFFD_FEATURE_POISON` (Linux < 6.6, e.g. Debian 12's 6.1) answered our
/// UFFDIO_POISON with a bare "Invalid argument", logged by every woken VM that stopped: the
/// call now says what is missing without asking the kernel.
#[test]
fn poison_without_the_feature_says_the_kernel_lacks_it() {
    let map = Arc::new(AnonMap::new(1 << 16).unwrap());
    let uffd = Uffd::new(0, 0).unwrap();
    let r = map.region(0);
    uffd.register(r.base, r.len).unwrap();
    let e = uffd.poison(r.base, 4096).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("UFFD_FEATURE_POISON"), "{e}");
}
