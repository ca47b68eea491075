//! KVM tier through the CLI: `forkvm exec NAME -- ARGV` through a guest agent, the clone hook that
//! runs before any other guest request of a restored VM, an agent that never answers, and a guest
//! without an agent. The test guest has no vsock driver, so the agent here is a scripted one on a
//! Unix socket (`FORKVM_AGENT_SOCKET`); the real agent is tested in crates/guest-agent and, in a
//! Linux guest over vsock, by tools/e2e/l2-agent.sh.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;

use agent_proto::{read_frame, write_frame, HookDone, Msg, VERSION};

struct Env {
    run: PathBuf,
    agent: PathBuf,
}

impl Env {
    fn new(tag: &str) -> Self {
        let run = std::env::temp_dir().join(format!("forkvm-cli-agent-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run);
        std::fs::create_dir_all(&run).unwrap();
        let agent = run.with_extension("agent.sock");
        let _ = std::fs::remove_file(&agent);
        Env { run, agent }
    }

    fn command(&self, args: &[&str], with_agent: bool) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_forkvm"));
        c.env("FORKVM_RUN_DIR", &self.run).args(args);
        if with_agent {
            c.env("FORKVM_AGENT_SOCKET", &self.agent);
        }
        c
    }

    fn run(&self, args: &[&str], with_agent: bool) -> Output {
        let out = self.command(args, with_agent).output().unwrap();
        assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"), "{args:?}");
        out
    }

    fn ok(&self, args: &[&str], with_agent: bool) -> String {
        let out = self.run(args, with_agent);
        let so = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "forkvm {args:?}: {}{so}", String::from_utf8_lossy(&out.stderr));
        so
    }

    fn status(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["status", name], false)).unwrap()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Ok(rd) = std::fs::read_dir(&self.run) {
            for e in rd.flatten() {
                let _ = self.run(&["stop", &e.file_name().to_string_lossy()], false);
            }
        }
        let _ = std::fs::remove_dir_all(&self.run);
        let _ = std::fs::remove_dir_all(self.run.with_extension("snap"));
        let _ = std::fs::remove_file(&self.agent);
    }
}

/// What the scripted agent saw, in order.
#[derive(Debug, PartialEq)]
enum Seen {
    Hook { generation: u64, seed_len: usize, host_time_ns: i64 },
    Exec(Vec<String>),
}

/// A scripted agent: answers hello; clone hooks with `Done` once `release` says so; exec of
/// `sh -c ...` with "out" / "err" and exit 3 (or never, if `silent`).
/// Sessions are served concurrently, so the order in which requests reach it is the VMM's.
fn fake_agent(l: UnixListener, silent: bool, release: mpsc::Receiver<()>, seen: mpsc::Sender<Seen>) {
    let release = std::sync::Arc::new(std::sync::Mutex::new(release));
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let (release, seen) = (release.clone(), seen.clone());
            std::thread::spawn(move || session(s, silent, &release, &seen));
        }
    });
}

fn session(mut s: UnixStream, silent: bool, release: &std::sync::Mutex<mpsc::Receiver<()>>, seen: &mpsc::Sender<Seen>) {
    {
        {
            let mut silent_hold = None;
            while let Ok(f) = read_frame(&mut s) {
                match f.msg {
                    Msg::Hello { .. } => {
                        write_frame(&mut s, &Msg::Hello { version: VERSION, agent: "scripted".into() }, b"").unwrap()
                    }
                    Msg::CloneHook { generation, host_time_ns } => {
                        let _ = seen.send(Seen::Hook { generation, seed_len: f.data.len(), host_time_ns });
                        let _ = release.lock().unwrap().recv();
                        let done = HookDone {
                            generation,
                            reseeded: true,
                            entropy_before: 0,
                            entropy_after: 256,
                            clock_step_ns: 0,
                            clock_set: true,
                            hooks: vec![],
                            errors: vec![],
                        };
                        write_frame(&mut s, &Msg::CloneHookDone(done), b"").unwrap();
                    }
                    Msg::Exec(req) => {
                        let _ = seen.send(Seen::Exec(req.argv.clone()));
                        if silent {
                            silent_hold = Some(s.try_clone().unwrap()); // never answer, keep it open
                            continue;
                        }
                        if req.argv[0] == "flood" {
                            // A guest that ignores max_output: 4 MiB of stdout.
                            for _ in 0..64 {
                                write_frame(&mut s, &Msg::Stdout, &[b'x'; 65536]).unwrap();
                            }
                        }
                        write_frame(&mut s, &Msg::Stdout, b"out\n").unwrap();
                        write_frame(&mut s, &Msg::Stderr, b"err\n").unwrap();
                        let exit = Msg::Exit { code: Some(3), signal: None, timed_out: false, truncated: false };
                        write_frame(&mut s, &exit, b"").unwrap();
                    }
                    m => panic!("unexpected {m:?}"),
                }
            }
            drop(silent_hold);
        }
    }
}

fn agent(env: &Env, silent: bool) -> (mpsc::Sender<()>, mpsc::Receiver<Seen>) {
    let l = UnixListener::bind(&env.agent).unwrap();
    let (rel_tx, rel_rx) = mpsc::channel();
    let (seen_tx, seen_rx) = mpsc::channel();
    fake_agent(l, silent, rel_rx, seen_tx);
    (rel_tx, seen_rx)
}

#[test]
fn exec_through_the_agent_prints_streams_apart_and_exits_with_the_code() {
    let env = Env::new("exec");
    let (_rel, seen) = agent(&env, false);
    env.ok(&["run", "--guest", "test", "--mem", "64M", "--name", "a", "--detach"], true);
    let out = env.run(&["exec", "a", "--", "sh", "-c", "echo out; echo err >&2; exit 3"], false);
    // Without FORKVM_AGENT_SOCKET the VMM would look behind its vsock socket: the VMM process
    // got the variable at start, the CLI needs nothing.
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(
        seen.recv().unwrap(),
        Seen::Exec(vec!["sh".into(), "-c".into(), "echo out; echo err >&2; exit 3".into()])
    );
    // An agent that sends more than the bound: the answer is cut, not the VMM's memory grown.
    let out = env.run(&["exec", "a", "--", "flood"], false);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(out.stdout.len(), 1 << 20);
    assert!(String::from_utf8_lossy(&out.stderr).contains("output truncated"));
    assert_eq!(seen.recv().unwrap(), Seen::Exec(vec!["flood".into()]));
    // A booted VM is not a clone; the serial console still works the old way.
    assert_eq!(env.status("a")["reseeded"], serde_json::Value::Null);
    assert_eq!(env.ok(&["exec", "a", "ping"], false).trim(), "pong");
}

#[test]
fn a_restored_vm_runs_the_clone_hook_before_any_guest_request() {
    let env = Env::new("hook");
    env.ok(&["run", "--guest", "test", "--mem", "64M", "--name", "a", "--detach"], false);
    let snap = env.run.with_extension("snap");
    env.ok(&["snapshot", "a", snap.to_str().unwrap()], false);
    let (release, seen) = agent(&env, false);
    env.ok(&["restore", snap.to_str().unwrap(), "--name", "b", "--detach"], true);
    // The hook is waiting for the agent's answer: the status says so, and a guest request waits.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i64;
    match seen.recv().unwrap() {
        Seen::Hook { generation, seed_len, host_time_ns } => {
            assert_eq!((generation, seed_len), (2, 32));
            assert!((now - host_time_ns).abs() < 60_000_000_000, "host clock {host_time_ns} vs {now}");
        }
        s => panic!("first request was {s:?}"),
    }
    assert_eq!(env.status("b")["reseeded"], "pending");
    let exec = env.command(&["exec", "b", "--", "true"], false).stdout(Stdio::piped()).spawn().unwrap();
    let serial = env.command(&["exec", "b", "ping"], false).stdout(Stdio::piped()).spawn().unwrap();
    release.send(()).unwrap();
    let (exec, serial) = (exec.wait_with_output().unwrap(), serial.wait_with_output().unwrap());
    assert_eq!(exec.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&serial.stdout).trim(), "pong");
    // The exec reached the agent only after the hook was answered (the agent saw it second).
    assert_eq!(seen.recv().unwrap(), Seen::Exec(vec!["true".into()]));
    let st = env.status("b");
    assert_eq!(st["reseeded"], true, "{st}");
    assert_eq!(st["clone_hook"]["generation"], 2);
}

#[test]
fn an_agent_that_never_answers_times_out_and_the_vm_is_unharmed() {
    let env = Env::new("silent");
    let (_rel, _seen) = agent(&env, true);
    env.ok(&["run", "--guest", "test", "--mem", "64M", "--name", "a", "--detach"], true);
    let out = env.run(&["exec", "--timeout", "1", "a", "--", "true"], false);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.starts_with("forkvm: error: ") && err.contains("did not answer within"), "{err}");
    assert_eq!(env.ok(&["exec", "a", "ping"], false).trim(), "pong");
    assert_eq!(env.status("a")["state"], "running");
}

#[test]
fn a_guest_without_an_agent_still_works_over_serial() {
    let env = Env::new("none");
    env.ok(&["run", "--guest", "test", "--mem", "64M", "--name", "a", "--detach"], false);
    let snap = env.run.with_extension("snap");
    env.ok(&["snapshot", "a", snap.to_str().unwrap()], false);
    env.ok(&["restore", snap.to_str().unwrap(), "--name", "b", "--detach"], false);
    assert_eq!(env.ok(&["exec", "b", "ping"], false).trim(), "pong");
    let st = env.status("b");
    assert_eq!(st["reseeded"], "no agent", "{st}");
    let out = env.run(&["exec", "b", "--", "true"], false);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no guest agent answers"), "{err}");
    // Fork children too.
    env.ok(&["fork", "a", "--count", "1"], false);
    assert_eq!(env.status("a-c1")["reseeded"], "no agent");
}
