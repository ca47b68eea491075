//! The working-set file decoder (REAP prefetch list): never panics; accepted ranges are page
//! aligned, non-empty and do not overflow, and the file round-trips.
#![no_main]
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use pagesrv::WorkingSet;

fuzz_target!(|data: &[u8]| {
    if let Ok(ws) = WorkingSet::decode(Path::new("fuzz"), data) {
        let ps = u64::from(ws.page_size);
        for &(off, len) in &ws.ranges {
            assert!(len > 0 && off % ps == 0 && u64::from(len) % ps == 0);
            assert!(off.checked_add(u64::from(len)).is_some(), "range {off:#x}+{len:#x} overflows");
        }
        let back = WorkingSet::decode(Path::new("fuzz"), &ws.encode()).expect("re-encoded working set decodes");
        assert_eq!(back, ws);
    }
});
