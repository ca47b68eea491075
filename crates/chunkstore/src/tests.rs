//! Unit tests of the store.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::*;

pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "chunkstore-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        TempDir(p)
    }
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// Zero pages, repeated pages, text-like pages and random pages.
pub(crate) fn image(pages: usize, ps: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    let mut v = vec![0u8; pages * ps];
    for (i, p) in v.chunks_exact_mut(ps).enumerate() {
        match i % 5 {
            0 => {}
            1 => p.fill(0xAB),
            2 => {
                for (j, b) in p.iter_mut().enumerate() {
                    *b = b"the quick brown fox "[(j + i) % 20];
                }
            }
            _ => {
                for b in p.iter_mut() {
                    *b = rng(&mut s) as u8;
                }
            }
        }
    }
    v
}

pub(crate) fn read_all(store: &Store, m: &Manifest) -> Vec<u8> {
    let mut out = vec![0u8; m.page_count() as usize * m.page_size()];
    store.read_pages(m, 0, &mut out).unwrap();
    out.truncate(m.image_len() as usize);
    out
}

fn cfg(page_size: usize, codec: Codec) -> StoreConfig {
    StoreConfig { page_size, codec, ..Default::default() }
}

#[test]
fn round_trip_zstd_lz4_and_8k() {
    for (ps, codec) in [(4096, Codec::Zstd), (4096, Codec::Lz4), (8192, Codec::Zstd), (8192, Codec::Lz4)] {
        let d = TempDir::new();
        let img = image(300, ps, 42);
        {
            let store = Store::open_or_create(d.path(), cfg(ps, codec)).unwrap();
            let (m, st) = store.put_image("a", &img).unwrap();
            assert_eq!(m.page_size(), ps);
            assert_eq!(st.pages, 300);
            assert_eq!(read_all(&store, &m), img);
            // page by page too
            let mut p = vec![0u8; ps];
            for i in 0..300u64 {
                store.read_page(&m, i, &mut p).unwrap();
                assert_eq!(p, img[i as usize * ps..][..ps]);
            }
        }
        // Reopen (read-only and writable) and read again.
        let ro = Store::open_readonly(d.path()).unwrap();
        let m = ro.manifest("a").unwrap();
        assert_eq!(read_all(&ro, &m), img);
        assert!(ro.verify().unwrap().is_ok());
    }
}

#[test]
fn odd_length_and_streaming_writer() {
    let d = TempDir::new();
    let store = Store::open_or_create(d.path(), StoreConfig::default()).unwrap();
    let mut img = image(10, 4096, 1);
    img.truncate(10 * 4096 - 100);
    let mut w = store.image_writer("odd").unwrap();
    for piece in img.chunks(1000) {
        w.write(piece).unwrap();
    }
    w.write_zeros(3 * 4096 + 5).unwrap();
    let (m, _) = w.finish().unwrap();
    let mut expect = img.clone();
    expect.resize(img.len() + 3 * 4096 + 5, 0);
    assert_eq!(m.image_len(), expect.len() as u64);
    assert_eq!(read_all(&store, &m), expect);
    assert_eq!(store.list_images().unwrap(), vec!["odd".to_string()]);
}

#[test]
fn zero_pages_not_stored() {
    let d = TempDir::new();
    let store = Store::open_or_create(d.path(), StoreConfig::default()).unwrap();
    let img = vec![0u8; 1000 * 4096];
    let (m, st) = store.put_image("z", &img).unwrap();
    assert_eq!(st.zero_pages, 1000);
    assert_eq!(st.new_chunks, 0);
    assert_eq!(m.zero_pages(), 1000);
    assert!(m.all_zero(0, 1000));
    assert_eq!(fs::metadata(d.path().join("pack")).unwrap().len(), 16);
    assert_eq!(read_all(&store, &m), img);
}

#[test]
fn dedup_across_images() {
    let d = TempDir::new();
    let store = Store::open_or_create(d.path(), StoreConfig::default()).unwrap();
    let a = image(500, 4096, 7);
    let (_, sa) = store.put_image("a", &a).unwrap();
    // Within image a: pages i%5==1 are all the same, text pages repeat with period 20.
    assert!(sa.deduped_pages > 90, "{sa:?}");
    let pack_after_a = fs::metadata(d.path().join("pack")).unwrap().len();
    // b = a with 10 pages changed.
    let mut b = a.clone();
    for i in 0..10 {
        b[i * 4096 * 7 + 3] ^= 0x5A;
    }
    let (mb, sb) = store.put_image("b", &b).unwrap();
    assert!(sb.new_chunks <= 10, "{sb:?}");
    let pack_after_b = fs::metadata(d.path().join("pack")).unwrap().len();
    assert!(pack_after_b - pack_after_a <= 10 * 4096);
    assert_eq!(read_all(&store, &mb), b);
    let ma = store.manifest("a").unwrap();
    assert_eq!(read_all(&store, &ma), a);
    let st = store.stats().unwrap();
    assert_eq!(st.images, 2);
    assert!(st.dedup_ratio() > 2.0, "{st:?}");
    let one = store.image_stats(&ma);
    assert!(one.compression_ratio() > 1.0);
    // Same image again: nothing new.
    let (_, again) = store.put_image("a2", &a).unwrap();
    assert_eq!(again.new_chunks, 0);
}

/// Offset in the pack of the chunk of page `page` of `m`.
fn chunk_offset(store: &Store, m: &Manifest, page: u64) -> IndexEntry {
    match m.page(page).unwrap() {
        PageRef::Chunk(h) => store.chunk_entry(h).unwrap(),
        PageRef::Zero => panic!("zero page"),
    }
}

#[test]
fn corrupt_chunk_byte_is_an_error() {
    for codec in [Codec::Zstd, Codec::Lz4] {
        let d = TempDir::new();
        let store = Store::open_or_create(d.path(), cfg(4096, codec)).unwrap();
        let img = image(20, 4096, 3);
        let (m, _) = store.put_image("a", &img).unwrap();
        // Page 3 is random (stored raw), page 2 is text (compressed).
        for page in [2u64, 3] {
            let e = chunk_offset(&store, &m, page);
            let f = fs::OpenOptions::new().read(true).write(true).open(d.path().join("pack")).unwrap();
            let mut b = [0u8; 1];
            let at = e.offset + u64::from(e.stored_len) / 2;
            f.read_exact_at(&mut b, at).unwrap();
            b[0] ^= 0x01;
            f.write_all_at(&b, at).unwrap();
            let mut buf = vec![0xEEu8; 4096];
            let err = store.read_page(&m, page, &mut buf).unwrap_err();
            assert!(matches!(err, Error::CorruptChunk { .. }), "{err}");
            assert!(buf.iter().all(|&x| x == 0), "garbage left in buffer");
            // A batch containing it fails too; neighbours alone still work.
            let mut big = vec![0u8; 8 * 4096];
            assert!(store.read_pages(&m, 0, &mut big).is_err());
            store.read_page(&m, 4, &mut buf).unwrap();
            b[0] ^= 0x01;
            f.write_all_at(&b, at).unwrap();
        }
        // Corrupt once more and check verify() finds it.
        let e = chunk_offset(&store, &m, 2);
        let f = fs::OpenOptions::new().write(true).open(d.path().join("pack")).unwrap();
        f.write_all_at(&[0xFF, 0xFF, 0xFF], e.offset).unwrap();
        let rep = store.verify().unwrap();
        assert_eq!(rep.problems.len(), 1, "{rep:?}");
    }
}

#[test]
fn truncated_pack_is_an_error() {
    let d = TempDir::new();
    let img = image(20, 4096, 5);
    {
        let store = Store::open_or_create(d.path(), StoreConfig::default()).unwrap();
        store.put_image("a", &img).unwrap();
    }
    let pack = d.path().join("pack");
    let len = fs::metadata(&pack).unwrap().len();
    fs::OpenOptions::new().write(true).open(&pack).unwrap().set_len(len - 10).unwrap();
    let e = Store::open_readonly(d.path()).unwrap_err();
    assert!(matches!(e, Error::PackTruncated { .. }), "{e}");
    assert!(e.to_string().contains("truncated"));
    let e = Store::open_or_create(d.path(), StoreConfig::default()).unwrap_err();
    assert!(matches!(e, Error::PackTruncated { .. }), "{e}");
}

#[test]
fn truncated_pack_while_open_is_an_error() {
    let d = TempDir::new();
    let store = Store::open_or_create(d.path(), StoreConfig::default()).unwrap();
    let img = image(20, 4096, 5);
    let (m, _) = store.put_image("a", &img).unwrap();
    let last = (0..20).filter(|&p| !m.is_zero(p)).max_by_key(|&p| chunk_offset(&store, &m, p).offset).unwrap();
    let pack = d.path().join("pack");
    let len = fs::metadata(&pack).unwrap().len();
    fs::OpenOptions::new().write(true).open(&pack).unwrap().set_len(len - 10).unwrap();
    let mut buf = vec![0u8; 4096];
    let e = store.read_page(&m, last, &mut buf).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
}

#[test]
fn corrupted_or_truncated_manifest_and_index_are_rejected() {
    let d = TempDir::new();
    {
        let store = Store::open_or_create(d.path(), StoreConfig::default()).unwrap();
        store.put_image("a", &image(30, 4096, 9)).unwrap();
    }
    let man = d.path().join("manifests/a.manifest");
    let idx = d.path().join("index");
    let orig_m = fs::read(&man).unwrap();
    let orig_i = fs::read(&idx).unwrap();
    for (path, orig) in [(&man, &orig_m), (&idx, &orig_i)] {
        let cases: Vec<Vec<u8>> = vec![
            orig[..orig.len() - 1].to_vec(),
            orig[..20].to_vec(),
            Vec::new(),
            {
                let mut v = orig.clone();
                let n = v.len();
                v[n - 5] ^= 0x10;
                v
            },
            {
                let mut v = orig.clone();
                v[0] = b'X';
                v
            },
            {
                let mut v = orig.clone();
                v[8] = 99; // version
                v
            },
        ];
        for bad in cases {
            fs::write(path, &bad).unwrap();
            let r = Store::open_readonly(d.path()).and_then(|s| s.manifest("a"));
            let e = r.unwrap_err();
            assert!(matches!(e, Error::BadEnvelope { .. } | Error::Malformed { .. }), "{e}");
        }
        fs::write(path, orig).unwrap();
    }
    let s = Store::open_readonly(d.path()).unwrap();
    assert!(s.manifest("a").is_ok());
    assert!(matches!(s.manifest("nope"), Err(Error::NoSuchImage(_))));
    assert!(matches!(s.manifest("../x"), Err(Error::BadName(_))));
}

#[test]
fn payload_that_passes_checksum_but_lies_is_rejected() {
    // A manifest page referring past the chunk table.
    let m = manifest::Manifest { name: "x".into(), page_size: 4096, image_len: 4096, chunks: vec![], pages: vec![5] };
    let e = manifest::Manifest::decode(Path::new("m"), &m.encode()).unwrap_err();
    assert!(e.to_string().contains("refers to chunk"), "{e}");
    // An index entry outside the pack.
    let mut i = index::Index::new();
    i.map.insert(ChunkHash([1; 32]), IndexEntry { offset: 16, stored_len: 100, raw_len: 4096, codec: Codec::Zstd });
    let e = index::Index::decode(Path::new("i"), &i.encode()).unwrap_err();
    assert!(e.to_string().contains("outside the pack"), "{e}");
}

#[test]
fn writer_lock_and_bad_config() {
    let d = TempDir::new();
    let _s = Store::open_or_create(d.path(), StoreConfig::default()).unwrap();
    assert!(matches!(Store::open_or_create(d.path(), StoreConfig::default()), Err(Error::Locked(_))));
    let d2 = TempDir::new();
    assert!(Store::open_or_create(d2.path(), cfg(3000, Codec::Zstd)).is_err());
}

#[test]
fn readonly_store_sees_new_images_after_reload() {
    let d = TempDir::new();
    let w = Store::open_or_create(d.path(), StoreConfig::default()).unwrap();
    w.put_image("a", &image(10, 4096, 1)).unwrap();
    let r = Store::open_readonly(d.path()).unwrap();
    assert!(matches!(r.put_image("x", &[1]), Err(Error::ReadOnly)));
    let img_b = image(10, 4096, 2);
    w.put_image("b", &img_b).unwrap();
    let mb = r.manifest("b").unwrap();
    let mut buf = vec![0u8; 10 * 4096];
    assert!(r.read_pages(&mb, 0, &mut buf).is_err()); // stale index
    r.reload_index().unwrap();
    r.read_pages(&mb, 0, &mut buf).unwrap();
    assert_eq!(buf, img_b);
}
