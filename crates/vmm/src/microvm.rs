//! A running microVM: KVM VM + memory + devices + vCPU threads, with pause/resume/stop.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::agent::{run_begun, AgentAddr, AgentGate, CloneHookOptions, HookState};
use crate::arch::{boot, layout, regs};
use crate::devices::console::Console;
use crate::devices::mmio::MmioBus;
use crate::devices::pio::PioBus;
use crate::devices::serial::{SerialPort, COM1_IRQ};
use crate::devices::virtio::block::attach::{new_block, BLOCK_SLOT};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::MMIO_WINDOW;
use crate::devices::virtio::net::attach::{new_net, NET_SLOT};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::vsock::{Vsock, DEFAULT_CID};
use crate::devices::virtio::MmioSlot;
use crate::vcpu_thread::{install_kick_handler, run_vcpu, Control, ExitReason, Want};
use crate::vstate::memory::{Backing, GuestMem};
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::Vm;
use crate::Error;

/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u8 = 32;

/// What a VM boots.
#[derive(Clone, Debug)]
pub enum BootSource {
    /// Our test guest, embedded in the binary.
    TestGuest,
    /// A kernel image (ELF64 vmlinux or bzImage) with optional initrd and command line.
    Kernel { kernel: Vec<u8>, initrd: Option<Vec<u8>>, cmdline: String },
}

/// How to build a VM.
pub struct VmConfig {
    pub mem_size: u64,
    pub vcpus: u8,
    pub backing: Backing,
    pub hugepages: bool,
    pub boot: BootSource,
    /// Log dirty pages in KVM so diff snapshots cost only what changed.
    pub track_dirty: bool,
    /// Where the console is mirrored besides the in-memory line log (stdout, a socket...).
    pub console_mirror: Option<Box<dyn Write + Send>>,
    /// A virtio-blk disk (copy-on-write over a raw image), at virtio-mmio slot 1.
    pub disk: Option<crate::devices::virtio::block::DiskConfig>,
    /// A virtio-net device on a tap (slot 2): a named host tap, or a private namespace.
    pub net: Option<crate::devices::virtio::net::attach::NetConfig>,
}

impl std::fmt::Debug for VmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmConfig")
            .field("mem_size", &self.mem_size)
            .field("vcpus", &self.vcpus)
            .field("backing", &self.backing)
            .finish_non_exhaustive()
    }
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            mem_size: 256 << 20,
            vcpus: 1,
            backing: Backing::Anon,
            hugepages: true,
            boot: BootSource::TestGuest,
            track_dirty: true,
            console_mirror: None,
            disk: None,
            net: None,
        }
    }
}

/// A microVM whose vCPUs run on their own threads.
#[derive(Debug)]
pub struct MicroVm {
    ctl: Arc<Control>,
    threads: Vec<JoinHandle<()>>,
    serial: SerialPort,
    /// The virtio-vsock device (virtio-mmio slot 0).
    vsock: Arc<Vsock>,
    /// The virtio-blk device (slot 1), if the VM has a disk.
    block: Option<Arc<Block>>,
    /// The virtio-net device (slot 2), if the VM is networked.
    net: Option<Arc<Net>>,
    // Field order matters for drop: the VM (and its vCPU fds, owned by the threads) go before memory.
    vm: Vm,
    mem: Arc<GuestMem>,
    vcpus: u8,
    generation: u64,
    started: Instant,
    pub(crate) track_dirty: bool,
    pub(crate) msr_indices: Arc<Vec<u32>>,
    /// Raw fds of this VM's KVM objects, closed in a fork child (which builds its own VM).
    pub(crate) kvm_fds: Vec<i32>,
    /// The last snapshot directory and the blake3 of its state: the base of the next diff.
    pub(crate) last_snapshot: std::sync::Mutex<Option<(std::path::PathBuf, String)>>,
    /// Dirty pages taken from KVM by a snapshot that then failed: the next snapshot includes them.
    pub(crate) pending_dirty: std::sync::Mutex<Vec<u64>>,
    /// Guest memory is still being filled by a page server (a lazy wake): a fork child would
    /// not inherit it, so fork refuses until it is all in.
    pub(crate) lazy_memory: Arc<std::sync::atomic::AtomicBool>,
    /// Who fills it while `lazy_memory` is set (named in fork's refusal).
    pub(crate) lazy_source: std::sync::Mutex<crate::fork::LazySource>,
    /// The thread still bringing in (and checking) a verified copy-on-write restore's memory
    /// (see [`crate::verified_lazy`]); fork joins it first.
    pub(crate) background_fill: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The clone hook's gate (see [`crate::agent`]): clones start `NotRun`.
    agent: Arc<AgentGate>,
}

/// The parts a VM is assembled from, fresh or restored.
pub(crate) struct Parts {
    pub vm: Vm,
    pub mem: Arc<GuestMem>,
    pub serial: SerialPort,
    pub vsock: Arc<Vsock>,
    pub block: Option<Arc<Block>>,
    pub net: Option<Arc<Net>>,
    pub vcpus: Vec<Vcpu>,
    pub generation: u64,
    pub track_dirty: bool,
    pub started: Instant,
    pub start: Want,
}

fn fresh_seed() -> [u8; 32] {
    let mut seed = [0u8; 32];
    // SAFETY: getrandom writes at most seed.len() bytes into our buffer.
    let n = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
    if n != seed.len() as isize {
        // Fall back on a hash of time and pid; never leave clones with equal seeds.
        let t = Instant::now().elapsed().as_nanos() ^ u128::from(std::process::id());
        seed = *blake3::hash(&t.to_le_bytes()).as_bytes();
    }
    seed
}

/// Writes generation `gen` and a fresh seed into the guest's generation page.
pub fn write_generation(mem: &GuestMem, gen: u64) -> bool {
    let mut page = Vec::with_capacity(40);
    page.extend_from_slice(&0u64.to_le_bytes());
    page.extend_from_slice(&fresh_seed());
    // Seed first, then the counter: the guest reseeds when it sees the counter change.
    mem.write(layout::GEN_PAGE + 8, &page[8..]) && mem.write(layout::GEN_PAGE, &gen.to_le_bytes())
}

/// Where the vsock device sits (virtio-mmio slot 0).
pub const VSOCK_SLOT: MmioSlot =
    MmioSlot { base: crate::devices::virtio::MMIO_BASE, irq: crate::devices::virtio::IRQ_BASE };

/// A fresh vsock device for guest CID 3, its interrupt wired through an irqfd.
fn new_vsock(vm: &Vm, mem: &Arc<GuestMem>) -> Result<Vsock, Error> {
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::Io)?;
    vm.register_irqfd(&irq, VSOCK_SLOT.irq)?;
    Vsock::new(DEFAULT_CID, mem.clone(), irq).map_err(Error::Config)
}

/// The vsock device of a restored or cloned VM: from its saved state (the guest then gets a
/// transport reset), or a fresh one for a state that has none.
pub(crate) fn vsock_from_state(
    vm: &Vm,
    mem: &Arc<GuestMem>,
    st: Option<&crate::devices::virtio::vsock::VsockState>,
) -> Result<Vsock, Error> {
    let Some(st) = st else { return new_vsock(vm, mem) };
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::Io)?;
    vm.register_irqfd(&irq, VSOCK_SLOT.irq)?;
    Vsock::restore(st, mem.clone(), irq).map_err(|e| Error::State(format!("vsock: {e}")))
}

impl MicroVm {
    /// Creates and boots a VM.
    pub fn boot(cfg: VmConfig) -> Result<Self, Error> {
        if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
            return Err(Error::Config(format!("vCPU count must be 1..={MAX_VCPUS}, got {}", cfg.vcpus)));
        }
        let started = Instant::now();
        let mem = Arc::new(GuestMem::new(cfg.mem_size, cfg.backing, cfg.hugepages)?);
        let (kernel, initrd, cmdline): (&[u8], Option<&[u8]>, &str) = match &cfg.boot {
            BootSource::TestGuest => (crate::TEST_GUEST_ELF, None, ""),
            BootSource::Kernel { kernel, initrd, cmdline } => (kernel, initrd.as_deref(), cmdline),
        };
        let loaded = boot::load(&mem, kernel, initrd, cmdline)?;
        regs::write_boot_tables(&mem).map_err(|e| Error::Config(e.to_string()))?;
        let mut slots = vec![VSOCK_SLOT];
        slots.extend(cfg.disk.as_ref().map(|_| BLOCK_SLOT));
        slots.extend(cfg.net.as_ref().map(|_| NET_SLOT));
        crate::arch::acpi::write_tables(&mem, cfg.vcpus, &slots).map_err(|e| Error::Config(e.to_string()))?;
        if !write_generation(&mem, 1) {
            return Err(Error::Config("no room for the generation page".into()));
        }
        let vm = Vm::new()?;
        vm.set_memory(&mem, cfg.track_dirty)?;
        let console = Console::new(cfg.console_mirror);
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::Io)?;
        vm.register_irqfd(&irq, COM1_IRQ)?;
        let serial = SerialPort::new(irq, console);
        let vsock = Arc::new(new_vsock(&vm, &mem)?);
        let block = cfg.disk.as_ref().map(|d| new_block(&vm, &mem, d)).transpose()?.map(Arc::new);
        let net = cfg.net.as_ref().map(|n| new_net(&vm, &mem, n)).transpose()?.map(Arc::new);
        let mut vcpus = Vec::new();
        for id in 0..cfg.vcpus {
            let v = Vcpu::new(&vm, id)?;
            v.set_cpuid(&vm, cfg.vcpus)?;
            v.configure_boot(loaded.entry)?;
            vcpus.push(v);
        }
        let parts = Parts {
            vm,
            mem,
            serial,
            vsock,
            block,
            net,
            vcpus,
            generation: 1,
            track_dirty: cfg.track_dirty,
            started,
            start: Want::Run,
        };
        MicroVm::assemble(parts)
    }

    /// Starts vCPU threads over assembled parts.
    pub(crate) fn assemble(p: Parts) -> Result<Self, Error> {
        if p.start == Want::Pause {
            p.vsock.pause();
            if let Some(n) = &p.net {
                n.pause();
            }
        }
        let msr_indices = Arc::new(crate::vstate::vcpu::msr_indices(&p.vm)?);
        let mut kvm_fds = vec![p.vm.fd().as_raw_fd(), p.vm.kvm().as_raw_fd()];
        kvm_fds.extend(p.vcpus.iter().map(|v| v.fd.as_raw_fd()));
        let mut me = MicroVm {
            ctl: Control::new(p.vcpus.len(), p.start),
            threads: Vec::new(),
            serial: p.serial,
            vsock: p.vsock,
            block: p.block,
            net: p.net,
            vm: p.vm,
            mem: p.mem,
            vcpus: p.vcpus.len() as u8,
            generation: p.generation,
            started: p.started,
            track_dirty: p.track_dirty,
            msr_indices,
            kvm_fds,
            last_snapshot: std::sync::Mutex::new(None),
            pending_dirty: std::sync::Mutex::new(Vec::new()),
            lazy_memory: Arc::default(),
            lazy_source: std::sync::Mutex::default(),
            background_fill: std::sync::Mutex::new(None),
            agent: Arc::new(AgentGate::new(if p.generation > 1 { HookState::NotRun } else { HookState::NotAClone })),
        };
        let paused = p.start == Want::Pause;
        me.spawn(p.vcpus)?;
        if paused {
            // A VM built paused is paused when this returns: its state can be saved at once.
            me.ctl.wait_parked(Duration::from_secs(30)).map_err(Error::State)?;
        }
        Ok(me)
    }

    fn spawn(&mut self, vcpus: Vec<Vcpu>) -> Result<(), Error> {
        install_kick_handler().map_err(Error::Io)?;
        let mut mmio = MmioBus::default();
        mmio.add(VSOCK_SLOT.base, MMIO_WINDOW, self.vsock.clone());
        if let Some(b) = &self.block {
            mmio.add(BLOCK_SLOT.base, MMIO_WINDOW, b.clone());
        }
        if let Some(n) = &self.net {
            mmio.add(NET_SLOT.base, MMIO_WINDOW, n.clone());
        }
        for v in vcpus {
            let bus = PioBus { serial: self.serial.clone() };
            let mmio = mmio.clone();
            let ctl = self.ctl.clone();
            let name = format!("vcpu{}", v.id);
            let h =
                std::thread::Builder::new().name(name).spawn(move || run_vcpu(v, bus, mmio, ctl)).map_err(Error::Io)?;
            self.threads.push(h);
        }
        Ok(())
    }

    pub fn console(&self) -> &Arc<Console> {
        self.serial.console()
    }

    pub fn serial(&self) -> &SerialPort {
        &self.serial
    }

    /// The virtio-vsock device.
    pub fn vsock(&self) -> &Arc<Vsock> {
        &self.vsock
    }

    /// The virtio-net device, if the VM is networked.
    pub fn net(&self) -> Option<&Arc<Net>> {
        self.net.as_ref()
    }

    /// The virtio-blk device, if the VM has a disk.
    pub fn block(&self) -> Option<&Arc<Block>> {
        self.block.as_ref()
    }

    /// Serves the vsock device's host side on `path` (Firecracker's convention: host processes
    /// connect there and write `CONNECT <port>\n`; guest connections to host port P reach
    /// `<path>_P`).
    pub fn listen_vsock(&self, path: &std::path::Path) -> Result<(), Error> {
        self.vsock.listen(path).map_err(Error::Config)
    }

    pub fn memory(&self) -> &Arc<GuestMem> {
        &self.mem
    }

    pub fn vcpu_count(&self) -> u8 {
        self.vcpus
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The seed bytes of the generation page (fresh for every clone and restore), for a guest
    /// agent that reseeds the guest kernel's CRNG. `None` if guest memory cannot be read there.
    pub fn generation_seed(&self) -> Option<[u8; 32]> {
        let mut seed = [0u8; 32];
        self.mem.read(layout::GEN_PAGE + 8, &mut seed).then_some(seed)
    }

    /// The clone hook's gate: guest requests wait on it while the hook runs.
    pub fn agent_gate(&self) -> &Arc<AgentGate> {
        &self.agent
    }

    /// Starts the clone hook of a restored, forked or woken VM on its own thread: the agent at
    /// `addr` gets this VM's generation, its fresh seed and the host's clock before any other
    /// guest request (callers wait on [`MicroVm::agent_gate`]). A VM that is not a clone, or whose
    /// hook already ran, is left alone.
    pub fn start_clone_hook(&self, addr: AgentAddr, opts: CloneHookOptions) -> Result<(), Error> {
        if !self.begin_clone_hook(&addr) {
            return Ok(());
        }
        let gate = Arc::clone(&self.agent);
        let (generation, seed) = (self.generation, self.generation_seed());
        let spawned = std::thread::Builder::new().name("clone-hook".into()).spawn(move || {
            // A fork waits for the hook (bounded by its own timeouts); see crate::quiesce.
            let _participant = crate::quiesce::participant();
            let _busy = crate::quiesce::busy();
            run_begun(&gate, &addr, generation, seed, &opts)
        });
        spawned.map(drop).map_err(|e| {
            self.agent.set(HookState::Failed(format!("cannot start the clone hook thread: {e}")));
            Error::Io(e)
        })
    }

    /// [`MicroVm::start_clone_hook`] on the caller's thread; returns the outcome.
    pub fn run_clone_hook(&self, addr: &AgentAddr, opts: &CloneHookOptions) -> HookState {
        if self.begin_clone_hook(addr) {
            return run_begun(&self.agent, addr, self.generation, self.generation_seed(), opts);
        }
        self.agent.state()
    }

    /// Moves the gate to `Pending` if the hook is to run; settles it at once (false) when the
    /// guest never set up its vsock device.
    fn begin_clone_hook(&self, addr: &AgentAddr) -> bool {
        if !self.agent.begin() {
            return false;
        }
        if matches!(addr, AgentAddr::Vsock { .. }) && !self.vsock.state().transport.is_active() {
            // No driver ever set the device up (the test guest, or a kernel without virtio-vsock):
            // nothing can listen, and a connection would only wait for the setup timeout.
            self.agent.set(HookState::NoAgent("the guest has not set up its vsock device".into()));
            return false;
        }
        true
    }

    /// When the VM was created (for boot-time measurements).
    pub fn started(&self) -> Instant {
        self.started
    }

    pub fn control(&self) -> &Arc<Control> {
        &self.ctl
    }

    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Sends a line to the guest's serial input.
    pub fn send_line(&self, line: &str) -> Result<(), Error> {
        let mut bytes = line.as_bytes().to_vec();
        bytes.push(b'\n');
        let n = self.serial.send(&bytes, Duration::from_secs(10));
        if n != bytes.len() {
            return Err(Error::Guest(format!("the guest stopped reading its console after {n} bytes")));
        }
        Ok(())
    }

    /// Sends a command line and waits for the next line the guest prints.
    pub fn command(&self, line: &str, timeout: Duration) -> Result<String, Error> {
        let mut cursor = self.console().cursor();
        self.send_line(line)?;
        self.console()
            .wait_line(&mut cursor, timeout, |_| true)
            .ok_or_else(|| Error::Guest(format!("no answer to {line:?} within {timeout:?}")))
    }

    /// Waits for a console line containing `needle`, from the beginning of the log.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Result<String, Error> {
        let mut cursor = 0;
        self.console().wait_line(&mut cursor, timeout, |l| l.contains(needle)).ok_or_else(|| {
            match self.ctl.exit_reason() {
                Some(r) => Error::Guest(format!("VM exited ({r:?}) before printing {needle:?}")),
                None => Error::Guest(format!("{needle:?} not printed within {timeout:?}")),
            }
        })
    }

    /// Parks all vCPUs at an instruction boundary; returns the pause latency.
    pub fn pause(&self) -> Result<Duration, Error> {
        let d = self.pause_unflushed()?;
        if let Some(b) = &self.block {
            // Everything the guest wrote before the pause is durable while it is paused.
            b.flush().map_err(|e| Error::State(format!("cannot flush the disk: {e}")))?;
        }
        Ok(d)
    }

    /// [`MicroVm::pause`] without the disk flush (a fork: the children share the frozen layers
    /// through the page cache; a flush would make nothing more durable, since the layers are
    /// unnamed files until a snapshot links — and then syncs — them).
    pub(crate) fn pause_unflushed(&self) -> Result<Duration, Error> {
        let d = self.ctl.pause(Duration::from_secs(10)).map_err(Error::State)?;
        self.vsock.pause();
        if let Some(n) = &self.net {
            n.pause();
        }
        Ok(d)
    }

    /// Continues paused vCPUs exactly where they were; returns the resume latency.
    pub fn resume(&self) -> Result<Duration, Error> {
        self.vsock.resume();
        if let Some(n) = &self.net {
            n.resume();
        }
        self.ctl.resume().map_err(Error::State)
    }

    pub fn is_paused(&self) -> bool {
        self.ctl.is_paused()
    }

    /// Waits for the guest to exit (reset/halt) or the VM to be stopped.
    pub fn wait_exit(&self, timeout: Option<Duration>) -> Option<ExitReason> {
        self.ctl.wait_exit(timeout)
    }

    /// Stops the vCPUs and joins their threads.
    pub fn stop(&mut self) -> Option<ExitReason> {
        self.ctl.stop(ExitReason::Stopped);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.ctl.exit_reason()
    }
}

impl Drop for MicroVm {
    fn drop(&mut self) {
        self.stop();
    }
}
