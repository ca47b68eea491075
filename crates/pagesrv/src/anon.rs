//! An anonymous private mapping, unmapped on drop: the plain memory the bench and the tests
//! register with the page server.

use crate::server::Region;

#[derive(Debug)]
pub(crate) struct AnonMap {
    pub ptr: *mut u8,
    pub len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; users coordinate access to it.
unsafe impl Send for AnonMap {}
// SAFETY: as above.
unsafe impl Sync for AnonMap {}

impl AnonMap {
    /// Maps `len` bytes (MAP_NORESERVE: nothing is committed until touched).
    pub(crate) fn new(len: usize) -> std::io::Result<Self> {
        // SAFETY: anonymous private mapping, no file, at a kernel-chosen address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(AnonMap { ptr: ptr.cast(), len })
    }

    /// The whole mapping as a page server region whose image starts at `offset`.
    pub(crate) fn region(&self, offset: u64) -> Region {
        Region { base: self.ptr as u64, len: self.len as u64, offset }
    }

    /// Volatile read of byte `i` (faults it in).
    #[cfg(test)]
    pub(crate) fn read(&self, i: usize) -> u8 {
        assert!(i < self.len);
        // SAFETY: in bounds of a live mapping.
        unsafe { std::ptr::read_volatile(self.ptr.wrapping_add(i)) }
    }

    #[cfg(test)]
    pub(crate) fn slice(&self) -> &[u8] {
        // SAFETY: live mapping of len bytes; faults are served by the server.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for AnonMap {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
