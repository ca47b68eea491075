//! The VMM process side of the per-VM API: claim a name, serve requests for one VM, clean up
//! when it exits. Fork children claim their names in the parent (before fork) and serve their own
//! sockets.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use forkvm_api::vm::{
    self, ExecResponse, ForkChild, ForkResponse, PauseResponse, Reply, Request, ResumeResponse, RunState,
    SnapshotResponse, StatusResponse, StopResponse, VmPaths,
};
use vmm::{ExitReason, MicroVm, SnapshotKind, WakeHandle};

pub use crate::claim::Claimed;
use crate::private_fs::{append_private, create_private};

/// What a VMM process knows about the VM it serves.
struct Host {
    vm: Arc<MicroVm>,
    name: String,
    paths: VmPaths,
    parent: Option<String>,
    listener_fd: i32,
    /// Set by a successful hibernate: keep the directory on exit.
    keep_dir: std::sync::atomic::AtomicBool,
    /// The page server of a woken VM whose memory may still be coming in.
    wake: Option<WakeHandle>,
}

/// Serves the API for `vm` until it exits; returns the process exit code.
pub fn serve(claimed: Claimed, vm: MicroVm, parent: Option<String>, wake: Option<WakeHandle>) -> i32 {
    // Fork children are reaped by the kernel: nobody waits for them here.
    // SAFETY: setting a signal disposition to SIG_IGN has no memory-safety preconditions.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
    let Claimed { name, paths, listener } = claimed;
    if let Ok(mut f) = create_private(&paths.pid_file()) {
        let _ = writeln!(f, "{}", std::process::id());
    }
    if let Err(e) = vm.listen_vsock(&paths.vsock()) {
        eprintln!("forkvm: warning: VM {name}: no vsock socket: {e}");
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
        keep_dir: false.into(),
        wake,
    });
    let h = Arc::clone(&host);
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            h.handle(conn);
        }
    });
    let reason = host.vm.wait_exit(None);
    tracing::info!("VM {} exited: {reason:?}", host.name);
    let _ = std::fs::remove_file(host.paths.socket());
    if let (Some(ExitReason::Error(e)), Some(_)) = (&reason, &host.wake) {
        crate::hibernate_cmd::keep_failed_wake(&host.paths, &host.name, e);
    } else if !host.keep_dir.load(std::sync::atomic::Ordering::SeqCst) {
        let _ = std::fs::remove_dir_all(&host.paths.dir);
    }
    match reason {
        Some(ExitReason::Error(e)) => {
            eprintln!("forkvm: error: VM {}: {e}", host.name);
            1
        }
        _ => 0,
    }
}

/// What to do after the answer is sent.
enum After {
    Nothing,
    Stop,
}

impl Host {
    fn handle(&self, conn: UnixStream) {
        let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
        let mut line = Vec::new();
        let read = BufReader::new(&conn).take(vm::limits::MAX_REQUEST_BYTES as u64 + 1).read_until(b'\n', &mut line);
        let (answer, after) = match read {
            Err(e) => (Reply::<()>::err(format!("cannot read request: {e}")).to_line(), After::Nothing),
            Ok(_) => match vm::parse_request(&line) {
                Err(e) => (Reply::<()>::err(e.to_string()).to_line(), After::Nothing),
                Ok(req) => self.dispatch(req, conn.as_raw_fd()),
            },
        };
        let _ = (&conn).write_all(answer.as_bytes());
        drop(conn);
        if let After::Stop = after {
            self.vm.control().stop(ExitReason::Stopped);
        }
    }

    fn dispatch(&self, req: Request, conn_fd: i32) -> (String, After) {
        let line = match req {
            Request::Status(_) => Reply::ok(self.status()).to_line(),
            Request::Pause(_) => {
                answer(self.vm.pause().map(|d| PauseResponse { pause_ms: ms(d) }).map_err(|e| e.to_string()))
            }
            Request::Resume(_) => {
                answer(self.vm.resume().map(|d| ResumeResponse { resume_ms: ms(d) }).map_err(|e| e.to_string()))
            }
            Request::Exec(e) => answer(self.exec(&e.line, e.wait_for.as_deref(), Duration::from_millis(e.timeout_ms))),
            Request::AgentExec(e) => answer(crate::agent_exec::exec(&self.vm, &self.paths.dir, e)),
            Request::Snapshot(s) => answer(self.snapshot(&s.dir, s.diff)),
            Request::Fork(f) => answer(self.fork(f.count, f.prefix, conn_fd)),
            Request::Hibernate(h) => {
                let dir = self.paths.hibernated();
                return match crate::hibernate_cmd::hibernate_vm(&self.vm, &dir, h.store.as_deref()) {
                    Ok(v) => {
                        self.keep_dir.store(true, std::sync::atomic::Ordering::SeqCst);
                        (Reply::ok(v).to_line(), After::Stop)
                    }
                    Err(e) => (Reply::<()>::err(e).to_line(), After::Nothing),
                };
            }
            Request::Stop(_) => return (Reply::ok(StopResponse { pid: std::process::id() }).to_line(), After::Stop),
        };
        (line, After::Nothing)
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
        }
    }

    fn exec(&self, line: &str, wait_for: Option<&str>, timeout: Duration) -> Result<ExecResponse, String> {
        if self.vm.is_paused() {
            return Err(format!("VM {:?} is paused: resume it first", self.name));
        }
        crate::agent_exec::wait_gate(&self.vm)?;
        let console = self.vm.console();
        let mut cursor = console.cursor();
        self.vm.send_line(line).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + timeout;
        let mut lines = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match console.wait_line(&mut cursor, left, |_| true) {
                Some(l) => {
                    let done = wait_for.is_none_or(|w| l.contains(w));
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

    fn fork(&self, count: usize, prefix: Option<String>, conn_fd: i32) -> Result<ForkResponse, String> {
        let prefix = prefix.unwrap_or_else(|| format!("{}-c", self.name));
        let names: Vec<String> = (1..=count).map(|i| format!("{prefix}{i}")).collect();
        for n in &names {
            vm::check_name(n)?;
        }
        let mut claims = Vec::with_capacity(count);
        for n in &names {
            match Claimed::new(n) {
                Ok(c) => claims.push(Some(c)),
                Err(e) => {
                    claims.into_iter().flatten().for_each(Claimed::release);
                    return Err(e);
                }
            }
        }
        let t0 = Instant::now();
        if let Some(w) = &self.wake {
            // Children do not inherit the page server: everything must be in before fork().
            w.fetch_all().map_err(|e| e.to_string())?;
        }
        let listener_fd = self.listener_fd;
        let parent = self.name.clone();
        let (forked, rep) = self
            .vm
            .fork_with(
                count,
                |i| {
                    let claimed = claims[i].take().ok_or_else(|| vmm::Error::State("fork: name not claimed".into()))?;
                    let (rx, tx) = UnixStream::pair().map_err(vmm::Error::Io)?;
                    Ok((rx, (claimed, tx)))
                },
                |_, (claimed, tx), vm, state| {
                    // SAFETY: the parent's listener fd is not used in the child.
                    unsafe { libc::close(listener_fd) };
                    // SAFETY: neither is the connection that asked for the fork.
                    unsafe { libc::close(conn_fd) };
                    child_main(claimed, tx, vm, state, &parent)
                },
            )
            .map_err(|e| {
                claims.iter_mut().filter_map(Option::take).for_each(Claimed::release);
                e.to_string()
            })?;
        let fork_ms = ms(t0.elapsed());
        let mut children = Vec::new();
        let mut errors = Vec::new();
        for ((pid, rx), name) in forked.into_iter().zip(&names) {
            let _ = rx.set_read_timeout(Some(Duration::from_secs(30)));
            let mut line = String::new();
            let _ = BufReader::new(&rx).read_line(&mut line);
            match line.trim_end().strip_prefix("ready") {
                Some(_) => children.push(ForkChild { name: name.clone(), pid }),
                None if line.is_empty() => errors.push(format!("{name}: the child exited before it was ready")),
                None => errors.push(format!("{name}: {}", line.trim_end())),
            }
        }
        if !errors.is_empty() {
            return Err(format!("fork: {}", errors.join("; ")));
        }
        Ok(ForkResponse {
            children,
            pause_ms: ms(rep.pause),
            save_ms: ms(rep.save),
            fork_ms: ms(rep.fork),
            fork_total_ms: fork_ms,
            ready_ms: ms(t0.elapsed()),
        })
    }
}

/// A fork child: own logs, a new KVM VM over the inherited memory, then its own API server.
fn child_main(
    claimed: Claimed,
    mut ready: UnixStream,
    parent_vm: &MicroVm,
    state: &vmm::persist::state::VmState,
    parent: &str,
) -> i32 {
    if let Err(e) = redirect_output(&claimed.paths.vmm_log()) {
        let _ = writeln!(ready, "error {e}");
        claimed.release();
        return 1;
    }
    let console = match create_private(&claimed.console_log()) {
        Ok(f) => f,
        Err(e) => {
            let _ = writeln!(ready, "error cannot create console log: {e}");
            return 1;
        }
    };
    match parent_vm.build_fork_child(state, Some(Box::new(console))) {
        Ok(vm) => {
            let _ = writeln!(ready, "ready");
            drop(ready);
            serve(claimed, vm, Some(parent.to_string()), None)
        }
        Err(e) => {
            let _ = writeln!(ready, "error {e}");
            claimed.release();
            1
        }
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

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
