//! `forkvm scenario linux` on bad input: one clear error line and a non-zero exit, never a panic.
//! (The scenario itself needs a Linux-capable KVM; tools/e2e runs it inside the QEMU L1.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Output};

fn scenario(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_forkvm")).arg("scenario").arg("linux").args(args).output().unwrap()
}

fn assert_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got {:?}; stderr: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    assert!(stderr.lines().any(|l| l.starts_with("forkvm: error: ") && l.contains(needle)), "{needle:?} in {stderr}");
}

#[test]
fn missing_kernel_and_initrd() {
    assert_error(&scenario(&["--kernel", "/nonexistent/bzImage", "--initrd", "/nonexistent/i"]), "cannot read kernel");
    let k = std::env::current_exe().unwrap();
    let k = k.to_str().unwrap();
    assert_error(&scenario(&["--kernel", k, "--initrd", "/nonexistent/initrd"]), "cannot read initrd");
}

#[test]
fn garbage_kernel() {
    let dir = std::env::temp_dir().join(format!("forkvm-scenario-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let k = dir.join("garbage");
    std::fs::write(&k, [0x42u8; 10000]).unwrap();
    let out = scenario(&["--kernel", k.to_str().unwrap(), "--initrd", k.to_str().unwrap()]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_error(&out, &format!("cannot load kernel {}: not a bzImage or ELF vmlinux (", k.display()));
}

#[test]
fn bad_memory_size() {
    let out = scenario(&["--kernel", "k", "--initrd", "i", "--mem", "lots"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("invalid size"), "{stderr}");
}
