//! Waiting for processes the test did not start itself (detached VMMs): a pidfd becomes
//! readable when the process exits, so the wait needs no polling.

use std::time::Duration;

/// Waits until process `pid` has exited (a zombie counts), at most `limit`.
pub fn wait_gone(pid: i32, limit: Duration) {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd (or -1).
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        assert_eq!(e.raw_os_error(), Some(libc::ESRCH), "pidfd_open({pid}): {e}");
        return; // already gone
    }
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    let ms = i32::try_from(limit.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd; poll writes only its revents.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    // SAFETY: fd is ours and closed once.
    unsafe { libc::close(fd) };
    assert_eq!(n, 1, "process {pid} still running after {limit:?}");
}
