//! Reaping the VMM processes this daemon started. They run in their own process group and
//! outlive the daemon, but while it runs it is their parent: one that exits (hibernated, deleted,
//! its guest halted, crashed) stays a zombie until the daemon waits for it, and a zombie still
//! answers `kill(pid, 0)`, so the daemon would think it alive. The daemon keeps each child it
//! spawns here and reaps it on every SIGCHLD (and whenever asked). VMMs adopted after a daemon
//! restart are not its children: their new parent reaps them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// The VMM processes this daemon started and has not reaped yet.
#[derive(Debug, Clone, Default)]
pub struct Children(Arc<Mutex<HashMap<u32, tokio::process::Child>>>);

impl Children {
    /// Keeps `child` (started by us) until it exits and is reaped.
    pub fn keep(&self, child: tokio::process::Child) {
        if let Some(pid) = child.id() {
            self.0.lock().unwrap_or_else(PoisonError::into_inner).insert(pid, child);
        }
    }

    /// Reaps every kept child that has exited; returns how many were reaped.
    pub fn reap(&self) -> usize {
        let mut m = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let before = m.len();
        m.retain(|pid, c| match c.try_wait() {
            Ok(None) => true,
            Ok(Some(status)) => {
                tracing::debug!(pid, %status, "VMM process reaped");
                false
            }
            Err(e) => {
                tracing::warn!(pid, "cannot wait for VMM process: {e}");
                false
            }
        });
        before - m.len()
    }

    /// Waits (at most `timeout`) until process `pid` is gone: a child of ours is awaited and
    /// reaped (its exit is complete only then: a zombie thread-group leader may still be tearing
    /// down its other threads and memory); another process is polled until it no longer runs.
    pub async fn wait_gone(&self, pid: u32, timeout: std::time::Duration) {
        let child = self.0.lock().unwrap_or_else(PoisonError::into_inner).remove(&pid);
        match child {
            Some(mut c) => {
                if tokio::time::timeout(timeout, c.wait()).await.is_err() {
                    self.keep(c);
                }
            }
            None => {
                let deadline = tokio::time::Instant::now() + timeout;
                while running(pid) && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                }
            }
        }
    }

    /// Children not reaped yet.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reaps exited children whenever a SIGCHLD arrives, for the life of the daemon.
pub async fn run(children: Children) {
    let mut sig = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot watch SIGCHLD ({e}): exited VMMs are reaped only when the daemon waits for them");
            return;
        }
    };
    loop {
        children.reap();
        if sig.recv().await.is_none() {
            return;
        }
    }
}

/// Whether process `pid` exists and has not exited (a zombie has exited).
pub fn running(pid: u32) -> bool {
    let Ok(p) = i32::try_from(pid) else { return false };
    // SAFETY: signal 0 only checks that the process exists; no signal is sent.
    if unsafe { libc::kill(p, 0) } != 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn an_exited_child_is_a_zombie_until_reaped() {
        let children = Children::default();
        let c = tokio::process::Command::new("true").spawn().unwrap();
        let pid = c.id().unwrap();
        // Wait for the exit without reaping it: waitid with WNOWAIT leaves the zombie.
        // SAFETY: siginfo_t is plain old data; all zeroes is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid on our own child with a valid siginfo pointer; WNOWAIT does not reap.
        let rc = unsafe { libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOWAIT) };
        assert_eq!(rc, 0);
        assert!(!running(pid), "an exited child (a zombie) does not count as running");
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists(), "still a zombie");
        children.keep(c);
        assert_eq!(children.reap(), 1);
        assert!(children.is_empty());
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "reaped");
    }
}
