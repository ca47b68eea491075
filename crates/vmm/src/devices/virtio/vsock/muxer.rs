//! The host side of vsock, with Firecracker's Unix socket convention: a host process connects
//! to the VM's socket and writes `CONNECT <port>\n` (answered `OK <host port>\n` once the guest
//! accepts); a guest connection to host port P goes to the Unix socket `<path>_<P>`.
//! Every queue and buffer here is bounded; a guest that breaks the protocol gets a reset.

use std::collections::{BTreeMap, VecDeque};
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::conn::{Conn, ConnState};
use super::packet::*;

/// Most connections (established or being set up) at once.
pub const MAX_CONNS: usize = 512;
/// Most host connections still writing their CONNECT line.
const MAX_PENDING: usize = 64;
/// Most control packets (responses, resets, credit updates) waiting for guest RX buffers.
pub const MAX_CTRL: usize = 2 * MAX_CONNS;
const CONNECT_LINE_MAX: usize = 32;
/// How long a host connection may take to send CONNECT, and the guest to accept it.
const SETUP_TIMEOUT: Duration = Duration::from_secs(5);
const LOCAL_PORT_BASE: u32 = 1 << 30;

/// A host connection that has not finished its CONNECT line.
#[derive(Debug)]
struct Pending {
    id: u64,
    stream: UnixStream,
    line: Vec<u8>,
    since: Instant,
}

/// What a poll slot belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Token {
    Listener,
    Pending(u64),
    Conn((u32, u32)),
}

/// Connections and pending control packets of one vsock device.
#[derive(Debug)]
pub struct Muxer {
    pub cid: u64,
    listener: Option<(UnixListener, PathBuf)>,
    pending: Vec<Pending>,
    next_pending: u64,
    /// Keyed by (host port, guest port).
    conns: BTreeMap<(u32, u32), Conn>,
    ctrl: VecDeque<Header>,
    next_local_port: u32,
    /// The guest has no RX buffer for us: stop reading host sockets until it adds some.
    pub rx_starved: bool,
    /// A TRANSPORT_RESET event must go to the guest (after a restore or clone).
    pub reset_event_pending: bool,
    /// Packets from the guest dropped as malformed or misaddressed (for tests and logs).
    pub dropped: u64,
}

impl Muxer {
    pub fn new(cid: u64) -> Self {
        Muxer {
            cid,
            listener: None,
            pending: Vec::new(),
            next_pending: 0,
            conns: BTreeMap::new(),
            ctrl: VecDeque::new(),
            next_local_port: LOCAL_PORT_BASE,
            rx_starved: false,
            reset_event_pending: false,
            dropped: 0,
        }
    }

    pub fn set_listener(&mut self, l: UnixListener, path: PathBuf) {
        self.listener = Some((l, path));
    }

    pub fn uds_path(&self) -> Option<&PathBuf> {
        self.listener.as_ref().map(|(_, p)| p)
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Bytes held for connections (guest data not yet taken by host sockets).
    pub fn buffered_bytes(&self) -> usize {
        self.conns.values().map(|c| c.to_host.len() + c.to_guest.len()).sum()
    }

    pub fn ctrl_len(&self) -> usize {
        self.ctrl.len()
    }

    /// Drops every connection (device reset); the listener stays.
    pub fn reset(&mut self) {
        self.conns.clear();
        self.pending.clear();
        self.ctrl.clear();
        self.rx_starved = false;
    }

    /// Drops everything including the listener (a fork child must not keep its parent's fds).
    pub fn close_all(&mut self) {
        self.reset();
        self.listener = None;
    }

    fn push_ctrl(&mut self, h: Header) -> bool {
        if self.ctrl.len() >= MAX_CTRL {
            return false;
        }
        self.ctrl.push_back(h);
        true
    }

    /// A reset for a packet `h` from the guest.
    fn rst_for(&mut self, h: &Header) {
        if h.op == OP_RST {
            return;
        }
        let rst = Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: h.dst_port,
            dst_port: h.src_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Default::default()
        };
        self.push_ctrl(rst);
    }

    fn kill(&mut self, key: (u32, u32)) {
        if let Some(mut c) = self.conns.remove(&key) {
            let rst = c.header(self.cid, OP_RST);
            self.push_ctrl(rst);
        }
    }

    /// Handles a packet the guest sent.
    pub fn handle_tx(&mut self, h: Header, payload: &[u8]) {
        tracing::trace!("vsock: guest -> host {h:?}");
        if h.src_cid != self.cid || h.dst_cid != HOST_CID {
            self.dropped += 1;
            return;
        }
        if h.type_ != TYPE_STREAM {
            self.dropped += 1;
            self.rst_for(&h);
            return;
        }
        let key = (h.dst_port, h.src_port);
        if h.op == OP_REQUEST {
            return self.guest_connect(&h);
        }
        let cid = self.cid;
        let Some(c) = self.conns.get_mut(&key) else {
            self.rst_for(&h);
            return;
        };
        c.update_peer_credit(&h);
        match h.op {
            OP_RESPONSE => match c.state {
                ConnState::HostRequested(_) => {
                    c.state = ConnState::Established;
                    let ok = format!("OK {}\n", c.local_port);
                    if !c.push_ctl_line(ok.as_bytes()) {
                        self.kill(key);
                    }
                }
                ConnState::Established => self.kill(key),
            },
            OP_RW if c.state == ConnState::Established => {
                if !c.push_to_host(payload) {
                    self.kill(key);
                } else if c.wants_credit_update() {
                    c.credit_update_queued = true;
                    let u = c.credit_update(cid);
                    self.push_ctrl(u);
                }
            }
            OP_SHUTDOWN => {
                c.guest_done_sending |= h.flags & SHUTDOWN_SEND != 0;
                let _ = c.flush_to_host();
                if h.flags & (SHUTDOWN_SEND | SHUTDOWN_RCV) == SHUTDOWN_SEND | SHUTDOWN_RCV {
                    self.kill(key);
                }
            }
            OP_RST => {
                self.conns.remove(&key);
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => {
                c.credit_update_queued = true;
                let u = c.credit_update(cid);
                self.push_ctrl(u);
            }
            _ => {
                self.dropped += 1;
                self.kill(key);
            }
        }
    }

    /// The guest connects to host port `h.dst_port`: the Unix socket `<path>_<port>`.
    fn guest_connect(&mut self, h: &Header) {
        let key = (h.dst_port, h.src_port);
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNS || self.ctrl.len() >= MAX_CTRL {
            return self.rst_for(h);
        }
        let Some((_, path)) = &self.listener else { return self.rst_for(h) };
        let target = PathBuf::from(format!("{}_{}", path.display(), h.dst_port));
        let Ok(stream) = UnixStream::connect(&target) else { return self.rst_for(h) };
        if stream.set_nonblocking(true).is_err() {
            return self.rst_for(h);
        }
        let mut c = Conn::new(stream, ConnState::Established, h.dst_port, h.src_port);
        c.update_peer_credit(h);
        let resp = c.header(self.cid, OP_RESPONSE);
        self.conns.insert(key, c);
        self.push_ctrl(resp);
    }

    /// True if a packet for the guest is ready (control, or data with credit).
    pub fn has_rx_work(&self) -> bool {
        !self.ctrl.is_empty() || self.conns.values().any(Conn::can_send)
    }

    /// The next packet for the guest, for an RX buffer of `cap` bytes.
    pub fn next_rx(&mut self, cap: usize) -> Option<(Header, Vec<u8>)> {
        if cap <= HDR_LEN {
            return None;
        }
        while let Some(mut h) = self.ctrl.pop_front() {
            let key = (h.src_port, h.dst_port);
            if let Some(c) = self.conns.get_mut(&key) {
                if h.op == OP_CREDIT_UPDATE {
                    c.credit_update_queued = false;
                }
                let fresh = c.header(self.cid, h.op);
                h.buf_alloc = fresh.buf_alloc;
                h.fwd_cnt = fresh.fwd_cnt;
            } else if h.op != OP_RST && h.op != OP_REQUEST {
                continue; // the connection is gone: only resets still matter
            }
            tracing::trace!("vsock: host -> guest {h:?}");
            return Some((h, Vec::new()));
        }
        let max = (cap - HDR_LEN).min(MAX_PAYLOAD as usize);
        let keys: Vec<(u32, u32)> = self.conns.iter().filter(|(_, c)| c.can_send()).map(|(k, _)| *k).collect();
        for key in keys {
            let Some(c) = self.conns.get_mut(&key) else { continue };
            match c.read_for_guest(max) {
                Ok(None) => continue,
                Ok(Some(data)) if data.is_empty() => {
                    let mut h = c.header(self.cid, OP_SHUTDOWN);
                    h.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
                    return Some((h, data));
                }
                Ok(Some(data)) => {
                    let mut h = c.header(self.cid, OP_RW);
                    h.len = data.len() as u32;
                    tracing::trace!("vsock: host -> guest {h:?}");
                    return Some((h, data));
                }
                Err(_) => {
                    self.kill(key);
                    return self.next_rx(cap);
                }
            }
        }
        None
    }

    /// The fds to poll and for what.
    pub fn poll_set(&self) -> Vec<(RawFd, i16, Token)> {
        let mut v = Vec::new();
        if let Some((l, _)) = &self.listener {
            if self.pending.len() < MAX_PENDING {
                v.push((l.as_raw_fd(), libc::POLLIN, Token::Listener));
            }
        }
        for p in &self.pending {
            v.push((p.stream.as_raw_fd(), libc::POLLIN, Token::Pending(p.id)));
        }
        for (k, c) in &self.conns {
            let mut ev = 0;
            let want_read = c.state == ConnState::Established && !c.host_eof && !c.readable && c.peer_credit() > 0;
            if want_read && !self.rx_starved {
                ev |= libc::POLLIN;
            }
            if !c.to_host.is_empty() {
                ev |= libc::POLLOUT;
            }
            if ev != 0 {
                v.push((c.stream.as_raw_fd(), ev, Token::Conn(*k)));
            }
        }
        v
    }

    /// Handles poll results for one token.
    pub fn on_ready(&mut self, t: Token, revents: i16) {
        match t {
            Token::Listener => self.accept(),
            Token::Pending(id) => self.read_connect_line(id),
            Token::Conn(key) => {
                let cid = self.cid;
                let Some(c) = self.conns.get_mut(&key) else { return };
                if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                    c.readable = true;
                }
                if revents & libc::POLLOUT != 0 {
                    if !c.flush_to_host() {
                        return self.kill(key);
                    }
                    if c.wants_credit_update() {
                        c.credit_update_queued = true;
                        let u = c.credit_update(cid);
                        self.push_ctrl(u);
                    }
                }
            }
        }
    }

    fn accept(&mut self) {
        let Some((l, _)) = &self.listener else { return };
        while self.pending.len() < MAX_PENDING {
            match l.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    self.next_pending += 1;
                    let id = self.next_pending;
                    self.pending.push(Pending { id, stream, line: Vec::new(), since: Instant::now() });
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }

    fn read_connect_line(&mut self, id: u64) {
        let Some(i) = self.pending.iter().position(|p| p.id == id) else { return };
        let p = &mut self.pending[i];
        let mut buf = [0u8; CONNECT_LINE_MAX];
        let room = CONNECT_LINE_MAX - p.line.len();
        match p.stream.read(&mut buf[..room]) {
            Ok(0) => {
                self.pending.swap_remove(i);
                return;
            }
            Ok(n) => p.line.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => return,
            Err(_) => {
                self.pending.swap_remove(i);
                return;
            }
        }
        let Some(nl) = p.line.iter().position(|&b| b == b'\n') else {
            if p.line.len() >= CONNECT_LINE_MAX {
                self.pending.swap_remove(i);
            }
            return;
        };
        let p = self.pending.swap_remove(i);
        let port = std::str::from_utf8(&p.line[..nl])
            .ok()
            .and_then(|l| l.trim_end_matches('\r').strip_prefix("CONNECT "))
            .and_then(|n| n.trim().parse::<u32>().ok());
        let Some(port) = port else { return };
        if self.conns.len() >= MAX_CONNS || self.ctrl.len() >= MAX_CTRL {
            return;
        }
        let local = self.alloc_local_port(port);
        let mut c = Conn::new(p.stream, ConnState::HostRequested(Instant::now()), local, port);
        c.to_guest = p.line[nl + 1..].to_vec();
        let req = c.header(self.cid, OP_REQUEST);
        self.conns.insert((local, port), c);
        self.push_ctrl(req);
    }

    fn alloc_local_port(&mut self, peer: u32) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = self.next_local_port.checked_add(1).unwrap_or(LOCAL_PORT_BASE);
            if !self.conns.contains_key(&(p, peer)) {
                return p;
            }
        }
    }

    /// Drops setups that took too long.
    pub fn expire(&mut self, now: Instant) {
        self.pending.retain(|p| now.duration_since(p.since) < SETUP_TIMEOUT);
        let stale: Vec<(u32, u32)> = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.state, ConnState::HostRequested(t) if now.duration_since(t) >= SETUP_TIMEOUT))
            .map(|(k, _)| *k)
            .collect();
        for k in stale {
            self.kill(k);
        }
    }
}
