//! Saved state of the serial port (registers and buffered input bytes).

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;

/// Serde form of vm-superio's [`SerialState`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnap {
    pub dll: u8,
    pub dlh: u8,
    pub ier: u8,
    pub iir: u8,
    pub lcr: u8,
    pub lsr: u8,
    pub mcr: u8,
    pub msr: u8,
    pub scr: u8,
    pub in_buffer: Vec<u8>,
}

impl From<&SerialState> for SerialSnap {
    fn from(s: &SerialState) -> Self {
        SerialSnap {
            dll: s.baud_divisor_low,
            dlh: s.baud_divisor_high,
            ier: s.interrupt_enable,
            iir: s.interrupt_identification,
            lcr: s.line_control,
            lsr: s.line_status,
            mcr: s.modem_control,
            msr: s.modem_status,
            scr: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl From<&SerialSnap> for SerialState {
    fn from(s: &SerialSnap) -> Self {
        SerialState {
            baud_divisor_low: s.dll,
            baud_divisor_high: s.dlh,
            interrupt_enable: s.ier,
            interrupt_identification: s.iir,
            line_control: s.lcr,
            line_status: s.lsr,
            modem_control: s.mcr,
            modem_status: s.msr,
            scratch: s.scr,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::devices::console::Console;
    use crate::devices::serial::SerialPort;

    #[test]
    fn save_restore_round_trip_keeps_buffered_input() {
        let port = SerialPort::new(EventFd::new(0).unwrap(), Console::new(None));
        port.pio_write(1, 0x01);
        port.pio_write(7, 0x5a);
        assert_eq!(port.send(b"ab", Duration::from_millis(1)), 2);
        let snap = SerialSnap::from(&port.state());
        let json = serde_json::to_string(&snap).unwrap();
        let back: SerialSnap = serde_json::from_str(&json).unwrap();
        let restored = SerialPort::from_state(&(&back).into(), EventFd::new(0).unwrap(), Console::new(None)).unwrap();
        assert_eq!(SerialSnap::from(&restored.state()), snap);
        assert_eq!(restored.pio_read(7), 0x5a);
        assert_eq!(restored.pio_read(0), b'a');
        assert_eq!(restored.pio_read(0), b'b');
    }
}
