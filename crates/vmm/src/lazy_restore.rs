//! Waking a hibernated VM: lazy restore through the userfaultfd page server.
//!
//! Guest memory is created anonymous and untouched, registered with a [`PageServer`] whose
//! source is the hibernated image in the chunk store, and the VM is rebuilt from its state and
//! resumed at once; pages arrive on first touch (in aligned batches) or ahead of it when a
//! working set recorded by an earlier wake is prefetched (REAP). The [`WakeHandle`] keeps the
//! server alive and reports what it did.
//!
//! Failure: when the server cannot produce a page (corrupt or missing chunk, unreadable store)
//! it first stops the VM with [`crate::ExitReason::Error`] (its failure hook), then poisons the
//! page. The stop must come first: on this project's PVM hosts KVM turns a poisoned guest page
//! into an MMIO access that reads 0xff, which the guest would silently consume. Where KVM
//! instead sends the vCPU thread SIGBUS, [`crate::memory_failure`] keeps that from killing the
//! process. A page the restore itself needs (the generation page) fails the wake.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use chunkstore::Store;
use pagesrv::{ChunkSource, FailureHook, Monitor, PageServer, PageSource, Region, ServerConfig, WorkingSet};
use serde::{Deserialize, Serialize};

use crate::arch::layout::GEN_PAGE;
use crate::hibernate::{hio, ms, read_record, store_err, HibernationRecord, WSET_FILE};
use crate::memory_failure::{self, Watch};
use crate::microvm::MicroVm;
use crate::snapshot::{parts_from_state, STATE_FILE};
use crate::vcpu_thread::{Control, ExitReason, Want};
use crate::vstate::memory::{Backing, GuestMem};
use crate::Error;

/// Whether a wake records its working set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Record {
    /// Record when the directory has no working set yet (the first wake).
    #[default]
    Auto,
    Always,
    Never,
}

/// Options of [`MicroVm::wake`].
pub struct WakeOptions {
    /// Bytes served per fault (aligned block around it): 4 KiB ..= 2 MiB, a power of two.
    pub batch: usize,
    /// Prefetch the recorded working set, if the directory has one.
    pub prefetch: bool,
    /// Threads prefetching it in parallel.
    pub prefetch_threads: usize,
    pub record: Record,
    /// Save the recorded working set this long after resume (also saved by
    /// [`WakeHandle::save_working_set`] and when the handle is dropped).
    pub record_for: Duration,
    /// Leave the VM paused.
    pub paused: bool,
    pub track_dirty: bool,
    /// The VM's memory size must be this.
    pub expect_mem: Option<u64>,
    pub console_mirror: Option<Box<dyn std::io::Write + Send>>,
}

impl Default for WakeOptions {
    fn default() -> Self {
        WakeOptions {
            batch: 64 << 10,
            prefetch: true,
            prefetch_threads: 2,
            record: Record::Auto,
            record_for: Duration::from_secs(2),
            paused: false,
            track_dirty: false,
            expect_mem: None,
            console_mirror: None,
        }
    }
}

impl std::fmt::Debug for WakeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WakeOptions")
            .field("batch", &self.batch)
            .field("prefetch", &self.prefetch)
            .field("record", &self.record)
            .field("paused", &self.paused)
            .finish_non_exhaustive()
    }
}

/// How a wake went until resume. Times in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WakeReport {
    pub image: String,
    pub mem_size: u64,
    /// Reading state and record, opening the store and the manifest.
    pub open_ms: f64,
    /// Creating memory and starting the page server.
    pub server_ms: f64,
    /// Building the KVM VM from the state.
    pub build_ms: f64,
    /// From the start of the wake until the vCPUs run (or are parked, if `paused`).
    pub total_ms: f64,
    /// Bytes of the working set being prefetched (0: none).
    pub prefetch_bytes: u64,
    /// This wake records its working set.
    pub recording: bool,
}

/// Page server counters of a woken VM.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WakeStats {
    pub faults: u64,
    pub pages_served: u64,
    pub pages_zero: u64,
    pub pages_prefetched: u64,
    pub resident_pages: u64,
    pub total_pages: u64,
    pub source_errors: u64,
    pub pages_poisoned: u64,
    pub fault_p50_us: Option<f64>,
    pub fault_p99_us: Option<f64>,
    /// Time from server start until the prefetched working set was resident.
    pub working_set_ms: Option<f64>,
    /// The page server's first error.
    pub error: Option<String>,
}

/// Keeps a woken VM's page server alive. Drop it only after the VM stopped, or once all memory
/// is resident ([`WakeHandle::fetch_all`]): dropping it earlier stops the VM with an error, and
/// poisons the pages never served (a later host access to them raises SIGBUS, not zeros).
#[derive(Debug)]
pub struct WakeHandle {
    server: Option<PageServer>,
    monitor: Monitor,
    report: WakeReport,
    wset_path: PathBuf,
    saved: Arc<AtomicBool>,
    recorder: Option<std::thread::JoinHandle<()>>,
    stop_recorder: Arc<(Mutex<bool>, std::sync::Condvar)>,
    /// The VM's "memory still lazy" flag, cleared by [`WakeHandle::fetch_all`].
    lazy_memory: Arc<AtomicBool>,
    vm: Weak<Control>,
    _watch: Watch,
}

impl WakeHandle {
    /// How the wake went.
    pub fn report(&self) -> &WakeReport {
        &self.report
    }

    /// A read-only view of the page server.
    pub fn monitor(&self) -> Monitor {
        self.monitor.clone()
    }

    /// Page server counters now.
    pub fn stats(&self) -> WakeStats {
        let s = self.monitor.stats();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        WakeStats {
            faults: s.faults,
            pages_served: s.pages_copied,
            pages_zero: s.pages_zeroed,
            pages_prefetched: s.pages_prefetched,
            resident_pages: self.monitor.resident_pages() as u64,
            total_pages: self.monitor.total_pages() as u64,
            source_errors: s.source_errors,
            pages_poisoned: s.pages_poisoned,
            fault_p50_us: s.latency_p50.map(us),
            fault_p99_us: s.latency_p99.map(us),
            working_set_ms: self.monitor.prefetch_time().map(ms),
            error: self.monitor.error(),
        }
    }

    /// The page server's first error, if any.
    pub fn error(&self) -> Option<String> {
        self.monitor.error()
    }

    /// Waits until the prefetched working set is resident; returns how long that took from the
    /// server's start (None if nothing is prefetched).
    pub fn wait_working_set(&mut self) -> Option<Duration> {
        self.server.as_mut().and_then(|s| s.wait_prefetch())
    }

    /// Saves the working set recorded so far (if this wake records); returns its bytes.
    pub fn save_working_set(&self) -> Result<u64, Error> {
        save_wset(&self.monitor, &self.wset_path, &self.saved, self.report.recording)
    }

    /// Brings every page not yet served in from the store (then the server is idle).
    pub fn fetch_all(&self) -> Result<u64, Error> {
        let n = match &self.server {
            Some(s) => s.fill_remaining().map_err(|e| Error::State(format!("fetching guest memory: {e}")))?,
            None => 0,
        };
        self.lazy_memory.store(false, SeqCst);
        Ok(n)
    }

    /// Brings every page in ([`WakeHandle::fetch_all`]), saves the working set, and stops the
    /// page server and the recorder (their threads joined): the VM then owns all its memory and
    /// the process can fork (see [`crate::quiesce`]). Idempotent.
    pub fn finish(&mut self) -> Result<u64, Error> {
        let n = self.fetch_all()?;
        self.stop_recorder();
        if !self.saved.load(SeqCst) {
            if let Err(e) = self.save_working_set() {
                tracing::warn!("{e}");
            }
        }
        if let Some(s) = self.server.take() {
            s.stop();
        }
        Ok(n)
    }

    fn stop_recorder(&mut self) {
        {
            let (lock, cv) = &*self.stop_recorder;
            *crate::devices::console::lock(lock) = true;
            cv.notify_all();
        }
        if let Some(h) = self.recorder.take() {
            let _ = h.join();
        }
    }
}

fn save_wset(m: &Monitor, path: &Path, saved: &AtomicBool, recording: bool) -> Result<u64, Error> {
    if !recording {
        return Ok(0);
    }
    let ws = m.working_set();
    ws.save(path).map_err(|e| Error::State(format!("saving the working set: {e}")))?;
    saved.store(true, SeqCst);
    Ok(ws.bytes())
}

impl Drop for WakeHandle {
    fn drop(&mut self) {
        self.stop_recorder();
        if !self.saved.load(SeqCst) {
            if let Err(e) = self.save_working_set() {
                tracing::warn!("{e}");
            }
        }
        if let Some(s) = self.server.take() {
            let complete = self.monitor.resident_pages() == self.monitor.total_pages();
            if let Some(ctl) = self.vm.upgrade().filter(|_| !complete) {
                if ctl.exit_reason().is_none() {
                    let msg = "guest memory could not be served: its page server was stopped while the VM ran";
                    tracing::error!("{msg}");
                    ctl.stop(ExitReason::Error(msg.into()));
                }
            }
            if let Err(e) = s.poison_unserved() {
                // Without poisoning (Linux < 6.6) the VM's stop is what keeps unserved pages unread.
                match self.vm.upgrade() {
                    Some(ctl) if ctl.exit_reason().is_none() => {
                        tracing::warn!("cannot poison unserved guest pages: {e}")
                    }
                    _ => tracing::debug!("unserved guest pages not poisoned (the VM has stopped): {e}"),
                }
            }
            s.stop();
        }
    }
}

/// Makes guest page `gpa` resident through a kernel access (a pipe write from it), which fails
/// with EFAULT instead of SIGBUS when the page server cannot produce it.
pub(crate) fn probe_page(mem: &GuestMem, gpa: u64) -> Result<(), String> {
    let ptr = mem.host_range(gpa, 4096).ok_or_else(|| format!("{gpa:#x} is not guest RAM"))?;
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two fds into our array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe2: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: pipe2 just returned this fd; we are its only owner (closed on drop).
    let r = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: as above, the write end.
    let w = unsafe { OwnedFd::from_raw_fd(fds[1]) };
    // SAFETY: the kernel reads 4096 bytes from guest memory we own (mapped for mem's lifetime);
    // an unservable page makes write(2) fail with EFAULT rather than fault in user space.
    let n = unsafe { libc::write(w.as_raw_fd(), ptr.cast_const().cast(), 4096) };
    let err = std::io::Error::last_os_error();
    drop((r, w));
    if n != 4096 {
        return Err(format!("reading guest page {gpa:#x}: {err}"));
    }
    Ok(())
}

impl MicroVm {
    /// Wakes the VM hibernated in `dir` with its memory in the chunk store at `store`: a lazy
    /// restore that resumes the guest before its memory is in (see the module docs).
    pub fn wake(dir: &Path, store: &Path, opts: WakeOptions) -> Result<(MicroVm, WakeHandle), Error> {
        let t0 = Instant::now();
        let record: HibernationRecord = read_record(dir)?;
        let state_path = dir.join(STATE_FILE);
        let state_bytes = std::fs::read(&state_path).map_err(hio("cannot read hibernated state", &state_path))?;
        if blake3::hash(&state_bytes).to_hex().as_str() != record.state_blake3 {
            return Err(Error::State(format!(
                "{} does not belong to the hibernation record in {}",
                state_path.display(),
                dir.display()
            )));
        }
        let state = crate::persist::state::VmState::from_bytes(&state_bytes)
            .map_err(|e| Error::State(format!("hibernated state {}: {e}", state_path.display())))?;
        if state.mem_size != record.mem_size {
            return Err(Error::State(format!(
                "hibernated state is of a {} byte guest, its record says {}",
                state.mem_size, record.mem_size
            )));
        }
        if let Some(m) = opts.expect_mem.filter(|&m| m != state.mem_size) {
            return Err(Error::State(format!(
                "{} holds a {} MiB guest, not {} MiB",
                dir.display(),
                state.mem_size >> 20,
                m >> 20
            )));
        }
        let st = Store::open_readonly(store).map_err(store_err(store))?;
        let manifest = st.manifest(&record.image).map_err(store_err(store))?;
        if manifest.image_len() != state.mem_size {
            return Err(Error::State(format!(
                "image {:?} in {} is {} bytes, the hibernated guest has {}",
                record.image,
                store.display(),
                manifest.image_len(),
                state.mem_size
            )));
        }
        let wset_path = dir.join(WSET_FILE);
        let prefetch = if opts.prefetch && wset_path.exists() {
            match WorkingSet::load(&wset_path) {
                Ok(ws) => Some(ws),
                Err(e) => {
                    tracing::warn!("ignoring the recorded working set: {e}");
                    None
                }
            }
        } else {
            None
        };
        let recording = match opts.record {
            Record::Always => true,
            Record::Never => false,
            Record::Auto => !wset_path.exists(),
        };
        let report = WakeReport {
            image: record.image.clone(),
            mem_size: state.mem_size,
            open_ms: ms(t0.elapsed()),
            prefetch_bytes: prefetch.as_ref().map_or(0, |w| w.bytes()),
            recording,
            ..Default::default()
        };
        let source = Arc::new(ChunkSource::new(Arc::new(st), Arc::new(manifest)));
        let what = store.display().to_string();
        let lazy = LazyMemory { source, what, prefetch, recording, wset_path, disk_dir: Some(dir.to_path_buf()) };
        wake_lazily(t0, &state, report, lazy, opts, None)
    }
}

/// Where a lazily woken VM's memory comes from (see [`wake_lazily`]).
pub(crate) struct LazyMemory {
    pub source: Arc<dyn PageSource>,
    /// Where the memory comes from, for errors (a store directory, a page server address).
    pub what: String,
    pub prefetch: Option<WorkingSet>,
    pub recording: bool,
    /// Where a recorded working set is saved.
    pub wset_path: PathBuf,
    /// The directory holding the saved disk's layers (None: the VM must have no disk).
    pub disk_dir: Option<PathBuf>,
}

/// Called with the page server right after it starts, before the VM is built.
pub(crate) type OnServer = Box<dyn FnOnce(&PageServer) -> Result<(), Error>>;

/// The second half of a wake: guest memory registered with a page server over `lazy.source`,
/// the VM rebuilt from `state` and resumed (unless `opts.paused`).
pub(crate) fn wake_lazily(
    t0: Instant,
    state: &crate::persist::state::VmState,
    mut report: WakeReport,
    lazy: LazyMemory,
    opts: WakeOptions,
    on_server: Option<OnServer>,
) -> Result<(MicroVm, WakeHandle), Error> {
    let LazyMemory { source, what, prefetch, recording, wset_path, disk_dir } = lazy;
    {
        let t = Instant::now();
        // No huge pages: the server places 4 KiB pages.
        let mem = Arc::new(GuestMem::new(state.mem_size, Backing::Anon, false)?);
        let regions: Vec<Region> =
            mem.regions().iter().map(|r| Region { base: r.host as u64, len: r.size, offset: r.file_offset }).collect();
        // Set once the VM exists: a page that cannot be served stops it before the vCPU goes on.
        let vm_ctl: Arc<OnceLock<Weak<Control>>> = Arc::new(OnceLock::new());
        let cell = vm_ctl.clone();
        let hook = FailureHook(Arc::new(move |why: &str| {
            if let Some(ctl) = cell.get().and_then(Weak::upgrade) {
                let msg = format!("guest memory could not be served: {why}");
                tracing::error!("{msg}");
                ctl.stop(ExitReason::Error(msg));
            }
        }));
        let cfg = ServerConfig {
            batch: opts.batch,
            record: recording,
            prefetch,
            prefetch_threads: opts.prefetch_threads,
            on_failure: Some(hook),
            ..Default::default()
        };
        let server = PageServer::register(regions, source, cfg)
            .map_err(|e| Error::State(format!("cannot start the page server: {e}")))?;
        let monitor = server.monitor();
        let remote = on_server.is_some();
        if let Some(f) = on_server {
            f(&server)?;
        }
        // The restore writes the generation page from the host: fetch it safely first.
        probe_page(&mem, GEN_PAGE).map_err(|e| {
            Error::State(format!("guest memory cannot be served from {what}: {}", monitor.error().unwrap_or(e)))
        })?;
        report.server_ms = ms(t.elapsed());

        let t = Instant::now();
        let mut p = parts_from_state(state, mem, opts.console_mirror, opts.track_dirty)?;
        p.block = match (&disk_dir, &state.devices.block) {
            (Some(dir), b) => crate::devices::virtio::block::attach::block_from_saved(&p.vm, &p.mem, b.as_ref(), dir)?,
            (None, None) => None,
            (None, Some(_)) => {
                return Err(Error::State(format!("the VM served by {what} has a disk, which is not served with it")))
            }
        };
        p.net = crate::devices::virtio::net::attach::net_for_clone(
            &p.vm,
            &p.mem,
            state.devices.net.as_ref(),
            p.generation,
        )?;
        p.started = t0;
        p.start = Want::Pause;
        mem_clear_host_dirty(&p.mem);
        let vm = MicroVm::assemble(p)?;
        let _ = vm_ctl.set(Arc::downgrade(vm.control()));
        vm.pause()?;
        let mut tids = Vec::new();
        for id in 0..usize::from(vm.vcpu_count()) {
            tids.push(vm.control().run_on(id, |_| memory_failure::gettid()).map_err(Error::State)?);
        }
        let m2 = monitor.clone();
        let watch = memory_failure::watch(&tids, vm.control(), Arc::new(move || m2.error())).map_err(Error::State)?;
        report.build_ms = ms(t.elapsed());
        if !opts.paused {
            vm.resume()?;
        }
        report.total_ms = ms(t0.elapsed());

        let saved = Arc::new(AtomicBool::new(false));
        let stop_recorder = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let recorder = if recording {
            let (m, path, sv, stop) = (monitor.clone(), wset_path.clone(), saved.clone(), stop_recorder.clone());
            let window = opts.record_for;
            Some(
                std::thread::Builder::new()
                    .name("wset-recorder".into())
                    .spawn(move || {
                        let (lock, cv) = &*stop;
                        let g = crate::devices::console::lock(lock);
                        let (g, _) = cv.wait_timeout_while(g, window, |s| !*s).unwrap_or_else(|p| p.into_inner());
                        if !*g {
                            if let Err(e) = save_wset(&m, &path, &sv, true) {
                                tracing::warn!("{e}");
                            }
                        }
                    })
                    .map_err(Error::Io)?,
            )
        } else {
            None
        };
        let handle = WakeHandle {
            server: Some(server),
            monitor,
            report,
            wset_path,
            saved: saved.clone(),
            recorder,
            stop_recorder,
            vm: Arc::downgrade(vm.control()),
            lazy_memory: Arc::clone(&vm.lazy_memory),
            _watch: watch,
        };
        *crate::devices::console::lock(&vm.lazy_source) =
            if remote { crate::fork::LazySource::RemoteHost } else { crate::fork::LazySource::Hibernation };
        vm.lazy_memory.store(true, SeqCst);
        if !recording {
            saved.store(true, SeqCst);
        }
        Ok((vm, handle))
    }
}

/// The restore's own writes are not guest dirt (diff snapshots of a woken VM).
fn mem_clear_host_dirty(mem: &GuestMem) {
    mem.take_host_dirty();
}
