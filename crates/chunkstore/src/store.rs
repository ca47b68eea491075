//! The store: a directory holding `pack`, `index` and `manifests/*.manifest`.

use std::cell::RefCell;
use std::collections::HashSet;
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::codec::{self, Codec};
use crate::error::{io_err, Error, Result};
use crate::hash::ChunkHash;
use crate::index::{Index, IndexEntry, MAX_RAW_LEN};
use crate::manifest::{Manifest, PageRef, ZERO_REF};
use crate::pack::Pack;
use crate::stats::{SpaceStats, VerifyReport};
use crate::writer::ImageWriter;

/// How new images are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreConfig {
    /// Page (chunk) size in bytes: a power of two, 512 B ..= 1 MiB (4096 default, 8192 common).
    pub page_size: usize,
    /// Compression codec for new chunks.
    pub codec: Codec,
    /// zstd level (ignored for lz4).
    pub level: i32,
    /// Threads used to hash and compress while writing (1 or 2 sensible here).
    pub threads: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig { page_size: 4096, codec: Codec::Zstd, level: 3, threads: 2 }
    }
}

impl StoreConfig {
    pub(crate) fn check(&self) -> Result<()> {
        let ps = self.page_size;
        if !ps.is_power_of_two() || !(512..=MAX_RAW_LEN as usize).contains(&ps) {
            return Err(Error::InvalidArgument(format!(
                "page size {ps} must be a power of two between 512 and {MAX_RAW_LEN}"
            )));
        }
        if self.codec == Codec::Zstd && !zstd::compression_level_range().contains(&self.level) {
            return Err(Error::InvalidArgument(format!(
                "zstd level {} out of range {:?}",
                self.level,
                zstd::compression_level_range()
            )));
        }
        Ok(())
    }
}

/// A content-addressed page store. `Sync`: share it with `Arc` between the
/// fault-serving and prefetch threads. One writer at a time (writes are
/// serialised internally; other processes are kept out by a lock file).
#[derive(Debug)]
pub struct Store {
    pub(crate) dir: PathBuf,
    pub(crate) config: StoreConfig,
    pub(crate) pack: Pack,
    pub(crate) index: RwLock<Index>,
    pub(crate) write_lock: Mutex<()>,
    writable: bool,
    _lock_file: Option<File>,
}

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Largest pack range read with a single `pread` when serving a batch.
const MAX_COALESCED_READ: u64 = 4 << 20;

impl Store {
    /// Open the store in `dir`, creating it if needed, for reading and writing. Fails with
    /// [`Error::Locked`] at once if another writer holds the store (see
    /// [`Store::open_or_create_wait`]).
    pub fn open_or_create(dir: impl AsRef<Path>, config: StoreConfig) -> Result<Self> {
        Self::open_or_create_wait(dir, config, Duration::ZERO)
    }

    /// Like [`Store::open_or_create`], but waits up to `max_wait` for another writer (a
    /// hibernation, a gc) to release the store.
    pub fn open_or_create_wait(dir: impl AsRef<Path>, config: StoreConfig, max_wait: Duration) -> Result<Self> {
        config.check()?;
        let dir = dir.as_ref().to_path_buf();
        crate::private::ensure_dir(&dir).map_err(io_err(&dir))?;
        crate::private::ensure_dir(&dir.join("manifests")).map_err(io_err(&dir))?;
        let lock_path = dir.join("LOCK");
        let lock = crate::private::open_append(&lock_path).map_err(io_err(&lock_path))?;
        lock_exclusive(&lock, max_wait).map_err(|()| Error::Locked(dir.clone()))?;
        let index_path = dir.join("index");
        let index = if index_path.exists() { Index::load(&index_path)? } else { Index::new() };
        let pack = Pack::open(&dir.join("pack"), true, index.pack_len)?;
        if !index_path.exists() {
            pack.sync()?;
            index.save(&index_path)?;
        }
        Ok(Store {
            dir,
            config,
            pack,
            index: RwLock::new(index),
            write_lock: Mutex::new(()),
            writable: true,
            _lock_file: Some(lock),
        })
    }

    /// Open an existing store for reading only (no lock is taken).
    pub fn open_readonly(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let index = Index::load(&dir.join("index"))?;
        let pack = Pack::open(&dir.join("pack"), false, index.pack_len)?;
        Ok(Store {
            dir,
            config: StoreConfig::default(),
            pack,
            index: RwLock::new(index),
            write_lock: Mutex::new(()),
            writable: false,
            _lock_file: None,
        })
    }

    /// Re-read the index from disk, to see images written by another
    /// process since this store was opened (read-only stores).
    pub fn reload_index(&self) -> Result<()> {
        let index = Index::load(&self.dir.join("index"))?;
        let len = self.pack.file.metadata().map_err(io_err(&self.pack.path))?.len();
        if len < index.pack_len {
            return Err(Error::PackTruncated { path: self.pack.path.clone(), expected: index.pack_len, actual: len });
        }
        let mut cur = self.index.write().map_err(|_| Error::InvalidArgument("index lock poisoned".into()))?;
        *cur = index;
        Ok(())
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The configuration new images are written with.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// True if this store was opened for writing (and holds the store lock).
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    pub(crate) fn check_name(&self, name: &str) -> Result<()> {
        self.manifest_path(name).map(drop)
    }

    fn manifest_path(&self, name: &str) -> Result<PathBuf> {
        let ok = !name.is_empty()
            && name.len() <= 128
            && !name.starts_with('.')
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !ok {
            return Err(Error::BadName(name.to_string()));
        }
        Ok(self.dir.join("manifests").join(format!("{name}.manifest")))
    }

    /// Start writing image `name` page by page (see [`ImageWriter`]).
    pub fn image_writer(&self, name: &str) -> Result<ImageWriter<'_>> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        let path = self.manifest_path(name)?;
        ImageWriter::new(self, name.to_string(), path)
    }

    /// Store a whole image held in memory. Replaces an image of the same name.
    pub fn put_image(&self, name: &str, data: &[u8]) -> Result<(Manifest, crate::PutStats)> {
        let mut w = self.image_writer(name)?;
        w.write(data)?;
        w.finish()
    }

    /// Store an image read from `reader` in page-sized pieces.
    pub fn put_image_from_reader(
        &self,
        name: &str,
        mut reader: impl std::io::Read,
    ) -> Result<(Manifest, crate::PutStats)> {
        let mut w = self.image_writer(name)?;
        let mut buf = vec![0u8; 8 << 20];
        loop {
            let n = reader.read(&mut buf).map_err(io_err("<reader>"))?;
            if n == 0 {
                break;
            }
            w.write(&buf[..n])?;
        }
        w.finish()
    }

    /// Load the manifest of image `name`.
    pub fn manifest(&self, name: &str) -> Result<Manifest> {
        let path = self.manifest_path(name)?;
        if !path.exists() {
            return Err(Error::NoSuchImage(name.to_string()));
        }
        Manifest::load(&path)
    }

    /// Names of all stored images, sorted.
    pub fn list_images(&self) -> Result<Vec<String>> {
        let d = self.dir.join("manifests");
        let mut names = Vec::new();
        for e in fs::read_dir(&d).map_err(io_err(&d))? {
            let e = e.map_err(io_err(&d))?;
            let n = e.file_name();
            if let Some(stem) = n.to_str().and_then(|s| s.strip_suffix(".manifest")) {
                names.push(stem.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    /// Delete image `name`'s manifest (and its owner). Its chunks stay until [`Store::gc`].
    pub fn remove_image(&self, name: &str) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        let path = self.manifest_path(name)?;
        fs::remove_file(&path).map_err(io_err(&path))?;
        self.remove_owner(name)
    }

    /// Location of a chunk, if stored.
    pub fn chunk_entry(&self, hash: &ChunkHash) -> Option<IndexEntry> {
        self.index.read().ok()?.map.get(hash).copied()
    }

    /// Read one page of an image into `buf` (`buf.len()` must be the page size).
    pub fn read_page(&self, m: &Manifest, page_no: u64, buf: &mut [u8]) -> Result<()> {
        self.read_pages(m, page_no, buf)
    }

    /// Read consecutive pages `first..` of an image into `buf`, whose length
    /// must be a multiple of the page size. Chunks adjacent in the pack are
    /// fetched with one `pread`; every chunk is decompressed and its blake3
    /// checked against its address, so corrupt data is never returned.
    /// On error `buf` is zeroed, so garbage is never left behind.
    pub fn read_pages(&self, m: &Manifest, first: u64, buf: &mut [u8]) -> Result<()> {
        let r = self.read_pages_inner(m, first, buf);
        if r.is_err() {
            buf.fill(0);
        }
        r
    }

    fn read_pages_inner(&self, m: &Manifest, first: u64, buf: &mut [u8]) -> Result<()> {
        let ps = m.page_size();
        if !buf.len().is_multiple_of(ps) {
            return Err(Error::InvalidArgument(format!(
                "buffer of {} bytes is not a multiple of the page size {ps}",
                buf.len()
            )));
        }
        let count = (buf.len() / ps) as u64;
        if first.checked_add(count).is_none_or(|end| end > m.page_count()) {
            return Err(Error::InvalidArgument(format!(
                "pages {first}..+{count} outside image {:?} of {} pages",
                m.name(),
                m.page_count()
            )));
        }
        // Resolve every page first, holding the index lock only briefly.
        let mut todo: Vec<(usize, ChunkHash, IndexEntry)> = Vec::new();
        {
            let index = self.index.read().map_err(|_| Error::InvalidArgument("index lock poisoned".into()))?;
            for (i, page) in buf.chunks_exact_mut(ps).enumerate() {
                match m.page(first + i as u64) {
                    Some(PageRef::Chunk(h)) => {
                        let e = *index.map.get(h).ok_or(Error::MissingChunk(*h))?;
                        if e.raw_len as usize != ps {
                            return Err(Error::CorruptChunk {
                                hash: *h,
                                reason: format!("chunk holds {} bytes but the image page size is {ps}", e.raw_len),
                            });
                        }
                        todo.push((i, *h, e));
                    }
                    _ => page.fill(0),
                }
            }
        }
        SCRATCH.with(|s| {
            let mut scratch = s.borrow_mut();
            let mut k = 0;
            while k < todo.len() {
                // Extend a run of chunks stored back to back in the pack.
                let start = todo[k].2.offset;
                let mut end = start + u64::from(todo[k].2.stored_len);
                let mut j = k + 1;
                while j < todo.len()
                    && todo[j].2.offset == end
                    && end - start + u64::from(todo[j].2.stored_len) <= MAX_COALESCED_READ
                {
                    end += u64::from(todo[j].2.stored_len);
                    j += 1;
                }
                let len = (end - start) as usize;
                if scratch.len() < len {
                    scratch.resize(len, 0);
                }
                self.pack.read_at(&mut scratch[..len], start)?;
                for (i, hash, e) in &todo[k..j] {
                    let off = (e.offset - start) as usize;
                    let src = &scratch[off..off + e.stored_len as usize];
                    let dst = &mut buf[i * ps..(i + 1) * ps];
                    decode_chunk(hash, e, src, dst)?;
                }
                k = j;
            }
            Ok(())
        })
    }

    /// Space statistics of one image.
    pub fn image_stats(&self, m: &Manifest) -> SpaceStats {
        let mut s = SpaceStats {
            images: 1,
            logical_bytes: m.image_len(),
            pages: m.page_count(),
            zero_pages: m.zero_pages(),
            ..Default::default()
        };
        if let Ok(index) = self.index.read() {
            for h in m.chunks() {
                if let Some(e) = index.map.get(h) {
                    s.unique_chunks += 1;
                    s.raw_chunk_bytes += u64::from(e.raw_len);
                    s.stored_bytes += u64::from(e.stored_len);
                }
            }
        }
        s
    }

    /// Space statistics of the whole store (all images, all chunks).
    pub fn stats(&self) -> Result<SpaceStats> {
        let mut s = SpaceStats::default();
        for name in self.list_images()? {
            let m = self.manifest(&name)?;
            s.images += 1;
            s.logical_bytes += m.image_len();
            s.pages += m.page_count();
            s.zero_pages += m.zero_pages();
        }
        if let Ok(index) = self.index.read() {
            s.unique_chunks = index.map.len() as u64;
            for e in index.map.values() {
                s.raw_chunk_bytes += u64::from(e.raw_len);
                s.stored_bytes += u64::from(e.stored_len);
            }
        }
        Ok(s)
    }

    /// Read back and check every chunk and every manifest.
    pub fn verify(&self) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        let mut entries: Vec<(ChunkHash, IndexEntry)> = match self.index.read() {
            Ok(i) => i.map.iter().map(|(h, e)| (*h, *e)).collect(),
            Err(_) => return Err(Error::InvalidArgument("index lock poisoned".into())),
        };
        entries.sort_by_key(|(_, e)| e.offset);
        let mut src = Vec::new();
        let mut dst = Vec::new();
        let mut known = HashSet::with_capacity(entries.len());
        for (h, e) in &entries {
            report.chunks_checked += 1;
            known.insert(*h);
            src.resize(e.stored_len as usize, 0);
            dst.resize(e.raw_len as usize, 0);
            let r = self.pack.read_at(&mut src, e.offset).and_then(|()| decode_chunk(h, e, &src, &mut dst));
            if let Err(err) = r {
                report.problems.push(err.to_string());
            }
        }
        for name in self.list_images()? {
            report.images_checked += 1;
            match self.manifest(&name) {
                Err(e) => report.problems.push(e.to_string()),
                Ok(m) => {
                    let missing = m.chunks().iter().filter(|h| !known.contains(h)).count();
                    if missing > 0 {
                        report.problems.push(format!("image {name:?}: {missing} chunks missing from the index"));
                    }
                }
            }
        }
        Ok(report)
    }
}

/// Takes an exclusive flock on `f`, waiting up to `max_wait` for its holder.
fn lock_exclusive(f: &File, max_wait: Duration) -> std::result::Result<(), ()> {
    let deadline = Instant::now() + max_wait;
    let mut pause = Duration::from_millis(1);
    loop {
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(());
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Decompress one chunk and check its content address.
pub(crate) fn decode_chunk(hash: &ChunkHash, e: &IndexEntry, src: &[u8], dst: &mut [u8]) -> Result<()> {
    codec::decompress(e.codec, src, dst).map_err(|reason| Error::CorruptChunk { hash: *hash, reason })?;
    if ChunkHash::of(dst) != *hash {
        return Err(Error::CorruptChunk { hash: *hash, reason: "content does not match its blake3 address".into() });
    }
    Ok(())
}

pub(crate) fn zero_ref() -> u32 {
    ZERO_REF
}
