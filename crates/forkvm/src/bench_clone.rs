//! `forkvm bench clone`: what pausing, snapshotting, restoring and fork-cloning a dirtied guest
//! costs, for a 256 MiB and a 2 GiB test guest (or `--mem`), and how much host memory ten fork
//! children add until they write.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vmm::{Backing, MicroVm, SnapshotKind, VmConfig};

use crate::cli::BenchArgs;
use crate::hostmem::{mem_available, private_kib};
use crate::stats::{table, Samples};

const T: Duration = Duration::from_secs(60);
/// Host-side fill: the PVM guest would need minutes to dirty this much itself.
const DIRTY_MAX: u64 = 1 << 30;
/// Memory a diff snapshot finds dirty: 16 MiB from the host plus what the guest itself writes.
const DIFF_DIRTY: u64 = 16 << 20;
const CHILDREN: usize = 10;
/// Pages each child writes from inside the guest (kept small: the guest runs emulated).
const CHILD_WRITE_PAGES: u64 = 64;

fn s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Result<Self, String> {
        let base = std::env::var_os("FORKVM_BENCH_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
        Self::under(base, tag)
    }

    /// On the file system of shared guest memory, so snapshots can link its file in.
    fn on_shm(tag: &str) -> Result<Self, String> {
        let base = std::env::var_os("FORKVM_SHM_DIR").map(PathBuf::from).unwrap_or_else(|| "/dev/shm".into());
        Self::under(base, tag)
    }

    fn under(base: PathBuf, tag: &str) -> Result<Self, String> {
        let dir = base.join(format!("forkvm-bench-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(Scratch(dir))
    }

    fn sub(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn boot_dirtied(mem: u64, backing: Backing) -> Result<MicroVm, String> {
    let vm = MicroVm::boot(VmConfig { mem_size: mem, backing, ..Default::default() }).map_err(s)?;
    vm.wait_for("forkvm-test-guest ready", T).map_err(s)?;
    let start = test_guest::LOW_LIMIT;
    let len = DIRTY_MAX.min(mem - start);
    if !vm.memory().fill(start, len, 0x5a) {
        return Err(format!("cannot fill {len} bytes of guest memory"));
    }
    Ok(vm)
}

/// Checks the guest's answer to `cmd`.
fn expect(cmd: &str, answer: String, ok: impl Fn(&str) -> bool) -> Result<(), String> {
    match ok(&answer) {
        true => Ok(()),
        false => Err(format!("guest answered {answer:?} to {cmd}")),
    }
}

fn is_pong(answer: &str) -> bool {
    answer == "pong"
}

fn ping(vm: &MicroVm) -> Result<(), String> {
    expect("ping", vm.command("ping", T).map_err(s)?, is_pong)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}

/// All rows for one guest size.
fn bench_size(mem: u64, runs: usize) -> Result<(Vec<Samples>, Vec<Samples>), String> {
    let heavy = runs.min(5);
    let scratch = Scratch::new(&format!("{}m", mem >> 20))?;
    let vm = boot_dirtied(mem, Backing::Anon)?;

    let mut pause = Samples::new("pause (vCPUs parked)", "ms");
    let mut resume = Samples::new("resume", "ms");
    for _ in 0..runs {
        let mut cursor = vm.console().cursor();
        vm.send_line("spin 100000").map_err(s)?;
        pause.push_duration(vm.pause().map_err(s)?);
        resume.push_duration(vm.resume().map_err(s)?);
        vm.console().wait_line(&mut cursor, T, |l| l.starts_with("spun")).ok_or("the guest did not finish spinning")?;
    }

    let mut full = Samples::new("snapshot full (anon memory)", "ms");
    let mut full_size = Samples::new("  full snapshot size", "MiB");
    for i in 0..heavy {
        vm.pause().map_err(s)?;
        let dir = scratch.sub(&format!("full{i}"));
        let rep = vm.snapshot(&dir, SnapshotKind::Full).map_err(s)?;
        full.push_duration(rep.duration);
        full_size.values.push(mib(rep.memory_disk_bytes + rep.state_bytes));
        vm.resume().map_err(s)?;
        if i + 1 < heavy {
            std::fs::remove_dir_all(&dir).map_err(s)?;
        }
    }

    let mut diff = Samples::new("snapshot diff (16 MiB dirty)", "ms");
    let mut diff_size = Samples::new("  diff snapshot size", "MiB");
    for i in 0..heavy {
        vm.memory().fill(test_guest::LOW_LIMIT + (i as u64 % 8) * DIFF_DIRTY, DIFF_DIRTY, i as u8);
        vm.pause().map_err(s)?;
        let rep = vm.snapshot(&scratch.sub(&format!("diff{i}")), SnapshotKind::Diff).map_err(s)?;
        diff.push_duration(rep.duration);
        diff_size.values.push(mib(rep.memory_disk_bytes + rep.state_bytes));
        vm.resume().map_err(s)?;
    }

    let mut rows = vec![pause, resume, full, full_size, diff, diff_size];
    rows.push(shared_snapshot(mem, heavy)?);

    // Restore rows (eager MB/s, CoW to first answer, checked and not) and the shared-file
    // snapshot onto another file system, from their own snapshots.
    rows.extend(crate::bench_restore::rows(mem, &scratch.0, heavy)?);

    let (fork_rows, mem_rows) = fork_rows(&vm, runs)?;
    rows.extend(fork_rows);
    Ok((rows, mem_rows))
}

/// Snapshot of a shared-file-backed VM: state plus a link to the (frozen) memory file.
fn shared_snapshot(mem: u64, runs: usize) -> Result<Samples, String> {
    let scratch = Scratch::on_shm(&format!("{}m-shared", mem >> 20))?;
    let mut r = Samples::new("snapshot full (shared-file memory)", "ms");
    for i in 0..runs.min(3) {
        let vm = boot_dirtied(mem, Backing::SharedFile)?;
        vm.pause().map_err(s)?;
        let dir = scratch.sub(&format!("shared{i}"));
        let rep = vm.snapshot(&dir, SnapshotKind::Full).map_err(s)?;
        if !rep.linked {
            return Err("the shared-file snapshot copied memory instead of linking it".into());
        }
        r.push_duration(rep.duration);
        drop(vm);
        std::fs::remove_dir_all(&dir).map_err(s)?;
    }
    Ok(r)
}

/// Fork-clone latency to the child's first answer, and the host memory ten children add.
fn fork_rows(vm: &MicroVm, runs: usize) -> Result<(Vec<Samples>, Vec<Samples>), String> {
    let mut first = Samples::new("fork-clone to first child answer", "ms");
    let mut pause = Samples::new("  parent pause", "ms");
    let mut save = Samples::new("  state capture", "ms");
    let mut fork = Samples::new("  fork()", "ms");
    for _ in 0..runs {
        let t = Instant::now();
        let (mut kids, rep) = vm.fork(1).map_err(s)?;
        let answer = kids[0].command("ping", T).map_err(s)?;
        first.push_duration(t.elapsed());
        expect("ping", answer, is_pong)?;
        pause.push_duration(rep.pause);
        save.push_duration(rep.save);
        fork.push_duration(rep.fork);
        for k in kids {
            k.stop().map_err(s)?;
        }
    }

    let mut added = Samples::new(&format!("host memory added by {CHILDREN} children"), "MiB");
    let mut private = Samples::new(&format!("  private memory of {CHILDREN} children"), "MiB");
    let mut after_write =
        Samples::new(&format!("  added after each child writes {} KiB", CHILD_WRITE_PAGES * 4), "MiB");
    for _ in 0..runs.min(3) {
        ping(vm)?;
        let before = mem_available()?;
        let (mut kids, _) = vm.fork(CHILDREN).map_err(s)?;
        for k in &mut kids {
            expect("ping", k.command("ping", T).map_err(s)?, is_pong)?;
        }
        let after = mem_available()?;
        added.values.push(mib(before.saturating_sub(after)));
        let mut kib = 0;
        for k in &kids {
            kib += private_kib(k.pid)?;
        }
        private.values.push(kib as f64 / 1024.0);
        for k in &mut kids {
            let touch = format!("touch {:#x} {CHILD_WRITE_PAGES} 7", test_guest::LOW_LIMIT);
            expect(&touch, k.command(&touch, T).map_err(s)?, |a| a.starts_with("touched"))?;
        }
        after_write.values.push(mib(before.saturating_sub(mem_available()?)));
        for k in kids {
            k.stop().map_err(s)?;
        }
    }
    Ok((vec![first, pause, save, fork], vec![added, private, after_write]))
}

pub fn bench_clone(args: &BenchArgs) -> Result<i32, String> {
    let sizes: Vec<u64> = if args.mem == 256 << 20 { vec![256 << 20, 2 << 30] } else { vec![args.mem] };
    let runs = args.runs.max(1);
    for mem in sizes {
        let (rows, mem_rows) = bench_size(mem, runs)?;
        let dirty = DIRTY_MAX.min(mem - test_guest::LOW_LIMIT);
        let title = format!(
            "forkvm bench clone: test guest {} MiB, {} MiB dirtied from the host, 1 vCPU, up to {runs} runs",
            mem >> 20,
            dirty >> 20
        );
        print!("{}", table(&title, &rows));
        print!("{}", table(&format!("host memory, {} MiB guest", mem >> 20), &mem_rows));
        println!();
    }
    crate::bench_pool::bench_pool(args)?;
    println!();
    // The cross-namespace clone rows (clones across hosts, also `forkvm bench xhost`).
    crate::bench_xhost::bench_xhost(args)
}
