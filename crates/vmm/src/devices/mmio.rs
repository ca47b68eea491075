//! MMIO dispatch for vCPU exits: each device owns a window of guest-physical addresses.

use std::sync::Arc;

/// A device with registers in guest-physical address space.
pub trait MmioDevice: Send + Sync {
    fn read(&self, offset: u64, data: &mut [u8]);
    fn write(&self, offset: u64, data: &[u8]);
}

/// The devices on the MMIO bus: (base, length, device).
#[derive(Clone, Default)]
pub struct MmioBus {
    devices: Vec<(u64, u64, Arc<dyn MmioDevice>)>,
}

impl std::fmt::Debug for MmioBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioBus").field("devices", &self.devices.len()).finish()
    }
}

impl MmioBus {
    pub fn add(&mut self, base: u64, len: u64, dev: Arc<dyn MmioDevice>) {
        self.devices.push((base, len, dev));
    }

    fn find(&self, addr: u64) -> Option<(u64, &Arc<dyn MmioDevice>)> {
        self.devices.iter().find_map(|(base, len, d)| {
            let off = addr.checked_sub(*base)?;
            (off < *len).then_some((off, d))
        })
    }

    /// A read of unmapped space returns all ones, as an empty bus does.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((off, d)) => d.read(off, data),
            None => data.fill(0xff),
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) {
        if let Some((off, d)) = self.find(addr) {
            d.write(off, data);
        }
    }
}
