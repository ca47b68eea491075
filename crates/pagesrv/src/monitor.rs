//! A read-only view of a running [`PageServer`]: counters, errors, working set, why it ended.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::Instant;

#[cfg(doc)]
use crate::server::PageServer;
use crate::server::{Ended, Shared};
use crate::stats::StatsSnapshot;
use crate::wset::WorkingSet;

/// A read-only view of a [`PageServer`] (see [`PageServer::monitor`]). It
/// stays valid after the server stops (it then reports the final state).
#[derive(Debug, Clone)]
pub struct Monitor {
    pub(crate) shared: Arc<Shared>,
}

impl Monitor {
    /// Counters and latency quantiles so far.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// The first source error seen, if any.
    pub fn error(&self) -> Option<String> {
        self.shared.error.lock().ok().and_then(|e| e.clone())
    }

    /// Blocks first touched by faults so far, in order (if `record` is on).
    pub fn working_set(&self) -> WorkingSet {
        WorkingSet {
            page_size: self.shared.cfg.page_size as u32,
            ranges: self.shared.recorded.lock().map(|r| r.clone()).unwrap_or_default(),
        }
    }

    /// Pages currently known to be present.
    pub fn resident_pages(&self) -> usize {
        self.shared.regions.iter().map(|r| r.present.count()).sum()
    }

    /// Number of regions served.
    pub fn regions(&self) -> usize {
        self.shared.regions.len()
    }

    /// Page size of the regions in bytes.
    pub fn page_size(&self) -> u64 {
        self.shared.cfg.page_size as u64
    }

    /// Pages of all regions.
    pub fn total_pages(&self) -> usize {
        self.shared.regions.iter().map(|r| r.pages).sum()
    }

    /// How long the prefetch thread took, once it has finished.
    pub fn prefetch_time(&self) -> Option<std::time::Duration> {
        self.shared.prefetch_time.lock().ok().and_then(|t| *t)
    }

    /// When the server started.
    pub fn started(&self) -> Instant {
        self.shared.started
    }

    /// Why the fault thread ended, once it has.
    pub fn ended(&self) -> Option<Ended> {
        self.shared.ended.lock().ok().and_then(|e| e.clone())
    }

    /// An eventfd that becomes readable when the fault thread ends (poll it
    /// to learn that a served VM exited or its server halted or failed).
    pub fn done_fd(&self) -> BorrowedFd<'_> {
        self.shared.done_fd.as_fd()
    }
}
