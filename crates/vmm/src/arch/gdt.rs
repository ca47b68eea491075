//! GDT entries for the 64-bit entry, and their KVM segment form.

use kvm_bindings::kvm_segment;

/// Packs a GDT entry from flags (access byte and granularity nibble), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (((base as u64) & 0xff00_0000) << 32)
        | (((flags as u64) & 0x0000_f0ff) << 40)
        | (((limit as u64) & 0x000f_0000) << 32)
        | (((base as u64) & 0x00ff_ffff) << 16)
        | ((limit as u64) & 0x0000_ffff)
}

/// The GDT: null, 64-bit code (selector 0x08), data (0x10), TSS (0x18).
pub const GDT: [u64; 4] =
    [gdt_entry(0, 0, 0), gdt_entry(0xa09b, 0, 0xfffff), gdt_entry(0xc093, 0, 0xfffff), gdt_entry(0x808b, 0, 0xfffff)];

/// KVM form of GDT entry `index` (its selector is index * 8).
pub fn segment(index: u8, entry: u64) -> kvm_segment {
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: {
            let raw = (((entry >> 48) & 0xf) << 16) | (entry & 0xffff);
            let g = (entry >> 55) & 1;
            let lim = if g == 1 { (raw << 12) | 0xfff } else { raw };
            lim as u32
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from((entry >> 47) & 1 == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_long_mode() {
        let cs = segment(1, GDT[1]);
        assert_eq!(cs.selector, 0x08);
        assert_eq!(cs.l, 1);
        assert_eq!(cs.present, 1);
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment(2, GDT[2]);
        assert_eq!(ds.selector, 0x10);
        assert_eq!(ds.db, 1);
        assert_eq!(ds.type_, 3);
    }
}
