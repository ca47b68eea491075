//! Hibernation: a VM's memory goes into the content-addressed chunk store (zero pages skipped,
//! identical pages stored once, compressed), its vCPU/device state and a small record into a
//! directory, so that another process can wake it later (see [`crate::lazy_restore`]).
//!
//! A hibernation directory holds:
//!
//! | file | what |
//! | --- | --- |
//! | `state` | the enveloped [`VmState`] (as in a snapshot, without a memory image) |
//! | `hibernation` | the enveloped [`HibernationRecord`]: store image name, memory size, state hash |
//! | `wset` | the working set recorded by the first wake (pagesrv's format), prefetched by later wakes |

use std::path::{Path, PathBuf};
use std::time::Instant;

pub use chunkstore;
pub use pagesrv;

use chunkstore::{Codec, Store, StoreConfig};
use serde::{Deserialize, Serialize};

use crate::microvm::MicroVm;
use crate::persist::envelope::{self, Kind};
use crate::persist::state::VmState;
use crate::snapshot::{write_synced, STATE_FILE};
use crate::Error;

/// The hibernation record file in a hibernation directory.
pub const RECORD_FILE: &str = "hibernation";
/// The recorded working set in a hibernation directory.
pub const WSET_FILE: &str = "wset";

/// Longest a hibernation (or a store gc) waits for another writer of the same store.
pub const STORE_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// Record files: `FORKVM` + `HB`, format version 1.
pub const RECORD_KIND: Kind = Kind { tag: *b"HB", name: "hibernation record", version: 1 };

/// What [`MicroVm::wake`] needs besides the state: where the memory is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HibernationRecord {
    /// Image name of the guest memory in the chunk store.
    pub image: String,
    /// Guest memory size in bytes (the image length).
    pub mem_size: u64,
    /// Page size of the image.
    pub page_size: u32,
    /// blake3 (hex) of the `state` file, so a record and a state of different hibernations
    /// are never combined.
    pub state_blake3: String,
    /// The store the image was written to (informational; wake takes the store path).
    pub store: String,
}

/// Compression of newly stored pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Compression {
    /// zstd (smaller, slower).
    #[default]
    Zstd,
    /// lz4 (faster, larger).
    Lz4,
}

/// Options of [`MicroVm::hibernate`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HibernateOptions {
    pub compression: Compression,
    /// zstd level (ignored for lz4).
    pub level: i32,
    /// Threads hashing and compressing.
    pub threads: usize,
    /// Image name in the store; default: derived from the directory and the time.
    pub image: Option<String>,
}

impl Default for HibernateOptions {
    fn default() -> Self {
        HibernateOptions { compression: Compression::Zstd, level: 3, threads: 2, image: None }
    }
}

/// What a hibernation did and cost. Times in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HibernateReport {
    /// Image name in the store.
    pub image: String,
    /// The VM was running (and was paused by hibernate).
    pub was_running: bool,
    pub pause_ms: f64,
    /// Capturing vCPU/VM/device state.
    pub save_ms: f64,
    /// Hashing, compressing and writing memory into the store (fsync included).
    pub store_ms: f64,
    /// Writing `state` and the record.
    pub files_ms: f64,
    pub total_ms: f64,
    /// Guest memory size.
    pub bytes_raw: u64,
    /// Bytes of non-zero pages.
    pub bytes_nonzero: u64,
    /// Bytes appended to the store's pack (new chunks, compressed).
    pub bytes_stored: u64,
    /// Compressed bytes of all chunks this image references (new or shared).
    pub bytes_image: u64,
    pub state_bytes: u64,
    pub pages_total: u64,
    pub pages_zero: u64,
    /// Pages whose content was stored by this hibernation (new chunks).
    pub pages_unique: u64,
    /// Non-zero pages whose content was already in the store or earlier in this image.
    pub pages_dedup: u64,
}

pub(crate) fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub(crate) fn hio(what: &str, path: &Path) -> impl Fn(std::io::Error) -> Error {
    let msg = format!("{what} {}", path.display());
    move |e| Error::State(format!("{msg}: {e}"))
}

pub(crate) fn store_err(store: &Path) -> impl Fn(chunkstore::Error) -> Error {
    let s = store.display().to_string();
    move |e| Error::State(format!("chunk store {s}: {e}"))
}

/// Reads and checks the record of a hibernation directory.
pub fn read_record(dir: &Path) -> Result<HibernationRecord, Error> {
    let path = dir.join(RECORD_FILE);
    let bytes = std::fs::read(&path).map_err(hio("not a hibernated VM: cannot read", &path))?;
    envelope::decode(&RECORD_KIND, &bytes)
        .map_err(|e| Error::State(format!("hibernation record {}: {e}", path.display())))
}

fn default_image_name(dir: &Path) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let mut h = blake3::Hasher::new();
    h.update(dir.as_os_str().as_encoded_bytes());
    h.update(&nanos.to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    format!("hib-{}", &h.finalize().to_hex()[..20])
}

impl MicroVm {
    /// Hibernates the VM into `dir` (created if needed) with its memory in the chunk store at
    /// `store` (created if needed): pauses it if running, saves its state, stores its memory and
    /// writes `state` and the record. The VM stays paused; the caller normally stops it and
    /// exits, and [`MicroVm::wake`] brings it back, in this or another process.
    pub fn hibernate(&self, dir: &Path, store: &Path, opts: &HibernateOptions) -> Result<HibernateReport, Error> {
        let t0 = Instant::now();
        let mut rep = HibernateReport { was_running: !self.is_paused(), ..Default::default() };
        if rep.was_running {
            rep.pause_ms = ms(self.pause()?);
        }
        let t = Instant::now();
        let mut state = self.save_state()?;
        rep.save_ms = ms(t.elapsed());

        chunkstore::private::ensure_dir(dir).map_err(hio("cannot create hibernation directory", dir))?;
        let dir = dir.canonicalize().map_err(hio("cannot resolve", dir))?;
        self.persist_disk(&dir, &mut state)?;
        let t = Instant::now();
        let codec = match opts.compression {
            Compression::Zstd => Codec::Zstd,
            Compression::Lz4 => Codec::Lz4,
        };
        let cfg = StoreConfig { codec, level: opts.level, threads: opts.threads.max(1), ..Default::default() };
        // Other hibernations into this store (and `store gc`) are waited for, not failed on;
        // the lock is held until the record is written, so gc never sees a half-made one.
        let st = Store::open_or_create_wait(store, cfg, STORE_LOCK_WAIT).map_err(store_err(store))?;
        let name = opts.image.clone().unwrap_or_else(|| default_image_name(&dir));
        // The owner first: an image whose hibernation never got its record is garbage.
        st.set_owner(&name, &dir).map_err(store_err(store))?;
        let (manifest, put) = put_memory(self, &st, &name).map_err(store_err(store))?;
        rep.store_ms = ms(t.elapsed());

        let t = Instant::now();
        let state_bytes = state_bytes(&state)?;
        let old = read_record(&dir).ok();
        let record = HibernationRecord {
            image: name.clone(),
            mem_size: state.mem_size,
            page_size: manifest.page_size() as u32,
            state_blake3: blake3::hash(&state_bytes).to_hex().to_string(),
            store: store.canonicalize().unwrap_or_else(|_| PathBuf::from(store)).display().to_string(),
        };
        let rec = envelope::encode(&RECORD_KIND, &record).map_err(|e| Error::State(e.to_string()))?;
        // The new state and record go into a fresh directory that replaces the old one in one
        // step: a crash or a full disk at any point leaves the previous hibernation or the new.
        let disk_files: Vec<String> = state
            .devices
            .block
            .iter()
            .flat_map(|b| b.disk.layers.iter())
            .flat_map(|id| {
                use crate::devices::virtio::block::persist::{layer_file, map_file};
                [layer_file(id), map_file(id)]
            })
            .collect();
        replace_hibernation(&dir, &state_bytes, &rec, &disk_files)?;
        if let Some(old) = old.filter(|o| o.image != name) {
            // The previous image of this directory is no longer needed (chunks stay, shared).
            let _ = st.remove_image(&old.image);
        }
        rep.files_ms = ms(t.elapsed());

        let img = st.image_stats(&manifest);
        rep.image = name;
        rep.bytes_raw = put.logical_bytes;
        rep.pages_total = put.pages;
        rep.pages_zero = put.zero_pages;
        rep.bytes_nonzero = (put.pages - put.zero_pages) * manifest.page_size() as u64;
        rep.bytes_stored = put.new_stored_bytes;
        rep.bytes_image = img.stored_bytes;
        rep.pages_unique = put.new_chunks;
        rep.pages_dedup = put.deduped_pages;
        rep.state_bytes = state_bytes.len() as u64;
        rep.total_ms = ms(t0.elapsed());
        Ok(rep)
    }
}

/// Writes `state` and `record` (and the recorded working set, still a good prefetch hint) into
/// a temporary directory beside `dir` and puts it in `dir`'s place atomically.
/// `disk_files` (the disk layers and maps the state names, linked into `dir` by the disk's
/// persist) move along, hard-linked: the old directory's unused layers go with it.
fn replace_hibernation(dir: &Path, state: &[u8], record: &[u8], disk_files: &[String]) -> Result<(), Error> {
    let tmp = chunkstore::private::temp_beside(dir);
    let r = (|| {
        chunkstore::private::create_dir(&tmp).map_err(hio("cannot create", &tmp))?;
        for f in disk_files {
            std::fs::hard_link(dir.join(f), tmp.join(f)).map_err(hio("cannot keep disk file", &dir.join(f)))?;
        }
        write_synced(&tmp.join(STATE_FILE), state)?;
        write_synced(&tmp.join(RECORD_FILE), record)?;
        if let Ok(ws) = std::fs::read(dir.join(WSET_FILE)) {
            write_synced(&tmp.join(WSET_FILE), &ws)?;
        }
        chunkstore::private::replace_dir(&tmp, dir).map_err(hio("cannot put the hibernation in place at", dir))
    })();
    if r.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    r
}

fn state_bytes(state: &VmState) -> Result<Vec<u8>, Error> {
    state.to_bytes().map_err(|e| Error::State(e.to_string()))
}

/// Writes guest memory (regions concatenated, as in memory images) into the store.
fn put_memory(
    vm: &MicroVm,
    st: &Store,
    name: &str,
) -> Result<(chunkstore::Manifest, chunkstore::PutStats), chunkstore::Error> {
    let mem = vm.memory();
    let mut w = st.image_writer(name)?;
    for r in mem.regions() {
        // SAFETY: the mapping [host, host+size) is owned by `mem`, which outlives this borrow;
        // the VM is paused, so the bytes are stable while they are read.
        let bytes = unsafe { std::slice::from_raw_parts(r.host.cast_const(), r.size as usize) };
        w.write(bytes)?;
    }
    w.finish()
}
