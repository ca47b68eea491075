//! The fault thread: reads uffd events, serves faults with the block
//! around them, handles REMOVE, and fails faulting threads (poison/SIGBUS)
//! when the source cannot deliver. See [`crate::server`] for the policy.

use std::cell::RefCell;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use crate::error::{sys, Result};
use crate::server::{Ended, Outcome, RegionState, RemovePolicy, Shared};
use crate::uffd::{Event, Fill};

thread_local! {
    static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

pub(crate) fn poison_unserved(s: &Shared) -> Result<u64> {
    let ps = s.cfg.page_size as u64;
    let mut n = 0;
    for rs in &s.regions {
        let mut p = 0;
        while p < rs.pages {
            if rs.present.get(p) {
                p += 1;
                continue;
            }
            let lo = p;
            while p < rs.pages && !rs.present.get(p) {
                p += 1;
            }
            let (start, len) = (rs.r.base + lo as u64 * ps, (p - lo) as u64 * ps);
            let mut done = 0;
            while done < len {
                match s.uffd.poison(start + done, len - done).map_err(sys("UFFDIO_POISON"))? {
                    Fill::Done => done = len,
                    Fill::Partial(k) => done += k,
                    Fill::Exists | Fill::Again | Fill::Unmapped => done += ps,
                    Fill::Gone => return Ok(n),
                }
            }
            rs.present.set_range(lo, p);
            n += (p - lo) as u64;
        }
    }
    s.stats.pages_poisoned.fetch_add(n, Relaxed);
    Ok(n)
}

/// The fault thread: serve until stopped. If serving panics (a buggy
/// [`PageSource`]) or the uffd fails, fail stop: poison every unserved
/// page, so blocked and future accesses get SIGBUS rather than hanging.
/// Always records why it ended and signals `done_fd`.
pub(crate) fn fault_thread(s: &Shared, stop_fd: &OwnedFd) {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fault_loop(s, stop_fd)));
    let ended = match r {
        Err(_) => {
            record_error(s, "fault thread panicked; poisoning unserved pages".into());
            Ended::Failed("fault thread panicked".into())
        }
        Ok(e) => e,
    };
    if let Ended::Failed(_) = ended {
        run_hook(s, "the page server failed");
        match poison_unserved(s) {
            Ok(n) => tracing::error!(pages = n, "page server failed; unserved pages poisoned"),
            Err(e) => tracing::error!("page server failed and could not poison: {e}"),
        }
    }
    if let Ok(mut e) = s.ended.lock() {
        *e = Some(ended);
    }
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a local array to our eventfd.
    let _ = unsafe { libc::write(s.done_fd.as_raw_fd(), one.as_ptr().cast(), 8) };
}

/// Serve until stopped, the peer is gone, or a fatal error.
pub(crate) fn fault_loop(s: &Shared, stop_fd: &OwnedFd) -> Ended {
    let mut events = Vec::with_capacity(64);
    let mut retry: Vec<(u64, u32)> = Vec::new();
    loop {
        if s.stop.load(Relaxed) {
            return Ended::Stopped;
        }
        if s.peer_gone.load(Relaxed) {
            tracing::info!("the served process exited; fault thread ends");
            return Ended::PeerGone;
        }
        if let Some(why) = s.halt.lock().ok().and_then(|h| h.clone()) {
            return Ended::Halted(why);
        }
        let mut fds = [
            libc::pollfd { fd: s.uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: stop_fd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        let timeout = if retry.is_empty() { 1000 } else { 1 };
        // SAFETY: fds is a valid array of 2 pollfd for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            record_error(s, format!("poll on userfaultfd: {e}"));
            return Ended::Failed(format!("poll on userfaultfd: {e}"));
        }
        if fds[1].revents != 0 || s.stop.load(Relaxed) {
            return Ended::Stopped;
        }
        if fds[0].revents & libc::POLLHUP != 0 {
            tracing::warn!("userfaultfd hung up; fault thread exits");
            return Ended::HungUp;
        }
        if fds[0].revents & libc::POLLERR != 0 {
            // A blocking or uninitialised uffd (PageServer::start makes it non-blocking).
            record_error(s, "userfaultfd reports POLLERR (not initialised with UFFDIO_API?)".into());
            return Ended::Failed("userfaultfd reports POLLERR".into());
        }
        events.clear();
        loop {
            match s.uffd.read_events(&mut events) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) => {
                    record_error(s, format!("read userfaultfd: {e}"));
                    return Ended::Failed(format!("read userfaultfd: {e}"));
                }
            }
        }
        let pending = std::mem::take(&mut retry);
        for (address, tid) in pending {
            if let Outcome::Retry = serve_fault(s, address, tid, false) {
                retry.push((address, tid));
            }
        }
        for ev in events.drain(..) {
            match ev {
                Event::PageFault { address, tid, .. } => {
                    let t0 = Instant::now();
                    s.stats.faults.fetch_add(1, Relaxed);
                    match serve_fault(s, address, tid, true) {
                        Outcome::Ok => s.stats.fault_latency.record(t0.elapsed()),
                        Outcome::Retry => retry.push((address, tid)),
                    }
                }
                Event::Remove { start, end } | Event::Unmap { start, end } => {
                    s.stats.removes.fetch_add(1, Relaxed);
                    on_remove(s, start, end);
                }
                Event::Other(e) => tracing::debug!(event = e, "ignored userfaultfd event"),
            }
        }
    }
}

pub(crate) fn on_remove(s: &Shared, start: u64, end: u64) {
    let ps = s.cfg.page_size as u64;
    for rs in &s.regions {
        let lo = start.max(rs.r.base);
        let hi = end.min(rs.r.base + rs.r.len);
        if lo >= hi {
            continue;
        }
        let (a, b) = (((lo - rs.r.base) / ps) as usize, ((hi - rs.r.base).div_ceil(ps)) as usize);
        rs.present.clear_range(a, b);
        if s.cfg.remove_policy == RemovePolicy::Zero {
            rs.removed.set_range(a, b);
        }
    }
}

/// Tell the owner (see `ServerConfig::on_failure`), with the first error seen.
fn run_hook(s: &Shared, what: &str) {
    if let Some(h) = &s.cfg.on_failure {
        let first = s.error.lock().ok().and_then(|e| e.clone());
        let msg = match first {
            Some(e) => format!("{what}: {e}"),
            None => what.to_string(),
        };
        (h.0)(&msg);
    }
}

pub(crate) fn record_error(s: &Shared, msg: String) {
    tracing::error!("{msg}");
    s.error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(msg);
}

/// Serve the fault at `address`. `first` is false for retries.
pub(crate) fn serve_fault(s: &Shared, address: u64, tid: u32, first: bool) -> Outcome {
    let ps = s.cfg.page_size as u64;
    let Some(rs) = s.regions.iter().find(|r| address >= r.r.base && address < r.r.base + r.r.len) else {
        tracing::warn!(address, "fault outside every region");
        return Outcome::Ok;
    };
    let page_addr = address & !(ps - 1);
    let p = ((page_addr - rs.r.base) / ps) as usize;
    if rs.present.get(p) {
        // Raced with the prefetcher (or a retry): make sure the thread runs.
        s.stats.faults_already_present.fetch_add(1, Relaxed);
        let _ = s.uffd.wake(page_addr, ps);
        return Outcome::Ok;
    }
    if rs.removed.get(p) {
        return match s.uffd.zeropage(page_addr, ps) {
            Ok(Fill::Again) => Outcome::Retry,
            Ok(_) => {
                rs.removed.clear_range(p, p + 1);
                rs.present.set_range(p, p + 1);
                s.stats.pages_zeroed.fetch_add(1, Relaxed);
                let _ = s.uffd.wake(page_addr, ps);
                Outcome::Ok
            }
            Err(e) => {
                record_error(s, format!("UFFDIO_ZEROPAGE at {page_addr:#x}: {e}"));
                fail_page(s, page_addr, tid);
                Outcome::Ok
            }
        };
    }
    // The aligned block around the fault, shrunk to the run of missing pages.
    let bs = s.cfg.batch / s.cfg.page_size;
    let block = p / bs;
    let (start, end) = (block * bs, (block * bs + bs).min(rs.pages));
    let missing = |i: usize| !rs.present.get(i) && !rs.removed.get(i);
    let mut lo = p;
    while lo > start && missing(lo - 1) {
        lo -= 1;
    }
    let mut hi = p + 1;
    while hi < end && missing(hi) {
        hi += 1;
    }
    if first && s.cfg.record && rs.recorded.test_and_set(block) {
        if let Ok(mut r) = s.recorded.lock() {
            let off = rs.r.offset + start as u64 * ps;
            let len = ((end - start) as u64 * ps) as u32;
            // Coalesce with the previous block when they are adjacent.
            match r.last_mut() {
                Some(last) if last.0 + u64::from(last.1) == off && u64::from(last.1) + u64::from(len) <= 64 << 20 => {
                    last.1 += len
                }
                _ => r.push((off, len)),
            }
        }
    }
    match place(s, rs, lo, hi, false) {
        Ok(Outcome::Retry) => Outcome::Retry,
        Ok(Outcome::Ok) => {
            if !rs.present.get(p) {
                let _ = s.uffd.wake(page_addr, ps);
            }
            Outcome::Ok
        }
        Err(e) => {
            s.stats.source_errors.fetch_add(1, Relaxed);
            record_error(s, e.to_string());
            // Try the faulting page alone before giving up on it.
            if hi - lo > 1 {
                if let Ok(Outcome::Ok) = place(s, rs, p, p + 1, false) {
                    return Outcome::Ok;
                }
            }
            fail_page(s, page_addr, tid);
            Outcome::Ok
        }
    }
}

/// Make the access to `page_addr` fail instead of hanging: poison it, or
/// send SIGBUS to the faulting thread of a process we own, or else halt
/// serving this VM (never signal a process we do not own).
pub(crate) fn fail_page(s: &Shared, page_addr: u64, tid: u32) {
    run_hook(s, &format!("page at {page_addr:#x} cannot be served"));
    let ps = s.cfg.page_size as u64;
    if s.cfg.poison {
        match s.uffd.poison(page_addr, ps) {
            Ok(Fill::Done | Fill::Partial(_) | Fill::Exists) => {
                s.stats.pages_poisoned.fetch_add(1, Relaxed);
                tracing::error!(page_addr, "page poisoned: only the thread touching it faults");
                return;
            }
            Ok(Fill::Gone) => {
                s.peer_gone.store(true, Relaxed);
                return;
            }
            Ok(other) => tracing::warn!(?other, "UFFDIO_POISON did not apply"),
            Err(e) => tracing::warn!("UFFDIO_POISON unavailable: {e}"),
        }
    }
    match (s.cfg.owner_pid, tid) {
        (Some(pid), t) if t != 0 => {
            // SAFETY: tgkill takes plain integers; worst case it fails with ESRCH.
            let _ = unsafe { libc::syscall(libc::SYS_tgkill, pid, t as i32, libc::SIGBUS) };
        }
        (Some(pid), _) => {
            // SAFETY: kill takes plain integers.
            let _ = unsafe { libc::kill(pid, libc::SIGBUS) };
        }
        (None, _) => {
            let first = s.error.lock().ok().and_then(|e| e.clone()).unwrap_or_default();
            let why = format!(
                "page at {page_addr:#x} cannot be served ({first}) and cannot be poisoned; \
                 this VM is stopped: its faulting vCPU stays blocked, no page is served to it again"
            );
            tracing::error!("{why}");
            if let Ok(mut h) = s.halt.lock() {
                h.get_or_insert(why);
            }
        }
    }
}

/// Fill pages `[lo, hi)` of a region from the source and place them with
/// as few ioctls as possible. `Err` means the source failed (nothing placed).
pub(crate) fn place(s: &Shared, rs: &RegionState, lo: usize, hi: usize, prefetch: bool) -> Result<Outcome> {
    let ps = s.cfg.page_size;
    let len = (hi - lo) * ps;
    let off = rs.r.offset + (lo * ps) as u64;
    let dst = rs.r.base + (lo * ps) as u64;
    let zero = s.source.is_zero(off, len as u64);
    BUF.with(|b| {
        let mut buf = b.borrow_mut();
        if !zero {
            if buf.len() < len {
                buf.resize(len, 0);
            }
            s.source.fill(off, &mut buf[..len])?;
        }
        let mut pos = 0usize;
        while pos < len {
            let r = if zero {
                s.uffd.zeropage(dst + pos as u64, (len - pos) as u64)
            } else {
                s.uffd.copy(dst + pos as u64, &buf[pos..len])
            }
            .map_err(sys(format!("UFFDIO_COPY/ZEROPAGE at {:#x}", dst + pos as u64)))?;
            let done = match r {
                Fill::Done => len - pos,
                Fill::Partial(n) => n as usize / ps * ps,
                Fill::Exists => {
                    s.stats.eexist.fetch_add(1, Relaxed);
                    rs.present.set_range(lo + pos / ps, lo + pos / ps + 1);
                    pos += ps;
                    continue;
                }
                Fill::Again => return Ok(Outcome::Retry),
                Fill::Gone => {
                    s.peer_gone.store(true, Relaxed);
                    return Ok(Outcome::Ok);
                }
                Fill::Unmapped => return Ok(Outcome::Ok),
            };
            if done == 0 {
                return Ok(Outcome::Retry);
            }
            let pages = (done / ps) as u64;
            rs.present.set_range(lo + pos / ps, lo + (pos + done) / ps);
            s.stats.copies.fetch_add(1, Relaxed);
            if zero {
                s.stats.pages_zeroed.fetch_add(pages, Relaxed);
            } else {
                s.stats.pages_copied.fetch_add(pages, Relaxed);
            }
            if prefetch {
                s.stats.pages_prefetched.fetch_add(pages, Relaxed);
            }
            pos += done;
        }
        Ok(Outcome::Ok)
    })
}
