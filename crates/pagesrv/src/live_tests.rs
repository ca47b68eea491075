//! Tier 1: write-protect preservation of a live parent's memory on plain memfd mappings.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use crate::live_source::LiveMemory;
use crate::server::Region;
use crate::source::PageSource;

const PAGE: usize = 4096;

/// A memfd of `len` bytes mapped MAP_SHARED (like a parent's guest memory).
struct Parent {
    file: File,
    ptr: *mut u8,
    len: usize,
}
// SAFETY: the mapping lives as long as Parent; tests write it from one thread at a time per page.
unsafe impl Send for Parent {}
// SAFETY: as above.
unsafe impl Sync for Parent {}

impl Parent {
    fn new(len: usize) -> Parent {
        // SAFETY: valid NUL-terminated name; result checked.
        let fd = unsafe { libc::memfd_create(c"live-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fresh fd we own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64).unwrap();
        // SAFETY: a fresh shared mapping of our memfd.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Parent { file, ptr: p.cast(), len }
    }
    fn live(&self) -> LiveMemory {
        let f = self.file.try_clone().unwrap();
        LiveMemory::new(f, vec![Region { base: self.ptr as u64, len: self.len as u64, offset: 0 }]).unwrap()
    }
    fn write_page(&self, page: usize, seed: u64) {
        let mut x = seed | 1;
        for w in 0..PAGE / 8 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = self.ptr.wrapping_add(page * PAGE + w * 8).cast::<u64>();
            // SAFETY: page < len / PAGE, so `at` is inside our mapping and 8-byte aligned.
            unsafe { at.write_volatile(x) };
        }
    }
    fn snapshot(&self) -> Vec<u8> {
        // SAFETY: reads our whole mapping.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }.to_vec()
    }
}

impl Drop for Parent {
    fn drop(&mut self) {
        // SAFETY: our mapping, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// A thread writing random pages (holes included) until told to stop; `gate` is held per write,
/// so a test can take it to fix a well-defined clone instant.
struct Writer {
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    gate: Arc<Mutex<()>>,
    h: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(p: &Arc<Parent>, seed: u64) -> Writer {
        let (stop, writes, gate) =
            (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(Mutex::new(())));
        let (s, w, g, p) = (stop.clone(), writes.clone(), gate.clone(), p.clone());
        let h = std::thread::spawn(move || {
            let mut x = seed;
            let pages = p.len / PAGE;
            while !s.load(SeqCst) {
                let _g = g.lock().unwrap();
                let page = (rng(&mut x) % pages as u64) as usize;
                p.write_page(page, rng(&mut x));
                w.fetch_add(1, SeqCst);
            }
        });
        Writer { stop, writes, gate, h: Some(h) }
    }
    /// Waits until the writer has done `n` more writes.
    fn wait_writes(&self, n: u64) {
        let target = self.writes.load(SeqCst) + n;
        while self.writes.load(SeqCst) < target {
            std::thread::yield_now();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        if let Some(h) = self.h.take() {
            h.join().unwrap();
        }
    }
}

/// Reads the whole source in random-sized chunks from two threads and compares with `want`.
fn assert_reads(src: &Arc<crate::live_source::Generation>, want: &[u8], seed: u64) {
    std::thread::scope(|sc| {
        for t in 0..2u64 {
            sc.spawn(move || {
                let mut x = seed + t * 7919;
                let mut off = 0usize;
                while off < want.len() {
                    let n = ((rng(&mut x) % 40 + 1) as usize * PAGE).min(want.len() - off);
                    let mut buf = vec![0u8; n];
                    src.fill(off as u64, &mut buf).unwrap();
                    if buf != want[off..off + n] {
                        let bad = (0..n / PAGE)
                            .find(|k| buf[k * PAGE..(k + 1) * PAGE] != want[off + k * PAGE..off + (k + 1) * PAGE]);
                        panic!("thread {t}: page {:?} differs from the clone instant", bad.map(|k| off / PAGE + k));
                    }
                    off += n;
                }
            });
        }
    });
}

#[test]
fn generation_reads_the_clone_instant_while_the_parent_keeps_writing() {
    let p = Arc::new(Parent::new(8 << 20));
    // First half data, second half holes.
    for page in 0..(p.len / PAGE / 2) {
        p.write_page(page, page as u64 + 1);
    }
    let live = p.live();
    let w = Writer::start(&p, 0x1234_5678);
    w.wait_writes(100);
    let (want1, g1) = {
        let _g = w.gate.lock().unwrap();
        (p.snapshot(), live.begin().unwrap())
    };
    // The parent writes on (each first write per page is preserved) while children read.
    w.wait_writes(500);
    assert_reads(&g1, &want1, 1);
    // A second clone while the first generation is still in use.
    let (want2, g2) = {
        let _g = w.gate.lock().unwrap();
        (p.snapshot(), live.begin().unwrap())
    };
    w.wait_writes(500);
    assert_reads(&g2, &want2, 2);
    assert_reads(&g1, &want1, 3);
    let st = live.stats();
    assert_eq!(st.active_generations, 2);
    assert!(st.protected);
    assert!(st.wp_faults > 0 && st.pages_saved > 0, "{st:?}");
    assert_ne!(want1, want2, "the parent wrote between the clones");
    drop(w);
    assert!(live.error().is_none());
}

#[test]
fn holes_written_after_the_clone_read_as_zero() {
    let p = Arc::new(Parent::new(4 << 20));
    p.write_page(0, 9);
    let live = p.live();
    let g = live.begin().unwrap();
    let hole = 100 * PAGE as u64;
    assert!(g.is_zero(hole, PAGE as u64));
    assert!(!g.is_zero(0, PAGE as u64));
    p.write_page(100, 42);
    let mut buf = vec![1u8; PAGE];
    g.fill(hole, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "a hole at the clone instant must read as zero");
    assert_eq!(live.stats().pages_saved, 0, "holes are not protected: nothing to save");
}

#[test]
fn retiring_the_last_generation_drops_protection_and_copies() {
    let p = Arc::new(Parent::new(4 << 20));
    for page in 0..64 {
        p.write_page(page, page as u64 + 5);
    }
    let live = p.live();
    let g = live.begin().unwrap();
    let g2 = g.clone();
    for page in 0..32 {
        p.write_page(page, 77);
    }
    assert_eq!(g.pages_held(), 32);
    drop(g);
    assert_eq!(live.stats().active_generations, 1, "a handle is still alive");
    drop(g2);
    let st = live.stats();
    assert_eq!((st.active_generations, st.pages_held, st.protected), (0, 0, false), "{st:?}");
    let faults = st.wp_faults;
    for page in 0..64 {
        p.write_page(page, 99);
    }
    assert_eq!(live.stats().wp_faults, faults, "no faults once protection is dropped");
    // And a new generation protects again.
    let g3 = live.begin().unwrap();
    p.write_page(3, 1);
    assert_eq!(g3.pages_held(), 1);
}

#[test]
fn a_hole_of_an_older_generation_stays_zero_when_a_newer_one_preserves_it() {
    let p = Arc::new(Parent::new(4 << 20));
    p.write_page(0, 1);
    let live = p.live();
    let g1 = live.begin().unwrap();
    p.write_page(7, 11); // a hole at g1's instant
    let mut x = vec![0u8; PAGE];
    x.copy_from_slice(&p.snapshot()[7 * PAGE..8 * PAGE]);
    let g2 = live.begin().unwrap();
    p.write_page(7, 22); // g2 must keep what it was at its instant
    let mut buf = vec![0u8; PAGE];
    g2.fill(7 * PAGE as u64, &mut buf).unwrap();
    assert_eq!(buf, x, "the newer generation sees the page as it was at its instant");
    g1.fill(7 * PAGE as u64, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "the older generation saw a hole there");
    assert!(g1.is_zero(7 * PAGE as u64, PAGE as u64));
    assert!(!g2.is_zero(7 * PAGE as u64, PAGE as u64));
    assert_eq!(g1.pages_held(), 0, "nothing is copied for a generation that saw a hole");
}

/// Armed tracking keeps protection between generations and re-protects at `begin` only what
/// the parent wrote since (and holes that became data): every generation still reads exactly
/// the clone instant, including ones begun after earlier generations were retired.
#[test]
fn armed_generations_read_the_clone_instant_after_earlier_ones_retired() {
    let p = Arc::new(Parent::new(8 << 20));
    for page in 0..(p.len / PAGE / 2) {
        p.write_page(page, page as u64 + 3);
    }
    let live = p.live();
    live.arm().unwrap();
    assert!(live.stats().protected);
    let w = Writer::start(&p, 0x9e37_79b9);
    for round in 0..4u64 {
        // Writes between generations (some to holes: they become data) un-protect pages.
        w.wait_writes(300);
        let (want, g) = {
            let _g = w.gate.lock().unwrap();
            (p.snapshot(), live.begin().unwrap())
        };
        w.wait_writes(300);
        assert_reads(&g, &want, 10 + round);
        drop(g);
        let st = live.stats();
        assert_eq!(st.active_generations, 0);
        assert!(st.protected, "armed: protection stays after the last generation retired");
    }
    drop(w);
    assert!(live.error().is_none());
}

/// A live parent's generation served over the TCP page protocol (loopback): a remote child
/// reads exactly the clone instant while the parent keeps writing, armed or not.
#[test]
fn a_live_generation_served_over_tcp_reads_the_clone_instant() {
    use crate::net_auth::Secret;
    use crate::{NetClientConfig, NetServer, NetServerConfig, NetSource};
    let p = Arc::new(Parent::new(4 << 20));
    for page in 0..(p.len / PAGE / 2) {
        p.write_page(page, page as u64 + 11);
    }
    let live = p.live();
    live.arm().unwrap();
    let w = Writer::start(&p, 0x51ed_2701);
    w.wait_writes(200);
    let (want, g) = {
        let _g = w.gate.lock().unwrap();
        (p.snapshot(), live.begin().unwrap())
    };
    let secret = Secret::from_bytes(b"0123456789abcdef-live-secret").unwrap();
    let (srv, _events) = NetServer::bind("127.0.0.1:0", g.clone(), NetServerConfig::new(secret.clone())).unwrap();
    let cfg = NetClientConfig { request_timeout: std::time::Duration::from_secs(10), ..Default::default() };
    let remote = NetSource::connect(&srv.local_addr().to_string(), &secret, &cfg).unwrap();
    assert_eq!(remote.len(), want.len() as u64);
    // The parent writes on while the remote child reads.
    w.wait_writes(300);
    let mut got = vec![0u8; want.len()];
    for (i, chunk) in got.chunks_mut(64 << 10).enumerate() {
        remote.fill((i * (64 << 10)) as u64, chunk).unwrap();
    }
    if got != want {
        let bad = (0..want.len() / PAGE).find(|k| got[k * PAGE..(k + 1) * PAGE] != want[k * PAGE..(k + 1) * PAGE]);
        panic!("page {bad:?} read over TCP differs from the clone instant");
    }
    drop(w);
    assert!(live.error().is_none());
}

/// Each authenticated connection to a server with an [`crate::net_server::Opener`] gets its own
/// clone instant (a live clone over TCP per connection): two clients connected at different
/// moments of a parent that keeps writing each read exactly the memory of their own instant.
#[test]
fn an_opener_gives_each_tcp_connection_its_own_clone_instant() {
    use crate::net_auth::Secret;
    use crate::net_server::{Opened, Opener};
    use crate::wset::WorkingSet;
    use crate::{NetClientConfig, NetServer, NetServerConfig, NetSource};
    let p = Arc::new(Parent::new(4 << 20));
    for page in 0..(p.len / PAGE / 2) {
        p.write_page(page, page as u64 + 7);
    }
    let live = Arc::new(p.live());
    live.arm().unwrap();
    let w = Writer::start(&p, 0x0be2_e401);
    let instants: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let (l2, g2, p2, i2) = (live.clone(), w.gate.clone(), p.clone(), instants.clone());
    let opener = Opener(Arc::new(move || {
        let _g = g2.lock().unwrap();
        let gen = l2.begin().map_err(|e| e.to_string())?;
        let n = i2.lock().unwrap().len() as u8;
        i2.lock().unwrap().push(p2.snapshot());
        let push = WorkingSet { page_size: PAGE as u32, ranges: gen.data_ranges() };
        Ok(Opened { source: gen, state: Some(vec![n; 16]), push: Some(push) })
    }));
    let secret = Secret::from_bytes(b"0123456789abcdef-opener-secret").unwrap();
    let mut cfg = NetServerConfig::new(secret.clone());
    cfg.opener = Some(opener);
    let base: Arc<dyn PageSource> = Arc::new(crate::source::ZeroSource { len: p.len as u64 });
    let (srv, _events) = NetServer::bind("127.0.0.1:0", base, cfg).unwrap();
    let ccfg = NetClientConfig { request_timeout: std::time::Duration::from_secs(10), ..Default::default() };
    let mut clients = Vec::new();
    for _ in 0..2 {
        w.wait_writes(200);
        let c = NetSource::connect(&srv.local_addr().to_string(), &secret, &ccfg).unwrap();
        assert!(c.push_bytes() > 0, "the clone instant's data is pushed");
        clients.push(c);
    }
    w.wait_writes(300);
    let want = instants.lock().unwrap().clone();
    assert_eq!(want.len(), 2);
    assert_ne!(want[0], want[1], "the parent wrote between the two clone instants");
    for (i, c) in clients.iter().enumerate() {
        assert_eq!(c.fetch_state().unwrap(), vec![i as u8; 16], "each connection gets its own state");
        let mut got = vec![0u8; p.len];
        for (k, chunk) in got.chunks_mut(64 << 10).enumerate() {
            c.fill((k * (64 << 10)) as u64, chunk).unwrap();
        }
        assert!(got == want[i], "client {i} does not read its clone instant");
    }
    drop(clients);
    drop(w);
    assert!(live.error().is_none());
}
