//! A VM that ends unasked (the guest reset or shut down, a vCPU failed) keeps its logs: before
//! its directory goes, `vmm.log` and `console.log` move to `<run dir>/.exited/<name>.<pid>/`
//! with an `exit` file saying why. Only the newest [`KEEP`] such directories stay.

use std::io::Write;
use std::path::{Path, PathBuf};

use forkvm_api::vm::VmPaths;
use vmm::ExitReason;

use crate::private_fs::{create_private, private_dir};

/// Directory, in the run directory, of the logs of VMs that ended unasked (hidden from `ls`).
pub const EXITED: &str = ".exited";

/// How many exited VMs' logs are kept.
pub const KEEP: usize = 16;

/// Whether an exit was not asked for by a user (stop, hibernate).
pub fn unasked(reason: &Option<ExitReason>) -> bool {
    !matches!(reason, Some(ExitReason::Stopped))
}

/// Moves the logs of VM `name` (directory `paths`) to the exited directory of `run_dir`;
/// returns where they went. Called while the VM's directory still exists.
pub fn keep(run_dir: &Path, paths: &VmPaths, name: &str, reason: &Option<ExitReason>) -> Result<PathBuf, String> {
    let root = run_dir.join(EXITED);
    private_dir(&root)?;
    let dest = root.join(format!("{name}.{}", std::process::id()));
    private_dir(&dest)?;
    for (from, file) in [(paths.vmm_log(), "vmm.log"), (paths.console_log(), "console.log")] {
        match std::fs::rename(&from, dest.join(file)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot keep {}: {e}", from.display())),
        }
    }
    let mut f = create_private(&dest.join("exit"))?;
    let when = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
    writeln!(f, "VM {name} (pid {}) exited unasked at unix time {when}: {}", std::process::id(), describe(reason))
        .map_err(|e| format!("cannot write {}: {e}", dest.display()))?;
    prune(&root, KEEP, &dest);
    Ok(dest)
}

/// Why a VM ended, in words (with the reason's name, which scripts may look for).
fn describe(reason: &Option<ExitReason>) -> String {
    match reason {
        Some(ExitReason::GuestReset) => "the guest reset (GuestReset)".into(),
        Some(ExitReason::GuestShutdown) => {
            "the guest shut down (GuestShutdown: a triple fault or halt exit; vmm.log has the registers)".into()
        }
        Some(ExitReason::Stopped) => "stopped on request (Stopped)".into(),
        Some(ExitReason::Error(e)) => format!("error: {e}"),
        None => "no reason recorded".into(),
    }
}

/// Removes all but the `keep` most recently modified entries of `root` (never `newest`).
fn prune(root: &Path, keep: usize, newest: &Path) {
    let Ok(rd) = std::fs::read_dir(root) else { return };
    let mut dirs: Vec<(std::time::SystemTime, PathBuf)> = rd
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()) && e.path() != newest)
        .map(|e| (e.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH), e.path()))
        .collect();
    dirs.sort();
    let excess = (dirs.len() + 1).saturating_sub(keep);
    for (_, d) in dirs.into_iter().take(excess) {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn logs_move_out_with_the_reason_and_old_ones_are_pruned() {
        let run = std::env::temp_dir().join(format!("forkvm-exitlogs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run);
        let paths = VmPaths::in_dir(&run.join("vm1"));
        std::fs::create_dir_all(&paths.dir).unwrap();
        std::fs::write(paths.vmm_log(), "vcpu said why\n").unwrap();
        std::fs::write(paths.console_log(), "guest said why\n").unwrap();
        let reason = Some(ExitReason::GuestShutdown);
        assert!(unasked(&reason) && unasked(&None) && !unasked(&Some(ExitReason::Stopped)));
        let dest = keep(&run, &paths, "vm1", &reason).unwrap();
        assert_eq!(std::fs::read_to_string(dest.join("vmm.log")).unwrap(), "vcpu said why\n");
        assert_eq!(std::fs::read_to_string(dest.join("console.log")).unwrap(), "guest said why\n");
        let exit = std::fs::read_to_string(dest.join("exit")).unwrap();
        assert!(exit.contains("the guest shut down (GuestShutdown"), "{exit}");
        assert!(!exit.contains("Some("), "no Debug formatting in {exit}");
        for i in 0..KEEP + 3 {
            std::fs::create_dir_all(run.join(EXITED).join(format!("old{i}"))).unwrap();
        }
        prune(&run.join(EXITED), KEEP, &dest);
        assert_eq!(std::fs::read_dir(run.join(EXITED)).unwrap().count(), KEEP);
        assert!(dest.join("exit").exists(), "the newest is never pruned");
        std::fs::remove_dir_all(&run).unwrap();
    }
}
