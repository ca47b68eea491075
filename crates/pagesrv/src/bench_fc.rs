//! `bench_fc`: forkvm's page server as Firecracker's memory backend, measured through the real
//! [`Listener`] and a Firecracker stand-in ([`FcClient`]): fault latency seen by the VM and time
//! until a working set is resident, serving a raw memory file vs a chunk-store image.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chunkstore::{Store, StoreConfig};

use crate::bench::synthetic_image;
use crate::fc::PageSizeField;
use crate::fc_client::{ClientOpts, FcClient};
use crate::listener::{Event, Listener, ListenerConfig};
use crate::source::{ChunkSource, FileSource, PageSource};

const PS: usize = 4096;
const MIB: usize = 1 << 20;
const WAIT: Duration = Duration::from_secs(120);

/// Options of [`bench_fc`].
#[derive(Debug, Clone)]
pub struct FcBenchOpts {
    /// Guest memory size in MiB (two regions, like RAM below and above the MMIO gap).
    pub size_mib: usize,
    /// Working set in MiB (4 MiB runs spread over the memory).
    pub wset_mib: usize,
    /// Repetitions (median/min/max reported).
    pub runs: usize,
    /// Scratch directory (default: a temp dir, removed after).
    pub dir: Option<PathBuf>,
}

impl Default for FcBenchOpts {
    fn default() -> Self {
        FcBenchOpts { size_mib: 512, wset_mib: 128, runs: 3, dir: None }
    }
}

struct Scratch(PathBuf);
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn e(x: impl std::fmt::Display) -> String {
    x.to_string()
}

fn next(rx: &Receiver<Event>) -> Result<Event, String> {
    rx.recv_timeout(WAIT).map_err(|_| "no event from the listener".to_string())
}

fn wait_end(rx: &Receiver<Event>) -> Result<(), String> {
    loop {
        match next(rx)? {
            Event::Ended { error: Some(err), .. } => return Err(err),
            Event::Ended { .. } => return Ok(()),
            Event::Rejected { error, .. } => return Err(error),
            Event::Started { .. } => {}
        }
    }
}

fn pct(v: &mut [Duration], q: f64) -> Duration {
    v.sort();
    v.get(((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1))).copied().unwrap_or_default()
}

/// Median, min, max in ms.
fn mmm(v: &mut [f64]) -> String {
    v.sort_by(f64::total_cmp);
    let med = v.get(v.len() / 2).copied().unwrap_or(f64::NAN);
    format!(
        "{med:>10.2} {:>10.2} {:>10.2}",
        v.first().copied().unwrap_or(f64::NAN),
        v.last().copied().unwrap_or(f64::NAN)
    )
}

/// The working set: `wset_mib` in 4 MiB runs spread evenly, as (region, page) of 2 halves.
fn wset_pages(o: &FcBenchOpts) -> Vec<(usize, usize)> {
    let pages = o.size_mib * MIB / PS;
    let runs = (o.wset_mib / 4).max(1);
    let stride = pages / runs;
    let half = pages / 2;
    (0..runs)
        .flat_map(|r| (0..4 * MIB / PS).map(move |i| r * stride + i))
        .filter(|&p| p < pages)
        .map(|p| if p < half { (0, p) } else { (1, p - half) })
        .collect()
}

struct Row {
    p50: Vec<f64>,
    p99: Vec<f64>,
    demand: Vec<f64>,
    reap: Vec<f64>,
    first: Vec<f64>,
}

fn run_source(o: &FcBenchOpts, src: Arc<dyn PageSource>, dir: &Path, tag: &str) -> Result<Row, String> {
    let pages = o.size_mib * MIB / PS;
    let opts = ClientOpts {
        regions: vec![(pages / 2 * PS, 0), (pages / 2 * PS, (pages / 2 * PS) as u64)],
        field: PageSizeField::Both,
        blocking: false,
    };
    let ws = wset_pages(o);
    let sock = dir.join(format!("{tag}.sock"));
    let wset = dir.join(format!("{tag}.wset"));
    let mut row = Row { p50: vec![], p99: vec![], demand: vec![], reap: vec![], first: vec![] };
    // Latency of lone faults (4 KiB batches: one page per fault) and of demand-faulting the
    // working set with 64 KiB batches, no working set file.
    for _ in 0..o.runs {
        let cfg = ListenerConfig { batch: PS, wset: None, ..Default::default() };
        let (l, rx) = Listener::bind(&sock, src.clone(), cfg).map_err(e)?;
        let c = FcClient::connect(&sock, &opts).map_err(e)?;
        let mut lat = c.touch_pages(0, (0..pages / 2).step_by(61));
        lat.extend(c.touch_pages(1, (0..pages / 2).step_by(61)));
        row.p50.push(pct(&mut lat, 0.5).as_secs_f64() * 1e6);
        row.p99.push(pct(&mut lat, 0.99).as_secs_f64() * 1e6);
        drop(c);
        wait_end(&rx)?;
        l.stop();

        let cfg = ListenerConfig { wset: None, ..Default::default() };
        let (l, rx) = Listener::bind(&sock, src.clone(), cfg).map_err(e)?;
        let t0 = Instant::now();
        let c = FcClient::connect(&sock, &opts).map_err(e)?;
        let mut b = [0u8; 1];
        for &(r, p) in &ws {
            c.read(r, p * PS, &mut b);
        }
        row.demand.push(t0.elapsed().as_secs_f64() * 1e3);
        drop(c);
        wait_end(&rx)?;
        l.stop();
    }
    // REAP: a first VM records the working set, later ones get it prefetched.
    let _ = std::fs::remove_file(&wset);
    let cfg = ListenerConfig { wset: Some(wset.clone()), ..Default::default() };
    let (l, rx) = Listener::bind(&sock, src.clone(), cfg).map_err(e)?;
    let c = FcClient::connect(&sock, &opts).map_err(e)?;
    let mut b = [0u8; 1];
    for &(r, p) in &ws {
        c.read(r, p * PS, &mut b);
    }
    drop(c);
    wait_end(&rx)?;
    for _ in 0..o.runs {
        let t0 = Instant::now();
        let c = FcClient::connect(&sock, &opts).map_err(e)?;
        c.read(0, 0, &mut b);
        row.first.push(t0.elapsed().as_secs_f64() * 1e3);
        let half = pages / 2 * PS;
        let want = ws.len();
        loop {
            let got = c.resident(0, 0, half).map_err(e)? + c.resident(1, 0, half).map_err(e)?;
            if got >= want {
                break;
            }
            if t0.elapsed() > WAIT {
                return Err(format!("working set not resident after {WAIT:?} ({got} of {want} pages)"));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        row.reap.push(t0.elapsed().as_secs_f64() * 1e3);
        drop(c);
        wait_end(&rx)?;
    }
    l.stop();
    Ok(row)
}

/// Run the benchmark and return the table (or why it could not run).
pub fn bench_fc(o: &FcBenchOpts) -> String {
    match inner(o) {
        Ok(s) => s,
        Err(err) => format!("bench fc failed: {err}\n"),
    }
}

fn inner(o: &FcBenchOpts) -> Result<String, String> {
    let root = o.dir.clone().unwrap_or_else(std::env::temp_dir);
    let scratch = Scratch(root.join(format!("pagesrv-bench-fc-{}", std::process::id())));
    std::fs::create_dir_all(&scratch.0).map_err(e)?;
    let pages = o.size_mib * MIB / PS;
    let img = synthetic_image(pages, 0xfc);
    let mem = scratch.0.join("mem");
    std::fs::write(&mem, &img).map_err(e)?;
    let store = Store::open_or_create(scratch.0.join("store"), StoreConfig::default()).map_err(e)?;
    let (m, put) = store.put_image("fc-bench", &img).map_err(e)?;
    drop(img);
    let file: Arc<dyn PageSource> = Arc::new(FileSource::whole(std::fs::File::open(&mem).map_err(e)?).map_err(e)?);
    let chunks: Arc<dyn PageSource> = Arc::new(ChunkSource::new(Arc::new(store), Arc::new(m)));
    let rows = [
        ("raw memory file", run_source(o, file, &scratch.0, "file")?),
        ("chunk store (zstd)", run_source(o, chunks, &scratch.0, "store")?),
    ];
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Firecracker-style restore through `forkvm pagesrv` (listener + stand-in VMM, 2 regions, {} MiB, \
         page cache warm; image stored in {:.1} MiB): {} runs",
        o.size_mib,
        put.new_stored_bytes as f64 / MIB as f64,
        o.runs
    );
    let _ = writeln!(out, "{:<58} {:>10} {:>10} {:>10}", "metric", "median", "min", "max");
    for (name, mut r) in rows {
        let ws = o.wset_mib;
        let lines = [
            ("lone 4 KiB fault, seen by the VM: p50 (us)".to_string(), &mut r.p50),
            ("lone 4 KiB fault, seen by the VM: p99 (us)".to_string(), &mut r.p99),
            (format!("{ws} MiB working set by faults, 64 KiB batches (ms)"), &mut r.demand),
            ("REAP prefetch: connect -> first page (ms)".to_string(), &mut r.first),
            (format!("REAP prefetch: connect -> {ws} MiB working set resident (ms)"), &mut r.reap),
        ];
        for (label, v) in lines {
            let _ = writeln!(out, "{:<58} {}", format!("{name}: {label}"), mmm(v));
        }
    }
    Ok(out)
}
