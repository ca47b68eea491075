//! A fork child of a Linux VM with its console on a socket, reseeded by the guest agent as the
//! first thing it does.
//!
//! In the child process, right after `build_fork_child`, the VMM runs the clone hook through the
//! guest agent over vsock (generation, the child's fresh seed, the host clock) and reports it to
//! the parent as a console line; a guest without a vsock agent gets
//! `forkvm-agent reseed <seed> <generation>` typed into its shell instead. Either way the clone's
//! CRNG diverges from its parent's before the parent can type anything (the socket is only read
//! after that).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm::agent::{AgentAddr, CloneHookOptions, HookState};
use vmm::devices::console::Console;
use vmm::fork::ForkReport;
use vmm::persist::state::VmState;
use vmm::{ExitReason, MicroVm};

use super::shell::Tty;

/// How long a stopping child may take before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// What a clone's reseed went through.
#[derive(Debug)]
pub enum Hooked {
    /// The guest agent took the clone hook over vsock: a line describing it (contains "reseeded").
    Agent(String),
    /// No agent answers (e.g. a guest booted with acpi=off has no vsock): why.
    NoAgent(String),
}

/// Serves `vm`'s vsock on `sock` and runs its clone hook through the guest agent.
pub fn agent_hook(vm: &MicroVm, sock: &std::path::Path) -> Result<Hooked, String> {
    let _ = std::fs::remove_file(sock);
    vm.listen_vsock(sock).map_err(|e| format!("vsock socket {}: {e}", sock.display()))?;
    let opts = CloneHookOptions { timeout: Duration::from_secs(60), attempts: 3 };
    match vm.run_clone_hook(&AgentAddr::vsock(sock), &opts) {
        HookState::Done(d) => Ok(Hooked::Agent(format!(
            "forkvm-clone-hook: reseeded by the agent over vsock (generation {}, entropy_avail {} -> {}, clock stepped {:.3} ms, {} user hooks)",
            d.generation,
            d.entropy_before,
            d.entropy_after,
            d.clock_step_ns as f64 / 1e6,
            d.hooks.len()
        ))),
        HookState::NoAgent(why) => Ok(Hooked::NoAgent(why)),
        s => Err(format!("clone hook: {:?}", s.detail())),
    }
}

/// The shell line that reseeds a clone's kernel CRNG with the clone's own seed (the fallback for
/// guests without a vsock agent).
pub fn reseed_command(vm: &MicroVm) -> Result<String, String> {
    let seed = vm.generation_seed().ok_or("cannot read the generation page of the clone")?;
    let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("forkvm-agent reseed {hex} {}", vm.generation()))
}

/// The parent's view of a fork child: its console (lines from the socket) and its pid.
#[derive(Debug)]
pub struct ChildTty {
    pub pid: i32,
    console: Arc<Console>,
    sock: UnixStream,
    reader: Option<JoinHandle<()>>,
    reaped: AtomicBool,
}

impl Tty for ChildTty {
    fn console(&self) -> &Console {
        &self.console
    }

    fn send_line(&self, line: &str) -> Result<(), String> {
        (&self.sock).write_all(format!("{line}\n").as_bytes()).map_err(|e| format!("fork child {}: {e}", self.pid))
    }

    fn gone(&self) -> Option<String> {
        let mut status = 0;
        // SAFETY: non-blocking waitpid on our own child with a valid status pointer.
        let rc = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
        if rc != self.pid {
            return None;
        }
        self.reaped.store(true, Ordering::SeqCst);
        Some(format!("fork child {} exited (wait status {status:#x})", self.pid))
    }
}

impl ChildTty {
    /// Stops the child (closing its console makes it stop its VM and exit) and reaps it.
    pub fn stop(mut self) -> Result<i32, String> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<i32, String> {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        if self.reaped.swap(true, Ordering::SeqCst) {
            return Ok(0);
        }
        let deadline = Instant::now() + STOP_GRACE;
        let mut status = 0;
        loop {
            // SAFETY: waitpid on our own child with a valid status pointer.
            let rc = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
            if rc == self.pid {
                return Ok(status);
            }
            if rc < 0 {
                return Err(format!("waitpid {}: {}", self.pid, std::io::Error::last_os_error()));
            }
            if Instant::now() >= deadline {
                // SAFETY: signalling our own child process by its pid.
                unsafe { libc::kill(self.pid, libc::SIGKILL) };
                // SAFETY: as above; blocking now that the child was killed.
                unsafe { libc::waitpid(self.pid, &mut status, 0) };
                return Err(format!("fork child {} did not stop within {STOP_GRACE:?}; killed it", self.pid));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildTty {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Forks `vm` into one child; the child reseeds its guest first if `reseed`.
pub fn fork(vm: &MicroVm, reseed: bool) -> Result<(ChildTty, ForkReport), String> {
    let (mut forked, report) = vm
        .fork_with(
            1,
            |_| UnixStream::pair().map_err(vmm::Error::Io),
            |_, sock, parent, state| child_main(parent, state, sock, reseed),
        )
        .map_err(|e| format!("fork: {e}"))?;
    let (pid, sock) = forked.pop().ok_or("fork returned no child")?;
    let console = Console::new(None);
    let mut from_child = sock.try_clone().map_err(|e| format!("fork child console: {e}"))?;
    let c = console.clone();
    let reader = std::thread::Builder::new()
        .name(format!("child{pid}-console"))
        .spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = from_child.read(&mut buf) {
                if n == 0 {
                    break;
                }
                c.push(&buf[..n]);
            }
        })
        .map_err(|e| format!("fork child console thread: {e}"))?;
    Ok((ChildTty { pid, console, sock, reader: Some(reader), reaped: AtomicBool::new(false) }, report))
}

/// In the child process: build the VM, reseed, then serve the console socket until it closes.
fn child_main(parent: &MicroVm, state: &VmState, sock: UnixStream, reseed: bool) -> i32 {
    let report = |msg: String| {
        let _ = (&sock).write_all(format!("forkvm-child-error {msg}\n").as_bytes());
        1
    };
    let Ok(out) = sock.try_clone() else { return report("cannot clone the console socket".into()) };
    let vm = match parent.build_fork_child(state, Some(Box::new(out))) {
        Ok(vm) => vm,
        Err(e) => return report(e.to_string()),
    };
    if reseed {
        // The agent first (its answer goes to the parent as a console line); else type the line.
        let vsock = std::env::temp_dir().join(format!("forkvm-scenario-child-{}.vsock", std::process::id()));
        let hooked = agent_hook(&vm, &vsock);
        let _ = std::fs::remove_file(&vsock);
        let typed = match hooked {
            Ok(Hooked::Agent(line)) => (&sock).write_all(format!("{line}\n").as_bytes()).map_err(|e| e.to_string()),
            Ok(Hooked::NoAgent(_)) => {
                reseed_command(&vm).and_then(|line| vm.send_line(&line).map_err(|e| e.to_string()))
            }
            Err(e) => Err(e),
        };
        if let Err(e) = typed {
            return report(format!("reseed: {e}"));
        }
    }
    let Ok(input) = sock.try_clone() else { return report("cannot clone the console socket".into()) };
    if let Err(e) = vm.feed_console_from(input) {
        return report(format!("console thread: {e}"));
    }
    let reason = vm.wait_exit(None);
    // Say why the child VM ended, so an unexpected exit is never silent.
    let _ = (&sock).write_all(format!("forkvm-child-exit {reason:?}\n").as_bytes());
    match reason {
        Some(ExitReason::Error(_)) => 1,
        _ => 0,
    }
}
