//! The virtio-vsock device: its virtio-mmio registers (for the vCPU threads) and a worker
//! thread that moves packets between the guest's queues and the host's Unix sockets.
//! The worker only touches the device while holding its lock, so pausing the device under that
//! lock stops all of its guest memory writes (snapshots and forks need that).

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::muxer::Muxer;
use super::packet::{self, HDR_LEN};
use crate::devices::mmio::MmioDevice;
use crate::devices::virtio::mmio::{MmioEvent, MmioTransport};
use crate::vstate::memory::GuestMem;

/// virtio device id of vsock.
pub const DEVICE_ID: u32 = 19;
pub const QUEUE_SIZES: [u16; 3] = [256, 256, 256];
const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;
/// The guest CID when none is given.
pub const DEFAULT_CID: u64 = 3;
/// TX chains handled in one pass before the worker looks at its other work.
const TX_BATCH: usize = 256;

/// Everything behind the device lock.
#[derive(Debug)]
pub struct State {
    pub transport: MmioTransport,
    pub muxer: Muxer,
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

/// A vsock device and its worker thread.
#[derive(Debug)]
pub struct Vsock {
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The config space: the guest CID (u64 little endian).
pub fn config_bytes(cid: u64) -> Vec<u8> {
    cid.to_le_bytes().to_vec()
}

impl Vsock {
    /// A device for guest `cid`, interrupting through `irq` (an eventfd registered as an irqfd).
    pub fn new(cid: u64, mem: Arc<GuestMem>, irq: EventFd) -> Result<Self, String> {
        let t = MmioTransport::new(DEVICE_ID, 0, &QUEUE_SIZES, config_bytes(cid), irq);
        Self::with_state(State { transport: t, muxer: Muxer::new(cid), paused: false, stop: false }, mem)
    }

    pub(crate) fn with_state(state: State, mem: Arc<GuestMem>) -> Result<Self, String> {
        let view = mem.view().map_err(|e| e.to_string())?;
        let kick = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
        let shared = Arc::new(Shared { state: Mutex::new(state), cond: Condvar::new(), kick, mem, view });
        let s = shared.clone();
        let worker = std::thread::Builder::new()
            .name("vsock".into())
            .spawn(move || worker(&s))
            .map_err(|e| format!("cannot start the vsock thread: {e}"))?;
        Ok(Vsock { shared, worker: Some(worker) })
    }

    pub(crate) fn new_state(transport: MmioTransport, cid: u64) -> State {
        State { transport, muxer: Muxer::new(cid), paused: false, stop: false }
    }

    /// Locks the device state (tests and persistence).
    pub fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.shared.state)
    }

    pub fn cid(&self) -> u64 {
        self.state().muxer.cid
    }

    /// Listens for host connections on `path` (private, replacing a stale socket); guest
    /// connections to host port P then go to `<path>_P`.
    pub fn listen(&self, path: &Path) -> Result<(), String> {
        let _ = std::fs::remove_file(path);
        let l = UnixListener::bind(path).map_err(|e| format!("cannot bind {}: {e}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("cannot make {} private: {e}", path.display()))?;
        l.set_nonblocking(true).map_err(|e| e.to_string())?;
        self.state().muxer.set_listener(l, path.to_path_buf());
        self.kick();
        Ok(())
    }

    /// Wakes the worker (the transport does this on QueueNotify).
    pub fn kick(&self) {
        let _ = self.shared.kick.write(1);
    }

    /// Stops the worker from touching guest memory until [`Vsock::resume`].
    pub fn pause(&self) {
        self.state().paused = true;
    }

    pub fn resume(&self) {
        self.state().paused = false;
        self.shared.cond.notify_all();
        self.kick();
    }

    /// In a fork child: closes the parent's sockets this device holds (its worker thread did
    /// not survive the fork). Never blocks: the parent paused the device before forking.
    pub fn forget_in_child(&self) {
        if let Ok(mut s) = self.shared.state.try_lock() {
            s.muxer.close_all();
        }
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        {
            let mut s = self.state();
            s.stop = true;
        }
        self.shared.cond.notify_all();
        self.kick();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl MmioDevice for Vsock {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.state().transport.read(offset, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let mut s = self.state();
        match s.transport.write(offset, data) {
            MmioEvent::Notify(_) | MmioEvent::Activated => {
                drop(s);
                self.kick();
            }
            MmioEvent::Reset => s.muxer.reset(),
            MmioEvent::None => {}
        }
    }
}

fn worker(sh: &Shared) {
    // A fork-gate participant: idle only in the waits below (see crate::quiesce).
    let _participant = crate::quiesce::participant();
    let mut busy = crate::quiesce::busy();
    loop {
        let set = {
            let mut s = lock(&sh.state);
            while s.paused && !s.stop {
                s = busy.idle(|| sh.cond.wait(s).unwrap_or_else(|p| p.into_inner()));
            }
            if s.stop {
                return;
            }
            s.muxer.poll_set()
        };
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(set.len() + 1);
        fds.push(libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(&sh.kick), events: libc::POLLIN, revents: 0 });
        fds.extend(set.iter().map(|&(fd, events, _)| libc::pollfd { fd, events, revents: 0 }));
        // SAFETY: fds is a valid array of fds.len() pollfd structs for the duration of the call.
        let n = busy.idle(|| unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 500) });
        let mut s = lock(&sh.state);
        if s.stop {
            return;
        }
        if s.paused {
            continue;
        }
        if n > 0 {
            if fds[0].revents != 0 {
                let _ = sh.kick.read();
                s.muxer.rx_starved = false;
            }
            for (pfd, &(_, _, token)) in fds[1..].iter().zip(&set) {
                if pfd.revents & libc::POLLNVAL == 0 && pfd.revents != 0 {
                    s.muxer.on_ready(token, pfd.revents);
                }
            }
        }
        s.muxer.expire(Instant::now());
        if process(&mut s, &sh.mem, &sh.view) {
            let _ = sh.kick.write(1);
        }
    }
}

/// One pass over the queues. Returns true if TX work is left (the caller kicks itself).
pub(crate) fn process(s: &mut State, mem: &GuestMem, view: &GuestMemoryMmap) -> bool {
    if !s.transport.is_active() {
        return false;
    }
    let State { transport, muxer, .. } = s;
    let mut used = false;
    let mut more = false;
    // TX: every chain is consumed, good or bad; bad ones are dropped.
    let mut n = 0;
    while let Some(q) = transport.queues.get_mut(TXQ) {
        if n == TX_BATCH {
            more = true;
            break;
        }
        let Some(chain) = q.pop_descriptor_chain(view) else { break };
        let head = chain.head_index();
        match packet::read_chain(mem, chain) {
            Ok((h, payload)) => muxer.handle_tx(h, &payload),
            Err(e) => {
                muxer.dropped += 1;
                tracing::debug!("vsock: dropped a guest packet: {e}");
            }
        }
        let _ = q.add_used(view, head, 0);
        used = true;
        n += 1;
    }
    // RX: control packets first, then host data within the guest's credit.
    while muxer.has_rx_work() {
        let Some(q) = transport.queues.get_mut(RXQ) else { break };
        let Some(chain) = q.pop_descriptor_chain(view) else {
            muxer.rx_starved = true;
            break;
        };
        let head = chain.head_index();
        let bufs = match packet::writable_buffers(mem, chain) {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!("vsock: bad RX buffer: {e}");
                muxer.dropped += 1;
                let _ = q.add_used(view, head, 0);
                used = true;
                continue;
            }
        };
        let cap = packet::capacity(&bufs);
        if cap <= HDR_LEN {
            muxer.dropped += 1;
            let _ = q.add_used(view, head, 0);
            used = true;
            continue;
        }
        let Some((h, payload)) = muxer.next_rx(cap) else {
            q.go_to_previous_position();
            break;
        };
        let mut bytes = h.to_bytes().to_vec();
        bytes.extend_from_slice(&payload);
        let written = packet::scatter(mem, &bufs, &bytes);
        let _ = q.add_used(view, head, written as u32);
        used = true;
    }
    // Event queue: the transport reset after a restore or clone.
    if muxer.reset_event_pending {
        if let Some(q) = transport.queues.get_mut(EVQ) {
            if let Some(chain) = q.pop_descriptor_chain(view) {
                let head = chain.head_index();
                let written = match packet::writable_buffers(mem, chain) {
                    Ok(bufs) => packet::scatter(mem, &bufs, &0u32.to_le_bytes()),
                    Err(_) => 0,
                };
                let _ = q.add_used(view, head, written as u32);
                used = true;
                muxer.reset_event_pending = false;
            }
        }
    }
    if used {
        transport.signal_used();
    }
    more
}
