//! Writes the committed seed corpora (fuzz/seeds/<target>/) from real files: a chunk store built
//! with the store's own writer, a working set and handshakes encoded by pagesrv, and snapshot
//! states of the test guest booted on this host's /dev/kvm. Run by tools/fuzz-seeds.sh.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chunkstore::{Codec, Store, StoreConfig};
use pagesrv::fc::GuestRegionUffdMapping;
use pagesrv::WorkingSet;
use vmm::{MicroVm, SnapshotKind, VmConfig};

const CS_HEADER: usize = chunkstore::envelope::HEADER_LEN;

type R<T> = Result<T, Box<dyn std::error::Error>>;

fn put(dir: &Path, target: &str, name: &str, bytes: &[u8]) -> R<()> {
    let d = dir.join(target);
    std::fs::create_dir_all(&d)?;
    std::fs::write(d.join(name), bytes)?;
    Ok(())
}

/// An enveloped file as two seeds: the file itself (mode byte 1) and its payload to be sealed
/// by the target (mode byte 0). `header` is the envelope's header length.
fn put_enveloped(dir: &Path, target: &str, name: &str, file: &[u8], header: usize) -> R<()> {
    let mut whole = vec![1u8];
    whole.extend_from_slice(file);
    put(dir, target, &format!("{name}.file"), &whole)?;
    let mut payload = vec![0u8];
    payload.extend_from_slice(&file[header..]);
    put(dir, target, &format!("{name}.payload"), &payload)
}

fn image(pages: usize, seed: u8) -> Vec<u8> {
    let mut v = vec![0u8; pages * 4096];
    for (i, page) in v.chunks_mut(4096).enumerate() {
        match i % 4 {
            0 => {}                                                                     // zero page
            1 => page.fill(seed),                                                       // duplicated
            2 => page.iter_mut().enumerate().for_each(|(j, b)| *b = (j * 7 + i) as u8), // compressible
            _ => page.iter_mut().enumerate().for_each(|(j, b)| *b = ((j * 2654435761 + i * 97) >> 13) as u8),
        }
    }
    v
}

fn store_seeds(out: &Path, tmp: &Path) -> R<()> {
    for (k, codec) in [Codec::Zstd, Codec::Lz4].into_iter().enumerate() {
        let dir = tmp.join(format!("store{k}"));
        let st = Store::open_or_create(&dir, StoreConfig { codec, threads: 1, ..Default::default() })?;
        st.put_image("a", &image(9, 0x11))?;
        st.put_image("b", &image(5, 0x22)[..5 * 4096 - 100])?;
        drop(st);
        put_enveloped(out, "chunk_index", &format!("index-{k}"), &std::fs::read(dir.join("index"))?, CS_HEADER)?;
        for m in ["a", "b"] {
            let f = std::fs::read(dir.join(format!("manifests/{m}.manifest")))?;
            put_enveloped(out, "chunk_manifest", &format!("{m}-{k}"), &f, CS_HEADER)?;
        }
        let ix = chunkstore::decode_index(&std::fs::read(dir.join("index"))?)?;
        let pack = std::fs::read(dir.join("pack"))?;
        for (n, (h, e)) in ix.entries.iter().take(3).enumerate() {
            let codec = match e.codec {
                Codec::Raw => 0u8,
                Codec::Zstd => 1,
                Codec::Lz4 => 2,
            };
            let mut s = vec![codec];
            s.extend_from_slice(&(e.raw_len as u16).to_le_bytes());
            s.extend_from_slice(&h.0);
            s.extend_from_slice(&pack[e.offset as usize..(e.offset + u64::from(e.stored_len)) as usize]);
            put(out, "chunk_data", &format!("chunk-{k}-{n}"), &s)?;
        }
    }
    Ok(())
}

fn pagesrv_seeds(out: &Path) -> R<()> {
    let ws = WorkingSet { page_size: 4096, ranges: vec![(0, 65536), (0x20_0000, 4096), (0x10_0000, 0x2_0000)] };
    put_enveloped(out, "working_set", "wset", &ws.encode(), CS_HEADER)?;
    put_enveloped(out, "working_set", "empty", &WorkingSet { page_size: 4096, ranges: vec![] }.encode(), CS_HEADER)?;
    let m = |base, size, offset| GuestRegionUffdMapping { base_host_virt_addr: base, size, offset, page_size: 4096 };
    let one = vec![m(0x7f00_0000_0000, 0x800_0000, 0)];
    let two = vec![m(0x7f00_0000_0000, 0xc000_0000, 0), m(0x7f10_0000_0000, 0x4000_0000, 0xc000_0000)];
    put(out, "fc_handshake", "one", &serde_json::to_vec(&one)?)?;
    put(out, "fc_handshake", "two", &serde_json::to_vec(&two)?)?;
    let old = r#"[{"base_host_virt_addr":140737488355328,"size":134217728,"offset":0,"page_size_kib":4}]"#;
    put(out, "fc_handshake", "old-kib", old.as_bytes())?;
    Ok(())
}

fn api_seeds(out: &Path) -> R<()> {
    let lines = [
        r#"{"op":"status"}"#,
        r#"{"op":"pause"}"#,
        r#"{"op":"resume"}"#,
        r#"{"op":"exec","line":"sum 0x200000 4","wait_for":"sum","timeout_ms":5000}"#,
        r#"{"op":"agent_exec","argv":["sh","-c","echo hi"],"env":[["A","b"]],"cwd":"/","stdin":"x","timeout_ms":1000}"#,
        r#"{"op":"snapshot","dir":"/tmp/snap","diff":true}"#,
        r#"{"op":"fork","count":2,"prefix":"child-"}"#,
        r#"{"op":"hibernate","store":"/var/lib/forkvm/store"}"#,
        r#"{"op":"stop"}"#,
    ];
    for (i, l) in lines.iter().enumerate() {
        // Through the real parser and serializer, so the seeds are what clients send.
        let req = forkvm_api::vm::parse_request(l.as_bytes()).map_err(|e| format!("seed {l}: {e}"))?;
        let mut line = serde_json::to_vec(&req)?;
        line.push(b'\n');
        put(out, "vm_api_request", &format!("req-{i}"), &line)?;
    }
    Ok(())
}

fn memory_seeds(out: &Path) -> R<()> {
    // Format of the memory_file target: size skew byte, then { u16 page, u8 byte, u8 pages } records.
    put(out, "memory_file", "right-size", &[0, 0, 2, 0xaa, 3, 0x10, 0, 0x55, 1, 0xff, 3, 7, 7])?;
    put(out, "memory_file", "short", &[1, 5, 0, 1, 1])?;
    put(out, "memory_file", "empty-right-size", &[4])?;
    Ok(())
}

fn state_seeds(out: &Path, tmp: &Path) -> R<()> {
    let t = Duration::from_secs(60);
    let vm = MicroVm::boot(VmConfig { mem_size: 8 << 20, track_dirty: true, ..Default::default() })
        .map_err(|e| format!("cannot boot the test guest (a usable /dev/kvm is needed): {e}"))?;
    vm.wait_for(test_guest_ready(), t)?;
    vm.command("touch 0x300000 4 0x5a", t)?;
    vm.pause()?;
    let full = tmp.join("snap-full");
    vm.snapshot(&full, SnapshotKind::Full)?;
    vm.resume()?;
    vm.command("touch 0x301000 1 0x11", t)?;
    vm.pause()?;
    let diff = tmp.join("snap-diff");
    vm.snapshot(&diff, SnapshotKind::Diff)?;
    put_enveloped(out, "snapshot_state", "full", &std::fs::read(full.join("state"))?, 56)?;
    put_enveloped(out, "snapshot_state", "diff", &std::fs::read(diff.join("state"))?, 56)?;
    Ok(())
}

/// Frames of the cross-host page protocol, one conversation per seed.
fn net_seeds(dir: &Path) -> R<()> {
    use pagesrv::net_wire::{Msg, FLAG_PUSH, KIND_DATA, KIND_ZERO};
    let page = image(1, 7);
    let convos: Vec<(&str, Vec<Msg>)> = vec![
        ("handshake", vec![
            Msg::Hello { min: 1, max: 1, flags: FLAG_PUSH, nonce: [1; 32] },
            Msg::Challenge { version: 1, nonce: [2; 32], proof: [3; 32] },
            Msg::Auth { proof: [4; 32] },
            Msg::Welcome { len: 64 << 20, page_size: 4096, state_len: 9000, push_bytes: 1 << 20 },
        ]),
        ("pages", vec![
            Msg::Request { id: 1, offset: 0x40_0000, len: 0x2000 },
            Msg::Pages { id: 1, offset: 0x40_0000, kinds: vec![KIND_DATA, KIND_ZERO], macs: vec![[5; 32], [6; 32]], data: page },
            Msg::PushDone,
        ]),
        ("state_and_errors", vec![
            Msg::StateReq { id: 2 },
            Msg::State { id: 2, mac: [7; 32], data: b"state".to_vec() },
            Msg::Failed { id: 3, reason: "corrupt chunk".into() },
            Msg::Error { reason: "authentication failed".into() },
        ]),
    ];
    for (name, msgs) in convos {
        let bytes: Vec<u8> = msgs.iter().flat_map(Msg::encode).collect();
        put(dir, "net_frame", name, &bytes)?;
    }
    Ok(())
}

fn test_guest_ready() -> &'static str {
    "forkvm-test-guest ready"
}

fn main() -> R<()> {
    let out = PathBuf::from(std::env::args().nth(1).ok_or("usage: gen_seeds OUT_DIR")?);
    let tmp = std::env::temp_dir().join(format!("forkvm-fuzz-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let r = (|| -> R<()> {
        store_seeds(&out, &tmp)?;
        pagesrv_seeds(&out)?;
        net_seeds(&out)?;
        memory_seeds(&out)?;
        api_seeds(&out)?;
        state_seeds(&out, &tmp)
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    r?;
    println!("seeds written to {}", out.display());
    Ok(())
}
