//! The whole saved state of a microVM except its memory contents.

use serde::{Deserialize, Serialize};

use super::envelope::{self, EnvelopeError, Kind};
use crate::devices::serial_persist::SerialSnap;
use crate::devices::virtio::vsock::VsockState;
use crate::vstate::memory::Backing;
use crate::vstate::vcpu::VcpuState;
use crate::vstate::vm_persist::VmKvmState;

/// State files: `FORKVM` + `ST`, format version 2 (2 added the virtio devices).
pub const STATE_KIND: Kind = Kind { tag: *b"ST", name: "VM state", version: 2 };

/// How the memory of a snapshot is stored next to its state file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryImage {
    /// Every page, at its offset (guest RAM regions concatenated); zero pages may be holes.
    Full { file: String },
    /// Only the pages dirtied since `base` (another snapshot directory), at their offsets.
    Diff { file: String, base: String, pages: u64 },
}

/// Saved state of the virtio devices.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesState {
    pub vsock: Option<VsockState>,
}

/// Everything needed to rebuild a running VM from its memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    pub mem_size: u64,
    pub backing: Backing,
    pub generation: u64,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmKvmState,
    pub serial: SerialSnap,
    /// virtio devices (virtio-mmio transports and their device state).
    pub devices: DevicesState,
    pub memory: Option<MemoryImage>,
}

impl VmState {
    pub fn to_bytes(&self) -> Result<Vec<u8>, EnvelopeError> {
        envelope::encode(&STATE_KIND, self)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        let s: VmState = envelope::decode(&STATE_KIND, bytes)?;
        if s.vcpus.is_empty() || s.vcpus.len() > usize::from(crate::microvm::MAX_VCPUS) {
            return Err(EnvelopeError::Payload(format!("{} vCPUs in the state", s.vcpus.len())));
        }
        for (i, v) in s.vcpus.iter().enumerate() {
            if usize::from(v.id) != i {
                return Err(EnvelopeError::Payload(format!("vCPU {i} has id {}", v.id)));
            }
        }
        Ok(s)
    }
}
