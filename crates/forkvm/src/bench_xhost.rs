//! `forkvm bench xhost` (also the last table of `forkvm bench clone`): clones across hosts. A
//! test guest (`--mem`, 64 MiB of it dirtied from the host) is hibernated; two network namespaces
//! joined by veth play host A (the page server, `pagesrv --tcp`) and host B (the waking VMM).
//! Measured: wake → first answer, local (chunk store) vs across the veth (cold, and with the
//! recorded working set streamed first), and how fast the rest of the memory follows over the
//! link. Needs root and `ip` (iproute2).

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use pagesrv::net_auth::Secret;
use pagesrv::{NetClientConfig, NetServer, NetServerConfig};
use vmm::lazy_restore::Record;
use vmm::remote_wake::Hibernated;
use vmm::{HibernateOptions, MicroVm, VmConfig, WakeOptions};

use crate::cli::BenchArgs;

const T: Duration = Duration::from_secs(60);
const DIRTY: u64 = 64 << 20;

fn s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip` ({e}): install iproute2 (apt-get install iproute2)"))?;
    match out.status.success() {
        true => Ok(()),
        false => Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())),
    }
}

/// Two namespaces (A 10.78.0.1, B 10.78.0.2) over veth, and a scratch directory; removed on drop.
struct Hosts {
    a: String,
    b: String,
    dir: PathBuf,
}

impl Hosts {
    fn new() -> Result<Self, String> {
        let id = std::process::id() % 100_000;
        let dir = std::env::temp_dir().join(format!("forkvm-bench-xhost-{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(s)?;
        let h = Hosts { a: format!("fkbx-a-{id}"), b: format!("fkbx-b-{id}"), dir };
        let (va, vb) = (format!("fkbxa{id}"), format!("fkbxb{id}"));
        ip(&["netns", "add", &h.a])?;
        ip(&["netns", "add", &h.b])?;
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
        ip(&["link", "set", &va, "netns", &h.a])?;
        ip(&["link", "set", &vb, "netns", &h.b])?;
        ip(&["-n", &h.a, "addr", "add", "10.78.0.1/30", "dev", &va])?;
        ip(&["-n", &h.b, "addr", "add", "10.78.0.2/30", "dev", &vb])?;
        for (ns, dev) in [(&h.a, &va), (&h.b, &vb)] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(h)
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.a]);
        let _ = ip(&["netns", "del", &self.b]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `f` on a thread inside network namespace `ns` (sockets it makes live there).
fn in_netns<R: Send + 'static>(ns: &str, f: impl FnOnce() -> Result<R, String> + Send + 'static) -> Result<R, String> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
        // SAFETY: setns on an fd we hold open; only this thread changes namespace.
        if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns {path}: {}", std::io::Error::last_os_error()));
        }
        f()
    })
    .join()
    .map_err(|_| "a benchmark thread panicked".to_string())?
}

/// p50, p99 and max of `v` (ms).
fn quantiles(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let q = |p: f64| v.get(((v.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN);
    (q(0.5), q(0.99), q(1.0))
}

struct Row {
    name: String,
    ms: Vec<f64>,
    note: String,
}

fn ping(vm: &MicroVm) -> Result<(), String> {
    match vm.command("ping", T).map_err(s)?.as_str() {
        "pong" => Ok(()),
        other => Err(format!("guest answered {other:?} to ping")),
    }
}

fn wake_opts() -> WakeOptions {
    WakeOptions { record: Record::Never, ..Default::default() }
}

/// Wakes from `addr` `runs` times on host B: wake → first answer (ms), pages fetched, and the
/// time to bring the rest of the memory over (last run).
fn remote_runs(ns: &str, addr: String, secret: Secret, runs: usize) -> Result<(Vec<f64>, u64, u64, f64), String> {
    in_netns(ns, move || {
        let (mut ms, mut pages, mut pushed, mut fill_ms) = (Vec::new(), 0, 0, 0.0);
        for i in 0..runs {
            let t0 = Instant::now();
            let (mut vm, handle, src) =
                MicroVm::wake_remote(&addr, &secret, &NetClientConfig::default(), wake_opts()).map_err(s)?;
            ping(&vm)?;
            ms.push(t0.elapsed().as_secs_f64() * 1e3);
            (pages, pushed) = src.pages_received();
            if i + 1 == runs {
                let t = Instant::now();
                handle.fetch_all().map_err(s)?;
                fill_ms = t.elapsed().as_secs_f64() * 1e3;
                ping(&vm)?;
            }
            vm.stop();
            drop(handle);
        }
        Ok((ms, pages, pushed, fill_ms))
    })
}

/// Live clones over veth: a running shared-memory parent (64 MiB dirtied) on host A serves one
/// clone instant per connection (`forkvm clone-serve`); returns the clone → first answer times on
/// host B, its notes, and the parent's pause per clone (ms).
fn live_rows(
    hosts: &Hosts,
    mem: u64,
    secret: &Secret,
    runs: usize,
) -> Result<(Vec<f64>, String, Vec<f64>, String), String> {
    use pagesrv::net_server::{Opened, Opener};
    use std::sync::{Arc, Mutex};
    use vmm::live_clone::LiveParent;
    let vm = Arc::new(
        MicroVm::boot(VmConfig { mem_size: mem, backing: vmm::Backing::SharedFile, ..Default::default() })
            .map_err(s)?,
    );
    vm.wait_for("forkvm-test-guest ready", T).map_err(s)?;
    let start = test_guest::LOW_LIMIT;
    vm.memory().fill(start, DIRTY.min(mem - start), 0x5a);
    ping(&vm)?;
    // The parent's cost of being cloneable: host writes of 16 MiB (4096 pages) as they are, and
    // after arming (one write fault per page), and with a clone generation alive (each page's old
    // contents saved first).
    const W: u64 = 16 << 20;
    let write = |b: u8| {
        let t = Instant::now();
        vm.memory().fill(start, W, b);
        t.elapsed().as_secs_f64() * 1e3
    };
    let plain = write(1);
    let parent = Arc::new(LiveParent::attach(&vm).map_err(s)?);
    parent.arm().map_err(s)?;
    let armed = write(2);
    let alive = {
        let c = parent.capture(&vm).map_err(s)?;
        let ms = write(3);
        drop(c);
        ms
    };
    let cost = format!(
        "parent writes 16 MiB: {plain:.1} ms plain, {armed:.1} ms armed, {alive:.1} ms with a clone alive \
         ({} write faults)",
        parent.stats().wp_faults
    );
    let pauses: Arc<Mutex<Vec<f64>>> = Arc::default();
    let (v, p, ps) = (vm.clone(), parent.clone(), pauses.clone());
    let opener = Opener(Arc::new(move || {
        let c = p.capture(&v).map_err(s)?;
        ps.lock().unwrap_or_else(|e| e.into_inner()).push(c.report.paused.as_secs_f64() * 1e3);
        let source: Arc<dyn pagesrv::PageSource> = c.generation;
        Ok(Opened { source, state: Some(c.state), push: Some(c.data) })
    }));
    let mut cfg = NetServerConfig::new(secret.clone());
    cfg.opener = Some(opener);
    let len = vm.memory().file().ok_or("no memory file")?.metadata().map_err(s)?.len();
    let srv = in_netns(&hosts.a, move || {
        let (srv, _events) = NetServer::bind("10.78.0.1:0", Arc::new(pagesrv::ZeroSource { len }), cfg).map_err(s)?;
        Ok(srv)
    })?;
    let addr = srv.local_addr().to_string();
    let (ms, pages, pushed, _) = remote_runs(&hosts.b, addr, secret.clone(), runs)?;
    srv.stop();
    ping(&vm)?;
    let st = parent.stats();
    let note = format!("{pages} pages asked, {pushed} pushed; parent: {} write faults", st.wp_faults);
    let pauses = pauses.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok((ms, note, pauses, cost))
}

/// Serves the hibernation in `dir` from host A; `push` streams its working set.
fn server(ns: &str, dir: &Path, store: &Path, secret: &Secret, push: bool) -> Result<NetServer, String> {
    let h = Hibernated::open(dir, store).map_err(s)?;
    let mut cfg = NetServerConfig::new(secret.clone());
    cfg.state = Some(h.state);
    cfg.push = if push { h.wset } else { None };
    let src = h.source;
    in_netns(ns, move || {
        let (srv, _events) = NetServer::bind("10.78.0.1:0", src, cfg).map_err(s)?;
        Ok(srv)
    })
}

pub fn bench_xhost(args: &BenchArgs) -> Result<i32, String> {
    let runs = args.runs.max(2);
    let hosts = Hosts::new()?;
    let (dir, store) = (hosts.dir.join("hib"), hosts.dir.join("store"));
    {
        let vm = MicroVm::boot(VmConfig { mem_size: args.mem, ..Default::default() }).map_err(s)?;
        vm.wait_for("forkvm-test-guest ready", T).map_err(s)?;
        let start = test_guest::LOW_LIMIT;
        vm.memory().fill(start, DIRTY.min(args.mem - start), 0x5a);
        ping(&vm)?;
        vm.hibernate(&dir, &store, &HibernateOptions::default()).map_err(s)?;
    }
    // A local wake records the working set (what the guest touches up to its first answer).
    let mut local = Vec::new();
    for i in 0..runs {
        let record = if i == 0 { Record::Always } else { Record::Never };
        let opts = WakeOptions { record, prefetch: false, ..Default::default() };
        let t0 = Instant::now();
        let (mut vm, handle) = MicroVm::wake(&dir, &store, opts).map_err(s)?;
        ping(&vm)?;
        local.push(t0.elapsed().as_secs_f64() * 1e3);
        if i == 0 {
            handle.save_working_set().map_err(s)?;
        }
        vm.stop();
        drop(handle);
    }
    let mut key = [0u8; 32];
    // SAFETY: getrandom writes at most 32 bytes into our buffer.
    unsafe { libc::getrandom(key.as_mut_ptr().cast(), key.len(), 0) };
    let secret = Secret::from_bytes(&key).map_err(s)?;
    let mut rows =
        vec![Row { name: "wake local (chunk store) -> first answer".into(), ms: local, note: String::new() }];
    let mut fill = String::new();
    for (push, name) in [(false, "wake over veth, cold -> first answer"), (true, "wake over veth, working set pushed")]
    {
        let srv = server(&hosts.a, &dir, &store, &secret, push)?;
        let addr = srv.local_addr().to_string();
        let (ms, pages, pushed, fill_ms) = remote_runs(&hosts.b, addr, secret.clone(), runs)?;
        let note = format!("{pages} pages asked, {pushed} pushed");
        rows.push(Row { name: name.into(), ms, note });
        if !push {
            let mib = (args.mem >> 20) as f64;
            fill = format!("rest of the {mib:.0} MiB over veth: {fill_ms:.0} ms ({:.0} MiB/s)", mib / (fill_ms / 1e3));
        }
        srv.stop();
    }
    let (ms, note, pauses, cost) = live_rows(&hosts, args.mem, &secret, runs)?;
    rows.push(Row { name: "live clone over veth (clone-serve) -> first answer".into(), ms, note });
    rows.push(Row { name: "  parent paused per live clone".into(), ms: pauses, note: String::new() });
    println!(
        "forkvm bench xhost: test guest {} MiB (64 MiB dirtied), {runs} runs, hosts = netns over veth",
        args.mem >> 20
    );
    println!("{:<44} {:>9} {:>9} {:>9}  notes", "metric (ms)", "p50", "p99", "max");
    for mut r in rows {
        let (p50, p99, max) = quantiles(&mut r.ms);
        println!("{:<44} {p50:>9.2} {p99:>9.2} {max:>9.2}  {}", r.name, r.note);
    }
    println!("{fill}");
    println!("{cost}");
    Ok(0)
}
