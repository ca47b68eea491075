//! The REAP prefetch thread: copies a recorded working set in order,
//! racing the fault thread safely (pages already present are skipped or
//! answered with EEXIST).

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crate::fault::place;
use crate::server::{Outcome, Shared};
use crate::wset::WorkingSet;

/// Pages placed per `UFFDIO_COPY` by the prefetcher: large enough to amortise the ioctl, small
/// enough that the decompressed buffer stays in cache (4 MiB runs were ~30% slower than 256 KiB).
const CHUNK_PAGES: usize = 64;
/// Unit of work dealt to parallel prefetch workers.
const PIECE: u32 = 1 << 20;

pub(crate) fn prefetch_loop(s: &Shared, ws: &WorkingSet) {
    let t0 = Instant::now();
    let n = s.cfg.prefetch_threads.clamp(1, 16);
    if n == 1 {
        fetch_ranges(s, &ws.ranges, true);
    } else {
        // Cut the ranges into 1 MiB pieces dealt round-robin, so every worker goes through the
        // working set roughly in recorded (first-touch) order.
        let mut pieces: Vec<(u64, u32)> = Vec::new();
        for &(off, len) in &ws.ranges {
            let mut o = 0u32;
            while o < len {
                let l = (len - o).min(PIECE);
                pieces.push((off + u64::from(o), l));
                o += l;
            }
        }
        std::thread::scope(|sc| {
            for k in 0..n {
                let mine: Vec<(u64, u32)> = pieces.iter().skip(k).step_by(n).copied().collect();
                let _ = std::thread::Builder::new()
                    .name(format!("pagesrv-prefetch{k}"))
                    .spawn_scoped(sc, move || fetch_ranges(s, &mine, true));
            }
        });
    }
    if s.stop.load(Relaxed) {
        return;
    }
    if let Ok(mut t) = s.prefetch_time.lock() {
        *t = Some(t0.elapsed());
    }
    tracing::debug!(elapsed = ?t0.elapsed(), since_start = ?s.started.elapsed(), "prefetch done");
}

/// Place every missing page of the source ranges `ranges`, in order.
/// Returns the first source error (pages that failed stay missing, so a
/// fault on them retries and fails the faulting thread if needed).
pub(crate) fn fetch_ranges(s: &Shared, ranges: &[(u64, u32)], prefetch: bool) -> Option<String> {
    let ps = s.cfg.page_size as u64;
    let mut first_err = None;
    for &(off, len) in ranges {
        if s.stop.load(Relaxed) {
            return first_err;
        }
        let end = off + u64::from(len);
        for rs in &s.regions {
            let lo = off.max(rs.r.offset);
            let hi = end.min(rs.r.offset + rs.r.len);
            if lo >= hi {
                continue;
            }
            let (a, b) = (((lo - rs.r.offset) / ps) as usize, ((hi - rs.r.offset).div_ceil(ps)) as usize);
            let mut p = a;
            while p < b {
                if rs.present.get(p) || rs.removed.get(p) {
                    p += 1;
                    continue;
                }
                let q0 = p;
                while p < b && p - q0 < CHUNK_PAGES && !rs.present.get(p) && !rs.removed.get(p) {
                    p += 1;
                }
                let mut tries = 0;
                loop {
                    match place(s, rs, q0, p, prefetch) {
                        Ok(Outcome::Retry) if tries < 100 && !s.stop.load(Relaxed) => {
                            tries += 1;
                            std::thread::sleep(Duration::from_micros(100));
                        }
                        Ok(_) => break,
                        Err(e) => {
                            tracing::warn!("prefetch: {e}");
                            first_err.get_or_insert(e.to_string());
                            break;
                        }
                    }
                }
            }
        }
    }
    first_err
}
