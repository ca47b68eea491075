//! Unit tests of garbage collection, owners, verification and the writer lock.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use crate::tests::{image, read_all, TempDir};
use crate::*;

fn open(d: &Path) -> Store {
    Store::open_or_create(d, StoreConfig::default()).unwrap()
}

#[test]
fn gc_drops_unreferenced_chunks_frees_space_and_keeps_the_rest_intact() {
    let d = TempDir::new();
    let st = open(d.path());
    let a = image(200, 4096, 1);
    let b = image(200, 4096, 2);
    st.put_image("a", &a).unwrap();
    let (mb, _) = st.put_image("b", &b).unwrap();
    let before = st.stats().unwrap();
    // Nothing to collect while both are referenced.
    let r0 = st.gc().unwrap();
    assert_eq!((r0.chunks_removed, r0.chunks_kept), (0, before.unique_chunks), "{r0:?}");

    st.remove_image("a").unwrap();
    let r = st.gc().unwrap();
    // a and b share the zero, 0xAB and text pages only; a's 80 random pages go.
    assert_eq!(r.chunks_removed, 80, "{r:?}");
    assert!(r.bytes_removed >= 80 * 4000, "{r:?}");
    assert!(r.disk_after + 60 * 4096 <= r.disk_before, "space not freed: {r:?}");
    assert_eq!(read_all(&st, &mb), b);
    assert!(st.verify().unwrap().is_ok());
    assert_eq!(st.gc().unwrap().chunks_removed, 0, "gc is idempotent");

    // Reopened, the store still serves b, and a written again dedups nothing from the holes.
    drop(st);
    let st = open(d.path());
    assert_eq!(read_all(&st, &st.manifest("b").unwrap()), b);
    let (ma, put) = st.put_image("a", &a).unwrap();
    assert_eq!(put.new_chunks, 80);
    assert_eq!(read_all(&st, &ma), a);
    assert!(st.verify().unwrap().is_ok());
}

#[test]
fn gc_stops_on_an_unreadable_manifest_without_dropping_anything() {
    let d = TempDir::new();
    let st = open(d.path());
    st.put_image("a", &image(20, 4096, 3)).unwrap();
    st.put_image("b", &image(20, 4096, 4)).unwrap();
    let chunks = st.stats().unwrap().unique_chunks;
    let mpath = d.path().join("manifests/a.manifest");
    let f = fs::OpenOptions::new().write(true).open(&mpath).unwrap();
    f.write_all_at(&[0xff], 60).unwrap();
    assert!(st.gc().is_err(), "gc went on past a corrupt manifest");
    let on_disk = decode_index(&fs::read(d.path().join("index")).unwrap()).unwrap();
    assert_eq!(on_disk.entries.len() as u64, chunks, "chunks were dropped");
    let rep = st.verify().unwrap();
    assert!(!rep.is_ok() && rep.problems.iter().any(|p| p.contains("manifest")), "{:?}", rep.problems);
}

#[test]
fn gc_frees_pack_bytes_an_interrupted_write_or_gc_left_unindexed() {
    let d = TempDir::new();
    let st = open(d.path());
    let (m, _) = st.put_image("a", &image(50, 4096, 5)).unwrap();
    // An index saved without a chunk that is still in the pack (what a crash between a gc's
    // index save and its hole punching leaves) is cleaned by the next gc.
    let mut ix = decode_index(&fs::read(d.path().join("index")).unwrap()).unwrap();
    let dropped = ix.entries.pop().unwrap();
    drop(st);
    fs::write(d.path().join("index"), encode_index(&ix)).unwrap();
    st_remove_manifest_ref(d.path(), "a");
    let st = open(d.path());
    let r = st.gc().unwrap();
    assert_eq!(r.chunks_removed, ix.entries.len() as u64);
    assert!(r.disk_after < r.disk_before, "{r:?}");
    let mut buf = vec![0u8; dropped.1.stored_len as usize];
    fs::File::open(d.path().join("pack")).unwrap().read_exact_at(&mut buf, dropped.1.offset).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "unindexed chunk bytes were not punched");
    let _ = m;
}

fn st_remove_manifest_ref(dir: &Path, name: &str) {
    fs::remove_file(dir.join(format!("manifests/{name}.manifest"))).unwrap();
}

#[test]
fn owners_are_recorded_and_go_with_their_image() {
    let d = TempDir::new();
    let st = open(d.path());
    st.put_image("a", &image(3, 4096, 6)).unwrap();
    assert_eq!(st.owner("a").unwrap(), None);
    st.set_owner("a", Path::new("/var/lib/x/hibernated")).unwrap();
    assert_eq!(st.owner("a").unwrap().as_deref(), Some(Path::new("/var/lib/x/hibernated")));
    assert!(st.set_owner("../evil", Path::new("/")).is_err());
    st.remove_image("a").unwrap();
    assert_eq!(st.owner("a").unwrap(), None);
    let ro = Store::open_readonly(d.path()).unwrap();
    assert!(matches!(ro.gc(), Err(Error::ReadOnly)));
}

#[test]
fn verify_reports_a_chunk_that_does_not_match_its_address() {
    let d = TempDir::new();
    let st = open(d.path());
    st.put_image("a", &image(10, 4096, 7)).unwrap();
    let ix = decode_index(&fs::read(d.path().join("index")).unwrap()).unwrap();
    let (_, e) = ix.entries[2];
    let pack = fs::OpenOptions::new().write(true).open(d.path().join("pack")).unwrap();
    pack.write_all_at(&[0x5a; 8], e.offset).unwrap();
    let rep = st.verify().unwrap();
    assert_eq!(rep.problems.len(), 1, "{:?}", rep.problems);
    assert!(rep.problems[0].contains("corrupt"), "{:?}", rep.problems);
}

#[test]
fn a_second_writer_waits_for_the_first_instead_of_failing() {
    let d = TempDir::new();
    let first = open(d.path());
    assert!(matches!(Store::open_or_create(d.path(), StoreConfig::default()), Err(Error::Locked(_))));
    let short = Store::open_or_create_wait(d.path(), StoreConfig::default(), Duration::from_millis(30));
    assert!(matches!(short, Err(Error::Locked(_))), "a bounded wait gives up");
    let dir = d.path().to_path_buf();
    let second = std::thread::spawn(move || {
        let st = Store::open_or_create_wait(&dir, StoreConfig::default(), Duration::from_secs(60)).unwrap();
        let m = st.manifest("from-first").unwrap();
        st.put_image("from-second", &image(4, 4096, 9)).unwrap();
        read_all(&st, &m)
    });
    let img = image(30, 4096, 8);
    first.put_image("from-first", &img).unwrap();
    drop(first);
    assert_eq!(second.join().unwrap(), img);
    let st = open(d.path());
    assert_eq!(st.list_images().unwrap(), vec!["from-first".to_string(), "from-second".to_string()]);
    assert!(st.verify().unwrap().is_ok());
}

/// Found by the `chunk_index` fuzz target: an index whose chunks overlap in the pack was accepted
/// (two chunks at the same offset); the store never writes one, so it is a lie and is refused.
#[test]
fn index_with_overlapping_chunks_is_rejected() {
    let e = |offset, stored_len| IndexEntry { offset, stored_len, raw_len: 4096, codec: Codec::Zstd };
    let ok = IndexContents {
        pack_len: 2064,
        entries: vec![(ChunkHash([1; 32]), e(16, 100)), (ChunkHash([2; 32]), e(116, 200))],
    };
    assert_eq!(decode_index(&encode_index(&ok)).unwrap(), ok);
    for bad in [
        vec![(ChunkHash([1; 32]), e(1040, 276)), (ChunkHash([2; 32]), e(1040, 19))],
        vec![(ChunkHash([1; 32]), e(16, 100)), (ChunkHash([2; 32]), e(115, 200))],
    ] {
        let ix = IndexContents { pack_len: 2064, entries: bad };
        let err = decode_index(&encode_index(&ix)).unwrap_err();
        assert!(err.to_string().contains("overlap"), "{err}");
    }
}
