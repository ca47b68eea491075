//! Memory images on disk: the guest's RAM regions concatenated, one file per snapshot. A full
//! image leaves all-zero pages as holes; a diff image holds only the pages dirtied since its base
//! (everything else is a hole). Restores find the data with SEEK_DATA/SEEK_HOLE, so they never
//! touch a guest page that has nothing to restore.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::vstate::memory::{GuestMem, PAGE_SIZE};

/// Errors reading or writing memory images.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    #[error("memory image {path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error("memory image {path} is {actual} bytes, the snapshot's guest has {expected}")]
    Size { path: String, actual: u64, expected: u64 },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> MemoryFileError + '_ {
    move |err| MemoryFileError::Io { path: path.display().to_string(), err }
}

fn is_zero(b: &[u8]) -> bool {
    // Compare as u128 words; pages are 16-byte aligned in practice but do not rely on it.
    let (pre, mid, post) = {
        // SAFETY: u128 has no invalid bit patterns; align_to only reinterprets initialized bytes.
        unsafe { b.align_to::<u128>() }
    };
    pre.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && post.iter().all(|&x| x == 0)
}

/// Writes runs of pages selected by `want(page_index)` from guest memory into `file` at their
/// image offsets. Returns the number of pages written.
fn write_pages(
    mem: &GuestMem,
    file: &File,
    path: &Path,
    want: impl Fn(u64, &[u8]) -> bool,
) -> Result<u64, MemoryFileError> {
    let mut written = 0;
    for r in mem.regions() {
        // SAFETY: the region's mapping is owned by `mem` and stays mapped while we read it; the
        // guest is paused so the bytes are stable.
        let bytes = unsafe { std::slice::from_raw_parts(r.host.cast_const(), r.size as usize) };
        let pages = r.size / PAGE_SIZE;
        let mut p = 0;
        while p < pages {
            let page = |i: u64| &bytes[(i * PAGE_SIZE) as usize..((i + 1) * PAGE_SIZE) as usize];
            let global = |i: u64| (r.file_offset / PAGE_SIZE) + i;
            if !want(global(p), page(p)) {
                p += 1;
                continue;
            }
            let start = p;
            while p < pages && p - start < 512 && want(global(p), page(p)) {
                p += 1;
            }
            let run = &bytes[(start * PAGE_SIZE) as usize..(p * PAGE_SIZE) as usize];
            file.write_all_at(run, r.file_offset + start * PAGE_SIZE).map_err(io(path))?;
            written += p - start;
        }
    }
    Ok(written)
}

/// A new private (0600) image file; never an existing file, never through a symlink.
fn create(path: &Path, size: u64) -> Result<File, MemoryFileError> {
    let f = chunkstore::private::create_file(path).map_err(io(path))?;
    f.set_len(size).map_err(io(path))?;
    Ok(f)
}

/// Full image: every non-zero page. Returns pages written. Memory backed by a file reads only
/// the pages that can hold data (see [`super::data_pages`]): its holes are never faulted in.
pub fn write_full(mem: &GuestMem, path: &Path) -> Result<u64, MemoryFileError> {
    let f = create(path, mem.size())?;
    let mask = super::data_pages::of_memory(mem);
    let has_data = |i: u64| mask.as_ref().is_none_or(|m| super::data_pages::bit(m, i));
    let n = write_pages(mem, &f, path, |i, page| has_data(i) && !is_zero(page))?;
    f.sync_data().map_err(io(path))?;
    Ok(n)
}

/// Diff image: the pages whose bit is set in `dirty` (one bit per page of the image).
pub fn write_diff(mem: &GuestMem, path: &Path, dirty: &[u64]) -> Result<u64, MemoryFileError> {
    let f = create(path, mem.size())?;
    let bit = |i: u64| dirty.get((i / 64) as usize).is_some_and(|w| w & (1 << (i % 64)) != 0);
    let n = write_pages(mem, &f, path, |i, _| bit(i))?;
    f.sync_data().map_err(io(path))?;
    Ok(n)
}

/// Opens an image and checks it matches the guest size.
pub fn open(path: &Path, expected: u64) -> Result<File, MemoryFileError> {
    let f = File::open(path).map_err(io(path))?;
    let actual = f.metadata().map_err(io(path))?.len();
    if actual != expected {
        return Err(MemoryFileError::Size { path: path.display().to_string(), actual, expected });
    }
    Ok(f)
}

/// The data extents of a (sparse) file as (offset, len).
pub fn data_extents(f: &File, path: &Path) -> Result<Vec<(u64, u64)>, MemoryFileError> {
    let size = f.metadata().map_err(io(path))?.len();
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < size {
        // SAFETY: lseek on our own descriptor; errors are checked.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no more data
            }
            return Err(io(path)(e));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io(path)(std::io::Error::last_os_error()));
        }
        out.push((data as u64, (hole - data) as u64));
        pos = hole;
    }
    Ok(out)
}

/// Copies the data extents of an image into guest memory (eager restore, or applying a diff on
/// top of a copy-on-write base). Returns bytes copied.
pub fn apply(mem: &GuestMem, f: &File, path: &Path) -> Result<u64, MemoryFileError> {
    let mut copied = 0;
    for (off, len) in data_extents(f, path)? {
        for r in mem.regions() {
            let start = off.max(r.file_offset);
            let end = (off + len).min(r.file_offset + r.size);
            if start >= end {
                continue;
            }
            let host = r.host.wrapping_add((start - r.file_offset) as usize);
            // SAFETY: [host, host + (end - start)) lies inside this region's mapping, owned by
            // `mem`; the VM is not running while it is restored.
            let dst = unsafe { std::slice::from_raw_parts_mut(host, (end - start) as usize) };
            f.read_exact_at(dst, start).map_err(io(path))?;
            copied += end - start;
        }
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::Backing;

    #[test]
    fn full_and_diff_round_trip() {
        let dir = std::env::temp_dir().join(format!("forkvm-memfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let m = GuestMem::new(8 << 20, Backing::Anon, false).unwrap();
        m.fill(0x10000, 3 * 4096, 0xaa);
        let full = dir.join("full");
        assert_eq!(write_full(&m, &full).unwrap(), 3);
        m.take_host_dirty();
        m.fill(0x11000, 4096, 0xbb);
        m.fill(0x10000, 4096, 0);
        let diff = dir.join("diff");
        assert_eq!(write_diff(&m, &diff, &m.take_host_dirty()).unwrap(), 2);

        let r = GuestMem::new(8 << 20, Backing::Anon, false).unwrap();
        apply(&r, &open(&full, 8 << 20).unwrap(), &full).unwrap();
        apply(&r, &open(&diff, 8 << 20).unwrap(), &diff).unwrap();
        let mut a = vec![0u8; 8 << 20];
        let mut b = vec![0u8; 8 << 20];
        assert!(m.read(0, &mut a));
        assert!(r.read(0, &mut b));
        assert!(a == b, "restored memory differs");
        assert!(matches!(open(&full, 16 << 20), Err(MemoryFileError::Size { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
