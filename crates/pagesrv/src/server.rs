//! The fault-serving thread, the prefetch thread and their shared state.
//!
//! ## Failure policy
//!
//! If the source cannot produce a page (corrupt chunk, I/O error), the
//! server never copies anything for it. It retries the faulting page alone;
//! if that fails too it places a *poison* marker on that page with
//! `UFFDIO_POISON` (Linux >= 6.6), which wakes the faulting thread and makes
//! the access raise SIGBUS (a kernel access such as `read(2)`/`write(2)` into
//! it gets EFAULT; a KVM vCPU gets an hwpoison exit/signal). Other pages keep
//! being served. If poisoning is not possible, the faulting thread is sent
//! SIGBUS with `tgkill(owner_pid, tid)` (needs `UFFD_FEATURE_THREAD_ID`),
//! else `kill(owner_pid, SIGBUS)`. The error is kept in
//! [`PageServer::error`] and counted in the stats.
//!
//! If the fault thread itself dies (a panicking source) or the uffd fails,
//! the server *fails stop*: every page not yet served is poisoned, so the
//! blocked thread and all later accesses to unserved memory get SIGBUS.
//!
//! ## Stopping
//!
//! [`PageServer::stop`] ends both threads and closes the uffd. Pages not yet
//! served then behave like fresh anonymous memory (zero), so stop the server
//! only when the region is fully resident or no longer used, or call
//! [`PageServer::poison_unserved`] first to make later accesses SIGBUS.

use std::cell::RefCell;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::bitmap::Bitmap;
use crate::error::{sys, Error, Result};
use crate::source::PageSource;
use crate::stats::{Stats, StatsSnapshot};
use crate::uffd::{features, Event, Fill, Uffd};
use crate::wset::WorkingSet;

/// A guest memory region mapped in the faulting process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Host virtual address of the start (page aligned).
    pub base: u64,
    /// Length in bytes (whole pages).
    pub len: u64,
    /// Offset of the region's first byte in the [`PageSource`].
    pub offset: u64,
}

/// What a page dropped by `madvise(MADV_DONTNEED)` reads as when touched again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RemovePolicy {
    /// Zero, like ordinary anonymous memory (what Firecracker's balloon expects).
    #[default]
    Zero,
    /// The source content again.
    Source,
}

/// Server configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Page size of the regions (4 KiB for anonymous memory).
    pub page_size: usize,
    /// Bytes served per fault: the aligned block around the fault (e.g.
    /// 4 KiB = single page, 64 KiB, 256 KiB, 2 MiB), clipped to the region
    /// and to pages not yet present.
    pub batch: usize,
    /// Record the first-touch order of blocks (see [`PageServer::working_set`]).
    /// The recorded unit is the `batch` block, so record with a small batch
    /// (e.g. 4 KiB) to get an exact working set.
    pub record: bool,
    /// Prefetch these ranges in a background thread (REAP).
    pub prefetch: Option<WorkingSet>,
    /// How to serve pages after `UFFD_EVENT_REMOVE`.
    pub remove_policy: RemovePolicy,
    /// Process owning the regions, for SIGBUS if poisoning is unavailable.
    pub owner_pid: Option<i32>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            page_size: 4096,
            batch: 64 << 10,
            record: false,
            prefetch: None,
            remove_policy: RemovePolicy::Zero,
            owner_pid: None,
        }
    }
}

#[derive(Debug)]
struct RegionState {
    r: Region,
    pages: usize,
    present: Bitmap,
    removed: Bitmap,
    recorded: Bitmap,
}

#[derive(Debug)]
struct Shared {
    uffd: Uffd,
    regions: Vec<RegionState>,
    source: Arc<dyn PageSource>,
    cfg: ServerConfig,
    stats: Stats,
    stop: AtomicBool,
    error: Mutex<Option<String>>,
    recorded: Mutex<Vec<(u64, u32)>>,
    prefetch_time: Mutex<Option<Duration>>,
    started: Instant,
}

/// A running page server (one fault thread, optionally one prefetch thread).
#[derive(Debug)]
pub struct PageServer {
    shared: Arc<Shared>,
    stop_fd: OwnedFd,
    fault_thread: Option<JoinHandle<()>>,
    prefetch_thread: Option<JoinHandle<()>>,
}

enum Outcome {
    Ok,
    Retry,
}

thread_local! {
    static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl PageServer {
    /// Create a uffd (features `EVENT_REMOVE`, `THREAD_ID`, `POISON` where
    /// available), register `regions` of this process and start serving.
    pub fn register(
        regions: Vec<Region>,
        source: Arc<dyn PageSource>,
        mut cfg: ServerConfig,
    ) -> Result<Self> {
        let uffd = Uffd::new(
            features::EVENT_REMOVE | features::THREAD_ID | features::POISON,
            0,
        )
        .map_err(sys("userfaultfd"))?;
        for r in &regions {
            uffd.register(r.base, r.len)
                .map_err(sys(format!("UFFDIO_REGISTER {:#x}+{:#x}", r.base, r.len)))?;
        }
        // SAFETY: getpid has no preconditions.
        cfg.owner_pid.get_or_insert(unsafe { libc::getpid() });
        Self::start(uffd, regions, source, cfg)
    }

    /// Serve faults of `regions`, already registered on `uffd` (e.g. by
    /// Firecracker, see [`crate::fc`]).
    pub fn start(
        uffd: Uffd,
        regions: Vec<Region>,
        source: Arc<dyn PageSource>,
        cfg: ServerConfig,
    ) -> Result<Self> {
        let ps = cfg.page_size;
        if !ps.is_power_of_two() || ps < 4096 {
            return Err(Error::InvalidArgument(format!("page size {ps}")));
        }
        if cfg.batch < ps || !cfg.batch.is_power_of_two() {
            return Err(Error::InvalidArgument(format!(
                "batch {} must be a power of two >= page size {ps}",
                cfg.batch
            )));
        }
        let mut states = Vec::new();
        for r in regions {
            let ps64 = ps as u64;
            if r.base % ps64 != 0 || r.len % ps64 != 0 || r.offset % ps64 != 0 || r.len == 0 {
                return Err(Error::InvalidArgument(format!(
                    "region {r:?} is not aligned to {ps}"
                )));
            }
            if r.offset.checked_add(r.len).is_none_or(|e| e > source.len()) {
                return Err(Error::InvalidArgument(format!(
                    "region {r:?} extends past the source ({} bytes)",
                    source.len()
                )));
            }
            let pages = (r.len / ps64) as usize;
            states.push(RegionState {
                r,
                pages,
                present: Bitmap::new(pages),
                removed: Bitmap::new(pages),
                recorded: Bitmap::new(pages.div_ceil(cfg.batch / ps)),
            });
        }
        // SAFETY: eventfd takes plain integers and returns a new fd or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(sys("eventfd")(std::io::Error::last_os_error()));
        }
        // SAFETY: eventfd just returned this fd; we are its only owner.
        let stop_fd = unsafe { OwnedFd::from_raw_fd(efd) };
        let wake_fd = stop_fd.try_clone().map_err(sys("dup eventfd"))?;
        let prefetch = cfg.prefetch.clone();
        let shared = Arc::new(Shared {
            uffd,
            regions: states,
            source,
            cfg,
            stats: Stats::default(),
            stop: AtomicBool::new(false),
            error: Mutex::new(None),
            recorded: Mutex::new(Vec::new()),
            prefetch_time: Mutex::new(None),
            started: Instant::now(),
        });
        let s = shared.clone();
        let fault_thread = std::thread::Builder::new()
            .name("pagesrv-fault".into())
            .spawn(move || fault_thread(&s, &wake_fd))
            .map_err(sys("spawn fault thread"))?;
        let prefetch_thread = match prefetch {
            Some(ws) if !ws.ranges.is_empty() => {
                let s = shared.clone();
                Some(
                    std::thread::Builder::new()
                        .name("pagesrv-prefetch".into())
                        .spawn(move || prefetch_loop(&s, &ws))
                        .map_err(sys("spawn prefetch thread"))?,
                )
            }
            _ => None,
        };
        Ok(PageServer {
            shared,
            stop_fd,
            fault_thread: Some(fault_thread),
            prefetch_thread,
        })
    }

    /// Counters and latency quantiles so far.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// The first source error seen, if any.
    pub fn error(&self) -> Option<String> {
        self.shared.error.lock().ok().and_then(|e| e.clone())
    }

    /// Blocks first touched by faults so far, in order (if `record` is on).
    pub fn working_set(&self) -> WorkingSet {
        WorkingSet {
            page_size: self.shared.cfg.page_size as u32,
            ranges: self
                .shared
                .recorded
                .lock()
                .map(|r| r.clone())
                .unwrap_or_default(),
        }
    }

    /// Pages currently known to be present.
    pub fn resident_pages(&self) -> usize {
        self.shared.regions.iter().map(|r| r.present.count()).sum()
    }

    /// Wait for the prefetch thread; returns how long prefetching took.
    pub fn wait_prefetch(&mut self) -> Option<Duration> {
        if let Some(h) = self.prefetch_thread.take() {
            let _ = h.join();
        }
        self.shared.prefetch_time.lock().ok().and_then(|t| *t)
    }

    /// Poison every page not yet served so that later accesses raise
    /// SIGBUS instead of reading zeros once the uffd is closed. Returns the
    /// number of pages poisoned.
    pub fn poison_unserved(&self) -> Result<u64> {
        poison_unserved(&self.shared)
    }

    /// Stop both threads and close the uffd. Returns the final stats.
    pub fn stop(mut self) -> StatsSnapshot {
        self.shutdown();
        self.shared.stats.snapshot()
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Relaxed);
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a local array to our eventfd.
        let _ = unsafe { libc::write(self.stop_fd.as_raw_fd(), one.as_ptr().cast(), 8) };
        if let Some(h) = self.prefetch_thread.take() {
            let _ = h.join();
        }
        if let Some(h) = self.fault_thread.take() {
            let _ = h.join();
        }
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn poison_unserved(s: &Shared) -> Result<u64> {
    let ps = s.cfg.page_size as u64;
    let mut n = 0;
    for rs in &s.regions {
        let mut p = 0;
        while p < rs.pages {
            if rs.present.get(p) {
                p += 1;
                continue;
            }
            let lo = p;
            while p < rs.pages && !rs.present.get(p) {
                p += 1;
            }
            let (start, len) = (rs.r.base + lo as u64 * ps, (p - lo) as u64 * ps);
            let mut done = 0;
            while done < len {
                match s
                    .uffd
                    .poison(start + done, len - done)
                    .map_err(sys("UFFDIO_POISON"))?
                {
                    Fill::Done => done = len,
                    Fill::Partial(k) => done += k,
                    Fill::Exists | Fill::Again => done += ps,
                    Fill::Gone => return Ok(n),
                }
            }
            rs.present.set_range(lo, p);
            n += (p - lo) as u64;
        }
    }
    s.stats.pages_poisoned.fetch_add(n, Relaxed);
    Ok(n)
}

/// The fault thread: serve until stopped. If serving panics (a buggy
/// [`PageSource`]) or the uffd fails, fail stop: poison every unserved
/// page, so blocked and future accesses get SIGBUS rather than hanging.
fn fault_thread(s: &Shared, stop_fd: &OwnedFd) {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fault_loop(s, stop_fd)));
    let failed = match r {
        Err(_) => {
            record_error(s, "fault thread panicked; poisoning unserved pages".into());
            true
        }
        Ok(clean) => !clean,
    };
    if failed {
        match poison_unserved(s) {
            Ok(n) => tracing::error!(pages = n, "page server failed; unserved pages poisoned"),
            Err(e) => tracing::error!("page server failed and could not poison: {e}"),
        }
    }
}

/// Returns true on a requested stop, false on a fatal error.
fn fault_loop(s: &Shared, stop_fd: &OwnedFd) -> bool {
    let mut events = Vec::with_capacity(64);
    let mut retry: Vec<(u64, u32)> = Vec::new();
    while !s.stop.load(Relaxed) {
        let mut fds = [
            libc::pollfd {
                fd: s.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop_fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let timeout = if retry.is_empty() { 1000 } else { 1 };
        // SAFETY: fds is a valid array of 2 pollfd for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            record_error(s, format!("poll on userfaultfd: {e}"));
            return false;
        }
        if fds[1].revents != 0 || s.stop.load(Relaxed) {
            return true;
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLHUP) != 0 {
            tracing::warn!("userfaultfd hung up; fault thread exits");
            return true;
        }
        events.clear();
        loop {
            match s.uffd.read_events(&mut events) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) => {
                    record_error(s, format!("read userfaultfd: {e}"));
                    return false;
                }
            }
        }
        let pending = std::mem::take(&mut retry);
        for (address, tid) in pending {
            if let Outcome::Retry = serve_fault(s, address, tid, false) {
                retry.push((address, tid));
            }
        }
        for ev in events.drain(..) {
            match ev {
                Event::PageFault { address, tid, .. } => {
                    let t0 = Instant::now();
                    s.stats.faults.fetch_add(1, Relaxed);
                    match serve_fault(s, address, tid, true) {
                        Outcome::Ok => s.stats.fault_latency.record(t0.elapsed()),
                        Outcome::Retry => retry.push((address, tid)),
                    }
                }
                Event::Remove { start, end } | Event::Unmap { start, end } => {
                    s.stats.removes.fetch_add(1, Relaxed);
                    on_remove(s, start, end);
                }
                Event::Other(e) => tracing::debug!(event = e, "ignored userfaultfd event"),
            }
        }
    }
    true
}

fn on_remove(s: &Shared, start: u64, end: u64) {
    let ps = s.cfg.page_size as u64;
    for rs in &s.regions {
        let lo = start.max(rs.r.base);
        let hi = end.min(rs.r.base + rs.r.len);
        if lo >= hi {
            continue;
        }
        let (a, b) = (
            ((lo - rs.r.base) / ps) as usize,
            ((hi - rs.r.base).div_ceil(ps)) as usize,
        );
        rs.present.clear_range(a, b);
        if s.cfg.remove_policy == RemovePolicy::Zero {
            rs.removed.set_range(a, b);
        }
    }
}

fn record_error(s: &Shared, msg: String) {
    tracing::error!("{msg}");
    s.error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert(msg);
}

/// Serve the fault at `address`. `first` is false for retries.
fn serve_fault(s: &Shared, address: u64, tid: u32, first: bool) -> Outcome {
    let ps = s.cfg.page_size as u64;
    let Some(rs) = s
        .regions
        .iter()
        .find(|r| address >= r.r.base && address < r.r.base + r.r.len)
    else {
        tracing::warn!(address, "fault outside every region");
        return Outcome::Ok;
    };
    let page_addr = address & !(ps - 1);
    let p = ((page_addr - rs.r.base) / ps) as usize;
    if rs.present.get(p) {
        // Raced with the prefetcher (or a retry): make sure the thread runs.
        s.stats.faults_already_present.fetch_add(1, Relaxed);
        let _ = s.uffd.wake(page_addr, ps);
        return Outcome::Ok;
    }
    if rs.removed.get(p) {
        return match s.uffd.zeropage(page_addr, ps) {
            Ok(Fill::Again) => Outcome::Retry,
            Ok(_) => {
                rs.removed.clear_range(p, p + 1);
                rs.present.set_range(p, p + 1);
                s.stats.pages_zeroed.fetch_add(1, Relaxed);
                let _ = s.uffd.wake(page_addr, ps);
                Outcome::Ok
            }
            Err(e) => {
                record_error(s, format!("UFFDIO_ZEROPAGE at {page_addr:#x}: {e}"));
                fail_page(s, page_addr, tid);
                Outcome::Ok
            }
        };
    }
    // The aligned block around the fault, shrunk to the run of missing pages.
    let bs = s.cfg.batch / s.cfg.page_size;
    let block = p / bs;
    let (start, end) = (block * bs, (block * bs + bs).min(rs.pages));
    let missing = |i: usize| !rs.present.get(i) && !rs.removed.get(i);
    let mut lo = p;
    while lo > start && missing(lo - 1) {
        lo -= 1;
    }
    let mut hi = p + 1;
    while hi < end && missing(hi) {
        hi += 1;
    }
    if first && s.cfg.record && rs.recorded.test_and_set(block) {
        if let Ok(mut r) = s.recorded.lock() {
            let off = rs.r.offset + start as u64 * ps;
            let len = ((end - start) as u64 * ps) as u32;
            // Coalesce with the previous block when they are adjacent.
            match r.last_mut() {
                Some(last)
                    if last.0 + u64::from(last.1) == off
                        && u64::from(last.1) + u64::from(len) <= 64 << 20 =>
                {
                    last.1 += len
                }
                _ => r.push((off, len)),
            }
        }
    }
    match place(s, rs, lo, hi, false) {
        Ok(Outcome::Retry) => Outcome::Retry,
        Ok(Outcome::Ok) => {
            if !rs.present.get(p) {
                let _ = s.uffd.wake(page_addr, ps);
            }
            Outcome::Ok
        }
        Err(e) => {
            s.stats.source_errors.fetch_add(1, Relaxed);
            record_error(s, e.to_string());
            // Try the faulting page alone before giving up on it.
            if hi - lo > 1 {
                if let Ok(Outcome::Ok) = place(s, rs, p, p + 1, false) {
                    return Outcome::Ok;
                }
            }
            fail_page(s, page_addr, tid);
            Outcome::Ok
        }
    }
}

/// Make the access to `page_addr` fail instead of hanging: poison it, or
/// send SIGBUS to the faulting thread.
fn fail_page(s: &Shared, page_addr: u64, tid: u32) {
    let ps = s.cfg.page_size as u64;
    match s.uffd.poison(page_addr, ps) {
        Ok(Fill::Done | Fill::Partial(_) | Fill::Exists) => {
            s.stats.pages_poisoned.fetch_add(1, Relaxed);
            return;
        }
        Ok(other) => tracing::warn!(?other, "UFFDIO_POISON did not apply"),
        Err(e) => tracing::warn!("UFFDIO_POISON unavailable: {e}"),
    }
    match (s.cfg.owner_pid, tid) {
        (Some(pid), t) if t != 0 => {
            // SAFETY: tgkill takes plain integers; worst case it fails with ESRCH.
            let _ = unsafe { libc::syscall(libc::SYS_tgkill, pid, t as i32, libc::SIGBUS) };
        }
        (Some(pid), _) => {
            // SAFETY: kill takes plain integers.
            let _ = unsafe { libc::kill(pid, libc::SIGBUS) };
        }
        (None, _) => tracing::error!(
            page_addr,
            "cannot fail the faulting thread: no poison support and no owner pid"
        ),
    }
}

/// Fill pages `[lo, hi)` of a region from the source and place them with
/// as few ioctls as possible. `Err` means the source failed (nothing placed).
fn place(s: &Shared, rs: &RegionState, lo: usize, hi: usize, prefetch: bool) -> Result<Outcome> {
    let ps = s.cfg.page_size;
    let len = (hi - lo) * ps;
    let off = rs.r.offset + (lo * ps) as u64;
    let dst = rs.r.base + (lo * ps) as u64;
    let zero = s.source.is_zero(off, len as u64);
    BUF.with(|b| {
        let mut buf = b.borrow_mut();
        if !zero {
            if buf.len() < len {
                buf.resize(len, 0);
            }
            s.source.fill(off, &mut buf[..len])?;
        }
        let mut pos = 0usize;
        while pos < len {
            let r = if zero {
                s.uffd.zeropage(dst + pos as u64, (len - pos) as u64)
            } else {
                s.uffd.copy(dst + pos as u64, &buf[pos..len])
            }
            .map_err(sys(format!(
                "UFFDIO_COPY/ZEROPAGE at {:#x}",
                dst + pos as u64
            )))?;
            let done = match r {
                Fill::Done => len - pos,
                Fill::Partial(n) => n as usize / ps * ps,
                Fill::Exists => {
                    s.stats.eexist.fetch_add(1, Relaxed);
                    rs.present.set_range(lo + pos / ps, lo + pos / ps + 1);
                    pos += ps;
                    continue;
                }
                Fill::Again => return Ok(Outcome::Retry),
                Fill::Gone => return Ok(Outcome::Ok),
            };
            if done == 0 {
                return Ok(Outcome::Retry);
            }
            let pages = (done / ps) as u64;
            rs.present.set_range(lo + pos / ps, lo + (pos + done) / ps);
            s.stats.copies.fetch_add(1, Relaxed);
            if zero {
                s.stats.pages_zeroed.fetch_add(pages, Relaxed);
            } else {
                s.stats.pages_copied.fetch_add(pages, Relaxed);
            }
            if prefetch {
                s.stats.pages_prefetched.fetch_add(pages, Relaxed);
            }
            pos += done;
        }
        Ok(Outcome::Ok)
    })
}

fn prefetch_loop(s: &Shared, ws: &WorkingSet) {
    let t0 = Instant::now();
    let ps = s.cfg.page_size as u64;
    for &(off, len) in &ws.ranges {
        if s.stop.load(Relaxed) {
            return;
        }
        let end = off + u64::from(len);
        for rs in &s.regions {
            let lo = off.max(rs.r.offset);
            let hi = end.min(rs.r.offset + rs.r.len);
            if lo >= hi {
                continue;
            }
            let (a, b) = (
                ((lo - rs.r.offset) / ps) as usize,
                ((hi - rs.r.offset).div_ceil(ps)) as usize,
            );
            let mut p = a;
            while p < b {
                if rs.present.get(p) || rs.removed.get(p) {
                    p += 1;
                    continue;
                }
                let q0 = p;
                while p < b && !rs.present.get(p) && !rs.removed.get(p) {
                    p += 1;
                }
                let mut tries = 0;
                loop {
                    match place(s, rs, q0, p, true) {
                        Ok(Outcome::Retry) if tries < 100 && !s.stop.load(Relaxed) => {
                            tries += 1;
                            std::thread::sleep(Duration::from_micros(100));
                        }
                        Ok(_) => break,
                        Err(e) => {
                            // Not fatal here: a fault on these pages will
                            // retry and fail the faulting thread if needed.
                            tracing::warn!("prefetch: {e}");
                            break;
                        }
                    }
                }
            }
        }
    }
    if let Ok(mut t) = s.prefetch_time.lock() {
        *t = Some(t0.elapsed());
    }
    tracing::debug!(elapsed = ?t0.elapsed(), since_start = ?s.started.elapsed(), "prefetch done");
}
