//! KVM tier through the CLI: `forkvm store verify`, `forkvm store gc`, `forkvm discard`, and
//! hibernations into one store that wait for each other.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Env {
    run: PathBuf,
    store: PathBuf,
}

impl Env {
    fn new(tag: &str) -> Self {
        let run = std::env::temp_dir().join(format!("forkvm-cli-store-{}-{tag}", std::process::id()));
        let store = run.with_extension("store");
        let _ = std::fs::remove_dir_all(&run);
        let _ = std::fs::remove_dir_all(&store);
        std::fs::create_dir_all(&run).unwrap();
        Env { run, store }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_forkvm"));
        c.env("FORKVM_RUN_DIR", &self.run).env("FORKVM_STORE", &self.store).args(args);
        c
    }

    fn cmd(&self, args: &[&str]) -> Output {
        let out = self.command(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "forkvm {args:?} panicked: {stderr}");
        out
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "forkvm {args:?} failed: {}{stdout}", String::from_utf8_lossy(&out.stderr));
        stdout
    }

    fn fails(&self, args: &[&str], needle: &str) -> String {
        let out = self.cmd(args);
        let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!out.status.success(), "forkvm {args:?} should have failed: {all}");
        assert!(all.contains(needle), "expected {needle:?} in {all}");
        all
    }

    fn start(&self, name: &str, byte: u8) -> String {
        self.ok(&["run", "--guest", "test", "--mem", "64M", "--name", name, "--detach"]);
        let touched = self.exec(name, &format!("touch 0x400000 64 {byte:#x}"));
        assert!(touched.starts_with("touched"), "{touched}");
        self.exec(name, "sum 0x400000 64")
    }

    fn exec(&self, name: &str, line: &str) -> String {
        self.ok(&["exec", name, line]).trim_end().to_string()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Ok(rd) = std::fs::read_dir(&self.run) {
            for e in rd.flatten() {
                let _ = self.cmd(&["stop", &e.file_name().to_string_lossy()]);
            }
        }
        let _ = std::fs::remove_dir_all(&self.run);
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

/// "... N chunks kept, M removed ..." -> (N, M)
fn chunk_counts(gc_out: &str) -> (u64, u64) {
    let num = |s: &str, after: &str| -> u64 {
        let i = s.find(after).unwrap_or_else(|| panic!("{after:?} not in {s}"));
        s[..i].trim_end().rsplit([' ', ';', ',']).next().unwrap().parse().unwrap()
    };
    let kept = num(gc_out, " chunks kept");
    let rest = &gc_out[gc_out.find(" chunks kept").unwrap()..];
    (kept, num(rest, " removed ("))
}

fn index_len(store: &Path) -> usize {
    chunkstore::decode_index(&std::fs::read(store.join("index")).unwrap()).unwrap().entries.len()
}

#[test]
fn verify_gc_and_discard_free_exactly_what_is_gone() {
    let env = Env::new("gc");
    let sum_a = env.start("a", 0x11);
    let sum_b = env.start("b", 0x22);
    env.ok(&["hibernate", "a"]);
    env.ok(&["hibernate", "b"]);
    let v = env.ok(&["store", "verify"]);
    assert!(v.contains(", 0 problems"), "{v}");
    // Both hibernations are alive: nothing to collect.
    let (_, removed) = chunk_counts(&env.ok(&["store", "gc"]));
    assert_eq!(removed, 0);
    let before = index_len(&env.store);

    env.fails(&["discard", "ghost"], "no hibernated VM named");
    env.ok(&["discard", "a"]);
    env.fails(&["wake", "a"], "no hibernated VM named \"a\"");
    let out = env.ok(&["store", "gc"]);
    let (kept, removed) = chunk_counts(&out);
    assert!(removed > 0, "discarding a freed nothing: {out}");
    assert_eq!(kept as usize + removed as usize, before, "{out}");
    assert_eq!(index_len(&env.store), kept as usize);

    // b is intact: it wakes with exactly its memory.
    env.ok(&["wake", "b"]);
    assert_eq!(env.exec("b", "sum 0x400000 64"), sum_b);
    env.fails(&["discard", "b"], "is running");
    // Stopped after waking, b's hibernation is gone: gc removes its image too.
    env.ok(&["stop", "b"]);
    let out = env.ok(&["store", "gc"]);
    assert!(out.contains("removed image hib-"), "{out}");
    let v = env.ok(&["store", "verify"]);
    assert!(v.contains(", 0 problems"), "{v}");
    let _ = sum_a;

    // A corrupt chunk is found, listed, and fails verify.
    let c = env.start("c", 0x33);
    env.ok(&["hibernate", "c"]);
    let ix = chunkstore::decode_index(&std::fs::read(env.store.join("index")).unwrap()).unwrap();
    let (_, e) = ix.entries.last().unwrap();
    let pack = std::fs::OpenOptions::new().write(true).open(env.store.join("pack")).unwrap();
    pack.write_all_at(&[0xa5; 16], e.offset).unwrap();
    let out = env.fails(&["store", "verify"], "problem: ");
    assert!(out.contains("corrupt") && out.contains(", 1 problems"), "{out}");
    let _ = c;
}

#[test]
fn concurrent_hibernations_into_one_store_wait_for_each_other() {
    let env = Env::new("conc");
    let names = ["p", "q", "r"];
    let sums: Vec<String> = names.iter().enumerate().map(|(i, n)| env.start(n, 0x40 + i as u8)).collect();
    // All at once, with a gc in the middle of them: every one must succeed.
    let spawn = |args: &[&str]| {
        env.command(args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap()
    };
    let kids: Vec<_> = names.iter().map(|n| spawn(&["hibernate", n])).collect();
    let gc = spawn(&["store", "gc"]);
    for (n, k) in names.iter().zip(kids) {
        let k = k.wait_with_output().unwrap();
        assert!(k.status.success(), "hibernate {n} failed: {}", String::from_utf8_lossy(&k.stderr));
    }
    let gc = gc.wait_with_output().unwrap();
    // gc may have come before the store existed: then it says so; otherwise it succeeded.
    let gc_err = String::from_utf8_lossy(&gc.stderr);
    assert!(gc.status.success() || gc_err.contains("not a chunk store"), "gc failed: {gc_err}");
    for (n, sum) in names.iter().zip(&sums) {
        env.ok(&["wake", n]);
        assert_eq!(&env.exec(n, "sum 0x400000 64"), sum, "{n}");
    }
    assert!(env.ok(&["store", "verify"]).contains(", 0 problems"));
}
