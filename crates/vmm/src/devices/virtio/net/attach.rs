//! Wiring the net device into a VM: virtio-mmio slot 2, its irqfd, its tap (a named tap in the
//! host's namespace, or a private namespace of its own), its MAC (fresh for every clone).

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::device::mac_from;
use super::netns::PrivateNet;
use super::tap::Tap;
use super::{Net, NetState};
use crate::devices::virtio::MmioSlot;
use crate::vstate::memory::GuestMem;
use crate::vstate::vm::Vm;
use crate::Error;

/// Where the net device sits (virtio-mmio slot 2).
pub const NET_SLOT: MmioSlot = MmioSlot {
    base: crate::devices::virtio::MMIO_BASE + 2 * crate::devices::virtio::mmio::MMIO_WINDOW,
    irq: crate::devices::virtio::IRQ_BASE + 2,
};

/// How a VM is networked.
#[derive(Clone, Debug, Default)]
pub struct NetConfig {
    /// An existing (or new) tap in the host's namespace; None: a private namespace with its own
    /// tap (see [`super::netns`]). Clones always get a private namespace.
    pub tap: Option<String>,
}

fn irq(vm: &Vm) -> Result<EventFd, Error> {
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::Io)?;
    vm.register_irqfd(&irq, NET_SLOT.irq)?;
    Ok(irq)
}

/// A fresh MAC: locally administered, from the generation and fresh randomness.
pub fn clone_mac(generation: u64) -> [u8; 6] {
    let salt = crate::devices::virtio::block::layer::random_id();
    mac_from(&[&generation.to_le_bytes()[..], salt.as_bytes()].concat())
}

fn private() -> Result<(Tap, Option<PrivateNet>), Error> {
    let (ns, tap) = PrivateNet::create().map_err(|e| Error::Config(format!("net: {e}")))?;
    Ok((tap, Some(ns)))
}

pub fn new_net(vm: &Vm, mem: &Arc<GuestMem>, cfg: &NetConfig) -> Result<Net, Error> {
    let (tap, ns) = match &cfg.tap {
        Some(name) => (Tap::open(name).map_err(|e| Error::Config(format!("cannot open tap {name}: {e}")))?, None),
        None => private()?,
    };
    Net::new(tap, ns, clone_mac(1), mem.clone(), irq(vm)?).map_err(Error::Config)
}

/// The net device of a restored VM or fork child: a private namespace and a MAC of its own.
pub fn net_for_clone(
    vm: &Vm,
    mem: &Arc<GuestMem>,
    st: Option<&NetState>,
    generation: u64,
) -> Result<Option<Arc<Net>>, Error> {
    let Some(st) = st else { return Ok(None) };
    let (tap, ns) = private()?;
    let n = Net::restore(st, tap, ns, clone_mac(generation), mem.clone(), irq(vm)?)
        .map_err(|e| Error::State(format!("net: {e}")))?;
    Ok(Some(Arc::new(n)))
}
