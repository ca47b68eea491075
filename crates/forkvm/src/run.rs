//! `forkvm run`: boot a VM with its serial console on stdin/stdout; exit when the guest does.

use std::io::Read;
use std::time::Duration;

use vmm::{Backing, BootSource, ExitReason, MicroVm, VmConfig};

use crate::cli::{BackingArg, RunArgs, VmArgs};

fn read_file(what: &str, path: &std::path::Path) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
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
            kernel: read_file("kernel", k)?,
            initrd: a.initrd.as_deref().map(|p| read_file("initrd", p)).transpose()?,
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
        track_dirty: true,
        boot,
        console_mirror: None,
    })
}

pub fn run(args: RunArgs) -> Result<i32, String> {
    let mut cfg = vm_config(&args.vm)?;
    cfg.console_mirror = Some(Box::new(std::io::stdout()));
    let vm = MicroVm::boot(cfg).map_err(|e| e.to_string())?;
    let serial = vm.serial().clone();
    // Console input: stdin bytes go to the guest's serial port as they come.
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 256];
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 {
                break;
            }
            serial.send(&buf[..n], Duration::from_secs(3600));
        }
    });
    match vm.wait_exit(None) {
        Some(ExitReason::GuestReset | ExitReason::GuestShutdown | ExitReason::Stopped) | None => Ok(0),
        Some(ExitReason::Error(e)) => Err(e),
    }
}
