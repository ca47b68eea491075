//! `forkvm run --net` + `forkvm port-forward` through the CLI: a VM and its fork child each get
//! a private network namespace with the same addresses inside, and each is reachable from the
//! host through its own forwarded port. (The test guest has no network stack: the "guest"
//! service here listens inside each VM's namespace on the gateway address.) Needs root.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

struct Env {
    run: PathBuf,
    kids: Vec<Child>,
}

impl Env {
    fn new(tag: &str) -> Self {
        let run = std::env::temp_dir().join(format!("forkvm-cli-net-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run);
        std::fs::create_dir_all(&run).unwrap();
        Env { run, kids: Vec::new() }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_forkvm"));
        c.env("FORKVM_RUN_DIR", &self.run).args(args);
        c
    }

    fn ok(&self, args: &[&str]) -> String {
        let out: Output = self.command(args).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "forkvm {args:?} failed: {}{stdout}", String::from_utf8_lossy(&out.stderr));
        stdout
    }

    /// Starts `forkvm port-forward` and returns the host address it prints.
    fn forward(&mut self, name: &str, port: &str) -> String {
        let mut child = self
            .command(&["port-forward", name, port, "127.0.0.1:0", "--guest-ip", "192.168.241.1"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        self.kids.push(child);
        let addr = line.split_whitespace().nth(1).unwrap_or_else(|| panic!("port-forward printed {line:?}"));
        addr.to_string()
    }

    /// A TCP service inside VM `name`'s namespace on 192.168.241.1:`port` answering `tag`.
    fn serve_in_vm_ns(&self, name: &str, port: u16, tag: String) {
        let listener = common::netns::listen_in_vm_ns(&self.run.join(name), port);
        std::thread::spawn(move || {
            for c in listener.incoming() {
                let mut c = c.unwrap();
                let mut line = String::new();
                BufReader::new(c.try_clone().unwrap()).read_line(&mut line).unwrap();
                let _ = c.write_all(format!("{tag}: {line}").as_bytes());
            }
        });
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for k in &mut self.kids {
            let _ = k.kill();
            let _ = k.wait();
        }
        if let Ok(rd) = std::fs::read_dir(&self.run) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                let _ = self.command(&["stop", &name]).output();
            }
        }
        let _ = std::fs::remove_dir_all(&self.run);
    }
}

fn ask(addr: &str, what: &str) -> String {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c.write_all(format!("{what}\n").as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(c).read_line(&mut line).unwrap();
    line.trim_end().to_string()
}

#[test]
fn a_vm_and_its_fork_child_are_each_reachable_through_their_own_namespace() {
    let mut env = Env::new("fork");
    env.ok(&["run", "--guest", "test", "--mem", "64M", "--name", "web", "--detach", "--net"]);
    env.ok(&["fork", "web"]);
    let child = "web-c1";
    let parent_ns = std::fs::read_to_string(env.run.join("web").join("netns")).unwrap();
    let child_ns = std::fs::read_to_string(env.run.join(child).join("netns")).unwrap();
    let ino = |p: &str| std::fs::metadata(p.trim()).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).unwrap();
    assert_ne!(ino(&parent_ns), ino(&child_ns), "the fork child has a namespace of its own");
    env.serve_in_vm_ns("web", 8080, "parent".into());
    env.serve_in_vm_ns(child, 8080, "child".into());
    let p = env.forward("web", "8080");
    let c = env.forward(child, "8080");
    assert_ne!(p, c);
    assert_eq!(ask(&p, "hello"), "parent: hello");
    assert_eq!(ask(&c, "hello"), "child: hello");
}

#[test]
fn port_forward_to_a_vm_without_network_is_a_clear_error() {
    let env = Env::new("nonet");
    env.ok(&["run", "--guest", "test", "--mem", "64M", "--name", "plain", "--detach"]);
    let out = env.command(&["port-forward", "plain", "80"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("has no network namespace") && err.contains("--net"), "{err}");
    // No VM of that name at all: said so, not guessed to lack --net.
    let out = env.command(&["port-forward", "nosuch", "80"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no VM named \"nosuch\" (see `forkvm ls`)"), "{err}");
}
