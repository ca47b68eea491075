//! KVM tier through the CLI: a woken VM whose hibernated memory turns out corrupt stops, but
//! keeps its hibernation and its logs, and says why (in vmm.log and in `wake-error`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

struct Env {
    run: PathBuf,
}

impl Env {
    fn cmd(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_forkvm"))
            .env("FORKVM_RUN_DIR", &self.run)
            .env("FORKVM_STORE", self.store())
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "forkvm {args:?} failed: {}{stdout}", String::from_utf8_lossy(&out.stderr));
        stdout
    }

    fn store(&self) -> PathBuf {
        self.run.with_extension("store")
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = self.cmd(&["stop", "w"]);
        let _ = std::fs::remove_dir_all(&self.run);
        let _ = std::fs::remove_dir_all(self.store());
    }
}

/// Flips the bytes of the stored chunk holding guest page `gpa` of the hibernation in `dir`.
fn corrupt_chunk_of(dir: &Path, store: &Path, gpa: u64) {
    use std::os::unix::fs::FileExt;
    use vmm::hibernate::chunkstore::{PageRef, Store};
    let record = vmm::hibernate::read_record(dir).unwrap();
    let st = Store::open_readonly(store).unwrap();
    let m = st.manifest(&record.image).unwrap();
    let PageRef::Chunk(hash) = m.page(gpa / 4096).unwrap() else {
        panic!("page {gpa:#x} is a zero page");
    };
    let e = st.chunk_entry(hash).unwrap();
    let pack = std::fs::OpenOptions::new().read(true).write(true).open(store.join("pack")).unwrap();
    let mut b = vec![0u8; e.stored_len as usize];
    pack.read_exact_at(&mut b, e.offset).unwrap();
    b.iter_mut().for_each(|x| *x ^= 0xa5);
    pack.write_all_at(&b, e.offset).unwrap();
}

fn wait_gone(pid: i32) {
    common::procs::wait_gone(pid, Duration::from_secs(30));
}

#[test]
fn a_woken_vm_that_meets_a_corrupt_chunk_keeps_its_hibernation_and_logs() {
    let run = std::env::temp_dir().join(format!("forkvm-wakefail-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&run);
    std::fs::create_dir_all(&run).unwrap();
    let env = Env { run };
    env.ok(&["run", "--guest", "test", "--mem", "64M", "--name", "w", "--detach"]);
    env.ok(&["exec", "w", "touch 0x400000 8 0x42"]);
    env.ok(&["hibernate", "w"]);
    let dir = env.run.join("w");
    corrupt_chunk_of(&dir.join("hibernated"), &env.store(), 0x400000);
    env.ok(&["wake", "w"]);
    let pid: i32 = std::fs::read_to_string(dir.join("pid")).unwrap().trim().parse().unwrap();
    let out = env.cmd(&["exec", "w", "--timeout", "10", "sum 0x400000 8"]);
    assert!(!out.status.success(), "the guest must not answer from a corrupt page");
    wait_gone(pid);
    assert!(dir.join("hibernated/hibernation").exists(), "the hibernation was deleted");
    assert!(dir.join("hibernated/state").exists(), "the hibernated state was deleted");
    assert!(dir.join("console.log").exists(), "the console log was deleted");
    let log = std::fs::read_to_string(dir.join("vmm.log")).expect("vmm.log kept");
    assert!(log.contains("corrupt"), "vmm.log says why: {log}");
    let why = std::fs::read_to_string(dir.join("wake-error")).expect("wake-error kept");
    assert!(why.contains("corrupt"), "{why}");
    assert!(!dir.join("api.sock").exists() && !dir.join("pid").exists(), "no live VM left behind");
    let ls = env.ok(&["ls"]);
    assert!(ls.lines().any(|l| l.starts_with("w ") && l.contains("hibernated")), "{ls}");
}
