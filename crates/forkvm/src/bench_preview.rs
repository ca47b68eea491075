//! Preview rows of `forkvm bench api`: an HTTP request through the daemon's preview proxy to a
//! sandbox with `--net`, running and paused (wake on request). The test guest has no TCP stack,
//! so the answering server runs inside the sandbox's network namespace on the gateway address
//! (the daemon is told that is the guest: `--preview-guest-ip 192.168.241.1`); the rows measure
//! the proxy's path (route, privacy, wake, namespace join, connect, relay), not a guest's stack.
//! From hibernated the namespace is new after the wake, so no server can wait in it here: the
//! Linux e2e (tools/e2e/l2-netdisk.sh) covers wake with a real guest server.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::stats::{table, Samples};

/// Serves `HTTP/1.0 200` + "ok" on 192.168.241.1:`port` inside the namespace named in `netns_file`.
fn serve_in_ns(netns_file: &Path, port: u16) -> Result<(), String> {
    let ns_path = std::fs::read_to_string(netns_file).map_err(|e| format!("{}: {e}", netns_file.display()))?;
    let ns = std::fs::File::open(ns_path.trim()).map_err(|e| format!("{}: {e}", ns_path.trim()))?;
    let listener = std::thread::spawn(move || {
        // SAFETY: setns changes only this (short-lived) thread's network namespace.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        TcpListener::bind(("192.168.241.1", port)).map_err(|e| e.to_string())
    })
    .join()
    .map_err(|_| "the namespace thread panicked".to_string())??;
    std::thread::spawn(move || {
        for c in listener.incoming().flatten() {
            let mut r = BufReader::new(&c);
            let mut line = String::new();
            while r.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            let _ = (&c).write_all(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok");
        }
    });
    Ok(())
}

fn get(proxy: &str, host: &str) -> Result<(), String> {
    let mut s = TcpStream::connect(proxy).map_err(|e| format!("connect {proxy}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes()).map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    if !out.starts_with("HTTP/1.0 200") {
        return Err(format!("preview answered {:?}", out.lines().next().unwrap_or("")));
    }
    Ok(())
}

/// The preview table: `proxy` is the daemon's preview address, `id` a public sandbox with net
/// whose VM directory is `vm_dir`; `pause` pauses it through the API.
pub fn rows(
    proxy: &str,
    id: &str,
    vm_dir: &Path,
    runs: usize,
    pause: &dyn Fn() -> Result<(), String>,
) -> Result<String, String> {
    serve_in_ns(&vm_dir.join("netns"), 8080)?;
    let host = format!("{id}-8080.localhost");
    let mut running = Samples::new("preview GET, running sandbox", "ms");
    let mut paused = Samples::new("preview GET, paused sandbox (resumed on request)", "ms");
    for _ in 0..runs.max(20) {
        let t0 = Instant::now();
        get(proxy, &host)?;
        running.push_duration(t0.elapsed());
    }
    for _ in 0..runs {
        pause()?;
        let t0 = Instant::now();
        get(proxy, &host)?;
        paused.push_duration(t0.elapsed());
    }
    Ok(table(
        "forkvm bench api: preview proxy (connection + one request, server in the VM's netns)",
        &[running, paused],
    ))
}
