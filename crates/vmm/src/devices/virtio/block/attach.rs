//! Wiring a block device into a VM: its virtio-mmio slot, its irqfd, and where its disk comes
//! from (a config at boot, a snapshot directory at restore, the parent's frozen disk in a fork).

use std::path::Path;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::{Block, BlockState, CowDisk, DiskConfig};
use crate::devices::virtio::MmioSlot;
use crate::vstate::memory::GuestMem;
use crate::vstate::vm::Vm;
use crate::Error;

/// Where the block device sits (virtio-mmio slot 1; vsock has slot 0).
pub const BLOCK_SLOT: MmioSlot = MmioSlot {
    base: crate::devices::virtio::MMIO_BASE + crate::devices::virtio::mmio::MMIO_WINDOW,
    irq: crate::devices::virtio::IRQ_BASE + 1,
};

fn irq(vm: &Vm) -> Result<EventFd, Error> {
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::Io)?;
    vm.register_irqfd(&irq, BLOCK_SLOT.irq)?;
    Ok(irq)
}

/// A fresh block device over the disk `cfg` describes.
pub fn new_block(vm: &Vm, mem: &Arc<GuestMem>, cfg: &DiskConfig) -> Result<Block, Error> {
    Block::new(cfg, mem.clone(), irq(vm)?).map_err(Error::Config)
}

/// The block device of a VM restored from snapshot directory `dir`.
pub fn block_from_saved(
    vm: &Vm,
    mem: &Arc<GuestMem>,
    st: Option<&BlockState>,
    dir: &Path,
) -> Result<Option<Arc<Block>>, Error> {
    let Some(st) = st else { return Ok(None) };
    let disk = CowDisk::open_saved(&st.disk, dir, None).map_err(|e| Error::State(format!("disk: {e}")))?;
    let b = Block::from_parts(st, disk, mem.clone(), irq(vm)?).map_err(|e| Error::State(format!("block: {e}")))?;
    Ok(Some(Arc::new(b)))
}

/// In a fork child: a block device over the parent's frozen disk with an overlay of its own.
pub fn block_for_child(
    vm: &Vm,
    mem: &Arc<GuestMem>,
    parent: Option<&Arc<Block>>,
    st: Option<&BlockState>,
) -> Result<Option<Arc<Block>>, Error> {
    let (Some(parent), Some(st)) = (parent, st) else { return Ok(None) };
    let disk = {
        let mut s = parent.try_state().ok_or_else(|| Error::State("the parent's block device is busy".into()))?;
        let view = s.disk.clone_view(None).map_err(Error::State)?;
        s.disk.forget_live_in_child();
        view
    };
    let b = Block::from_parts(st, disk, mem.clone(), irq(vm)?).map_err(|e| Error::State(format!("block: {e}")))?;
    Ok(Some(Arc::new(b)))
}

impl crate::MicroVm {
    /// Freezes the disk at this instant and links its layers into snapshot directory `dir`,
    /// recording them in `state` (snapshots and hibernation). The VM must be paused.
    pub fn persist_disk(&self, dir: &Path, state: &mut crate::persist::state::VmState) -> Result<(), Error> {
        let (Some(b), Some(bs)) = (self.block(), state.devices.block.as_mut()) else { return Ok(()) };
        bs.disk = b.state().disk.persist(dir).map_err(|e| Error::State(format!("disk: {e}")))?;
        Ok(())
    }
}
