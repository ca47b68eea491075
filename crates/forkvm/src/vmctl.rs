//! The CLI side of the per-VM API: start detached VMM processes and send them typed requests.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use forkvm_api::vm::{self, limits, Client, VmPaths};

use crate::cli::{ExecArgs, ForkArgs, SnapshotArgs};

/// Snapshots of big guests and forks of many children take a while.
const SLOW: Duration = Duration::from_secs(600);

/// This command again, for the background VMM process: without --detach, with --background.
pub fn background_args() -> Vec<OsString> {
    let mut args: Vec<OsString> = std::env::args_os().skip(1).filter(|a| a != "--detach").collect();
    args.push("--background".into());
    args
}

fn client(name: &str) -> Result<Client, String> {
    Client::for_name(name).map_err(|e| e.to_string())
}

/// Runs forkvm with `args` in a new background process that serves VM `name`, and returns once
/// its API answers.
pub fn spawn_detached(name: &str, args: Vec<OsString>) -> Result<i32, String> {
    let c = client(name)?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the forkvm binary: {e}"))?;
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start the VMM process: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            // The child printed its own error line on our stderr.
            return Ok(status.code().unwrap_or(1).max(1));
        }
        // A VM of the same name that is not ours does not count: our child will say why it failed.
        if let Some(s) = c.call(vm::Status {}).ok().filter(|s| s.pid == child.id()) {
            println!("{name} {} pid {}", s.state, child.id());
            return Ok(0);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(format!("VM {name:?} did not start serving its API within 60 s"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn status(name: &str) -> Result<i32, String> {
    let s = client(name)?.call(vm::Status {}).map_err(|e| e.to_string())?;
    println!("{}", serde_json::to_string_pretty(&s).map_err(|e| e.to_string())?);
    Ok(0)
}

pub fn pause(name: &str) -> Result<i32, String> {
    let r = client(name)?.call(vm::Pause {}).map_err(|e| e.to_string())?;
    println!("{name}: ok (pause_ms {:.3})", r.pause_ms);
    Ok(0)
}

/// Stops a VM; returns once its VMM process is gone.
pub fn stop(name: &str) -> Result<i32, String> {
    let r = client(name)?.timeout(Duration::from_secs(60)).stop().map_err(|e| e.to_string())?;
    println!("{name}: stopped (pid {} exited)", r.pid);
    Ok(0)
}

/// Resumes a paused VM; a hibernated one is woken.
pub fn resume(name: &str) -> Result<i32, String> {
    let paths = VmPaths::for_name(name)?;
    if !paths.socket().exists() && paths.hibernated().exists() {
        return crate::hibernate_cmd::wake(crate::hibernate_cmd::WakeArgs {
            vm: name.to_string(),
            store: None,
            background: false,
            remote: Default::default(),
        });
    }
    let r = client(name)?.call(vm::Resume {}).map_err(|e| e.to_string())?;
    println!("{name}: ok (resume_ms {:.3})", r.resume_ms);
    Ok(0)
}

pub fn exec(a: &ExecArgs) -> Result<i32, String> {
    let max_s = limits::MAX_EXEC_TIMEOUT_MS / 1000;
    if a.timeout == 0 || a.timeout > max_s {
        return Err(format!("--timeout must be 1 to {max_s} seconds, not {}", a.timeout));
    }
    let timeout = Duration::from_secs(a.timeout);
    if !a.argv.is_empty() {
        return crate::agent_exec::run_cli(a, timeout);
    }
    let req = vm::Exec { line: a.line.join(" "), wait_for: a.wait_for.clone(), timeout_ms: a.timeout * 1000 };
    let r = client(&a.name)?.timeout(timeout + Client::DEFAULT_TIMEOUT).call(req).map_err(|e| e.to_string())?;
    for l in r.lines {
        println!("{l}");
    }
    Ok(0)
}

pub fn snapshot(a: &SnapshotArgs) -> Result<i32, String> {
    let dir = std::path::absolute(&a.dir).map_err(|e| format!("bad snapshot directory {}: {e}", a.dir.display()))?;
    let r = client(&a.name)?.timeout(SLOW).call(vm::Snapshot { dir, diff: a.diff }).map_err(|e| e.to_string())?;
    println!(
        "{}: {} snapshot in {:.3} ms (pause {:.3} ms): state {} B, {} pages written, memory {} B on disk{}",
        a.name,
        r.kind,
        r.snapshot_ms,
        r.pause_ms,
        r.state_bytes,
        r.pages_written,
        r.memory_disk_bytes,
        if r.linked { " (memory file linked)" } else { "" }
    );
    Ok(0)
}

pub fn fork(a: &ForkArgs) -> Result<i32, String> {
    let req = vm::Fork { count: a.count, prefix: a.prefix.clone() };
    let r = client(&a.name)?.timeout(SLOW).call(req).map_err(|e| e.to_string())?;
    for c in &r.children {
        println!("{} pid {}", c.name, c.pid);
    }
    println!(
        "forked {} in {:.3} ms (pause {:.3}, state {:.3}, fork {:.3}); children ready after {:.3} ms",
        a.name, r.fork_total_ms, r.pause_ms, r.save_ms, r.fork_ms, r.ready_ms,
    );
    if r.via == "pool" {
        println!("(live clone into warm pool VMMs: the parent was paused {:.3} ms)", r.fork_total_ms);
    }
    Ok(0)
}

pub fn ls() -> Result<i32, String> {
    let run = vm::run_dir();
    let mut names: Vec<String> = match std::fs::read_dir(&run) {
        Ok(rd) => rd.flatten().filter_map(|e| e.file_name().into_string().ok()).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(format!("cannot list {}: {e}", run.display())),
    };
    names.sort();
    let row = |name: &str, pid: &str, state: &str, mem: &str, gen: &str, parent: &str| {
        println!("{name:<24} {pid:>8} {state:<10} {mem:>8} {gen:>4} {parent}");
    };
    row("NAME", "PID", "STATE", "MEM_MIB", "GEN", "PARENT");
    for name in names.iter().filter(|n| vm::check_name(n).is_ok()) {
        let paths = VmPaths::in_dir(&run.join(name));
        let hibernated = paths.hibernated().exists();
        if crate::hibernate_cmd::failed_clone(&paths) {
            row(name, "-", "failed", "-", "-", "-"); // its wake-error says why
            continue;
        }
        if !paths.pid_file().exists() && !hibernated {
            continue; // not a VM's directory
        }
        match Client::at(&paths.dir, name).timeout(Duration::from_secs(2)).call(vm::Status {}) {
            Ok(s) => row(
                name,
                &s.pid.to_string(),
                &s.state.to_string(),
                &s.mem_mib.to_string(),
                &s.generation.to_string(),
                s.parent.as_deref().unwrap_or("-"),
            ),
            Err(_) if hibernated => row(name, "-", "hibernated", "-", "-", "-"),
            Err(vm::ClientError::NotRunning { .. }) => row(name, "-", "gone", "-", "-", "-"),
            Err(_) => row(name, "-", "no-answer", "-", "-", "-"),
        }
    }
    Ok(0)
}
