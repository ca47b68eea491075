//! Claiming a VM name: its private directory in the run directory and its bound API socket.
//! Whoever binds `<run dir>/<name>/api.sock` owns the name; a name that holds a hibernation is
//! never taken over (the user must wake or discard it first).

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use forkvm_api::vm::{self, VmPaths};

use crate::private_fs::{bind_private, private_dir};

/// Why `name` cannot be claimed now, if it cannot: a VM of that name runs, or is hibernated.
pub fn taken(name: &str) -> Result<Option<String>, String> {
    let paths = VmPaths::for_name(name)?;
    if UnixStream::connect(paths.socket()).is_ok() {
        return Ok(Some(format!("a VM named {name:?} is already running")));
    }
    if paths.hibernated().exists() {
        return Ok(Some(format!("VM {name:?} is hibernated")));
    }
    Ok(None)
}

/// A VM name whose socket this process has bound.
#[derive(Debug)]
pub struct Claimed {
    pub name: String,
    pub paths: VmPaths,
    pub(crate) listener: UnixListener,
}

impl Claimed {
    /// Claims `name` for a new VM: creates its directory and binds its socket. A live VM of that
    /// name or a hibernated one is an error; leftovers of a dead one are removed.
    pub fn new(name: &str) -> Result<Self, String> {
        let c = Self::bind(name)?;
        if c.paths.hibernated().exists() {
            let msg = format!(
                "VM {name:?} is hibernated: wake it (`forkvm wake {name}`) or discard it (`forkvm discard {name}`) \
                 before reusing the name"
            );
            c.release_keeping_hibernation();
            return Err(msg);
        }
        Ok(c)
    }

    /// Claims the name of a hibernated VM to wake it, keeping its hibernation.
    pub fn for_wake(name: &str) -> Result<Self, String> {
        Self::bind(name)
    }

    fn bind(name: &str) -> Result<Self, String> {
        let paths = VmPaths::for_name(name)?;
        private_dir(&vm::run_dir())?;
        private_dir(&paths.dir)?;
        let sock = paths.socket();
        let listener = match bind_private(&sock) {
            Ok(l) => l,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                if UnixStream::connect(&sock).is_ok() {
                    return Err(format!("a VM named {name:?} is already running"));
                }
                let _ = std::fs::remove_file(&sock);
                bind_private(&sock).map_err(|e| format!("cannot bind {}: {e}", sock.display()))?
            }
            Err(e) => return Err(format!("cannot bind {}: {e}", sock.display())),
        };
        Ok(Claimed { name: name.to_string(), paths, listener })
    }

    pub fn console_log(&self) -> PathBuf {
        self.paths.console_log()
    }

    /// Gives the name up without serving (the VM failed to start). A hibernation is kept.
    pub fn release(self) {
        if self.paths.hibernated().exists() {
            return self.release_keeping_hibernation();
        }
        let _ = std::fs::remove_dir_all(&self.paths.dir);
    }

    /// Gives the name up but keeps its hibernation (one that failed to wake).
    pub fn release_keeping_hibernation(self) {
        let _ = std::fs::remove_file(self.paths.socket());
        let _ = std::fs::remove_file(self.paths.pid_file());
        if !self.paths.hibernated().exists() {
            let _ = std::fs::remove_dir_all(&self.paths.dir);
        }
    }
}
