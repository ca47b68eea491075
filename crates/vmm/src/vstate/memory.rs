//! Guest memory: one or two host mappings (split around the 32-bit MMIO gap) with a selectable
//! backing, exposed to KVM as memory slots and to the loaders through a vm-memory view.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::OpenOptionsExt;

use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::arch::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Smallest guest the VMM accepts: room for boot data, a test guest image and its stack.
pub const MIN_MEM_SIZE: u64 = 4 << 20;
/// Largest guest memory accepted (the identity map the VMM builds covers 512 GiB).
pub const MAX_MEM_SIZE: u64 = 256 << 30;

/// How guest RAM is backed on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Backing {
    /// Anonymous MAP_PRIVATE memory (the default; fork() shares it copy-on-write).
    Anon,
    /// A memfd mapped MAP_SHARED: a snapshot only has to flush state, the memory is already a file.
    SharedFile,
}

/// Errors creating or mapping guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {size} bytes is too small: at least {min} bytes (4 MiB) are needed")]
    TooSmall { size: u64, min: u64 },
    #[error("guest memory of {size} bytes is too large: at most {max} bytes")]
    TooLarge { size: u64, max: u64 },
    #[error("guest memory size {0} is not a multiple of 4 KiB")]
    Unaligned(u64),
    #[error("cannot create the guest memory file: {0}")]
    Memfd(std::io::Error),
    #[error("cannot map {size} bytes of guest memory: {err}")]
    Mmap { size: u64, err: std::io::Error },
    #[error("guest memory file is {actual} bytes, expected {expected}")]
    FileSize { actual: u64, expected: u64 },
    #[error("vm-memory rejected the guest regions: {0}")]
    Regions(String),
}

/// One contiguous piece of guest RAM and the host mapping behind it.
#[derive(Debug)]
pub struct Region {
    pub guest_base: u64,
    pub size: u64,
    pub host: *mut u8,
    /// Offset of this region inside the backing file (SharedFile / file-backed restores).
    pub file_offset: u64,
}

/// Guest RAM. Owns its mappings (unmapped on drop) and, for file backing, the file.
#[derive(Debug)]
pub struct GuestMem {
    regions: Vec<Region>,
    backing: Backing,
    file: Option<File>,
    total: u64,
    /// Pages the VMM itself wrote (KVM's dirty log only sees guest writes), one bit per page.
    host_dirty: std::sync::Mutex<Vec<u64>>,
    /// Shared file memory remapped private: the file is frozen, writes are copy-on-write.
    frozen: std::sync::atomic::AtomicBool,
}

/// Guest page size used for dirty tracking and memory images.
pub const PAGE_SIZE: u64 = 4096;

fn bitmap_words(size: u64) -> usize {
    (size / PAGE_SIZE).div_ceil(64) as usize
}

// SAFETY: the raw pointers refer to mappings owned by this struct for its whole life; access to
// guest memory is through volatile copies, as in vm-memory.
unsafe impl Send for GuestMem {}
// SAFETY: as above; concurrent guest memory access is inherent to a VMM and done volatile.
unsafe impl Sync for GuestMem {}

/// Guest-physical ranges for `size` bytes of RAM: below the MMIO gap, the rest above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_GAP_START {
        vec![(0, size)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, size - MMIO_GAP_START)]
    }
}

fn check_size(size: u64) -> Result<(), MemoryError> {
    if size < MIN_MEM_SIZE {
        return Err(MemoryError::TooSmall { size, min: MIN_MEM_SIZE });
    }
    if size > MAX_MEM_SIZE {
        return Err(MemoryError::TooLarge { size, max: MAX_MEM_SIZE });
    }
    if !size.is_multiple_of(4096) {
        return Err(MemoryError::Unaligned(size));
    }
    Ok(())
}

fn mmap(size: u64, prot: i32, flags: i32, fd: i32, offset: u64) -> Result<*mut u8, MemoryError> {
    let off = libc::off_t::try_from(offset)
        .map_err(|_| MemoryError::Mmap { size, err: std::io::Error::from_raw_os_error(libc::EOVERFLOW) })?;
    // SAFETY: a fresh mapping at a kernel-chosen address; the result is checked.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), size as usize, prot, flags, fd, off) };
    if p == libc::MAP_FAILED {
        return Err(MemoryError::Mmap { size, err: std::io::Error::last_os_error() });
    }
    Ok(p.cast())
}

fn advise_hugepages(host: *mut u8, size: u64) {
    // SAFETY: advice on a mapping we own; failure (e.g. THP disabled) is harmless.
    let rc = unsafe { libc::madvise(host.cast(), size as usize, libc::MADV_HUGEPAGE) };
    if rc != 0 {
        tracing::debug!("MADV_HUGEPAGE not applied: {}", std::io::Error::last_os_error());
    }
}

/// Shared guest memory lives in an unnamed tmpfs file (O_TMPFILE in `FORKVM_SHM_DIR`, default
/// /dev/shm) so a snapshot can link it into a directory instead of copying it; a memfd if that
/// directory does not support O_TMPFILE.
fn create_memfd(size: u64) -> Result<File, MemoryError> {
    let dir = std::env::var("FORKVM_SHM_DIR").unwrap_or_else(|_| "/dev/shm".into());
    let tmp = std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_TMPFILE).mode(0o600).open(&dir);
    if let Ok(file) = tmp {
        file.set_len(size).map_err(MemoryError::Memfd)?;
        return Ok(file);
    }
    // SAFETY: the name is a valid NUL-terminated string; the result is checked.
    let fd = unsafe { libc::memfd_create(c"forkvm-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor we own.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(MemoryError::Memfd)?;
    Ok(file)
}

impl GuestMem {
    fn assemble(regions: Vec<Region>, backing: Backing, file: Option<File>, total: u64) -> Self {
        GuestMem {
            regions,
            backing,
            file,
            total,
            host_dirty: std::sync::Mutex::new(vec![0; bitmap_words(total)]),
            frozen: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Offset of guest address `gpa` in the concatenated RAM image (memory files use it).
    pub fn image_offset(&self, gpa: u64) -> Option<u64> {
        self.regions.iter().find_map(|r| {
            let off = gpa.checked_sub(r.guest_base)?;
            (off < r.size).then_some(r.file_offset + off)
        })
    }

    pub(crate) fn mark_host_dirty(&self, gpa: u64, len: u64) {
        let (Some(start), Some(end)) =
            (self.image_offset(gpa), len.checked_sub(1).and_then(|l| self.image_offset(gpa + l)))
        else {
            return;
        };
        let mut bm = crate::devices::console::lock(&self.host_dirty);
        for page in start / PAGE_SIZE..=end / PAGE_SIZE {
            if let Some(w) = bm.get_mut((page / 64) as usize) {
                *w |= 1 << (page % 64);
            }
        }
    }

    /// Takes (and clears) the bitmap of pages the VMM wrote since the last call.
    pub fn take_host_dirty(&self) -> Vec<u64> {
        std::mem::replace(&mut *crate::devices::console::lock(&self.host_dirty), vec![0; bitmap_words(self.total)])
    }

    /// True once the memory is a private copy-on-write view of a frozen file.
    pub fn is_frozen(&self) -> bool {
        self.frozen.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Shared-file memory: remap every region MAP_PRIVATE over the same file, in place. The file
    /// is frozen from then on (it is a snapshot of RAM); later writes are private copies. KVM
    /// follows the new mapping. The vCPUs must be paused.
    pub fn freeze(&self) -> Result<(), MemoryError> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        if self.is_frozen() {
            return Ok(());
        }
        for r in &self.regions {
            let off = libc::off_t::try_from(r.file_offset).map_err(|_| MemoryError::Mmap {
                size: r.size,
                err: std::io::Error::from_raw_os_error(libc::EOVERFLOW),
            })?;
            // SAFETY: replaces our own mapping [host, host+size) with a private mapping of the
            // same file contents at the same address; nothing else owns that range.
            let p = unsafe {
                libc::mmap(
                    r.host.cast(),
                    r.size as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    file.as_raw_fd(),
                    off,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(MemoryError::Mmap { size: r.size, err: std::io::Error::last_os_error() });
            }
        }
        self.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Fresh zeroed guest RAM of `size` bytes.
    pub fn new(size: u64, backing: Backing, hugepages: bool) -> Result<Self, MemoryError> {
        check_size(size)?;
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let file = match backing {
            Backing::Anon => None,
            Backing::SharedFile => Some(create_memfd(size)?),
        };
        let mut regions = Vec::new();
        let mut file_offset = 0;
        for (guest_base, len) in ram_ranges(size) {
            let host = match &file {
                None => mmap(len, prot, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1, 0)?,
                Some(f) => mmap(len, prot, libc::MAP_SHARED | libc::MAP_NORESERVE, f.as_raw_fd(), file_offset)?,
            };
            if hugepages {
                advise_hugepages(host, len);
            }
            regions.push(Region { guest_base, size: len, host, file_offset });
            file_offset += len;
        }
        Ok(GuestMem::assemble(regions, backing, file, size))
    }

    /// Guest RAM mapped copy-on-write (MAP_PRIVATE) from a frozen memory file: pages are read from
    /// the file on first touch and copied only when the guest writes them.
    pub fn from_file_cow(file: File, size: u64, hugepages: bool) -> Result<Self, MemoryError> {
        check_size(size)?;
        let actual = file.metadata().map_err(MemoryError::Memfd)?.len();
        if actual != size {
            return Err(MemoryError::FileSize { actual, expected: size });
        }
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let mut regions = Vec::new();
        let mut file_offset = 0;
        for (guest_base, len) in ram_ranges(size) {
            let host = mmap(len, prot, libc::MAP_PRIVATE | libc::MAP_NORESERVE, file.as_raw_fd(), file_offset)?;
            if hugepages {
                advise_hugepages(host, len);
            }
            regions.push(Region { guest_base, size: len, host, file_offset });
            file_offset += len;
        }
        let m = GuestMem::assemble(regions, Backing::Anon, Some(file), size);
        m.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(m)
    }

    pub fn size(&self) -> u64 {
        self.total
    }

    pub fn backing(&self) -> Backing {
        self.backing
    }

    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// The memfd behind SharedFile memory, or the frozen file of a copy-on-write restore.
    pub fn file(&self) -> Option<&File> {
        self.file.as_ref()
    }

    /// A vm-memory view over the same mappings (does not own them), for loaders and `Bytes`.
    pub fn view(&self) -> Result<GuestMemoryMmap, MemoryError> {
        let flags = match (self.backing, self.is_frozen()) {
            (Backing::SharedFile, false) => libc::MAP_SHARED | libc::MAP_NORESERVE,
            _ => libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        };
        let mut regions = Vec::new();
        for r in &self.regions {
            // SAFETY: the mapping [host, host+size) is owned by self and outlives the view's use
            // (callers hold &self while using the view); build_raw does not unmap on drop.
            let mmap =
                unsafe { MmapRegion::build_raw(r.host, r.size as usize, libc::PROT_READ | libc::PROT_WRITE, flags) }
                    .map_err(|e| MemoryError::Regions(e.to_string()))?;
            let region = GuestRegionMmap::new(mmap, GuestAddress(r.guest_base))
                .ok_or_else(|| MemoryError::Regions("region wraps the address space".into()))?;
            regions.push(region);
        }
        GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Regions(e.to_string()))
    }

    /// Host slice for guest range [gpa, gpa+len) if it lies inside one region.
    pub fn host_range(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        self.regions.iter().find_map(|r| {
            let off = gpa.checked_sub(r.guest_base)?;
            (off.checked_add(len)? <= r.size).then(|| r.host.wrapping_add(off as usize))
        })
    }

    /// Copy bytes into guest memory; false if the range is not RAM.
    pub fn write(&self, gpa: u64, data: &[u8]) -> bool {
        match self.host_range(gpa, data.len() as u64) {
            Some(p) => {
                // SAFETY: host_range proved the destination lies inside one of our mappings.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
                self.mark_host_dirty(gpa, data.len() as u64);
                true
            }
            None => false,
        }
    }

    /// Copy bytes out of guest memory; false if the range is not RAM.
    pub fn read(&self, gpa: u64, out: &mut [u8]) -> bool {
        match self.host_range(gpa, out.len() as u64) {
            Some(p) => {
                // SAFETY: host_range proved the source lies inside one of our mappings.
                unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), out.len()) };
                true
            }
            None => false,
        }
    }

    /// Fill a guest range with a byte from the host side (benchmarks dirty memory this way).
    pub fn fill(&self, gpa: u64, len: u64, byte: u8) -> bool {
        match self.host_range(gpa, len) {
            Some(p) => {
                // SAFETY: host_range proved the range lies inside one of our mappings.
                unsafe { std::ptr::write_bytes(p, byte, len as usize) };
                self.mark_host_dirty(gpa, len);
                true
            }
            None => false,
        }
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        for r in &self.regions {
            // SAFETY: each mapping was created by us with this size and is unmapped once.
            unsafe { libc::munmap(r.host.cast(), r.size as usize) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(GuestMem::new(1 << 20, Backing::Anon, true), Err(MemoryError::TooSmall { .. })));
        assert!(matches!(GuestMem::new((16 << 20) + 1, Backing::Anon, true), Err(MemoryError::Unaligned(_))));
        assert!(matches!(GuestMem::new(1 << 40, Backing::Anon, true), Err(MemoryError::TooLarge { .. })));
    }

    #[test]
    fn splits_around_the_mmio_gap() {
        assert_eq!(ram_ranges(1 << 30), vec![(0, 1 << 30)]);
        let r = ram_ranges(4 << 30);
        assert_eq!(r, vec![(0, MMIO_GAP_START), (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)]);
    }

    #[test]
    fn read_write_both_backings() {
        for backing in [Backing::Anon, Backing::SharedFile] {
            let m = GuestMem::new(8 << 20, backing, true).unwrap();
            assert!(m.write(0x1000, b"hello"));
            let mut buf = [0u8; 5];
            assert!(m.read(0x1000, &mut buf));
            assert_eq!(&buf, b"hello");
            assert!(!m.write((8 << 20) - 2, b"abc"), "crossing the end must fail");
            assert_eq!(m.file().is_some(), backing == Backing::SharedFile);
            let view = m.view().unwrap();
            use vm_memory::Bytes;
            let v: u8 = view.read_obj(GuestAddress(0x1001)).unwrap();
            assert_eq!(v, b'e');
        }
    }

    #[test]
    fn freeze_stops_writes_reaching_the_file() {
        let m = GuestMem::new(4 << 20, Backing::SharedFile, false).unwrap();
        assert!(m.fill(0x2000, 4096, 1));
        let file = m.file().unwrap().try_clone().unwrap();
        let clone = GuestMem::from_file_cow(file, 4 << 20, false).unwrap();
        m.freeze().unwrap();
        assert!(m.fill(0x2000, 4096, 2));
        let mut b = [0u8; 1];
        assert!(clone.read(0x2000, &mut b));
        assert_eq!(b[0], 1, "the frozen file must keep the value from before the freeze");
        assert!(m.read(0x2000, &mut b));
        assert_eq!(b[0], 2);
    }

    #[test]
    fn host_writes_are_tracked() {
        let m = GuestMem::new(8 << 20, Backing::Anon, false).unwrap();
        assert!(m.fill(0x3000, 8192, 1));
        let bm = m.take_host_dirty();
        assert_eq!(bm[0], 0b11000);
        assert_eq!(m.take_host_dirty()[0], 0);
    }

    #[test]
    fn cow_from_file_does_not_write_back() {
        let m = GuestMem::new(4 << 20, Backing::SharedFile, false).unwrap();
        assert!(m.fill(0, 4096, 7));
        let file = m.file().unwrap().try_clone().unwrap();
        let c = GuestMem::from_file_cow(file, 4 << 20, false).unwrap();
        let mut b = [0u8; 1];
        assert!(c.read(0, &mut b));
        assert_eq!(b[0], 7);
        assert!(c.fill(0, 4096, 9));
        assert!(m.read(0, &mut b));
        assert_eq!(b[0], 7, "a CoW clone's write must not reach the file");
    }
}
