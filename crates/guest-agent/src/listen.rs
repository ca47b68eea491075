//! Listening sockets: AF_VSOCK (in a guest) or a Unix socket (host tests). Accepted connections
//! become plain `File`s: reads, writes and `dup`s are all a session needs.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;

use crate::args::Listen;
use crate::error::AgentError;

#[derive(Debug)]
pub enum Listener {
    Vsock(OwnedFd),
    Unix(UnixListener),
}

fn os(what: &'static str) -> AgentError {
    AgentError::Os { what, err: std::io::Error::last_os_error() }
}

impl Listener {
    pub fn bind(l: &Listen) -> Result<Self, AgentError> {
        match l {
            Listen::Unix(p) => {
                let _ = std::fs::remove_file(p);
                UnixListener::bind(p)
                    .map(Listener::Unix)
                    .map_err(|err| AgentError::Os { what: "cannot bind the Unix socket", err })
            }
            Listen::Vsock(port) => bind_vsock(*port),
        }
    }

    /// Waits for the next connection.
    pub fn accept(&self) -> Result<File, AgentError> {
        match self {
            Listener::Unix(l) => l
                .accept()
                .map(|(s, _)| File::from(OwnedFd::from(s)))
                .map_err(|err| AgentError::Os { what: "accept", err }),
            Listener::Vsock(fd) => loop {
                // SAFETY: accept4 on our listening socket; no peer address is asked for.
                let c = unsafe {
                    libc::accept4(fd.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC)
                };
                if c >= 0 {
                    // SAFETY: `c` is a new fd that nothing else owns.
                    return Ok(File::from(unsafe { OwnedFd::from_raw_fd(c) }));
                }
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(AgentError::Os { what: "accept on vsock", err: e });
                }
            },
        }
    }
}

fn bind_vsock(port: u32) -> Result<Listener, AgentError> {
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(os("socket(AF_VSOCK) (is the vsock driver loaded?)"));
    }
    // SAFETY: `fd` is a new socket that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid start.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_vm of `len` bytes.
    let rc = unsafe { libc::bind(fd.as_raw_fd(), (&addr as *const libc::sockaddr_vm).cast(), len) };
    if rc < 0 {
        return Err(os("bind vsock port"));
    }
    // SAFETY: listen on our bound socket.
    if unsafe { libc::listen(fd.as_raw_fd(), 64) } < 0 {
        return Err(os("listen on vsock"));
    }
    Ok(Listener::Vsock(fd))
}
