//! `forkvm-agent`: the in-guest half of "clones must not be twins". The Debian cloud kernel has no
//! VMGenID driver (and forkvm boots it with `acpi=off`), so after a fork or restore the VMM types
//! `forkvm-agent reseed <hex seed> [generation]` into the guest's shell; the agent credits the
//! seed to the kernel's input pool and forces an immediate CRNG reseed.
//!
//! Built as a static Linux binary (`RUSTFLAGS=-C target-feature=+crt-static`) so it runs in a
//! busybox initramfs without a libc.

mod args;
mod error;
mod rng;

use args::Command;

const USAGE: &str = "usage: forkvm-agent reseed <hex seed bytes> [generation]";

fn run(argv: &[String]) -> Result<(), error::AgentError> {
    match args::parse(argv)? {
        Command::Help => {
            println!("{USAGE}");
            Ok(())
        }
        Command::Reseed { seed, generation } => {
            let report = rng::reseed(&seed)?;
            let gen = generation.map(|g| format!("generation {g}, ")).unwrap_or_default();
            println!(
                "forkvm-agent: reseeded crng with {} bytes ({gen}entropy_avail {} -> {})",
                seed.len(),
                report.entropy_before,
                report.entropy_after
            );
            Ok(())
        }
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = run(&argv) {
        eprintln!("forkvm-agent: error: {e}");
        if e.is_usage() {
            eprintln!("{USAGE}");
        }
        std::process::exit(e.exit_code());
    }
}
