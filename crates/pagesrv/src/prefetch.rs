//! The REAP prefetch thread: copies a recorded working set in order,
//! racing the fault thread safely (pages already present are skipped or
//! answered with EEXIST).

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crate::fault::place;
use crate::server::{Outcome, Shared};
use crate::wset::WorkingSet;

pub(crate) fn prefetch_loop(s: &Shared, ws: &WorkingSet) {
    let t0 = Instant::now();
    fetch_ranges(s, &ws.ranges, true);
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
                while p < b && !rs.present.get(p) && !rs.removed.get(p) {
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
