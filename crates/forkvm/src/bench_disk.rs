//! `forkvm bench disk`: copy-on-write disk clones of a 1 GiB raw image (time and host space per
//! clone, snapshot of the disk, restore of it) and the disk's own read/write costs.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Instant;

use vmm::devices::virtio::block::{CowDisk, DiskConfig};

use crate::cli::BenchArgs;
use crate::stats::{table_p99, Samples};

const GIB: u64 = 1 << 30;

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.blocks() * 512).sum())
        .unwrap_or(0)
}

pub fn bench_disk(args: &BenchArgs) -> Result<i32, String> {
    let s = |e: std::io::Error| e.to_string();
    let root = std::env::temp_dir().join(format!("forkvm-bench-disk-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).map_err(s)?;
    let result = run(args, &root);
    let _ = std::fs::remove_dir_all(&root);
    result
}

fn run(args: &BenchArgs, root: &Path) -> Result<i32, String> {
    let s = |e: std::io::Error| e.to_string();
    let img = root.join("base.img");
    // A 1 GiB image: 64 MiB of data at its start, the rest sparse (clone cost does not depend on it).
    let f = std::fs::File::create(&img).map_err(s)?;
    f.set_len(GIB).map_err(s)?;
    std::os::unix::fs::FileExt::write_all_at(&f, &vec![0x5au8; 64 << 20], 0).map_err(s)?;
    f.sync_all().map_err(s)?;
    let cfg = DiskConfig { path: img, read_only: false, scratch: Some(root.to_path_buf()) };
    let mut disk = CowDisk::create(&cfg)?;
    let runs = args.runs.max(1);
    let mut clone_idle = Samples::new("clone (freeze + child view), nothing written since", "ms");
    let mut overlay = Samples::new("  of which: new overlay (O_TMPFILE + ftruncate 1 GiB)", "ms");
    let mut clone_dirty = Samples::new("clone after 4 MiB of writes (freeze + child view)", "ms");
    let mut space = Samples::new("host space added by one clone (overlay files)", "KiB");
    let mut sync4 = Samples::new("fdatasync of 4 MiB of scattered writes (off the clone path)", "ms");
    let mut snap = Samples::new("disk snapshot (freeze + fdatasync new layers + link + maps)", "ms");
    let mut snap_space = Samples::new("host space of a disk snapshot (maps; layers linked)", "KiB");
    let mut restore = Samples::new("disk restore from a snapshot (open layers + maps)", "ms");
    let mut w4k = Samples::new("4 KiB write, copy-up from base (page cache)", "us");
    let mut r4k = Samples::new("4 KiB read through the layer stack", "us");
    let mut seq = Samples::new("1 MiB sequential writes", "MiB/s");
    let mut children = Vec::new();
    let scatter = |disk: &mut CowDisk, salt: u64, w4k: Option<&mut Samples>| -> Result<(), String> {
        let mut w4k = w4k;
        for k in 0..1024u64 {
            let t = Instant::now();
            disk.write_at(&[salt as u8; 4096], ((k * 7919 + salt * 13) % (GIB / 4096)) * 4096).map_err(s)?;
            if let Some(w) = w4k.as_deref_mut().filter(|_| k % 64 == 0) {
                w.values.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        Ok(())
    };
    for i in 0..runs {
        for j in 0..20 {
            let before = dir_bytes(root);
            let t = Instant::now();
            disk.freeze().map_err(s)?;
            let child = disk.clone_view(None)?;
            clone_idle.push_duration(t.elapsed());
            if j == 0 {
                space.values.push((dir_bytes(root).saturating_sub(before)) as f64 / 1024.0);
            }
            drop(child);
            let t = Instant::now();
            drop(vmm::devices::virtio::block::layer::scratch_file(root, GIB).map_err(s)?);
            overlay.push_duration(t.elapsed());
        }
        scatter(&mut disk, i as u64, Some(&mut w4k))?;
        let t = Instant::now();
        disk.freeze().map_err(s)?;
        children.push(disk.clone_view(None)?);
        clone_dirty.push_duration(t.elapsed());
        let mut buf = [0u8; 4096];
        for k in 0..64u64 {
            let t = Instant::now();
            disk.read_at(&mut buf, (k * 104_729 % (GIB / 4096)) * 4096).map_err(s)?;
            r4k.values.push(t.elapsed().as_secs_f64() * 1e6);
        }
        let sd = root.join(format!("snap{i}"));
        std::fs::create_dir_all(&sd).map_err(s)?;
        disk.write_at(&[1u8; 4096], 0).map_err(s)?;
        let t = Instant::now();
        let st = disk.persist(&sd)?;
        snap.push_duration(t.elapsed());
        let maps: u64 = std::fs::read_dir(&sd)
            .map_err(s)?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".map"))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum();
        snap_space.values.push(maps as f64 / 1024.0);
        let t = Instant::now();
        let r = CowDisk::open_saved(&st, &sd, Some(root))?;
        restore.push_duration(t.elapsed());
        drop(r);
        scatter(&mut disk, 1000 + i as u64, None)?;
        let t = Instant::now();
        disk.flush().map_err(s)?;
        sync4.push_duration(t.elapsed());
        let chunk = vec![7u8; 1 << 20];
        let t = Instant::now();
        for k in 0..32u64 {
            disk.write_at(&chunk, 256 * (1 << 20) + k * (1 << 20)).map_err(s)?;
        }
        disk.flush().map_err(s)?;
        seq.values.push(32.0 / t.elapsed().as_secs_f64());
    }
    let title = format!(
        "forkvm bench disk: 1 GiB raw image, copy-on-write overlays ({} KiB blocks), {runs} runs, {} layers at the end",
        vmm::devices::virtio::block::layer::BLOCK / 1024,
        disk.layers()
    );
    let rows = [clone_idle, overlay, clone_dirty, space, sync4, snap, snap_space, restore, w4k, r4k, seq];
    print!("{}", table_p99(&title, &rows));
    Ok(0)
}
