//! Live clone by page serving: a running parent with shared-file memory is cloned into warm VMs
//! (see [`crate::pool`]) made before the request; the parent is paused only to capture its state
//! and write-protect its memory, and runs on while the children fault its pages in.
//!
//! Parent side, per clone request ([`LiveParent::clone_into`]):
//! 1. read each warm VM's handshake (its userfaultfd and memory layout) — before pausing;
//! 2. pause, capture vCPU and device state, start a write-protect generation
//!    ([`pagesrv::LiveMemory::begin`]), resume: the parent's pause;
//! 3. per child, start a page server on its userfaultfd whose source is the generation (pages
//!    the parent wrote since come from their preserved copies, the rest straight from the
//!    parent's memory file) and send the ticket; the child restores and answers `ready`;
//! 4. a session thread per child keeps its page server until the child exits, or, with
//!    prefetch, until every data page of the parent is in the child (`filled`: the child then
//!    drops its userfaultfd and is independent). When the last session of a generation ends,
//!    its copies are freed and, with no generation left, write protection is dropped.
//!
//! Failure: a page server that fails halts (it never feeds a wrong page); the session then closes
//! the connection and the child stops with an error (see [`crate::pool::CloneLink`]).

pub mod wire;

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pagesrv::{Generation, LiveMemory, LiveStats, PageServer, Region, ServerConfig, WorkingSet};

use crate::microvm::MicroVm;
use crate::vstate::memory::Backing;
use crate::Error;
use wire::TicketHeader;

/// Options of [`LiveParent::clone_into`].
#[derive(Clone)]
pub struct LiveCloneOptions {
    /// Bytes served per fault (aligned block around it).
    pub batch: usize,
    /// Copy every data page of the parent into each child in the background, so that it
    /// becomes independent of the parent (false: children fault pages in as they touch them and
    /// stay tied to the parent's page server while they live).
    pub prefetch: bool,
    /// Longest wait for a warm VM's handshake and for its `ready`.
    pub timeout: Duration,
    /// Called at the clone instant: while the parent is still paused, right after its memory
    /// was write-protected (e.g. to let host-side writers of guest memory go on).
    pub on_captured: Option<Arc<dyn Fn() + Send + Sync>>,
    /// The parent's name, told to the clones.
    pub parent: Option<String>,
}

impl Default for LiveCloneOptions {
    fn default() -> Self {
        LiveCloneOptions {
            batch: 64 << 10,
            prefetch: true,
            timeout: Duration::from_secs(30),
            on_captured: None,
            parent: None,
        }
    }
}

impl std::fmt::Debug for LiveCloneOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveCloneOptions")
            .field("batch", &self.batch)
            .field("prefetch", &self.prefetch)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// One clone target: a connection to a warm VM, and the name its clone gets.
#[derive(Debug)]
pub struct Target {
    pub conn: UnixStream,
    pub name: Option<String>,
}

/// What a live clone cost the parent.
#[derive(Debug, Clone, Copy, Default)]
pub struct LiveCloneReport {
    /// The parent's vCPUs were parked this long (pause + state capture + write-protect + resume).
    pub paused: Duration,
    /// Parking the vCPUs.
    pub pause: Duration,
    /// Capturing vCPU and device state.
    pub save: Duration,
    /// Write-protecting guest memory.
    pub protect: Duration,
    /// Resuming the vCPUs.
    pub resume: Duration,
    /// From the request until every child answered `ready`.
    pub ready: Duration,
    /// Of `ready`, before the pause: reading the warm VMs' handshakes.
    pub handshake: Duration,
    /// Of `ready`, after the pause: starting the page servers and sending the tickets.
    pub serve: Duration,
    /// Of `ready`: waiting for the children's `ready` after the tickets went out.
    pub wait: Duration,
}

/// One clone instant taken by [`LiveParent::capture`].
#[derive(Debug)]
pub struct Captured {
    /// The VM's state blob (vCPUs and devices) at the instant.
    pub state: Vec<u8>,
    /// Its memory at the instant, while this lives.
    pub generation: Arc<Generation>,
    /// What a clone needs to become independent, hot blocks first: every data range.
    pub data: WorkingSet,
    /// The parent's pause.
    pub report: LiveCloneReport,
}

/// A live clone as seen from the parent: its pid and its page server session.
#[derive(Debug)]
pub struct LiveChild {
    pub pid: Option<i32>,
    pub name: Option<String>,
    session: Option<std::thread::JoinHandle<String>>,
    conn: UnixStream,
    monitor: pagesrv::Monitor,
}

impl LiveChild {
    /// Pages its page server placed so far.
    pub fn resident_pages(&self) -> usize {
        self.monitor.resident_pages()
    }

    /// Ends the session now (the page server stops; a child not yet filled then stops with an
    /// error) and returns why the session ended.
    pub fn disconnect(mut self) -> String {
        let _ = self.conn.shutdown(std::net::Shutdown::Both);
        self.session.take().and_then(|h| h.join().ok()).unwrap_or_default()
    }

    /// Waits for the session to end by itself (child exited, or filled); returns why.
    pub fn wait(mut self) -> String {
        self.session.take().and_then(|h| h.join().ok()).unwrap_or_default()
    }
}

/// The parent side of live clones; keep one per parent VM (its memory stays tracked for
/// write-protect from the first clone on).
#[derive(Debug)]
pub struct LiveParent {
    live: LiveMemory,
}

impl LiveParent {
    /// Tracks `vm`'s memory for live clones. It must be shared-file memory never frozen (a
    /// fork() or snapshot freezes it).
    pub fn attach(vm: &MicroVm) -> Result<LiveParent, Error> {
        let mem = vm.memory();
        if mem.backing() != Backing::SharedFile || mem.is_frozen() {
            return Err(Error::State(
                "live clones need shared-file guest memory (boot with --backing shared) that was never frozen by a \
                 fork or snapshot"
                    .into(),
            ));
        }
        let file = mem.file().ok_or_else(|| Error::State("shared memory has no file".into()))?;
        let file = file.try_clone().map_err(Error::Io)?;
        let regions =
            mem.regions().iter().map(|r| Region { base: r.host as u64, len: r.size, offset: r.file_offset }).collect();
        let live = LiveMemory::new(file, regions).map_err(|e| Error::State(format!("live clone: {e}")))?;
        Ok(LiveParent { live })
    }

    /// Write-protects the parent's memory now, outside any pause, and keeps it protected
    /// between clones: each clone's pause then re-protects only the pages written since the
    /// last one (see [`pagesrv::LiveMemory::arm`]). The parent pays one write fault per page it
    /// writes after each clone.
    pub fn arm(&self) -> Result<(), Error> {
        self.live.arm().map_err(|e| Error::State(format!("write-protect guest memory: {e}")))
    }

    /// Write-protect tracking counters.
    pub fn stats(&self) -> LiveStats {
        self.live.stats()
    }

    /// One clone instant for a page server elsewhere (e.g. over TCP to another host): pauses
    /// `vm`, captures its state, starts a write-protect generation, resumes. The parent's pages
    /// as of now are served from the returned generation while it lives.
    pub fn capture(&self, vm: &MicroVm) -> Result<Captured, Error> {
        clonable(vm)?;
        let mut report = LiveCloneReport::default();
        let (state, generation) = self.capture_into(vm, None, &mut report)?;
        let bytes = state.to_bytes().map_err(|e| Error::State(e.to_string()))?;
        // The blocks a clone touches first go first, then all the data of the instant.
        let mut ranges: Vec<(u64, u32)> = hot_offsets(vm, &state).iter().map(|&o| (o & !0xffff, 0x10000)).collect();
        ranges.extend(generation.data_ranges());
        let data = WorkingSet { page_size: 4096, ranges };
        Ok(Captured { state: bytes, generation, data, report })
    }

    /// The parent's pause of a clone: state captured and a generation begun, `on_captured`
    /// called, all while paused (a VM already paused stays so).
    fn capture_into(
        &self,
        vm: &MicroVm,
        on_captured: Option<&(dyn Fn() + Send + Sync)>,
        rep: &mut LiveCloneReport,
    ) -> Result<(crate::persist::state::VmState, Arc<Generation>), Error> {
        let was_paused = vm.is_paused();
        let tp = Instant::now();
        rep.pause = if was_paused { Duration::ZERO } else { vm.pause()? };
        let captured = (|| {
            let t = Instant::now();
            let state = vm.save_state()?;
            rep.save = t.elapsed();
            let t = Instant::now();
            let gen = self.live.begin().map_err(|e| Error::State(format!("write-protect guest memory: {e}")))?;
            rep.protect = t.elapsed();
            if let Some(f) = on_captured {
                f();
            }
            Ok::<_, Error>((state, gen))
        })();
        if !was_paused {
            rep.resume = vm.resume()?;
        }
        rep.paused = tp.elapsed();
        captured
    }

    /// Clones the running `vm` into the warm VMs at the other end of `targets`; see the module
    /// docs. Returns when every child answered `ready` (or with the first error).
    pub fn clone_into(
        &self,
        vm: &MicroVm,
        targets: Vec<Target>,
        opts: &LiveCloneOptions,
    ) -> Result<(Vec<LiveChild>, LiveCloneReport), Error> {
        let t0 = Instant::now();
        clonable(vm)?;
        if targets.is_empty() {
            return Err(Error::Config("clone count must be at least 1".into()));
        }
        let mut hands = Vec::with_capacity(targets.len());
        for t in targets {
            let (hs, uffd) = pagesrv::fc_wire::recv_handshake(&t.conn, opts.timeout)
                .map_err(|e| Error::State(format!("warm VM handshake: {e}")))?;
            let regions = check_layout(vm, &hs)?;
            hands.push((t, uffd, regions));
        }
        let mut rep = LiveCloneReport { handshake: t0.elapsed(), ..Default::default() };
        let (state, gen) = self.capture_into(vm, opts.on_captured.as_deref(), &mut rep)?;
        let ts = Instant::now();
        let bytes = state.to_bytes().map_err(|e| Error::State(e.to_string()))?;
        let prefetch = opts.prefetch.then(|| WorkingSet { page_size: 4096, ranges: gen.data_ranges() });
        let hot = hot_offsets(vm, &state);
        let mut children = Vec::with_capacity(hands.len());
        for (t, uffd, regions) in hands {
            let pid = pagesrv::fc_wire::peer_pid(&t.conn);
            let cfg = ServerConfig {
                batch: opts.batch,
                prefetch: prefetch.clone(),
                prefetch_threads: 1,
                owner_pid: None,
                ..Default::default()
            };
            prefill(&uffd, &regions, &gen, &hot, opts.batch)?;
            let source: Arc<dyn pagesrv::PageSource> = gen.clone();
            let server = PageServer::start(uffd, regions, source, cfg)
                .map_err(|e| Error::State(format!("cannot start the clone's page server: {e}")))?;
            let header = TicketHeader {
                v: wire::VERSION,
                state_len: bytes.len() as u64,
                name: t.name.clone(),
                parent: opts.parent.clone(),
                prefetch: opts.prefetch,
                restore: None,
            };
            wire::send_ticket(&t.conn, &header, &bytes)?;
            children.push((t, server, pid));
        }
        let prefetching = opts_prefetch(&prefetch);
        rep.serve = ts.elapsed();
        let tw = Instant::now();
        let mut out = Vec::with_capacity(children.len());
        let mut errors = Vec::new();
        for (t, server, pid) in children {
            t.conn.set_read_timeout(Some(opts.timeout)).map_err(Error::Io)?;
            let mut r = BufReader::new(t.conn.try_clone().map_err(Error::Io)?);
            match wire::read_line(&mut r) {
                Ok(Some(l)) if l == "ready" => {}
                Ok(Some(l)) => errors.push(format!("{}: {}", t.name.as_deref().unwrap_or("clone"), l)),
                Ok(None) => errors.push(format!("{}: the warm VM exited", t.name.as_deref().unwrap_or("clone"))),
                Err(e) => errors.push(format!("{}: {e}", t.name.as_deref().unwrap_or("clone"))),
            }
            t.conn.set_read_timeout(None).map_err(Error::Io)?;
            let monitor = server.monitor();
            let conn = t.conn.try_clone().map_err(Error::Io)?;
            let g = gen.clone();
            let session = std::thread::Builder::new()
                .name("clone-session".into())
                .spawn(move || session(r, server, g, prefetching))
                .map_err(Error::Io)?;
            out.push(LiveChild { pid, name: t.name, session: Some(session), conn, monitor });
        }
        drop(gen);
        rep.wait = tw.elapsed();
        rep.ready = t0.elapsed();
        if !errors.is_empty() {
            for c in out {
                c.disconnect();
            }
            return Err(Error::State(format!("live clone: {}", errors.join("; "))));
        }
        Ok((out, rep))
    }
}

fn opts_prefetch(p: &Option<WorkingSet>) -> bool {
    p.as_ref().is_some_and(|w| !w.ranges.is_empty())
}

/// File offsets of the pages a clone touches first: the generation page the child's restore
/// writes, and where the boot vCPU's instruction pointer, stack pointer and page-table root
/// point when those are guest-physical (identity-mapped guests; others are skipped).
fn hot_offsets(vm: &MicroVm, state: &crate::persist::state::VmState) -> Vec<u64> {
    let mem = vm.memory();
    let mut gpas = vec![crate::arch::layout::GEN_PAGE];
    if let Some(v) = state.vcpus.first() {
        gpas.extend([v.regs.rip, v.regs.rsp, v.sregs.cr3 & !0xfff]);
    }
    gpas.iter()
        .filter_map(|&gpa| {
            mem.regions()
                .iter()
                .find(|r| gpa >= r.guest_base && gpa < r.guest_base + r.size)
                .map(|r| r.file_offset + (gpa - r.guest_base))
        })
        .collect()
}

/// Places the `batch`-sized blocks around the `hot` file offsets into a child before its
/// ticket, so its restore and first instructions do not wait on page-server round trips.
/// A block the kernel refuses is left to the page server.
fn prefill(
    uffd: &pagesrv::uffd::Uffd,
    regions: &[Region],
    gen: &pagesrv::Generation,
    hot: &[u64],
    batch: usize,
) -> Result<(), Error> {
    use pagesrv::PageSource;
    let batch = (batch.max(4096) as u64).next_power_of_two();
    let mut done: Vec<u64> = Vec::new();
    for &off in hot {
        let block = off & !(batch - 1);
        if done.contains(&block) {
            continue;
        }
        done.push(block);
        let Some(r) = regions.iter().find(|r| block < r.offset + r.len && block + batch > r.offset) else {
            continue;
        };
        let lo = block.max(r.offset);
        let hi = (block + batch).min(r.offset + r.len);
        if gen.is_zero(lo, hi - lo) {
            continue;
        }
        let mut buf = vec![0u8; (hi - lo) as usize];
        gen.fill(lo, &mut buf).map_err(|e| Error::State(format!("live clone: read the parent's memory: {e}")))?;
        if let Err(e) = uffd.copy(r.base + (lo - r.offset), &buf) {
            tracing::debug!("prefill of {lo:#x} left to the page server: {e}");
        }
    }
    Ok(())
}

/// The warm VM's regions must be exactly the parent's memory layout.
fn check_layout(vm: &MicroVm, hs: &pagesrv::fc::Handshake) -> Result<Vec<Region>, Error> {
    let mem = vm.memory();
    let want: Vec<(u64, u64)> = mem.regions().iter().map(|r| (r.file_offset, r.size)).collect();
    let got: Vec<(u64, u64)> = hs.mappings.iter().map(|m| (m.offset, m.size)).collect();
    if want != got || hs.mappings.iter().any(|m| m.page_size != 4096) {
        return Err(Error::State(format!(
            "the warm VM's memory ({} MiB) does not match the parent's ({} MiB)",
            got.iter().map(|g| g.1).sum::<u64>() >> 20,
            mem.size() >> 20
        )));
    }
    Ok(hs.mappings.iter().map(|m| Region { base: m.base_host_virt_addr, len: m.size, offset: m.offset }).collect())
}

/// Serves one child until it exits, its page server ends, or (with prefetch) all its data pages
/// are in. Returns why it ended.
fn session(mut r: BufReader<UnixStream>, server: PageServer, gen: Arc<Generation>, prefetch: bool) -> String {
    let monitor = server.monitor();
    let why = loop {
        let mut fds = [
            libc::pollfd { fd: r.get_ref().as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: monitor.done_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // While prefetching, look at its progress every few milliseconds.
        let timeout = if prefetch { 2 } else { -1 };
        // SAFETY: fds is a valid array of 2 pollfd for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        if rc < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break "poll failed".to_string();
        }
        if fds[1].revents != 0 {
            break format!("page server ended: {:?} {}", monitor.ended(), monitor.error().unwrap_or_default());
        }
        if fds[0].revents != 0 {
            let mut buf = Vec::new();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break "the child exited".to_string(),
                Ok(_) => continue,
            }
        }
        if prefetch && monitor.prefetch_time().is_some() && monitor.error().is_none() && monitor.ended().is_none() {
            use std::io::Write;
            // Every data page is in: the child drops its userfaultfd and needs us no more.
            if r.get_ref().write_all(b"filled\n").is_ok() {
                break "filled".to_string();
            }
        }
    };
    if why != "filled" {
        let _ = r.get_ref().shutdown(std::net::Shutdown::Both);
    }
    server.stop();
    drop(gen);
    why
}

/// Whether `vm` can be live-cloned: running, memory not frozen, no disk.
fn clonable(vm: &MicroVm) -> Result<(), Error> {
    if let Some(r) = vm.control().exit_reason() {
        return Err(Error::State(format!("cannot clone a stopped VM (it exited: {r:?})")));
    }
    if vm.memory().is_frozen() {
        return Err(Error::State("the VM's memory was frozen (forked or snapshotted): no live clones".into()));
    }
    if vm.block().is_some() {
        return Err(Error::State("live clones of a VM with a disk are not supported yet".into()));
    }
    Ok(())
}
