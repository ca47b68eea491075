//! Stored chunk bytes (raw, zstd, lz4) as read from the pack: decoding never panics and only
//! returns content whose blake3 matches the chunk's address.
#![no_main]
use chunkstore::ChunkHash;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // codec byte, u16 raw length, 32-byte address (all ones: "the hash of the result"), bytes.
    if data.len() < 3 + 32 {
        return;
    }
    let codec = data[0] % 4;
    let raw_len = usize::from(u16::from_le_bytes([data[1], data[2]])).max(1);
    let src = &data[35..];
    let mut dst = vec![0u8; raw_len];
    let claimed = ChunkHash(data[3..35].try_into().expect("32 bytes"));
    if chunkstore::decode_chunk(codec, &claimed, src, &mut dst).is_ok() {
        assert_eq!(ChunkHash::of(&dst), claimed, "accepted content that does not match its address");
    }
});
