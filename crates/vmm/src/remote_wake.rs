//! Clones across hosts: a VM hibernated on host A is woken on host B, its memory served lazily
//! over TCP by `forkvm pagesrv --tcp` on host A (see [`pagesrv::net_wire`]).
//!
//! Host A serves a hibernated directory ([`Hibernated::open`]): the chunk-store image as the page
//! source, the vCPU/device state file as the state blob (both checked against the hibernation
//! record first), and the recorded working set, which the server streams to every client first.
//! Host B ([`MicroVm::wake_remote`]) fetches the state over the authenticated connection, builds
//! the VM over anonymous memory registered with a local page server whose source is the
//! [`NetSource`], places pushed pages as they arrive and resumes at once.
//!
//! Failure: every page is checked (its MAC) before it is placed. When the connection breaks (a cut
//! link: no answer within the request timeout; a killed server; a corrupt or forged frame) the VM
//! is stopped with [`ExitReason::Error`] naming the cause, then the faulting page is poisoned, as a
//! local wake does for a corrupt chunk; a VM whose memory was not all in yet is also stopped
//! when the break happens while it is not faulting. Host A is not affected.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Instant;

use chunkstore::Store;
use pagesrv::net_auth::Secret;
use pagesrv::net_client::{spawn_push_placer, WeakMonitor};
use pagesrv::{ChunkSource, NetClientConfig, NetSource, PageSource, WorkingSet};

use crate::hibernate::{hio, ms, read_record, store_err, WSET_FILE};
use crate::lazy_restore::{wake_lazily, LazyMemory, OnServer, WakeHandle, WakeOptions, WakeReport};
use crate::microvm::MicroVm;
use crate::snapshot::STATE_FILE;
use crate::vcpu_thread::{Control, ExitReason};
use crate::Error;

/// A hibernated VM opened for serving to other hosts.
#[derive(Debug)]
pub struct Hibernated {
    /// Its memory (the chunk-store image).
    pub source: Arc<dyn PageSource>,
    /// Its state file, checked against the record.
    pub state: Vec<u8>,
    /// Its recorded working set, if any.
    pub wset: Option<WorkingSet>,
    /// Where its working set is (or would be) saved.
    pub wset_path: PathBuf,
    pub image: String,
    pub mem_size: u64,
}

impl Hibernated {
    /// Opens the hibernation in `dir` whose memory is in the store at `store`.
    pub fn open(dir: &Path, store: &Path) -> Result<Self, Error> {
        let record = read_record(dir)?;
        let state_path = dir.join(STATE_FILE);
        let state = std::fs::read(&state_path).map_err(hio("cannot read hibernated state", &state_path))?;
        if blake3::hash(&state).to_hex().as_str() != record.state_blake3 {
            return Err(Error::State(format!("{} does not belong to its hibernation record", state_path.display())));
        }
        let parsed = crate::persist::state::VmState::from_bytes(&state)
            .map_err(|e| Error::State(format!("hibernated state {}: {e}", state_path.display())))?;
        if parsed.devices.block.is_some() {
            return Err(Error::State(format!(
                "{} has a disk: serving a VM's disk to another host is not supported yet",
                dir.display()
            )));
        }
        let st = Store::open_readonly(store).map_err(store_err(store))?;
        let manifest = st.manifest(&record.image).map_err(store_err(store))?;
        if manifest.image_len() != record.mem_size || parsed.mem_size != record.mem_size {
            return Err(Error::State(format!("image {:?} does not match the hibernated guest's size", record.image)));
        }
        let wset_path = dir.join(WSET_FILE);
        let wset = match wset_path.exists().then(|| WorkingSet::load(&wset_path)) {
            Some(Ok(w)) => Some(w),
            Some(Err(e)) => {
                tracing::warn!("ignoring the recorded working set: {e}");
                None
            }
            None => None,
        };
        Ok(Hibernated {
            source: Arc::new(ChunkSource::new(Arc::new(st), Arc::new(manifest))),
            state,
            wset,
            wset_path,
            image: record.image,
            mem_size: record.mem_size,
        })
    }
}

/// A VM woken from a remote page server: the VM, its page server handle, and the connection.
pub type RemoteWake = (MicroVm, WakeHandle, Arc<NetSource>);

impl MicroVm {
    /// Wakes the VM served by the page server at `addr` (`HOST:PORT`, see the module docs).
    pub fn wake_remote(
        addr: &str,
        secret: &Secret,
        net: &NetClientConfig,
        opts: WakeOptions,
    ) -> Result<RemoteWake, Error> {
        let t0 = Instant::now();
        let src = Arc::new(NetSource::connect(addr, secret, net).map_err(|e| Error::State(e.to_string()))?);
        let state_bytes = src.fetch_state().map_err(|e| Error::State(e.to_string()))?;
        let state = crate::persist::state::VmState::from_bytes(&state_bytes)
            .map_err(|e| Error::State(format!("the VM state served by {addr}: {e}")))?;
        if state.mem_size != src.len() {
            return Err(Error::State(format!(
                "page server {addr} serves {} bytes of memory for a {} byte guest",
                src.len(),
                state.mem_size
            )));
        }
        if let Some(m) = opts.expect_mem.filter(|&m| m != state.mem_size) {
            return Err(Error::State(format!(
                "{addr} serves a {} MiB guest, not {} MiB",
                state.mem_size >> 20,
                m >> 20
            )));
        }
        let report = WakeReport {
            image: format!("tcp://{addr}"),
            mem_size: state.mem_size,
            open_ms: ms(t0.elapsed()),
            prefetch_bytes: src.push_bytes(),
            recording: false,
            ..Default::default()
        };
        let lazy = LazyMemory {
            source: src.clone(),
            what: format!("the page server {addr}"),
            prefetch: None, // pushed by the server instead, placed as it arrives
            recording: false,
            wset_path: PathBuf::new(),
            disk_dir: None,
        };
        let s2 = src.clone();
        let on_server: OnServer = Box::new(move |server| {
            if s2.push_bytes() > 0 {
                spawn_push_placer(s2, server).map_err(|e| Error::State(e.to_string()))?;
            }
            Ok(())
        });
        let (vm, handle) = wake_lazily(t0, &state, report, lazy, opts, Some(on_server))?;
        let ctl: Weak<Control> = Arc::downgrade(vm.control());
        // Weak: the source holds this hook, and the page server (behind the monitor) the source.
        let mon = WeakMonitor::new(&handle.monitor());
        src.on_broken(Arc::new(move |why: &str| {
            match mon.upgrade() {
                Some(m) if m.resident_pages() < m.total_pages() => {}
                _ => return, // all memory is in, or the VM is gone: the server is not needed
            }
            if let Some(c) = ctl.upgrade().filter(|c| c.exit_reason().is_none()) {
                let msg = format!("guest memory could not be served: {why}");
                tracing::error!("{msg}");
                c.stop(ExitReason::Error(msg));
            }
        }));
        Ok((vm, handle, src))
    }
}
