//! A page-fault handler for Firecracker: listens on a Unix socket and serves every Firecracker
//! that connects (`PUT /snapshot/load` with a `"Uffd"` memory backend), one [`PageServer`] per
//! connection, several at once, each released when its VM goes away (see [`crate::session`]).
//!
//! All VMs are served from one [`PageSource`] (a raw Firecracker memory file or a chunk-store
//! image). With a working-set file configured, the first VM's first-touch order is recorded
//! and saved when it is released; every later VM gets it prefetched (REAP) while it faults.
//! A bad handshake is rejected with a clear error ([`Event::Rejected`]); the listener keeps
//! serving everyone else.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{sys, Error, Result};
use crate::fc::PageSizeField;
use crate::session::Session;
use crate::source::PageSource;
use crate::stats::StatsSnapshot;
use crate::wset::WorkingSet;

/// How a [`Listener`] serves its VMs.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Bytes served per fault (the aligned block around it; at least the page size).
    pub batch: usize,
    /// Working-set file: prefetched into every VM if it exists, else recorded from the first.
    pub wset: Option<PathBuf>,
    /// Record a working set when there is none yet (needs `wset`).
    pub record: bool,
    /// Parallel prefetch threads per VM.
    pub prefetch_threads: usize,
    /// Longest wait for a connected peer's handshake.
    pub handshake_timeout: Duration,
    /// Most VMs served at once; further connections are rejected.
    pub max_sessions: usize,
    /// Poison pages that cannot be served (false: halt that VM instead; for tests).
    pub poison: bool,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            batch: 64 << 10,
            wset: None,
            record: true,
            prefetch_threads: 2,
            handshake_timeout: Duration::from_secs(10),
            max_sessions: 256,
            poison: true,
        }
    }
}

/// What happened to a connection.
#[derive(Debug, Clone)]
pub enum Event {
    /// A VM is being served.
    Started {
        /// Connection number (from 1).
        id: u64,
        /// The VMM's pid (`SO_PEERCRED`).
        pid: Option<i32>,
        /// How it spelled the page size.
        field: PageSizeField,
        /// Regions registered.
        regions: usize,
        /// Bytes of guest memory.
        bytes: u64,
        /// A working set is being prefetched.
        prefetch: bool,
    },
    /// The handshake was refused; nothing is served to this peer.
    Rejected {
        /// Connection number.
        id: u64,
        /// The peer's pid.
        pid: Option<i32>,
        /// Why.
        error: String,
    },
    /// A VM's server was released.
    Ended {
        /// Connection number.
        id: u64,
        /// The VMM's pid.
        pid: Option<i32>,
        /// Why it was released.
        why: String,
        /// Final counters.
        stats: StatsSnapshot,
        /// The first page that could not be served, if any.
        error: Option<String>,
    },
}

/// The working-set file shared by the sessions.
#[derive(Debug)]
pub(crate) struct WsetFile {
    pub path: Option<PathBuf>,
    saved: Mutex<()>,
}

impl WsetFile {
    /// The saved working set, if there is a valid one.
    pub(crate) fn loaded(&self) -> Option<WorkingSet> {
        let p = self.path.as_ref()?;
        if !p.exists() {
            return None;
        }
        WorkingSet::load(p).map_err(|e| tracing::warn!("ignoring working set {}: {e}", p.display())).ok()
    }

    /// Save `ws` unless a working set was saved already.
    pub(crate) fn save_first(&self, ws: &WorkingSet) {
        let (Some(p), Ok(_g)) = (&self.path, self.saved.lock()) else { return };
        if ws.ranges.is_empty() || p.exists() {
            return;
        }
        match ws.save(p) {
            Ok(()) => tracing::info!("working set of {} KiB saved to {}", ws.bytes() >> 10, p.display()),
            Err(e) => tracing::warn!("cannot save the working set: {e}"),
        }
    }
}

/// A listening page-fault handler (see the module docs). Dropping it stops it.
#[derive(Debug)]
pub struct Listener {
    path: PathBuf,
    stop_accept: OwnedFd,
    stop_all: OwnedFd,
    active: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

fn eventfd() -> Result<OwnedFd> {
    // SAFETY: eventfd takes plain integers and returns a new fd or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(sys("eventfd")(std::io::Error::last_os_error()));
    }
    // SAFETY: just created; we own it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn signal(fd: &OwnedFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a local array to our eventfd.
    let _ = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), 8) };
}

/// Bind `path` as a private (0600) socket: a stale socket there is replaced, anything else is an
/// error. Bound under a temporary name and renamed, so it is never reachable with other modes.
fn bind_private(path: &Path) -> Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(sys(format!("remove stale socket {}", path.display())))?
        }
        Ok(_) => return Err(Error::InvalidArgument(format!("{} exists and is not a socket", path.display()))),
        Err(_) => {}
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let l = UnixListener::bind(&tmp).map_err(sys(format!("bind {}", tmp.display())))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .map_err(sys(format!("chmod {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(sys(format!("rename to {}", path.display())))?;
    l.set_nonblocking(true).map_err(sys("set listener non-blocking"))?;
    Ok(l)
}

impl Listener {
    /// Listen on `path` and serve every VM that connects from `source`.
    pub fn bind(path: &Path, source: Arc<dyn PageSource>, cfg: ListenerConfig) -> Result<(Self, Receiver<Event>)> {
        let listener = bind_private(path)?;
        let (tx, rx) = channel();
        let stop_accept = eventfd()?;
        let stop_all = eventfd()?;
        let active = Arc::new(AtomicUsize::new(0));
        let ctx = AcceptCtx {
            listener,
            source,
            wset: Arc::new(WsetFile { path: cfg.wset.clone(), saved: Mutex::new(()) }),
            cfg,
            events: tx,
            stop_accept: stop_accept.try_clone().map_err(sys("dup eventfd"))?,
            stop_all: Arc::new(stop_all.try_clone().map_err(sys("dup eventfd"))?),
            active: active.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("pagesrv-listen".into())
            .spawn(move || ctx.accept_loop())
            .map_err(sys("spawn listener thread"))?;
        Ok((Listener { path: path.to_path_buf(), stop_accept, stop_all, active, thread: Some(thread) }, rx))
    }

    /// VMs being served right now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Stop accepting connections (VMs being served keep being served) and remove the socket.
    pub fn close(&self) {
        signal(&self.stop_accept);
        let _ = std::fs::remove_file(&self.path);
    }

    /// Wait until every VM being served has been released (after [`Listener::close`]).
    pub fn wait(mut self) {
        self.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Stop serving now: every server is released (VMs still running then block on their
    /// next missing page) and the socket removed.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        signal(&self.stop_all);
        self.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Counts a session as active until dropped.
#[derive(Debug)]
pub(crate) struct ActiveGuard(Arc<AtomicUsize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

struct AcceptCtx {
    listener: UnixListener,
    source: Arc<dyn PageSource>,
    wset: Arc<WsetFile>,
    cfg: ListenerConfig,
    events: Sender<Event>,
    stop_accept: OwnedFd,
    stop_all: Arc<OwnedFd>,
    active: Arc<AtomicUsize>,
}

impl AcceptCtx {
    fn accept_loop(self) {
        let mut sessions: Vec<JoinHandle<()>> = Vec::new();
        let mut next_id = 0u64;
        loop {
            let mut fds = [
                libc::pollfd { fd: self.listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: self.stop_accept.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: self.stop_all.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: fds is a valid array of 3 pollfd for the duration of the call.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 3, -1) };
            if rc < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!("listener poll: {}", std::io::Error::last_os_error());
                break;
            }
            if fds[1].revents != 0 || fds[2].revents != 0 {
                break;
            }
            sessions.retain(|h| !h.is_finished());
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    continue;
                }
            };
            next_id += 1;
            if stream.set_nonblocking(false).is_err() || self.active.load(Ordering::SeqCst) >= self.cfg.max_sessions {
                let error = format!("refused: already serving {} VMs", self.cfg.max_sessions);
                let pid = crate::fc_wire::peer_pid(&stream);
                let _ = self.events.send(Event::Rejected { id: next_id, pid, error });
                continue;
            }
            self.active.fetch_add(1, Ordering::SeqCst);
            let session = Session {
                active: ActiveGuard(self.active.clone()),
                id: next_id,
                stream,
                source: self.source.clone(),
                cfg: self.cfg.clone(),
                wset: self.wset.clone(),
                events: self.events.clone(),
            };
            let stop = self.stop_all.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("pagesrv-vm{next_id}"))
                .spawn(move || session.run(stop.as_fd()));
            match spawned {
                Ok(h) => sessions.push(h),
                Err(e) => tracing::error!("cannot start a session thread: {e}"),
            }
        }
        for h in sessions {
            let _ = h.join();
        }
    }
}
