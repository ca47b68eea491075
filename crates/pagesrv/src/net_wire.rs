//! Wire format of the cross-host page protocol (`forkvm pagesrv --tcp`): frames, messages and
//! their bounds. Pure encoding and decoding; the keys are in [`crate::net_auth`].
//!
//! Every frame is an 8-byte header — `u8 kind`, `u8 0`, `u16 0` (reserved, must be zero),
//! `u32 payload length` — and the payload; integers are little-endian. A payload longer than
//! [`MAX_PAYLOAD`] is refused before anything is read or allocated for it.
//!
//! ```text
//! C->S  Hello      magic "FKVMNETP", u16 min_version, u16 max_version, u8 flags (1 = push), [32] nonce
//! S->C  Challenge  u16 version, [32] nonce, [32] server proof
//! C->S  Auth       [32] client proof
//! S->C  Welcome    u64 source length, u32 page size, u64 state length (0: none), u64 push bytes
//! C->S  Request    u32 id (> 0), u64 offset, u32 length        (page aligned, <= MAX_REQUEST)
//! C->S  StateReq   u32 id
//! S->C  Pages      u32 id (0 = pushed working set), u64 offset, u32 count,
//!                  count x u8 kind (0 data, 1 zero), count x [32] mac, data pages back to back
//! S->C  State      u32 id, [32] mac, bytes
//! S->C  Failed     u32 id, utf-8 reason       (that request only; the connection goes on)
//! S->C  PushDone   (the working set has been streamed)
//! both  Error      utf-8 reason               (fatal; the sender closes the connection)
//! ```

use std::io::{Read, Write};

/// Protocol magic, first bytes of a `Hello`.
pub const MAGIC: [u8; 8] = *b"FKVMNETP";
/// Lowest protocol version this build speaks.
pub const MIN_VERSION: u16 = 1;
/// Highest protocol version this build speaks.
pub const MAX_VERSION: u16 = 1;
/// Page size of the protocol (pages are always 4 KiB on the wire).
pub const PAGE: usize = 4096;
/// Largest range one `Request` may ask for (one `Pages` answer).
pub const MAX_REQUEST: u32 = 2 << 20;
/// Largest state blob (`State`).
pub const MAX_STATE: usize = 4 << 20;
/// Longest reason string.
pub const MAX_REASON: usize = 1024;
/// Largest frame payload: a state blob, or a full `Pages` answer, plus headers.
pub const MAX_PAYLOAD: usize = MAX_STATE + 64;
/// Frame header length.
pub const HEADER: usize = 8;
const MAX_PAGES: usize = MAX_REQUEST as usize / PAGE;

/// A page's kind in a `Pages` frame.
pub const KIND_DATA: u8 = 0;
/// All zero: no data on the wire.
pub const KIND_ZERO: u8 = 1;

/// `Hello` flag: stream the recorded working set after `Welcome`.
pub const FLAG_PUSH: u8 = 1;

/// One message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    Hello { min: u16, max: u16, flags: u8, nonce: [u8; 32] },
    Challenge { version: u16, nonce: [u8; 32], proof: [u8; 32] },
    Auth { proof: [u8; 32] },
    Welcome { len: u64, page_size: u32, state_len: u64, push_bytes: u64 },
    Request { id: u32, offset: u64, len: u32 },
    StateReq { id: u32 },
    Pages { id: u32, offset: u64, kinds: Vec<u8>, macs: Vec<[u8; 32]>, data: Vec<u8> },
    State { id: u32, mac: [u8; 32], data: Vec<u8> },
    Failed { id: u32, reason: String },
    PushDone,
    Error { reason: String },
}

/// Why a frame could not be read or decoded.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The peer closed the connection between frames.
    #[error("the peer closed the connection")]
    Closed,
    /// The stream ended inside a frame.
    #[error("the stream ended in the middle of a frame ({got} of {want} bytes)")]
    Truncated { got: usize, want: usize },
    /// Nothing arrived within the timeout.
    #[error("no data within the timeout")]
    Timeout,
    /// A frame longer than allowed.
    #[error("frame of {len} bytes refused (at most {max})")]
    TooLarge { len: usize, max: usize },
    /// A frame kind this version does not know.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A frame whose content does not fit its kind.
    #[error("malformed {kind} frame: {why}")]
    Malformed { kind: &'static str, why: String },
    /// A socket error.
    #[error("{0}")]
    Io(std::io::Error),
}

const K_HELLO: u8 = 1;
const K_CHALLENGE: u8 = 2;
const K_AUTH: u8 = 3;
const K_WELCOME: u8 = 4;
const K_REQUEST: u8 = 5;
const K_STATE_REQ: u8 = 6;
const K_PAGES: u8 = 7;
const K_STATE: u8 = 8;
const K_FAILED: u8 = 9;
const K_PUSH_DONE: u8 = 10;
const K_ERROR: u8 = 11;

fn clip(s: &str) -> &str {
    let mut n = s.len().min(MAX_REASON);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    &s[..n]
}

impl Msg {
    fn kind(&self) -> u8 {
        match self {
            Msg::Hello { .. } => K_HELLO,
            Msg::Challenge { .. } => K_CHALLENGE,
            Msg::Auth { .. } => K_AUTH,
            Msg::Welcome { .. } => K_WELCOME,
            Msg::Request { .. } => K_REQUEST,
            Msg::StateReq { .. } => K_STATE_REQ,
            Msg::Pages { .. } => K_PAGES,
            Msg::State { .. } => K_STATE,
            Msg::Failed { .. } => K_FAILED,
            Msg::PushDone => K_PUSH_DONE,
            Msg::Error { .. } => K_ERROR,
        }
    }

    /// The whole frame (header and payload). Reasons longer than [`MAX_REASON`] are cut.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::new();
        match self {
            Msg::Hello { min, max, flags, nonce } => {
                p.extend_from_slice(&MAGIC);
                p.extend_from_slice(&min.to_le_bytes());
                p.extend_from_slice(&max.to_le_bytes());
                p.push(*flags);
                p.extend_from_slice(nonce);
            }
            Msg::Challenge { version, nonce, proof } => {
                p.extend_from_slice(&version.to_le_bytes());
                p.extend_from_slice(nonce);
                p.extend_from_slice(proof);
            }
            Msg::Auth { proof } => p.extend_from_slice(proof),
            Msg::Welcome { len, page_size, state_len, push_bytes } => {
                p.extend_from_slice(&len.to_le_bytes());
                p.extend_from_slice(&page_size.to_le_bytes());
                p.extend_from_slice(&state_len.to_le_bytes());
                p.extend_from_slice(&push_bytes.to_le_bytes());
            }
            Msg::Request { id, offset, len } => {
                p.extend_from_slice(&id.to_le_bytes());
                p.extend_from_slice(&offset.to_le_bytes());
                p.extend_from_slice(&len.to_le_bytes());
            }
            Msg::StateReq { id } => p.extend_from_slice(&id.to_le_bytes()),
            Msg::Pages { id, offset, kinds, macs, data } => {
                p.reserve(16 + kinds.len() * 33 + data.len());
                p.extend_from_slice(&id.to_le_bytes());
                p.extend_from_slice(&offset.to_le_bytes());
                p.extend_from_slice(&(kinds.len() as u32).to_le_bytes());
                p.extend_from_slice(kinds);
                macs.iter().for_each(|m| p.extend_from_slice(m));
                p.extend_from_slice(data);
            }
            Msg::State { id, mac, data } => {
                p.extend_from_slice(&id.to_le_bytes());
                p.extend_from_slice(mac);
                p.extend_from_slice(data);
            }
            Msg::Failed { id, reason } => {
                p.extend_from_slice(&id.to_le_bytes());
                p.extend_from_slice(clip(reason).as_bytes());
            }
            Msg::PushDone => {}
            Msg::Error { reason } => p.extend_from_slice(clip(reason).as_bytes()),
        }
        let mut f = Vec::with_capacity(HEADER + p.len());
        f.extend_from_slice(&[self.kind(), 0, 0, 0]);
        f.extend_from_slice(&(p.len() as u32).to_le_bytes());
        f.extend_from_slice(&p);
        f
    }
}

/// A cursor over a payload.
struct Cur<'a> {
    b: &'a [u8],
    kind: &'static str,
}

impl<'a> Cur<'a> {
    fn bad(&self, why: impl Into<String>) -> WireError {
        WireError::Malformed { kind: self.kind, why: why.into() }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.b.len() < n {
            return Err(self.bad(format!("{} bytes short", n - self.b.len())));
        }
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(a)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.arr()?))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn end(&self) -> Result<(), WireError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(self.bad(format!("{} trailing bytes", self.b.len())))
        }
    }
    fn text(&mut self) -> Result<String, WireError> {
        let rest = self.take(self.b.len())?;
        if rest.len() > MAX_REASON {
            return Err(self.bad(format!("reason of {} bytes", rest.len())));
        }
        String::from_utf8(rest.to_vec()).map_err(|_| self.bad("reason is not utf-8"))
    }
}

fn kind_name(k: u8) -> &'static str {
    match k {
        K_HELLO => "Hello",
        K_CHALLENGE => "Challenge",
        K_AUTH => "Auth",
        K_WELCOME => "Welcome",
        K_REQUEST => "Request",
        K_STATE_REQ => "StateReq",
        K_PAGES => "Pages",
        K_STATE => "State",
        K_FAILED => "Failed",
        K_PUSH_DONE => "PushDone",
        K_ERROR => "Error",
        _ => "unknown",
    }
}

/// Decodes one payload of frame kind `kind`, checking every bound.
pub fn decode(kind: u8, payload: &[u8]) -> Result<Msg, WireError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(WireError::TooLarge { len: payload.len(), max: MAX_PAYLOAD });
    }
    let mut c = Cur { b: payload, kind: kind_name(kind) };
    let m = match kind {
        K_HELLO => {
            if c.take(8)? != MAGIC {
                return Err(c.bad("not a forkvm page protocol peer (bad magic)"));
            }
            let (min, max, flags, nonce) = (c.u16()?, c.u16()?, c.take(1)?[0], c.arr()?);
            if min > max || min == 0 {
                return Err(c.bad(format!("version range {min}..{max}")));
            }
            Msg::Hello { min, max, flags, nonce }
        }
        K_CHALLENGE => Msg::Challenge { version: c.u16()?, nonce: c.arr()?, proof: c.arr()? },
        K_AUTH => Msg::Auth { proof: c.arr()? },
        K_WELCOME => {
            let (len, page_size, state_len, push_bytes) = (c.u64()?, c.u32()?, c.u64()?, c.u64()?);
            if page_size as usize != PAGE {
                return Err(c.bad(format!("page size {page_size}")));
            }
            if len % PAGE as u64 != 0 || state_len > MAX_STATE as u64 || push_bytes > len {
                return Err(c.bad(format!("source of {len} bytes, state {state_len}, push {push_bytes}")));
            }
            Msg::Welcome { len, page_size, state_len, push_bytes }
        }
        K_REQUEST => {
            let (id, offset, len) = (c.u32()?, c.u64()?, c.u32()?);
            if id == 0
                || len == 0
                || len > MAX_REQUEST
                || !(len as usize).is_multiple_of(PAGE)
                || !offset.is_multiple_of(PAGE as u64)
            {
                return Err(c.bad(format!("request {id} for {offset:#x}+{len:#x}")));
            }
            if offset.checked_add(u64::from(len)).is_none() {
                return Err(c.bad(format!("range {offset:#x}+{len:#x} overflows")));
            }
            Msg::Request { id, offset, len }
        }
        K_STATE_REQ => Msg::StateReq { id: c.u32()? },
        K_PAGES => {
            let (id, offset, count) = (c.u32()?, c.u64()?, c.u32()? as usize);
            if count == 0 || count > MAX_PAGES || offset % PAGE as u64 != 0 {
                return Err(c.bad(format!("{count} pages at {offset:#x}")));
            }
            if offset.checked_add((count * PAGE) as u64).is_none() {
                return Err(c.bad(format!("{count} pages at {offset:#x} overflow")));
            }
            let kinds = c.take(count)?.to_vec();
            if kinds.iter().any(|&k| k != KIND_DATA && k != KIND_ZERO) {
                return Err(c.bad("unknown page kind"));
            }
            let macs = (0..count).map(|_| c.arr()).collect::<Result<Vec<[u8; 32]>, _>>()?;
            let ndata = kinds.iter().filter(|&&k| k == KIND_DATA).count();
            if c.b.len() != ndata * PAGE {
                return Err(c.bad(format!("{} data bytes for {ndata} data pages", c.b.len())));
            }
            Msg::Pages { id, offset, kinds, macs, data: c.take(ndata * PAGE)?.to_vec() }
        }
        K_STATE => {
            let (id, mac) = (c.u32()?, c.arr()?);
            if c.b.len() > MAX_STATE {
                return Err(c.bad(format!("state of {} bytes", c.b.len())));
            }
            Msg::State { id, mac, data: c.take(c.b.len())?.to_vec() }
        }
        K_FAILED => Msg::Failed { id: c.u32()?, reason: c.text()? },
        K_PUSH_DONE => Msg::PushDone,
        K_ERROR => Msg::Error { reason: c.text()? },
        k => return Err(WireError::UnknownKind(k)),
    };
    c.end()?;
    Ok(m)
}

/// Decodes one whole frame at the start of `bytes`; returns it and the bytes it used.
pub fn decode_frame(bytes: &[u8]) -> Result<(Msg, usize), WireError> {
    let (kind, len) =
        parse_header(bytes.get(..HEADER).ok_or(WireError::Truncated { got: bytes.len(), want: HEADER })?)?;
    let payload =
        bytes.get(HEADER..HEADER + len).ok_or(WireError::Truncated { got: bytes.len(), want: HEADER + len })?;
    Ok((decode(kind, payload)?, HEADER + len))
}

fn parse_header(h: &[u8]) -> Result<(u8, usize), WireError> {
    if h[1] != 0 || h[2] != 0 || h[3] != 0 {
        return Err(WireError::Malformed { kind: kind_name(h[0]), why: "reserved header bytes are not zero".into() });
    }
    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(WireError::TooLarge { len, max: MAX_PAYLOAD });
    }
    Ok((h[0], len))
}

fn io_err(e: std::io::Error) -> WireError {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => WireError::Timeout,
        _ => WireError::Io(e),
    }
}

/// Reads exactly `buf.len()` bytes; `Ok(n < len)` at EOF.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, WireError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(e)),
        }
    }
    Ok(got)
}

/// Reads one frame (the socket's read timeout bounds each wait).
pub fn read_msg(r: &mut impl Read) -> Result<Msg, WireError> {
    let mut h = [0u8; HEADER];
    match read_full(r, &mut h)? {
        0 => return Err(WireError::Closed),
        HEADER => {}
        got => return Err(WireError::Truncated { got, want: HEADER }),
    }
    let (kind, len) = parse_header(&h)?;
    // Grow with the data that actually arrives, not with what the header claims.
    let mut payload = Vec::with_capacity(len.min(256 << 10));
    let got = r.take(len as u64).read_to_end(&mut payload).map_err(io_err)?;
    if got < len {
        return Err(WireError::Truncated { got: HEADER + got, want: HEADER + len });
    }
    decode(kind, &payload)
}

/// Writes one frame.
pub fn write_msg(w: &mut impl Write, m: &Msg) -> Result<(), WireError> {
    w.write_all(&m.encode()).map_err(io_err)?;
    w.flush().map_err(io_err)
}

#[cfg(test)]
#[path = "net_wire_tests.rs"]
mod tests;
