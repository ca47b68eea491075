//! A generic fake virtio-mmio guest driver for device tests (block, net): lays split
//! virtqueues in guest memory, publishes descriptor chains and notifies, as Linux would.
//! Waits are on the device's interrupt eventfd, never sleeps.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm::devices::mmio::MmioDevice;
use vmm::vstate::memory::GuestMem;
use vmm_sys_util::eventfd::EventFd;

pub const QSIZE: u16 = 64;
const BUF_BASE: u64 = 0x20_0000;
const BUF_END: u64 = 15 << 20;
pub const WAIT: Duration = Duration::from_secs(10);
pub const WRITE: u16 = 2;
pub const NEXT: u16 = 1;

pub struct Driver {
    pub dev: Arc<dyn MmioDevice>,
    pub mem: Arc<GuestMem>,
    pub irq: EventFd,
    pub base: u64,
    nq: usize,
    next_desc: Vec<u16>,
    pub avail_idx: Vec<u16>,
    pub used_seen: Vec<u16>,
    next_buf: u64,
}

impl Driver {
    /// `base`: guest-physical area (16 MiB) the driver may use for rings and buffers.
    pub fn attach(dev: Arc<dyn MmioDevice>, mem: Arc<GuestMem>, irq: EventFd, nq: usize, base: u64) -> Self {
        Driver {
            dev,
            mem,
            irq,
            base,
            nq,
            next_desc: vec![0; nq],
            avail_idx: vec![0; nq],
            used_seen: vec![0; nq],
            next_buf: base + BUF_BASE,
        }
    }

    /// The same driver (queue positions included) over another device and memory: the
    /// driver of a restored or forked guest, whose memory holds the rings as they were.
    pub fn rebind(&self, dev: Arc<dyn MmioDevice>, mem: Arc<GuestMem>) -> Self {
        Driver {
            dev,
            mem,
            irq: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            base: self.base,
            nq: self.nq,
            next_desc: self.next_desc.clone(),
            avail_idx: self.avail_idx.clone(),
            used_seen: self.used_seen.clone(),
            next_buf: self.next_buf,
        }
    }

    pub fn qbase(&self, q: usize) -> u64 {
        self.base + 0x1_0000 * (q as u64 + 1)
    }

    pub fn reg(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn set(&self, off: u64, v: u32) {
        self.dev.write(off, &v.to_le_bytes());
    }

    pub fn features(&self) -> u64 {
        self.set(0x14, 0);
        let lo = self.reg(0x10);
        self.set(0x14, 1);
        let hi = self.reg(0x10);
        u64::from(lo) | (u64::from(hi) << 32)
    }

    /// Negotiates `want` (plus VERSION_1) and sets every queue up; DRIVER_OK.
    pub fn init(&mut self, device_id: u32, want: u64) {
        assert_eq!(self.reg(0), 0x7472_6976);
        assert_eq!(self.reg(8), device_id);
        self.set(0x70, 1 | 2);
        let offered = self.features();
        let f = (want & offered) | (1 << 32);
        self.set(0x24, 0);
        self.set(0x20, f as u32);
        self.set(0x24, 1);
        self.set(0x20, (f >> 32) as u32);
        self.set(0x70, 1 | 2 | 8);
        assert_ne!(self.reg(0x70) & 8, 0, "FEATURES_OK accepted");
        for q in 0..self.nq {
            let base = self.qbase(q);
            self.set(0x30, q as u32);
            assert!(self.reg(0x34) >= u32::from(QSIZE));
            self.set(0x38, u32::from(QSIZE));
            self.set(0x80, base as u32);
            self.set(0x84, (base >> 32) as u32);
            self.set(0x90, (base + 0x1000) as u32);
            self.set(0x94, 0);
            self.set(0xa0, (base + 0x2000) as u32);
            self.set(0xa4, 0);
            self.set(0x44, 1);
        }
        self.set(0x70, 1 | 2 | 8 | 4);
        assert_eq!(self.reg(0x70) & 0x80, 0, "device did not fail");
    }

    pub fn config(&self, off: u64, out: &mut [u8]) {
        self.dev.read(0x100 + off, out);
    }

    pub fn alloc(&mut self, len: u64) -> u64 {
        if self.next_buf + len > self.base + BUF_END {
            self.next_buf = self.base + BUF_BASE;
        }
        let a = self.next_buf;
        self.next_buf += (len + 0xfff) & !0xfff;
        a
    }

    pub fn desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        assert!(self.mem.write(self.qbase(q) + 16 * u64::from(i), &d));
    }

    pub fn publish(&mut self, q: usize, head: u16) {
        let avail = self.qbase(q) + 0x1000;
        let slot = self.avail_idx[q] % QSIZE;
        assert!(self.mem.write(avail + 4 + 2 * u64::from(slot), &head.to_le_bytes()));
        self.avail_idx[q] = self.avail_idx[q].wrapping_add(1);
        assert!(self.mem.write(avail + 2, &self.avail_idx[q].to_le_bytes()));
    }

    pub fn notify(&self, q: usize) {
        self.set(0x50, q as u32);
    }

    /// Publishes a chain of (addr, len, device-writable) buffers; returns its head.
    pub fn chain(&mut self, q: usize, bufs: &[(u64, u32, bool)]) -> u16 {
        let n = bufs.len() as u16;
        let head = self.next_desc[q];
        self.next_desc[q] = (head + n) % QSIZE;
        for (k, &(addr, len, w)) in bufs.iter().enumerate() {
            let i = (head + k as u16) % QSIZE;
            let last = k + 1 == bufs.len();
            let flags = if w { WRITE } else { 0 } | if last { 0 } else { NEXT };
            self.desc(q, i, addr, len, flags, (i + 1) % QSIZE);
        }
        self.publish(q, head);
        head
    }

    pub fn used_idx(&self, q: usize) -> u16 {
        let mut b = [0u8; 2];
        assert!(self.mem.read(self.qbase(q) + 0x2000 + 2, &mut b));
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

    /// The next used element of queue `q`: (head id, length), waiting for it.
    pub fn next_used(&mut self, q: usize) -> (u16, u32) {
        let seen = self.used_seen[q];
        self.wait_until("a used buffer", |d| d.used_idx(q) != seen);
        let used = self.qbase(q) + 0x2000 + 4 + 8 * u64::from(seen % QSIZE);
        let mut e = [0u8; 8];
        assert!(self.mem.read(used, &mut e));
        self.used_seen[q] = seen.wrapping_add(1);
        (u32::from_le_bytes(e[0..4].try_into().unwrap()) as u16, u32::from_le_bytes(e[4..8].try_into().unwrap()))
    }

    /// Used elements not yet seen (no wait).
    pub fn pending_used(&self, q: usize) -> u16 {
        self.used_idx(q).wrapping_sub(self.used_seen[q])
    }
}

pub fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("forkvm-virtio-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
