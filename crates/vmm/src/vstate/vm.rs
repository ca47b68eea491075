//! The KVM VM: opening /dev/kvm with errors a person can act on, the in-kernel irqchip and PIT,
//! memory slots and irqfds.

use std::fs::OpenOptions;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::path::Path;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::TSS_ADDR;
use crate::vstate::memory::{GuestMem, PAGE_SIZE};

/// Path of the KVM device; `FORKVM_KVM_DEVICE` overrides it (tests point it elsewhere).
pub fn kvm_device_path() -> String {
    std::env::var("FORKVM_KVM_DEVICE").unwrap_or_else(|_| "/dev/kvm".to_string())
}

/// Errors creating or configuring the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{path} does not exist: this host has no KVM. Load it (modprobe kvm_intel or kvm_amd) on a machine with hardware virtualization, or run inside a VM with nested virtualization enabled")]
    NoKvm { path: String },
    #[error("permission denied opening {path}: run as root or join the group that owns it (e.g. `sudo usermod -aG kvm $USER`, then log in again)")]
    KvmPermission { path: String },
    #[error("cannot open {path}: {err}")]
    KvmOpen { path: String, err: std::io::Error },
    #[error("{path} is not a usable KVM device (KVM_GET_API_VERSION failed: {err})")]
    NotKvm { path: String, err: kvm_ioctls::Error },
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    #[error("{what}")]
    Unsupported { what: String },
    #[error("KVM ioctl {op} failed: {err}")]
    Ioctl { op: &'static str, err: kvm_ioctls::Error },
}

fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |err| VmError::Ioctl { op, err }
}

/// Opens the KVM device at `path`.
pub fn open_kvm(path: &str) -> Result<Kvm, VmError> {
    let file = OpenOptions::new().read(true).write(true).open(Path::new(path)).map_err(|err| match err.kind() {
        std::io::ErrorKind::NotFound => VmError::NoKvm { path: path.into() },
        std::io::ErrorKind::PermissionDenied => VmError::KvmPermission { path: path.into() },
        _ => VmError::KvmOpen { path: path.into(), err },
    })?;
    // SAFETY: we own the freshly opened descriptor and hand it to Kvm, which takes ownership.
    let kvm = unsafe { Kvm::from_raw_fd(file.into_raw_fd()) };
    let v = kvm.get_api_version();
    if v < 0 {
        return Err(VmError::NotKvm { path: path.into(), err: kvm_ioctls::Error::new(-v) });
    }
    if v != 12 {
        return Err(VmError::ApiVersion(v));
    }
    Ok(kvm)
}

/// A KVM VM with its in-kernel interrupt controllers.
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
}

impl Vm {
    /// Creates the VM, TSS, irqchip (PIC + IOAPIC) and PIT, in the order that works on PVM too.
    pub fn new() -> Result<Self, VmError> {
        let kvm = open_kvm(&kvm_device_path())?;
        let fd = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        fd.set_tss_address(TSS_ADDR as usize).map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        fd.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))?;
        Ok(Vm { kvm, fd })
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Registers every region of `mem` as a KVM memory slot, with dirty-page logging if asked
    /// (diff snapshots need it).
    pub fn set_memory(&self, mem: &GuestMem, log_dirty: bool) -> Result<(), VmError> {
        for (slot, r) in mem.regions().iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: if log_dirty { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
                guest_phys_addr: r.guest_base,
                memory_size: r.size,
                userspace_addr: r.host as u64,
            };
            // SAFETY: the region's host mapping is owned by `mem`, which the caller keeps alive
            // for as long as this VM exists (MicroVm holds both and drops the VM first).
            unsafe { self.fd.set_user_memory_region(region) }.map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }

    /// Pages the guest wrote since the last call (or since logging began), one bit per page of
    /// the concatenated RAM image. Reading the log clears it.
    pub fn dirty_bitmap(&self, mem: &GuestMem) -> Result<Vec<u64>, VmError> {
        let pages = mem.size() / PAGE_SIZE;
        let mut out = vec![0u64; pages.div_ceil(64) as usize];
        for (slot, r) in mem.regions().iter().enumerate() {
            let log = self.fd.get_dirty_log(slot as u32, r.size as usize).map_err(ioctl("KVM_GET_DIRTY_LOG"))?;
            let first = r.file_offset / PAGE_SIZE;
            for (w, word) in log.iter().enumerate() {
                let mut bits = *word;
                while bits != 0 {
                    let b = u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    let page = first + w as u64 * 64 + b;
                    if let Some(o) = out.get_mut((page / 64) as usize) {
                        *o |= 1 << (page % 64);
                    }
                }
            }
        }
        Ok(out)
    }

    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd.register_irqfd(evt, gsi).map_err(ioctl("KVM_IRQFD"))
    }

    pub fn supported_cpuid(&self) -> Result<CpuId, VmError> {
        self.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_says_so() {
        let e = open_kvm("/nonexistent/kvm").unwrap_err();
        assert!(matches!(e, VmError::NoKvm { .. }));
        assert!(e.to_string().contains("does not exist"));
    }

    #[test]
    fn non_kvm_file_is_rejected() {
        let e = open_kvm("/dev/null").unwrap_err();
        assert!(matches!(e, VmError::NotKvm { .. }), "{e}");
    }
}
