//! Eager restore of a full memory image: the data extents are read straight into guest memory
//! by [`THREADS`] threads, one 2 MiB hash block at a time, and each block is hashed from guest
//! memory right after its copy (while it is still in the CPU caches). What the guest will run on
//! is exactly what was checked: the file is read once, and a change to it during the restore
//! cannot slip past the hash.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::image_hash::{blocks, full_block, hash_blocks};
use super::memory_file::{data_extents, MemoryFileError};
use crate::vstate::memory::GuestMem;

/// Host address of image range [off, off+len) if it lies inside one region of `mem`.
fn host_ptr(mem: &GuestMem, off: u64, len: u64) -> Option<*mut u8> {
    let r = mem.regions().iter().find(|r| off >= r.file_offset && off + len <= r.file_offset + r.size)?;
    Some(r.host.wrapping_add((off - r.file_offset) as usize))
}

/// Copies the full image `f` into `mem` (fresh, zeroed). Returns the block hashes of what was
/// copied when `hash` (see [`super::image_hash`]), and the bytes copied.
pub fn load(mem: &GuestMem, f: &File, path: &Path, hash: bool) -> Result<(Vec<[u8; 32]>, u64), MemoryFileError> {
    let extents = data_extents(f, path)?;
    let io = |err| MemoryFileError::Io { path: path.display().to_string(), err };
    let copied = std::sync::atomic::AtomicU64::new(0);
    let hashes = hash_blocks(&blocks(mem.size()), |o, l, _| {
        // Extents are sorted and disjoint: the first that ends after `o`, then on.
        let first = extents.partition_point(|&(eo, el)| eo + el <= o);
        let mut any = false;
        for &(eo, el) in extents[first..].iter().take_while(|&&(eo, _)| eo < o + l) {
            let (s, e) = (eo.max(o), (eo + el).min(o + l));
            let p = host_ptr(mem, s, e - s).ok_or_else(|| {
                io(std::io::Error::new(std::io::ErrorKind::InvalidData, "image range outside guest memory"))
            })?;
            // SAFETY: [p, p + (e - s)) lies inside a mapping owned by `mem`, which outlives this
            // call; the VM does not run while its memory is restored and the threads copy
            // disjoint blocks, so nothing else accesses these bytes.
            let dst = unsafe { std::slice::from_raw_parts_mut(p, (e - s) as usize) };
            f.read_exact_at(dst, s).map_err(io)?;
            copied.fetch_add(e - s, std::sync::atomic::Ordering::Relaxed);
            any = true;
        }
        Ok(match (any && hash, host_ptr(mem, o, l)) {
            (true, Some(p)) => {
                // SAFETY: as above; this thread just wrote the block and nothing writes it now.
                full_block(unsafe { std::slice::from_raw_parts(p, l as usize) })
            }
            _ => [0; 32],
        })
    })?;
    Ok((if hash { hashes } else { Vec::new() }, copied.into_inner()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::persist::image_hash::{of_file, of_memory_full, root_of};
    use crate::persist::memory_file::{open, write_full};
    use crate::vstate::memory::Backing;

    #[test]
    fn loads_exactly_the_image_and_hashes_it() {
        let dir = std::env::temp_dir().join(format!("forkvm-loadfull-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let m = GuestMem::new(8 << 20, Backing::Anon, false).unwrap();
        m.fill(0x10000, 3 * 4096, 0xaa);
        m.fill(0x3ff000, 8192, 0xbb);
        m.fill(0x7ff000, 4096, 0xcc);
        let full = dir.join("full");
        write_full(&m, &full).unwrap();
        let f = open(&full, 8 << 20).unwrap();
        let r = GuestMem::new(8 << 20, Backing::Anon, true).unwrap();
        let (hashes, copied) = load(&r, &f, &full, true).unwrap();
        assert_eq!(root_of(&hashes), of_memory_full(&m));
        assert_eq!(root_of(&hashes), of_file(&f, &full, 8 << 20, false).unwrap());
        assert!(copied >= 6 * 4096);
        let (mut a, mut b) = (vec![0u8; 8 << 20], vec![0u8; 8 << 20]);
        assert!(m.read(0, &mut a) && r.read(0, &mut b));
        assert!(a == b, "restored memory differs");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
