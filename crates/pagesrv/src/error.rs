//! Error type of the page server.

/// Everything that can go wrong while serving pages.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What we were doing.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The page source could not produce the requested pages.
    #[error("page source failed at offset {offset:#x}+{len:#x}: {reason}")]
    Source {
        /// Source offset of the failed range.
        offset: u64,
        /// Length of the failed range.
        len: u64,
        /// Why.
        reason: String,
    },
    /// A chunk store error.
    #[error(transparent)]
    Store(#[from] chunkstore::Error),
    /// Bad argument or configuration.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A malformed handshake or working-set file.
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn sys(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Sys { what, source }
}
