//! Upkeep of a chunk store holding hibernations: verify it, discard a hibernation, and collect
//! garbage.
//!
//! Every image a hibernation writes is owned (see [`chunkstore::Store::set_owner`]) by its
//! hibernation directory. [`collect_garbage`] removes the images whose owner no longer names them
//! (the directory or its record is gone, or a later hibernation replaced the image), then drops
//! the chunks no image references. An owner whose record cannot be read for another reason
//! (corrupt, permissions) keeps its image: garbage collection never guesses. Images without an
//! owner (imports, benchmarks) stay until removed explicitly. It holds the store's writer lock,
//! so it waits for hibernations in progress and they wait for it.

use std::path::{Path, PathBuf};

use chunkstore::{GcReport, Store, StoreConfig, VerifyReport};

use crate::hibernate::{read_record, store_err, RECORD_FILE, STORE_LOCK_WAIT};
use crate::Error;

/// What [`collect_garbage`] did.
#[derive(Debug, Clone, Default)]
pub struct StoreGc {
    /// Images removed because their hibernation is gone, with their former owner.
    pub images_removed: Vec<(String, PathBuf)>,
    /// Images kept because their owner's record could not be read, with the reason.
    pub images_in_doubt: Vec<(String, String)>,
    /// The chunk collection.
    pub chunks: GcReport,
}

/// Whether the hibernation in `owner` still names `image`: `Some(true/false)`, or `None` with the
/// reason when that cannot be told.
fn still_owned(owner: &Path, image: &str) -> Result<bool, String> {
    match std::fs::symlink_metadata(owner.join(RECORD_FILE)) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(format!("{}: {e}", owner.display())),
        Ok(_) => {}
    }
    read_record(owner).map(|r| r.image == image).map_err(|e| e.to_string())
}

/// Removes images of hibernations that are gone, then unreferenced chunks (see the module docs).
pub fn collect_garbage(store: &Path) -> Result<StoreGc, Error> {
    let st = open_writer(store)?;
    let mut out = StoreGc::default();
    for image in st.list_images().map_err(store_err(store))? {
        let Some(owner) = st.owner(&image).map_err(store_err(store))? else { continue };
        match still_owned(&owner, &image) {
            Ok(true) => {}
            Ok(false) => {
                st.remove_image(&image).map_err(store_err(store))?;
                out.images_removed.push((image, owner));
            }
            Err(why) => out.images_in_doubt.push((image, why)),
        }
    }
    out.chunks = st.gc().map_err(store_err(store))?;
    Ok(out)
}

/// Discards the hibernation in `dir`: its record goes first (it can no longer be woken), then
/// its image, then the directory. Its chunks are freed by the next [`collect_garbage`].
pub fn discard(dir: &Path, store: &Path) -> Result<String, Error> {
    let record = read_record(dir)?;
    let st = open_writer(store)?;
    std::fs::remove_file(dir.join(RECORD_FILE))
        .map_err(|e| Error::State(format!("cannot remove {}: {e}", dir.join(RECORD_FILE).display())))?;
    match st.remove_image(&record.image) {
        Ok(()) => {}
        Err(chunkstore::Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(store_err(store)(e)),
    }
    std::fs::remove_dir_all(dir).map_err(|e| Error::State(format!("cannot remove {}: {e}", dir.display())))?;
    Ok(record.image)
}

/// Reads back every chunk and manifest of the store.
pub fn verify(store: &Path) -> Result<VerifyReport, Error> {
    let st = Store::open_readonly(store).map_err(store_err(store))?;
    st.verify().map_err(store_err(store))
}

fn open_writer(store: &Path) -> Result<Store, Error> {
    if !store.join("index").exists() {
        return Err(Error::State(format!("{} is not a chunk store (no index)", store.display())));
    }
    Store::open_or_create_wait(store, StoreConfig::default(), STORE_LOCK_WAIT).map_err(store_err(store))
}
