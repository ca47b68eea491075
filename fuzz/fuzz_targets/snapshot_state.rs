//! The snapshot state decoder (envelope + JSON payload + semantic checks): never panics, and what
//! it accepts encodes and decodes back to the same state.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vmm::persist::state::VmState;

fuzz_target!(|data: &[u8]| {
    if let Ok(state) = VmState::from_bytes(data) {
        let again = state.to_bytes().expect("an accepted state encodes");
        let back = VmState::from_bytes(&again).expect("a re-encoded state decodes");
        assert_eq!(
            serde_json::to_value(&back).expect("json"),
            serde_json::to_value(&state).expect("json"),
            "state changed in a round trip"
        );
    }
});
