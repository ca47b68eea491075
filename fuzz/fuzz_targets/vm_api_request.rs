//! The per-VM control API's request parser (one JSON line from an untrusted client): never
//! panics; what it accepts passes its own bounds check and survives a serialize/parse round trip.
#![no_main]
use forkvm_api::vm::parse_request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = parse_request(data) {
        assert!(req.validate().is_ok());
        let line = serde_json::to_vec(&req).expect("an accepted request serializes");
        assert_eq!(parse_request(&line).expect("a re-serialized request parses"), req);
    }
});
