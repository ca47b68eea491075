//! The Firecracker uffd handshake (the JSON mappings a VMM sends with its uffd) and the checks
//! the page server applies to them: never panics; accepted regions can be served without
//! arithmetic overflow, do not overlap, and re-encode to a body that parses the same.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pagesrv::fc::{body, parse, validate};

fuzz_target!(|data: &[u8]| {
    let Ok(hs) = parse(data) else { return };
    let again = parse(&body(&hs.mappings, hs.field)).expect("a re-encoded handshake parses");
    assert_eq!(again.mappings, hs.mappings);
    let source_len = hs.mappings.iter().map(|m| m.offset.saturating_add(m.size)).max().unwrap_or(0);
    if let Ok((regions, ps)) = validate(&hs.mappings, source_len) {
        assert!(ps.is_power_of_two());
        for (i, r) in regions.iter().enumerate() {
            let end = r.base.checked_add(r.len).expect("region end overflows");
            assert!(r.offset.checked_add(r.len).is_some_and(|e| e <= source_len));
            for o in &regions[i + 1..] {
                let oend = o.base.checked_add(o.len).expect("region end overflows");
                assert!(end <= o.base || oend <= r.base, "regions {r:?} and {o:?} overlap");
            }
        }
    }
});
