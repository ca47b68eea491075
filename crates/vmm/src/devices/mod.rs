//! Emulated devices: the 16550 serial console, the i8042 reset line, the port I/O and MMIO
//! buses, and virtio devices over virtio-mmio.
pub mod console;
pub mod i8042;
pub mod mmio;
pub mod pio;
pub mod serial;
pub mod serial_persist;
pub mod virtio;
