//! A vCPU: boot configuration, and capturing/restoring its whole KVM state.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use crate::arch::{cpuid, regs};
use crate::vstate::vm::{Vm, VmError};

fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |err| VmError::Ioctl { op, err }
}

/// Everything KVM holds for one vCPU, in the order it is saved (mp_state first, events last).
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    /// The CPUID the guest saw; a restore sets exactly this, and refuses a host that lacks it.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// The guest's TSC frequency (None: KVM could not tell); a restore keeps it or refuses.
    pub tsc_khz: Option<u32>,
}

/// A vCPU file descriptor with its index.
#[derive(Debug)]
pub struct Vcpu {
    pub id: u8,
    pub fd: VcpuFd,
}

/// MSRs KVM_GET_MSR_INDEX_LIST leaves out but a restored guest needs (the MTRRs).
fn extra_msrs() -> impl Iterator<Item = u32> {
    [0x2ff, 0x250, 0x258, 0x259].into_iter().chain(0x200..=0x20f).chain(0x268..=0x26f)
}

fn msrs_from(entries: &[kvm_msr_entry], op: &'static str) -> Result<Msrs, VmError> {
    Msrs::from_entries(entries).map_err(|_| VmError::Ioctl { op, err: kvm_ioctls::Error::new(libc::E2BIG) })
}

/// The MSRs to save: KVM's list plus the MTRRs it leaves out.
pub fn msr_indices(vm: &Vm) -> Result<Vec<u32>, VmError> {
    let list = vm.kvm().get_msr_index_list().map_err(ioctl("KVM_GET_MSR_INDEX_LIST"))?;
    let mut indices: Vec<u32> = list.as_slice().to_vec();
    for extra in extra_msrs() {
        if !indices.contains(&extra) {
            indices.push(extra);
        }
    }
    Ok(indices)
}

impl Vcpu {
    pub fn new(vm: &Vm, id: u8) -> Result<Self, VmError> {
        let fd = vm.fd().create_vcpu(u64::from(id)).map_err(ioctl("KVM_CREATE_VCPU"))?;
        Ok(Vcpu { id, fd })
    }

    /// CPUID for this vCPU (every vCPU needs it, at boot and on restore).
    pub fn set_cpuid(&self, vm: &Vm, count: u8) -> Result<(), VmError> {
        let mut cpuid = vm.supported_cpuid()?;
        cpuid::for_vcpu(&mut cpuid, self.id, count);
        self.fd.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))
    }

    /// Entry state for a fresh boot: long mode at `entry` (only the boot vCPU runs; the others
    /// wait for INIT/SIPI as on real hardware).
    pub fn configure_boot(&self, entry: u64) -> Result<(), VmError> {
        self.preset_xcr0()?;
        let msrs = msrs_from(&regs::entry_msrs(), "KVM_SET_MSRS")?;
        self.fd.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
        let mut lapic = self.fd.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
        regs::set_lint(&mut lapic);
        self.fd.set_lapic(&lapic).map_err(ioctl("KVM_SET_LAPIC"))?;
        if self.id == 0 {
            let sregs = self.fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
            self.fd.set_sregs(&regs::long_mode_sregs(sregs)).map_err(ioctl("KVM_SET_SREGS"))?;
            self.fd.set_regs(&regs::entry_regs(entry)).map_err(ioctl("KVM_SET_REGS"))?;
            self.fd.set_fpu(&regs::entry_fpu()).map_err(ioctl("KVM_SET_FPU"))?;
        }
        Ok(())
    }

    /// Starts the vCPU with XCR0 = every user state component its CPUID 0xd.0 offers (what a
    /// guest kernel enables), so KVM's CPUID 0xd.0 EBX (the XSAVE size for the current XCR0) is
    /// right before the guest's first XSETBV. A hypervisor that never sees that XSETBV (KVM nested
    /// under QEMU TCG, which does not intercept it) would otherwise keep answering the x87-only
    /// size, and Linux then disables XSAVE ("XSAVE consistency problem"). Without XSAVE: no-op.
    fn preset_xcr0(&self) -> Result<(), VmError> {
        let cpuid = self.fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(ioctl("KVM_GET_CPUID2"))?;
        let find = |f: u32, i: u32| cpuid.as_slice().iter().find(|e| e.function == f && e.index == i).copied();
        if find(1, 0).is_none_or(|e| e.ecx & (1 << 26) == 0) {
            return Ok(());
        }
        let Some(d0) = find(0xd, 0) else { return Ok(()) };
        let offered = (u64::from(d0.edx) << 32) | u64::from(d0.eax);
        let mut xcrs = self.fd.get_xcrs().map_err(ioctl("KVM_GET_XCRS"))?;
        let n = (xcrs.nr_xcrs as usize).min(xcrs.xcrs.len());
        match xcrs.xcrs[..n].iter_mut().find(|x| x.xcr == 0) {
            Some(x) => x.value = offered | 1,
            None => return Ok(()),
        }
        // A KVM that refuses it leaves the reset value: the guest boots all the same.
        if let Err(e) = self.fd.set_xcrs(&xcrs) {
            tracing::warn!("vCPU {}: KVM_SET_XCRS of XCR0 {:#x} refused: {e}", self.id, offered | 1);
        }
        Ok(())
    }

    /// Captures the vCPU's state. The vCPU must not be running (its thread calls this while parked).
    /// `msr_indices` comes from [`msr_indices`].
    pub fn save(&self, msr_indices: &[u32]) -> Result<VcpuState, VmError> {
        let mp_state = self.fd.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))?;
        let regs = self.fd.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
        let sregs = self.fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        let xsave = self.fd.get_xsave().map_err(ioctl("KVM_GET_XSAVE"))?;
        let xcrs = self.fd.get_xcrs().map_err(ioctl("KVM_GET_XCRS"))?;
        let debugregs = self.fd.get_debug_regs().map_err(ioctl("KVM_GET_DEBUGREGS"))?;
        let lapic = self.fd.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
        let msrs = self.save_msrs(msr_indices)?;
        let events = self.fd.get_vcpu_events().map_err(ioctl("KVM_GET_VCPU_EVENTS"))?;
        let cpuid = self.fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(ioctl("KVM_GET_CPUID2"))?.as_slice().to_vec();
        let tsc_khz = self.fd.get_tsc_khz().ok().filter(|&k| k > 0);
        Ok(VcpuState {
            id: self.id,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            msrs,
            events,
            cpuid,
            tsc_khz,
        })
    }

    fn save_msrs(&self, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, VmError> {
        let mut saved = Vec::with_capacity(indices.len());
        // KVM_GET_MSRS stops at the first MSR it cannot read: read in chunks, skip that one.
        let mut i = 0;
        while i < indices.len() {
            let chunk = &indices[i..indices.len().min(i + 64)];
            let entries: Vec<kvm_msr_entry> =
                chunk.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
            let mut msrs = msrs_from(&entries, "KVM_GET_MSRS")?;
            let n = self.fd.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))?;
            saved.extend_from_slice(&msrs.as_slice()[..n]);
            i += n;
            if n < chunk.len() {
                i += 1;
            }
        }
        Ok(saved)
    }

    /// Sets the saved CPUID and TSC frequency, after checking this host can provide them.
    pub fn restore_cpu_model(&self, vm: &Vm, s: &VcpuState, count: u8) -> Result<(), VmError> {
        let offered = self.offered_cpuid(vm, count)?;
        self.apply_cpu_model(vm, s, &offered)
    }

    /// What this host offers this vCPU (one of `count`): KVM's supported set, and what KVM
    /// reports back for a vCPU given it (the same on plain KVM; PVM reports the host CPU's own
    /// feature bits). Sets the vCPU's CPUID to the host's default on the way; a warm VM does
    /// this before any clone request.
    pub fn offered_cpuid(&self, vm: &Vm, count: u8) -> Result<Vec<kvm_cpuid_entry2>, VmError> {
        self.set_cpuid(vm, count)?;
        let mut offered = vm.supported_cpuid()?.as_slice().to_vec();
        offered
            .extend_from_slice(self.fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(ioctl("KVM_GET_CPUID2"))?.as_slice());
        Ok(offered)
    }

    /// [`Vcpu::restore_cpu_model`] given what [`Vcpu::offered_cpuid`] returned.
    pub fn apply_cpu_model(&self, vm: &Vm, s: &VcpuState, offered: &[kvm_cpuid_entry2]) -> Result<(), VmError> {
        cpuid::check_supported(&s.cpuid, offered).map_err(|why| VmError::Unsupported {
            what: format!("this host's CPU cannot run vCPU {} of the snapshot: {why}", self.id),
        })?;
        let saved = CpuId::from_entries(&s.cpuid)
            .map_err(|_| VmError::Ioctl { op: "KVM_SET_CPUID2", err: kvm_ioctls::Error::new(libc::E2BIG) })?;
        self.fd.set_cpuid2(&saved).map_err(ioctl("KVM_SET_CPUID2"))?;
        if let Some(khz) = s.tsc_khz {
            self.restore_tsc_khz(vm, khz)?;
        }
        Ok(())
    }

    /// Gives the vCPU the TSC frequency `khz` it had: the host's own if within 250 ppm, else
    /// KVM's TSC scaling. Without scaling KVM would only fake a faster TSC by catch-up (and
    /// cannot give a slower one): refused.
    fn restore_tsc_khz(&self, vm: &Vm, khz: u32) -> Result<(), VmError> {
        let host = self.fd.get_tsc_khz().map_err(ioctl("KVM_GET_TSC_KHZ"))?;
        if u64::from(host.abs_diff(khz)) * 4000 <= u64::from(host) {
            return Ok(());
        }
        let refuse = |why: String| VmError::Unsupported {
            what: format!(
                "this host cannot give vCPU {} the snapshot's TSC frequency of {khz} kHz (host: {host} kHz): {why}",
                self.id
            ),
        };
        if !vm.kvm().check_extension(kvm_ioctls::Cap::TscControl) {
            return Err(refuse("KVM has no TSC scaling here".into()));
        }
        self.fd.set_tsc_khz(khz).map_err(|e| refuse(format!("KVM_SET_TSC_KHZ: {e}")))
    }

    /// Restores a state captured by [`Vcpu::save`] (after [`Vcpu::restore_cpu_model`]).
    pub fn restore(&self, s: &VcpuState) -> Result<(), VmError> {
        self.fd.set_regs(&s.regs).map_err(ioctl("KVM_SET_REGS"))?;
        self.fd.set_sregs(&s.sregs).map_err(ioctl("KVM_SET_SREGS"))?;
        // SAFETY: the xsave area was produced by KVM_GET_XSAVE for a vCPU with the same CPUID.
        unsafe { self.fd.set_xsave(&s.xsave) }.map_err(ioctl("KVM_SET_XSAVE"))?;
        self.fd.set_xcrs(&s.xcrs).map_err(ioctl("KVM_SET_XCRS"))?;
        self.fd.set_debug_regs(&s.debugregs).map_err(ioctl("KVM_SET_DEBUGREGS"))?;
        self.fd.set_lapic(&s.lapic).map_err(ioctl("KVM_SET_LAPIC"))?;
        for chunk in s.msrs.chunks(64) {
            let msrs = msrs_from(chunk, "KVM_SET_MSRS")?;
            let n = self.fd.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
            if let Some(e) = chunk.get(n) {
                return Err(VmError::Unsupported {
                    what: format!(
                        "KVM_SET_MSRS took {n} of {} MSRs of vCPU {}: MSR {:#x} (value {:#x}) was refused",
                        chunk.len(),
                        self.id,
                        e.index,
                        e.data
                    ),
                });
            }
        }
        self.fd.set_mp_state(s.mp_state).map_err(ioctl("KVM_SET_MP_STATE"))?;
        self.fd.set_vcpu_events(&s.events).map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}
