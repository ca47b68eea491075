//! `forkvm run --disk`: a missing or corrupt image is one clear error line at start.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Output};

fn forkvm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_forkvm"))
}

fn assert_one_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got {:?}; stderr: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
}

fn tmp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("forkvm-cli-disk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn missing_disk_image() {
    let out = forkvm().args(["run", "--disk", "/nonexistent/disk.img,ro"]).output().unwrap();
    assert_one_error(&out, "cannot open disk image /nonexistent/disk.img");
}

#[test]
fn corrupt_disk_images() {
    let odd = tmp_file("odd.img", &[0u8; 1000]);
    let out = forkvm().arg("run").arg("--disk").arg(&odd).output().unwrap();
    assert_one_error(&out, "whole number of 512-byte sectors");
    let empty = tmp_file("empty.img", &[]);
    let out = forkvm().arg("run").arg("--disk").arg(&empty).output().unwrap();
    assert_one_error(&out, "whole number of 512-byte sectors");
}

/// A VM with a disk goes through snapshot, restore and fork through the CLI (the test guest has
/// no virtio driver: this proves the plumbing; the data path is in crates/vmm/tests).
#[test]
fn a_vm_with_a_disk_snapshots_restores_and_forks() {
    let run = std::env::temp_dir().join(format!("forkvm-cli-disk-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&run);
    std::fs::create_dir_all(&run).unwrap();
    let img = tmp_file("vm.img", &vec![0x33u8; 1 << 20]);
    let snap = run.with_extension("snap");
    let f = |args: &[&str]| {
        let out = forkvm().env("FORKVM_RUN_DIR", &run).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "forkvm {args:?}: {err}");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let disk = format!("{},ro", img.display());
    f(&["run", "--guest", "test", "--mem", "64M", "--name", "d", "--detach", "--disk", &disk]);
    f(&["snapshot", "d", snap.to_str().unwrap()]);
    f(&["restore", snap.to_str().unwrap(), "--cow", "--name", "d2", "--detach"]);
    f(&["fork", "d"]);
    assert_eq!(f(&["exec", "d-c1", "ping"]).trim(), "pong");
    assert_eq!(f(&["exec", "d2", "ping"]).trim(), "pong");
    for n in ["d-c1", "d2", "d"] {
        f(&["stop", n]);
    }
    let _ = std::fs::remove_dir_all(&run);
    let _ = std::fs::remove_dir_all(&snap);
}
