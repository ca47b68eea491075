//! The chunk-store index decoder: never panics; what it accepts is self-consistent (every chunk
//! inside the pack, no duplicates) and round-trips.
#![no_main]
use libfuzzer_sys::fuzz_target;

const MAGIC: &[u8; 8] = b"FKVMIDX1";

/// First byte 0: the rest is a payload, sealed here with a valid envelope (so the fuzzer gets
/// past the checksum); otherwise the rest is a whole file.
fn file(data: &[u8]) -> Option<Vec<u8>> {
    let (&mode, rest) = data.split_first()?;
    Some(if mode == 0 { chunkstore::envelope::seal(MAGIC, 1, rest) } else { rest.to_vec() })
}

fuzz_target!(|data: &[u8]| {
    let Some(data) = file(data) else { return };
    if let Ok(ix) = chunkstore::decode_index(&data) {
        for (_, e) in &ix.entries {
            let end = e.offset.checked_add(u64::from(e.stored_len)).expect("entry end overflows");
            assert!(end <= ix.pack_len, "entry past the pack");
            assert!(e.raw_len > 0 && e.stored_len > 0);
        }
        let again = chunkstore::encode_index(&ix);
        assert_eq!(chunkstore::decode_index(&again).expect("re-encoded index decodes"), ix);
    }
});
