//! Chaos (KVM tier): `kill -9` of the VMM process at random points of snapshot, diff snapshot,
//! hibernate, wake and fork, then everything that claims to exist must restore to exactly the
//! memory it had: a snapshot directory with a `state` restores and the guest's `sum` of the
//! touched range is one it had when a snapshot was asked for; a hibernation record wakes to the
//! memory it was hibernated with; a fork child that answers has its parent's memory.
//!
//! Bounded: `FORKVM_CHAOS_ITERS` iterations (default 30) and 150 s. The seed is printed;
//! `FORKVM_CHAOS_SEED=N` replays a run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use vmm::{MicroVm, RestoreMode, RestoreOptions, WakeOptions};

const T: Duration = Duration::from_secs(60);
const RANGE: &str = "0x400000 32";

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

struct Env {
    run: PathBuf,
    store: PathBuf,
    snaps: PathBuf,
}

impl Env {
    fn new() -> Self {
        let base = std::env::temp_dir().join(format!("forkvm-chaos-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let env = Env { run: base.join("run"), store: base.join("store"), snaps: base.join("snaps") };
        std::fs::create_dir_all(&env.run).unwrap();
        std::fs::create_dir_all(&env.snaps).unwrap();
        env
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_forkvm"));
        c.env("FORKVM_RUN_DIR", &self.run).env("FORKVM_STORE", &self.store).args(args);
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
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

    fn exec(&self, name: &str, line: &str) -> String {
        self.ok(&["exec", name, line]).trim_end().to_string()
    }

    fn pid(&self, name: &str) -> Option<i32> {
        std::fs::read_to_string(self.run.join(name).join("pid")).ok()?.trim().parse().ok()
    }

    fn hibernation(&self, name: &str) -> PathBuf {
        self.run.join(name).join("hibernated")
    }

    /// Stops every VM of the run dir and kills any VMM process left (by its pid file).
    fn sweep(&self) {
        if let Ok(rd) = std::fs::read_dir(&self.run) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                let _ = self.command(&["stop", &name]).output();
                if let Some(pid) = self.pid(&name) {
                    kill9(pid);
                }
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.sweep();
        let _ = std::fs::remove_dir_all(self.run.parent().unwrap());
    }
}

fn kill9(pid: i32) {
    // SAFETY: kill has no memory-safety preconditions; the pid is a VMM process this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// Runs `args` and kills `pid` (-9) after `delay`; returns the command's output.
fn kill_during(env: &Env, args: &[&str], pid: impl Fn() -> Option<i32>, delay: Duration) -> Output {
    let child = env.command(args).spawn().unwrap();
    let t0 = Instant::now();
    let mut victim = None;
    // The pid may only appear once the command got going (wake starts a new VMM).
    while t0.elapsed() < delay || victim.is_none() {
        victim = pid().or(victim);
        if t0.elapsed() > delay + Duration::from_secs(10) {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    if let Some(p) = victim {
        kill9(p);
    }
    child.wait_with_output().unwrap()
}

fn restore_sum(dir: &Path) -> Result<String, String> {
    let opts = RestoreOptions { track_dirty: false, ..Default::default() };
    let mut vm = MicroVm::restore(dir, RestoreMode::Eager, opts).map_err(|e| e.to_string())?;
    let s = vm.command(&format!("sum {RANGE}"), T).map_err(|e| e.to_string());
    vm.stop();
    s
}

fn wake_sum(dir: &Path, store: &Path) -> Result<String, String> {
    let (mut vm, handle) = MicroVm::wake(dir, store, WakeOptions::default()).map_err(|e| e.to_string())?;
    let s = vm.command(&format!("sum {RANGE}"), T).map_err(|e| e.to_string());
    vm.stop();
    drop(handle);
    s
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Snapshot,
    DiffSnapshot,
    Hibernate,
    Wake,
    Fork,
}

#[test]
fn kill9_at_random_points_loses_nothing_that_claims_to_exist() {
    let seed = std::env::var("FORKVM_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    });
    let iters: u64 = std::env::var("FORKVM_CHAOS_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    println!("chaos: seed {seed} (replay with FORKVM_CHAOS_SEED={seed}), {iters} iterations");
    let mut rng = Rng(seed);
    let env = Env::new();
    let started = Instant::now();
    let mut losses: Vec<String> = Vec::new();
    // Per operation: runs, runs whose command failed (the kill hit it), new state found complete.
    let mut table: std::collections::BTreeMap<Op, (u32, u32, u32)> = Default::default();
    let mut done = 0;
    for i in 0..iters {
        if started.elapsed() > Duration::from_secs(150) {
            println!("chaos: time budget reached after {i} iterations");
            break;
        }
        let op = [Op::Snapshot, Op::DiffSnapshot, Op::Hibernate, Op::Wake, Op::Fork][rng.below(5) as usize];
        let name = format!("v{i}");
        env.ok(&["run", "--guest", "test", "--mem", "64M", "--name", &name, "--detach"]);
        let b1 = 1 + rng.below(0x7f) as u8;
        let b2 = b1 + 0x80;
        env.exec(&name, &format!("touch {RANGE} {b1:#x}"));
        let sum1 = env.exec(&name, &format!("sum {RANGE}"));
        let full = env.snaps.join(format!("{name}-full"));
        let diff = env.snaps.join(format!("{name}-diff"));
        env.ok(&["snapshot", &name, full.to_str().unwrap()]);
        env.exec(&name, &format!("touch {RANGE} {b2:#x}"));
        let sum2 = env.exec(&name, &format!("sum {RANGE}"));
        let pid = env.pid(&name).unwrap();
        let mut lost = |what: String| losses.push(format!("iteration {i} ({op:?}): {what}"));
        let interrupted;
        let mut completed = false;
        // Biased towards early kills (u^2): most operations finish within a few milliseconds.
        let at = |max_ms: u64, rng: &mut Rng| {
            let u = rng.below(1 << 20) as f64 / f64::from(1 << 20);
            Duration::from_micros((u * u * (max_ms * 1000) as f64) as u64)
        };
        match op {
            Op::Snapshot => {
                let d = at(400, &mut rng);
                let out = kill_during(&env, &["snapshot", &name, full.to_str().unwrap()], || Some(pid), d);
                interrupted = !out.status.success();
                match restore_sum(&full) {
                    Ok(s) if s == sum2 => completed = true,
                    Ok(s) if s == sum1 => {}
                    Ok(s) => lost(format!("overwritten snapshot restores to {s}, neither {sum1} nor {sum2}")),
                    Err(e) => lost(format!("previous good snapshot no longer restores: {e}")),
                }
            }
            Op::DiffSnapshot => {
                let d = at(200, &mut rng);
                let args = ["snapshot", &name, diff.to_str().unwrap(), "--diff"];
                let out = kill_during(&env, &args, || Some(pid), d);
                interrupted = !out.status.success();
                if diff.join("state").exists() {
                    match restore_sum(&diff) {
                        Ok(s) if s == sum2 => completed = true,
                        Ok(s) => lost(format!("diff snapshot restores to {s}, not {sum2}")),
                        Err(e) => lost(format!("diff snapshot has a state but does not restore: {e}")),
                    }
                }
                match restore_sum(&full) {
                    Ok(s) if s == sum1 => {}
                    other => lost(format!("base snapshot damaged: {other:?}")),
                }
            }
            Op::Hibernate => {
                let d = at(800, &mut rng);
                let out = kill_during(&env, &["hibernate", &name], || Some(pid), d);
                interrupted = !out.status.success();
                let hib = env.hibernation(&name);
                if hib.join("hibernation").exists() {
                    match wake_sum(&hib, &env.store) {
                        Ok(s) if s == sum2 => completed = true,
                        other => lost(format!("hibernation record exists but wakes to {other:?}, not {sum2}")),
                    }
                }
            }
            Op::Wake => {
                env.ok(&["hibernate", &name]);
                let d = at(400, &mut rng);
                let hib = env.hibernation(&name);
                let out = kill_during(&env, &["wake", &name], || env.pid(&name).filter(|&p| p != pid), d);
                interrupted = !out.status.success();
                if !hib.join("hibernation").exists() {
                    lost("a killed wake lost the hibernation record".into());
                } else {
                    match wake_sum(&hib, &env.store) {
                        Ok(s) if s == sum2 => completed = true,
                        other => lost(format!("hibernation wakes to {other:?} after a killed wake, not {sum2}")),
                    }
                }
            }
            Op::Fork => {
                let d = at(300, &mut rng);
                let out = kill_during(&env, &["fork", &name, "--count", "2"], || Some(pid), d);
                interrupted = !out.status.success();
                for c in 1..=2 {
                    let child = format!("{name}-c{c}");
                    let out = env.cmd(&["exec", &child, &format!("sum {RANGE}")]);
                    if out.status.success() {
                        let s = String::from_utf8_lossy(&out.stdout).trim_end().to_string();
                        if s != sum2 {
                            lost(format!("fork child {child} answers with {s}, not {sum2}"));
                        } else {
                            completed = true;
                        }
                    }
                }
            }
        }
        // The store never holds a corrupt chunk or a manifest with missing chunks.
        if env.store.join("index").exists() {
            let v = env.cmd(&["store", "verify"]);
            if !v.status.success() {
                lost(format!("store verify: {}", String::from_utf8_lossy(&v.stdout)));
            }
        }
        let row = table.entry(op).or_default();
        row.0 += 1;
        row.1 += u32::from(interrupted);
        row.2 += u32::from(completed);
        env.sweep();
        done += 1;
    }
    println!("chaos: seed {seed}: {done} iterations, {} losses", losses.len());
    println!("| operation | runs | killed mid-way (command failed) | new state complete and exact |");
    println!("|---|---|---|---|");
    for (op, (runs, killed, complete)) in &table {
        println!("| {op:?} | {runs} | {killed} | {complete} |");
    }
    assert!(losses.is_empty(), "seed {seed}: data lost:\n{}", losses.join("\n"));
}
