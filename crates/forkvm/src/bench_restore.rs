//! Restore rows of `forkvm bench clone`: eager restore throughput and copy-on-write restore to
//! the first answer, for 64 MiB and 1 GiB dirtied, with the image hash checked (as a fresh
//! process would: the per-process "already checked" memory is cleared before every run) and
//! without; and a shared-file (memfd) VM snapshotted onto another file system.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use vmm::{Backing, MicroVm, RestoreMode, RestoreOptions, SnapshotKind, VmConfig};

use crate::stats::Samples;

const T: Duration = Duration::from_secs(60);

fn s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

fn boot_filled(mem: u64, dirty: u64, backing: Backing) -> Result<MicroVm, String> {
    let vm = MicroVm::boot(VmConfig { mem_size: mem, backing, ..Default::default() }).map_err(s)?;
    vm.wait_for("forkvm-test-guest ready", T).map_err(s)?;
    if !vm.memory().fill(test_guest::LOW_LIMIT, dirty, 0x5a) {
        return Err(format!("cannot fill {dirty} bytes of guest memory"));
    }
    Ok(vm)
}

fn ping(vm: &MicroVm) -> Result<(), String> {
    match vm.command("ping", T).map_err(s)?.as_str() {
        "pong" => Ok(()),
        a => Err(format!("guest answered {a:?} to ping")),
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}

/// Restore rows for a `mem` guest with `dirty` bytes of data, snapshotted into `dir`.
fn restore_rows(mem: u64, dirty: u64, dir: &Path, runs: usize) -> Result<Vec<Samples>, String> {
    let vm = boot_filled(mem, dirty, Backing::Anon)?;
    vm.pause().map_err(s)?;
    vm.snapshot(dir, SnapshotKind::Full).map_err(s)?;
    drop(vm);
    // One untimed restore first: the image just written is still being written back, which
    // would slow whichever row ran first (the checked one) several times over.
    drop(
        MicroVm::restore(dir, RestoreMode::Eager, RestoreOptions { skip_verify: true, ..Default::default() })
            .map_err(s)?,
    );
    let d = dirty >> 20;
    let mut rows = Vec::new();
    for (mode, verify, name) in [
        (RestoreMode::Eager, true, format!("restore eager ({d} MiB dirtied), hash checked")),
        (RestoreMode::Eager, false, format!("restore eager ({d} MiB dirtied), --no-verify")),
    ] {
        let mut first = Samples::new(&format!("{name}: first answer"), "ms");
        let mut rate = Samples::new("  restore throughput (data / restore time)", "MB/s");
        for _ in 0..runs {
            vmm::restore::forget_checked_images();
            let t = Instant::now();
            let r = MicroVm::restore(dir, mode, RestoreOptions { skip_verify: !verify, ..Default::default() })
                .map_err(s)?;
            let built = t.elapsed();
            ping(&r)?;
            first.push_duration(t.elapsed());
            rate.values.push(dirty as f64 / built.as_secs_f64() / 1e6);
        }
        rows.push(first);
        rows.push(rate);
    }
    let mut lazy = Samples::new(&format!("restore CoW ({d} MiB dirtied), blocks checked on touch"), "ms");
    let mut all = Samples::new("  until every block is in and checked (background)", "ms");
    for _ in 0..runs {
        vmm::restore::forget_checked_images();
        let t = Instant::now();
        let r = MicroVm::restore(dir, RestoreMode::Cow, RestoreOptions::default()).map_err(s)?;
        ping(&r)?;
        lazy.push_duration(t.elapsed());
        r.wait_memory_checked();
        all.push_duration(t.elapsed());
    }
    rows.push(lazy);
    rows.push(all);
    // The same into a warm pool VM made before the request (KVM VM build off the clock).
    let mut pooled = Samples::new(&format!("restore CoW ({d} MiB dirtied) into a warm pool VM, checked"), "ms");
    for _ in 0..runs {
        let warm = vmm::pool::WarmVm::new(mem, 1).map_err(s)?;
        vmm::restore::forget_checked_images();
        let t = Instant::now();
        let r = warm.restore_snapshot(dir, None).map_err(s)?;
        ping(&r)?;
        pooled.push_duration(t.elapsed());
        r.wait_memory_checked();
    }
    rows.push(pooled);
    let mut nov = Samples::new(&format!("restore CoW ({d} MiB dirtied), --no-verify"), "ms");
    for _ in 0..runs {
        let t = Instant::now();
        let r = MicroVm::restore(dir, RestoreMode::Cow, RestoreOptions { skip_verify: true, ..Default::default() })
            .map_err(s)?;
        ping(&r)?;
        nov.push_duration(t.elapsed());
    }
    rows.push(nov);
    // Snapshots without block hashes (older ones) hash the whole image before mapping it.
    std::fs::remove_file(dir.join("memory.blocks")).map_err(s)?;
    let mut old = Samples::new("  CoW, whole image hashed first (no memory.blocks)", "ms");
    for _ in 0..runs.min(3) {
        vmm::restore::forget_checked_images();
        let t = Instant::now();
        let r = MicroVm::restore(dir, RestoreMode::Cow, RestoreOptions::default()).map_err(s)?;
        ping(&r)?;
        old.push_duration(t.elapsed());
    }
    rows.push(old);
    Ok(rows)
}

/// A shared-file VM with 64 MiB of data snapshotted onto another file system than its memfd:
/// time, and how much the memfd grew.
fn shared_elsewhere(mem: u64, dir: &Path, runs: usize) -> Result<Vec<Samples>, String> {
    let mut time = Samples::new("snapshot shared-file memory onto another fs (64 MiB data)", "ms");
    let mut grown = Samples::new("  host shmem added (memfd growth)", "MiB");
    let mut size = Samples::new("  image on disk", "MiB");
    for i in 0..runs.min(3) {
        let vm = boot_filled(mem, 64 << 20, Backing::SharedFile)?;
        vm.pause().map_err(s)?;
        let memfd = vm.memory().file().ok_or("shared memory has no file")?.try_clone().map_err(s)?;
        let blocks = || memfd.metadata().map(|m| m.blocks() * 512).map_err(s);
        let before = blocks()?;
        let target = dir.join(format!("shared{i}"));
        let rep = vm.snapshot(&target, SnapshotKind::Full).map_err(s)?;
        if rep.linked {
            return Err(format!("{} is on the memfd's file system (set FORKVM_BENCH_DIR)", dir.display()));
        }
        time.push_duration(rep.duration);
        grown.values.push(mib(blocks()?.saturating_sub(before)));
        size.values.push(mib(rep.memory_disk_bytes));
        drop(vm);
        std::fs::remove_dir_all(&target).map_err(s)?;
    }
    Ok(vec![time, grown, size])
}

/// All restore rows for a `mem` guest, in scratch directory `dir` (not on the memfd's fs).
pub fn rows(mem: u64, dir: &Path, runs: usize) -> Result<Vec<Samples>, String> {
    let mut out = Vec::new();
    for dirty in [64u64 << 20, 1 << 30] {
        if dirty + test_guest::LOW_LIMIT > mem {
            continue;
        }
        let d = dir.join(format!("restore-{}m", dirty >> 20));
        out.extend(restore_rows(mem, dirty, &d, runs)?);
        std::fs::remove_dir_all(&d).map_err(s)?;
    }
    out.extend(shared_elsewhere(mem, dir, runs)?);
    Ok(out)
}

/// `forkvm bench restore`: only these rows, for a guest of `--mem` (at least 2 GiB, so the 1 GiB
/// row runs), in a scratch directory under $FORKVM_BENCH_DIR (default: the temp dir).
pub fn bench_restore(args: &crate::cli::BenchArgs) -> Result<i32, String> {
    let mem = args.mem.max(2 << 30);
    let base = std::env::var_os("FORKVM_BENCH_DIR").map(std::path::PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("forkvm-bench-restore-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let rows = rows(mem, &dir, args.runs.max(1));
    let _ = std::fs::remove_dir_all(&dir);
    let title = format!("forkvm bench restore: test guest {} MiB, {} runs", mem >> 20, args.runs.max(1));
    print!("{}", crate::stats::table(&title, &rows?));
    Ok(0)
}
