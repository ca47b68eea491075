//! Stop signals (SIGINT/SIGTERM) for the long-running serving commands.

/// Blocks SIGINT/SIGTERM in this thread (and threads started after), so one can be waited for.
pub fn block_stop_signals() -> Result<libc::sigset_t, String> {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t we own.
    unsafe { libc::sigemptyset(&mut set) };
    for s in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: as above.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    // SAFETY: blocks the signals in this thread; `set` is valid, the old mask is not wanted.
    if unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) } != 0 {
        return Err("cannot block SIGINT/SIGTERM".into());
    }
    Ok(set)
}
