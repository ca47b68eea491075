//! The clone hook: run on every fork, restore and wake before the host serves anything else.
//! Credits the clone's fresh seed to the kernel (RNDADDENTROPY + RNDRESEEDCRNG), steps
//! CLOCK_REALTIME to the host's, runs the user hooks, and reports what it did. Failures are
//! reported, never fatal: the host decides what a half-done hook means.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use agent_proto::{HookDone, HookResult, SEED_LEN};

use crate::args::ServeOpts;

/// How long one user hook may run.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// Most user hooks run.
pub const MAX_HOOKS: usize = 32;

fn realtime_ns() -> i64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

fn set_realtime_ns(ns: i64) -> std::io::Result<()> {
    let ts = libc::timespec { tv_sec: ns.div_euclid(1_000_000_000) as _, tv_nsec: ns.rem_euclid(1_000_000_000) as _ };
    // SAFETY: clock_settime reads one timespec.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

pub fn run(generation: u64, host_time_ns: i64, seed: &[u8], opts: &ServeOpts) -> HookDone {
    let received = Instant::now();
    let mut done = HookDone {
        generation,
        reseeded: false,
        entropy_before: -1,
        entropy_after: -1,
        clock_step_ns: 0,
        clock_set: false,
        hooks: Vec::new(),
        errors: Vec::new(),
    };
    if seed.len() != SEED_LEN {
        done.errors.push(format!("seed of {} bytes, expected {SEED_LEN}", seed.len()));
    } else {
        match crate::rng::reseed(seed) {
            Ok(r) => {
                done.reseeded = true;
                done.entropy_before = r.entropy_before;
                done.entropy_after = r.entropy_after;
            }
            Err(e) => done.errors.push(format!("reseed: {e}")),
        }
    }
    if host_time_ns > 0 {
        let target = host_time_ns.saturating_add(received.elapsed().as_nanos() as i64);
        done.clock_step_ns = target - realtime_ns();
        if !opts.no_clock {
            let target = host_time_ns.saturating_add(received.elapsed().as_nanos() as i64);
            match set_realtime_ns(target) {
                Ok(()) => done.clock_set = true,
                Err(e) => done.errors.push(format!("clock_settime: {e}")),
            }
        }
    }
    done.hooks = run_hooks(&opts.hooks_dir, generation);
    done
}

/// Runs the executables in `dir` in name order, each with FORKVM_GENERATION set.
fn run_hooks(dir: &Path, generation: u64) -> Vec<HookResult> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut paths: Vec<_> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            use std::os::unix::fs::PermissionsExt;
            p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .collect();
    paths.sort();
    paths.truncate(MAX_HOOKS);
    paths.iter().map(|p| run_hook(p, generation)).collect()
}

fn run_hook(p: &Path, generation: u64) -> HookResult {
    let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let child = Command::new(p)
        .env("FORKVM_GENERATION", generation.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return HookResult { name, ok: false, detail: format!("cannot run: {e}") },
    };
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    match rx.recv_timeout(HOOK_TIMEOUT) {
        Ok(Ok(st)) if st.success() => HookResult { name, ok: true, detail: String::new() },
        Ok(Ok(st)) => HookResult { name, ok: false, detail: format!("{st}") },
        Ok(Err(e)) => HookResult { name, ok: false, detail: format!("wait: {e}") },
        Err(_) => {
            // SAFETY: killing the hook's own process group.
            unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
            HookResult { name, ok: false, detail: format!("killed after {HOOK_TIMEOUT:?}") }
        }
    }
}
