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
