//! Firecracker-compatible uffd handshake over a Unix socket.
//!
//! The VMM connects to the handler's socket and, in a single `sendmsg`,
//! sends a JSON array of [`GuestRegionUffdMapping`] as data and the
//! userfaultfd (already `UFFDIO_API`'d and with the regions registered) as
//! `SCM_RIGHTS` ancillary data. Older Firecracker versions send
//! `page_size_kib` instead of `page_size` (bytes); both are accepted.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use serde::{Deserialize, Serialize};

use crate::error::{sys, Error, Result};
use crate::server::Region;

/// One guest memory region as Firecracker describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawMapping")]
pub struct GuestRegionUffdMapping {
    /// Host virtual address of the region in the VMM.
    pub base_host_virt_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Offset of the region in the memory snapshot.
    pub offset: u64,
    /// Page size in bytes.
    pub page_size: u64,
}

#[derive(Deserialize)]
struct RawMapping {
    base_host_virt_addr: u64,
    size: u64,
    offset: u64,
    #[serde(default)]
    page_size: Option<u64>,
    #[serde(default)]
    page_size_kib: Option<u64>,
}

impl TryFrom<RawMapping> for GuestRegionUffdMapping {
    type Error = String;
    fn try_from(r: RawMapping) -> Result<Self, String> {
        let page_size = match (r.page_size, r.page_size_kib) {
            (Some(b), _) => b,
            (None, Some(k)) => k.checked_mul(1024).ok_or("page_size_kib overflows")?,
            (None, None) => return Err("mapping has neither page_size nor page_size_kib".into()),
        };
        if !page_size.is_power_of_two() {
            return Err(format!("page size {page_size} is not a power of two"));
        }
        Ok(GuestRegionUffdMapping {
            base_host_virt_addr: r.base_host_virt_addr,
            size: r.size,
            offset: r.offset,
            page_size,
        })
    }
}

impl From<&GuestRegionUffdMapping> for Region {
    fn from(m: &GuestRegionUffdMapping) -> Region {
        Region { base: m.base_host_virt_addr, len: m.size, offset: m.offset }
    }
}

/// Largest handshake message accepted.
const MAX_MSG: usize = 1 << 20;

/// Client (VMM) side: send the mappings and the uffd in one `sendmsg`.
pub fn send_handshake(stream: &UnixStream, mappings: &[GuestRegionUffdMapping], uffd: BorrowedFd<'_>) -> Result<()> {
    let body = serde_json::to_vec(mappings).map_err(|e| Error::Protocol(e.to_string()))?;
    let mut iov = libc::iovec { iov_base: body.as_ptr() as *mut libc::c_void, iov_len: body.len() };
    let fd: RawFd = uffd.as_raw_fd();
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)]; // u64 for cmsghdr alignment
                                                  // SAFETY: msghdr is plain data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points at `space` bytes we own, enough for one
    // cmsghdr carrying one fd, so CMSG_FIRSTHDR returns a valid pointer.
    let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    if cmsg.is_null() {
        return Err(Error::Protocol("no room for control message".into()));
    }
    // SAFETY: pure size computation.
    let clen = unsafe { libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) };
    let hdr = libc::cmsghdr { cmsg_len: clen as _, cmsg_level: libc::SOL_SOCKET, cmsg_type: libc::SCM_RIGHTS };
    // SAFETY: `cmsg` points into `cbuf` (checked non-null above), which is
    // 8-byte aligned and large enough for a cmsghdr.
    unsafe { std::ptr::write(cmsg, hdr) };
    // SAFETY: CMSG_DATA of a valid header in our buffer.
    let data = unsafe { libc::CMSG_DATA(cmsg) };
    // SAFETY: CMSG_SPACE reserved room for one fd after the header.
    unsafe { std::ptr::write_unaligned(data.cast::<RawFd>(), fd) };
    // SAFETY: msg and everything it points to live across the call.
    let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(sys("sendmsg uffd handshake")(std::io::Error::last_os_error()));
    }
    if n as usize != body.len() {
        return Err(Error::Protocol(format!("short sendmsg: {n} of {} bytes", body.len())));
    }
    Ok(())
}

/// Server (page handler) side: receive the mappings and the uffd.
pub fn recv_handshake(stream: &UnixStream) -> Result<(Vec<GuestRegionUffdMapping>, OwnedFd)> {
    let mut body = vec![0u8; MAX_MSG];
    let mut iov = libc::iovec { iov_base: body.as_mut_ptr().cast(), iov_len: body.len() };
    // SAFETY: pure size computation (room for up to 4 fds, extras are closed).
    let space = unsafe { libc::CMSG_SPACE((4 * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    // SAFETY: msghdr is plain data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg points at buffers we own for the duration of the call.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(sys("recvmsg uffd handshake")(std::io::Error::last_os_error()));
    }
    let mut fds: Vec<OwnedFd> = Vec::new();
    // SAFETY: msg was filled by recvmsg; CMSG_FIRSTHDR/NXTHDR walk the
    // control buffer within msg_controllen.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: cmsg is non-null and inside the control buffer.
        let h: libc::cmsghdr = unsafe { std::ptr::read_unaligned(cmsg) };
        let (level, ty, clen) = (h.cmsg_level, h.cmsg_type, h.cmsg_len);
        if level == libc::SOL_SOCKET && ty == libc::SCM_RIGHTS {
            // SAFETY: pure size computation.
            let hdr = unsafe { libc::CMSG_LEN(0) } as usize;
            let count = clen.saturating_sub(hdr) / std::mem::size_of::<RawFd>();
            for i in 0..count {
                // SAFETY: CMSG_DATA of a valid header inside the buffer.
                let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
                // SAFETY: the kernel wrote `count` fds after the header.
                let fd = unsafe { std::ptr::read_unaligned(data.wrapping_add(i)) };
                // SAFETY: SCM_RIGHTS gave us a fresh fd that nobody else owns.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        // SAFETY: msg and cmsg are valid, as above.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(Error::Protocol("control data truncated".into()));
    }
    if msg.msg_flags & libc::MSG_TRUNC != 0 {
        return Err(Error::Protocol(format!("handshake larger than {MAX_MSG} bytes")));
    }
    let mappings: Vec<GuestRegionUffdMapping> =
        serde_json::from_slice(&body[..n as usize]).map_err(|e| Error::Protocol(format!("bad mappings JSON: {e}")))?;
    if fds.len() != 1 {
        return Err(Error::Protocol(format!("expected exactly one uffd, got {}", fds.len())));
    }
    let fd = fds.pop().ok_or_else(|| Error::Protocol("no uffd".into()))?;
    Ok((mappings, fd))
}

/// Pid of the process at the other end of a Unix socket (`SO_PEERCRED`).
pub fn peer_pid(stream: &UnixStream) -> Option<i32> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which we own.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0 && cred.pid > 0).then_some(cred.pid)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Vec<GuestRegionUffdMapping>, serde_json::Error> {
        serde_json::from_str(json)
    }

    /// Firecracker 1.7-1.11 send only `page_size_kib`, and it has always carried bytes.
    #[test]
    fn page_size_kib_carries_bytes() {
        let old = r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size_kib":4096}]"#;
        assert_eq!(parse(old).unwrap()[0].page_size, 4096);
        let huge = r#"[{"base_host_virt_addr":2097152,"size":2097152,"offset":0,"page_size_kib":2097152}]"#;
        assert_eq!(parse(huge).unwrap()[0].page_size, 2 << 20);
    }

    /// Releases before 1.7 send no page size at all: 4 KiB.
    #[test]
    fn no_page_size_means_4k() {
        let none = r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0}]"#;
        assert_eq!(parse(none).unwrap()[0].page_size, 4096);
    }

    #[test]
    fn both_fields_in_bytes() {
        let both = r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096,"page_size_kib":4096}]"#;
        let new = r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096}]"#;
        assert_eq!(parse(both).unwrap(), parse(new).unwrap());
        assert_eq!(parse(new).unwrap()[0].page_size, 4096);
    }
}
