//! Raw userfaultfd access through `libc`.
//!
//! Constants and struct layouts are transcribed from the kernel UAPI header
//! `include/uapi/linux/userfaultfd.h` (Linux 6.x); `UFFDIO_POISON` and
//! `UFFD_FEATURE_POISON` date from 6.6. ioctl numbers follow
//! `_IOWR(0xAA, nr, struct)` / `_IOR(0xAA, nr, struct)`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// `UFFD_API`.
pub const UFFD_API: u64 = 0xAA;

/// Feature bits (`UFFD_FEATURE_*`).
pub mod features {
    /// `UFFD_FEATURE_EVENT_REMOVE`: madvise(DONTNEED/REMOVE) is reported.
    pub const EVENT_REMOVE: u64 = 1 << 3;
    /// `UFFD_FEATURE_EVENT_UNMAP`.
    pub const EVENT_UNMAP: u64 = 1 << 6;
    /// `UFFD_FEATURE_SIGBUS`: faults raise SIGBUS instead of being reported.
    pub const SIGBUS: u64 = 1 << 7;
    /// `UFFD_FEATURE_THREAD_ID`: page-fault messages carry the thread id.
    pub const THREAD_ID: u64 = 1 << 8;
    /// `UFFD_FEATURE_POISON`: `UFFDIO_POISON` is available.
    pub const POISON: u64 = 1 << 14;
}

/// `UFFDIO_REGISTER_MODE_MISSING`.
pub const REGISTER_MODE_MISSING: u64 = 1 << 0;
/// `UFFDIO_COPY_MODE_DONTWAKE`.
pub const COPY_MODE_DONTWAKE: u64 = 1 << 0;

/// `UFFD_EVENT_PAGEFAULT`.
pub const EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_EVENT_FORK`.
pub const EVENT_FORK: u8 = 0x13;
/// `UFFD_EVENT_REMAP`.
pub const EVENT_REMAP: u8 = 0x14;
/// `UFFD_EVENT_REMOVE`.
pub const EVENT_REMOVE: u8 = 0x15;
/// `UFFD_EVENT_UNMAP`.
pub const EVENT_UNMAP: u8 = 0x16;

#[repr(C)]
#[derive(Debug, Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UffdioRange {
    pub(crate) start: u64,
    pub(crate) len: u64,
}

#[repr(C)]
#[derive(Debug, Default)]
pub(crate) struct UffdioRegister {
    pub(crate) range: UffdioRange,
    pub(crate) mode: u64,
    pub(crate) ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Debug, Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

#[repr(C)]
#[derive(Debug, Default)]
struct UffdioPoison {
    range: UffdioRange,
    mode: u64,
    updated: i64,
}

pub(crate) const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (0xAA << 8) | nr
}
const fn ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (0xAA << 8) | nr
}

const UFFDIO_API: u64 = iowr(0x3F, std::mem::size_of::<UffdioApi>()); // 0xc018aa3f
pub(crate) const UFFDIO_REGISTER: u64 = iowr(0x00, std::mem::size_of::<UffdioRegister>()); // 0xc020aa00
const UFFDIO_UNREGISTER: u64 = ior(0x01, std::mem::size_of::<UffdioRange>()); // 0x8010aa01
const UFFDIO_WAKE: u64 = ior(0x02, std::mem::size_of::<UffdioRange>()); // 0x8010aa02
const UFFDIO_COPY: u64 = iowr(0x03, std::mem::size_of::<UffdioCopy>()); // 0xc028aa03
const UFFDIO_ZEROPAGE: u64 = iowr(0x04, std::mem::size_of::<UffdioZeropage>()); // 0xc020aa04
const UFFDIO_POISON: u64 = iowr(0x08, std::mem::size_of::<UffdioPoison>()); // 0xc020aa08

/// Size of `struct uffd_msg`.
pub const MSG_SIZE: usize = 32;

/// A decoded `struct uffd_msg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A missing-page fault at `address` (thread id if `THREAD_ID` was negotiated).
    PageFault {
        /// `UFFD_PAGEFAULT_FLAG_*`.
        flags: u64,
        /// Faulting address (page aligned unless `EXACT_ADDRESS`).
        address: u64,
        /// Faulting thread id, or 0.
        tid: u32,
    },
    /// `madvise(DONTNEED/REMOVE)` dropped `[start, end)`.
    Remove {
        /// Start address.
        start: u64,
        /// End address (exclusive).
        end: u64,
    },
    /// `[start, end)` was unmapped.
    Unmap {
        /// Start address.
        start: u64,
        /// End address (exclusive).
        end: u64,
    },
    /// Any other event (`FORK`, `REMAP`, unknown).
    Other(u8),
}

impl Event {
    /// Decode a raw message.
    pub fn parse(m: &[u8; MSG_SIZE]) -> Event {
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&m[o..o + 8]);
            u64::from_ne_bytes(b)
        };
        // union arg starts at offset 8.
        match m[0] {
            EVENT_PAGEFAULT => Event::PageFault {
                flags: u64_at(8),
                address: u64_at(16),
                tid: u32::from_ne_bytes([m[24], m[25], m[26], m[27]]),
            },
            EVENT_REMOVE => Event::Remove { start: u64_at(8), end: u64_at(16) },
            EVENT_UNMAP => Event::Unmap { start: u64_at(8), end: u64_at(16) },
            e => Event::Other(e),
        }
    }
}

/// Outcome of a `UFFDIO_COPY`/`ZEROPAGE`/`POISON` over a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// The whole range was filled.
    Done,
    /// `n` bytes were filled, then the kernel stopped (`EAGAIN`).
    Partial(u64),
    /// The first page is already present (`EEXIST`).
    Exists,
    /// The address space is changing (`EAGAIN` with nothing done: a
    /// REMOVE/UNMAP event is pending) — read events, then retry.
    Again,
    /// The target process's address space is gone (`ESRCH`): it exited.
    Gone,
    /// The range is no longer mapped (`ENOENT`).
    Unmapped,
}

/// A userfaultfd file descriptor.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: u64,
    /// Whether we negotiated `features` ourselves (a uffd handed over by another VMM: a guess).
    negotiated: bool,
}

impl Uffd {
    /// Feature bits the running kernel offers (probed on a throwaway uffd).
    pub fn available_features() -> io::Result<u64> {
        let probe = Self::raw_open()?;
        let mut api = UffdioApi { api: UFFD_API, ..Default::default() };
        // SAFETY: UFFDIO_API reads/writes exactly one UffdioApi, which we own.
        let rc = unsafe { libc::ioctl(probe.as_raw_fd(), UFFDIO_API as _, &mut api) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(api.features)
    }

    fn raw_open() -> io::Result<OwnedFd> {
        // SAFETY: userfaultfd(2) takes flags only and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the syscall just returned this fd to us; nobody else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }

    /// Create a userfaultfd and negotiate `wanted & available` features
    /// (`required` must all be available).
    pub fn new(wanted: u64, required: u64) -> io::Result<Self> {
        let avail = Self::available_features()?;
        if avail & required != required {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("userfaultfd features {:#x} not supported (kernel offers {avail:#x})", required & !avail),
            ));
        }
        let fd = Self::raw_open()?;
        let mut api = UffdioApi { api: UFFD_API, features: (wanted | required) & avail, ioctls: 0 };
        // SAFETY: UFFDIO_API reads/writes exactly one UffdioApi, which we own.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Uffd { fd, features: (wanted | required) & avail, negotiated: true })
    }

    /// Wrap a uffd that someone else already set up (e.g. received from
    /// Firecracker). `features` is what we assume was negotiated.
    pub fn from_fd(fd: OwnedFd, features: u64) -> Self {
        Uffd { fd, features, negotiated: false }
    }

    /// Negotiated features.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Make reads non-blocking (a uffd handed over by another VMM may be blocking; poll(2) then
    /// reports POLLERR and a read would block the fault thread). Returns true if it was blocking.
    /// The flag lives on the open file description, which the peer shares; it never reads it.
    pub fn ensure_nonblocking(&self) -> io::Result<bool> {
        let fd = self.fd.as_raw_fd();
        // SAFETY: F_GETFL on an fd we own takes no pointer.
        let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if fl < 0 {
            return Err(io::Error::last_os_error());
        }
        if fl & libc::O_NONBLOCK != 0 {
            return Ok(false);
        }
        // SAFETY: F_SETFL on an fd we own with plain integer flags.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(true)
    }

    /// True if `fd` is a userfaultfd (its `/proc/self/fd` link names the anon inode).
    pub fn is_userfaultfd(fd: BorrowedFd<'_>) -> bool {
        std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .is_ok_and(|p| p.as_os_str() == "anon_inode:[userfaultfd]")
    }

    pub(crate) fn ioctl<T>(&self, req: u64, arg: &mut T) -> io::Result<()> {
        // SAFETY: every caller passes the repr(C) struct matching `req` as
        // encoded in its size bits; the kernel reads/writes only that struct.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), req as _, arg as *mut T) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Register `[start, start+len)` for missing-page faults; returns the
    /// ioctl bitmask the kernel allows on the range.
    pub fn register(&self, start: u64, len: u64) -> io::Result<u64> {
        let mut r = UffdioRegister { range: UffdioRange { start, len }, mode: REGISTER_MODE_MISSING, ioctls: 0 };
        self.ioctl(UFFDIO_REGISTER, &mut r)?;
        Ok(r.ioctls)
    }

    /// Unregister a range (wakes any thread blocked on it).
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let mut r = UffdioRange { start, len };
        self.ioctl(UFFDIO_UNREGISTER, &mut r)
    }

    /// Wake threads blocked on faults in a range.
    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let mut r = UffdioRange { start, len };
        self.ioctl(UFFDIO_WAKE, &mut r)
    }

    fn outcome(r: io::Result<()>, done: i64, len: u64) -> io::Result<Fill> {
        match r {
            Ok(()) => Ok(Fill::Done),
            Err(e) => match e.raw_os_error() {
                Some(libc::EAGAIN) if done > 0 && (done as u64) < len => Ok(Fill::Partial(done as u64)),
                Some(libc::EAGAIN) => Ok(Fill::Again),
                Some(libc::EEXIST) => Ok(Fill::Exists),
                Some(libc::ESRCH) => Ok(Fill::Gone),
                Some(libc::ENOENT) => Ok(Fill::Unmapped),
                _ => Err(e),
            },
        }
    }

    /// `UFFDIO_COPY` `src` to `dst` (page aligned, whole pages) and wake
    /// the faulting threads.
    pub fn copy(&self, dst: u64, src: &[u8]) -> io::Result<Fill> {
        let mut c = UffdioCopy { dst, src: src.as_ptr() as u64, len: src.len() as u64, mode: 0, copy: 0 };
        let r = self.ioctl(UFFDIO_COPY, &mut c);
        Self::outcome(r, c.copy, c.len)
    }

    /// `UFFDIO_ZEROPAGE` over `[dst, dst+len)`.
    pub fn zeropage(&self, dst: u64, len: u64) -> io::Result<Fill> {
        let mut z = UffdioZeropage { range: UffdioRange { start: dst, len }, mode: 0, zeropage: 0 };
        let r = self.ioctl(UFFDIO_ZEROPAGE, &mut z);
        Self::outcome(r, z.zeropage, len)
    }

    /// `UFFDIO_POISON` over `[dst, dst+len)`: later accesses get SIGBUS
    /// (kernel accesses get EFAULT). Wakes the faulting threads.
    /// If we negotiated the uffd without `UFFD_FEATURE_POISON` (Linux < 6.6) it fails with
    /// `Unsupported` and asks nothing of the kernel; a handed-over uffd is simply tried.
    pub fn poison(&self, dst: u64, len: u64) -> io::Result<Fill> {
        if self.negotiated && self.features & features::POISON == 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this kernel's userfaultfd has no UFFD_FEATURE_POISON (Linux 6.6 or later)",
            ));
        }
        let mut p = UffdioPoison { range: UffdioRange { start: dst, len }, mode: 0, updated: 0 };
        let r = self.ioctl(UFFDIO_POISON, &mut p);
        Self::outcome(r, p.updated, len)
    }

    /// Read pending messages into `out` (non-blocking). Returns how many.
    pub fn read_events(&self, out: &mut Vec<Event>) -> io::Result<usize> {
        let mut buf = [[0u8; MSG_SIZE]; 64];
        // SAFETY: we pass a writable buffer of exactly the length we give.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), std::mem::size_of_val(&buf)) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) => Ok(0),
                _ => Err(e),
            };
        }
        let count = n as usize / MSG_SIZE;
        out.extend(buf[..count].iter().map(Event::parse));
        Ok(count)
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_header() {
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_aa01);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020_aa04);
        assert_eq!(UFFDIO_POISON, 0xc020_aa08);
    }
}
