//! Port I/O dispatch for a vCPU exit.

use super::i8042;
use super::serial::{SerialPort, COM1_BASE};

/// What a port write asked of the VMM.
#[derive(Debug, PartialEq, Eq)]
pub enum PioAction {
    None,
    Reset,
}

/// The devices on the port bus.
#[derive(Clone, Debug)]
pub struct PioBus {
    pub serial: SerialPort,
}

impl PioBus {
    pub fn read(&self, port: u16, data: &mut [u8]) {
        match port {
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) => {
                data.fill(0);
                if let Some(first) = data.first_mut() {
                    *first = self.serial.pio_read((p - COM1_BASE) as u8);
                }
            }
            i8042::I8042_DATA | i8042::I8042_CMD => data.fill(i8042::read(port)),
            // Nothing else is present: a floating bus reads all ones.
            _ => data.fill(0xff),
        }
    }

    pub fn write(&self, port: u16, data: &[u8]) -> PioAction {
        let Some(&v) = data.first() else {
            return PioAction::None;
        };
        match port {
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) => {
                self.serial.pio_write((p - COM1_BASE) as u8, v);
                PioAction::None
            }
            p if i8042::is_reset(p, v) => PioAction::Reset,
            _ => PioAction::None,
        }
    }
}
