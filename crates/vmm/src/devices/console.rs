//! Where the guest's serial output goes: kept as lines (for tests, the API and forks) and
//! optionally mirrored to a writer such as stdout or a Unix socket.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Lines kept for readers; older ones are dropped past this.
const MAX_LINES: usize = 100_000;

#[derive(Default)]
struct Lines {
    done: Vec<String>,
    dropped: usize,
    partial: Vec<u8>,
}

/// Shared serial output of one VM.
#[derive(Default)]
pub struct Console {
    lines: Mutex<Lines>,
    cond: Condvar,
    mirror: Mutex<Option<Box<dyn Write + Send>>>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console").finish_non_exhaustive()
    }
}

impl Console {
    pub fn new(mirror: Option<Box<dyn Write + Send>>) -> Arc<Self> {
        Arc::new(Console { mirror: Mutex::new(mirror), ..Default::default() })
    }

    /// Replace the mirror (a fork child points its console somewhere new).
    pub fn set_mirror(&self, mirror: Option<Box<dyn Write + Send>>) {
        *lock(&self.mirror) = mirror;
    }

    /// Bytes from the guest.
    pub fn push(&self, bytes: &[u8]) {
        if let Some(m) = lock(&self.mirror).as_mut() {
            // A console reader that went away must not stop the guest.
            let _ = m.write_all(bytes).and_then(|()| m.flush());
        }
        let mut l = lock(&self.lines);
        let mut woke = false;
        for &b in bytes {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&l.partial).trim_end_matches('\r').to_string();
                l.partial.clear();
                l.done.push(line);
                woke = true;
            } else {
                l.partial.push(b);
            }
        }
        if l.done.len() > MAX_LINES {
            let cut = l.done.len() - MAX_LINES / 2;
            l.done.drain(..cut);
            l.dropped += cut;
        }
        drop(l);
        if woke {
            self.cond.notify_all();
        }
    }

    /// Index of the next line to be written (a cursor for [`Console::wait_line`]).
    pub fn cursor(&self) -> usize {
        let l = lock(&self.lines);
        l.dropped + l.done.len()
    }

    /// Waits for the first line at or after `*cursor` for which `pred` holds; advances the cursor
    /// past it. `None` on timeout.
    pub fn wait_line(&self, cursor: &mut usize, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut l = lock(&self.lines);
        loop {
            let start = cursor.saturating_sub(l.dropped);
            for (i, line) in l.done.iter().enumerate().skip(start) {
                if pred(line) {
                    *cursor = l.dropped + i + 1;
                    return Some(line.clone());
                }
            }
            *cursor = l.dropped + l.done.len();
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            l = match self.cond.wait_timeout(l, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// All complete lines still kept.
    pub fn lines(&self) -> Vec<String> {
        lock(&self.lines).done.clone()
    }
}

/// Locks ignoring poisoning: console state stays usable even if a writer thread panicked.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_cursor() {
        let c = Console::new(None);
        c.push(b"hello\r\nwor");
        let mut cur = 0;
        assert_eq!(c.wait_line(&mut cur, Duration::from_millis(10), |_| true).as_deref(), Some("hello"));
        assert_eq!(c.wait_line(&mut cur, Duration::from_millis(10), |_| true), None);
        c.push(b"ld\n");
        assert_eq!(c.wait_line(&mut cur, Duration::from_millis(10), |l| l.starts_with('w')).as_deref(), Some("world"));
        assert_eq!(c.cursor(), 2);
    }
}
