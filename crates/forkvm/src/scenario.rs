//! `forkvm scenario`: scripted end-to-end runs, each step printed as `scenario: <step> ok (<time>)`
//! and the whole run ending in `scenario: PASS` (exit 0) or one `forkvm: error: ...` line.
//! `tools/e2e` runs `forkvm scenario linux` inside the QEMU L1.

mod fork_child;
mod linux;
mod shell;

use clap::{Args, Subcommand};

#[derive(Args, Debug)]
pub struct ScenarioArgs {
    #[command(subcommand)]
    pub which: Which,
}

#[derive(Subcommand, Debug)]
pub enum Which {
    /// Boot Linux, talk to its shell, pause/resume, snapshot/restore, fork with a reseeded child.
    Linux(linux::LinuxArgs),
}

pub fn scenario(args: ScenarioArgs) -> Result<i32, String> {
    match args.which {
        Which::Linux(a) => linux::run(&a),
    }
}
