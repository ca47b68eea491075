//! Working sets: the source ranges first faulted during a restore, in
//! order, so that a later restore can prefetch them (REAP).
//!
//! File format: a [`chunkstore::envelope`] with magic `FKVMWSET`,
//! version 1, payload (little-endian):
//!
//! ```text
//! u32 page_size, u32 count
//! count x { u64 source_offset, u32 len }
//! ```

use std::path::Path;

use chunkstore::envelope::{self, Reader};

use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"FKVMWSET";
const VERSION: u32 = 1;

/// An ordered list of source ranges `(offset, len)` in bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkingSet {
    /// Page size the ranges are aligned to.
    pub page_size: u32,
    /// Ranges in first-touch order.
    pub ranges: Vec<(u64, u32)>,
}

impl WorkingSet {
    /// Total bytes.
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|r| u64::from(r.1)).sum()
    }

    /// Encode to the file format.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(8 + self.ranges.len() * 12);
        p.extend_from_slice(&self.page_size.to_le_bytes());
        p.extend_from_slice(&(self.ranges.len() as u32).to_le_bytes());
        for (o, l) in &self.ranges {
            p.extend_from_slice(&o.to_le_bytes());
            p.extend_from_slice(&l.to_le_bytes());
        }
        envelope::seal(MAGIC, VERSION, &p)
    }

    /// Decode, checking envelope and alignment.
    pub fn decode(path: &Path, bytes: &[u8]) -> Result<Self> {
        let (_, payload) = envelope::open("working set", path, MAGIC, VERSION, bytes)?;
        let bad = |r: String| Error::Protocol(format!("working set {}: {r}", path.display()));
        let mut r = Reader::new(payload);
        let page_size = r.u32().map_err(|e| bad(e.to_string()))?;
        let count = r.u32().map_err(|e| bad(e.to_string()))?;
        if !page_size.is_power_of_two() || u64::from(count) * 12 != r.remaining() as u64 {
            return Err(bad(format!("page size {page_size}, {count} ranges do not fit")));
        }
        let mut ranges = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let o = r.u64().map_err(|e| bad(e.to_string()))?;
            let l = r.u32().map_err(|e| bad(e.to_string()))?;
            if o % u64::from(page_size) != 0 || l == 0 || l % page_size != 0 {
                return Err(bad(format!("range {o:#x}+{l:#x} not page aligned")));
            }
            if o.checked_add(u64::from(l)).is_none() {
                return Err(bad(format!("range {o:#x}+{l:#x} overflows")));
            }
            ranges.push((o, l));
        }
        Ok(WorkingSet { page_size, ranges })
    }

    /// Save atomically, as a private (0600) file; never through a symlink.
    pub fn save(&self, path: &Path) -> Result<()> {
        chunkstore::private::write_atomic(path, &self.encode())
            .map_err(crate::error::sys(format!("write {}", path.display())))
    }

    /// Load and check.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(crate::error::sys(format!("read {}", path.display())))?;
        Self::decode(path, &bytes)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Found by reading the prefetcher while writing the `working_set` fuzz target: a range
    /// whose end passes 2^64 was accepted, and the prefetch loop computes `offset + len`.
    #[test]
    fn ranges_that_overflow_are_rejected() {
        let p = Path::new("wset");
        let ok = WorkingSet { page_size: 4096, ranges: vec![(0, 8192), (u64::MAX - 3 * 4096 + 1, 8192)] };
        assert_eq!(WorkingSet::decode(p, &ok.encode()).unwrap(), ok);
        let bad = WorkingSet { page_size: 4096, ranges: vec![(u64::MAX - 4095, 8192)] };
        let e = WorkingSet::decode(p, &bad.encode()).unwrap_err();
        assert!(e.to_string().contains("overflow"), "{e}");
    }
}
