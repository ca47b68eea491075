//! Unit tests of the page protocol's wire format (no sockets).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use proptest::prelude::*;

use super::*;

fn samples() -> Vec<Msg> {
    vec![
        Msg::Hello { min: 1, max: 3, flags: FLAG_PUSH, nonce: [7; 32] },
        Msg::Challenge { version: 1, nonce: [1; 32], proof: [2; 32] },
        Msg::Auth { proof: [3; 32] },
        Msg::Welcome { len: 64 << 20, page_size: 4096, state_len: 1234, push_bytes: 8192 },
        Msg::Request { id: 9, offset: 0x40_0000, len: 0x1_0000 },
        Msg::StateReq { id: 4 },
        Msg::Pages {
            id: 0,
            offset: 0x2000,
            kinds: vec![KIND_DATA, KIND_ZERO, KIND_DATA],
            macs: vec![[1; 32], [2; 32], [3; 32]],
            data: vec![0xab; 2 * PAGE],
        },
        Msg::State { id: 4, mac: [5; 32], data: b"state".to_vec() },
        Msg::Failed { id: 3, reason: "corrupt chunk".into() },
        Msg::PushDone,
        Msg::Error { reason: "authentication failed".into() },
    ]
}

#[test]
fn every_message_round_trips() {
    for m in samples() {
        let f = m.encode();
        let (back, used) = decode_frame(&f).unwrap();
        assert_eq!(back, m);
        assert_eq!(used, f.len());
        assert_eq!(read_msg(&mut f.as_slice()).unwrap(), m);
    }
}

#[test]
fn a_stream_of_frames_reads_in_order_then_closed() {
    let mut bytes = Vec::new();
    samples().iter().for_each(|m| bytes.extend(m.encode()));
    let mut r = bytes.as_slice();
    for m in samples() {
        assert_eq!(read_msg(&mut r).unwrap(), m);
    }
    assert!(matches!(read_msg(&mut r), Err(WireError::Closed)));
}

#[test]
fn oversized_frame_is_refused_from_its_header() {
    // Only the header arrives: the length alone refuses it, nothing is waited for or allocated.
    let mut h = vec![K_STATE, 0, 0, 0];
    h.extend_from_slice(&(100u32 << 20).to_le_bytes());
    let e = read_msg(&mut h.as_slice()).unwrap_err();
    assert!(matches!(e, WireError::TooLarge { len, .. } if len == 100 << 20), "{e}");
    assert!(e.to_string().contains("refused"), "{e}");
}

#[test]
fn truncated_frames_are_reported_as_such() {
    let f = samples()[6].encode();
    for cut in [3, HEADER, HEADER + 10, f.len() - 1] {
        let e = read_msg(&mut &f[..cut]).unwrap_err();
        assert!(matches!(e, WireError::Truncated { .. }), "cut at {cut}: {e}");
        assert!(e.to_string().contains("middle of a frame"), "{e}");
    }
}

fn expect_malformed(kind: u8, payload: &[u8], what: &str) {
    let e = decode(kind, payload).unwrap_err();
    assert!(e.to_string().contains(what), "{what}: got {e}");
}

#[test]
fn malformed_payloads_are_refused_with_a_reason() {
    let hello = |magic: &[u8], min: u16, max: u16| {
        let mut p = magic.to_vec();
        p.extend_from_slice(&min.to_le_bytes());
        p.extend_from_slice(&max.to_le_bytes());
        p.push(0);
        p.extend_from_slice(&[0; 32]);
        p
    };
    expect_malformed(K_HELLO, &hello(b"HTTP/1.1", 1, 1), "bad magic");
    expect_malformed(K_HELLO, &hello(&MAGIC, 3, 2), "version range");
    expect_malformed(K_HELLO, &hello(&MAGIC, 0, 2), "version range");
    expect_malformed(K_AUTH, &[0; 31], "short");
    expect_malformed(K_AUTH, &[0; 33], "trailing");
    let req = |id: u32, off: u64, len: u32| {
        let mut p = id.to_le_bytes().to_vec();
        p.extend_from_slice(&off.to_le_bytes());
        p.extend_from_slice(&len.to_le_bytes());
        p
    };
    expect_malformed(K_REQUEST, &req(1, 0x1001, 4096), "request");
    expect_malformed(K_REQUEST, &req(1, 0, 4095), "request");
    expect_malformed(K_REQUEST, &req(1, 0, MAX_REQUEST + 4096), "request");
    expect_malformed(K_REQUEST, &req(0, 0, 4096), "request");
    expect_malformed(K_REQUEST, &req(1, u64::MAX - 4095, 8192), "overflows");
    // Pages whose data does not match their kinds.
    let Msg::Pages { id, offset, kinds, macs, mut data } = samples()[6].clone() else { unreachable!() };
    data.pop();
    let f = Msg::Pages { id, offset, kinds: kinds.clone(), macs: macs.clone(), data: data.clone() }.encode();
    expect_malformed(K_PAGES, &f[HEADER..], "data bytes");
    let f = Msg::Pages { id, offset, kinds: vec![0, 1, 7], macs, data }.encode();
    expect_malformed(K_PAGES, &f[HEADER..], "page kind");
    let mut p = 0u32.to_le_bytes().to_vec();
    p.extend_from_slice(&0u64.to_le_bytes());
    p.extend_from_slice(&1000u32.to_le_bytes());
    expect_malformed(K_PAGES, &p, "1000 pages");
    expect_malformed(K_ERROR, &[0xff, 0xfe], "utf-8");
    expect_malformed(K_ERROR, &vec![b'x'; MAX_REASON + 1], "reason of");
    let mut w = samples()[3].encode();
    w[HEADER + 9] = 0; // page size 0
    expect_malformed(K_WELCOME, &w[HEADER..], "page size");
    assert!(matches!(decode(99, &[]), Err(WireError::UnknownKind(99))));
    let mut f = Msg::PushDone.encode();
    f[2] = 1;
    assert!(decode_frame(&f).unwrap_err().to_string().contains("reserved"));
}

#[test]
fn long_reasons_are_cut_on_a_char_boundary() {
    let m = Msg::Error { reason: "é".repeat(MAX_REASON) };
    let Msg::Error { reason } = decode_frame(&m.encode()).unwrap().0 else { panic!() };
    assert!(reason.len() <= MAX_REASON && reason.chars().all(|c| c == 'é'));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Whatever arrives, decoding returns a message or an error; never panics, never reads past
    /// the frame, and an accepted frame re-encodes to the same bytes.
    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        if let Ok((m, used)) = decode_frame(&bytes) {
            prop_assert!(used <= bytes.len());
            prop_assert_eq!(m.encode(), bytes[..used].to_vec());
        }
    }

    /// Valid headers with random payloads of every kind.
    #[test]
    fn random_payloads_of_each_kind(kind in 0u8..13, payload in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(m) = decode(kind, &payload) {
            prop_assert_eq!(&m.encode()[HEADER..], &payload[..]);
        }
    }

    #[test]
    fn pages_round_trip(id in any::<u32>(), page in 0u64..1 << 30, kinds in proptest::collection::vec(0u8..2, 1..8)) {
        let ndata = kinds.iter().filter(|&&k| k == KIND_DATA).count();
        let macs = kinds.iter().map(|&k| [k; 32]).collect();
        let m = Msg::Pages { id, offset: page * PAGE as u64, kinds, macs, data: vec![0x5a; ndata * PAGE] };
        prop_assert_eq!(decode_frame(&m.encode()).unwrap().0, m);
    }
}
