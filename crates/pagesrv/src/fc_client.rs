//! A Firecracker stand-in for tests and benchmarks (no Firecracker, no KVM needed): it does
//! Firecracker's side of the uffd handshake byte for byte — anonymous guest regions registered
//! on a userfaultfd (with `EVENT_REMOVE`, as Firecracker asks), a connect to the handler's
//! socket, one `sendmsg` with the mappings JSON in any of Firecracker's formats and the uffd as
//! `SCM_RIGHTS` — then reads its memory the way a vCPU would, faulting pages in.

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::anon::AnonMap;
use crate::error::{sys, Result};
use crate::fc::{self, GuestRegionUffdMapping, PageSizeField};
use crate::fc_wire;
use crate::uffd::{features, Uffd};

/// How the stand-in behaves.
#[derive(Debug, Clone)]
pub struct ClientOpts {
    /// Regions as `(length, offset in the memory file)`.
    pub regions: Vec<(usize, u64)>,
    /// Which Firecracker format to send.
    pub field: PageSizeField,
    /// Hand the uffd over in blocking mode.
    pub blocking: bool,
}

/// A connected stand-in VMM.
#[derive(Debug)]
pub struct FcClient {
    stream: Option<UnixStream>,
    uffd: Uffd,
    maps: Vec<(AnonMap, u64)>,
}

impl FcClient {
    /// Map and register the regions, connect to `socket` and send the handshake.
    pub fn connect(socket: &Path, opts: &ClientOpts) -> Result<Self> {
        let uffd = Uffd::new(features::EVENT_REMOVE, features::EVENT_REMOVE).map_err(sys("userfaultfd"))?;
        if opts.blocking {
            // SAFETY: F_SETFL on an fd we own: clear O_NONBLOCK like a VMM that never set it.
            unsafe { libc::fcntl(uffd.as_raw_fd(), libc::F_SETFL, 0) };
        }
        let mut maps = Vec::new();
        let mut mappings = Vec::new();
        for &(len, offset) in &opts.regions {
            let m = AnonMap::new(len).map_err(sys("mmap guest region"))?;
            uffd.register(m.ptr as u64, len as u64).map_err(sys("UFFDIO_REGISTER"))?;
            mappings.push(GuestRegionUffdMapping {
                base_host_virt_addr: m.ptr as u64,
                size: len as u64,
                offset,
                page_size: 4096,
            });
            maps.push((m, offset));
        }
        let stream = UnixStream::connect(socket).map_err(sys(format!("connect {}", socket.display())))?;
        fc_wire::send_with_fds(&stream, &fc::body(&mappings, opts.field), &[uffd.as_fd()])?;
        Ok(FcClient { stream: Some(stream), uffd, maps })
    }

    /// Close the handshake socket while staying alive (what Firecracker releases before the
    /// socket was kept open did right after the handshake).
    pub fn close_socket(&mut self) {
        self.stream = None;
    }

    /// The uffd this VMM registered its memory on.
    pub fn uffd(&self) -> &Uffd {
        &self.uffd
    }

    /// Unregister every region (wakes threads blocked on missing pages; they then see plain
    /// anonymous memory), as a VMM tearing down its memory does.
    pub fn unregister_all(&self) -> std::io::Result<()> {
        for (m, _) in &self.maps {
            self.uffd.unregister(m.ptr as u64, m.len as u64)?;
        }
        Ok(())
    }

    /// Pages of region `i` in `[at, at+len)` that are resident (`mincore`): placed by the
    /// handler, whether faulted or prefetched.
    pub fn resident(&self, i: usize, at: usize, len: usize) -> std::io::Result<usize> {
        let m = &self.maps[i].0;
        assert!(at.is_multiple_of(4096) && at + len <= m.len);
        let mut vec = vec![0u8; len.div_ceil(4096)];
        // SAFETY: the range lies inside our mapping; `vec` has one byte per page of it.
        if unsafe { libc::mincore(m.ptr.wrapping_add(at).cast(), len, vec.as_mut_ptr()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(vec.iter().filter(|&&b| b & 1 != 0).count())
    }

    /// Region `i`'s length.
    pub fn region_len(&self, i: usize) -> usize {
        self.maps[i].0.len
    }

    /// Copy `out.len()` bytes at `at` of region `i` (faulting pages in, like a vCPU).
    pub fn read(&self, i: usize, at: usize, out: &mut [u8]) {
        let m = &self.maps[i].0;
        assert!(at + out.len() <= m.len, "read past region {i}");
        // SAFETY: in bounds of a live mapping we own; faults are served by the handler.
        unsafe { std::ptr::copy_nonoverlapping(m.ptr.wrapping_add(at), out.as_mut_ptr(), out.len()) };
        // The copy is the access that faults the pages in: keep it even when `out` is unused.
        std::hint::black_box(out);
    }

    /// Time the first touch of every page of region `i` (in `order`), returning the latencies.
    pub fn touch_pages(&self, i: usize, order: impl Iterator<Item = usize>) -> Vec<Duration> {
        let m = &self.maps[i].0;
        order
            .map(|p| {
                let t = Instant::now();
                // SAFETY: the offset is clamped inside our live mapping; the handler serves the fault.
                let _ = unsafe { std::ptr::read_volatile(m.ptr.wrapping_add((p * 4096).min(m.len - 1))) };
                t.elapsed()
            })
            .collect()
    }

    /// Compare every page of every region with `image` (the memory file). Returns the first
    /// mismatch as `(region, page)`.
    pub fn verify(&self, image: &[u8]) -> std::result::Result<(), (usize, usize)> {
        let mut buf = vec![0u8; 4096];
        for (i, (m, off)) in self.maps.iter().enumerate() {
            for p in 0..m.len / 4096 {
                self.read(i, p * 4096, &mut buf);
                let at = *off as usize + p * 4096;
                if image.get(at..at + 4096) != Some(&buf[..]) {
                    return Err((i, p));
                }
            }
        }
        Ok(())
    }

    /// Read `len` bytes at `at` of region `i` from the kernel (write(2) into a pipe), so that a
    /// poisoned page gives EFAULT instead of killing the process with SIGBUS.
    pub fn kernel_read(&self, i: usize, at: usize, len: usize) -> std::io::Result<Vec<u8>> {
        let m = &self.maps[i].0;
        assert!(at + len <= m.len && len <= 4096, "kernel_read past region {i}");
        let mut fds = [0i32; 2];
        // SAFETY: fds has room for two ints.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: in bounds of our mapping; write(2) reads `len` bytes of it.
        let n = unsafe { libc::write(fds[1], m.ptr.wrapping_add(at).cast(), len) };
        let err = std::io::Error::last_os_error();
        let mut out = vec![0u8; len];
        let r = if n == len as isize {
            // SAFETY: reads at most `len` bytes into `out`, which has that many.
            let k = unsafe { libc::read(fds[0], out.as_mut_ptr().cast(), len) };
            if k == len as isize {
                Ok(out)
            } else {
                Err(std::io::Error::last_os_error())
            }
        } else {
            Err(err)
        };
        for fd in fds {
            // SAFETY: closing the pipe fds we just made.
            unsafe { libc::close(fd) };
        }
        r
    }

    /// Drop `[at, at+len)` of region `i` with `madvise(MADV_DONTNEED)`, as Firecracker's balloon
    /// does (the handler gets `UFFD_EVENT_REMOVE`).
    pub fn remove(&self, i: usize, at: usize, len: usize) -> std::io::Result<()> {
        let m = &self.maps[i].0;
        assert!(at + len <= m.len);
        // SAFETY: the range lies inside our own mapping.
        if unsafe { libc::madvise(m.ptr.wrapping_add(at).cast(), len, libc::MADV_DONTNEED) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}
