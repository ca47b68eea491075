//! `forkvm bench store`: hibernation into the chunk store and lazy wakes through the page server,
//! on a real test-guest memory image (2 GiB unless `--mem` asks for more, ~1 GiB of it dirtied
//! from the host with a mix of zero, repeated, text-like, sparse and random pages).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm::hibernate::chunkstore::Store;
use vmm::hibernate::pagesrv::{self, WorkingSet};
use vmm::lazy_restore::Record;
use vmm::{Compression, HibernateOptions, HibernateReport, MicroVm, VmConfig, WakeOptions};

use crate::cli::BenchArgs;
use crate::stats::{table, Samples};

const T: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;
/// Where the dirtied memory starts (above the test guest's own pages).
const FILL_GPA: u64 = 256 * MIB;
const FILL_BYTES: u64 = 1 << 30;
/// Pieces of the synthetic image, each with its own seed (and its own pool of repeated pages).
const PIECE: u64 = 64 * MIB;
const WSET_BYTES: u64 = 300 * MIB;
const DEFAULT_MEM: u64 = 256 * MIB;

fn e(x: impl std::fmt::Display) -> String {
    x.to_string()
}

struct Scratch(PathBuf);
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn bench_store(args: &BenchArgs) -> Result<i32, String> {
    let mem = if args.mem > DEFAULT_MEM { args.mem.max(FILL_GPA + FILL_BYTES) } else { 2 << 30 };
    let runs = args.runs.max(1);
    let root = std::env::var_os("FORKVM_BENCH_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let scratch = Scratch(root.join(format!("forkvm-bench-store-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&scratch.0);
    let dir = |n: &str| scratch.0.join(n);
    println!(
        "forkvm bench store: test guest {} MiB, {} MiB dirtied from the host (zero/repeated/text/sparse/random pages), {runs} runs\n",
        mem >> 20,
        FILL_BYTES >> 20
    );

    // --- compression and dedup on the real image ---
    let vm = boot(mem)?;
    vm.pause().map_err(e)?;
    fill(&vm, None)?;
    let mut rows = Vec::new();
    for (label, c) in [("zstd-3", Compression::Zstd), ("lz4", Compression::Lz4)] {
        let opts = HibernateOptions { compression: c, ..Default::default() };
        let store = dir(&format!("store-{label}"));
        let rep = vm.hibernate(&dir(&format!("vm-{label}")), &store, &opts).map_err(e)?;
        rows.push((label.to_string(), rep, store));
    }
    let sibling = boot(mem)?;
    sibling.pause().map_err(e)?;
    fill(&sibling, Some(3))?;
    let srep = sibling.hibernate(&dir("sibling"), &dir("store-zstd-3"), &HibernateOptions::default()).map_err(e)?;
    drop(sibling);
    print_space(&rows, &srep, &dir("store-zstd-3"))?;

    // --- fault service latency on plain mappings (pagesrv's own benchmark) ---
    println!("\nfault service: pagesrv bench on a 256 MiB synthetic image (plain mappings, no VM)");
    let pb = pagesrv::BenchOpts { size_mib: 256, runs: runs.min(3), ..Default::default() };
    print!("{}", pagesrv::bench_store(&pb));
    drop(vm);

    // --- wake a 2 GiB VM: resume and first answer ---
    let (hdir, store) = (dir("vm-zstd-3"), dir("store-zstd-3"));
    let mut wake_resume = Samples::new("wake until vCPUs run (lazy)", "ms");
    let mut resume_pong = Samples::new("resume -> first answer (ping/pong)", "ms");
    let mut wake_pong = Samples::new("wake -> first answer", "ms");
    let mut faults = Samples::new("page faults until the answer", "n");
    let mut open = Samples::new("  of which: read state, open store + manifest", "ms");
    let mut server = Samples::new("  of which: map memory, start page server", "ms");
    let mut build = Samples::new("  of which: build KVM VM from state", "ms");
    for _ in 0..runs {
        let opts = WakeOptions { prefetch: false, record: Record::Never, ..Default::default() };
        let t0 = Instant::now();
        let (w, h) = MicroVm::wake(&hdir, &store, opts).map_err(e)?;
        let t1 = Instant::now();
        w.command("ping", T).map_err(e)?;
        wake_resume.push_duration(t1 - t0);
        resume_pong.push_duration(t1.elapsed());
        wake_pong.push_duration(t0.elapsed());
        faults.values.push(h.stats().faults as f64);
        open.values.push(h.report().open_ms);
        server.values.push(h.report().server_ms);
        build.values.push(h.report().build_ms);
        drop(w);
        drop(h);
    }
    let mut eager = Samples::new("eager restore from the store (all pages)", "ms");
    let st = Store::open_readonly(&store).map_err(e)?;
    let image = vmm::hibernate::read_record(&hdir).map_err(e)?.image;
    let m = st.manifest(&image).map_err(e)?;
    for _ in 0..runs.min(3) {
        let t = Instant::now();
        eager_copy(&st, &m, &[(0, m.image_len())])?;
        eager.push_duration(t.elapsed());
    }
    println!();
    print!(
        "{}",
        table(
            &format!("wake of a hibernated {} MiB VM (goal: first answer < 100 ms)", mem >> 20),
            &[wake_resume, open, server, build, resume_pong, wake_pong, faults, eager]
        )
    );

    // --- a 300 MiB working set: lazy + REAP prefetch vs eager ---
    let ws = record_working_set(&hdir, &store)?;
    let mut pf_resident = Samples::new("REAP: wake -> working set resident", "ms");
    let mut pf_pong = Samples::new("REAP: wake -> first answer", "ms");
    let mut demand = Samples::new("no prefetch: wake -> WS touched (faults, 64K)", "ms");
    let mut eager_ws = Samples::new("eager copy of the WS pages (VM not yet built)", "ms");
    for _ in 0..runs.min(5) {
        let t0 = Instant::now();
        let (w, mut h) =
            MicroVm::wake(&hdir, &store, WakeOptions { record: Record::Never, ..Default::default() }).map_err(e)?;
        w.command("ping", T).map_err(e)?;
        pf_pong.push_duration(t0.elapsed());
        h.wait_working_set().ok_or("no working set was prefetched")?;
        pf_resident.push_duration(t0.elapsed());
        drop(w);
        drop(h);

        let t0 = Instant::now();
        let opts = WakeOptions { prefetch: false, record: Record::Never, ..Default::default() };
        let (w, h) = MicroVm::wake(&hdir, &store, opts).map_err(e)?;
        touch_ranges(&w, &ws)?;
        demand.push_duration(t0.elapsed());
        drop(w);
        drop(h);

        let t = Instant::now();
        eager_copy(&st, &m, &ws.ranges.iter().map(|&(o, l)| (o, u64::from(l))).collect::<Vec<_>>())?;
        eager_ws.push_duration(t.elapsed());
    }
    println!();
    print!(
        "{}",
        table(
            &format!("{} MiB working set (goal: resident faster than an eager copy)", ws.bytes() >> 20),
            &[pf_pong, pf_resident, demand, eager_ws]
        )
    );
    println!();
    bench_store_fc(args)
}

/// Firecracker-style restores through `forkvm pagesrv`'s listener and a stand-in Firecracker:
/// fault latency and time to a working set resident, raw memory file vs chunk store.
pub fn bench_store_fc(args: &BenchArgs) -> Result<i32, String> {
    let o = pagesrv::FcBenchOpts { runs: args.runs.clamp(1, 5), ..Default::default() };
    let out = pagesrv::bench_fc(&o);
    print!("{out}");
    if out.starts_with("bench fc failed") {
        return Err(out);
    }
    Ok(0)
}

fn boot(mem: u64) -> Result<MicroVm, String> {
    let vm = MicroVm::boot(VmConfig { mem_size: mem, track_dirty: false, ..Default::default() }).map_err(e)?;
    vm.wait_for("forkvm-test-guest ready", T).map_err(e)?;
    vm.command("count", T).map_err(e)?;
    Ok(vm)
}

/// Writes the synthetic image into guest memory; `diverge` = percent of pages a sibling changed.
fn fill(vm: &MicroVm, diverge: Option<u64>) -> Result<(), String> {
    let pages = (PIECE / 4096) as usize;
    for i in 0..FILL_BYTES / PIECE {
        let mut piece = pagesrv::bench::synthetic_image(pages, 0x5eed + i);
        if let Some(pct) = diverge {
            let mut r = 0x9e37_79b9_7f4a_7c15u64 ^ i;
            for _ in 0..pages as u64 * pct / 100 {
                r ^= r << 13;
                r ^= r >> 7;
                r ^= r << 17;
                let p = (r % pages as u64) as usize;
                piece[p * 4096 + (r >> 40) as usize % 4096] ^= 0x5a;
            }
        }
        if !vm.memory().write(FILL_GPA + i * PIECE, &piece) {
            return Err("the fill range is not guest RAM".into());
        }
    }
    Ok(())
}

fn mib(b: u64) -> f64 {
    b as f64 / MIB as f64
}

fn print_space(rows: &[(String, HibernateReport, PathBuf)], sib: &HibernateReport, zstd: &Path) -> Result<(), String> {
    println!("hibernate (pause + save state + store memory), one run each; sizes in MiB");
    println!(
        "{:<8} {:>9} {:>9} {:>10} {:>9} {:>9} {:>9} {:>11} {:>8} {:>9}",
        "codec", "store ms", "MB/s", "zero pgs", "unique", "dedup pg", "stored", "compression", "dedup", "overall"
    );
    for (label, r, store) in rows {
        let st = Store::open_readonly(store).map_err(e)?;
        let s = st.image_stats(&st.manifest(&r.image).map_err(e)?);
        println!(
            "{:<8} {:>9.0} {:>9.0} {:>10} {:>9} {:>9} {:>9.1} {:>10.2}x {:>7.2}x {:>8.1}x",
            label,
            r.store_ms,
            r.bytes_raw as f64 / 1e3 / r.store_ms,
            r.pages_zero,
            r.pages_unique,
            r.pages_dedup,
            mib(r.bytes_stored),
            s.compression_ratio(),
            s.dedup_ratio(),
            s.overall_ratio(),
        );
    }
    if let Some((_, z, _)) = rows.first() {
        println!(
            "zstd-3 timings: pause {:.1} ms, save state {:.1} ms, store {:.0} ms, files {:.1} ms, total {:.0} ms",
            z.pause_ms, z.save_ms, z.store_ms, z.files_ms, z.total_ms
        );
    }
    let all = Store::open_readonly(zstd).map_err(e)?.stats().map_err(e)?;
    println!(
        "sibling VM (same image, 3% of pages changed) into the zstd store: {} new chunks of {} non-zero pages, +{:.1} MiB \
         ({:.1} MiB for the first VM); store now {:.0} MiB logical in {:.1} MiB ({:.1}x), dedup {:.2}x",
        sib.pages_unique,
        sib.pages_total - sib.pages_zero,
        mib(sib.bytes_stored),
        mib(rows.first().map_or(0, |r| r.1.bytes_stored)),
        mib(all.logical_bytes),
        mib(all.stored_bytes),
        all.overall_ratio(),
        all.dedup_ratio()
    );
    Ok(())
}

/// 75 runs of 4 MiB spread over the dirtied region: the working set a woken guest needs.
fn ws_ranges() -> Vec<(u64, u64)> {
    let n = WSET_BYTES / (4 * MIB);
    let stride = FILL_BYTES / n;
    (0..n).map(|i| (FILL_GPA + i * stride, 4 * MIB)).collect()
}

/// First wake, recording: the host touches the working set (the guest itself is far too slow
/// under the PVM emulator), then the recorded set is saved for the next wakes.
fn record_working_set(hdir: &Path, store: &Path) -> Result<WorkingSet, String> {
    let _ = std::fs::remove_file(hdir.join(vmm::hibernate::WSET_FILE));
    let opts = WakeOptions { record: Record::Always, prefetch: false, ..Default::default() };
    let (w, h) = MicroVm::wake(hdir, store, opts).map_err(e)?;
    w.command("ping", T).map_err(e)?;
    let ranges = ws_ranges();
    let mut buf = vec![0u8; 4096];
    for &(gpa, len) in &ranges {
        for off in (0..len).step_by(4096) {
            w.memory().read(gpa + off, &mut buf);
        }
    }
    h.save_working_set().map_err(e)?;
    drop(w);
    drop(h);
    WorkingSet::load(&hdir.join(vmm::hibernate::WSET_FILE)).map_err(e)
}

/// Touches every page of the working set from the host (first touch = a fault).
fn touch_ranges(vm: &MicroVm, ws: &WorkingSet) -> Result<(), String> {
    let mut b = [0u8; 1];
    for &(off, len) in &ws.ranges {
        for o in (off..off + u64::from(len)).step_by(4096) {
            // Source offsets below the MMIO gap are guest addresses.
            if !vm.memory().read(o, &mut b) {
                return Err(format!("{o:#x} is not guest RAM"));
            }
        }
    }
    Ok(())
}

/// Guest address of image offset `o` (RAM above the 32-bit MMIO gap continues at 4 GiB).
fn gpa_of(o: u64) -> u64 {
    const GAP_START: u64 = 0xC000_0000;
    if o < GAP_START {
        o
    } else {
        o + (4 << 30) - GAP_START
    }
}

/// Decompresses `ranges` of the image straight into fresh anonymous guest memory, skipping zero
/// pages: what an eager restore from the store does before the VM can resume.
fn eager_copy(st: &Store, m: &vmm::hibernate::chunkstore::Manifest, ranges: &[(u64, u64)]) -> Result<(), String> {
    let dst = vmm::vstate::memory::GuestMem::new(m.image_len(), vmm::Backing::Anon, false).map_err(e)?;
    const STEP: u64 = 4 * MIB;
    for &(off, len) in ranges {
        let mut o = off;
        while o < off + len {
            let n = (off + len - o).min(STEP - o % STEP);
            if !m.all_zero(o / 4096, n / 4096) {
                let p = dst.host_range(gpa_of(o), n).ok_or_else(|| format!("{o:#x}+{n:#x} is not guest RAM"))?;
                // SAFETY: host_range proved [p, p+n) lies inside one mapping of `dst`, which we own
                // and nobody else uses while this slice lives.
                let b = unsafe { std::slice::from_raw_parts_mut(p, n as usize) };
                st.read_pages(m, o / 4096, b).map_err(e)?;
            }
            o += n;
        }
    }
    Ok(())
}
