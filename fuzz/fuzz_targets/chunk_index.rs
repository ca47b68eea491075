//! The chunk-store index decoder: never panics; what it accepts is self-consistent (every chunk
//! inside the pack, no duplicates) and round-trips.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(ix) = chunkstore::decode_index(data) {
        for (_, e) in &ix.entries {
            let end = e.offset.checked_add(u64::from(e.stored_len)).expect("entry end overflows");
            assert!(end <= ix.pack_len, "entry past the pack");
            assert!(e.raw_len > 0 && e.stored_len > 0);
        }
        let again = chunkstore::encode_index(&ix);
        assert_eq!(chunkstore::decode_index(&again).expect("re-encoded index decodes"), ix);
    }
});
