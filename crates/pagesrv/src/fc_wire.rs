//! The socket side of Firecracker's handshake: one message carrying the mappings JSON with the
//! userfaultfd as `SCM_RIGHTS` data, and the peer's pid (`SO_PEERCRED`).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::error::{sys, Error, Result};
use crate::fc::{self, GuestRegionUffdMapping, Handshake, PageSizeField, MAX_JSON};
use crate::uffd::Uffd;

/// Most fds accepted in the control data of one message (extras are closed, then refused).
const MAX_FDS: usize = 8;

/// Send `body` with `fds` attached (none, one or several) in one `sendmsg`.
pub fn send_with_fds(stream: &UnixStream, body: &[u8], fds: &[BorrowedFd<'_>]) -> Result<()> {
    let mut iov = libc::iovec { iov_base: body.as_ptr() as *mut libc::c_void, iov_len: body.len() };
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let bytes = std::mem::size_of_val(raw.as_slice());
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(bytes as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)]; // u64 for cmsghdr alignment
                                                  // SAFETY: msghdr is plain data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points at `space` bytes we own, room for one cmsghdr with the fds.
        let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        if cmsg.is_null() {
            return Err(Error::Protocol("no room for control message".into()));
        }
        // SAFETY: pure size computation.
        let clen = unsafe { libc::CMSG_LEN(bytes as u32) };
        let hdr = libc::cmsghdr { cmsg_len: clen as _, cmsg_level: libc::SOL_SOCKET, cmsg_type: libc::SCM_RIGHTS };
        // SAFETY: `cmsg` points into `cbuf` (non-null), 8-byte aligned and large enough.
        unsafe { std::ptr::write(cmsg, hdr) };
        // SAFETY: CMSG_DATA of a valid header in our buffer.
        let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
        for (i, fd) in raw.iter().enumerate() {
            // SAFETY: CMSG_SPACE reserved room for all fds after the header.
            unsafe { std::ptr::write_unaligned(data.wrapping_add(i), *fd) };
        }
    }
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

/// VMM side, as Firecracker 1.12+ does it: the mappings and the uffd in one message.
pub fn send_handshake(stream: &UnixStream, mappings: &[GuestRegionUffdMapping], uffd: BorrowedFd<'_>) -> Result<()> {
    send_with_fds(stream, &fc::body(mappings, PageSizeField::Both), &[uffd])
}

/// One `recvmsg`: appends data to `body`, fds to `fds`. Returns the bytes read (0 = EOF).
fn recv_some(stream: &UnixStream, body: &mut Vec<u8>, fds: &mut Vec<OwnedFd>) -> Result<usize> {
    let start = body.len();
    body.resize(MAX_JSON + 1, 0);
    let mut iov = libc::iovec { iov_base: body[start..].as_mut_ptr().cast(), iov_len: body.len() - start };
    // SAFETY: pure size computation.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    // SAFETY: msghdr is plain data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg points at buffers we own for the duration of the call.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    let err = std::io::Error::last_os_error();
    body.truncate(start + n.max(0) as usize);
    if n < 0 {
        return Err(match err.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                Error::Protocol("Firecracker handshake: timed out waiting for the mappings".into())
            }
            _ => sys("recvmsg uffd handshake")(err),
        });
    }
    // SAFETY: msg was filled by recvmsg; CMSG_FIRSTHDR/NXTHDR walk the control buffer within
    // msg_controllen.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: cmsg is non-null and inside the control buffer.
        let h: libc::cmsghdr = unsafe { std::ptr::read_unaligned(cmsg) };
        if h.cmsg_level == libc::SOL_SOCKET && h.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: pure size computation.
            let hdr = unsafe { libc::CMSG_LEN(0) } as usize;
            let count = (h.cmsg_len as usize).saturating_sub(hdr) / std::mem::size_of::<RawFd>();
            // SAFETY: CMSG_DATA of a valid header inside the buffer.
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
            for i in 0..count {
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
        return Err(Error::Protocol(format!(
            "Firecracker handshake: more than {MAX_FDS} fds (control data truncated)"
        )));
    }
    Ok(n as usize)
}

/// Handler side: receive the mappings and the uffd within `timeout`. The JSON may arrive in
/// several pieces (a stream socket); it is bounded by [`MAX_JSON`]. Exactly one fd must come,
/// and it must be a userfaultfd; it is made non-blocking.
pub fn recv_handshake(stream: &UnixStream, timeout: Duration) -> Result<(Handshake, Uffd)> {
    let deadline = Instant::now() + timeout;
    let mut body = Vec::new();
    let mut fds = Vec::new();
    let hs = loop {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        stream.set_read_timeout(Some(left)).map_err(sys("set handshake timeout"))?;
        let n = recv_some(stream, &mut body, &mut fds)?;
        if body.len() > MAX_JSON {
            return Err(Error::Protocol(format!("Firecracker handshake: message larger than {MAX_JSON} bytes")));
        }
        match fc::parse(&body) {
            Ok(h) => break h,
            Err(e) if fc::is_incomplete(&e) && n > 0 => continue,
            Err(_) if n == 0 && body.is_empty() => {
                return Err(Error::Protocol("Firecracker handshake: peer closed the socket without a message".into()))
            }
            Err(e) => return Err(e),
        }
    };
    stream.set_read_timeout(None).map_err(sys("clear handshake timeout"))?;
    if fds.len() != 1 {
        return Err(Error::Protocol(format!(
            "Firecracker handshake: expected exactly one uffd, got {} fds",
            fds.len()
        )));
    }
    let fd = fds.pop().ok_or_else(|| Error::Protocol("no uffd".into()))?;
    if !Uffd::is_userfaultfd(fd.as_fd()) {
        return Err(Error::Protocol("Firecracker handshake: the fd sent is not a userfaultfd".into()));
    }
    let uffd = Uffd::from_fd(fd, 0);
    uffd.ensure_nonblocking().map_err(sys("set O_NONBLOCK on the userfaultfd"))?;
    Ok((hs, uffd))
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
