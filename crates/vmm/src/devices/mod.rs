//! Emulated devices: the 16550 serial console, the i8042 reset line, and the port I/O bus.
pub mod console;
pub mod i8042;
pub mod pio;
pub mod serial;
pub mod serial_persist;
