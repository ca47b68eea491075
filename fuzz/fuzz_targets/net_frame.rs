//! The cross-host page protocol's frame decoder (`pagesrv::net_wire`): whatever a peer sends, a
//! stream of frames decodes to messages or a clear error; never a panic, never a read past the
//! input, and every accepted frame re-encodes to exactly the bytes it came from.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pagesrv::net_wire::{decode_frame, read_msg};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok((m, used)) = decode_frame(rest) {
        assert!(used <= rest.len());
        assert_eq!(m.encode(), rest[..used].to_vec(), "re-encoding differs");
        rest = &rest[used..];
    }
    // The streaming reader agrees with the slice decoder on the first frame.
    let mut r = data;
    match (read_msg(&mut r), decode_frame(data)) {
        (Ok(a), Ok((b, _))) => assert_eq!(a, b),
        (Ok(a), Err(e)) => panic!("read_msg accepted {a:?}, decode_frame refused: {e}"),
        _ => {}
    }
});
