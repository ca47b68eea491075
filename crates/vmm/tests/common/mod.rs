//! Helpers shared by the KVM-tier tests: boot the test guest, scratch directories, guest sums,
//! flipped bytes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use vmm::{Backing, MicroVm, VmConfig};

/// Bound of every wait on the guest.
pub const T: Duration = Duration::from_secs(60);

/// Boots the test guest with `mem` bytes of `backing` memory and waits for its ready line.
pub fn boot_with(mem: u64, backing: Backing) -> MicroVm {
    let cfg = VmConfig { mem_size: mem, backing, ..Default::default() };
    let vm =
        MicroVm::boot(cfg).unwrap_or_else(|e| panic!("cannot boot the test guest: {e} (a usable /dev/kvm is needed)"));
    vm.wait_for("forkvm-test-guest ready", T).expect("guest ready line");
    vm
}

/// [`boot_with`] anonymous memory.
pub fn boot(mem: u64) -> MicroVm {
    boot_with(mem, Backing::Anon)
}

/// `<tmp>/forkvm-<tag>-<pid>-<name>`, removed if it was left over (not created).
pub fn tmpdir(tag: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("forkvm-{tag}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// [`tmpdir`], created empty.
pub fn fresh_dir(tag: &str, name: &str) -> PathBuf {
    let d = tmpdir(tag, name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The guest's checksum of `pages` pages at `gpa`.
pub fn sum_of(vm: &MicroVm, gpa: u64, pages: u64) -> String {
    vm.command(&format!("sum {gpa:#x} {pages}"), T).unwrap()
}

/// Flips one bit of the byte at `at` in file `path`.
pub fn flip(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x10;
    f.write_all_at(&b, at).unwrap();
}
