//! `forkvm-agent serve`: accept connections, one thread per session (bounded), and answer
//! requests in order on each.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_proto::{read_frame, write_frame, FrameError, Msg, VERSION};

use crate::args::ServeOpts;
use crate::error::AgentError;
use crate::listen::Listener;

/// Most concurrent sessions; more are answered with an error and closed.
pub const MAX_SESSIONS: usize = 64;
/// A session silent for this long between requests is closed.
const IDLE: Duration = Duration::from_secs(600);

/// The writing half of a session, shared by the threads that stream an exec's output.
pub type Out = Arc<Mutex<File>>;

/// Sends one frame on a shared writer.
pub fn send(out: &Out, msg: &Msg, data: &[u8]) -> Result<(), FrameError> {
    let mut w = out.lock().map_err(|_| FrameError::Malformed("writer poisoned".into()))?;
    write_frame(&mut *w, msg, data)
}

pub fn serve(opts: ServeOpts) -> Result<(), AgentError> {
    let listener = Listener::bind(&opts.listen)?;
    eprintln!("forkvm-agent: serving on {:?}", opts.listen);
    let opts = Arc::new(opts);
    let live = Arc::new(AtomicUsize::new(0));
    loop {
        let conn = listener.accept()?;
        if live.fetch_add(1, Ordering::SeqCst) >= MAX_SESSIONS {
            live.fetch_sub(1, Ordering::SeqCst);
            let mut c = conn;
            let _ =
                write_frame(&mut c, &Msg::Error { message: format!("too many sessions (max {MAX_SESSIONS})") }, b"");
            continue;
        }
        let (o, l) = (Arc::clone(&opts), Arc::clone(&live));
        let spawned = std::thread::Builder::new().name("session".into()).spawn(move || {
            if let Err(e) = session(conn, &o) {
                if !e.is_disconnect() {
                    eprintln!("forkvm-agent: session ended: {e}");
                }
            }
            l.fetch_sub(1, Ordering::SeqCst);
        });
        if spawned.is_err() {
            live.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn set_idle_timeout(f: &File) {
    let tv = libc::timeval { tv_sec: IDLE.as_secs() as libc::time_t, tv_usec: 0 };
    // SAFETY: SO_RCVTIMEO takes a timeval, which `tv` is; the fd is a socket we own.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(f),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
}

/// Serves one connection until the peer closes it (or breaks the protocol).
pub fn session(conn: File, opts: &ServeOpts) -> Result<(), FrameError> {
    set_idle_timeout(&conn);
    let mut input = conn.try_clone()?;
    let out: Out = Arc::new(Mutex::new(conn));
    loop {
        let frame = match read_frame(&mut input) {
            Ok(f) => f,
            Err(FrameError::Closed) => return Ok(()),
            Err(e @ (FrameError::TooBig(_) | FrameError::Malformed(_))) => {
                // The stream cannot be resynchronised: say why, then close.
                let _ = send(&out, &Msg::Error { message: e.to_string() }, b"");
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let reply = |m: Msg| send(&out, &m, b"");
        match frame.msg {
            Msg::Hello { version, .. } if version == VERSION => {
                reply(Msg::Hello { version: VERSION, agent: format!("forkvm-agent {}", env!("CARGO_PKG_VERSION")) })?
            }
            Msg::Hello { version, .. } => {
                reply(Msg::Error {
                    message: format!("protocol version {version} is not supported (agent speaks {VERSION})"),
                })?;
                return Ok(());
            }
            Msg::Ping { nonce } => reply(Msg::Pong { nonce })?,
            Msg::Exec(req) => {
                if !crate::exec::run(req, &mut input, &out)? {
                    return Ok(());
                }
            }
            Msg::ReadFile(req) => crate::files::read(&req, &out)?,
            Msg::WriteFile(req) => crate::files::write(&req, &frame.data, &out)?,
            Msg::CloneHook { generation, host_time_ns } => {
                let done = crate::clone_hook::run(generation, host_time_ns, &frame.data, opts);
                reply(Msg::CloneHookDone(done))?
            }
            other => reply(Msg::Error { message: format!("unexpected {} message", other.name()) })?,
        }
        let _ = out.lock().map(|mut w| w.flush());
    }
}
