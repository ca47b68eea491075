//! forkvm test guest: a tiny 64-bit kernel entered like a Linux vmlinux (long mode, identity
//! mapped, RSI = boot_params), speaking a line protocol on COM1. Built by ../build.rs with rustc.
//!
//! Protocol (one command per line, one answer line each):
//!   ping                      -> pong
//!   count                     -> count <n>       (n grows by one per call; lives in guest memory)
//!   spin <n>                  -> spun <total>    (busy loop adding n to a counter: pause lands mid-loop)
//!   wait <gpa>                -> waiting, then waited <spins> once the u64 at gpa is non-zero
//!                                (a loop only the host ends: a pause deterministically lands in it)
//!   touch <gpa> <pages> <b>   -> touched <pages> (fill pages with byte b)
//!   sum <gpa> <pages>         -> sum <hex>       (checksum::fold_word over little-endian u64 words)
//!   random                    -> random <hex>    (reseeded when the VM generation changes)
//!   gen                       -> gen <n>         (the generation counter the VMM bumps on clone/restore)
//!   mem                       -> mem <bytes>     (end of RAM from the e820 map)
//!   halt                      -> (i8042 reset: the VMM shuts the VM down)
//!   triple                    -> (no answer: an exception with an empty IDT, i.e. a triple fault)
#![no_std]
#![no_main]

mod checksum;
mod cpu;
mod mem;
mod serial;

use core::arch::global_asm;
use core::panic::PanicInfo;

global_asm!(
    ".section .text.entry, \"ax\"",
    ".global _start",
    "_start:",
    "cli",
    "lea rsp, [rip + __stack_top]",
    "mov rdi, rsi",
    "call guest_main",
    "2:",
    "cli",
    "hlt",
    "jmp 2b",
);

/// Guest-physical address of the generation page the VMM writes (u64 generation, then 32 seed bytes).
const GEN_GPA: usize = 0x6000;
/// Lowest address `touch` and `sum` accept: below it live the guest image, stack and boot data.
const LOW_LIMIT: u64 = 0x20_0000;
const PAGE: u64 = 4096;

struct State {
    count: u64,
    spins: u64,
    ram_end: u64,
    rng: u64,
    seen_gen: u64,
}

#[panic_handler]
fn panic(_info: &PanicInfo) -> ! {
    serial::write_str("err guest panic\n");
    cpu::halt_forever()
}

/// The precompiled libcore refers to the unwinder's personality routine; nothing unwinds here.
#[no_mangle]
extern "C" fn rust_eh_personality() {}

/// Entry from `_start`, with the boot_params pointer the VMM passed in RSI.
#[no_mangle]
extern "C" fn guest_main(boot_params: u64) -> ! {
    cpu::init();
    serial::init();
    let mut st = State {
        count: 0,
        spins: 0,
        ram_end: ram_end(boot_params),
        rng: cpu::rdtsc() ^ 0x1234_5678_9abc_def0,
        seen_gen: 0,
    };
    serial::write_str("forkvm-test-guest ready\n");
    let mut line = [0u8; 128];
    loop {
        let n = serial::read_line(&mut line);
        if n > 0 {
            handle(&mut st, &line[..n]);
        }
    }
}

/// End of usable RAM from the boot_params e820 table (entries at 0x2d0, count at 0x1e8).
fn ram_end(bp: u64) -> u64 {
    if bp == 0 {
        return 0;
    }
    // SAFETY: the VMM places boot_params at `bp` inside identity-mapped RAM.
    let count = unsafe { core::ptr::read_volatile((bp + 0x1e8) as *const u8) }.min(128);
    let mut end = 0;
    for i in 0..u64::from(count) {
        let e = bp + 0x2d0 + i * 20;
        // SAFETY: e820 entries are inside the same boot_params page; reads are unaligned-safe.
        let (addr, size, ty) = unsafe {
            (
                core::ptr::read_unaligned(e as *const u64),
                core::ptr::read_unaligned((e + 8) as *const u64),
                core::ptr::read_unaligned((e + 16) as *const u32),
            )
        };
        if ty == 1 {
            end = end.max(addr.saturating_add(size));
        }
    }
    end
}

fn handle(st: &mut State, line: &[u8]) {
    let mut words = line.split(|&b| b == b' ').filter(|w| !w.is_empty());
    let cmd = words.next().unwrap_or(b"");
    let mut arg = || words.next().and_then(parse_num);
    match cmd {
        b"ping" => serial::write_str("pong\n"),
        b"count" => {
            st.count += 1;
            answer("count ", st.count, false);
        }
        b"spin" => match arg() {
            Some(n) => {
                for _ in 0..n {
                    // SAFETY: a plain volatile access to our own counter keeps the loop in memory.
                    unsafe { core::ptr::write_volatile(&mut st.spins, core::ptr::read_volatile(&st.spins) + 1) };
                }
                answer("spun ", st.spins, false);
            }
            None => serial::write_str("err usage: spin <n>\n"),
        },
        b"wait" => match arg() {
            Some(gpa) if check_range(st, gpa, 1).is_some() => {
                serial::write_str("waiting\n");
                // SAFETY: check_range proved gpa is page-aligned RAM above our image; the host
                // writes the flag while the guest spins.
                while unsafe { core::ptr::read_volatile(gpa as *const u64) } == 0 {
                    // SAFETY: a plain volatile access to our own counter.
                    unsafe { core::ptr::write_volatile(&mut st.spins, core::ptr::read_volatile(&st.spins) + 1) };
                }
                answer("waited ", st.spins, false);
            }
            _ => serial::write_str("err usage: wait <gpa>\n"),
        },
        b"touch" => match (arg(), arg(), arg()) {
            (Some(gpa), Some(pages), Some(byte)) if byte < 256 => match check_range(st, gpa, pages) {
                Some(len) => {
                    // SAFETY: check_range proved [gpa, gpa+len) is RAM above our own image and stack.
                    unsafe { mem::fill(gpa as *mut u8, byte as u8, len as usize) };
                    answer("touched ", pages, false);
                }
                None => serial::write_str("err range\n"),
            },
            _ => serial::write_str("err usage: touch <gpa> <pages> <byte>\n"),
        },
        b"sum" => match (arg(), arg()) {
            (Some(gpa), Some(pages)) => match check_range(st, gpa, pages) {
                Some(len) => {
                    let mut h = checksum::SUM_SEED;
                    let mut p = gpa;
                    while p < gpa + len {
                        // SAFETY: p is 8-byte aligned inside the checked RAM range.
                        let w = unsafe { core::ptr::read_volatile(p as *const u64) };
                        h = checksum::fold_word(h, w);
                        p += 8;
                    }
                    answer("sum ", h, true);
                }
                None => serial::write_str("err range\n"),
            },
            _ => serial::write_str("err usage: sum <gpa> <pages>\n"),
        },
        b"random" => {
            let gen = generation();
            if gen != st.seen_gen {
                st.seen_gen = gen;
                st.rng ^= gen.wrapping_mul(0xA24B_AED4_963E_E407) ^ seed_word() ^ cpu::rdtsc();
            }
            answer("random ", splitmix(&mut st.rng), true);
        }
        b"gen" => answer("gen ", generation(), false),
        b"mem" => answer("mem ", st.ram_end, false),
        b"halt" => cpu::reset(),
        b"triple" => cpu::triple_fault(),
        _ => serial::write_str("err unknown command\n"),
    }
}

/// Page-aligned range inside RAM and above the guest's own memory; returns its length in bytes.
fn check_range(st: &State, gpa: u64, pages: u64) -> Option<u64> {
    let len = pages.checked_mul(PAGE)?;
    let end = gpa.checked_add(len)?;
    (gpa % PAGE == 0 && gpa >= LOW_LIMIT && end <= st.ram_end && end <= 1 << 32).then_some(len)
}

fn generation() -> u64 {
    // SAFETY: the generation page is identity-mapped RAM reserved for the VMM's writes.
    unsafe { core::ptr::read_volatile(GEN_GPA as *const u64) }
}

fn seed_word() -> u64 {
    let mut s = 0;
    for i in 0..4 {
        // SAFETY: the 32 seed bytes follow the generation word in the same page.
        s ^= unsafe { core::ptr::read_volatile((GEN_GPA + 8 + i * 8) as *const u64) };
    }
    s
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn answer(prefix: &str, v: u64, hex: bool) {
    serial::write_str(prefix);
    if hex {
        serial::write_hex(v);
    } else {
        serial::write_dec(v);
    }
    serial::write_str("\n");
}

/// Decimal, or hex with a 0x prefix.
fn parse_num(w: &[u8]) -> Option<u64> {
    let (digits, radix) = match w {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16),
        _ => (w, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &c in digits {
        let d = (c as char).to_digit(radix)?;
        v = v.checked_mul(u64::from(radix))?.checked_add(u64::from(d))?;
    }
    Some(v)
}
