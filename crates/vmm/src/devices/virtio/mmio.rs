//! The virtio-mmio transport (virtio 1.x, register layout version 2): feature negotiation,
//! device status, queue setup through `virtio-queue`, the interrupt status register and its
//! irqfd. A device behind it sees only its queues, its config bytes and a kick on QueueNotify.

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

/// "virt", little endian.
const MAGIC: u32 = 0x7472_6976;
const VERSION: u32 = 2;
const VENDOR: u32 = 0x4b56_4d46; // "FMVK"
/// VIRTIO_F_VERSION_1.
pub const F_VERSION_1: u64 = 1 << 32;

pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_FAILED: u32 = 0x80;
/// Interrupt status bit: a used buffer was added.
pub const INT_VRING: u32 = 1;

/// Size of one device's register window.
pub const MMIO_WINDOW: u64 = 0x1000;
const CONFIG_OFFSET: u64 = 0x100;

/// The registers and queues of one virtio-mmio device.
#[derive(Debug)]
pub struct MmioTransport {
    pub device_id: u32,
    pub device_features: u64,
    pub driver_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u32,
    pub queues: Vec<Queue>,
    pub status: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    /// The device's configuration space (read-only for the driver here).
    pub config: Vec<u8>,
    irq: EventFd,
}

/// What a register write asks of the device behind the transport.
#[derive(Debug, PartialEq, Eq)]
pub enum MmioEvent {
    None,
    /// The driver notified queue N.
    Notify(u32),
    /// The driver set DRIVER_OK with every queue valid.
    Activated,
    /// The driver wrote status 0.
    Reset,
}

impl MmioTransport {
    pub fn new(device_id: u32, device_features: u64, queue_sizes: &[u16], config: Vec<u8>, irq: EventFd) -> Self {
        let queues = queue_sizes.iter().filter_map(|&s| Queue::new(s).ok()).collect();
        MmioTransport {
            device_id,
            device_features: device_features | F_VERSION_1,
            driver_features: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            queues,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
            config,
            irq,
        }
    }

    /// The driver has finished setting the device up.
    pub fn is_active(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_FAILED == 0
    }

    /// Raises the used-buffer interrupt.
    pub fn signal_used(&mut self) {
        self.interrupt_status |= INT_VRING;
        let _ = self.irq.write(1);
    }

    pub fn irq(&self) -> &EventFd {
        &self.irq
    }

    fn queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    fn queue_mut(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt_status = 0;
        for q in &mut self.queues {
            q.reset();
        }
    }

    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= CONFIG_OFFSET {
            let start = (offset - CONFIG_OFFSET) as usize;
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.config.get(start + i).copied().unwrap_or(0);
            }
            return;
        }
        if data.len() != 4 {
            return;
        }
        let v: u32 = match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.device_id,
            0x0c => VENDOR,
            0x10 => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            0x34 => self.queue().map_or(0, |q| u32::from(q.max_size())),
            0x44 => self.queue().map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt_status,
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> MmioEvent {
        if offset >= CONFIG_OFFSET {
            return MmioEvent::None; // config space is read-only for our devices
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return MmioEvent::None;
        };
        let v = u32::from_le_bytes(bytes);
        // Queue registers may only change before the driver says DRIVER_OK.
        let setup = self.status & STATUS_DRIVER_OK == 0;
        match offset {
            0x14 => self.device_features_sel = v,
            0x20 if self.status & STATUS_FEATURES_OK == 0 => {
                let offered = match self.driver_features_sel {
                    0 => self.device_features & 0xffff_ffff,
                    1 => self.device_features >> 32,
                    _ => 0,
                };
                // Only what we offered can be accepted.
                let v = u64::from(v) & offered;
                match self.driver_features_sel {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
                    _ => {}
                }
            }
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 if setup => {
                if let Some(q) = self.queue_mut() {
                    // An invalid size (0, not a power of two, above max) leaves the queue invalid.
                    if q.try_set_size(v as u16).is_err() || v > 0xffff {
                        q.set_size(0);
                    }
                }
            }
            0x44 if setup => {
                if let Some(q) = self.queue_mut() {
                    q.set_ready(v == 1);
                }
            }
            0x50 => return MmioEvent::Notify(v),
            0x64 => self.interrupt_status &= !v,
            0x70 => return self.set_status(v),
            0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 if setup => {
                let high = offset & 4 != 0;
                let (lo, hi) = if high { (None, Some(v)) } else { (Some(v), None) };
                if let Some(q) = self.queue_mut() {
                    match offset & !4 {
                        0x80 => q.set_desc_table_address(lo, hi),
                        0x90 => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            _ => {}
        }
        MmioEvent::None
    }

    fn set_status(&mut self, v: u32) -> MmioEvent {
        if v == 0 {
            self.reset();
            return MmioEvent::Reset;
        }
        let was_active = self.status & STATUS_DRIVER_OK != 0;
        if v & STATUS_FEATURES_OK != 0 && self.driver_features & F_VERSION_1 == 0 {
            // A legacy driver: refuse FEATURES_OK (virtio 1.x only).
            self.status = v & !STATUS_FEATURES_OK;
            return MmioEvent::None;
        }
        self.status = v;
        if !was_active && v & STATUS_DRIVER_OK != 0 {
            if self.queues.iter().all(|q| q.ready() && q.size() > 0) {
                return MmioEvent::Activated;
            }
            self.status |= STATUS_FAILED;
        }
        MmioEvent::None
    }

    /// Queue and register state for a snapshot.
    pub fn save(&self) -> super::persist::TransportState {
        super::persist::TransportState {
            device_id: self.device_id,
            device_features: self.device_features,
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self.queues.iter().map(|q| super::persist::QueueSnap::from(&q.state())).collect(),
        }
    }

    /// Rebuilds the transport from a snapshot (the device id and queue count must match).
    pub fn restore(
        s: &super::persist::TransportState,
        queue_sizes: &[u16],
        config: Vec<u8>,
        irq: EventFd,
    ) -> Result<Self, String> {
        let mut t = MmioTransport::new(s.device_id, s.device_features, queue_sizes, config, irq);
        if s.queues.len() != t.queues.len() {
            return Err(format!("device state has {} queues, the device has {}", s.queues.len(), t.queues.len()));
        }
        for (q, snap) in t.queues.iter_mut().zip(&s.queues) {
            if snap.max_size != q.max_size() {
                return Err(format!("queue max size {} in the state, {} in the device", snap.max_size, q.max_size()));
            }
            *q = Queue::try_from(snap.to_state()).map_err(|e| format!("bad queue state: {e:?}"))?;
        }
        t.driver_features = s.driver_features & t.device_features;
        t.device_features_sel = s.device_features_sel;
        t.driver_features_sel = s.driver_features_sel;
        t.queue_sel = s.queue_sel;
        t.status = s.status;
        t.interrupt_status = s.interrupt_status;
        t.config_generation = s.config_generation;
        Ok(t)
    }
}
