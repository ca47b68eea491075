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
//! else `kill(owner_pid, SIGBUS)`. A server without an owner (serving another
//! VMM, e.g. a Firecracker, whose processes it must never signal) instead
//! *halts*: it stops serving that VM, whose blocked vCPUs stay blocked (the VM
//! is stopped, never fed garbage), and ends with [`Ended::Halted`]. The error
//! is kept in [`PageServer::error`] and counted in the stats.
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

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::bitmap::Bitmap;
use crate::error::{sys, Error, Result};
use crate::fault;
pub use crate::monitor::Monitor;
use crate::prefetch;
use crate::source::PageSource;
use crate::stats::{Stats, StatsSnapshot};
use crate::uffd::{features, Uffd};
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
    /// Threads prefetching in parallel (1 = in recorded order, one thread).
    pub prefetch_threads: usize,
    /// How to serve pages after `UFFD_EVENT_REMOVE`.
    pub remove_policy: RemovePolicy,
    /// Process owning the regions, for SIGBUS if poisoning is unavailable.
    pub owner_pid: Option<i32>,
    /// Called with the reason just *before* a page is poisoned (or the
    /// faulting thread signalled) because it cannot be served, and before
    /// a failing server poisons everything unserved. A VMM stops its vCPUs
    /// here: a hypervisor may not turn a poisoned page into an error the
    /// guest cannot ignore (KVM on some hosts reports it as an MMIO access).
    pub on_failure: Option<FailureHook>,
    /// Use `UFFDIO_POISON` for pages that cannot be served (false only to
    /// exercise the fallback of kernels older than 6.6).
    pub poison: bool,
}

/// Why a fault thread ended (see [`Monitor::ended`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// [`PageServer::stop`] was called.
    Stopped,
    /// The faulting process's address space is gone (it exited).
    PeerGone,
    /// The userfaultfd reported a hang-up.
    HungUp,
    /// A page could not be served nor poisoned and the server has no owner
    /// to signal: it stopped serving this VM (see the module docs).
    Halted(String),
    /// The fault thread failed (panic, uffd error); unserved pages were poisoned.
    Failed(String),
}

/// See [`ServerConfig::on_failure`]. Runs on the fault thread: keep it short.
#[derive(Clone)]
pub struct FailureHook(pub Arc<dyn Fn(&str) + Send + Sync>);

impl std::fmt::Debug for FailureHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FailureHook")
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            page_size: 4096,
            batch: 64 << 10,
            record: false,
            prefetch: None,
            prefetch_threads: 1,
            remove_policy: RemovePolicy::Zero,
            owner_pid: None,
            on_failure: None,
            poison: true,
        }
    }
}

#[derive(Debug)]
pub(crate) struct RegionState {
    pub(crate) r: Region,
    pub(crate) pages: usize,
    pub(crate) present: Bitmap,
    pub(crate) removed: Bitmap,
    pub(crate) recorded: Bitmap,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) uffd: Uffd,
    pub(crate) regions: Vec<RegionState>,
    pub(crate) source: Arc<dyn PageSource>,
    pub(crate) cfg: ServerConfig,
    pub(crate) stats: Stats,
    pub(crate) stop: AtomicBool,
    pub(crate) error: Mutex<Option<String>>,
    pub(crate) recorded: Mutex<Vec<(u64, u32)>>,
    pub(crate) prefetch_time: Mutex<Option<Duration>>,
    pub(crate) started: Instant,
    /// Set by the fault path when the peer's address space is gone (ESRCH).
    pub(crate) peer_gone: AtomicBool,
    /// Set (with the reason) when a page could be neither served nor failed.
    pub(crate) halt: Mutex<Option<String>>,
    pub(crate) ended: Mutex<Option<Ended>>,
    /// Written once when the fault thread ends, whatever the reason.
    pub(crate) done_fd: OwnedFd,
}

/// A running page server (one fault thread, optionally one prefetch thread).
#[derive(Debug)]
pub struct PageServer {
    shared: Arc<Shared>,
    stop_fd: OwnedFd,
    fault_thread: Option<JoinHandle<()>>,
    prefetch_thread: Option<JoinHandle<()>>,
}

pub(crate) enum Outcome {
    Ok,
    Retry,
}

impl PageServer {
    /// Create a uffd (features `EVENT_REMOVE`, `THREAD_ID`, `POISON` where
    /// available), register `regions` of this process and start serving.
    pub fn register(regions: Vec<Region>, source: Arc<dyn PageSource>, mut cfg: ServerConfig) -> Result<Self> {
        let uffd = Uffd::new(features::EVENT_REMOVE | features::THREAD_ID | features::POISON, 0)
            .map_err(sys("userfaultfd"))?;
        for r in &regions {
            uffd.register(r.base, r.len).map_err(sys(format!("UFFDIO_REGISTER {:#x}+{:#x}", r.base, r.len)))?;
        }
        // SAFETY: getpid has no preconditions.
        cfg.owner_pid.get_or_insert(unsafe { libc::getpid() });
        Self::start(uffd, regions, source, cfg)
    }

    /// Serve faults of `regions`, already registered on `uffd` (e.g. by
    /// Firecracker, see [`crate::fc`]).
    pub fn start(uffd: Uffd, regions: Vec<Region>, source: Arc<dyn PageSource>, cfg: ServerConfig) -> Result<Self> {
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
                return Err(Error::InvalidArgument(format!("region {r:?} is not aligned to {ps}")));
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
        let stop_fd = new_eventfd()?;
        let wake_fd = stop_fd.try_clone().map_err(sys("dup eventfd"))?;
        uffd.ensure_nonblocking().map_err(sys("set O_NONBLOCK on the userfaultfd"))?;
        let done_fd = new_eventfd()?;
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
            peer_gone: AtomicBool::new(false),
            halt: Mutex::new(None),
            ended: Mutex::new(None),
            done_fd,
        });
        let s = shared.clone();
        let fault_thread = std::thread::Builder::new()
            .name("pagesrv-fault".into())
            .spawn(move || fault::fault_thread(&s, &wake_fd))
            .map_err(sys("spawn fault thread"))?;
        let prefetch_thread = match prefetch {
            Some(ws) if !ws.ranges.is_empty() => {
                let s = shared.clone();
                Some(
                    std::thread::Builder::new()
                        .name("pagesrv-prefetch".into())
                        .spawn(move || prefetch::prefetch_loop(&s, &ws))
                        .map_err(sys("spawn prefetch thread"))?,
                )
            }
            _ => None,
        };
        Ok(PageServer { shared, stop_fd, fault_thread: Some(fault_thread), prefetch_thread })
    }

    /// A cheap, cloneable read-only view of this server (error, stats,
    /// working set), for threads that must not own the server.
    pub fn monitor(&self) -> Monitor {
        Monitor { shared: self.shared.clone() }
    }

    /// Counters and latency quantiles so far.
    pub fn stats(&self) -> StatsSnapshot {
        self.monitor().stats()
    }

    /// The first source error seen, if any.
    pub fn error(&self) -> Option<String> {
        self.monitor().error()
    }

    /// Blocks first touched by faults so far, in order (if `record` is on).
    pub fn working_set(&self) -> WorkingSet {
        self.monitor().working_set()
    }

    /// Pages currently known to be present.
    pub fn resident_pages(&self) -> usize {
        self.monitor().resident_pages()
    }

    /// Wait for the prefetch thread; returns how long prefetching took.
    pub fn wait_prefetch(&mut self) -> Option<Duration> {
        if let Some(h) = self.prefetch_thread.take() {
            let _ = h.join();
        }
        self.shared.prefetch_time.lock().ok().and_then(|t| *t)
    }

    /// Place every page not yet present, from the calling thread, in
    /// chunks of up to 2 MiB (e.g. to finish a lazy restore and release the
    /// source). Returns the pages placed; the first source error fails it.
    pub fn fill_remaining(&self) -> Result<u64> {
        let s = &self.shared;
        let before = s.stats.pages_copied.load(Relaxed) + s.stats.pages_zeroed.load(Relaxed);
        let ranges: Vec<(u64, u32)> = s
            .regions
            .iter()
            .flat_map(|rs| {
                let end = rs.r.offset + rs.r.len;
                (rs.r.offset..end).step_by(2 << 20).map(move |o| (o, (end - o).min(2 << 20) as u32))
            })
            .collect();
        if let Some(e) = prefetch::fetch_ranges(s, &ranges, false) {
            return Err(Error::Source { offset: 0, len: 0, reason: e });
        }
        let after = s.stats.pages_copied.load(Relaxed) + s.stats.pages_zeroed.load(Relaxed);
        Ok(after - before)
    }

    /// Poison every page not yet served so that later accesses raise
    /// SIGBUS instead of reading zeros once the uffd is closed. Returns the
    /// number of pages poisoned.
    pub fn poison_unserved(&self) -> Result<u64> {
        fault::poison_unserved(&self.shared)
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

fn new_eventfd() -> Result<OwnedFd> {
    // SAFETY: eventfd takes plain integers and returns a new fd or -1.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if efd < 0 {
        return Err(sys("eventfd")(std::io::Error::last_os_error()));
    }
    // SAFETY: eventfd just returned this fd; we are its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(efd) })
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}
