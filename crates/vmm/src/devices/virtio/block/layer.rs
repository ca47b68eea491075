//! Pieces of a copy-on-write disk: the block bitmap of an overlay, frozen overlay layers, the
//! read-only base image, and private scratch files (unnamed `O_TMPFILE` overlays).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Copy-on-write granularity: the guest filesystem's block size.
pub const BLOCK: u64 = 4096;
/// virtio-blk's sector.
pub const SECTOR: u64 = 512;
/// Largest disk accepted (bounds the bitmaps: 2 MiB of bits per layer at 64 TiB... kept at 16 TiB).
pub const MAX_DISK: u64 = 16 << 40;

/// One bit per block: the block is held by this layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    blocks: u64,
}

impl Bitmap {
    pub fn new(blocks: u64) -> Self {
        Bitmap { words: vec![0; blocks.div_ceil(64) as usize], blocks }
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    pub fn get(&self, b: u64) -> bool {
        self.words.get((b / 64) as usize).is_some_and(|w| w & (1 << (b % 64)) != 0)
    }

    pub fn set(&mut self, b: u64) {
        if let Some(w) = self.words.get_mut((b / 64) as usize) {
            *w |= 1 << (b % 64);
        }
    }

    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Runs of set blocks: (first block, count).
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for b in 0..self.blocks {
            if self.words[(b / 64) as usize] == 0 {
                continue;
            }
            if self.get(b) {
                match out.last_mut() {
                    Some((s, n)) if *s + *n == b => *n += 1,
                    _ => out.push((b, 1)),
                }
            }
        }
        out
    }

    /// A bitmap from runs read from an untrusted file: every run must lie inside `blocks`.
    pub fn from_runs(blocks: u64, runs: &[(u64, u64)]) -> Result<Self, String> {
        let mut m = Bitmap::new(blocks);
        for &(s, n) in runs {
            let end = s.checked_add(n).filter(|&e| e <= blocks && n > 0);
            let Some(end) = end else {
                return Err(format!("block run {s}+{n} lies outside a {blocks}-block disk"));
            };
            for b in s..end {
                m.set(b);
            }
        }
        Ok(m)
    }
}

/// A frozen overlay: never written again; shared by every VM (and fork child) above it.
///
/// Freezing does not fsync it: a layer is an unnamed file until a snapshot links it, so no
/// host crash could leave anything that names it, and an fsync there would buy no durability.
/// [`Layer::sync`] runs once, when a snapshot first links the layer (before the snapshot's
/// maps and state name it).
#[derive(Debug)]
pub struct Layer {
    /// Random id: names the layer's files in snapshot directories.
    pub id: String,
    pub file: File,
    pub map: Bitmap,
    /// Its data is known to be on stable storage (synced once, or read from a snapshot).
    synced: AtomicBool,
}

impl Layer {
    pub fn new(id: String, file: File, map: Bitmap, synced: bool) -> Self {
        Layer { id, file, map, synced: AtomicBool::new(synced) }
    }

    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Puts the layer's data on stable storage (once: a frozen layer never changes).
    pub fn sync(&self) -> io::Result<()> {
        if !self.is_synced() {
            self.file.sync_data()?;
            self.synced.store(true, Ordering::Release);
        }
        Ok(())
    }
}

/// The raw base image, opened read-only.
#[derive(Debug)]
pub struct Base {
    pub file: File,
    pub path: PathBuf,
    pub len: u64,
    pub mtime_ns: i64,
}

fn mtime_ns(m: &std::fs::Metadata) -> i64 {
    m.mtime().saturating_mul(1_000_000_000).saturating_add(m.mtime_nsec())
}

impl Base {
    /// Opens and checks a raw disk image: a non-empty regular file of whole sectors.
    pub fn open(path: &Path) -> Result<Self, String> {
        let file = File::open(path).map_err(|e| format!("cannot open disk image {}: {e}", path.display()))?;
        let m = file.metadata().map_err(|e| format!("cannot stat disk image {}: {e}", path.display()))?;
        if !m.is_file() {
            return Err(format!("disk image {} is not a regular file", path.display()));
        }
        let len = m.len();
        if len == 0 || !len.is_multiple_of(SECTOR) {
            return Err(format!(
                "disk image {} is {len} bytes: a raw image must be a non-empty whole number of {SECTOR}-byte sectors",
                path.display()
            ));
        }
        if len > MAX_DISK {
            return Err(format!("disk image {} is larger than {} TiB", path.display(), MAX_DISK >> 40));
        }
        let path = path.canonicalize().map_err(|e| format!("cannot resolve {}: {e}", path.display()))?;
        Ok(Base { file, path, len, mtime_ns: mtime_ns(&m) })
    }

    /// Reopens the base of a saved disk, refusing one that changed since (size or mtime).
    pub fn reopen(path: &Path, len: u64, mtime: i64) -> Result<Self, String> {
        let b = Base::open(path)?;
        if b.len != len || b.mtime_ns != mtime {
            return Err(format!(
                "disk image {} changed since the snapshot (size {} -> {}, or modified): the saved disk would be corrupt",
                path.display(),
                len,
                b.len
            ));
        }
        Ok(b)
    }
}

/// A fresh random id (hex).
pub fn random_id() -> String {
    let mut b = [0u8; 12];
    // SAFETY: getrandom writes at most b.len() bytes into our buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let h = blake3::hash(&[t.as_nanos().to_le_bytes(), u128::from(std::process::id()).to_le_bytes()].concat());
        b.copy_from_slice(&h.as_bytes()[..12]);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A private, unnamed, sparse file of `len` bytes in `dir` (O_TMPFILE; on a filesystem without
/// it, a private named file unlinked at once). Linkable later with [`link_fd`].
pub fn scratch_file(dir: &Path, len: u64) -> io::Result<File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(0o600)
        .open(dir)
        .or_else(|_| {
            let p = dir.join(format!(".overlay-{}", random_id()));
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_NOFOLLOW)
                .mode(0o600)
                .open(&p)?;
            let _ = std::fs::remove_file(&p);
            Ok::<File, io::Error>(f)
        })?;
    f.set_len(len)?;
    Ok(f)
}

/// Links an open file (named, or unnamed from O_TMPFILE) at `dst` through /proc/self/fd.
pub fn link_fd(file: &File, dst: &Path) -> io::Result<()> {
    let src = std::ffi::CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    let dst = std::ffi::CString::new(dst.as_os_str().as_bytes())?;
    // SAFETY: both paths are valid NUL-terminated strings; linkat only reads them.
    let rc =
        unsafe { libc::linkat(libc::AT_FDCWD, src.as_ptr(), libc::AT_FDCWD, dst.as_ptr(), libc::AT_SYMLINK_FOLLOW) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Copies the blocks a layer holds into a new private file at `dst` (when linking is not
/// possible: another filesystem, or an unnamed file that was once named and then deleted).
pub fn copy_layer(layer: &Layer, len: u64, dst: &Path) -> io::Result<()> {
    let tmp = dst.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(&tmp)?;
    out.set_len(len)?;
    let mut buf = vec![0u8; 1 << 20];
    for (s, n) in layer.map.runs() {
        let (mut off, end) = (s * BLOCK, ((s + n) * BLOCK).min(len));
        while off < end {
            let k = ((end - off) as usize).min(buf.len());
            layer.file.read_exact_at(&mut buf[..k], off)?;
            out.write_all_at(&buf[..k], off)?;
            off += k as u64;
        }
    }
    out.sync_all()?;
    std::fs::rename(&tmp, dst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_runs_round_trip() {
        let mut m = Bitmap::new(300);
        for b in [0, 1, 2, 64, 65, 299] {
            m.set(b);
        }
        assert_eq!(m.runs(), vec![(0, 3), (64, 2), (299, 1)]);
        assert_eq!(Bitmap::from_runs(300, &m.runs()), Ok(m.clone()));
        assert_eq!(m.count(), 6);
        assert!(Bitmap::from_runs(300, &[(299, 2)]).is_err());
        assert!(Bitmap::from_runs(300, &[(u64::MAX, 2)]).is_err());
        assert!(Bitmap::from_runs(300, &[(3, 0)]).is_err());
    }
}
