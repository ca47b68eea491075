//! KVM tier through the CLI: `forkvm fork` answers only once every child can be connected to —
//! its API socket and its vsock socket (where the host reaches the guest agent) — and a child
//! that cannot get its vsock socket fails the fork instead of running unreachable.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::net::UnixStream;

use common::Env;

#[test]
fn fork_answers_once_every_child_takes_api_and_vsock_connections() {
    let mut env = Env::new("fork-ready");
    env.start("p", &[]);
    let out = env.ok(&["fork", "p", "--count", "4"]);
    // No waiting here: the fork's answer is the promise.
    for i in 1..=4 {
        let dir = env.run.join(format!("p-c{i}"));
        for sock in ["api.sock", "vsock.sock"] {
            let path = dir.join(sock);
            if let Err(e) = UnixStream::connect(&path) {
                panic!("right after `forkvm fork` ({out}): cannot connect to {}: {e}", path.display());
            }
        }
    }
    for i in 1..=4 {
        assert_eq!(env.exec(&format!("p-c{i}"), "ping"), "pong");
    }
}

#[test]
fn a_child_without_a_vsock_socket_fails_the_fork() {
    let mut env = Env::new("fork-novsock");
    env.start("p", &[]);
    // Something the child cannot replace stands where its vsock socket goes.
    let blocker = env.run.join("p-c2").join("vsock.sock");
    std::fs::create_dir_all(&blocker).unwrap();
    std::fs::write(blocker.join("keep"), b"x").unwrap();
    env.fails(&["fork", "p", "--count", "2"], "p-c2: no vsock socket");
    // That child is not left running unreachable; its sibling and the parent are fine.
    env.fails(&["exec", "p-c2", "ping"], "no running VM named \"p-c2\"");
    assert_eq!(env.exec("p-c1", "ping"), "pong");
    assert_eq!(env.exec("p", "ping"), "pong");
}
