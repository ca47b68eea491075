//! Preview rows of `forkvm bench api`: an HTTP request through the daemon's preview proxy to a
//! sandbox with `--net`, running and paused (wake on request). The test guest has no TCP stack,
//! so the answering server runs inside the sandbox's network namespace on the gateway address
//! (the daemon is told that is the guest: `--preview-guest-ip 192.168.241.1`); the rows measure
//! the proxy's path (route, privacy, wake, namespace join, connect, relay), not a guest's stack.
//! From hibernated the woken VMM has a new namespace, so the server follows it: an inotify watch
//! on the VM directory sees the VMM write `netns` (before it reports ready) and binds a new
//! listener there at once (the old one is shut down). A real guest's server is simply in the
//! woken memory; here the proxy may, rarely, find the listener not bound yet and retry its connect
//! (20 ms steps), which would show in p99. The Linux e2e (tools/e2e/l2-netdisk.sh) wakes a real
//! guest server.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::stats::{table_p99, Samples};

/// Serves `HTTP/1.0 200` + "ok" on 192.168.241.1:`port` inside the namespace named in `netns_file`;
/// returns the listener (shut it down to stop the server).
fn serve_in_ns(netns_file: &Path, port: u16) -> Result<Arc<TcpListener>, String> {
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
    let listener = Arc::new(listener);
    let l = listener.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { return };
            let mut r = BufReader::new(&c);
            let mut line = String::new();
            while r.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            let _ = (&c).write_all(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok");
        }
    });
    Ok(listener)
}

/// Stops a server from [`serve_in_ns`] (its accept returns an error).
fn stop(l: &TcpListener) {
    // SAFETY: shutdown on a socket fd we own; it only wakes the blocked accept.
    unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
}

/// Keeps a server on `port` in the VM's current namespace: each time the VMM (re)writes
/// `<vm_dir>/netns` (a wake starts a new VMM with a new namespace) the server moves there.
fn follow_netns(vm_dir: &Path, port: u16) -> Result<(), String> {
    // SAFETY: inotify_init1 has no memory preconditions; we own the returned fd.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
    if fd < 0 {
        return Err(format!("inotify_init1: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let dir = std::ffi::CString::new(vm_dir.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: dir is a valid NUL-terminated path; fd is our inotify descriptor.
    if unsafe { libc::inotify_add_watch(fd, dir.as_ptr(), libc::IN_CLOSE_WRITE | libc::IN_MOVED_TO) } < 0 {
        return Err(format!("inotify_add_watch {}: {}", vm_dir.display(), std::io::Error::last_os_error()));
    }
    let mut current = serve_in_ns(&vm_dir.join("netns"), port)?;
    let vm_dir = vm_dir.to_path_buf();
    std::thread::spawn(move || {
        let mut file = file;
        let mut buf = [0u8; 4096];
        while let Ok(n) = file.read(&mut buf) {
            let mut off = 0usize;
            let mut moved = false;
            // struct inotify_event { int wd; u32 mask, cookie, len; char name[len]; }
            while off + 16 <= n {
                let len = u32::from_ne_bytes([buf[off + 12], buf[off + 13], buf[off + 14], buf[off + 15]]) as usize;
                let name = buf.get(off + 16..(off + 16 + len).min(n)).unwrap_or(&[]);
                moved |= name.split(|b| *b == 0).next() == Some(b"netns".as_slice());
                off += 16 + len;
            }
            if moved {
                if let Ok(l) = serve_in_ns(&vm_dir.join("netns"), port) {
                    stop(&current);
                    current = l;
                }
            }
        }
    });
    Ok(())
}

/// One request through the proxy; returns (time to the first byte of the answer, to all of it).
fn get(proxy: &str, host: &str) -> Result<(Duration, Duration), String> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect(proxy).map_err(|e| format!("connect {proxy}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes()).map_err(|e| e.to_string())?;
    let mut first = [0u8; 1];
    s.read_exact(&mut first).map_err(|e| format!("no answer: {e}"))?;
    let ttfb = t0.elapsed();
    let mut out = String::from_utf8_lossy(&first).to_string();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    if !out.starts_with("HTTP/1.0 200") {
        return Err(format!("preview answered {:?}", out.lines().next().unwrap_or("")));
    }
    Ok((ttfb, t0.elapsed()))
}

/// The preview table: `proxy` is the daemon's preview address, `id` a public sandbox with net
/// whose VM directory is `vm_dir`; `pause` and `hibernate` do that through the API.
pub fn rows(
    proxy: &str,
    id: &str,
    vm_dir: &Path,
    runs: usize,
    pause: &dyn Fn() -> Result<(), String>,
    hibernate: &dyn Fn() -> Result<(), String>,
) -> Result<String, String> {
    follow_netns(vm_dir, 8080)?;
    let host = format!("{id}-8080.localhost");
    let mut running = Samples::new("preview GET, running sandbox (whole answer)", "ms");
    let mut running_fb = Samples::new("  first byte", "ms");
    let mut paused = Samples::new("preview GET, paused sandbox -> first byte (resumed on request)", "ms");
    let mut hib = Samples::new("preview GET, hibernated sandbox -> first byte (woken on request)", "ms");
    for _ in 0..runs.max(20) {
        let (fb, all) = get(proxy, &host)?;
        running.push_duration(all);
        running_fb.push_duration(fb);
    }
    for _ in 0..runs {
        pause()?;
        paused.push_duration(get(proxy, &host)?.0);
        hibernate()?;
        hib.push_duration(get(proxy, &host)?.0);
    }
    Ok(table_p99(
        "forkvm bench api: preview proxy (connection + one request, server in the VM's netns)",
        &[running, running_fb, paused, hib],
    ))
}
