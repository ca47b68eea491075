//! Exec: run a program in its own process group, stream its stdout and stderr as frames (bounded),
//! feed it stdin frames, kill the group on timeout or when the host goes away, answer `exit`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use agent_proto::{read_frame, write_frame, ExecRequest, FrameError, Msg};

use crate::serve::{send, Out};

/// Timeout when the request gives none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest timeout accepted.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Output forwarded when the request gives no bound, and the most it may ask for.
pub const DEFAULT_MAX_OUTPUT: u64 = 16 << 20;
pub const MAX_OUTPUT: u64 = 1 << 30;
/// After the process exits, how long its pipes may stay open (held by its own children).
const DRAIN: Duration = Duration::from_secs(2);
const CHUNK: usize = 32 << 10;

/// Output accounting shared by the two pumps.
struct Budget {
    left: AtomicU64,
    truncated: AtomicBool,
    /// Set once `exit` is sent: late output is dropped, never sent after it.
    closed: AtomicBool,
}

fn pump(mut from: impl Read, out: Out, budget: Arc<Budget>, stderr: bool, done: mpsc::Sender<()>) {
    let msg = if stderr { Msg::Stderr } else { Msg::Stdout };
    let mut buf = vec![0u8; CHUNK];
    let mut send_ok = true;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        // Take up to n bytes of the budget.
        let take = budget
            .left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| Some(l.saturating_sub(n as u64)))
            .map_or(0, |l| l.min(n as u64) as usize);
        if take < n {
            budget.truncated.store(true, Ordering::SeqCst);
        }
        if take > 0 && send_ok {
            // Checked under the writer lock: nothing is sent after `exit`.
            let Ok(mut w) = out.lock() else { break };
            if budget.closed.load(Ordering::SeqCst) {
                send_ok = false;
            } else {
                send_ok = write_frame(&mut *w, &msg, &buf[..take]).is_ok();
            }
        }
    }
    let _ = done.send(());
}

fn kill_group(pid: u32) {
    // SAFETY: signalling the process group we created for the child (its pgid is its pid).
    unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
}

/// Why the wait ended.
enum Waited {
    Exited,
    TimedOut,
    HostGone,
}

/// Waits for the child to exit, for `deadline`, or for the host to hang up (POLLRDHUP on the
/// connection), whichever comes first. `exited` becomes readable when the waiter thread reaped it.
fn wait(conn: &File, exited: &OwnedFd, deadline: Instant) -> Waited {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Waited::TimedOut;
        }
        let mut fds = [
            libc::pollfd { fd: exited.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: conn.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 },
        ];
        let ms = left.as_millis().min(60_000) as libc::c_int;
        // SAFETY: poll over two valid pollfds we own, for at most `ms`.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms.max(1)) };
        if rc < 0 {
            continue; // EINTR
        }
        if fds[0].revents != 0 {
            return Waited::Exited; // the status comes from the waiter thread
        }
        if fds[1].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            return Waited::HostGone;
        }
    }
}

fn spawn(req: &ExecRequest) -> std::io::Result<Child> {
    let (prog, args) =
        req.argv.split_first().ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty argv"))?;
    let mut c = Command::new(prog);
    c.args(args)
        .envs(req.env.iter().map(|(k, v)| (k, v)))
        .stdin(if req.stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if let Some(d) = &req.cwd {
        c.current_dir(d);
    }
    c.spawn()
}

fn pipe() -> std::io::Result<(OwnedFd, File)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds into our array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fds[0] is a new fd owned by nobody else.
    let r = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: as is fds[1].
    let w = unsafe { File::from_raw_fd(fds[1]) };
    Ok((r, w))
}

/// Reads stdin frames up to the `eof` one and writes their data to the child (dropping it once
/// the child closed its stdin). Returns false if the stream broke the protocol.
fn feed_stdin(input: &mut File, mut to: Option<std::process::ChildStdin>) -> Result<bool, FrameError> {
    loop {
        let f = read_frame(input)?;
        let Msg::Stdin { eof } = f.msg else { return Ok(false) };
        if let Some(w) = to.as_mut() {
            if w.write_all(&f.data).is_err() {
                to = None;
            }
        }
        if eof {
            return Ok(true);
        }
    }
}

/// Runs one exec request. Ok(false): the session must close (stdin was not fully read).
pub fn run(req: ExecRequest, input: &mut File, out: &Out) -> Result<bool, FrameError> {
    let timeout = match req.timeout_ms {
        0 => DEFAULT_TIMEOUT,
        ms => Duration::from_millis(ms).min(MAX_TIMEOUT),
    };
    let deadline = Instant::now() + timeout;
    let max_output = match req.max_output {
        0 => DEFAULT_MAX_OUTPUT,
        n => n.min(MAX_OUTPUT),
    };
    let mut child = match spawn(&req) {
        Ok(c) => c,
        Err(e) => {
            let argv0 = req.argv.first().map(String::as_str).unwrap_or("");
            send(out, &Msg::Error { message: format!("cannot run {argv0:?}: {e}") }, b"")?;
            // The host still sends its stdin frames: consume them to stay in sync.
            return if req.stdin { feed_stdin(input, None) } else { Ok(true) };
        }
    };
    let pid = child.id();
    let budget = Arc::new(Budget {
        left: AtomicU64::new(max_output),
        truncated: AtomicBool::new(false),
        closed: AtomicBool::new(false),
    });
    let (done_tx, done_rx) = mpsc::channel();
    let mut pumps = 0;
    if let Some(o) = child.stdout.take() {
        let (out, b, d) = (Arc::clone(out), Arc::clone(&budget), done_tx.clone());
        std::thread::spawn(move || pump(o, out, b, false, d));
        pumps += 1;
    }
    if let Some(e) = child.stderr.take() {
        let (out, b, d) = (Arc::clone(out), Arc::clone(&budget), done_tx.clone());
        std::thread::spawn(move || pump(e, out, b, true, d));
        pumps += 1;
    }
    drop(done_tx);
    let stdin = child.stdin.take();
    let (exited_rx, mut exited_tx) = match pipe() {
        Ok(p) => p,
        Err(e) => {
            kill_group(pid);
            let _ = child.wait();
            send(out, &Msg::Error { message: format!("pipe: {e}") }, b"")?;
            return Ok(false);
        }
    };
    let (status_tx, status_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let st = child.wait();
        let _ = status_tx.send(st);
        let _ = exited_tx.write_all(b"x");
    });
    let mut in_sync = true;
    if req.stdin {
        match feed_stdin(input, stdin) {
            Ok(ok) => in_sync = ok,
            Err(e) => {
                kill_group(pid);
                return Err(e);
            }
        }
    }
    let conn = input.try_clone()?;
    let mut timed_out = false;
    match wait(&conn, &exited_rx, deadline) {
        Waited::Exited => {}
        Waited::TimedOut => {
            timed_out = true;
            kill_group(pid);
        }
        Waited::HostGone => {
            kill_group(pid);
            let _ = status_rx.recv();
            return Err(FrameError::Closed);
        }
    }
    let status = status_rx.recv().ok().and_then(Result::ok);
    // Let the pumps forward what is left, unless the pipes are held open by the child's children.
    let drain_until = Instant::now() + DRAIN;
    for _ in 0..pumps {
        if done_rx.recv_timeout(drain_until.saturating_duration_since(Instant::now())).is_err() {
            break;
        }
    }
    let mut w = out.lock().map_err(|_| FrameError::Malformed("writer poisoned".into()))?;
    budget.closed.store(true, Ordering::SeqCst);
    write_frame(
        &mut *w,
        &Msg::Exit {
            code: status.and_then(|s| s.code()),
            signal: status.and_then(|s| s.signal()),
            timed_out,
            truncated: budget.truncated.load(Ordering::SeqCst),
        },
        b"",
    )?;
    Ok(in_sync)
}
