//! Manifests: one per stored image, mapping page number -> chunk or zero.
//!
//! Payload format (version 1, little-endian), inside an [`crate::envelope`]
//! with magic `FKVMMAN1`:
//!
//! ```text
//! u16 name_len, name bytes (UTF-8)
//! u32 page_size
//! u64 image_len           logical length in bytes (last page zero-padded)
//! u64 page_count          = ceil(image_len / page_size)
//! u32 chunk_count
//! chunk_count x [u8;32]   distinct chunk hashes of this image
//! page_count x u32        index into the chunk table, 0xFFFF_FFFF = zero page
//! ```

use std::path::Path;

use crate::envelope::{self, Reader};
use crate::error::{Error, Result};
use crate::hash::ChunkHash;
use crate::index::MAX_RAW_LEN;

pub(crate) const MANIFEST_MAGIC: &[u8; 8] = b"FKVMMAN1";
pub(crate) const MANIFEST_VERSION: u32 = 1;
pub(crate) const ZERO_REF: u32 = u32::MAX;

/// What a page of an image holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageRef<'a> {
    /// An all-zero page (not stored).
    Zero,
    /// A stored chunk.
    Chunk(&'a ChunkHash),
}

/// The page map of one stored image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub(crate) name: String,
    pub(crate) page_size: u32,
    pub(crate) image_len: u64,
    pub(crate) chunks: Vec<ChunkHash>,
    pub(crate) pages: Vec<u32>,
}

impl Manifest {
    /// Name of the image.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Page size in bytes.
    pub fn page_size(&self) -> usize {
        self.page_size as usize
    }
    /// Logical length of the image in bytes.
    pub fn image_len(&self) -> u64 {
        self.image_len
    }
    /// Number of pages.
    pub fn page_count(&self) -> u64 {
        self.pages.len() as u64
    }
    /// Distinct chunks referenced by the image.
    pub fn chunks(&self) -> &[ChunkHash] {
        &self.chunks
    }
    /// What page `page_no` holds, or `None` if out of range.
    pub fn page(&self, page_no: u64) -> Option<PageRef<'_>> {
        let r = *self.pages.get(usize::try_from(page_no).ok()?)?;
        if r == ZERO_REF {
            Some(PageRef::Zero)
        } else {
            self.chunks.get(r as usize).map(PageRef::Chunk)
        }
    }
    /// True if page `page_no` is a zero page (false when out of range).
    pub fn is_zero(&self, page_no: u64) -> bool {
        matches!(self.page(page_no), Some(PageRef::Zero))
    }
    /// True if every page in `first..first+count` is zero (and in range).
    pub fn all_zero(&self, first: u64, count: u64) -> bool {
        let (Ok(a), Ok(n)) = (usize::try_from(first), usize::try_from(count)) else {
            return false;
        };
        match self.pages.get(a..a.saturating_add(n)) {
            Some(s) => s.iter().all(|&r| r == ZERO_REF),
            None => false,
        }
    }
    /// Number of zero pages.
    pub fn zero_pages(&self) -> u64 {
        self.pages.iter().filter(|&&r| r == ZERO_REF).count() as u64
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.chunks.len() * 32 + self.pages.len() * 4);
        out.extend_from_slice(&(self.name.len() as u16).to_le_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out.extend_from_slice(&self.page_size.to_le_bytes());
        out.extend_from_slice(&self.image_len.to_le_bytes());
        out.extend_from_slice(&(self.pages.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u32).to_le_bytes());
        for c in &self.chunks {
            out.extend_from_slice(&c.0);
        }
        for p in &self.pages {
            out.extend_from_slice(&p.to_le_bytes());
        }
        out
    }

    pub(crate) fn decode(path: &Path, payload: &[u8]) -> Result<Self> {
        let bad = |reason: String| Error::Malformed { what: "manifest", path: path.to_path_buf(), reason };
        let short = |e: envelope::ShortPayload| bad(e.to_string());
        let mut r = Reader::new(payload);
        let nl = r.u16().map_err(short)? as usize;
        let name = std::str::from_utf8(r.bytes(nl).map_err(short)?)
            .map_err(|e| bad(format!("name is not UTF-8: {e}")))?
            .to_string();
        let page_size = r.u32().map_err(short)?;
        if !page_size.is_power_of_two() || !(512..=MAX_RAW_LEN).contains(&page_size) {
            return Err(bad(format!("bad page size {page_size}")));
        }
        let image_len = r.u64().map_err(short)?;
        let page_count = r.u64().map_err(short)?;
        if image_len.div_ceil(u64::from(page_size)) != page_count {
            return Err(bad(format!("{page_count} pages do not match image length {image_len}")));
        }
        let chunk_count = r.u32().map_err(short)?;
        let need = u64::from(chunk_count) * 32 + page_count.saturating_mul(4);
        if need != r.remaining() as u64 {
            return Err(bad(format!("tables need {need} bytes, payload has {} left", r.remaining())));
        }
        let mut chunks = Vec::with_capacity(chunk_count as usize);
        for _ in 0..chunk_count {
            chunks.push(ChunkHash(r.hash().map_err(short)?));
        }
        let mut pages = Vec::with_capacity(page_count as usize);
        for i in 0..page_count {
            let p = r.u32().map_err(short)?;
            if p != ZERO_REF && p >= chunk_count {
                return Err(bad(format!("page {i} refers to chunk #{p} of {chunk_count}")));
            }
            pages.push(p);
        }
        Ok(Manifest { name, page_size, image_len, chunks, pages })
    }

    pub(crate) fn load(path: &Path) -> Result<Self> {
        let (_, payload) = envelope::read_file("manifest", path, MANIFEST_MAGIC, MANIFEST_VERSION)?;
        Self::decode(path, &payload)
    }

    pub(crate) fn save(&self, path: &Path) -> Result<()> {
        envelope::write_file(path, MANIFEST_MAGIC, MANIFEST_VERSION, &self.encode())
    }
}
