//! The snapshot state decoder (envelope + JSON payload + semantic checks): never panics, and what
//! it accepts encodes and decodes back to the same state.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vmm::persist::state::{VmState, STATE_KIND};

/// First byte 0: the rest is a payload, sealed here with a valid envelope (so the fuzzer gets
/// past the checksum); otherwise the rest is a whole state file.
fn file(data: &[u8]) -> Option<Vec<u8>> {
    let (&mode, rest) = data.split_first()?;
    if mode != 0 {
        return Some(rest.to_vec());
    }
    let mut out = b"FORKVM".to_vec();
    out.extend_from_slice(&STATE_KIND.tag);
    out.extend_from_slice(&STATE_KIND.version.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(rest.len() as u64).to_le_bytes());
    out.extend_from_slice(blake3::hash(rest).as_bytes());
    out.extend_from_slice(rest);
    Some(out)
}

fuzz_target!(|data: &[u8]| {
    let Some(data) = file(data) else { return };
    if let Ok(state) = VmState::from_bytes(&data) {
        let again = state.to_bytes().expect("an accepted state encodes");
        let back = VmState::from_bytes(&again).expect("a re-encoded state decodes");
        assert_eq!(
            serde_json::to_value(&back).expect("json"),
            serde_json::to_value(&state).expect("json"),
            "state changed in a round trip"
        );
    }
});
