//! x86_64 specifics: memory layout, long-mode entry state, CPUID, kernel loading.
pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod regs;
