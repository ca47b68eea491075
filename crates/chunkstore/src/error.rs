//! Error type of the chunk store.

use std::path::PathBuf;

use crate::ChunkHash;

/// Everything that can go wrong in the chunk store.
///
/// Files on disk are untrusted: every malformed, truncated or corrupted
/// file is reported through one of these variants, never through a panic.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on a given path.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A checksummed envelope (index, manifest, working set) is malformed.
    #[error("{what} {path}: {reason}")]
    BadEnvelope {
        /// Which kind of file ("index", "manifest", ...).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The payload of a file passed its checksum but does not parse.
    #[error("malformed {what} {path}: {reason}")]
    Malformed {
        /// Which kind of file.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The pack file is shorter than the index says.
    #[error("pack file {path} is truncated: index expects at least {expected} bytes, file has {actual}")]
    PackTruncated {
        /// The pack file.
        path: PathBuf,
        /// Length required by the index.
        expected: u64,
        /// Actual length.
        actual: u64,
    },
    /// A chunk failed to decompress or its content does not match its address.
    #[error("chunk {hash} is corrupt: {reason}")]
    CorruptChunk {
        /// Address of the chunk.
        hash: ChunkHash,
        /// What went wrong.
        reason: String,
    },
    /// A manifest references a chunk the index does not know.
    #[error("chunk {0} is referenced but missing from the index")]
    MissingChunk(ChunkHash),
    /// No manifest of that name.
    #[error("no image named {0:?} in the store")]
    NoSuchImage(String),
    /// An image name that cannot be used as a file name.
    #[error("invalid image name {0:?}: use 1-128 characters from [A-Za-z0-9._-], not starting with '.'")]
    BadName(String),
    /// Invalid configuration or argument.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The store directory is locked by another writer.
    #[error("store {0} is locked by another writer")]
    Locked(PathBuf),
    /// A write was attempted on a store opened read-only.
    #[error("store is opened read-only")]
    ReadOnly,
}

/// Result alias for the chunk store.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}
