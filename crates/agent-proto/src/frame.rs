//! Framing: length-prefixed JSON header plus raw data, with hard size bounds.

use std::io::{self, Read, Write};

use crate::msg::Msg;

/// Largest JSON header accepted (argv + env + cwd of an exec fit comfortably).
pub const MAX_HEADER: usize = 64 << 10;
/// Largest data payload of one frame; bigger transfers are chunked.
pub const MAX_DATA: usize = 64 << 10;
/// Largest frame after the length field.
pub const MAX_FRAME: usize = 4 + MAX_HEADER + MAX_DATA;

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub msg: Msg,
    pub data: Vec<u8>,
}

impl Frame {
    pub fn new(msg: Msg) -> Self {
        Frame { msg, data: Vec::new() }
    }

    pub fn with_data(msg: Msg, data: Vec<u8>) -> Self {
        Frame { msg, data }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the connection cleanly between frames.
    #[error("connection closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("frame of {0} bytes is over the {MAX_FRAME}-byte limit")]
    TooBig(usize),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

impl FrameError {
    /// True when the peer went away (cleanly or mid-frame) rather than sending junk.
    pub fn is_disconnect(&self) -> bool {
        match self {
            FrameError::Closed => true,
            FrameError::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
            ),
            _ => false,
        }
    }

    /// True for a read timeout (the peer is silent).
    pub fn is_timeout(&self) -> bool {
        matches!(self, FrameError::Io(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
    }
}

/// Encodes a frame into bytes (header JSON + data), checking the bounds.
pub fn encode(msg: &Msg, data: &[u8]) -> Result<Vec<u8>, FrameError> {
    let header = serde_json::to_vec(msg).map_err(|e| FrameError::Malformed(format!("cannot encode: {e}")))?;
    if header.len() > MAX_HEADER {
        return Err(FrameError::Malformed(format!("header of {} bytes is over {MAX_HEADER}", header.len())));
    }
    if data.len() > MAX_DATA {
        return Err(FrameError::Malformed(format!("data of {} bytes is over {MAX_DATA}", data.len())));
    }
    let len = 4 + header.len() + data.len();
    let mut out = Vec::with_capacity(4 + len);
    // Bounded above by MAX_FRAME, far below u32::MAX.
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(data);
    Ok(out)
}

/// Writes one frame in a single `write_all` (so frames from threads sharing a locked writer
/// never interleave).
pub fn write_frame(w: &mut impl Write, msg: &Msg, data: &[u8]) -> Result<(), FrameError> {
    let bytes = encode(msg, data)?;
    w.write_all(&bytes)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame. A clean close before the first byte is [`FrameError::Closed`]; a close
/// inside a frame is an `UnexpectedEof` I/O error.
pub fn read_frame(r: &mut impl Read) -> Result<Frame, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Err(FrameError::Closed),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooBig(len));
    }
    if len < 4 {
        return Err(FrameError::Malformed(format!("frame of {len} bytes has no header length")));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    decode_body(body)
}

/// Decodes a frame body (everything after the length field).
pub fn decode_body(mut body: Vec<u8>) -> Result<Frame, FrameError> {
    let Some((hlen, rest)) = body.split_first_chunk::<4>() else {
        return Err(FrameError::Malformed("frame too short".into()));
    };
    let hlen = u32::from_le_bytes(*hlen) as usize;
    if hlen > MAX_HEADER || hlen > rest.len() {
        return Err(FrameError::Malformed(format!("header length {hlen} does not fit the frame of {}", body.len())));
    }
    let msg: Msg = serde_json::from_slice(&rest[..hlen]).map_err(|e| FrameError::Malformed(format!("header: {e}")))?;
    let data = body.split_off(4 + hlen);
    if data.len() > MAX_DATA {
        return Err(FrameError::Malformed(format!("data of {} bytes is over {MAX_DATA}", data.len())));
    }
    if !data.is_empty() && !msg.carries_data() {
        return Err(FrameError::Malformed(format!("a {} message carries no data", msg.name())));
    }
    Ok(Frame { msg, data })
}
