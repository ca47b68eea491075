//! KVM tier through the CLI: named VMs behind their API sockets — detach, exec, pause/resume,
//! snapshot, restore, fork, ls, stop — and the errors bad requests get.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::Env;

fn count(s: &str) -> u64 {
    s.strip_prefix("count ").and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("not a count answer: {s:?}"))
}

#[test]
fn detach_exec_pause_resume_snapshot_restore_stop() {
    let mut env = Env::new("life");
    env.start("a", &[]);
    let c1 = count(&env.exec("a", "count"));
    env.ok(&["pause", "a"]);
    env.fails(&["exec", "a", "ping"], "paused");
    let ls = env.ok(&["ls"]);
    assert!(ls.lines().any(|l| l.starts_with("a ") && l.contains("paused")), "{ls}");
    env.ok(&["resume", "a"]);
    assert_eq!(count(&env.exec("a", "count")), c1 + 1);

    let snap = env.run.with_extension("snap-a");
    let out = env.ok(&["snapshot", "a", snap.to_str().unwrap()]);
    assert!(out.contains("full snapshot"), "{out}");
    assert!(env.exec("a", "touch 0x300000 2 9").starts_with("touched"));
    let diff = env.run.with_extension("snap-a-diff");
    assert!(env.ok(&["snapshot", "a", diff.to_str().unwrap(), "--diff"]).contains("diff snapshot"));

    // Restored VMs continue from the snapshot, independently of the original.
    env.ok(&["restore", snap.to_str().unwrap(), "--cow", "--name", "b", "--detach"]);
    env.names.push("b".into());
    assert_eq!(count(&env.exec("b", "count")), c1 + 2);
    assert_eq!(count(&env.exec("a", "count")), c1 + 2);
    // Booted VMs are generation 1; every restore or fork bumps it.
    assert_eq!(env.exec("a", "gen"), "gen 1");
    assert_eq!(env.exec("b", "gen"), "gen 2");
    env.ok(&["restore", diff.to_str().unwrap(), "--name", "c", "--detach"]);
    assert_eq!(env.exec("c", "sum 0x300000 2"), env.exec("a", "sum 0x300000 2"));

    env.fails(&["restore", snap.to_str().unwrap(), "--mem", "128M", "--name", "d", "--detach"], "64 MiB");
    env.fails(&["restore", "/nonexistent/snap", "--name", "d", "--detach"], "cannot read snapshot state");
    env.fails(&["run", "--guest", "test", "--mem", "64M", "--name", "a", "--detach"], "already running");

    for n in ["a", "b", "c"] {
        env.ok(&["stop", n]);
    }
    env.fails(&["exec", "a", "ping"], "no running VM named \"a\"");
    let ls = env.ok(&["ls"]);
    assert_eq!(ls.lines().count(), 1, "only the header is left: {ls}");
}

#[test]
fn fork_children_are_independent_named_vms() {
    let mut env = Env::new("fork");
    env.start("p", &[]);
    assert!(env.exec("p", "touch 0x300000 4 1").starts_with("touched"));
    let before = env.exec("p", "sum 0x300000 4");
    let out = env.ok(&["fork", "p", "--count", "2"]);
    assert!(out.contains("p-c1 pid") && out.contains("p-c2 pid"), "{out}");

    // Not twins: new generation, different randomness; all three keep running.
    let r: Vec<String> = ["p", "p-c1", "p-c2"].iter().map(|n| env.exec(n, "random")).collect();
    assert!(r[0] != r[1] && r[1] != r[2] && r[0] != r[2], "{r:?}");
    assert_eq!(env.exec("p-c1", "gen"), "gen 2");
    let status = env.ok(&["status", "p-c2"]);
    assert!(status.contains("\"parent\": \"p\""), "{status}");

    // Writes in one never show in another.
    assert!(env.exec("p-c1", "touch 0x300000 4 2").starts_with("touched"));
    assert_eq!(env.exec("p", "sum 0x300000 4"), before);
    assert_eq!(env.exec("p-c2", "sum 0x300000 4"), before);
    assert_ne!(env.exec("p-c1", "sum 0x300000 4"), before);

    // Children fork too; names in use are refused before anything forks.
    env.fails(&["fork", "p", "--count", "1"], "already running: name the children with --prefix");
    assert!(env.ok(&["fork", "p-c1", "--prefix", "g"]).contains("g1 pid"));
    assert_eq!(env.exec("g1", "sum 0x300000 4"), env.exec("p-c1", "sum 0x300000 4"));
    env.fails(&["fork", "p", "--count", "0"], "fork count");
    env.fails(&["fork", "p", "--prefix", "bad/name"], "invalid VM name");

    // A stopped parent cannot be forked; its children live on.
    env.ok(&["stop", "p"]);
    env.fails(&["fork", "p"], "no running VM named");
    assert_eq!(env.exec("p-c2", "ping"), "pong");
}

#[test]
fn without_dirty_logging_a_vm_takes_full_snapshots_and_refuses_diffs() {
    let mut env = Env::new("nodirty");
    env.start("n", &["--no-dirty-log"]);
    assert!(env.exec("n", "touch 0x400000 16 0x5a").starts_with("touched"));
    let sum = env.exec("n", "sum 0x400000 16");
    let full = env.run.with_extension("snap-n");
    assert!(env.ok(&["snapshot", "n", full.to_str().unwrap()]).contains("full snapshot"));
    let diff = env.run.with_extension("snap-n-diff");
    env.fails(&["snapshot", "n", diff.to_str().unwrap(), "--diff"], "dirty page tracking is off");
    env.ok(&["stop", "n"]);
    env.ok(&["restore", full.to_str().unwrap(), "--name", "r", "--detach"]);
    env.names.push("r".into());
    assert_eq!(env.exec("r", "sum 0x400000 16"), sum);
}

#[test]
fn bad_requests_get_clear_errors() {
    let mut env = Env::new("bad");
    env.fails(&["exec", "ghost", "ping"], "no running VM named \"ghost\"");
    env.fails(&["pause", "../etc"], "invalid VM name");
    let out = env.cmd(&["run", "--guest", "test", "--detach"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--name <NAME>"));
    env.start("v", &[]);
    // Raw protocol junk on the socket: an error answer, the VM unharmed.
    use std::io::{BufRead, BufReader, Write};
    for junk in ["{\"op\":\"explode\"}\n", "not json\n", "{\"op\":\"snapshot\"}\n"] {
        let mut s = std::os::unix::net::UnixStream::connect(env.run.join("v/api.sock")).unwrap();
        s.write_all(junk.as_bytes()).unwrap();
        let mut answer = String::new();
        BufReader::new(&s).read_line(&mut answer).unwrap();
        assert!(answer.contains("\"ok\":false") && answer.contains("bad request"), "{answer}");
    }
    env.fails(&["snapshot", "v", "/proc/forkvm-cannot-write-here"], "cannot create snapshot directory");
    env.fails(&["exec", "v", "--timeout", "1", "--wait-for", "never-printed", "ping"], "no answer");
    assert_eq!(env.exec("v", "ping"), "pong");
}

#[test]
fn hibernate_frees_the_vmm_and_wake_continues_lazily() {
    let mut env = Env::new("hib");
    env.start("h", &[]);
    assert!(env.exec("h", "touch 0x400000 8 0x42").starts_with("touched"));
    let sum = env.exec("h", "sum 0x400000 8");
    let c = count(&env.exec("h", "count"));
    let out = env.ok(&["hibernate", "h"]);
    assert!(out.contains("hibernated in") && out.contains("pages zero"), "{out}");
    env.fails(&["exec", "h", "ping"], "no running VM named");
    let ls = env.ok(&["ls"]);
    assert!(ls.lines().any(|l| l.starts_with("h ") && l.contains("hibernated")), "{ls}");

    // `resume` of a hibernated VM wakes it: a new VMM process, memory served on demand.
    env.ok(&["resume", "h"]);
    assert_eq!(count(&env.exec("h", "count")), c + 1);
    assert_eq!(env.exec("h", "sum 0x400000 8"), sum);
    assert_eq!(env.exec("h", "gen"), "gen 2");
    // Again, with the working set recorded by the first wake.
    env.ok(&["hibernate", "h"]);
    env.ok(&["wake", "h"]);
    assert_eq!(count(&env.exec("h", "count")), c + 2);
    // A child of a woken VM gets all of its memory, not just what the parent touched so far.
    env.ok(&["fork", "h"]);
    assert_eq!(env.exec("h-c1", "sum 0x400000 8"), sum);
    assert_eq!(count(&env.exec("h-c1", "count")), c + 3);
    env.ok(&["stop", "h-c1"]);
    env.ok(&["stop", "h"]);

    env.fails(&["wake", "h"], "no hibernated VM named \"h\"");
    env.fails(&["hibernate", "ghost"], "no running VM named");
}
