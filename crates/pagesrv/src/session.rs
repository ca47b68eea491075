//! One Firecracker connection of a [`crate::listener::Listener`]: handshake, a [`PageServer`]
//! for its memory, and the wait for the VM to go away, after which the server is released.
//!
//! The VM is gone when its process exits (a pidfd of the `SO_PEERCRED` pid becomes readable),
//! when the handshake stream reaches EOF and the peer is no longer alive (Firecracker keeps the
//! socket open for its whole life; releases that closed it right after the handshake are served
//! until their process exits), or when the fault thread ends (peer's address space gone, uffd
//! hang-up, a halted or failed server).

use std::io::Read;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::Sender;
use std::sync::Arc;

use crate::error::Result;
use crate::fc::{self, PageSizeField};
use crate::fc_wire;
use crate::listener::{ActiveGuard, Event, ListenerConfig, WsetFile};
use crate::server::{Ended, FailureHook, Monitor, PageServer, ServerConfig};
use crate::source::PageSource;

pub(crate) struct Session {
    pub active: ActiveGuard,
    pub id: u64,
    pub stream: UnixStream,
    pub source: Arc<dyn PageSource>,
    pub cfg: ListenerConfig,
    pub wset: Arc<WsetFile>,
    pub events: Sender<Event>,
}

struct Started {
    server: PageServer,
    field: PageSizeField,
    recording: bool,
}

impl Session {
    pub(crate) fn run(self, stop_fd: BorrowedFd<'_>) {
        let pid = fc_wire::peer_pid(&self.stream);
        let st = match self.start(pid) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(session = self.id, ?pid, "rejected: {e}");
                drop(self.active);
                let _ = self.events.send(Event::Rejected { id: self.id, pid, error: e.to_string() });
                return;
            }
        };
        let mon = st.server.monitor();
        let _ = self.events.send(Event::Started {
            id: self.id,
            pid,
            field: st.field,
            regions: mon.regions(),
            bytes: mon.total_pages() as u64 * mon.page_size(),
            prefetch: !st.recording && self.wset.loaded().is_some(),
        });
        let why = self.wait_for_end(pid, &mon, stop_fd);
        let error = st.server.error();
        let ws = st.server.working_set();
        let stats = st.server.stop();
        if st.recording && error.is_none() {
            self.wset.save_first(&ws);
        }
        tracing::info!(session = self.id, ?pid, "released: {why}");
        drop(self.active);
        let _ = self.events.send(Event::Ended { id: self.id, pid, why, stats, error });
    }

    fn start(&self, pid: Option<i32>) -> Result<Started> {
        let (hs, uffd) = fc_wire::recv_handshake(&self.stream, self.cfg.handshake_timeout)?;
        let (regions, ps) = fc::validate(&hs.mappings, self.source.len())?;
        let prefetch = self.wset.loaded();
        let recording = prefetch.is_none() && self.cfg.record && self.wset.path.is_some();
        let (id, p) = (self.id, pid);
        let hook = FailureHook(Arc::new(move |why: &str| tracing::error!(session = id, pid = ?p, "{why}")));
        let cfg = ServerConfig {
            page_size: ps as usize,
            batch: self.cfg.batch.max(ps as usize),
            record: recording,
            prefetch,
            prefetch_threads: self.cfg.prefetch_threads,
            owner_pid: None, // never signal a VMM we do not own
            on_failure: Some(hook),
            poison: self.cfg.poison,
            ..Default::default()
        };
        let server = PageServer::start(uffd, regions, self.source.clone(), cfg)?;
        tracing::info!(session = self.id, ?pid, format = %hs.field, regions = hs.mappings.len(), "serving");
        Ok(Started { server, field: hs.field, recording })
    }

    /// Block until the VM is gone or the listener stops; returns why.
    fn wait_for_end(&self, pid: Option<i32>, mon: &Monitor, stop: BorrowedFd<'_>) -> String {
        let done = mon.done_fd();
        // SAFETY: getpid has no preconditions.
        let me = unsafe { libc::getpid() };
        // A peer in our own process (tests, embedders) cannot exit before us: EOF is its signal.
        let pidfd = match pid.filter(|&p| p != me).map(pidfd_open) {
            Some(Err(e)) if e.raw_os_error() == Some(libc::ESRCH) => return "the VMM process has exited".into(),
            Some(Ok(fd)) => Some(fd),
            _ => None,
        };
        let mut stream = &self.stream;
        let mut eof = false;
        let mut buf = [0u8; 4096];
        loop {
            let mut fds = vec![
                libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: done.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: pidfd.as_ref().map_or(-1, |f| f.as_raw_fd()), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: if eof { -1 } else { self.stream.as_raw_fd() }, events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: fds is a valid array of pollfd for the duration of the call (fd -1 is ignored).
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return format!("poll failed: {e}");
            }
            if fds[0].revents != 0 {
                return "the listener stopped".into();
            }
            if fds[1].revents != 0 {
                return match mon.ended() {
                    Some(Ended::PeerGone) => "the VM's address space is gone (its process exited)".into(),
                    Some(Ended::HungUp) => "the userfaultfd hung up".into(),
                    Some(Ended::Halted(why)) => format!("VM stopped: {why}"),
                    Some(Ended::Failed(why)) => format!("page server failed: {why}"),
                    Some(Ended::Stopped) | None => "the page server stopped".into(),
                };
            }
            if fds[2].revents != 0 {
                return "the VMM process has exited".into();
            }
            if fds[3].revents != 0 {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) if pidfd.is_none() => return "the VMM closed the socket".into(),
                    Ok(0) | Err(_) => {
                        tracing::info!(session = self.id, ?pid, "socket closed; serving until the VMM exits");
                        eof = true;
                    }
                    Ok(n) => tracing::debug!(session = self.id, bytes = n, "ignored bytes after the handshake"),
                }
            }
        }
    }
}

fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the syscall just returned this fd; we own it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
