//! userfaultfd write-protect (`UFFDIO_REGISTER_MODE_WP`, `UFFDIO_WRITEPROTECT`), transcribed from
//! `include/uapi/linux/userfaultfd.h`. Shared memory (shmem/memfd) needs Linux >= 5.19 with
//! `CONFIG_PTE_MARKER_UFFD_WP` (the kernel then offers `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`).

use std::io;

use crate::uffd::{iowr, Uffd, UffdioRange, UffdioRegister, UFFDIO_REGISTER};

/// `UFFD_FEATURE_PAGEFAULT_FLAG_WP`.
pub const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`: write-protect works on shmem and hugetlbfs.
pub const FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// `UFFD_FEATURE_WP_UNPOPULATED`: unpopulated anonymous PTEs are write-protected too.
pub const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;

/// `UFFDIO_REGISTER_MODE_WP`.
pub const REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_WRITEPROTECT_MODE_WP`.
const WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// `UFFDIO_WRITEPROTECT_MODE_DONTWAKE`.
const WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;
/// `UFFD_PAGEFAULT_FLAG_WRITE`.
pub const PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
/// `UFFD_PAGEFAULT_FLAG_WP`: the fault is a write to a write-protected page.
pub const PAGEFAULT_FLAG_WP: u64 = 1 << 1;

#[repr(C)]
#[derive(Debug, Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

const UFFDIO_WRITEPROTECT: u64 = iowr(0x06, std::mem::size_of::<UffdioWriteprotect>()); // 0xc018aa06

impl Uffd {
    /// A userfaultfd for write-protect tracking of shared memory; fails with a clear error when
    /// the kernel cannot write-protect shmem.
    pub fn new_wp() -> io::Result<Uffd> {
        let avail = Uffd::available_features()?;
        if avail & FEATURE_WP_HUGETLBFS_SHMEM == 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this kernel cannot write-protect shared memory with userfaultfd (needs Linux >= 5.19 with \
                 CONFIG_PTE_MARKER_UFFD_WP: UFFD_FEATURE_WP_HUGETLBFS_SHMEM)",
            ));
        }
        Uffd::new(FEATURE_WP_UNPOPULATED, FEATURE_PAGEFAULT_FLAG_WP | FEATURE_WP_HUGETLBFS_SHMEM)
    }

    /// Register `[start, start+len)` with `mode` (`REGISTER_MODE_*` bits); returns the ioctls
    /// the kernel allows on it.
    pub fn register_mode(&self, start: u64, len: u64, mode: u64) -> io::Result<u64> {
        let mut r = UffdioRegister { range: UffdioRange { start, len }, mode, ioctls: 0 };
        self.ioctl(UFFDIO_REGISTER, &mut r)?;
        Ok(r.ioctls)
    }

    /// Write-protect (`protect`) or un-protect `[start, start+len)`; un-protecting wakes the
    /// threads blocked on it unless `wake` is false.
    pub fn writeprotect(&self, start: u64, len: u64, protect: bool, wake: bool) -> io::Result<()> {
        let mut mode = if protect { WRITEPROTECT_MODE_WP } else { 0 };
        // The kernel refuses DONTWAKE together with WP (protecting wakes nobody anyway).
        if !wake && !protect {
            mode |= WRITEPROTECT_MODE_DONTWAKE;
        }
        let mut w = UffdioWriteprotect { range: UffdioRange { start, len }, mode };
        self.ioctl(UFFDIO_WRITEPROTECT, &mut w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writeprotect_ioctl_number_matches_the_header() {
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018_aa06);
    }
}
