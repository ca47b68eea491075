//! `forkvm store import --firecracker MEMFILE`: a Firecracker guest memory file into the chunk
//! store (holes and zero pages skipped, zstd chunks, pages deduplicated against everything
//! already stored), under a content id that `forkvm pagesrv --memory` serves.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use chunkstore::{Store, StoreConfig};
use clap::Args;

use crate::hibernate_cmd::default_store;

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// A Firecracker guest memory file (the `mem_file_path` of `PUT /snapshot/create`).
    #[arg(long, required = true)]
    pub firecracker: PathBuf,
    /// Chunk store directory (default: $FORKVM_STORE, else /var/lib/forkvm/store for root, else
    /// ~/.local/share/forkvm/store).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Image id (default: fc-<16 hex digits of the file's blake3>, so importing the same file
    /// again finds the image already there).
    #[arg(long)]
    pub name: Option<String>,
}

/// Data extents of a possibly sparse file: `(offset, len)`, holes left out.
fn extents(f: &File, len: u64) -> Vec<(u64, u64)> {
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        // SAFETY: lseek on an fd we own takes plain integers.
        let data = unsafe { libc::lseek(fd, pos as i64, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: no data after pos. Any other error: treat the rest as data.
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO) {
                out.push((pos, len - pos));
            }
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len } else { (hole as u64).min(len) };
        out.push((data as u64, end - data as u64));
        pos = end;
    }
    out
}

/// Call `f` with the file's bytes in order, pieces of at most 8 MiB, and the holes as `None`.
fn for_each_piece(path: &Path, mut f: impl FnMut(u64, Option<&[u8]>) -> Result<(), String>) -> Result<u64, String> {
    let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    let len = meta.len();
    if len == 0 || len % 4096 != 0 {
        return Err(format!(
            "{} is not a Firecracker memory file: its length {len} is not a non-zero multiple of 4 KiB",
            path.display()
        ));
    }
    let mut buf = vec![0u8; 8 << 20];
    let mut pos = 0u64;
    for (off, n) in extents(&file, len) {
        if off > pos {
            f(off - pos, None)?;
        }
        let mut done = 0u64;
        while done < n {
            let k = (n - done).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..k], off + done).map_err(|e| format!("read {}: {e}", path.display()))?;
            f(k as u64, Some(&buf[..k]))?;
            done += k as u64;
        }
        pos = off + n;
    }
    if pos < len {
        f(len - pos, None)?;
    }
    Ok(len)
}

/// The default image id: blake3 of the data extents (offset, bytes) and the length.
fn content_id(path: &Path) -> Result<String, String> {
    let mut h = blake3::Hasher::new();
    let mut at = 0u64;
    let len = for_each_piece(path, |n, data| {
        if let Some(d) = data {
            h.update(&at.to_le_bytes());
            h.update(d);
        }
        at += n;
        Ok(())
    })?;
    h.update(&len.to_le_bytes());
    Ok(format!("fc-{}", &h.finalize().to_hex()[..16]))
}

fn mib(b: u64) -> f64 {
    b as f64 / f64::from(1u32 << 20)
}

/// What an import did.
#[derive(Debug)]
pub struct Imported {
    pub id: String,
    pub store: PathBuf,
    /// None if the image was already stored.
    pub put: Option<chunkstore::PutStats>,
    pub image: chunkstore::SpaceStats,
    pub secs: f64,
}

pub fn import(a: &ImportArgs) -> Result<i32, String> {
    let r = import_file(&a.firecracker, a.store.clone().unwrap_or_else(default_store), a.name.clone())?;
    print_import(&a.firecracker, &r);
    Ok(0)
}

/// Imports `file` into the store at `dir` as `name` (default: its content id).
pub fn import_file(file: &Path, dir: PathBuf, name: Option<String>) -> Result<Imported, String> {
    let t0 = Instant::now();
    let id = match name {
        Some(n) => n,
        None => content_id(file)?,
    };
    let store = Store::open_or_create(&dir, StoreConfig::default()).map_err(|e| e.to_string())?;
    if let Ok(m) = store.manifest(&id) {
        let image = store.image_stats(&m);
        return Ok(Imported { id, store: dir, put: None, image, secs: t0.elapsed().as_secs_f64() });
    }
    let mut w = store.image_writer(&id).map_err(|e| e.to_string())?;
    for_each_piece(file, |n, data| {
        match data {
            Some(d) => w.write(d),
            None => w.write_zeros(n),
        }
        .map_err(|e| e.to_string())
    })?;
    let (m, put) = w.finish().map_err(|e| e.to_string())?;
    let image = store.image_stats(&m);
    Ok(Imported { id, store: dir, put: Some(put), image, secs: t0.elapsed().as_secs_f64() })
}

fn print_import(file: &Path, r: &Imported) {
    let (id, s) = (&r.id, &r.image);
    // The id alone on the first line either way, so `id=$(... | head -1)` works again.
    println!("{id}");
    let Some(put) = &r.put else {
        println!(
            "already in {} ({:.1} MiB, stored in {:.1} MiB); nothing to do",
            r.store.display(),
            mib(s.logical_bytes),
            mib(s.stored_bytes)
        );
        return;
    };
    println!(
        "imported {} ({:.1} MiB, {} pages) into {} in {:.2} s ({:.0} MB/s)",
        file.display(),
        mib(put.logical_bytes),
        put.pages,
        r.store.display(),
        r.secs,
        put.logical_bytes as f64 / 1e6 / r.secs
    );
    println!(
        "  pages: {} zero (skipped), {} deduplicated (already stored), {} new chunks",
        put.zero_pages, put.deduped_pages, put.new_chunks
    );
    println!(
        "  new data: {:.1} MiB raw -> {:.1} MiB zstd ({:.2}x); the image: {:.1} MiB in {:.1} MiB of chunks \
         (compression {:.2}x, dedup {:.2}x, overall {:.1}x)",
        mib(put.new_raw_bytes),
        mib(put.new_stored_bytes),
        put.new_raw_bytes as f64 / put.new_stored_bytes.max(1) as f64,
        mib(s.logical_bytes),
        mib(s.stored_bytes),
        s.compression_ratio(),
        s.dedup_ratio(),
        s.overall_ratio()
    );
    println!("  serve it: forkvm pagesrv --socket PATH --memory {id} --store {}", r.store.display());
}
