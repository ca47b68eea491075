//! Garbage collection and image ownership.
//!
//! [`Store::gc`] drops from the index every chunk no manifest references, saves the index
//! (atomically), then punches holes (`FALLOC_FL_PUNCH_HOLE`) over every byte range of the pack
//! that no indexed chunk covers. Offsets never move, so a crash at any point leaves a consistent
//! store: at worst unreferenced bytes not yet punched, which the next `gc` frees. A manifest that
//! cannot be read stops the collection before anything is dropped: its chunks might be live.
//!
//! An image may carry an *owner* (`owners/<name>`, a path chosen by the writer, e.g. the
//! hibernation directory it belongs to), so that a higher layer can tell which images lost their
//! owner and should be removed before collecting.

use std::collections::HashSet;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{io_err, Error, Result};
use crate::hash::ChunkHash;
use crate::pack::PACK_HEADER_LEN;
use crate::store::Store;

/// What [`Store::gc`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Images whose chunks were kept.
    pub images: u64,
    /// Chunks still indexed.
    pub chunks_kept: u64,
    /// Chunks dropped from the index.
    pub chunks_removed: u64,
    /// Stored bytes of the dropped chunks.
    pub bytes_removed: u64,
    /// Disk space of the pack before and after (allocated blocks).
    pub disk_before: u64,
    pub disk_after: u64,
}

impl Store {
    /// Removes every chunk no manifest references and frees its space in the pack.
    pub fn gc(&self) -> Result<GcReport> {
        if !self.is_writable() {
            return Err(Error::ReadOnly);
        }
        let _guard = self.write_lock.lock().map_err(|_| Error::InvalidArgument("write lock poisoned".into()))?;
        let mut live: HashSet<ChunkHash> = HashSet::new();
        let mut rep = GcReport::default();
        for name in self.list_images()? {
            let m = self.manifest(&name)?;
            live.extend(m.chunks().iter().copied());
            rep.images += 1;
        }
        rep.disk_before = self.pack_disk_bytes()?;
        let mut index = self.index.write().map_err(|_| Error::InvalidArgument("index lock poisoned".into()))?;
        let mut kept = index.clone();
        kept.map.retain(|h, e| {
            let keep = live.contains(h);
            if !keep {
                rep.chunks_removed += 1;
                rep.bytes_removed += u64::from(e.stored_len);
            }
            keep
        });
        rep.chunks_kept = kept.map.len() as u64;
        if rep.chunks_removed > 0 {
            kept.save(&self.dir.join("index"))?;
            *index = kept;
        }
        // Free everything between indexed chunks (also what an interrupted gc left behind).
        let mut used: Vec<(u64, u64)> =
            index.map.values().map(|e| (e.offset, e.offset + u64::from(e.stored_len))).collect();
        used.sort_unstable();
        let mut pos = PACK_HEADER_LEN;
        for (start, end) in used.into_iter().chain(std::iter::once((index.pack_len, index.pack_len))) {
            if start > pos {
                self.punch(pos, start - pos)?;
            }
            pos = pos.max(end);
        }
        drop(index);
        rep.disk_after = self.pack_disk_bytes()?;
        Ok(rep)
    }

    fn punch(&self, offset: u64, len: u64) -> Result<()> {
        let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(Error::InvalidArgument(format!("pack range {offset}+{len} too large")));
        };
        // SAFETY: fallocate on a descriptor we own; it only changes the file's allocation.
        let rc = unsafe {
            libc::fallocate(self.pack.file.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, off, l)
        };
        if rc != 0 {
            return Err(io_err(&self.pack.path)(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    fn pack_disk_bytes(&self) -> Result<u64> {
        Ok(self.pack.file.metadata().map_err(io_err(&self.pack.path))?.blocks() * 512)
    }

    fn owner_path(&self, name: &str) -> Result<PathBuf> {
        self.check_name(name)?;
        Ok(self.dir.join("owners").join(name))
    }

    /// Records `owner` (any path, meaningful to the caller) as the owner of image `name`.
    pub fn set_owner(&self, name: &str, owner: &Path) -> Result<()> {
        if !self.is_writable() {
            return Err(Error::ReadOnly);
        }
        let path = self.owner_path(name)?;
        let dir = self.dir.join("owners");
        crate::private::ensure_dir(&dir).map_err(io_err(&dir))?;
        crate::private::write_atomic(&path, owner.as_os_str().as_bytes()).map_err(io_err(&path))
    }

    /// The owner recorded for image `name`, if any.
    pub fn owner(&self, name: &str) -> Result<Option<PathBuf>> {
        let path = self.owner_path(name)?;
        match fs::read(&path) {
            Ok(b) => Ok(Some(PathBuf::from(std::ffi::OsStr::from_bytes(&b)))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    pub(crate) fn remove_owner(&self, name: &str) -> Result<()> {
        let path = self.owner_path(name)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }
}
