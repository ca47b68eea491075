//! `forkvm-agent`: the in-guest agent. `forkvm-agent serve` (started by the guest's init) listens
//! on vsock port 52 and speaks the `agent-proto` protocol: exec with streamed stdout / stderr,
//! file read / write, and the clone hook the VMM sends on every fork, restore and wake (reseed
//! the kernel CRNG, step the wall clock, run /etc/forkvm/hooks.d/*). `forkvm-agent reseed <hex>
//! [generation]` stays for shells: it credits a seed and reseeds the CRNG at once.
//!
//! Built as a static Linux binary (`RUSTFLAGS=-C target-feature=+crt-static`) so it runs in a
//! busybox initramfs without a libc.

mod args;
mod clone_hook;
mod error;
mod exec;
mod files;
mod listen;
mod rng;
mod serve;

use args::Command;

const USAGE: &str = "usage: forkvm-agent serve [--port N | --unix PATH] [--hooks-dir DIR] [--no-clock]\n       forkvm-agent reseed <hex seed bytes> [generation]";

fn run(argv: &[String]) -> Result<(), error::AgentError> {
    match args::parse(argv)? {
        Command::Help => {
            println!("{USAGE}");
            Ok(())
        }
        Command::Serve(opts) => serve::serve(opts),
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
