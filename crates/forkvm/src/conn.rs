//! Serving the per-VM socket concurrently, with bounds: at most
//! [`limits::MAX_CONNECTIONS`] connections at once (more get a "busy" answer at once), each
//! request line at most [`limits::MAX_REQUEST_BYTES`] and complete within
//! [`limits::REQUEST_DEADLINE`] of connecting. A slow request (a 10 s exec) or a client that
//! trickles bytes occupies one worker; `status` and `stop` go to another.
//!
//! The acceptor and the workers are long-lived threads that take part in the fork gate
//! (`vmm::quiesce`): they block only outside it, in accept/read/condvar waits on parent-only
//! objects. The fds of open connections are listed in [`Conns`] so a fork child closes them.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use forkvm_api::vm::{self, limits, Reply, Request};
use vmm::quiesce::{self, Busy};

/// Handles one parsed request on `conn`; returns the answer line, or None when it kept the
/// connection to answer later (stop).
pub type Handler = dyn Fn(Request, UnixStream, &mut Busy) -> Option<(String, UnixStream)> + Send + Sync;

/// The connections a VMM has open (their fds, for fork children to close) and its queue.
#[derive(Debug, Default)]
pub struct Conns {
    state: Mutex<ConnState>,
    cond: Condvar,
}

#[derive(Debug, Default)]
struct ConnState {
    open: Vec<RawFd>,
    queue: VecDeque<UnixStream>,
}

fn lock(m: &Mutex<ConnState>) -> std::sync::MutexGuard<'_, ConnState> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Conns {
    /// In a fork child: closes every connection fd of the parent (async-signal-safe: the parent's
    /// threads were quiesced, so nobody holds the lock).
    pub fn close_all_in_child(&self) {
        if let Ok(s) = self.state.try_lock() {
            for &fd in &s.open {
                // SAFETY: closing an fd this child inherited and never uses.
                unsafe { libc::close(fd) };
            }
        }
    }

    fn forget(&self, fd: RawFd) {
        lock(&self.state).open.retain(|&f| f != fd);
    }
}

/// Starts the acceptor and the worker pool on `listener`.
pub fn start(listener: UnixListener, conns: Arc<Conns>, handler: Arc<Handler>) -> std::io::Result<()> {
    for i in 0..limits::MAX_CONNECTIONS {
        let (c, h) = (conns.clone(), handler.clone());
        std::thread::Builder::new().name(format!("api-{i}")).spawn(move || worker(&c, &*h))?;
    }
    std::thread::Builder::new().name("api-accept".into()).spawn(move || acceptor(&listener, &conns))?;
    Ok(())
}

fn acceptor(listener: &UnixListener, conns: &Conns) {
    let _participant = quiesce::participant();
    let mut busy = quiesce::busy();
    loop {
        let conn = match busy.idle(|| listener.accept()) {
            Ok((c, _)) => c,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!("API socket: accept failed: {e}");
                busy.idle(|| std::thread::sleep(std::time::Duration::from_millis(10)));
                continue;
            }
        };
        let mut s = lock(&conns.state);
        if s.open.len() >= limits::MAX_CONNECTIONS {
            drop(s);
            let msg = format!("busy: {} connections in progress, try again", limits::MAX_CONNECTIONS);
            let _ = conn.set_nonblocking(true);
            let _ = (&conn).write_all(Reply::<()>::err(msg).to_line().as_bytes());
            continue;
        }
        s.open.push(conn.as_raw_fd());
        s.queue.push_back(conn);
        drop(s);
        conns.cond.notify_one();
    }
}

fn worker(conns: &Conns, handler: &Handler) {
    let _participant = quiesce::participant();
    let mut busy = quiesce::busy();
    loop {
        let conn = busy.idle(|| {
            let mut s = lock(&conns.state);
            loop {
                if let Some(c) = s.queue.pop_front() {
                    return c;
                }
                s = conns.cond.wait(s).unwrap_or_else(|p| p.into_inner());
            }
        });
        let fd = conn.as_raw_fd();
        let answer = match read_request(&conn, &mut busy) {
            Err(e) => Some((Reply::<()>::err(e).to_line(), conn)),
            Ok(req) => handler(req, conn, &mut busy),
        };
        if let Some((line, conn)) = answer {
            let _ = conn.set_write_timeout(Some(limits::REQUEST_DEADLINE));
            let _ = busy.idle(|| (&conn).write_all(line.as_bytes()));
            conns.forget(fd);
            drop(conn);
        }
    }
}

/// Reads one request line within the deadline and parses it.
fn read_request(conn: &UnixStream, busy: &mut Busy) -> Result<Request, String> {
    let deadline = Instant::now() + limits::REQUEST_DEADLINE;
    let mut line = Vec::with_capacity(256);
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("bad request: no complete request line within {:?}", limits::REQUEST_DEADLINE));
        }
        let _ = conn.set_read_timeout(Some(left));
        let n = match busy.idle(|| (&*conn).read(&mut buf)) {
            Ok(0) => return Err("bad request: the connection closed before a newline".into()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(e) => return Err(format!("cannot read request: {e}")),
        };
        let chunk = &buf[..n];
        let end = chunk.iter().position(|&b| b == b'\n');
        line.extend_from_slice(&chunk[..end.map_or(n, |i| i + 1)]);
        if line.len() > limits::MAX_REQUEST_BYTES {
            return Err(vm::RequestError::TooLong.to_string());
        }
        if end.is_some() {
            return vm::parse_request(&line).map_err(|e| e.to_string());
        }
    }
}
