//! A fake virtio-vsock guest driver: it lays split virtqueues in guest memory, writes
//! descriptors and notifies the device through its virtio-mmio registers, as Linux would.
//! Waits are on the device's interrupt eventfd, never sleeps.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm::devices::mmio::MmioDevice;
use vmm::devices::virtio::vsock::packet::{Header, HDR_LEN, HOST_CID, TYPE_STREAM};
use vmm::devices::virtio::vsock::Vsock;
use vmm::vstate::memory::{Backing, GuestMem};
use vmm_sys_util::eventfd::EventFd;

pub const QSIZE: u16 = 64;
pub const CID: u64 = 3;
pub const RXQ: usize = 0;
pub const TXQ: usize = 1;
pub const EVQ: usize = 2;
const BUF_BASE: u64 = 0x20_0000;
pub const RX_BUF: u32 = 4096 + HDR_LEN as u32;
pub const WAIT: Duration = Duration::from_secs(10);

pub struct Driver {
    pub dev: Arc<Vsock>,
    pub mem: Arc<GuestMem>,
    pub irq: EventFd,
    /// Per queue: next free descriptor, our avail idx, the used idx we have seen.
    next_desc: [u16; 3],
    avail_idx: [u16; 3],
    pub used_seen: [u16; 3],
    next_buf: u64,
}

pub fn qbase(q: usize) -> u64 {
    0x1_0000 * (q as u64 + 1)
}

impl Driver {
    /// A device with a driver that has set it up (DRIVER_OK).
    pub fn new() -> Self {
        let mem = Arc::new(GuestMem::new(16 << 20, Backing::Anon, false).unwrap());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = Arc::new(Vsock::new(CID, mem.clone(), irq.try_clone().unwrap()).unwrap());
        let mut d = Self::attach(dev, mem, irq);
        d.init();
        d
    }

    pub fn attach(dev: Arc<Vsock>, mem: Arc<GuestMem>, irq: EventFd) -> Self {
        Driver { dev, mem, irq, next_desc: [0; 3], avail_idx: [0; 3], used_seen: [0; 3], next_buf: BUF_BASE }
    }

    pub fn reg(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn set(&self, off: u64, v: u32) {
        self.dev.write(off, &v.to_le_bytes());
    }

    pub fn init(&mut self) {
        assert_eq!(self.reg(0), 0x7472_6976);
        assert_eq!(self.reg(4), 2);
        assert_eq!(self.reg(8), 19);
        self.set(0x70, 1 | 2);
        self.set(0x14, 1);
        assert_ne!(self.reg(0x10) & 1, 0, "VIRTIO_F_VERSION_1 offered");
        self.set(0x24, 1);
        self.set(0x20, 1);
        self.set(0x70, 1 | 2 | 8);
        assert_ne!(self.reg(0x70) & 8, 0, "FEATURES_OK accepted");
        for q in 0..3 {
            let base = qbase(q);
            self.set(0x30, q as u32);
            assert_eq!(self.reg(0x34), 256);
            self.set(0x38, u32::from(QSIZE));
            self.set(0x80, base as u32);
            self.set(0x84, 0);
            self.set(0x90, (base + 0x1000) as u32);
            self.set(0x94, 0);
            self.set(0xa0, (base + 0x2000) as u32);
            self.set(0xa4, 0);
            self.set(0x44, 1);
        }
        self.set(0x70, 1 | 2 | 8 | 4);
        assert_eq!(self.reg(0x70) & 0x80, 0, "device did not fail");
        let mut cid = [0u8; 8];
        self.dev.read(0x100, &mut cid);
        assert_eq!(u64::from_le_bytes(cid), CID);
    }

    pub fn alloc(&mut self, len: u64) -> u64 {
        let a = self.next_buf;
        self.next_buf += (len + 0xfff) & !0xfff;
        if self.next_buf > 15 << 20 {
            self.next_buf = BUF_BASE;
        }
        a
    }

    /// Writes descriptor `i` of queue `q`.
    pub fn desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        assert!(self.mem.write(qbase(q) + 16 * u64::from(i), &d));
    }

    /// Puts head `head` in queue `q`'s avail ring (not yet notified).
    pub fn publish(&mut self, q: usize, head: u16) {
        let avail = qbase(q) + 0x1000;
        let slot = self.avail_idx[q] % QSIZE;
        assert!(self.mem.write(avail + 4 + 2 * u64::from(slot), &head.to_le_bytes()));
        self.avail_idx[q] = self.avail_idx[q].wrapping_add(1);
        assert!(self.mem.write(avail + 2, &self.avail_idx[q].to_le_bytes()));
    }

    pub fn notify(&self, q: usize) {
        self.set(0x50, q as u32);
    }

    fn take_desc(&mut self, q: usize, n: u16) -> u16 {
        let i = self.next_desc[q];
        self.next_desc[q] = (i + n) % QSIZE;
        i
    }

    /// Sends a packet on TX as one readable descriptor.
    pub fn send(&mut self, h: &Header, payload: &[u8]) {
        let mut bytes = h.to_bytes().to_vec();
        bytes.extend_from_slice(payload);
        let addr = self.alloc(bytes.len() as u64);
        assert!(self.mem.write(addr, &bytes));
        let i = self.take_desc(TXQ, 1);
        self.desc(TXQ, i, addr, bytes.len() as u32, 0, 0);
        self.publish(TXQ, i);
        self.notify(TXQ);
    }

    /// Offers `n` RX buffers (one write-only descriptor each).
    pub fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let addr = self.alloc(u64::from(RX_BUF));
            let i = self.take_desc(RXQ, 1);
            self.desc(RXQ, i, addr, RX_BUF, 2, 0);
            self.publish(RXQ, i);
        }
        self.notify(RXQ);
    }

    /// Offers one event buffer.
    pub fn post_event(&mut self) {
        let addr = self.alloc(8);
        let i = self.take_desc(EVQ, 1);
        self.desc(EVQ, i, addr, 8, 2, 0);
        self.publish(EVQ, i);
        self.notify(EVQ);
    }

    pub fn used_idx(&self, q: usize) -> u16 {
        let mut b = [0u8; 2];
        assert!(self.mem.read(qbase(q) + 0x2000 + 2, &mut b));
        u16::from_le_bytes(b)
    }

    /// Waits (on the interrupt eventfd) until `cond` holds.
    pub fn wait_until(&self, what: &str, mut cond: impl FnMut(&Self) -> bool) {
        let t0 = Instant::now();
        while !cond(self) {
            let left = WAIT.checked_sub(t0.elapsed()).unwrap_or_else(|| panic!("timed out waiting for {what}"));
            let mut p = libc::pollfd { fd: self.irq.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut p, 1, left.as_millis().min(100) as i32) };
            let _ = self.irq.read();
        }
    }

    /// The next RX packet that is not a credit update: (header, payload), waiting for it.
    /// Buffers the device returned unused (length 0) are skipped.
    pub fn recv(&mut self) -> (Header, Vec<u8>) {
        loop {
            if let Some((h, p)) = self.recv_raw() {
                if h.op != vmm::devices::virtio::vsock::packet::OP_CREDIT_UPDATE {
                    return (h, p);
                }
            }
        }
    }

    /// Like [`Driver::recv`] but skips resets too (left over from earlier bad packets).
    pub fn recv_skip_rst(&mut self) -> (Header, Vec<u8>) {
        loop {
            let (h, p) = self.recv();
            if h.op != vmm::devices::virtio::vsock::packet::OP_RST {
                return (h, p);
            }
        }
    }

    /// The next RX packet with op `op` (others are skipped).
    pub fn recv_raw_op(&mut self, op: u16) -> (Header, Vec<u8>) {
        loop {
            if let Some((h, p)) = self.recv_raw() {
                if h.op == op {
                    return (h, p);
                }
            }
        }
    }

    fn recv_raw(&mut self) -> Option<(Header, Vec<u8>)> {
        let seen = self.used_seen[RXQ];
        self.wait_until("an RX packet", |d| d.used_idx(RXQ) != seen);
        let used = qbase(RXQ) + 0x2000 + 4 + 8 * u64::from(seen % QSIZE);
        let mut e = [0u8; 8];
        assert!(self.mem.read(used, &mut e));
        let id = u32::from_le_bytes(e[0..4].try_into().unwrap()) as u16;
        let len = u32::from_le_bytes(e[4..8].try_into().unwrap()) as usize;
        self.used_seen[RXQ] = seen.wrapping_add(1);
        let mut d = [0u8; 16];
        assert!(self.mem.read(qbase(RXQ) + 16 * u64::from(id), &mut d));
        let addr = u64::from_le_bytes(d[0..8].try_into().unwrap());
        if len == 0 {
            return None;
        }
        assert!(len >= HDR_LEN, "used length {len}");
        let mut buf = vec![0u8; len];
        assert!(self.mem.read(addr, &mut buf));
        let h = Header::parse(buf[..HDR_LEN].try_into().unwrap());
        Some((h, buf[HDR_LEN..].to_vec()))
    }

    /// Waits until the device has consumed every TX chain we published.
    pub fn wait_tx_done(&self) {
        let want = self.avail_idx[TXQ];
        self.wait_until("TX consumed", |d| d.used_idx(TXQ) == want);
    }
}

/// A header from the guest to host port `dst` from guest port `src`.
pub fn guest_hdr(op: u16, src: u32, dst: u32, len: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port: src,
        dst_port: dst,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 256 * 1024,
        fwd_cnt: 0,
    }
}

pub fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("forkvm-vsock-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
