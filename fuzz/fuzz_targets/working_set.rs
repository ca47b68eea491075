//! The working-set file decoder (REAP prefetch list): never panics; accepted ranges are page
//! aligned, non-empty and do not overflow, and the file round-trips.
#![no_main]
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use pagesrv::WorkingSet;

const MAGIC: &[u8; 8] = b"FKVMWSET";

/// First byte 0: the rest is a payload, sealed here with a valid envelope (so the fuzzer gets
/// past the checksum); otherwise the rest is a whole file.
fn file(data: &[u8]) -> Option<Vec<u8>> {
    let (&mode, rest) = data.split_first()?;
    Some(if mode == 0 { chunkstore::envelope::seal(MAGIC, 1, rest) } else { rest.to_vec() })
}

fuzz_target!(|data: &[u8]| {
    let Some(data) = file(data) else { return };
    if let Ok(ws) = WorkingSet::decode(Path::new("fuzz"), &data) {
        let ps = u64::from(ws.page_size);
        for &(off, len) in &ws.ranges {
            assert!(len > 0 && off % ps == 0 && u64::from(len) % ps == 0);
            assert!(off.checked_add(u64::from(len)).is_some(), "range {off:#x}+{len:#x} overflows");
        }
        let back = WorkingSet::decode(Path::new("fuzz"), &ws.encode()).expect("re-encoded working set decodes");
        assert_eq!(back, ws);
    }
});
