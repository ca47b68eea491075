//! virtio-vsock packets: the 44-byte header, and moving packets in and out of descriptor chains
//! in guest memory with every address and length checked.

use virtio_queue::desc::split::Descriptor;

use crate::vstate::memory::GuestMem;

pub const HDR_LEN: usize = 44;
/// Largest payload accepted from the guest in one packet (Linux sends at most 64 KiB).
pub const MAX_PAYLOAD: u32 = 64 * 1024;

pub const TYPE_STREAM: u16 = 1;
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;
/// The host's CID.
pub const HOST_CID: u64 = 2;

/// A packet header (all fields little endian on the wire).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[o..o + 4]);
    u32::from_le_bytes(a)
}

impl Header {
    pub fn parse(b: &[u8; HDR_LEN]) -> Self {
        let mut c = [0u8; 8];
        c.copy_from_slice(&b[0..8]);
        let src_cid = u64::from_le_bytes(c);
        c.copy_from_slice(&b[8..16]);
        let dst_cid = u64::from_le_bytes(c);
        Header {
            src_cid,
            dst_cid,
            src_port: u32_at(b, 16),
            dst_port: u32_at(b, 20),
            len: u32_at(b, 24),
            type_: u16::from_le_bytes([b[28], b[29]]),
            op: u16::from_le_bytes([b[30], b[31]]),
            flags: u32_at(b, 32),
            buf_alloc: u32_at(b, 36),
            fwd_cnt: u32_at(b, 40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Why a packet from the guest was dropped.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("a TX descriptor is write-only")]
    WriteOnly,
    #[error("descriptor at {addr:#x} (+{len}) is not guest RAM")]
    BadAddress { addr: u64, len: u32 },
    #[error("chain shorter than the vsock header")]
    Short,
    #[error("payload of {0} bytes exceeds {MAX_PAYLOAD}")]
    Oversized(u32),
    #[error("payload shorter than the {0} bytes the header says")]
    Truncated(u32),
}

/// Reads a packet (header + payload) out of a TX chain's readable descriptors.
pub fn read_chain(mem: &GuestMem, descs: impl Iterator<Item = Descriptor>) -> Result<(Header, Vec<u8>), PacketError> {
    let mut hdr = [0u8; HDR_LEN];
    let mut have = 0usize;
    let mut header: Option<Header> = None;
    let mut payload = Vec::new();
    for d in descs {
        if d.is_write_only() {
            return Err(PacketError::WriteOnly);
        }
        let (addr, len) = (d.addr().0, d.len());
        let mut off = 0u64;
        let mut left = u64::from(len);
        if header.is_none() {
            let n = (HDR_LEN - have).min(left as usize);
            if !mem.read(addr, &mut hdr[have..have + n]) {
                return Err(PacketError::BadAddress { addr, len });
            }
            have += n;
            off += n as u64;
            left -= n as u64;
            if have == HDR_LEN {
                let h = Header::parse(&hdr);
                if h.len > MAX_PAYLOAD {
                    return Err(PacketError::Oversized(h.len));
                }
                payload.reserve_exact(h.len as usize);
                header = Some(h);
            }
        }
        if let Some(h) = &header {
            let want = (h.len as usize - payload.len()).min(left as usize);
            if want > 0 {
                let start = payload.len();
                payload.resize(start + want, 0);
                let Some(a) = addr.checked_add(off) else {
                    return Err(PacketError::BadAddress { addr, len });
                };
                if !mem.read(a, &mut payload[start..]) {
                    return Err(PacketError::BadAddress { addr, len });
                }
            }
            if payload.len() == h.len as usize {
                break;
            }
        }
    }
    let h = header.ok_or(PacketError::Short)?;
    if payload.len() != h.len as usize {
        return Err(PacketError::Truncated(h.len));
    }
    Ok((h, payload))
}

/// The writable buffers of an RX chain: (guest address, length), checked against guest RAM.
pub fn writable_buffers(
    mem: &GuestMem,
    descs: impl Iterator<Item = Descriptor>,
) -> Result<Vec<(u64, u32)>, PacketError> {
    let mut out = Vec::new();
    for d in descs {
        if !d.is_write_only() {
            continue;
        }
        let (addr, len) = (d.addr().0, d.len());
        if mem.host_range(addr, u64::from(len)).is_none() {
            return Err(PacketError::BadAddress { addr, len });
        }
        out.push((addr, len));
    }
    Ok(out)
}

/// Total bytes the buffers hold.
pub fn capacity(bufs: &[(u64, u32)]) -> usize {
    bufs.iter().map(|&(_, l)| l as usize).sum()
}

/// Scatters `bytes` over `bufs`; returns how many were written.
pub fn scatter(mem: &GuestMem, bufs: &[(u64, u32)], mut bytes: &[u8]) -> usize {
    let mut written = 0;
    for &(addr, len) in bufs {
        if bytes.is_empty() {
            break;
        }
        let n = (len as usize).min(bytes.len());
        if !mem.write(addr, &bytes[..n]) {
            break;
        }
        written += n;
        bytes = &bytes[n..];
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1234,
            dst_port: 52,
            len: 7,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 3,
            buf_alloc: 1 << 18,
            fwd_cnt: 99,
        };
        assert_eq!(Header::parse(&h.to_bytes()), h);
    }
}
