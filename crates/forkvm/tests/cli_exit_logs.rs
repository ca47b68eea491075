//! KVM tier through the CLI: a named VM whose guest ends it unasked (here the test guest's i8042
//! reset) keeps its logs in `<run dir>/.exited/<name>.<pid>/` — in the e2e tier an L2 that died
//! took its vmm.log and console.log with its directory, leaving nothing to explain it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::fd::{FromRawFd, OwnedFd};

use common::Env;

/// Waits (poll on a pidfd, bounded) until process `pid` has exited.
fn wait_gone(pid: i32, timeout_ms: i32) {
    // SAFETY: pidfd_open takes a pid and flags; it returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if fd < 0 {
        assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::ESRCH), "pidfd_open({pid})");
        return;
    }
    // SAFETY: fd was just returned by pidfd_open and is owned here only.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    drop(owned);
    assert_eq!(n, 1, "VMM {pid} still running after {timeout_ms} ms");
}

#[test]
fn a_vm_that_ends_unasked_keeps_its_logs() {
    let mut env = Env::new("exitlogs");
    env.start("h", &[]);
    let pid: i32 = std::fs::read_to_string(env.run.join("h/pid")).unwrap().trim().parse().unwrap();
    // The guest resets itself; the exec may or may not get its answer first.
    let _ = env.cmd(&["exec", "h", "halt"]);
    wait_gone(pid, 30_000);
    assert!(!env.run.join("h").exists(), "the VM's directory is gone (its name is free)");
    let kept = env.run.join(".exited").join(format!("h.{pid}"));
    let console = std::fs::read_to_string(kept.join("console.log"))
        .unwrap_or_else(|e| panic!("no kept console.log in {}: {e}", kept.display()));
    assert!(console.contains(test_guest::READY_LINE), "{console}");
    assert!(kept.join("vmm.log").exists());
    let exit = std::fs::read_to_string(kept.join("exit")).unwrap();
    assert!(exit.contains("GuestReset"), "{exit}");
    let ls = env.ok(&["ls"]);
    assert_eq!(ls.lines().count(), 1, "kept logs are no VM: {ls}");

    // A VM stopped on request leaves nothing behind.
    env.start("s", &[]);
    let spid: i32 = std::fs::read_to_string(env.run.join("s/pid")).unwrap().trim().parse().unwrap();
    env.ok(&["stop", "s"]);
    assert!(!env.run.join(".exited").join(format!("s.{spid}")).exists());
}

/// A triple fault (KVM_EXIT_SHUTDOWN) leaves what the VMM knew: the faulting vCPU's registers,
/// control registers and pending events, and its sibling's, in the kept vmm.log.
#[test]
fn a_triple_fault_leaves_every_vcpus_registers_in_the_kept_log() {
    let mut env = Env::new("triple");
    env.start("t", &["--vcpus", "2"]);
    let pid: i32 = std::fs::read_to_string(env.run.join("t/pid")).unwrap().trim().parse().unwrap();
    let _ = env.cmd(&["exec", "t", "triple"]);
    wait_gone(pid, 30_000);
    let kept = env.run.join(".exited").join(format!("t.{pid}"));
    let exit = std::fs::read_to_string(kept.join("exit")).unwrap();
    assert!(exit.contains("GuestShutdown"), "{exit}");
    let log = std::fs::read_to_string(kept.join("vmm.log")).unwrap();
    assert!(log.contains("guest shutdown exit (triple fault): vCPU 0: mp_state"), "{log}");
    assert!(log.contains("stopped with the VM: vCPU 1: mp_state"), "{log}");
    // A log file, not a terminal: no colour escapes (they garbled every vmm.log).
    assert!(!log.contains('\x1b'), "ANSI escapes in {log}");
    for what in ["rip 0x", "cr0 0x", "efer 0x", "exception injected"] {
        assert!(log.contains(what), "{what} in {log}");
    }
}
