//! Which guest pages can hold data, found without touching the others.
//!
//! Reading a hole of a shared tmpfs file through its mapping allocates a page in the file (and a
//! hole of a private file mapping a page-cache page): a snapshot that read every page of a 2 GiB
//! memfd guest grew host shmem by 2 GiB. Memory backed by a file therefore reads only the
//! file's data extents (SEEK_DATA / SEEK_HOLE) and, once frozen (mapped private), the pages the
//! guest or the VMM wrote since (anonymous copies, from /proc/self/pagemap). Anonymous memory
//! has no holes to protect: every page may be read.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::memory_file::data_extents;
use crate::vstate::memory::{GuestMem, PAGE_SIZE};

/// One bit per page of the memory image (guest RAM regions concatenated).
pub type PageMask = Vec<u64>;

pub fn bit(mask: &[u64], page: u64) -> bool {
    mask.get((page / 64) as usize).is_some_and(|w| w & (1 << (page % 64)) != 0)
}

fn set(mask: &mut [u64], page: u64) {
    if let Some(w) = mask.get_mut((page / 64) as usize) {
        *w |= 1 << (page % 64);
    }
}

/// Pages of `mem` that may hold data: None = every page (anonymous memory, or the file's
/// extents cannot be listed, then every page is read as before).
pub fn of_memory(mem: &GuestMem) -> Option<PageMask> {
    let file = mem.file()?;
    let pages = mem.size() / PAGE_SIZE;
    let mut mask = vec![0u64; pages.div_ceil(64) as usize];
    let path = std::path::Path::new("guest memory file");
    match data_extents(file, path) {
        Ok(ext) => {
            for (off, len) in ext {
                for p in off / PAGE_SIZE..(off + len).div_ceil(PAGE_SIZE).min(pages) {
                    set(&mut mask, p);
                }
            }
        }
        Err(e) => {
            tracing::warn!("cannot list the data of the guest memory file ({e}); reading all of it");
            return None;
        }
    }
    if mem.is_frozen() {
        if let Err(e) = add_private_pages(mem, &mut mask) {
            tracing::warn!("cannot read /proc/self/pagemap ({e}); reading all guest memory");
            return None;
        }
    }
    Some(mask)
}

/// pagemap bits: present, swapped, file page or shared anonymous.
const PRESENT: u64 = 1 << 63;
const SWAPPED: u64 = 1 << 62;
const FILE: u64 = 1 << 61;

/// Adds the pages of the private (frozen) mappings that are anonymous copies: written after the
/// freeze, so not in the file.
fn add_private_pages(mem: &GuestMem, mask: &mut [u64]) -> std::io::Result<()> {
    let pm = File::open("/proc/self/pagemap")?;
    let mut buf = vec![0u8; 64 << 10];
    for r in mem.regions() {
        let pages = r.size / PAGE_SIZE;
        let first = r.host as u64 / PAGE_SIZE;
        let mut done = 0;
        while done < pages {
            let n = ((pages - done) as usize).min(buf.len() / 8);
            let b = &mut buf[..n * 8];
            pm.read_exact_at(b, (first + done) * 8)?;
            for (i, e) in b.chunks_exact(8).enumerate() {
                let mut w = [0u8; 8];
                w.copy_from_slice(e);
                let e = u64::from_le_bytes(w);
                if (e & PRESENT != 0 && e & FILE == 0) || e & SWAPPED != 0 {
                    set(mask, r.file_offset / PAGE_SIZE + done + i as u64);
                }
            }
            done += n as u64;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::vstate::memory::Backing;

    #[test]
    fn shared_memory_mask_is_its_data_plus_private_writes() {
        let m = GuestMem::new(16 << 20, Backing::SharedFile, false).unwrap();
        assert!(m.fill(0x10000, 2 * 4096, 1));
        let mask = of_memory(&m).unwrap();
        let set: Vec<u64> = (0..4096).filter(|&p| bit(&mask, p)).collect();
        assert_eq!(set, vec![0x10, 0x11]);
        m.freeze().unwrap();
        assert!(m.fill(0x800000, 4096, 2));
        let mask = of_memory(&m).unwrap();
        let set: Vec<u64> = (0..4096).filter(|&p| bit(&mask, p)).collect();
        assert_eq!(set, vec![0x10, 0x11, 0x800]);
        assert!(of_memory(&GuestMem::new(16 << 20, Backing::Anon, false).unwrap()).is_none());
    }
}
