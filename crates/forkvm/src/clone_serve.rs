//! Live clones across hosts:
//! - `forkvm clone-serve VM --tcp ADDR --secret-file F` on host A makes the running VM (shared
//!   memory) serve clones over forkvm's TCP page protocol (pagesrv::net_wire). Every
//!   authenticated connection is one clone request: the VM pauses to capture its vCPU/device
//!   state and start a write-protect generation (`vmm::live_clone::LiveParent::capture`), then
//!   runs on; the connection gets that state, the memory of that instant (pages the VM writes
//!   later come from their preserved copies), and all the instant's data pushed behind the
//!   pages it asks for. `--stop` stops serving.
//! - on host B, `forkvm wake CHILD --pages tcp://ADDR --secret-file F` starts the clone.
//!
//! The server runs inside the VM's VMM process (it needs the VM's memory and write protection).
//! While it runs, the VM is not fork()ed (its threads are not part of the fork gate); pool
//! clones still work.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock};

use clap::Args;
use forkvm_api::vm::{self, Client, CloneServeResponse};
use pagesrv::net_auth::Secret;
use pagesrv::net_server::{Opened, Opener};
use pagesrv::{NetEvent, NetServer, NetServerConfig, PageSource, ZeroSource};
use vmm::Backing;

use crate::server::{lock, Host};

#[derive(Args, Debug)]
pub struct CloneServeArgs {
    /// The running VM to clone (booted with --backing shared).
    pub name: String,
    /// Listen here (e.g. 10.0.0.1:7070): every client that knows the secret gets one clone of
    /// the VM as it is when it connects (`forkvm wake CHILD --pages tcp://ADDR --secret-file F`
    /// on the other host).
    #[arg(long, required_unless_present = "stop", requires = "secret_file")]
    pub tcp: Option<String>,
    /// The shared secret (the same file on both hosts, mode 0600; e.g.
    /// `head -c 32 /dev/urandom > F && chmod 600 F`).
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// Stop serving clones (clones whose memory is not all in yet then stop with an error).
    #[arg(long, conflicts_with = "tcp")]
    pub stop: bool,
}

/// `forkvm clone-serve`.
pub fn clone_serve(a: &CloneServeArgs) -> Result<i32, String> {
    let secret_file = match &a.secret_file {
        Some(f) if !a.stop => {
            // Checked here too, so a bad file fails before the VMM is asked.
            Secret::load(f).map_err(|e| e.to_string())?;
            Some(std::path::absolute(f).map_err(|e| e.to_string())?)
        }
        _ => None,
    };
    let req = vm::CloneServe { listen: if a.stop { None } else { a.tcp.clone() }, secret_file };
    let r = Client::for_name(&a.name).map_err(|e| e.to_string())?.call(req).map_err(|e| e.to_string())?;
    match r.listening {
        Some(addr) => println!("serving live clones of {} on {addr}", a.name),
        None => println!("no longer serving clones of {} ({} served)", a.name, r.clones),
    }
    Ok(0)
}

/// The clone server of this VMM process, if on.
struct Serving {
    server: NetServer,
    addr: String,
    clones: Arc<AtomicU64>,
    log: std::thread::JoinHandle<()>,
}

static SERVING: OnceLock<Mutex<Option<Serving>>> = OnceLock::new();

fn serving() -> &'static Mutex<Option<Serving>> {
    SERVING.get_or_init(|| Mutex::new(None))
}

/// Refuses a fork() while clones are served over TCP (the server's threads would not survive it).
pub(crate) fn refuse_fork() -> Result<(), String> {
    match lock(serving()).as_ref() {
        Some(s) => Err(format!(
            "this VM serves live clones on {} (forkvm clone-serve): stop that (--stop) before a fork()",
            s.addr
        )),
        None => Ok(()),
    }
}

impl Host {
    /// Starts or stops serving clones over TCP (see the module docs).
    pub(crate) fn clone_serve(&self, r: vm::CloneServe) -> Result<CloneServeResponse, String> {
        let mut cur = lock(serving());
        let Some(listen) = r.listen else {
            let clones = cur.as_ref().map_or(0, |s| s.clones.load(SeqCst));
            if let Some(s) = cur.take() {
                s.server.stop();
                // Its events end with it; a thread left behind would fail a later fork().
                let _ = s.log.join();
            }
            return Ok(CloneServeResponse { listening: None, clones });
        };
        if let Some(s) = cur.as_ref() {
            return Err(format!("already serving clones on {} (stop with --stop first)", s.addr));
        }
        let mem = self.vm.memory();
        if mem.backing() != Backing::SharedFile || mem.is_frozen() {
            return Err("live clones need shared-file guest memory (run with --backing shared) that no fork() or \
                        snapshot froze"
                .into());
        }
        if self.vm.block().is_some() {
            return Err("live clones of a VM with a disk are not supported yet".into());
        }
        let secret =
            Secret::load(r.secret_file.as_deref().ok_or("secret_file is missing")?).map_err(|e| e.to_string())?;
        crate::pool_fork::with_live_parent(&self.vm, |_| Ok(()))?;
        let len = mem.file().ok_or("shared memory has no file")?.metadata().map_err(|e| e.to_string())?.len();
        let clones = Arc::new(AtomicU64::new(0));
        let (vm, n, name) = (self.vm.clone(), clones.clone(), self.name.clone());
        let opener = Opener(Arc::new(move || {
            let c = crate::pool_fork::with_live_parent(&vm, |p| p.capture(&vm).map_err(|e| e.to_string()))?;
            let k = n.fetch_add(1, SeqCst) + 1;
            tracing::info!(
                "clone {k} of {name}: parent paused {:.3} ms (write-protect {:.3} ms), {} MiB of data",
                c.report.paused.as_secs_f64() * 1e3,
                c.report.protect.as_secs_f64() * 1e3,
                c.data.bytes() >> 20
            );
            let source: Arc<dyn PageSource> = c.generation;
            Ok(Opened { source, state: Some(c.state), push: Some(c.data) })
        }));
        let mut cfg = NetServerConfig::new(secret);
        cfg.opener = Some(opener);
        let (server, events) =
            NetServer::bind(&listen, Arc::new(ZeroSource { len }), cfg).map_err(|e| format!("clone-serve: {e}"))?;
        let addr = format!("tcp://{}", server.local_addr());
        let log = std::thread::Builder::new()
            .name("clone-serve-log".into())
            .spawn(move || {
                for e in events {
                    match e {
                        NetEvent::Rejected { id, peer, error } => {
                            tracing::warn!("clone client {id} ({peer:?}) refused: {error}")
                        }
                        e => tracing::info!("clone client: {e:?}"),
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        tracing::info!("serving live clones of {} on {addr}", self.name);
        *cur = Some(Serving { server, addr: addr.clone(), clones, log });
        Ok(CloneServeResponse { listening: Some(addr), clones: 0 })
    }
}
