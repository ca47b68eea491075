//! The whole saved state of a microVM except its memory contents.

use serde::{Deserialize, Serialize};

use super::envelope::{self, EnvelopeError, Kind};
use crate::devices::serial_persist::SerialSnap;
use crate::devices::virtio::vsock::VsockState;
use crate::vstate::memory::Backing;
use crate::vstate::vcpu::VcpuState;
use crate::vstate::vm_persist::VmKvmState;

/// State files: `FORKVM` + `ST`, format version 3 (2 added the virtio devices; 3 the memory
/// image hashes, the base's identity, CPUID, TSC frequency and the kvm-bindings layout). Older
/// formats are refused ("snapshot format 2 is not supported").
pub const STATE_KIND: Kind = Kind { tag: *b"ST", name: "VM state", version: 3 };

/// How the memory of a snapshot is stored next to its state file. `blake3` is the image hash
/// of [`crate::persist::image_hash`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryImage {
    /// Every page, at its offset (guest RAM regions concatenated); zero pages may be holes.
    Full { file: String, blake3: String },
    /// Only the pages dirtied since `base` (another snapshot directory), at their offsets.
    /// `base_state` is the blake3 of the base's `state` file: the base's identity.
    Diff { file: String, base: String, base_state: String, pages: u64, blake3: String },
}

/// Sizes of the kvm-bindings structs serialized (as raw bytes) in the state. A restore refuses
/// a state whose layout differs from this build's: kvm-bindings' deserializer would silently
/// pad or cut them.
pub fn kvm_layout() -> String {
    use kvm_bindings::*;
    use std::mem::size_of;
    format!(
        "regs={} sregs={} xsave={} xcrs={} debugregs={} lapic={} msr={} events={} mp={} cpuid={} pit={} clock={} irqchip={}",
        size_of::<kvm_regs>(),
        size_of::<kvm_sregs>(),
        size_of::<kvm_xsave>(),
        size_of::<kvm_xcrs>(),
        size_of::<kvm_debugregs>(),
        size_of::<kvm_lapic_state>(),
        size_of::<kvm_msr_entry>(),
        size_of::<kvm_vcpu_events>(),
        size_of::<kvm_mp_state>(),
        size_of::<kvm_cpuid_entry2>(),
        size_of::<kvm_pit_state2>(),
        size_of::<kvm_clock_data>(),
        size_of::<kvm_irqchip>(),
    )
}

/// Saved state of the virtio devices.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesState {
    pub vsock: Option<VsockState>,
    /// The virtio-blk device and its disk (layers linked beside the state), if any.
    #[serde(default)]
    pub block: Option<crate::devices::virtio::block::BlockState>,
    /// The virtio-net device (a restore or clone gets its own tap, namespace and MAC).
    #[serde(default)]
    pub net: Option<crate::devices::virtio::net::NetState>,
}

/// Everything needed to rebuild a running VM from its memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// [`kvm_layout`] of the build that wrote it.
    pub kvm_layout: String,
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
        if s.kvm_layout != kvm_layout() {
            return Err(EnvelopeError::Payload(format!(
                "KVM state layout {:?} differs from this build's {:?}",
                s.kvm_layout,
                kvm_layout()
            )));
        }
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

#[cfg(test)]
mod tests {
    /// The serialized KVM structs are raw kvm-bindings bytes: a crate update that changes any
    /// size changes the snapshot format. Bump STATE_KIND.version (and keep the committed
    /// fixture refused clearly) if this fails.
    #[test]
    fn kvm_state_layout_is_pinned() {
        assert_eq!(
            super::kvm_layout(),
            "regs=144 sregs=312 xsave=4096 xcrs=392 debugregs=128 lapic=1024 msr=16 events=64 mp=4 cpuid=40 pit=112 clock=48 irqchip=520"
        );
        assert_eq!(super::STATE_KIND.version, 3);
    }
}
