//! Command-line interface.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::size::parse_size;

#[derive(Parser, Debug)]
#[command(name = "forkvm", version, about = "microVMs that pause, snapshot, resume and fork in milliseconds")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Boot a VM (the embedded test guest or a Linux kernel) with its console on stdin/stdout.
    Run(RunArgs),
    /// The main job on defaults: boot, talk to, pause and resume the embedded test guest.
    Demo(DemoArgs),
    /// Print benchmark tables (median/min/max of N runs).
    Bench(BenchArgs),
    /// Scripted end-to-end scenarios (used by the Linux e2e test inside the QEMU L1).
    Scenario(crate::scenario::ScenarioArgs),
    /// Snapshot a running VM into the chunk store and free its memory.
    Hibernate(crate::hibernate_cmd::HibernateArgs),
    /// Wake a hibernated VM: lazy restore through the userfaultfd page server.
    Wake(crate::hibernate_cmd::WakeArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum GuestKind {
    /// The tiny test guest embedded in forkvm.
    Test,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum BackingArg {
    /// Anonymous private memory.
    Anon,
    /// A memfd mapped shared (snapshots only flush state).
    Shared,
}

#[derive(Args, Debug, Clone)]
pub struct VmArgs {
    /// Boot the embedded test guest (the default when no --kernel is given).
    #[arg(long, value_enum, conflicts_with = "kernel")]
    pub guest: Option<GuestKind>,
    /// Linux kernel (bzImage or ELF vmlinux) to boot.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initramfs for the kernel.
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0 reboot=k panic=-1 acpi=off pci=off")]
    pub cmdline: String,
    /// Guest memory size (e.g. 256M, 2G).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub mem: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Guest memory backing.
    #[arg(long, value_enum, default_value = "anon")]
    pub backing: BackingArg,
    /// Do not ask for transparent huge pages.
    #[arg(long)]
    pub no_thp: bool,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub vm: VmArgs,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Guest memory size.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub mem: u64,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum BenchKind {
    /// Boot to first serial line, pause and resume latency.
    Vm,
    /// Snapshot, restore and fork-clone costs (256 MiB and 2 GiB guests).
    Clone,
    /// Chunk store and page server: compression, dedup, fault latency, lazy resume.
    Store,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Which benchmark.
    #[arg(value_enum, default_value = "vm")]
    pub kind: BenchKind,
    /// Number of runs per measurement.
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    /// Guest memory size.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub mem: u64,
}
