//! The hash that ties a memory image to its `state`: blake3 over the image in 2 MiB blocks.
//!
//! The image (guest RAM regions concatenated) is cut into blocks of [`BLOCK`] bytes that never
//! cross a RAM region. Each block gets a 32-byte hash, all zeros for a block with nothing to
//! restore; the image hash is blake3 of the block hashes in order, written as hex.
//! - full image: block hash = blake3(block bytes), zeros if every byte is zero (holes read as
//!   zeros, so a full image hashes the same however sparse the file system keeps it);
//! - diff image: only the pages present in the file are restored, so the block hash covers
//!   which pages are present: blake3(presence bitmap (64 bytes) ‖ block bytes, absent pages as
//!   zeros), zeros if no page is present.
//!
//! Writers hash guest memory (the bytes they write); restores hash the file they read. Blocks
//! are hashed by up to [`THREADS`] threads; skipping a block costs a zero check, so mostly-empty
//! guests hash fast.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::memory_file::{data_extents, MemoryFileError};
use crate::vstate::memory::{ram_ranges, GuestMem, PAGE_SIZE};

/// Bytes per hashed block.
pub const BLOCK: u64 = 2 << 20;
/// Threads hashing blocks.
pub const THREADS: usize = 2;
const BITMAP: usize = (BLOCK / PAGE_SIZE / 8) as usize;

/// Image blocks (offset, len) for a guest of `mem_size` bytes.
pub(crate) fn blocks(mem_size: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut image_off = 0;
    for (_, len) in ram_ranges(mem_size) {
        let mut o = 0;
        while o < len {
            let l = BLOCK.min(len - o);
            out.push((image_off + o, l));
            o += l;
        }
        image_off += len;
    }
    out
}

fn is_zero(b: &[u8]) -> bool {
    chunkstore::is_zero(b)
}

fn root(hashes: &[[u8; 32]]) -> String {
    let mut h = blake3::Hasher::new();
    for b in hashes {
        h.update(b);
    }
    h.finalize().to_hex().to_string()
}

/// Hashes every block with `f` on [`THREADS`] threads; the hashes come back in block order.
/// Threads take the next block as they finish one (guest data often sits in the low part of
/// memory: halves per thread left one thread all the work). The first error stops the others
/// at their next block.
pub(crate) fn hash_blocks<E: Send>(
    blocks: &[(u64, u64)],
    f: impl Fn(u64, u64, &mut Vec<u8>) -> Result<[u8; 32], E> + Sync,
) -> Result<Vec<[u8; 32]>, E> {
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS.min(blocks.len()).max(1))
            .map(|_| {
                let (f, next) = (&f, &next);
                s.spawn(move || {
                    let mut buf = Vec::new();
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Relaxed);
                        let Some(&(o, l)) = blocks.get(i) else { return Ok(done) };
                        match f(o, l, &mut buf) {
                            Ok(h) => done.push((i, h)),
                            Err(e) => {
                                next.store(blocks.len(), Relaxed);
                                return Err(e);
                            }
                        }
                    }
                })
            })
            .collect();
        let mut out = vec![[0u8; 32]; blocks.len()];
        let mut err = None;
        for h in handles {
            match h.join() {
                Ok(Ok(done)) => done.into_iter().for_each(|(i, x)| out[i] = x),
                Ok(Err(e)) => err = err.or(Some(e)),
                Err(p) => std::panic::resume_unwind(p),
            }
        }
        err.map_or(Ok(out), Err)
    })
}

pub(crate) fn full_block(bytes: &[u8]) -> [u8; 32] {
    if is_zero(bytes) {
        [0; 32]
    } else {
        *blake3::hash(bytes).as_bytes()
    }
}

fn diff_block(present: &[u8; BITMAP], bytes: &[u8]) -> [u8; 32] {
    if present.iter().all(|&b| b == 0) {
        return [0; 32];
    }
    let mut h = blake3::Hasher::new();
    h.update(present);
    h.update(bytes);
    *h.finalize().as_bytes()
}

/// Guest bytes of image range [off, off+len) (inside one region).
fn mem_slice(mem: &GuestMem, off: u64, len: u64) -> &[u8] {
    for r in mem.regions() {
        if off >= r.file_offset && off + len <= r.file_offset + r.size {
            let p = r.host.wrapping_add((off - r.file_offset) as usize);
            // SAFETY: the range lies inside this region's mapping, owned by `mem` (borrowed for
            // the slice's lifetime); the VM is paused while its memory is hashed.
            return unsafe { std::slice::from_raw_parts(p, len as usize) };
        }
    }
    &[]
}

/// Hash of a full image of `mem` (what [`super::memory_file::write_full`] writes).
pub fn of_memory_full(mem: &GuestMem) -> String {
    root(&full_blocks_of_memory(mem))
}

/// Block hashes of a full image of `mem`. Pages that cannot hold data (holes of a memory file,
/// see [`super::data_pages`]) are hashed as zeros without being read.
pub fn full_blocks_of_memory(mem: &GuestMem) -> Vec<[u8; 32]> {
    let mask = super::data_pages::of_memory(mem);
    let hashes: Result<_, ()> = hash_blocks(&blocks(mem.size()), |o, l, buf| {
        let src = mem_slice(mem, o, l);
        let Some(mask) = &mask else {
            return Ok(full_block(src));
        };
        let first = o / PAGE_SIZE;
        let n = l / PAGE_SIZE;
        let have = (0..n).filter(|&p| super::data_pages::bit(mask, first + p)).count() as u64;
        if have == 0 {
            return Ok([0; 32]);
        }
        if have == n {
            return Ok(full_block(src));
        }
        buf.clear();
        buf.resize(l as usize, 0);
        for p in (0..n).filter(|&p| super::data_pages::bit(mask, first + p)) {
            let r = (p * PAGE_SIZE) as usize..((p + 1) * PAGE_SIZE) as usize;
            buf[r.clone()].copy_from_slice(&src[r]);
        }
        Ok(full_block(buf))
    });
    hashes.unwrap_or_default()
}

/// The image hash (hex) of its block hashes.
pub fn root_of(blocks: &[[u8; 32]]) -> String {
    root(blocks)
}

fn bit(bm: &[u64], page: u64) -> bool {
    bm.get((page / 64) as usize).is_some_and(|w| w & (1 << (page % 64)) != 0)
}

/// Hash of a diff image of `mem` holding the pages set in `dirty`.
pub fn of_memory_diff(mem: &GuestMem, dirty: &[u64]) -> String {
    let hashes: Result<_, ()> = hash_blocks(&blocks(mem.size()), |o, l, buf| {
        let mut present = [0u8; BITMAP];
        let first = o / PAGE_SIZE;
        for p in 0..l / PAGE_SIZE {
            if bit(dirty, first + p) {
                present[(p / 8) as usize] |= 1 << (p % 8);
            }
        }
        if present.iter().all(|&b| b == 0) {
            return Ok([0; 32]);
        }
        let src = mem_slice(mem, o, l);
        buf.clear();
        buf.resize(l as usize, 0);
        for p in 0..l / PAGE_SIZE {
            if bit(dirty, first + p) {
                let r = (p * PAGE_SIZE) as usize..((p + 1) * PAGE_SIZE) as usize;
                buf[r.clone()].copy_from_slice(&src[r]);
            }
        }
        Ok(diff_block(&present, buf))
    });
    root(&hashes.unwrap_or_default())
}

/// Hash of the image file `f` of a `mem_size` guest, full or diff.
pub fn of_file(f: &File, path: &Path, mem_size: u64, diff: bool) -> Result<String, MemoryFileError> {
    let extents = data_extents(f, path)?;
    let io = |err| MemoryFileError::Io { path: path.display().to_string(), err };
    let hashes = hash_blocks(&blocks(mem_size), |o, l, buf| {
        let mut present = [0u8; BITMAP];
        let mut any = false;
        for &(eo, el) in &extents {
            let (s, e) = (eo.max(o), (eo + el).min(o + l));
            if s >= e {
                continue;
            }
            any = true;
            for p in (s - o) / PAGE_SIZE..(e - o).div_ceil(PAGE_SIZE) {
                present[(p / 8) as usize] |= 1 << (p % 8);
            }
        }
        if !any {
            return Ok([0; 32]);
        }
        buf.clear();
        buf.resize(l as usize, 0);
        f.read_exact_at(buf, o).map_err(io)?;
        Ok(if diff { diff_block(&present, buf) } else { full_block(buf) })
    })?;
    Ok(root(&hashes))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::persist::memory_file::{open, write_diff, write_full};
    use crate::vstate::memory::Backing;

    #[test]
    fn file_and_memory_hashes_agree_and_catch_changes() {
        let dir = std::env::temp_dir().join(format!("forkvm-imghash-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let m = GuestMem::new(8 << 20, Backing::Anon, false).unwrap();
        m.fill(0x10000, 3 * 4096, 0xaa);
        m.fill(0x500000, 4096, 0xbb);
        let full = dir.join("full");
        write_full(&m, &full).unwrap();
        let hf = of_file(&open(&full, 8 << 20).unwrap(), &full, 8 << 20, false).unwrap();
        assert_eq!(hf, of_memory_full(&m));
        m.take_host_dirty();
        m.fill(0x11000, 4096, 0);
        let dirty = m.take_host_dirty();
        let diff = dir.join("diff");
        write_diff(&m, &diff, &dirty).unwrap();
        let hd = of_file(&open(&diff, 8 << 20).unwrap(), &diff, 8 << 20, true).unwrap();
        assert_eq!(hd, of_memory_diff(&m, &dirty));
        assert_ne!(hd, of_memory_diff(&m, &vec![0; dirty.len()]), "a zero page present differs from absent");
        std::fs::OpenOptions::new().write(true).open(&full).unwrap().write_all_at(&[1], 0x600000).unwrap();
        assert_ne!(of_file(&open(&full, 8 << 20).unwrap(), &full, 8 << 20, false).unwrap(), hf);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hash_blocks_keeps_block_order_and_stops_at_an_error() {
        let blocks: Vec<(u64, u64)> = (0..97u64).map(|i| (i * BLOCK, BLOCK)).collect();
        let got = hash_blocks(&blocks, |o, _, _| Ok::<_, ()>(*blake3::hash(&o.to_le_bytes()).as_bytes())).unwrap();
        let want: Vec<[u8; 32]> = blocks.iter().map(|(o, _)| *blake3::hash(&o.to_le_bytes()).as_bytes()).collect();
        assert_eq!(got, want);
        let r = hash_blocks(&blocks, |o, _, _| if o == 10 * BLOCK { Err(o) } else { Ok([0; 32]) });
        assert_eq!(r, Err(10 * BLOCK));
    }
}
