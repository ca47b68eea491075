//! The VMM's error type: every failure a user can cause says what was wrong.

use crate::arch::boot::BootError;
use crate::vstate::memory::MemoryError;
use crate::vstate::vm::VmError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kvm(#[from] VmError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("{0}")]
    State(String),
    #[error("guest: {0}")]
    Guest(String),
    #[error("I/O: {0}")]
    Io(std::io::Error),
}
