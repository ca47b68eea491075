//! `forkvm hibernate` / `forkvm wake`: a named VM's memory goes into the chunk store and its VMM
//! process exits; waking starts a new VMM process that restores it lazily through the
//! userfaultfd page server (pages come in as the guest touches them, the recorded working set
//! ahead of that).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use vmm::{HibernateOptions, MicroVm, WakeOptions};

use forkvm_api::vm::{self, Client, HibernateResponse, VmPaths};

use crate::server::{redirect_output, serve, Claimed};

#[derive(Args, Debug)]
pub struct HibernateArgs {
    /// VM name.
    pub vm: String,
    /// Chunk store directory (default: $FORKVM_STORE, else /var/lib/forkvm/store for root, else
    /// ~/.local/share/forkvm/store). Shared by all VMs, so identical pages are stored once.
    #[arg(long)]
    pub store: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct WakeArgs {
    /// VM name.
    pub vm: String,
    /// Chunk store directory (default: the one the VM was hibernated into).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Internal: this process is the woken VM's VMM.
    #[arg(long, hide = true)]
    pub background: bool,
    #[command(flatten)]
    pub remote: crate::net_cmd::RemoteWakeArgs,
}

/// The default chunk store of this host.
pub fn default_store() -> PathBuf {
    if let Some(s) = std::env::var_os("FORKVM_STORE") {
        return PathBuf::from(s);
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    if unsafe { libc::getuid() } == 0 {
        return PathBuf::from("/var/lib/forkvm/store");
    }
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(std::env::temp_dir);
    data.join("forkvm/store")
}

pub fn hibernate(args: HibernateArgs) -> Result<i32, String> {
    let store = std::path::absolute(args.store.unwrap_or_else(default_store)).map_err(|e| e.to_string())?;
    let req = vm::Hibernate { store: Some(store.clone()) };
    let client = Client::for_name(&args.vm).map_err(|e| e.to_string())?;
    let r = client.timeout(Duration::from_secs(600)).call(req).map_err(|e| e.to_string())?;
    let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
    println!(
        "{}: hibernated in {:.1} ms (pause {:.3}, store {:.1}) into {}: {:.1} MiB guest, {:.1} MiB non-zero, \
         {:.1} MiB newly stored; pages zero {}, unique {}, dedup {}",
        args.vm,
        r.total_ms,
        r.pause_ms,
        r.store_ms,
        r.store.display(),
        mib(r.bytes_raw),
        mib(r.bytes_nonzero),
        mib(r.bytes_stored),
        r.pages_zero,
        r.pages_unique,
        r.pages_dedup,
    );
    Ok(0)
}

/// Server side of the hibernate request: hibernates `vm` into `dir` and `store`.
pub fn hibernate_vm(vm: &MicroVm, dir: &Path, store: Option<&Path>) -> Result<HibernateResponse, String> {
    let store = store.map_or_else(default_store, Path::to_path_buf);
    let was_running = !vm.is_paused();
    let rep = match vm.hibernate(dir, &store, &HibernateOptions::default()) {
        Ok(r) => r,
        Err(e) => {
            // Lose nothing: a failed hibernation leaves the VM as it was.
            if was_running {
                let _ = vm.resume();
            }
            return Err(e.to_string());
        }
    };
    Ok(HibernateResponse {
        image: rep.image,
        store,
        pause_ms: rep.pause_ms,
        save_ms: rep.save_ms,
        store_ms: rep.store_ms,
        total_ms: rep.total_ms,
        bytes_raw: rep.bytes_raw,
        bytes_nonzero: rep.bytes_nonzero,
        bytes_stored: rep.bytes_stored,
        pages_total: rep.pages_total,
        pages_zero: rep.pages_zero,
        pages_unique: rep.pages_unique,
        pages_dedup: rep.pages_dedup,
    })
}

pub fn wake(args: WakeArgs) -> Result<i32, String> {
    if args.remote.pages.is_some() {
        return crate::net_cmd::wake_remote(&args);
    }
    let hib = VmPaths::for_name(&args.vm)?.hibernated();
    let record = vmm::hibernate::read_record(&hib).map_err(|_| format!("no hibernated VM named {:?}", args.vm))?;
    let store = args.store.clone().unwrap_or_else(|| PathBuf::from(&record.store));
    if !args.background {
        let mut argv: Vec<OsString> = vec!["wake".into(), args.vm.clone().into(), "--store".into()];
        argv.push(std::path::absolute(&store).map_err(|e| e.to_string())?.into());
        argv.push("--background".into());
        return crate::vmctl::spawn_detached(&args.vm, argv);
    }
    let claimed = Claimed::for_wake(&args.vm)?;
    let log = claimed.console_log();
    let console = match crate::private_fs::append_private(&log) {
        Ok(f) => f,
        Err(e) => {
            claimed.release_keeping_hibernation();
            return Err(e);
        }
    };
    let opts = WakeOptions { console_mirror: Some(Box::new(console)), track_dirty: true, ..Default::default() };
    let (vm, handle) = match MicroVm::wake(&hib, &store, opts) {
        Ok(x) => x,
        Err(e) => {
            let why = format!("wake failed: {e}");
            let _ = vmm::hibernate::chunkstore::private::write_atomic(
                &claimed.paths.dir.join(WAKE_ERROR),
                format!("{why}\n").as_bytes(),
            );
            claimed.release_keeping_hibernation();
            return Err(why);
        }
    };
    if let Err(e) = redirect_output(&claimed.paths.vmm_log()) {
        drop((vm, handle));
        claimed.release_keeping_hibernation();
        return Err(e);
    }
    let _ = std::fs::remove_file(claimed.paths.dir.join(WAKE_ERROR));
    tracing::info!("woke {}: {:?}", args.vm, handle.report());
    Ok(serve(claimed, vm, None, Some(handle)))
}

/// File in a VM's directory saying why its last wake ended in an error.
pub const WAKE_ERROR: &str = "wake-error";

/// A woken VM stopped on an error (e.g. a page its hibernation could not serve): its hibernation
/// and logs stay, and `wake-error` (and vmm.log) say why; only the socket and pid file go, so the
/// name shows as hibernated and can be woken again once the store is repaired. A clone woken
/// from another host's page server (`wake --pages`) has no hibernation here: its logs stay, `ls`
/// shows it `failed` and `discard` clears it.
pub fn keep_failed_wake(paths: &VmPaths, name: &str, why: &str) {
    let _ = std::fs::remove_file(paths.socket());
    let _ = std::fs::remove_file(paths.pid_file());
    let file = paths.dir.join(WAKE_ERROR);
    if let Err(e) = vmm::hibernate::chunkstore::private::write_atomic(&file, format!("{why}\n").as_bytes()) {
        eprintln!("forkvm: cannot write {}: {e}", file.display());
    }
    if paths.hibernated().exists() {
        eprintln!(
            "forkvm: VM {name} stopped after waking: {why}; its hibernation ({}) and logs are kept",
            paths.hibernated().display()
        );
    } else {
        eprintln!(
            "forkvm: VM {name} stopped after waking: {why}; its logs are kept in {} (`forkvm discard {name}` \
             removes them)",
            paths.dir.display()
        );
    }
}

/// Whether `paths` holds a VM that stopped after a wake and has no hibernation to wake again
/// (a clone woken from another host's page server): only its logs and `wake-error` are left.
pub fn failed_clone(paths: &VmPaths) -> bool {
    paths.dir.join(WAKE_ERROR).exists() && !paths.hibernated().exists() && !paths.pid_file().exists()
}
