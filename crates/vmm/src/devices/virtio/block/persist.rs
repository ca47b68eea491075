//! Saved state of the block device: its transport and its disk. A snapshot freezes the live
//! overlay and links every layer of the disk into the snapshot directory (`disk-<id>.layer` and
//! its block map `disk-<id>.map`): hard links, no copy, unless the directory is on another
//! filesystem. A restore opens those layers read-only and starts its own empty overlay, so any
//! number of restores of one snapshot share its disk.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::disk::{CowDisk, MAX_LAYERS};
use super::layer::{copy_layer, link_fd, Base, Bitmap, Layer, BLOCK};
use crate::devices::virtio::persist::TransportState;
use crate::persist::envelope::{self, Kind};

/// Block maps: `FORKVM` + `DM`.
pub const MAP_KIND: Kind = Kind { tag: *b"DM", name: "disk block map", version: 1 };

/// A disk as a snapshot records it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskState {
    /// Absolute path of the raw base image, its size and modification time (a changed base
    /// is refused).
    pub base: String,
    pub base_len: u64,
    pub base_mtime_ns: i64,
    pub read_only: bool,
    /// Layer ids, oldest first: files `disk-<id>.layer` and `disk-<id>.map` in the snapshot.
    pub layers: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub transport: TransportState,
    pub disk: DiskState,
}

/// The block map file of a layer.
#[derive(Debug, Serialize, Deserialize)]
struct DiskMap {
    block_size: u64,
    blocks: u64,
    runs: Vec<(u64, u64)>,
}

pub fn layer_file(id: &str) -> String {
    format!("disk-{id}.layer")
}

pub fn map_file(id: &str) -> String {
    format!("disk-{id}.map")
}

/// Layer ids come from an untrusted file: hex only.
fn checked_id(id: &str) -> Result<&str, String> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("invalid disk layer id {id:?} in snapshot state"));
    }
    Ok(id)
}

impl CowDisk {
    /// The disk's description without its layers written anywhere (a fork's state).
    pub fn describe(&self) -> DiskState {
        DiskState {
            base: self.base.path.display().to_string(),
            base_len: self.base.len,
            base_mtime_ns: self.base.mtime_ns,
            read_only: self.read_only,
            layers: self.frozen.iter().map(|l| l.id.clone()).collect(),
        }
    }

    /// Freezes the disk at this instant and puts its layers into snapshot directory `dir`.
    pub fn persist(&mut self, dir: &Path) -> Result<DiskState, String> {
        self.freeze().map_err(|e| format!("cannot freeze the disk: {e}"))?;
        let size = self.size();
        for l in &self.frozen {
            // Durable before anything names it: the maps and the state are written after this.
            l.sync().map_err(|e| format!("cannot sync disk layer {}: {e}", l.id))?;
            let data = dir.join(layer_file(&l.id));
            if std::fs::symlink_metadata(&data).is_err() {
                if let Err(e) = link_fd(&l.file, &data) {
                    tracing::info!("cannot link disk layer into {} ({e}); copying its blocks", dir.display());
                    copy_layer(l, size, &data).map_err(|e| format!("cannot write {}: {e}", data.display()))?;
                }
            }
            let map = dir.join(map_file(&l.id));
            if std::fs::symlink_metadata(&map).is_err() {
                let m = DiskMap { block_size: BLOCK, blocks: l.map.blocks(), runs: l.map.runs() };
                let bytes = envelope::encode(&MAP_KIND, &m).map_err(|e| e.to_string())?;
                crate::snapshot::write_synced(&map, &bytes).map_err(|e| e.to_string())?;
            }
        }
        Ok(self.describe())
    }

    /// The disk saved in snapshot directory `dir`, with a new empty overlay in `scratch`
    /// (default: `dir`).
    pub fn open_saved(st: &DiskState, dir: &Path, scratch: Option<&Path>) -> Result<CowDisk, String> {
        if st.layers.len() > MAX_LAYERS {
            return Err(format!("saved disk has {} layers (at most {MAX_LAYERS})", st.layers.len()));
        }
        let base = Base::reopen(Path::new(&st.base), st.base_len, st.base_mtime_ns)?;
        let blocks = base.len.div_ceil(BLOCK);
        let mut frozen = Vec::with_capacity(st.layers.len());
        for id in &st.layers {
            let id = checked_id(id)?;
            let data = dir.join(layer_file(id));
            let file =
                std::fs::File::open(&data).map_err(|e| format!("cannot open disk layer {}: {e}", data.display()))?;
            let len = file.metadata().map_err(|e| format!("cannot stat {}: {e}", data.display()))?.len();
            if len != base.len {
                return Err(format!("disk layer {} is {len} bytes, the disk {}", data.display(), base.len));
            }
            let mp = dir.join(map_file(id));
            let bytes = std::fs::read(&mp).map_err(|e| format!("cannot read disk map {}: {e}", mp.display()))?;
            let m: DiskMap =
                envelope::decode(&MAP_KIND, &bytes).map_err(|e| format!("disk map {}: {e}", mp.display()))?;
            if m.block_size != BLOCK || m.blocks != blocks {
                return Err(format!(
                    "disk map {} is for {} blocks of {} bytes, the disk has {blocks} of {BLOCK}",
                    mp.display(),
                    m.blocks,
                    m.block_size
                ));
            }
            let map = Bitmap::from_runs(blocks, &m.runs).map_err(|e| format!("disk map {}: {e}", mp.display()))?;
            frozen.push(Arc::new(Layer::new(id.to_string(), file, map, true)));
        }
        let scratch = scratch.unwrap_or(dir).to_path_buf();
        CowDisk::assemble(Arc::new(base), frozen, st.read_only, scratch)
    }
}
