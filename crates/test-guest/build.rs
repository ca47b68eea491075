//! Builds the test guest (guest/main.rs, no_std) into an ELF64 with the same rustc cargo uses, so no
//! prebuilt blob and no second cargo invocation is needed.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default());
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let guest = manifest.join("guest");
    println!("cargo:rerun-if-changed=guest");
    let elf = out.join("test-guest.elf");
    let status = Command::new(rustc)
        .arg("--edition=2021")
        .arg("--crate-type=bin")
        .arg("--crate-name=forkvm_test_guest")
        .args(["--target", "x86_64-unknown-linux-gnu"])
        .args(["-C", "panic=abort", "-C", "opt-level=2", "-C", "debuginfo=0"])
        .args(["-C", "relocation-model=static", "-C", "target-cpu=x86-64"])
        // KVM's instruction emulator (all guest code runs in it on PVM hosts) has no SSE.
        .args(["-C", "target-feature=-sse,-sse2,-mmx"])
        .args(["-C", "link-arg=-nostartfiles", "-C", "link-arg=-nostdlib", "-C", "link-arg=-static"])
        .args(["-C", "link-arg=-no-pie", "-C", "link-arg=-Wl,--build-id=none"])
        .arg("-C")
        .arg(format!("link-arg=-Wl,-T,{}", guest.join("link.ld").display()))
        .arg("-o")
        .arg(&elf)
        .arg(guest.join("main.rs"))
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => fail(&format!("rustc failed to build the test guest ({s})")),
        Err(e) => fail(&format!("cannot run rustc to build the test guest: {e}")),
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1);
}
