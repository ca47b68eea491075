//! `forkvm serve` (the sandbox daemon) and `forkvm token create`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Also serve the API on this TCP address (use loopback, e.g. 127.0.0.1:8080).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Database and templates (default: $FORKVM_STATE_DIR, else <run dir>/forkvmd).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Chunk store for hibernated sandboxes (default: $FORKVM_STORE, else <state dir>/store).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// How often the idle policy runs, in milliseconds.
    #[arg(long, default_value_t = 250)]
    pub policy_tick_ms: u64,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 256 << 10)]
    pub max_body: usize,
    /// Close an API connection whose request head has not arrived in full after this long, and a
    /// kept-alive one idle that long (ms).
    #[arg(long, default_value_t = 30_000)]
    pub head_timeout_ms: u64,
    /// Answer 408 and close an API connection whose request body has not arrived in full this
    /// long after its head (ms). Only the wait for the body: not the work, not the answer.
    #[arg(long, default_value_t = 30_000)]
    pub body_timeout_ms: u64,
    /// Most connections open at once on each API listener (the Unix socket, --listen): more
    /// are answered 503 and closed.
    #[arg(long, default_value_t = 256)]
    pub api_max_connections: usize,
    /// Serve previews of sandbox ports on this TCP address: `http://<id>-<port>.<domain>:PORT/`.
    #[arg(long)]
    pub preview_listen: Option<SocketAddr>,
    /// The domain under which previews are named (`*.localhost` resolves to loopback).
    #[arg(long, default_value = "localhost")]
    pub preview_domain: String,
    /// The guest's address inside its network namespace (as `forkvm port-forward --guest-ip`).
    #[arg(long, default_value = "192.168.241.2")]
    pub preview_guest_ip: std::net::Ipv4Addr,
    /// Most preview connections open at once.
    #[arg(long, default_value_t = 1024)]
    pub preview_max_connections: usize,
    /// How long opening a connection to a guest port may take, refused attempts retried (ms).
    #[arg(long, default_value_t = 10_000)]
    pub preview_connect_timeout_ms: u64,
    /// Close a preview connection after this long without a byte either way (ms).
    #[arg(long, default_value_t = 300_000)]
    pub preview_idle_timeout_ms: u64,
    /// A kernel image sandboxes may boot (`{"image": NAME}` in a create request), repeatable:
    /// `NAME=KERNEL[,INITRD]`. Requests name an image; only the host names files.
    #[arg(long, value_name = "NAME=KERNEL[,INITRD]")]
    pub image: Vec<String>,
    /// The kernel command line of an image, repeatable: `NAME=CMDLINE` (default: as `forkvm run`).
    #[arg(long, value_name = "NAME=CMDLINE")]
    pub image_cmdline: Vec<String>,
    /// The console line that says an image's guest is up, repeatable: `NAME=LINE` (a sandbox is
    /// `running`, and takes requests, once its guest printed it).
    #[arg(long, value_name = "NAME=LINE")]
    pub image_ready_line: Vec<String>,
    /// A raw disk image an image's sandboxes boot with, repeatable: `NAME=PATH[,ro]`. Each
    /// sandbox gets its own copy-on-write view (as `forkvm run --disk`); PATH is never written.
    #[arg(long, value_name = "NAME=PATH[,ro]")]
    pub image_disk: Vec<String>,
    /// Keep N warm VMM processes per sandbox size: booted sandboxes get shared memory and fork
    /// by live clone into them (fork() when the pool cannot serve a fork).
    #[arg(long, default_value_t = 0)]
    pub pool: usize,
    /// Print the OpenAPI document and exit.
    #[arg(long)]
    pub openapi: bool,
}

#[derive(Args, Debug)]
pub struct TokenArgs {
    #[command(subcommand)]
    pub cmd: TokenCmd,
}

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Create a bearer token for a workspace (printed once; stored hashed).
    Create {
        /// The workspace the token acts for (created with its first token).
        #[arg(long)]
        workspace: String,
        /// State directory of the daemon (default as for `forkvm serve`).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
}

pub fn state_dir(arg: Option<PathBuf>) -> PathBuf {
    arg.or_else(|| std::env::var_os("FORKVM_STATE_DIR").map(PathBuf::from))
        .unwrap_or_else(|| forkvm_api::vm::run_dir().join("forkvmd"))
}

fn absolute(p: PathBuf) -> Result<PathBuf, String> {
    std::path::absolute(&p).map_err(|e| format!("bad path {}: {e}", p.display()))
}

/// `--image NAME=KERNEL[,INITRD]`, `--image-cmdline NAME=CMDLINE`, `--image-ready-line NAME=LINE`
/// and `--image-disk NAME=PATH[,ro]`, checked: names are short
/// and plain, files are regular files (absolute paths are kept, so VMMs find them from anywhere).
fn images(
    specs: &[String],
    cmdlines: &[String],
    ready_lines: &[String],
    disks: &[String],
) -> Result<std::collections::BTreeMap<String, daemon::KernelImage>, String> {
    let file = |what: &str, p: &str| -> Result<PathBuf, String> {
        let p = absolute(PathBuf::from(p))?;
        match std::fs::metadata(&p) {
            Ok(m) if m.is_file() => Ok(p),
            Ok(_) => Err(format!("--image: {what} {} is not a regular file", p.display())),
            Err(e) => Err(format!("--image: {what} {}: {e}", p.display())),
        }
    };
    let mut out = std::collections::BTreeMap::new();
    for s in specs {
        let (name, files) = s.split_once('=').ok_or_else(|| format!("--image {s:?}: expected NAME=KERNEL[,INITRD]"))?;
        let plain = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
        if name.is_empty() || name.len() > 64 || !name.chars().all(plain) {
            return Err(format!("--image {s:?}: a name is 1-64 of [A-Za-z0-9._-]"));
        }
        let (kernel, initrd) = match files.split_once(',') {
            Some((k, i)) => (file("kernel", k)?, Some(file("initrd", i)?)),
            None => (file("kernel", files)?, None),
        };
        let image = daemon::KernelImage { kernel, initrd, cmdline: None, ready_line: None, disk: None };
        if out.insert(name.to_string(), image).is_some() {
            return Err(format!("--image {name:?} given twice"));
        }
    }
    // `--FLAG NAME=VALUE` for an image given with --image.
    let mut per_image = |flag: &str, what: &str, specs: &[String], set: fn(&mut daemon::KernelImage, String)| {
        for spec in specs {
            let (name, value) =
                spec.split_once('=').ok_or_else(|| format!("--{flag} {spec:?}: expected NAME={what}"))?;
            let image =
                out.get_mut(name).ok_or_else(|| format!("--{flag} {name:?}: no --image {name}=... was given"))?;
            set(image, value.to_string());
        }
        Ok::<(), String>(())
    };
    per_image("image-cmdline", "CMDLINE", cmdlines, |i, v| i.cmdline = Some(v))?;
    per_image("image-ready-line", "LINE", ready_lines, |i, v| i.ready_line = Some(v))?;
    for spec in disks {
        let (name, value) =
            spec.split_once('=').ok_or_else(|| format!("--image-disk {spec:?}: expected NAME=PATH[,ro]"))?;
        let (path, read_only) = match value.rsplit_once(',') {
            Some((p, "ro")) => (p, true),
            Some((p, "rw")) => (p, false),
            _ => (value, false),
        };
        let path = file("disk", path)?;
        let image =
            out.get_mut(name).ok_or_else(|| format!("--image-disk {name:?}: no --image {name}=... was given"))?;
        if image.disk.replace(daemon::ImageDisk { path, read_only }).is_some() {
            return Err(format!("--image-disk {name:?} given twice"));
        }
    }
    Ok(out)
}

pub fn serve(a: ServeArgs) -> Result<i32, String> {
    if a.openapi {
        print!("{}", daemon::routes::openapi_json());
        return Ok(0);
    }
    let state = absolute(state_dir(a.state_dir))?;
    let store = a.store.or_else(|| std::env::var_os("FORKVM_STORE").map(PathBuf::from)).unwrap_or(state.join("store"));
    let images = images(&a.image, &a.image_cmdline, &a.image_ready_line, &a.image_disk)?;
    let cfg = daemon::Config {
        images,
        pool: a.pool,
        run_dir: absolute(forkvm_api::vm::run_dir())?,
        state_dir: state,
        store: absolute(store)?,
        exe: std::env::current_exe().map_err(|e| format!("cannot find the forkvm binary: {e}"))?,
        listen: a.listen,
        policy_tick: Duration::from_millis(a.policy_tick_ms.max(10)),
        max_body: a.max_body,
        head_timeout: Duration::from_millis(a.head_timeout_ms.max(1)),
        body_timeout: Duration::from_millis(a.body_timeout_ms.max(1)),
        api_max_connections: a.api_max_connections.max(1),
        preview: a.preview_listen.map(|listen| daemon::preview::PreviewConfig {
            listen,
            domain: a.preview_domain.clone(),
            guest_ip: a.preview_guest_ip,
            max_connections: a.preview_max_connections.max(1),
            connect_timeout: Duration::from_millis(a.preview_connect_timeout_ms.max(1)),
            idle_timeout: Duration::from_millis(a.preview_idle_timeout_ms.max(1)),
        }),
    };
    daemon::serve(cfg)?;
    Ok(0)
}

pub fn token(a: TokenArgs) -> Result<i32, String> {
    match a.cmd {
        TokenCmd::Create { workspace, state_dir: dir } => {
            let token = daemon::create_token(&state_dir(dir), &workspace)?;
            println!("{token}");
            eprintln!("token for workspace {workspace:?}: shown once, stored hashed; use it as FORKVM_TOKEN");
            Ok(0)
        }
    }
}
