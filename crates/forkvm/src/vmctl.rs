//! The CLI side of the per-VM API: start detached VMM processes and send them requests.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::api::{self, Request};
use crate::cli::{ExecArgs, ForkArgs, SnapshotArgs};
use crate::server::HIBERNATED;

const QUICK: Duration = Duration::from_secs(10);
/// Snapshots of big guests and forks of many children take a while.
const SLOW: Duration = Duration::from_secs(600);

/// This command again, for the background VMM process: without --detach, with --background.
pub fn background_args() -> Vec<OsString> {
    let mut args: Vec<OsString> = std::env::args_os().skip(1).filter(|a| a != "--detach").collect();
    args.push("--background".into());
    args
}

/// Runs forkvm with `args` in a new background process that serves VM `name`, and returns once
/// its API answers.
pub fn spawn_detached(name: &str, args: Vec<OsString>) -> Result<i32, String> {
    api::check_name(name)?;
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
        let ours = |v: &serde_json::Value| v["pid"].as_u64() == Some(u64::from(child.id()));
        if let Some(v) = api::call(name, &Request::Status, QUICK).ok().filter(ours) {
            println!("{name} {} pid {}", v["state"].as_str().unwrap_or("?"), child.id());
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
    let v = api::call(name, &Request::Status, QUICK)?;
    println!("{}", serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?);
    Ok(0)
}

/// Requests whose answer needs no printing beyond "ok".
pub fn simple(name: &str, req: Request) -> Result<i32, String> {
    let v = api::call(name, &req, QUICK)?;
    let timing = ["pause_ms", "resume_ms"].iter().find_map(|k| v[*k].as_f64().map(|t| format!(" ({k} {t:.3})")));
    println!("{name}: ok{}", timing.unwrap_or_default());
    Ok(0)
}

/// Resumes a paused VM; a hibernated one is woken.
pub fn resume(name: &str) -> Result<i32, String> {
    let dir = api::vm_dir(name)?;
    if !api::socket_path(&dir).exists() && dir.join(HIBERNATED).exists() {
        return crate::hibernate_cmd::wake(crate::hibernate_cmd::WakeArgs {
            vm: name.to_string(),
            store: None,
            background: false,
        });
    }
    simple(name, Request::Resume)
}

pub fn exec(a: &ExecArgs) -> Result<i32, String> {
    let timeout = Duration::from_secs(a.timeout);
    let req =
        Request::Exec { line: a.line.join(" "), wait_for: a.wait_for.clone(), timeout_ms: timeout.as_millis() as u64 };
    let v = api::call(&a.name, &req, timeout + QUICK)?;
    for l in v["lines"].as_array().into_iter().flatten() {
        println!("{}", l.as_str().unwrap_or_default());
    }
    Ok(0)
}

pub fn snapshot(a: &SnapshotArgs) -> Result<i32, String> {
    let dir = std::path::absolute(&a.dir).map_err(|e| format!("bad snapshot directory {}: {e}", a.dir.display()))?;
    let v = api::call(&a.name, &Request::Snapshot { dir, diff: a.diff }, SLOW)?;
    println!(
        "{}: {} snapshot in {:.3} ms (pause {:.3} ms): state {} B, {} pages written, memory {} B on disk{}",
        a.name,
        v["kind"].as_str().unwrap_or("?"),
        v["snapshot_ms"].as_f64().unwrap_or(f64::NAN),
        v["pause_ms"].as_f64().unwrap_or(f64::NAN),
        v["state_bytes"],
        v["pages_written"],
        v["memory_disk_bytes"],
        if v["linked"].as_bool() == Some(true) { " (memory file linked)" } else { "" }
    );
    Ok(0)
}

pub fn fork(a: &ForkArgs) -> Result<i32, String> {
    let v = api::call(&a.name, &Request::Fork { count: a.count, prefix: a.prefix.clone() }, SLOW)?;
    for c in v["children"].as_array().into_iter().flatten() {
        println!("{} pid {}", c["name"].as_str().unwrap_or("?"), c["pid"]);
    }
    println!(
        "forked {} in {:.3} ms (pause {:.3}, state {:.3}, fork {:.3}); children ready after {:.3} ms",
        a.name,
        v["fork_total_ms"].as_f64().unwrap_or(f64::NAN),
        v["pause_ms"].as_f64().unwrap_or(f64::NAN),
        v["save_ms"].as_f64().unwrap_or(f64::NAN),
        v["fork_ms"].as_f64().unwrap_or(f64::NAN),
        v["ready_ms"].as_f64().unwrap_or(f64::NAN),
    );
    Ok(0)
}

pub fn ls() -> Result<i32, String> {
    let run = api::run_dir();
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
    for name in names.iter().filter(|n| api::check_name(n).is_ok()) {
        let dir = run.join(name);
        if !dir.join("pid").exists() && !dir.join(HIBERNATED).exists() {
            continue; // not a VM's directory
        }
        match api::call_dir(&dir, name, &Request::Status, Duration::from_secs(2)) {
            Ok(v) => row(
                name,
                &v["pid"].to_string(),
                v["state"].as_str().unwrap_or("?"),
                &v["mem_mib"].to_string(),
                &v["generation"].to_string(),
                v["parent"].as_str().unwrap_or("-"),
            ),
            Err(_) if dir.join(HIBERNATED).exists() => row(name, "-", "hibernated", "-", "-", "-"),
            Err(_) => row(name, "-", "gone", "-", "-", "-"),
        }
    }
    Ok(0)
}
