//! The chunk index: chunk hash -> location of its compressed bytes in the pack.
//!
//! Payload format (version 1, little-endian), inside an [`crate::envelope`]
//! with magic `FKVMIDX1`:
//!
//! ```text
//! u64 pack_len            bytes of the pack covered by this index
//! u64 count
//! count x { [u8;32] hash, u64 offset, u32 stored_len, u32 raw_len, u8 codec }
//! ```

use std::collections::HashMap;
use std::path::Path;

use crate::codec::Codec;
use crate::envelope::{self, Reader};
use crate::error::{Error, Result};
use crate::hash::ChunkHash;
use crate::pack::PACK_HEADER_LEN;

pub(crate) const INDEX_MAGIC: &[u8; 8] = b"FKVMIDX1";
pub(crate) const INDEX_VERSION: u32 = 1;
/// Largest page (chunk) size accepted: 1 MiB.
pub(crate) const MAX_RAW_LEN: u32 = 1 << 20;

/// Where one chunk lives in the pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    /// Byte offset in the pack file.
    pub offset: u64,
    /// Stored (compressed) length.
    pub stored_len: u32,
    /// Uncompressed length (the page size it was written with).
    pub raw_len: u32,
    /// Codec of the stored bytes.
    pub codec: Codec,
}

#[derive(Debug, Default, Clone)]
pub(crate) struct Index {
    pub(crate) pack_len: u64,
    pub(crate) map: HashMap<ChunkHash, IndexEntry>,
}

impl Index {
    pub(crate) fn new() -> Self {
        Index { pack_len: PACK_HEADER_LEN, map: HashMap::new() }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.map.len() * 49);
        out.extend_from_slice(&self.pack_len.to_le_bytes());
        out.extend_from_slice(&(self.map.len() as u64).to_le_bytes());
        let mut entries: Vec<_> = self.map.iter().collect();
        entries.sort_by_key(|(_, e)| e.offset);
        for (h, e) in entries {
            out.extend_from_slice(&h.0);
            out.extend_from_slice(&e.offset.to_le_bytes());
            out.extend_from_slice(&e.stored_len.to_le_bytes());
            out.extend_from_slice(&e.raw_len.to_le_bytes());
            out.push(e.codec.to_byte());
        }
        out
    }

    pub(crate) fn decode(path: &Path, payload: &[u8]) -> Result<Self> {
        let bad = |reason: String| Error::Malformed { what: "index", path: path.to_path_buf(), reason };
        let mut r = Reader::new(payload);
        let pack_len = r.u64().map_err(|e| bad(e.to_string()))?;
        let count = r.u64().map_err(|e| bad(e.to_string()))?;
        if count.checked_mul(49) != Some(r.remaining() as u64) {
            return Err(bad(format!(
                "{count} entries need {} bytes, payload has {}",
                count.saturating_mul(49),
                r.remaining()
            )));
        }
        if pack_len < PACK_HEADER_LEN {
            return Err(bad(format!("pack length {pack_len} is below the pack header")));
        }
        let mut map = HashMap::with_capacity(count as usize);
        for i in 0..count {
            let hash = ChunkHash(r.hash().map_err(|e| bad(e.to_string()))?);
            let offset = r.u64().map_err(|e| bad(e.to_string()))?;
            let stored_len = r.u32().map_err(|e| bad(e.to_string()))?;
            let raw_len = r.u32().map_err(|e| bad(e.to_string()))?;
            let cb = r.u8().map_err(|e| bad(e.to_string()))?;
            let codec = Codec::from_byte(cb).ok_or_else(|| bad(format!("entry {i}: unknown codec {cb}")))?;
            if raw_len == 0 || raw_len > MAX_RAW_LEN || stored_len == 0 {
                return Err(bad(format!("entry {i}: bad lengths stored={stored_len} raw={raw_len}")));
            }
            let end = offset.checked_add(u64::from(stored_len));
            if offset < PACK_HEADER_LEN || end.is_none_or(|end| end > pack_len) {
                return Err(bad(format!("entry {i}: range {offset}+{stored_len} outside the pack ({pack_len} bytes)")));
            }
            let e = IndexEntry { offset, stored_len, raw_len, codec };
            if map.insert(hash, e).is_some() {
                return Err(bad(format!("entry {i}: duplicate chunk {hash}")));
            }
        }
        // The store appends chunks back to back: ranges that overlap are a lie.
        let mut ranges: Vec<(u64, u64)> =
            map.values().map(|e| (e.offset, e.offset + u64::from(e.stored_len))).collect();
        ranges.sort_unstable();
        if let Some(w) = ranges.windows(2).find(|w| w[1].0 < w[0].1) {
            return Err(bad(format!(
                "chunks at {}..{} and {}..{} overlap in the pack",
                w[0].0, w[0].1, w[1].0, w[1].1
            )));
        }
        Ok(Index { pack_len, map })
    }

    pub(crate) fn load(path: &Path) -> Result<Self> {
        let (_, payload) = envelope::read_file("index", path, INDEX_MAGIC, INDEX_VERSION)?;
        Self::decode(path, &payload)
    }

    pub(crate) fn save(&self, path: &Path) -> Result<()> {
        envelope::write_file(path, INDEX_MAGIC, INDEX_VERSION, &self.encode())
    }
}
