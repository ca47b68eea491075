//! `forkvm-agent serve --unix` driven through the agent-proto client: exec, files, clone hook,
//! concurrent sessions, and bad input (oversized and malformed frames, peers that vanish).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use agent_proto::{read_frame, write_frame, Client, ClientError, ExecRequest, Msg, Stream, MAX_FRAME};

const T: Duration = Duration::from_secs(20);

struct Agent {
    child: Child,
    dir: PathBuf,
    sock: PathBuf,
}

impl Agent {
    fn start(name: &str) -> Agent {
        let dir = std::env::temp_dir().join(format!("forkvm-agent-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("hooks")).unwrap();
        let sock = dir.join("agent.sock");
        let mut child = Command::new(env!("CARGO_BIN_EXE_forkvm-agent"))
            .args(["serve", "--no-clock", "--unix"])
            .arg(&sock)
            .arg("--hooks-dir")
            .arg(dir.join("hooks"))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The agent says "serving" once it listens.
        let mut line = String::new();
        BufReader::new(child.stderr.take().unwrap()).read_line(&mut line).unwrap();
        assert!(line.contains("serving"), "{line}");
        Agent { child, dir, sock }
    }

    fn client(&self) -> Client {
        Client::connect_unix(&self.sock, T).unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn argv(a: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: a.iter().map(|s| s.to_string()).collect(),
        env: vec![],
        cwd: None,
        stdin: false,
        timeout_ms: 0,
        max_output: 0,
    }
}

fn run(c: &mut Client, req: ExecRequest, stdin: Option<&[u8]>) -> (Vec<u8>, Vec<u8>, agent_proto::ExitInfo) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let exit = c
        .exec(req, stdin, T, |s, d| match s {
            Stream::Stdout => out.extend_from_slice(d),
            Stream::Stderr => err.extend_from_slice(d),
        })
        .unwrap();
    (out, err, exit)
}

/// Blocks until process `pid` has exited (a pidfd becomes readable), at most `T`.
fn wait_gone(pid: i32) {
    // SAFETY: pidfd_open takes a pid and flags.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if fd < 0 {
        return; // already gone
    }
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    let rc = unsafe { libc::poll(&mut p, 1, T.as_millis() as i32) };
    // SAFETY: closing our pidfd.
    unsafe { libc::close(fd) };
    assert_eq!(rc, 1, "process {pid} still alive after {T:?}");
}

#[test]
fn exec_separates_streams_and_returns_the_exit_code() {
    let a = Agent::start("streams");
    let mut c = a.client();
    c.ping(42, T).unwrap();
    let (out, err, exit) = run(&mut c, argv(&["sh", "-c", "echo out; echo err >&2; exit 3"]), None);
    assert_eq!((out.as_slice(), err.as_slice()), (&b"out\n"[..], &b"err\n"[..]));
    assert_eq!((exit.code, exit.signal, exit.timed_out, exit.truncated), (Some(3), None, false, false));
    // The session goes on: a signal death, then stdin, env and cwd.
    let (_, _, exit) = run(&mut c, argv(&["sh", "-c", "kill -9 $$"]), None);
    assert_eq!((exit.code, exit.signal), (None, Some(9)));
    let mut req = argv(&["sh", "-c", "cat; echo \"$GREETING\"; pwd"]);
    req.env = vec![("GREETING".into(), "hi there".into())];
    req.cwd = Some(a.dir.to_string_lossy().into_owned());
    let big: Vec<u8> = (0..300_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let (out, _, exit) = run(&mut c, req, Some(&big));
    assert_eq!(exit.code, Some(0));
    let want = [big.as_slice(), b"hi there\n", a.dir.to_string_lossy().as_bytes(), b"\n"].concat();
    assert_eq!(out.len(), want.len());
    assert!(out == want);
}

#[test]
fn exec_errors_timeouts_and_bounded_output() {
    let a = Agent::start("bounds");
    let mut c = a.client();
    let e = c.exec(argv(&["/no/such/program"]), None, T, |_, _| {}).unwrap_err();
    assert!(matches!(&e, ClientError::Agent(m) if m.contains("cannot run")), "{e}");
    let e = c.exec(argv(&[]), None, T, |_, _| {}).unwrap_err();
    assert!(matches!(&e, ClientError::Agent(m) if m.contains("empty argv")), "{e}");
    // A timeout kills the whole process group, grandchildren included.
    let pidfile = a.dir.join("pid");
    let mut req = argv(&["sh", "-c", &format!("sleep 100 & echo $! > {}; wait", pidfile.display())]);
    req.timeout_ms = 300;
    let (_, _, exit) = run(&mut c, req, None);
    assert!(exit.timed_out && exit.signal == Some(9), "{exit:?}");
    let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    wait_gone(pid);
    // Output beyond max_output is drained and dropped.
    let mut req = argv(&["sh", "-c", "head -c 5000000 /dev/zero; echo done >&2"]);
    req.max_output = 100_000;
    let (out, err, exit) = run(&mut c, req, None);
    assert!(exit.truncated && exit.code == Some(0), "{exit:?}");
    assert_eq!(out.len() + err.len(), 100_000);
    c.ping(1, T).unwrap();
}

#[test]
fn files_round_trip_in_chunks() {
    let a = Agent::start("files");
    let mut c = a.client();
    let path = a.dir.join("f.bin");
    let p = path.to_str().unwrap();
    let data: Vec<u8> = (0..200_001u32).map(|i| (i * 7) as u8).collect();
    c.write_file(p, 0o600, &data, T).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(c.read_file(p, 1 << 20, T).unwrap() == data);
    assert_eq!(c.read_file(p, 10, T).unwrap(), &data[..10]);
    c.write_file(p, 0o600, b"", T).unwrap();
    assert!(c.read_file(p, 100, T).unwrap().is_empty());
    let e = c.read_file("/no/such/file", 100, T).unwrap_err();
    assert!(matches!(&e, ClientError::Agent(m) if m.contains("cannot open")), "{e}");
    c.ping(2, T).unwrap();
}

#[test]
fn clone_hook_reseeds_and_runs_user_hooks() {
    let a = Agent::start("hook");
    let out = a.dir.join("hook-out");
    let hook = a.dir.join("hooks/10-machine-id");
    std::fs::write(&hook, format!("#!/bin/sh\necho \"gen=$FORKVM_GENERATION\" > {}\n", out.display())).unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bad = a.dir.join("hooks/20-fails");
    std::fs::write(&bad, "#!/bin/sh\nexit 4\n").unwrap();
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(a.dir.join("hooks/30-not-executable"), "#!/bin/sh\n").unwrap();
    let mut c = a.client();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i64;
    let ahead = 3_600_000_000_000i64;
    let d = c.clone_hook(7, &[0x5a; 32], now + ahead, T).unwrap();
    assert_eq!(d.generation, 7);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        assert!(d.reseeded && d.errors.is_empty(), "{d:?}");
    } else {
        assert!(!d.reseeded && d.errors.iter().any(|e| e.contains("reseed")), "{d:?}");
    }
    // --no-clock: the step is measured, not made.
    assert!(!d.clock_set);
    assert!((d.clock_step_ns - ahead).abs() < 10_000_000_000, "{}", d.clock_step_ns);
    let names: Vec<_> = d.hooks.iter().map(|h| (h.name.as_str(), h.ok)).collect();
    assert_eq!(names, [("10-machine-id", true), ("20-fails", false)]);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "gen=7\n");
    // A seed of the wrong size is reported, not fatal.
    let mut s = UnixStream::connect(&a.sock).unwrap();
    write_frame(&mut s, &Msg::CloneHook { generation: 8, host_time_ns: 0 }, b"short").unwrap();
    match read_frame(&mut s).unwrap().msg {
        Msg::CloneHookDone(d) => assert!(!d.reseeded && d.errors[0].contains("expected 32"), "{d:?}"),
        m => panic!("{m:?}"),
    }
}

#[test]
fn sessions_run_concurrently() {
    let a = Agent::start("concurrent");
    let flag = a.dir.join("go");
    let script = format!("while [ ! -e {} ]; do sleep 0.02; done; echo released", flag.display());
    let sock = a.sock.clone();
    let waiter = std::thread::spawn(move || {
        let mut c = Client::connect_unix(&sock, T).unwrap();
        run(&mut c, argv(&["sh", "-c", &script]), None)
    });
    // While the first session's program waits, a second session is served and releases it.
    let mut c = a.client();
    c.ping(3, T).unwrap();
    c.write_file(flag.to_str().unwrap(), 0o644, b"", T).unwrap();
    let (out, _, exit) = waiter.join().unwrap();
    assert_eq!((out.as_slice(), exit.code), (&b"released\n"[..], Some(0)));
}

fn raw_frame(len: u32, rest: &[u8]) -> Vec<u8> {
    [&len.to_le_bytes()[..], rest].concat()
}

/// After any abuse the agent still serves new sessions.
fn still_serves(a: &Agent) {
    a.client().ping(99, T).unwrap();
}

#[test]
fn oversized_and_malformed_frames_close_only_that_session() {
    let a = Agent::start("bad-frames");
    for bytes in [
        raw_frame(MAX_FRAME as u32 + 1, &[0; 8]),
        raw_frame(u32::MAX, &[]),
        raw_frame(6, &[2, 0, 0, 0, b'{', b'{']),
        raw_frame(
            20,
            &[
                16, 0, 0, 0, b'{', b'"', b't', b'"', b':', b'"', b'e', b'x', b'p', b'l', b'o', b'd', b'e', b'"', b'}',
                b' ',
            ],
        ),
    ] {
        let mut s = UnixStream::connect(&a.sock).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        s.write_all(&bytes).unwrap();
        match read_frame(&mut s).unwrap().msg {
            Msg::Error { message } => assert!(message.contains("frame") || message.contains("header"), "{message}"),
            m => panic!("{m:?}"),
        }
        // Then the agent closes this session (a reset if our junk was left unread).
        let mut rest = Vec::new();
        match s.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty()),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
        }
        still_serves(&a);
    }
    // A message the agent does not take is an error, but the session stays usable.
    let mut s = UnixStream::connect(&a.sock).unwrap();
    write_frame(&mut s, &Msg::Pong { nonce: 1 }, b"").unwrap();
    assert!(matches!(read_frame(&mut s).unwrap().msg, Msg::Error { .. }));
    write_frame(&mut s, &Msg::Ping { nonce: 5 }, b"").unwrap();
    assert_eq!(read_frame(&mut s).unwrap().msg, Msg::Pong { nonce: 5 });
    // Another protocol version is refused.
    let mut s = UnixStream::connect(&a.sock).unwrap();
    write_frame(&mut s, &Msg::Hello { version: 999, agent: String::new() }, b"").unwrap();
    assert!(matches!(read_frame(&mut s).unwrap().msg, Msg::Error { message } if message.contains("version 999")));
}

#[test]
fn a_host_that_disconnects_mid_frame_or_mid_exec_is_cleaned_up() {
    let a = Agent::start("disconnect");
    // Half a frame, then gone.
    let mut s = UnixStream::connect(&a.sock).unwrap();
    s.write_all(&raw_frame(100, &[10, 0, 0, 0, b'{'])).unwrap();
    drop(s);
    still_serves(&a);
    // Gone while a program runs: the agent kills its process group.
    let pidfile = a.dir.join("pid");
    let mut s = UnixStream::connect(&a.sock).unwrap();
    let script = format!("sleep 100 & echo $! > {}; echo started; wait", pidfile.display());
    write_frame(&mut s, &Msg::Exec(argv(&["sh", "-c", &script])), b"").unwrap();
    // Once the program said it started, hang up.
    let f = read_frame(&mut s).unwrap();
    assert_eq!((f.msg, f.data.as_slice()), (Msg::Stdout, &b"started\n"[..]));
    drop(s);
    let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    wait_gone(pid);
    // Gone while its stdin was still being streamed.
    let mut s = UnixStream::connect(&a.sock).unwrap();
    let mut req = argv(&["cat"]);
    req.stdin = true;
    write_frame(&mut s, &Msg::Exec(req), b"").unwrap();
    write_frame(&mut s, &Msg::Stdin { eof: false }, b"partial").unwrap();
    drop(s);
    still_serves(&a);
}

#[test]
fn reseed_subcommand_still_parses() {
    let out = Command::new(env!("CARGO_BIN_EXE_forkvm-agent")).args(["reseed", "zz"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a hex digit"));
    let _ = Path::new("");
}
