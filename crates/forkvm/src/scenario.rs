//! `forkvm scenario`: scripted end-to-end runs (owned by the Linux e2e work).

use clap::Args;

#[derive(Args, Debug)]
pub struct ScenarioArgs {
    /// Scenario name.
    pub name: String,
}

pub fn scenario(args: ScenarioArgs) -> Result<i32, String> {
    Err(format!("unknown scenario {:?}", args.name))
}
