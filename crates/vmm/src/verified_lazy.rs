//! Copy-on-write restore that checks the memory image without hashing all of it first.
//!
//! A full snapshot keeps, beside its image, the hash of every 2 MiB block (`memory.blocks`, see
//! [`crate::persist::image_hash`]); blake3 of that list is the image hash its `state` records,
//! so a list that matches the state is as trustworthy as the state itself. Instead of hashing a
//! whole image before the guest may run (~1 s per GiB), the restore registers anonymous guest
//! memory with a userfaultfd [`PageServer`] whose source hashes each block as it is read and
//! serves it only if the hash matches: the guest runs at once and never sees a byte that was not
//! checked. A block of zero hash is served as zeros whatever the file holds there. A background
//! thread (SCHED_IDLE) then brings in every block the guest did not touch, through the same checks,
//! and stops the server; the VM's memory is then private and the process can fork. A block that
//! fails its check stops the VM with an error before its pages would be handed out (as a lazy
//! wake does; see [`crate::lazy_restore`]).

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use pagesrv::{FailureHook, PageServer, PageSource, Region, ServerConfig};

use crate::arch::layout::GEN_PAGE;
use crate::devices::console::lock;
use crate::memory_failure;
use crate::microvm::MicroVm;
use crate::persist::image_hash::{blocks, full_block};
use crate::vcpu_thread::{Control, ExitReason};
use crate::vstate::memory::{Backing, GuestMem};
use crate::Error;

/// Block hashes of a full image, beside it in the snapshot directory.
pub const BLOCKS_FILE: &str = "memory.blocks";

/// The block hashes beside the full image of a `size`-byte guest in `dir`, if present and tied
/// to `root` (the image hash the state records). None for older snapshots or a list that does
/// not match (the caller then hashes the whole image).
pub(crate) fn read_block_hashes(dir: &Path, size: u64, root: &str) -> Option<Vec<[u8; 32]>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(BLOCKS_FILE);
    let want = blocks(size).len() * 32;
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(&path).ok()?;
    let mut bytes = Vec::with_capacity(want);
    f.take(want as u64 + 1).read_to_end(&mut bytes).ok()?;
    if bytes.len() != want {
        tracing::warn!("{} has {} bytes, expected {want}: hashing the whole image", path.display(), bytes.len());
        return None;
    }
    let hashes: Vec<[u8; 32]> = bytes
        .chunks_exact(32)
        .map(|c| {
            let mut h = [0u8; 32];
            h.copy_from_slice(c);
            h
        })
        .collect();
    if crate::persist::image_hash::root_of(&hashes) != root {
        tracing::warn!("{} does not match the snapshot state: hashing the whole image", path.display());
        return None;
    }
    Some(hashes)
}

/// The image file, served block by block, each block checked against its hash.
#[derive(Debug)]
struct VerifiedSource {
    file: File,
    path: PathBuf,
    size: u64,
    blocks: Vec<(u64, u64)>,
    hashes: Vec<[u8; 32]>,
    /// Recently checked blocks (index, bytes): the background fill asks for a block in 256 KiB
    /// pieces, and a fault may ask for the rest of a block the fill began.
    recent: Mutex<VecDeque<(usize, Arc<Vec<u8>>)>>,
}

/// Checked blocks kept for the pieces still to come.
const RECENT: usize = 4;

impl VerifiedSource {
    /// Reads block `i` ([bo, bo+bl)) into `buf` and checks it against its hash.
    fn read_checked(&self, i: usize, bo: u64, buf: &mut [u8]) -> pagesrv::Result<()> {
        let bl = buf.len() as u64;
        self.file
            .read_exact_at(buf, bo)
            .map_err(|e| Self::err(bo, bl, format!("reading {}: {e}", self.path.display())))?;
        if self.hashes.get(i).is_none_or(|want| full_block(buf) != *want) {
            return Err(Self::err(
                bo,
                bl,
                format!(
                    "memory image {} does not match its snapshot state at {bo:#x} (the image is corrupt or belongs \
                     to another snapshot)",
                    self.path.display()
                ),
            ));
        }
        Ok(())
    }

    /// Block `i`, checked, from the recent ones or read now.
    fn checked_block(&self, i: usize, bo: u64, bl: u64) -> pagesrv::Result<Arc<Vec<u8>>> {
        if let Some(b) = lock(&self.recent).iter().find(|(j, _)| *j == i).map(|(_, b)| b.clone()) {
            return Ok(b);
        }
        let mut v = vec![0u8; bl as usize];
        self.read_checked(i, bo, &mut v)?;
        let b = Arc::new(v);
        let mut r = lock(&self.recent);
        if r.len() >= RECENT {
            r.pop_front();
        }
        r.push_back((i, b.clone()));
        Ok(b)
    }

    fn err(offset: u64, len: u64, reason: String) -> pagesrv::Error {
        pagesrv::Error::Source { offset, len, reason }
    }

    /// Index of the block holding image offset `off`.
    fn block_of(&self, off: u64) -> usize {
        self.blocks.partition_point(|&(o, l)| o + l <= off)
    }
}

impl PageSource for VerifiedSource {
    fn len(&self) -> u64 {
        self.size
    }

    fn fill(&self, offset: u64, buf: &mut [u8]) -> pagesrv::Result<()> {
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(Self::err(offset, len, "beyond the end of the image".into()));
        }
        let mut pos = offset;
        while pos < offset + len {
            let i = self.block_of(pos);
            let (Some(&(bo, bl)), Some(want)) = (self.blocks.get(i), self.hashes.get(i)) else {
                return Err(Self::err(pos, len, "offset outside the image's blocks".into()));
            };
            let end = (bo + bl).min(offset + len);
            let out = &mut buf[(pos - offset) as usize..(end - offset) as usize];
            if *want == [0; 32] {
                out.fill(0);
            } else if pos == bo && end == bo + bl {
                // A whole block: read and checked in place.
                self.read_checked(i, bo, out)?;
            } else {
                let block = self.checked_block(i, bo, bl)?;
                let from = (pos - bo) as usize;
                out.copy_from_slice(&block[from..from + out.len()]);
            }
            pos = end;
        }
        Ok(())
    }

    fn is_zero(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len);
        let mut i = self.block_of(offset);
        while let (Some(&(bo, bl)), Some(h)) = (self.blocks.get(i), self.hashes.get(i)) {
            if bo >= end {
                return true;
            }
            if *h != [0; 32] || bo + bl < offset {
                return false;
            }
            i += 1;
        }
        len > 0
    }
}

/// Guest memory served lazily from a verified image, until [`Lazy::run_in_background`].
pub(crate) struct Lazy {
    server: PageServer,
    cell: Arc<OnceLock<Weak<Control>>>,
    mem: Arc<GuestMem>,
}

/// Fresh anonymous guest memory served from the image `file` (`size` bytes, block `hashes`).
pub(crate) fn start(file: File, path: &Path, size: u64, hashes: Vec<[u8; 32]>) -> Result<(Arc<GuestMem>, Lazy), Error> {
    // 4 KiB pages: the server places them with UFFDIO_COPY.
    let mem = Arc::new(GuestMem::new(size, Backing::Anon, false)?);
    start_on(mem, None, file, path, hashes)
}

/// [`start`] over existing anonymous guest memory `mem`, already registered (missing-page mode)
/// with `uffd` when given (a warm pool VM's).
pub(crate) fn start_on(
    mem: Arc<GuestMem>,
    uffd: Option<pagesrv::uffd::Uffd>,
    file: File,
    path: &Path,
    hashes: Vec<[u8; 32]>,
) -> Result<(Arc<GuestMem>, Lazy), Error> {
    let size = mem.size();
    let regions: Vec<Region> =
        mem.regions().iter().map(|r| Region { base: r.host as u64, len: r.size, offset: r.file_offset }).collect();
    let source = Arc::new(VerifiedSource {
        file,
        path: path.to_path_buf(),
        size,
        blocks: blocks(size),
        hashes,
        recent: Mutex::default(),
    });
    let cell: Arc<OnceLock<Weak<Control>>> = Arc::new(OnceLock::new());
    let c = cell.clone();
    let hook = FailureHook(Arc::new(move |why: &str| {
        if let Some(ctl) = c.get().and_then(Weak::upgrade) {
            let msg = format!("guest memory could not be restored: {why}");
            tracing::error!("{msg}");
            ctl.stop(ExitReason::Error(msg));
        }
    }));
    // One fault brings in the whole (checked) 2 MiB block around it.
    let cfg = ServerConfig { batch: 2 << 20, on_failure: Some(hook), ..Default::default() };
    let server = match uffd {
        Some(u) => PageServer::start(u, regions, source, cfg),
        None => PageServer::register(regions, source, cfg),
    }
    .map_err(|e| Error::State(format!("cannot start the page server: {e}")))?;
    // The restore writes the generation page from the host: bring it in (and check it) first.
    crate::lazy_restore::probe_page(&mem, GEN_PAGE).map_err(|e| Error::State(server.monitor().error().unwrap_or(e)))?;
    Ok((mem.clone(), Lazy { server, cell, mem }))
}

impl Lazy {
    /// `vm` (assembled paused over the memory) is watched for poisoned pages, and a background
    /// thread brings in and checks every remaining block; fork waits for it. The caller resumes.
    pub(crate) fn run_in_background(self, vm: &MicroVm) -> Result<(), Error> {
        let _ = self.cell.set(Arc::downgrade(vm.control()));
        vm.pause()?;
        let mut tids = Vec::new();
        for id in 0..usize::from(vm.vcpu_count()) {
            tids.push(vm.control().run_on(id, |_| memory_failure::gettid()).map_err(Error::State)?);
        }
        let monitor = self.server.monitor();
        let watch =
            memory_failure::watch(&tids, vm.control(), Arc::new(move || monitor.error())).map_err(Error::State)?;
        *lock(&vm.lazy_source) = crate::fork::LazySource::CheckedRestore;
        vm.lazy_memory.store(true, SeqCst);
        let lazy_flag = Arc::clone(&vm.lazy_memory);
        let ctl = Arc::downgrade(vm.control());
        let Lazy { server, mem, .. } = self;
        let h = std::thread::Builder::new()
            .name("verify-fill".into())
            .spawn(move || {
                // Runs only when nothing else wants the CPU: the guest and its faults come first.
                let param = libc::sched_param { sched_priority: 0 };
                // SAFETY: changes the calling thread's (pid 0) scheduling policy; reads `param`.
                unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
                match server.fill_remaining() {
                    Ok(_) => {
                        server.stop();
                    }
                    Err(e) => {
                        let msg = format!("guest memory could not be restored: {e}");
                        if let Some(ctl) = ctl.upgrade().filter(|c| c.exit_reason().is_none()) {
                            tracing::error!("{msg}");
                            ctl.stop(ExitReason::Error(msg));
                        }
                        if let Err(e) = server.poison_unserved() {
                            tracing::warn!("cannot poison unserved guest pages: {e}");
                        }
                        server.stop();
                    }
                }
                drop((watch, mem));
                lazy_flag.store(false, SeqCst);
            })
            .map_err(Error::Io)?;
        *lock(&vm.background_fill) = Some(h);
        Ok(())
    }
}

impl MicroVm {
    /// Waits until a copy-on-write restore's memory is all in and checked (see
    /// [`crate::verified_lazy`]); returns at once for any other VM.
    pub fn wait_memory_checked(&self) {
        // Joined under the lock: a second caller (e.g. a fork while another thread waits) must
        // not find the handle gone and return before the memory is checked.
        let mut fill = lock(&self.background_fill);
        if let Some(h) = fill.take() {
            let _ = h.join();
        }
    }
}
