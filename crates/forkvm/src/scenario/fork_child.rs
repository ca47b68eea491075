//! A fork child of a Linux VM with its console on a socket, reseeded by the guest agent as the
//! first thing it does.
//!
//! In the child process, right after `build_fork_child`, the VMM types
//! `forkvm-agent reseed <seed> <generation>` into the guest's shell: the seed is the fresh one of
//! the child's generation page, so every clone's CRNG diverges from its parent's before the
//! parent can type anything (the socket is only read after that line is queued).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm::devices::console::Console;
use vmm::fork::ForkReport;
use vmm::persist::state::VmState;
use vmm::{ExitReason, MicroVm};

use super::shell::Tty;

/// How long a stopping child may take before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The shell line that reseeds a clone's kernel CRNG with the clone's own seed.
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
        if let Err(e) = reseed_command(&vm).and_then(|line| vm.send_line(&line).map_err(|e| e.to_string())) {
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
