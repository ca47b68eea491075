//! `forkvm store ...`: upkeep of the chunk store that holds hibernated VMs (verify, gc), imports
//! into it (`import`, in store_import.rs), and `forkvm discard`.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use forkvm_api::vm::VmPaths;

use crate::hibernate_cmd::default_store;

#[derive(Args, Debug)]
pub struct StoreArgs {
    #[command(subcommand)]
    pub command: StoreCommand,
}

#[derive(Subcommand, Debug)]
pub enum StoreCommand {
    /// Read back every chunk (it must decompress and match its hash) and every manifest (its
    /// chunks must exist). Lists each problem and exits 1 if there is any.
    Verify(StoreDir),
    /// Put a memory snapshot into the store (zero pages skipped, zstd chunks, pages deduplicated
    /// against everything already stored) and print its image id.
    Import(crate::store_import::ImportArgs),
    /// Remove the images of hibernations that are gone (discarded, woken and stopped, or
    /// replaced) and every chunk no image references, freeing their space. Waits for
    /// hibernations in progress.
    Gc(StoreDir),
}

#[derive(Args, Debug)]
pub struct StoreDir {
    /// Chunk store directory (default: $FORKVM_STORE, else the host's default store).
    #[arg(long)]
    pub store: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct DiscardArgs {
    /// Name of the hibernated VM.
    pub vm: String,
}

fn store_dir(a: &StoreDir) -> PathBuf {
    a.store.clone().unwrap_or_else(default_store)
}

pub fn store(args: StoreArgs) -> Result<i32, String> {
    match args.command {
        StoreCommand::Verify(a) => verify(&store_dir(&a)),
        StoreCommand::Gc(a) => gc(&store_dir(&a)),
        StoreCommand::Import(a) => crate::store_import::import(&a),
    }
}

fn verify(store: &Path) -> Result<i32, String> {
    let rep = vmm::store_maint::verify(store).map_err(|e| e.to_string())?;
    for p in &rep.problems {
        println!("problem: {p}");
    }
    println!(
        "{}: {} chunks, {} images checked, {} problems",
        store.display(),
        rep.chunks_checked,
        rep.images_checked,
        rep.problems.len()
    );
    Ok(if rep.is_ok() { 0 } else { 1 })
}

fn gc(store: &Path) -> Result<i32, String> {
    let rep = vmm::store_maint::collect_garbage(store).map_err(|e| e.to_string())?;
    for (image, owner) in &rep.images_removed {
        println!("removed image {image} (its hibernation {} is gone)", owner.display());
    }
    for (image, why) in &rep.images_in_doubt {
        println!("kept image {image}: cannot tell whether its hibernation is gone: {why}");
    }
    let c = &rep.chunks;
    println!(
        "{}: {} images kept, {} removed; {} chunks kept, {} removed ({} bytes); pack on disk {} -> {} bytes",
        store.display(),
        c.images,
        rep.images_removed.len(),
        c.chunks_kept,
        c.chunks_removed,
        c.bytes_removed,
        c.disk_before,
        c.disk_after
    );
    Ok(0)
}

/// `forkvm discard NAME`: throw a hibernated VM away (its record, image and directory).
pub fn discard(args: DiscardArgs) -> Result<i32, String> {
    let paths = VmPaths::for_name(&args.vm)?;
    if std::os::unix::net::UnixStream::connect(paths.socket()).is_ok() {
        return Err(format!("VM {:?} is running: stop it first (only a hibernated VM can be discarded)", args.vm));
    }
    if crate::hibernate_cmd::failed_clone(&paths) {
        // A clone that stopped after a wake from another host: nothing in the store is its own.
        std::fs::remove_dir_all(&paths.dir).map_err(|e| format!("cannot remove {}: {e}", paths.dir.display()))?;
        println!("discarded {} (a clone that failed after its wake; its logs are gone)", args.vm);
        return Ok(0);
    }
    let hib = paths.hibernated();
    let record = vmm::hibernate::read_record(&hib).map_err(|_| format!("no hibernated VM named {:?}", args.vm))?;
    let store = PathBuf::from(&record.store);
    let image = vmm::store_maint::discard(&hib, &store).map_err(|e| e.to_string())?;
    // The VM's directory holds nothing else once it is not running.
    let _ = std::fs::remove_dir_all(&paths.dir);
    println!("discarded {} (image {image}; `forkvm store gc` frees its chunks)", args.vm);
    Ok(0)
}
