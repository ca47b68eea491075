//! Saved state of the net device: its transport and MAC. The tap is not saved: a restored VM
//! or a fork child gets a tap of its own in a private network namespace (see `netns`).

use serde::{Deserialize, Serialize};

use crate::devices::virtio::persist::TransportState;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub transport: TransportState,
    pub mac: [u8; 6],
}

impl super::Net {
    /// The device's state (the device must be paused). Used rings are marked dirty.
    pub fn save(&self, mem: &crate::vstate::memory::GuestMem) -> NetState {
        use virtio_queue::QueueT;
        let s = self.state();
        for q in &s.transport.queues {
            if q.ready() {
                mem.mark_host_dirty(q.used_ring(), 6 + 8 * u64::from(q.size()));
            }
        }
        NetState { transport: s.transport.save(), mac: s.mac }
    }
}

impl super::Net {
    /// A device from saved state over a new tap, with MAC `mac` (a clone's own; the config
    /// generation changes when it differs from the saved one).
    pub fn restore(
        st: &NetState,
        tap: super::tap::Tap,
        ns: Option<super::netns::PrivateNet>,
        mac: [u8; 6],
        mem: std::sync::Arc<crate::vstate::memory::GuestMem>,
        irq: vmm_sys_util::eventfd::EventFd,
    ) -> Result<Self, String> {
        use super::device::{config_bytes, DEVICE_ID, QUEUE_SIZES};
        if st.transport.device_id != DEVICE_ID {
            return Err(format!("net state has device id {}", st.transport.device_id));
        }
        let mut t =
            crate::devices::virtio::mmio::MmioTransport::restore(&st.transport, &QUEUE_SIZES, config_bytes(mac), irq)?;
        if mac != st.mac {
            t.config_generation = t.config_generation.wrapping_add(1);
        }
        Self::with_transport(t, tap, ns, mac, mem)
    }
}
