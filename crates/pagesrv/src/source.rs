//! Where page contents come from.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use chunkstore::{Manifest, Store};

use crate::error::{Error, Result};

/// A source of guest memory contents, addressed by byte offset (the
/// `offset` of a [`crate::Region`], as in Firecracker's memory file).
///
/// `fill` is called from the fault-serving thread and the prefetch thread
/// concurrently. It must fill all of `buf` or fail: on error the server
/// never hands `buf` to the guest.
pub trait PageSource: Send + Sync + std::fmt::Debug {
    /// Total length in bytes.
    fn len(&self) -> u64;
    /// True if the source is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fill `buf` with the bytes at `[offset, offset + buf.len())`.
    fn fill(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// True if `[offset, offset+len)` is known to be all zero without
    /// reading it (the server then uses `UFFDIO_ZEROPAGE`).
    fn is_zero(&self, _offset: u64, _len: u64) -> bool {
        false
    }
}

fn check_range(src: &dyn PageSource, offset: u64, len: usize) -> Result<()> {
    if offset.checked_add(len as u64).is_none_or(|end| end > src.len()) {
        return Err(Error::Source {
            offset,
            len: len as u64,
            reason: format!("beyond the end of the source ({} bytes)", src.len()),
        });
    }
    Ok(())
}

/// All zeroes (a fresh VM).
#[derive(Debug, Clone, Copy)]
pub struct ZeroSource {
    /// Length in bytes.
    pub len: u64,
}

impl PageSource for ZeroSource {
    fn len(&self) -> u64 {
        self.len
    }
    fn fill(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(self, offset, buf.len())?;
        buf.fill(0);
        Ok(())
    }
    fn is_zero(&self, _offset: u64, _len: u64) -> bool {
        true
    }
}

/// An image in a [`chunkstore::Store`]; offsets are image offsets.
#[derive(Debug, Clone)]
pub struct ChunkSource {
    store: Arc<Store>,
    manifest: Arc<Manifest>,
}

impl ChunkSource {
    /// Serve image `manifest` from `store`.
    pub fn new(store: Arc<Store>, manifest: Arc<Manifest>) -> Self {
        ChunkSource { store, manifest }
    }
}

impl PageSource for ChunkSource {
    fn len(&self) -> u64 {
        self.manifest.page_count() * self.manifest.page_size() as u64
    }
    fn fill(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(self, offset, buf.len())?;
        let ps = self.manifest.page_size() as u64;
        let blen = buf.len() as u64;
        let err = |e: chunkstore::Error| Error::Source { offset, len: blen, reason: e.to_string() };
        if offset.is_multiple_of(ps) && (buf.len() as u64).is_multiple_of(ps) {
            return self.store.read_pages(&self.manifest, offset / ps, buf).map_err(err);
        }
        // Image pages larger than the host pages asked for (e.g. 8 KiB
        // chunks, 4 KiB faults): read the covering pages and copy out.
        let first = offset / ps;
        let end = (offset + buf.len() as u64).div_ceil(ps);
        let mut tmp = vec![0u8; ((end - first) * ps) as usize];
        self.store.read_pages(&self.manifest, first, &mut tmp).map_err(err)?;
        let skip = (offset - first * ps) as usize;
        buf.copy_from_slice(&tmp[skip..skip + buf.len()]);
        Ok(())
    }
    fn is_zero(&self, offset: u64, len: u64) -> bool {
        let ps = self.manifest.page_size() as u64;
        let first = offset / ps;
        let end = offset.saturating_add(len).div_ceil(ps);
        len > 0 && self.manifest.all_zero(first, end - first)
    }
}

/// A raw memory file (e.g. a Firecracker `mem` snapshot), read with `pread`.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    base: u64,
    len: u64,
}

impl FileSource {
    /// Serve `len` bytes of `file` starting at `base`.
    pub fn new(file: File, base: u64, len: u64) -> Self {
        FileSource { file, base, len }
    }
    /// Serve the whole file.
    pub fn whole(file: File) -> Result<Self> {
        let len = file.metadata().map_err(crate::error::sys("stat memory file"))?.len();
        Ok(FileSource::new(file, 0, len))
    }
}

impl PageSource for FileSource {
    fn len(&self) -> u64 {
        self.len
    }
    fn fill(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(self, offset, buf.len())?;
        self.file.read_exact_at(buf, self.base + offset).map_err(|e| Error::Source {
            offset,
            len: buf.len() as u64,
            reason: format!("pread: {e}"),
        })
    }
}

/// Memory of a frozen (paused, not mutating) VM or process mapped into this
/// process — the parent side of a fork.
#[derive(Debug)]
pub struct MemSource {
    ptr: *const u8,
    len: u64,
}

// SAFETY: MemSource only reads through `ptr`; the creator promised (see
// `MemSource::new`) the memory stays mapped and unchanged while it lives.
unsafe impl Send for MemSource {}
// SAFETY: as above; concurrent reads of immutable memory are fine.
unsafe impl Sync for MemSource {}

impl MemSource {
    /// Serve `len` bytes at `ptr`.
    ///
    /// # Safety
    ///
    /// `[ptr, ptr+len)` must stay mapped and readable, and must not be
    /// written, for the lifetime of the returned value (and its clones
    /// held by a server).
    pub unsafe fn new(ptr: *const u8, len: u64) -> Self {
        MemSource { ptr, len }
    }
}

impl PageSource for MemSource {
    fn len(&self) -> u64 {
        self.len
    }
    fn fill(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(self, offset, buf.len())?;
        // SAFETY: offset + len <= self.len (checked above), so the pointer
        // stays inside the mapping promised by `new`.
        let start = unsafe { self.ptr.add(offset as usize) };
        // SAFETY: per the contract of `new` the range is mapped, readable and
        // not mutated while we live.
        let src = unsafe { std::slice::from_raw_parts(start, buf.len()) };
        buf.copy_from_slice(src);
        Ok(())
    }
}

impl<T: PageSource + ?Sized> PageSource for Arc<T> {
    fn len(&self) -> u64 {
        (**self).len()
    }
    fn fill(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        (**self).fill(offset, buf)
    }
    fn is_zero(&self, offset: u64, len: u64) -> bool {
        (**self).is_zero(offset, len)
    }
}
