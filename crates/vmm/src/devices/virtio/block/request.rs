//! virtio-blk requests: a 16-byte header (type, sector), data buffers, a status byte, read out of
//! a descriptor chain with every address, length and direction checked, and carried out on the
//! disk. Bad requests get VIRTIO_BLK_S_IOERR (or nothing, when not even the status byte is usable).

use virtio_queue::desc::split::Descriptor;

use super::disk::CowDisk;
use super::layer::SECTOR;
use crate::vstate::memory::GuestMem;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
/// Length of the request header.
pub const HDR: u32 = 16;
/// Bytes per bounce buffer between guest memory and the disk.
const CHUNK: usize = 256 * 1024;
/// Length of the id GET_ID returns.
pub const ID_LEN: usize = 20;

/// Counters of what the device did (tests and stats).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockStats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Requests answered with IOERR or UNSUPP.
    pub errors: u64,
    /// Chains without a usable status byte (returned with length 0).
    pub malformed: u64,
}

struct Seg {
    addr: u64,
    len: u32,
    write: bool,
}

/// Carries out one request chain; returns the used length (0 if the chain had no status byte).
pub fn handle(
    disk: &mut CowDisk,
    mem: &GuestMem,
    descs: impl Iterator<Item = Descriptor>,
    id: &[u8; ID_LEN],
    st: &mut BlockStats,
) -> u32 {
    let segs: Vec<Seg> = descs.map(|d| Seg { addr: d.addr().0, len: d.len(), write: d.is_write_only() }).collect();
    let Some((status, rest)) = segs.split_last() else {
        st.malformed += 1;
        return 0;
    };
    if !status.write || status.len < 1 || mem.host_range(status.addr, 1).is_none() || rest.is_empty() {
        st.malformed += 1;
        return 0;
    }
    let (code, written) = match execute(disk, mem, rest, id, st) {
        Ok(w) => (S_OK, w),
        Err((code, e)) => {
            tracing::debug!("virtio-blk: request failed: {e}");
            st.errors += 1;
            (code, 0)
        }
    };
    mem.write(status.addr, &[code]);
    written.saturating_add(1)
}

type ReqError = (u8, String);

fn ioerr(e: impl std::fmt::Display) -> ReqError {
    (S_IOERR, e.to_string())
}

fn execute(
    disk: &mut CowDisk,
    mem: &GuestMem,
    segs: &[Seg],
    id: &[u8; ID_LEN],
    st: &mut BlockStats,
) -> Result<u32, ReqError> {
    let (hdr, data) = segs.split_first().ok_or_else(|| ioerr("no header"))?;
    if hdr.write || hdr.len < HDR {
        return Err(ioerr("the header descriptor is write-only or short"));
    }
    let mut h = [0u8; HDR as usize];
    if !mem.read(hdr.addr, &mut h) {
        return Err(ioerr(format!("header at {:#x} is not guest RAM", hdr.addr)));
    }
    let kind = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    let sector = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
    for s in data {
        if mem.host_range(s.addr, u64::from(s.len)).is_none() {
            return Err(ioerr(format!("buffer at {:#x} (+{}) is not guest RAM", s.addr, s.len)));
        }
    }
    match kind {
        T_IN | T_OUT => {
            let write = kind == T_OUT;
            if data.iter().any(|s| s.write == write) {
                return Err(ioerr("a data buffer has the wrong direction"));
            }
            let total: u64 = data.iter().map(|s| u64::from(s.len)).sum();
            let start = sector.checked_mul(SECTOR).ok_or_else(|| ioerr("sector out of range"))?;
            if !total.is_multiple_of(SECTOR) || start.checked_add(total).is_none_or(|e| e > disk.size()) {
                return Err(ioerr(format!("{total} bytes at sector {sector} do not fit the disk")));
            }
            let mut pos = start;
            let mut buf = vec![0u8; CHUNK.min(total as usize)];
            for s in data {
                let mut off = 0u64;
                while off < u64::from(s.len) {
                    let n = ((u64::from(s.len) - off) as usize).min(CHUNK);
                    let b = &mut buf[..n];
                    if write {
                        mem.read(s.addr + off, b);
                        disk.write_at(b, pos).map_err(ioerr)?;
                    } else {
                        disk.read_at(b, pos).map_err(ioerr)?;
                        mem.write(s.addr + off, b);
                    }
                    off += n as u64;
                    pos += n as u64;
                }
            }
            if write {
                st.writes += 1;
                st.bytes_written += total;
                Ok(0)
            } else {
                st.reads += 1;
                st.bytes_read += total;
                Ok(total as u32)
            }
        }
        T_FLUSH => {
            disk.flush().map_err(ioerr)?;
            st.flushes += 1;
            Ok(0)
        }
        T_GET_ID => {
            let s = data.first().filter(|s| s.write).ok_or_else(|| ioerr("GET_ID without a writable buffer"))?;
            let n = (s.len as usize).min(ID_LEN);
            mem.write(s.addr, &id[..n]);
            Ok(n as u32)
        }
        other => Err((S_UNSUPP, format!("request type {other} is not supported"))),
    }
}
