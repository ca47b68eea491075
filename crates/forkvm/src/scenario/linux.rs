//! `forkvm scenario linux`: the Linux end-to-end scenario. Boots a kernel + initramfs whose /init
//! prints `FORKVM-READY uptime=<s>` and runs a shell on the console (tools/e2e/mk-l2-initramfs.sh,
//! which also ships `/bin/forkvm-agent`), then: shell command, pause/resume, snapshot and restore
//! (the restored clone is reseeded), fork (the child is reseeded by the agent) with different
//! `/proc/sys/kernel/random/uuid` answers in parent and child while both keep running.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use vmm::{Backing, BootSource, MicroVm, RestoreMode, RestoreOptions, SnapshotKind, VmConfig};

use super::fork_child::{self, reseed_command, Hooked};
use super::shell::{self, Tty};
use crate::size::parse_size;

/// ACPI (forkvm's tables: CPUs, IOAPIC, virtio-mmio devices), no PCI, no i8042 and no CMOS RTC
/// driver: probing devices the VMM does not have costs thousands of port exits (~10 s and ~7 s
/// of a nested boot). `reboot=k` still resets through port 0x64 without the i8042 driver.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 pci=off quiet initcall_blacklist=i8042_init,cmos_init 8250.nr_uarts=1";

#[derive(Args, Debug)]
pub struct LinuxArgs {
    /// Linux kernel (bzImage or ELF vmlinux).
    #[arg(long)]
    pub kernel: PathBuf,
    /// Initramfs with the FORKVM-READY /init, a shell on ttyS0 and /bin/forkvm-agent.
    #[arg(long)]
    pub initrd: PathBuf,
    /// Guest memory size.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub mem: u64,
    /// Kernel command line.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 2)]
    pub vcpus: u8,
    /// Seconds to wait for the ready line.
    #[arg(long, default_value_t = 300)]
    pub boot_timeout: u64,
    /// Seconds to wait for each shell command.
    #[arg(long, default_value_t = 60)]
    pub cmd_timeout: u64,
    /// Snapshot directory (default: a new directory in $TMPDIR, removed at the end).
    #[arg(long)]
    pub snapshot_dir: Option<PathBuf>,
    /// Skip the control fork without reseed (informational only).
    #[arg(long)]
    pub no_control: bool,
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn ok(step: &str, d: Duration, detail: &str) {
    if detail.is_empty() {
        println!("scenario: {step} ok ({})", ms(d));
    } else {
        println!("scenario: {step} ok ({}): {detail}", ms(d));
    }
}

/// Adds the guest's last console lines to an error.
fn with_tail<'a>(t: &'a dyn Tty, what: &str) -> impl Fn(String) -> String + 'a {
    let what = what.to_string();
    move |e| format!("{what}: {e}; last console lines:{}", shell::tail(t, 30))
}

fn read_file(what: &str, path: &Path) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
    if bytes.is_empty() {
        return Err(format!("{what} {} is empty", path.display()));
    }
    Ok(bytes)
}

/// Removes a directory this run created, whatever happens.
struct TempDir(Option<PathBuf>);

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

pub fn run(a: &LinuxArgs) -> Result<i32, String> {
    let t_all = Instant::now();
    let timeout = Duration::from_secs(a.cmd_timeout);
    println!(
        "scenario: linux: kernel {} initrd {} mem {} MiB, {} vCPUs",
        a.kernel.display(),
        a.initrd.display(),
        a.mem >> 20,
        a.vcpus
    );
    println!("scenario: cmdline {:?}", a.cmdline);
    let vm = boot(a)?;
    talk(&vm, timeout)?;
    pause_resume(&vm, timeout)?;
    let (dir, _cleanup) = match &a.snapshot_dir {
        Some(d) => (d.clone(), TempDir(None)),
        None => {
            let d = std::env::temp_dir().join(format!("forkvm-scenario-{}", std::process::id()));
            (d.clone(), TempDir(Some(d)))
        }
    };
    snapshot(vm, &dir)?;
    let vm = restore(a, &dir, timeout)?;
    fork(&vm, timeout)?;
    if !a.no_control {
        control_fork(&vm, timeout)?;
    }
    let mut vm = vm;
    vm.stop();
    println!("scenario: PASS (total {:.1} s)", t_all.elapsed().as_secs_f64());
    Ok(0)
}

fn boot(a: &LinuxArgs) -> Result<MicroVm, String> {
    let cfg = VmConfig {
        mem_size: a.mem,
        vcpus: a.vcpus,
        backing: Backing::Anon,
        hugepages: true,
        boot: BootSource::Kernel {
            kernel: read_file("kernel", &a.kernel)?,
            initrd: Some(read_file("initrd", &a.initrd)?),
            cmdline: a.cmdline.clone(),
        },
        track_dirty: false,
        console_mirror: None,
        disk: None,
        net: None,
    };
    let t0 = Instant::now();
    let vm = MicroVm::boot(cfg)
        .map_err(|e| format!("boot: {}", crate::run::boot_error(&e, Some(&a.kernel), Some(&a.initrd))))?;
    let ready = vm
        .wait_for("FORKVM-READY", Duration::from_secs(a.boot_timeout))
        .map_err(|e| with_tail(&vm, "boot")(e.to_string()))?;
    let boot_time = t0.elapsed();
    let uptime = ready.split("uptime=").nth(1).unwrap_or("?").trim();
    ok("boot", boot_time, &ready);
    println!("L2 boot time: {} (forkvm boot to FORKVM-READY, L1 wall clock; guest uptime {uptime} s)", ms(boot_time));
    Ok(vm)
}

fn talk(vm: &MicroVm, timeout: Duration) -> Result<(), String> {
    let t0 = Instant::now();
    let line = shell::expect(vm, "echo hello-$((6*7)) $(uname -r)", "hello-42", timeout)
        .map_err(with_tail(vm, "shell command"))?;
    ok("shell command", t0.elapsed(), &line);
    let t0 = Instant::now();
    let u = shell::uuid(vm, timeout).map_err(with_tail(vm, "uuid"))?;
    ok("uuid", t0.elapsed(), &u);
    Ok(())
}

fn pause_resume(vm: &MicroVm, timeout: Duration) -> Result<(), String> {
    let p = vm.pause().map_err(|e| format!("pause: {e}"))?;
    // Type while paused: nothing may come back until the resume.
    let mut cur = vm.console().cursor();
    vm.send_line("echo p-$((6*7))").map_err(|e| format!("typing while paused: {e}"))?;
    let quiet = Duration::from_secs(1);
    if let Some(l) = vm.console().wait_line(&mut cur, quiet, |_| true) {
        return Err(format!("the paused guest printed {l:?}"));
    }
    let r = vm.resume().map_err(|e| format!("resume: {e}"))?;
    let t0 = Instant::now();
    let line = shell::wait_for(vm, &mut cur, "p-42", timeout).map_err(with_tail(vm, "answer after resume"))?;
    let answer = t0.elapsed();
    ok(
        "pause/resume",
        p + r,
        &format!(
            "pause {}, silent for {:.1} s while paused, resume {}, shell answered {line:?} {} after resume",
            ms(p),
            quiet.as_secs_f64(),
            ms(r),
            ms(answer)
        ),
    );
    Ok(())
}

fn snapshot(mut vm: MicroVm, dir: &Path) -> Result<(), String> {
    vm.pause().map_err(|e| format!("pause for snapshot: {e}"))?;
    let rep = vm.snapshot(dir, SnapshotKind::Full).map_err(|e| format!("snapshot into {}: {e}", dir.display()))?;
    ok(
        "snapshot",
        rep.duration,
        &format!(
            "{} ({} pages written, {} KiB on disk, state {} bytes); original VM stopped",
            dir.display(),
            rep.pages_written,
            rep.memory_disk_bytes >> 10,
            rep.state_bytes
        ),
    );
    vm.stop();
    Ok(())
}

/// Reseeds a restored VM through its guest agent over vsock (the clone hook); a guest without
/// one (no vsock, e.g. acpi=off) gets the agent's reseed line typed into its shell instead.
fn reseed(t: &dyn Tty, vm: &MicroVm, timeout: Duration) -> Result<String, String> {
    let vsock = std::env::temp_dir().join(format!("forkvm-scenario-{}.vsock", std::process::id()));
    let hooked = fork_child::agent_hook(vm, &vsock);
    let _ = std::fs::remove_file(&vsock);
    match hooked? {
        Hooked::Agent(line) => Ok(line),
        Hooked::NoAgent(why) => {
            println!("scenario: no guest agent over vsock ({why}): typing the reseed line into the shell");
            let cmd = reseed_command(vm)?;
            shell::expect(t, &cmd, "forkvm-agent: reseeded", timeout)
        }
    }
}

fn restore(a: &LinuxArgs, dir: &Path, timeout: Duration) -> Result<MicroVm, String> {
    let t0 = Instant::now();
    let opts = RestoreOptions { expect_mem: Some(a.mem), ..Default::default() };
    let vm =
        MicroVm::restore(dir, RestoreMode::Cow, opts).map_err(|e| format!("restore from {}: {e}", dir.display()))?;
    let restore_time = t0.elapsed();
    // The clone hook before anything else reaches the guest.
    let t2 = Instant::now();
    let agent = reseed(&vm, &vm, timeout).map_err(with_tail(&vm, "reseed after restore"))?;
    let reseed_time = t2.elapsed();
    let t1 = Instant::now();
    let line = shell::expect(&vm, "echo restored-$((6*7))", "restored-42", timeout)
        .map_err(with_tail(&vm, "shell after restore"))?;
    ok(
        "restore",
        restore_time,
        &format!(
            "copy-on-write from {}, generation {}, shell answered {line:?} after {}",
            dir.display(),
            vm.generation(),
            ms(t1.elapsed())
        ),
    );
    ok("restore reseed", reseed_time, &agent);
    Ok(vm)
}

fn fork(vm: &MicroVm, timeout: Duration) -> Result<(), String> {
    let t0 = Instant::now();
    let (child, rep) = fork_child::fork(vm, true)?;
    let forked = t0.elapsed();
    println!(
        "fork time: {} (pause {}, save {}, fork() {}; L1 wall clock), child pid {}",
        ms(forked),
        ms(rep.pause),
        ms(rep.save),
        ms(rep.fork),
        child.pid
    );
    // The child typed the reseed line before anything else; its answer is the child's first output.
    let mut cur = 0;
    // "forkvm-clone-hook: reseeded by the agent ..." from the child, or the typed fallback's answer.
    let agent = shell::wait_for(&child, &mut cur, "reseeded", timeout)
        .map_err(with_tail(&child, "reseed in the fork child"))?;
    let first = t0.elapsed();
    ok("fork", forked, &format!("child {} reseeded: {agent:?}", child.pid));
    println!("fork child first answer: {} after the fork began", ms(first));

    let parent_uuid = shell::uuid(vm, timeout).map_err(with_tail(vm, "uuid in the fork parent"))?;
    let child_uuid = shell::uuid(&child, timeout).map_err(with_tail(&child, "uuid in the fork child"))?;
    println!("uuid parent: {parent_uuid}");
    println!("uuid child:  {child_uuid}");
    if parent_uuid == child_uuid {
        return Err(format!("parent and reseeded child printed the same uuid {parent_uuid}: the clone is a twin"));
    }
    ok("fork uuids differ", t0.elapsed(), &format!("{parent_uuid} != {child_uuid}"));

    // Both keep running: each answers again after the other did.
    let t1 = Instant::now();
    let p = shell::expect(vm, "echo parent-alive-$((6*7))", "parent-alive-42", timeout)
        .map_err(with_tail(vm, "parent after fork"))?;
    let c = shell::expect(&child, "echo child-alive-$((6*7))", "child-alive-42", timeout)
        .map_err(with_tail(&child, "child after fork"))?;
    let p2 = shell::uuid(vm, timeout).map_err(with_tail(vm, "parent uuid"))?;
    let c2 = shell::uuid(&child, timeout).map_err(with_tail(&child, "child uuid"))?;
    if p2 == c2 {
        return Err(format!("parent and child printed the same second uuid {p2}"));
    }
    ok("both running", t1.elapsed(), &format!("{p:?} / {c:?}; second uuids {p2} != {c2}"));
    let status = child.stop()?;
    println!("scenario: fork child stopped (wait status {status:#x})");
    Ok(())
}

/// Informational: a clone that is not reseeded shares the parent's CRNG state at the fork.
fn control_fork(vm: &MicroVm, timeout: Duration) -> Result<(), String> {
    let t0 = Instant::now();
    let (child, _) = fork_child::fork(vm, false)?;
    let parent_uuid = shell::uuid(vm, timeout).map_err(with_tail(vm, "uuid in the parent"))?;
    let child_uuid = shell::uuid(&child, timeout).map_err(with_tail(&child, "uuid in the unreseeded child"))?;
    let verdict = if parent_uuid == child_uuid {
        "SAME uuid: without the agent's reseed a clone repeats its parent's randomness"
    } else {
        "different uuids (the kernel mixed in new input by itself)"
    };
    ok("control fork without reseed", t0.elapsed(), &format!("parent {parent_uuid}, child {child_uuid}: {verdict}"));
    child.stop()?;
    Ok(())
}
