//! KVM tier: a name that holds a hibernation is never reused silently — not by `run`, not by
//! `restore`, not by a fork child — and the hibernation survives the attempts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::Env;

#[test]
fn a_hibernated_name_is_never_reused() {
    let mut env = Env::new("names");
    env.start("h", &[]);
    assert!(env.exec("h", "touch 0x400000 4 0x37").starts_with("touched"));
    let sum = env.exec("h", "sum 0x400000 4");
    env.start("p", &[]);
    let snap = env.run.with_extension("snap");
    env.ok(&["snapshot", "p", snap.to_str().unwrap()]);
    env.ok(&["hibernate", "h"]);

    env.fails(&["run", "--guest", "test", "--mem", "64M", "--name", "h", "--detach"], "is hibernated");
    env.fails(&["run", "--guest", "test", "--mem", "64M", "--name", "h"], "is hibernated");
    env.fails(&["restore", snap.to_str().unwrap(), "--name", "h", "--detach"], "is hibernated");
    // A fork whose child names include a hibernated one forks nothing.
    env.start("f2", &[]);
    env.ok(&["hibernate", "f2"]);
    env.fails(&["fork", "p", "--count", "2", "--prefix", "f"], "\"f2\" is hibernated");
    let ls = env.ok(&["ls"]);
    assert!(!ls.lines().any(|l| l.starts_with("f1 ")), "nothing forked: {ls}");
    assert!(ls.lines().any(|l| l.starts_with("f2 ") && l.contains("hibernated")), "{ls}");

    // The hibernation is intact: it wakes with its memory.
    let ls = env.ok(&["ls"]);
    assert!(ls.lines().any(|l| l.starts_with("h ") && l.contains("hibernated")), "{ls}");
    env.ok(&["wake", "h"]);
    assert_eq!(env.exec("h", "sum 0x400000 4"), sum);
}
