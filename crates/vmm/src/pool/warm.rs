//! A warm VM: everything a clone needs that does not depend on the parent, made before any
//! request — the KVM VM with its irqchip and PIT, guest memory mapped and registered with a
//! userfaultfd (missing-page mode), the memory slots, the serial irqfd and the vCPUs. A clone
//! ticket then only sets state (~0.3 ms of `KVM_SET_*`) and resumes; guest pages come from the
//! parent's page server through the userfaultfd this VM handed over.

use std::io::{BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};

use crate::devices::console::lock;
use std::time::{Duration, Instant};

use pagesrv::fc::GuestRegionUffdMapping;
use pagesrv::uffd::{features, Fill, Uffd};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::GEN_PAGE;
use crate::devices::console::Console;
use crate::devices::serial::{SerialPort, COM1_IRQ};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::vsock::Vsock;
use crate::live_clone::wire::{self, TicketHeader};
use crate::memory_failure::{self, Watch};
use crate::microvm::{vsock_from_state, write_generation, MicroVm, Parts};
use crate::persist::state::VmState;
use crate::vcpu_thread::{Control, ExitReason, Want};
use crate::vstate::memory::{Backing, GuestMem};
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::Vm;
use crate::Error;

/// Longest wait for the ticket once a parent connected.
pub const TICKET_TIMEOUT: Duration = Duration::from_secs(30);

/// A boolean someone can wait for.
type Flag = (Mutex<bool>, Condvar);

/// A pre-created VM waiting for a clone ticket.
#[derive(Debug)]
pub struct WarmVm {
    pub(super) vm: Vm,
    pub(super) mem: Arc<GuestMem>,
    pub(super) uffd: Arc<Uffd>,
    pub(super) vcpus: Vec<Vcpu>,
    /// Per vCPU, the CPUID this host offers it (asked before any request).
    pub(super) offered: Vec<Vec<kvm_bindings::kvm_cpuid_entry2>>,
    pub(super) serial_irq: EventFd,
}

/// A parent's ticket, taken by [`WarmVm::offer`].
#[derive(Debug)]
pub struct Offer {
    pub(super) conn: UnixStream,
    r: BufReader<UnixStream>,
    pub header: TicketHeader,
    state: Vec<u8>,
    at: Instant,
}

impl Offer {
    /// Turns the ticket down (e.g. the clone's name is taken); the parent gets `error <why>`.
    pub fn refuse(self, why: &str) {
        let _ = (&self.conn).write_all(format!("error {}\n", why.replace('\n', " ")).as_bytes());
    }
}

/// How a clone into a warm VM went (member side).
#[derive(Debug, Clone, Copy, Default)]
pub struct WarmReport {
    /// From the ticket's arrival until the vCPUs run.
    pub apply: Duration,
    /// Of `apply`: bringing the generation page in from the parent (one page-server round trip).
    pub probe: Duration,
    /// Of `apply`: VM, device and vCPU state set (`KVM_SET_*`, CPUID checks).
    pub restore: Duration,
    /// Of `apply`: vCPU threads started and parked, memory-failure watch set.
    pub assemble: Duration,
    /// Of `apply`: resuming the vCPUs.
    pub resume: Duration,
}

/// A pool clone's tie to its parent's page server (member side). While the clone's memory is not
/// all in, losing the parent stops the VM with an error and poisons the pages never served (a
/// vCPU blocked on one wakes up failed instead of hanging). Keep it as long as the VM runs.
#[derive(Debug)]
pub struct CloneLink {
    conn: UnixStream,
    closing: Arc<AtomicBool>,
    independent: Arc<Flag>,
    thread: Option<std::thread::JoinHandle<()>>,
    _watch: Option<Watch>,
}

impl CloneLink {
    /// True once the parent said every data page is in (the uffd is then dropped).
    pub fn independent(&self) -> bool {
        *lock(&self.independent.0)
    }

    /// Waits up to `timeout` for the clone to become independent; true if it is.
    pub fn wait_independent(&self, timeout: Duration) -> bool {
        let (m, cv) = &*self.independent;
        let g = lock(m);
        let (g, _) = cv.wait_timeout_while(g, timeout, |done| !*done).unwrap_or_else(|p| p.into_inner());
        *g
    }
}

impl Drop for CloneLink {
    fn drop(&mut self) {
        self.closing.store(true, SeqCst);
        let _ = self.conn.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl WarmVm {
    /// Creates a warm VM of `mem_size` bytes and `vcpus` vCPUs.
    pub fn new(mem_size: u64, vcpus: u8) -> Result<WarmVm, Error> {
        if vcpus == 0 || vcpus > crate::microvm::MAX_VCPUS {
            return Err(Error::Config(format!("vCPU count must be 1..={}, got {vcpus}", crate::microvm::MAX_VCPUS)));
        }
        // 4 KiB pages: the page server places whole small pages.
        let mem = Arc::new(GuestMem::new(mem_size, Backing::Anon, false)?);
        let uffd = Uffd::new(features::EVENT_REMOVE | features::THREAD_ID | features::POISON, 0)
            .map_err(|e| Error::State(format!("userfaultfd: {e}")))?;
        for r in mem.regions() {
            uffd.register(r.host as u64, r.size)
                .map_err(|e| Error::State(format!("UFFDIO_REGISTER of guest memory: {e}")))?;
        }
        let vm = Vm::new()?;
        vm.set_memory(&mem, false)?;
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::Io)?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)?;
        let count = vcpus;
        let vcpus = (0..vcpus).map(|id| Vcpu::new(&vm, id)).collect::<Result<Vec<_>, _>>()?;
        let offered = vcpus.iter().map(|v| v.offered_cpuid(&vm, count)).collect::<Result<Vec<_>, _>>()?;
        // Process-wide setup a clone would otherwise pay for: the memory-failure monitor.
        memory_failure::prepare().map_err(Error::State)?;
        Ok(WarmVm { vm, mem, uffd: Arc::new(uffd), vcpus, offered, serial_irq })
    }

    pub fn mem_size(&self) -> u64 {
        self.mem.size()
    }

    /// The guest memory regions as the handshake describes them.
    fn mappings(&self) -> Vec<GuestRegionUffdMapping> {
        self.mem
            .regions()
            .iter()
            .map(|r| GuestRegionUffdMapping {
                base_host_virt_addr: r.host as u64,
                size: r.size,
                offset: r.file_offset,
                page_size: 4096,
            })
            .collect()
    }

    /// Serves one clone on `conn` (a parent that just connected): [`WarmVm::offer`], then
    /// [`WarmVm::accept_offer`].
    pub fn accept(
        self,
        conn: UnixStream,
        console: Option<Box<dyn Write + Send>>,
    ) -> Result<(MicroVm, CloneLink, TicketHeader, WarmReport), Error> {
        let offer = self.offer(conn)?;
        let header = offer.header.clone();
        let (vm, link, rep) = self.accept_offer(offer, console)?;
        Ok((vm, link, header, rep))
    }

    /// Hands this VM's userfaultfd and memory layout to the parent at the other end of `conn`
    /// and waits (bounded) for its ticket. A parent that goes away before sending one leaves the
    /// warm VM as it was: offer it to the next.
    pub fn offer(&self, conn: UnixStream) -> Result<Offer, Error> {
        pagesrv::fc_wire::send_handshake(&conn, &self.mappings(), self.uffd.as_fd())
            .map_err(|e| Error::State(format!("clone handshake: {e}")))?;
        conn.set_read_timeout(Some(TICKET_TIMEOUT)).map_err(Error::Io)?;
        let mut r = BufReader::new(conn.try_clone().map_err(Error::Io)?);
        let (header, state) = wire::recv_ticket(&mut r)?;
        conn.set_read_timeout(None).map_err(Error::Io)?;
        Ok(Offer { conn, r, header, state, at: Instant::now() })
    }

    /// Restores the ticket's state and resumes; `console` receives the guest's serial output.
    /// Answers `ready` (or `error ...`) to the parent. Returns the running VM and the link that
    /// must live as long as it.
    pub fn accept_offer(
        self,
        offer: Offer,
        console: Option<Box<dyn Write + Send>>,
    ) -> Result<(MicroVm, CloneLink, WarmReport), Error> {
        let Offer { conn, r, header: _, state, at: t0 } = offer;
        // From now on the parent's page server feeds this VM: watch it.
        let ctl_cell: Arc<OnceLock<Weak<Control>>> = Arc::new(OnceLock::new());
        let closing = Arc::new(AtomicBool::new(false));
        let independent: Arc<Flag> = Arc::new((Mutex::new(false), Condvar::new()));
        let thread = spawn_watchdog(
            r,
            self.uffd.clone(),
            self.mem.clone(),
            ctl_cell.clone(),
            closing.clone(),
            independent.clone(),
        )?;
        let mut link = CloneLink {
            conn: conn.try_clone().map_err(Error::Io)?,
            closing,
            independent,
            thread: Some(thread),
            _watch: None,
        };
        let mut rep = WarmReport::default();
        match self.apply(&state, console, &ctl_cell, &mut rep) {
            Ok((vm, watch)) => {
                link._watch = Some(watch);
                rep.resume = vm.resume()?;
                (&conn).write_all(b"ready\n").map_err(Error::Io)?;
                rep.apply = t0.elapsed();
                Ok((vm, link, rep))
            }
            Err(e) => {
                let _ = (&conn).write_all(format!("error {}\n", e.to_string().replace('\n', " ")).as_bytes());
                Err(e)
            }
        }
    }

    /// Restores `state` into the warm VM; returns it paused with its vCPU threads watched.
    fn apply(
        self,
        state: &[u8],
        mirror: Option<Box<dyn Write + Send>>,
        ctl_cell: &OnceLock<Weak<Control>>,
        rep: &mut WarmReport,
    ) -> Result<(MicroVm, Watch), Error> {
        let state = VmState::from_bytes(state).map_err(|e| Error::State(format!("clone ticket state: {e}")))?;
        if state.mem_size != self.mem.size() {
            return Err(Error::State(format!(
                "this pool VM has {} MiB of memory, the parent {} MiB",
                self.mem.size() >> 20,
                state.mem_size >> 20
            )));
        }
        if state.vcpus.len() != self.vcpus.len() {
            return Err(Error::State(format!(
                "this pool VM has {} vCPUs, the parent {}",
                self.vcpus.len(),
                state.vcpus.len()
            )));
        }
        if state.devices.block.is_some() {
            return Err(Error::State("pool clones of a VM with a disk are not supported".into()));
        }
        let WarmVm { vm, mem, uffd: _, vcpus, offered, serial_irq } = self;
        // The restore writes the generation page from the host: bring it in through a kernel
        // access first, so a dead page server fails this clone instead of killing the process.
        let t = Instant::now();
        probe_page(&mem, GEN_PAGE)?;
        rep.probe = t.elapsed();
        let t = Instant::now();
        let Restored { serial, vsock, net, generation } =
            restore_state_into(&vm, &mem, &vcpus, &offered, serial_irq, &state, Console::new(mirror))?;
        mem.take_host_dirty();
        rep.restore = t.elapsed();
        let t = Instant::now();
        let parts = Parts {
            vm,
            mem,
            serial,
            vsock,
            block: None,
            net,
            vcpus,
            generation,
            track_dirty: false,
            started: Instant::now(),
            start: Want::Pause,
        };
        let vm = MicroVm::assemble(parts)?;
        let _ = ctl_cell.set(Arc::downgrade(vm.control()));
        // Wait until the vCPU threads are parked (assembled paused) before running jobs on them.
        vm.pause()?;
        let mut tids = Vec::new();
        for id in 0..usize::from(vm.vcpu_count()) {
            tids.push(vm.control().run_on(id, |_| memory_failure::gettid()).map_err(Error::State)?);
        }
        let why: memory_failure::Why =
            Arc::new(|| Some("the parent's page server went away before this clone's memory was in".into()));
        let watch = memory_failure::watch(&tids, vm.control(), why).map_err(Error::State)?;
        rep.assemble = t.elapsed();
        Ok((vm, watch))
    }
}

/// Reads the parent's messages: `filled` makes the clone independent (its uffd ranges are
/// unregistered: holes become ordinary zero pages); end of stream before that fails the clone
/// safely (stop the VM, then poison what was never served, which wakes blocked vCPUs).
fn spawn_watchdog(
    mut r: BufReader<UnixStream>,
    uffd: Arc<Uffd>,
    mem: Arc<GuestMem>,
    ctl: Arc<OnceLock<Weak<Control>>>,
    closing: Arc<AtomicBool>,
    independent: Arc<Flag>,
) -> Result<std::thread::JoinHandle<()>, Error> {
    std::thread::Builder::new()
        .name("clone-link".into())
        .spawn(move || {
            loop {
                match wire::read_line(&mut r) {
                    Ok(Some(l)) if l == "filled" => {
                        for reg in mem.regions() {
                            if let Err(e) = uffd.unregister(reg.host as u64, reg.size) {
                                tracing::warn!("cannot drop the userfaultfd of a filled clone: {e}");
                            }
                        }
                        *lock(&independent.0) = true;
                        independent.1.notify_all();
                    }
                    Ok(Some(l)) => tracing::warn!("unexpected message from the parent: {l:.80}"),
                    Ok(None) | Err(_) => break,
                }
            }
            if closing.load(SeqCst) || *lock(&independent.0) {
                return;
            }
            let msg = "the parent's page server went away before this clone's memory was in";
            tracing::error!("{msg}");
            if let Some(c) = ctl.get().and_then(Weak::upgrade) {
                c.stop(ExitReason::Error(msg.into()));
            }
            poison_unserved(&uffd, &mem);
        })
        .map_err(Error::Io)
}

/// Poisons every page of `mem` not yet present (page by page past present ones).
fn poison_unserved(uffd: &Uffd, mem: &GuestMem) {
    for reg in mem.regions() {
        let (start, len) = (reg.host as u64, reg.size);
        let mut done = 0;
        while done < len {
            match uffd.poison(start + done, len - done) {
                Ok(Fill::Done) => done = len,
                Ok(Fill::Partial(k)) => done += k,
                Ok(Fill::Exists | Fill::Again | Fill::Unmapped) => done += 4096,
                Ok(Fill::Gone) | Err(_) => return,
            }
        }
    }
}

/// Makes guest page `gpa` resident through a kernel access (a pipe write from it), which fails
/// with EFAULT instead of SIGBUS when the page cannot be served.
fn probe_page(mem: &GuestMem, gpa: u64) -> Result<(), Error> {
    let ptr = mem.host_range(gpa, 4096).ok_or_else(|| Error::State(format!("{gpa:#x} is not guest RAM")))?;
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two fds into our array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::Io(std::io::Error::last_os_error()));
    }
    // SAFETY: pipe2 just returned this fd; we are its only owner (closed on drop).
    let rd = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: as above, the write end.
    let wr = unsafe { OwnedFd::from_raw_fd(fds[1]) };
    // SAFETY: the kernel reads 4096 bytes of guest memory we own; an unservable page makes
    // write(2) fail with EFAULT rather than fault in user space.
    let n = unsafe { libc::write(wr.as_raw_fd(), ptr.cast_const().cast(), 4096) };
    let err = std::io::Error::last_os_error();
    drop((rd, wr));
    if n != 4096 {
        return Err(Error::State(format!("guest page {gpa:#x} could not be served by the parent: {err}")));
    }
    Ok(())
}

/// What [`restore_state_into`] made from a saved state.
pub(super) struct Restored {
    pub serial: SerialPort,
    pub vsock: Arc<Vsock>,
    pub net: Option<Arc<Net>>,
    pub generation: u64,
}

/// Restores `state` into a warm VM's KVM VM and vCPUs (made before the request): VM-wide
/// devices, serial, vsock, each vCPU with the CPUID `offered` to it, the next generation written
/// into the generation page, and the clone's network. Shared by a pool clone and a pool restore.
pub(super) fn restore_state_into(
    vm: &Vm,
    mem: &Arc<GuestMem>,
    vcpus: &[Vcpu],
    offered: &[Vec<kvm_bindings::kvm_cpuid_entry2>],
    serial_irq: EventFd,
    state: &VmState,
    console: Arc<Console>,
) -> Result<Restored, Error> {
    state.vm.restore(vm)?;
    let serial = SerialPort::from_state(&(&state.serial).into(), serial_irq, console).map_err(Error::State)?;
    let vsock = Arc::new(vsock_from_state(vm, mem, state.devices.vsock.as_ref())?);
    for ((v, s), offered) in vcpus.iter().zip(&state.vcpus).zip(offered) {
        if v.id != s.id {
            return Err(Error::State(format!("vCPU {} has the state of vCPU {}", v.id, s.id)));
        }
        v.apply_cpu_model(vm, s, offered)?;
        v.restore(s)?;
    }
    let generation = state.generation + 1;
    if !write_generation(mem, generation) {
        return Err(Error::State("no room for the generation page".into()));
    }
    let net = crate::devices::virtio::net::attach::net_for_clone(vm, mem, state.devices.net.as_ref(), generation)?;
    Ok(Restored { serial, vsock, net, generation })
}
