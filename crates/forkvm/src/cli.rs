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
    /// Boot a VM (the embedded test guest or a Linux kernel). Console on stdin/stdout, or with
    /// --name --detach in the background behind its API socket.
    Run(RunArgs),
    /// Start a VM from a snapshot directory (eager copy or copy-on-write).
    Restore(RestoreArgs),
    /// List the VMs of this host (running, paused, hibernated; failed: a clone stopped after
    /// `wake --pages`).
    Ls,
    /// Print a VM's status as JSON.
    Status(NameArg),
    /// Run a program through the guest agent (`forkvm exec NAME -- ARGV...`: stdout and stderr
    /// apart, exits with its code), or send a line to the serial console (`forkvm exec NAME LINE`).
    Exec(ExecArgs),
    /// Park a VM's vCPUs.
    Pause(NameArg),
    /// Continue a paused VM (or wake a hibernated one).
    Resume(NameArg),
    /// Snapshot a VM into a directory (full, or a diff against its previous snapshot).
    Snapshot(SnapshotArgs),
    /// Fork-clone a running VM into N running children with their own names and sockets.
    Fork(ForkArgs),
    /// Serve live clones of a running VM (--backing shared) to other hosts over TCP: each
    /// authenticated `forkvm wake CHILD --pages tcp://ADDR --secret-file F` gets the VM as it is
    /// at that instant while the VM runs on.
    CloneServe(crate::clone_serve::CloneServeArgs),
    /// Stop a VM and its VMM process.
    Stop(NameArg),
    /// Forward a host TCP port into a VM's network (its private namespace): previews.
    PortForward(PortForwardArgs),
    /// The main job on defaults: boot the embedded test guest, pause/resume, snapshot, restore, fork.
    Demo(DemoArgs),
    /// Print benchmark tables (median/min/max of N runs).
    Bench(BenchArgs),
    /// Scripted end-to-end scenarios (used by the Linux e2e test inside the QEMU L1).
    Scenario(crate::scenario::ScenarioArgs),
    /// Snapshot a running VM into the chunk store and free its memory.
    Hibernate(crate::hibernate_cmd::HibernateArgs),
    /// Wake a hibernated VM: lazy restore through the userfaultfd page server.
    Wake(crate::hibernate_cmd::WakeArgs),
    /// Run the sandbox daemon: HTTP API on <run dir>/forkvmd.sock (and --listen), SQLite state.
    Serve(crate::serve_cmd::ServeArgs),
    /// Workspace tokens for the daemon's API.
    Token(crate::serve_cmd::TokenArgs),
    /// Sandboxes through the daemon (needs `forkvm serve` and $FORKVM_TOKEN).
    #[command(subcommand)]
    Sandbox(crate::sandbox_cmd::SandboxCmd),
    /// Templates through the daemon: immutable snapshots that sandboxes start from.
    #[command(subcommand)]
    Template(crate::sandbox_cmd::TemplateCmd),
    /// Pull-request preloading through the daemon.
    #[command(subcommand)]
    Repo(crate::sandbox_cmd::RepoCmd),
    /// Chunk store upkeep: verify, gc.
    Store(crate::store_cmd::StoreArgs),
    /// Throw a hibernated VM away (its memory image goes at the next `forkvm store gc`), or the
    /// logs of a clone that failed after `wake --pages` (`ls`: failed).
    Discard(crate::store_cmd::DiscardArgs),
    /// Serve Firecracker snapshot restores (memory backend "Uffd") from a memory file or a
    /// chunk-store image: one page server per connecting Firecracker.
    Pagesrv(crate::pagesrv_cmd::PagesrvArgs),
    /// A warm pool of VMM processes: `forkvm fork` of a VM with shared memory live-clones into
    /// pool members of its size (page-served, the parent paused only to capture state).
    #[command(subcommand)]
    Pool(crate::pool_cmd::PoolCmd),
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
    #[arg(long, default_value = "console=ttyS0 reboot=k panic=-1 pci=off")]
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
    /// No dirty-page tracking in KVM (Firecracker's default): guest writes never fault to mark
    /// pages dirty and KVM may map guest memory with huge pages; diff snapshots are refused.
    #[arg(long)]
    pub no_dirty_log: bool,
    /// A virtio-blk disk over raw image PATH (`,ro`: read-only). The image is never written:
    /// the VM's writes go to a copy-on-write overlay that snapshots, restores and forks carry.
    #[arg(long, value_name = "PATH[,ro]")]
    pub disk: Option<String>,
    /// A virtio-net device on a tap in a private network namespace of its own (`--net`), or
    /// on an existing host tap (`--net tap:NAME`). Clones always get a namespace of their own.
    #[arg(long, value_name = "private|tap:NAME", num_args = 0..=1, default_missing_value = "private")]
    pub net: Option<String>,
}

#[derive(Args, Debug)]
pub struct PortForwardArgs {
    /// VM name.
    pub name: String,
    /// The guest's TCP port.
    pub guest_port: u16,
    /// Host address to listen on (port 0: any free port, printed).
    #[arg(default_value = "127.0.0.1:0")]
    pub host: String,
    /// The guest's address inside its namespace (default 192.168.241.2).
    #[arg(long)]
    pub guest_ip: Option<std::net::Ipv4Addr>,
}

/// How a VMM process is hosted: anonymous in the foreground, or named behind an API socket.
#[derive(Args, Debug, Clone)]
pub struct HostArgs {
    /// Serve the VM's API socket under this name (see `forkvm ls`).
    #[arg(long)]
    pub name: Option<String>,
    /// Run in the background (needs --name); the console goes to <run dir>/<name>/console.log.
    #[arg(long, requires = "name")]
    pub detach: bool,
    /// Internal: this process is the detached VMM.
    #[arg(long, hide = true, requires = "name")]
    pub background: bool,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub vm: VmArgs,
    /// A kernel's ready line: serve requests only once the guest printed it on its console
    /// (the test guest's own ready line is always awaited).
    #[arg(long, requires = "kernel", value_name = "LINE")]
    pub ready_line: Option<String>,
    #[command(flatten)]
    pub host: HostArgs,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// Snapshot directory (written by `forkvm snapshot`).
    pub dir: PathBuf,
    /// Map the memory image copy-on-write instead of copying it in.
    #[arg(long)]
    pub cow: bool,
    /// Fast path: skip checking the memory images against the hashes in the snapshot's state
    /// (only for snapshots this host wrote and kept private).
    #[arg(long)]
    pub no_verify: bool,
    /// Leave the restored VM paused.
    #[arg(long)]
    pub paused: bool,
    /// Refuse a snapshot whose guest memory is not of this size.
    #[arg(long, value_parser = parse_size)]
    pub mem: Option<u64>,
    #[command(flatten)]
    pub host: HostArgs,
}

#[derive(Args, Debug)]
pub struct NameArg {
    /// VM name.
    pub name: String,
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    /// VM name.
    pub name: String,
    /// The line to send to the serial console (words are joined with spaces).
    #[arg(required_unless_present = "argv", conflicts_with = "argv", allow_hyphen_values = true)]
    pub line: Vec<String>,
    /// After `--`: the program and its arguments, run by the guest agent.
    #[arg(last = true)]
    pub argv: Vec<String>,
    /// With `--`: environment variables (NAME=VALUE) for the program.
    #[arg(long = "env", short = 'e', value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// With `--`: working directory of the program.
    #[arg(long)]
    pub cwd: Option<String>,
    /// With `--`: pass forkvm's stdin to the program (at most 512 KiB, UTF-8).
    #[arg(long)]
    pub stdin: bool,
    /// Print console lines until one contains this text (default: print the next line).
    #[arg(long)]
    pub wait_for: Option<String>,
    /// Seconds to wait for the answer (the agent kills the program then).
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
}

#[derive(Args, Debug)]
pub struct SnapshotArgs {
    /// VM name.
    pub name: String,
    /// Snapshot directory.
    pub dir: PathBuf,
    /// Only pages dirtied since this VM's previous snapshot.
    #[arg(long)]
    pub diff: bool,
}

#[derive(Args, Debug)]
pub struct ForkArgs {
    /// VM name.
    pub name: String,
    /// Number of children.
    #[arg(long, default_value_t = 1)]
    pub count: usize,
    /// Children are named <prefix>1..<prefix>N (default <name>-c).
    #[arg(long)]
    pub prefix: Option<String>,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Guest memory size.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub mem: u64,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum BenchKind {
    /// Copy-on-write disk clones of a 1 GiB image: time, host space, snapshot, restore, I/O.
    Disk,
    /// Boot to first serial line, pause and resume latency.
    Vm,
    /// Snapshot, restore and fork-clone costs (256 MiB and 2 GiB guests).
    Clone,
    /// Chunk store and page server: compression, dedup, fault latency, lazy resume.
    Store,
    /// Only the last rows of `store`: Firecracker-style restores through `forkvm pagesrv`, raw
    /// memory file vs chunk store (no KVM needed).
    StoreFc,
    /// The guest agent of a running VM (--vm): vsock round trip, throughput, exec vs serial, fork.
    Agent,
    /// The daemon's API: create from template, fork, wake, list, idle memory (starts its own daemon).
    Api,
    /// Clones across hosts: wake over TCP from a page server in another network namespace (veth)
    /// to first answer, vs a local wake (needs root and iproute2).
    Xhost,
    /// Only the live-clone rows of `clone`: fork() vs warm pool clone, 100 clones, memory.
    Pool,
    /// Only the restore rows of `clone` (a 2 GiB guest at least): eager restore throughput with
    /// and without the hash check, CoW restore to first answer.
    Restore,
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
    /// `bench agent`: the running VM whose agent is measured.
    #[arg(long)]
    pub vm: Option<String>,
}
