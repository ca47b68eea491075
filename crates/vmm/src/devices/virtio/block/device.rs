//! The virtio-blk device: one request queue, served synchronously on the vCPU thread that
//! notifies it (no worker thread: a paused VM has no I/O in flight). Offers FLUSH (the driver
//! then runs a write-back cache and flushes; we fdatasync the overlay), SEG_MAX, and RO for
//! read-only disks.

use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::disk::{CowDisk, DiskConfig};
use super::persist::BlockState;
use super::request::{self, BlockStats, ID_LEN};
use crate::devices::mmio::MmioDevice;
use crate::devices::virtio::mmio::{MmioEvent, MmioTransport};
use crate::vstate::memory::GuestMem;

/// virtio device id of block.
pub const DEVICE_ID: u32 = 2;
pub const QUEUE_SIZES: [u16; 1] = [256];
pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_RO: u64 = 1 << 5;
pub const F_FLUSH: u64 = 1 << 9;
/// Data segments per request we announce (queue size minus header and status).
const SEG_MAX: u32 = 254;

/// Everything behind the device lock.
#[derive(Debug)]
pub struct State {
    pub transport: MmioTransport,
    pub disk: CowDisk,
    pub stats: BlockStats,
}

/// A virtio-blk device over a copy-on-write disk.
#[derive(Debug)]
pub struct Block {
    state: Mutex<State>,
    mem: Arc<GuestMem>,
    view: GuestMemoryMmap,
    id: [u8; ID_LEN],
}

/// Config space: capacity in sectors, size_max (unused), seg_max.
pub fn config_bytes(size: u64) -> Vec<u8> {
    let mut c = Vec::with_capacity(16);
    c.extend_from_slice(&(size / 512).to_le_bytes());
    c.extend_from_slice(&0u32.to_le_bytes());
    c.extend_from_slice(&SEG_MAX.to_le_bytes());
    c
}

pub fn features(read_only: bool) -> u64 {
    F_SEG_MAX | F_FLUSH | if read_only { F_RO } else { 0 }
}

impl Block {
    /// A device for the disk `cfg` describes, interrupting through `irq`.
    pub fn new(cfg: &DiskConfig, mem: Arc<GuestMem>, irq: EventFd) -> Result<Self, String> {
        let disk = CowDisk::create(cfg)?;
        let t = MmioTransport::new(DEVICE_ID, features(disk.read_only), &QUEUE_SIZES, config_bytes(disk.size()), irq);
        Self::with_state(State { transport: t, disk, stats: BlockStats::default() }, mem)
    }

    pub(crate) fn with_state(state: State, mem: Arc<GuestMem>) -> Result<Self, String> {
        let view = mem.view().map_err(|e| e.to_string())?;
        let mut id = [0u8; ID_LEN];
        let name = b"forkvm-disk0";
        id[..name.len()].copy_from_slice(name);
        Ok(Block { state: Mutex::new(state), mem, view, id })
    }

    /// A device over `disk` with the transport of `st` (restore and fork).
    pub fn from_parts(st: &BlockState, disk: CowDisk, mem: Arc<GuestMem>, irq: EventFd) -> Result<Self, String> {
        if st.transport.device_id != DEVICE_ID {
            return Err(format!("block state has device id {}", st.transport.device_id));
        }
        let t = MmioTransport::restore(&st.transport, &QUEUE_SIZES, config_bytes(disk.size()), irq)?;
        Self::with_state(State { transport: t, disk, stats: BlockStats::default() }, mem)
    }

    /// Locks the device state.
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state if nobody holds it (a fork child must not wait on a lock of its parent).
    pub fn try_state(&self) -> Option<MutexGuard<'_, State>> {
        self.state.try_lock().ok()
    }

    /// Freezes the disk (fork): the parent continues on a new overlay, children share the rest.
    pub fn freeze(&self) -> std::io::Result<()> {
        self.state().disk.freeze()
    }

    /// Makes every completed write durable (on pause and before snapshots).
    pub fn flush(&self) -> std::io::Result<()> {
        self.state().disk.flush()
    }

    pub fn stats(&self) -> BlockStats {
        self.state().stats
    }

    /// Serves every request the driver has made available.
    pub fn process(&self) {
        let mut s = self.state();
        if !s.transport.is_active() {
            return;
        }
        let State { transport, disk, stats } = &mut *s;
        let mut used = false;
        while let Some(q) = transport.queues.get_mut(0) {
            let Some(chain) = q.pop_descriptor_chain(&self.view) else { break };
            let head = chain.head_index();
            let len = request::handle(disk, &self.mem, chain, &self.id, stats);
            let _ = q.add_used(&self.view, head, len);
            used = true;
        }
        if used {
            transport.signal_used();
        }
    }

    /// The device state with the disk's layers described (not written anywhere). The used ring
    /// is marked dirty for the next diff snapshot.
    pub fn save(&self) -> BlockState {
        let s = self.state();
        for q in &s.transport.queues {
            if q.ready() {
                self.mem.mark_host_dirty(q.used_ring(), 6 + 8 * u64::from(q.size()));
            }
        }
        BlockState { transport: s.transport.save(), disk: s.disk.describe() }
    }
}

impl MmioDevice for Block {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.state().transport.read(offset, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let ev = self.state().transport.write(offset, data);
        if matches!(ev, MmioEvent::Notify(_) | MmioEvent::Activated) {
            self.process();
        }
    }
}
