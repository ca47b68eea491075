//! Fork-clone: the VMM parks its vCPUs, captures their state and fork()s. Each child process
//! builds a new KVM VM over the guest memory it inherited (anonymous memory is shared
//! copy-on-write by the kernel; shared-file memory is frozen first and mapped privately), restores
//! the state with a bumped generation and a fresh seed, and runs on its own. Only pages that one
//! side writes are ever copied.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::microvm::MicroVm;
use crate::persist::state::VmState;
use crate::snapshot::parts_from_state;
use crate::vcpu_thread::ExitReason;
use crate::Error;

/// A running fork child as seen from the parent: its pid and its console.
#[derive(Debug)]
pub struct ForkedChild {
    pub pid: i32,
    /// Console of the child: lines written go to its serial input; its serial output comes back.
    pub console: UnixStream,
    reader: BufReader<UnixStream>,
}

impl ForkedChild {
    /// Waits for the next console line of the child.
    pub fn read_line(&mut self, timeout: Duration) -> Result<String, Error> {
        self.reader.get_ref().set_read_timeout(Some(timeout)).map_err(Error::Io)?;
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(Error::Guest(format!("fork child {} closed its console", self.pid))),
            Ok(_) => Ok(line.trim_end_matches(['\n', '\r']).to_string()),
            Err(e) => Err(Error::Guest(format!("fork child {}: no console line within {timeout:?} ({e})", self.pid))),
        }
    }

    /// Sends a command line and returns the next line the child prints.
    pub fn command(&mut self, line: &str, timeout: Duration) -> Result<String, Error> {
        self.console.write_all(format!("{line}\n").as_bytes()).map_err(Error::Io)?;
        self.read_line(timeout)
    }

    /// Stops the child (closing its console makes it stop its VM and exit) and reaps it.
    pub fn stop(self) -> Result<i32, Error> {
        let _ = self.console.shutdown(std::net::Shutdown::Both);
        let mut status = 0;
        // SAFETY: waitpid on our own child with a valid status pointer.
        let rc = unsafe { libc::waitpid(self.pid, &mut status, 0) };
        if rc < 0 {
            return Err(Error::Io(std::io::Error::last_os_error()));
        }
        Ok(status)
    }
}

/// Longest wait for the process's other threads to reach a safe point before fork.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(30);

/// Timings of a fork.
#[derive(Debug, Clone, Copy)]
pub struct ForkReport {
    /// Parking the vCPUs (zero if the VM was already paused).
    pub pause: Duration,
    /// Capturing vCPU and device state.
    pub save: Duration,
    /// All fork() calls.
    pub fork: Duration,
}

/// Parent-side values of the children of [`MicroVm::fork_with`]: (pid, value).
pub type Forked<P> = Vec<(i32, P)>;

impl MicroVm {
    /// Forks the VM into `count` children that run independently of the parent and each other,
    /// each with its console on a socket the parent holds. The parent is paused for the duration
    /// and resumed afterwards if it was running.
    pub fn fork(&self, count: usize) -> Result<(Vec<ForkedChild>, ForkReport), Error> {
        let (forked, report) = self.fork_with(
            count,
            |_| UnixStream::pair().map_err(Error::Io),
            |_, sock, parent, state| parent.socket_child_main(state, sock),
        )?;
        let mut children = Vec::with_capacity(forked.len());
        for (pid, console) in forked {
            let reader = BufReader::new(console.try_clone().map_err(Error::Io)?);
            children.push(ForkedChild { pid, console, reader });
        }
        Ok((children, report))
    }

    /// The general fork: for each child, `prepare(i)` makes a (parent value, child value) pair in
    /// the parent before fork(); the child process drops every parent value it inherited, runs
    /// `child(i, child value, self, state)` and exits with the code it returns. Use
    /// [`MicroVm::build_fork_child`] in `child` to get the child's VM.
    pub fn fork_with<P, C>(
        &self,
        count: usize,
        mut prepare: impl FnMut(usize) -> Result<(P, C), Error>,
        child: impl Fn(usize, C, &MicroVm, &VmState) -> i32,
    ) -> Result<(Forked<P>, ForkReport), Error> {
        if let Some(r) = self.control().exit_reason() {
            return Err(Error::State(format!("cannot fork a stopped VM (it exited: {r:?})")));
        }
        if count == 0 {
            return Err(Error::Config("fork count must be at least 1".into()));
        }
        // A verified copy-on-write restore still filling its memory: wait for it (bounded by
        // one pass over the image).
        self.wait_memory_checked();
        if self.lazy_memory.load(std::sync::atomic::Ordering::SeqCst) {
            let source = *self.lazy_source.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            return Err(Error::State(lazy_refusal(source)));
        }
        let was_paused = self.is_paused();
        let pause = if was_paused { Duration::ZERO } else { self.pause_unflushed()? };
        let result = (|| {
            let t0 = Instant::now();
            // The disk as it is now is shared by the children; the parent writes a new overlay.
            if let Some(b) = self.block() {
                b.freeze().map_err(|e| Error::State(format!("cannot freeze the disk: {e}")))?;
            }
            let state = self.save_state()?;
            // Shared-file memory must stop being shared before anyone else maps it.
            self.memory().freeze()?;
            let save = t0.elapsed();
            let t1 = Instant::now();
            let mut forked: Forked<P> = Vec::with_capacity(count);
            // Every other thread at a known point that holds nothing the child uses.
            let mut gate = Some(quiesce_others(&self.control().vcpu_tids())?);
            for i in 0..count {
                let (p, c) = prepare(i)?;
                // SAFETY: fork has no memory-safety preconditions. Every other thread is quiesced
                // (see crate::quiesce): vCPUs parked, participants idle outside any lock the child
                // uses; the child leaves with _exit.
                let pid = unsafe { libc::fork() };
                if pid < 0 {
                    return Err(Error::Io(std::io::Error::last_os_error()));
                }
                if pid == 0 {
                    if let Some(g) = gate.take() {
                        g.into_child();
                    }
                    drop(p);
                    drop(std::mem::take(&mut forked));
                    let code = child(i, c, self, &state);
                    // SAFETY: leaving the child without running the parent's destructors.
                    unsafe { libc::_exit(code) };
                }
                drop(c);
                forked.push((pid, p));
            }
            drop(gate);
            Ok((forked, save, t1.elapsed()))
        })();
        if !was_paused {
            self.resume()?;
        }
        result.map(|(forked, save, fork)| (forked, ForkReport { pause, save, fork }))
    }

    /// In a fork child: a new KVM VM over the inherited memory, restored from `state` with a
    /// bumped generation and a fresh seed, console mirrored to `mirror`. Closes the parent's KVM
    /// fds. The returned VM is running.
    pub fn build_fork_child(&self, state: &VmState, mirror: Option<Box<dyn Write + Send>>) -> Result<MicroVm, Error> {
        for &fd in &self.kvm_fds {
            // SAFETY: these KVM fds belong to the parent's VM; the child never uses them.
            unsafe { libc::close(fd) };
        }
        // Nor the parent's vsock sockets: the child gets its own (see MicroVm::listen_vsock).
        self.vsock().forget_in_child();
        if let Some(n) = self.net() {
            n.forget_in_child();
        }
        let mut parts = parts_from_state(state, Arc::clone(self.memory()), mirror, self.track_dirty)?;
        parts.block = crate::devices::virtio::block::attach::block_for_child(
            &parts.vm,
            &parts.mem,
            self.block(),
            state.devices.block.as_ref(),
        )?;
        parts.net = crate::devices::virtio::net::attach::net_for_clone(
            &parts.vm,
            &parts.mem,
            state.devices.net.as_ref(),
            parts.generation,
        )?;
        MicroVm::assemble(parts)
    }

    /// Fork child with its console on `sock`: serial input from it, serial output to it; closing
    /// the socket stops the VM and the child.
    fn socket_child_main(&self, state: &VmState, sock: UnixStream) -> i32 {
        let Ok(out) = sock.try_clone() else { return 2 };
        let vm = match self.build_fork_child(state, Some(Box::new(out))) {
            Ok(vm) => vm,
            Err(e) => {
                let _ = (&sock).write_all(format!("forkvm-child-error {e}\n").as_bytes());
                return 1;
            }
        };
        if vm.feed_console_from(sock).is_err() {
            return 1;
        }
        match vm.wait_exit(None) {
            Some(ExitReason::Error(_)) => 1,
            _ => 0,
        }
    }
}

/// Closes the fork gate and audits the threads. A thread that is just exiting (it left the gate
/// but the kernel still lists it) is waited out: up to 200 tries.
fn quiesce_others(vcpus: &[i32]) -> Result<crate::quiesce::Exclusive, Error> {
    let mut tries = 0;
    loop {
        let g = crate::quiesce::gate().exclusive(QUIESCE_TIMEOUT).map_err(Error::State)?;
        match g.audit(vcpus) {
            Ok(()) => return Ok(g),
            Err(e) if !crate::quiesce::strict() => {
                tracing::debug!("{e}");
                return Ok(g);
            }
            Err(e) if tries >= 200 => return Err(Error::State(e)),
            Err(_) => {
                drop(g);
                tries += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

impl MicroVm {
    /// Feeds lines read from `input` to the guest's serial input on a thread of its own; when
    /// `input` ends (or fails), the VM is stopped. The console of fork children.
    pub fn feed_console_from(&self, input: impl Read + Send + 'static) -> Result<JoinHandle<()>, Error> {
        let serial = self.serial().clone();
        let ctl = self.control().clone();
        std::thread::Builder::new()
            .name("console-input".into())
            .spawn(move || {
                // A fork-gate participant, idle while it reads its input or waits on the
                // parent-only serial port (see crate::quiesce).
                let _participant = crate::quiesce::participant();
                let mut busy = crate::quiesce::busy();
                let mut r = BufReader::new(input);
                let mut buf = Vec::new();
                while let Ok(1..) = busy.idle(|| r.read_until(b'\n', &mut buf)) {
                    busy.idle(|| serial.send(&buf, Duration::from_secs(60)));
                    buf.clear();
                }
                ctl.stop(ExitReason::Stopped);
            })
            .map_err(Error::Io)
    }
}

/// Who still fills a VM's memory through a page server (see `MicroVm::lazy_memory`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LazySource {
    /// A lazy wake from a local hibernation (chunk store).
    #[default]
    Hibernation,
    /// A wake from another host's page server.
    RemoteHost,
    /// A copy-on-write restore whose image is still being checked block by block.
    CheckedRestore,
}

/// Why fork refuses a VM whose memory `source` still serves, and what to do about it.
pub(crate) fn lazy_refusal(source: LazySource) -> String {
    let (what, fix) = match source {
        LazySource::Hibernation => ("woken from hibernation", "fetch it all first (WakeHandle::fetch_all)"),
        LazySource::RemoteHost => {
            ("woken from another host's page server", "fetch it all first (WakeHandle::fetch_all)")
        }
        LazySource::CheckedRestore => (
            "restored copy-on-write, its image still being checked block by block",
            "wait until it is checked (MicroVm::wait_memory_checked)",
        ),
    };
    format!(
        "this VM's memory is still served lazily by a page server ({what}): a fork child would not inherit it; {fix}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lazy_refusal_names_what_really_serves_the_memory() {
        let checked = lazy_refusal(LazySource::CheckedRestore);
        assert!(!checked.contains("hibernation") && checked.contains("checked"), "{checked}");
        assert!(lazy_refusal(LazySource::Hibernation).contains("from hibernation"));
        let remote = lazy_refusal(LazySource::RemoteHost);
        assert!(remote.contains("another host") && !remote.contains("hibernation"), "{remote}");
    }
}
