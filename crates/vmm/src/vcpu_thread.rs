//! vCPU threads and the control block that parks, resumes and stops them.
//!
//! Pausing: the controller sets `want = Pause` and kicks every vCPU thread: it sets the thread's
//! `kvm_run.immediate_exit` and sends it a signal. A vCPU thread clears `immediate_exit` before it
//! reads `want`, so a kick that lands just before KVM_RUN is not lost (KVM_RUN then returns at
//! once) and one kick per pause is enough; a slow fallback repeats it. Every kick of a vCPU in
//! guest mode is an IPI and a VM exit on the host, which a nested host pays dearly for. A
//! parked vCPU first re-enters KVM_RUN with `immediate_exit` set, which completes a pending port
//! I/O instruction without running guest code, so the saved state is between two instructions.
//! While parked a vCPU runs jobs (state capture/restore) on its own thread, where its fd lives.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuExit;

use crate::devices::console::lock;
use crate::devices::mmio::MmioBus;
use crate::devices::pio::{PioAction, PioBus};
use crate::vstate::diag;
use crate::vstate::vcpu::Vcpu;

/// Why a VM stopped running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest asked for a reset (i8042) — Firecracker's convention for "guest shut down".
    GuestReset,
    /// The guest triple-faulted or otherwise shut down.
    GuestShutdown,
    /// The VMM was told to stop.
    Stopped,
    /// A vCPU failed; the message says how.
    Error(String),
}

/// What the controller wants the vCPUs to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    Run,
    Pause,
    Stop,
}

/// A job a parked vCPU runs on its own thread.
pub type Job = Box<dyn FnOnce(&mut Vcpu) + Send>;

#[derive(Default)]
struct Ctl {
    want: Option<Want>,
    parked: usize,
    running: usize,
    exit: Option<ExitReason>,
    jobs: Vec<Vec<Job>>,
}

impl Ctl {
    /// Every vCPU of the VM, started or not: a pause counts them all (a VM built paused may be
    /// asked to pause before each of its threads has entered).
    fn vcpus(&self) -> usize {
        self.jobs.len()
    }
}

/// Shared control block of one VM's vCPU threads.
pub struct Control {
    ctl: Mutex<Ctl>,
    cond: Condvar,
    /// The vCPU threads and the address of each one's `kvm_run.immediate_exit` (valid while the
    /// thread is listed: it leaves the list before its vCPU fd and mapping go).
    threads: Mutex<Vec<(libc::pthread_t, usize)>>,
    /// Kernel thread ids of the vCPU threads (for the fork audit, see [`crate::quiesce`]).
    tids: Mutex<Vec<i32>>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").finish_non_exhaustive()
    }
}

/// How long a pause waits for the vCPUs to park before it kicks them again. One kick is enough
/// (see the module doc); this is a fallback, not a poll.
const KICK_AGAIN: Duration = Duration::from_millis(25);

/// The signal that kicks a vCPU out of KVM_RUN.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN() + 1
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick handler once per process; KVM_RUN returns EINTR when it fires.
pub fn install_kick_handler() -> std::io::Result<()> {
    static ONCE: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    let r = ONCE
        .get_or_init(|| vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick).map_err(|e| e.errno()));
    r.map_err(std::io::Error::from_raw_os_error)
}

impl Control {
    pub fn new(vcpus: usize, start: Want) -> Arc<Self> {
        let ctl = Ctl { want: Some(start), jobs: (0..vcpus).map(|_| Vec::new()).collect(), ..Default::default() };
        Arc::new(Control {
            ctl: Mutex::new(ctl),
            cond: Condvar::new(),
            threads: Mutex::new(Vec::new()),
            tids: Mutex::new(Vec::new()),
        })
    }

    fn kick_all(&self) {
        for &(t, immediate_exit) in lock(&self.threads).iter() {
            // SAFETY: the address is the u8 `immediate_exit` of this thread's live kvm_run mapping
            // (the thread removes it under this lock before the mapping goes); the vCPU thread
            // accesses the byte only atomically too (see `run_vcpu`).
            unsafe { AtomicU8::from_ptr(immediate_exit as *mut u8) }.store(1, Ordering::SeqCst);
            // SAFETY: t is a live vCPU thread of this process (removed before it is joined); a
            // signal with an empty handler has no other effect.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// Parks every vCPU; returns how long it took.
    pub fn pause(&self, timeout: Duration) -> Result<Duration, String> {
        let t0 = Instant::now();
        {
            let mut c = lock(&self.ctl);
            if c.exit.is_some() {
                return Err("the VM is not running".into());
            }
            c.want = Some(Want::Pause);
        }
        loop {
            self.kick_all();
            let c = lock(&self.ctl);
            let (c, _) = self
                .cond
                .wait_timeout_while(c, KICK_AGAIN, |c| c.parked < c.vcpus() && c.exit.is_none())
                .unwrap_or_else(|p| p.into_inner());
            if c.exit.is_some() {
                return Err("the VM stopped while pausing".into());
            }
            if c.parked == c.vcpus() {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() > timeout {
                return Err(format!("vCPUs did not park within {timeout:?}"));
            }
        }
    }

    /// Lets parked vCPUs continue; returns once they have left the parked state.
    pub fn resume(&self) -> Result<Duration, String> {
        let t0 = Instant::now();
        let mut c = lock(&self.ctl);
        if c.exit.is_some() {
            return Err("the VM is not running".into());
        }
        c.want = Some(Want::Run);
        self.cond.notify_all();
        let c = self.cond.wait_while(c, |c| c.parked > 0 && c.exit.is_none()).unwrap_or_else(|p| p.into_inner());
        drop(c);
        Ok(t0.elapsed())
    }

    /// Stops all vCPUs (idempotent) with `reason` unless one is already recorded.
    pub fn stop(&self, reason: ExitReason) {
        {
            let mut c = lock(&self.ctl);
            c.exit.get_or_insert(reason);
            c.want = Some(Want::Stop);
        }
        self.cond.notify_all();
        self.kick_all();
    }

    /// Waits until the VM exits, up to `timeout`.
    pub fn wait_exit(&self, timeout: Option<Duration>) -> Option<ExitReason> {
        let c = lock(&self.ctl);
        let c = match timeout {
            Some(t) => self.cond.wait_timeout_while(c, t, |c| c.exit.is_none()).unwrap_or_else(|p| p.into_inner()).0,
            None => self.cond.wait_while(c, |c| c.exit.is_none()).unwrap_or_else(|p| p.into_inner()),
        };
        c.exit.clone()
    }

    /// After the VM ended: waits, at most `timeout`, until every vCPU thread has left (each logs
    /// where it was on its way out of a VM that ended unasked). True if they all left.
    pub fn wait_vcpus_left(&self, timeout: Duration) -> bool {
        let c = lock(&self.ctl);
        let (c, _) = self
            .cond
            .wait_timeout_while(c, timeout, |c| c.exit.is_some() && c.running > 0)
            .unwrap_or_else(|p| p.into_inner());
        c.running == 0
    }

    /// Kernel thread ids of the running vCPU threads.
    pub fn vcpu_tids(&self) -> Vec<i32> {
        lock(&self.tids).clone()
    }

    pub fn exit_reason(&self) -> Option<ExitReason> {
        lock(&self.ctl).exit.clone()
    }

    /// Waits until every vCPU of a VM built paused has parked (its threads may still be starting).
    pub fn wait_parked(&self, timeout: Duration) -> Result<(), String> {
        let c = lock(&self.ctl);
        let (c, _) = self
            .cond
            .wait_timeout_while(c, timeout, |c| c.parked < c.vcpus() && c.exit.is_none())
            .unwrap_or_else(|p| p.into_inner());
        if c.parked == c.vcpus() {
            Ok(())
        } else {
            Err(format!("vCPUs did not park within {timeout:?}"))
        }
    }

    pub fn is_paused(&self) -> bool {
        let c = lock(&self.ctl);
        c.want == Some(Want::Pause) && c.parked == c.vcpus() && c.exit.is_none()
    }

    /// Runs `job` on parked vCPU `id`'s thread and waits for its result.
    pub fn run_on<R: Send + 'static>(
        &self,
        id: usize,
        job: impl FnOnce(&mut Vcpu) -> R + Send + 'static,
    ) -> Result<R, String> {
        if !self.is_paused() {
            return Err("the VM must be paused".into());
        }
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let mut c = lock(&self.ctl);
            let slot = c.jobs.get_mut(id).ok_or_else(|| format!("no vCPU {id}"))?;
            slot.push(Box::new(move |v: &mut Vcpu| {
                let _ = tx.send(job(v));
            }));
        }
        self.cond.notify_all();
        rx.recv_timeout(Duration::from_secs(30)).map_err(|_| format!("vCPU {id} did not run the job"))
    }

    /// Registers the calling thread as a vCPU thread (for kicks), with the address of its
    /// `kvm_run.immediate_exit`.
    fn enter(&self, immediate_exit: *mut u8) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        lock(&self.threads).push((me, immediate_exit as usize));
        lock(&self.tids).push(crate::quiesce::gettid());
        lock(&self.ctl).running += 1;
        self.cond.notify_all();
    }

    fn leave(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        lock(&self.threads).retain(|&(t, _)| t != me);
        let tid = crate::quiesce::gettid();
        lock(&self.tids).retain(|&t| t != tid);
        lock(&self.ctl).running -= 1;
        self.cond.notify_all();
    }

    /// Parks the vCPU while the controller wants it paused; runs jobs meanwhile.
    /// Returns false if the vCPU should stop.
    fn park(&self, vcpu: &mut Vcpu, immediate_exit: &AtomicU8) -> bool {
        // Complete a pending I/O instruction without running more guest code (the run loop
        // clears the flag again before it next reads what is wanted).
        immediate_exit.store(1, Ordering::SeqCst);
        let _ = vcpu.fd.run();
        let id = vcpu.id as usize;
        let mut c = lock(&self.ctl);
        c.parked += 1;
        self.cond.notify_all();
        loop {
            let jobs = c.jobs.get_mut(id).map(std::mem::take).unwrap_or_default();
            if !jobs.is_empty() {
                drop(c);
                for job in jobs {
                    job(vcpu);
                }
                c = lock(&self.ctl);
                continue;
            }
            if c.want != Some(Want::Pause) {
                break;
            }
            c = self.cond.wait(c).unwrap_or_else(|p| p.into_inner());
        }
        c.parked -= 1;
        let go_on = c.want == Some(Want::Run);
        drop(c);
        self.cond.notify_all();
        go_on
    }

    fn want(&self) -> Want {
        lock(&self.ctl).want.unwrap_or(Want::Stop)
    }
}

/// Body of a vCPU thread.
pub fn run_vcpu(mut vcpu: Vcpu, bus: PioBus, mmio: MmioBus, ctl: Arc<Control>) {
    let immediate_exit_ptr: *mut u8 = &mut vcpu.fd.get_kvm_run().immediate_exit;
    // SAFETY: the byte lives in this vCPU's kvm_run mapping, which stays mapped as long as
    // `vcpu` lives (to the end of this function, after `ctl.leave()`); it is aligned (u8) and
    // every access to it while kicks can come is atomic: here and in `Control::kick_all`.
    let immediate_exit = unsafe { AtomicU8::from_ptr(immediate_exit_ptr) };
    ctl.enter(immediate_exit_ptr);
    // Whether this vCPU's own exit ended the VM (its state is logged there).
    let mut ended_here = false;
    loop {
        // Cleared before `want` is read: a kick that comes after this read sets it again, so
        // KVM_RUN returns at once instead of running the guest until some later exit.
        immediate_exit.store(0, Ordering::SeqCst);
        match ctl.want() {
            Want::Stop => break,
            Want::Pause => {
                if !ctl.park(&mut vcpu, immediate_exit) {
                    break;
                }
                continue;
            }
            Want::Run => {}
        }
        match vcpu.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                if bus.write(port, data) == PioAction::Reset {
                    ctl.stop(ExitReason::GuestReset);
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => bus.read(port, data),
            Ok(VcpuExit::MmioRead(addr, data)) => mmio.read(addr, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => mmio.write(addr, data),
            Ok(VcpuExit::Shutdown) => {
                tracing::error!("guest shutdown exit (triple fault): {}", diag::describe(&vcpu));
                ended_here = true;
                ctl.stop(ExitReason::GuestShutdown)
            }
            Ok(VcpuExit::Hlt) => {
                tracing::error!("halt exit: {}", diag::describe(&vcpu));
                ended_here = true;
                ctl.stop(ExitReason::GuestShutdown)
            }
            Ok(VcpuExit::Intr) => {}
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                ctl.stop(ExitReason::Error(format!("vCPU {} entry failed: reason {reason:#x} on cpu {cpu}", vcpu.id)))
            }
            Ok(VcpuExit::InternalError) => {
                let rip = vcpu.fd.get_regs().map(|r| r.rip).unwrap_or_default();
                let msg = format!("vCPU {}: KVM internal error (emulation failure) at rip {rip:#x}", vcpu.id);
                tracing::error!("{msg}: {}", diag::describe(&vcpu));
                ended_here = true;
                ctl.stop(ExitReason::Error(msg))
            }
            Ok(other) => tracing::debug!("vCPU {}: unhandled exit {other:?}", vcpu.id),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => ctl.stop(ExitReason::Error(format!("vCPU {}: KVM_RUN failed: {e}", vcpu.id))),
        }
    }
    if !ended_here && matches!(ctl.exit_reason(), Some(ExitReason::GuestShutdown | ExitReason::Error(_))) {
        // A sibling of the vCPU that ended the VM unasked: where it was is evidence too.
        tracing::error!("stopped with the VM: {}", diag::describe(&vcpu));
    }
    ctl.leave();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VM built paused (restore, wake) whose second vCPU thread has not started yet is not
    /// paused: pause() returned early and run_on(1) then failed ("the VM must be paused") in a
    /// 2-vCPU wake.
    #[test]
    fn pause_waits_for_every_vcpu_not_only_the_started_ones() {
        let ctl = Control::new(2, Want::Pause);
        {
            let mut c = lock(&ctl.ctl);
            c.running = 1; // vCPU 0 entered and parked; vCPU 1's thread is not running yet
            c.parked = 1;
        }
        assert!(!ctl.is_paused());
        assert!(ctl.pause(Duration::from_millis(20)).is_err());
        {
            let mut c = lock(&ctl.ctl);
            c.running = 2;
            c.parked = 2;
        }
        assert!(ctl.is_paused());
        assert!(ctl.pause(Duration::from_millis(20)).is_ok());
    }
}
