//! # chunkstore
//!
//! A content-addressed, compressed, deduplicated store for VM memory images.
//!
//! An image is cut into pages (4 KiB by default, any power of two from 512 B
//! to 1 MiB). All-zero pages are only recorded in the image's manifest. Every
//! other page is addressed by the blake3 hash of its *uncompressed* bytes, so
//! a page shared by several snapshots or VMs is stored once; it is
//! compressed with zstd (default, level 3) or lz4, or kept raw when
//! compression does not shrink it.
//!
//! ## Directory layout
//!
//! ```text
//! <dir>/pack                     append-only chunk data (see `pack` docs)
//! <dir>/index                    hash -> (offset, stored len, raw len, codec)
//! <dir>/manifests/<name>.manifest  page number -> chunk hash | zero
//! <dir>/owners/<name>           optional owner of an image (e.g. its hibernation directory)
//! <dir>/LOCK                     flock()ed by the one writer (writers and `gc` wait for it)
//! ```
//!
//! Removing an image only drops its manifest; [`Store::gc`] then drops the chunks no manifest
//! references and punches their bytes out of the pack (offsets never move).
//!
//! `index` and manifests are [`envelope`]s: magic, version, length and
//! blake3 checksum around a hand-written little-endian payload. They are
//! replaced atomically (write temp, fsync, rename). A write appends chunks
//! to the pack, fsyncs it, then saves the index, then the manifest, so a
//! crash leaves at worst an unindexed pack tail, which the next writer drops.
//!
//! ## Integrity
//!
//! Every read decompresses the chunk and checks its blake3 against its
//! address; a corrupt, short or missing chunk is an [`Error`], never data.
//!
//! ## Example
//!
//! ```
//! # fn main() -> Result<(), chunkstore::Error> {
//! # let dir = std::env::temp_dir().join(format!("cs-doc-{}", std::process::id()));
//! use chunkstore::{Store, StoreConfig};
//! let store = Store::open_or_create(&dir, StoreConfig::default())?;
//! let image = vec![7u8; 4096 * 4];
//! let (manifest, stats) = store.put_image("vm0", &image)?;
//! assert_eq!(stats.new_chunks, 1); // four identical pages, one chunk
//! let mut page = vec![0u8; 4096];
//! store.read_page(&manifest, 2, &mut page)?;
//! assert_eq!(page, vec![7u8; 4096]);
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok(()) }
//! ```

mod codec;
pub mod decode;
pub mod envelope;
mod error;
mod gc;
mod hash;
pub(crate) mod index;
pub(crate) mod manifest;
mod pack;
pub mod private;
mod stats;
mod store;
mod writer;

pub use codec::Codec;
pub use decode::{decode_chunk, decode_index, encode_index, IndexContents};
pub use error::{Error, Result};
pub use gc::GcReport;
pub use hash::ChunkHash;
pub use index::IndexEntry;
pub use manifest::{Manifest, PageRef};
pub use stats::{PutStats, SpaceStats, VerifyReport};
pub use store::{Store, StoreConfig};
pub use writer::{is_zero, ImageWriter};

#[cfg(test)]
mod gc_tests;
#[cfg(test)]
mod tests;
