//! The VMM process side of the per-VM API: serve requests for one VM (concurrently, see
//! [`crate::conn`]), clean up when it exits. Mutating operations (pause, resume, snapshot, fork,
//! hibernate) run one at a time; status, exec and stop never wait for them.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forkvm_api::vm::{
    self, limits, ExecResponse, PauseResponse, Reply, Request, ResumeResponse, RunState, SnapshotResponse,
    StatusResponse, StopResponse, VmPaths,
};
use vmm::quiesce::{self, Busy};
use vmm::{ExitReason, MicroVm, SnapshotKind, WakeHandle};

pub use crate::claim::Claimed;
use crate::conn::{self, Conns};
use crate::private_fs::{append_private, create_private};

/// What a VMM process knows about the VM it serves.
pub(crate) struct Host {
    pub vm: Arc<MicroVm>,
    pub name: String,
    pub paths: VmPaths,
    pub parent: Option<String>,
    pub listener_fd: i32,
    pub conns: Arc<Conns>,
    /// One mutating operation at a time.
    pub ops: Mutex<()>,
    /// One exec at a time on the serial console (concurrent ones would mix their lines).
    console: Mutex<()>,
    /// Set by a successful hibernate: keep the directory on exit.
    keep_dir: std::sync::atomic::AtomicBool,
    /// The page server of a woken VM whose memory may still be coming in.
    pub wake: Mutex<Option<WakeHandle>>,
    /// The connection that asked for stop: answered once the VM is stopped and its files are
    /// gone, and closed only when the process exits.
    /// (None: a stop answer; Some: this answer line, e.g. a hibernation's.)
    stop_conn: Mutex<Option<(UnixStream, Option<String>)>>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Serves the API for `vm` until it exits; returns the process exit code.
pub fn serve(claimed: Claimed, vm: MicroVm, parent: Option<String>, wake: Option<WakeHandle>) -> i32 {
    serve_then(claimed, vm, parent, wake, None)
}

/// Called once a VM can be connected to: its API threads run and its vsock socket listens
/// (Ok), or it never will (Err: the VM is being stopped). A fork child answers its parent here.
pub(crate) type OnReady = Box<dyn FnOnce(Result<(), String>)>;

/// [`serve`], calling `ready` once the VM's API and vsock sockets accept connections. With a
/// `ready`, a vsock socket that cannot be made stops the VM (its caller promised one).
pub(crate) fn serve_then(
    claimed: Claimed,
    vm: MicroVm,
    parent: Option<String>,
    wake: Option<WakeHandle>,
    mut ready: Option<OnReady>,
) -> i32 {
    // This thread takes part in the fork gate (vmm::quiesce): idle only while it waits for the VM.
    let _participant = quiesce::participant();
    let mut busy = quiesce::busy();
    // Every thread of a VMM process takes part in the gate: an unknown one fails a fork.
    quiesce::require_all_quiesced(true);
    // Fork children are reaped by the kernel: nobody waits for them here.
    // SAFETY: setting a signal disposition to SIG_IGN has no memory-safety preconditions.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
    let Claimed { name, paths, listener } = claimed;
    if let Ok(mut f) = create_private(&paths.pid_file()) {
        let _ = writeln!(f, "{}", std::process::id());
    }
    if let Err(e) = vm.listen_vsock(&paths.vsock()) {
        match ready.take() {
            Some(r) => {
                let msg = format!("no vsock socket: {e}");
                eprintln!("forkvm: error: VM {name}: {msg}");
                vm.control().stop(ExitReason::Error(msg.clone()));
                // Nobody reaches this VM from the moment its caller hears of the failure.
                let _ = std::fs::remove_file(paths.socket());
                r(Err(msg));
            }
            None => eprintln!("forkvm: warning: VM {name}: no vsock socket: {e}"),
        }
    }
    if let Some(fd) = vm.net().and_then(|n| n.netns_fd()) {
        // `forkvm port-forward` joins the VM's network namespace through this fd of ours.
        let path = paths.dir.join(crate::port_forward::NETNS_FILE);
        let _ = std::fs::write(path, format!("/proc/{}/fd/{fd}\n", std::process::id()));
    }
    // A restored, forked or woken VM: its agent gets the new generation, seed and clock first.
    if let Err(e) = vm.start_clone_hook(crate::agent_exec::addr(&paths.dir), Default::default()) {
        eprintln!("forkvm: warning: VM {name}: {e}");
    }
    let host = Arc::new(Host {
        vm: Arc::new(vm),
        name,
        paths,
        parent,
        listener_fd: listener.as_raw_fd(),
        conns: Arc::default(),
        ops: Mutex::new(()),
        console: Mutex::new(()),
        keep_dir: false.into(),
        wake: Mutex::new(wake),
        stop_conn: Mutex::new(None),
    });
    let h = Arc::clone(&host);
    let handler: Arc<conn::Handler> = Arc::new(move |req, c, busy| h.handle(req, c, busy));
    match conn::start(listener, Arc::clone(&host.conns), handler) {
        Ok(()) => {
            if let Some(r) = ready.take() {
                r(Ok(()));
            }
        }
        Err(e) => {
            eprintln!("forkvm: error: VM {}: cannot start its API threads: {e}", host.name);
            let msg = format!("cannot start the API threads: {e}");
            host.vm.control().stop(ExitReason::Error(msg.clone()));
            if let Some(r) = ready.take() {
                r(Err(msg));
            }
        }
    }
    let reason = busy.idle(|| host.vm.wait_exit(None));
    tracing::info!("VM {} exited: {reason:?}", host.name);
    let _ = std::fs::remove_file(host.paths.socket());
    let wake = lock(&host.wake).take();
    if let (Some(ExitReason::Error(e)), Some(_)) = (&reason, &wake) {
        crate::hibernate_cmd::keep_failed_wake(&host.paths, &host.name, e);
    } else if !host.keep_dir.load(std::sync::atomic::Ordering::SeqCst) {
        if crate::exit_logs::unasked(&reason) {
            // Nobody asked for this exit: keep what explains it before the directory goes, once
            // every vCPU has logged where it was (bounded: a vCPU stuck in KVM is evidence too).
            if !host.vm.control().wait_vcpus_left(Duration::from_secs(5)) {
                tracing::error!("a vCPU thread did not leave within 5 s of the VM's end");
            }
            let run = host.paths.dir.parent().map_or_else(forkvm_api::vm::run_dir, Path::to_path_buf);
            match crate::exit_logs::keep(&run, &host.paths, &host.name, &reason) {
                Ok(d) => eprintln!(
                    "forkvm: VM {} exited unasked ({reason:?}); its logs are kept in {}",
                    host.name,
                    d.display()
                ),
                Err(e) => {
                    eprintln!("forkvm: VM {} exited unasked ({reason:?}); its logs could not be kept: {e}", host.name)
                }
            }
        }
        let _ = std::fs::remove_dir_all(&host.paths.dir);
    }
    drop(wake);
    if let Some((c, line)) = lock(&host.stop_conn).take() {
        let line = line.unwrap_or_else(|| Reply::ok(StopResponse { pid: std::process::id() }).to_line());
        let _ = c.set_write_timeout(Some(limits::REQUEST_DEADLINE));
        let _ = (&c).write_all(line.as_bytes());
        // Closed by the kernel when this process exits: the client's "stop" returns then.
        std::mem::forget(c);
    }
    match reason {
        Some(ExitReason::Error(e)) => {
            eprintln!("forkvm: error: VM {}: {e}", host.name);
            1
        }
        _ => 0,
    }
}

impl Host {
    /// Answers `req` (see [`conn::Handler`]).
    fn handle(&self, req: Request, c: UnixStream, busy: &mut Busy) -> Option<(String, UnixStream)> {
        let line = match req {
            Request::Status(_) => Reply::ok(self.status()).to_line(),
            Request::Stop(_) => {
                lock(&self.stop_conn).get_or_insert((c, None));
                self.vm.control().stop(ExitReason::Stopped);
                return None;
            }
            Request::Exec(e) => answer(self.exec(&e.line, e.wait_for.as_deref(), e.timeout_ms, busy)),
            Request::AgentExec(e) => answer(crate::agent_exec::exec(&self.vm, &self.paths.dir, e)),
            req => {
                // One mutating operation at a time; waiting for the others is idle time.
                let _ops = busy.idle(|| lock(&self.ops));
                match req {
                    Request::Pause(_) => {
                        answer(self.vm.pause().map(|d| PauseResponse { pause_ms: ms(d) }).map_err(|e| e.to_string()))
                    }
                    Request::Resume(_) => {
                        answer(self.vm.resume().map(|d| ResumeResponse { resume_ms: ms(d) }).map_err(|e| e.to_string()))
                    }
                    Request::Snapshot(s) => answer(self.snapshot(&s.dir, s.diff)),
                    Request::Fork(f) => answer(self.fork(f.count, f.prefix, busy)),
                    Request::CloneServe(r) => answer(self.clone_serve(r)),
                    Request::Hibernate(h) => {
                        let dir = self.paths.hibernated();
                        match crate::hibernate_cmd::hibernate_vm(&self.vm, &dir, h.store.as_deref()) {
                            Ok(v) => {
                                // Answered by the main thread once the VMM is done with the VM.
                                self.keep_dir.store(true, std::sync::atomic::Ordering::SeqCst);
                                lock(&self.stop_conn).get_or_insert((c, Some(Reply::ok(v).to_line())));
                                self.vm.control().stop(ExitReason::Stopped);
                                return None;
                            }
                            Err(e) => Reply::<()>::err(e).to_line(),
                        }
                    }
                    _ => Reply::<()>::err("bad request").to_line(),
                }
            }
        };
        Some((line, c))
    }

    fn status(&self) -> StatusResponse {
        let exit = self.vm.control().exit_reason();
        let state = match &exit {
            Some(_) => RunState::Exited,
            None if self.vm.is_paused() => RunState::Paused,
            None => RunState::Running,
        };
        StatusResponse {
            name: self.name.clone(),
            pid: std::process::id(),
            state,
            exit: exit.map(|r| format!("{r:?}")),
            mem_mib: self.vm.memory().size() >> 20,
            vcpus: self.vm.vcpu_count(),
            generation: self.vm.generation(),
            parent: self.parent.clone(),
            uptime_s: self.vm.started().elapsed().as_secs_f64(),
            console_log: self.paths.console_log(),
            reseeded: self.vm.agent_gate().state().reseeded(),
            clone_hook: self.vm.agent_gate().state().detail(),
            // Best effort and never blocking: a fork holds this lock while the page server
            // finishes (seconds on a big woken VM), and a status must not wait for that (the
            // worker would stall the fork gate and the API; fork_stress ran out of connections).
            page_server: self.wake.try_lock().ok().and_then(|g| g.as_ref().map(|w| w.stats())).map(|s| {
                vm::PageServerStats {
                    faults: s.faults,
                    pages_served: s.pages_served,
                    pages_prefetched: s.pages_prefetched,
                    fault_p50_us: s.fault_p50_us,
                    fault_p99_us: s.fault_p99_us,
                }
            }),
        }
    }

    fn exec(
        &self,
        line: &str,
        wait_for: Option<&str>,
        timeout_ms: u64,
        busy: &mut Busy,
    ) -> Result<ExecResponse, String> {
        if self.vm.is_paused() {
            return Err(format!("VM {:?} is paused: resume it first", self.name));
        }
        busy.idle(|| crate::agent_exec::wait_gate(&self.vm))?;
        let _console = busy.idle(|| lock(&self.console));
        let timeout = Duration::from_millis(timeout_ms.min(limits::MAX_EXEC_TIMEOUT_MS));
        let console = self.vm.console();
        let mut cursor = console.cursor();
        busy.idle(|| self.vm.send_line(line)).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + timeout;
        let mut lines = Vec::new();
        let mut bytes = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match busy.idle(|| console.wait_line(&mut cursor, left, |_| true)) {
                Some(l) => {
                    let done = wait_for.is_none_or(|w| l.contains(w));
                    bytes += l.len() + 1;
                    if bytes > limits::MAX_EXEC_OUTPUT {
                        return Err(format!("exec: more than {} bytes of output", limits::MAX_EXEC_OUTPUT));
                    }
                    lines.push(l);
                    if done {
                        return Ok(ExecResponse { lines });
                    }
                }
                None => {
                    let what = wait_for.map_or("a line".to_string(), |w| format!("a line containing {w:?}"));
                    return Err(format!("no answer ({what}) within {timeout:?}; got {lines:?}"));
                }
            }
        }
    }

    fn snapshot(&self, dir: &Path, diff: bool) -> Result<SnapshotResponse, String> {
        let was_paused = self.vm.is_paused();
        let pause = if was_paused { Duration::ZERO } else { self.vm.pause().map_err(|e| e.to_string())? };
        let kind = if diff { SnapshotKind::Diff } else { SnapshotKind::Full };
        let r = self.vm.snapshot(dir, kind);
        if !was_paused {
            self.vm.resume().map_err(|e| format!("snapshot done but the VM did not resume: {e}"))?;
        }
        let r = r.map_err(|e| e.to_string())?;
        Ok(SnapshotResponse {
            dir: dir.to_path_buf(),
            kind: if diff { vm::SnapshotKind::Diff } else { vm::SnapshotKind::Full },
            pause_ms: ms(pause),
            snapshot_ms: ms(r.duration),
            state_bytes: r.state_bytes,
            pages_written: r.pages_written,
            memory_disk_bytes: r.memory_disk_bytes,
            linked: r.linked,
        })
    }
}

/// Points stdout and stderr at `path` (a detached VMM's log). On failure the caller must exit:
/// its launcher waits for the output it inherited to close.
pub fn redirect_output(path: &Path) -> Result<(), String> {
    let f = append_private(path)?;
    for target in [1, 2] {
        // SAFETY: dup2 of a valid open fd onto a standard fd; `f` stays open until after.
        if unsafe { libc::dup2(f.as_raw_fd(), target) } < 0 {
            return Err(format!("cannot redirect output to {}: {}", path.display(), std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// The answer line of a fallible operation.
fn answer<T: serde::Serialize>(r: Result<T, String>) -> String {
    match r {
        Ok(v) => Reply::ok(v).to_line(),
        Err(e) => Reply::<()>::err(e).to_line(),
    }
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
