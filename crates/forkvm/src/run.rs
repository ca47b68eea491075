//! `forkvm run`: boot a VM with its serial console on stdin/stdout; exit when the guest does.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use vmm::{Backing, BootSource, ExitReason, MicroVm, RestoreMode, RestoreOptions, VmConfig};

use crate::cli::{BackingArg, HostArgs, RestoreArgs, RunArgs, VmArgs};
use crate::server::{redirect_output, serve, Claimed};

/// How long `run` waits for a guest's ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Largest kernel image `run` reads.
const MAX_KERNEL_BYTES: u64 = 256 << 20;
/// Largest initrd `run` reads.
const MAX_INITRD_BYTES: u64 = 2 << 30;

/// Reads a regular file of at most `max` bytes (never a device or FIFO that would not end).
fn read_file(what: &str, path: &Path, max: u64) -> Result<Vec<u8>, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
    let meta = f.metadata().map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{what} {} is not a regular file", path.display()));
    }
    if meta.len() > max {
        return Err(format!(
            "{what} {} is {} bytes, larger than the {} MiB limit",
            path.display(),
            meta.len(),
            max >> 20
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    f.take(max + 1).read_to_end(&mut bytes).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
    if bytes.len() as u64 > max {
        return Err(format!("{what} {} grew past the {} MiB limit while being read", path.display(), max >> 20));
    }
    if bytes.is_empty() {
        return Err(format!("{what} {} is empty", path.display()));
    }
    Ok(bytes)
}

/// Builds a VM configuration from the common VM arguments.
pub fn vm_config(a: &VmArgs) -> Result<VmConfig, String> {
    let boot = match &a.kernel {
        None => BootSource::TestGuest,
        Some(k) => BootSource::Kernel {
            kernel: read_file("kernel", k, MAX_KERNEL_BYTES)?,
            initrd: a.initrd.as_deref().map(|p| read_file("initrd", p, MAX_INITRD_BYTES)).transpose()?,
            cmdline: a.cmdline.clone(),
        },
    };
    Ok(VmConfig {
        mem_size: a.mem,
        vcpus: a.vcpus,
        backing: match a.backing {
            BackingArg::Anon => Backing::Anon,
            BackingArg::Shared => Backing::SharedFile,
        },
        hugepages: !a.no_thp,
        track_dirty: !a.no_dirty_log,
        boot,
        console_mirror: None,
        disk: a.disk.as_deref().map(parse_disk).transpose()?,
        net: a.net.as_deref().map(parse_net).transpose()?,
    })
}

/// `private` or `tap:NAME`.
pub fn parse_net(spec: &str) -> Result<vmm::devices::virtio::net::attach::NetConfig, String> {
    match spec {
        "private" => Ok(Default::default()),
        s => match s.strip_prefix("tap:") {
            Some(name) if !name.is_empty() => {
                Ok(vmm::devices::virtio::net::attach::NetConfig { tap: Some(name.into()) })
            }
            _ => Err(format!("--net {spec:?}: expected `private` or `tap:NAME`")),
        },
    }
}

/// `PATH[,ro]`.
pub fn parse_disk(spec: &str) -> Result<vmm::devices::virtio::block::DiskConfig, String> {
    let (path, read_only) = match spec.rsplit_once(',') {
        Some((p, "ro")) => (p, true),
        Some((p, "rw")) => (p, false),
        _ => (spec, false),
    };
    if path.is_empty() {
        return Err(format!("--disk {spec:?}: no image path"));
    }
    Ok(vmm::devices::virtio::block::DiskConfig { path: path.into(), read_only, scratch: None })
}

/// A boot error that names the file it is about ("cannot load kernel PATH: not a bzImage...").
pub fn boot_error(e: &vmm::Error, kernel: Option<&Path>, initrd: Option<&Path>) -> String {
    use vmm::arch::boot::BootFile;
    let vmm::Error::Boot(b) = e else { return e.to_string() };
    match (b.file(), kernel, initrd) {
        (Some(BootFile::Kernel), Some(k), _) => format!("cannot load kernel {}: {b}", k.display()),
        (Some(BootFile::Initrd), _, Some(i)) => format!("cannot load initrd {}: {b}", i.display()),
        (Some(BootFile::Kernel), None, _) => format!("cannot load the kernel: {b}"),
        (Some(BootFile::Initrd), _, None) => format!("cannot load the initrd: {b}"),
        (None, _, _) => b.to_string(),
    }
}

pub fn run(args: RunArgs) -> Result<i32, String> {
    let mut cfg = vm_config(&args.vm)?;
    let ready = match cfg.boot {
        BootSource::TestGuest => Some(test_guest::READY_LINE.to_string()),
        _ => args.ready_line.clone(),
    };
    let (kernel, initrd) = (args.vm.kernel.clone(), args.vm.initrd.clone());
    host(&args.host, move |mirror| {
        cfg.console_mirror = Some(mirror);
        let vm = MicroVm::boot(cfg).map_err(|e| boot_error(&e, kernel.as_deref(), initrd.as_deref()))?;
        if let Some(line) = ready {
            // Serve requests only once the guest listens on its console.
            vm.wait_for(&line, READY_TIMEOUT).map_err(|e| format!("waiting for the ready line {line:?}: {e}"))?;
        }
        Ok(vm)
    })
}

pub fn restore(args: RestoreArgs) -> Result<i32, String> {
    let mode = if args.cow { RestoreMode::Cow } else { RestoreMode::Eager };
    host(&args.host, |mirror| {
        let opts = RestoreOptions {
            expect_mem: args.mem,
            paused: args.paused,
            track_dirty: true,
            skip_verify: args.no_verify,
            console_mirror: Some(mirror),
        };
        MicroVm::restore(&args.dir, mode, opts).map_err(|e| e.to_string())
    })
}

/// Runs the VM `make` builds (given its console mirror): in the foreground with the console on
/// stdin/stdout, optionally serving its API under a name, or detached in the background.
fn host(h: &HostArgs, make: impl FnOnce(Box<dyn Write + Send>) -> Result<MicroVm, String>) -> Result<i32, String> {
    if h.detach {
        return crate::vmctl::spawn_detached(h.name.as_deref().unwrap_or_default(), crate::vmctl::background_args());
    }
    let Some(name) = &h.name else {
        let vm = make(Box::new(std::io::stdout()))?;
        stdin_to_console(&vm);
        return match vm.wait_exit(None) {
            Some(ExitReason::GuestReset | ExitReason::Stopped) | None => Ok(0),
            Some(ExitReason::GuestShutdown) => {
                // Not a reset: say so, so an early exit is never silent.
                eprintln!("forkvm: the guest shut down (triple fault, or halt with interrupts off)");
                Ok(0)
            }
            Some(ExitReason::Error(e)) => Err(e),
        };
    };
    let claimed = Claimed::new(name)?;
    let mirror: Box<dyn Write + Send> = if h.background {
        let log = claimed.console_log();
        match crate::private_fs::create_private(&log) {
            Ok(f) => Box::new(f),
            Err(e) => {
                claimed.release();
                return Err(e);
            }
        }
    } else {
        Box::new(std::io::stdout())
    };
    let vm = match make(mirror) {
        Ok(vm) => vm,
        Err(e) => {
            claimed.release();
            return Err(e);
        }
    };
    if h.background {
        // From here on our errors and logs go to the VM's log; the launcher has its answer.
        if let Err(e) = redirect_output(&claimed.paths.vmm_log()) {
            drop(vm);
            claimed.release();
            return Err(e);
        }
    } else {
        stdin_to_console(&vm);
    }
    Ok(serve(claimed, vm, None, None))
}

/// Console input: stdin bytes go to the guest's serial port as they come.
fn stdin_to_console(vm: &MicroVm) {
    let serial = vm.serial().clone();
    std::thread::spawn(move || {
        // A fork-gate participant, idle while it reads stdin or waits on the parent-only serial
        // port (see vmm::quiesce).
        let _participant = vmm::quiesce::participant();
        let mut busy = vmm::quiesce::busy();
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 256];
        while let Ok(n) = busy.idle(|| stdin.read(&mut buf)) {
            if n == 0 {
                break;
            }
            busy.idle(|| serial.send(&buf[..n], Duration::from_secs(3600)));
        }
    });
}
