//! Snapshots of a paused microVM and restores from them.
//!
//! A snapshot directory holds `state` (the enveloped [`VmState`]) and `memory` (a full or diff
//! image, see [`crate::persist::memory_file`]). Shared-file memory that was never frozen is
//! snapshotted by freezing it and linking the file into the directory: only state is written.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::devices::console::{lock, Console};
use crate::devices::serial::{SerialPort, COM1_IRQ};
use crate::devices::serial_persist::SerialSnap;
use crate::microvm::{write_generation, MicroVm, Parts};
use crate::persist::memory_file;
use crate::persist::state::{DevicesState, MemoryImage, VmState};
use crate::vcpu_thread::Want;
use crate::vstate::memory::{Backing, GuestMem};
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::Vm;
use crate::vstate::vm_persist::VmKvmState;
use crate::Error;

pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";
/// Longest chain of diff snapshots a restore follows.
const MAX_CHAIN: usize = 64;

/// Full or diff (pages dirtied since the previous snapshot of this VM).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotKind {
    Full,
    Diff,
}

/// Eager (copy the memory image in) or copy-on-write (map the frozen image privately).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestoreMode {
    Eager,
    Cow,
}

/// What a snapshot cost.
#[derive(Debug, Clone)]
pub struct SnapshotReport {
    pub kind: SnapshotKind,
    pub state_bytes: u64,
    /// Pages written to the memory image (0 when a shared memory file was linked).
    pub pages_written: u64,
    /// Bytes the memory image occupies on disk.
    pub memory_disk_bytes: u64,
    /// The memory file was linked in, not written.
    pub linked: bool,
    pub duration: Duration,
}

fn sio(what: &str, path: &Path) -> impl Fn(std::io::Error) -> Error {
    let msg = format!("{what} {}", path.display());
    move |e| Error::State(format!("{msg}: {e}"))
}

fn disk_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}

/// Links an open (unnamed or named) file at `dst` through /proc/self/fd.
fn link_fd(file: &std::fs::File, dst: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let src = std::ffi::CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    let dst = std::ffi::CString::new(dst.as_os_str().as_bytes())?;
    // SAFETY: both paths are valid NUL-terminated strings; linkat only reads them.
    let rc =
        unsafe { libc::linkat(libc::AT_FDCWD, src.as_ptr(), libc::AT_FDCWD, dst.as_ptr(), libc::AT_SYMLINK_FOLLOW) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl MicroVm {
    /// Captures vCPU, VM and device state. The VM must be paused.
    pub fn save_state(&self) -> Result<VmState, Error> {
        if !self.is_paused() {
            return Err(Error::State("the VM must be paused to save its state".into()));
        }
        let mut vcpus = Vec::new();
        for id in 0..usize::from(self.vcpu_count()) {
            let idx = self.msr_indices.clone();
            let st = self.control().run_on(id, move |v: &mut Vcpu| v.save(&idx)).map_err(Error::State)??;
            vcpus.push(st);
        }
        Ok(VmState {
            mem_size: self.memory().size(),
            backing: self.memory().backing(),
            generation: self.generation(),
            vcpus,
            vm: VmKvmState::save(self.vm())?,
            serial: SerialSnap::from(&self.serial().state()),
            devices: DevicesState { vsock: Some(self.vsock().save(self.memory())) },
            memory: None,
        })
    }

    /// Writes a snapshot of the paused VM into `dir` (created if needed).
    pub fn snapshot(&self, dir: &Path, kind: SnapshotKind) -> Result<SnapshotReport, Error> {
        let t0 = Instant::now();
        let mut state = self.save_state()?;
        std::fs::create_dir_all(dir).map_err(sio("cannot create snapshot directory", dir))?;
        let dir = dir.canonicalize().map_err(sio("cannot resolve", dir))?;
        let mem_path = dir.join(MEMORY_FILE);
        let _ = std::fs::remove_file(&mem_path);
        let mem = self.memory();
        // Every snapshot restarts dirty tracking, so the next diff holds exactly what changed.
        let mut dirty = if self.track_dirty { self.vm().dirty_bitmap(mem)? } else { Vec::new() };
        for (d, h) in dirty.iter_mut().zip(mem.take_host_dirty()) {
            *d |= h;
        }
        let (pages_written, linked, image) = match kind {
            SnapshotKind::Diff => {
                let base = lock(&self.last_snapshot).clone().ok_or_else(|| {
                    Error::State("a diff snapshot needs an earlier snapshot of this VM as its base".into())
                })?;
                if !self.track_dirty {
                    return Err(Error::State("dirty page tracking is off for this VM: take a full snapshot".into()));
                }
                let n = memory_file::write_diff(mem, &mem_path, &dirty).map_err(|e| Error::State(e.to_string()))?;
                let image = MemoryImage::Diff { file: MEMORY_FILE.into(), base: base.display().to_string(), pages: n };
                (n, false, image)
            }
            SnapshotKind::Full if mem.backing() == Backing::SharedFile && !mem.is_frozen() => {
                // The memory already is a file: freeze it and link it in (copy if on another fs).
                mem.freeze()?;
                let file = mem.file().ok_or_else(|| Error::State("shared memory has no file".into()))?;
                match link_fd(file, &mem_path) {
                    Ok(()) => (0, true, MemoryImage::Full { file: MEMORY_FILE.into() }),
                    Err(e) => {
                        tracing::info!("cannot link guest memory into {} ({e}); writing it", dir.display());
                        let n = memory_file::write_full(mem, &mem_path).map_err(|e| Error::State(e.to_string()))?;
                        (n, false, MemoryImage::Full { file: MEMORY_FILE.into() })
                    }
                }
            }
            SnapshotKind::Full => {
                let n = memory_file::write_full(mem, &mem_path).map_err(|e| Error::State(e.to_string()))?;
                (n, false, MemoryImage::Full { file: MEMORY_FILE.into() })
            }
        };
        state.memory = Some(image);
        let bytes = state.to_bytes().map_err(|e| Error::State(e.to_string()))?;
        let state_path = dir.join(STATE_FILE);
        write_synced(&state_path, &bytes)?;
        *lock(&self.last_snapshot) = Some(dir.clone());
        Ok(SnapshotReport {
            kind,
            state_bytes: bytes.len() as u64,
            pages_written,
            memory_disk_bytes: disk_bytes(&mem_path),
            linked,
            duration: t0.elapsed(),
        })
    }

    /// Restores the snapshot in `dir` into a new VM. `expect_mem`, if given, must match the
    /// snapshot's memory size. The VM starts running unless `paused`.
    pub fn restore(dir: &Path, mode: RestoreMode, opts: RestoreOptions) -> Result<Self, Error> {
        let started = Instant::now();
        let state = read_state(dir)?;
        if let Some(m) = opts.expect_mem {
            if m != state.mem_size {
                return Err(Error::State(format!(
                    "snapshot {} is of a {} MiB guest, not {} MiB",
                    dir.display(),
                    state.mem_size >> 20,
                    m >> 20
                )));
            }
        }
        let chain = memory_chain(dir, &state)?;
        let mem = load_memory(&chain, state.mem_size, mode)?;
        let mut p = parts_from_state(&state, Arc::new(mem), opts.console_mirror, opts.track_dirty)?;
        p.started = started;
        p.start = if opts.paused { Want::Pause } else { Want::Run };
        let vm = MicroVm::assemble(p)?;
        *lock(&vm.last_snapshot) = Some(dir.canonicalize().map_err(sio("cannot resolve", dir))?);
        Ok(vm)
    }
}

/// Options of [`MicroVm::restore`].
#[derive(Default)]
pub struct RestoreOptions {
    pub expect_mem: Option<u64>,
    pub paused: bool,
    pub track_dirty: bool,
    pub console_mirror: Option<Box<dyn std::io::Write + Send>>,
}

impl std::fmt::Debug for RestoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreOptions").field("expect_mem", &self.expect_mem).field("paused", &self.paused).finish()
    }
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename).
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(sio("cannot write", &tmp))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(sio("cannot write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(sio("cannot write", path))
}

/// Reads and checks the state file of a snapshot directory.
pub fn read_state(dir: &Path) -> Result<VmState, Error> {
    let path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).map_err(sio("cannot read snapshot state", &path))?;
    VmState::from_bytes(&bytes).map_err(|e| Error::State(format!("snapshot state {}: {e}", path.display())))
}

/// Memory image files from the full base to the newest diff.
fn memory_chain(dir: &Path, state: &VmState) -> Result<Vec<PathBuf>, Error> {
    let mut chain = Vec::new();
    let mut dir = dir.to_path_buf();
    let mut image = state.memory.clone();
    loop {
        if chain.len() >= MAX_CHAIN {
            return Err(Error::State(format!("diff snapshot chain longer than {MAX_CHAIN}")));
        }
        match image {
            None => return Err(Error::State(format!("snapshot {} has no memory image", dir.display()))),
            Some(MemoryImage::Full { file }) => {
                chain.push(dir.join(checked_name(&file)?));
                chain.reverse();
                return Ok(chain);
            }
            Some(MemoryImage::Diff { file, base, .. }) => {
                chain.push(dir.join(checked_name(&file)?));
                dir = PathBuf::from(base);
                let base_state = read_state(&dir)?;
                if base_state.mem_size != state.mem_size {
                    return Err(Error::State(format!("base snapshot {} has another memory size", dir.display())));
                }
                image = base_state.memory;
            }
        }
    }
}

/// Memory file names come from an untrusted file: plain names only.
fn checked_name(name: &str) -> Result<&str, Error> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(Error::State(format!("invalid memory file name {name:?} in snapshot state")));
    }
    Ok(name)
}

fn load_memory(chain: &[PathBuf], size: u64, mode: RestoreMode) -> Result<GuestMem, Error> {
    let st = |e: memory_file::MemoryFileError| Error::State(e.to_string());
    let (first, rest) = chain.split_first().ok_or_else(|| Error::State("empty memory chain".into()))?;
    let base = memory_file::open(first, size).map_err(st)?;
    let mem = match mode {
        RestoreMode::Cow => GuestMem::from_file_cow(base, size, true)?,
        RestoreMode::Eager => {
            let m = GuestMem::new(size, Backing::Anon, true)?;
            memory_file::apply(&m, &base, first).map_err(st)?;
            m
        }
    };
    for diff in rest {
        let f = memory_file::open(diff, size).map_err(st)?;
        memory_file::apply(&mem, &f, diff).map_err(st)?;
    }
    // What the restore itself wrote is not guest dirt.
    mem.take_host_dirty();
    Ok(mem)
}

/// Builds a new KVM VM over `mem` from saved state, with the generation bumped and a fresh seed.
pub(crate) fn parts_from_state(
    state: &VmState,
    mem: Arc<GuestMem>,
    mirror: Option<Box<dyn std::io::Write + Send>>,
    track_dirty: bool,
) -> Result<Parts, Error> {
    if mem.size() != state.mem_size {
        return Err(Error::State(format!(
            "memory is {} bytes, the state is of a {} byte guest",
            mem.size(),
            state.mem_size
        )));
    }
    let vm = Vm::new()?;
    vm.set_memory(&mem, track_dirty)?;
    state.vm.restore(&vm)?;
    let console = Console::new(mirror);
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::Io)?;
    vm.register_irqfd(&irq, COM1_IRQ)?;
    let serial = SerialPort::from_state(&(&state.serial).into(), irq, console).map_err(Error::State)?;
    let vsock = Arc::new(crate::microvm::vsock_from_state(&vm, &mem, state.devices.vsock.as_ref())?);
    let count = state.vcpus.len() as u8;
    let mut vcpus = Vec::new();
    for s in &state.vcpus {
        let v = Vcpu::new(&vm, s.id)?;
        v.set_cpuid(&vm, count)?;
        v.restore(s)?;
        vcpus.push(v);
    }
    let generation = state.generation + 1;
    if !write_generation(&mem, generation) {
        return Err(Error::State("no room for the generation page".into()));
    }
    Ok(Parts { vm, mem, serial, vsock, vcpus, generation, track_dirty, started: Instant::now(), start: Want::Run })
}
