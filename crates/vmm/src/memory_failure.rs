//! Failing a vCPU, not the process, when lazily served guest memory cannot be produced.
//!
//! When the page server cannot produce a page (corrupt chunk, dead fault thread) it poisons the
//! page (`UFFDIO_POISON`). KVM then fails to map it and sends the vCPU thread a SIGBUS
//! (`BUS_MCEERR_AR`, as for hardware memory errors); KVM_RUN returns EINTR and, if nothing stops
//! the vCPU, re-enters the guest, faults again, and so on. With the default disposition SIGBUS
//! would kill the whole VMM process instead.
//!
//! So lazily restored VMs install a process-wide SIGBUS handler. On a registered vCPU thread it
//! only writes the thread id to a pipe (async-signal-safe) and returns; a monitor thread reads
//! the pipe and stops that VM with [`ExitReason::Error`]. On any other thread (a host-side
//! access to a poisoned page) it restores the previous disposition and returns, so the access
//! faults again and the signal has its usual effect (the process dies with SIGBUS).

use std::sync::atomic::{AtomicI32, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use crate::devices::console::lock;
use crate::vcpu_thread::{Control, ExitReason};

/// Most vCPU threads watched at once (across all lazily restored VMs of the process).
const SLOTS: usize = 256;

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: AtomicI32 = AtomicI32::new(0);
static VCPU_TIDS: [AtomicI32; SLOTS] = [EMPTY; SLOTS];
static PIPE_WRITE: AtomicI32 = AtomicI32::new(-1);
static OLD_ACTION: OnceLock<libc::sigaction> = OnceLock::new();

/// Explains a failure to the user (e.g. the page server's first error).
pub(crate) type Why = Arc<dyn Fn() -> Option<String> + Send + Sync>;

struct Entry {
    tid: i32,
    vcpu: usize,
    ctl: Weak<Control>,
    why: Why,
}

static REGISTRY: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

/// The calling thread's kernel thread id.
pub(crate) fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let tid = gettid();
    if VCPU_TIDS.iter().any(|t| t.load(SeqCst) == tid) {
        let fd = PIPE_WRITE.load(SeqCst);
        let bytes = tid.to_ne_bytes();
        // SAFETY: write(2) is async-signal-safe; 4 bytes from a local array to our pipe. A full
        // pipe (EAGAIN) loses nothing that matters: the vCPU faults again and writes again.
        let _ = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        return;
    }
    // Not a vCPU: give the signal its previous meaning. A synchronous fault repeats on return.
    match OLD_ACTION.get() {
        Some(old) if old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN => {
            if old.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the previous handler was installed with SA_SIGINFO, so it has this type.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(old.sa_sigaction) };
                f(sig, info, ctx);
            } else {
                // SAFETY: a plain handler installed without SA_SIGINFO has this type.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(old.sa_sigaction) };
                f(sig);
            }
        }
        _ => {
            // SAFETY: signal(2) is async-signal-safe; restores the default action.
            unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
        }
    }
}

fn monitor(read_fd: i32) {
    // A fork-gate participant, idle while it waits on its pipe (see crate::quiesce).
    let _participant = crate::quiesce::participant();
    let mut busy = crate::quiesce::busy();
    loop {
        let mut b = [0u8; 4];
        // SAFETY: reads at most 4 bytes into a local array from our pipe.
        let n = busy.idle(|| unsafe { libc::read(read_fd, b.as_mut_ptr().cast(), b.len()) });
        if n != 4 {
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!("memory-failure monitor: pipe read returned {n}; monitor stops");
            return;
        }
        let tid = i32::from_ne_bytes(b);
        let reg = lock(&REGISTRY);
        if let Some(e) = reg.iter().find(|e| e.tid == tid) {
            if let Some(ctl) = e.ctl.upgrade() {
                let why = (e.why)().unwrap_or_else(|| "the page was poisoned".into());
                let msg = format!("vCPU {}: guest memory could not be served: {why}", e.vcpu);
                tracing::error!("{msg}");
                ctl.stop(ExitReason::Error(msg));
            }
        }
    }
}

/// Starts the monitor thread and installs the SIGBUS handler now (a warm VM does, so that a
/// clone's first [`watch`] does not pay for it).
pub(crate) fn prepare() -> Result<(), String> {
    install()
}

fn install() -> Result<(), String> {
    static ONCE: OnceLock<Result<(), String>> = OnceLock::new();
    ONCE.get_or_init(|| {
        let mut fds = [0i32; 2];
        // SAFETY: pipe2 writes two fds into our array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(format!("pipe2: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: fcntl on the write end we just created.
        unsafe { libc::fcntl(fds[1], libc::F_SETFL, libc::O_NONBLOCK) };
        PIPE_WRITE.store(fds[1], SeqCst);
        let read_fd = fds[0];
        std::thread::Builder::new()
            .name("memfail-monitor".into())
            .spawn(move || monitor(read_fd))
            .map_err(|e| format!("spawn memory-failure monitor: {e}"))?;
        // SAFETY: an all-zero sigaction is a valid starting value.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = on_sigbus as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        // SAFETY: an all-zero sigaction is valid output space.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: installs our handler (async-signal-safe body) and saves the old action.
        if unsafe { libc::sigaction(libc::SIGBUS, &act, &mut old) } != 0 {
            return Err(format!("sigaction(SIGBUS): {}", std::io::Error::last_os_error()));
        }
        let _ = OLD_ACTION.set(old);
        Ok(())
    })
    .clone()
}

/// While alive, a memory failure on one of the watched vCPU threads stops their VM with an error.
#[derive(Debug)]
pub(crate) struct Watch {
    tids: Vec<i32>,
}

/// Watches vCPU threads `tids` (index = vCPU id) of the VM controlled by `ctl`.
pub(crate) fn watch(tids: &[i32], ctl: &Arc<Control>, why: Why) -> Result<Watch, String> {
    install()?;
    let mut w = Watch { tids: Vec::new() };
    for (vcpu, &tid) in tids.iter().enumerate() {
        if !VCPU_TIDS.iter().any(|t| t.compare_exchange(0, tid, SeqCst, SeqCst).is_ok()) {
            return Err(format!("more than {SLOTS} lazily restored vCPUs in this process"));
        }
        w.tids.push(tid);
        lock(&REGISTRY).push(Entry { tid, vcpu, ctl: Arc::downgrade(ctl), why: why.clone() });
    }
    Ok(w)
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut reg = lock(&REGISTRY);
        reg.retain(|e| !self.tids.contains(&e.tid));
        for t in &VCPU_TIDS {
            if self.tids.contains(&t.load(SeqCst)) {
                t.store(0, SeqCst);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vcpu_thread::Want;

    /// Where KVM reports a poisoned page with SIGBUS, a watched vCPU thread survives it and its
    /// VM stops with an error.
    #[test]
    fn sigbus_on_a_watched_thread_stops_its_vm() {
        let ctl = Control::new(1, Want::Run);
        let (tx, rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            let _ = tx.send(gettid());
            let _ = go_rx.recv();
            let pid = std::process::id() as i32;
            // SAFETY: sends SIGBUS to this very thread; the handler under test catches it.
            unsafe { libc::syscall(libc::SYS_tgkill, pid, gettid(), libc::SIGBUS) };
            7
        });
        let tid = rx.recv().unwrap_or_default();
        let w = watch(&[tid], &ctl, Arc::new(|| Some("chunk is corrupt".into()))).unwrap_or_else(|e| panic!("{e}"));
        let _ = go_tx.send(());
        assert_eq!(t.join().ok(), Some(7), "the thread survives SIGBUS");
        match ctl.wait_exit(Some(std::time::Duration::from_secs(5))) {
            Some(ExitReason::Error(m)) => assert!(m.contains("vCPU 0") && m.contains("chunk is corrupt"), "{m}"),
            other => panic!("{other:?}"),
        }
        drop(w);
        assert!(VCPU_TIDS.iter().all(|t| t.load(SeqCst) != tid));
    }
}
