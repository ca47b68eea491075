//! `forkvm hibernate` / `forkvm wake` (owned by the chunk store / page server work).

use clap::Args;

#[derive(Args, Debug)]
pub struct HibernateArgs {
    /// VM name.
    pub vm: String,
}

#[derive(Args, Debug)]
pub struct WakeArgs {
    /// VM name.
    pub vm: String,
}

pub fn hibernate(args: HibernateArgs) -> Result<i32, String> {
    Err(format!("hibernate {}: not implemented yet", args.vm))
}

pub fn wake(args: WakeArgs) -> Result<i32, String> {
    Err(format!("wake {}: not implemented yet", args.vm))
}
