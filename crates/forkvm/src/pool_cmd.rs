//! `forkvm pool`: a warm pool of VMM processes for live clones (see `vmm::live_clone`).
//!
//! `forkvm pool start --size N --mem 256M` starts N member processes. Each makes a warm VM (KVM
//! VM, irqchip, vCPUs, guest memory registered with userfaultfd), listens on
//! `<run dir>/.pool/m<MiB>-v<vCPUs>-<pid>.sock` and serves the first parent that sends it a
//! ticket: it claims the clone's name and becomes that VM's VMM process (per-VM API socket,
//! console log), exactly like a fork child — and starts a replacement member, so the pool keeps
//! its size (the size it had once `pool start` was done: a replacement that finds the pool full,
//! say because the daemon topped it up meanwhile, leaves). `forkvm fork` of a VM with shared memory uses members of its size when there are
//! enough, and fork() otherwise.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use clap::{Args, Subcommand};
use forkvm_api::vm;
use vmm::pool::WarmVm;

use crate::claim::Claimed;
use crate::private_fs::{bind_private, create_private, private_dir};
use crate::server::{redirect_output, serve};
use crate::size::parse_size;

#[derive(Subcommand, Debug)]
pub enum PoolCmd {
    /// Start N warm VMM processes of one memory size.
    Start(PoolStartArgs),
    /// List the warm members.
    Status,
    /// Stop every warm member (clones already made keep running).
    Stop,
    /// One warm member (started by `pool start`; --stdio: console on stdin/stdout, no API).
    #[command(hide = true)]
    Member(MemberArgs),
}

#[derive(Args, Debug)]
pub struct PoolStartArgs {
    /// Number of warm VMM processes.
    #[arg(long, default_value_t = 4)]
    pub size: usize,
    /// Guest memory size of the members (a parent is cloned only into members of its size).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub mem: u64,
    /// vCPUs of the members (a parent is cloned only into members of its vCPU count).
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
}

#[derive(Args, Debug, Clone)]
pub struct MemberArgs {
    #[arg(long, value_parser = parse_size)]
    pub mem: u64,
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Console on stdin/stdout instead of a named VM with an API socket (benchmarks).
    #[arg(long)]
    pub stdio: bool,
    /// Do not start a replacement once cloned.
    #[arg(long)]
    pub no_refill: bool,
    /// The pool size replacements keep: a replacement that finds this many members of its kind
    /// already listening leaves instead of joining.
    #[arg(long)]
    pub keep: Option<usize>,
    /// Started by a cloned member to take its place (subject to --keep).
    #[arg(long)]
    pub replacement: bool,
}

pub fn pool(cmd: PoolCmd) -> Result<i32, String> {
    match cmd {
        PoolCmd::Start(a) => {
            // Replacements keep the pool at the size it has once these are up.
            let keep = members()?.iter().filter(|m| m.1 == a.mem && m.2 == a.vcpus).count() + a.size;
            for s in start_members(a.size, a.mem, a.vcpus, false, Some(keep))? {
                println!("{}", s.display());
            }
            Ok(0)
        }
        PoolCmd::Status => {
            let found = members()?;
            if found.is_empty() {
                eprintln!("no warm pool members in {} (`forkvm pool start`)", pool_dir().display());
            }
            for (path, mem, vcpus, pid) in found {
                println!("{:<8} {:>6} MiB {:>2} vCPU  {}", pid, mem >> 20, vcpus, path.display());
            }
            Ok(0)
        }
        PoolCmd::Stop => stop(),
        PoolCmd::Member(a) => member(&a),
    }
}

/// `<run dir>/.pool`.
pub fn pool_dir() -> PathBuf {
    vm::run_dir().join(".pool")
}

/// Stops every live member (SIGTERM, then waits for it, at most 10 s each) and removes its
/// socket and log; removes the sockets that crashed members left, but keeps their logs (they
/// may say what went wrong), and says so.
fn stop() -> Result<i32, String> {
    let (live, dead): (Vec<_>, Vec<_>) = sockets()?.into_iter().partition(|m| vmm::pool::member_alive(m.3));
    for m in &live {
        // SAFETY: kill with a plain pid and signal number; the pid is a pool member's.
        unsafe { libc::kill(m.3, libc::SIGTERM) };
    }
    let mut stuck = Vec::new();
    for (path, _, _, pid) in &live {
        let _ = std::fs::remove_file(path);
        if wait_gone(*pid, std::time::Duration::from_secs(10)) {
            let _ = std::fs::remove_file(member_log(*pid));
        } else {
            stuck.push(pid.to_string());
        }
    }
    let n = live.len();
    println!("stopped {n} warm pool member{}", if n == 1 { "" } else { "s" });
    if !stuck.is_empty() {
        println!("still running 10 s after SIGTERM (logs kept): pid {}", stuck.join(", "));
    }
    if !dead.is_empty() {
        let mut logs = Vec::new();
        for (path, _, _, pid) in &dead {
            let _ = std::fs::remove_file(path);
            let log = member_log(*pid);
            if log.exists() {
                logs.push(log.display().to_string());
            }
        }
        let k = dead.len();
        let kept = if logs.is_empty() { String::new() } else { format!("; kept their logs: {}", logs.join(" ")) };
        println!("removed the socket{} of {k} member{} that had exited{kept}", plural(k), plural(k));
    }
    Ok(0)
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Where a warm member's output goes until it becomes a clone (then removed).
fn member_log(pid: i32) -> PathBuf {
    pool_dir().join(format!("member-{pid}.log"))
}

/// Waits until process `pid` (not our child) has exited, at most `limit`: a pidfd becomes
/// readable then. True once it has.
fn wait_gone(pid: i32, limit: std::time::Duration) -> bool {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if fd < 0 {
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
    }
    // SAFETY: fd was just returned by pidfd_open and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ms = i32::try_from(limit.as_millis()).unwrap_or(i32::MAX);
    loop {
        // SAFETY: one valid pollfd; poll writes only its revents.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n >= 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return n == 1;
        }
    }
}

/// Live warm members (a crashed member's socket is none): (socket, memory bytes, vCPUs, pid).
pub fn members() -> Result<Vec<(PathBuf, u64, u8, i32)>, String> {
    Ok(sockets()?.into_iter().filter(|m| vmm::pool::member_alive(m.3)).collect())
}

/// Every member socket in the pool directory, live or left by a crashed member.
fn sockets() -> Result<Vec<(PathBuf, u64, u8, i32)>, String> {
    let dir = pool_dir();
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot list {}: {e}", dir.display())),
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some((m, v, p)) = vmm::pool::parse_member_socket(&name) {
            out.push((e.path(), m << 20, v, p));
        }
    }
    out.sort_by_key(|m| m.3);
    Ok(out)
}

/// Starts `n` members and waits until each listens; returns their sockets.
pub fn start_members(n: usize, mem: u64, vcpus: u8, stdio: bool, keep: Option<usize>) -> Result<Vec<PathBuf>, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the forkvm executable: {e}"))?;
    let mut out = Vec::new();
    for _ in 0..n {
        let mut child = member_command(&exe, mem, vcpus, stdio, keep)
            .spawn()
            .map_err(|e| format!("cannot start a pool member: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        match line.trim_end().strip_prefix("warm ") {
            Some(p) => out.push(PathBuf::from(p)),
            None => return Err(format!("a pool member failed to start: {}", line.trim_end())),
        }
    }
    Ok(out)
}

fn member_command(exe: &Path, mem: u64, vcpus: u8, stdio: bool, keep: Option<usize>) -> Command {
    let mut c = Command::new(exe);
    c.args(["pool", "member", "--mem", &mem.to_string(), "--vcpus", &vcpus.to_string()]);
    if stdio {
        c.arg("--stdio").arg("--no-refill").stdin(Stdio::piped());
    } else {
        c.stdin(Stdio::null()).process_group(0);
    }
    if let Some(k) = keep {
        c.args(["--keep", &k.to_string()]);
    }
    c.stdout(Stdio::piped()).stderr(Stdio::inherit());
    c
}

/// A warm member: make the VM, listen, serve the first ticket, then live as that clone.
fn member(a: &MemberArgs) -> Result<i32, String> {
    let warm = WarmVm::new(a.mem, a.vcpus).map_err(|e| format!("cannot make a warm VM: {e}"))?;
    if let (true, Some(keep)) = (a.replacement, a.keep) {
        let have = members()?.iter().filter(|m| m.1 == a.mem && m.2 == a.vcpus).count();
        if have >= keep {
            tracing::info!("the pool already has {have} members of this kind (keeps {keep}): this replacement leaves");
            return Ok(0);
        }
    }
    let dir = pool_dir();
    private_dir(&vm::run_dir())?;
    private_dir(&dir)?;
    let sock = dir.join(vmm::pool::member_socket_name(a.mem >> 20, a.vcpus, std::process::id()));
    let listener = bind_private(&sock).map_err(|e| format!("cannot bind {}: {e}", sock.display()))?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "warm {}", sock.display()).and_then(|()| out.flush()).map_err(|e| e.to_string())?;
    }
    if !a.stdio {
        redirect_output(&member_log(std::process::id() as i32))?;
    }
    let offer = loop {
        let (conn, _) = listener.accept().map_err(|e| format!("accept on {}: {e}", sock.display()))?;
        match warm.offer(conn) {
            Ok(o) => break o,
            Err(e) => tracing::warn!("a parent went away before its ticket: {e}"),
        }
    };
    let _ = std::fs::remove_file(&sock);
    drop(listener);
    if !a.no_refill {
        if let Ok(exe) = std::env::current_exe() {
            // The replacement keeps the pool's size (and replaces itself in turn once used,
            // unless the pool is full by then); it reports on a pipe nobody reads.
            let _ =
                member_command(&exe, a.mem, a.vcpus, false, a.keep).arg("--replacement").stdout(Stdio::null()).spawn();
        }
    }
    if a.stdio {
        let (vm, _link, rep) =
            warm.accept_offer(offer, Some(Box::new(std::io::stdout()))).map_err(|e| format!("clone: {e}"))?;
        // For `forkvm bench pool`: where the member's part of a clone went (ms).
        println!(
            "clone-report {:.3} {:.3} {:.3} {:.3} {:.3}",
            rep.apply.as_secs_f64() * 1e3,
            rep.probe.as_secs_f64() * 1e3,
            rep.restore.as_secs_f64() * 1e3,
            rep.assemble.as_secs_f64() * 1e3,
            rep.resume.as_secs_f64() * 1e3
        );
        vm.feed_console_from(std::io::stdin()).map_err(|e| e.to_string())?;
        return Ok(match vm.wait_exit(None) {
            Some(vmm::ExitReason::Error(e)) => {
                eprintln!("forkvm: pool clone: {e}");
                1
            }
            _ => 0,
        });
    }
    let name = offer.header.name.clone().unwrap_or_else(|| format!("clone-{}", std::process::id()));
    let claimed = match vm::check_name(&name).and_then(|()| Claimed::new(&name)) {
        Ok(c) => c,
        Err(e) => {
            offer.refuse(&e);
            return Err(e);
        }
    };
    let member_log = member_log(std::process::id() as i32);
    if let Err(e) = redirect_output(&claimed.paths.vmm_log()) {
        offer.refuse(&e);
        claimed.release();
        return Err(e);
    }
    let console = match create_private(&claimed.console_log()) {
        Ok(f) => f,
        Err(e) => {
            offer.refuse(&e);
            claimed.release();
            return Err(e);
        }
    };
    let _ = std::fs::remove_file(member_log);
    let parent = offer.header.parent.clone();
    let made = if offer.header.restore.is_some() {
        offer.restore_snapshot(warm, Some(Box::new(console))).map(|vm| (vm, None))
    } else {
        warm.accept_offer(offer, Some(Box::new(console))).map(|(vm, link, _)| (vm, Some(link)))
    };
    match made {
        Ok((vm, link)) => {
            let code = serve(claimed, vm, parent, None);
            drop(link);
            Ok(code)
        }
        Err(e) => {
            claimed.release();
            Err(format!("clone: {e}"))
        }
    }
}

/// Connects to `n` members of `mem` bytes and `vcpus` vCPUs, or None if there are not enough.
pub fn connect_members(n: usize, mem: u64, vcpus: u8) -> Option<Vec<UnixStream>> {
    let found = members().ok()?;
    let mut conns = Vec::new();
    for (path, m, v, _) in found {
        if conns.len() == n {
            break;
        }
        if m == mem && v == vcpus {
            if let Ok(c) = UnixStream::connect(&path) {
                conns.push(c);
            }
        }
    }
    (conns.len() == n).then_some(conns)
}
