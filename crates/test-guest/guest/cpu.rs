//! CPU set-up for the test guest: an IDT whose PIC vectors just acknowledge, the 8259 PIC with only
//! the COM1 line (IRQ 4) open, and the halt/reset primitives.

use core::arch::{asm, global_asm};

global_asm!(
    ".section .text",
    ".global isr_irq",
    "isr_irq:",
    "push rax",
    "mov al, 0x20",
    "out 0xa0, al",
    "out 0x20, al",
    "pop rax",
    "iretq",
    ".global isr_fault",
    "isr_fault:",
    "mov dx, 0x3f8",
    "mov al, 0x21",
    "out dx, al",
    "mov al, 0x0a",
    "out dx, al",
    "3:",
    "cli",
    "hlt",
    "jmp 3b",
);

extern "C" {
    fn isr_irq();
    fn isr_fault();
}

#[repr(C, align(16))]
struct Idt([u64; 512]);

static mut IDT: Idt = Idt([0; 512]);

pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O to devices the VMM emulates; no memory is touched.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags)) };
}

pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: port I/O to devices the VMM emulates; no memory is touched.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags)) };
    v
}

pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc only reads the time-stamp counter.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

pub fn init() {
    let cs: u16;
    // SAFETY: reading CS has no side effects.
    unsafe { asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) };
    for vec in 0..256usize {
        let handler = if vec >= 0x20 { isr_irq as *const () as usize } else { isr_fault as *const () as usize } as u64;
        let lo = (handler & 0xffff) | (u64::from(cs) << 16) | (0x8e00u64 << 32) | ((handler >> 16) & 0xffff) << 48;
        let hi = handler >> 32;
        // SAFETY: single-threaded guest; the IDT is only written here, before interrupts are enabled.
        unsafe {
            let idt = &raw mut IDT;
            (*idt).0[vec * 2] = lo;
            (*idt).0[vec * 2 + 1] = hi;
        }
    }
    let mut desc = [0u8; 10];
    desc[..2].copy_from_slice(&(256u16 * 16 - 1).to_le_bytes());
    desc[2..].copy_from_slice(&(&raw const IDT as u64).to_le_bytes());
    // SAFETY: desc describes the static IDT filled above with valid 64-bit interrupt gates.
    unsafe { asm!("lidt [{0}]", in(reg) desc.as_ptr(), options(readonly, nostack, preserves_flags)) };

    // 8259 PIC: remap to 0x20/0x28, open IRQ 4 (COM1) only.
    outb(0x20, 0x11);
    outb(0xa0, 0x11);
    outb(0x21, 0x20);
    outb(0xa1, 0x28);
    outb(0x21, 0x04);
    outb(0xa1, 0x02);
    outb(0x21, 0x01);
    outb(0xa1, 0x01);
    outb(0x21, !0x10);
    outb(0xa1, 0xff);
}

/// Sleep until an interrupt arrives. `sti; hlt` is atomic: an IRQ raised after the caller's last
/// check (made with interrupts off) still wakes the hlt.
pub fn wait_for_interrupt() {
    // SAFETY: enables interrupts only for the hlt; the IDT handlers preserve all registers. No
    // `nostack`: the interrupt frame is pushed below RSP, so the compiler must not keep a red zone.
    unsafe { asm!("sti", "hlt", "cli") };
}

pub fn halt_forever() -> ! {
    loop {
        // SAFETY: halting with interrupts off parks the vCPU for good.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Shut the CPU down the way a broken kernel does: an empty IDT, then an exception (#UD, then
/// #GP and #DF find no gate either: a triple fault).
pub fn triple_fault() -> ! {
    let desc = [0u16; 5];
    // SAFETY: deliberately fatal: loads an IDT of limit 0 and raises #UD; nothing runs after.
    unsafe { asm!("cli", "lidt [{0}]", "ud2", in(reg) desc.as_ptr(), options(nostack)) };
    halt_forever()
}

/// Ask for a reset through the i8042 controller, the way Linux's `reboot=k` does.
pub fn reset() -> ! {
    outb(0x64, 0xfe);
    halt_forever()
}
