//! Saved state of the vsock device: its CID and transport (registers and queues). Connections
//! are not saved: after a restore or clone the guest gets VIRTIO_VSOCK_EVENT_TRANSPORT_RESET and
//! drops them, as with Firecracker.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use super::device::{config_bytes, Vsock, QUEUE_SIZES};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::persist::TransportState;
use crate::vstate::memory::GuestMem;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub cid: u64,
    pub transport: TransportState,
}

/// Lowest CID a guest may have (0-2 are reserved).
const MIN_CID: u64 = 3;

impl Vsock {
    /// The device's state. The device must be paused (its worker is then idle). The used rings
    /// the device wrote are marked dirty for the next diff snapshot.
    pub fn save(&self, mem: &GuestMem) -> VsockState {
        let s = self.state();
        for q in &s.transport.queues {
            if q.ready() {
                mem.mark_host_dirty(q.used_ring(), 6 + 8 * u64::from(q.size()));
            }
        }
        VsockState { cid: s.muxer.cid, transport: s.transport.save() }
    }

    /// A device from saved state; if the driver had it running, the guest gets a transport
    /// reset event as soon as it has an event buffer.
    pub fn restore(st: &VsockState, mem: Arc<GuestMem>, irq: EventFd) -> Result<Self, String> {
        if st.cid < MIN_CID || st.cid > u64::from(u32::MAX) {
            return Err(format!("vsock state has an invalid guest CID {}", st.cid));
        }
        if st.transport.device_id != super::device::DEVICE_ID {
            return Err(format!("vsock state has device id {}", st.transport.device_id));
        }
        let t = MmioTransport::restore(&st.transport, &QUEUE_SIZES, config_bytes(st.cid), irq)?;
        let active = t.is_active();
        let mut state = Vsock::new_state(t, st.cid);
        state.muxer.reset_event_pending = active;
        Vsock::with_state(state, mem)
    }
}
