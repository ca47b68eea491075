//! Versioned, checksummed file envelope used for the index, manifests and
//! (by `pagesrv`) working-set files.
//!
//! Layout (all integers little-endian):
//!
//! | offset | size | field                                   |
//! |--------|------|-----------------------------------------|
//! | 0      | 8    | magic (identifies the file kind)        |
//! | 8      | 4    | format version                          |
//! | 12     | 8    | payload length in bytes                 |
//! | 20     | 32   | blake3 hash of the payload              |
//! | 52     | n    | payload                                 |
//!
//! The file must be exactly `52 + n` bytes long. Envelopes are written to a
//! temporary file, fsynced and renamed into place, so readers see either the
//! old or the new version.

use std::fs;
use std::path::Path;

use crate::error::{io_err, Error, Result};

/// Size of the envelope header in bytes.
pub const HEADER_LEN: usize = 52;

/// Wrap `payload` into an envelope.
pub fn seal(magic: &[u8; 8], version: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(magic);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(blake3::hash(payload).as_bytes());
    out.extend_from_slice(payload);
    out
}

/// Check an envelope and return `(version, payload)`.
///
/// `what` and `path` only serve error messages. `max_version` is the newest
/// format version the caller understands.
pub fn open<'a>(
    what: &'static str,
    path: &Path,
    magic: &[u8; 8],
    max_version: u32,
    bytes: &'a [u8],
) -> Result<(u32, &'a [u8])> {
    let bad = |reason: String| Error::BadEnvelope { what, path: path.to_path_buf(), reason };
    if bytes.len() < HEADER_LEN {
        return Err(bad(format!("file is truncated: {} bytes, header alone needs {HEADER_LEN}", bytes.len())));
    }
    let (header, payload) = bytes.split_at(HEADER_LEN);
    if &header[0..8] != magic {
        return Err(bad(format!(
            "bad magic {:02x?}, expected {:02x?} ({})",
            &header[0..8],
            magic,
            String::from_utf8_lossy(magic)
        )));
    }
    let mut r = Reader::new(&header[8..]);
    let version = r.u32().map_err(|e| bad(e.to_string()))?;
    let len = r.u64().map_err(|e| bad(e.to_string()))?;
    let sum = r.bytes(32).map_err(|e| bad(e.to_string()))?;
    if version == 0 || version > max_version {
        return Err(bad(format!("unsupported format version {version} (this build reads 1..={max_version})")));
    }
    if (payload.len() as u64) < len {
        return Err(bad(format!("file is truncated: payload has {} of {len} bytes", payload.len())));
    }
    if (payload.len() as u64) > len {
        return Err(bad(format!("{} trailing bytes after the {len}-byte payload", payload.len() as u64 - len)));
    }
    if blake3::hash(payload).as_bytes() != sum {
        return Err(bad("checksum mismatch: payload is corrupted".into()));
    }
    Ok((version, payload))
}

/// Read a whole envelope file from disk and check it.
pub fn read_file(what: &'static str, path: &Path, magic: &[u8; 8], max_version: u32) -> Result<(u32, Vec<u8>)> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    let (v, payload) = open(what, path, magic, max_version, &bytes)?;
    Ok((v, payload.to_vec()))
}

/// Atomically write an envelope file (temp file + fsync + rename).
pub fn write_file(path: &Path, magic: &[u8; 8], version: u32, payload: &[u8]) -> Result<()> {
    let data = seal(magic, version, payload);
    crate::private::write_atomic(path, &data).map_err(io_err(path))?;
    Ok(())
}

/// Error of [`Reader`]: the payload ended early.
#[derive(Debug, thiserror::Error)]
#[error("payload ends early: wanted {wanted} bytes at offset {at}, {left} left")]
pub struct ShortPayload {
    wanted: usize,
    at: usize,
    left: usize,
}

/// Little-endian cursor over a payload that never panics.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Start reading at the beginning of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Take `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], ShortPayload> {
        let left = self.buf.len() - self.pos;
        if n > left {
            return Err(ShortPayload { wanted: n, at: self.pos, left });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ShortPayload> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    /// Read a `u8`.
    pub fn u8(&mut self) -> Result<u8, ShortPayload> {
        Ok(self.array::<1>()?[0])
    }
    /// Read a little-endian `u16`.
    pub fn u16(&mut self) -> Result<u16, ShortPayload> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    /// Read a little-endian `u32`.
    pub fn u32(&mut self) -> Result<u32, ShortPayload> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    /// Read a little-endian `u64`.
    pub fn u64(&mut self) -> Result<u64, ShortPayload> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    /// Read 32 raw bytes.
    pub fn hash(&mut self) -> Result<[u8; 32], ShortPayload> {
        self.array()
    }
    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_rejects() {
        let p = Path::new("x");
        let sealed = seal(b"TESTMAGC", 1, b"hello");
        let (v, pl) = open("t", p, b"TESTMAGC", 1, &sealed).unwrap();
        assert_eq!((v, pl), (1, &b"hello"[..]));
        assert!(open("t", p, b"OTHERMAG", 1, &sealed).is_err());
        assert!(open("t", p, b"TESTMAGC", 1, &sealed[..sealed.len() - 1]).is_err());
        assert!(open("t", p, b"TESTMAGC", 1, &sealed[..10]).is_err());
        let mut bad = sealed.clone();
        *bad.last_mut().unwrap() ^= 1;
        let e = open("t", p, b"TESTMAGC", 1, &bad).unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
        let v2 = seal(b"TESTMAGC", 2, b"hello");
        assert!(open("t", p, b"TESTMAGC", 1, &v2).is_err());
    }
}
