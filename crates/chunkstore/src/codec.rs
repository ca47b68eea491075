//! Page compression codecs. Decompression reuses one zstd context per thread.

use std::cell::RefCell;

/// How a chunk is compressed in the pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Stored as is (used automatically when compression does not help).
    Raw,
    /// zstd at the level given in [`crate::StoreConfig::level`].
    Zstd,
    /// lz4 block format (faster, larger).
    Lz4,
}

impl Codec {
    pub(crate) fn to_byte(self) -> u8 {
        match self {
            Codec::Raw => 0,
            Codec::Zstd => 1,
            Codec::Lz4 => 2,
        }
    }

    pub(crate) fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(Codec::Raw),
            1 => Some(Codec::Zstd),
            2 => Some(Codec::Lz4),
            _ => None,
        }
    }
}

/// A per-thread compressor for one codec and level.
pub(crate) struct Compressor {
    codec: Codec,
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

impl Compressor {
    pub(crate) fn new(codec: Codec, level: i32) -> std::io::Result<Self> {
        let zstd = match codec {
            Codec::Zstd => Some(zstd::bulk::Compressor::new(level)?),
            _ => None,
        };
        Ok(Compressor { codec, zstd })
    }

    /// Compress `page`; falls back to [`Codec::Raw`] when that is not smaller.
    pub(crate) fn compress(&mut self, page: &[u8]) -> (Codec, Vec<u8>) {
        let out = match (self.codec, self.zstd.as_mut()) {
            (Codec::Zstd, Some(c)) => c.compress(page).ok(),
            (Codec::Lz4, _) => Some(lz4_flex::block::compress(page)),
            _ => None,
        };
        match out {
            Some(v) if v.len() < page.len() => (self.codec, v),
            _ => (Codec::Raw, page.to_vec()),
        }
    }
}

thread_local! {
    static ZSTD_DCTX: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Decompress `src` into `dst`, which must come out exactly full.
pub(crate) fn decompress(codec: Codec, src: &[u8], dst: &mut [u8]) -> Result<(), String> {
    let n = match codec {
        Codec::Raw => {
            if src.len() != dst.len() {
                return Err(format!("raw chunk has {} bytes, expected {}", src.len(), dst.len()));
            }
            dst.copy_from_slice(src);
            src.len()
        }
        Codec::Lz4 => lz4_flex::block::decompress_into(src, dst).map_err(|e| format!("lz4: {e}"))?,
        Codec::Zstd => ZSTD_DCTX.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = Some(zstd::bulk::Decompressor::new().map_err(|e| format!("zstd context: {e}"))?);
            }
            match slot.as_mut() {
                Some(d) => d.decompress_to_buffer(src, dst).map_err(|e| format!("zstd: {e}")),
                None => Err("zstd context unavailable".to_string()),
            }
        })?,
    };
    if n != dst.len() {
        return Err(format!("decompressed to {n} bytes, expected {}", dst.len()));
    }
    Ok(())
}
