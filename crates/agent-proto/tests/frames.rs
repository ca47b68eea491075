//! Round trips and malformed frames.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Cursor;

use agent_proto::*;

fn rt(msg: Msg, data: &[u8]) {
    let mut buf = Vec::new();
    write_frame(&mut buf, &msg, data).unwrap();
    let f = read_frame(&mut Cursor::new(&buf)).unwrap();
    assert_eq!(f, Frame::with_data(msg, data.to_vec()));
}

fn raw(header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&((4 + header.len() + data.len()) as u32).to_le_bytes());
    v.extend_from_slice(&(header.len() as u32).to_le_bytes());
    v.extend_from_slice(header);
    v.extend_from_slice(data);
    v
}

fn decode(bytes: &[u8]) -> Result<Frame, FrameError> {
    read_frame(&mut Cursor::new(bytes))
}

#[test]
fn every_message_round_trips() {
    rt(Msg::Hello { version: VERSION, agent: "forkvm-agent 0.1".into() }, b"");
    rt(Msg::Ping { nonce: u64::MAX }, b"");
    rt(Msg::Pong { nonce: 7 }, b"");
    rt(
        Msg::Exec(ExecRequest {
            argv: vec!["sh".into(), "-c".into(), "echo é; exit 3".into()],
            env: vec![("A".into(), "b=c".into())],
            cwd: Some("/tmp".into()),
            stdin: true,
            timeout_ms: 5000,
            max_output: 1 << 20,
        }),
        b"",
    );
    rt(Msg::Stdin { eof: true }, b"input\x00\xff");
    rt(Msg::Stdout, &[0u8; MAX_DATA]);
    rt(Msg::Stderr, b"err");
    rt(Msg::Exit { code: Some(3), signal: None, timed_out: false, truncated: true }, b"");
    rt(Msg::ReadFile(ReadFileRequest { path: "/etc/hostname".into(), offset: 3, max_len: 9 }), b"");
    rt(Msg::FileData { eof: true }, b"data");
    rt(Msg::WriteFile(WriteFileRequest { path: "/x".into(), mode: 0o600, append: true }), b"chunk");
    rt(Msg::Written { bytes: 5 }, b"");
    rt(Msg::CloneHook { generation: 2, host_time_ns: -1 }, &[7u8; SEED_LEN]);
    rt(
        Msg::CloneHookDone(HookDone {
            generation: 2,
            reseeded: true,
            entropy_before: 1,
            entropy_after: 256,
            clock_step_ns: -5,
            clock_set: true,
            hooks: vec![HookResult { name: "10-machine-id".into(), ok: false, detail: "exit 1".into() }],
            errors: vec![],
        }),
        b"",
    );
    rt(Msg::Error { message: "no".into() }, b"");
}

#[test]
fn defaults_fill_optional_fields() {
    let f = decode(&raw(br#"{"t":"exec","argv":["true"]}"#, b"")).unwrap();
    match f.msg {
        Msg::Exec(e) => {
            assert_eq!(e.argv, ["true"]);
            assert!(e.env.is_empty() && e.cwd.is_none() && !e.stdin && e.timeout_ms == 0);
        }
        m => panic!("{m:?}"),
    }
    let f = decode(&raw(br#"{"t":"write_file","path":"/a"}"#, b"x")).unwrap();
    assert_eq!(f.msg, Msg::WriteFile(WriteFileRequest { path: "/a".into(), mode: 0o644, append: false }));
}

#[test]
fn several_frames_in_one_stream() {
    let mut buf = Vec::new();
    for n in 0..3 {
        write_frame(&mut buf, &Msg::Ping { nonce: n }, b"").unwrap();
    }
    let mut c = Cursor::new(&buf);
    for n in 0..3 {
        assert_eq!(read_frame(&mut c).unwrap().msg, Msg::Ping { nonce: n });
    }
    assert!(matches!(read_frame(&mut c), Err(FrameError::Closed)));
}

#[test]
fn oversized_frames_are_refused_before_allocating() {
    for len in [MAX_FRAME as u32 + 1, u32::MAX] {
        let mut v = len.to_le_bytes().to_vec();
        v.extend_from_slice(&[0u8; 16]);
        assert!(matches!(decode(&v), Err(FrameError::TooBig(_))), "{len}");
    }
    // The writer refuses too.
    assert!(write_frame(&mut Vec::new(), &Msg::Stdout, &vec![0u8; MAX_DATA + 1]).is_err());
    let huge = Msg::Error { message: "x".repeat(MAX_HEADER) };
    assert!(write_frame(&mut Vec::new(), &huge, b"").is_err());
    // A header length larger than the frame, or over the header limit.
    let mut v = raw(br#"{"t":"ping","nonce":1}"#, b"");
    v[4..8].copy_from_slice(&1000u32.to_le_bytes());
    assert!(matches!(decode(&v), Err(FrameError::Malformed(_))));
    let mut v = raw(&[b' '; 16], &vec![0u8; MAX_DATA]);
    v[4..8].copy_from_slice(&(MAX_HEADER as u32 + 1).to_le_bytes());
    assert!(matches!(decode(&v), Err(FrameError::Malformed(_))));
    // Data over MAX_DATA inside a legal-sized frame (small header, the rest data).
    let v = raw(br#"{"t":"stdout"}"#, &vec![0u8; MAX_DATA + 100]);
    assert!(matches!(decode(&v), Err(FrameError::Malformed(_))));
}

#[test]
fn malformed_frames_are_clear_errors() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (raw(b"{", b""), "header"),
        (raw(b"[]", b""), "header"),
        (raw(br#"{"t":"explode"}"#, b""), "header"),
        (raw(br#"{"t":"ping"}"#, b""), "header"),
        (raw(br#"{"t":"ping","nonce":1,"extra":2}"#, b""), "header"),
        (raw(br#"{"t":"ping","nonce":-1}"#, b""), "header"),
        (raw(&[0xff, 0xfe], b""), "header"),
        (raw(br#"{"t":"ping","nonce":1}"#, b"data"), "carries no data"),
        (2u32.to_le_bytes().iter().chain(&[0, 0]).copied().collect(), "no header length"),
    ];
    for (bytes, want) in cases {
        match decode(&bytes) {
            Err(FrameError::Malformed(m)) => assert!(m.contains(want), "{m} lacks {want}"),
            other => panic!("{bytes:?}: {other:?}"),
        }
    }
}

#[test]
fn truncated_frames_are_disconnects_not_junk() {
    let mut buf = Vec::new();
    write_frame(&mut buf, &Msg::Stdout, b"hello").unwrap();
    assert!(matches!(decode(&[]), Err(FrameError::Closed)));
    for cut in 1..buf.len() {
        let e = decode(&buf[..cut]).unwrap_err();
        assert!(e.is_disconnect(), "cut at {cut}: {e}");
    }
}

#[test]
fn random_bytes_never_panic() {
    // A cheap deterministic fuzz: xorshift bytes, with and without a plausible length prefix.
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..5000 {
        let mut v = Vec::new();
        let n = (i % 300) + 1;
        for _ in 0..n {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            v.push(s as u8);
        }
        if i % 2 == 0 {
            let len = (v.len() - 4.min(v.len())) as u32;
            v[..4.min(n)].copy_from_slice(&len.to_le_bytes()[..4.min(n)]);
        }
        let _ = decode(&v);
    }
}
