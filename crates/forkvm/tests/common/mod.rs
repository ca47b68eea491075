//! Helpers shared by the CLI tests: a private run directory per test and the forkvm binary.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

pub mod netns;
pub mod procs;

use std::path::PathBuf;
use std::process::{Command, Output};

/// Every test gets its own run directory, so tests never see each other's VMs.
pub struct Env {
    pub run: PathBuf,
    pub names: Vec<String>,
}

impl Env {
    pub fn new(tag: &str) -> Self {
        let run = std::env::temp_dir().join(format!("forkvm-cli-vms-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run);
        std::fs::create_dir_all(&run).unwrap();
        Env { run, names: Vec::new() }
    }

    /// forkvm with this test's run directory and store.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_forkvm"));
        c.env("FORKVM_RUN_DIR", &self.run).env("FORKVM_STORE", self.run.with_extension("store")).args(args);
        c
    }

    pub fn cmd(&self, args: &[&str]) -> Output {
        let out = self.command(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "forkvm {args:?} panicked: {stderr}");
        out
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "forkvm {args:?} failed: {}{stdout}", String::from_utf8_lossy(&out.stderr));
        stdout
    }

    /// Runs a command that must fail with one error line containing `needle`.
    pub fn fails(&self, args: &[&str], needle: &str) {
        let out = self.cmd(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "forkvm {args:?} should have failed; stdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(stderr.lines().count() == 1 && stderr.starts_with("forkvm: error: "), "one error line: {stderr}");
        assert!(stderr.contains(needle), "expected {needle:?} in {stderr}");
    }

    pub fn start(&mut self, name: &str, extra: &[&str]) {
        let mut args = vec!["run", "--guest", "test", "--mem", "64M", "--name", name, "--detach"];
        args.extend_from_slice(extra);
        self.ok(&args);
        self.names.push(name.to_string());
        assert_eq!(self.exec(name, "ping"), "pong");
    }

    pub fn exec(&self, name: &str, line: &str) -> String {
        self.ok(&["exec", name, line]).trim_end().to_string()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Stop whatever is left (children included) so no VMM process outlives the test.
        if let Ok(rd) = std::fs::read_dir(&self.run) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                let _ = self.cmd(&["stop", &name]);
            }
        }
        let _ = std::fs::remove_dir_all(&self.run);
        for snap in ["snap-a", "snap-a-diff", "snap", "store"] {
            let _ = std::fs::remove_dir_all(self.run.with_extension(snap));
        }
    }
}
