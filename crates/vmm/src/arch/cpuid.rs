//! Per-vCPU CPUID: KVM's supported set with this vCPU's APIC id and the hypervisor bit.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

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

/// Feature registers whose bits a guest may rely on: (function, index, register name).
const FEATURE_LEAVES: [(u32, u32, &str); 8] = [
    (1, 0, "ecx"),
    (1, 0, "edx"),
    (7, 0, "ebx"),
    (7, 0, "ecx"),
    (7, 0, "edx"),
    (0xd, 1, "eax"),
    (0x8000_0001, 0, "ecx"),
    (0x8000_0001, 0, "edx"),
];

fn reg(e: &kvm_cpuid_entry2, name: &str) -> u32 {
    match name {
        "eax" => e.eax,
        "ebx" => e.ebx,
        "ecx" => e.ecx,
        _ => e.edx,
    }
}

/// Bits that are no host feature: the VMM sets them itself (hypervisor, HTT), or KVM mirrors the
/// guest's own control registers in them (OSXSAVE = CR4.OSXSAVE, OSPKE = CR4.PKE).
fn ours(function: u32, name: &str) -> u32 {
    match (function, name) {
        (1, "ecx") => (1 << 31) | (1 << 27),
        (1, "edx") => 1 << 28,
        (7, "ecx") => 1 << 4,
        _ => 0,
    }
}

/// Checks that every feature bit of `saved` is in `supported`: KVM_GET_SUPPORTED_CPUID plus
/// what this host's KVM reports for a vCPU given that (PVM reports the host CPU's own bits).
pub fn check_supported(saved: &[kvm_cpuid_entry2], supported: &[kvm_cpuid_entry2]) -> Result<(), String> {
    if saved.is_empty() {
        return Err("the snapshot has no CPUID".into());
    }
    let find = |list: &[kvm_cpuid_entry2], f: u32, i: u32| {
        list.iter()
            .find(|e| e.function == f && (e.index == i || e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0))
            .copied()
    };
    let max =
        |list: &[kvm_cpuid_entry2], f: u32| list.iter().filter(|e| e.function == f).map(|e| e.eax).max().unwrap_or(0);
    for (base, what) in [(0, "basic"), (0x8000_0000, "extended")] {
        if max(saved, base) > max(supported, base) {
            return Err(format!(
                "{what} CPUID leaves up to {:#x} are needed, this host has up to {:#x}",
                max(saved, base),
                max(supported, base)
            ));
        }
    }
    for (f, i, name) in FEATURE_LEAVES {
        let Some(s) = find(saved, f, i) else { continue };
        let host = supported
            .iter()
            .filter(|e| e.function == f && (e.index == i || e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0))
            .fold(0, |acc, e| acc | reg(e, name));
        let missing = reg(&s, name) & !host & !ours(f, name);
        if missing != 0 {
            return Err(format!("CPUID leaf {f:#x}.{i} {name} bits {missing:#010x} are missing"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn entry(function: u32, index: u32, ecx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, ecx, ..Default::default() }
    }

    #[test]
    fn bits_that_mirror_the_guests_control_registers_are_not_host_features() {
        // A Linux guest that enabled XSAVE (CR4.OSXSAVE) and protection keys (CR4.PKE): KVM shows
        // OSXSAVE (1.ecx bit 27) and OSPKE (7.0.ecx bit 4) in the vCPU's CPUID; the supported set
        // never has them.
        let supported = [entry(0, 0, 0), entry(1, 0, 1 << 26), entry(7, 0, 1 << 3)];
        let mut saved = [entry(0, 0, 0), entry(1, 0, (1 << 26) | (1 << 27)), entry(7, 0, (1 << 3) | (1 << 4))];
        saved[0].eax = 7;
        let mut sup = supported;
        sup[0].eax = 7;
        check_supported(&saved, &sup).unwrap();
        // A real feature the host lacks is still refused.
        saved[1].ecx |= 1 << 28; // AVX
        let e = check_supported(&saved, &sup).unwrap_err();
        assert!(e.contains("0x1.0 ecx bits 0x10000000"), "{e}");
    }
}
