//! `forkvm serve`: the sandbox daemon. A JSON API under `/v1` on a Unix socket
//! (`<run dir>/forkvmd.sock`, mode 0600) and optionally on loopback TCP; state in SQLite; VMMs
//! are separate `forkvm` processes that outlive the daemon and are re-adopted by the next one.

pub mod app;
pub mod auth;
pub mod body_deadline;
pub mod console;
pub mod db;
pub mod error;
pub mod http_server;
pub mod metrics;
pub mod ops;
pub mod policy;
pub mod preview;
pub mod raw_answer;
pub mod readopt;
pub mod reap;
pub mod routes;
pub mod util;
pub mod vmproc;
pub mod webhook;

mod lock;

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

pub use app::{Config, ImageDisk, KernelImage};

/// Runs the daemon until SIGINT or SIGTERM.
pub fn serve(cfg: Config) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    rt.block_on(serve_async(cfg))
}

async fn serve_async(cfg: Config) -> Result<(), String> {
    lock::private_dir(&cfg.run_dir)?;
    lock::private_dir(&cfg.state_dir)?;
    let _lock = lock::Lock::take(&cfg.run_dir.join("forkvmd.lock"))?;
    let db = db::Db::open(&cfg.db_path())?;
    let app = Arc::new(app::App::new(cfg.clone(), db));
    let n = readopt::readopt(&app).await.map_err(|e| e.message)?;
    tracing::info!("re-adopted {n} sandboxes");

    let sock = cfg.socket_path();
    let tmp = cfg.run_dir.join(format!(".forkvmd.sock.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let unix = tokio::net::UnixListener::bind(&tmp).map_err(|e| format!("cannot bind {}: {e}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, &sock).map_err(|e| format!("cannot create {}: {e}", sock.display()))?;
    let tcp = match cfg.listen {
        Some(addr) => {
            Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))?)
        }
        None => None,
    };
    let preview = match &cfg.preview {
        Some(p) => Some((preview::bind(&app, p).await?, p.clone())),
        None => None,
    };
    let mut line = format!("forkvmd: listening on {}", sock.display());
    if let Some(t) = &tcp {
        if let Ok(a) = t.local_addr() {
            line.push_str(&format!(" and http://{a}"));
        }
    }
    if let Some(p) = app.preview.get() {
        line.push_str(&format!(" ; previews on {} for *.{}", p.addr, p.domain));
    }
    println!("{line}");
    let _ = std::io::stdout().flush();

    tokio::spawn(reap::run(app.vmms.children.clone()));
    tokio::spawn(policy::run(app.clone()));
    if let Some((l, p)) = preview {
        tokio::spawn(preview::serve(app.clone(), p, l));
    }
    let router = routes::router(app.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let shutdown = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let limits = http_server::Limits {
        head_timeout: cfg.head_timeout,
        body_timeout: cfg.body_timeout,
        max_connections: cfg.api_max_connections,
    };
    let unix_task =
        tokio::spawn(http_server::serve(app.clone(), "unix", unix, router.clone(), limits, shutdown(stop_rx.clone())));
    let tcp_task =
        tcp.map(|t| tokio::spawn(http_server::serve(app.clone(), "tcp", t, router, limits, shutdown(stop_rx.clone()))));
    let sig = wait_for_signal().await;
    tracing::info!(target: LOG, "{sig}: shutting down (closing the API; sandboxes keep running)");
    let _ = stop_tx.send(true);
    // Warm members are no sandboxes: nothing would use or stop them after us.
    let pool = if cfg.pool > 0 { app.vmms.stop_pool().await } else { 0 };
    let _ = std::fs::remove_file(&sock);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), unix_task).await;
    if let Some(t) = tcp_task {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), t).await;
    }
    let live = [forkvm_api::v1::SandboxState::Running, forkvm_api::v1::SandboxState::Paused];
    let kept = db::sandboxes::in_states(&app.db.lock(), &live).map_or(0, |v| v.len());
    tracing::info!(
        target: LOG,
        "stopped: {pool} warm pool VMM{} stopped; {kept} sandbox VMM{} left running for the next forkvmd to re-adopt",
        plural(pool),
        plural(kept)
    );
    Ok(())
}

/// The log target of the daemon's shutdown lines: `forkvm serve` shows it at info by default
/// (the rest of the log at warn), so a stopped daemon says so and what it stopped.
pub const LOG: &str = "forkvmd";

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Waits for SIGTERM or SIGINT; returns its name.
async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => "SIGTERM",
                _ = i.recv() => "SIGINT",
            }
        }
        _ => std::future::pending().await,
    }
}

/// Creates a workspace token directly in the state database (works with or without a daemon).
pub fn create_token(state_dir: &std::path::Path, workspace: &str) -> Result<String, String> {
    lock::private_dir(state_dir)?;
    let db = db::Db::open(&state_dir.join("forkvmd.db"))?;
    let c = db.lock();
    db::tokens::create(&c, workspace)
}
