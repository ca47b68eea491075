//! `forkvm pagesrv`: forkvm's page server as Firecracker's memory backend. Listens on a Unix
//! socket and serves every Firecracker that restores a snapshot with
//! `mem_backend: {backend_type: "Uffd", backend_path: SOCKET}`, from the raw memory file or from
//! a chunk-store image (`forkvm store import --firecracker`), with batching and the working set
//! of the first restore prefetched into later ones.

use std::path::PathBuf;
use std::sync::mpsc::channel;
use std::sync::Arc;

use chunkstore::Store;
use clap::Args;
use pagesrv::listener::Event;
use pagesrv::{ChunkSource, FileSource, Listener, ListenerConfig, PageSource};

use crate::hibernate_cmd::default_store;
use crate::size::parse_size;

#[derive(Args, Debug)]
pub struct PagesrvArgs {
    /// Unix socket to listen on (Firecracker's `mem_backend.backend_path`); created 0600.
    #[arg(long, required_unless_present = "tcp")]
    pub socket: Option<PathBuf>,
    /// What to serve: a Firecracker memory file, or the id of an image in the chunk store
    /// (printed by `forkvm store import --firecracker`).
    #[arg(long, required_unless_present = "hibernated")]
    pub memory: Option<String>,
    #[command(flatten)]
    pub tcp: crate::net_cmd::TcpServeArgs,
    /// Chunk store holding image ids (default: as for `forkvm store import`).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Working-set file: recorded from the first VM served, prefetched into every later one
    /// (default: <socket>.wset).
    #[arg(long)]
    pub wset: Option<PathBuf>,
    /// Neither record nor prefetch a working set.
    #[arg(long)]
    pub no_wset: bool,
    /// Bytes served per fault (the aligned block around it).
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    pub batch: u64,
}

/// The memory to serve: a regular file at that path, else an image id in the store.
pub(crate) fn open_source(a: &PagesrvArgs) -> Result<(Arc<dyn PageSource>, String), String> {
    let memory = a.memory.clone().ok_or("--memory is missing")?;
    let p = PathBuf::from(&memory);
    if p.is_file() {
        let f = std::fs::File::open(&p).map_err(|e| format!("cannot open {}: {e}", p.display()))?;
        let src = FileSource::whole(f).map_err(|e| e.to_string())?;
        let what = format!("memory file {} ({} MiB)", p.display(), src.len() >> 20);
        return Ok((Arc::new(src), what));
    }
    let dir = a.store.clone().unwrap_or_else(default_store);
    let store = Store::open_readonly(&dir)
        .map_err(|e| format!("{memory} is not a memory file, and the store {} cannot be opened: {e}", dir.display()))?;
    let m = store
        .manifest(&memory)
        .map_err(|e| format!("{memory} is neither a memory file nor an image in the store {}: {e}", dir.display()))?;
    let what = format!("image {memory} of {} ({} MiB)", dir.display(), m.image_len() >> 20);
    Ok((Arc::new(ChunkSource::new(Arc::new(store), Arc::new(m))), what))
}

enum Msg {
    Ev(Event),
    Signal,
}

/// Block SIGINT and SIGTERM in this thread (and the threads it starts), and forward them.
fn forward_signals(tx: std::sync::mpsc::Sender<Msg>) -> Result<(), String> {
    let set = crate::signals::block_stop_signals()?;
    std::thread::spawn(move || loop {
        let mut sig = 0;
        // SAFETY: waits for one of the blocked signals in `set`; writes the number into `sig`.
        if unsafe { libc::sigwait(&set, &mut sig) } == 0 && tx.send(Msg::Signal).is_err() {
            return;
        }
    });
    Ok(())
}

/// Print a line; a closed stdout (the reader went away) is not a reason to stop serving.
macro_rules! say {
    // (also used by net_cmd)
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

fn us(d: Option<std::time::Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.0}", d.as_secs_f64() * 1e6))
}

fn print_event(e: &Event) {
    let pid = |p: &Option<i32>| p.map_or("?".into(), |p| p.to_string());
    match e {
        Event::Started { id, pid: p, field, regions, bytes, prefetch } => say!(
            "vm {id} (pid {}): serving {regions} regions, {} MiB; handshake: {field}{}",
            pid(p),
            bytes >> 20,
            if *prefetch { "; prefetching the working set" } else { "" }
        ),
        Event::Rejected { id, pid: p, error } => say!("connection {id} (pid {}): refused: {error}", pid(p)),
        Event::Ended { id, pid: p, why, stats: s, error } => say!(
            "vm {id} (pid {}): released ({why}): {} faults (p50 {} us, p99 {} us), {} pages copied, {} zero, \
             {} prefetched, {} removed{}",
            pid(p),
            s.faults,
            us(s.latency_p50),
            us(s.latency_p99),
            s.pages_copied,
            s.pages_zeroed,
            s.pages_prefetched,
            s.removes,
            error.as_ref().map_or(String::new(), |e| format!("; FAILED PAGE: {e}"))
        ),
    }
}

pub fn pagesrv(a: PagesrvArgs) -> Result<i32, String> {
    if a.tcp.tcp.is_some() {
        return crate::net_cmd::pagesrv_tcp(&a);
    }
    let socket = a.socket.clone().ok_or("--socket (or --tcp) is missing")?;
    let (src, what) = open_source(&a)?;
    let (tx, rx) = channel();
    forward_signals(tx.clone())?;
    let wset = if a.no_wset {
        None
    } else {
        Some(a.wset.clone().unwrap_or_else(|| PathBuf::from(format!("{}.wset", socket.display()))))
    };
    let cfg = ListenerConfig { batch: a.batch as usize, wset: wset.clone(), record: !a.no_wset, ..Default::default() };
    let (listener, events) = Listener::bind(&socket, src, cfg).map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        for e in events {
            if tx.send(Msg::Ev(e)).is_err() {
                return;
            }
        }
    });
    say!("forkvm pagesrv: serving {what} on {}", socket.display());
    if let Some(w) = &wset {
        let state = if w.exists() { "prefetched into every VM" } else { "recorded from the first VM" };
        say!("working set {}: {state}", w.display());
    }
    let mut closing = false;
    for m in rx {
        match m {
            Msg::Ev(e) => {
                print_event(&e);
                if closing && listener.active() == 0 {
                    break;
                }
            }
            Msg::Signal if !closing && listener.active() > 0 => {
                listener.close();
                closing = true;
                say!(
                    "no longer accepting; waiting for {} VMs to exit (signal again to stop serving them now)",
                    listener.active()
                );
            }
            Msg::Signal => break,
        }
    }
    listener.stop();
    Ok(0)
}
