//! `bench_store`: compression/dedup on a synthetic memory image and fault
//! service latency for single-page, batched and prefetched restores.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chunkstore::{Codec, Manifest, Store, StoreConfig};

use crate::anon::AnonMap;
use crate::server::{PageServer, ServerConfig};
use crate::source::{ChunkSource, PageSource};
use crate::wset::WorkingSet;

/// Options of [`bench_store`].
#[derive(Debug, Clone)]
pub struct BenchOpts {
    /// Image size in MiB.
    pub size_mib: usize,
    /// Repetitions of each restore mode (median/min/max reported).
    pub runs: usize,
    /// Share of the image touched by the "guest" after restore, in percent.
    pub working_set_pct: usize,
    /// zstd level.
    pub level: i32,
    /// Scratch directory for the stores (default: a temp dir, removed after).
    pub dir: Option<PathBuf>,
}

impl Default for BenchOpts {
    fn default() -> Self {
        BenchOpts { size_mib: 256, runs: 3, working_set_pct: 25, level: 3, dir: None }
    }
}

const PS: usize = 4096;

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

/// A synthetic but plausible guest memory image: runs of zero pages, pages
/// repeated from a small pool (shared libraries, page-cache copies),
/// text-like pages, sparse data-structure pages and random pages.
pub fn synthetic_image(pages: usize, seed: u64) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "the ", "kernel ", "memory ", "page ", "struct ", "return ", "if (", "0x", "int ", "void ", "static ",
        "->next", "NULL", "; ", "\n\t", "error", "config ", "{", "}", "usr/lib/",
    ];
    let mut r = Rng(seed | 1);
    let mut pool = vec![0u8; 32 * PS];
    for b in pool.iter_mut() {
        *b = (r.next() % 64) as u8 + 32;
    }
    let mut v = vec![0u8; pages * PS];
    let mut i = 0;
    while i < pages {
        let run = (1 + r.below(64) as usize).min(pages - i);
        let kind = r.below(100);
        for p in i..i + run {
            let page = &mut v[p * PS..(p + 1) * PS];
            match kind {
                0..=34 => {}
                35..=49 => {
                    let k = r.below(32) as usize;
                    page.copy_from_slice(&pool[k * PS..(k + 1) * PS]);
                }
                50..=79 => {
                    let mut pos = 0;
                    while pos < PS {
                        let w = WORDS[r.below(WORDS.len() as u64) as usize].as_bytes();
                        let n = w.len().min(PS - pos);
                        page[pos..pos + n].copy_from_slice(&w[..n]);
                        pos += n;
                    }
                }
                80..=89 => {
                    for slot in page.chunks_exact_mut(64) {
                        if r.below(4) == 0 {
                            let val = 0xffff_8880_0000_0000u64 | (r.below(1 << 24) << 6);
                            slot[..8].copy_from_slice(&val.to_le_bytes());
                            slot[8..12].copy_from_slice(&(r.below(4096) as u32).to_le_bytes());
                        }
                    }
                }
                _ => {
                    for b in page.iter_mut() {
                        *b = r.next() as u8;
                    }
                }
            }
        }
        i += run;
    }
    v
}

/// Pages a guest touches after restore: clustered runs in random order.
fn working_set_pages(pages: usize, pct: usize, seed: u64) -> Vec<usize> {
    let target = pages * pct.min(100) / 100;
    let mut r = Rng(seed | 1);
    let mut seen = vec![false; pages];
    let mut out = Vec::with_capacity(target);
    while out.len() < target {
        let start = r.below(pages as u64) as usize;
        let len = 1 + r.below(32) as usize;
        let end = (start + len).min(pages);
        for (p, s) in seen.iter_mut().enumerate().take(end).skip(start) {
            if !*s && out.len() < target {
                *s = true;
                out.push(p);
            }
        }
    }
    out
}

struct RunResult {
    access: Vec<Duration>,
    total: Duration,
    server_p50: Option<Duration>,
    server_p99: Option<Duration>,
    faults: u64,
    prefetch_time: Option<Duration>,
}

/// Restore into a fresh mapping and touch `order`, timing each first access.
fn restore_run(
    src: &Arc<dyn PageSource>,
    len: usize,
    order: &[usize],
    batch: usize,
    prefetch: Option<WorkingSet>,
    record: bool,
) -> Result<(RunResult, WorkingSet), String> {
    let map = AnonMap::new(len).map_err(|e| format!("mmap: {e}"))?;
    let cfg = ServerConfig { batch, record, prefetch, ..Default::default() };
    let region = map.region(0);
    let srv = PageServer::register(vec![region], src.clone(), cfg).map_err(|e| e.to_string())?;
    let mut access = Vec::with_capacity(order.len());
    let t0 = Instant::now();
    let mut srv = srv;
    for &p in order {
        let t = Instant::now();
        // SAFETY: p < pages, so the address is inside the live mapping.
        let addr = unsafe { map.ptr.add(p * PS + 64) };
        // SAFETY: `addr` is inside the live mapping; the server fills it.
        let _ = unsafe { std::ptr::read_volatile(addr) };
        access.push(t.elapsed());
    }
    let total = t0.elapsed();
    let prefetch_time = srv.wait_prefetch();
    let ws = srv.working_set();
    let st = srv.stop();
    Ok((
        RunResult {
            access,
            total,
            server_p50: st.latency_p50,
            server_p99: st.latency_p99,
            faults: st.faults,
            prefetch_time,
        },
        ws,
    ))
}

fn pct(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn med_min_max(mut v: Vec<Duration>) -> (Duration, Duration, Duration) {
    v.sort();
    match (v.first(), v.last()) {
        (Some(&a), Some(&b)) => (v[v.len() / 2], a, b),
        _ => (Duration::ZERO, Duration::ZERO, Duration::ZERO),
    }
}

fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}
fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

/// Run the benchmark; returns a printable report (errors are reported in it).
pub fn bench_store(opts: &BenchOpts) -> String {
    match bench_inner(opts) {
        Ok(s) => s,
        Err(e) => format!("bench failed: {e}\n"),
    }
}

fn bench_inner(opts: &BenchOpts) -> Result<String, String> {
    let pages = (opts.size_mib.max(1) << 20) / PS;
    let runs = opts.runs.max(1);
    let tmp =
        opts.dir.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("pagesrv-bench-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&tmp);
    let mut out = String::new();
    let img = synthetic_image(pages, 0x5eed);
    let _ = writeln!(
        out,
        "synthetic image: {} MiB, {pages} pages of 4 KiB, working set {}%, {runs} run(s)\n",
        opts.size_mib, opts.working_set_pct
    );

    // --- store: compression and dedup ---
    let _ = writeln!(
        out,
        "{:<14} {:>9} {:>10} {:>10} {:>11} {:>11} {:>9} {:>9} {:>9}",
        "store", "put MB/s", "zero pgs", "chunks", "stored MiB", "compression", "dedup", "overall", "fork new"
    );
    let mut zstd_store = None;
    for (label, codec) in [("zstd", Codec::Zstd), ("lz4", Codec::Lz4)] {
        let dir = tmp.join(label);
        let store = Store::open_or_create(&dir, StoreConfig { codec, level: opts.level, ..Default::default() })
            .map_err(|e| e.to_string())?;
        let (m, put) = store.put_image("base", &img).map_err(|e| e.to_string())?;
        // A fork that dirtied 3% of its pages.
        let mut fork = img.clone();
        let mut r = Rng(77);
        for _ in 0..pages * 3 / 100 {
            let p = r.below(pages as u64) as usize;
            fork[p * PS + (r.below(PS as u64) as usize)] ^= 0x5A;
        }
        let (_, fput) = store.put_image("fork", &fork).map_err(|e| e.to_string())?;
        let s = store.image_stats(&m);
        let all = store.stats().map_err(|e| e.to_string())?;
        let _ = writeln!(
            out,
            "{:<14} {:>9.0} {:>10} {:>10} {:>11.1} {:>10.2}x {:>8.2}x {:>8.2}x {:>9}",
            label,
            img.len() as f64 / 1e6 / put.elapsed.as_secs_f64(),
            s.zero_pages,
            s.unique_chunks,
            s.stored_bytes as f64 / (1u64 << 20) as f64,
            s.compression_ratio(),
            s.dedup_ratio(),
            s.overall_ratio(),
            fput.new_chunks,
        );
        let _ = writeln!(
            out,
            "{:<14} both images: {:.1} MiB logical in {:.1} MiB stored ({:.1}x), dedup {:.2}x",
            "",
            all.logical_bytes as f64 / (1u64 << 20) as f64,
            all.stored_bytes as f64 / (1u64 << 20) as f64,
            all.overall_ratio(),
            all.dedup_ratio()
        );
        if codec == Codec::Zstd {
            zstd_store = Some((Arc::new(store), Arc::new(m)));
        }
    }
    let (store, m): (Arc<Store>, Arc<Manifest>) = zstd_store.ok_or("no zstd store")?;

    // --- raw decompress cost ---
    let mut one = vec![0u8; PS];
    let nz: Vec<u64> = (0..pages as u64).filter(|&p| !m.is_zero(p)).take(20000).collect();
    let mut lat = Vec::with_capacity(nz.len());
    for &p in &nz {
        let t = Instant::now();
        store.read_page(&m, p, &mut one).map_err(|e| e.to_string())?;
        lat.push(t.elapsed());
    }
    lat.sort();
    let _ = writeln!(
        out,
        "\nread_page (pread + zstd decompress + blake3 verify), non-zero pages: p50 {} us, p99 {} us",
        us(pct(&lat, 0.5)),
        us(pct(&lat, 0.99))
    );

    // --- restore modes ---
    let order = working_set_pages(pages, opts.working_set_pct, 99);
    let src: Arc<dyn PageSource> = Arc::new(ChunkSource::new(store.clone(), m.clone()));
    let len = pages * PS;
    let _ = writeln!(
        out,
        "\nrestore, guest touches {} pages ({:.1} MiB) in clustered random order; per-access latency as seen by the guest thread",
        order.len(),
        (order.len() * PS) as f64 / (1u64 << 20) as f64
    );
    let _ = writeln!(
        out,
        "{:<22} {:>8} {:>10} {:>10} {:>11} {:>11} {:>24}",
        "mode", "faults", "access p50", "access p99", "fault p50", "fault p99", "WS resident ms med/min/max"
    );
    let mut recorded = WorkingSet::default();
    let modes: [(&str, usize, bool); 6] = [
        ("single page (4K)", 4096, false),
        ("batched 64K", 64 << 10, false),
        ("batched 256K", 256 << 10, false),
        ("batched 2M", 2 << 20, false),
        ("prefetched (REAP) 64K", 64 << 10, true),
        ("prefetched (REAP) 4K", 4096, true),
    ];
    for (label, batch, prefetch) in modes {
        let mut totals = Vec::new();
        let mut p50s = Vec::new();
        let mut p99s = Vec::new();
        let mut s50 = Vec::new();
        let mut s99 = Vec::new();
        let mut faults = 0;
        let mut pf_times = Vec::new();
        for _ in 0..runs {
            let pf = prefetch.then(|| recorded.clone());
            let record = batch == 4096 && !prefetch;
            let (mut r, ws) = restore_run(&src, len, &order, batch, pf, record)?;
            if record {
                recorded = ws;
            }
            r.access.sort();
            p50s.push(pct(&r.access, 0.5));
            p99s.push(pct(&r.access, 0.99));
            totals.push(r.total);
            s50.push(r.server_p50.unwrap_or_default());
            s99.push(r.server_p99.unwrap_or_default());
            faults = r.faults;
            pf_times.extend(r.prefetch_time);
        }
        let (tm, tmin, tmax) = med_min_max(totals);
        let _ = writeln!(
            out,
            "{:<22} {:>8} {:>10} {:>10} {:>11} {:>11} {:>24}",
            label,
            faults,
            us(med_min_max(p50s).0) + "us",
            us(med_min_max(p99s).0) + "us",
            us(med_min_max(s50).0) + "us",
            us(med_min_max(s99).0) + "us",
            format!("{} / {} / {}", ms(tm), ms(tmin), ms(tmax)),
        );
        if !pf_times.is_empty() {
            let (pm, pmin, pmax) = med_min_max(pf_times);
            let _ = writeln!(
                out,
                "{:<22} {:>80}",
                "  prefetch thread done",
                format!("{} / {} / {}", ms(pm), ms(pmin), ms(pmax))
            );
        }
    }

    // --- eager baseline: decompress the same pages into fresh memory ---
    let mut eager = Vec::new();
    let mut eager_all = Vec::new();
    for _ in 0..runs {
        let map = AnonMap::new(len).map_err(|e| format!("mmap: {e}"))?;
        // SAFETY: the mapping is live, len bytes, and only used here.
        let dst = unsafe { std::slice::from_raw_parts_mut(map.ptr, len) };
        let t = Instant::now();
        for &p in &order {
            store.read_page(&m, p as u64, &mut dst[p * PS..(p + 1) * PS]).map_err(|e| e.to_string())?;
        }
        eager.push(t.elapsed());
        drop(map);
        let map = AnonMap::new(len).map_err(|e| format!("mmap: {e}"))?;
        // SAFETY: as above.
        let dst = unsafe { std::slice::from_raw_parts_mut(map.ptr, len) };
        let t = Instant::now();
        for (i, chunk) in dst.chunks_mut(1 << 20).enumerate() {
            store.read_pages(&m, (i * (1 << 20) / PS) as u64, chunk).map_err(|e| e.to_string())?;
        }
        eager_all.push(t.elapsed());
    }
    for (name, runs) in [("eager, same WS pages", eager), ("eager, whole image", eager_all)] {
        let (m, min, max) = med_min_max(runs);
        let _ = writeln!(
            out,
            "{:<22} {:>8} {:>10} {:>10} {:>11} {:>11} {:>24}",
            name,
            "-",
            "-",
            "-",
            "-",
            "-",
            format!("{} / {} / {}", ms(m), ms(min), ms(max))
        );
    }
    let _ = writeln!(
        out,
        "\nfault p50/p99 = server-side service time (message read -> page placed); access = guest-side first-touch time.\nrecorded working set (from the single-page run): {} ranges, {:.1} MiB",
        recorded.ranges.len(),
        recorded.bytes() as f64 / (1u64 << 20) as f64
    );
    if opts.dir.is_none() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    Ok(out)
}
