//! Where VMM processes keep their sockets, logs and pid files, and what a VM may be called.

use std::path::{Path, PathBuf};

/// The run directory: `FORKVM_RUN_DIR`, else `/run/forkvm` for root, else
/// `$XDG_RUNTIME_DIR/forkvm`, else `/tmp/forkvm-<uid>`.
pub fn run_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FORKVM_RUN_DIR") {
        return PathBuf::from(d);
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        return PathBuf::from("/run/forkvm");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("forkvm"),
        None => std::env::temp_dir().join(format!("forkvm-{uid}")),
    }
}

/// A VM name: 1..=64 of `[A-Za-z0-9._-]`, not starting with a dot or dash.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > 64 || !name.chars().all(ok_char) || name.starts_with(['.', '-']) {
        return Err(format!("invalid VM name {name:?}: use 1 to 64 letters, digits, '.', '_' or '-'"));
    }
    Ok(())
}

/// The directory of VM `name` in the run directory.
pub fn vm_dir(name: &str) -> Result<PathBuf, String> {
    check_name(name)?;
    Ok(run_dir().join(name))
}

/// The files of one VM's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPaths {
    pub dir: PathBuf,
}

impl VmPaths {
    /// The paths of VM `name` in the run directory.
    pub fn for_name(name: &str) -> Result<Self, String> {
        vm_dir(name).map(|dir| VmPaths { dir })
    }

    pub fn in_dir(dir: &Path) -> Self {
        VmPaths { dir: dir.to_path_buf() }
    }

    /// The API socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }

    /// The VMM's process id, one decimal line.
    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("pid")
    }

    /// Everything the guest printed on its serial console.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// The detached VMM's own stdout/stderr.
    pub fn vmm_log(&self) -> PathBuf {
        self.dir.join("vmm.log")
    }

    /// The vsock host socket (Firecracker's convention: connect and write `CONNECT <port>\n`;
    /// guest connections to host port P reach `<this path>_P`).
    pub fn vsock(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }

    /// Names the VM's network namespace (`/proc/<vmm pid>/fd/<n>`), when it has `--net`.
    pub fn netns(&self) -> PathBuf {
        self.dir.join("netns")
    }

    /// The hibernation state of a hibernated VM (its VMM is gone).
    pub fn hibernated(&self) -> PathBuf {
        self.dir.join(HIBERNATED)
    }
}

/// Name of the subdirectory holding a hibernation.
pub const HIBERNATED: &str = "hibernated";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "vm-1", "x.y_z", &"n".repeat(64)] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", "-x", "a/b", "a b", &"n".repeat(65), "é"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
