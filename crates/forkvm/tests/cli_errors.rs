//! Bad input to the CLI gets one clear error line and a non-zero exit, never a panic.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::process::CommandExt;
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
    assert!(lines[0].starts_with("forkvm: error: "), "{stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
}

fn tmp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("forkvm-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn missing_kernel() {
    let out = forkvm().args(["run", "--kernel", "/nonexistent/bzImage"]).output().unwrap();
    assert_one_error(&out, "cannot read kernel /nonexistent/bzImage");
}

#[test]
fn garbage_kernel() {
    let mut elf = b"\x7fELF".to_vec();
    elf.resize(10000, 0x42);
    for (name, bytes) in [("garbage", vec![0x42; 10000]), ("garbage-elf", elf)] {
        let k = tmp_file(name, &bytes);
        let out = forkvm().arg("run").arg("--kernel").arg(&k).output().unwrap();
        // Names the file and says what is wrong once, without linux-loader's own prefixes.
        assert_one_error(&out, &format!("cannot load kernel {}: not a bzImage or ELF vmlinux (", k.display()));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("Kernel Loader") && !stderr.contains("failed to load"), "{stderr}");
    }
}

#[test]
fn empty_kernel() {
    let k = tmp_file("empty", &[]);
    let out = forkvm().arg("run").arg("--kernel").arg(&k).output().unwrap();
    assert_one_error(&out, "is empty");
}

#[test]
fn too_little_memory() {
    let out = forkvm().args(["run", "--mem", "1M"]).output().unwrap();
    assert_one_error(&out, "too small");
}

#[test]
fn bad_vcpu_count() {
    let out = forkvm().args(["run", "--vcpus", "0"]).output().unwrap();
    assert_one_error(&out, "vCPU count");
}

#[test]
fn no_kvm_device() {
    let out = forkvm().args(["run"]).env("FORKVM_KVM_DEVICE", "/nonexistent/kvm").output().unwrap();
    assert_one_error(&out, "does not exist");
}

#[test]
fn no_kvm_permission() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let out = if root {
        // Drop to nobody: /dev/kvm (or our stand-in) is then not ours to open.
        let dev = tmp_file("kvm-root-only", b"");
        std::fs::set_permissions(&dev, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        forkvm().arg("run").env("FORKVM_KVM_DEVICE", &dev).uid(65534).gid(65534).output().unwrap()
    } else {
        let dev = tmp_file("kvm-no-access", b"");
        std::fs::set_permissions(&dev, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
        forkvm().arg("run").env("FORKVM_KVM_DEVICE", &dev).output().unwrap()
    };
    assert_one_error(&out, "permission denied");
}

#[test]
fn kernel_that_never_ends_or_is_huge() {
    let out = forkvm().args(["run", "--kernel", "/dev/zero"]).output().unwrap();
    assert_one_error(&out, "is not a regular file");
    let k = tmp_file("huge-kernel", b"");
    std::fs::File::options().write(true).open(&k).unwrap().set_len(300 << 20).unwrap();
    let out = forkvm().arg("run").arg("--kernel").arg(&k).output().unwrap();
    assert_one_error(&out, "larger than the 256 MiB limit");
    let out = forkvm().args(["run", "--kernel", "/bin/true", "--initrd", "/dev/zero"]).output().unwrap();
    assert_one_error(&out, "initrd /dev/zero is not a regular file");
}

#[test]
fn absurd_exec_timeouts_are_refused() {
    for t in ["0", "601", "18446744073709551615"] {
        let out = forkvm().args(["exec", "--timeout", t, "x", "ping"]).output().unwrap();
        assert_one_error(&out, "--timeout must be 1 to 600 seconds");
    }
}
