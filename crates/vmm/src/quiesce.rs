//! Quiescing a multithreaded VMM before fork().
//!
//! fork() copies only the calling thread. Whatever lock another thread held at that instant
//! stays locked forever in the child: a Rust `Mutex`, the stdout/stderr lock, tracing's
//! registries. (glibc itself takes its malloc and stdio locks around fork, so malloc is safe.)
//! So fork-clone is safe by design, not by luck: **every thread of a VMM process is at a known
//! point that holds no lock the child uses when fork() runs.**
//!
//! - vCPU threads are parked by [`crate::vcpu_thread::Control::pause`] (waiting on their
//!   parent-only condvar).
//! - A lazily woken VM's page server and working-set recorder are stopped and joined before
//!   its first fork (`WakeHandle::finish`).
//! - Every other long-lived thread (API acceptor and workers, console pumps, the memory-failure
//!   monitor) is a *participant*: it registers ([`participant`]), holds a [`Busy`] guard while
//!   it runs arbitrary code (allocating, logging, locking) and gives it up only around blocking
//!   calls that touch state private to the parent ([`Busy::idle`]: accept, read, a condvar wait
//!   on a parent-only object). On return it takes the guard again, which waits while a fork is in
//!   progress.
//! - The forking thread closes the gate ([`Gate::exclusive`]): no new [`Busy`] guards, wait
//!   until none is held. It then checks `/proc/self/task`: a thread that is neither the caller,
//!   a parked vCPU nor a registered participant makes the fork fail with its name (a new kind of
//!   thread must join the protocol before forking works again).
//! - In the child the gate is replaced by a fresh one ([`Exclusive::into_child`]); the parent
//!   reopens it once all children are forked.

use std::sync::atomic::{AtomicPtr, Ordering::SeqCst};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Default)]
struct State {
    busy: usize,
    forking: bool,
    participants: Vec<i32>,
}

/// The process-wide fork gate.
#[derive(Default)]
pub struct Gate {
    state: Mutex<State>,
    cond: Condvar,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate").finish_non_exhaustive()
    }
}

static GATE: AtomicPtr<Gate> = AtomicPtr::new(std::ptr::null_mut());
static STRICT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes a thread that is not quiesced fail the fork (the VMM server does this). Off by
/// default: a library user (tests under libtest, benchmarks) may have threads of its own that
/// the gate does not know; then the audit only logs them.
pub fn require_all_quiesced(on: bool) {
    STRICT.store(on, SeqCst);
}

/// Whether [`require_all_quiesced`] is on.
pub fn strict() -> bool {
    STRICT.load(SeqCst)
}

/// This process's gate.
pub fn gate() -> &'static Gate {
    let p = GATE.load(SeqCst);
    if !p.is_null() {
        // SAFETY: a non-null GATE always points to a leaked (never freed) Gate.
        return unsafe { &*p };
    }
    let fresh = Box::into_raw(Box::default());
    match GATE.compare_exchange(std::ptr::null_mut(), fresh, SeqCst, SeqCst) {
        // SAFETY: we just leaked `fresh` into GATE; it is never freed.
        Ok(_) => unsafe { &*fresh },
        Err(other) => {
            // SAFETY: `fresh` was never shared: we still own it.
            drop(unsafe { Box::from_raw(fresh) });
            // SAFETY: as above, `other` is a leaked Gate.
            unsafe { &*other }
        }
    }
}

fn lock(g: &Gate) -> MutexGuard<'_, State> {
    g.state.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// A registered participant thread (unregistered on drop).
#[derive(Debug)]
pub struct Participant {
    tid: i32,
    gate: &'static Gate,
}

/// Registers the calling thread as a participant.
pub fn participant() -> Participant {
    let g = gate();
    let tid = gettid();
    let mut s = lock(g);
    while s.forking {
        s = g.cond.wait(s).unwrap_or_else(|p| p.into_inner());
    }
    s.participants.push(tid);
    Participant { tid, gate: g }
}

impl Drop for Participant {
    fn drop(&mut self) {
        let mut s = lock(self.gate);
        while s.forking {
            s = self.gate.cond.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.participants.retain(|&t| t != self.tid);
    }
}

/// Held by a participant while it runs code that may lock, allocate or log.
#[derive(Debug)]
pub struct Busy {
    gate: &'static Gate,
}

/// Takes a busy guard, waiting while a fork is in progress.
pub fn busy() -> Busy {
    let g = gate();
    let mut s = lock(g);
    while s.forking {
        s = g.cond.wait(s).unwrap_or_else(|p| p.into_inner());
    }
    s.busy += 1;
    Busy { gate: g }
}

impl Busy {
    /// Runs the blocking call `f` without the guard. `f` may only touch state private to this
    /// process (never used by a fork child): its own fds, parent-only locks and condvars.
    pub fn idle<R>(&mut self, f: impl FnOnce() -> R) -> R {
        {
            let mut s = lock(self.gate);
            s.busy -= 1;
        }
        self.gate.cond.notify_all();
        let r = f();
        let mut s = lock(self.gate);
        while s.forking {
            s = self.gate.cond.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.busy += 1;
        r
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        lock(self.gate).busy -= 1;
        self.gate.cond.notify_all();
    }
}

/// The gate closed by a forking thread: no participant runs.
#[derive(Debug)]
pub struct Exclusive {
    gate: &'static Gate,
}

impl Gate {
    /// Closes the gate: waits (up to `timeout`) until no [`Busy`] guard is held; new ones wait.
    pub fn exclusive(&'static self, timeout: Duration) -> Result<Exclusive, String> {
        let t0 = Instant::now();
        let mut s = lock(self);
        while s.forking {
            let left = timeout.saturating_sub(t0.elapsed());
            if left.is_zero() {
                return Err("another fork is in progress".into());
            }
            s = self.cond.wait_timeout(s, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        s.forking = true;
        while s.busy > 0 {
            let left = timeout.saturating_sub(t0.elapsed());
            if left.is_zero() {
                let n = s.busy;
                s.forking = false;
                drop(s);
                self.cond.notify_all();
                return Err(format!("{n} threads did not reach a safe point for fork within {timeout:?}"));
            }
            s = self.cond.wait_timeout(s, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        Ok(Exclusive { gate: self })
    }
}

impl Exclusive {
    /// Checks that every thread of the process is `me`, one of `parked` (vCPUs) or a registered
    /// participant; names the others.
    pub fn audit(&self, parked: &[i32]) -> Result<(), String> {
        let me = gettid();
        let known = lock(self.gate).participants.clone();
        let rd = std::fs::read_dir("/proc/self/task").map_err(|e| format!("cannot list threads: {e}"))?;
        let mut unknown = Vec::new();
        for e in rd.flatten() {
            let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
            if tid == me || parked.contains(&tid) || known.contains(&tid) || kernel_worker(&e.path()) {
                continue;
            }
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            unknown.push(format!("{} ({tid})", comm.trim()));
        }
        if unknown.is_empty() {
            return Ok(());
        }
        Err(format!(
            "cannot fork safely: thread(s) {} are not quiesced (not a parked vCPU or a fork-gate participant)",
            unknown.join(", ")
        ))
    }

    /// In a fork child: forget the parent's gate (its threads are gone; its lock may be in any
    /// state) and start with a fresh, open one.
    pub fn into_child(self) {
        std::mem::forget(self);
        let fresh = Box::into_raw(Box::<Gate>::default());
        GATE.store(fresh, SeqCst);
    }
}

/// A thread the kernel runs in our thread group without user code (KVM's NX huge page recovery
/// worker, io_uring workers): it holds no user-space lock.
fn kernel_worker(task: &std::path::Path) -> bool {
    const PF_IO_WORKER: u64 = 0x10;
    const PF_USER_WORKER: u64 = 0x4000;
    let Ok(stat) = std::fs::read_to_string(task.join("stat")) else { return false };
    let Some((_, rest)) = stat.rsplit_once(')') else { return false };
    let flags = rest.split_whitespace().nth(6).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    flags & (PF_IO_WORKER | PF_USER_WORKER) != 0
}

impl Drop for Exclusive {
    fn drop(&mut self) {
        lock(self.gate).forking = false;
        self.gate.cond.notify_all();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn exclusive_waits_for_busy_threads_and_holds_new_ones() {
        let (tx, rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            let _p = participant();
            let mut b = busy();
            tx.send(()).unwrap();
            b.idle(|| go_rx.recv().unwrap());
            tx.send(()).unwrap();
        });
        rx.recv().unwrap();
        // The participant is busy until it goes idle; then the gate closes.
        let ex = loop {
            if let Ok(ex) = gate().exclusive(Duration::from_secs(10)) {
                break ex;
            }
        };
        go_tx.send(()).unwrap();
        // It cannot become busy again while the gate is closed.
        assert!(rx.recv_timeout(Duration::from_millis(50)).is_err());
        drop(ex);
        rx.recv().unwrap();
        t.join().unwrap();
    }
}
