//! The daemon with a warm pool (`forkvm serve --pool N`): booted sandboxes get shared memory
//! and their forks are live clones into the pool's VMM processes; sandboxes created from a
//! template are restored into pool VMMs; forks the pool cannot serve use fork().
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod daemon_common;

use std::path::Path;

use daemon_common::{forkvm, Daemon};
use serde_json::{json, Value};

/// Pids of the warm members in `run`'s pool.
fn members(run: &Path) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir(run.join(".pool")) else { return Vec::new() };
    rd.flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_suffix(".sock")?.rsplit('-').next()?.parse().ok()
        })
        .collect()
}

/// Stops the pool's members whatever the test's outcome.
struct PoolGuard(std::path::PathBuf);
impl Drop for PoolGuard {
    fn drop(&mut self) {
        let _ = forkvm(&self.0).args(["pool", "stop"]).output();
    }
}

fn kids(f: &Value) -> Vec<(String, u32)> {
    f["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["id"].as_str().unwrap().to_string(), s["pid"].as_u64().unwrap() as u32))
        .collect()
}

#[test]
fn daemon_forks_through_the_warm_pool_and_falls_back_to_fork() {
    let d = Daemon::start_with("pool", &["--pool", "2"]);
    let _pool = PoolGuard(d.run.clone());
    let t = d.token("ws");
    let id = d.create(&t, json!({"memory_mib": 64}));
    assert_eq!(d.line(&t, &id, "count"), "count 1");
    let warm = members(&d.run);
    assert!(warm.len() >= 2, "the daemon keeps 2 warm VMMs of the sandbox's size: {warm:?}");

    let f = d.expect(201, "POST", &format!("/v1/sandboxes/{id}/fork"), &t, Some(json!({"count": 1})));
    let k = kids(&f);
    assert_eq!(k.len(), 1);
    assert!(warm.contains(&k[0].1), "the child runs in a warm pool VMM (pid {} not in {warm:?})", k[0].1);
    assert_eq!(d.line(&t, &k[0].0, "count"), "count 2", "the child continues from the parent's memory");
    assert_eq!(d.line(&t, &id, "count"), "count 2", "the parent runs on");

    // A sandbox from a template is restored into a warm member (checked as its memory comes
    // in from the image); its memory is then private, so its forks use fork().
    let tpl = d.expect(201, "POST", "/v1/templates", &t, Some(json!({"sandbox": id, "name": "t"})));
    let warm = members(&d.run);
    let cv = d.expect(201, "POST", "/v1/sandboxes", &t, Some(json!({"template": tpl["id"].as_str().unwrap()})));
    let c = cv["id"].as_str().unwrap().to_string();
    let cpid = cv["pid"].as_u64().unwrap() as u32;
    assert!(warm.contains(&cpid), "created from the template in a warm pool VMM (pid {cpid} not in {warm:?})");
    let before = members(&d.run);
    let f = d.expect(201, "POST", &format!("/v1/sandboxes/{c}/fork"), &t, Some(json!({"count": 1})));
    let k = kids(&f);
    assert!(!before.contains(&k[0].1), "a fork() child is not a pool member");
    assert_eq!(d.line(&t, &k[0].0, "count"), "count 3", "the fork() child continues from the template");
}

/// Whether `pid` still runs (a zombie does not).
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

#[test]
fn daemon_shutdown_stops_its_warm_pool_but_not_its_sandboxes() {
    let mut d = Daemon::start_logged("poolstop", &["--pool", "2"]);
    let _pool = PoolGuard(d.run.clone());
    let t = d.token("ws");
    let v = d.expect(201, "POST", "/v1/sandboxes", &t, Some(json!({"memory_mib": 64})));
    let sb = v["pid"].as_u64().unwrap() as u32;
    let warm = members(&d.run);
    assert!(warm.len() >= 2, "the daemon keeps 2 warm VMMs: {warm:?}");
    assert!(warm.iter().all(|&p| running(p)));
    let st = d.terminate();
    assert!(st.success(), "the daemon shut down cleanly: {st}");
    let left: Vec<u32> = warm.iter().copied().filter(|&p| running(p)).collect();
    assert!(left.is_empty(), "pool VMMs outlived the daemon: {left:?}");
    assert!(members(&d.run).is_empty(), "no pool sockets left: {:?}", members(&d.run));
    let logs: Vec<_> = std::fs::read_dir(d.run.join(".pool")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(logs.is_empty(), "members stopped cleanly leave no logs: {logs:?}");
    assert!(running(sb), "sandboxes keep running across a daemon restart");
    // It says that it stops, and what it stopped (at the default log level).
    let log = d.log();
    let says = |what: &str| log.lines().any(|l| l.contains(" INFO forkvmd: ") && l.contains(what));
    assert!(says("SIGTERM: shutting down"), "no shutdown line in the daemon's log:\n{log}");
    let n: usize = log
        .split_once("stopped: ")
        .and_then(|(_, r)| r.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no 'stopped: N warm pool VMMs' line in the daemon's log:\n{log}"));
    assert!(n >= warm.len(), "it stopped the {} warm members it had: {n}\n{log}", warm.len());
    assert!(says("warm pool VMMs stopped; 1 sandbox VMM left running"), "{log}");
}
