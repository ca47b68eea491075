//! KVM tier: a booted vCPU starts with XCR0 holding every user state component its CPUID offers,
//! and CPUID leaf 0xd.0 EBX (the XSAVE area size for the current XCR0) agrees with it.
//!
//! Why: under QEMU TCG (the e2e's L1) a nested guest's XSETBV is not intercepted, so KVM never
//! learns the XCR0 the guest kernel sets and keeps answering CPUID 0xd.0 EBX for XCR0 = x87 only
//! (576 bytes). Linux then finds "XSAVE consistency problem: size 832 != kernel_size 576" at boot
//! and runs without XSAVE (no AVX). Starting the vCPU with the XCR0 a guest kernel enables makes
//! the size right from the start; on real hardware the guest's own XSETBV changes nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use kvm_bindings::kvm_cpuid_entry2;
use vmm::{Backing, MicroVm, VmConfig};

fn leaf(cpuid: &[kvm_cpuid_entry2], function: u32, index: u32) -> Option<kvm_cpuid_entry2> {
    cpuid.iter().find(|e| e.function == function && e.index == index).copied()
}

#[test]
fn a_booted_vcpu_has_the_xcr0_its_cpuid_offers_and_a_matching_xsave_size() {
    let cfg = VmConfig { mem_size: 32 << 20, backing: Backing::Anon, vcpus: 2, ..Default::default() };
    let vm = MicroVm::boot(cfg).unwrap_or_else(|e| panic!("cannot boot the test guest: {e} (/dev/kvm needed)"));
    vm.wait_for("forkvm-test-guest ready", Duration::from_secs(60)).unwrap();
    vm.pause().unwrap();
    let state = vm.save_state().unwrap();
    for v in &state.vcpus {
        let xsave = leaf(&v.cpuid, 1, 0).is_some_and(|e| e.ecx & (1 << 26) != 0);
        assert!(xsave, "vCPU {}: this host's KVM offers no XSAVE; the test needs it", v.id);
        let d0 = leaf(&v.cpuid, 0xd, 0).unwrap();
        let offered = (u64::from(d0.edx) << 32) | u64::from(d0.eax);
        let xcr0 = v.xcrs.xcrs.iter().take(v.xcrs.nr_xcrs as usize).find(|x| x.xcr == 0).map(|x| x.value);
        assert_eq!(xcr0, Some(offered), "vCPU {}: XCR0 {xcr0:#x?}, CPUID 0xd.0 offers {offered:#x}", v.id);
        // The standard-format size of that XCR0: the end of its highest component (>= 2).
        let size = (2..63)
            .filter(|i| offered & (1 << i) != 0)
            .filter_map(|i| leaf(&v.cpuid, 0xd, i))
            .map(|e| e.ebx + e.eax)
            .max()
            .unwrap_or(512 + 64);
        assert_eq!(d0.ebx, size, "vCPU {}: CPUID 0xd.0 EBX {} for XCR0 {offered:#x} (want {size})", v.id, d0.ebx);
    }
}
