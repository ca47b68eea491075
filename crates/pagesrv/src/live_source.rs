//! Pages of a *running* parent as they were at a clone instant (a live clone's page source).
//!
//! The parent's guest memory is a shared file (memfd/tmpfs) mapped into the parent. A
//! [`LiveMemory`] registers those mappings with a userfaultfd in write-protect mode. Each clone
//! calls [`LiveMemory::begin`] while the parent is paused: every page is write-protected and a
//! new [`Generation`] starts. The parent then runs on; its first write to a page faults into the
//! WP thread here, which saves the page's old contents into every active generation that has no
//! copy yet, then un-protects the page and wakes the writer (a page is copied at most once per
//! generation, and only if the parent writes it).
//!
//! A [`Generation`] is a [`PageSource`]: a page it preserved comes from its copy, any other page
//! straight from the file (`pread`, which reads holes as zero without allocating). A per-page
//! lock (striped) makes the "preserved? else read the file" decision atomic with respect to the
//! WP thread, so a concurrent parent write can never tear a page a child receives: the write is
//! held until the old contents are saved, and saving happens under the same lock.
//!
//! Dropping the last handle of a generation retires it and frees its copies; when no generation
//! is left, protection is dropped and the parent runs without faults. If the WP thread cannot
//! save a page, the generations it could not serve are marked broken (their readers get an error,
//! never a wrong page) and the parent's write goes ahead: the parent is never harmed.
//!
//! The interface a remote page server needs is only [`PageSource`] on an `Arc<Generation>`.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::error::{sys, Error, Result};
use crate::server::Region;
use crate::source::PageSource;
use crate::uffd::{Event, Uffd};
use crate::uffd_wp::{PAGEFAULT_FLAG_WP, REGISTER_MODE_WP};

const PAGE: u64 = 4096;
/// Page locks (page index modulo this).
const STRIPES: usize = 1024;
/// Pages read under one set of page locks by [`Generation::fill`].
const FILL_CHUNK: usize = 64;

/// Old contents of a page (None: it was all zero).
type Saved = Option<Arc<[u8]>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug)]
struct GenState {
    id: u64,
    /// Data extents of the file at the clone instant, `[start, end)` sorted: everything else
    /// was a hole (zero) then, whatever the parent writes there later.
    data: Vec<(u64, u64)>,
    preserved: Mutex<HashMap<u64, Saved>>,
    /// Why this generation can no longer be served correctly.
    broken: Mutex<Option<String>>,
}

#[derive(Debug)]
struct LiveShared {
    uffd: Uffd,
    file: File,
    regions: Vec<Region>,
    len: u64,
    stripes: Box<[Mutex<()>]>,
    gens: Mutex<Vec<Arc<GenState>>>,
    next_gen: AtomicU64,
    wp_faults: AtomicU64,
    pages_saved: AtomicU64,
    protected: AtomicBool,
    /// Set by [`LiveMemory::arm`]: protection is kept between generations, and pages the
    /// parent un-protects by writing are remembered, so that [`LiveMemory::begin`] re-protects
    /// only those (the parent's pause no longer pays for write-protecting all its memory).
    armed: Mutex<Option<Armed>>,
    error: Mutex<Option<String>>,
}

/// Armed tracking: all tracked memory (holes included) is write-protected except the pages in
/// `written` (page numbers); `data` (file offsets) covers every page that held data at arm time
/// or was written since, so a generation can take it as its data without scanning the file.
#[derive(Debug, Default)]
struct Armed {
    data: Vec<(u64, u64)>,
    written: std::collections::BTreeSet<u64>,
}

/// Counters of a [`LiveMemory`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LiveStats {
    /// Generations not yet retired.
    pub active_generations: usize,
    /// Write-protect faults handled.
    pub wp_faults: u64,
    /// Page copies made (all generations, ever).
    pub pages_saved: u64,
    /// Page copies held now.
    pub pages_held: u64,
    /// Guest memory is write-protected now.
    pub protected: bool,
}

/// Write-protect tracking of a parent's shared guest memory; see the module docs.
#[derive(Debug)]
pub struct LiveMemory {
    shared: Arc<LiveShared>,
    stop_fd: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

/// The parent's memory as it was when [`LiveMemory::begin`] returned it.
#[derive(Debug)]
pub struct Generation {
    live: Arc<LiveShared>,
    st: Arc<GenState>,
}

impl LiveMemory {
    /// Track `regions` (mappings of `file` in this process: `base` = host address, `offset` =
    /// file offset), which must be `MAP_SHARED` mappings of `file`.
    pub fn new(file: File, regions: Vec<Region>) -> Result<Self> {
        let len = file.metadata().map_err(sys("stat guest memory file"))?.len();
        for r in &regions {
            if !r.base.is_multiple_of(PAGE)
                || !r.len.is_multiple_of(PAGE)
                || !r.offset.is_multiple_of(PAGE)
                || r.len == 0
            {
                return Err(Error::InvalidArgument(format!("region {r:?} is not page aligned")));
            }
            if r.offset.checked_add(r.len).is_none_or(|e| e > len) {
                return Err(Error::InvalidArgument(format!("region {r:?} extends past the file ({len} bytes)")));
            }
        }
        let uffd = Uffd::new_wp().map_err(sys("userfaultfd for write-protect"))?;
        for r in &regions {
            uffd.register_mode(r.base, r.len, REGISTER_MODE_WP)
                .map_err(sys(format!("UFFDIO_REGISTER_MODE_WP {:#x}+{:#x}", r.base, r.len)))?;
        }
        uffd.ensure_nonblocking().map_err(sys("set O_NONBLOCK on the userfaultfd"))?;
        let shared = Arc::new(LiveShared {
            uffd,
            file,
            regions,
            len,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            gens: Mutex::new(Vec::new()),
            next_gen: AtomicU64::new(1),
            wp_faults: AtomicU64::new(0),
            pages_saved: AtomicU64::new(0),
            protected: AtomicBool::new(false),
            armed: Mutex::new(None),
            error: Mutex::new(None),
        });
        // SAFETY: eventfd takes plain integers and returns a new fd or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(sys("eventfd")(std::io::Error::last_os_error()));
        }
        // SAFETY: eventfd just returned this fd; we are its only owner.
        let stop_fd = unsafe { OwnedFd::from_raw_fd(efd) };
        let wake = stop_fd.try_clone().map_err(sys("dup eventfd"))?;
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("live-wp".into())
            .spawn(move || wp_thread(&s, &wake))
            .map_err(sys("spawn write-protect thread"))?;
        Ok(LiveMemory { shared, stop_fd, thread: Some(thread) })
    }

    /// Starts a generation: write-protects all tracked memory. Call it while nothing writes the
    /// memory (the parent's vCPUs and devices paused): the generation is the memory as it is now.
    pub fn begin(&self) -> Result<Arc<Generation>> {
        let s = &self.shared;
        if let Some(e) = lock(&s.error).clone() {
            return Err(Error::InvalidArgument(format!("write-protect tracking failed earlier: {e}")));
        }
        let mut gens = lock(&s.gens);
        let mut armed = lock(&s.armed);
        // Unarmed, only data is protected: a hole at the clone instant reads as zero for this
        // generation whatever the parent writes there later, so such writes need not be caught.
        // Armed, everything is protected but the pages written since the last generation.
        let (data, r) = match armed.as_mut() {
            Some(a) => {
                let r = reprotect(s, a);
                (a.data.clone(), r)
            }
            None => {
                let data = data_extents(&s.file, s.len);
                let r = protect(s, &data);
                (data, r)
            }
        };
        let st = Arc::new(GenState {
            id: s.next_gen.fetch_add(1, Relaxed),
            data,
            preserved: Mutex::new(HashMap::new()),
            broken: Mutex::new(None),
        });
        if let Err(e) = r {
            // Leave nothing half protected behind.
            if gens.is_empty() {
                *armed = None;
                unprotect_all(s);
            }
            return Err(sys("UFFDIO_WRITEPROTECT")(e));
        }
        drop(armed);
        s.protected.store(true, Relaxed);
        gens.push(st.clone());
        Ok(Arc::new(Generation { live: s.clone(), st }))
    }

    /// Write-protects the memory's data now (call it outside the parent's pause) and keeps it
    /// protected between generations: [`LiveMemory::begin`] then only re-protects the pages
    /// written since, and data that was a hole. The cost moves out of the pause: the parent
    /// takes one write fault per page it writes after each generation.
    pub fn arm(&self) -> Result<()> {
        let s = &self.shared;
        if let Some(e) = lock(&s.error).clone() {
            return Err(Error::InvalidArgument(format!("write-protect tracking failed earlier: {e}")));
        }
        let gens = lock(&s.gens);
        let mut armed = lock(&s.armed);
        if armed.is_some() {
            return Ok(());
        }
        let data = data_extents(&s.file, s.len);
        let all: Vec<(u64, u64)> = s.regions.iter().map(|r| (r.offset, r.offset + r.len)).collect();
        // Held while protecting: a page the write-protect thread lets go meanwhile is recorded
        // once this returns (it waits for the lock), before its write goes on. Holes are
        // protected too (shmem keeps a marker), so a write that makes new data is caught.
        if let Err(e) = protect(s, &all) {
            if gens.is_empty() {
                unprotect_all(s);
            }
            return Err(sys("UFFDIO_WRITEPROTECT")(e));
        }
        *armed = Some(Armed { data, written: Default::default() });
        s.protected.store(true, Relaxed);
        Ok(())
    }

    /// Counters now.
    pub fn stats(&self) -> LiveStats {
        let s = &self.shared;
        let gens = lock(&s.gens);
        LiveStats {
            active_generations: gens.len(),
            wp_faults: s.wp_faults.load(Relaxed),
            pages_saved: s.pages_saved.load(Relaxed),
            pages_held: gens.iter().map(|g| lock(&g.preserved).len() as u64).sum(),
            protected: s.protected.load(Relaxed),
        }
    }

    /// The first error of the write-protect thread, if any.
    pub fn error(&self) -> Option<String> {
        lock(&self.shared.error).clone()
    }

    /// Byte ranges of the file that hold data (not holes), in 1 MiB pieces: what a child needs
    /// to become independent of the parent (holes read as zero).
    pub fn data_ranges(&self) -> Vec<(u64, u32)> {
        pieces(&data_extents(&self.shared.file, self.shared.len))
    }
}

impl Drop for LiveMemory {
    fn drop(&mut self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a local array to our eventfd.
        let _ = unsafe { libc::write(self.stop_fd.as_raw_fd(), one.as_ptr().cast(), 8) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Data extents `[start, end)` of `file` (SEEK_DATA/SEEK_HOLE), merged, page aligned.
fn data_extents(file: &File, len: u64) -> Vec<(u64, u64)> {
    let fd = file.as_raw_fd();
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut off = 0u64;
    while off < len {
        // SAFETY: lseek on our own fd with plain integers.
        let data = unsafe { libc::lseek(fd, off as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no data after off
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let start = (data as u64) & !(PAGE - 1);
        let end = if hole < 0 { len } else { (hole as u64).min(len).div_ceil(PAGE) * PAGE }.min(len);
        match out.last_mut() {
            Some(last) if last.1 >= start => last.1 = last.1.max(end),
            _ if end > start => out.push((start, end)),
            _ => {}
        }
        off = end.max(start + PAGE);
    }
    out
}

/// Write-protects file ranges `[lo, hi)` through every region that maps them.
fn protect(s: &LiveShared, ranges: &[(u64, u64)]) -> std::io::Result<()> {
    for r in &s.regions {
        for &(a, b) in ranges {
            let (lo, hi) = (a.max(r.offset), b.min(r.offset + r.len));
            if lo < hi {
                s.uffd.writeprotect(r.base + (lo - r.offset), hi - lo, true, false)?;
            }
        }
    }
    Ok(())
}

/// Armed `begin`: re-protects the pages written since the last one; they count as data.
fn reprotect(s: &LiveShared, a: &mut Armed) -> std::io::Result<()> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &p in &a.written {
        let off = p * PAGE;
        match runs.last_mut() {
            Some(last) if last.1 == off => last.1 += PAGE,
            _ => runs.push((off, off + PAGE)),
        }
    }
    protect(s, &runs)?;
    a.data = union(&a.data, &runs);
    a.written.clear();
    Ok(())
}

/// The union of two sets of extents, sorted and merged.
fn union(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut all: Vec<(u64, u64)> = a.iter().chain(b).copied().collect();
    all.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (lo, hi) in all {
        match out.last_mut() {
            Some(last) if last.1 >= lo => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

/// Extents cut into pieces of at most 1 MiB (a working set for the prefetcher).
fn pieces(extents: &[(u64, u64)]) -> Vec<(u64, u32)> {
    let mut out = Vec::new();
    for &(a, b) in extents {
        let mut o = a;
        while o < b {
            let l = (b - o).min(1 << 20);
            out.push((o, l as u32));
            o += l;
        }
    }
    out
}

fn unprotect_all(s: &LiveShared) {
    for r in &s.regions {
        if let Err(e) = s.uffd.writeprotect(r.base, r.len, false, true) {
            tracing::error!("cannot drop write protection of {:#x}+{:#x}: {e}", r.base, r.len);
        }
    }
    s.protected.store(false, Relaxed);
}

fn record_error(s: &LiveShared, msg: String) {
    tracing::error!("{msg}");
    lock(&s.error).get_or_insert(msg);
}

/// Handles the parent's write faults until stopped. Whatever ends it, protection is dropped so
/// the parent can never be left blocked.
fn wp_thread(s: &LiveShared, stop_fd: &OwnedFd) {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| wp_loop(s, stop_fd)));
    if r.is_err() {
        record_error(s, "write-protect thread panicked".into());
    }
    for g in lock(&s.gens).iter() {
        lock(&g.broken).get_or_insert_with(|| "the parent's write-protect tracking stopped".into());
    }
    unprotect_all(s);
}

fn wp_loop(s: &LiveShared, stop_fd: &OwnedFd) {
    let mut events = Vec::with_capacity(64);
    loop {
        let mut fds = [
            libc::pollfd { fd: s.uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: stop_fd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: fds is a valid array of 2 pollfd for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return record_error(s, format!("poll on the write-protect userfaultfd: {e}"));
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[0].revents & (libc::POLLHUP | libc::POLLERR) != 0 {
            return record_error(s, "the write-protect userfaultfd hung up".into());
        }
        events.clear();
        loop {
            match s.uffd.read_events(&mut events) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) => return record_error(s, format!("read the write-protect userfaultfd: {e}")),
            }
        }
        for ev in events.drain(..) {
            if let Event::PageFault { flags, address, .. } = ev {
                s.wp_faults.fetch_add(1, Relaxed);
                if flags & PAGEFAULT_FLAG_WP == 0 {
                    tracing::warn!(address, flags, "unexpected missing-page fault on write-protected memory");
                }
                on_write(s, address & !(PAGE - 1));
            }
        }
    }
}

/// The parent is about to write the page at host address `addr`: save its old contents for
/// every generation without a copy, then let the write go.
fn on_write(s: &LiveShared, addr: u64) {
    let Some(r) = s.regions.iter().find(|r| addr >= r.base && addr < r.base + r.len) else {
        tracing::warn!(addr, "write-protect fault outside the tracked memory");
        return;
    };
    let off = r.offset + (addr - r.base);
    let page = off / PAGE;
    {
        let _g = lock(&s.stripes[page as usize % STRIPES]);
        let gens: Vec<Arc<GenState>> = lock(&s.gens).clone();
        let mut saved: Option<std::result::Result<Saved, String>> = None;
        for g in &gens {
            if g.is_hole(off) {
                continue; // it reads as zero for this generation whatever the parent writes
            }
            let mut m = lock(&g.preserved);
            if m.contains_key(&page) {
                continue;
            }
            let copy = saved.get_or_insert_with(|| read_page(&s.file, off));
            match copy {
                Ok(c) => {
                    m.insert(page, c.clone());
                    s.pages_saved.fetch_add(1, Relaxed);
                }
                Err(e) => {
                    lock(&g.broken).get_or_insert_with(|| format!("cannot preserve page {off:#x}: {e}"));
                }
            }
        }
        if let Some(a) = lock(&s.armed).as_mut() {
            a.written.insert(page);
        }
        if let Err(e) = s.uffd.writeprotect(addr, PAGE, false, true) {
            record_error(s, format!("cannot un-protect {addr:#x}: {e}"));
            let _ = s.uffd.wake(addr, PAGE);
        }
    }
}

fn read_page(file: &File, off: u64) -> std::result::Result<Saved, String> {
    let mut buf = vec![0u8; PAGE as usize];
    file.read_exact_at(&mut buf, off).map_err(|e| format!("pread: {e}"))?;
    Ok(if buf.iter().all(|&b| b == 0) { None } else { Some(buf.into()) })
}

impl GenState {
    /// True if the page at file offset `off` was a hole at this generation's instant.
    fn is_hole(&self, off: u64) -> bool {
        let i = self.data.partition_point(|&(_, end)| end <= off);
        self.data.get(i).is_none_or(|&(start, _)| off < start)
    }
}

impl Generation {
    /// The data of the parent's memory at this generation's instant, in pieces of at most
    /// 1 MiB: what a child needs to become independent (the rest reads as zero).
    pub fn data_ranges(&self) -> Vec<(u64, u32)> {
        pieces(&self.st.data)
    }

    /// The generation's number (1, 2, ... per [`LiveMemory`]).
    pub fn id(&self) -> u64 {
        self.st.id
    }

    /// Pages this generation holds a copy of.
    pub fn pages_held(&self) -> usize {
        lock(&self.st.preserved).len()
    }

    fn check(&self) -> Result<()> {
        match lock(&self.st.broken).clone() {
            Some(reason) => Err(Error::Source { offset: 0, len: 0, reason }),
            None => Ok(()),
        }
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        let s = &self.live;
        let mut gens = lock(&s.gens);
        gens.retain(|g| g.id != self.st.id);
        if gens.is_empty() && s.protected.load(Relaxed) && lock(&s.armed).is_none() {
            unprotect_all(s);
        }
    }
}

impl PageSource for Generation {
    fn len(&self) -> u64 {
        self.live.len
    }

    fn fill(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let s = &self.live;
        let blen = buf.len() as u64;
        if !offset.is_multiple_of(PAGE)
            || !blen.is_multiple_of(PAGE)
            || offset.checked_add(blen).is_none_or(|e| e > s.len)
        {
            return Err(Error::Source { offset, len: blen, reason: "not whole pages inside the memory".into() });
        }
        self.check()?;
        for (i, chunk) in buf.chunks_mut(FILL_CHUNK * PAGE as usize).enumerate() {
            let off = offset + (i * FILL_CHUNK) as u64 * PAGE;
            let first = off / PAGE;
            let n = chunk.len() as u64 / PAGE;
            let mut stripes: Vec<usize> = (first..first + n).map(|p| p as usize % STRIPES).collect();
            stripes.sort_unstable();
            stripes.dedup();
            // Ascending order: no deadlock between readers; the WP thread holds one at a time.
            let guards: Vec<MutexGuard<'_, ()>> = stripes.iter().map(|&k| lock(&s.stripes[k])).collect();
            s.file.read_exact_at(chunk, off).map_err(|e| Error::Source {
                offset: off,
                len: chunk.len() as u64,
                reason: format!("pread: {e}"),
            })?;
            {
                let m = lock(&self.st.preserved);
                for (k, page) in chunk.chunks_mut(PAGE as usize).enumerate() {
                    let p = first + k as u64;
                    if self.st.is_hole(p * PAGE) {
                        page.fill(0);
                        continue;
                    }
                    match m.get(&p) {
                        Some(Some(old)) => page.copy_from_slice(old),
                        Some(None) => page.fill(0),
                        None => {}
                    }
                }
            }
            drop(guards);
        }
        // A copy that failed while we read makes what we read suspect.
        self.check()
    }

    fn is_zero(&self, offset: u64, len: u64) -> bool {
        if len == 0 || self.check().is_err() {
            return false;
        }
        // Zero at the clone instant: no data extent of the generation meets the range.
        let end = offset.saturating_add(len);
        let i = self.st.data.partition_point(|&(_, e)| e <= offset);
        self.st.data.get(i).is_none_or(|&(start, _)| start >= end)
    }
}
