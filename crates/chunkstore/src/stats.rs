//! Size and dedup statistics.

use std::time::Duration;

/// What one [`crate::ImageWriter`] added to the store.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PutStats {
    /// Logical bytes written (the image length).
    pub logical_bytes: u64,
    /// Pages in the image.
    pub pages: u64,
    /// Pages that were all zero (not stored).
    pub zero_pages: u64,
    /// Non-zero pages whose chunk already existed (in the store or earlier in this image).
    pub deduped_pages: u64,
    /// Chunks newly appended to the pack.
    pub new_chunks: u64,
    /// Uncompressed bytes of the new chunks.
    pub new_raw_bytes: u64,
    /// Bytes appended to the pack.
    pub new_stored_bytes: u64,
    /// Wall time spent.
    pub elapsed: Duration,
}

/// Space accounting of a set of images (one image or the whole store).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpaceStats {
    /// Number of images.
    pub images: u64,
    /// Sum of image lengths.
    pub logical_bytes: u64,
    /// Sum of page counts.
    pub pages: u64,
    /// Zero pages (not stored).
    pub zero_pages: u64,
    /// Distinct chunks referenced.
    pub unique_chunks: u64,
    /// Uncompressed bytes of those chunks.
    pub raw_chunk_bytes: u64,
    /// Bytes those chunks take in the pack.
    pub stored_bytes: u64,
}

impl SpaceStats {
    /// Non-zero pages.
    pub fn nonzero_pages(&self) -> u64 {
        self.pages - self.zero_pages
    }
    /// Uncompressed / compressed size of the unique chunks.
    pub fn compression_ratio(&self) -> f64 {
        ratio(self.raw_chunk_bytes, self.stored_bytes)
    }
    /// Non-zero pages per unique chunk (1.0 = no duplication).
    pub fn dedup_ratio(&self) -> f64 {
        ratio(self.nonzero_pages(), self.unique_chunks)
    }
    /// Logical bytes per stored byte, all effects (zero, dedup, compression) included.
    pub fn overall_ratio(&self) -> f64 {
        ratio(self.logical_bytes, self.stored_bytes)
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        if a == 0 {
            1.0
        } else {
            f64::INFINITY
        }
    } else {
        a as f64 / b as f64
    }
}

/// Result of [`crate::Store::verify`].
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// Chunks read back and checked.
    pub chunks_checked: u64,
    /// Manifests loaded and checked.
    pub images_checked: u64,
    /// Everything found wrong, one message each.
    pub problems: Vec<String>,
}

impl VerifyReport {
    /// True if nothing was found wrong.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}
