//! The one part of the i8042 keyboard controller a microVM needs: the CPU reset command (0xfe
//! written to port 0x64), which Linux's `reboot=k` and our test guest's `halt` use.

pub const I8042_DATA: u16 = 0x60;
pub const I8042_CMD: u16 = 0x64;
const CMD_RESET_CPU: u8 = 0xfe;

/// True if this write asks for a reset.
pub fn is_reset(port: u16, value: u8) -> bool {
    port == I8042_CMD && value == CMD_RESET_CPU
}

/// Status reads: output buffer empty, input buffer empty (so drivers never wait on us).
pub fn read(_port: u16) -> u8 {
    0
}
