//! Restoring a snapshot directory into a new VM: the state, the chain of memory images from the
//! full base to the newest diff (each diff tied to its base by the base's state hash), every
//! image checked against the hash its state records (unless the caller explicitly skips it).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use vmm_sys_util::eventfd::EventFd;

use crate::devices::console::{lock, Console};
use crate::devices::serial::{SerialPort, COM1_IRQ};
use crate::microvm::{write_generation, MicroVm, Parts};
use crate::persist::envelope::EnvelopeError;
use crate::persist::state::{MemoryImage, VmState, STATE_KIND};
use crate::persist::{image_hash, memory_file};
use crate::snapshot::{sio, STATE_FILE};
use crate::vcpu_thread::Want;
use crate::vstate::memory::{Backing, GuestMem};
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::Vm;
use crate::Error;

/// Longest chain of diff snapshots a restore follows.
const MAX_CHAIN: usize = 64;

/// Eager (copy the memory image in) or copy-on-write (map the frozen image privately).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestoreMode {
    Eager,
    Cow,
}

/// Options of [`MicroVm::restore`].
#[derive(Default)]
pub struct RestoreOptions {
    pub expect_mem: Option<u64>,
    pub paused: bool,
    pub track_dirty: bool,
    /// Fast path: do not check the memory images against the hashes in `state`. Only for images
    /// this host wrote and kept private; a corrupt or mismatched image then restores silently.
    pub skip_verify: bool,
    pub console_mirror: Option<Box<dyn std::io::Write + Send>>,
}

impl std::fmt::Debug for RestoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreOptions")
            .field("expect_mem", &self.expect_mem)
            .field("paused", &self.paused)
            .field("skip_verify", &self.skip_verify)
            .finish()
    }
}

impl MicroVm {
    /// Restores the snapshot in `dir` into a new VM. `expect_mem`, if given, must match the
    /// snapshot's memory size. The VM starts running unless `paused`.
    pub fn restore(dir: &Path, mode: RestoreMode, opts: RestoreOptions) -> Result<Self, Error> {
        let started = Instant::now();
        let (state, state_hash) = read_state_hashed(dir)?;
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
        let (mem, lazy) = load_memory(&chain, state.mem_size, mode, !opts.skip_verify)?;
        let mut p = parts_from_state(&state, mem, opts.console_mirror, opts.track_dirty)?;
        p.block =
            crate::devices::virtio::block::attach::block_from_saved(&p.vm, &p.mem, state.devices.block.as_ref(), dir)?;
        p.net = crate::devices::virtio::net::attach::net_for_clone(
            &p.vm,
            &p.mem,
            state.devices.net.as_ref(),
            p.generation,
        )?;
        p.started = started;
        p.start = if opts.paused || lazy.is_some() { Want::Pause } else { Want::Run };
        let vm = MicroVm::assemble(p)?;
        if let Some(lazy) = lazy {
            lazy.run_in_background(&vm)?;
            if !opts.paused {
                vm.resume()?;
            }
        }
        *lock(&vm.last_snapshot) = Some((dir.canonicalize().map_err(sio("cannot resolve", dir))?, state_hash));
        Ok(vm)
    }
}

/// Reads and checks the state file of a snapshot directory.
pub fn read_state(dir: &Path) -> Result<VmState, Error> {
    read_state_hashed(dir).map(|(s, _)| s)
}

/// Reads and checks the state file of a snapshot directory; also returns its blake3 (hex), the
/// snapshot's identity.
pub fn read_state_hashed(dir: &Path) -> Result<(VmState, String), Error> {
    let path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).map_err(sio("cannot read snapshot state", &path))?;
    let state = VmState::from_bytes(&bytes).map_err(|e| match e {
        EnvelopeError::Version { found, .. } => Error::State(format!(
            "snapshot format {found} is not supported (this forkvm reads snapshot format {}): {}",
            STATE_KIND.version,
            path.display()
        )),
        e => Error::State(format!("snapshot state {}: {e}", path.display())),
    })?;
    Ok((state, blake3::hash(&bytes).to_hex().to_string()))
}

/// One memory image of a restore chain and the hash its state records.
pub(crate) struct ChainImage {
    pub(crate) path: PathBuf,
    pub(crate) blake3: String,
    pub(crate) diff: bool,
}

/// The directories a snapshot builds on: its own, then each base down to the full one.
pub(crate) fn chain_dirs(dir: &Path, state: &VmState) -> Result<Vec<PathBuf>, Error> {
    Ok(memory_chain(dir, state)?.into_iter().rev().filter_map(|c| c.path.parent().map(Path::to_path_buf)).collect())
}

/// Memory images from the full base to the newest diff, each base checked to be the very
/// snapshot its diff was taken on.
pub(crate) fn memory_chain(dir: &Path, state: &VmState) -> Result<Vec<ChainImage>, Error> {
    let mut chain = Vec::new();
    let mut dir = dir.to_path_buf();
    let mut image = state.memory.clone();
    loop {
        if chain.len() >= MAX_CHAIN {
            return Err(Error::State(format!("diff snapshot chain longer than {MAX_CHAIN}")));
        }
        match image {
            None => return Err(Error::State(format!("snapshot {} has no memory image", dir.display()))),
            Some(MemoryImage::Full { file, blake3 }) => {
                chain.push(ChainImage { path: dir.join(checked_name(&file)?), blake3, diff: false });
                chain.reverse();
                return Ok(chain);
            }
            Some(MemoryImage::Diff { file, base, base_state, blake3, .. }) => {
                chain.push(ChainImage { path: dir.join(checked_name(&file)?), blake3, diff: true });
                let diff_dir = std::mem::replace(&mut dir, PathBuf::from(base));
                let (base_st, hash) = read_state_hashed(&dir)?;
                if hash != base_state {
                    return Err(Error::State(format!(
                        "the base snapshot {} of diff {} was replaced or changed after the diff was taken",
                        dir.display(),
                        diff_dir.display()
                    )));
                }
                if base_st.mem_size != state.mem_size {
                    return Err(Error::State(format!("base snapshot {} has another memory size", dir.display())));
                }
                image = base_st.memory;
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

/// Images this process verified, by file identity (device, inode, size, mtime, ctime) and hash:
/// restoring the same unchanged template again does not hash it again. Any write to the file
/// changes its mtime/ctime, so a changed file is verified anew.
static VERIFIED: std::sync::Mutex<Vec<([i64; 7], String)>> = std::sync::Mutex::new(Vec::new());
const VERIFIED_MAX: usize = 64;

fn file_id(f: &std::fs::File) -> Option<[i64; 7]> {
    use std::os::unix::fs::MetadataExt;
    let m = f.metadata().ok()?;
    Some([m.dev() as i64, m.ino() as i64, m.size() as i64, m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()])
}

/// Forgets which images this process checked: the next restore of each hashes it again (as a
/// fresh process would). For benchmarks.
pub fn forget_checked_images() {
    lock(&VERIFIED).clear();
}

fn is_known(id: Option<[i64; 7]>, blake3: &str) -> bool {
    id.is_some_and(|id| lock(&VERIFIED).iter().any(|(i, h)| *i == id && h == blake3))
}

/// Remembers that the file opened as `f` (identity `id` when the check began) matched `blake3`,
/// if it is unchanged since.
fn remember(f: &std::fs::File, id: Option<[i64; 7]>, blake3: &str) {
    if let Some(id) = id.filter(|id| file_id(f).as_ref() == Some(id)) {
        let mut v = lock(&VERIFIED);
        if v.len() >= VERIFIED_MAX {
            v.remove(0);
        }
        v.push((id, blake3.to_string()));
    }
}

fn verify(f: &std::fs::File, img: &ChainImage, size: u64) -> Result<(), Error> {
    let id = file_id(f);
    if is_known(id, &img.blake3) {
        return Ok(());
    }
    verify_now(f, img, size)?;
    remember(f, id, &img.blake3);
    Ok(())
}

fn mismatch(img: &ChainImage, got: &str) -> Error {
    Error::State(format!(
        "memory image {} does not match its snapshot state (blake3 {got}, the state records {}): the image is \
         corrupt or belongs to another snapshot",
        img.path.display(),
        img.blake3
    ))
}

fn verify_now(f: &std::fs::File, img: &ChainImage, size: u64) -> Result<(), Error> {
    let got = image_hash::of_file(f, &img.path, size, img.diff).map_err(|e| Error::State(e.to_string()))?;
    if got != img.blake3 {
        return Err(mismatch(img, &got));
    }
    Ok(())
}

/// Guest memory for a restore, and the page server still filling it when a copy-on-write
/// restore checks its image block by block (see [`crate::verified_lazy`]).
type Loaded = (Arc<GuestMem>, Option<crate::verified_lazy::Lazy>);

/// Memory for a restore of `chain`. Every image is checked against its hash when `check`:
/// - eager: the full image is copied in and hashed from guest memory block by block
///   ([`crate::persist::load_full`]), one pass over the data;
/// - copy-on-write from a full image with block hashes beside it: served lazily, each block
///   checked as it is first touched, the rest in the background;
/// - otherwise (diff chains, older snapshots): the whole image is hashed before it is mapped.
///
/// An image this process already checked (unchanged since) is not hashed again.
fn load_memory(chain: &[ChainImage], size: u64, mode: RestoreMode, check: bool) -> Result<Loaded, Error> {
    let st = |e: memory_file::MemoryFileError| Error::State(e.to_string());
    let (first, rest) = chain.split_first().ok_or_else(|| Error::State("empty memory chain".into()))?;
    let base = memory_file::open(&first.path, size).map_err(st)?;
    let id = file_id(&base);
    let check_base = check && !is_known(id, &first.blake3);
    let mem = match mode {
        RestoreMode::Cow if check_base && rest.is_empty() && !first.diff => {
            let dir = first.path.parent().unwrap_or(Path::new("."));
            match crate::verified_lazy::read_block_hashes(dir, size, &first.blake3) {
                Some(hashes) => {
                    // Not remembered as checked afterwards: blocks recorded as zeros are served
                    // as zeros without reading the file, so the file itself was not checked.
                    let (mem, lazy) = crate::verified_lazy::start(base, &first.path, size, hashes)?;
                    return Ok((mem, Some(lazy)));
                }
                None => {
                    verify(&base, first, size)?;
                    GuestMem::from_file_cow(base, size, true)?
                }
            }
        }
        RestoreMode::Cow => {
            if check_base {
                verify(&base, first, size)?;
            }
            GuestMem::from_file_cow(base, size, true)?
        }
        RestoreMode::Eager => {
            let m = GuestMem::new(size, Backing::Anon, true)?;
            if first.diff {
                return Err(Error::State("the base of a restore chain is a diff image".into()));
            }
            let (hashes, _) = crate::persist::load_full::load(&m, &base, &first.path, check_base).map_err(st)?;
            if check_base {
                let got = image_hash::root_of(&hashes);
                if got != first.blake3 {
                    return Err(mismatch(first, &got));
                }
                remember(&base, id, &first.blake3);
            }
            m
        }
    };
    for diff in rest {
        let f = memory_file::open(&diff.path, size).map_err(st)?;
        if check {
            verify(&f, diff, size)?;
        }
        memory_file::apply(&mem, &f, &diff.path).map_err(st)?;
    }
    // What the restore itself wrote is not guest dirt.
    mem.take_host_dirty();
    Ok((Arc::new(mem), None))
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
    let mut vcpus = Vec::new();
    let count = state.vcpus.len() as u8;
    for s in &state.vcpus {
        let v = Vcpu::new(&vm, s.id)?;
        v.restore_cpu_model(&vm, s, count)?;
        v.restore(s)?;
        vcpus.push(v);
    }
    let generation = state.generation + 1;
    if !write_generation(&mem, generation) {
        return Err(Error::State("no room for the generation page".into()));
    }
    Ok(Parts {
        vm,
        mem,
        serial,
        vsock,
        block: None,
        net: None,
        vcpus,
        generation,
        track_dirty,
        started: Instant::now(),
        start: Want::Run,
    })
}
