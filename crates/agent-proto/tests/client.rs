//! The client against fake peers: an agent that never answers, a vsock socket with and without a
//! listener behind it, and an agent that sends junk or hangs up mid-stream.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use agent_proto::*;

fn sock(name: &str) -> (PathBuf, UnixListener) {
    let p = std::env::temp_dir().join(format!("forkvm-proto-{}-{name}.sock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    let l = UnixListener::bind(&p).unwrap();
    (p, l)
}

/// A fake agent: answers hello, then runs `then` on the connection.
fn fake(
    l: UnixListener,
    vsock: bool,
    then: impl FnOnce(&mut UnixStream) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        if vsock {
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            assert_eq!(line, "CONNECT 52\n");
            s.write_all(b"OK 1073741824\n").unwrap();
        }
        assert!(matches!(read_frame(&mut s).unwrap().msg, Msg::Hello { version: VERSION, .. }));
        write_frame(&mut s, &Msg::Hello { version: VERSION, agent: "fake".into() }, b"").unwrap();
        then(&mut s);
    })
}

#[test]
fn an_agent_that_never_answers_times_out_clearly() {
    let (p, l) = sock("silent");
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let t = fake(l, true, move |s| {
        let _ = read_frame(s); // the exec request, never answered
        let _ = rx.recv(); // hold the connection open until the client gave up
    });
    let mut c = Client::connect_vsock(&p, AGENT_PORT, Duration::from_secs(5)).unwrap();
    assert_eq!(c.agent, "fake");
    let req =
        ExecRequest { argv: vec!["true".into()], env: vec![], cwd: None, stdin: false, timeout_ms: 0, max_output: 0 };
    let e = c.exec(req, None, Duration::from_millis(200), |_, _| {}).unwrap_err();
    assert!(matches!(e, ClientError::Timeout(_)), "{e}");
    assert!(e.to_string().contains("did not answer within"), "{e}");
    tx.send(()).unwrap();
    t.join().unwrap();
}

#[test]
fn a_vsock_socket_without_a_listener_says_so() {
    // Firecracker closes the host connection when nothing listens on the guest port.
    let (p, l) = sock("nolistener");
    let t = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
    });
    let e = Client::connect_vsock(&p, AGENT_PORT, Duration::from_secs(5)).unwrap_err();
    assert!(matches!(e, ClientError::NoListener { port: 52, .. }), "{e}");
    t.join().unwrap();
    let (p, l) = sock("refuses");
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.write_all(b"NOPE\n").unwrap();
    });
    let e = Client::connect_vsock(&p, AGENT_PORT, Duration::from_secs(5)).unwrap_err();
    assert!(e.to_string().contains("NOPE"), "{e}");
    t.join().unwrap();
    let missing = std::env::temp_dir().join("forkvm-proto-no-such.sock");
    assert!(matches!(Client::connect_vsock(&missing, 52, Duration::from_secs(1)), Err(ClientError::Connect { .. })));
}

#[test]
fn an_agent_that_hangs_up_mid_stream_or_sends_junk_is_an_error() {
    let (p, l) = sock("hangup");
    let t = fake(l, false, |s| {
        let _ = read_frame(s);
        write_frame(s, &Msg::Stdout, b"partial").unwrap();
        // Half of the next frame, then gone.
        s.write_all(&[100, 0, 0, 0, 1]).unwrap();
    });
    let mut c = Client::connect_unix(&p, Duration::from_secs(5)).unwrap();
    let mut got = Vec::new();
    let req =
        ExecRequest { argv: vec!["x".into()], env: vec![], cwd: None, stdin: false, timeout_ms: 0, max_output: 0 };
    let e = c.exec(req.clone(), None, Duration::from_secs(5), |_, d| got.extend_from_slice(d)).unwrap_err();
    assert!(matches!(e, ClientError::Closed), "{e}");
    assert_eq!(got, b"partial");
    t.join().unwrap();

    let (p, l) = sock("junk");
    let t = fake(l, false, |s| {
        let _ = read_frame(s);
        s.write_all(&u32::MAX.to_le_bytes()).unwrap();
    });
    let mut c = Client::connect_unix(&p, Duration::from_secs(5)).unwrap();
    let e = c.exec(req, None, Duration::from_secs(5), |_, _| {}).unwrap_err();
    assert!(matches!(e, ClientError::Protocol(ref m) if m.contains("limit")), "{e}");
    t.join().unwrap();
}

/// A VM whose vsock socket accepts nothing more (its listen backlog is full: a stuck VMM, or
/// many clients at once) made connect(2) block without bound; now the connect gives up after
/// the client's timeout with a clear error.
#[test]
fn a_socket_whose_backlog_is_full_is_a_bounded_error() {
    use socket2::{Domain, SockAddr, Socket, Type};
    let p = std::env::temp_dir().join(format!("forkvm-proto-{}-full.sock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    let addr = SockAddr::unix(&p).unwrap();
    let l = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
    l.bind(&addr).unwrap();
    l.listen(0).unwrap();
    let mut held = Vec::new();
    for _ in 0..1000 {
        let s = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        s.set_nonblocking(true).unwrap();
        match s.connect(&addr) {
            Ok(()) => held.push(s),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(!held.is_empty() && held.len() < 1000, "the backlog never filled ({} connections)", held.len());
    let (tx, rx) = std::sync::mpsc::channel();
    let path = p.clone();
    std::thread::spawn(move || {
        let r = Client::connect_vsock(&path, AGENT_PORT, Duration::from_millis(300));
        let _ = tx.send(r.err().map(|e| e.to_string()));
    });
    // A hang detector, not a timing: the connect must come back at all.
    let e = rx.recv_timeout(Duration::from_secs(30)).expect("connect blocked on a full backlog");
    let e = e.expect("connected to a socket that accepts nothing");
    assert!(e.contains("accepted no connection within"), "{e}");
    drop((l, held));
    let _ = std::fs::remove_file(&p);
}
