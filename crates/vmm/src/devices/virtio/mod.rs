//! virtio devices over the virtio-mmio transport, described to the guest in the ACPI DSDT.

pub mod block;
pub mod mmio;
pub mod net;
pub mod persist;
pub mod vsock;

/// Guest-physical base of the first virtio-mmio window (inside the 32-bit MMIO gap).
pub const MMIO_BASE: u64 = 0xd000_0000;
/// First IOAPIC pin (GSI) used by virtio devices; 4 is the serial port.
pub const IRQ_BASE: u32 = 5;

/// Where one virtio-mmio device sits: register window and interrupt line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioSlot {
    pub base: u64,
    pub irq: u32,
}

impl MmioSlot {
    /// The `index`th device's slot.
    pub fn nth(index: u32) -> Self {
        MmioSlot { base: MMIO_BASE + u64::from(index) * mmio::MMIO_WINDOW, irq: IRQ_BASE + index }
    }
}
