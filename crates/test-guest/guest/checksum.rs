//! The page checksum the test guest's `sum` command prints; shared with the host so tests can compare.

/// Checksum of 64-bit little-endian words: rotate-xor-multiply, order sensitive, cheap enough for the guest.
pub fn fold_word(h: u64, w: u64) -> u64 {
    (h.rotate_left(5) ^ w).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Initial value of the checksum.
pub const SUM_SEED: u64 = 0xcbf2_9ce4_8422_2325;
