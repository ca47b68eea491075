//! The manifest decoder: never panics; every page of an accepted manifest resolves to zero or a
//! chunk of its table, and it round-trips.
#![no_main]
use chunkstore::{Manifest, PageRef};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::from_bytes(data) {
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
