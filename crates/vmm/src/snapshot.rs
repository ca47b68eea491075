//! Snapshots of a paused microVM and restores from them.
//!
//! A snapshot directory holds `state` (the enveloped [`VmState`]) and `memory` (a full or diff
//! image, see [`crate::persist::memory_file`]). Shared-file memory that was never frozen is
//! snapshotted by freezing it and linking the file into the directory: only state is written.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chunkstore::private;

use crate::devices::console::lock;
use crate::devices::serial_persist::SerialSnap;
use crate::microvm::MicroVm;
use crate::persist::state::{kvm_layout, DevicesState, MemoryImage, VmState};
use crate::persist::{image_hash, memory_file};
pub(crate) use crate::restore::parts_from_state;
pub use crate::restore::{read_state, RestoreMode, RestoreOptions};
use crate::vstate::memory::{Backing, PAGE_SIZE};
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm_persist::VmKvmState;
use crate::Error;

pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";

/// Full or diff (pages dirtied since the previous snapshot of this VM).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotKind {
    Full,
    Diff,
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

pub(crate) fn sio(what: &str, path: &Path) -> impl Fn(std::io::Error) -> Error {
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
            kvm_layout: kvm_layout(),
            mem_size: self.memory().size(),
            backing: self.memory().backing(),
            generation: self.generation(),
            vcpus,
            vm: VmKvmState::save(self.vm())?,
            serial: SerialSnap::from(&self.serial().state()),
            devices: DevicesState {
                vsock: Some(self.vsock().save(self.memory())),
                block: self.block().map(|b| b.save()),
                net: self.net().map(|n| n.save(self.memory())),
            },
            memory: None,
        })
    }

    /// Writes a snapshot of the paused VM into `dir` (created if needed; a previous snapshot
    /// there is replaced atomically: the new one is written into a private temporary directory
    /// beside it and renamed into place, so a crash leaves the old snapshot or the new one).
    /// Dirty pages a failed snapshot did not persist stay pending for the next one.
    pub fn snapshot(&self, dir: &Path, kind: SnapshotKind) -> Result<SnapshotReport, Error> {
        let t0 = Instant::now();
        let mut state = self.save_state()?;
        let target = resolve_target(dir)?;
        let base = match kind {
            SnapshotKind::Diff => Some(self.diff_base(&target)?),
            SnapshotKind::Full => None,
        };
        let mem = self.memory();
        // Every snapshot restarts dirty tracking, so the next diff holds exactly what changed;
        // the bits are kept pending until this snapshot is safely in place.
        let mut pending = lock(&self.pending_dirty);
        let mut dirty = std::mem::take(&mut *pending);
        dirty.resize(mem.size().div_ceil(PAGE_SIZE).div_ceil(64) as usize, 0);
        let kvm_dirty =
            if self.track_dirty { self.vm().dirty_bitmap(mem).map_err(Error::from) } else { Ok(Vec::new()) };
        private::remove_stale_temps(&target);
        let tmp = private::temp_beside(&target);
        let written = kvm_dirty.and_then(|kvm| {
            for (d, h) in dirty.iter_mut().zip(kvm) {
                *d |= h;
            }
            for (d, h) in dirty.iter_mut().zip(mem.take_host_dirty()) {
                *d |= h;
            }
            private::create_dir(&tmp).map_err(sio("cannot create snapshot directory", &tmp))?;
            self.persist_disk(&tmp, &mut state)?;
            let (pages, linked, image) = self.write_into(&tmp, kind, base, &dirty)?;
            state.memory = Some(image);
            let bytes = state.to_bytes().map_err(|e| Error::State(e.to_string()))?;
            write_new(&tmp.join(STATE_FILE), &bytes)?;
            private::sync_dir(&tmp).map_err(sio("cannot sync", &tmp))?;
            private::replace_dir(&tmp, &target).map_err(sio("cannot move the snapshot into", &target))?;
            Ok((pages, linked, bytes))
        });
        let (pages_written, linked, bytes) = match written {
            Ok(w) => w,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                *pending = dirty;
                return Err(e);
            }
        };
        drop(pending);
        *lock(&self.last_snapshot) = Some((target.clone(), blake3::hash(&bytes).to_hex().to_string()));
        Ok(SnapshotReport {
            kind,
            state_bytes: bytes.len() as u64,
            pages_written,
            memory_disk_bytes: disk_bytes(&target.join(MEMORY_FILE)),
            linked,
            duration: t0.elapsed(),
        })
    }

    /// The base of a diff into `target`: the last snapshot, unchanged since, and not `target`
    /// or any snapshot it builds on (writing there would destroy the base).
    fn diff_base(&self, target: &Path) -> Result<(PathBuf, String), Error> {
        let (base, hash) = lock(&self.last_snapshot)
            .clone()
            .ok_or_else(|| Error::State("a diff snapshot needs an earlier snapshot of this VM as its base".into()))?;
        if !self.track_dirty {
            return Err(Error::State("dirty page tracking is off for this VM: take a full snapshot".into()));
        }
        let (state, now) = crate::restore::read_state_hashed(&base)
            .map_err(|e| Error::State(format!("the base snapshot is unusable ({e}): take a full snapshot")))?;
        if now != hash {
            return Err(Error::State(format!(
                "the base snapshot {} was replaced since it was taken: take a full snapshot",
                base.display()
            )));
        }
        for d in crate::restore::chain_dirs(&base, &state)? {
            if d == target {
                return Err(Error::State(format!(
                    "{} holds this diff's base snapshot: a diff written there would destroy its own base; \
                     write it into another directory",
                    target.display()
                )));
            }
        }
        Ok((base, hash))
    }

    /// Writes the memory image into the new snapshot directory `tmp`.
    fn write_into(
        &self,
        tmp: &Path,
        kind: SnapshotKind,
        base: Option<(PathBuf, String)>,
        dirty: &[u64],
    ) -> Result<(u64, bool, MemoryImage), Error> {
        let mem = self.memory();
        let mem_path = tmp.join(MEMORY_FILE);
        let mf = |e: memory_file::MemoryFileError| Error::State(e.to_string());
        let full = |n: u64, linked: bool| -> Result<(u64, bool, MemoryImage), Error> {
            let hashes = image_hash::full_blocks_of_memory(mem);
            // The block hashes let a copy-on-write restore check blocks as the guest touches them.
            write_new(&tmp.join(crate::verified_lazy::BLOCKS_FILE), &hashes.concat())?;
            let image = MemoryImage::Full { file: MEMORY_FILE.into(), blake3: image_hash::root_of(&hashes) };
            Ok((n, linked, image))
        };
        Ok(match (kind, base) {
            (SnapshotKind::Diff, Some((base, base_state))) => {
                let n = memory_file::write_diff(mem, &mem_path, dirty).map_err(mf)?;
                let blake3 = image_hash::of_memory_diff(mem, dirty);
                let base = base.display().to_string();
                (n, false, MemoryImage::Diff { file: MEMORY_FILE.into(), base, base_state, pages: n, blake3 })
            }
            (SnapshotKind::Diff, None) => return Err(Error::State("a diff snapshot needs a base".into())),
            (SnapshotKind::Full, _) if mem.backing() == Backing::SharedFile && !mem.is_frozen() => {
                // The memory already is a file: freeze it and link it in (copy if on another fs).
                mem.freeze()?;
                let file = mem.file().ok_or_else(|| Error::State("shared memory has no file".into()))?;
                match link_fd(file, &mem_path) {
                    Ok(()) => full(0, true)?,
                    Err(e) => {
                        tracing::info!("cannot link guest memory into {} ({e}); writing it", tmp.display());
                        full(memory_file::write_full(mem, &mem_path).map_err(mf)?, false)?
                    }
                }
            }
            (SnapshotKind::Full, _) => full(memory_file::write_full(mem, &mem_path).map_err(mf)?, false)?,
        })
    }
}

/// The snapshot directory `dir` as an absolute path with a resolved parent (created 0700 if
/// missing). A symlink there, a file, or a non-empty directory that is not a snapshot is refused.
fn resolve_target(dir: &Path) -> Result<PathBuf, Error> {
    let name = dir
        .file_name()
        .filter(|n| *n != "." && *n != "..")
        .ok_or_else(|| Error::State(format!("{} is not a usable snapshot directory name", dir.display())))?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.exists() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(private::DIR_MODE)
            .create(&parent)
            .map_err(sio("cannot create", &parent))?;
    }
    let target = parent.canonicalize().map_err(sio("cannot resolve", &parent))?.join(name);
    match std::fs::symlink_metadata(&target) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(target),
        Err(e) => Err(sio("cannot inspect", &target)(e)),
        Ok(m) if m.file_type().is_symlink() => {
            Err(Error::State(format!("{} is a symlink: snapshots are not written through symlinks", target.display())))
        }
        Ok(m) if !m.is_dir() => Err(Error::State(format!("{} exists and is not a directory", target.display()))),
        Ok(_) => {
            let empty = std::fs::read_dir(&target).map_err(sio("cannot read", &target))?.next().is_none();
            if empty || target.join(STATE_FILE).exists() {
                Ok(target)
            } else {
                Err(Error::State(format!(
                    "{} is not empty and holds no snapshot: it would be replaced; choose another directory",
                    target.display()
                )))
            }
        }
    }
}

/// Creates the new (0600, never through a symlink) file `path` holding `bytes`, fsynced.
fn write_new(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    let mut f = private::create_file(path).map_err(sio("cannot create", path))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(sio("cannot write", path))
}

/// Writes `bytes` to `path` atomically (private temporary file, fsync, rename, fsync of the
/// directory).
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    private::write_atomic(path, bytes).map_err(sio("cannot write", path))
}
