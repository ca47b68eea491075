//! The entry state of a vCPU: 64-bit long mode with an identity map, like Linux's 64-bit boot
//! protocol (also used by Firecracker and Cloud Hypervisor for vmlinux/bzImage entry).

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs};

use crate::arch::gdt::{segment, GDT};
use crate::arch::layout::*;
use crate::vstate::memory::GuestMem;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_MP: u64 = 1 << 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR0_CD: u64 = 1 << 30;
const X86_CR0_NW: u64 = 1 << 29;
const X86_CR4_PAE: u64 = 1 << 5;
const X86_CR4_OSFXSR: u64 = 1 << 9;
const X86_CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_SCE: u64 = 1;

/// Errors writing the entry state into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("guest memory too small for the boot structures at {0:#x}")]
    NoRoom(u64),
}

/// Writes the GDT, an empty IDT and the identity-map page tables (4 GiB, 2 MiB pages).
pub fn write_boot_tables(mem: &GuestMem) -> Result<(), RegsError> {
    let mut gdt = Vec::with_capacity(GDT.len() * 8);
    for e in GDT {
        gdt.extend_from_slice(&e.to_le_bytes());
    }
    put(mem, GDT_ADDR, &gdt)?;
    put(mem, IDT_ADDR, &0u64.to_le_bytes())?;
    put(mem, PML4_ADDR, &(PDPT_ADDR | 0x3).to_le_bytes())?;
    let mut pdpt = Vec::new();
    for i in 0..PD_COUNT {
        pdpt.extend_from_slice(&((PD_ADDR + i * 0x1000) | 0x3).to_le_bytes());
    }
    put(mem, PDPT_ADDR, &pdpt)?;
    let mut pd = Vec::with_capacity((PD_COUNT * 512 * 8) as usize);
    for i in 0..PD_COUNT * 512 {
        // Present | writable | page size (2 MiB).
        pd.extend_from_slice(&((i << 21) | 0x83).to_le_bytes());
    }
    put(mem, PD_ADDR, &pd)
}

fn put(mem: &GuestMem, gpa: u64, bytes: &[u8]) -> Result<(), RegsError> {
    mem.write(gpa, bytes).then_some(()).ok_or(RegsError::NoRoom(gpa))
}

/// Special registers for the 64-bit entry, applied over KVM's defaults (`base`).
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment(1, GDT[1]);
    let data = segment(2, GDT[2]);
    let tss = segment(3, GDT[3]);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    // KVM's default CR0 has CD|NW set: the guest would run uncached and far slower.
    sregs.cr0 =
        (sregs.cr0 & !(X86_CR0_CD | X86_CR0_NW)) | X86_CR0_PE | X86_CR0_MP | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= X86_CR4_PAE | X86_CR4_OSFXSR | X86_CR4_OSXMMEXCPT;
    sregs.efer |= EFER_LME | EFER_LMA | EFER_SCE;
    sregs
}

/// General registers: entry point, boot stack, RSI = zero page.
pub fn entry_regs(entry: u64) -> kvm_regs {
    kvm_regs { rflags: 0x2, rip: entry, rsp: BOOT_STACK, rbp: BOOT_STACK, rsi: ZERO_PAGE, ..Default::default() }
}

/// x87/SSE control words as after FNINIT, MXCSR default.
pub fn entry_fpu() -> kvm_fpu {
    kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;

/// MSRs set at boot (syscall MSRs cleared, fast strings on).
pub fn entry_msrs() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry { index, data, ..Default::default() })
    .collect()
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(regs: &[std::os::raw::c_char; 1024], off: usize) -> u32 {
    let b = |i: usize| regs[off + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char; 1024], off: usize, v: u32) {
    for (i, byte) in v.to_le_bytes().into_iter().enumerate() {
        regs[off + i] = byte as std::os::raw::c_char;
    }
}

/// Local APIC: LINT0 as ExtINT (the 8259 PIC reaches the CPU), LINT1 as NMI.
pub fn set_lint(lapic: &mut kvm_bindings::kvm_lapic_state) {
    // Delivery mode in bits 8..11; bit 16 masks the line (KVM resets LVT0 masked on PVM).
    let mode = |reg: u32, m: u32| (reg & !0x1_0700) | (m << 8);
    let lvt0 = lapic_reg(&lapic.regs, APIC_LVT0);
    set_lapic_reg(&mut lapic.regs, APIC_LVT0, mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(&lapic.regs, APIC_LVT1);
    set_lapic_reg(&mut lapic.regs, APIC_LVT1, mode(lvt1, APIC_MODE_NMI));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::Backing;

    #[test]
    fn page_tables_identity_map() {
        let m = GuestMem::new(16 << 20, Backing::Anon, false).unwrap();
        write_boot_tables(&m).unwrap();
        let mut e = [0u8; 8];
        m.read(PD_ADDR + 8 * 3, &mut e);
        assert_eq!(u64::from_le_bytes(e), (3 << 21) | 0x83);
        m.read(PML4_ADDR, &mut e);
        assert_eq!(u64::from_le_bytes(e), PDPT_ADDR | 3);
    }

    #[test]
    fn sregs_clear_cache_disable() {
        let s = long_mode_sregs(kvm_sregs { cr0: X86_CR0_CD | X86_CR0_NW | 0x10, ..Default::default() });
        assert_eq!(s.cr0 & (X86_CR0_CD | X86_CR0_NW), 0);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.efer & EFER_LMA, 0);
    }

    #[test]
    fn lint_modes() {
        let mut l = kvm_bindings::kvm_lapic_state::default();
        set_lint(&mut l);
        assert_eq!((lapic_reg(&l.regs, APIC_LVT0) >> 8) & 7, APIC_MODE_EXTINT);
        assert_eq!((lapic_reg(&l.regs, APIC_LVT1) >> 8) & 7, APIC_MODE_NMI);
    }
}
