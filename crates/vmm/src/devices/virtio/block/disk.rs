//! A copy-on-write disk: a raw base image shared read-only, frozen overlay layers shared by
//! every clone above them, and one private live overlay (a sparse unnamed file) that takes this
//! VM's writes, block by block ([`BLOCK`]). Cloning the disk (fork, snapshot, restore) freezes
//! the live overlay (if it holds anything) and gives each side a new empty one: constant time,
//! no data copied. Reads find each block in the newest layer that holds it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::layer::{scratch_file, Base, Bitmap, Layer, BLOCK};

/// Most frozen layers a disk may stack (each clone or snapshot after writes adds one).
pub const MAX_LAYERS: usize = 256;

/// What disk a VM gets.
#[derive(Clone, Debug)]
pub struct DiskConfig {
    /// The raw base image (never written by forkvm).
    pub path: PathBuf,
    pub read_only: bool,
    /// Where the unnamed overlay files live (best on the filesystem of the snapshot directories,
    /// so snapshots link layers instead of copying them). Default: the image's directory.
    pub scratch: Option<PathBuf>,
}

/// The disk of one VM.
#[derive(Debug)]
pub struct CowDisk {
    pub(crate) base: Arc<Base>,
    pub(crate) frozen: Vec<Arc<Layer>>,
    live: File,
    live_map: Bitmap,
    pub read_only: bool,
    pub(crate) scratch: PathBuf,
}

/// Where a block's bytes are.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Src {
    Live,
    Frozen(usize),
    Base,
}

fn writable_dir(dir: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(dir.as_os_str())) else {
        return false;
    };
    // SAFETY: c is a valid NUL-terminated path; access only reads it.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

impl CowDisk {
    /// Opens the base image and starts an empty overlay.
    pub fn create(cfg: &DiskConfig) -> Result<Self, String> {
        let base = Base::open(&cfg.path)?;
        let scratch = match &cfg.scratch {
            Some(s) => s.clone(),
            None => base.path.parent().filter(|d| writable_dir(d)).map_or_else(std::env::temp_dir, Path::to_path_buf),
        };
        Self::assemble(Arc::new(base), Vec::new(), cfg.read_only, scratch)
    }

    pub(crate) fn assemble(
        base: Arc<Base>,
        frozen: Vec<Arc<Layer>>,
        read_only: bool,
        scratch: PathBuf,
    ) -> Result<Self, String> {
        let live = scratch_file(&scratch, base.len)
            .map_err(|e| format!("cannot create a disk overlay in {}: {e}", scratch.display()))?;
        let live_map = Bitmap::new(base.len.div_ceil(BLOCK));
        Ok(CowDisk { base, frozen, live, live_map, read_only, scratch })
    }

    /// Size in bytes (a whole number of sectors).
    pub fn size(&self) -> u64 {
        self.base.len
    }

    pub fn base_path(&self) -> &Path {
        &self.base.path
    }

    /// Frozen layers below the live overlay.
    pub fn layers(&self) -> usize {
        self.frozen.len()
    }

    /// Blocks this VM wrote since its last clone or snapshot.
    pub fn live_blocks(&self) -> u64 {
        self.live_map.count()
    }

    fn src(&self, b: u64) -> Src {
        if self.live_map.get(b) {
            return Src::Live;
        }
        match self.frozen.iter().rposition(|l| l.map.get(b)) {
            Some(i) => Src::Frozen(i),
            None => Src::Base,
        }
    }

    fn file(&self, s: Src) -> &File {
        match s {
            Src::Live => &self.live,
            Src::Frozen(i) => &self.frozen[i].file,
            Src::Base => &self.base.file,
        }
    }

    fn check(&self, len: usize, off: u64) -> io::Result<()> {
        match off.checked_add(len as u64) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("access at {off}+{len} past the end of a {}-byte disk", self.size()),
            )),
        }
    }

    /// Reads `buf.len()` bytes at `off`, each block from the newest layer holding it.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.check(buf.len(), off)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let src = self.src(pos / BLOCK);
            // Extend over following blocks with the same source (one pread for the run).
            let mut end = ((pos / BLOCK) + 1) * BLOCK;
            let limit = off + buf.len() as u64;
            while end < limit && self.src(end / BLOCK) == src {
                end += BLOCK;
            }
            let n = (end.min(limit) - pos) as usize;
            self.file(src).read_exact_at(&mut buf[done..done + n], pos)?;
            done += n;
        }
        Ok(())
    }

    /// Writes `data` at `off` into the live overlay; a partly written block that is not in it
    /// yet is copied up first. A block counts as held only once its write succeeded, so a
    /// failed write (e.g. ENOSPC) leaves what was there before readable.
    pub fn write_at(&mut self, data: &[u8], off: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "the disk is read-only"));
        }
        self.check(data.len(), off)?;
        let size = self.size();
        let end = off + data.len() as u64;
        let mut pos = off;
        while pos < end {
            let b = pos / BLOCK;
            let (bstart, bend) = (b * BLOCK, ((b + 1) * BLOCK).min(size));
            let whole = pos == bstart && end >= bend;
            if whole || self.live_map.get(b) {
                // Coalesce following whole (or already held) blocks into one pwrite.
                let mut stop = bend.min(end);
                while stop < end {
                    let nb = stop / BLOCK;
                    let nend = ((nb + 1) * BLOCK).min(size);
                    if end >= nend || self.live_map.get(nb) {
                        stop = nend.min(end);
                    } else {
                        break;
                    }
                }
                let slice = &data[(pos - off) as usize..(stop - off) as usize];
                self.live.write_all_at(slice, pos)?;
                for blk in b..stop.div_ceil(BLOCK) {
                    // A trailing partial block is held only if it was already.
                    if blk * BLOCK + BLOCK.min(size - blk * BLOCK) <= stop || self.live_map.get(blk) {
                        self.live_map.set(blk);
                    }
                }
                pos = stop;
            } else {
                // Copy-up: the block from below, patched, written whole.
                let mut block = vec![0u8; (bend - bstart) as usize];
                self.read_at(&mut block, bstart)?;
                let n = (bend.min(end) - pos) as usize;
                let at = (pos - bstart) as usize;
                block[at..at + n].copy_from_slice(&data[(pos - off) as usize..(pos - off) as usize + n]);
                self.live.write_all_at(&block, bstart)?;
                self.live_map.set(b);
                pos += n as u64;
            }
        }
        Ok(())
    }

    /// Makes everything written so far durable (VIRTIO_BLK_T_FLUSH, pause, snapshot).
    pub fn flush(&self) -> io::Result<()> {
        if self.live_map.is_empty() {
            return Ok(());
        }
        self.live.sync_data()
    }

    /// Freezes the live overlay (when it holds anything) into a shared layer and starts an
    /// empty one: after this, the disk as it is now never changes and may be shared.
    pub fn freeze(&mut self) -> io::Result<()> {
        if self.live_map.is_empty() {
            return Ok(());
        }
        if self.frozen.len() >= MAX_LAYERS {
            return Err(io::Error::other(format!(
                "the disk already stacks {MAX_LAYERS} copy-on-write layers: cannot clone it again"
            )));
        }
        // No fsync here (it was most of a clone's time): the frozen layer stays an unnamed
        // file, readable by everyone above it from the page cache; a snapshot that links it
        // syncs it first (see Layer::sync and CowDisk::persist).
        let fresh = scratch_file(&self.scratch, self.size())?;
        let blocks = self.live_map.blocks();
        let map = std::mem::replace(&mut self.live_map, Bitmap::new(blocks));
        let file = std::mem::replace(&mut self.live, fresh);
        self.frozen.push(Arc::new(Layer::new(super::layer::random_id(), file, map, false)));
        Ok(())
    }

    /// A clone's view of this (frozen) disk: same base and layers, its own empty overlay.
    /// [`CowDisk::freeze`] must have run since the last write.
    pub fn clone_view(&self, scratch: Option<&Path>) -> Result<CowDisk, String> {
        if !self.live_map.is_empty() {
            return Err("the disk must be frozen before it is cloned".into());
        }
        let scratch = scratch.map_or_else(|| self.scratch.clone(), Path::to_path_buf);
        Self::assemble(self.base.clone(), self.frozen.clone(), self.read_only, scratch)
    }

    /// In a fork child: closes the parent's live overlay inherited by fork() (the child has its
    /// own; this one would otherwise keep the parent's overlay file alive while the child runs).
    pub fn forget_live_in_child(&mut self) {
        if let Ok(null) = File::open("/dev/null") {
            self.live = null;
        }
    }

    /// Frozen layers whose data has not been synced to stable storage yet (a snapshot syncs
    /// the ones it links).
    pub fn unsynced_layers(&self) -> usize {
        self.frozen.iter().filter(|l| !l.is_synced()).count()
    }

    /// Bytes the overlays take on the host (allocated blocks of the live and frozen files).
    pub fn overlay_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let blocks = |f: &File| f.metadata().map(|m| m.blocks() * 512).unwrap_or(0);
        blocks(&self.live) + self.frozen.iter().map(|l| blocks(&l.file)).sum::<u64>()
    }
}
