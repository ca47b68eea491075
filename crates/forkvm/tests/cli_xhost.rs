//! KVM tier through the CLI: clones across hosts. Two "hosts" are network namespaces joined by a
//! veth pair, made by this test (root; `ip` from iproute2). Host A serves a hibernated VM with
//! `forkvm pagesrv --tcp`; host B wakes clones of it with `forkvm wake --pages tcp://...`. A clone
//! answers with the parent's memory; cutting the link, or killing the server, mid-transfer stops
//! the clone with a clear error (never an answer from a page that did not arrive), and leaves the
//! server and the parent's hibernation as they were.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use common::Env;

/// Two namespaces A (10.77.0.1) and B (10.77.0.2) joined by veth; deleted on drop.
struct Hosts {
    a: String,
    b: String,
    veth_a: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap_or_else(|e| {
        panic!("cannot run `ip` ({e}): install iproute2 (apt-get install iproute2); this test needs root")
    });
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Hosts {
    /// `tag` (one letter) tells apart the tests of one process.
    fn new(tag: char) -> Self {
        let id = std::process::id() % 100_000;
        let h =
            Hosts { a: format!("fkx-a-{tag}{id}"), b: format!("fkx-b-{tag}{id}"), veth_a: format!("fkxa{tag}{id}") };
        let veth_b = format!("fkxb{tag}{id}");
        ip(&["netns", "add", &h.a]);
        ip(&["netns", "add", &h.b]);
        ip(&["link", "add", &h.veth_a, "type", "veth", "peer", "name", &veth_b]);
        ip(&["link", "set", &h.veth_a, "netns", &h.a]);
        ip(&["link", "set", &veth_b, "netns", &h.b]);
        ip(&["-n", &h.a, "addr", "add", "10.77.0.1/30", "dev", &h.veth_a]);
        ip(&["-n", &h.b, "addr", "add", "10.77.0.2/30", "dev", &veth_b]);
        for (ns, dev) in [(&h.a, &h.veth_a), (&h.b, &veth_b)] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        h
    }

    /// `forkvm args...` run inside namespace `ns` with the test's run directory and store.
    fn forkvm(env: &Env, ns: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_forkvm")])
            .args(args)
            .env("FORKVM_RUN_DIR", &env.run)
            .env("FORKVM_STORE", env.run.with_extension("store"));
        c
    }

    fn link(&self, state: &str) {
        ip(&["-n", &self.a, "link", "set", &self.veth_a, state]);
        if state == "up" {
            // Wait (bounded) for B's end to see the carrier again, and forget the neighbour
            // entries that failed while the link was down (they answer EHOSTUNREACH for a while).
            let t0 = Instant::now();
            let veth_b = self.veth_a.replace("fkxa", "fkxb");
            loop {
                let out = Command::new("ip").args(["-n", &self.b, "-o", "link", "show", &veth_b]).output().unwrap();
                if String::from_utf8_lossy(&out.stdout).contains("LOWER_UP") {
                    break;
                }
                assert!(t0.elapsed() < Duration::from_secs(30), "the veth did not come back up");
                std::thread::sleep(Duration::from_millis(10));
            }
            for ns in [&self.a, &self.b] {
                ip(&["-n", ns, "neigh", "flush", "all"]);
            }
        }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end in it, and with it the pair.
        let _ = Command::new("ip").args(["netns", "del", &self.a]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.b]).status();
    }
}

/// The page server on host A, its stdout lines forwarded.
struct Server {
    child: Child,
    lines: Receiver<String>,
}

impl Server {
    fn start(env: &Env, hosts: &Hosts, secret: &Path) -> Self {
        let mut child = Hosts::forkvm(
            env,
            &hosts.a,
            &["pagesrv", "--tcp", "10.77.0.1:7070", "--secret-file", secret.to_str().unwrap(), "--hibernated", "p"],
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
        let (tx, lines) = channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                eprintln!("pagesrv: {l}");
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        let s = Server { child, lines };
        s.wait_line("forkvm pagesrv: serving hibernated VM");
        s
    }

    fn wait_line(&self, needle: &str) -> String {
        loop {
            let l = self.lines.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| panic!("no {needle:?} line"));
            if l.contains(needle) {
                return l;
            }
        }
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // `ip netns exec` execs forkvm, so this is the server's own pid.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pid_of(env: &Env, name: &str) -> i32 {
    std::fs::read_to_string(env.run.join(name).join("pid")).unwrap().trim().parse().unwrap()
}

fn ns_inode(path: &str) -> u64 {
    std::fs::metadata(path).unwrap().ino()
}

fn wait_gone(pid: i32) {
    common::procs::wait_gone(pid, Duration::from_secs(60));
}

/// Wakes clone `name` on host B from the server on host A.
fn wake_on_b(env: &Env, hosts: &Hosts, secret: &Path, name: &str) -> i32 {
    wake_from(env, hosts, secret, name, "tcp://10.77.0.1:7070")
}

/// Wakes clone `name` on host B from the server at `url`.
fn wake_from(env: &Env, hosts: &Hosts, secret: &Path, name: &str, url: &str) -> i32 {
    let s = secret.to_str().unwrap();
    let args = ["wake", name, "--pages", url, "--secret-file", s, "--pages-timeout", "3"];
    let out = Hosts::forkvm(env, &hosts.b, &args).output().unwrap();
    assert!(out.status.success(), "wake {name}: {}", String::from_utf8_lossy(&out.stderr));
    let pid = pid_of(env, name);
    assert_eq!(
        ns_inode(&format!("/proc/{pid}/ns/net")),
        ns_inode(&format!("/run/netns/{}", hosts.b)),
        "the clone's VMM runs on host B"
    );
    pid
}

/// A clone that meets the cut: the next unfetched page stops it, and it says why.
fn expect_stopped(env: &Env, name: &str, pid: i32, needle: &str) {
    let out = env.cmd(&["exec", name, "--timeout", "60", "sum 0x1000000 256"]);
    assert!(
        !out.status.success(),
        "the clone answered from memory that never arrived: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    wait_gone(pid);
    let why = std::fs::read_to_string(env.run.join(name).join("wake-error")).expect("wake-error says why");
    assert!(why.contains("guest memory could not be served") && why.contains(needle), "{why}");
    assert!(!env.run.join(name).join("api.sock").exists(), "no live VM left behind");
    // A clone has no hibernation of its own to keep: its log says where its logs are, `ls`
    // shows it failed (not nothing), and `discard` clears it.
    let log = std::fs::read_to_string(env.run.join(name).join("vmm.log")).unwrap();
    assert!(!log.contains("its hibernation") && log.contains("forkvm discard"), "{log}");
    let ls = env.ok(&["ls"]);
    assert!(ls.lines().any(|l| l.starts_with(&format!("{name} ")) && l.contains(" failed ")), "{ls}");
    assert!(env.ok(&["discard", name]).contains(&format!("discarded {name}")));
    assert!(!env.run.join(name).exists(), "discard cleared the failed clone's directory");
}

fn secret_file(env: &Env) -> std::path::PathBuf {
    let secret = env.run.join("secret");
    std::fs::write(&secret, b"a shared secret of enough bytes!").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    secret
}

#[test]
fn a_running_vm_on_one_host_is_live_cloned_to_another_while_it_keeps_writing() {
    let mut env = Env::new("xlive");
    let hosts = Hosts::new('l');
    // The parent runs on host A, its memory shared so it can be live-cloned.
    let run = ["run", "--guest", "test", "--mem", "64M", "--name", "p", "--detach", "--backing", "shared"];
    let out = Hosts::forkvm(&env, &hosts.a, &run).output().unwrap();
    assert!(out.status.success(), "run p on A: {}", String::from_utf8_lossy(&out.stderr));
    env.names.push("p".into());
    let parent = pid_of(&env, "p");
    assert_eq!(env.exec("p", "touch 0x400000 16 0x5a"), "touched 16");
    let first = env.exec("p", "sum 0x400000 16");
    let secret = secret_file(&env);
    let s = secret.to_str().unwrap();
    let out = env.ok(&["clone-serve", "p", "--tcp", "10.77.0.1:7071", "--secret-file", s]);
    assert!(out.contains("serving live clones of p on tcp://10.77.0.1:7071"), "{out}");
    env.fails(&["clone-serve", "p", "--tcp", "10.77.0.1:7072", "--secret-file", s], "already serving clones");
    let url = "tcp://10.77.0.1:7071";

    // A clone on host B answers with the parent's memory of its clone instant, while the parent
    // runs on and overwrites those pages.
    let c1 = wake_from(&env, &hosts, &secret, "c1", url);
    assert_eq!(env.exec("p", "touch 0x400000 16 0x77"), "touched 16");
    let second = env.exec("p", "sum 0x400000 16");
    assert_ne!(second, first, "the parent wrote on after the clone");
    assert_eq!(env.exec("c1", "ping"), "pong");
    assert_eq!(env.exec("c1", "sum 0x400000 16"), first, "the clone sees its clone instant");
    // The clone's own writes stay its own.
    assert_eq!(env.exec("c1", "touch 0x400000 2 0x11"), "touched 2");
    assert_eq!(env.exec("p", "sum 0x400000 16"), second);
    // A later clone is a later instant.
    let c2 = wake_from(&env, &hosts, &secret, "c2", url);
    assert_eq!(env.exec("c2", "sum 0x400000 16"), second);
    assert_eq!(env.exec("c1", "sum 0x400000 16"), env.exec("c1", "sum 0x400000 16"));
    env.ok(&["stop", "c1"]);
    env.ok(&["stop", "c2"]);
    wait_gone(c1);
    wait_gone(c2);

    // Cut the link while a clone still needs pages from A (0x1000000+ was never served: holes
    // are only sent when asked): it stops with the reason, never answers from a missing page.
    let c3 = wake_from(&env, &hosts, &secret, "c3", url);
    assert_eq!(env.exec("c3", "sum 0x400000 16"), second);
    hosts.link("down");
    expect_stopped(&env, "c3", c3, "no answer");
    // The parent is unharmed, and serves the next clone once the link is back.
    assert_eq!(env.exec("p", "ping"), "pong");
    assert_eq!(env.exec("p", "sum 0x400000 16"), second);
    hosts.link("up");
    let c4 = wake_from(&env, &hosts, &secret, "c4", url);
    assert_eq!(env.exec("c4", "sum 0x400000 16"), second);

    // While it serves clones the parent is not fork()ed (its server threads would not survive).
    env.fails(&["fork", "p", "--prefix", "g"], "serves live clones on tcp://10.77.0.1:7071");
    // Stopping the clone server mid-transfer stops the clone that still needed it.
    let out = env.ok(&["clone-serve", "p", "--stop"]);
    assert!(out.contains("no longer serving clones of p (4 served)"), "{out}");
    expect_stopped(&env, "c4", c4, "lost");
    assert_eq!(env.exec("p", "ping"), "pong");
    assert_eq!(env.exec("p", "sum 0x400000 16"), second);
    assert_eq!(pid_of(&env, "p"), parent, "the parent's VMM is the same process throughout");
    // Serving no more, the parent forks as before (the server's threads are gone).
    let out = env.ok(&["fork", "p", "--prefix", "f"]);
    assert!(out.contains("f1 pid"), "{out}");
    assert_eq!(env.exec("f1", "sum 0x400000 16"), second);
}

#[test]
fn a_clone_on_another_host_answers_and_a_cut_link_stops_it_cleanly() {
    let mut env = Env::new("xhost");
    let hosts = Hosts::new('h');
    env.start("p", &[]);
    env.exec("p", "touch 0x400000 16 0x5a");
    let sum = env.exec("p", "sum 0x400000 16");
    env.ok(&["hibernate", "p"]);
    let secret = env.run.join("secret");
    std::fs::write(&secret, b"a shared secret of enough bytes!").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut server = Server::start(&env, &hosts, &secret);

    // A wrong secret is refused, with a reason, before any VM exists.
    let bad = env.run.join("bad-secret");
    std::fs::write(&bad, b"not the shared secret at all....").unwrap();
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = Hosts::forkvm(
        &env,
        &hosts.b,
        &["wake", "x", "--pages", "tcp://10.77.0.1:7070", "--secret-file", bad.to_str().unwrap()],
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("does not know the shared secret"), "{err}");
    assert!(!env.run.join("x").exists());

    // A clone on host B answers with the parent's memory.
    let c1 = wake_on_b(&env, &hosts, &secret, "c1");
    assert_eq!(env.exec("c1", "ping"), "pong");
    assert_eq!(env.exec("c1", "sum 0x400000 16"), sum);
    env.ok(&["stop", "c1"]);
    wait_gone(c1);

    // Cut the link while a second clone still depends on host A.
    let c2 = wake_on_b(&env, &hosts, &secret, "c2");
    assert_eq!(env.exec("c2", "sum 0x400000 16"), sum);
    hosts.link("down");
    expect_stopped(&env, "c2", c2, "no answer");
    assert!(server.alive(), "the server survives a cut link");

    // The link back: the server (and the parent's hibernation) serve the next clone as before.
    hosts.link("up");
    let c3 = wake_on_b(&env, &hosts, &secret, "c3");
    assert_eq!(env.exec("c3", "sum 0x400000 16"), sum);

    // The server dies mid-transfer: the clone stops at once with the reason.
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    expect_stopped(&env, "c3", c3, "lost");
    assert!(env.run.join("p/hibernated/hibernation").exists(), "the parent's hibernation is kept");
}
