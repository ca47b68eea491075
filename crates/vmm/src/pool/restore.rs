//! Copy-on-write restore into a warm VM: the KVM VM, irqchip, vCPUs and userfaultfd-registered
//! memory were made before the request, so a restore only reads the state, sets it
//! (`KVM_SET_*`) and starts a page server over the warm VM's userfaultfd. The memory comes in
//! lazily from the image, each 2 MiB block checked against the snapshot's block hash list as it
//! is read (see [`crate::verified_lazy`]): the guest never sees an unchecked byte.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use super::warm::{restore_state_into, Offer, Restored, WarmVm};
use crate::devices::console::{lock, Console};
use crate::live_clone::wire::{self, TicketHeader};
use crate::microvm::{MicroVm, Parts};
use crate::persist::memory_file;
use crate::snapshot::sio;
use crate::vcpu_thread::Want;
use crate::Error;

impl WarmVm {
    /// Restores the full snapshot in `dir` (with its block hash list, without a disk) into
    /// this warm VM and resumes it; `console` receives the guest's serial output.
    pub fn restore_snapshot(self, dir: &Path, console: Option<Box<dyn Write + Send>>) -> Result<MicroVm, Error> {
        let started = Instant::now();
        let (state, state_hash) = crate::restore::read_state_hashed(dir)?;
        if state.mem_size != self.mem.size() || state.vcpus.len() != self.vcpus.len() {
            return Err(Error::State(format!(
                "this pool VM has {} MiB and {} vCPUs, the snapshot {} MiB and {}",
                self.mem.size() >> 20,
                self.vcpus.len(),
                state.mem_size >> 20,
                state.vcpus.len()
            )));
        }
        if state.devices.block.is_some() {
            return Err(Error::State("pool restores of a VM with a disk are not supported".into()));
        }
        let chain = crate::restore::memory_chain(dir, &state)?;
        let img = match &chain[..] {
            [img] if !img.diff => img,
            _ => return Err(Error::State("pool restores take a full snapshot, not a diff chain".into())),
        };
        let img_dir = img.path.parent().unwrap_or(Path::new("."));
        let hashes =
            crate::verified_lazy::read_block_hashes(img_dir, state.mem_size, &img.blake3).ok_or_else(|| {
                Error::State(format!(
                    "snapshot {} has no valid block hash list: restore it without the pool",
                    dir.display()
                ))
            })?;
        let file = memory_file::open(&img.path, state.mem_size).map_err(|e| Error::State(e.to_string()))?;
        let WarmVm { vm, mem, uffd, vcpus, offered, serial_irq } = self;
        let uffd = Arc::try_unwrap(uffd).map_err(|_| Error::State("the warm VM's userfaultfd is in use".into()))?;
        let (mem, lazy) = crate::verified_lazy::start_on(mem, Some(uffd), file, &img.path, hashes)?;
        let Restored { serial, vsock, net, generation } =
            restore_state_into(&vm, &mem, &vcpus, &offered, serial_irq, &state, Console::new(console))?;
        let parts = Parts {
            vm,
            mem,
            serial,
            vsock,
            block: None,
            net,
            vcpus,
            generation,
            track_dirty: false,
            started,
            start: Want::Pause,
        };
        let vm = MicroVm::assemble(parts)?;
        lazy.run_in_background(&vm)?;
        vm.resume()?;
        *lock(&vm.last_snapshot) = Some((dir.canonicalize().map_err(sio("cannot resolve", dir))?, state_hash));
        Ok(vm)
    }
}

impl Offer {
    /// Serves a restore ticket (`header.restore`): restores that snapshot into `warm` and
    /// answers `ready` (or `error ...`).
    pub fn restore_snapshot(self, warm: WarmVm, console: Option<Box<dyn Write + Send>>) -> Result<MicroVm, Error> {
        let r = match &self.header.restore {
            Some(dir) => warm.restore_snapshot(Path::new(dir), console),
            None => Err(Error::State("not a restore ticket".into())),
        };
        let reply = match &r {
            Ok(_) => "ready\n".to_string(),
            Err(e) => format!("error {}\n", e.to_string().replace('\n', " ")),
        };
        (&self.conn).write_all(reply.as_bytes()).map_err(Error::Io)?;
        r
    }
}

/// Asks the warm pool member at the other end of `conn` (just connected) to restore the
/// snapshot in `dir` as VM `name` and waits (up to `timeout`) for it to run. Returns the
/// member's pid.
pub fn restore_into(
    conn: std::os::unix::net::UnixStream,
    dir: &Path,
    name: &str,
    timeout: std::time::Duration,
) -> Result<Option<i32>, Error> {
    let pid = pagesrv::fc_wire::peer_pid(&conn);
    // The member's userfaultfd is not needed: it serves its memory from the image itself.
    let _ = pagesrv::fc_wire::recv_handshake(&conn, timeout)
        .map_err(|e| Error::State(format!("warm VM handshake: {e}")))?;
    let dir = dir.canonicalize().map_err(sio("cannot resolve", dir))?;
    let header = TicketHeader {
        v: wire::VERSION,
        state_len: 0,
        name: Some(name.to_string()),
        parent: None,
        prefetch: false,
        restore: Some(dir.to_string_lossy().into_owned()),
    };
    wire::send_ticket(&conn, &header, &[])?;
    conn.set_read_timeout(Some(timeout)).map_err(Error::Io)?;
    let mut r = std::io::BufReader::new(&conn);
    match wire::read_line(&mut r)? {
        Some(l) if l == "ready" => Ok(pid),
        Some(l) => Err(Error::State(format!("pool restore: {l}"))),
        None => Err(Error::State("pool restore: the warm VM exited".into())),
    }
}
