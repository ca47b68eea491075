//! Streaming image writer: hashes pages, drops zero pages, dedups, and
//! compresses new chunks on up to `StoreConfig::threads` threads.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::MutexGuard;
use std::time::Instant;

use crate::codec::Compressor;
use crate::error::{Error, Result};
use crate::hash::ChunkHash;
use crate::index::IndexEntry;
use crate::manifest::Manifest;
use crate::stats::PutStats;
use crate::store::{zero_ref, Store};

/// Pages processed per batch (hash, dedup, compress, append).
const BATCH_PAGES: usize = 2048;

/// Writes one image into the store. Feed it bytes with [`ImageWriter::write`]
/// in any split (they are cut into pages), then call [`ImageWriter::finish`],
/// which makes the new chunks durable, then saves the index and the manifest.
/// Dropping the writer without `finish` leaves no manifest; chunks already
/// appended stay in the pack and are reused by later writes once indexed.
#[derive(Debug)]
pub struct ImageWriter<'a> {
    store: &'a Store,
    _guard: MutexGuard<'a, ()>,
    name: String,
    path: PathBuf,
    page_size: usize,
    chunks: Vec<ChunkHash>,
    chunk_pos: HashMap<ChunkHash, u32>,
    pages: Vec<u32>,
    pending: Vec<u8>,
    len: u64,
    stats: PutStats,
    started: Instant,
}

enum Hashed {
    Zero,
    Data(ChunkHash),
}

impl<'a> ImageWriter<'a> {
    pub(crate) fn new(store: &'a Store, name: String, path: PathBuf) -> Result<Self> {
        let guard = store.write_lock.lock().map_err(|_| Error::InvalidArgument("write lock poisoned".into()))?;
        Ok(ImageWriter {
            store,
            _guard: guard,
            name,
            path,
            page_size: store.config.page_size,
            chunks: Vec::new(),
            chunk_pos: HashMap::new(),
            pages: Vec::new(),
            pending: Vec::new(),
            len: 0,
            stats: PutStats::default(),
            started: Instant::now(),
        })
    }

    /// Append image bytes.
    pub fn write(&mut self, mut data: &[u8]) -> Result<()> {
        let ps = self.page_size;
        self.len += data.len() as u64;
        if !self.pending.is_empty() {
            let take = (ps - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() == ps {
                let p = std::mem::take(&mut self.pending);
                self.process(&p)?;
            }
        }
        let full = data.len() / ps * ps;
        for batch in data[..full].chunks(BATCH_PAGES * ps) {
            self.process(batch)?;
        }
        self.pending.extend_from_slice(&data[full..]);
        Ok(())
    }

    /// Append zero bytes without materialising them (for holes).
    pub fn write_zeros(&mut self, mut len: u64) -> Result<()> {
        let ps = self.page_size as u64;
        while len > 0 && !self.pending.is_empty() {
            let n = (ps - self.pending.len() as u64).min(len) as usize;
            self.write(&vec![0u8; n])?;
            len -= n as u64;
        }
        let whole = len / ps;
        self.pages.extend(std::iter::repeat_n(zero_ref(), whole as usize));
        self.stats.zero_pages += whole;
        self.len += whole * ps;
        let rest = (len % ps) as usize;
        if rest > 0 {
            self.write(&vec![0u8; rest])?;
        }
        Ok(())
    }

    /// Process whole pages.
    fn process(&mut self, data: &[u8]) -> Result<()> {
        let ps = self.page_size;
        let pages: Vec<&[u8]> = data.chunks_exact(ps).collect();
        let threads = self.store.config.threads.clamp(1, 8);
        let hashed = par_map(
            &pages,
            threads,
            |_| Ok(()),
            |(), p: &&[u8]| Ok(if is_zero(p) { Hashed::Zero } else { Hashed::Data(ChunkHash::of(p)) }),
        )?;
        // Decide which pages need storing.
        let mut new: Vec<(ChunkHash, &[u8])> = Vec::new();
        {
            let index = self.store.index.read().map_err(|_| Error::InvalidArgument("index lock poisoned".into()))?;
            let mut queued = std::collections::HashSet::new();
            for (h, p) in hashed.iter().zip(&pages) {
                match h {
                    Hashed::Zero => {
                        self.pages.push(zero_ref());
                        self.stats.zero_pages += 1;
                    }
                    Hashed::Data(h) => {
                        let next = self.chunks.len() as u32;
                        let pos = *self.chunk_pos.entry(*h).or_insert(next);
                        if pos == next {
                            self.chunks.push(*h);
                        }
                        self.pages.push(pos);
                        if index.map.contains_key(h) || !queued.insert(*h) {
                            self.stats.deduped_pages += 1;
                        } else {
                            new.push((*h, *p));
                        }
                    }
                }
            }
        }
        self.stats.pages += pages.len() as u64;
        if new.is_empty() {
            return Ok(());
        }
        let (codec, level) = (self.store.config.codec, self.store.config.level);
        let threads = if new.len() < 64 { 1 } else { threads };
        let compressed = par_map(
            &new,
            threads,
            |_| Compressor::new(codec, level).map_err(|e| Error::InvalidArgument(format!("compressor: {e}"))),
            |c: &mut Compressor, (_, p): &(ChunkHash, &[u8])| Ok(c.compress(p)),
        )?;
        let mut index = self.store.index.write().map_err(|_| Error::InvalidArgument("index lock poisoned".into()))?;
        let base = index.pack_len;
        let total: usize = compressed.iter().map(|(_, b)| b.len()).sum();
        let mut blob = Vec::with_capacity(total);
        let mut entries = Vec::with_capacity(new.len());
        for ((h, p), (codec, bytes)) in new.iter().zip(&compressed) {
            entries.push((
                *h,
                IndexEntry {
                    offset: base + blob.len() as u64,
                    stored_len: bytes.len() as u32,
                    raw_len: p.len() as u32,
                    codec: *codec,
                },
            ));
            blob.extend_from_slice(bytes);
            self.stats.new_raw_bytes += p.len() as u64;
        }
        // Data first, then make it visible to readers.
        self.store.pack.write_at(&blob, base)?;
        index.pack_len = base + blob.len() as u64;
        index.map.extend(entries);
        self.stats.new_chunks += new.len() as u64;
        self.stats.new_stored_bytes += blob.len() as u64;
        Ok(())
    }

    /// Flush, make the pack durable, save index and manifest.
    pub fn finish(mut self) -> Result<(Manifest, PutStats)> {
        if !self.pending.is_empty() {
            let mut p = std::mem::take(&mut self.pending);
            p.resize(self.page_size, 0);
            self.process(&p)?;
        }
        self.store.pack.sync()?;
        {
            let index = self.store.index.read().map_err(|_| Error::InvalidArgument("index lock poisoned".into()))?;
            index.save(&self.store.dir.join("index"))?;
        }
        let m = Manifest {
            name: std::mem::take(&mut self.name),
            page_size: self.page_size as u32,
            image_len: self.len,
            chunks: std::mem::take(&mut self.chunks),
            pages: std::mem::take(&mut self.pages),
        };
        m.save(&self.path)?;
        self.stats.logical_bytes = self.len;
        self.stats.elapsed = self.started.elapsed();
        tracing::debug!(image = %m.name, stats = ?self.stats, "image stored");
        Ok((m, self.stats.clone()))
    }
}

/// True if every byte is zero.
pub fn is_zero(p: &[u8]) -> bool {
    let mut words = p.chunks_exact(16);
    let acc = words.by_ref().fold(0u128, |a, c| a | u128::from_ne_bytes(c.try_into().unwrap_or([0xff; 16])));
    acc == 0 && words.remainder().iter().all(|&b| b == 0)
}

/// Map `f` over `items` on `threads` scoped threads, keeping order.
fn par_map<T: Sync, S, R: Send>(
    items: &[T],
    threads: usize,
    init: impl Fn(usize) -> Result<S> + Sync,
    f: impl Fn(&mut S, &T) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    if threads <= 1 || items.len() < 2 {
        let mut s = init(0)?;
        return items.iter().map(|t| f(&mut s, t)).collect();
    }
    let per = items.len().div_ceil(threads);
    let parts: Vec<Result<Vec<R>>> = std::thread::scope(|sc| {
        let handles: Vec<_> = items
            .chunks(per)
            .enumerate()
            .map(|(i, part)| {
                let (init, f) = (&init, &f);
                sc.spawn(move || {
                    let mut s = init(i)?;
                    part.iter().map(|t| f(&mut s, t)).collect::<Result<Vec<R>>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(Error::InvalidArgument("worker thread panicked".into()))))
            .collect()
    });
    let mut out = Vec::with_capacity(items.len());
    for p in parts {
        out.extend(p?);
    }
    Ok(out)
}
