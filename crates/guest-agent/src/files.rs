//! File read / write requests, chunked and bounded.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;

use agent_proto::{FrameError, Msg, ReadFileRequest, WriteFileRequest, MAX_DATA};

use crate::serve::{send, Out};

/// Most bytes one read_file request returns.
pub const MAX_READ: u64 = 256 << 20;

fn error(out: &Out, what: &str, path: &str, e: std::io::Error) -> Result<(), FrameError> {
    send(out, &Msg::Error { message: format!("{what} {path}: {e}") }, b"")
}

pub fn read(req: &ReadFileRequest, out: &Out) -> Result<(), FrameError> {
    let mut f = match std::fs::File::open(&req.path) {
        Ok(f) => f,
        Err(e) => return error(out, "cannot open", &req.path, e),
    };
    if req.offset > 0 {
        if let Err(e) = f.seek(SeekFrom::Start(req.offset)) {
            return error(out, "cannot seek in", &req.path, e);
        }
    }
    let mut left = req.max_len.min(MAX_READ);
    let mut buf = vec![0u8; MAX_DATA];
    loop {
        let want = (left as usize).min(MAX_DATA);
        let n = if want == 0 {
            0
        } else {
            match f.read(&mut buf[..want]) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return error(out, "cannot read", &req.path, e),
            }
        };
        left -= n as u64;
        let eof = n == 0 || left == 0;
        send(out, &Msg::FileData { eof }, &buf[..n])?;
        if eof {
            return Ok(());
        }
    }
}

pub fn write(req: &WriteFileRequest, data: &[u8], out: &Out) -> Result<(), FrameError> {
    let mut o = OpenOptions::new();
    o.write(true).create(true).mode(req.mode & 0o7777);
    if req.append {
        o.append(true);
    } else {
        o.truncate(true);
    }
    let mut f = match o.open(&req.path) {
        Ok(f) => f,
        Err(e) => return error(out, "cannot open", &req.path, e),
    };
    if let Err(e) = f.write_all(data) {
        return error(out, "cannot write", &req.path, e);
    }
    send(out, &Msg::Written { bytes: data.len() as u64 }, b"")
}
