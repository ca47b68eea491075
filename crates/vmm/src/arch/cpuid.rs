//! Per-vCPU CPUID: KVM's supported set with this vCPU's APIC id and the hypervisor bit.

use kvm_bindings::CpuId;

/// Adjusts `cpuid` (from KVM_GET_SUPPORTED_CPUID) for vCPU `id` of `count`.
pub fn for_vcpu(cpuid: &mut CpuId, id: u8, count: u8) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                e.ecx |= 1 << 31; // running under a hypervisor
                e.edx |= 1 << 28; // HTT: the logical processor count in EBX is valid
            }
            0xb | 0x1f => {
                e.edx = u32::from(id);
            }
            _ => {}
        }
    }
}
