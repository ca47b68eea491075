//! The client of the TCP page server: [`NetSource`], a [`PageSource`] whose pages come from a
//! `forkvm pagesrv --tcp` on another host, so a local [`crate::PageServer`] serves this VM's
//! faults from there.
//!
//! One connection carries requests from several threads at once (each waits for its own answer,
//! bounded by a timeout); a reader thread checks every page's MAC before anything can use it.
//! Pages the server pushes (its recorded working set) land in a bounded cache and are announced
//! to [`NetSource::next_pushed`], which [`spawn_push_placer`] uses to place them ahead of faults.
//!
//! Failure: a lost, timed-out or misbehaving connection (a bad MAC, a malformed frame) *breaks*
//! the source for good: every later `fill` fails with the reason, so the page server never places
//! a page it did not verify (it stops the VM through its failure hook, then poisons the page), and
//! the `on_broken` hook is called once so the VMM can stop a VM that is not faulting right now.

use std::collections::{HashMap, VecDeque};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::net_auth::{self, Secret, SessionKey};
use crate::net_wire::{self as wire, Msg, WireError, KIND_ZERO, PAGE};
use crate::server::{Monitor, PageServer};
use crate::source::PageSource;

/// Most bytes of pushed pages held before they are placed (more are dropped; faults fetch them).
const CACHE_MAX: usize = 64 << 20;

/// Called once when the connection breaks, with the reason.
pub type BrokenHook = Arc<dyn Fn(&str) + Send + Sync>;

/// How a [`NetSource`] connects.
#[derive(Debug, Clone)]
pub struct NetClientConfig {
    /// Longest wait to connect and for each handshake message.
    pub connect_timeout: Duration,
    /// Longest wait for an answer to one request; then the connection counts as lost.
    pub request_timeout: Duration,
    /// Ask the server to stream its recorded working set.
    pub push: bool,
    /// Protocol versions offered (tests offer others).
    pub versions: (u16, u16),
}

impl Default for NetClientConfig {
    fn default() -> Self {
        NetClientConfig {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            push: true,
            versions: (wire::MIN_VERSION, wire::MAX_VERSION),
        }
    }
}

/// `tcp://HOST:PORT` (or `HOST:PORT`) to `HOST:PORT`.
pub fn parse_url(url: &str) -> Result<String> {
    let hp = url.strip_prefix("tcp://").unwrap_or(url);
    if hp.is_empty() || hp.contains('/') || !hp.contains(':') {
        return Err(Error::InvalidArgument(format!("{url:?} is not tcp://HOST:PORT")));
    }
    Ok(hp.to_string())
}

enum Reply {
    Data(Vec<u8>),
    Failed(String),
}

#[derive(Default)]
struct St {
    next_id: u32,
    pending: HashMap<u32, Option<Reply>>,
    /// Pushed pages not placed yet: page index -> contents (None: zero).
    cache: HashMap<u64, Option<Box<[u8]>>>,
    cache_bytes: usize,
    arrivals: VecDeque<(u64, u32)>,
    push_done: bool,
    broken: Option<String>,
    closing: bool,
    pages_received: u64,
    pages_pushed: u64,
}

struct Inner {
    addr: String,
    stream: TcpStream,
    w: Mutex<()>,
    st: Mutex<St>,
    cv: Condvar,
    key: SessionKey,
    timeout: Duration,
    on_broken: Mutex<Option<BrokenHook>>,
}

/// A page source served by a remote `forkvm pagesrv --tcp`.
pub struct NetSource {
    inner: Arc<Inner>,
    len: u64,
    state_len: u64,
    push_bytes: u64,
    version: u16,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for NetSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetSource").field("addr", &self.inner.addr).field("len", &self.len).finish_non_exhaustive()
    }
}

fn proto(e: impl std::fmt::Display) -> Error {
    Error::Protocol(e.to_string())
}

impl NetSource {
    /// Connects to `addr` (`HOST:PORT`) and authenticates with `secret`.
    pub fn connect(addr: &str, secret: &Secret, cfg: &NetClientConfig) -> Result<Self> {
        let t = cfg.connect_timeout;
        let addrs: Vec<_> = addr
            .to_socket_addrs()
            .map_err(|e| Error::InvalidArgument(format!("page server address {addr}: {e}")))?
            .collect();
        let mut last = None;
        let mut stream = None;
        for a in &addrs {
            match TcpStream::connect_timeout(a, t) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let Some(s) = stream else {
            let why = last.map_or("no address".to_string(), |e| e.to_string());
            return Err(proto(format!("cannot connect to the page server at {addr}: {why}")));
        };
        let _ = s.set_nodelay(true);
        s.set_read_timeout(Some(t)).map_err(crate::error::sys("set read timeout"))?;
        s.set_write_timeout(Some(cfg.request_timeout)).map_err(crate::error::sys("set write timeout"))?;
        let at = |what: &str, e: WireError| proto(format!("page server {addr}: {what}: {e}"));
        let cn = net_auth::nonce()?;
        let flags = if cfg.push { wire::FLAG_PUSH } else { 0 };
        let hello = Msg::Hello { min: cfg.versions.0, max: cfg.versions.1, flags, nonce: cn };
        wire::write_msg(&mut &s, &hello).map_err(|e| at("sending Hello", e))?;
        let (version, sn) = match wire::read_msg(&mut &s).map_err(|e| at("waiting for its challenge", e))? {
            Msg::Challenge { version, nonce, proof } => {
                if version < cfg.versions.0 || version > cfg.versions.1 {
                    return Err(proto(format!("page server {addr} chose protocol version {version}, not offered")));
                }
                if !net_auth::same(&proof, &secret.server_proof(version, &cn, &nonce)) {
                    return Err(proto(format!(
                        "page server {addr} failed to authenticate: it does not know the shared secret"
                    )));
                }
                (version, nonce)
            }
            Msg::Error { reason } => return Err(proto(format!("page server {addr} refused: {reason}"))),
            m => return Err(proto(format!("page server {addr}: expected its challenge, got {m:?}"))),
        };
        let proof = secret.client_proof(version, &cn, &sn);
        wire::write_msg(&mut &s, &Msg::Auth { proof }).map_err(|e| at("sending Auth", e))?;
        let (len, state_len, push_bytes) = match wire::read_msg(&mut &s).map_err(|e| at("waiting for Welcome", e))? {
            Msg::Welcome { len, state_len, push_bytes, .. } => (len, state_len, push_bytes),
            Msg::Error { reason } => return Err(proto(format!("page server {addr} refused: {reason}"))),
            m => return Err(proto(format!("page server {addr}: expected Welcome, got {m:?}"))),
        };
        // Answers are awaited with their own deadline; the reader blocks until data or shutdown.
        s.set_read_timeout(None).map_err(crate::error::sys("clear read timeout"))?;
        let r = s.try_clone().map_err(crate::error::sys("dup socket"))?;
        let inner = Arc::new(Inner {
            addr: addr.to_string(),
            stream: s,
            w: Mutex::new(()),
            st: Mutex::new(St { next_id: 1, push_done: push_bytes == 0, ..Default::default() }),
            cv: Condvar::new(),
            key: secret.session(version, &cn, &sn),
            timeout: cfg.request_timeout,
            on_broken: Mutex::new(None),
        });
        let i2 = inner.clone();
        let reader = std::thread::Builder::new()
            .name("pagesrv-net-client".into())
            .spawn(move || i2.read_loop(r))
            .map_err(crate::error::sys("spawn reader"))?;
        Ok(NetSource { inner, len, state_len, push_bytes, version, reader: Mutex::new(Some(reader)) })
    }

    /// The protocol version agreed.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// Bytes of working set the server streams (0: none).
    pub fn push_bytes(&self) -> u64 {
        self.push_bytes
    }

    /// Size of the server's state blob (0: none).
    pub fn state_len(&self) -> u64 {
        self.state_len
    }

    /// The server's address.
    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    /// Why the connection broke, if it did.
    pub fn broken(&self) -> Option<String> {
        self.inner.lock().broken.clone()
    }

    /// Pages received so far: (answered, pushed).
    pub fn pages_received(&self) -> (u64, u64) {
        let st = self.inner.lock();
        (st.pages_received, st.pages_pushed)
    }

    /// Calls `hook` once when the connection breaks (at once if it already has).
    pub fn on_broken(&self, hook: BrokenHook) {
        let now = self.broken();
        match now {
            Some(why) => hook(&why),
            None => *self.inner.on_broken.lock().unwrap_or_else(|p| p.into_inner()) = Some(hook),
        }
        // A break between the check and the store: call it now (it is called once at most).
        if let Some(why) = self.broken() {
            if let Some(h) = self.inner.on_broken.lock().unwrap_or_else(|p| p.into_inner()).take() {
                h(&why);
            }
        }
    }

    /// Fetches the server's state blob (its MAC checked).
    pub fn fetch_state(&self) -> Result<Vec<u8>> {
        if self.state_len == 0 {
            return Err(proto(format!("page server {} has no VM state to hand out", self.inner.addr)));
        }
        match self.inner.call(|id| Msg::StateReq { id }, "the VM state")? {
            Reply::Data(d) => Ok(d),
            Reply::Failed(why) => Err(proto(format!("page server {}: {why}", self.inner.addr))),
        }
    }

    /// Next announcement of pushed pages: `Some(range)`, or `None` when the push is over (done,
    /// broken, closed) — waits up to `wait`, then `Some((0, 0))`.
    pub fn next_pushed(&self, wait: Duration) -> Option<(u64, u32)> {
        let deadline = Instant::now() + wait;
        let mut st = self.inner.lock();
        loop {
            if let Some(r) = st.arrivals.pop_front() {
                return Some(r);
            }
            if st.push_done || st.broken.is_some() || st.closing {
                return None;
            }
            let now = Instant::now();
            if now >= deadline {
                return Some((0, 0));
            }
            st = self.inner.cv.wait_timeout(st, deadline - now).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Drops pushed pages of `[offset, offset+len)` still cached (placed otherwise already).
    pub fn discard(&self, offset: u64, len: u32) {
        let mut st = self.inner.lock();
        for p in offset / PAGE as u64..(offset + u64::from(len)) / PAGE as u64 {
            if let Some(Some(_)) = st.cache.remove(&p) {
                st.cache_bytes -= PAGE;
            }
        }
        self.inner.cv.notify_all();
    }
}

impl Drop for NetSource {
    fn drop(&mut self) {
        self.inner.lock().closing = true;
        self.inner.cv.notify_all();
        let _ = self.inner.stream.shutdown(std::net::Shutdown::Both);
        if let Some(h) = self.reader.lock().unwrap_or_else(|p| p.into_inner()).take() {
            // The last reference may go on the reader thread itself (its broken-link hook held
            // it): that thread ends right after, on its own.
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, St> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn break_with(&self, why: String) {
        let first = {
            let mut st = self.lock();
            let first = st.broken.is_none() && !st.closing;
            st.broken.get_or_insert(why.clone());
            first
        };
        self.cv.notify_all();
        if first {
            tracing::error!("{why}");
            let _ = self.stream.shutdown(std::net::Shutdown::Both);
            if let Some(h) = self.on_broken.lock().unwrap_or_else(|p| p.into_inner()).take() {
                h(&why);
            }
        }
    }

    /// Sends the request made by `mk(id)` and waits (bounded) for its answer.
    fn call(&self, mk: impl FnOnce(u32) -> Msg, what: &str) -> Result<Reply> {
        let id = {
            let mut st = self.lock();
            if let Some(b) = &st.broken {
                return Err(proto(b.clone()));
            }
            let id = st.next_id;
            st.next_id = st.next_id.checked_add(1).unwrap_or(1);
            st.pending.insert(id, None);
            id
        };
        let sent = {
            let _w = self.w.lock().unwrap_or_else(|p| p.into_inner());
            wire::write_msg(&mut &self.stream, &mk(id))
        };
        if let Err(e) = sent {
            self.break_with(format!("connection to the page server {} lost: sending a request: {e}", self.addr));
        }
        let deadline = Instant::now() + self.timeout;
        let mut st = self.lock();
        loop {
            if let Some(Some(_)) = st.pending.get(&id) {
                if let Some(Some(r)) = st.pending.remove(&id) {
                    return Ok(r);
                }
            }
            if let Some(b) = st.broken.clone() {
                st.pending.remove(&id);
                return Err(proto(b));
            }
            let now = Instant::now();
            if now >= deadline {
                st.pending.remove(&id);
                drop(st);
                let why = format!(
                    "connection to the page server {} lost: no answer for {what} within {:?}",
                    self.addr, self.timeout
                );
                self.break_with(why.clone());
                return Err(proto(why));
            }
            st = self.cv.wait_timeout(st, deadline - now).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
        }
    }

    fn read_loop(&self, mut r: TcpStream) {
        loop {
            let m = match wire::read_msg(&mut r) {
                Ok(m) => m,
                Err(e) => {
                    let why = match e {
                        WireError::Closed => "the server closed the connection".to_string(),
                        e => e.to_string(),
                    };
                    return self.break_with(format!("connection to the page server {} lost: {why}", self.addr));
                }
            };
            if let Err(why) = self.take(m) {
                return self.break_with(format!("page server {}: {why}", self.addr));
            }
        }
    }

    /// Checks one frame from the server and hands it to whoever waits for it.
    fn take(&self, m: Msg) -> Result<(), String> {
        match m {
            Msg::Pages { id, offset, kinds, macs, data } => {
                let pages = self.verify(offset, &kinds, &macs, &data)?;
                let mut st = self.lock();
                let n = pages.len() as u64;
                if id == 0 {
                    if st.cache_bytes > CACHE_MAX {
                        // Placing fell behind: drop them (a fault fetches them if needed).
                        tracing::debug!(offset, "push cache full; pushed pages dropped");
                        return Ok(());
                    }
                    for (i, p) in pages.into_iter().enumerate() {
                        st.cache_bytes += p.as_ref().map_or(0, |_| PAGE);
                        if let Some(Some(_)) = st.cache.insert(offset / PAGE as u64 + i as u64, p) {
                            st.cache_bytes -= PAGE;
                        }
                    }
                    st.arrivals.push_back((offset, (n as usize * PAGE) as u32));
                    st.pages_pushed += n;
                } else {
                    let slot = st.pending.get_mut(&id).ok_or(format!("an answer to request {id}, never asked"))?;
                    let mut buf = vec![0u8; n as usize * PAGE];
                    for (i, p) in pages.iter().enumerate() {
                        if let Some(p) = p {
                            buf[i * PAGE..(i + 1) * PAGE].copy_from_slice(p);
                        }
                    }
                    *slot = Some(Reply::Data(buf));
                    st.pages_received += n;
                }
            }
            Msg::State { id, mac, data } => {
                if !net_auth::same(&mac, &self.key.state(&data)) {
                    return Err("the VM state failed its checksum".into());
                }
                let mut st = self.lock();
                let slot = st.pending.get_mut(&id).ok_or(format!("an answer to request {id}, never asked"))?;
                *slot = Some(Reply::Data(data));
            }
            Msg::Failed { id, reason } => {
                let mut st = self.lock();
                let slot = st.pending.get_mut(&id).ok_or(format!("an answer to request {id}, never asked"))?;
                *slot = Some(Reply::Failed(reason));
            }
            Msg::PushDone => self.lock().push_done = true,
            Msg::Error { reason } => return Err(format!("the server gave up: {reason}")),
            m => return Err(format!("unexpected {m:?}")),
        }
        self.cv.notify_all();
        Ok(())
    }

    /// Checks each page's MAC; returns the pages (None: zero).
    #[allow(clippy::type_complexity)]
    fn verify(
        &self,
        offset: u64,
        kinds: &[u8],
        macs: &[[u8; 32]],
        data: &[u8],
    ) -> Result<Vec<Option<Box<[u8]>>>, String> {
        let mut out = Vec::with_capacity(kinds.len());
        let mut d = data.chunks_exact(PAGE);
        for (i, (&k, mac)) in kinds.iter().zip(macs).enumerate() {
            let off = offset + (i * PAGE) as u64;
            let page = if k == KIND_ZERO { None } else { d.next() };
            if !net_auth::same(mac, &self.key.page(off, k, page.unwrap_or(&[]))) {
                return Err(format!("page at {off:#x} failed its checksum (corrupted or forged); not used"));
            }
            out.push(page.map(Box::from));
        }
        Ok(out)
    }
}

impl PageSource for NetSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn fill(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let blen = buf.len() as u64;
        let err = |reason: String| Error::Source { offset, len: blen, reason };
        if !offset.is_multiple_of(PAGE as u64)
            || !buf.len().is_multiple_of(PAGE)
            || offset.checked_add(blen).is_none_or(|e| e > self.len)
        {
            return Err(err("not whole pages inside the remote source".into()));
        }
        {
            // All pushed already: take them from the cache.
            let mut st = self.inner.lock();
            let first = offset / PAGE as u64;
            let n = buf.len() / PAGE;
            if (0..n as u64).all(|i| st.cache.contains_key(&(first + i))) {
                for (i, dst) in buf.chunks_exact_mut(PAGE).enumerate() {
                    match st.cache.remove(&(first + i as u64)) {
                        Some(Some(p)) => {
                            dst.copy_from_slice(&p);
                            st.cache_bytes -= PAGE;
                        }
                        _ => dst.fill(0),
                    }
                }
                self.inner.cv.notify_all();
                return Ok(());
            }
        }
        for (i, piece) in buf.chunks_mut(wire::MAX_REQUEST as usize).enumerate() {
            let off = offset + i as u64 * u64::from(wire::MAX_REQUEST);
            let len = piece.len() as u32;
            match self.inner.call(|id| Msg::Request { id, offset: off, len }, &format!("pages {off:#x}+{len:#x}")) {
                Ok(Reply::Data(d)) if d.len() == piece.len() => piece.copy_from_slice(&d),
                Ok(Reply::Data(d)) => {
                    let why = format!("answered {} bytes for a request of {len}", d.len());
                    self.inner.break_with(format!("page server {}: {why}", self.inner.addr));
                    return Err(err(why));
                }
                Ok(Reply::Failed(why)) => return Err(err(format!("the page server could not read it: {why}"))),
                Err(e) => return Err(err(e.to_string())),
            }
        }
        Ok(())
    }
}

/// A [`Monitor`] that does not keep its page server (and so its source) alive: for hooks the
/// source itself holds, such as [`NetSource::on_broken`], which would otherwise form a cycle.
#[derive(Debug, Clone)]
pub struct WeakMonitor(std::sync::Weak<crate::server::Shared>);

impl WeakMonitor {
    /// A weak view of `m`.
    pub fn new(m: &Monitor) -> Self {
        WeakMonitor(Arc::downgrade(&m.shared))
    }
    /// The monitor, while its page server still exists.
    pub fn upgrade(&self) -> Option<Monitor> {
        self.0.upgrade().map(|shared| Monitor { shared })
    }
}

/// Places the pages `src` receives pushed into the memory `server` serves, as they arrive (the
/// REAP prefetch of a remote working set). Ends when the push is over or the server stops.
pub fn spawn_push_placer(src: Arc<NetSource>, server: &PageServer) -> Result<JoinHandle<()>> {
    let mon: Monitor = server.monitor();
    std::thread::Builder::new()
        .name("pagesrv-net-push".into())
        .spawn(move || {
            let s = &mon.shared;
            while !s.stop.load(Relaxed) {
                match src.next_pushed(Duration::from_millis(200)) {
                    None => return,
                    Some((_, 0)) => {}
                    Some((off, len)) => {
                        if let Some(e) = crate::prefetch::fetch_ranges(s, &[(off, len)], true) {
                            tracing::warn!("placing pushed pages: {e}");
                        }
                        src.discard(off, len);
                    }
                }
            }
        })
        .map_err(crate::error::sys("spawn push placer"))
}
