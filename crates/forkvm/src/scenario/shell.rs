//! Talking to a Linux guest's shell over its serial console: a line goes in, output comes back
//! between sentinel lines (the console echoes what is typed, so sentinels are printed through
//! shell arithmetic: the typed `FVM-B$((7))-` never matches the printed `FVM-B7-`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vmm::devices::console::Console;
use vmm::MicroVm;

/// A guest console: its output as lines, and a way to type into it.
pub trait Tty {
    fn console(&self) -> &Console;
    fn send_line(&self, line: &str) -> Result<(), String>;
    /// Why the guest is gone, if it is.
    fn gone(&self) -> Option<String>;
}

impl Tty for MicroVm {
    fn console(&self) -> &Console {
        MicroVm::console(self)
    }

    fn send_line(&self, line: &str) -> Result<(), String> {
        MicroVm::send_line(self, line).map_err(|e| e.to_string())
    }

    fn gone(&self) -> Option<String> {
        self.control().exit_reason().map(|r| format!("the VM exited ({r:?})"))
    }
}

static NEXT_MARK: AtomicU64 = AtomicU64::new(1);

fn timed_out(t: &dyn Tty, what: &str, timeout: Duration) -> String {
    match t.gone() {
        Some(g) => format!("{g} before {what}"),
        None => format!("no {what} within {:.0} s", timeout.as_secs_f64()),
    }
}

/// Runs `cmd` in the guest shell and returns the lines it printed (trimmed, empty ones dropped).
pub fn run(t: &dyn Tty, cmd: &str, timeout: Duration) -> Result<Vec<String>, String> {
    let id = NEXT_MARK.fetch_add(1, Ordering::Relaxed);
    let (begin, end) = (format!("FVM-B{id}-"), format!("FVM-E{id}-"));
    let deadline = Instant::now() + timeout;
    let con = t.console();
    let mut cur = con.cursor();
    t.send_line(&format!("echo FVM-B$(({id}))-; {cmd}; echo FVM-E$(({id}))-"))?;
    let what = format!("output of {cmd:?}");
    con.wait_line(&mut cur, timeout, |l| l.contains(&begin)).ok_or_else(|| timed_out(t, &what, timeout))?;
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = con.wait_line(&mut cur, left, |_| true).ok_or_else(|| timed_out(t, &what, timeout))?;
        let (text, done) = match line.find(&end) {
            Some(i) => (&line[..i], true),
            None => (line.as_str(), false),
        };
        let text = text.trim();
        // A late echo of the typed line is not output.
        if !text.is_empty() && !text.contains("$((") {
            out.push(text.to_string());
        }
        if done {
            return Ok(out);
        }
    }
}

/// Runs `cmd` and returns the first output line containing `needle`.
pub fn expect(t: &dyn Tty, cmd: &str, needle: &str, timeout: Duration) -> Result<String, String> {
    let out = run(t, cmd, timeout)?;
    out.iter()
        .find(|l| l.contains(needle))
        .cloned()
        .ok_or_else(|| format!("{cmd:?} printed {out:?}, expected a line with {needle:?}"))
}

/// Reads `/proc/sys/kernel/random/uuid` (a fresh random UUID from the kernel's CRNG).
pub fn uuid(t: &dyn Tty, timeout: Duration) -> Result<String, String> {
    let out = run(t, "cat /proc/sys/kernel/random/uuid", timeout)?;
    find_uuid(&out).ok_or_else(|| format!("no UUID in the output of cat /proc/sys/kernel/random/uuid: {out:?}"))
}

/// The first UUID in `lines`: a word, or the end of a word (a guest daemon's console message may
/// land on the same line just before it, e.g. "forkvm-agent: serving on Vsock(52)<uuid>").
pub fn find_uuid(lines: &[String]) -> Option<String> {
    lines
        .iter()
        .flat_map(|l| l.split_whitespace())
        .find_map(|w| w.len().checked_sub(36).and_then(|i| w.get(i..)).filter(|t| is_uuid(t)))
        .map(str::to_string)
}

/// `8-4-4-4-12` lower-case hex digits.
pub fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups.iter().zip([8, 4, 4, 4, 12]).all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Waits for a console line containing `needle`, starting at `*cursor`.
pub fn wait_for(t: &dyn Tty, cursor: &mut usize, needle: &str, timeout: Duration) -> Result<String, String> {
    t.console()
        .wait_line(cursor, timeout, |l| l.contains(needle) || l.contains("forkvm-child-error"))
        .ok_or_else(|| timed_out(t, &format!("{needle:?} on the console"), timeout))
        .and_then(|l| if l.contains(needle) { Ok(l) } else { Err(l) })
}

/// The last `n` console lines, indented, for error reports.
pub fn tail(t: &dyn Tty, n: usize) -> String {
    let lines = t.console().lines();
    let skip = lines.len().saturating_sub(n);
    lines[skip..].iter().map(|l| format!("\n    | {l}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The e2e once read "forkvm-agent: serving on Vsock(52)eebe4a86-..." as no UUID.
    #[test]
    fn a_uuid_after_a_console_message_on_the_same_line_is_found() {
        let out = vec!["forkvm-agent: serving on Vsock(52)eebe4a86-d827-4d9b-871f-1bf542c23b72".to_string()];
        assert_eq!(find_uuid(&out).as_deref(), Some("eebe4a86-d827-4d9b-871f-1bf542c23b72"));
        assert_eq!(find_uuid(&["no uuid here".to_string()]), None);
    }

    #[test]
    fn uuid_shape() {
        assert!(is_uuid("3f2a9c1e-0b7d-4e59-9a1c-2d6f8e0b1c3a"));
        assert!(!is_uuid("3f2a9c1e-0b7d-4e59-9a1c-2d6f8e0b1c3"));
        assert!(!is_uuid("cat /proc/sys/kernel/random/uuid"));
        assert!(!is_uuid("3f2a9c1e0b7d4e599a1c2d6f8e0b1c3a"));
    }
}
