//! Saved state of the VM-wide KVM devices: PIT, kvmclock, PIC master/slave, IOAPIC.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use serde::{Deserialize, Serialize};

use super::vm::{Vm, VmError};

#[derive(Debug, Serialize, Deserialize)]
pub struct VmKvmState {
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
}

fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |err| VmError::Ioctl { op, err }
}

fn chip(vm: &Vm, id: u32) -> Result<kvm_irqchip, VmError> {
    let mut c = kvm_irqchip { chip_id: id, ..Default::default() };
    vm.fd().get_irqchip(&mut c).map_err(ioctl("KVM_GET_IRQCHIP"))?;
    Ok(c)
}

impl VmKvmState {
    /// Captures the VM devices; all vCPUs must be parked.
    pub fn save(vm: &Vm) -> Result<Self, VmError> {
        let pit = vm.fd().get_pit2().map_err(ioctl("KVM_GET_PIT2"))?;
        let mut clock = vm.fd().get_clock().map_err(ioctl("KVM_GET_CLOCK"))?;
        // Only the time is restored; the flags describe the host at save time.
        clock.flags = 0;
        Ok(VmKvmState {
            pit,
            clock,
            pic_master: chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(vm, KVM_IRQCHIP_IOAPIC)?,
        })
    }

    /// Restores into a freshly created VM (irqchip and PIT already created).
    pub fn restore(&self, vm: &Vm) -> Result<(), VmError> {
        vm.fd().set_pit2(&self.pit).map_err(ioctl("KVM_SET_PIT2"))?;
        vm.fd().set_clock(&self.clock).map_err(ioctl("KVM_SET_CLOCK"))?;
        for (c, id) in [
            (&self.pic_master, KVM_IRQCHIP_PIC_MASTER),
            (&self.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            (&self.ioapic, KVM_IRQCHIP_IOAPIC),
        ] {
            if c.chip_id != id {
                return Err(VmError::Ioctl { op: "KVM_SET_IRQCHIP", err: kvm_ioctls::Error::new(libc::EINVAL) });
            }
            vm.fd().set_irqchip(c).map_err(ioctl("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }
}
