//! The memory routines rustc's code expects from libc, written with string instructions so they
//! can never recurse into themselves.

use core::arch::asm;

/// Fill `len` bytes at `dst` with `v`.
///
/// # Safety
/// `dst..dst+len` must be writable memory.
pub unsafe fn fill(dst: *mut u8, v: u8, len: usize) {
    // SAFETY: the caller guarantees the range is writable.
    unsafe { asm!("rep stosb", inout("rdi") dst => _, inout("rcx") len => _, in("al") v, options(nostack, preserves_flags)) };
}

#[no_mangle]
unsafe extern "C" fn memset(dst: *mut u8, v: i32, len: usize) -> *mut u8 {
    // SAFETY: same contract as C memset.
    unsafe { fill(dst, v as u8, len) };
    dst
}

#[no_mangle]
unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, len: usize) -> *mut u8 {
    // SAFETY: same contract as C memcpy.
    unsafe { asm!("rep movsb", inout("rdi") dst => _, inout("rsi") src => _, inout("rcx") len => _, options(nostack, preserves_flags)) };
    dst
}

#[no_mangle]
unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, len: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize).wrapping_add(len) {
        // SAFETY: forward copy is correct when dst does not start inside src.
        return unsafe { memcpy(dst, src, len) };
    }
    let mut i = len;
    while i > 0 {
        i -= 1;
        // SAFETY: same contract as C memmove; copying backwards handles the overlap.
        unsafe { core::ptr::write_volatile(dst.add(i), core::ptr::read_volatile(src.add(i))) };
    }
    dst
}

#[no_mangle]
unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, len: usize) -> i32 {
    for i in 0..len {
        // SAFETY: same contract as C memcmp.
        let (x, y) = unsafe { (core::ptr::read_volatile(a.add(i)), core::ptr::read_volatile(b.add(i))) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

#[no_mangle]
unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, len: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, len) }
}
