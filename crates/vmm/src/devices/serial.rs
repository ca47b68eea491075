//! COM1: vm-superio's 16550 model, its IRQ as an eventfd (wired to GSI 4 by irqfd), output to a
//! [`Console`], input queued with back-pressure when the 64-byte FIFO is full.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::console::{lock, Console};

pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;

/// Raises the serial IRQ through an eventfd registered as a KVM irqfd.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Adapts the shared [`Console`] to `Write` for vm-superio.
#[derive(Debug)]
pub struct ConsoleWriter(pub Arc<Console>);

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub type SerialDev = Serial<IrqTrigger, NoEvents, ConsoleWriter>;

/// The serial port shared by the vCPU threads (register access) and input feeders.
#[derive(Clone, Debug)]
pub struct SerialPort {
    dev: Arc<Mutex<SerialDev>>,
    console: Arc<Console>,
}

impl SerialPort {
    pub fn new(irq: EventFd, console: Arc<Console>) -> Self {
        let dev = Serial::new(IrqTrigger(irq), ConsoleWriter(console.clone()));
        SerialPort { dev: Arc::new(Mutex::new(dev)), console }
    }

    /// Rebuilds the port from saved register state and an IRQ line.
    pub fn from_state(state: &SerialState, irq: EventFd, console: Arc<Console>) -> Result<Self, String> {
        let dev = Serial::from_state(state, IrqTrigger(irq), NoEvents, ConsoleWriter(console.clone()))
            .map_err(|e| format!("invalid serial state: {e:?}"))?;
        Ok(SerialPort { dev: Arc::new(Mutex::new(dev)), console })
    }

    pub fn console(&self) -> &Arc<Console> {
        &self.console
    }

    pub fn state(&self) -> SerialState {
        lock(&self.dev).state()
    }

    pub fn pio_read(&self, offset: u8) -> u8 {
        lock(&self.dev).read(offset)
    }

    pub fn pio_write(&self, offset: u8, value: u8) {
        if let Err(e) = lock(&self.dev).write(offset, value) {
            tracing::warn!("serial write at offset {offset}: {e:?}");
        }
    }

    /// Queues input bytes for the guest, waiting while the FIFO is full. Gives up (returning the
    /// number of bytes queued) if the guest has not drained the FIFO for `stall`.
    pub fn send(&self, mut bytes: &[u8], stall: Duration) -> usize {
        let total = bytes.len();
        let mut waited = Duration::ZERO;
        let step = Duration::from_micros(500);
        while !bytes.is_empty() {
            let n = {
                let mut d = lock(&self.dev);
                let room = d.fifo_capacity();
                let n = room.min(bytes.len());
                if n > 0 {
                    if let Err(e) = d.enqueue_raw_bytes(&bytes[..n]) {
                        tracing::warn!("serial input: {e:?}");
                        return total - bytes.len();
                    }
                }
                n
            };
            if n == 0 {
                if waited >= stall {
                    return total - bytes.len();
                }
                std::thread::sleep(step);
                waited += step;
            } else {
                bytes = &bytes[n..];
                waited = Duration::ZERO;
            }
        }
        total
    }
}
