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
    let ps = s.cfg.page_size as u64;
    for &(off, len) in &ws.ranges {
        if s.stop.load(Relaxed) {
            return;
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
                    match place(s, rs, q0, p, true) {
                        Ok(Outcome::Retry) if tries < 100 && !s.stop.load(Relaxed) => {
                            tries += 1;
                            std::thread::sleep(Duration::from_micros(100));
                        }
                        Ok(_) => break,
                        Err(e) => {
                            // Not fatal here: a fault on these pages will
                            // retry and fail the faulting thread if needed.
                            tracing::warn!("prefetch: {e}");
                            break;
                        }
                    }
                }
            }
        }
    }
    if let Ok(mut t) = s.prefetch_time.lock() {
        *t = Some(t0.elapsed());
    }
    tracing::debug!(elapsed = ?t0.elapsed(), since_start = ?s.started.elapsed(), "prefetch done");
}
