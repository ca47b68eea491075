//! The virtio-net device: RX and TX queues moved to and from a tap by a worker thread. The
//! worker reads from the tap only while the guest has RX buffers posted: a guest that stops
//! reading leaves frames in the kernel's bounded tap queue (which drops), never in ours.
//! Offers only VIRTIO_NET_F_MAC (no offloads, no mergeable buffers).

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::tap::{Tap, VNET_HDR_LEN};
use crate::devices::mmio::MmioDevice;
use crate::devices::virtio::mmio::{MmioEvent, MmioTransport};
use crate::devices::virtio::vsock::packet::{capacity, scatter, writable_buffers};
use crate::vstate::memory::GuestMem;

pub const DEVICE_ID: u32 = 1;
pub const QUEUE_SIZES: [u16; 2] = [256, 256];
pub const F_MAC: u64 = 1 << 5;
const RXQ: usize = 0;
const TXQ: usize = 1;
/// Largest frame (vnet header included) either way; bigger ones are dropped.
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65550;
const TX_BATCH: usize = 256;

/// Counters (tests, stats).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    pub tx_frames: u64,
    pub rx_frames: u64,
    /// TX chains dropped: bad descriptors, oversized, or the tap refused them.
    pub tx_dropped: u64,
    /// Frames from the tap that did not fit the guest's buffer.
    pub rx_dropped: u64,
}

#[derive(Debug)]
pub struct State {
    pub transport: MmioTransport,
    pub tap: Tap,
    /// The private network namespace holding the tap (None: a tap in the host's namespace).
    pub ns: Option<super::netns::PrivateNet>,
    pub mac: [u8; 6],
    pub stats: NetStats,
    /// The guest had no RX buffer the last time we looked: do not read the tap.
    pub rx_starved: bool,
    paused: bool,
    stop: bool,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    cond: Condvar,
    kick: EventFd,
    mem: Arc<GuestMem>,
    view: GuestMemoryMmap,
}

#[derive(Debug)]
pub struct Net {
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn config_bytes(mac: [u8; 6]) -> Vec<u8> {
    mac.to_vec()
}

/// A locally administered unicast MAC from `seed` (e.g. the VM's generation seed, or a name).
pub fn mac_from(seed: &[u8]) -> [u8; 6] {
    let h = blake3::hash(seed);
    let b = h.as_bytes();
    [(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]]
}

impl Net {
    pub fn new(
        tap: Tap,
        ns: Option<super::netns::PrivateNet>,
        mac: [u8; 6],
        mem: Arc<GuestMem>,
        irq: EventFd,
    ) -> Result<Self, String> {
        let t = MmioTransport::new(DEVICE_ID, F_MAC, &QUEUE_SIZES, config_bytes(mac), irq);
        Self::with_transport(t, tap, ns, mac, mem)
    }

    pub(crate) fn with_transport(
        t: MmioTransport,
        tap: Tap,
        ns: Option<super::netns::PrivateNet>,
        mac: [u8; 6],
        mem: Arc<GuestMem>,
    ) -> Result<Self, String> {
        let view = mem.view().map_err(|e| e.to_string())?;
        let kick = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
        let state = State {
            transport: t,
            tap,
            ns,
            mac,
            stats: NetStats::default(),
            rx_starved: false,
            paused: false,
            stop: false,
        };
        let shared = Arc::new(Shared { state: Mutex::new(state), cond: Condvar::new(), kick, mem, view });
        let s = shared.clone();
        let worker = std::thread::Builder::new()
            .name("net".into())
            .spawn(move || worker(&s))
            .map_err(|e| format!("cannot start the net thread: {e}"))?;
        Ok(Net { shared, worker: Some(worker) })
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.shared.state)
    }

    pub fn try_state(&self) -> Option<MutexGuard<'_, State>> {
        self.shared.state.try_lock().ok()
    }

    pub fn stats(&self) -> NetStats {
        self.state().stats
    }

    /// In a fork child: drops the parent's tap and namespace fds inherited by fork() (they would
    /// keep the parent's namespace alive as long as the child lives). Never blocks.
    pub fn forget_in_child(&self) {
        if let Some(mut s) = self.try_state() {
            s.ns = None;
            s.tap.close_in_child();
        }
    }

    /// The fd of the private network namespace (None for a host tap).
    pub fn netns_fd(&self) -> Option<i32> {
        self.state().ns.as_ref().map(|n| std::os::fd::AsRawFd::as_raw_fd(&n.ns))
    }

    pub fn mac(&self) -> [u8; 6] {
        self.state().mac
    }

    pub fn kick(&self) {
        let _ = self.shared.kick.write(1);
    }

    /// Stops the worker from touching guest memory until [`Net::resume`].
    pub fn pause(&self) {
        self.state().paused = true;
    }

    pub fn resume(&self) {
        self.state().paused = false;
        self.shared.cond.notify_all();
        self.kick();
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.state().stop = true;
        self.shared.cond.notify_all();
        self.kick();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl MmioDevice for Net {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.state().transport.read(offset, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let ev = self.state().transport.write(offset, data);
        if matches!(ev, MmioEvent::Notify(_) | MmioEvent::Activated) {
            self.kick();
        }
    }
}

fn worker(sh: &Shared) {
    // A fork-gate participant: idle only in the waits below (see crate::quiesce).
    let _participant = crate::quiesce::participant();
    let mut busy = crate::quiesce::busy();
    loop {
        let (tap_fd, want_rx) = {
            let mut s = lock(&sh.state);
            while s.paused && !s.stop {
                s = busy.idle(|| sh.cond.wait(s).unwrap_or_else(|p| p.into_inner()));
            }
            if s.stop {
                return;
            }
            (s.tap.fd(), s.transport.is_active() && !s.rx_starved)
        };
        let mut fds = [
            libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(&sh.kick), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: tap_fd, events: if want_rx { libc::POLLIN } else { 0 }, revents: 0 },
        ];
        // SAFETY: fds is a valid array of two pollfd structs for the duration of the call.
        let n = busy.idle(|| unsafe { libc::poll(fds.as_mut_ptr(), 2, 500) });
        let mut s = lock(&sh.state);
        if s.stop {
            return;
        }
        if s.paused {
            continue;
        }
        if n > 0 && fds[0].revents != 0 {
            let _ = sh.kick.read();
            s.rx_starved = false;
        }
        if process(&mut s, &sh.mem, &sh.view) {
            let _ = sh.kick.write(1);
        }
    }
}

/// Reads the readable descriptors of a TX chain into one frame (bounded by [`MAX_FRAME`]).
fn gather(mem: &GuestMem, chain: impl Iterator<Item = virtio_queue::desc::split::Descriptor>) -> Option<Vec<u8>> {
    let mut frame = Vec::new();
    for d in chain {
        if d.is_write_only() {
            return None;
        }
        let len = d.len() as usize;
        if frame.len() + len > MAX_FRAME {
            return None;
        }
        let start = frame.len();
        frame.resize(start + len, 0);
        if !mem.read(d.addr().0, &mut frame[start..]) {
            return None;
        }
    }
    (frame.len() > VNET_HDR_LEN).then_some(frame)
}

/// One pass over both queues. Returns true if TX work is left.
pub(crate) fn process(s: &mut State, mem: &GuestMem, view: &GuestMemoryMmap) -> bool {
    if !s.transport.is_active() {
        return false;
    }
    let State { transport, tap, stats, rx_starved, .. } = s;
    let mut used = false;
    let mut more = false;
    let mut n = 0;
    while let Some(q) = transport.queues.get_mut(TXQ) {
        if n == TX_BATCH {
            more = true;
            break;
        }
        let Some(chain) = q.pop_descriptor_chain(view) else { break };
        let head = chain.head_index();
        match gather(mem, chain) {
            Some(frame) => match tap.write(&frame) {
                Ok(_) => stats.tx_frames += 1,
                Err(_) => stats.tx_dropped += 1,
            },
            None => stats.tx_dropped += 1,
        }
        let _ = q.add_used(view, head, 0);
        used = true;
        n += 1;
    }
    let mut buf = vec![0u8; MAX_FRAME];
    while let Some(q) = transport.queues.get_mut(RXQ) {
        let Some(chain) = q.pop_descriptor_chain(view) else {
            *rx_starved = true;
            break;
        };
        let head = chain.head_index();
        let bufs = match writable_buffers(mem, chain) {
            Ok(b) if capacity(&b) > VNET_HDR_LEN => b,
            _ => {
                // A bad buffer is returned empty; the guest learns nothing from it.
                stats.rx_dropped += 1;
                let _ = q.add_used(view, head, 0);
                used = true;
                continue;
            }
        };
        let len = match tap.read(&mut buf) {
            Ok(len) => len,
            Err(_) => {
                q.go_to_previous_position();
                break;
            }
        };
        if len > capacity(&bufs) {
            // Does not fit the guest's buffer: drop the frame, keep the buffer for the next.
            stats.rx_dropped += 1;
            q.go_to_previous_position();
            continue;
        }
        let written = scatter(mem, &bufs, &buf[..len]);
        let _ = q.add_used(view, head, written as u32);
        stats.rx_frames += 1;
        used = true;
    }
    if used {
        transport.signal_used();
    }
    more
}
