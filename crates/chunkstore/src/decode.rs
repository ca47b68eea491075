//! Pure decoders of the store's untrusted files, for tools and fuzz targets: bytes in, a checked
//! value or an [`Error`] out, no file system and never a panic.

use std::path::Path;

use crate::codec::Codec;
use crate::error::{Error, Result};
use crate::hash::ChunkHash;
use crate::index::{Index, IndexEntry, INDEX_MAGIC, INDEX_VERSION, MAX_RAW_LEN};
use crate::manifest::{Manifest, MANIFEST_MAGIC, MANIFEST_VERSION};
use crate::{envelope, store};

const SRC: &str = "<bytes>";

/// A decoded index file: how much of the pack it covers and where every chunk lives.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexContents {
    /// Bytes of the pack covered by the index.
    pub pack_len: u64,
    /// Every chunk, in pack order.
    pub entries: Vec<(ChunkHash, IndexEntry)>,
}

/// Checks and decodes an index file image (envelope and payload).
pub fn decode_index(bytes: &[u8]) -> Result<IndexContents> {
    let (_, payload) = envelope::open("index", Path::new(SRC), INDEX_MAGIC, INDEX_VERSION, bytes)?;
    let index = Index::decode(Path::new(SRC), payload)?;
    let mut entries: Vec<_> = index.map.into_iter().collect();
    entries.sort_by_key(|(h, e)| (e.offset, h.0));
    Ok(IndexContents { pack_len: index.pack_len, entries })
}

/// Encodes an index file image (the inverse of [`decode_index`]).
pub fn encode_index(contents: &IndexContents) -> Vec<u8> {
    let index = Index { pack_len: contents.pack_len, map: contents.entries.iter().copied().collect() };
    envelope::seal(INDEX_MAGIC, INDEX_VERSION, &index.encode())
}

impl Manifest {
    /// Checks and decodes a manifest file image (envelope and payload).
    pub fn from_bytes(bytes: &[u8]) -> Result<Manifest> {
        let (_, payload) = envelope::open("manifest", Path::new(SRC), MANIFEST_MAGIC, MANIFEST_VERSION, bytes)?;
        Manifest::decode(Path::new(SRC), payload)
    }

    /// The manifest file image of this manifest.
    pub fn to_bytes(&self) -> Vec<u8> {
        envelope::seal(MANIFEST_MAGIC, MANIFEST_VERSION, &self.encode())
    }
}

/// Decompresses one stored chunk (`codec` as in the index: 0 raw, 1 zstd, 2 lz4) into `dst`
/// (`dst.len()` is its raw length) and checks its content against `hash`.
pub fn decode_chunk(codec: u8, hash: &ChunkHash, src: &[u8], dst: &mut [u8]) -> Result<()> {
    let codec = Codec::from_byte(codec)
        .ok_or_else(|| Error::CorruptChunk { hash: *hash, reason: format!("unknown codec {codec}") })?;
    let (Ok(stored_len), Ok(raw_len)) = (u32::try_from(src.len()), u32::try_from(dst.len())) else {
        return Err(Error::InvalidArgument("chunk larger than 4 GiB".into()));
    };
    if raw_len == 0 || raw_len > MAX_RAW_LEN {
        return Err(Error::InvalidArgument(format!("raw chunk length {raw_len} outside 1..={MAX_RAW_LEN}")));
    }
    let e = IndexEntry { offset: 0, stored_len, raw_len, codec };
    store::decode_chunk(hash, &e, src, dst)
}
