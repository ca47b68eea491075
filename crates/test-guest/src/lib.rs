//! forkvm's tiny test guest, built from `guest/` by build.rs and embedded here as ELF64 bytes.
//!
//! The guest is entered like a Linux vmlinux (64-bit, identity mapped, RSI = boot_params) and talks
//! a line protocol on COM1; see `guest/main.rs` for the commands.

#[path = "../guest/checksum.rs"]
mod checksum;

/// The test guest ELF image.
pub static ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/test-guest.elf"));

/// The line the guest prints once it listens on its console.
pub const READY_LINE: &str = "forkvm-test-guest ready";

/// Guest-physical address of the generation page: u64 generation, then 32 bytes of fresh seed.
pub const GEN_GPA: u64 = 0x6000;

/// Lowest guest-physical address `touch` and `sum` accept.
pub const LOW_LIMIT: u64 = 0x20_0000;

/// What the guest's `sum <gpa> <pages>` prints for these bytes (length a multiple of 8).
pub fn sum_bytes(bytes: &[u8]) -> u64 {
    bytes.chunks_exact(8).fold(checksum::SUM_SEED, |h, w| {
        let mut word = [0u8; 8];
        word.copy_from_slice(w);
        checksum::fold_word(h, u64::from_le_bytes(word))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_is_a_64bit_executable() {
        assert_eq!(&ELF[..4], b"\x7fELF");
        assert_eq!(ELF[4], 2, "ELFCLASS64");
        assert_eq!(u16::from_le_bytes([ELF[16], ELF[17]]), 2, "ET_EXEC");
    }

    #[test]
    fn sum_is_order_sensitive() {
        let a = [1u8, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0];
        let b = [2u8, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
        assert_ne!(sum_bytes(&a), sum_bytes(&b));
    }
}
