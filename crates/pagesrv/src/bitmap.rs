//! A fixed-size atomic bitmap shared by the fault and prefetch threads.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug)]
pub(crate) struct Bitmap {
    words: Box<[AtomicU64]>,
}

impl Bitmap {
    pub(crate) fn new(bits: usize) -> Self {
        Bitmap { words: (0..bits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect() }
    }
    pub(crate) fn get(&self, i: usize) -> bool {
        self.words.get(i / 64).is_some_and(|w| w.load(Ordering::Acquire) & (1 << (i % 64)) != 0)
    }
    pub(crate) fn set_range(&self, lo: usize, hi: usize) {
        for i in lo..hi {
            if let Some(w) = self.words.get(i / 64) {
                w.fetch_or(1 << (i % 64), Ordering::AcqRel);
            }
        }
    }
    pub(crate) fn clear_range(&self, lo: usize, hi: usize) {
        for i in lo..hi {
            if let Some(w) = self.words.get(i / 64) {
                w.fetch_and(!(1 << (i % 64)), Ordering::AcqRel);
            }
        }
    }
    /// Set bit `i`; true if it was clear.
    pub(crate) fn test_and_set(&self, i: usize) -> bool {
        self.words.get(i / 64).is_some_and(|w| w.fetch_or(1 << (i % 64), Ordering::AcqRel) & (1 << (i % 64)) == 0)
    }
    pub(crate) fn count(&self) -> usize {
        self.words.iter().map(|w| w.load(Ordering::Relaxed).count_ones() as usize).sum()
    }
}
