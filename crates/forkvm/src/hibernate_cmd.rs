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

/// Hibernates `vm` into `dir` (state) and the chunk store (`store`, default: the shared one).
pub fn hibernate_vm(
    _vm: &vmm::MicroVm,
    dir: &std::path::Path,
    _store: Option<&std::path::Path>,
) -> Result<serde_json::Value, String> {
    Err(format!("hibernate into {}: not implemented yet", dir.display()))
}
