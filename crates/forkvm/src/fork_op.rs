//! The fork operation of the per-VM API: claim the children's names, fork the VM (see
//! `vmm::quiesce` for why that is safe in a multithreaded VMM), wait until every child serves its
//! own sockets (API and vsock).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use forkvm_api::vm::{self, ForkChild, ForkResponse};
use vmm::quiesce::Busy;
use vmm::MicroVm;

use crate::private_fs::create_private;
use crate::server::{lock, ms, redirect_output, serve_then, Claimed, Host, OnReady};

impl Host {
    /// Fork-clone into `count` named children. The calling worker is idle for the fork itself
    /// (the fork gate waits for every other participant; see `vmm::quiesce`).
    pub(crate) fn fork(&self, count: usize, prefix: Option<String>, busy: &mut Busy) -> Result<ForkResponse, String> {
        let prefix = prefix.unwrap_or_else(|| format!("{}-c", self.name));
        let names: Vec<String> = (1..=count).map(|i| format!("{prefix}{i}")).collect();
        for n in &names {
            vm::check_name(n)?;
            // Refused before anything is cloned; a second fork needs names of its own.
            if let Some(why) = crate::claim::taken(n)? {
                return Err(format!("{why}: name the children with --prefix (default <name>-c)"));
            }
        }
        if let Some(r) = self.fork_from_pool(&names) {
            return r;
        }
        crate::pool_fork::release_for_fork()?;
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
        if let Some(w) = lock(&self.wake).as_mut() {
            // Children do not inherit the page server: everything must be in, and the server
            // and recorder threads gone, before fork().
            if let Err(e) = w.finish() {
                claims.into_iter().flatten().for_each(Claimed::release);
                return Err(e.to_string());
            }
        }
        let listener_fd = self.listener_fd;
        // The API sockets claimed for the children: child i must not hold its later siblings'
        // (a sibling that died would then hang its callers instead of refusing them).
        let claim_fds: Vec<i32> = claims.iter().flatten().map(|c| c.listener.as_raw_fd()).collect();
        let conns = Arc::clone(&self.conns);
        let parent = self.name.clone();
        let forked = busy.idle(|| {
            self.vm.fork_with(
                count,
                |i| {
                    let claimed = claims[i].take().ok_or_else(|| vmm::Error::State("fork: name not claimed".into()))?;
                    let (rx, tx) = UnixStream::pair().map_err(vmm::Error::Io)?;
                    Ok((rx, (claimed, tx)))
                },
                |i, (claimed, tx), vm, state| {
                    // SAFETY: the parent's listener fd is not used in the child.
                    unsafe { libc::close(listener_fd) };
                    for &fd in claim_fds.iter().skip(i + 1) {
                        // SAFETY: a later sibling's API socket, still open in the parent when this
                        // child was forked; this child never uses it.
                        unsafe { libc::close(fd) };
                    }
                    // Neither are the parent's connections (this fork's requester included).
                    conns.close_all_in_child();
                    child_main(claimed, tx, vm, state, &parent)
                },
            )
        });
        let (forked, rep) = forked.map_err(|e| {
            claims.iter_mut().filter_map(Option::take).for_each(Claimed::release);
            e.to_string()
        })?;
        let fork_ms = ms(t0.elapsed());
        let mut children = Vec::new();
        let mut errors = Vec::new();
        for ((pid, rx), name) in forked.into_iter().zip(&names) {
            let _ = rx.set_read_timeout(Some(Duration::from_secs(30)));
            let mut line = String::new();
            let _ = busy.idle(|| BufReader::new(&rx).take(4096).read_line(&mut line));
            match line.trim_end().strip_prefix("ready") {
                Some(_) => children.push(ForkChild { name: name.clone(), pid }),
                None if line.is_empty() => errors.push(format!("{name}: the child exited before it was ready")),
                None => {
                    let line = line.trim_end();
                    errors.push(format!("{name}: {}", line.strip_prefix("error ").unwrap_or(line)))
                }
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
            via: "fork".into(),
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
            // Ready only once both of its sockets take connections (the API socket is bound
            // already; the vsock socket is made by serve).
            let on_ready: OnReady = Box::new(move |r| {
                let _ = match r {
                    Ok(()) => writeln!(ready, "ready"),
                    Err(e) => writeln!(ready, "error {e}"),
                };
            });
            serve_then(claimed, vm, Some(parent.to_string()), None, Some(on_ready))
        }
        Err(e) => {
            let _ = writeln!(ready, "error {e}");
            claimed.release();
            1
        }
    }
}
