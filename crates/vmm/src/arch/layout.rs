//! Guest-physical memory layout (the same places Linux's boot protocol and Firecracker use).

/// Start of the 32-bit MMIO gap: RAM above this is moved above 4 GiB.
pub const MMIO_GAP_START: u64 = 0xC000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 1 << 32;
/// GDT built by the VMM for the 64-bit entry.
pub const GDT_ADDR: u64 = 0x500;
/// An empty IDT for the entry (the guest installs its own).
pub const IDT_ADDR: u64 = 0x520;
/// VM generation page: u64 counter and 32 seed bytes, bumped on every clone/restore.
pub const GEN_PAGE: u64 = 0x6000;
/// Linux zero page (boot_params); RSI points here at entry.
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Identity-map page tables: PML4, PDPT, then PDs.
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
/// Number of page directories (each maps 1 GiB with 2 MiB pages): the first 4 GiB.
pub const PD_COUNT: u64 = 4;
/// End of the low-memory e820 RAM entry (EBDA starts here).
pub const EBDA_START: u64 = 0x9fc00;
/// Multiprocessor table, in the EBDA.
pub const MPTABLE_START: u64 = 0x9fc00;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 4096;
/// Where kernels are loaded (Linux's default physical start for bzImage).
pub const HIMEM_START: u64 = 0x10_0000;
/// KVM needs three pages for the TSS below 4 GiB, inside the MMIO gap.
pub const TSS_ADDR: u64 = 0xfffb_d000;
