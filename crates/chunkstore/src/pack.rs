//! The append-only pack file holding compressed chunks back to back.
//!
//! Layout: a 16-byte header (`FKVMPACK`, u32 version = 1, u32 reserved),
//! then chunk bytes with no framing; the index says where each chunk is.
//! Readers use `pread` (`FileExt::read_exact_at`), so any number of threads
//! can read concurrently with one appender.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{io_err, Error, Result};

pub(crate) const PACK_HEADER_LEN: u64 = 16;
const PACK_MAGIC: &[u8; 8] = b"FKVMPACK";
const PACK_VERSION: u32 = 1;

#[derive(Debug)]
pub(crate) struct Pack {
    pub(crate) path: PathBuf,
    pub(crate) file: File,
}

impl Pack {
    /// Open (or create when `writable`) the pack and check its header and
    /// that it holds at least `need_len` bytes.
    pub(crate) fn open(path: &Path, writable: bool, need_len: u64) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .create(writable)
            .truncate(false)
            .mode(crate::private::FILE_MODE)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(io_err(path))?;
        if writable {
            use std::os::unix::fs::PermissionsExt;
            let private = std::fs::Permissions::from_mode(crate::private::FILE_MODE);
            file.set_permissions(private).map_err(io_err(path))?;
        }
        let len = file.metadata().map_err(io_err(path))?.len();
        if len == 0 && writable {
            let mut h = Vec::with_capacity(16);
            h.extend_from_slice(PACK_MAGIC);
            h.extend_from_slice(&PACK_VERSION.to_le_bytes());
            h.extend_from_slice(&0u32.to_le_bytes());
            file.write_all_at(&h, 0).map_err(io_err(path))?;
        } else {
            let mut h = [0u8; 16];
            if len < PACK_HEADER_LEN {
                return Err(Error::PackTruncated {
                    path: path.to_path_buf(),
                    expected: need_len.max(PACK_HEADER_LEN),
                    actual: len,
                });
            }
            file.read_exact_at(&mut h, 0).map_err(io_err(path))?;
            if &h[..8] != PACK_MAGIC || h[8..12] != PACK_VERSION.to_le_bytes() {
                return Err(Error::Malformed {
                    what: "pack",
                    path: path.to_path_buf(),
                    reason: format!("bad header {:02x?}", &h[..12]),
                });
            }
        }
        let len = file.metadata().map_err(io_err(path))?.len();
        if len < need_len {
            return Err(Error::PackTruncated { path: path.to_path_buf(), expected: need_len, actual: len });
        }
        if writable && len > need_len {
            // Left over from an interrupted write that never reached the index.
            tracing::warn!(path = %path.display(), len, need_len, "dropping unindexed pack tail");
            file.set_len(need_len).map_err(io_err(path))?;
        }
        Ok(Pack { path: path.to_path_buf(), file })
    }

    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(io_err(&self.path))
    }

    pub(crate) fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.file.write_all_at(buf, offset).map_err(io_err(&self.path))
    }

    pub(crate) fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(io_err(&self.path))
    }
}
