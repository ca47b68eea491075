//! KVM tier, real sockets against a real VMM with the test guest: the per-VM API serves
//! connections concurrently and bounds what clients send. A 10 s exec, clients that trickle
//! bytes, never send a newline or just sit there, and absurd values never delay `status` or
//! `stop` (execs on the serial console take turns: their lines would mix); `stop` returns once the VMM process is gone. No timed asserts: "not delayed" is shown
//! by order (status answers while the slow request is still running).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::Env;
use forkvm_api::vm::{self, limits, Client, ClientError, RunState};

fn raw(env: &Env, name: &str) -> UnixStream {
    UnixStream::connect(env.run.join(name).join("api.sock")).unwrap()
}

/// Sends `bytes` and reads the whole answer (up to EOF).
fn raw_answer(mut s: UnixStream, bytes: &[u8]) -> String {
    s.write_all(bytes).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

#[test]
fn slow_and_hostile_clients_never_delay_status_or_stop() {
    let mut env = Env::new("conc");
    env.start("c", &[]);
    let client = Client::at(&env.run.join("c"), "c");
    let pid = client.call(vm::Status {}).unwrap().pid;

    // A 10 s exec that never gets its line.
    let slow = client.clone().timeout(Duration::from_secs(30));
    let exec = std::thread::spawn(move || {
        slow.call(vm::Exec { line: "ping".into(), wait_for: Some("never-printed".into()), timeout_ms: 10_000 })
    });
    // A client that never sends anything, one that trickles a request without its newline, and
    // one that sends a huge line.
    let idle = raw(&env, "c");
    let mut trickle = raw(&env, "c");
    for b in br#"{"op":"sta"# {
        trickle.write_all(&[*b]).unwrap();
    }
    let huge = raw(&env, "c");
    let huge_answer = std::thread::spawn(move || raw_answer(huge, &vec![b'x'; limits::MAX_REQUEST_BYTES + 10]));

    for _ in 0..20 {
        let s = client.call(vm::Status {}).unwrap();
        assert_eq!(s.state, RunState::Running);
    }
    assert!(!exec.is_finished(), "status was answered while the 10 s exec runs");

    let a = huge_answer.join().unwrap();
    assert!(a.contains("\"ok\":false") && a.contains("longer than 65536 bytes"), "{a}");

    // Absurd values get clear errors, no panic, and the VM is unharmed.
    for (req, needle) in [
        (r#"{"op":"exec","line":"ping","timeout_ms":18446744073709551615}"#, "timeout_ms must be 1 to 600000"),
        (r#"{"op":"exec","line":"ping","timeout_ms":99999999999999999999999}"#, "bad request"),
        (r#"{"op":"fork","count":18446744073709551615}"#, "fork count must be 1 to 64"),
        (r#"{"op":"snapshot","dir":"relative/dir"}"#, "absolute path"),
    ] {
        let a = raw_answer(raw(&env, "c"), format!("{req}\n").as_bytes());
        assert!(a.contains("\"ok\":false") && a.contains(needle), "{req}: {a}");
    }

    // The trickler and the idle client are cut off at the request deadline with an error.
    let mut a = String::new();
    trickle.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = trickle.read_to_string(&mut a);
    assert!(a.contains("no complete request line within"), "{a}");
    assert!(!exec.is_finished(), "the deadline is the request's, not the exec's");

    // stop is not delayed by the exec either, and returns once the VMM process has exited.
    let stopped = client.clone().timeout(Duration::from_secs(30)).stop().unwrap();
    assert_eq!(stopped.pid, pid);
    assert!(process_gone(pid), "the VMM process {pid} is gone when stop returns");
    assert!(!env.run.join("c").exists(), "its directory is removed");
    match exec.join().unwrap() {
        Err(ClientError::Closed { .. } | ClientError::Read { .. }) => {}
        other => panic!("the exec of a stopped VM: {other:?}"),
    }
    drop(idle);
    assert!(matches!(client.call(vm::Status {}), Err(ClientError::NotRunning { .. })));
}

#[test]
fn connections_beyond_the_limit_get_busy_at_once() {
    let mut env = Env::new("busy");
    env.start("b", &[]);
    let client = Client::at(&env.run.join("b"), "b");
    // Fill every worker with clients that send nothing.
    let idle: Vec<UnixStream> = (0..limits::MAX_CONNECTIONS).map(|_| raw(&env, "b")).collect();
    // The next connection is refused with "busy" at once (not after the others' deadline).
    let mut extra = raw(&env, "b");
    extra.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut a = String::new();
    let _ = extra.read_to_string(&mut a);
    assert!(a.contains("busy"), "{a}");
    // Once the idle clients are gone (closed, or cut off at their deadline), the VM answers again.
    let mut idle = idle.into_iter();
    let mut first = idle.next().unwrap();
    drop(idle);
    let mut b = String::new();
    let _ = first.read_to_string(&mut b);
    assert!(b.contains("no complete request line"), "{b}");
    assert_eq!(client.timeout(Duration::from_secs(30)).call(vm::Status {}).unwrap().state, RunState::Running);
    env.ok(&["stop", "b"]);
}
