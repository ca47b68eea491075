//! The manifest decoder: never panics; every page of an accepted manifest resolves to zero or a
//! chunk of its table, and it round-trips.
#![no_main]
use chunkstore::{Manifest, PageRef};
use libfuzzer_sys::fuzz_target;

const MAGIC: &[u8; 8] = b"FKVMMAN1";

/// First byte 0: the rest is a payload, sealed here with a valid envelope (so the fuzzer gets
/// past the checksum); otherwise the rest is a whole file.
fn file(data: &[u8]) -> Option<Vec<u8>> {
    let (&mode, rest) = data.split_first()?;
    Some(if mode == 0 { chunkstore::envelope::seal(MAGIC, 1, rest) } else { rest.to_vec() })
}

fuzz_target!(|data: &[u8]| {
    let Some(data) = file(data) else { return };
    if let Ok(m) = Manifest::from_bytes(&data) {
        assert_eq!(m.image_len().div_ceil(m.page_size() as u64), m.page_count());
        for p in 0..m.page_count() {
            match m.page(p) {
                Some(PageRef::Zero) => {}
                Some(PageRef::Chunk(h)) => assert!(m.chunks().contains(h)),
                None => panic!("page {p} of {} does not resolve", m.page_count()),
            }
        }
        assert!(m.page(m.page_count()).is_none());
        let _ = m.all_zero(0, m.page_count());
        let _ = m.all_zero(u64::MAX, 2);
        let back = Manifest::from_bytes(&m.to_bytes()).expect("re-encoded manifest decodes");
        assert_eq!(back, m);
    }
});
