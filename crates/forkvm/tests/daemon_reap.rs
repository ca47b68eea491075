//! The daemon reaps the VMM processes it started: one that exits because it hibernated, was
//! deleted or whose guest halted leaves no zombie behind (a zombie also still answers kill(pid, 0),
//! so the daemon would never notice that the VMM had gone).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod daemon_common;

use daemon_common::Daemon;
use serde_json::json;

fn pid(d: &Daemon, t: &str, id: &str) -> u32 {
    let v = d.expect(200, "GET", &format!("/v1/sandboxes/{id}"), t, None);
    u32::try_from(v["pid"].as_u64().unwrap()).unwrap()
}

/// The process state letter of `pid` (`Z` for a zombie), None once it is reaped.
fn proc_state(pid: u32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next())
}

#[test]
fn exited_vmms_are_reaped_not_left_as_zombies() {
    let d = Daemon::start("reap");
    let t = d.token("ws1");
    let never = json!({"pause_after": 0, "hibernate_after": 0});
    // Hibernate: the VMM exits after answering; the call returns once it is gone.
    let a = d.create(&t, json!({"policy": never}));
    let pa = pid(&d, &t, &a);
    d.expect(200, "POST", &format!("/v1/sandboxes/{a}/hibernate"), &t, None);
    assert_eq!(proc_state(pa), None, "the hibernated sandbox's VMM {pa} is left as a zombie");
    // Delete.
    let b = d.create(&t, json!({"policy": never}));
    let pb = pid(&d, &t, &b);
    let r = d.req("DELETE", &format!("/v1/sandboxes/{b}"), &t, None);
    assert!(r.status < 300, "{}", r.status);
    assert_eq!(proc_state(pb), None, "the deleted sandbox's VMM {pb} is left as a zombie");
    // The woken VMM of `a`: its guest halts, the VMM exits by itself; the daemon notices.
    assert_eq!(d.line(&t, &a, "ping"), "pong");
    let pa2 = pid(&d, &t, &a);
    let since = d.last_event(&t, &a);
    let _ = d.req("POST", &format!("/v1/sandboxes/{a}/exec"), &t, Some(json!({"line": "halt"})));
    d.wait_event(&t, since, |e| e["sandbox"] == a.as_str() && e["kind"] == "crashed");
    assert_eq!(proc_state(pa2), None, "the halted sandbox's VMM {pa2} is left as a zombie");
}
