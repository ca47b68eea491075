//! The daemon's shared state: configuration, database, VMM access, event stream, metrics and
//! one lock per sandbox (so concurrent requests wake a sleeping sandbox exactly once).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use forkvm_api::v1::{Event, SandboxState};
use rusqlite::Connection;
use tokio::sync::broadcast;

use crate::db::{self, Db};
use crate::error::ApiResult;
use crate::metrics::Metrics;
use crate::vmproc::Vmms;

#[derive(Debug, Clone)]
pub struct Config {
    /// Where VMMs keep their sockets; the daemon's socket and lock live here too.
    pub run_dir: PathBuf,
    /// Database and templates.
    pub state_dir: PathBuf,
    /// Chunk store for hibernation.
    pub store: PathBuf,
    /// The forkvm binary that runs VMMs.
    pub exe: PathBuf,
    /// Also serve on this TCP address (loopback).
    pub listen: Option<SocketAddr>,
    /// How often the lifecycle policy looks at idle sandboxes.
    pub policy_tick: Duration,
    /// Largest request body.
    pub max_body: usize,
    /// How long an API connection may take to send a request head in full (also how long a
    /// kept-alive connection may wait for its next request) before it is closed.
    pub head_timeout: Duration,
    /// How long after its head a request's body may take to arrive in full (then: 408, closed).
    pub body_timeout: Duration,
    /// Most connections open at once on each API listener (then: 503, closed).
    pub api_max_connections: usize,
    /// The preview proxy, if asked for (`--preview-listen`).
    pub preview: Option<crate::preview::PreviewConfig>,
    /// Kernel images sandboxes may boot, by name (`--image`). Only the host names files: an API
    /// request picks a name, never a path.
    pub images: std::collections::BTreeMap<String, KernelImage>,
    /// Warm VMM processes kept per sandbox size (`--pool N`; 0: none). With a pool, booted
    /// sandboxes get shared memory and their forks are live clones into the pool (fork() when
    /// the pool cannot serve one).
    pub pool: usize,
}

/// A bootable Linux kernel registered with the daemon.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelImage {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Kernel command line (None: `forkvm run`'s default).
    pub cmdline: Option<String>,
    /// The console line that says the guest is up (None: running as soon as the VMM is).
    pub ready_line: Option<String>,
    /// A raw disk image every sandbox of this image boots with (`--image-disk`): each gets its
    /// own copy-on-write view (`forkvm run --disk`); the image itself is never written.
    pub disk: Option<ImageDisk>,
}

/// The disk of a [`KernelImage`].
#[derive(Debug, Clone, PartialEq)]
pub struct ImageDisk {
    pub path: PathBuf,
    /// The guest sees a read-only device.
    pub read_only: bool,
}

impl Config {
    pub fn socket_path(&self) -> PathBuf {
        self.run_dir.join("forkvmd.sock")
    }
    pub fn db_path(&self) -> PathBuf {
        self.state_dir.join("forkvmd.db")
    }
    pub fn templates_dir(&self) -> PathBuf {
        self.state_dir.join("templates")
    }
}

#[derive(Debug)]
pub struct App {
    pub cfg: Config,
    pub db: Db,
    pub vmms: Vmms,
    pub events: broadcast::Sender<Event>,
    pub metrics: Metrics,
    /// The running preview proxy (set once it listens).
    pub preview: std::sync::OnceLock<crate::preview::Running>,
    /// Open preview connections per sandbox.
    pub preview_active: Arc<crate::preview::Active>,
    /// Held shared while a sandbox is restored from a template, exclusively while one is deleted.
    pub templates_lock: tokio::sync::RwLock<()>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

pub type Shared = Arc<App>;

impl App {
    pub fn new(cfg: Config, db: Db) -> Self {
        let vmms = Vmms {
            exe: cfg.exe.clone(),
            run_dir: cfg.run_dir.clone(),
            store: cfg.store.clone(),
            children: Default::default(),
        };
        App {
            cfg,
            db,
            vmms,
            events: broadcast::channel(4096).0,
            metrics: Metrics::default(),
            preview: std::sync::OnceLock::new(),
            preview_active: Arc::default(),
            templates_lock: tokio::sync::RwLock::new(()),
            locks: Mutex::default(),
        }
    }

    /// The lock that serializes operations on sandbox `id`.
    pub fn sandbox_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.locks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(m.entry(id.to_string()).or_default())
    }

    pub fn forget_lock(&self, id: &str) {
        self.locks.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(id);
    }

    /// How many sandbox locks are held in the map (tests: none stays for a deleted sandbox).
    #[cfg(test)]
    pub fn lock_count(&self) -> usize {
        self.locks.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }

    /// Persists an event and streams it.
    #[allow(clippy::too_many_arguments)]
    pub fn event_in(
        &self,
        c: &Connection,
        workspace: &str,
        sandbox: &str,
        kind: &str,
        from: Option<SandboxState>,
        to: Option<SandboxState>,
        detail: &str,
    ) -> ApiResult<()> {
        let ev = db::events::insert(c, workspace, sandbox, kind, from, to, detail)?;
        tracing::info!(sandbox, kind, detail, "event");
        let _ = self.events.send(ev);
        Ok(())
    }

    /// Moves sandbox `id` to `to` (with its VMM pid) and records the event, atomically.
    pub fn transition(
        &self,
        rec: &db::sandboxes::Rec,
        to: SandboxState,
        pid: Option<u32>,
        kind: &str,
        detail: &str,
    ) -> ApiResult<()> {
        let mut c = self.db.lock();
        let tx = c.transaction()?;
        db::sandboxes::set_state(&tx, &rec.sb.id, to, pid)?;
        let ev = db::events::insert(&tx, &rec.sb.workspace, &rec.sb.id, kind, Some(rec.sb.state), Some(to), detail)?;
        tx.commit()?;
        tracing::info!(sandbox = rec.sb.id, kind, detail, "event");
        let _ = self.events.send(ev);
        Ok(())
    }
}
