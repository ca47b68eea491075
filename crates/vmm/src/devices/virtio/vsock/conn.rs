//! One vsock stream connection between a guest port and a host Unix socket, with the virtio
//! credit accounting on both sides.

use std::io::{ErrorKind, Read, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use super::packet::{Header, HOST_CID, OP_CREDIT_UPDATE, TYPE_STREAM};

/// Receive buffer we advertise to the guest per connection: the most we ever hold for it.
pub const BUF_ALLOC: u32 = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// The host asked to connect; waiting for the guest's RESPONSE.
    HostRequested(Instant),
    Established,
}

#[derive(Debug)]
pub struct Conn {
    pub stream: UnixStream,
    pub state: ConnState,
    /// Port on the host side (CID 2).
    pub local_port: u32,
    /// Port on the guest side.
    pub peer_port: u32,
    /// Bytes of guest data handed to the host socket.
    pub fwd_cnt: Wrapping<u32>,
    /// The fwd_cnt the guest last heard from us.
    pub fwd_sent: Wrapping<u32>,
    /// Bytes sent to the guest.
    pub tx_cnt: Wrapping<u32>,
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: Wrapping<u32>,
    /// Bytes for the host socket not taken yet: guest data (at most BUF_ALLOC, by the credit we
    /// gave), after `ctl_bytes` bytes of our own (the `OK <port>` line).
    pub to_host: Vec<u8>,
    /// Leading bytes of `to_host` that are not guest data (they never count in fwd_cnt).
    pub ctl_bytes: usize,
    /// Host data read before the connection was set up (bytes after the CONNECT line).
    pub to_guest: Vec<u8>,
    /// The host socket has data to read (poll said so, no read has hit EAGAIN since).
    pub readable: bool,
    /// The host closed its side; a SHUTDOWN went to the guest.
    pub host_eof: bool,
    /// The guest will send no more; shut the host socket's write side once `to_host` drains.
    pub guest_done_sending: bool,
    pub credit_update_queued: bool,
}

impl Conn {
    pub fn new(stream: UnixStream, state: ConnState, local_port: u32, peer_port: u32) -> Self {
        Conn {
            stream,
            state,
            local_port,
            peer_port,
            fwd_cnt: Wrapping(0),
            fwd_sent: Wrapping(0),
            tx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            to_host: Vec::new(),
            ctl_bytes: 0,
            to_guest: Vec::new(),
            readable: false,
            host_eof: false,
            guest_done_sending: false,
            credit_update_queued: false,
        }
    }

    /// Takes the guest's view of its receive buffer from any packet it sent.
    pub fn update_peer_credit(&mut self, h: &Header) {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = Wrapping(h.fwd_cnt);
    }

    /// Bytes we may still send to the guest.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// A header from the host side of this connection to guest `cid`, carrying our credit.
    pub fn header(&mut self, cid: u64, op: u16) -> Header {
        self.fwd_sent = self.fwd_cnt;
        Header {
            src_cid: HOST_CID,
            dst_cid: cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
            ..Default::default()
        }
    }

    /// Guest data for the host: written now as far as the socket takes it, the rest kept.
    /// False if the guest overran the credit we gave it (the connection must be reset).
    pub fn push_to_host(&mut self, data: &[u8]) -> bool {
        if self.to_host.len() - self.ctl_bytes + data.len() > BUF_ALLOC as usize {
            return false;
        }
        self.to_host.extend_from_slice(data);
        self.flush_to_host()
    }

    /// Our own line for the host (`OK <port>\n`), ahead of any guest data; not guest data, so
    /// not counted in fwd_cnt.
    pub fn push_ctl_line(&mut self, line: &[u8]) -> bool {
        self.to_host.splice(self.ctl_bytes..self.ctl_bytes, line.iter().copied());
        self.ctl_bytes += line.len();
        self.flush_to_host()
    }

    /// Writes buffered data to the host socket; false on a hard error.
    pub fn flush_to_host(&mut self) -> bool {
        while !self.to_host.is_empty() {
            match self.stream.write(&self.to_host) {
                Ok(0) => return false,
                Ok(n) => {
                    self.to_host.drain(..n);
                    let ctl = n.min(self.ctl_bytes);
                    self.ctl_bytes -= ctl;
                    self.fwd_cnt += Wrapping((n - ctl) as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        if self.to_host.is_empty() && self.guest_done_sending {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        true
    }

    /// The guest should hear about the space we freed (half the buffer since it last heard;
    /// below that it still has credit, and it can always ask with CREDIT_REQUEST).
    pub fn wants_credit_update(&self) -> bool {
        let unsent = (self.fwd_cnt - self.fwd_sent).0;
        !self.credit_update_queued && unsent >= BUF_ALLOC / 2
    }

    pub fn credit_update(&mut self, cid: u64) -> Header {
        self.header(cid, OP_CREDIT_UPDATE)
    }

    /// Could send data to the guest now.
    pub fn can_send(&self) -> bool {
        self.state == ConnState::Established
            && self.peer_credit() > 0
            && (!self.to_guest.is_empty() || (self.readable && !self.host_eof))
    }

    /// Reads up to `max` bytes of host data for the guest. `Ok(None)`: nothing now;
    /// `Ok(Some(empty))`: the host closed its side.
    pub fn read_for_guest(&mut self, max: usize) -> std::io::Result<Option<Vec<u8>>> {
        let max = max.min(self.peer_credit() as usize);
        if max == 0 {
            return Ok(None);
        }
        if !self.to_guest.is_empty() {
            let n = max.min(self.to_guest.len());
            let out: Vec<u8> = self.to_guest.drain(..n).collect();
            self.tx_cnt += Wrapping(n as u32);
            return Ok(Some(out));
        }
        let mut buf = vec![0u8; max];
        loop {
            match self.stream.read(&mut buf) {
                Ok(n) => {
                    buf.truncate(n);
                    self.tx_cnt += Wrapping(n as u32);
                    if n == 0 {
                        self.host_eof = true;
                        self.readable = false;
                    }
                    return Ok(Some(buf));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.readable = false;
                    return Ok(None);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}
