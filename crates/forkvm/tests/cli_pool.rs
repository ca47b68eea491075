//! CLI tier 2: `forkvm pool` and `forkvm fork` through the warm pool (live clones of a
//! shared-memory parent into pre-started VMM processes), and the fallback to fork().
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::Env;

/// Stops the pool's members even when the test fails.
struct PoolStop(std::path::PathBuf);

impl Drop for PoolStop {
    fn drop(&mut self) {
        let _ = std::process::Command::new(env!("CARGO_BIN_EXE_forkvm"))
            .env("FORKVM_RUN_DIR", &self.0)
            .args(["pool", "stop"])
            .output();
    }
}

#[test]
fn fork_live_clones_into_the_warm_pool_and_falls_back_to_fork() {
    let mut env = Env::new("pool");
    let started = env.ok(&["pool", "start", "--size", "2", "--mem", "64M"]);
    let _stop = PoolStop(env.run.clone());
    assert_eq!(started.lines().count(), 2, "{started}");
    let status = env.ok(&["pool", "status"]);
    assert_eq!(status.lines().filter(|l| l.contains("64 MiB")).count(), 2, "{status}");

    env.start("p", &["--backing", "shared"]);
    assert!(env.exec("p", "touch 0x300000 4 1").starts_with("touched"));
    let before = env.exec("p", "sum 0x300000 4");
    let out = env.ok(&["fork", "p", "--count", "2"]);
    assert!(out.contains("p-c1 pid") && out.contains("p-c2 pid"), "{out}");
    assert!(out.contains("live clone into warm pool"), "a shared-memory parent uses the pool: {out}");

    // The parent runs on and writes; the clones keep the memory of the clone instant.
    assert!(env.exec("p", "touch 0x300000 4 3").starts_with("touched"));
    for c in ["p-c1", "p-c2"] {
        assert_eq!(env.exec(c, "ping"), "pong");
        assert_eq!(env.exec(c, "gen"), "gen 2");
        assert_eq!(env.exec(c, "sum 0x300000 4"), before);
    }
    let r: Vec<String> = ["p", "p-c1", "p-c2"].iter().map(|n| env.exec(n, "random")).collect();
    assert!(r[0] != r[1] && r[1] != r[2] && r[0] != r[2], "not twins: {r:?}");
    let status = env.ok(&["status", "p-c2"]);
    assert!(status.contains("\"parent\": \"p\""), "{status}");
    assert!(env.exec("p-c1", "touch 0x300000 4 2").starts_with("touched"));
    assert_eq!(env.exec("p-c2", "sum 0x300000 4"), before);

    // Names in use are refused before anything is cloned.
    env.fails(&["fork", "p", "--count", "1"], "already running: name the children with --prefix");

    // No pool member of its kind: anonymous memory, or another size, forks with fork().
    env.start("a", &[]);
    let out = env.ok(&["fork", "a"]);
    assert!(out.contains("a-c1 pid") && !out.contains("warm pool"), "{out}");
    env.ok(&["run", "--guest", "test", "--mem", "128M", "--name", "big", "--detach", "--backing", "shared"]);
    env.names.push("big".into());
    assert_eq!(env.exec("big", "ping"), "pong");
    let out = env.ok(&["fork", "big"]);
    assert!(out.contains("big-c1 pid") && !out.contains("warm pool"), "{out}");
    assert_eq!(env.exec("big-c1", "gen"), "gen 2");
}

/// The socket paths of the pool's warm members (listening).
fn member_sockets(env: &Env) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(env.run.join(".pool")) else { return Vec::new() };
    let mut v: Vec<String> =
        rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.ends_with(".sock")).collect();
    v.sort();
    v
}

/// Waits (bounded) until the pool has a listening member other than `old`: the replacement a
/// used member starts comes up in the background.
fn replacement(env: &Env, old: &[String]) -> String {
    let t0 = std::time::Instant::now();
    loop {
        if let Some(n) = member_sockets(env).into_iter().find(|n| !old.contains(n)) {
            return n;
        }
        assert!(t0.elapsed() < std::time::Duration::from_secs(30), "no replacement member after {:?}", t0.elapsed());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn the_pool_keeps_its_size_clone_after_clone() {
    let mut env = Env::new("pool-refill");
    env.ok(&["pool", "start", "--size", "1", "--mem", "64M"]);
    let _stop = PoolStop(env.run.clone());
    env.start("p", &["--backing", "shared"]);
    let mut used = member_sockets(&env);
    assert_eq!(used.len(), 1, "{used:?}");
    // Each clone takes the one member; its replacement is the pool's member for the next clone,
    // and that one too is replaced once used (the README: "each clone starts its replacement").
    for prefix in ["a", "b", "c"] {
        let out = env.ok(&["fork", "p", "--prefix", prefix]);
        assert!(out.contains("live clone into warm pool"), "clone {prefix} went to the pool: {out}");
        assert_eq!(env.exec(&format!("{prefix}1"), "gen"), "gen 2");
        used.push(replacement(&env, &used));
    }
}

#[test]
fn pool_status_and_stop_say_what_they_did() {
    let env = Env::new("pool-say");
    let empty = env.cmd(&["pool", "status"]);
    assert!(empty.status.success());
    assert!(String::from_utf8_lossy(&empty.stderr).contains("no warm pool members in"), "{empty:?}");
    env.ok(&["pool", "start", "--size", "1", "--mem", "64M"]);
    let _stop = PoolStop(env.run.clone());
    assert_eq!(env.ok(&["pool", "status"]).lines().count(), 1);
    assert_eq!(env.ok(&["pool", "stop"]).trim_end(), "stopped 1 warm pool member");
    assert_eq!(member_sockets(&env), Vec::<String>::new());
    // A member that stopped cleanly leaves no log behind.
    assert_eq!(pool_files(&env), Vec::<String>::new());
}

/// Every file in the pool directory.
fn pool_files(env: &Env) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(env.run.join(".pool")) else { return Vec::new() };
    let mut v: Vec<String> = rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// The pid in a member's socket name (`m<MiB>-v<vCPUs>-<pid>.sock`).
fn pid_of(sock: &str) -> i32 {
    sock.strip_suffix(".sock").unwrap().rsplit('-').next().unwrap().parse().unwrap()
}

/// kill -9 of a warm member, as a crash: its socket (and log) stay behind.
fn crash(sock: &str) -> i32 {
    let pid = pid_of(sock);
    // SAFETY: kill with a plain pid and signal number (a member this test started).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    common::procs::wait_gone(pid, std::time::Duration::from_secs(30));
    pid
}

#[test]
fn pool_stop_removes_stopped_members_logs_and_keeps_a_crashed_ones() {
    let env = Env::new("pool-logs");
    env.ok(&["pool", "start", "--size", "2", "--mem", "64M"]);
    let _stop = PoolStop(env.run.clone());
    let socks = member_sockets(&env);
    assert_eq!(socks.len(), 2, "{socks:?}");
    let dead = crash(&socks[0]);
    assert_eq!(env.ok(&["pool", "status"]).lines().count(), 1, "only the live member is listed");
    let out = env.ok(&["pool", "stop"]);
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("stopped 1 warm pool member"), "{out}");
    let log = format!("member-{dead}.log");
    assert!(lines.next().is_some_and(|l| l.contains("had exited") && l.contains(&log)), "{out}");
    // The crashed member's log is kept (it may say why); the stopped one's is gone, and so are
    // both sockets.
    assert_eq!(pool_files(&env), [log]);
}

/// A crashed member's socket is no member: a replacement that counts it would find the pool
/// full and leave, one short.
#[test]
fn a_crashed_members_socket_does_not_count_toward_the_pool_size() {
    use std::io::BufRead;
    let env = Env::new("pool-stale");
    env.ok(&["pool", "start", "--size", "1", "--mem", "64M"]);
    let _stop = PoolStop(env.run.clone());
    let socks = member_sockets(&env);
    let dead = crash(&socks[0]);
    assert_eq!(member_sockets(&env), socks, "the crashed member's socket stays");
    let mut r = env
        .command(&["pool", "member", "--mem", "64M", "--keep", "1", "--replacement"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = String::new();
    std::io::BufReader::new(r.stdout.take().unwrap()).read_line(&mut said).unwrap();
    assert!(said.starts_with("warm "), "the replacement joined the pool of 0 live members: {said:?}");
    // And `pool start` counts only live members in the size its members keep.
    env.ok(&["pool", "start", "--size", "1", "--mem", "64M"]);
    let keep_of = |pid: i32| {
        let c = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let c = String::from_utf8_lossy(&c).into_owned();
        c.split('\0').skip_while(|a| *a != "--keep").nth(1).unwrap().to_string()
    };
    let others = member_sockets(&env).into_iter().map(|s| pid_of(&s)).filter(|&p| p != r.id() as i32 && p != dead);
    let new: Vec<i32> = others.collect();
    assert_eq!(new.len(), 1, "{:?}", member_sockets(&env));
    assert_eq!(keep_of(new[0]), "2", "the new member keeps 2 (the replacement and itself)");
    assert!(env.ok(&["pool", "stop"]).starts_with("stopped 2 warm pool members"));
    r.wait().unwrap();
}

/// Replacements keep the pool at its size, not above it: a daemon topping the pool up while a
/// replacement was still starting would otherwise leave one member more each time, for good
/// (every member replaces itself). A replacement that finds the pool full leaves at once.
#[test]
fn a_replacement_that_finds_the_pool_full_leaves() {
    use std::io::Read;
    let env = Env::new("pool-full");
    env.ok(&["pool", "start", "--size", "1", "--mem", "64M"]);
    let _stop = PoolStop(env.run.clone());
    let mut extra = env
        .command(&["pool", "member", "--mem", "64M", "--keep", "1", "--replacement"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = String::new();
    extra.stdout.take().unwrap().read_to_string(&mut said).unwrap();
    let _ = extra.kill();
    assert!(extra.wait().unwrap().success() && said.is_empty(), "it joined a full pool: {said:?}");
    assert_eq!(member_sockets(&env).len(), 1);
}
