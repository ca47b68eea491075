//! Clones across hosts from the CLI:
//! - `forkvm pagesrv --tcp ADDR --secret-file F (--hibernated VM | --memory X)` on host A serves a
//!   hibernated VM (memory, state, working set) or any memory source over the authenticated page
//!   protocol (pagesrv::net_wire);
//! - `forkvm wake NAME --pages tcp://HOST:PORT --secret-file F` on host B starts a new VM NAME whose
//!   state comes over that connection and whose memory is served from host A as it faults (the
//!   working set streamed first).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use pagesrv::net_auth::Secret;
use pagesrv::net_client::parse_url;
use pagesrv::{NetClientConfig, NetEvent, NetServer, NetServerConfig, WorkingSet};
use vmm::remote_wake::Hibernated;
use vmm::{MicroVm, WakeOptions};

use crate::claim::Claimed;
use crate::hibernate_cmd::WakeArgs;
use crate::pagesrv_cmd::PagesrvArgs;
use crate::server::{redirect_output, serve};

#[derive(Args, Debug)]
pub struct TcpServeArgs {
    /// Serve other hosts over TCP on this address (e.g. 10.0.0.1:7070) instead of a Unix socket:
    /// forkvm's page protocol, authenticated by --secret-file, pages checked by their MACs.
    #[arg(long, requires = "secret_file")]
    pub tcp: Option<String>,
    /// The shared secret (the same file on both hosts, mode 0600; e.g.
    /// `head -c 32 /dev/urandom > F && chmod 600 F`).
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// With --tcp: serve a hibernated VM (its name here, or its `hibernated` directory): memory,
    /// vCPU/device state and working set, so `forkvm wake --pages` can wake it on another host.
    #[arg(long, requires = "tcp", conflicts_with = "memory")]
    pub hibernated: Option<String>,
}

#[derive(Args, Debug, Default)]
pub struct RemoteWakeArgs {
    /// Wake, as a new VM of this name on this host, the VM served by `forkvm pagesrv --tcp` (a
    /// hibernated VM) or `forkvm clone-serve` (a live clone of a running VM) on another host:
    /// tcp://HOST:PORT. Its memory stays there and is served as the guest touches it.
    #[arg(long, requires = "secret_file")]
    pub pages: Option<String>,
    /// The shared secret file of --pages (the server's --secret-file).
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// Seconds to wait for one answer of the page server before the link counts as lost (the VM
    /// then stops with an error).
    #[arg(long, default_value_t = 10)]
    pub pages_timeout: u64,
}

fn load_secret(p: Option<&Path>) -> Result<Secret, String> {
    Secret::load(p.ok_or("--secret-file is missing")?).map_err(|e| e.to_string())
}

macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

fn print_event(e: &NetEvent) {
    let peer = |p: &Option<std::net::SocketAddr>| p.map_or("?".into(), |p| p.to_string());
    match e {
        NetEvent::Served { id, peer: p, version, push } => say!(
            "client {id} ({}): authenticated, protocol v{version}{}",
            peer(p),
            if *push { "; streaming the working set" } else { "" }
        ),
        NetEvent::Rejected { id, peer: p, error } => say!("client {id} ({}): refused: {error}", peer(p)),
        NetEvent::Ended { id, peer: p, why, pages, pushed, requests } => {
            say!("client {id} ({}): ended ({why}): {pages} pages in {requests} requests, {pushed} pushed", peer(p))
        }
    }
}

/// `forkvm pagesrv --tcp`: serves until SIGINT or SIGTERM.
pub fn pagesrv_tcp(a: &PagesrvArgs) -> Result<i32, String> {
    let addr = a.tcp.tcp.clone().ok_or("--tcp is missing")?;
    let secret = load_secret(a.tcp.secret_file.as_deref())?;
    let mut cfg = NetServerConfig::new(secret);
    let (src, what) = match &a.tcp.hibernated {
        Some(h) => {
            let dir = if Path::new(h).is_dir() {
                PathBuf::from(h)
            } else {
                forkvm_api::vm::VmPaths::for_name(h)?.hibernated()
            };
            let record = vmm::hibernate::read_record(&dir).map_err(|e| format!("{h}: {e}"))?;
            let store = a.store.clone().unwrap_or_else(|| PathBuf::from(&record.store));
            let hib = Hibernated::open(&dir, &store).map_err(|e| e.to_string())?;
            let what = format!("hibernated VM {} ({} MiB, image {})", dir.display(), hib.mem_size >> 20, hib.image);
            cfg.state = Some(hib.state);
            if !a.no_wset {
                match hib.wset {
                    Some(w) => cfg.push = Some(w),
                    None => cfg.record = Some(hib.wset_path),
                }
            }
            (hib.source, what)
        }
        None => {
            let (src, what) = crate::pagesrv_cmd::open_source(a)?;
            if let (Some(w), false) = (&a.wset, a.no_wset) {
                if w.exists() {
                    cfg.push = Some(WorkingSet::load(w).map_err(|e| e.to_string())?);
                } else {
                    cfg.record = Some(w.clone());
                }
            }
            (src, what)
        }
    };
    let set = crate::signals::block_stop_signals()?;
    let push = cfg.push.as_ref().map(WorkingSet::bytes);
    let recording = cfg.record.clone();
    let (server, events) = NetServer::bind(&addr, src, cfg).map_err(|e| e.to_string())?;
    std::thread::spawn(move || events.iter().for_each(|e| print_event(&e)));
    say!(
        "forkvm pagesrv: serving {what} on tcp://{} (protocol v{})",
        server.local_addr(),
        pagesrv::net_wire::MAX_VERSION
    );
    match (push, recording) {
        (Some(b), _) => say!("working set: {} MiB streamed to every client first", b >> 20),
        (None, Some(p)) => say!("working set: recorded from the first client into {}", p.display()),
        _ => {}
    }
    let mut sig = 0;
    // SAFETY: waits for one of the blocked signals in `set`; writes the number into `sig`.
    unsafe { libc::sigwait(&set, &mut sig) };
    say!("forkvm pagesrv: stopping ({} clients connected)", server.active());
    server.stop();
    Ok(0)
}

/// `forkvm wake NAME --pages tcp://HOST:PORT --secret-file F`.
pub fn wake_remote(args: &WakeArgs) -> Result<i32, String> {
    let r = &args.remote;
    let url = r.pages.clone().ok_or("--pages is missing")?;
    let addr = parse_url(&url).map_err(|e| e.to_string())?;
    let secret_file = r.secret_file.clone().ok_or("--pages needs --secret-file")?;
    let secret = load_secret(Some(&secret_file))?;
    if !args.background {
        let secret_abs = std::path::absolute(&secret_file).map_err(|e| e.to_string())?;
        let argv: Vec<OsString> = vec![
            "wake".into(),
            args.vm.clone().into(),
            "--pages".into(),
            url.into(),
            "--secret-file".into(),
            secret_abs.into(),
            "--pages-timeout".into(),
            r.pages_timeout.to_string().into(),
            "--background".into(),
        ];
        return crate::vmctl::spawn_detached(&args.vm, argv);
    }
    let claimed = Claimed::new(&args.vm)?;
    let console = match crate::private_fs::append_private(&claimed.console_log()) {
        Ok(f) => f,
        Err(e) => {
            claimed.release();
            return Err(e);
        }
    };
    let net = NetClientConfig { request_timeout: Duration::from_secs(r.pages_timeout.max(1)), ..Default::default() };
    let opts = WakeOptions { console_mirror: Some(Box::new(console)), track_dirty: true, ..Default::default() };
    let (vm, handle, _src) = match MicroVm::wake_remote(&addr, &secret, &net, opts) {
        Ok(x) => x,
        Err(e) => {
            claimed.release();
            return Err(format!("wake from {url} failed: {e}"));
        }
    };
    if let Err(e) = redirect_output(&claimed.paths.vmm_log()) {
        drop((vm, handle));
        claimed.release();
        return Err(e);
    }
    tracing::info!("woke {} from {url}: {:?}", args.vm, handle.report());
    Ok(serve(claimed, vm, None, Some(handle)))
}
