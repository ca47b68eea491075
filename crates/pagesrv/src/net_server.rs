//! The TCP page server (`forkvm pagesrv --tcp`): serves any [`PageSource`] to authenticated
//! clients on other hosts (see [`crate::net_wire`] for the protocol, [`crate::net_auth`] for the
//! keys). Each connection gets its own thread: handshake (bounded by a timeout), then the
//! recorded working set streamed in 256 KiB frames, demand requests always answered first.
//!
//! A misbehaving or vanished client only ends its own connection: its frames are bounded, its
//! writes time out, and TCP keepalive notices a dead link while it is idle. The source is only
//! ever read.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::bitmap::Bitmap;
use crate::error::{sys, Error, Result};
use crate::net_auth::{self, Secret, SessionKey};
use crate::net_wire::{self as wire, Msg, WireError, KIND_DATA, KIND_ZERO, PAGE};
use crate::source::PageSource;
use crate::wset::WorkingSet;

/// Pages per pushed frame.
const PUSH_PAGES: usize = 64;

/// How a [`NetServer`] serves.
#[derive(Debug, Clone)]
pub struct NetServerConfig {
    /// The shared secret.
    pub secret: Secret,
    /// Streamed to every client that asks for it, right after the handshake.
    pub push: Option<WorkingSet>,
    /// The VM's state blob (e.g. a hibernated VM's state file), fetched by clients that wake it.
    pub state: Option<Vec<u8>>,
    /// Without `push`: save the first client's request order (its first `record_for`) here, and
    /// stream it to the clients that connect after that.
    pub record: Option<PathBuf>,
    /// How long a session's requests are recorded.
    pub record_for: Duration,
    /// Longest wait for each handshake message.
    pub handshake_timeout: Duration,
    /// Longest wait for a client to take a frame.
    pub write_timeout: Duration,
    /// Most clients served at once; more are refused with an error.
    pub max_sessions: usize,
    /// Opens what each authenticated connection serves (e.g. a live clone of a running VM taken
    /// at that instant) instead of the server's one source, `state` and `push`.
    pub opener: Option<Opener>,
}

/// What one connection serves, from an [`Opener`]. Dropped when the connection ends.
#[derive(Debug)]
pub struct Opened {
    /// Its memory; its length must be the server's source's.
    pub source: Arc<dyn PageSource>,
    /// Its state blob.
    pub state: Option<Vec<u8>>,
    /// Streamed to the client when it asks for a push.
    pub push: Option<WorkingSet>,
}

/// Called once per authenticated connection, before the Welcome; an error refuses the client
/// with that reason.
#[derive(Clone)]
pub struct Opener(pub Arc<dyn Fn() -> std::result::Result<Opened, String> + Send + Sync>);

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Opener")
    }
}

impl NetServerConfig {
    /// Defaults for `secret`.
    pub fn new(secret: Secret) -> Self {
        NetServerConfig {
            secret,
            push: None,
            state: None,
            record: None,
            record_for: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(20),
            max_sessions: 128,
            opener: None,
        }
    }
}

/// What happened to a connection.
#[derive(Debug, Clone)]
pub enum NetEvent {
    /// Authenticated; being served.
    Served { id: u64, peer: Option<SocketAddr>, version: u16, push: bool },
    /// Refused during the handshake (bad secret, version, frame, timeout...).
    Rejected { id: u64, peer: Option<SocketAddr>, error: String },
    /// The connection ended.
    Ended { id: u64, peer: Option<SocketAddr>, why: String, pages: u64, pushed: u64, requests: u64 },
}

/// A listening TCP page server. Dropping it stops it and closes every connection.
#[derive(Debug)]
pub struct NetServer {
    addr: SocketAddr,
    stop_fd: OwnedFd,
    shared: Arc<ServerShared>,
    accept: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct ServerShared {
    source: Arc<dyn PageSource>,
    cfg: NetServerConfig,
    stop: AtomicBool,
    active: AtomicUsize,
    conns: Mutex<Vec<(u64, TcpStream)>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    recorded: AtomicBool,
    /// The working set streamed to clients: the configured one, or the first client's once saved.
    push: Mutex<Option<Arc<WorkingSet>>>,
}

impl NetServer {
    /// Listen on `addr` (e.g. `10.0.0.1:7070`, port 0 for any) and serve `source`.
    pub fn bind(addr: &str, source: Arc<dyn PageSource>, cfg: NetServerConfig) -> Result<(Self, Receiver<NetEvent>)> {
        if !source.len().is_multiple_of(PAGE as u64) {
            return Err(Error::InvalidArgument(format!("source of {} bytes is not whole pages", source.len())));
        }
        if cfg.state.as_ref().is_some_and(|s| s.len() > wire::MAX_STATE) {
            return Err(Error::InvalidArgument("state blob over 4 MiB".into()));
        }
        let l = TcpListener::bind(addr).map_err(sys(format!("listen on {addr}")))?;
        l.set_nonblocking(true).map_err(sys("set the listener non-blocking"))?;
        let local = l.local_addr().map_err(sys("listener address"))?;
        // SAFETY: eventfd takes plain integers and returns a new fd or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(sys("eventfd")(std::io::Error::last_os_error()));
        }
        // SAFETY: eventfd just returned this fd; we are its only owner.
        let stop_fd = unsafe { OwnedFd::from_raw_fd(efd) };
        let wake = stop_fd.try_clone().map_err(sys("dup eventfd"))?;
        let cfg_push = cfg.push.clone().map(Arc::new);
        let shared = Arc::new(ServerShared {
            source,
            cfg,
            stop: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            conns: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
            recorded: AtomicBool::new(false),
            push: Mutex::new(cfg_push),
        });
        let (tx, rx) = channel();
        let s = shared.clone();
        let accept = std::thread::Builder::new()
            .name("pagesrv-net-accept".into())
            .spawn(move || accept_loop(&s, &l, &wake, &tx))
            .map_err(sys("spawn accept thread"))?;
        Ok((NetServer { addr: local, stop_fd, shared, accept: Some(accept) }, rx))
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections being served.
    pub fn active(&self) -> usize {
        self.shared.active.load(SeqCst)
    }

    /// Stop accepting, close every connection, join all threads.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, SeqCst);
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a local array to our eventfd.
        let _ = unsafe { libc::write(self.stop_fd.as_raw_fd(), one.as_ptr().cast(), 8) };
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        for (_, c) in lock(&self.shared.conns).iter() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        let threads = std::mem::take(&mut *lock(&self.shared.threads));
        for h in threads {
            let _ = h.join();
        }
    }
}

impl Drop for NetServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn accept_loop(s: &Arc<ServerShared>, l: &TcpListener, wake: &OwnedFd, events: &Sender<NetEvent>) {
    let mut next_id = 0u64;
    while !s.stop.load(SeqCst) {
        let mut fds = [
            libc::pollfd { fd: l.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: wake.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: fds is a valid array of 2 pollfd for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 || fds[1].revents != 0 {
            continue; // EINTR, or the stop flag (checked above)
        }
        let (stream, peer) = match l.accept() {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!("accept: {e}");
                continue;
            }
        };
        next_id += 1;
        let id = next_id;
        if s.active.load(SeqCst) >= s.cfg.max_sessions {
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            let why = format!("busy: {} clients already served", s.cfg.max_sessions);
            let _ = wire::write_msg(&mut &stream, &Msg::Error { reason: why.clone() });
            let _ = events.send(NetEvent::Rejected { id, peer: Some(peer), error: why });
            continue;
        }
        s.active.fetch_add(1, SeqCst);
        if let Ok(c) = stream.try_clone() {
            lock(&s.conns).push((id, c));
        }
        let (s2, tx) = (s.clone(), events.clone());
        let h = std::thread::Builder::new().name(format!("pagesrv-net{id}")).spawn(move || {
            let last = session(&s2, id, stream, &tx);
            lock(&s2.conns).retain(|(i, _)| *i != id);
            s2.active.fetch_sub(1, SeqCst);
            // Said once the connection no longer counts as active.
            let _ = tx.send(last);
        });
        match h {
            Ok(h) => {
                let mut t = lock(&s.threads);
                t.retain(|h| !h.is_finished());
                t.push(h);
            }
            Err(e) => {
                tracing::error!("cannot start a session thread: {e}");
                lock(&s.conns).retain(|(i, _)| *i != id);
                s.active.fetch_sub(1, SeqCst);
            }
        }
    }
}

/// Enables TCP keepalive: a dead link is noticed within ~20 s even while the client is idle.
fn keepalive(s: &TcpStream) {
    let fd = s.as_raw_fd();
    for (level, opt, v) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 10),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 3),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3),
        (libc::IPPROTO_TCP, libc::TCP_NODELAY, 1),
    ] {
        let v: libc::c_int = v;
        // SAFETY: setsockopt reads an int of the given size from a local.
        let _ = unsafe {
            libc::setsockopt(fd, level, opt, (&v as *const libc::c_int).cast(), std::mem::size_of_val(&v) as u32)
        };
    }
}

/// What a connection serves: the server's source, state and working set, or an [`Opener`]'s.
struct Serving {
    source: Arc<dyn PageSource>,
    state: Option<Arc<Vec<u8>>>,
    push: Option<Arc<WorkingSet>>,
}

/// Server side of the handshake; returns the version, session key and what to serve.
fn handshake(s: &ServerShared, mut c: &TcpStream) -> Result<(u16, SessionKey, Serving), String> {
    let hello = wire::read_msg(&mut c).map_err(|e| format!("reading Hello: {e}"))?;
    let Msg::Hello { min, max, flags, nonce: cn } = hello else {
        return Err(format!("expected Hello, got {hello:?}"));
    };
    let version = max.min(wire::MAX_VERSION);
    if version < min.max(wire::MIN_VERSION) {
        return Err(format!(
            "unsupported protocol version: the client speaks {min}..={max}, this server {}..={}",
            wire::MIN_VERSION,
            wire::MAX_VERSION
        ));
    }
    let sn = net_auth::nonce().map_err(|e| e.to_string())?;
    let proof = s.cfg.secret.server_proof(version, &cn, &sn);
    wire::write_msg(&mut c, &Msg::Challenge { version, nonce: sn, proof }).map_err(|e| e.to_string())?;
    let auth = wire::read_msg(&mut c).map_err(|e| format!("reading Auth: {e}"))?;
    let Msg::Auth { proof } = auth else {
        return Err(format!("expected Auth, got {auth:?}"));
    };
    if !net_auth::same(&proof, &s.cfg.secret.client_proof(version, &cn, &sn)) {
        return Err("authentication failed: the client does not know the shared secret".into());
    }
    let mut serving = match &s.cfg.opener {
        Some(o) => {
            let opened = (o.0)()?;
            if opened.source.len() != s.source.len() || opened.state.as_ref().is_some_and(|b| b.len() > wire::MAX_STATE)
            {
                return Err("the opened source does not match the server's size, or its state is over 4 MiB".into());
            }
            Serving { source: opened.source, state: opened.state.map(Arc::new), push: opened.push.map(Arc::new) }
        }
        None => {
            Serving { source: s.source.clone(), state: s.cfg.state.clone().map(Arc::new), push: lock(&s.push).clone() }
        }
    };
    if flags & wire::FLAG_PUSH == 0 {
        serving.push = None;
    }
    let push_bytes = serving.push.as_ref().map_or(0, |w| w.bytes().min(serving.source.len()));
    let welcome = Msg::Welcome {
        len: serving.source.len(),
        page_size: PAGE as u32,
        state_len: serving.state.as_ref().map_or(0, |b| b.len() as u64),
        push_bytes,
    };
    wire::write_msg(&mut c, &welcome).map_err(|e| e.to_string())?;
    Ok((version, s.cfg.secret.session(version, &cn, &sn), serving))
}

struct Conn<'a> {
    s: &'a ServerShared,
    c: &'a TcpStream,
    source: Arc<dyn PageSource>,
    state: Option<Arc<Vec<u8>>>,
    key: SessionKey,
    sent: Bitmap,
    pages: u64,
    pushed: u64,
    requests: u64,
    started: Instant,
    record: Vec<(u64, u32)>,
    recording: bool,
}

/// Serves one connection; returns its last event (Rejected or Ended) for the caller to send.
fn session(s: &ServerShared, id: u64, stream: TcpStream, events: &Sender<NetEvent>) -> NetEvent {
    let peer = stream.peer_addr().ok();
    keepalive(&stream);
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(s.cfg.handshake_timeout));
    let _ = stream.set_write_timeout(Some(s.cfg.write_timeout));
    let (version, key, serving) = match handshake(s, &stream) {
        Ok(x) => x,
        Err(error) => {
            tracing::warn!(session = id, ?peer, "refused: {error}");
            let _ = wire::write_msg(&mut &stream, &Msg::Error { reason: error.clone() });
            return NetEvent::Rejected { id, peer, error };
        }
    };
    let Serving { source, state, push } = serving;
    let _ = events.send(NetEvent::Served { id, peer, version, push: push.is_some() });
    // After the handshake an idle client is fine (a woken VM may not fault for hours); keepalive
    // notices a dead link.
    let _ = stream.set_read_timeout(None);
    let (tx, rx) = channel();
    let reader = match stream.try_clone() {
        Ok(mut r) => std::thread::Builder::new().name(format!("pagesrv-net{id}-rx")).spawn(move || loop {
            let m = wire::read_msg(&mut r);
            let end = m.is_err();
            if tx.send(m).is_err() || end {
                return;
            }
        }),
        Err(e) => Err(e),
    };
    let recording =
        s.cfg.opener.is_none() && lock(&s.push).is_none() && s.cfg.record.is_some() && !s.recorded.load(SeqCst);
    let mut conn = Conn {
        s,
        c: &stream,
        sent: Bitmap::new((source.len() / PAGE as u64) as usize),
        source,
        state,
        key,
        pages: 0,
        pushed: 0,
        requests: 0,
        started: Instant::now(),
        record: Vec::new(),
        recording,
    };
    let why = match reader {
        Ok(_) => conn.serve(&rx, push),
        Err(e) => format!("cannot start the reader thread: {e}"),
    };
    conn.save_record();
    let _ = stream.shutdown(std::net::Shutdown::Both);
    tracing::info!(session = id, ?peer, pages = conn.pages, "ended: {why}");
    NetEvent::Ended { id, peer, why, pages: conn.pages, pushed: conn.pushed, requests: conn.requests }
}

impl Conn<'_> {
    /// Answer requests (first) and push the working set (when idle) until the client goes.
    fn serve(&mut self, rx: &Receiver<Result<Msg, WireError>>, push: Option<Arc<WorkingSet>>) -> String {
        let ranges = push.as_ref().map(|w| w.ranges.as_slice()).unwrap_or_default();
        let mut cursor = (0usize, 0u64); // (range, bytes into it)
        let mut pushing = push.is_some();
        loop {
            if self.s.stop.load(SeqCst) {
                return "the server stopped".into();
            }
            let next = if pushing {
                match rx.try_recv() {
                    Ok(m) => Some(m),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => return "the reader ended".into(),
                }
            } else {
                match rx.recv() {
                    Ok(m) => Some(m),
                    Err(_) => return "the reader ended".into(),
                }
            };
            let r = match next {
                Some(Ok(Msg::Request { id, offset, len })) => self.answer(id, offset, len),
                Some(Ok(Msg::StateReq { id })) => self.state(id),
                Some(Ok(m)) => Err(format!("unexpected {m:?} from the client")),
                Some(Err(WireError::Closed)) => return "the client closed the connection".into(),
                Some(Err(e)) => Err(format!("bad frame from the client: {e}")),
                None => match self.push_next(ranges, &mut cursor) {
                    Ok(true) => Ok(()),
                    Ok(false) => {
                        pushing = false;
                        self.send(&Msg::PushDone)
                    }
                    Err(e) => Err(e),
                },
            };
            if let Err(e) = r {
                let _ = wire::write_msg(&mut &*self.c, &Msg::Error { reason: e.clone() });
                return e;
            }
        }
    }

    fn send(&self, m: &Msg) -> Result<(), String> {
        wire::write_msg(&mut &*self.c, m).map_err(|e| format!("sending to the client: {e}"))
    }

    /// Reads pages `[offset, offset+len)` and frames them with their MACs.
    fn frame(&self, id: u32, offset: u64, len: u32) -> crate::error::Result<Msg> {
        let mut buf = vec![0u8; len as usize];
        self.source.fill(offset, &mut buf)?;
        let n = len as usize / PAGE;
        let (mut kinds, mut macs, mut data) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::new());
        for (i, p) in buf.chunks_exact(PAGE).enumerate() {
            let off = offset + (i * PAGE) as u64;
            if net_auth::is_zero_page(p) {
                kinds.push(KIND_ZERO);
                macs.push(self.key.page(off, KIND_ZERO, &[]));
            } else {
                kinds.push(KIND_DATA);
                macs.push(self.key.page(off, KIND_DATA, p));
                data.extend_from_slice(p);
            }
        }
        Ok(Msg::Pages { id, offset, kinds, macs, data })
    }

    fn answer(&mut self, id: u32, offset: u64, len: u32) -> Result<(), String> {
        if offset.checked_add(u64::from(len)).is_none_or(|e| e > self.source.len()) {
            return Err(format!("request {offset:#x}+{len:#x} is beyond the source ({} bytes)", self.source.len()));
        }
        self.requests += 1;
        let (a, b) = ((offset / PAGE as u64) as usize, ((offset + u64::from(len)) / PAGE as u64) as usize);
        self.note(offset, len, a, b);
        match self.frame(id, offset, len) {
            Ok(m) => {
                self.sent.set_range(a, b);
                self.pages += (b - a) as u64;
                self.send(&m)
            }
            Err(e) => self.send(&Msg::Failed { id, reason: e.to_string() }),
        }
    }

    /// Records the first-touch order of requested pages (the working set of later clients).
    fn note(&mut self, offset: u64, len: u32, a: usize, b: usize) {
        if !self.recording {
            return;
        }
        if self.started.elapsed() > self.s.cfg.record_for {
            self.save_record();
            return;
        }
        if (a..b).any(|p| !self.sent.get(p)) {
            self.record.push((offset, len));
        }
    }

    fn save_record(&mut self) {
        if !self.recording || self.record.is_empty() {
            return;
        }
        self.recording = false;
        let Some(path) = &self.s.cfg.record else { return };
        if self.s.recorded.swap(true, SeqCst) || path.exists() {
            return;
        }
        let ws = WorkingSet { page_size: PAGE as u32, ranges: std::mem::take(&mut self.record) };
        match ws.save(path) {
            Ok(()) => tracing::info!(bytes = ws.bytes(), "working set recorded to {}", path.display()),
            Err(e) => tracing::warn!("cannot save the working set: {e}"),
        }
        // Later clients get it streamed.
        *lock(&self.s.push) = Some(Arc::new(ws));
    }

    fn state(&self, id: u32) -> Result<(), String> {
        match &self.state {
            Some(b) => self.send(&Msg::State { id, mac: self.key.state(b), data: b.to_vec() }),
            None => self.send(&Msg::Failed { id, reason: "this server has no VM state to hand out".into() }),
        }
    }

    /// Pushes the next run of unsent working-set pages; false when the working set is done.
    fn push_next(&mut self, ranges: &[(u64, u32)], cur: &mut (usize, u64)) -> Result<bool, String> {
        let total = self.source.len();
        while let Some(&(off, len)) = ranges.get(cur.0) {
            let end = off.saturating_add(u64::from(len)).min(total) & !(PAGE as u64 - 1);
            let mut p = (off + cur.1) & !(PAGE as u64 - 1);
            // Skip pages already answered.
            while p < end && self.sent.get((p / PAGE as u64) as usize) {
                p += PAGE as u64;
            }
            let start = p;
            while p < end && !self.sent.get((p / PAGE as u64) as usize) && (p - start) < (PUSH_PAGES * PAGE) as u64 {
                p += PAGE as u64;
            }
            if p >= end {
                *cur = (cur.0 + 1, 0);
            } else {
                cur.1 = p - off;
            }
            if p > start {
                let (a, b) = ((start / PAGE as u64) as usize, (p / PAGE as u64) as usize);
                match self.frame(0, start, (p - start) as u32) {
                    Ok(m) => {
                        self.sent.set_range(a, b);
                        self.pushed += (b - a) as u64;
                        self.send(&m)?;
                    }
                    // Not pushed: the client asks for it if it needs it, and gets the error then.
                    Err(e) => tracing::warn!("push {start:#x}: {e}"),
                }
                return Ok(true);
            }
        }
        Ok(false)
    }
}
