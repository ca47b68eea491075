//! KVM tier: old snapshots keep working. `fixtures/snapshot-v3` was written by format-3 forkvm
//! (see examples/snapshot_fixture.rs): a 64 MiB test guest after `touch 0x400000 16 0x5a` and
//! two `count`s. It must restore, exactly, forever; a future format change either keeps it
//! restorable or changes this test to expect "snapshot format 3 is not supported".
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vmm::{MicroVm, RestoreMode, RestoreOptions};

const T: Duration = Duration::from_secs(60);

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/snapshot-v3")
}

/// The fixture unpacked into a fresh directory (memory written sparse: non-zero pages only).
fn unpack(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("forkvm-old-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture().join("state"), dir.join("state")).unwrap();
    let mem = zstd::decode_all(std::fs::File::open(fixture().join("memory.zst")).unwrap()).unwrap();
    assert_eq!(mem.len(), 64 << 20);
    let f = std::fs::File::create(dir.join("memory")).unwrap();
    f.set_len(mem.len() as u64).unwrap();
    for (i, page) in mem.chunks(4096).enumerate() {
        if page.iter().any(|&b| b != 0) {
            f.write_all_at(page, i as u64 * 4096).unwrap();
        }
    }
    dir
}

#[test]
fn the_committed_format_3_snapshot_restores_exactly() {
    let dir = unpack("restore");
    let sum = test_guest::sum_bytes(&[0x5a; 16 * 4096]);
    for mode in [RestoreMode::Cow, RestoreMode::Eager] {
        let vm = MicroVm::restore(&dir, mode, RestoreOptions { expect_mem: Some(64 << 20), ..Default::default() })
            .unwrap_or_else(|e| panic!("the format-3 fixture no longer restores ({mode:?}): {e}"));
        assert_eq!(vm.command("count", T).unwrap(), "count 3", "{mode:?}");
        assert_eq!(vm.command("sum 0x400000 16", T).unwrap(), format!("sum {sum:016x}"), "{mode:?}");
        assert_eq!(vm.command("gen", T).unwrap(), "gen 2");
        assert_eq!(vm.command("ping", T).unwrap(), "pong");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn other_snapshot_formats_are_refused_clearly() {
    let dir = unpack("formats");
    let good = std::fs::read(dir.join("state")).unwrap();
    for version in [1u32, 2, 4, 99] {
        let mut bytes = good.clone();
        bytes[8..12].copy_from_slice(&version.to_le_bytes());
        std::fs::write(dir.join("state"), &bytes).unwrap();
        let e = MicroVm::restore(&dir, RestoreMode::Cow, RestoreOptions::default()).map(drop).unwrap_err();
        let want = format!("snapshot format {version} is not supported");
        assert!(e.to_string().contains(&want), "{e}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
