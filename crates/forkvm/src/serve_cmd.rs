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

pub fn serve(a: ServeArgs) -> Result<i32, String> {
    if a.openapi {
        print!("{}", daemon::routes::openapi_json());
        return Ok(0);
    }
    let state = absolute(state_dir(a.state_dir))?;
    let store = a.store.or_else(|| std::env::var_os("FORKVM_STORE").map(PathBuf::from)).unwrap_or(state.join("store"));
    let cfg = daemon::Config {
        run_dir: absolute(forkvm_api::vm::run_dir())?,
        state_dir: state,
        store: absolute(store)?,
        exe: std::env::current_exe().map_err(|e| format!("cannot find the forkvm binary: {e}"))?,
        listen: a.listen,
        policy_tick: Duration::from_millis(a.policy_tick_ms.max(10)),
        max_body: a.max_body,
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
