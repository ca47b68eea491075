//! Writes the committed old-snapshot fixture (crates/vmm/tests/fixtures/snapshot-v<N>): a 64 MiB
//! test guest after `touch 0x400000 16 0x5a` and two `count`s, snapshotted by this version. The
//! CPU model is reduced to a portable x86-64 baseline and the TSC frequency left out, so the
//! fixture restores on any KVM host (like a Firecracker CPU template); the memory image is stored
//! zstd-compressed (`memory.zst`; the test unpacks it sparse).
//!
//!     cargo run -p vmm --example snapshot_fixture -- crates/vmm/tests/fixtures/snapshot-v3
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::time::Duration;

use vmm::snapshot::read_state;
use vmm::{Backing, MicroVm, SnapshotKind, VmConfig};

const T: Duration = Duration::from_secs(60);

/// Feature bits kept: (function, index, register, mask). Everything else is cleared.
const BASELINE: [(u32, u32, char, u32); 4] = [
    // SSE3 SSSE3 CX16 SSE4.1 SSE4.2 x2APIC POPCNT hypervisor
    (1, 0, 'c', 1 | 1 << 9 | 1 << 13 | 1 << 19 | 1 << 20 | 1 << 21 | 1 << 23 | 1 << 31),
    // FPU..SSE2 (the x86-64 baseline) and HTT
    (1, 0, 'd', 0x078b_fbff | 1 << 28),
    // LAHF
    (0x8000_0001, 0, 'c', 1),
    // SYSCALL NX LM
    (0x8000_0001, 0, 'd', 1 << 11 | 1 << 20 | 1 << 29),
];

fn main() {
    let out = PathBuf::from(std::env::args().nth(1).expect("usage: snapshot_fixture OUT_DIR"));
    let vm = MicroVm::boot(VmConfig { mem_size: 64 << 20, backing: Backing::Anon, ..Default::default() }).unwrap();
    vm.wait_for("forkvm-test-guest ready", T).unwrap();
    vm.command("touch 0x400000 16 0x5a", T).unwrap();
    vm.command("count", T).unwrap();
    assert_eq!(vm.command("count", T).unwrap(), "count 2");
    vm.pause().unwrap();
    let tmp = std::env::temp_dir().join(format!("forkvm-fixture-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    vm.snapshot(&tmp, SnapshotKind::Full).unwrap();
    let mut st = read_state(&tmp).unwrap();
    for v in &mut st.vcpus {
        v.tsc_khz = None;
        v.cpuid.retain(|e| e.function <= 0xd || (0x8000_0000..=0x8000_0008).contains(&e.function));
        for e in &mut v.cpuid {
            match e.function {
                0 => e.eax = e.eax.min(0xd),
                0x8000_0000 => e.eax = e.eax.min(0x8000_0008),
                7 => (e.ebx, e.ecx, e.edx) = (0, 0, 0),
                _ => {}
            }
            for (f, i, r, mask) in BASELINE {
                if e.function == f && e.index == i {
                    match r {
                        'c' => e.ecx &= mask,
                        _ => e.edx &= mask,
                    }
                }
            }
        }
    }
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("state"), st.to_bytes().unwrap()).unwrap();
    let mem = std::fs::read(tmp.join("memory")).unwrap();
    std::fs::write(out.join("memory.zst"), zstd::encode_all(&mem[..], 19).unwrap()).unwrap();
    std::fs::remove_dir_all(&tmp).unwrap();
    println!("wrote {}", out.display());
}
