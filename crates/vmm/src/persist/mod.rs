//! Snapshot files: a versioned, checksummed envelope around serde payloads, and the VM state
//! that goes in it.
pub mod data_pages;
pub mod envelope;
pub mod image_hash;
pub mod load_full;
pub mod memory_file;
pub mod state;
