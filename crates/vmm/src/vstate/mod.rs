//! KVM state of a microVM: the VM (irqchip, PIT, memory slots), its vCPUs, and guest memory.
pub mod diag;
pub mod memory;
pub mod vcpu;
pub mod vm;
pub mod vm_persist;
