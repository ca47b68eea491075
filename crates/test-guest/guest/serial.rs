//! COM1 (16550) at 0x3f8: interrupt-driven receive (IER RDA), polled transmit.

use crate::cpu::{inb, outb, wait_for_interrupt};

const COM1: u16 = 0x3f8;
const LSR: u16 = COM1 + 5;
const LSR_DATA_READY: u8 = 0x01;
const LSR_THR_EMPTY: u8 = 0x20;

pub fn init() {
    outb(COM1 + 3, 0x03); // 8N1
    outb(COM1 + 4, 0x0b); // DTR | RTS | OUT2 (OUT2 gates the IRQ line on a PC)
    outb(COM1 + 1, 0x01); // interrupt on received data
}

fn write_byte(b: u8) {
    while inb(LSR) & LSR_THR_EMPTY == 0 {}
    outb(COM1, b);
}

pub fn write_str(s: &str) {
    for &b in s.as_bytes() {
        write_byte(b);
    }
}

pub fn write_dec(mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for &b in &buf[i..] {
        write_byte(b);
    }
}

pub fn write_hex(v: u64) {
    for i in (0..16).rev() {
        let d = ((v >> (i * 4)) & 0xf) as u8;
        write_byte(if d < 10 { b'0' + d } else { b'a' + d - 10 });
    }
}

/// Blocks (halting between interrupts) until a line ends; returns its length. Over-long lines are
/// cut at the buffer size; the rest is discarded up to the newline.
pub fn read_line(buf: &mut [u8]) -> usize {
    let mut n = 0;
    let mut overflow = false;
    loop {
        if inb(LSR) & LSR_DATA_READY == 0 {
            wait_for_interrupt();
            continue;
        }
        let c = inb(COM1);
        match c {
            b'\n' | b'\r' => {
                if overflow {
                    write_str("err line too long\n");
                    return 0;
                }
                return n;
            }
            _ if n < buf.len() => {
                buf[n] = c;
                n += 1;
            }
            _ => overflow = true,
        }
    }
}
