//! The kernel side of a reseed: `/dev/random` ioctls (see random(4)). Needs CAP_SYS_ADMIN.

use std::fs::File;
use std::os::fd::AsRawFd;

use crate::error::AgentError;

// From <linux/random.h>; libc 0.2 does not export them.
/// `_IOR('R', 0x00, int)`: read the entropy count (bits).
const RNDGETENTCNT: libc::Ioctl = 0x8004_5200;
/// `_IOW('R', 0x03, int[2])`: add bytes to the input pool, crediting `entropy_count` bits.
const RNDADDENTROPY: libc::Ioctl = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the CRNG from the input pool now.
const RNDRESEEDCRNG: libc::Ioctl = 0x5207;

/// `struct rand_pool_info` followed by its buffer.
#[repr(C)]
struct PoolInfo<const N: usize> {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; N],
}

/// Entropy counts around the reseed.
#[derive(Debug)]
pub struct Report {
    pub entropy_before: i32,
    pub entropy_after: i32,
}

fn os(what: &'static str) -> AgentError {
    AgentError::Os { what, err: std::io::Error::last_os_error() }
}

fn entropy_count(f: &File) -> Result<i32, AgentError> {
    let mut n: libc::c_int = 0;
    // SAFETY: RNDGETENTCNT writes one int through the pointer, which points at `n`.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), RNDGETENTCNT, &mut n as *mut libc::c_int) };
    if rc < 0 {
        return Err(os("RNDGETENTCNT on /dev/random"));
    }
    Ok(n)
}

/// Credits `seed` (at most [`crate::args::MAX_SEED`] bytes) to the input pool and reseeds the CRNG.
pub fn reseed(seed: &[u8]) -> Result<Report, AgentError> {
    if seed.is_empty() || seed.len() > crate::args::MAX_SEED {
        return Err(AgentError::Seed(format!("{} bytes", seed.len())));
    }
    let f = File::options()
        .read(true)
        .write(true)
        .open("/dev/random")
        .map_err(|err| AgentError::Os { what: "cannot open /dev/random", err })?;
    let entropy_before = entropy_count(&f)?;
    let mut info = PoolInfo { entropy_count: 0, buf_size: 0, buf: [0u8; crate::args::MAX_SEED] };
    info.buf[..seed.len()].copy_from_slice(seed);
    // Lengths are bounded by MAX_SEED (256), far below c_int's range.
    info.buf_size = seed.len() as libc::c_int;
    info.entropy_count = (seed.len() * 8) as libc::c_int;
    // SAFETY: RNDADDENTROPY reads a rand_pool_info header and buf_size bytes after it; `info` is a
    // repr(C) header followed by MAX_SEED >= buf_size bytes, alive for the call.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY, &info as *const PoolInfo<{ crate::args::MAX_SEED }>) };
    if rc < 0 {
        return Err(os("RNDADDENTROPY on /dev/random"));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG) };
    if rc < 0 {
        return Err(os("RNDRESEEDCRNG on /dev/random"));
    }
    let entropy_after = entropy_count(&f)?;
    Ok(Report { entropy_before, entropy_after })
}
