//! forkvm's VMM: KVM microVMs that boot our test guest or Linux, pause and resume at any point,
//! snapshot, restore and fork. Laid out like Firecracker's `src/vmm`: `vstate/` holds the KVM VM,
//! vCPUs and guest memory, `devices/` the emulated devices, `arch/` the x86_64 boot details.

pub mod agent;
pub mod arch;
pub mod devices;
pub mod error;
pub mod fork;
pub mod hibernate;
pub mod lazy_restore;
pub mod live_clone;
mod memory_failure;
pub mod microvm;
pub mod persist;
pub mod pool;
pub mod quiesce;
pub mod remote_wake;
pub mod restore;
pub mod snapshot;
pub mod store_maint;
pub mod vcpu_thread;
mod verified_lazy;
pub mod vstate;

pub use error::Error;
pub use hibernate::{Compression, HibernateOptions, HibernateReport};
pub use lazy_restore::{WakeHandle, WakeOptions, WakeReport, WakeStats};
pub use microvm::{BootSource, MicroVm, VmConfig};
pub use snapshot::{RestoreMode, RestoreOptions, SnapshotKind, SnapshotReport};
pub use vcpu_thread::ExitReason;
pub use vstate::memory::Backing;

/// The embedded test guest (see the `test-guest` crate).
pub static TEST_GUEST_ELF: &[u8] = test_guest::ELF;
