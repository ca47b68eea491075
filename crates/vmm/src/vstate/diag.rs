//! What a vCPU looked like when its VM ended unasked (a shutdown exit, an internal error): one
//! line of registers for the VMM's log, so an unexplained guest death leaves evidence.
//!
//! On AMD, KVM re-initialises a vCPU that took a SHUTDOWN intercept before KVM_RUN returns (its
//! VMCB is undefined then), so the faulting vCPU reads as freshly INITed (rip 0xfff0); its
//! siblings, stopped right after, still show where they were.

use kvm_bindings::{kvm_regs, kvm_sregs, kvm_vcpu_events};

use crate::vstate::vcpu::Vcpu;

/// One line: mp_state, general registers, control registers, segments, pending events.
pub fn describe(vcpu: &Vcpu) -> String {
    let mp = match vcpu.fd.get_mp_state() {
        Ok(m) => format!("mp_state {}", m.mp_state),
        Err(e) => format!("mp_state ? ({e})"),
    };
    let regs = vcpu.fd.get_regs().map(|r| regs_line(&r)).unwrap_or_else(|e| format!("regs ? ({e})"));
    let sregs = vcpu.fd.get_sregs().map(|s| sregs_line(&s)).unwrap_or_else(|e| format!("sregs ? ({e})"));
    let events = vcpu.fd.get_vcpu_events().map(|e| events_line(&e)).unwrap_or_else(|e| format!("events ? ({e})"));
    format!("vCPU {}: {mp}; {regs}; {sregs}; {events}", vcpu.id)
}

pub fn regs_line(r: &kvm_regs) -> String {
    format!(
        "rip {:#x} rsp {:#x} rbp {:#x} rflags {:#x} rax {:#x} rbx {:#x} rcx {:#x} rdx {:#x} rsi {:#x} rdi {:#x}",
        r.rip, r.rsp, r.rbp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi
    )
}

pub fn sregs_line(s: &kvm_sregs) -> String {
    format!(
        "cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x} cs {:#x}@{:#x} ss {:#x} gs.base {:#x} idt {:#x}/{:#x} \
         gdt {:#x}/{:#x} tr {:#x}@{:#x} apic_base {:#x}",
        s.cr0,
        s.cr2,
        s.cr3,
        s.cr4,
        s.efer,
        s.cs.selector,
        s.cs.base,
        s.ss.selector,
        s.gs.base,
        s.idt.base,
        s.idt.limit,
        s.gdt.base,
        s.gdt.limit,
        s.tr.selector,
        s.tr.base,
        s.apic_base
    )
}

pub fn events_line(e: &kvm_vcpu_events) -> String {
    let x = &e.exception;
    format!(
        "exception injected {} pending {} nr {} error {:#x}; interrupt injected {} nr {}; nmi injected {} pending {} \
         masked {}; triple_fault pending {}",
        x.injected,
        x.pending,
        x.nr,
        x.error_code,
        e.interrupt.injected,
        e.interrupt.nr,
        e.nmi.injected,
        e.nmi.pending,
        e.nmi.masked,
        e.triple_fault.pending
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_name_the_registers_that_locate_a_fault() {
        let r = kvm_regs { rip: 0xffff_ffff_8100_1234, rsp: 0x10, ..Default::default() };
        assert!(regs_line(&r).starts_with("rip 0xffffffff81001234 rsp 0x10 "));
        let s = kvm_sregs { cr2: 0xdead_b000, ..Default::default() };
        assert!(sregs_line(&s).contains("cr2 0xdeadb000"));
        let mut e = kvm_vcpu_events::default();
        e.exception.injected = 1;
        e.exception.nr = 8;
        assert!(events_line(&e).starts_with("exception injected 1 pending 0 nr 8 "));
    }
}
