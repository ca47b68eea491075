//! Server counters and a lock-free latency histogram.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

const SUB: usize = 16; // sub-buckets per power of two (~6% resolution)
const BUCKETS: usize = SUB + 60 * SUB;

/// Log-linear histogram of durations in nanoseconds.
#[derive(Debug)]
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    max: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            max: AtomicU64::new(0),
        }
    }
}

fn bucket_of(v: u64) -> usize {
    if v < SUB as u64 {
        return v as usize;
    }
    let e = 63 - v.leading_zeros() as usize; // >= 4
    let sub = ((v >> (e - 4)) & (SUB as u64 - 1)) as usize;
    (SUB + (e - 4) * SUB + sub).min(BUCKETS - 1)
}

fn bucket_low(b: usize) -> u64 {
    if b < SUB {
        return b as u64;
    }
    let e = (b - SUB) / SUB + 4;
    let sub = ((b - SUB) % SUB) as u64;
    (1u64 << e) | (sub << (e - 4))
}

impl Histogram {
    /// Record one duration.
    pub fn record(&self, d: Duration) {
        let ns = d.as_nanos().min(u128::from(u64::MAX)) as u64;
        if let Some(b) = self.buckets.get(bucket_of(ns)) {
            b.fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.max.fetch_max(ns, Relaxed);
    }
    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }
    /// Approximate `q` quantile (0.0..=1.0), `None` if empty.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Relaxed);
            if seen >= rank {
                let lo = bucket_low(i);
                let hi = bucket_low(i + 1).max(lo + 1);
                return Some(Duration::from_nanos((lo + hi) / 2));
            }
        }
        Some(Duration::from_nanos(self.max.load(Relaxed)))
    }
    /// Largest sample.
    pub fn max(&self) -> Duration {
        Duration::from_nanos(self.max.load(Relaxed))
    }
}

/// Live counters of a [`crate::PageServer`].
#[derive(Debug, Default)]
pub struct Stats {
    /// Page-fault messages read.
    pub faults: AtomicU64,
    /// Faults that found their page already present (raced with prefetch).
    pub faults_already_present: AtomicU64,
    /// `UFFDIO_COPY` calls that succeeded (fully or partly).
    pub copies: AtomicU64,
    /// Pages placed by `UFFDIO_COPY`.
    pub pages_copied: AtomicU64,
    /// Pages placed by `UFFDIO_ZEROPAGE`.
    pub pages_zeroed: AtomicU64,
    /// Pages placed by the prefetcher (included in the two above).
    pub pages_prefetched: AtomicU64,
    /// `EEXIST` answers (page already present).
    pub eexist: AtomicU64,
    /// `UFFD_EVENT_REMOVE` events.
    pub removes: AtomicU64,
    /// Source failures.
    pub source_errors: AtomicU64,
    /// Pages poisoned because their content could not be produced.
    pub pages_poisoned: AtomicU64,
    /// Time from reading a fault message to the page being in place.
    pub fault_latency: Histogram,
}

/// A plain copy of [`Stats`] for printing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatsSnapshot {
    /// See [`Stats::faults`].
    pub faults: u64,
    /// See [`Stats::faults_already_present`].
    pub faults_already_present: u64,
    /// See [`Stats::copies`].
    pub copies: u64,
    /// See [`Stats::pages_copied`].
    pub pages_copied: u64,
    /// See [`Stats::pages_zeroed`].
    pub pages_zeroed: u64,
    /// See [`Stats::pages_prefetched`].
    pub pages_prefetched: u64,
    /// See [`Stats::eexist`].
    pub eexist: u64,
    /// See [`Stats::removes`].
    pub removes: u64,
    /// See [`Stats::source_errors`].
    pub source_errors: u64,
    /// See [`Stats::pages_poisoned`].
    pub pages_poisoned: u64,
    /// Median fault service time.
    pub latency_p50: Option<Duration>,
    /// 99th percentile fault service time.
    pub latency_p99: Option<Duration>,
    /// Worst fault service time.
    pub latency_max: Duration,
}

impl Stats {
    /// Take a snapshot.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            faults: self.faults.load(Relaxed),
            faults_already_present: self.faults_already_present.load(Relaxed),
            copies: self.copies.load(Relaxed),
            pages_copied: self.pages_copied.load(Relaxed),
            pages_zeroed: self.pages_zeroed.load(Relaxed),
            pages_prefetched: self.pages_prefetched.load(Relaxed),
            eexist: self.eexist.load(Relaxed),
            removes: self.removes.load(Relaxed),
            source_errors: self.source_errors.load(Relaxed),
            pages_poisoned: self.pages_poisoned.load(Relaxed),
            latency_p50: self.fault_latency.quantile(0.5),
            latency_p99: self.fault_latency.quantile(0.99),
            latency_max: self.fault_latency.max(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_close() {
        let h = Histogram::default();
        for us in 1..=100u64 {
            h.record(Duration::from_micros(us));
        }
        let p50 = h.quantile(0.5).unwrap_or_default().as_nanos() as f64;
        let p99 = h.quantile(0.99).unwrap_or_default().as_nanos() as f64;
        assert!((p50 - 50_000.0).abs() < 50_000.0 * 0.07, "{p50}");
        assert!((p99 - 99_000.0).abs() < 99_000.0 * 0.07, "{p99}");
        for b in 0..BUCKETS - 1 {
            assert!(bucket_low(b) < bucket_low(b + 1));
            assert_eq!(bucket_of(bucket_low(b)), b);
        }
    }
}
