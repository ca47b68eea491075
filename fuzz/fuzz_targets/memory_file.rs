//! The memory-image reader: a sparse file of arbitrary size and content is either refused (wrong
//! size) or applied so that guest memory holds exactly the file's bytes where it has data, never
//! a panic and never a write outside guest RAM; its image hash is the hash of what it restores.
#![no_main]
use std::fs::File;
use std::io::Seek;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use vmm::persist::{image_hash, memory_file};
use vmm::vstate::memory::{Backing, GuestMem};

const SIZE: u64 = 4 << 20;
const PAGE: u64 = 4096;

thread_local! {
    static MEM: GuestMem = GuestMem::new(SIZE, Backing::Anon, false).expect("guest memory");
}

fn memfd() -> (File, PathBuf) {
    // SAFETY: memfd_create with a static NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"fuzz-memory".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: memfd_create just returned this fd; we own it.
    let f = unsafe { File::from_raw_fd(fd) };
    (f, PathBuf::from(format!("/proc/self/fd/{fd}")))
}

fuzz_target!(|data: &[u8]| {
    // data[0]: size skew; then records of { u16 page, u8 byte, u8 pages }.
    let Some((&skew, recs)) = data.split_first() else { return };
    let len = match skew % 4 {
        0 => SIZE,
        1 => SIZE - PAGE,
        2 => SIZE + u64::from(skew),
        _ => u64::from(skew) * PAGE,
    };
    let (mut f, path) = memfd();
    f.set_len(len).expect("set_len");
    let mut expect = vec![0u8; SIZE as usize];
    for r in recs.chunks_exact(4) {
        let page = u64::from(u16::from_le_bytes([r[0], r[1]])) % (SIZE / PAGE);
        let n = u64::from(r[3] % 8) + 1;
        let end = (page + n).min(len.div_ceil(PAGE)).min(SIZE / PAGE);
        if end <= page {
            continue;
        }
        let bytes = vec![r[2]; ((end - page) * PAGE) as usize];
        f.write_all_at(&bytes, page * PAGE).expect("write");
        expect[(page * PAGE) as usize..(end * PAGE) as usize].copy_from_slice(&bytes);
    }
    f.rewind().expect("rewind");
    let opened = memory_file::open(&path, SIZE);
    if len != SIZE {
        assert!(opened.is_err(), "a {len}-byte image opened for a {SIZE}-byte guest");
        return;
    }
    let img = opened.expect("right-sized image opens");
    MEM.with(|mem| {
        mem.fill(0, SIZE, 0);
        let copied = memory_file::apply(mem, &img, &path).expect("apply");
        assert!(copied <= SIZE);
        let mut got = vec![0u8; SIZE as usize];
        assert!(mem.read(0, &mut got));
        assert!(got == expect, "guest memory differs from the image");
        // The image hash a restore checks: the file's equals the hash of the memory it restores.
        let of_file = image_hash::of_file(&img, &path, SIZE, false).expect("hash of a full image");
        assert_eq!(of_file, image_hash::of_memory_full(mem), "file and memory hashes disagree");
        let _ = image_hash::of_file(&img, &path, SIZE, true);
    });
});
